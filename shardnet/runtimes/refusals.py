"""The head's log of refused control calls: every refusal said with its caller, at most once per interval.

A guesser of the control token, or a peer trying to make the head a bridge to a
loopback-only port, must neither flood the log nor hide in it: the first
refusal is logged at once, the rest of a burst is counted and logged when the
interval ends, with the callers it came from.
"""

from __future__ import annotations

import logging

from shardnet.runtimes.bursts import BURST_INTERVAL, BurstLog
from shardnet.runtimes.log_lines import quoted

logger = logging.getLogger("shardnet.runtimes.head")

# refused control calls are logged at most once per this many seconds, with how many there were
REFUSAL_LOG_INTERVAL = BURST_INTERVAL
# characters of a refusal's reason a line shows
MAX_REASON_CHARS = 300


class RefusalLog(BurstLog):
    """Refused control calls of one head, logged at most once per ``interval`` seconds, a burst's by caller."""

    def __init__(self, deployment: str, interval: float = REFUSAL_LOG_INTERVAL):
        super().__init__(
            logger, deployment, "%s: refused %d more control calls within %gs, from %s; the latest %s",
            interval=interval,
        )

    def note(self, command: str, caller: str, reason: str) -> None:  # type: ignore[override]
        """Record that ``command`` from ``caller`` was refused for ``reason``; log it now, or when the interval ends."""
        reason, caller = quoted(reason, MAX_REASON_CHARS), quoted(caller)  # it quotes what the caller sent
        # a burst's counted by host: each one-off call comes from a port of its own
        super().note(
            _host_of(caller), f"{command}: {reason}",
            "%s: refused %s from %s: %s", self._subject, command, caller, reason,
        )


def _host_of(peer: str) -> str:
    """A gRPC peer (``ipv4:10.0.0.7:51234``, ``ipv6:[::1]:51234``, ``unix:...``) without its port."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer
