"""``shardnet deploy``: run a local deployment until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from typing import Any, Optional

from shardnet.cli.options import (
    POLLING_HELP,
    add_head_routing_arguments,
    add_head_traffic_arguments,
    add_token_argument,
    add_uses_metas_argument,
    control_token,
    drain_seconds,
    json_object,
    make_folder,
    message_megabytes,
    positive_seconds,
    uses_metas_name,
    whole_number,
)
from shardnet.cli.stopping import StoppedBySignal, on_stop_signals, run_stoppable
from shardnet.errors import ConfigurationError
from shardnet.networking.addresses import host_is_loopback
from shardnet.networking.channels import TOKEN_VARIABLE
from shardnet.runtimes.deployment import DEFAULT_STARTUP_TIMEOUT, Deployment
from shardnet.runtimes.processes import ShardnetProcess

logger = logging.getLogger("shardnet.deploy")

REVIVE_INTERVAL = 1.0  # seconds between looks for processes that exited
# workers one machine runs at most: each is a process loading its own Executor; more is a cluster's job
MAX_LOCAL_WORKERS = 256
KEEPS_LOGS = "--log-dir keeps it"  # what a warning quoting a temporary log says keeps it


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="run head + shards x replicas locally until Ctrl-C")
    parser.add_argument("--uses", required=True, help="MODULE:CLASS or FILE.py:CLASS")
    parser.add_argument(
        "--uses-with", default="{}", help="JSON keyword arguments for the Executor, or @FILE holding them"
    )
    add_uses_metas_argument(parser)
    parser.add_argument(
        "--name", default="executor",
        help="deployment name (default: %(default)s): names the workers in dict results (NAME/rep-R, "
             "NAME/shard-S/rep-R), NAME in route entries (executor-specific parameters go under the class "
             "name, or --uses-metas's)",
    )
    parser.add_argument(
        "--shards", type=whole_number("shards", 1), default=1, help="number of shards (default: %(default)s)"
    )
    parser.add_argument(
        "--replicas", type=whole_number("replicas", 1), default=1,
        help=f"replicas of each shard (default: %(default)s); shards x replicas at most {MAX_LOCAL_WORKERS}",
    )
    parser.add_argument(
        "--polling", default="ANY",
        help=POLLING_HELP,
    )
    parser.add_argument("--port", type=int, default=0, help="port of the head; 0 picks a free one")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address the head and the workers bind (default: %(default)s, loopback only)",
    )
    parser.add_argument(
        "--workspace", metavar="DIR",
        help="folder the Executors keep state in, kept after exit (default: DIR/workspace with --log-dir DIR, "
             "else a temporary one, removed on exit)",
    )
    parser.add_argument(
        "--log-dir", metavar="DIR",
        help="write each process's output to DIR/NAME-ROLE.log and keep it after exit (default: a temporary "
             "folder, removed on exit); deployments of different --name may share one",
    )
    parser.add_argument(
        "--metrics-port", type=whole_number("metrics port", 0, 65535), metavar="PORT",
        help="the head serves Prometheus metrics over HTTP at /metrics on PORT (0 picks a free one), every other "
             "process on a free port of its own, listed at start (METRICS). Needs pip install 'shardnet[metrics]' "
             "('.[metrics]' from a checkout)",
    )
    parser.add_argument("--uses-before", metavar="MODULE:CLASS", help="an Executor every request passes first")
    parser.add_argument(
        "--uses-after", metavar="MODULE:CLASS", help="an Executor that receives the shards' answers (docs_matrix)"
    )
    add_head_routing_arguments(parser)
    add_head_traffic_arguments(parser)
    parser.add_argument(
        "--max-message-mb", type=message_megabytes, default=None,
        help="largest message the head, the workers and their calls take, in MiB (default 256)",
    )
    parser.add_argument(
        "--startup-seconds", type=positive_seconds("startup time"), metavar="SECONDS",
        default=DEFAULT_STARTUP_TIMEOUT,
        help="how long a process may take to start, loading its Executor, before deploy gives up (at start) or "
             "stops it and starts it again (a restart) (default: %(default)g)",
    )
    parser.add_argument(
        "--drain-seconds", type=drain_seconds, default=None, metavar="SECONDS",
        help="seconds each process's requests in flight get to finish when it stops or restarts; one still "
             "running then is cut, and may run again on another replica (default: 10)",
    )
    parser.add_argument(
        "--restart", action=argparse.BooleanOptionalAction, default=True,
        help="start again, where it served, any process that exits while deployed (a crash, kill -9); "
             "one that keeps exiting soon after its start waits longer each time, up to 30 s (default: on)",
    )
    add_token_argument(parser, f"${TOKEN_VARIABLE}, else a fresh one deploy makes, in a file only you read, "
                               "whose path it prints")
    parser.set_defaults(handler=run, process_name=lambda args: args.name)


def run(args: argparse.Namespace) -> int:
    uses_with = json_object(args.uses_with, "--uses-with")
    if args.metrics_port and args.metrics_port == args.port:
        raise ConfigurationError(f"--metrics-port {args.metrics_port} must differ from --port, the head's")
    for folder, flag in ((args.log_dir, "--log-dir"), (args.workspace, "--workspace")):
        if folder == "":  # "$LOGS" unset: taken for none (--workspace) or a traceback (--log-dir)
            raise ConfigurationError(
                f"{flag} is empty (a variable unset in a script?): give a folder, or leave {flag} out"
            )
    workers = args.shards * args.replicas
    if workers > MAX_LOCAL_WORKERS:
        raise ConfigurationError(
            f"--shards {args.shards} x --replicas {args.replicas} = {workers} workers, more than the "
            f"{MAX_LOCAL_WORKERS} deploy runs: each is a process of this machine loading its own Executor "
            "(shardnet k8s render spreads more over a cluster)"
        )
    if os.getcwd() not in sys.path:  # as `shardnet worker` does: --uses MODULE:CLASS may name a module here, and
        sys.path.insert(0, os.getcwd())  # the workers look along this process's path, this folder first
    # deploy's own workspace, removed on exit unless kept: a Deployment's default, the user's cache folder, would
    # keep a demo's state for ever
    temporary = None
    workspace = args.workspace or (os.path.join(args.log_dir, "workspace") if args.log_dir else None)
    if workspace is None:
        temporary = tempfile.TemporaryDirectory(prefix="shardnet-workspace-")
        workspace = temporary.name
    try:
        return _deploy(args, uses_with, workspace)
    finally:
        if temporary is not None:
            temporary.cleanup()


def _deploy(args: argparse.Namespace, uses_with: dict, workspace: str) -> int:
    """Run the deployment ``args`` describe until a stop signal; its exit code."""
    token = control_token(args)
    stop = threading.Event()  # set by a stop signal once the start is over: the serving loop looks at it
    # from the end of the start on, the loop in _serve notices within a second, Ctrl-C too: a KeyboardInterrupt
    # could land in the middle of a restart, or of the making of the loop a look at the head runs in, and one
    # that came as the start ended (run_stoppable passes it on) would leave the started deployment to no one
    on_stop_signals(lambda *_: stop.set())
    try:
        # started as an ``async with`` starts it: a stop signal cancels the start, which stops what it launched
        deployment = run_stoppable(_started_deployment(args, uses_with, workspace, token))
    except KeyboardInterrupt as exc:
        return _stopped_while_starting(args, exc.signum if isinstance(exc, StoppedBySignal) else signal.SIGINT)
    try:
        return _serve(args, deployment, stop)
    except BaseException:  # as a ``with`` would: its processes and folders go whatever ends the serving
        deployment.stop()
        raise


async def _started_deployment(
    args: argparse.Namespace, uses_with: dict, workspace: str, token: Optional[str]
) -> Deployment:
    """The deployment ``args`` describe, started: every replica registered with its head."""
    deployment = Deployment(
        args.uses,
        shards=args.shards,
        replicas=args.replicas,
        polling=args.polling,
        name=args.name,
        port=args.port,
        host=args.host,
        uses_with=uses_with,
        uses_metas={"name": uses_metas_name(args.uses_metas)},
        balancer=args.balancer,
        workspace=workspace,
        log_dir=args.log_dir,
        control_token=token,
        timeout=args.timeout,
        attempt_timeout=args.attempt_timeout,
        at_most_once=args.at_most_once,
        max_message_mb=args.max_message_mb,
        uses_before=args.uses_before,
        uses_after=args.uses_after,
        request_streams=args.request_streams,
        max_in_flight=args.max_in_flight,
        startup_timeout=args.startup_seconds,
        drain_seconds=args.drain_seconds,
        log_level=args.log_level,  # shardnet --log-level: the head's and workers' logs, not only deploy's own
        metrics_port=args.metrics_port,
    )
    for folder, flag in ((args.log_dir, "--log-dir"), (args.workspace, "--workspace")):
        if folder is not None:  # made here to name the flag (Deployment's own error names its parameter)
            make_folder(folder, flag, writable=flag == "--workspace")
    return await deployment.__aenter__()


def _serve(args: argparse.Namespace, deployment: Deployment, stop: threading.Event) -> int:
    """Serve the started ``deployment`` until a stop signal sets ``stop``, then stop it; deploy's exit code, from
    how the stop went."""
    print(deployment.table())
    kept = "kept after exit" if args.log_dir else "removed on exit; --log-dir DIR keeps them"
    print(f"logs: {deployment.log_dir}/{args.name}-ROLE.log, one per process ({kept})")
    kept = "kept after exit" if args.workspace or args.log_dir else "removed on exit; --workspace DIR keeps it"
    print(f"workspace of the Executors' state: {deployment.workspace} ({kept})")
    if deployment.made_control_token:  # a worker registered by hand needs it: --control-token-file PATH
        print(f"control token: {deployment.control_token_file} (ACTIVATE/DEACTIVATE need it: shardnet worker "
              "--control-token-file PATH; removed on exit; --control-token-file gives deploy your own)")
    ctrl_c = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # ignored in a background job: no use naming it
    print(f"\n{args.name} serves on {deployment.address} ({'Ctrl-C' if ctrl_c else 'SIGTERM'} stops it)", flush=True)
    exposure = exposure_warning(args.host)
    if exposure:
        print(exposure, flush=True)  # the head logs it to its file, which nobody reads while it serves
    reported: set[int] = set()  # pids of exits already warned about under --no-restart
    while not stop.wait(REVIVE_INTERVAL):
        if args.restart:
            deployment.revive(wait=False)  # never blocks: SIGTERM is heard within a second
        elif _warn_exited(deployment, reported):
            break  # its head exited: nothing serves, and a supervisor must see deploy end
    if not args.restart:
        _warn_exited(deployment, reported)  # one that exited since the last look
    # on SIGTERM as on Ctrl-C: the drain may take a few seconds, which a second Ctrl-C cuts short
    forced = threading.Event()

    def stop_at_once(*_: Any) -> None:
        forced.set()
        deployment.kill()

    if ctrl_c:  # a background job's stays ignored to its end
        signal.signal(signal.SIGINT, stop_at_once)

    def warn_failed(failed: list[ShardnetProcess]) -> None:
        if forced.is_set():  # the user's second Ctrl-C killed these: no failure of theirs to quote, one by one
            failed = [process for process in failed if process.popen.returncode != -signal.SIGKILL]
        _warn_failed_at_stop(failed)

    print("stopping... (Ctrl-C again stops them at once)" if ctrl_c else "stopping...", flush=True)
    deployment.stop(on_failed=warn_failed)
    if forced.is_set():
        print(f"{args.name}: the stop was cut short by the second Ctrl-C: every process killed at once; "
              f"{_left_behind(args)}", flush=True)
        return 130
    if reported:  # under --no-restart: what exited on its own is a failure for whoever runs deploy
        print(f"{args.name}: stopped after {len(reported)} process(es) exited on their own (--no-restart; see the "
              f"warnings above); {_left_behind(args)}", flush=True)
        return 1
    if deployment.killed_at_stop:  # their drain, or an Executor's close() saving its state, was cut short
        print(f"{args.name}: stopped, but {', '.join(deployment.killed_at_stop)} did not stop in time and had to be "
              f"killed (see the warnings above); {_left_behind(args)}", flush=True)
        return 1
    if deployment.failed_at_stop:  # a close() that did not return in time, a stop cut short: their logs say
        print(f"{args.name}: stopped, but {', '.join(deployment.failed_at_stop)} did not stop cleanly (see the "
              f"warnings above); {_left_behind(args)}", flush=True)
        return 1
    print(f"{args.name}: every process drained and stopped; {_left_behind(args)}", flush=True)
    return 0


def _stopped_while_starting(args: argparse.Namespace, signum: int) -> int:
    """Say, in one line, that the stop signal ``signum`` ended the start before
    the deployment served; its exit code, 128 + the signal's number (SIGTERM 143, SIGHUP 129, Ctrl-C 130), as
    a shell reports a process a signal ended: a supervisor sees a stop, not a failure or a clean exit."""
    print(f"{args.name}: stopped by {signal.Signals(signum).name} while starting: it did not start, and every "
          f"process it had launched is stopped; {_left_behind(args)}", file=sys.stderr, flush=True)
    return 128 + signum


def exposure_warning(host: str) -> str:
    """A warning when ``host`` lets other machines reach the head's membership calls, else "": they always want
    a control token (deploy makes one when given none), which crosses the network in cleartext."""
    if host_is_loopback(host):
        return ""
    return f"warning: --host {host}: the control token crosses the network in cleartext (deploy serves no TLS)"


def _left_behind(args: argparse.Namespace) -> str:
    """What of a stopped deploy is kept on disk, in a few words."""
    kept = []
    if args.log_dir:
        kept.append(f"logs in {args.log_dir}")
    if args.workspace:
        kept.append(f"workspace in {args.workspace}")
    return f"kept: {', '.join(kept)}" if kept else "its temporary folders are removed"


def _warn_exited(deployment: Deployment, reported: set[int]) -> bool:
    """Under --no-restart, warn once about each process that exited (revive() says so when it restarts them);
    whether the head is among them."""
    for process in deployment.processes:
        if process.popen is None or process.alive or process.pid in reported:
            continue
        reported.add(process.pid)
        logger.warning("%s (pid %s) %s; not restarted (--no-restart)%s. Its log: %s", process.role, process.pid,
                       process.exit_description(), _consequence(deployment, process),
                       process.log_reference(KEEPS_LOGS))
    return deployment.head is not None and deployment.head.pid in reported


def _warn_failed_at_stop(failed: list[ShardnetProcess]) -> None:
    """Warn about each process that exited at the stop with a code other than 0, quoting its log's last lines
    while a temporary log folder still holds them, as ``_warn_exited`` does."""
    for process in failed:
        logger.warning("%s (pid %s) %s at its stop. Its log: %s", process.role, process.pid,
                       process.exit_description(), process.log_reference(KEEPS_LOGS))


def _consequence(deployment: Deployment, process: ShardnetProcess) -> str:
    """What the exit of ``process`` leaves the deployment, in a few words."""
    if process is deployment.head:
        return f": nothing answers on {deployment.head.address} any more, so deploy stops"
    if process in deployment.extras.values():
        return ": requests fail until deploy is started again"
    return ""
