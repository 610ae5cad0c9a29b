"""Kubernetes manifests for one shardnet deployment: a head, its shards' replicas, and what discovery needs.

``render(spec)`` is a pure function from a validated ``DeploymentSpec`` to
plain dicts, one per Kubernetes object; ``to_yaml`` turns them into the text
``kubectl apply -f -`` reads. Per shard ``n`` there is a Deployment, a headless
Service and a PodDisruptionBudget named ``NAME-n``; the head has the same three
named ``NAME-head`` (its Service is a plain ClusterIP one: the stable address
clients call) plus a ServiceAccount, Role and RoleBinding that let it list
and watch pods and EndpointSlices, nothing more. A uses_before or uses_after
is a component of its own named ``NAME-uses-before``/``NAME-uses-after``,
made as a shard's (``hop_component_name`` says why not Jina's sidecars). With a TLS Secret every pod
mounts it (or the head's, and the workers' own) and serves TLS (probes on a
plaintext health-only port); with a cert-manager issuer a Certificate keeps
each Secret filled.

Labels are a contract with discovery (``shardnet.discovery``):

- pod templates carry the original design's ``jina_deployment_name``,
  ``pod_type`` (``HEAD``/``WORKER``/``USES_BEFORE``/``USES_AFTER``) and
  ``shard_id`` (``""`` on the head and the hops);
- Services carry ``shardnet.io/deployment``, ``shardnet.io/role``
  (``head``/``worker``/``uses_before``/``uses_after``) and ``shardnet.io/shard``
  (``""`` on the head and the hops, so every Service has the same keys), which
  their EndpointSlices inherit;
- the gRPC container is named ``executor`` and its port, like the Services'
  port, is named ``grpc``.

Every object also carries ``app.kubernetes.io/instance: NAME``, so
``kubectl delete all,pdb,sa,role,rolebinding,networkpolicy -l app.kubernetes.io/instance=NAME``
removes a deployment (add ``certificate`` to the list when one was rendered).

The head learns its namespace from the downward API, so the objects may be
moved to another namespace as rendered (kustomize's ``namespace:``, Flux's
``targetNamespace``). TLS names are the exception: the certificates and
``--server-name`` carry the namespace rendered, so a TLS deployment is
rendered again for another.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from types import MappingProxyType
from typing import Any, NamedTuple, Optional

import yaml

from shardnet.errors import ConfigurationError
from shardnet.manifests.images import check_image
from shardnet.networking.balancing import check_balancer
from shardnet.networking.channels import check_max_message_mb
from shardnet.networking.policies import check_count, check_flag
from shardnet.networking.polling import PollingMap
from shardnet.protocol import services
from shardnet.runtimes.executor import metas_name, split_uses
from shardnet.runtimes.head import DISCOVERED, USES_AFTER, USES_BEFORE
from shardnet.runtimes.worker import AFTER_DRAIN_SECONDS, CLOSE_GRACE, THREAD_EXIT_GRACE

DEPLOYMENT_LABEL = "jina_deployment_name"
POD_TYPE_LABEL = "pod_type"
SHARD_LABEL = "shard_id"
SERVICE_DEPLOYMENT_LABEL = "shardnet.io/deployment"
SERVICE_ROLE_LABEL = "shardnet.io/role"
SERVICE_SHARD_LABEL = "shardnet.io/shard"
CONTAINER_NAME = "executor"
# the hops a head calls around its shards (--uses-before, --uses-after), each rendered as a component of its own
HOPS = (USES_BEFORE, USES_AFTER)
PORT_NAME = "grpc"

# Discovery lists and watches pods and EndpointSlices (never reads one by name: no "get"); these rules are all
# the head may do.
DISCOVERY_RULES = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
)

RUN_AS = 10001  # the Dockerfile's numeric user, so the kubelet can check runAsNonRoot
WORKSPACE = "/workspace"  # the workers' writable folder (an emptyDir) under a read-only root filesystem
TLS_DIR = "/etc/shardnet/tls"  # where the TLS Secret (tls.crt, tls.key, ca.crt) is mounted, read-only
HEALTH_PORT_NAME = "health"
METRICS_PORT_NAME = "metrics"
METRICS_PORT = 9090  # what `k8s render --metrics` alone gives
# the head watches the namespace it runs in, told by the downward API: re-namespaced by kustomize, Argo CD or
# Flux, it still watches its own (where its Role is) rather than the one rendered into its arguments
NAMESPACE_VARIABLE = "POD_NAMESPACE"
NAMESPACE_ARGUMENT = f"$({NAMESPACE_VARIABLE})"
ISSUER_KINDS = ("Issuer", "ClusterIssuer")
# what the head's certificate is used for (also the workers', when they share its Secret): serving, and dialling
# the workers, who take only clients with a certificate of their CA
CERTIFICATE_USAGES = ("digital signature", "key encipherment", "server auth", "client auth")
# a worker's certificate in a Secret of its own only serves: it cannot be presented as a client
WORKER_CERTIFICATE_USAGES = ("digital signature", "key encipherment", "server auth")

_LABEL_MAX = 63
# \Z, not $: $ also matches before a trailing newline, which let "index\n" through as a name, a namespace or a
# quantity, for the API server to refuse at kubectl apply
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<suffix>m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)|[eE](?P<exponent>[+-]?[0-9]+))?\Z"
)
# What each suffix _QUANTITY accepts multiplies by, as in k8s.io/apimachinery's resource.Quantity.
_QUANTITY_SCALE = MappingProxyType(
    {
        "": Fraction(1),
        "m": Fraction(1, 1000),
        **{suffix: Fraction(1000**power) for power, suffix in enumerate("kMGTPE", start=1)},
        **{f"{suffix}i": Fraction(1024**power) for power, suffix in enumerate("KMGTPE", start=1)},
    }
)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _quantity_value(quantity: str) -> Fraction:
    """The exact number a quantity ``_QUANTITY`` accepted stands for (``"1Gi"`` -> 1073741824), to compare two.

    kubernetes_asyncio 36.1.0, the pinned client, has no quantity parser
    (``kubernetes_asyncio.utils.quantity`` is not in it), so this covers the
    subset of the grammar that ``_QUANTITY`` lets through.
    """
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ConfigurationError(f"{quantity!r} is not a Kubernetes quantity such as 500m or 1Gi")
    scale = Fraction(10) ** int(match["exponent"]) if match["exponent"] else _QUANTITY_SCALE[match["suffix"] or ""]
    return Fraction(match["number"]) * scale


@dataclass(frozen=True)
class Resources:
    """What one container asks the scheduler for (requests) and may not exceed (limits).

    No CPU limit by default: CFS throttling adds tail latency to a server that
    would otherwise use idle cores. Memory is limited so that a leak ends in a
    restart of this container, not in the node's OOM killer picking a victim.

    >>> Resources(cpu="1", memory="2Gi", memory_limit="4Gi").to_k8s()
    {'requests': {'cpu': '1', 'memory': '2Gi'}, 'limits': {'memory': '4Gi'}}
    """

    cpu: str = "250m"
    memory: str = "512Mi"
    memory_limit: Optional[str] = "1Gi"
    cpu_limit: Optional[str] = None

    def __post_init__(self) -> None:
        for what, value in (("cpu", self.cpu), ("memory", self.memory)):
            if not isinstance(value, str) or not _QUANTITY.match(value):
                raise ConfigurationError(f"{what} request {value!r} is not a Kubernetes quantity such as 250m or 512Mi")
        for what, value in (("memory_limit", self.memory_limit), ("cpu_limit", self.cpu_limit)):
            if value is not None and (not isinstance(value, str) or not _QUANTITY.match(value)):
                raise ConfigurationError(f"{what} {value!r} is not a Kubernetes quantity such as 500m or 1Gi")
        # the API server refuses a container whose request exceeds its limit (spec.containers[].resources.requests)
        for what, request, limit in (("cpu", self.cpu, self.cpu_limit), ("memory", self.memory, self.memory_limit)):
            if limit is not None and _quantity_value(request) > _quantity_value(limit):
                raise ConfigurationError(
                    f"{what} request {request!r} exceeds {what}_limit {limit!r}: Kubernetes rejects a request "
                    f"above its limit; lower the request or raise the limit"
                )

    def to_k8s(self) -> dict[str, Any]:
        """The container's ``resources`` field."""
        resources: dict[str, Any] = {"requests": {"cpu": self.cpu, "memory": self.memory}}
        limits = {key: value for key, value in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if value}
        if limits:
            resources["limits"] = limits
        return resources


HEAD_RESOURCES = Resources(cpu="100m", memory="128Mi", memory_limit="512Mi")  # raised to what its topology needs

# What one request of the largest size costs a process at its peak, in copies of it, over a base: measured with
# a 64 MB request through a head (+265 MiB over 54) to an Echo worker (+450 MiB), as gRPC, Python and protobuf
# each hold their own. A memory limit below that lets one legal request OOM-kill the container and all it serves.
PROCESS_BASE_MIB = 64
STARTUP_PERIOD = 2  # seconds between startup probes
MAX_UNAVAILABLE = 1  # the pods of the head, or of one shard, a voluntary disruption (a node drain) may take at once
# seconds of the grace left to a process after its drain: every bound it has on its way out (runtimes.worker's
# AFTER_DRAIN_SECONDS, which a Deployment's stop gives it too)
DRAIN_MARGIN = AFTER_DRAIN_SECONDS
MESSAGE_COPIES = MappingProxyType({"head": 5, "worker": 8})
# ... and what each shard past the first adds to a head under ALL polling, which holds every shard's answer, raw
# and decoded, and merges them: measured with 60 MiB answers, 2 shards +610 MiB, 4 shards +1360 MiB (a merge
# over the size limit, refused; one within it costs less)
HEAD_COPIES_PER_SHARD = 6
# what the most documents one call may hold (protocol.messages: 1,000,000 in a process_data list, what a uses_after
# receives) cost a worker decoded, however small its message (some 200 bytes each); a head routes them undecoded
DECODED_DOCUMENTS_MIB = MappingProxyType({"head": 0, "worker": 224})
# seconds for a new pod to be scheduled, its image pulled and its readiness seen by the head's watch, beyond the
# time its Executor takes to load (startup_seconds)
SCHEDULING_MARGIN = 60
# the longest an Executor may take to load (a day): the head waits that long and more for its workers
# (--shards-wait, which it caps at 1e9 s) and the rollout's deadline counts it in an int32 field
MAX_STARTUP_SECONDS = 86_400
DEFAULT_PROGRESS_DEADLINE = 600  # Kubernetes' own progressDeadlineSeconds


class CertificateNeed(NamedTuple):
    """One TLS Secret and what its certificate must be: the names it carries and what it is used for."""

    secret: str
    role: str  # who mounts it: "head" (the workers too, when they have no Secret of their own) or "worker"
    names: list[str]
    usages: tuple[str, ...]


def message_copies(role: str, shards: int, polling: str) -> int:
    """How many times the largest message a ``role`` process takes at its peak (``MESSAGE_COPIES``): a head
    polling ALL over several shards holds and merges each one's answer (``HEAD_COPIES_PER_SHARD``)."""
    if role == "head" and shards > 1 and PollingMap.parse(polling).polls_all:
        return MESSAGE_COPIES[role] + HEAD_COPIES_PER_SHARD * (shards - 1)
    return MESSAGE_COPIES[role]


def head_memory_limit(shards: int, polling: str, max_message_mb: float) -> str:
    """The head's default memory limit: ``HEAD_RESOURCES``'s, or, past it, what one request of
    ``max_message_mb`` takes the head (``message_copies``), rounded up to 64 MiB."""
    needed = PROCESS_BASE_MIB + message_copies("head", shards, polling) * max_message_mb
    default = _quantity_value(HEAD_RESOURCES.memory_limit) / 2**20
    return HEAD_RESOURCES.memory_limit if needed <= default else f"{math.ceil(needed / 64) * 64}Mi"


@dataclass(frozen=True)
class DeploymentSpec:
    """One sharded, replicated deployment as Kubernetes should run it; validated at construction.

    ``name`` names every object, so it must be a DNS-1123 label that starts
    with a letter (Service names must) and leaves room for the ``-head`` and
    ``-N`` suffixes within 63 characters. ``uses`` is the ``MODULE:CLASS`` (or
    ``FILE.py:CLASS``) of the Executor the workers load from ``image``, with
    ``--workspace`` an emptyDir at ``/workspace``; ``polling`` is ``ANY``,
    ``ALL`` or a JSON map of endpoint to either, with ``*`` as the default.

    >>> DeploymentSpec(name="index", image="shardnet:0.1.0", uses="pkg.mod:Cls", shards=2).shards
    2
    """

    name: str
    image: str
    uses: str
    uses_with: str = "{}"  # a JSON object: the Executor's keyword arguments, on every worker's command line
    metas_name: Optional[str] = None  # the name uses_metas gives the Executor (None: its class's, as in Jina)
    shards: int = 1
    replicas: int = 1
    polling: str = "ANY"
    namespace: str = "default"
    balancer: str = "p2c_ewma"
    port: int = 8080
    head_replicas: int = 1
    worker_resources: Resources = field(default_factory=Resources)
    # None: HEAD_RESOURCES, its memory limit raised to what one request of max_message_mb takes the head
    # (head_memory_limit: more under ALL polling over several shards)
    head_resources: Optional[Resources] = None
    termination_grace_seconds: int = 30  # what a stopping pod has: preStop, then the drain, then SIGKILL
    pre_stop_seconds: int = 5
    startup_seconds: int = 180  # how long loading an Executor may take before Kubernetes restarts the pod
    network_policy: bool = False  # a NetworkPolicy per shard: its workers take connections from the heads only
    max_message_mb: float = 64.0  # under the processes' own default (256): what the default memory limits hold
    max_in_flight: Optional[int] = None  # the head refuses requests past it; None: no limit
    request_streams: bool = True  # the head sends its workers single requests on shared streams
    # a Secret holding tls.crt, tls.key and ca.crt (as cert-manager writes one): the head serves TLS, the workers
    # mutual TLS, and the head dials them with that certificate; see head_server_name and worker_server_name
    tls_secret: Optional[str] = None
    # a second Secret of the same CA for the workers alone, whose certificate names only them and only serves:
    # a worker's key then can neither pose as the head nor call other workers (None: they share tls_secret's)
    worker_tls_secret: Optional[str] = None
    health_port: int = 8081  # with TLS only: the plaintext health check the probes use (kubelet's speak no TLS)
    # a cert-manager Issuer (or ClusterIssuer) of the deployment's own CA: a Certificate keeping tls_secret filled
    tls_issuer: Optional[str] = None
    tls_issuer_kind: str = "Issuer"
    # head and workers serve Prometheus metrics over HTTP on this port (--metrics-port), their pods annotated
    # prometheus.io/scrape and prometheus.io/port for the common scrape configuration; None: no metrics
    metrics_port: Optional[int] = None
    # MODULE:CLASS of the Executors every request passes through before the shards (uses_before) and that merges
    # their answers (uses_after), loaded from image; each is a Deployment of its own (see hop_component_name)
    uses_before: Optional[str] = None
    uses_after: Optional[str] = None

    def __post_init__(self) -> None:
        self._check_uses_with()
        metas_name({"name": self.metas_name}, "metas_name")
        for what in ("shards", "replicas", "head_replicas"):
            value = getattr(self, what)
            if not _is_count(value) or value < 1:
                raise ConfigurationError(f"{what} must be an integer >= 1, got {value!r}")
        if not isinstance(self.name, str) or not _DNS1123_LABEL.match(self.name) or not self.name[0].isalpha():
            raise ConfigurationError(
                f"name {self.name!r} must be a DNS-1123 label that starts with a letter: "
                "lower-case letters, digits and '-', ending in a letter or digit"
            )
        # with TLS, NAME-worker is a DNS label of the workers' certificate name (and a Certificate's name)
        suffixes = ["-head", f"-{self.shards - 1}"] + (["-worker"] if self.tls_secret is not None else [])
        suffixes += [hop_component_name("", role) for role, _ in self.hops]
        longest_suffix = max(len(suffix) for suffix in suffixes)
        if len(self.name) + longest_suffix > _LABEL_MAX:
            raise ConfigurationError(
                f"name {self.name!r} is too long: at most {_LABEL_MAX - longest_suffix} characters, "
                f"so that names with their suffix ({', '.join(suffixes)}) stay within {_LABEL_MAX}"
            )
        namespace = self.namespace
        if not isinstance(namespace, str) or len(namespace) > _LABEL_MAX or not _DNS1123_LABEL.match(namespace):
            raise ConfigurationError(f"namespace {self.namespace!r} must be a DNS-1123 label of at most 63 characters")
        check_image(self.image)
        split_uses(self.uses)  # what ``shardnet worker --uses`` loads
        for role in HOPS:
            if getattr(self, role) is not None:
                split_uses(getattr(self, role), role)
        if not isinstance(self.polling, str):
            raise ConfigurationError(f"polling must be ANY, ALL or a JSON map as text, got {self.polling!r}")
        PollingMap.parse(self.polling)  # raises ConfigurationError naming what is wrong
        check_max_message_mb(self.max_message_mb)
        self._check_memory_holds_a_message()
        if self.max_in_flight is not None:
            check_count(self.max_in_flight, "max_in_flight", 1)
        check_flag(self.request_streams, "request_streams")
        check_flag(self.network_policy, "network_policy")
        check_balancer(self.balancer)
        if not _is_count(self.port) or not 1024 <= self.port <= 65535:
            raise ConfigurationError(
                f"port must be an integer in 1024..65535, got {self.port!r}: the pods run as uid {RUN_AS} with every "
                "capability dropped, and such a process cannot listen below 1024"
            )
        for what in ("tls_secret", "worker_tls_secret"):
            secret = getattr(self, what)
            if secret is not None and (
                not isinstance(secret, str) or len(secret) > 253 or not _DNS1123_SUBDOMAIN.match(secret)
            ):
                raise ConfigurationError(
                    f"{what} {secret!r} must name a Secret: a DNS-1123 subdomain of at most 253 characters"
                )
        if self.worker_tls_secret is not None and self.worker_tls_secret == self.tls_secret:
            raise ConfigurationError(
                f"worker_tls_secret (--worker-tls-secret) must be another Secret than tls_secret "
                f"({self.tls_secret!r}): the head's certificate and the workers' are apart"
            )
        if self.worker_tls_secret is not None and self.tls_secret is None:
            raise ConfigurationError(
                "worker_tls_secret (--worker-tls-secret) needs tls_secret (--tls-secret): the head's own Secret"
            )
        if self.tls_secret is not None and (
            not _is_count(self.health_port) or not 1024 <= self.health_port <= 65535 or self.health_port == self.port
        ):
            raise ConfigurationError(
                f"health_port (--health-port) must be an integer in 1024..65535 other than port ({self.port}), got "
                f"{self.health_port!r}: with TLS the probes read a plaintext health check there"
            )
        taken = (self.port, self.health_port) if self.tls_secret is not None else (self.port,)
        if self.metrics_port is not None and (
            not _is_count(self.metrics_port) or not 1024 <= self.metrics_port <= 65535 or self.metrics_port in taken
        ):
            raise ConfigurationError(
                f"metrics_port (--metrics) must be an integer in 1024..65535 other than the gRPC and health ports "
                f"({', '.join(map(str, taken))}), got {self.metrics_port!r}"
            )
        if self.tls_issuer is not None:
            if self.tls_secret is None:
                raise ConfigurationError(
                    "tls_issuer (--tls-issuer) needs tls_secret (--tls-secret): the Secret it fills"
                )
            if not isinstance(self.tls_issuer, str) or not _DNS1123_SUBDOMAIN.match(self.tls_issuer):
                raise ConfigurationError(f"tls_issuer {self.tls_issuer!r} must name an Issuer: a DNS-1123 subdomain")
        if self.tls_issuer_kind not in ISSUER_KINDS:
            raise ConfigurationError(
                f"tls_issuer_kind must be one of {', '.join(ISSUER_KINDS)}, got {self.tls_issuer_kind!r}"
            )
        if not _is_count(self.startup_seconds) or not STARTUP_PERIOD <= self.startup_seconds <= MAX_STARTUP_SECONDS:
            raise ConfigurationError(
                f"startup_seconds must be an integer from {STARTUP_PERIOD} to {MAX_STARTUP_SECONDS}, "
                f"got {self.startup_seconds!r}"
            )
        if not _is_count(self.termination_grace_seconds) or self.termination_grace_seconds < 1:
            raise ConfigurationError(
                f"termination_grace_seconds must be an integer >= 1, got {self.termination_grace_seconds!r}"
            )
        if not _is_count(self.pre_stop_seconds) or not 0 <= self.pre_stop_seconds < self.termination_grace_seconds:
            raise ConfigurationError(
                f"pre_stop_seconds must be an integer >= 0 and below termination_grace_seconds "
                f"({self.termination_grace_seconds}), got {self.pre_stop_seconds!r}"
            )
        least = self.pre_stop_seconds + DRAIN_MARGIN + 1  # a drain of 1 s, and the margin for the way out
        if self.termination_grace_seconds < least:
            raise ConfigurationError(
                f"termination_grace_seconds must be at least {least}: the preStop pause ({self.pre_stop_seconds} s), "
                f"a drain of 1 s and {DRAIN_MARGIN} s after it for the Executor's close() ({CLOSE_GRACE:g} s at "
                f"most), its threads' end ({THREAD_EXIT_GRACE:g} s at most) and the exit before SIGKILL; got "
                f"{self.termination_grace_seconds}"
            )

    def _check_uses_with(self) -> None:
        try:
            value = json.loads(self.uses_with) if isinstance(self.uses_with, str) else None
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"uses_with is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigurationError(f"uses_with must be a JSON object of keyword arguments, got {self.uses_with!r}")
        written = len(self.uses_with.encode())  # as executed: the kubelet turns the rendered $$ back into $
        if written > MAX_ARGUMENT_BYTES:  # the container's exec would fail, the pod crash-looping
            raise ConfigurationError(
                f"uses_with is {written} bytes on the worker's command line, past the {MAX_ARGUMENT_BYTES} Linux "
                "takes in one argument: put the data in the image (or a volume) and pass its path instead"
            )

    def _check_memory_holds_a_message(self) -> None:
        """Refuse a memory limit that one request of ``max_message_mb`` would exceed (MESSAGE_COPIES)."""
        for role, resources, flag in (
            ("head", self.head_container_resources, "--head-memory-limit"),
            ("worker", self.worker_resources, "--memory-limit"),
        ):
            if not isinstance(resources, Resources) or resources.memory_limit is None:
                continue
            # --max-message-mb counts MiB (the processes take it times 2**20), as the limits here do; exact
            # fractions, as a quantity may be far past what a float holds (1e400)
            per_message = message_copies(role, self.shards, self.polling)
            copies = per_message * self.max_message_mb
            floor = DECODED_DOCUMENTS_MIB[role]  # small documents decode to more than copies of a small message
            needed = math.ceil(PROCESS_BASE_MIB + max(copies, floor))
            limit_mib = _quantity_value(resources.memory_limit) / 2**20
            if limit_mib < needed:
                fits = max(0, (limit_mib - PROCESS_BASE_MIB) / per_message)
                peak = f"{per_message} copies of it" if copies >= floor else (
                    f"the {floor} MiB its most documents decode to"
                )
                why = (f"; under ALL polling it holds and merges the answers of {self.shards} shards"
                       if role == "head" and per_message > MESSAGE_COPIES[role] else "")
                lower = (
                    f"lower --max-message-mb to {math.floor(fits)} or less, "
                    if copies >= floor and limit_mib >= PROCESS_BASE_MIB + floor else ""
                )
                raise ConfigurationError(
                    f"a {role} memory limit of {resources.memory_limit} ({flag}) is too small for messages of "
                    f"{self.max_message_mb:g} MiB (--max-message-mb): one such request takes a {role} about "
                    f"{needed} MiB at its peak ({peak} over {PROCESS_BASE_MIB} MiB{why}), and the container would be "
                    f"OOM-killed with every request on it; raise the limit to {needed}Mi, {lower}or drop the limit "
                    "('none')"
                )

    @property
    def head_container_resources(self) -> Resources:
        """``head_resources``, or, not given, ``HEAD_RESOURCES`` with the memory limit its topology needs (worked
        out from the spec each time: a copy with more shards, ``dataclasses.replace``, is sized for them)."""
        if self.head_resources is not None:
            return self.head_resources
        return replace(HEAD_RESOURCES, memory_limit=head_memory_limit(self.shards, self.polling, self.max_message_mb))

    @property
    def drain_seconds(self) -> int:
        """How long a process lets its in-flight requests finish on SIGTERM: the grace after preStop, less a margin
        (``DRAIN_MARGIN``) for the Executor's close(), its threads' end and the exit."""
        return max(1, self.termination_grace_seconds - self.pre_stop_seconds - DRAIN_MARGIN)

    @property
    def shards_wait_seconds(self) -> int:
        """How long a new head waits for a worker of every shard before it turns ready anyway: as long as a
        worker may take to load, plus the time to be scheduled, pulled and seen ready (SCHEDULING_MARGIN)."""
        return self.startup_seconds + SCHEDULING_MARGIN

    @property
    def progress_deadline_seconds(self) -> int:
        """When Kubernetes reports a rollout stuck: its default (600 s), unless a new head may wait longer."""
        return max(DEFAULT_PROGRESS_DEADLINE, self.shards_wait_seconds + SCHEDULING_MARGIN)

    @property
    def head_server_name(self) -> str:
        """The name clients dial the head by (its Service's), which the TLS certificate must carry."""
        return f"{self.name}-head.{self.namespace}.svc"

    @property
    def worker_server_name(self) -> str:
        """The name the head checks its workers' certificate against: it dials them by pod IP, which is not
        known when the certificate is made, so the certificate must carry this name as well."""
        return f"{self.name}-worker.{self.namespace}.svc"

    @property
    def head_tls_names(self) -> list[str]:
        """The head Service's name as clients may spell it, each of which the head's certificate must carry."""
        head = f"{self.name}-head"
        return [head, f"{head}.{self.namespace}", self.head_server_name, f"{self.head_server_name}.cluster.local"]

    @property
    def tls_names(self) -> list[str]:
        """Every name one certificate shared by head and workers must carry: the head Service's and the workers'."""
        return self.head_tls_names + [self.worker_server_name]

    @property
    def worker_secret(self) -> Optional[str]:
        """The Secret the workers mount: their own, else the head's."""
        return self.worker_tls_secret or self.tls_secret

    @property
    def certificates(self) -> list[CertificateNeed]:
        """What each TLS Secret's certificate must be: one shared by head and workers, or one for each."""
        if self.tls_secret is None:
            return []
        if self.worker_tls_secret is None:
            return [CertificateNeed(self.tls_secret, "head", self.tls_names, CERTIFICATE_USAGES)]
        return [
            CertificateNeed(self.tls_secret, "head", self.head_tls_names, CERTIFICATE_USAGES),
            CertificateNeed(self.worker_tls_secret, "worker", [self.worker_server_name], WORKER_CERTIFICATE_USAGES),
        ]

    @property
    def hops(self) -> list[tuple[str, str]]:
        """(role, MODULE:CLASS) of each hop rendered: uses_before, then uses_after."""
        return [(role, getattr(self, role)) for role in HOPS if getattr(self, role) is not None]

    @property
    def polling_argument(self) -> str:
        """``polling`` as the head's ``--polling`` takes it: ``ANY``, ``ALL`` or compact JSON."""
        parsed = PollingMap.parse(self.polling)
        return parsed.to_json() if self.polling.strip().startswith("{") else parsed.default.name


def render(spec: DeploymentSpec) -> list[dict[str, Any]]:
    """Every object of the deployment, head and RBAC first, then shard by shard.

    >>> [o["kind"] for o in render(DeploymentSpec(name="a", image="i", uses="m:C"))][:4]
    ['ServiceAccount', 'Role', 'RoleBinding', 'Deployment']
    """
    return [obj for objects in render_components(spec).values() for obj in objects]


def render_components(spec: DeploymentSpec) -> dict[str, list[dict[str, Any]]]:
    """The objects grouped by component, keyed ``NAME-head`` and ``NAME-0``, ``NAME-1``, ...

    One group is what one file of ``shardnet k8s render --output DIR`` holds.
    """
    head = f"{spec.name}-head"
    components = {
        head: [
            *(_certificates(spec) if spec.tls_issuer is not None else []),
            _service_account(spec, head),
            _role(spec, head),
            _role_binding(spec, head),
            *_component(spec, head, role="head", shard=None),
        ]
    }
    for role, _ in spec.hops:
        name = hop_component_name(spec.name, role)
        components[name] = _component(spec, name, role=role, shard=None)
    for shard in range(spec.shards):
        name = f"{spec.name}-{shard}"
        components[name] = _component(spec, name, role="worker", shard=shard)
    return components


def hop_component_name(name: str, role: str) -> str:
    """The objects of a deployment's uses_before or uses_after: ``NAME-uses-before``, ``NAME-uses-after``.

    Each hop is a Deployment, headless Service, PodDisruptionBudget (and NetworkPolicy) of its own, as a shard
    is, labelled pod_type/shardnet.io/role ``uses_before`` or ``uses_after``: the labels discovery already maps
    to the head's hop, which the head's ``--uses-before discovered`` calls. Not Jina's layout (sidecar
    containers in the head's pod, on loopback): a sidecar stops with the head's pod, so a request the draining
    head still routes would find its uses_after draining too, and it would scale, use resources and roll out
    with the head; as a component of its own it drains apart, scales as a shard does (``replicas``), and takes
    a worker's resources, TLS Secret, NetworkPolicy, disruption budget and metrics.
    """
    return f"{name}-{role.replace('_', '-')}"


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, each document starting with ``---``, keys in rendering order.

    >>> print(to_yaml([{"kind": "Service", "metadata": {"labels": {"shard_id": "0"}}}]), end="")
    ---
    kind: Service
    metadata:
      labels:
        shard_id: '0'
    """
    return yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True, default_flow_style=False)


def pod_labels(spec: DeploymentSpec, role: str, shard: Optional[int]) -> dict[str, str]:
    """The labels pod-watching discovery keys on; also the selector of the Deployment, Service and PDB."""
    return {
        DEPLOYMENT_LABEL: spec.name,
        POD_TYPE_LABEL: role.upper(),
        SHARD_LABEL: "" if shard is None else str(shard),
    }


def service_labels(spec: DeploymentSpec, role: str, shard: Optional[int]) -> dict[str, str]:
    """The labels EndpointSlice-watching discovery keys on (slices inherit their Service's labels)."""
    return {
        SERVICE_DEPLOYMENT_LABEL: spec.name,
        SERVICE_ROLE_LABEL: role,
        SERVICE_SHARD_LABEL: "" if shard is None else str(shard),
    }


def _metadata(spec: DeploymentSpec, name: str, role: str, shard: Optional[int]) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "shardnet",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/managed-by": "shardnet",
        **service_labels(spec, role, shard),
    }
    return {"name": name, "namespace": spec.namespace, "labels": labels}


def _certificates(spec: DeploymentSpec) -> list[dict[str, Any]]:
    """cert-manager Certificates that keep the TLS Secrets filled and renewed: tls.crt and tls.key, and ca.crt
    from a CA issuer; a new key at each renewal."""
    return [
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": _metadata(spec, f"{spec.name}-{need.role}", need.role, None),
            "spec": {
                "secretName": need.secret,
                "dnsNames": list(need.names),
                "usages": list(need.usages),
                "privateKey": {"rotationPolicy": "Always"},
                "issuerRef": {"name": spec.tls_issuer, "kind": spec.tls_issuer_kind, "group": "cert-manager.io"},
            },
        }
        for need in spec.certificates
    ]


def _service_account(spec: DeploymentSpec, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(spec, name, "head", None)}


def _role(spec: DeploymentSpec, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(spec, name, "head", None),
        "rules": [{key: list(value) for key, value in rule.items()} for rule in DISCOVERY_RULES],
    }


def _role_binding(spec: DeploymentSpec, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(spec, name, "head", None),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}],
    }


def disruption_warnings(spec: DeploymentSpec) -> list[str]:
    """What the rendered PodDisruptionBudgets cannot hold up: one that lets ``MAX_UNAVAILABLE`` pods go over no
    more replicas than that lets a node drain evict every one of them (the head, or a shard's only worker). Each
    names the flag that would make the budget hold; the budget itself stays as it is, since minAvailable 1 over
    a single replica would block every drain of its node for ever."""
    warnings = []
    if spec.head_replicas <= MAX_UNAVAILABLE:
        warnings.append(
            f"the head has {spec.head_replicas} replica and its PodDisruptionBudget (maxUnavailable "
            f"{MAX_UNAVAILABLE}) lets a node drain evict it: the deployment answers nothing until it is scheduled "
            f"again; --head-replicas {MAX_UNAVAILABLE + 1} keeps one serving through a drain"
        )
    if spec.replicas <= MAX_UNAVAILABLE:
        warnings.append(
            f"each shard has {spec.replicas} replica and its PodDisruptionBudget (maxUnavailable "
            f"{MAX_UNAVAILABLE}) lets a node drain evict it: ALL requests fail for that shard until its worker is "
            f"scheduled again; --replicas {MAX_UNAVAILABLE + 1} keeps one serving through a drain"
        )
    return warnings


def _component(spec: DeploymentSpec, name: str, role: str, shard: Optional[int]) -> list[dict[str, Any]]:
    """Deployment, Service and PodDisruptionBudget of the head (``role`` head), of a hop (``role`` uses_before or
    uses_after, ``shard`` None) or of one shard, and a hop's or shard's NetworkPolicy when asked for.

    Each object gets its own dicts (no shared sub-objects), so a caller may
    edit one without touching another and the YAML has no anchors.
    """
    is_head = role == "head"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, name, role, shard),
        "spec": {
            "replicas": spec.head_replicas if is_head else spec.replicas,
            "selector": {"matchLabels": pod_labels(spec, role, shard)},
            # surge before removing: a shard keeps all its replicas serving during a rollout
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            # a rollout is reported stuck only after a new pod could have loaded and a new head waited for it
            "progressDeadlineSeconds": spec.progress_deadline_seconds,
            "template": {
                "metadata": {
                    "labels": {**_metadata(spec, name, role, shard)["labels"], **pod_labels(spec, role, shard)},
                    **_scrape_annotations(spec),
                },
                "spec": _pod_spec(spec, name, role, shard),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, name, role, shard),
        "spec": {
            # workers are found replica by replica through EndpointSlices; the head is called through one address
            "type": "ClusterIP",
            **({} if is_head else {"clusterIP": "None"}),
            "publishNotReadyAddresses": False,
            "selector": pod_labels(spec, role, shard),
            "ports": [{"name": PORT_NAME, "port": spec.port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(spec, name, role, shard),
        # one replica at a time: a drained node never takes a whole shard down when it has more than one
        # AlwaysAllow: a pod not ready (an Executor crash-looping, a head whose discovery cannot list) may be
        # evicted even when the budget is short; under the default IfHealthyBudget, a shard (or head) of 2 replicas
        # both unready would block every drain of their nodes for ever
        "spec": {
            "maxUnavailable": MAX_UNAVAILABLE,
            "selector": {"matchLabels": pod_labels(spec, role, shard)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    if is_head or not spec.network_policy:
        return [deployment, service, budget]
    # a head fed by Kubernetes only dials its workers: nobody else in the cluster needs to (with TLS they take
    # only clients with a certificate of the Secret's CA, which shuts out the rest if that CA is this deployment's)
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec, name, role, shard),
        "spec": {
            "podSelector": {"matchLabels": pod_labels(spec, role, shard)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": pod_labels(spec, "head", None)}}],
                    "ports": [{"port": spec.port, "protocol": "TCP"}],
                },
                # metrics: Prometheus scrapes from wherever it runs, so any source may read them (plain HTTP, no
                # auth, even under TLS: README's Metrics and `k8s render --help` say so and to narrow the rule)
                *([{"ports": [{"port": spec.metrics_port, "protocol": "TCP"}]}] if spec.metrics_port is not None else []),
            ],
        },
    }
    return [deployment, service, budget, policy]


def _pod_spec(spec: DeploymentSpec, name: str, role: str, shard: Optional[int]) -> dict[str, Any]:
    is_head = role == "head"
    if is_head:
        args = [
            "head",
            "--deployment", spec.name,
            "--host", "0.0.0.0",
            "--port", str(spec.port),
            "--polling", spec.polling_argument,
            "--k8s-namespace", NAMESPACE_ARGUMENT,
            "--balancer", spec.balancer,
            "--shards", str(spec.shards),  # so that ALL polling reports a shard with no ready replica
            # not ready until every shard has a worker, for as long as a worker may take to load its Executor
            "--shards-wait", str(spec.shards_wait_seconds),
        ]  # fmt: skip
        if spec.max_in_flight is not None:
            args += ["--max-in-flight", str(spec.max_in_flight)]
        if not spec.request_streams:
            args.append("--no-request-streams")
        for hop, _ in spec.hops:  # its replicas: the hop's pods, which discovery finds by their pod_type
            args += [f"--{hop.replace('_', '-')}", DISCOVERED]
        volumes = {"tmp": "/tmp"}
    elif shard is None:  # a hop: a worker of its own Executor, neither the shards' uses_with nor their metas (Jina's)
        args = [
            "worker",
            "--uses", getattr(spec, role),
            "--host", "0.0.0.0",
            "--port", str(spec.port),
            "--name", f"{spec.name}/{role.replace('_', '-')}",  # as Jina's Kubernetes export names it
            "--workspace", WORKSPACE,
        ]  # fmt: skip
        volumes = {"tmp": "/tmp", "workspace": WORKSPACE}
    else:
        args = [
            "worker",
            "--uses", spec.uses,
            "--host", "0.0.0.0",
            "--port", str(spec.port),
            "--shard-id", str(shard),
            "--shards", str(spec.shards),
            "--replicas", str(spec.replicas),
            # the key of its dict results: one per shard, so ALL keeps every shard's side by side
            "--name", f"{spec.name}/shard-{shard}" if spec.shards > 1 else spec.name,
            "--workspace", WORKSPACE,
        ]  # fmt: skip
        if spec.uses_with != "{}":
            args += ["--uses-with", spec.uses_with]
        if spec.metas_name is not None:
            args += ["--uses-metas", json.dumps({"name": spec.metas_name})]
        volumes = {"tmp": "/tmp", "workspace": WORKSPACE}
    # head and workers alike (the head passes its workers' answers on), exactly what was given
    args += ["--max-message-mb", repr(float(spec.max_message_mb)), "--drain-seconds", str(spec.drain_seconds)]
    ports = [{"name": PORT_NAME, "containerPort": spec.port, "protocol": "TCP"}]
    probe_port = spec.port
    if spec.tls_secret is not None:
        args += _tls_arguments(spec, is_head)
        ports.append({"name": HEALTH_PORT_NAME, "containerPort": spec.health_port, "protocol": "TCP"})
        probe_port = spec.health_port
    if spec.metrics_port is not None:
        args += ["--metrics-port", str(spec.metrics_port)]
        ports.append({"name": METRICS_PORT_NAME, "containerPort": spec.metrics_port, "protocol": "TCP"})

    def probe(period: int, timeout: int, failures: int, service: str = "") -> dict[str, Any]:
        # the standard grpc.health.v1 service: "" is the server's overall status (alive), READY_SERVICE
        # whether it is fit for traffic (a head: once discovery has listed a worker of every shard, or after
        # --shards-wait)
        grpc = {"port": probe_port, **({"service": service} if service else {})}
        return {"grpc": grpc, "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": ["shardnet"],
        "args": [arg if arg == NAMESPACE_ARGUMENT else _literal(arg) for arg in args],
        "ports": ports,
        "resources": (spec.head_container_resources if is_head else spec.worker_resources).to_k8s(),
        # loading an Executor may take minutes; liveness only starts once this has passed
        "startupProbe": probe(
            period=STARTUP_PERIOD, timeout=2, failures=math.ceil(spec.startup_seconds / STARTUP_PERIOD)
        ),
        "readinessProbe": probe(period=5, timeout=2, failures=2, service=services.READY_SERVICE),
        "livenessProbe": probe(period=10, timeout=5, failures=6),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": volume, "mountPath": path} for volume, path in volumes.items()],
    }
    pod_volumes: list[dict[str, Any]] = [{"name": volume, "emptyDir": {}} for volume in volumes]
    if spec.tls_secret is not None:
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        # owner and group read: the kubelet gives the files to the pod's fsGroup, which the process runs as
        secret = spec.tls_secret if is_head else spec.worker_secret
        pod_volumes.append({"name": "tls", "secret": {"secretName": secret, "defaultMode": 0o440}})
    # the image's user has no home, and the root filesystem is read-only: libraries that cache or configure
    # under ~ (Hugging Face, torch hub, matplotlib) write to the pod's /tmp instead of failing at load
    container["env"] = [{"name": "HOME", "value": "/tmp"}]
    if is_head:
        container["env"].append(
            {"name": NAMESPACE_VARIABLE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
        )
    if spec.pre_stop_seconds:
        # keep serving while the heads' watches see the pod go, before SIGTERM starts the drain
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": spec.pre_stop_seconds}}}
    pod: dict[str, Any] = {}
    if is_head:
        pod["serviceAccountName"] = name
    else:
        pod["automountServiceAccountToken"] = False  # workers never talk to the API server
    pod.update(
        {
            "terminationGracePeriodSeconds": spec.termination_grace_seconds,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS,
                "runAsGroup": RUN_AS,
                "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": pod_labels(spec, role, shard)},
                }
            ],
            "containers": [container],
            "volumes": pod_volumes,
        }
    )
    return pod


def _scrape_annotations(spec: DeploymentSpec) -> dict[str, Any]:
    """The pod annotations the common Prometheus scrape configuration (kubernetes_sd, role pod) reads, when the
    pods serve metrics."""
    if spec.metrics_port is None:
        return {}
    return {"annotations": {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(spec.metrics_port), "prometheus.io/path": "/metrics",
    }}


# what Linux takes in one argument of a command line (MAX_ARG_STRLEN: 32 pages), less its terminating NUL
MAX_ARGUMENT_BYTES = 128 * 1024 - 1


def _literal(argument: str) -> str:
    """``argument`` as the kubelet passes it on: it expands ``$(VAR)`` and turns ``$$`` into ``$`` in every
    argument, so each ``$`` is doubled (a ``/$$`` endpoint in a polling map stays itself)."""
    return argument.replace("$", "$$")


def _tls_arguments(spec: DeploymentSpec, is_head: bool) -> list[str]:
    """Serving and dialling flags for the mounted TLS Secret: both serve TLS (plaintext health aside); a worker
    takes only clients with a certificate of the Secret's CA, and the head presents its own to them."""
    args = [
        "--tls-cert", f"{TLS_DIR}/tls.crt",
        "--tls-key", f"{TLS_DIR}/tls.key",
        "--health-port", str(spec.health_port),
    ]  # fmt: skip
    if not is_head:
        return args + ["--tls-client-ca", f"{TLS_DIR}/ca.crt"]
    return args + [
        "--root-ca", f"{TLS_DIR}/ca.crt",
        "--client-cert", f"{TLS_DIR}/tls.crt",
        "--client-key", f"{TLS_DIR}/tls.key",
        "--server-name", spec.worker_server_name,
    ]  # fmt: skip
