"""A served process's life around its server: stop signals, its launcher's exit, the ready fd, its session.

A head or worker serves until SIGTERM, SIGINT or SIGHUP, or until the process that launched it (``--parent-pid``)
exits, and then drains; it tells its launcher its address on a pipe (``--ready-fd``); when it leads a session of
its own and its launcher has gone, it takes what it started there with it. Kept apart from ``server.py``, which
serves gRPC and knows nothing of signals or processes; the command line's handling of signals before and after
serving (``cli/stopping.py``) exits and ends its session with the helpers here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import stat
import sys
import threading
from typing import Any, Awaitable, Callable, NoReturn, Optional

from shardnet.errors import ConfigurationError
from shardnet.runtimes.log_lines import DRAIN_STEP, READY_LOGGER
from shardnet.runtimes.processes import process_running
from shardnet.runtimes.server import Server

logger = logging.getLogger(__name__)
ready_logger = logging.getLogger(READY_LOGGER)  # the "ready on" line: the command writes it to stdout

PARENT_POLL_SECONDS = 0.5  # how soon a child notices that the process that launched it is gone
# once its launcher (--parent-pid) is gone, a process stopping for that takes at most these seconds beyond its
# drain's grace (a DEACTIVATE, an Executor's close() with its own bound) before it exits at once: a handler
# blocking the event loop (a blocking call in an async def) would hold a drain, which the loop runs, for as long
STOP_SLACK = 15.0


class _Stop:
    """How a served process stops. The first SIGTERM, SIGINT or SIGHUP, or the exit of its launcher
    (``watch_parent``), sets ``requested``: a drain begins (``begin``). A second SIGINT once the stop is under
    way ends the process at once, logged, as ``deploy``'s second Ctrl-C ends its processes (``signalled``). The
    launcher is watched from a thread, which needs no event loop (a handler blocking the loop kept an orphan
    serving on), and the stop its exit asks for is bounded (a drain or a ``close()`` that hung kept a worker
    running for ever, its launcher killed -9)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, grace: float):
        self._loop = loop
        self._grace = grace  # the drain's
        self.requested = asyncio.Event()
        self._began = threading.Event()  # the stop is under way (a drain, a close())
        self._ended = threading.Event()  # serving has returned: nothing more to watch
        self._parent: Optional[tuple[int, bool]] = None  # the launcher watched: its pid, and whether it is ours

    def signalled(self, signum: int) -> None:
        """A stop signal's handler (run by the loop). A second SIGINT while stopping is a person's second Ctrl-C:
        it ends the process at once. A second SIGTERM or SIGHUP is not: a supervisor stopping a group (systemd's
        KillMode=control-group) signals every process, and a launcher (``deploy``, a Deployment) signals its
        children again, which would cut every drain; the stop is bounded anyway."""
        if self._began.is_set():
            if signum == signal.SIGINT:
                self._exit_at_once("a second SIGINT (Ctrl-C) while stopping", 128 + signum)
            logger.info("%s while stopping: the stop goes on", signal.Signals(signum).name)
        self.requested.set()

    def begin(self) -> None:
        self._began.set()

    def end(self) -> None:
        self._ended.set()

    def parent_has_gone(self) -> bool:
        return self._parent is not None and parent_gone(*self._parent)

    def watch_parent(self, parent_pid: int, direct: bool) -> None:
        """Stop once process ``parent_pid`` exits (``parent_gone``), polled from a daemon thread."""
        self._parent = (parent_pid, direct)
        threading.Thread(target=self._watch, name="shardnet-parent-watch", daemon=True).start()

    def _watch(self) -> None:
        pid, direct = self._parent
        if not wait_for_parent_exit(pid, direct, self._ended):
            return
        # (gone while this process stops: the stop goes on, bounded below; a supervisor stopping a launcher and
        # its children together ends the launcher first, and cutting the children's drains would lose their work)
        logger.warning("process %d (--parent-pid) exited: stopping", pid)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the stop is over
            self._loop.call_soon_threadsafe(self.requested.set)
        # the loop begins the stop at once, unless a handler holds it: that handler gets the drain's grace, as a
        # drain would give it, and the whole stop that grace and STOP_SLACK more
        begin_within = max(1.0, self._grace)
        if not self._began.wait(begin_within):
            self._exit_at_once(
                f"process {pid} (--parent-pid) exited, and the event loop did not begin the stop within "
                f"{begin_within:g}s (a handler holds it: a blocking call in an async def?)", 128 + signal.SIGTERM,
            )
        if not self._ended.wait(self._grace + STOP_SLACK):
            self._exit_at_once(
                f"process {pid} (--parent-pid) exited, and the stop took more than {self._grace + STOP_SLACK:g}s",
                128 + signal.SIGTERM,
            )

    def _exit_at_once(self, why: str, code: int) -> None:
        """Log ``why``, end what this process started when its launcher is gone (``end_own_session``), and exit
        with ``code`` at once: neither the drain nor the Executor's ``close()`` is waited for."""
        if self._ended.is_set():  # the stop ended on its own meanwhile
            return
        logger.error("%s: exiting at once, the drain and the Executor's close() cut short", why)
        if self.parent_has_gone():
            end_own_session()
        exit_now(code)


def parent_gone(parent_pid: int, direct: bool) -> bool:
    """Whether process ``parent_pid`` has gone: the ``direct`` parent once this one was handed to another (immune
    to its pid being reused, or its zombie lingering); any other once no such process is left."""
    return os.getppid() != parent_pid if direct else not process_running(parent_pid)


def wait_for_parent_exit(parent_pid: int, direct: bool, unless: threading.Event) -> bool:
    """Block until process ``parent_pid`` has gone (``parent_gone``, looked at every ``PARENT_POLL_SECONDS``):
    True; or until ``unless`` is set first (whoever watched no longer needs to): False. For a watching thread,
    which needs no event loop: one a blocking handler holds would not notice."""
    while not unless.wait(PARENT_POLL_SECONDS):
        if parent_gone(parent_pid, direct):
            return True
    return False


async def serve_until_signalled(
    server: Server,
    on_ready: Optional[Callable[[], Awaitable[None]]] = None,
    on_stop: Optional[Callable[[], Awaitable[None]]] = None,
    ready_line: Optional[Callable[[str], str]] = None,
    parent_pid: Optional[int] = None,
    when_idle: Optional[Callable[[], Awaitable[None]]] = None,
    ready_fd: Optional[int] = None,
) -> int:
    """Start ``server``, log ``ready_line(address)`` (a function: a line made with ``str.format`` broke on a
    brace in a name the user gave) to READY_LOGGER, at INFO, and on SIGTERM, SIGINT or SIGHUP (its terminal closed) run
    ``on_stop`` then drain (``when_idle``: as ``Server.drain`` takes it); return 0.

    With ``parent_pid`` the same happens when that process exits, however it ended (kill -9 included):
    a Deployment's children do not outlive it, nor, when this process leads a session of its own (as a
    Deployment starts each), what it started there. ``ready_fd``: a pipe the address and the metrics
    address (an empty line without metrics) are written to, a line each, once serving; then it is closed.
    A SIGHUP ignored from the start (``nohup``) stays ignored.
    A second SIGINT while stopping (the farewell, the drain, the Executor's ``close()``) ends this one at once
    (``_Stop``); a second SIGTERM or SIGHUP, or that process's exit then, lets the stop go on.
    """
    if threading.current_thread() is not threading.main_thread():  # else asyncio's or uvloop's own words on it
        raise ConfigurationError(
            "run() serves until a signal (SIGTERM, SIGINT), which only the main thread receives: in another "
            "thread, start() and stop() it"
        )
    if ready_fd is not None:
        check_ready_fd(ready_fd)
    loop = asyncio.get_running_loop()
    stop = _Stop(loop, server.config.drain_grace)
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    for signum in signals:
        loop.add_signal_handler(signum, stop.signalled, signum)
    try:
        if parent_pid is not None:
            # pid 0 and -1 would name a process group or every process: the watch would never fire
            if isinstance(parent_pid, bool) or not isinstance(parent_pid, int) or parent_pid < 1:
                raise ConfigurationError(f"--parent-pid must be a process id (1 or more), got {parent_pid!r}")
            if not process_running(parent_pid):  # else it would stop at once, after saying it was ready
                stop_own_session()  # its launcher died while the Executor loaded: what that started goes too
                raise ConfigurationError(f"--parent-pid {parent_pid}: no such process is running, so none to serve")
            stop.watch_parent(parent_pid, os.getppid() == parent_pid)
        await _serve(server, stop, on_ready, on_stop, ready_line, ready_fd, when_idle)
    finally:
        stop.end()
    if stop.parent_has_gone():  # whenever it went: before the stop, or in it
        stop_own_session()
    return 0


async def _serve(
    server: Server,
    stop: _Stop,
    on_ready: Optional[Callable[[], Awaitable[None]]],
    on_stop: Optional[Callable[[], Awaitable[None]]],
    ready_line: Optional[Callable[[str], str]],
    ready_fd: Optional[int],
    when_idle: Optional[Callable[[], Awaitable[None]]],
) -> None:
    """``serve_until_signalled``'s serving: start, say so, wait for ``stop``, then ``on_stop`` and the drain."""
    await server.start()
    try:
        if on_ready is not None:
            await on_ready()
        # what startup built (protobuf descriptors, gRPC, client models) lives as long as the process:
        # move it out of the collector's way so full collections do not pause requests
        gc.freeze()
        if ready_line:
            also = f" and {server.unix_address}" if server.unix_address else ""
            ready_logger.info("%s%s", ready_line(server.address), also)
        if ready_fd is not None:
            _tell_ready(ready_fd, server.address, server.metrics_address)
        await stop.requested.wait()
        stop.begin()
        logger.info("%s %s", DRAIN_STEP, server.address)
        if on_stop is not None:
            try:
                await on_stop()
            except Exception as exc:  # the drain goes on: exiting cleanly matters more than the farewell
                logger.warning("while stopping: %s", exc)
    finally:
        stop.begin()  # a failed start or registration drains too, and a signal then ends it at once
        await server.drain(when_idle=when_idle)


def check_ready_fd(fd: Any) -> None:
    """Refuse a ready fd that is not an open pipe or file of this process's: one its launcher did not pass may be
    a descriptor gRPC or the event loop opens, which writing the address to and closing would break (an abort,
    or a process that no longer stops). Checked before they open any."""
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 3:
        raise ConfigurationError(f"--ready-fd must be a file descriptor from 3 (0 to 2 are the standard streams), got {fd!r}")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ConfigurationError(
            f"--ready-fd {fd} is not open in this process ({exc.strerror}): its launcher must pass it (pass_fds)"
        ) from None
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        raise ConfigurationError(f"--ready-fd {fd} is neither a pipe nor a file: the address is written to it")


def _tell_ready(fd: int, address: str, metrics_address: Optional[str]) -> None:
    """Write ``address``, then on a line of its own the metrics listener's (empty without one), to the launcher's
    pipe in one write, and close it; a launcher gone meanwhile is no reason to stop."""
    try:
        with os.fdopen(fd, "wb", buffering=0) as pipe:
            pipe.write(f"{address}\n{metrics_address or ''}\n".encode())
    except OSError as exc:
        logger.warning("could not tell the launcher the address on file descriptor %d: %s", fd, exc)


def stop_own_session() -> None:
    """SIGTERM what is left of this process's group when it leads a session of its own (a Deployment starts
    each child so, a shell's job does not: its pipeline shares the group) and its launcher has gone: helpers its
    Executor started would outlive it, as the launcher is not there to kill them. This process ignores the
    signal meanwhile: a signal ignored when sent is discarded."""
    if os.getsid(0) != os.getpid():
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        end_own_session()
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_own_session() -> None:
    """SIGTERM this process's group, itself included, when it leads a session of its own: for a process about to
    exit at once, from any thread, whose handler of SIGTERM (the loop's, while serving) only notes the signal
    meanwhile (``stop_own_session`` keeps this process out of it, from the main thread)."""
    if os.getsid(0) != os.getpid():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpid(), signal.SIGTERM)


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` at once, neither joining threads nor running atexit functions, what was logged and
    printed written out first (os._exit flushes nothing): for a process whose orderly exit something holds."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
