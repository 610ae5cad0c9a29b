"""How the log lines of a shardnet process read, and the one place that sets them up.

Every line says when, how grave, which process (its role and name, as the deployment names it, and its pid) and
which logger: ``2026-11-28 08:31:27,200 INFO [worker enc/rep-1 pid 14940] shardnet.runtimes.lifecycle: draining
...``, so that a head's, its workers' and a restarted worker's lines read together (one terminal, ``tail -f`` of a
log folder, a file a restart appends to) still say who said what.

Only the ``shardnet`` command's entry point sets this up (``configure``): shardnet imported as a library logs to
its loggers and leaves its user's configuration as it is.

Text a caller chose (an endpoint, a request id, a failure quoting what it sent) goes into a line through
``quoted`` only: a newline in it must not begin a line of its own that reads as the process's (a forged
``ERROR [head ...] activated ...``), nor a megabyte of it fill the log.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Optional, TextIO

# the logger of a server's "... ready on ADDRESS" line: the command writes it to stdout, at any --log-level, where
# a script running a worker or head waits for it; a launcher learns the address from a pipe of its own instead
READY_LOGGER = "shardnet.ready"
LOG_FORMAT = "%(asctime)s %(levelname)s [%(said_by)s pid %(process)d] %(name)s: %(message)s"
_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
# the time a log line begins with
LOG_TIMESTAMP = re.compile(rf"^{_TIME} ", re.M)
# what differs between two launches' lines saying the same: the time, and the pid beside the role and name
_LAUNCH_OF_A_LINE = re.compile(rf"^{_TIME} (\S+ \[.*?) pid \d+\]", re.M)
# how a stopping process's log says each step of its way out begins, and what a kill during that step cuts short:
# a launcher that had to kill one says which, from the last such line of the process's own (shardnet's) loggers
DRAIN_STEP = "draining"
CLOSE_STEP = "closing the Executor"
THREADS_STEP = "waiting for the Executor's threads"
_CUT_BY_STEP = {DRAIN_STEP: "its drain", CLOSE_STEP: "its Executor's close()", THREADS_STEP: "its Executor's threads"}
_STEP = re.compile(rf"^{_TIME} \S+ \[[^\]\n]*\] shardnet\.[\w.]+: ({'|'.join(map(re.escape, _CUT_BY_STEP))})\b", re.M)


def step_cut_short(output: str) -> Optional[str]:
    """What a kill cut short in a stopping process whose log reads ``output`` ("its drain", "its Executor's
    close()", "its Executor's threads"), from the last step its log said it began; None when it said none
    (a --log-level above INFO, a stop that had not begun)."""
    steps = _STEP.findall(output)
    return _CUT_BY_STEP[steps[-1]] if steps else None


# characters of a caller's text a log line quotes, unless the line gives its own bound
MAX_QUOTED_CHARS = 200
# characters of a request id a log line quotes (shardnet's and Jina's are 32 hex digits)
MAX_ID_CHARS = 80


def quoted(text: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` (a caller's: an endpoint, a request id, a failure quoting them) as a log line may show it: its
    first ``limit`` characters, each that is not printable (a newline, an escape, U+2028) written as Python's
    ``repr`` writes it (``\\n``), and, when cut, how many characters it has. Printable text such as ``/search``
    reads as it is; what it quotes never spans lines nor begins one. A backslash is left as written: text that
    was already quoted with ``repr`` (an error naming the caller's value) reads in the log as the caller's error
    said it, not escaped twice."""
    text = str(text)
    shown = printable(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def printable(text: str, keep: str = "") -> str:
    """``text`` with each character that is not printable, save those in ``keep``, written as Python's ``repr``
    writes it (an escape as ``\\x1b``): a peer's words shown on an operator's terminal cannot move its cursor,
    retitle it or forge a line of output."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or char in keep else char.encode("unicode_escape").decode("ascii") for char in text
    )


def as_any_launch(output: str) -> str:
    """``output`` with its log lines' times and pids left out: what two launches of one process said alike reads
    alike (a crash loop's restarts failing with the same error)."""
    return _LAUNCH_OF_A_LINE.sub(r"\1]", output)


class SaidBy(logging.Filter):
    """Gives each record the role and name of the process writing it (``worker enc/rep-1``), for LOG_FORMAT."""

    def __init__(self, said_by: str) -> None:
        super().__init__()
        self.said_by = said_by

    def filter(self, record: logging.LogRecord) -> bool:
        record.said_by = self.said_by
        return True


def _handler(stream: TextIO, said_by: str) -> logging.Handler:
    """A handler writing to ``stream`` in LOG_FORMAT, its lines said by ``said_by``."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(SaidBy(said_by))
    return handler


def configure(level: str, said_by: str) -> None:
    """Log at ``level`` to stderr in LOG_FORMAT, each line saying ``said_by`` (role and name) and the pid, and the
    ready line to stdout in the same format whatever the level: for the ``shardnet`` command's entry point only.
    Where logging was set up already (a program calling ``shardnet.cli.main.main()`` itself) nothing changes,
    as ``logging.basicConfig`` would leave it."""
    root = logging.getLogger()
    if root.handlers:
        return
    ready = logging.getLogger(READY_LOGGER)
    ready.setLevel(logging.INFO)
    ready.propagate = False
    ready.addHandler(_handler(sys.stdout, said_by))
    logging.basicConfig(level=level, handlers=[_handler(sys.stderr, said_by)])
