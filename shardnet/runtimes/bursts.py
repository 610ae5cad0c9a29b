"""Logs that say a burst of like events in one line per interval: the first event at once, the rest counted.

A head refusing a guesser's control calls, a worker whose Executor raises on every
request, a head failing requests for want of a replica: each event is worth a
line, a line per event floods the log (a review: 401 lines a second of the same
exception). ``BurstLog`` logs the first event of a burst at once, in full, and
counts the rest by what they were (a caller, a handler on an endpoint, a shard
and its cause), naming the first few, in one line when the interval ends, with
the latest event's detail. Only the events' own (failure) paths call it.

While a burst lasts, each line doubles the interval to the next, up to a
minute: an outage that never ends (every replica gone for a month, at 200
requests a second) writes a line a minute, not a line a second (a review:
0.8 GB of log a month per process). An event after a whole interval without
one is logged at once, in full; the burst ends, and the interval is short again,
only when two whole intervals passed without one (events a little sparser than
the interval, one every 1.5 s, would otherwise each be a line of their own, for
ever).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Optional

# a burst of like events is logged at most once per this many seconds, with how many there were
BURST_INTERVAL = 1.0
# the longest a lasting burst's interval grows to, doubling with each of its lines
LONGEST_BURST_INTERVAL = 60.0
# kinds of event a line of a burst names with their counts; past them it counts the others together
MAX_NAMED_KINDS = 5


class BurstLog:
    """Like events logged at most once per ``interval`` seconds: the first at once, the rest counted by kind;
    the interval doubles with each line of a burst, up to ``longest``.

    ``burst`` is the %-format of a burst's line, given (in order) the ``subject`` (whose events they are: a
    deployment, a worker), how many more events there were, the interval, the kinds with their counts, and the
    latest event's detail. Call ``close`` when the owner stops: what is held is said then, not lost.
    """

    def __init__(
        self, logger: logging.Logger, subject: str, burst: str, *,
        interval: float = BURST_INTERVAL, longest: float = LONGEST_BURST_INTERVAL, level: int = logging.WARNING,
    ):
        self._logger = logger
        self._subject = subject
        self._burst = burst
        self._shortest = interval
        self._longest = max(interval, longest)
        self._interval = interval  # the current one: longer the longer a burst has lasted
        self._level = level
        self._logged_at = -math.inf  # time.monotonic() of the last line
        self._held = 0  # events not logged yet
        self._kinds: dict[str, int] = {}  # of those, by kind (the first MAX_NAMED_KINDS)
        self._unnamed = 0  # of those, of kinds past them
        self._latest = ""  # of those, the latest one's detail
        self._flush: Optional[asyncio.TimerHandle] = None

    def note(self, kind: str, latest: str, message: str, *args: Any) -> None:
        """Record an event of ``kind`` (``latest`` its detail): logged now as ``message % args`` when no burst is
        under way, else counted and said when the interval ends. Called from a running event loop."""
        now = time.monotonic()
        quiet = now - self._logged_at
        if not self._held and quiet >= self._interval:  # a whole interval without one: said in full, at once
            lasting = quiet < 2 * self._interval  # no long quiet: the same burst goes on, said less often
            self._logged_at = now
            self._interval = min(self._interval * 2, self._longest) if lasting else self._shortest
            self._logger.log(self._level, message, *args)
            return
        self._held += 1
        self._latest = latest
        if kind in self._kinds or len(self._kinds) < MAX_NAMED_KINDS:
            self._kinds[kind] = self._kinds.get(kind, 0) + 1
        else:
            self._unnamed += 1
        if self._flush is None:
            delay = max(0.0, self._logged_at + self._interval - now)
            self._flush = asyncio.get_running_loop().call_later(delay, self._say_held)

    def _say_held(self) -> None:
        """Log the events held since the last line, in one line, and start counting afresh."""
        self._flush = None
        kinds = ", ".join(f"{kind} x{count}" for kind, count in self._kinds.items())
        if self._unnamed:
            kinds += f" and {self._unnamed} of other kinds"
        self._logger.log(
            self._level, self._burst, self._subject, self._held, self._interval, kinds, self._latest
        )
        self._logged_at = time.monotonic()
        self._held, self._kinds, self._unnamed = 0, {}, 0
        self._interval = min(self._interval * 2, self._longest)  # the burst goes on: said less often

    def close(self) -> None:
        """Log what is held now, and stop the timer (its owner is stopping)."""
        if self._flush is not None:
            self._flush.cancel()
            self._say_held()
