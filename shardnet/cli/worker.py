"""``shardnet worker``: serve an Executor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import shardnet

from shardnet.cli.options import (
    check_visible_name,
    INT32_MAX,
    add_client_tls_arguments,
    add_server_arguments,
    add_uses_metas_argument,
    check_loop,
    client_tls,
    flag_address,
    json_object,
    make_folder,
    positive_seconds,
    run_in_loop,
    server_config,
    uses_metas_name,
    whole_number,
)
from shardnet.cli.stopping import DRAIN_CUT_EXIT, end_loading_on_stop_signals, exit_leaving_stuck_handlers
from shardnet.errors import ConfigurationError, ShardnetError
from shardnet.networking.addresses import UNIX_SCHEME, entity_address, parse_address
from shardnet.runtimes.executor import (
    EXECUTOR_PATH_VARIABLE,
    create_executor,
    default_workspace,
    former_workspace,
    load_executor_class,
    shard_folder,
)
from shardnet.runtimes.head import IMPLIED_LEASE_FACTOR, MAX_RENEWAL_INTERVAL
from shardnet.runtimes.listening import check_can_listen
from shardnet.runtimes.worker import MIN_REGISTER_INTERVAL, SHORTEST_INTERVAL_WHY, Worker

REGISTER_INTERVAL = 2.0  # seconds between a worker's ACTIVATEs to its --head, unless --register-interval says
logger = logging.getLogger(__name__)

# frames of files here are shardnet's own, left out of the traceback of an Executor's failed __init__
SHARDNET_FILES = os.path.dirname(os.path.abspath(shardnet.__file__)) + os.sep
# characters of an Executor's __init__ exception its one-line error quotes (its traceback ends with all of it)
MAX_RAISED_CHARS = 1000

# why a longer --register-interval is refused: the head would not wait for its renewals
LONGEST_INTERVAL = (
    f" (a head counts at most {MAX_RENEWAL_INTERVAL:g} s of the interval a worker announces and leases it for "
    f"{IMPLIED_LEASE_FACTOR} times that: a worker renewing less often may be dropped between its renewals)"
)


def _register_interval(text: str) -> float:
    """``--register-interval``: positive seconds from MIN_REGISTER_INTERVAL to MAX_RENEWAL_INTERVAL."""
    seconds = positive_seconds("register interval", most=MAX_RENEWAL_INTERVAL, why=LONGEST_INTERVAL)(text)
    if seconds < MIN_REGISTER_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"register interval must be at least {MIN_REGISTER_INTERVAL:g} seconds{SHORTEST_INTERVAL_WHY}, got {text!r}"
        )
    return seconds


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="serve an Executor")
    parser.add_argument("--uses", required=True, help="MODULE:CLASS or FILE.py:CLASS of a shardnet.Executor")
    parser.add_argument(
        "--uses-with", default="{}", help="JSON keyword arguments for the Executor, or @FILE holding them"
    )
    parser.add_argument("--head", help="HOST:PORT of a head to register with (ACTIVATE) and leave on stop")
    parser.add_argument(
        "--shard-id", type=whole_number("shard id", 0, INT32_MAX, " (a protobuf int32)"), default=0,
        help="shard this worker serves (default: %(default)s)",
    )
    parser.add_argument(
        "--register-interval",
        type=_register_interval,
        metavar="SECONDS",
        default=None,
        help=f"seconds between ACTIVATE refreshes to --head, from {MIN_REGISTER_INTERVAL:g} to "
             f"{MAX_RENEWAL_INTERVAL:g}; a head without "
             f"--lease leases the worker for five times that (default: {REGISTER_INTERVAL:g})",
    )
    parser.add_argument(
        "--replica-id", type=whole_number("replica id", 0, INT32_MAX, " (a protobuf int32)"), default=0,
        help="replica number within its shard (default: %(default)s)",
    )
    for flag, what in (("--shards", "shards its deployment has"), ("--replicas", "replicas each shard has")):
        parser.add_argument(
            flag, type=whole_number(flag[2:], 1, INT32_MAX), default=None,
            help=f"{what}, for the Executor's runtime_args (default: 1)",
        )
    add_uses_metas_argument(parser)
    parser.add_argument("--workspace", help="folder the Executor may keep state in")
    parser.add_argument(
        "--name",
        help="name in errors and dict results, its first part in route entries, as Jina's (default: "
             "CLASS/shard-S/rep-R, distinct for each shard)",
    )
    parser.add_argument(
        "--threads", type=whole_number("threads", 1), default=1, help="threads for blocking handlers (default: 1)"
    )
    parser.add_argument(
        "--advertise-host",
        help="host the head should dial (default: the bound host; a wildcard bind such as 0.0.0.0 advertises "
             "127.0.0.1, which only a head on this machine can dial: a worker on another machine needs this)",
    )
    add_server_arguments(parser, default_port=0)
    add_client_tls_arguments(parser, prefix="head-")
    parser.set_defaults(handler=run, process_name=process_name)


def default_name(class_name: str, shard_id: int, replica_id: int) -> str:
    """A worker's name without ``--name``: ``CLASS/shard-S/rep-R``, distinct for each shard and replica."""
    return f"{class_name}/shard-{shard_id}/rep-{replica_id}"


def process_name(args: argparse.Namespace) -> str:
    """The worker's name in its log lines, from its flags alone (they begin before its Executor's class loads):
    ``--name``, else ``default_name`` of the class ``--uses`` names."""
    return args.name or default_name(args.uses.rpartition(":")[2].rpartition(".")[2], args.shard_id, args.replica_id)


def run(args: argparse.Namespace) -> int:
    if args.name is not None:
        check_visible_name(args.name, "--name")
    uses_with = json_object(args.uses_with, "--uses-with")
    name_in_metas = uses_metas_name(args.uses_metas)
    # every flag is checked before the Executor loads: a typo should not wait for a model to load, nor run its __init__
    loop = check_loop(args.loop)
    if args.head is not None:
        flag_address("--head", args.head)
    for number, count, what in ((args.shard_id, args.shards, "shard"), (args.replica_id, args.replicas, "replica")):
        if count is not None and number >= count:
            raise ConfigurationError(
                f"--{what}-id {number} is not among the {count} --{what}s (0 to {count - 1}) of the deployment"
            )
    if args.unix_socket and args.advertise_host:
        raise ConfigurationError(
            "give one of --unix-socket and --advertise-host: both say what the head dials (the socket, when given)"
        )
    if args.advertise_host is not None:  # the head would refuse it only once the Executor had loaded
        check_advertise_host(args.advertise_host)
    config = server_config(args)
    check_can_listen(config)
    head_tls = client_tls(args, prefix="head-")
    _refuse_head_flags_without_a_head(args)  # after their values' own checks, which say more
    if head_tls is not None:
        _refuse_tls_to_a_unix_head(args)
    token = config.control_token  # read once (a token given on the command line is warned of once)
    if os.getcwd() not in sys.path:  # as under `python -m`: MODULE:CLASS may name a module in this folder
        sys.path.insert(0, os.getcwd())
    if args.workspace:  # made here, as deploy makes it: an Executor should find its folder
        make_folder(args.workspace, "--workspace", writable=True)
    # a pod deleted while its model loads stops now, not at SIGKILL; a Deployment gone (kill -9) too
    loading = end_loading_on_stop_signals(args.parent_pid)
    search_path = os.environ[EXECUTOR_PATH_VARIABLE].split(os.pathsep) if EXECUTOR_PATH_VARIABLE in os.environ else []
    try:
        executor_class = load_executor_class(args.uses, search_path)
    except SystemExit as exc:  # the module's own code exited as it was imported: the exit said nothing of why,
        # and deploy quoted "(no output)"
        logger.error("--uses %r: importing its module raised %r: not served", args.uses, exc)
        raise
    except KeyboardInterrupt:  # Ctrl-C while a heavy module imports, or the module raised it
        logger.warning("--uses %r: interrupted while importing its module (Ctrl-C, or the module raised "
                       "KeyboardInterrupt): not served", args.uses)
        raise
    name = args.name or default_name(executor_class.__name__, args.shard_id, args.replica_id)
    runtime_args = {
        # without --shards, the fewest that hold this shard: an Executor must never see shard_id >= shards
        "shard_id": args.shard_id, "shards": args.shards or args.shard_id + 1, "replica_id": args.replica_id,
        "replicas": args.replicas or 1,
        # None when not given, as in Jina: the Executor's own (metas, __init__) then counts, else the cache
        "workspace": args.workspace, "name": name, "metas_name": name_in_metas,
    }
    workspace = args.workspace or default_workspace()  # where its folder is, but for an Executor choosing its own
    expected_name = name_in_metas or executor_class.__name__
    former = former_workspace(name, workspace, expected_name, args.shard_id)  # before its __init__ makes its own
    # what a launcher quotes when the load outlasts its startup time ("no output" named neither the class nor
    # where it was): its __init__ runs from here on
    logger.info("%s: loading the Executor (%s): its __init__ runs", name, executor_class.__name__)
    try:
        executor = create_executor(executor_class, runtime_args, **uses_with)
    except (KeyboardInterrupt, SystemExit) as exc:  # the exit (130, or its code) would say nothing of why
        logger.error("%s: the Executor's __init__ (%s) raised %r: not served", name, executor_class.__name__, exc,
                     exc_info=True)
        raise
    except ShardnetError:  # shardnet's own refusal (uses_with it cannot take): main() says it in a line
        raise
    except Exception as exc:  # one logged error, not Python's traceback through shardnet's own frames
        logger.error("%s: the Executor's __init__ (%s) raised %s: not served\n%s", name, executor_class.__name__,
                     traceback.format_exception_only(type(exc), exc)[-1].strip()[:MAX_RAISED_CHARS],
                     users_traceback(exc))
        return 1  # the code an uncaught exception exits with, as before
    if executor.metas.name != expected_name:  # named in its __init__ (metas= among its arguments): asked again
        former = former_workspace(name, workspace, executor.metas.name, args.shard_id)
    if former is not None:
        logger.warning(
            "%s: its state is kept in %s, named by its metas name as Jina names it, and a folder %s from an "
            "earlier shardnet (named by the deployment) is not read: move it there, or give --uses-metas "
            "'{\"name\": \"%s\"}' (Deployment(uses_metas=...)) to keep using it",
            name, shard_folder(workspace, executor.metas.name, args.shard_id), former, name.split("/", 1)[0],
        )
    worker = Worker(
        executor,
        config,
        threads=args.threads,
        head=args.head,
        shard_id=args.shard_id,
        control_token=token,
        head_tls=head_tls,
        advertise_host=args.advertise_host,
        register_interval=args.register_interval or REGISTER_INTERVAL,
        name=name,
    )
    loading.set()  # serving watches the parent from here on, and drains on a signal
    code = run_in_loop(worker.run(parent_pid=args.parent_pid, ready_fd=args.ready_fd), loop)
    if code == 0 and worker.close_abandoned:  # stopped, but what its close() was to save may not be saved
        code = 1
    elif code == 0 and worker.requests_cut:  # work it took, lost (not a thread whose caller had already left)
        code = DRAIN_CUT_EXIT
    return exit_leaving_stuck_handlers(code, worker.handlers_still_running(), close_left=worker.close_abandoned)


# flags that only a worker registering with a --head uses, and what each says
_REGISTRATION_FLAGS = (
    ("register_interval", "--register-interval", "says how often to renew a registration"),
    ("advertise_host", "--advertise-host", "says what a head dials for this worker, which only its registration tells"),
)
_HEAD_TLS_FLAGS = (
    ("head_root_ca", "--head-root-ca"), ("head_client_cert", "--head-client-cert"),
    ("head_client_key", "--head-client-key"), ("head_server_name", "--head-server-name"),
)


def _refuse_head_flags_without_a_head(args: argparse.Namespace) -> None:
    """Refuse, naming them, flags about the head given without ``--head``: there is no head to register with or
    dial, and they would be silently ignored while the worker served as if they applied."""
    if args.head is not None:
        return
    for attribute, flag, what in _REGISTRATION_FLAGS:
        if getattr(args, attribute) is not None:
            raise ConfigurationError(f"{flag} {what}: give --head as well")
    given = [flag for attribute, flag in _HEAD_TLS_FLAGS if getattr(args, attribute) is not None]
    if given:
        raise ConfigurationError(
            f"{', '.join(given)} {'say' if len(given) > 1 else 'says'} how to dial the head over TLS, to register "
            "with it: give --head as well"
        )


def _refuse_tls_to_a_unix_head(args: argparse.Namespace) -> None:
    """Refuse head TLS flags beside a ``--head unix:/...``, naming both: a Unix socket is plaintext, and the
    registration would refuse it only once the Executor had loaded, naming neither flag."""
    if args.head is None or parse_address(args.head).unix_path is None:
        return
    flags = (("--head-root-ca", args.head_root_ca), ("--head-client-cert", args.head_client_cert),
             ("--head-client-key", args.head_client_key))
    given = ", ".join(flag for flag, value in flags if value is not None)
    raise ConfigurationError(
        f"--head {args.head!r:.120} is a Unix socket, local and plaintext, and {given} would dial it over TLS: "
        f"drop {given}, or give the head's TCP address as --head"
    )


def check_advertise_host(host: str) -> None:
    """Refuse an ``--advertise-host`` no head could dial: a host name or IP address only (no port, no scheme)."""
    if host.startswith(UNIX_SCHEME):
        raise ConfigurationError(
            f"--advertise-host {host!r:.80}: a Unix socket is served and advertised with --unix-socket PATH"
        )
    try:
        parse_address(entity_address(host, 1))
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"--advertise-host {host!r:.80} is no host name or IP address a head could dial ({exc})"
        ) from None


def users_traceback(exc: BaseException) -> str:
    """``exc``'s traceback, its chained causes' too, without the frames of shardnet's own files: what an
    Executor's author can act on is where their code raised, not how shardnet came to call it (cli/main.py,
    cli/worker.py, executor.py took 18 lines of a crash's output)."""
    report = traceback.TracebackException.from_exception(exc)
    pending, seen = [report], set()
    while pending:  # the exception and those chained to it (``raise ... from``, or raised while handling)
        part = pending.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        users = [frame for frame in part.stack if not os.path.abspath(frame.filename).startswith(SHARDNET_FILES)]
        part.stack = traceback.StackSummary.from_list(users)
        pending += [chained for chained in (part.__cause__, part.__context__) if chained is not None]
    return "".join(report.format()).rstrip("\n")
