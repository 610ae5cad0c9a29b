"""How the log lines of a shardnet process read, and the one place that sets them up.

Every line says when, how grave, which process (its role and name, as the deployment names it, and its pid) and
which logger: ``2026-11-28 08:31:27,200 INFO [worker enc/rep-1 pid 14940] shardnet.runtimes.server: draining
...``, so that a head's, its workers' and a restarted worker's lines read together (one terminal, ``tail -f`` of a
log folder, a file a restart appends to) still say who said what.

Only the ``shardnet`` command's entry point sets this up (``configure``): shardnet imported as a library logs to
its loggers and leaves its user's configuration as it is.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

# the logger of a server's "... ready on ADDRESS" line: the command writes it to stdout, at any --log-level, where
# a script running a worker or head waits for it; a launcher learns the address from a pipe of its own instead
READY_LOGGER = "shardnet.ready"
LOG_FORMAT = "%(asctime)s %(levelname)s [%(said_by)s pid %(process)d] %(name)s: %(message)s"
_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
# the time a log line begins with
LOG_TIMESTAMP = re.compile(rf"^{_TIME} ", re.M)
# what differs between two launches' lines saying the same: the time, and the pid beside the role and name
_LAUNCH_OF_A_LINE = re.compile(rf"^{_TIME} (\S+ \[.*?) pid \d+\]", re.M)


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
