"""The head's log of refused control calls: every refusal said with its caller, at most once per interval.

A guesser of the control token, or a peer trying to make the head a bridge to a
loopback-only port, must neither flood the log nor hide in it: the first
refusal is logged at once, the rest of a burst is counted and logged when the
interval ends, with the callers it came from.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Optional

logger = logging.getLogger("shardnet.runtimes.head")

# refused control calls are logged at most once per this many seconds, with how many there were
REFUSAL_LOG_INTERVAL = 1.0
# callers a line of a burst names; past them it counts the others
MAX_NAMED_CALLERS = 5
# characters of a refusal's reason a line shows
MAX_REASON_CHARS = 300


class RefusalLog:
    """Refused control calls of one head, logged at most once per ``interval`` seconds."""

    def __init__(self, deployment: str, interval: float = REFUSAL_LOG_INTERVAL):
        self._deployment = deployment
        self._interval = interval
        self._logged_at = -math.inf  # time.monotonic() of the last line
        self._held = 0  # refusals not logged yet
        self._callers: dict[str, int] = {}  # of those, by caller (the first MAX_NAMED_CALLERS)
        self._unnamed = 0  # of those, from callers past them
        self._latest = ""  # of those, the latest command and why it was refused
        self._flush: Optional[asyncio.TimerHandle] = None

    def note(self, command: str, caller: str, reason: str) -> None:
        """Record that ``command`` from ``caller`` was refused for ``reason``; log it now, or when the interval ends."""
        if len(reason) > MAX_REASON_CHARS:  # it quotes what the caller sent, which may be megabytes
            reason = f"{reason[:MAX_REASON_CHARS]}... ({len(reason)} characters)"
        now = time.monotonic()
        if not self._held and now - self._logged_at >= self._interval:
            self._logged_at = now
            logger.warning("%s: refused %s from %s: %s", self._deployment, command, caller, reason)
            return
        self._held += 1
        self._latest = f"{command}: {reason}"
        caller = _host_of(caller)  # each one-off call comes from a port of its own
        if caller in self._callers or len(self._callers) < MAX_NAMED_CALLERS:
            self._callers[caller] = self._callers.get(caller, 0) + 1
        else:
            self._unnamed += 1
        if self._flush is None:
            delay = max(0.0, self._logged_at + self._interval - now)
            self._flush = asyncio.get_running_loop().call_later(delay, self._say_held)

    def _say_held(self) -> None:
        self._flush = None
        callers = ", ".join(f"{caller} x{count}" for caller, count in self._callers.items())
        if self._unnamed:
            callers += f" and {self._unnamed} from other callers"
        logger.warning(
            "%s: refused %d more control calls within %gs, from %s; the latest %s",
            self._deployment, self._held, self._interval, callers, self._latest,
        )
        self._logged_at = time.monotonic()
        self._held, self._callers, self._unnamed = 0, {}, 0

    def close(self) -> None:
        """Log what is held now, and stop the timer (the head is stopping)."""
        if self._flush is not None:
            self._flush.cancel()
            self._say_held()


def _host_of(peer: str) -> str:
    """A gRPC peer (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:51234``, ``unix:...``) without its port."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer
