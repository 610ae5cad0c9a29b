"""Start, watch and stop the shardnet processes of a local deployment.

A child's output goes to a log file (never a pipe that could fill up and
block it); once it serves, it writes its address, one line, and its metrics
listener's (an empty line without one) to a pipe of its own (``--ready-fd``),
which is polled with a deadline. Not read from the log: an Executor printing
"ready on cuda:0" would be taken at its word, and a log folder two
deployments share holds the other's lines too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from shardnet.errors import ProcessError
from shardnet.runtimes.log_lines import LOG_TIMESTAMP, as_any_launch, step_cut_short

# the end of a killed process's log read for the last step of its way out it began (a whole log of a long run,
# read before the kill, held a stop of several hung workers 0.5 s per 50 MB, one after the other)
STEP_LOOKBACK_BYTES = 1 << 20
STABLE_RUN = 60.0  # seconds: a process that served this long before it exited is launched again at once
MAX_RESTART_DELAY = 30.0
REAP_POLL_SECONDS = 0.02  # how often a stop looks whether its child has exited (left unreaped till collected)
REAP_AFTER_KILL_SECONDS = 5.0
TRACEBACK_START = "Traceback (most recent call last):"
MAX_TAIL_LINES = 200  # of a failed start's output quoted in its error
MIN_LAST_DRAIN = 2.0  # seconds the workers get to drain after their heads, however long those took
# what `shardnet --log-level` takes, and so what a launcher may pass its children
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

logger = logging.getLogger(__name__)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is no zombie (an exited process its parent has not reaped)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else: its state tells the rest
        return not _zombie(pid)
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether process ``pid`` has exited and waits for its parent to reap it (no /proc, as off Linux: no)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


class ShardnetProcess:
    """One ``python -m shardnet ...`` child: its command, log file, address once ready."""

    def __init__(
        self, role: str, arguments: Sequence[str], log_path: Path, env: Optional[dict[str, str]] = None,
        log_is_temporary: bool = False,
    ):
        self.role = role
        self.arguments = list(arguments)
        self.log_path = log_path
        self.log_is_temporary = log_is_temporary  # in a folder removed at the stop: its path tells nobody anything
        self.env = env
        self.address: Optional[str] = None
        self.metrics_address: Optional[str] = None  # host:port of its /metrics, once ready, when it serves them
        self.popen: Optional[subprocess.Popen] = None
        self._ready_pipe: Optional[int] = None  # this launch's end of the pipe its address comes down
        self._ready_read = b""
        # a stop() from another thread closes the pipe a start is reading: its number must not be read once reused;
        # reentrant, as a signal handler stopping a deployment may run in the thread that holds it
        self._pipe_lock = threading.RLock()
        self._log_offset = 0
        self.launched_at = float("-inf")  # time.monotonic() of the last launch
        self.ready_at: Optional[float] = None  # and of its ready line, once seen
        self.quick_exits = 0  # exits in a row, none after a stable run: how long a restart waits (note_exit)
        self.restart_at: Optional[float] = None  # once an exit was noted: when it may be launched again
        self._last_failure: Optional[str] = None  # what its last failed start said, times left out

    @property
    def pid(self) -> Optional[int]:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        """Whether the child runs; one found exited is collected (``_collect``) on the way."""
        if self.popen is None or self.popen.returncode is not None:
            return False
        if not self._exited():
            return True
        self._collect()
        return False

    def _exited(self) -> bool:
        """Whether the child has exited, without reaping it: while it is a zombie its pid, and so its process
        group's id, cannot be given to anyone else."""
        return self._unreaped_exit() is not False

    def _unreaped_exit(self) -> Optional[bool]:
        """False while the child runs, True once it has exited and awaits its reaping, None when it was reaped
        already (by subprocess itself: only poll() can tell its code then)."""
        try:
            return os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return None

    def _collect(self) -> None:
        """For an exited child: SIGKILL what is left of its process group while the zombie still holds the group's
        id (helpers its Executor started and its close() did not stop, or that outlived a child killed mid-load),
        then reap it. Reaped first, the id could pass to a new group leader (a pid wrap-around) and be hit."""
        if self.popen.returncode is not None:
            return
        self._close_ready_pipe()
        state = self._unreaped_exit()
        if state:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        elif state is None:
            self.popen.poll()

    def launch(self) -> "ShardnetProcess":
        """Start the child (again, after a stop: its log grows and only new lines count)."""
        if self.alive:
            raise ProcessError(f"{self.role} (pid {self.pid}) is still running: stop it before launching it again")
        if not {"head", "worker"} & set(self.arguments):  # after global options such as --log-level
            raise ProcessError(f"{self.role}: a ShardnetProcess runs 'shardnet head' or 'shardnet worker'")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.address = self.metrics_address = None
        self.launched_at = time.monotonic()
        self.ready_at = self.restart_at = None
        self._close_ready_pipe()
        reading, writing = os.pipe()
        os.set_blocking(reading, False)
        # it stops when this process goes, whatever ends it (kill -9, a closed terminal)
        launcher = ["--parent-pid", str(os.getpid()), "--ready-fd", str(writing)]
        try:
            # never through a link: a log folder others may write (--log-dir /tmp) could hold one planted at this
            # predictable name, pointing at a file of this user's that the log would then be appended to
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            with open(os.open(self.log_path, flags, 0o600), "ab") as log:
                self.popen = subprocess.Popen(
                    [sys.executable, "-m", "shardnet", *self.arguments, *launcher],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    pass_fds=(writing,),
                    start_new_session=True,  # Ctrl-C reaches the parent, which stops children in order
                )
        except BaseException:
            os.close(reading)
            raise
        finally:
            os.close(writing)  # the child's now: the pipe ends (EOF) when it exits without a word
        with self._pipe_lock:
            self._ready_pipe, self._ready_read = reading, b""
        return self

    def _close_ready_pipe(self) -> None:
        with self._pipe_lock:
            if self._ready_pipe is not None:
                os.close(self._ready_pipe)
                self._ready_pipe = None

    def wait_ready(self, timeout: float = 30.0, hint: str = "") -> str:
        """Block until the ready line appears; raise ProcessError with the log's tail if it exits or times out
        (``hint``: what the caller's user may do about a timeout, such as a flag allowing longer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll_ready():
                return self.address
            if not self.alive:
                raise ProcessError(f"{self.role} {self.exit_description()} before it was ready:\n{self.tail()}")
            time.sleep(0.02)
        waited = time.monotonic() - self.launched_at  # since the launch: a caller may have waited for others first
        raise ProcessError(
            f"{self.role} was not ready {waited:.0f}s after its launch{f' ({hint})' if hint else ''}:\n{self.tail()}"
        )

    def poll_ready(self) -> Optional[str]:
        """The address, once this launch has written it to its pipe (one look, no waiting); else None."""
        with self._pipe_lock:
            if self.address is not None or self._ready_pipe is None:
                return self.address
            try:
                self._ready_read += os.read(self._ready_pipe, 4096)
            except BlockingIOError:  # nothing yet
                return None
            except OSError:  # closed under the read, by a stop() a signal handler ran in this very thread
                return self.address
            if self._ready_read.count(b"\n") < 2:  # the address's line and the metrics address's
                return None
            address, metrics_address = self._ready_read.decode(errors="replace").split("\n")[:2]
            self.metrics_address = metrics_address or None
            self.address, self.ready_at = address, time.monotonic()
        self._close_ready_pipe()
        return self.address

    def _output(self, last_bytes: Optional[int] = None) -> str:
        """What this launch wrote to the log so far (earlier launches' lines are not its own), or its last
        ``last_bytes`` of it."""
        try:
            with open(self.log_path, "rb") as log:
                start = self._log_offset
                if last_bytes is not None:
                    start = max(start, log.seek(0, os.SEEK_END) - last_bytes)
                log.seek(start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def exit_description(self) -> str:
        """How the process ended, as a person reads it: "exited with code 1", "was killed by SIGKILL"."""
        code = self.popen.returncode if self.popen else None
        if code is None:
            return "is running"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def note_exit(self, now: float) -> float:
        """Count an exit seen at ``now`` (``time.monotonic()``); return how long to wait before launching again.

        The first exit after a stable run (``STABLE_RUN`` seconds or more since its ready line) waits nothing;
        each further one in a row (never ready, or ready for less) waits 0.5 s, doubling up to
        ``MAX_RESTART_DELAY``. Counted from when the exit is seen: whoever looks once a second waits up to a
        second more.
        """
        stable = self.ready_at is not None and now - self.ready_at >= STABLE_RUN
        self.quick_exits = 1 if stable else self.quick_exits + 1
        delay = min(MAX_RESTART_DELAY, 0.5 * 2 ** (self.quick_exits - 2)) if self.quick_exits > 1 else 0.0
        self.restart_at = now + delay
        return delay

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of this launch's output, or from its first traceback on when that starts
        earlier (a chained exception's root cause comes first), up to ``MAX_TAIL_LINES``."""
        output = self._output().splitlines()
        start = len(output) - lines
        first_traceback = next((n for n, line in enumerate(output) if line.startswith(TRACEBACK_START)), None)
        if first_traceback is not None:
            # with the log line that introduces it (a worker's "the Executor's __init__ ... raised"), if one does
            said_before = first_traceback > 0 and LOG_TIMESTAMP.match(output[first_traceback - 1])
            start = min(start, first_traceback - 1 if said_before else first_traceback)
        return "\n".join(output[max(start, len(output) - MAX_TAIL_LINES, 0):]) or "(no output)"

    def failure_output(self) -> str:
        """For a launch that failed: its ``tail()``, or a line saying it is what the last failed launch said
        (the times and pids of log lines aside), so that a crash loop's restarts do not repeat the same error in
        full."""
        output = self.tail()
        said = as_any_launch(output)
        if said == self._last_failure:
            return f"the same as at its last failed start (its log: {self.log_path})"
        self._last_failure = said
        return output

    def log_reference(self, keeps_it: str = "log_dir=..., deploy --log-dir, keeps it") -> str:
        """Where its log is; for a temporary one (``keeps_it``: what keeps it), removed at the stop, its last lines,
        quoted while it is still there."""
        if not self.log_is_temporary:
            return str(self.log_path)
        return f"(removed on exit; {keeps_it}), ending:\n{self.tail()}"

    def signal(self, signum: int) -> None:
        if self.alive:
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, wait up to ``timeout`` for the drain, then SIGKILL (with a warning); return the exit code."""
        if self.popen is None:
            return None
        if self.alive:
            self.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.signal(signal.SIGTERM)
        self._reap(timeout)
        return self.popen.returncode

    def _reap(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the exit (no second SIGTERM: one arriving after the drain kills), then SIGKILL
        it, saying so; collect it (its group's leftovers killed). Whether it had to be killed."""
        if self.popen is None:
            return False
        deadline = time.monotonic() + timeout
        while self.popen.returncode is None and not self._exited() and time.monotonic() < deadline:
            time.sleep(REAP_POLL_SECONDS)  # waited for unreaped: the group's id must stay the child's until killed
        killed = self.popen.returncode is None and not self._exited()
        if killed:
            cut = step_cut_short(self._output(last_bytes=STEP_LOOKBACK_BYTES))
            logger.warning(
                "%s (pid %s) did not stop within %.1fs: killed (SIGKILL), %s. Its log: %s", self.role, self.popen.pid,
                timeout, f"{cut} cut short" if cut else "its way out cut short", self.log_reference(),
            )
            self.popen.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.popen.pid, os.WEXITED | os.WNOWAIT)
        self._collect()
        return killed

    def kill_group(self) -> None:
        """SIGKILL this process and those it started (its own session's group: a model server, data loaders), at
        once; safe in a signal handler: no poll or wait (one under way in the main thread holds their lock)."""
        if self.popen is not None and self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # reaped meanwhile: nothing to kill
                os.killpg(self.popen.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the child, then what is left of its process group."""
        if self.alive:
            self.popen.kill()
            self._reap(REAP_AFTER_KILL_SECONDS)

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<ShardnetProcess {self.role} {self.address or '-'} pid={self.pid} {state}>"


def stop_all(
    processes: Sequence[ShardnetProcess], timeout: float = 15.0, failed: Optional[list[ShardnetProcess]] = None
) -> list[ShardnetProcess]:
    """Stop every process within ``timeout`` in all, and return those that had to be killed; ``failed``, when
    given, gets those serving at the stop that exited on their own with a code other than 0 (a close() that did
    not return in time, a stop cut short).

    The heads go first. Each drains while the processes it calls still serve, so a request it accepted
    reaches its shards and uses_after. Then the rest get their SIGTERMs at once, so their drains overlap,
    with what time is left (at least ``MIN_LAST_DRAIN``). Whatever still runs then is SIGKILLed, with a
    warning, and what each left of its process group (helpers its Executor started) is killed.
    """
    deadline = time.monotonic() + timeout
    heads = [process for process in processes if process.role == "head"]
    # serving ones: a start under way that a SIGTERM ends exits as it may
    serving = [process for process in processes if process.popen is not None and process.popen.returncode is None
               and not process._exited() and process.address is not None]
    killed = []
    for group in (heads, [process for process in processes if process.role != "head"]):
        for process in group:
            process.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            process.signal(signal.SIGTERM)
        ends = deadline if group is heads else max(deadline, time.monotonic() + MIN_LAST_DRAIN)
        for process in group:
            if process._reap(max(ends - time.monotonic(), 0.0)):
                killed.append(process)
    if failed is not None:
        failed.extend(process for process in serving if process not in killed and process.popen.returncode != 0)
    return killed
