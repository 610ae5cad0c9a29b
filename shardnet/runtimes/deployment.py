"""``Deployment``: a head and shards x replicas of workers as local processes.

The head starts first; each worker registers with it (ACTIVATE) and keeps
its registration fresh, so a restarted worker or head finds its place
again. All of them run on this machine, so the workers register a Unix socket
and the head dials them without the TCP stack (``unix_sockets=False`` keeps
loopback TCP). Leaving the ``with`` block stops every process (SIGTERM, drain, then
SIGKILL if one hangs), also when the body raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import json
import logging
import operator
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Union, overload

import grpc

from shardnet.errors import (
    ConfigurationError, ExecutorError, ProcessError, ReplicaError, ShardnetError, replica_error_class,
)
from shardnet.networking import oneshot
from shardnet.networking.addresses import MAX_UNIX_PATH_BYTES, entity_address, parse_address
from shardnet.networking.balancing import check_balancer
from shardnet.networking.channels import TOKEN_VARIABLE, check_control_token, check_max_message_mb, message_size_options
from shardnet.networking.policies import check_count, check_flag, check_seconds, check_timeout
from shardnet.networking.polling import PollingMap
from shardnet.protocol.documents import Document, DocumentList
from shardnet.protocol.messages import DataRequest
from shardnet.runtimes.executor import (
    EXECUTOR_PATH_VARIABLE,
    Executor,
    default_workspace,
    executor_reference,
    executor_search_path,
    metas_name,
    split_uses,
)
from shardnet.runtimes.head import MAX_RENEWAL_INTERVAL, MAX_WORKERS, MAY_HAVE_RUN_ERROR
from shardnet.runtimes.processes import LOG_LEVELS, ShardnetProcess, process_running, stop_all
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import AFTER_DRAIN_SECONDS, MIN_REGISTER_INTERVAL, SHORTEST_INTERVAL_WHY

logger = logging.getLogger(__name__)


def _socket_folder(shards: int, replicas: int, asked: Optional[bool]) -> Optional[tempfile.TemporaryDirectory]:
    """A fresh folder for the workers' sockets, short enough for the longest socket path (at most 107 bytes): in
    the temporary directory, else in /tmp (a long TMPDIR, as some CI runners and sandboxes set, made every worker
    refuse its --unix-socket and the deployment fail to start). None when neither has room: the workers are then
    dialled over loopback TCP, unless ``asked`` (unix_sockets=True) insists, which is refused saying why."""
    longest = len(f"/sn-{'x' * 8}/w{shards - 1}-{replicas - 1}.sock")  # mkdtemp's 8 random characters
    tried = []
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        if len(os.fsencode(base)) + longest <= MAX_UNIX_PATH_BYTES and os.access(base, os.W_OK | os.X_OK):
            return tempfile.TemporaryDirectory(prefix="sn-", dir=base, ignore_cleanup_errors=True)
        tried.append(base)
    why = (
        f"no writable folder short enough for the workers' Unix sockets (at most {MAX_UNIX_PATH_BYTES} bytes) "
        f"in {tried}"
    )
    if asked:
        raise ConfigurationError(f"unix_sockets=True: {why}; set TMPDIR to a shorter folder")
    logger.info("%s: the head dials its workers over loopback TCP", why)
    return None


def _removed_by_the_run(folder: Optional[tempfile.TemporaryDirectory]) -> Optional[tempfile.TemporaryDirectory]:
    """``folder``, its own removal at interpreter exit taken off: the run's finalizer removes it, in the process
    that made it only (a fork inherits the finalizer too)."""
    finalizer = getattr(folder, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()
    return folder


def _end_run(owner: int, processes: list[ShardnetProcess], folders: list[tempfile.TemporaryDirectory]) -> None:
    """What a Deployment dropped without stop(), or left at interpreter exit, leaves: its processes stopped and its
    folders removed, by the process that started them only. A fork of it (os.fork, a gunicorn worker of a
    --preload app) ran this at its own exit and removed its parent's workers' sockets, logs and control token."""
    if os.getpid() != owner:
        return
    stop_all(processes, 5.0)
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.cleanup()


ExecutorSpec = Union[type[Executor], str]

# set in the environment of every process a Deployment launches
LAUNCHED_BY_DEPLOYMENT = "SHARDNET_LAUNCHED_BY_DEPLOYMENT"
# seconds a process may take to serve (loading its Executor) before a start fails or a restart is stopped: a
# model may take minutes to load; as `k8s render --startup-seconds` (Jina's timeout_ready: 10 minutes)
DEFAULT_STARTUP_TIMEOUT = 180.0
DEFAULT_DRAIN_SECONDS = 10.0  # each process's --drain-seconds unless drain_seconds says otherwise
# what a start that timed out says: how to allow longer
LONGER_STARTUP = "a slow Executor may need longer: shardnet deploy --startup-seconds, Deployment(startup_timeout=)"


def _keep_port(process: ShardnetProcess) -> None:
    """Launch the head or a uses_before/after again on the port it served on, where the others look for it, and
    its metrics on theirs, where a scraper looks for them."""
    for address, flag in ((process.address, "--port"), (process.metrics_address, "--metrics-port")):
        if address is not None:
            process.arguments[process.arguments.index(flag) + 1] = address.rsplit(":", 1)[1]


def _check_uses(uses: Any, what: str) -> None:
    if not (isinstance(uses, str) or (isinstance(uses, type) and issubclass(uses, Executor))):
        raise ConfigurationError(f"{what} must be an Executor subclass or 'MODULE:CLASS' text, got {uses!r}")


def _reference(uses: ExecutorSpec, what: str = "uses") -> str:
    """The --uses text for ``uses``; text that is no MODULE:CLASS or FILE.py:CLASS (a YAML config, a hub
    address) is refused here rather than by every worker."""
    _check_uses(uses, what)
    if not isinstance(uses, str):
        return executor_reference(uses)
    split_uses(uses, what)
    return uses


# a --uses-with longer than this goes in a file: Linux caps each argument of a command line at 128 KiB
_LONGEST_USES_WITH_ARGUMENT = 32 * 1024


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")  # a folder and a log file are named after it


def _check_arguments(
    shards: Any, replicas: Any, name: Any, balancer: str, register_interval: float, startup_timeout: float
) -> None:
    """Refuse what would only fail later, in a child process or a temporary path, with a murkier message."""
    for what, count in (("shards", shards), ("replicas", replicas)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"a deployment needs at least 1 shard and 1 replica: {what}={count!r}")
    if shards * replicas > MAX_WORKERS:  # its head would refuse the workers past them, or the shards at start
        raise ConfigurationError(
            f"shards={shards} x replicas={replicas} = {shards * replicas} workers, more than the {MAX_WORKERS} a "
            "head holds"
        )
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"deployment name {name!r:.120}: up to 100 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit"
        )
    check_balancer(balancer)
    for what, seconds in (("register_interval", register_interval), ("startup_timeout", startup_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):  # "5" raised a bare TypeError
            raise ConfigurationError(f"{what} must be a number of seconds, got {seconds!r:.120}")
    if not register_interval > 0 or not startup_timeout > 0:
        raise ConfigurationError("register_interval and startup_timeout must be positive seconds")
    if register_interval < MIN_REGISTER_INTERVAL:  # the workers would refuse it (worker --register-interval)
        raise ConfigurationError(
            f"register_interval must be at least {MIN_REGISTER_INTERVAL:g} seconds{SHORTEST_INTERVAL_WHY}, "
            f"got {register_interval!r}"
        )
    if register_interval > MAX_RENEWAL_INTERVAL:  # the workers would refuse it (worker --register-interval)
        raise ConfigurationError(
            f"register_interval must be at most {MAX_RENEWAL_INTERVAL:g} seconds (a head counts no more of it), "
            f"got {register_interval!r}"
        )


def _check_folder(folder: Any, what: str) -> None:
    """Refuse a ``log_dir`` or ``workspace`` that names no folder: not a path (an int crashed in ``Path``), or
    empty (a variable unset where it was expanded; an empty ``log_dir`` crashed the constructor with an
    AttributeError, an empty ``workspace`` was taken for none but still passed to the workers)."""
    if folder is None:
        return
    if not isinstance(folder, (str, os.PathLike)) or not isinstance(os.fspath(folder), str):
        raise ConfigurationError(f"{what} must be a folder's path (text), got {folder!r:.120}")
    if not os.fspath(folder):
        raise ConfigurationError(f"{what} is empty: give a folder, or None for the default")


def _checked_port(port: Any, what: str) -> int:
    """``port`` as an int, or ConfigurationError naming ``what``: a whole number (a numpy integer is one too)
    from 0 (a free one) to 65535."""
    try:
        whole = operator.index(port) if not isinstance(port, bool) else None
    except TypeError:
        whole = None
    if whole is None or not 0 <= whole <= 65535:
        raise ConfigurationError(f"{what} must be a whole number from 0 (a free one) to 65535, got {port!r}")
    return whole


def _check_serving(host: Any, port: Any, control_token: Any) -> None:
    """Refuse a host, port or control token the head (and the workers) would refuse only once started, as a
    ProcessError around their usage text; an empty token was worse: taken for none, an open head."""
    ServerConfig(host=host, port=_checked_port(port, "port"))  # the head's own rule for its --host
    if control_token is None and os.environ.get(TOKEN_VARIABLE) == "":  # what the processes inherit
        raise ConfigurationError(
            f"${TOKEN_VARIABLE} is empty, and the deployment takes it as its token: unset it to have one made, or "
            "give the token"
        )
    try:
        check_control_token(control_token)
    except ConfigurationError:
        raise ConfigurationError(
            "control_token must be None (one is made) or non-empty printable ASCII text (no newline, no accents, no "
            "space at either end): it travels as gRPC metadata; the value is not shown"
        ) from None
    if control_token is None:
        check_control_token(os.environ.get(TOKEN_VARIABLE) or None)  # what the deployment takes as its token


def _log_level_arguments(log_level: Any) -> list[str]:
    """The ``--log-level`` every child is launched with (``shardnet``'s own flag, before its subcommand): a level
    ``shardnet --log-level`` takes, refused here rather than by every child's usage text."""
    if log_level not in LOG_LEVELS:
        raise ConfigurationError(
            f"log_level must be one of {', '.join(LOG_LEVELS)} (how much the head and workers log), got {log_level!r}"
        )
    return ["--log-level", log_level]


def _uses_with_json(uses_with: Optional[Mapping[str, Any]]) -> str:
    if uses_with is not None and not isinstance(uses_with, Mapping):
        raise ConfigurationError(f"uses_with must be a mapping of keyword arguments, got {uses_with!r}")
    try:
        return json.dumps(dict(uses_with or {}))
    except (TypeError, ValueError) as exc:  # the workers get them as JSON on their command line
        raise ConfigurationError(f"uses_with must be JSON-like (it reaches the workers as JSON): {exc}") from None


class Deployment:
    """Run ``uses`` as ``shards`` x ``replicas`` worker processes behind one head.

    ``unix_sockets`` (default: where the platform has them) puts the head's hop
    to its workers on Unix sockets: a few per cent more ANY throughput than
    loopback TCP (the ``unix sockets`` row of ``benchmarks/head_overhead.py``).
    ``max_message_mb`` raises (or lowers) the 256 MB message limit of every
    process and of ``post`` at once. ``drain_seconds`` (default 10) is how long
    each process's requests in flight get to finish when it stops or restarts;
    a request still running then is cut, and the head may run it again on
    another replica of its shard. ``startup_timeout`` (default 180 s) is
    how long a process may take to serve, its Executor loading: longer fails
    the start, and a process started again (``revive``) is stopped and tried
    again. ``at_most_once`` has the head fail over only requests no replica
    took (``head --at-most-once``). ``timeout`` bounds each hop of a request at the head (uses_before,
    the shards, uses_after), as Jina's ``timeout_send`` bounds each send; a
    caller's shorter deadline wins. ``post`` adds no deadline of its own
    unless given one. ``uses_metas={"name": ...}`` names the Executor as
    Jina's does (executor-specific parameters, the workspace folder); by
    default it is its class's name.

    ``metrics_port`` (needs ``shardnet[metrics]``) has the head serve
    Prometheus metrics on that port (0: a free one), and every other process
    on a free port of its own; ``table()`` and each process's
    ``metrics_address`` say where. A restarted head or uses_before/after
    serves them where it did; a restarted worker on a new free port.

    Only a caller holding the control token may ACTIVATE or DEACTIVATE a
    worker at the head: ``control_token``, else ``$SHARDNET_CONTROL_TOKEN``,
    else one made with ``secrets`` (an open head let any local process take
    its traffic). The processes get it in ``control_token_file``, a file only
    this user reads, removed at stop: never on a command line or in an
    environment, which ps shows.

    >>> with Deployment(uses=MyExecutor, shards=2, replicas=2, polling="ALL") as dep:   # doctest: +SKIP
    ...     docs = dep.post("/index", [Document(text="hello")])
    """

    def __init__(
        self,
        uses: ExecutorSpec,
        shards: int = 1,
        replicas: int = 1,
        polling: Union[str, Mapping[str, str]] = "ANY",
        *,
        name: str = "executor",
        port: int = 0,
        host: str = "127.0.0.1",
        uses_with: Optional[Mapping[str, Any]] = None,
        uses_metas: Optional[Mapping[str, Any]] = None,
        uses_before: Optional[ExecutorSpec] = None,
        uses_after: Optional[ExecutorSpec] = None,
        balancer: str = "p2c_ewma",
        workspace: Optional[str] = None,
        control_token: Optional[str] = None,
        timeout: Optional[float] = None,
        attempt_timeout: Optional[float] = None,
        at_most_once: bool = False,
        register_interval: float = 1.0,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        log_dir: Optional[str] = None,
        unix_sockets: Optional[bool] = None,
        max_message_mb: Optional[float] = None,
        request_streams: bool = True,
        max_in_flight: Optional[int] = None,
        drain_seconds: Optional[float] = None,
        log_level: str = "INFO",
        metrics_port: Optional[int] = None,
    ):
        _check_arguments(shards, replicas, name, balancer, register_interval, startup_timeout)
        _check_serving(host, port, control_token)
        _check_folder(log_dir, "log_dir")
        _check_folder(workspace, "workspace")
        if metrics_port is not None:
            metrics_port = _checked_port(metrics_port, "metrics_port")
            if metrics_port and metrics_port == port:
                raise ConfigurationError(f"metrics_port ({metrics_port}) must differ from the head's port")
            importlib.import_module("shardnet.runtimes.metrics")  # refused now, naming the extra it needs
        self.metrics_port = metrics_port
        self.polling = PollingMap.parse(polling)
        self.name = name
        self.shards = shards
        self.replicas = replicas
        self.host = host
        self.startup_timeout = startup_timeout
        self._uses = _reference(uses)
        extras = {"uses_before": uses_before, "uses_after": uses_after}
        self._extras = {key: _reference(value, key) for key, value in extras.items() if value is not None}
        # classes given by name are imported by the workers as this process imported them: along its sys.path
        # and a MODULE:CLASS given as text along it too, as this process would import it
        classes = [value for value in (uses, uses_before, uses_after) if isinstance(value, type)]
        self._search_path = executor_search_path(*classes)
        self._uses_with = _uses_with_json(uses_with)
        name_in_metas = metas_name(uses_metas)  # refused here, not by every worker
        self._metas_arguments = ["--uses-metas", json.dumps({"name": name_in_metas})] if name_in_metas else []
        # a token of the user's own, else one of this deployment's (an open head let any local process take its
        # workers' place); the processes read it from control_token_file
        self._control_token = control_token or os.environ.get(TOKEN_VARIABLE) or secrets.token_urlsafe(32)
        self.made_control_token = control_token is None and not os.environ.get(TOKEN_VARIABLE)
        self._log_level_arguments = _log_level_arguments(log_level)
        self._register_interval = register_interval
        self._given_folders = (log_dir, workspace)
        self._head_options = ["--balancer", balancer, "--polling", self.polling.to_json(), "--shards", str(shards)]
        # workers renew their ACTIVATE every register_interval; one missing a few renewals is gone
        self._head_options += ["--lease", str(5 * register_interval)]
        for seconds, what in ((timeout, "timeout"), (attempt_timeout, "attempt_timeout")):
            check_timeout(seconds, what)  # refused here, not by the head process it would keep from starting
        if timeout is not None:
            self._head_options += ["--timeout", str(timeout)]
        if attempt_timeout is not None:
            self._head_options += ["--attempt-timeout", str(attempt_timeout)]
        check_flag(at_most_once, "at_most_once")
        if at_most_once:  # the head fails a request a replica may have run instead of running it again
            self._head_options.append("--at-most-once")
        check_flag(request_streams, "request_streams")
        if not request_streams:  # the head then calls its workers unary, a call per request
            self._head_options.append("--no-request-streams")
        if max_in_flight is not None:
            check_count(max_in_flight, "max_in_flight", 1)
            self._head_options += ["--max-in-flight", str(max_in_flight)]
        self._head_port = port
        # one message size limit for every process and for post(): a head passes its workers' answers on;
        # workers and uses_before/after take these arguments, the head its own copies of them
        self._every_process_arguments, self._post_options = [], None
        if max_message_mb is not None:
            megabytes = check_max_message_mb(max_message_mb)
            self._every_process_arguments = ["--max-message-mb", str(megabytes)]
            self._post_options = message_size_options(int(megabytes * 2**20))
            self._head_options += self._every_process_arguments
        # each process's --drain-seconds; a stop gives the head's drain, then its workers', time, and each its way
        # out after (AFTER_DRAIN_SECONDS: its Executor's close(), its threads, its exit); a restart one drain and that
        if drain_seconds is not None:
            check_seconds(drain_seconds, "drain_seconds", zero=True)
            self._every_process_arguments += ["--drain-seconds", str(drain_seconds)]
            self._head_options += self._every_process_arguments[-2:]
        if metrics_port is not None:  # the head's where asked, every other process's on a free port
            self._head_options += ["--metrics-port", str(metrics_port)]
            self._every_process_arguments += ["--metrics-port", "0"]
        drain = DEFAULT_DRAIN_SECONDS if drain_seconds is None else drain_seconds
        self._stop_timeout, self._restart_timeout = 2 * drain + AFTER_DRAIN_SECONDS, drain + AFTER_DRAIN_SECONDS
        if unix_sockets is not None:
            check_flag(unix_sockets, "unix_sockets")
        self._unix_sockets = hasattr(socket, "AF_UNIX") if unix_sockets is None else unix_sockets
        self._unix_sockets_asked = unix_sockets  # True insists: no room for a socket path is then refused
        # revive() launches, stop() stops, start() makes a run: one at a time, whatever the threads (taken with
        # _holding_launch_lock); one lock for every run, so that a stop() finishing the last run (removing its
        # folders) and a start() making the next one (_prepare_run) cannot interleave
        self._launching = threading.RLock()
        # the processes a restart_worker() or restart_head() is restarting, or revive() launching again (their
        # roles), under _restart_claims: a second restart of one of them meanwhile failed with "still running: stop
        # it before launching it again", and a revive() took a restart's stop for an exit and launched it too
        self._restarting: dict[str, str] = {}  # role -> who: "another call" (a restart), or "revive()"
        self._restart_claims = threading.Lock()
        self._launch_lock_depth = 0  # how many times the thread holding _launching took it: 2 in a signal handler
        self._start_under_way = False  # a start() (of any thread) is between its check and its end
        self._prepare_run()

    def _prepare_run(self) -> None:
        """What one run owns, made anew for each start after a stop: its folders and a finalizer for its processes."""
        log_dir, workspace = self._given_folders
        # a folder of its own, short (a socket path holds at most 107 bytes, a log_dir may be longer); first, as it
        # may be refused (no room for one), before the folders below are made
        sockets = _socket_folder(self.shards, self.replicas, self._unix_sockets_asked) if self._unix_sockets else None
        # each removed at stop whatever became of it meanwhile: one a /tmp cleaner replaced with a link (another
        # process's) is left as it is, without an OSError that would leave the folders after it behind
        self._tmp = _removed_by_the_run(
            tempfile.TemporaryDirectory(prefix=f"shardnet-{self.name}-", ignore_cleanup_errors=True)
            if log_dir is None else None
        )
        self.log_dir = Path(log_dir or self._tmp.name)
        # with none given, the cache folder, as a worker's and as Jina's: an index written in a with block is kept
        self.workspace = Path(workspace or default_workspace()).absolute()
        # passed to the workers only when given (or the cache folder cannot be used): a worker given none has the
        # cache folder too, where an Executor's own workspace= (uses_with) wins, as under Jina's Deployment
        self._pass_workspace = workspace is not None
        # a folder only this user reads (made 0700), removed at stop whatever log_dir is: the control token's
        self._secrets = _removed_by_the_run(
            tempfile.TemporaryDirectory(prefix="sn-secret-", ignore_cleanup_errors=True)
        )
        self.control_token_file = Path(self._secrets.name) / "control-token"
        self._sockets = _removed_by_the_run(sockets)
        self.head: Optional[ShardnetProcess] = None
        self.extras: dict[str, ShardnetProcess] = {}
        self.workers: dict[tuple[int, int], ShardnetProcess] = {}
        self._spawned: list[ShardnetProcess] = []
        self._starting: set[ShardnetProcess] = set()  # launched again by revive(), not serving yet
        self._stopping = False
        self.killed_at_stop: list[str] = []  # roles the last stop() had to kill (they did not stop in time)
        self.failed_at_stop: list[str] = []  # those that exited on their own at the last stop(), not with code 0
        # the process this run is the run of: a fork of it (os.fork, a gunicorn worker of a --preload app) may
        # post() to it, and neither stops, restarts nor removes anything of it
        self._owner = os.getpid()
        # a Deployment dropped without stop() (or an interpreter exit) still stops its processes
        folders = [folder for folder in (self._tmp, self._secrets, self._sockets) if folder is not None]
        self._finalizer: Optional[weakref.finalize] = weakref.finalize(
            self, _end_run, self._owner, self._spawned, folders
        )

    # -- lifetime --------------------------------------------------------------------

    @property
    def processes(self) -> list[ShardnetProcess]:
        return [p for p in [self.head, *self.extras.values(), *self.workers.values()] if p is not None]

    @property
    def address(self) -> str:
        return self._running_head().address

    def _running_head(self) -> ShardnetProcess:
        """The head process, or ProcessError when the deployment was not started (or was stopped)."""
        # a fork's head is its parent's child, which waitid cannot ask about (it said every process had exited)
        head = self.head
        alive = head is not None and (
            process_running(head.pid) if self._in_a_fork and head.pid is not None else head.alive
        )
        if not alive or self.head.address is None:
            raise ProcessError(f"deployment {self.name!r} is not running")
        return self.head

    @property
    def _in_a_fork(self) -> bool:
        """Whether this process is a fork of the one this run belongs to."""
        return self._owner != os.getpid()

    def _check_owned(self, what: str) -> None:
        """Refuse ``what`` in a fork of the process running this deployment: its processes are that one's."""
        if self._in_a_fork and self._spawned and self._finalizer is not None:  # its run not stopped
            raise ProcessError(
                f"deployment {self.name!r}: {what} in process {os.getpid()}, a fork of process {self._owner} that "
                "started it: only that process may"
            )

    def _child_env(self) -> dict[str, str]:
        """This process's environment, less the control token (the children read it from its file: ps e shows an
        environment), plus what tells the children whose they are and where the Executors' classes are."""
        env = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
        env[LAUNCHED_BY_DEPLOYMENT] = self.name
        if self._search_path:
            env[EXECUTOR_PATH_VARIABLE] = os.pathsep.join(self._search_path)
        return env

    def _launch(self, role: str, arguments: list[str]) -> ShardnetProcess:
        # named after the deployment too: deployments may share a log folder (--log-dir /var/log/shardnet); the
        # log level leads every child's command line, which a restart launches again as it is
        log_path = self.log_dir / f"{self.name}-{role}.log"
        arguments = [*arguments, "--control-token-file", str(self.control_token_file)]
        process = ShardnetProcess(role, self._log_level_arguments + arguments, log_path, env=self._child_env(),
                                  log_is_temporary=self._tmp is not None)
        # a stop() from another thread (a cancelled ``async with``) ends the start here
        if not self._launch_unless_stopping(process, first=True):
            raise ProcessError(f"deployment {self.name!r} was stopped while it started")
        return process

    def _launch_unless_stopping(self, process: ShardnetProcess, first: bool = False) -> bool:
        """Launch ``process`` (``first``: a new one of this run, which stop() must know of) unless a stop() from
        another thread is under way or done; whether it was launched."""
        with self._holding_launch_lock():
            if self._stopping:
                return False
            if first:
                self._spawned.append(process)
            # a cleaner may have removed it meanwhile; made only here, under the lock, where a stop() cannot
            # have removed it after (a revive racing a stop left the temporary folder behind)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._write_uses_with()
            self._write_control_token()
            process.launch()
            return True

    def start(self) -> "Deployment":
        """Start head, uses_before/after and workers; return when every replica is registered."""
        return self._start(abandoned=threading.Event())

    def _start(self, abandoned: threading.Event) -> "Deployment":
        """``start()``, which launches nothing once ``abandoned`` is set (a cancelled ``async with``, whose stop()
        may come before this thread even began)."""
        if os.environ.get(LAUNCHED_BY_DEPLOYMENT):
            # a worker importing a script that starts a Deployment at import time would start one per worker,
            # each of whose workers would start another
            raise ConfigurationError(
                f"a Deployment was started inside a process that Deployment "
                f"{os.environ[LAUNCHED_BY_DEPLOYMENT]!r} launched: when uses= names a class of a script, "
                "start the Deployment under `if __name__ == \"__main__\":`"
            )
        self._check_owned("start()")
        if self._in_a_fork:  # a fork's first start: a run of its own, not its parent's folders and locks
            self._launching, self._restart_claims = threading.RLock(), threading.Lock()  # a thread gone may hold them
            self._launch_lock_depth, self._start_under_way, self._restarting = 0, False, {}
            self._prepare_run()
        # a stop() in another thread comes before (nothing starts) or after (it cleans up); under the lock, as a
        # stop() of the previous run (or of this one, not started yet) removes its folders under it
        with self._holding_launch_lock():
            # another thread's start() under way, which has launched nothing yet (it launches outside this lock):
            # both passed the check below, launched two heads and two sets of workers on the same sockets, and
            # failed, one with "cannot listen on unix:...", the other "stopped while it started"
            if self._start_under_way:
                raise ProcessError(
                    f"deployment {self.name!r} is being started by another thread: stop() it before starting it again"
                )
            if self._finalizer is None:  # started again after a stop: a fresh run
                self._prepare_run()
            elif self._spawned:  # a second head and workers, or (on its sockets) a start failing, which stops the first
                raise ProcessError(f"deployment {self.name!r} is already running: stop() it before starting it again")
            self._start_under_way = True
        try:
            return self._start_claimed(abandoned)
        finally:
            self._start_under_way = False

    def _start_claimed(self, abandoned: threading.Event) -> "Deployment":
        """``_start()`` once this thread is the one starting the deployment."""
        with self._holding_launch_lock():
            refused = self._stopping or abandoned.is_set()
            if not refused:
                self._make_folders()
        if refused:
            self.stop()  # the folders of the run made above go too
            raise ProcessError(f"deployment {self.name!r} was stopped before it started")
        try:
            extra_args = []
            for key, uses in self._extras.items():
                arguments = ["worker", "--uses", uses, "--host", self.host, "--port", "0"]
                arguments += self._every_process_arguments
                arguments += self._workspace_arguments()  # as Jina gives them: WORKSPACE/CLASS/0
                # named as Jina names it, which is also the key of its dict results in __results__
                process = self._launch(key, arguments + ["--name", f"{self.name}/{key}-0"])
                self.extras[key] = process
                address = process.wait_ready(self.startup_timeout, LONGER_STARTUP)
                extra_args += [f"--{key.replace('_', '-')}", address]
            self.head = self._launch(
                "head",
                ["head", "--deployment", self.name, "--host", self.host, "--port", str(self._head_port)]
                + self._head_options
                + extra_args,
            )
            self.head.wait_ready(self.startup_timeout, LONGER_STARTUP)
            for shard in range(self.shards):
                for replica in range(self.replicas):
                    self.workers[(shard, replica)] = self._launch_worker(shard, replica)
            self.wait_registered()
            self._stop_if_asked_meanwhile()
        except ShardnetError as exc:  # which deployment, and where its logs went, beside the process's words
            # a stop() of its own (another thread's, a signal handler's) ended what was starting: no failure to
            # blame on a SIGTERM that stop() sent itself
            stopped = self._stopping
            self.stop()
            if stopped:
                raise ProcessError(
                    f"deployment {self.name!r} was stopped while it started (stop() called during start())"
                ) from None
            if not isinstance(exc, ProcessError):
                raise
            given_log_dir = self._given_folders[0]
            kept = f"its logs are in {given_log_dir}" if given_log_dir else (
                "its temporary logs are removed: log_dir=..., deploy --log-dir, keeps them")
            raise ProcessError(f"deployment {self.name!r} did not start ({kept}): {exc}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def _make_folders(self) -> None:
        for folder, what in ((self.log_dir, "log_dir"), (self.workspace, "workspace")):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if what == "workspace" and not os.access(folder, os.W_OK | os.X_OK):  # there, but read-only
                    raise OSError(errno.EACCES, "not writable")
            except OSError as exc:
                if what == "workspace" and not self._given_folders[1]:  # the cache folder, which HOME may not allow
                    self.workspace = self.log_dir / "workspace"
                    # for an Executor with no folder of its own: one given its own keeps it (a first version
                    # passed this one over it, and the state went to a folder removed at stop)
                    self._pass_workspace = not json.loads(self._uses_with).get("workspace")
                    logger.warning(
                        "deployment %r: the cache folder %s cannot be used (%s): the Executors' state goes to %s, "
                        "%s; give workspace=... to keep it", self.name, folder, exc.strerror, self.workspace,
                        "kept" if self._given_folders[0] else "removed at stop",
                    )
                    self._make_folders()
                    return
                raise ConfigurationError(
                    f"deployment {self.name!r}: cannot use {what} {str(folder)!r}: {exc.strerror}"
                ) from None

    def _workspace_arguments(self) -> list[str]:
        return ["--workspace", str(self.workspace)] if self._pass_workspace else []

    def _launch_worker(self, shard: int, replica: int) -> ShardnetProcess:
        # named as Jina names its replicas, so every shard's dict results keep their own key under ALL
        name = f"{self.name}/shard-{shard}/rep-{replica}" if self.shards > 1 else f"{self.name}/rep-{replica}"
        return self._launch(
            f"worker-{shard}-{replica}",
            [
                "worker",
                "--uses", self._uses,
                "--uses-with", self._uses_with_argument(),
                "--host", self.host,
                "--port", "0",
                "--shard-id", str(shard),
                "--replica-id", str(replica),
                "--shards", str(self.shards),
                "--replicas", str(self.replicas),
                "--name", name,
                *self._workspace_arguments(),
                *self._metas_arguments,
                "--head", self.address,
                "--register-interval", str(self._register_interval),
                *self._every_process_arguments,
                *(["--unix-socket", self._socket_path(shard, replica)] if self._sockets else []),
            ],
        )

    def _uses_with_file(self) -> Optional[Path]:
        """Where the workers read ``uses_with`` from when it is too long for a command line; None when it fits."""
        if len(self._uses_with.encode()) <= _LONGEST_USES_WITH_ARGUMENT:
            return None
        return self.log_dir / f"{self.name}-uses-with.json"

    def _uses_with_argument(self) -> str:
        """``uses_with`` as the workers' --uses-with: its JSON, or @FILE (written before each launch)."""
        path = self._uses_with_file()
        return self._uses_with if path is None else f"@{path}"

    def _write_uses_with(self) -> None:
        """Write the uses_with file before a launch, each time: a worker revived days later finds it even if a
        /tmp cleaner removed it meanwhile, and a worker reading it meanwhile sees a whole file (a rename)."""
        path = self._uses_with_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_file(path, self._uses_with)

    def _write_control_token(self) -> None:
        """Write the control token file before a launch, each time, as the uses_with file: a process revived
        after a /tmp cleaner removed it reads it still. Its folder and it are this user's only (0700, 0600)."""
        folder = self.control_token_file.parent
        with contextlib.suppress(FileExistsError):  # a link in its place, dangling (a cleaner's, another's): below
            folder.mkdir(mode=0o700, exist_ok=True)
        found = os.lstat(folder)  # made again by another user after a cleaner removed it: not written there
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
            raise ProcessError(f"deployment {self.name!r}: {folder} is no longer a folder only this user reads; "
                               "the control token is not written there")
        _replace_file(self.control_token_file, self._control_token + "\n")

    def _socket_path(self, shard: int, replica: int) -> str:
        return os.path.join(self._sockets.name, f"w{shard}-{replica}.sock")

    def _member_address(self, key: tuple[int, int], process: ShardnetProcess) -> Optional[str]:
        """What the head lists for a worker once it registered: its socket, or the address it printed ready."""
        if process.address is None or self._sockets is None:
            return process.address
        return f"unix:{self._socket_path(*key)}"

    def wait_registered(self, timeout: Optional[float] = None) -> None:
        """Block until the head lists every running worker (workers ready and ACTIVATEd)."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            for process in self.workers.values():
                if not process.alive:
                    raise ProcessError(f"{process.role} {process.exit_description()}:\n{process.tail()}")
            expected = {self._member_address(key, p) for key, p in self.workers.items() if p.address is not None}
            if len(expected) < len(self.workers):
                for process in self.workers.values():
                    if process.address is None:
                        process.wait_ready(max(0.1, deadline - time.monotonic()), LONGER_STARTUP)
                continue
            if expected <= set(self.members()):
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"head of {self.name!r} lists {self.members()}, expected {sorted(expected)}")
            time.sleep(0.02)

    def members(self, timeout: float = 2.0) -> list[str]:
        """The replica addresses the head routes to (its STATUS answer)."""
        # blocking, without a grpc.aio loop: revive() asks it at every look, often from a thread beside the
        # program's own loop, which a second one's poller race would fill with gRPC's BlockingIOError tracebacks
        reply = oneshot.send_control_blocking("STATUS", self.address, timeout=timeout)
        return [entity_address(entity.address, entity.port) for entity in reply.related_entities]

    def restart_worker(self, shard: int, replica: int) -> ShardnetProcess:
        """Stop one worker (drain, DEACTIVATE) and start it again; return when the head lists it.

        A worker that had died never sent DEACTIVATE: the head is told to forget
        it first, so that the new one, on the same socket, gets a fresh connection.
        """
        self._check_owned("restart_worker()")
        self._running_head()
        process = self.workers.get((shard, replica))
        if process is None:
            raise ConfigurationError(
                f"deployment {self.name!r} has no worker for shard {shard}, replica {replica} "
                f"(shards 0..{self.shards - 1}, replicas 0..{self.replicas - 1})"
            )
        with self._restarted(process):
            died = not process.alive
            member = self._member_address((shard, replica), process)
            process.stop(self._restart_timeout)
            if died and member is not None:
                self._forget(member, shard)
            self._launch_again(process)
            process.wait_ready(self.startup_timeout, LONGER_STARTUP)
            self._wait_listed((shard, replica), process)
        self._stop_if_asked_meanwhile()
        return process

    @contextlib.contextmanager
    def _restarted(self, process: ShardnetProcess) -> Iterator[None]:
        """Claim ``process`` for one restart at a time: another call restarting it meanwhile, or a revive()
        starting it again after an exit, is refused by name; a revive() leaves it to this restart (its stop is no
        exit to start it again from)."""
        with self._restart_claims:
            if process.role in self._restarting:
                raise ProcessError(
                    f"{process.role} is being restarted by {self._restarting[process.role]}: wait for it to return"
                )
            self._restarting[process.role] = "another call"
        self._starting.discard(process)  # a start of revive()'s under way: this restart's now
        try:
            yield
        finally:
            with self._restart_claims:
                self._restarting.pop(process.role, None)

    def _exited_by_itself(self, process: ShardnetProcess) -> bool:
        """Whether ``process`` is down and no restart claims it: one a restart stopped did not exit (asked under
        the claims' lock, which a restart takes before it stops anything)."""
        with self._restart_claims:
            return process.role not in self._restarting and not process.alive

    @contextlib.contextmanager
    def _revive_claim(self, process: ShardnetProcess) -> Iterator[bool]:
        """Claim ``process``, down and not being restarted, for revive() to launch it again; yields whether it
        did (a restart that comes meanwhile is refused by name, as a second restart is)."""
        with self._restart_claims:
            if process.role in self._restarting or process.alive:
                claimed = False
            else:
                self._restarting[process.role] = "revive(), after it exited"
                claimed = True
        try:
            yield claimed
        finally:
            if claimed:
                with self._restart_claims:
                    self._restarting.pop(process.role, None)

    def _wait_listed(self, key: tuple[int, int], process: ShardnetProcess) -> None:
        """Block until the head lists the worker ``key`` (``process``, ready), within the startup timeout: a
        restart waits for its own worker only, as another lying dead (revive's to restart) is no failure of it."""
        member = self._member_address(key, process)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            listed = self.members()
            if member in listed:
                return
            if not process.alive:
                raise ProcessError(f"{process.role} {process.exit_description()}:\n{process.tail()}")
            if time.monotonic() > deadline:
                raise ProcessError(f"head of {self.name!r} lists {listed}, not {process.role} at {member}")
            time.sleep(0.02)

    def _stop_if_asked_meanwhile(self) -> None:
        """Do the stop() a signal handler asked for while this thread held the launch lock (it could only mark
        it: ``_stopping``), now that the launch is over, and raise ProcessError: a start or restart that had
        launched its last process then returned as if nothing had happened, and the deployment served on, no
        longer revived, its stop lost. Nothing when no stop was asked or one ran already."""
        if self._stopping and self._finalizer is not None:
            self.stop()
            raise ProcessError(f"deployment {self.name!r} was stopped (stop() called while it launched a process)")

    def _launch_again(self, process: ShardnetProcess) -> None:
        """Launch ``process`` again, or ProcessError when a stop() from another thread is under way or done."""
        if not self._launch_unless_stopping(process):
            raise ProcessError(f"deployment {self.name!r} is stopping: {process.role} is not started again")

    def _forget(self, member: str, shard: int) -> None:
        """DEACTIVATE ``member`` (as ``members()`` lists it) at the head: a worker that died never said goodbye."""
        address, port = parse_address(member).entity()
        oneshot.send_control_blocking("DEACTIVATE", self.address, address, port, shard, token=self._control_token)

    def restart_head(self) -> ShardnetProcess:
        """Restart the head on the same port; workers re-register on their next refresh."""
        self._check_owned("restart_head()")
        head = self._running_head()
        with self._restarted(head):
            head.stop(self._restart_timeout)
            _keep_port(head)
            self._launch_again(head)
            head.wait_ready(self.startup_timeout, LONGER_STARTUP)
        # the running workers only, as restart_worker: one lying dead (revive's to restart) is no failure of this
        for key, process in self.workers.items():
            if process.alive and process.address is not None and process not in self._starting:
                try:
                    self._wait_listed(key, process)
                except ProcessError:
                    if process.alive or self._stopping:  # not listed in time, or a stop: this restart's failure
                        raise
                    # one that died while this waited lies dead like the others: revive's to restart
        self._stop_if_asked_meanwhile()
        return self.head

    def revive(self, wait: bool = True) -> list[str]:
        """Launch again every process of the running deployment that exited (a crash, an OOM kill, kill -9), each
        where it served before; return the roles that serve again since the last look.

        ``shardnet deploy`` looks every second with ``wait=False``: a start
        under way never holds up the next look (a head that dies while a worker
        is slow to start comes back at once). With ``wait`` this look waits, up
        to the startup timeout, for what it launched, and then for the head to
        list the workers again (those started again; every running one after
        the head was), so that a request sent next is routed.

        Each exit is logged once, with how it ended, and for a start that failed,
        that start's output. A process that keeps exiting soon after its launch
        waits longer each time (``ShardnetProcess.note_exit``); one that does
        not come up within the startup timeout is stopped, and counts as such an
        exit. Workers wait for the head: they register with it (the ones still
        running re-register with a restarted head on their own).
        """
        self._check_owned("revive()")
        if self._finalizer is None or not self._spawned:  # stopped, or never started: as restart_worker says
            raise ProcessError(f"deployment {self.name!r} is not running")
        revived = self._look(wait)
        if self._stopping and self._finalizer is not None:
            self.stop()  # asked by a signal handler during a launch of this look, which could only mark it
            return revived
        if not wait:
            return revived
        self._wait_routed(revived)
        return revived

    def _wait_routed(self, revived: list[str]) -> None:
        """Wait, up to the startup timeout, until the head lists each worker that serves again and, after the head
        itself served again, every running worker (they register with a new head on their next renewal): the
        deployment then answers as before. One that exits meanwhile is the next look's; one still not listed at
        the deadline is said."""
        head_again = "head" in revived
        waited = {key: process for key, process in self.workers.items()
                  if (head_again or process.role in revived) and process.address is not None
                  and process not in self._starting}
        deadline = time.monotonic() + self.startup_timeout
        while waited and not self._stopping:
            if self.head is None or not self.head.alive or self.head in self._starting:
                return  # no head to list them (it died again, or is in its back-off): the next look's
            try:
                listed = set(self.members())
            except ShardnetError:
                listed = set()
            waited = {key: process for key, process in waited.items()
                      if process.alive and self._member_address(key, process) not in listed}
            if not waited:
                return
            if time.monotonic() > deadline:
                logger.warning("head of %r does not list %s %gs after they serve again", self.name,
                               ", ".join(process.role for process in waited.values()), self.startup_timeout)
                return
            time.sleep(0.02)

    def _look(self, wait: bool) -> list[str]:
        """``revive()``'s one look: launch what is due, and with ``wait`` wait for what it launched."""
        revived = self._check_starting()
        now = time.monotonic()
        for process in self.processes:
            if self._stopping:  # a stop() in another thread: its exits are no news
                return revived
            if process.popen is not None and process.restart_at is None and self._exited_by_itself(process):
                self._note_exit(process, now)
        head_up = self.head is not None and self.head.alive and self.head not in self._starting
        listed: Optional[set[str]] = None  # the head's members, asked once per look, when a worker is due
        for process in self.processes:  # the head and uses_before/after first: workers need the head
            is_worker = process in self.workers.values()
            due = process.restart_at is not None and process.restart_at <= now and not process.alive
            if not due or (is_worker and not (head_up or process is self.head)):
                continue
            if is_worker and listed is None:
                listed = self._listed_members()
            with self._revive_claim(process) as claimed:
                if not claimed:  # a restart_worker() or restart_head() of another thread has it
                    continue
                self._relaunch(process, listed if is_worker else None)
            head_up = head_up or process is self.head
        deadline = time.monotonic() + self.startup_timeout
        # a snapshot: a restart_worker()/restart_head() of another thread takes a process out of _starting
        # (_restarted), and a set changing size under a generator's iteration raises RuntimeError
        while wait and any(process.alive for process in list(self._starting)) and time.monotonic() < deadline:
            if self._stopping:  # a stop() in another thread ended what this look launched: not an exit to tell
                return revived
            time.sleep(0.02)
            revived += self._check_starting()
        for process in list(self._starting):  # a start that failed already: said now, not at the next look
            # not one a restart took over meanwhile: its stop is no exit (it would get a stale restart_at)
            if process in self._starting and self._exited_by_itself(process) and not self._stopping:
                self._note_exit(process, time.monotonic())
        return revived

    def _note_exit(self, process: ShardnetProcess, now: float) -> None:
        delay = process.note_exit(now)
        again = f"starting it again in {delay:g}s ({process.quick_exits} quick exits in a row)" if delay else "starting it again"
        if process in self._starting:  # a start that failed: its own output says why
            self._starting.discard(process)
            logger.error("%s %s before it was ready; %s. Its output:\n%s", process.role, process.exit_description(),
                         again, process.failure_output())
        else:
            logger.warning("%s (pid %s) %s; %s", process.role, process.pid, process.exit_description(), again)

    def _listed_members(self) -> set[str]:
        """What the head lists, asked briefly (a look must not hang on a head that does not answer); nothing
        when it is starting or silent: a new or silent head has no stale connection to forget either."""
        if self.head is None or not self.head.alive or self.head in self._starting:
            return set()
        try:
            return set(self.members(timeout=0.5))
        except ShardnetError as exc:
            logger.info("the head did not say whom it lists (%s): restarting workers without DEACTIVATE first", exc)
            return set()

    def _relaunch(self, process: ShardnetProcess, listed: Optional[set[str]]) -> None:
        """Launch an exited process where it served: the head and uses_before/after on their ports, a worker
        (``listed``: the head's members) on its socket, forgotten at the head first if it is still listed (it
        died without DEACTIVATE: dialled afresh)."""
        try:
            if listed is not None:
                key = self._worker_key(process)
                member = self._member_address(key, process)
                if member in listed:
                    try:
                        self._forget(member, key[0])
                    except ShardnetError as exc:  # it is launched anyway: serving beats a fresh connection
                        logger.info("%s: the head did not forget %s: %s", process.role, member, exc)
            else:
                _keep_port(process)
            if not self._launch_unless_stopping(process):
                return
        except Exception as exc:  # the OS refused (no log folder, no file descriptors): try again later
            process.ready_at = None  # a start that failed never served: a quick exit, whatever ran before
            delay = process.note_exit(time.monotonic())
            logger.error("%s could not be started: %s; trying again in %gs", process.role, exc, delay)
            return
        self._starting.add(process)

    def _check_starting(self) -> list[str]:
        """The roles launched by an earlier look that serve now; one past the startup timeout is stopped."""
        ready = []
        for process in list(self._starting):
            if process.poll_ready():  # before asking whether it lives: one that served and died did serve
                self._starting.discard(process)
                metrics = f", metrics on {process.metrics_address}" if process.metrics_address else ""
                logger.info("%s serves again on %s (pid %s%s)", process.role, self.head_dials(process) or process.address,
                            process.pid, metrics)
                ready.append(process.role)
            elif not process.alive:
                continue  # exited before it was ready: the next look (or this one's end) counts it
            elif time.monotonic() - process.launched_at > self.startup_timeout:
                self._starting.discard(process)
                process.kill()
                delay = process.note_exit(time.monotonic())
                logger.error("%s did not come up within %gs; stopped it, starting it again in %gs (%s). Its output:\n%s",
                             process.role, self.startup_timeout, delay, LONGER_STARTUP, process.tail())
        return ready

    @contextlib.contextmanager
    def _holding_launch_lock(self) -> Iterator[bool]:
        """Hold the lock launches and stops take; yields whether this thread held it already: a signal handler
        that interrupted a stop or a launch of its own thread, which it cannot wait for (it goes on only once the
        handler returns)."""
        with self._launching:
            self._launch_lock_depth += 1
            try:
                yield self._launch_lock_depth > 1
            finally:
                self._launch_lock_depth -= 1

    def stop(self, on_failed: Optional[Callable[[list[ShardnetProcess]], None]] = None) -> None:
        """Stop every process within two drains and ``AFTER_DRAIN_SECONDS`` (12 s: its Executor's close(), its
        threads' end and its exit; 32 s by default): the head first, drained while its
        workers and uses_before/after still serve (what it accepted is answered), then those, their drains
        overlapping. Any still running then is killed, with a warning, and its role is kept in
        ``killed_at_stop``; one that exits with a code other than 0 (its close() did not return in time, or its
        drain ended with requests still under way: the head's, drained first, is the one that cuts a request
        running past one drain) is in ``failed_at_stop``, and ``on_failed``, if given, gets those processes
        before the temporary folders go (their logs can still be read). A stop of a stopped deployment (an explicit stop(),
        then a ``with``'s exit) does nothing: both still say how the first went.

        Called in a signal handler while its thread is in a stop() already, it returns at once, and the stop under
        way ends as it would have (``kill()`` cuts it short); while its thread launches a process (start(),
        revive(), a restart), it returns at once too, and nothing more is launched: once that launch is over, the
        stop runs, and a start or restart fails with ProcessError. Waiting would wait for ever."""
        if self._in_a_fork:  # the run (its processes, its folders) is its parent's, started or not
            if self._spawned and self._finalizer is not None:  # a `with` block left in a fork of a running one
                logger.warning("deployment %r: stop() in process %d, a fork of process %d that runs it, stops "
                               "nothing", self.name, os.getpid(), self._owner)
            return
        # one stop at a time, and a revive() or start() in another thread launches nothing from here on
        with self._holding_launch_lock() as reentered:
            if reentered:  # a signal handler's, in the thread that holds the lock: what it interrupted ends it
                self._stopping = True
                return
            if self._finalizer is None:  # stopped already (a start() after it makes a new run, and a finalizer)
                return
            self._stopping = True
            # every process of this run, one a start under way has not assigned yet too
            failed: list[ShardnetProcess] = []
            self.killed_at_stop = [process.role for process in stop_all(self._spawned, self._stop_timeout, failed)]
            self.failed_at_stop = [f"{process.role} (exit code {process.popen.returncode})" for process in failed]
            if failed and on_failed is not None:
                on_failed(failed)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            # the workers removed their sockets as they stopped; the token's folder goes whatever the others did
            for folder in (self._tmp, self._secrets, self._sockets):
                self._remove(folder)
            self._tmp = self._secrets = self._sockets = None

    def close(self) -> None:
        """``stop()``, by the name Jina's Deployment and Flow give it (they are ExitStacks: ``f.start()`` ...
        ``f.close()``): code written for Jina failed here with an AttributeError, its processes left running."""
        self.stop()

    def _remove(self, folder: Optional[tempfile.TemporaryDirectory]) -> None:
        """Remove one of the run's folders; one the system will not let go (a file made immutable, a folder
        whose permissions changed: ``ignore_cleanup_errors`` does not cover all of them) is said, naming it, and
        left, and the stop goes on to the next rather than raising out of it."""
        if folder is None:
            return
        try:
            folder.cleanup()
        except OSError as exc:
            logger.warning("deployment %r: its folder %s could not be removed, and stays: %s", self.name, folder.name,
                           exc)

    def kill(self) -> None:
        """SIGKILL every process of this run, and the processes each started, at once, cutting their drains (a
        second Ctrl-C); a stop() under way then finishes at once. Takes no lock: a signal handler may call it
        while stop() holds one. A fork of the process that started them kills nothing."""
        if self._in_a_fork:
            return
        for process in list(self._spawned):
            process.kill_group()

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    async def __aenter__(self) -> "Deployment":
        """``start()`` in a thread; cancelled (Ctrl-C under ``asyncio.run``), it stops what the start launched,
        which ends the start at its next launch or wait, before the cancellation goes on."""
        abandoned = threading.Event()
        starting = asyncio.ensure_future(asyncio.to_thread(self._start, abandoned))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            abandoned.set()
            await asyncio.to_thread(self.stop)
            with contextlib.suppress(Exception):  # "stopped while it started", or a start that had just ended
                await starting
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.to_thread(self.stop)

    # -- requests ---------------------------------------------------------------------

    @overload
    async def post_async(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        return_responses: Literal[False] = False,
    ) -> DocumentList: ...

    @overload
    async def post_async(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        *,
        return_responses: Literal[True],
    ) -> DataRequest: ...

    @overload
    async def post_async(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        return_responses: bool = False,
    ) -> Union[DocumentList, DataRequest]: ...

    async def post_async(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        return_responses: bool = False,
    ) -> Union[DocumentList, DataRequest]:
        """Send documents to ``endpoint`` through the head; return the response's documents, or (as Jina's
        ``return_responses``) the whole response, whose ``parameters["__results__"]`` hold dict results.
        ``timeout``: seconds this request may take; None (as Jina's ``post``) leaves it to the Deployment's
        ``timeout``, which bounds each hop at the head, and without one waits as long as the handler runs."""
        if isinstance(docs, Document):  # one document, as Jina's post takes it
            docs = [docs]
        request = DataRequest(docs=docs or [], endpoint=endpoint, parameters=parameters)
        response = await oneshot.send_request_async(request, self.address, timeout=timeout, channel_options=self._post_options)
        if response.is_error:
            status = response._header().status  # read only: no decoding of the documents for it
            lost = _lost_with_a_replica(status, self.name, self.address)
            if lost is not None:  # no Executor's: the head's, on a replica lost with it
                raise lost
            raise ExecutorError(
                status.description,
                name=status.exception.name,
                executor=status.exception.executor,
                traceback="".join(status.exception.stacks),
            )
        return response if return_responses else response.docs

    @overload
    def post(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        return_responses: Literal[False] = False,
    ) -> DocumentList: ...

    @overload
    def post(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        *,
        return_responses: Literal[True],
    ) -> DataRequest: ...

    @overload
    def post(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        return_responses: bool = False,
    ) -> Union[DocumentList, DataRequest]: ...

    def post(
        self,
        endpoint: str,
        docs: Union[Document, Iterable[Document], None] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        return_responses: bool = False,
    ) -> Union[DocumentList, DataRequest]:
        """Blocking ``post_async``."""
        return oneshot.run_sync(self.post_async(endpoint, docs, parameters, timeout, return_responses))

    def head_dials(self, process: ShardnetProcess) -> Optional[str]:
        """What the head dials for a worker of this deployment: its Unix socket (kept across restarts) or the TCP
        address it printed ready; None for the head and uses_before/after."""
        key = self._worker_key(process)
        return None if key is None else self._member_address(key, process)

    def _worker_key(self, process: ShardnetProcess) -> Optional[tuple[int, int]]:
        """(shard, replica) of a worker of this deployment; None for the head and uses_before/after."""
        return next((key for key, worker in self.workers.items() if worker is process), None)

    def table(self) -> str:
        """What runs where, one line a process; HEAD-DIALS is what the head dials for a worker (its Unix socket
        beside the head, as ``shardnet status`` lists it), "-" for the head and uses_before/after.

        >>> print(dep.table())   # doctest: +SKIP
        ROLE        ADDRESS          PID    STATE    HEAD-DIALS
        head        127.0.0.1:40467  31401  running  -
        worker-0-0  127.0.0.1:35121  31409  running  unix:/tmp/sn-x1y2/w0-0.sock

        With ``metrics_port``, a METRICS column says where each serves /metrics.
        """
        with_metrics = self.metrics_port is not None  # a column of its own only then
        rows = [("ROLE", "ADDRESS", "PID", "STATE", "HEAD-DIALS", *(["METRICS"] if with_metrics else []))]
        for process in self.processes:
            dialled = self.head_dials(process)
            rows.append((process.role, process.address or "-", str(process.pid),
                         "running" if process.alive else "stopped", dialled or "-",
                         *([process.metrics_address or "-"] if with_metrics else [])))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    def __repr__(self) -> str:
        return f"<Deployment {self.name} {self.shards}x{self.replicas} at {self.head.address if self.head else '-'}>"


def _replace_file(path: Path, text: str) -> None:
    """Make ``path`` hold ``text``, readable by this user only, in one step (a rename): a process reading it
    meanwhile sees the whole old file or the whole new one."""
    # a new file of a random name (O_EXCL, mode 0600): a predictable one in a folder others may write (a shared
    # --log-dir) could be a link planted there, and the text would overwrite the file it points at
    descriptor, written = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(written, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(written)
        raise


def _lost_with_a_replica(status: Any, deployment: str, head: str) -> Optional[ReplicaError]:
    """The error an ERROR answer reads as when it is the head of ``deployment`` saying a replica may have run
    the request and lost it: the ReplicaError of the status its description starts with (``DEADLINE_EXCEEDED:
    ...`` a DeadlineExceeded), naming the head. None for an Executor's exception, whatever its name."""
    name, _, cause = status.description.partition(": ")
    code = grpc.StatusCode.__members__.get(name)
    if code is None or status.exception.name != MAY_HAVE_RUN_ERROR or status.exception.executor != deployment:
        return None
    return replica_error_class(code)(cause, address=head, code=code, deployment=deployment, role="head")
