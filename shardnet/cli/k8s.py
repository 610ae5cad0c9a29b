"""``shardnet k8s render``: the Kubernetes manifests of one deployment, on stdout or as files."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Optional

from shardnet.cli.options import (
    POLLING_HELP,
    add_head_traffic_arguments,
    add_uses_metas_argument,
    check_whole_number,
    json_object,
    message_megabytes,
    uses_metas_name,
)
from shardnet.errors import ConfigurationError
from shardnet.networking.balancing import BALANCERS
from shardnet.manifests.kubernetes import (
    DRAIN_MARGIN,
    HEAD_RESOURCES,
    HOPS,
    ISSUER_KINDS,
    MAX_STARTUP_SECONDS,
    METRICS_PORT,
    STARTUP_PERIOD,
    DeploymentSpec,
    Resources,
    disruption_warnings,
    head_memory_limit,
    hop_component_name,
    render,
    render_components,
    to_yaml,
)
from shardnet.runtimes.head import MAX_WORKERS

DEFAULT_USES = "shardnet.examples.text_index:TextIndexer"
SIZED = "sized"  # --head-memory-limit not given: what the topology needs (head_memory_limit)


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``k8s`` and its ``render`` action to the ``shardnet`` parser."""
    k8s = subparsers.add_parser("k8s", help="Kubernetes manifests", description="Run shardnet on Kubernetes.")
    actions = k8s.add_subparsers(dest="k8s_action", required=True, metavar="ACTION")
    parser = actions.add_parser(
        "render",
        help="print or write the manifests of one deployment",
        description=(
            "Render a head and SHARDS x REPLICAS workers as Kubernetes manifests: Deployments, Services, "
            "PodDisruptionBudgets and the head's discovery RBAC. Pipe to `kubectl apply -f -`, or write "
            "one file per component with --output DIR."
        ),
    )
    parser.add_argument("--name", required=True, help="deployment name; prefixes every object's name")
    parser.add_argument("--image", required=True, help="container image with shardnet and the Executor installed")
    parser.add_argument(
        "--uses", default=DEFAULT_USES, help="Executor the workers load, as MODULE:CLASS or FILE.py:CLASS (default: %(default)s)"
    )
    parser.add_argument(
        "--uses-with", default="{}",
        help="JSON keyword arguments for the Executor, or @FILE holding them; on every worker's command line",
    )
    add_uses_metas_argument(parser)
    parser.add_argument(
        "--uses-before", metavar="MODULE:CLASS",
        help="an Executor every request passes through before the shards: a Deployment of its own (NAME-uses-before, "
             "--replicas pods, the workers' resources, TLS and policies), which the head finds by discovery",
    )
    parser.add_argument(
        "--uses-after", metavar="MODULE:CLASS",
        help="an Executor given the shards' answers together to merge them: a Deployment of its own "
             "(NAME-uses-after), as --uses-before",
    )
    parser.add_argument("--shards", type=int, default=1, help="number of shards (default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per shard (default: %(default)s)")
    parser.add_argument("--head-replicas", type=int, default=1, help="replicas of the head (default: %(default)s)")
    parser.add_argument("--polling", default="ANY", help=POLLING_HELP)
    parser.add_argument("--namespace", default="default", help="namespace of every object (default: %(default)s)")
    parser.add_argument(
        "--balancer", choices=sorted(BALANCERS), default="p2c_ewma",
        help="the head's replica balancer (default: %(default)s)",
    )
    add_head_traffic_arguments(parser)
    parser.add_argument(
        "--port", type=int, default=8080, help="gRPC port of every container, 1024 or above (default: %(default)s)"
    )
    parser.add_argument(
        "--network-policy", action="store_true",
        help="a NetworkPolicy per shard letting only the head's pods reach its workers (needs a network plugin "
             "that enforces them; kubelet's probes come from the node, which common plugins let through); with "
             "--metrics, the metrics port is let in from any source",
    )
    parser.add_argument(
        "--tls-secret", metavar="SECRET",
        help="a Secret with tls.crt, tls.key and ca.crt (as cert-manager writes one): the head serves TLS, the "
             "workers mutual TLS, the head dials them with that certificate; it must name NAME-head.NAMESPACE.svc "
             "and NAME-worker.NAMESPACE.svc. Probes then use a plaintext health-only port (--health-port)",
    )
    parser.add_argument(
        "--worker-tls-secret", metavar="SECRET",
        help="with --tls-secret, a Secret of the same CA for the workers alone: its certificate names only "
             "NAME-worker.NAMESPACE.svc and serves only, --tls-secret's then only the head, so a worker's key can "
             "neither pose as the head nor call other workers (default: the workers share --tls-secret)",
    )
    parser.add_argument(
        "--tls-issuer", metavar="ISSUER",
        help="also render the cert-manager Certificates from this Issuer (a CA of the deployment's own) that keep "
             "--tls-secret (and --worker-tls-secret) filled and renewed, with every name and usage they need",
    )
    parser.add_argument(
        "--tls-issuer-kind", choices=ISSUER_KINDS,
        help=f"the kind of --tls-issuer (default: {DeploymentSpec.tls_issuer_kind})",
    )
    parser.add_argument(
        "--health-port", type=int,
        help="with --tls-secret, the port of the plaintext health check the probes use "
             f"(default: {DeploymentSpec.health_port})",
    )
    parser.add_argument(
        "--metrics", type=int, nargs="?", const=METRICS_PORT, metavar="PORT",
        help="heads and workers serve Prometheus metrics on PORT (default when given alone: %(const)s), their pods "
             "annotated prometheus.io/scrape and prometheus.io/port (the image needs the extra shardnet[metrics], "
             "as the Dockerfile's has it). Plain HTTP, unauthenticated, even with --tls-secret; with "
             "--network-policy the workers' policy lets PORT in from any source: narrow it to your Prometheus",
    )
    parser.add_argument(
        "--startup-seconds", type=int, default=DeploymentSpec.startup_seconds,
        help="how long loading the Executor may take before Kubernetes restarts a pod (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-seconds", type=int, default=DeploymentSpec.termination_grace_seconds,
        help="a stopping pod's grace: the preStop pause, then in-flight requests get all but "
             f"{DRAIN_MARGIN} s of the rest (default: %(default)s)",
    )
    parser.add_argument("--cpu", default=Resources.cpu, help="CPU request of each worker (default: %(default)s)")
    parser.add_argument(
        "--max-message-mb", type=message_megabytes, default=DeploymentSpec.max_message_mb,
        help="largest message the head and workers take, in MiB; the memory limits must hold one (a head about 5 "
             "copies, a worker 8, over 64 MiB) (default: %(default)g)",
    )
    parser.add_argument("--memory", default=Resources.memory, help="memory request of each worker (default: %(default)s)")
    parser.add_argument(
        "--memory-limit",
        type=optional_quantity,
        default=Resources.memory_limit,
        help="memory limit of each worker, at least --memory; 'none' for no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu-limit",
        type=optional_quantity,
        default=None,
        help="CPU limit of each worker, at least --cpu (default: none; CFS throttling adds tail latency)",
    )
    parser.add_argument("--head-cpu", default=HEAD_RESOURCES.cpu, help="CPU request of the head (default: %(default)s)")
    parser.add_argument(
        "--head-memory", default=HEAD_RESOURCES.memory, help="memory request of the head (default: %(default)s)"
    )
    parser.add_argument(
        "--head-memory-limit",
        type=optional_quantity,
        default=SIZED,
        help=f"memory limit of the head; 'none' for no limit (default: {HEAD_RESOURCES.memory_limit}, or more where "
             "one request of --max-message-mb takes more: under ALL polling the head holds every shard's answer)",
    )
    parser.add_argument(
        "--output", type=Path, metavar="DIR", help="write NAME-head.yaml, NAME-0.yaml, ... here instead of stdout"
    )
    parser.set_defaults(handler=run)


def _certificate_notes(spec: DeploymentSpec) -> list[str]:
    """What each TLS Secret given without an issuer must hold, since nothing renders it."""
    signer = "its ca.crt" if len(spec.certificates) == 1 else "the CA both Secrets hold as ca.crt"
    notes = []
    for need in spec.certificates:
        names = []
        if need.role == "head":
            names.append(f"{spec.head_server_name} (what clients dial)")
        if spec.worker_server_name in need.names:
            names.append(f"{spec.worker_server_name} (what the head checks its workers against: it dials pod IPs)")
        usage = (
            "allow both server auth and client auth (the head presents it to its workers)"
            if "client auth" in need.usages
            else "allow server auth only (so that it cannot call other workers)"
        )
        notes.append(
            f"the certificate in Secret {need.secret!r} must name {' and '.join(names)}, {usage}, and be signed by "
            f"{signer}, best a CA of this deployment's own (the workers take whoever it signed)"
        )
    return notes


def optional_quantity(text: str) -> Optional[str]:
    """A limit flag's value: a quantity (checked by ``Resources``), or 'none' for no limit."""
    return None if text.strip().lower() == "none" else text


def check_counts(args: argparse.Namespace) -> None:
    """Refuse counts and times ``DeploymentSpec`` would refuse in its parameters' names (or not at all: a head
    takes at most ``MAX_WORKERS`` workers), naming the flags; as ConfigurationErrors, as render reports the rest."""
    for flag, value in (("--shards", args.shards), ("--replicas", args.replicas), ("--head-replicas", args.head_replicas)):
        check_whole_number(value, flag, 1)
    workers = args.shards * args.replicas
    if workers > MAX_WORKERS:
        raise ConfigurationError(
            f"--shards {args.shards} x --replicas {args.replicas} = {workers} workers, more than the {MAX_WORKERS} "
            "a head holds"
        )
    check_whole_number(
        args.startup_seconds, "--startup-seconds", STARTUP_PERIOD, MAX_STARTUP_SECONDS,
        why=f" (the startup probe looks every {STARTUP_PERIOD} s; a day at most)",
    )
    pause = DeploymentSpec.pre_stop_seconds
    check_whole_number(
        args.grace_seconds, "--grace-seconds", pause + DRAIN_MARGIN + 1,
        why=f" (a stopping pod first pauses {pause} s in preStop, drains at least 1 s, and needs {DRAIN_MARGIN} s to "
        "exit before SIGKILL)",
    )


def run(args: argparse.Namespace) -> int:
    """Render the manifests the arguments describe; a bad argument raises ``ConfigurationError``."""
    check_counts(args)
    if args.tls_issuer_kind is not None and args.tls_issuer is None:
        raise ConfigurationError(
            f"--tls-issuer-kind {args.tls_issuer_kind} needs --tls-issuer: without an issuer no Certificate is rendered"
        )
    if args.health_port is not None and args.tls_secret is None:
        raise ConfigurationError(
            "--health-port needs --tls-secret: without TLS the probes read the gRPC port itself, and no health "
            "port is rendered"
        )
    spec = DeploymentSpec(
        name=args.name,
        image=args.image,
        uses=args.uses,
        uses_with=json.dumps(json_object(args.uses_with, "--uses-with")),
        metas_name=uses_metas_name(args.uses_metas),
        uses_before=args.uses_before,
        uses_after=args.uses_after,
        shards=args.shards,
        replicas=args.replicas,
        head_replicas=args.head_replicas,
        polling=args.polling,
        namespace=args.namespace,
        balancer=args.balancer,
        port=args.port,
        startup_seconds=args.startup_seconds,
        network_policy=args.network_policy,
        termination_grace_seconds=args.grace_seconds,
        worker_resources=Resources(
            cpu=args.cpu, memory=args.memory, memory_limit=args.memory_limit, cpu_limit=args.cpu_limit
        ),
        head_resources=Resources(
            cpu=args.head_cpu, memory=args.head_memory,
            memory_limit=(
                head_memory_limit(args.shards, args.polling, args.max_message_mb)
                if args.head_memory_limit == SIZED else args.head_memory_limit
            ),
        ),
        max_message_mb=args.max_message_mb,
        max_in_flight=args.max_in_flight,
        request_streams=args.request_streams,
        tls_secret=args.tls_secret,
        worker_tls_secret=args.worker_tls_secret,
        tls_issuer=args.tls_issuer,
        tls_issuer_kind=args.tls_issuer_kind or DeploymentSpec.tls_issuer_kind,
        **({} if args.health_port is None else {"health_port": args.health_port}),
        metrics_port=args.metrics,
    )
    if spec.uses == DEFAULT_USES and spec.replicas > 1:
        print(
            f"shardnet k8s render: note: the demo's TextIndexer keeps its index in its pod's own emptyDir; with "
            f"{spec.replicas} replicas per shard a search sees only what its replica indexed (give --uses your "
            "Executor, or --replicas 1)",
            file=sys.stderr,
        )
    if spec.tls_issuer is None:
        for note in _certificate_notes(spec):
            print(f"shardnet k8s render: note: {note}", file=sys.stderr)
    for warning in disruption_warnings(spec):  # on stderr: the YAML on stdout goes to kubectl as it is
        print(f"shardnet k8s render: warning: {warning}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(to_yaml(render(spec)))
        return 0
    for path in write_components(spec, args.output):
        print(path)
    return 0


def write_components(spec: DeploymentSpec, directory: Path) -> list[Path]:
    """Write one YAML file per component (``NAME-head.yaml``, ``NAME-0.yaml``, ...) and return their paths.

    A shard file left by an earlier render with more shards (or a hop's, by one with that hop) is reported on
    stderr, not deleted: ``kubectl apply -f DIR`` would bring that shard back.
    """
    components = render_components(spec)
    written = [directory / f"{component}.yaml" for component in components]
    # every file is written aside first and only then renamed into place: a failure part way (a file that cannot
    # be replaced, a full disk) leaves the directory as it was, never a new head beside an old render's shards
    staged: list[Path] = []
    places: list[Path] = []  # where each is renamed to: a file's own path, or the file a link in its place names
    target, renamed = directory, 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, objects in zip(written, components.values()):
            target = path
            if path.is_dir():  # os.replace would say so only once the files before it were in place
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            # a link in its place is written through, as a plain write was: replacing the link left its file as it was
            place = path.resolve() if path.is_symlink() else path
            temporary = place.with_name(f".{place.name}.{os.getpid()}.tmp")
            staged.append(temporary)
            places.append(place)
            temporary.write_text(to_yaml(objects), encoding="utf-8")
            with contextlib.suppress(FileNotFoundError):  # a file replaced keeps its mode, as a plain write kept it
                os.chmod(temporary, stat.S_IMODE(os.stat(place).st_mode))
        for temporary, place in zip(staged, places):
            target = place
            os.replace(temporary, place)
            renamed += 1
    except OSError as exc:
        for temporary in staged[renamed:]:
            with contextlib.suppress(OSError):
                temporary.unlink()
        left = "no file was changed" if not renamed else f"only {', '.join(str(p) for p in written[:renamed])} written"
        raise ConfigurationError(f"cannot write manifests to {str(target)!r}: {exc.strerror or exc} ({left})") from None
    hops = "|".join(hop_component_name("", role).lstrip("-") for role in HOPS)
    component_file = re.compile(rf"^{re.escape(spec.name)}-(\d+|{hops})\.yaml$")
    rendered = [f"{spec.shards} shards", *(role for role, _ in spec.hops)]
    for stale in sorted(directory.iterdir()):
        if component_file.match(stale.name) and stale.stem not in components:
            print(
                f"warning: {stale} is not part of this render ({', '.join(rendered)}); delete it before kubectl "
                "apply",
                file=sys.stderr,
            )
    return written
