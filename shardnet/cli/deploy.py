"""``shardnet deploy``: run a local deployment until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from shardnet.cli.options import (
    add_head_traffic_arguments,
    add_token_argument,
    control_token,
    json_object,
    message_megabytes,
)
from shardnet.networking.balancing import BALANCERS
from shardnet.runtimes.deployment import Deployment


REVIVE_INTERVAL = 1.0  # seconds between looks for processes that exited


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="run head + shards x replicas locally until Ctrl-C")
    parser.add_argument("--uses", required=True, help="MODULE:CLASS or FILE.py:CLASS")
    parser.add_argument("--uses-with", default="{}", help="JSON keyword arguments for the Executor")
    parser.add_argument("--name", default="executor")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--polling", default="ANY")
    parser.add_argument("--port", type=int, default=0, help="port of the head; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--balancer", choices=sorted(BALANCERS), default="p2c_ewma")
    parser.add_argument("--workspace", help="folder the Executors keep state in")
    parser.add_argument("--uses-before", metavar="MODULE:CLASS", help="an Executor every request passes first")
    parser.add_argument(
        "--uses-after", metavar="MODULE:CLASS", help="an Executor that receives the shards' answers (docs_matrix)"
    )
    add_head_traffic_arguments(parser)
    parser.add_argument("--timeout", type=float, default=None, help="the head's default deadline of a call, seconds")
    parser.add_argument(
        "--attempt-timeout", type=float, default=None, help="the head gives up on one replica after this long"
    )
    parser.add_argument(
        "--max-message-mb", type=message_megabytes, default=None,
        help="largest message the head, the workers and their calls take, in MB (default 256)",
    )
    parser.add_argument(
        "--restart", action=argparse.BooleanOptionalAction, default=True,
        help="start again, where it served, any process that exits while deployed (a crash, kill -9); "
             "one that keeps exiting soon after its start waits longer each time, up to 30 s (default: on)",
    )
    add_token_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    uses_with = json_object(args.uses_with, "--uses-with")
    stop = threading.Event()
    # during startup SIGTERM acts as Ctrl-C does: Deployment.start stops what it had started, and we exit
    for signum in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops it as Ctrl-C does
        signal.signal(signum, signal.default_int_handler)
    with Deployment(
        args.uses,
        shards=args.shards,
        replicas=args.replicas,
        polling=args.polling,
        name=args.name,
        port=args.port,
        host=args.host,
        uses_with=uses_with,
        balancer=args.balancer,
        workspace=args.workspace,
        control_token=control_token(args),
        timeout=args.timeout,
        attempt_timeout=args.attempt_timeout,
        max_message_mb=args.max_message_mb,
        uses_before=args.uses_before,
        uses_after=args.uses_after,
        request_streams=args.request_streams,
        max_in_flight=args.max_in_flight,
    ) as deployment:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: stop.set())
        print(deployment.table())
        print(f"\n{args.name} serves on {deployment.address} (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the wait as SIGTERM does
            while not stop.wait(REVIVE_INTERVAL):
                if args.restart:
                    deployment.revive(wait=False)  # never blocks: SIGTERM is heard within a second
        print("stopping...", flush=True)  # on SIGTERM as on Ctrl-C: the drain may take a few seconds
    return 0
