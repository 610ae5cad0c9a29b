"""``K8sGrpcConnectionPool``: a connection pool whose membership follows the cluster.

Two sources, watched at once by default:

- **pods** labelled the way Jina 3's manifests label them
  (``jina_deployment_name``, ``pod_type``, ``shard_id``); a pod counts while
  it has an IP, is Running, is Ready (its ``Ready`` condition, which the node
  controller clears when a node stops answering; container readiness when the
  pod has no conditions yet) and has no deletion timestamp; its port is the
  ``executor`` container's port named ``grpc``, else its first containerPort,
  else 8080;
- **endpointslices** (discovery.k8s.io/v1) of Services labelled
  ``shardnet.io/deployment``, ``shardnet.io/role`` and ``shardnet.io/shard``
  (Kubernetes copies a Service's labels onto its slices); the port is the one
  named ``grpc``; an endpoint counts unless ``ready`` is false or
  ``terminating`` is true.

Each watched object *contributes* a set of members ``(deployment, head,
shard, address)``; the ledger remembers every object's contribution and how
many objects hold each member, so an address is added when its first holder
appears and removed when its last one goes, whichever source it came from.
MODIFIED, DELETED and re-lists after 410 Gone are diffs against that record.
A source that fails (a Role edited to refuse it, a watch that keeps breaking)
cannot say what left meanwhile: when a source that answers lets go of a
member only such a stale source still holds, the stale holds go too, and the
stale source lists again once it answers (rather than resume its watch),
which puts back whatever it still shows. The slices lag the pods they are
made from, so the pods' final word on a slice's endpoint comes first
(``pods_word``): an endpoint whose pod is being deleted, ended or deleted is
not routed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from collections import Counter
from types import MappingProxyType
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, TypeVar

import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from shardnet.discovery.configuration import KubeconfigCredentials, check_kubeconfig, load_api_client, one_line
from shardnet.discovery.pods_word import PodsWord, SliceEndpoint
from shardnet.discovery.watch import (
    ListWatch, RepeatedWarnings, Unavailable, WatchOptions, describe, object_key, with_backoff,
)
from shardnet.errors import ConfigurationError, DiscoveryError
from shardnet.networking.addresses import parse_address
from shardnet.networking.pool import GrpcConnectionPool
from shardnet.networking.connection import Connection

logger = logging.getLogger(__name__)

PODS, SLICES = "pods", "endpointslices"
SOURCES = (PODS, SLICES)
SLICES_NEED = " (EndpointSlices of discovery.k8s.io/v1 need Kubernetes 1.21 or later)"
DEFAULT_PORT = GrpcConnectionPool.K8S_PORT  # a pod's gRPC port when it names none
MAX_CA_FILE_BYTES = 1 << 20  # a CA bundle is a few KB: what is read of it to tell a change

POD_SELECTOR = "jina_deployment_name,pod_type"
SLICE_SELECTOR = "shardnet.io/deployment"
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")  # a DNS-1123 label, as Kubernetes requires
# objects of a (re-)list read or applied per loop pass: a list of 8,000 pods, applied in one stretch, held the loop
# (and every request through the pool) for 2 s; a hundred take some 10 ms
LIST_BATCH = 100

_T = TypeVar("_T")


async def in_turns(items: Iterable[_T], every: int = LIST_BATCH) -> AsyncIterator[_T]:
    """``items``, handing the event loop back after every ``every`` of them, so that a list of thousands of
    objects is taken in while requests go on being routed."""
    for index, item in enumerate(items):
        if index and not index % every:
            await asyncio.sleep(0)
        yield item


def _label_values(deployments: Sequence[str]) -> tuple[str, ...]:
    """Deployment names checked as label values: nothing else can go into a label selector."""
    names = tuple(dict.fromkeys(deployments)) if not isinstance(deployments, str) else ()
    if not names:
        raise ConfigurationError(f"deployments must be a non-empty list of names, got {deployments!r}")
    for name in names:
        if not isinstance(name, str) or not _LABEL_VALUE.match(name):
            raise ConfigurationError(f"deployment {name!r} cannot be a Kubernetes label value (63 characters at most)")
    return names


def _narrowed(selector: str, deployments: Optional[tuple[str, ...]]) -> str:
    """``selector`` with its first label, the deployment's, required to hold one of ``deployments``."""
    if deployments is None:
        return selector
    first, comma, rest = selector.partition(",")
    return f"{first} in ({','.join(deployments)}){comma}{rest}"


class Member(NamedTuple):
    """One replica as the pool knows it: ``pool.add_connection(deployment, address, head, shard_id)``."""

    deployment: str
    head: bool
    shard_id: Optional[int]
    address: str


def _role(member: Member) -> str:
    """How a log line names what ``member`` is to its deployment."""
    hop = member.deployment.partition("/")[2]
    return "its head" if member.head else f"its {hop}" if hop else f"shard {member.shard_id}"


def _owner(member: Member) -> str:
    """The deployment ``member`` serves a role of: a hop's (``dep/uses_after``) is ``dep``, whose head calls it.
    One address serves one role of it at a time, its hops' included (a label value holds no ``/``)."""
    return member.deployment.partition("/")[0]


Contribution = frozenset  # frozenset[Member]
NOTHING: Contribution = frozenset()


# -- what an object contributes ------------------------------------------------


def _role_target(deployment: str, role: str, shard: Optional[str]) -> Optional[tuple[str, bool, Optional[int]]]:
    """(pool deployment, head, shard id) for a role label, or None when the role is not ours."""
    role = role.strip().lower().replace("-", "_")
    if role == "head":
        return deployment, True, None
    if role == "worker":
        shard = (shard or "").strip()
        if not shard:
            return deployment, False, 0
        if not (shard.isascii() and shard.isdigit()):  # int() would also read "1_0" or "٣"
            logger.warning("deployment %r: shard label %r is not a number; ignoring the replica", deployment, shard)
            return None
        return deployment, False, int(shard)
    if role in ("uses_before", "uses_after"):
        return f"{deployment}/{role}", False, 0
    return None


def _join(host: str, port: int) -> Optional[str]:
    """``host:port`` (IPv6 in brackets), or None when it does not parse as a replica address."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        parse_address(address)
    except ConfigurationError as error:
        logger.warning("ignoring endpoint: %s", error)
        return None
    return address


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready as Kubernetes judges it, and not being deleted.

    The ``Ready`` condition decides when present: the node controller clears
    it (and only it) for the pods of a node that stopped answering, and it
    also waits for readiness gates. A pod with no conditions yet falls back to
    its containers' readiness.
    """
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    ready = [c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    if ready:
        return ready[0] == "True"
    statuses = status.get("containerStatuses") or []
    return bool(statuses) and all(container.get("ready") for container in statuses)


def _executor_port(pod: Mapping[str, Any]) -> int:
    """The ``executor`` container's port named ``grpc`` (the manifests' contract), else its first one."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == "executor":
            ports = [port for port in container.get("ports") or [] if port.get("containerPort")]
            named = [port for port in ports if port.get("name") == "grpc"]
            if named or ports:
                return int((named or ports)[0]["containerPort"])
    return DEFAULT_PORT


def pod_members(pod: Mapping[str, Any], *, ready_only: bool = True) -> Contribution:
    """The member a pod stands for: none when unlabelled, without IP or (with ``ready_only``) not ready.

    >>> pod_members({"metadata": {"labels": {"jina_deployment_name": "enc", "pod_type": "WORKER",
    ...     "shard_id": "1"}}, "status": {"podIP": "10.0.0.7", "phase": "Running",
    ...     "containerStatuses": [{"ready": True}]}})
    frozenset({Member(deployment='enc', head=False, shard_id=1, address='10.0.0.7:8080')})
    """
    labels = (pod.get("metadata") or {}).get("labels") or {}
    deployment, role = labels.get("jina_deployment_name"), labels.get("pod_type")
    ip = (pod.get("status") or {}).get("podIP")
    if not deployment or not role or not ip:
        return NOTHING
    if ready_only and not pod_is_ready(pod):
        return NOTHING
    target = _role_target(deployment, role, labels.get("shard_id"))
    address = _join(ip, _executor_port(pod))
    if target is None or address is None:
        return NOTHING
    return frozenset({Member(*target, address)})


def slice_members(endpoint_slice: Mapping[str, Any], *, ready_only: bool = True) -> Contribution:
    """The members of one EndpointSlice on its port ``grpc``; with ``ready_only``, not unready nor terminating.

    >>> slice_members({"metadata": {"labels": {"shardnet.io/deployment": "enc", "shardnet.io/role": "worker",
    ...     "shardnet.io/shard": "0"}}, "ports": [{"name": "grpc", "port": 50051}],
    ...     "endpoints": [{"addresses": ["10.0.0.8"], "conditions": {}}]})
    frozenset({Member(deployment='enc', head=False, shard_id=0, address='10.0.0.8:50051')})
    """
    return frozenset(endpoint.member for endpoint in slice_endpoints(endpoint_slice, ready_only=ready_only))


def slice_endpoints(endpoint_slice: Mapping[str, Any], *, ready_only: bool = True) -> tuple[SliceEndpoint, ...]:
    """``slice_members``, each with the uid of the pod it names (``targetRef``), for the pods' word."""
    labels = (endpoint_slice.get("metadata") or {}).get("labels") or {}
    deployment = labels.get("shardnet.io/deployment")
    if not deployment:
        return ()
    target = _role_target(deployment, labels.get("shardnet.io/role") or "worker", labels.get("shardnet.io/shard"))
    port = next((p.get("port") for p in endpoint_slice.get("ports") or [] if p.get("name") == "grpc"), None)
    if target is None:
        return ()
    if not port:  # labelled as ours, yet nothing says where to dial: said, not dropped without a word
        metadata = endpoint_slice.get("metadata") or {}
        logger.warning(
            "EndpointSlice %s/%s of %r has no port named 'grpc': its endpoints are not followed (name the "
            "Service's port grpc, as k8s render does)", metadata.get("namespace"), metadata.get("name"), deployment,
        )
        return ()
    endpoints = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        addresses = endpoint.get("addresses") or []
        conditions = endpoint.get("conditions") or {}
        if not addresses:
            continue
        # behind publishNotReadyAddresses, "ready" is always true and only "serving" says the pod is
        if ready_only and any(conditions.get(name) is flag for name, flag in _NOT_SERVING):
            continue
        address = _join(addresses[0], int(port))  # addresses of one endpoint are fungible: use the first
        if address is not None:
            pod = endpoint.get("targetRef") or {}
            uid = pod.get("uid") if pod.get("kind", "Pod") == "Pod" else None
            endpoints.append(SliceEndpoint(Member(*target, address), str(uid) if uid else None))
    return tuple(endpoints)


_NOT_SERVING = (("ready", False), ("serving", False), ("terminating", True))  # an endpoint's conditions


def _terminating_pods(endpoint_slice: Mapping[str, Any]) -> list[str]:
    """The uids of the pods ``endpoint_slice`` lists as terminating (their deletion has begun)."""
    try:
        uids = []
        for endpoint in endpoint_slice.get("endpoints") or []:
            pod = endpoint.get("targetRef") or {}
            if (endpoint.get("conditions") or {}).get("terminating") is True and pod.get("kind", "Pod") == "Pod":
                if pod.get("uid"):
                    uids.append(str(pod["uid"]))
        return uids
    except (AttributeError, TypeError):  # malformed: _endpoints said so
        return []

_MEMBERS = {"pods": pod_members, "endpointslices": slice_members}


def _members(source: str, obj: Mapping[str, Any], *, ready_only: bool = True) -> Contribution:
    """What ``obj`` contributes; a malformed object contributes nothing (logged) rather than stop the watch."""
    return _read(_MEMBERS[source], source, obj, NOTHING, ready_only=ready_only)


def _endpoints(obj: Mapping[str, Any]) -> tuple[SliceEndpoint, ...]:
    """``slice_endpoints``; a malformed slice has none (logged) rather than stop the watch."""
    return _read(slice_endpoints, SLICES, obj, ())


def _read(reader: Callable[..., Any], source: str, obj: Mapping[str, Any], default: Any, **options: Any) -> Any:
    try:
        return reader(obj, **options)
    except Exception:  # a field of an unexpected type somewhere inside (the watch checked the object and its metadata)
        metadata = obj.get("metadata") or {}
        logger.exception("ignoring malformed %s %s/%s", source, metadata.get("namespace"), metadata.get("name"))
        return default


# -- the ledger ------------------------------------------------------------------

# members taken out in one loop pass at most, when their addresses come in as other roles (``_Ledger.record``)
REMOVALS_PER_TURN = 16


class _Ledger:
    """What each watched object contributed, how many objects hold each member, and the pool calls that follow.

    Additions are synchronous; a removal runs as a task, so the watch never
    stalls behind it (the pool takes the replica out, and its channel drains
    its calls on its own), and an address added back before its removal ran
    waits for it, which could otherwise take out the new connection.
    """

    def __init__(self, pool: "K8sGrpcConnectionPool"):
        self._pool = pool
        self._records: dict[tuple[str, str], Contribution] = {}
        # member -> the records holding it (an ordered set), kept in step with _records: who holds a member is looked
        # up at each claim on its address, and a scan of every record there made a relist in which thousands of pods'
        # IPs moved cost n * n (4,000 pods: 3 s)
        self._held_by: dict[Member, dict[tuple[str, str], None]] = {}
        self._holders: Counter[Member] = Counter()
        self._members_of: Counter[str] = Counter()  # deployment -> its members held
        self._by_address: dict[str, set[Member]] = {}  # address -> the members held there, of any deployment
        self._removals: dict[Member, asyncio.Task] = {}
        # members held but not routed: another role of their deployment is held at their address by a word no
        # claim settles (two objects of one source: a reused IP in shard 0's slice while shard 2's still lists it)
        self._contested: set[Member] = set()
        self._relists = 0  # relists under way: a deployment emptied meanwhile is forgotten only once they end
        self._emptied_in_relist: set[str] = set()

    def holds(self, source: str, key: str) -> bool:
        """Whether object ``key`` of ``source`` holds a member now."""
        return bool(self._records.get((source, key)))

    def keys(self, source: str) -> list[str]:
        return [key for (src, key) in self._records if src == source]

    async def record(
        self,
        source: str,
        key: str,
        members: Contribution,
        *,
        also_remove: Contribution = NOTHING,
        unconfirmed: Mapping[str, Contribution] = MappingProxyType({}),
    ) -> None:
        """Make ``members`` the contribution of object ``key``; ``also_remove`` goes too unless someone holds it.

        ``unconfirmed``: during a relist of ``source``, its objects whose records are still those of its previous
        listing, each with what it holds that the new listing does not say again; that gives way to a claim of
        this one (``_drop_contradicted``). The counts follow the records at once, with no await in between (a
        drop of stale holds reads them, and another record may run while this one waits on the pool); the pool's
        additions and removals come after, removals first.
        """
        old = self._records.get((source, key), NOTHING)
        members = members - self._outvoted(members - old, (source, key), unconfirmed)
        self._set_record((source, key), members, old)
        gone, new = [], []
        for member in old - members:
            self._holders[member] -= 1
            if self._holders[member] > 0:
                self._drop_stale_holds(member, source)
            if self._holders[member] <= 0:
                self._uncount(member)
                gone.append(member)
        for member in also_remove - old - members:
            if self._holders[member]:
                self._drop_stale_holds(member, source)
                if self._holders[member] <= 0:
                    self._uncount(member)
                    gone.append(member)
            else:  # held by no one here, but perhaps in the pool all the same: make sure
                del self._holders[member]
                gone.append(member)
        ready_again = []
        for member in members - old:
            gone.extend(self._drop_contradicted(member, source, unconfirmed))
            self._holders[member] += 1
            if self._holders[member] == 1:
                self._members_of[member.deployment] += 1
                self._by_address.setdefault(member.address, set()).add(member)
                new.append(member)
            elif source == PODS:
                # a pod turning Ready again while its slice still held it (a container restarted in place, faster
                # than the slice controller): a new process on the address, as a worker's ACTIVATE again says one
                ready_again.append(member)
        taken_out = [rival for member in new for rival in self._contest(member)]
        freed = self._settle_contests(gone)
        # what leaves an address that comes in as another role goes first, REMOVALS_PER_TURN to a turn, and the
        # additions just after, in the same loop pass as the last of them: one by one, the last member of a
        # deployment whose address changed role there (dep2's shard 0 becoming its head) left it empty for turns;
        # what else leaves goes after the additions, so a shard that gets a replica in as another leaves (a settled
        # contest) is never empty
        incoming = {member.address for member in new + freed}
        leaving = [member for member in gone if member.address in incoming]
        for started, member in enumerate(leaving, 1):
            if not self._holders.get(member):  # not held again meanwhile
                self._remove_soon(member)
            if started % REMOVALS_PER_TURN == 0 and started < len(leaving):
                # a slice of 1,000 endpoints relabelled started 1,000 channel closes in one pass, each walking
                # every task of the loop (grpc.aio's close), the others' too: the loop stalled 1.5 s
                await asyncio.sleep(0)
        if leaving:
            await asyncio.sleep(0)  # the removals take the replicas out before the additions below come in
        for member in taken_out:
            if member in self._contested:  # not settled, and added back, by another record while this one awaited
                await self._remove(member)
        for member in new + freed:
            await self._add(member)
        for member in ready_again:
            try:
                replicas = self._pool.get_replicas(member.deployment, head=member.head, shard_id=member.shard_id or 0)
            except ConfigurationError:  # a shard id no replica list has (never added: _add said so)
                continue
            if replicas is not None and replicas.readmit_if_healthy(member.address):
                logger.info("%s of %r (%s), ejected, is Ready again: checking its health now",
                            member.address, member.deployment, _role(member))
        for member in gone:
            if member.address not in incoming and not self._holders.get(member):  # not held again meanwhile
                await self._remove(member)

    def _outvoted(
        self, claims: Contribution, record: tuple[str, str], unconfirmed: Mapping[str, Contribution]
    ) -> set[Member]:
        """The ``claims`` of ``record`` (source, object) that another object of its source contradicts at their
        address, in their deployment, where another source agrees with that one: the pods say a reused IP is shard
        0, as shard 0's EndpointSlice does, while shard 2's still lists it. Such a claim is the lagging one and is
        not held (a contest would keep shard 0 from its replica until shard 2's slice catches up); it is weighed
        again when said again. No word of the claim's own is another object's: what ``record`` held until now,
        nor its source's previous listing during a relist (``unconfirmed``, as ``_drop_contradicted`` takes it)."""
        source = record[0]
        # a failing source's hold is no word on what an address is now (_drop_stale_holds): it outvotes nothing, or a
        # reused IP stays routed as the shard its deleted pod served, and the claim outvoted never comes back
        stale = self._pool.failing_sources() - {source}
        outvoted = set()
        for claim in claims:
            if self._holders.get(claim):
                continue
            for rival in self._by_address.get(claim.address, ()):
                sources = {
                    src for src, key in self._holding(rival)
                    if (src, key) != record and not (src == source and rival in unconfirmed.get(key, NOTHING))
                    and src not in stale
                }
                if _owner(rival) == _owner(claim) and source in sources and len(sources) > 1:
                    logger.warning(
                        "%s of %r is listed as %s by the %s in namespace %s, while the %s say %s: routed as %s",
                        claim.address, claim.deployment, _role(claim), source, self._pool.namespace,
                        " and the ".join(sorted(sources)), _role(rival), _role(rival),
                    )
                    outvoted.add(claim)
                    break
        return outvoted

    def _contest(self, claim: Member) -> list[Member]:
        """Keep ``claim`` and every other role of its deployment held at its address out of the pool while both
        are held: an address serves one shard at a time, and which one is not settled by two objects of one
        source (a pod IP reused by shard 0 while shard 2's EndpointSlice still lists it). Returns the rivals
        that were routed until now; each goes back once the others let go (``_settle_contests``)."""
        rivals = [m for m in self._by_address.get(claim.address, ()) if m != claim and _owner(m) == _owner(claim)]
        if not rivals:
            return []
        routed = [rival for rival in rivals if rival not in self._contested]
        self._contested.update(rivals)
        self._contested.add(claim)
        logger.warning(
            "%s of %r is listed as %s and as %s at once: routed as neither until one of them is let go",
            claim.address, claim.deployment, _role(claim), " and ".join(_role(rival) for rival in rivals),
        )
        return routed

    def _settle_contests(self, gone: list[Member]) -> list[Member]:
        """Members let go (``gone``) leave their contests; a rival left alone at its address is routed again."""
        freed = []
        for member in gone:
            if member not in self._contested or self._holders.get(member):
                continue
            self._contested.discard(member)
            left = [m for m in self._by_address.get(member.address, ()) if _owner(m) == _owner(member)]
            if len(left) == 1 and left[0] in self._contested:
                self._contested.discard(left[0])
                freed.append(left[0])
        return freed

    def _uncount(self, member: Member) -> None:
        """``member``'s last holder went."""
        del self._holders[member]
        self._members_of[member.deployment] -= 1
        if not self._members_of[member.deployment]:
            del self._members_of[member.deployment]
        same_address = self._by_address.get(member.address)
        if same_address is not None:
            same_address.discard(member)
            if not same_address:
                del self._by_address[member.address]

    def _set_record(self, record: tuple[str, str], members: Contribution, old: Contribution) -> None:
        """Make ``members`` what ``record`` holds, in place of ``old``, in ``_records`` and its index ``_held_by``."""
        if members:
            self._records[record] = members
        else:
            self._records.pop(record, None)
        for member in old - members:
            holding = self._held_by.get(member, {})
            holding.pop(record, None)
            if not holding:
                self._held_by.pop(member, None)
        for member in members - old:
            self._held_by.setdefault(member, {})[record] = None

    def _holding(self, member: Member) -> list[tuple[str, str]]:
        """The (source, object) records that hold ``member``."""
        return list(self._held_by.get(member, ()))

    def _let_go(self, member: Member, holding: list[tuple[str, str]]) -> None:
        """Take ``member`` out of the records ``holding``, one hold each; the caller lets it go when none is left."""
        for record in holding:
            held = self._records[record]
            self._set_record(record, held - {member}, held)
            self._holders[member] -= 1

    def _drop_contradicted(
        self, claim: Member, source: str, unconfirmed: Mapping[str, Contribution] = MappingProxyType({})
    ) -> list[Member]:
        """The members ``claim`` contradicts, let go: one address serves one role of a deployment, so the same
        address elsewhere in it, held only by other sources, is their stale word (an IP reused by a pod of
        another shard before the lagging source caught up), and the freshest claim wins, as a worker's ACTIVATE
        does. So is a hold of the claiming source itself from its previous listing that the new one does not say
        again (``unconfirmed``: a relist that has not come to that object yet), or a reused IP would serve two
        shards until the relist ends. They come back if their sources say so again.

        The same address in another deployment gives way only to such a relist, and only when nothing but the
        claiming source's previous listing holds it (a pod IP reused by another deployment's pod while the watch
        was away): outside a relist, or held by another source or by an object the new listing says it of again,
        both deployments keep it, as two deployments listed at one address always have. Returns those that no
        one holds any more."""
        dropped = []
        for member in self._by_address.get(claim.address, set()) - {claim}:
            holding = self._holding(member)
            if not _contradicts(claim, member, holding, source, unconfirmed):
                continue
            self._let_go(member, holding)
            logger.warning(
                "%s of %r serves %s by the %s in namespace %s, while %s: routed as the %s say", member.address,
                member.deployment, _claimed(claim, member), source, self._pool.namespace,
                _stale_word(member, {src for src, _ in holding}, source), source,
            )
            if self._holders[member] <= 0:
                self._uncount(member)
                dropped.append(member)
        return dropped

    def _drop_stale_holds(self, member: Member, reporter: str) -> None:
        """``reporter``, answering, let go of ``member``: if only failing sources still hold it, their holds are
        stale (a pod deleted while the slices were refused stayed routed, and its address, reused by a pod of
        another shard, answered for the wrong shard), so they go, and each such source lists again once it
        answers, which puts back what it still shows. The caller lets ``member`` go when no holder is left."""
        stale = self._pool.failing_sources() - {reporter}
        if not stale:
            return
        holding = self._holding(member)
        if any(src not in stale for src, _ in holding):
            return  # a source that answers still holds it
        self._let_go(member, holding)
        for src in {src for src, _ in holding}:
            self._pool.relist_when_back(src)
        logger.warning(
            "%s %s of %r is gone from the %s in %s, and the %s, failing, cannot say so: no longer routed to "
            "until they answer again",
            "head" if member.head else f"shard {member.shard_id} replica", member.address, member.deployment,
            reporter, self._pool.namespace, " and ".join(sorted(stale)),
        )

    async def replace(
        self, source: str, listed: Mapping[str, Contribution], contribution: Callable[[str], Contribution]
    ) -> None:
        """Reconcile after a (re-)list: the objects ``listed`` (each with what the list says it contributes)
        contribute what ``contribution`` says of each now (asked just before it is recorded: an event handled
        while an earlier one waited may have changed it), then those gone from it nothing.

        In that order, a deployment rolled from one pod to another while the watch was away never looks empty
        (a namespace-wide pool would forget it meanwhile): those listed that contribute less than before come
        after the rest; and those that take no address another member holds come first, so a shard gets its new
        replicas before a reused address takes an old one away. What the
        previous listing still holds at an address the new one gives another role goes just before that role
        comes in (``unconfirmed``): an address serves one shard, and one deployment, at a time, even while the
        relist runs; what the new listing says again of an object is not stale, whatever order it comes in.
        The loop gets control every ``LIST_BATCH`` objects (``in_turns``), between two records."""
        unconfirmed = {key: self._records[(source, key)] - listed.get(key, NOTHING) for key in self.keys(source)}
        self._relists += 1
        try:
            async for key in in_turns(self._fresh_first(source, listed)):
                unconfirmed.pop(key, None)
                await self.record(source, key, contribution(key), unconfirmed=unconfirmed)
            dropped = [key for key in self.keys(source) if key not in listed]
            async for key in in_turns(self._freeing_first(source, dropped)):
                await self.record(source, key, NOTHING)
        finally:
            self._relists -= 1
        if not self._relists:
            emptied, self._emptied_in_relist = self._emptied_in_relist, set()
            for deployment in emptied:
                self._forget_if_empty(deployment)

    def _fresh_first(self, source: str, listed: Mapping[str, Contribution]) -> list[str]:
        """The keys of ``listed``, in its order, those none of whose members takes an address routed as another
        member (of its deployment or another) first, and those that now contribute less than recorded (a pod gone
        unready) last, those that also take a member they did not hold (a pod relabelled: its new place comes in
        before a pod gone unready leaves that deployment or shard) just before them; an object that gives up a
        member for another of the same shard (a slice whose one endpoint moved) does not shrink it (``record``
        adds before it removes), and comes in with the first: the loop runs between turns of
        a relist, and a deployment's old pod taken out before its new one came in left it empty for those turns
        (forgotten, in a namespace-wide pool)."""

        def displaces(key: str) -> bool:  # a member held only contested is routed as nothing: none is displaced
            return any(
                rival != m and rival not in self._contested for m in listed[key]
                for rival in self._by_address.get(m.address, ())
            )

        def shrinks(key: str) -> bool:  # gives up a member with nothing of its own in that shard (or head) instead
            kept = {(m.deployment, m.head, m.shard_id) for m in listed[key]}
            return any(
                (m.deployment, m.head, m.shard_id) not in kept
                for m in self._records.get((source, key), NOTHING) - listed[key]
            )

        def only_shrinks(key: str) -> bool:  # a pod relabelled to another shard also comes in somewhere
            return shrinks(key) and not listed[key] - self._records.get((source, key), NOTHING) and not self._frees(
                source, key, listed[key]
            )

        return sorted(listed, key=lambda key: (only_shrinks(key), shrinks(key), displaces(key)))

    def _frees(self, source: str, key: str, members: Contribution = NOTHING) -> bool:
        """Whether object ``key`` contributing ``members`` lets go of a contested member: the rival it leaves alone at
        its address comes back into the pool (``_settle_contests``), as a member a listing brings in does."""
        return any(member in self._contested for member in self._records.get((source, key), NOTHING) - members)

    def _freeing_first(self, source: str, keys: list[str]) -> list[str]:
        """``keys``, gone from a listing, those whose going routes a contested rival again first: two slices of
        shard 0 gone, one of them holding an address shard 1's slice also lists, took shard 0's last routed replica
        out before shard 1's came back, and the deployment had none for turns of the relist."""
        return sorted(keys, key=lambda key: not self._frees(source, key))

    async def change(self, source: str, key: str, withdrawn: Contribution, restored: Contribution) -> None:
        """Take ``withdrawn`` out of object ``key``'s contribution as recorded and put ``restored`` in, and nothing
        else: what the ledger let go of meanwhile (stale, or contradicted by a fresher claim) stays let go."""
        await self.record(source, key, (self._records.get((source, key), NOTHING) - withdrawn) | restored)

    async def _add(self, member: Member) -> None:
        while (pending := self._removals.get(member)) is not None:
            await asyncio.wait({pending})  # back before its removal finished closing: let it finish first
        if not self._holders.get(member) or member in self._contested:  # dropped, or contested, while we waited
            return
        try:
            self._pool.add_connection(member.deployment, member.address, head=member.head, shard_id=member.shard_id)
        except ConfigurationError as exc:  # a pod the deployment's shape has no room for: said, not a crash
            logger.warning("not routing to a discovered pod: %s", exc)
            return
        except Exception:  # a bad address must not stop the watch
            logger.exception("could not add replica %s of %r", member.address, member.deployment)
            return
        logger.info(
            "discovered %s %s of %r",
            "head" if member.head else f"shard {member.shard_id} replica",
            member.address,
            member.deployment,
        )

    async def _remove(self, member: Member) -> None:
        self._remove_soon(member)
        # one removal under way before the next: a relist that drops hundreds of pods would otherwise start as
        # many channel closes at once, and grpc.aio's close walks every task of the loop (ReplicaList.remove_connection)
        await asyncio.sleep(0)

    def _remove_soon(self, member: Member) -> None:
        """Start ``member``'s removal, after any removal of it still closing (the latest is the one an addition
        waits for); it takes the replica out of the pool at the loop's next turn."""
        task = asyncio.get_running_loop().create_task(self._leave(member, self._removals.get(member)))
        self._removals[member] = task
        task.add_done_callback(functools.partial(self._removed, member))

    async def _leave(self, member: Member, previous: Optional[asyncio.Task]) -> Optional[Connection]:
        """Remove ``member`` from the pool (once ``previous``, a removal of it still closing, is done); following
        a whole namespace, forget its deployment when it was the last member of it (a pool following all
        deployments would otherwise keep every one it ever saw), or, during a relist, once the relist is over and
        if it is still empty then."""
        if previous is not None:
            await asyncio.wait({previous})
        pool = self._pool
        removed = await pool.remove_connection(
            member.deployment, member.address, head=member.head, shard_id=member.shard_id
        )
        if self._relists:  # its new pods may come in a later turn (two deployments' pods swapped addresses)
            self._emptied_in_relist.add(member.deployment)
        else:
            self._forget_if_empty(member.deployment)
        return removed

    def _forget_if_empty(self, deployment: str) -> None:
        """Following a whole namespace, forget ``deployment`` when no member of it is held."""
        pool = self._pool
        if pool.followed_deployments is None and not self._members_of[deployment]:
            if pool.forget_deployment(deployment):
                logger.info("deployment %r left the namespace: forgotten", deployment)

    def _removed(self, member: Member, task: asyncio.Task) -> None:
        if self._removals.get(member) is task:
            del self._removals[member]
        if task.cancelled():
            return
        if task.exception() is not None:
            logger.error(
                "could not remove replica %s of %r", member.address, member.deployment, exc_info=task.exception()
            )
        elif task.result() is not None:
            logger.info(
                "%s %s of %r left",
                "head" if member.head else f"shard {member.shard_id} replica",
                member.address,
                member.deployment,
            )

    async def drain(self) -> None:
        """Wait for the removals still closing channels."""
        while self._removals:
            await asyncio.gather(*self._removals.values(), return_exceptions=True)


def _contradicts(
    claim: Member, member: Member, holding: list[tuple[str, str]], source: str, unconfirmed: Mapping[str, Contribution]
) -> bool:
    """Whether ``claim``, by ``source``, lets go of ``member`` at its address, held by the records ``holding``.

    In its own deployment, unless ``source`` still says ``member`` beyond its previous listing (``unconfirmed``);
    in another, only when every hold is that previous listing's: a deployment's word on its own addresses is
    not another's to settle, but a relist's stale record must not route one IP to two deployments meanwhile."""
    stale = [src == source and member in unconfirmed.get(key, NOTHING) for src, key in holding]
    if _owner(claim) == _owner(member):
        return not any(src == source and not old for (src, _), old in zip(holding, stale))
    return bool(holding) and all(stale)


def _claimed(claim: Member, member: Member) -> str:
    """What ``claim`` serves, for a log line about ``member`` at its address: its role, and its deployment when
    that is another."""
    if _owner(claim) == _owner(member):
        return _role(claim)
    return f"{'the head' if claim.head else f'shard {claim.shard_id}'} of {claim.deployment!r}"


def _stale_word(member: Member, sources: set[str], claimant: str) -> str:
    """Who still said ``member``, for a log line: other ``sources``, or the ``claimant``'s own previous listing."""
    said = [f"the {src} still list it" for src in sorted(sources - {claimant})]
    if claimant in sources:
        said.append(f"the {claimant}' previous listing had it")
    return f"{' and '.join(said)} as {_role(member)}"


async def _first_of(waits: Iterable[Any]) -> None:
    """Wait until the first of ``waits`` (coroutines) is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# -- the pool ------------------------------------------------------------------------


class K8sGrpcConnectionPool(GrpcConnectionPool):
    """A GrpcConnectionPool whose replicas are the ready pods and endpoints of ``namespace``.

    >>> async with K8sGrpcConnectionPool("search") as pool:      # doctest: +SKIP
    ...     await pool.wait_synced(timeout=10)
    ...     pool.deployments
    {'encoder': {'head': ['10.1.0.4:8080'], 'shards': {0: ['10.1.0.5:8080', '10.1.0.6:8080']}}}

    ``client`` is a kubernetes_asyncio ApiClient (or a CoreV1Api over one, as
    Jina passes it) the caller owns; without one
    the pool loads configuration when it starts, as kubectl would
    (``kubeconfig``, KUBECONFIG, ~/.kube/config, in-cluster; see
    ``discovery.configuration``), and closes that client with itself.
    ``deployments`` narrows the watch to those deployments' objects (a head
    passes its own); by default it follows every deployment, as a gateway does.
    ``logger`` comes third, as in Jina 3's ``K8sGrpcConnectionPool(namespace,
    client, logger)``, and goes where GrpcConnectionPool's does (the replica
    lists' ejections); the other options of GrpcConnectionPool are keywords.
    """

    def __init__(
        self,
        namespace: str,
        client: Optional[k8s_client.ApiClient | k8s_client.CoreV1Api] = None,
        logger: Optional[logging.Logger] = None,
        *,
        sources: Sequence[str] = SOURCES,
        kubeconfig: Optional[str] = None,
        watch: WatchOptions = WatchOptions(),
        deployments: Optional[Sequence[str]] = None,
        **pool_options: Any,
    ):
        super().__init__(logger=logger, **pool_options)
        if not namespace:
            raise ConfigurationError("K8sGrpcConnectionPool needs a namespace")
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            # the API server lists nothing, without an error, in a namespace that cannot exist
            raise ConfigurationError(
                f"namespace {namespace!r} cannot be a Kubernetes namespace: lower-case letters, digits and '-', "
                "63 at most, a letter or digit at each end"
                + (" (a variable left unexpanded?)" if isinstance(namespace, str) and "$" in namespace else "")
            )
        unknown = set(sources) - set(SOURCES)
        if unknown or not sources:
            raise ConfigurationError(f"sources must be a non-empty subset of {SOURCES}, got {tuple(sources)}")
        self.namespace = namespace
        self.sources = tuple(dict.fromkeys(sources))
        # None: every deployment in the namespace (a gateway); a head follows its own only
        self.followed_deployments = None if deployments is None else _label_values(deployments)
        if isinstance(client, (k8s_client.CoreV1Api, k8s_client.DiscoveryV1Api)):  # Jina passed a CoreV1Api
            client = client.api_client
        if client is not None and not isinstance(client, k8s_client.ApiClient):
            synchronous = type(client).__module__.split(".")[0] == "kubernetes"
            raise ConfigurationError(
                f"client must be a kubernetes_asyncio ApiClient (or CoreV1Api), got {type(client).__name__}"
                + (": the synchronous kubernetes package's clients cannot be awaited" if synchronous else "")
            )
        if kubeconfig is not None:
            check_kubeconfig(kubeconfig)
        self._client = client
        self._owns_client = client is None
        self._ca_signature: Optional[bytes] = None  # the CA file as our client read it (a client of our own)
        self._ca_lock = asyncio.Lock()
        self._ca_refused: Optional[bytes] = None  # a change of the CA file that did not load
        self._partial_said = RepeatedWarnings()  # wait_synced's word that a source is left out
        self._kubeconfig = kubeconfig
        self._watch_options = watch
        self._ledger = _Ledger(self)
        self._pods_word = PodsWord()  # which slice endpoints the pods, fresher, say are going or gone
        self._watches: dict[str, ListWatch] = {}
        self._task: Optional[asyncio.Task] = None
        self._configured = asyncio.Event()
        self._config_failure: Optional[str] = None

    # -- lifetime --------------------------------------------------------------

    def start(self) -> None:
        """Start following the cluster (call inside a running loop); configuration loads in the background."""
        super().start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow(), name=f"k8s-discovery-{self.namespace}")

    async def close(self) -> None:
        """Stop watching, let removals finish closing, close an owned API client, then every channel."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():  # the caller is being cancelled, not just our task
                    raise
        await self._ledger.drain()
        self._ledger = _Ledger(self)  # the base close forgets every replica; so does the record
        self._pods_word = PodsWord()
        if self._owns_client and self._client is not None:
            credentials = self._client.configuration.refresh_api_key_hook
            if isinstance(credentials, KubeconfigCredentials):
                await credentials.close()
            await self._client.close()
            self._client = None
        self._watches = {}
        self._configured.clear()
        await super().close()

    def failing_sources(self) -> set[str]:
        """The sources whose latest list or watch failed: what they hold may be stale."""
        return {source for source, watch in self._watches.items() if watch.failing}

    def relist_when_back(self, source: str) -> None:
        """Have ``source`` list again rather than resume its watch once it answers: some of what it held was
        dropped as stale meanwhile, and only a list says what of it still stands."""
        self._watches[source].relist_when_back()

    @property
    def watching(self) -> bool:
        """True while the discovery task runs (it only ends by ``close``)."""
        return self._task is not None and not self._task.done()

    async def wait_synced(self, timeout: Optional[float] = None) -> None:
        """Return once every source has completed its first list (its objects are in the pool), or some have and
        the API server refuses the others (403: the Role does not grant them; 404: the cluster has none), which
        are then left out, with a warning, until a retry lists them.

        Raises DiscoveryError naming the namespace, what is not listed yet and the last failure when
        ``timeout`` passes first, and ConfigurationError on a pool that was not started.
        """
        if self._task is None:
            raise ConfigurationError(f"K8sGrpcConnectionPool({self.namespace!r}) is not started: call start() first")

        async def synced() -> None:
            await self._configured.wait()  # the watches exist once configuration has loaded
            watches = list(self._watches.values())
            while True:  # looked at again at each list and each refusal, whichever source it comes from
                listed = [watch for watch in watches if watch.synced.is_set()]
                if len(listed) == len(watches):
                    return
                refused = [watch for watch in watches if not watch.synced.is_set() and watch.refused]
                if listed and len(listed) + len(refused) == len(watches):
                    if all(watch.refused == 404 for watch in refused):
                        followed = tuple(source for source, watch in self._watches.items() if watch in listed)
                        slices = any(self._watches.get(SLICES) is watch for watch in refused)
                        advice = (f"this API server does not serve it{SLICES_NEED if slices else ''}; "
                                  f"sources={followed!r} says what is followed")
                    else:
                        advice = "grant list and watch on it in the Role (the rendered one does) to follow it too"
                    message = (
                        f"namespace {self.namespace!r}: following {' and '.join(w.name for w in listed)} only: "
                        f"{' and '.join(w.name for w in refused)} refused "
                        f"({'; '.join(w.last_failure or '' for w in refused)}); {advice}"
                    )
                    logger.log(self._partial_said.level(message), "%s", message)  # once, not at every wait
                    return
                for watch in watches:
                    watch.news.clear()
                await _first_of(watch.news.wait() for watch in watches)

        try:
            await asyncio.wait_for(synced(), timeout)
        except asyncio.TimeoutError:
            if not self._configured.is_set():
                pending, failure = "its Kubernetes configuration", self._config_failure
            else:
                waiting = [watch for watch in self._watches.values() if not watch.synced.is_set()]
                pending = " and ".join(watch.name for watch in waiting)
                failure = next((watch.last_failure for watch in waiting if watch.last_failure), None)
            raise DiscoveryError(
                f"namespace {self.namespace!r}: {pending} not listed within {timeout:g}s"
                + (f"; last failure: {failure}" if failure else "")
            ) from None

    async def _follow(self) -> None:
        if self._client is None:
            await with_backoff(
                f"kubernetes configuration for {self.namespace}", self._load_client, self._watch_options,
                self._note_config_failure,
            )
        self._watches = {source: self._watch_for(source) for source in self.sources}
        self._configured.set()
        await asyncio.gather(*(watch.run() for watch in self._watches.values()))

    def _note_config_failure(self, error: BaseException) -> None:
        self._config_failure = describe(error)

    async def _load_client(self) -> None:
        try:
            self._client = await load_api_client(self._kubeconfig)
        except (k8s_config.ConfigException, yaml.YAMLError, UnicodeDecodeError) as error:  # (written meanwhile?)
            raise Unavailable(f"no usable Kubernetes configuration: {one_line(error)}") from error
        self._ca_signature = self._ca_file_signature()

    def _ca_file_signature(self) -> Optional[bytes]:
        """A digest of the CA file the client trusts the API server by (None: no file, none now, or a client not
        ours: nothing to take, and the client holds the CA it read). Its content, not a stat: the kubelet rewrites
        a service account's whole volume, ca.crt too, at every token refresh, about hourly, the CA unchanged."""
        path = self._client.configuration.ssl_ca_cert if self._owns_client and self._client is not None else None
        if not path:
            return None
        try:
            with open(path, "rb") as ca_file:
                return hashlib.sha256(ca_file.read(MAX_CA_FILE_BYTES)).digest()
        except OSError:
            return None

    async def _follow_ca(self) -> None:
        """Make a new client when the CA file changed (a rotation of the cluster's CA, the service account's
        ca.crt): the library reads it once, into a TLS context every connection keeps using, so a head would
        stop following membership once the server's certificate is signed by the new CA alone."""
        if self._ca_file_signature() in (None, self._ca_signature, self._ca_refused):
            return
        async with self._ca_lock:  # pods and slices may both notice: one new client
            signature = self._ca_file_signature()
            if signature in (None, self._ca_signature, self._ca_refused):
                return
            old = self._client
            try:
                await self._load_client()
            except Exception as error:  # noqa: BLE001 - half written, say: the client as it is still works
                self._ca_refused = signature  # not tried again until the file changes once more
                logger.warning(
                    "namespace %s: the API server's CA file changed but cannot be read (%s); the client keeps the "
                    "CA it has", self.namespace, describe(error),
                )
                return
            logger.info("namespace %s: the API server's CA file changed; a new client trusts it", self.namespace)
            credentials = old.configuration.refresh_api_key_hook
            if isinstance(credentials, KubeconfigCredentials):
                await credentials.close()
            await old.close()  # a watch still on it breaks, and is watched again on the new one

    async def _list_pods(self, **options: Any) -> Any:
        await self._follow_ca()
        return await k8s_client.CoreV1Api(self._client).list_namespaced_pod(self.namespace, **options)

    async def _list_slices(self, **options: Any) -> Any:
        await self._follow_ca()
        return await k8s_client.DiscoveryV1Api(self._client).list_namespaced_endpoint_slice(self.namespace, **options)

    def _watch_for(self, source: str) -> ListWatch:
        if source == "pods":  # the client looked up at each call: _follow_ca may have replaced it
            call, selector = self._list_pods, _narrowed(POD_SELECTOR, self.followed_deployments)
        else:
            call, selector = self._list_slices, _narrowed(SLICE_SELECTOR, self.followed_deployments)
        return ListWatch(
            f"{source} in {self.namespace}",
            call,
            on_list=functools.partial(self._on_list, source),
            on_event=functools.partial(self._on_event, source),
            label_selector=selector,
            options=self._watch_options,
        )

    def not_listed_yet(self) -> Optional[str]:
        """While no source has completed its first list (the API server down, refusing, or slow): what is not
        listed and the last failure, for a refusal that would otherwise blame the pods' labels; else None."""
        if not self._configured.is_set():
            return "its Kubernetes configuration is not loaded yet" + (
                f"; last failure: {self._config_failure}" if self._config_failure else "")
        watches = list(self._watches.values())
        if not watches or any(watch.synced.is_set() for watch in watches):
            return None
        failure = next((watch.last_failure for watch in watches if watch.last_failure), None)
        return (f"{' and '.join(watch.name for watch in watches)} not listed yet"
                + (f"; last failure: {failure}" if failure else ""))

    def discovery_problem(self) -> Optional[str]:
        """What is wrong with discovery now, for ``shardnet status``: not listed yet, or sources whose latest list
        or watch failed, none answered since (what the head routes by may be stale), with the last failure; None
        when every source is current."""
        pending = self.not_listed_yet()
        if pending is not None:
            return pending
        # a source refused before it ever listed (a Role granting pods only, as Jina's) holds nothing that could be
        # stale: wait_synced left it out, with a warning, and the head routes by the others, which are current
        failing = [watch for watch in self._watches.values() if watch.failing and watch.synced.is_set()]
        # a source never listed (and not refused) holds nothing that could be stale: the head waits for its first
        # list to turn ready, and says so, rather than call a view it never had stale
        unlisted = [watch for watch in self._watches.values() if not watch.synced.is_set() and not watch.refused]
        if not failing and not unlisted:
            return None
        said = []
        if unlisted:
            said.append(f"{' and '.join(watch.name for watch in unlisted)} not listed yet")
        if failing:
            said.append(f"{' and '.join(watch.name for watch in failing)} failing: the workers routed to may be stale")
        failure = next((watch.last_failure for watch in unlisted + failing if watch.last_failure), None)
        return "; ".join(said) + (f"; last failure: {failure}" if failure else "")

    def where_replicas_are_found(self, deployment: str, role: str = "worker") -> str:
        """Where this pool finds ``deployment``'s replicas of ``role`` (worker, uses_before, uses_after): its
        namespace and the labels of the sources it follows, for an operator told that none is there."""
        looked = []
        if PODS in self.sources:
            looked.append(f"pods labelled jina_deployment_name={deployment}, pod_type={role.upper()}")
        if SLICES in self.sources:
            looked.append(f"Services shardnet.io/deployment={deployment}, shardnet.io/role={role}")
        return f"namespace {self.namespace!r} ({', or '.join(looked)})"

    # -- events -------------------------------------------------------------------

    async def _on_list(self, source: str, objects: Iterable[Mapping[str, Any]]) -> None:
        objects, word = list(objects), self._pods_word
        if source == SLICES:
            listed = {object_key(obj): _endpoints(obj) async for obj in in_turns(objects)}
            word.slices_listed(listed)
            self._say_vetoes(listed)
            said = {key: frozenset(endpoint.member for endpoint in endpoints) for key, endpoints in listed.items()}
            await self._ledger.replace(SLICES, said, word.routed)
            await self._end_pods_holds(uid for obj in objects for uid in _terminating_pods(obj))
            return
        touched = word.pods_listed(objects, self._ledger.keys(PODS))  # one it cannot read is left out (said below)
        members = {object_key(obj): _members(PODS, obj) async for obj in in_turns(objects)}
        await self._ledger.replace(PODS, members, members.__getitem__)
        await self._reconsider(touched)

    async def _on_event(self, source: str, kind: str, obj: Mapping[str, Any]) -> None:
        key, word = object_key(obj), self._pods_word
        if source == SLICES and kind == "DELETED":
            word.slice_gone(key)
            await self._ledger.record(SLICES, key, NOTHING, also_remove=_members(SLICES, obj, ready_only=False))
        elif source == SLICES:
            # what its previous word listed and this one does not: gone from it even where the ledger let go of the
            # slice's hold meanwhile (a fresher claim), so that a failing source's stale hold goes too
            before = word.listed(key)
            word.slice_seen(key, _endpoints(obj))
            self._say_vetoes([key])
            await self._ledger.record(SLICES, key, word.routed(key), also_remove=before - word.listed(key))
            await self._end_pods_holds(_terminating_pods(obj))
        elif kind == "DELETED":
            touched = word.pod_deleted(obj)
            await self._ledger.record(PODS, key, NOTHING, also_remove=_members(PODS, obj, ready_only=False))
            await self._reconsider(touched)
        else:
            touched = word.pod_seen(obj)
            await self._ledger.record(PODS, key, _members(PODS, obj))
            await self._reconsider(touched)

    async def _end_pods_holds(self, uids: Iterable[str]) -> None:
        """An endpoint terminating is the slices' final word on the pod it names (its deletion has begun): a pods
        hold of that pod still standing is stale (the pods watch stalled, or lags behind the slices), and goes, as
        the pods' own word on a pod being deleted vetoes its slice endpoint (``pods_word``)."""
        for uid in uids:
            if self._ledger.holds(PODS, uid):
                await self._ledger.record(PODS, uid, NOTHING)

    async def _reconsider(self, touched: set[str]) -> None:
        """Change what the slices naming the pods ``touched`` contribute, as recorded, by the endpoints the pods'
        news vetoed or let back (what the ledger let go of meanwhile stays let go), each just before it is
        recorded: another event may have changed it meanwhile."""
        keys = self._pods_word.slices_naming(touched)
        self._say_vetoes(keys)
        for key in keys:
            withdrawn, restored = self._pods_word.changed(key)
            if withdrawn or restored:
                await self._ledger.change(SLICES, key, withdrawn, restored)

    def _say_vetoes(self, keys: Iterable[str]) -> None:
        for endpoint, why in self._pods_word.newly_said(keys):
            member = endpoint.member
            logger.info(
                "%s of %r (%s) is in its EndpointSlice still, but the pods say %s: not routed to", member.address,
                member.deployment, _role(member), why,
            )

    def __repr__(self) -> str:
        state = "watching" if self._task is not None else "stopped"
        versions = ", ".join(f"{name}@{watch.resource_version}" for name, watch in self._watches.items())
        return f"<K8sGrpcConnectionPool namespace={self.namespace!r} {state} [{versions}] {super().__repr__()[1:-1]}>"
