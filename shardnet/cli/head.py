"""``shardnet head``: route a deployment's requests over its shards."""

from __future__ import annotations

import argparse
import itertools
import logging
from collections import defaultdict
from typing import Optional

from shardnet.cli.options import (
    check_visible_name,
    POLLING_HELP,
    add_client_tls_arguments,
    add_head_routing_arguments,
    add_head_traffic_arguments,
    add_server_arguments,
    client_tls,
    flag_address,
    positive_seconds,
    run_in_loop,
    server_config,
    whole_number,
)
from shardnet.cli.stopping import DRAIN_CUT_EXIT
from shardnet.discovery.factory import create_connection_pool
from shardnet.errors import ConfigurationError
from shardnet.networking.channels import message_size_options
from shardnet.networking.policies import RetryPolicy
from shardnet.networking.polling import PollingMap
from shardnet.protocol.messages import MAX_SHARD_ID
from shardnet.runtimes.head import DISCOVERED, MAX_WORKERS, SHARDS_WAIT, Head
from shardnet.runtimes.listening import check_can_listen

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("head", help="route a deployment's requests over its shards")
    parser.add_argument("--deployment", required=True, help="name of the deployment this head fronts")
    parser.add_argument("--polling", default="ANY", help=POLLING_HELP)
    parser.add_argument(
        "--connection",
        action="append",
        default=[],
        metavar="SHARD=HOST:PORT",
        help="a worker replica: SHARD=HOST:PORT, or SHARD=unix:/PATH for one on this machine (repeatable; not "
             "with --k8s-namespace, whose discovery alone lists the workers)",
    )
    parser.add_argument(
        "--shards",
        # each shard needs a worker at least, and a head holds at most MAX_WORKERS
        type=whole_number("shards", 0, MAX_WORKERS, f" (a head holds at most {MAX_WORKERS} workers)"),
        default=0,
        help="shards expected: ALL reports any without a replica, ACTIVATE beyond them is refused "
             "(default: %(default)s, not fixed: any shard id may register)",
    )
    parser.add_argument(
        "--lease", type=positive_seconds("lease"), metavar="SECONDS", default=None,
        help="drop an ACTIVATEd worker that has not re-sent ACTIVATE for this many seconds (default: five times the "
             "interval a shardnet worker says it renews at; a Jina worker stays until its DEACTIVATE); not with "
             "--k8s-namespace, whose head refuses ACTIVATE",
    )
    parser.add_argument(
        "--uses-before", metavar="HOST:PORT",
        help=f"a worker every request passes through before the shards; with --k8s-namespace, '{DISCOVERED}': the "
             "pods discovery finds labelled pod_type=uses_before (as k8s render --uses-before renders them)",
    )
    parser.add_argument(
        "--uses-after", metavar="HOST:PORT",
        help="a worker given the shards' answers together (under ALL, one column per shard) to merge them; with "
             f"--k8s-namespace, '{DISCOVERED}': the pods discovery finds labelled pod_type=uses_after",
    )
    add_head_routing_arguments(parser)
    add_head_traffic_arguments(parser)
    parser.add_argument(
        "--k8s-namespace",
        help="discover replicas by watching this Kubernetes namespace (never implied by running in a pod)",
    )
    parser.add_argument(
        "--kubeconfig", metavar="FILE",
        help="with --k8s-namespace, the kubeconfig to reach the API server with (default: as kubectl finds one: "
             "KUBECONFIG, ~/.kube/config, else the pod's service account)",
    )
    parser.add_argument(
        "--shards-wait", type=positive_seconds("shards-wait", zero=True), metavar="SECONDS", default=SHARDS_WAIT,
        help="with --k8s-namespace and --shards, how long the head stays unready waiting for a worker of every "
             "shard before it turns ready without them (default: %(default)g)",
    )
    add_server_arguments(parser, default_port=0)
    add_client_tls_arguments(parser, prefix="")
    parser.set_defaults(handler=run, process_name=lambda args: args.deployment)


def parse_connections(items: list[str], tls: bool = False) -> dict[int, list[str]]:
    """``["0=h:1", "1=h:2"]`` -> ``{0: ["h:1"], 1: ["h:2"]}``, validating each address (``https://`` with ``tls``)."""
    connections: dict[int, list[str]] = defaultdict(list)
    for item in items:
        shard, sep, address = item.partition("=")
        if not sep or not shard.strip().isdigit() or int(shard) > MAX_SHARD_ID:
            raise ConfigurationError(
                f"--connection {item!r}: expected SHARD=HOST:PORT with SHARD a whole number from 0 to "
                f"{MAX_SHARD_ID}, e.g. 0=127.0.0.1:50051"
            )
        connections[int(shard)].append(str(flag_address(f"--connection {item!r:.200}", address, tls=tls)))
    return dict(connections)


def _extra_address(flag: str, address: Optional[str], tls: bool, namespace: Optional[str]) -> Optional[str]:
    """A --uses-before/--uses-after address as the head dials it, or DISCOVERED (its pods found by Kubernetes
    discovery: only with --k8s-namespace); none when not given (nor given empty)."""
    if address == DISCOVERED:
        if namespace is None:
            raise ConfigurationError(
                f"{flag} {DISCOVERED}: its replicas are the pods Kubernetes discovery finds, and this head follows "
                "no namespace: give --k8s-namespace, or the address of the worker"
            )
        return DISCOVERED
    return address and str(flag_address(flag, address, tls=tls))


def run(args: argparse.Namespace) -> int:
    return run_in_loop(serve(args), args.loop)


def _check_deployment_name(name: str) -> None:
    """Refuse a name that is no text (bytes the terminal's encoding could not decode) or holds a control character:
    it names the head in every error and the route entries, and could never match a worker's."""
    check_visible_name(name, "--deployment")


def _refuse_static_membership_under_discovery(args: argparse.Namespace) -> None:
    """Refuse --connection and --lease beside --k8s-namespace: Kubernetes owns the membership of a head it feeds.
    A static worker would be routed to and counted for readiness though discovery never listed it (a dead one
    made the head ready), and a lease would never apply, as such a head refuses the ACTIVATEs it times out."""
    if args.k8s_namespace is None:
        return
    if args.connection:
        raise ConfigurationError(
            "--connection and --k8s-namespace: a head following Kubernetes takes its workers from discovery alone "
            "(Kubernetes owns its membership, and its readiness waits for what discovery lists); drop --connection, "
            "or --k8s-namespace for a head of static workers"
        )
    if args.lease is not None:
        raise ConfigurationError(
            "--lease and --k8s-namespace: a lease drops workers that stop renewing their ACTIVATE, and a head "
            "following Kubernetes refuses ACTIVATE (Kubernetes owns its membership, and a pod leaves as it stops "
            "being Ready); drop --lease"
        )


def skipped_shards(connections: dict[int, list]) -> Optional[str]:
    """A warning when the static ``--connection`` list skips shard numbers below its highest ("2=" typed for "1="):
    without --shards, ALL left such a shard out without an error, and ``status`` listed every replica serving."""
    top = max(connections, default=-1)
    skipped = top + 1 - len(connections)
    if not skipped:
        return None
    first = list(itertools.islice((shard for shard in range(top) if shard not in connections), 10))
    named = ", ".join(map(str, first)) + (", ..." if skipped > len(first) else "")
    return (
        f"--connection gives no worker for {skipped} shard(s) below shard {top} ({named}): without --shards, ALL "
        f"leaves them out without an error; give --shards {top + 1} so that a missing shard is named, or fix the "
        "shard numbers"
    )


async def serve(args: argparse.Namespace) -> int:
    """Build the head inside the running loop (gRPC channels belong to the loop they are made in). Its
    warnings come once every flag has been checked: a refusal is then the one line it prints."""
    _check_deployment_name(args.deployment)
    retry = RetryPolicy(attempt_timeout=args.attempt_timeout, unsent_only=args.at_most_once)
    namespace = args.k8s_namespace  # only when asked: a head that happens to run in a pod may be a local one
    if namespace == "":  # else a static head would start, with nothing to serve
        raise ConfigurationError(
            "--k8s-namespace is empty (a variable unset in a script?): name the namespace to follow"
        )
    _refuse_static_membership_under_discovery(args)
    if args.kubeconfig is not None and namespace is None:
        raise ConfigurationError("--kubeconfig is for discovery: give --k8s-namespace as well")
    if namespace is not None and args.kubeconfig is None:
        from shardnet.discovery.configuration import check_configuration_exists  # the Kubernetes client: when asked

        check_configuration_exists()
    # its own pods only
    k8s_options = {"deployments": (args.deployment,), "kubeconfig": args.kubeconfig} if namespace is not None else {}
    config = server_config(args)
    check_can_listen(config)  # in our words, before gRPC's C core logs its own line about the failed bind
    pool = create_connection_pool(
        k8s_connection_pool=namespace is not None,
        k8s_namespace=namespace,
        **k8s_options,
        balancer=args.balancer,
        retry=retry,
        timeout=args.timeout,
        tls=client_tls(args),
        options=message_size_options(config.max_message_bytes),  # its workers' answers pass through it
        request_streams=args.request_streams,
    )
    connections = parse_connections(args.connection, tls=pool.tls is not None)
    head = Head(
        args.deployment,
        config,
        polling=PollingMap.parse(args.polling),
        pool=pool,
        connections=connections,
        uses_before=_extra_address("--uses-before", args.uses_before, pool.tls is not None, namespace),
        uses_after=_extra_address("--uses-after", args.uses_after, pool.tls is not None, namespace),
        shards=args.shards,
        lease=args.lease,
        max_in_flight=args.max_in_flight,
        shards_wait=args.shards_wait,
    )
    if not args.shards and not args.connection:
        logger.warning(
            "no --shards: under ALL (/search, and whatever --polling sends to all) the answer holds the shards whose "
            "workers have registered, and one that has not yet (after this head restarts, say) is left out "
            "without an error; give --shards N so that a missing shard is named"
        )
    skipped = None if args.shards else skipped_shards(connections)
    if skipped:
        logger.warning("%s", skipped)
    if args.attempt_timeout is not None and args.timeout is not None and args.attempt_timeout >= args.timeout:
        logger.warning(
            "--attempt-timeout %gs is not under --timeout %gs: a request a hung replica holds runs out of the hop's "
            "time before it is tried on another", args.attempt_timeout, args.timeout,
        )
    if args.shards_wait != SHARDS_WAIT and (namespace is None or not args.shards):
        logger.warning("--shards-wait has no effect without --k8s-namespace and --shards: such a head is ready at once")
    code = await head.run(parent_pid=args.parent_pid, ready_fd=args.ready_fd)
    if code == 0 and head.requests_cut:  # requests it took were cut at its drain's end: a supervisor must see it
        code = DRAIN_CUT_EXIT
    return code
