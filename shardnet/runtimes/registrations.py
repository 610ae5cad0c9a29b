"""What a head remembers of the workers that registered with it by ACTIVATE.

One record per (address, shard): the lease that removes a worker which stops
renewing, and the process id it announced (a new id on a known address is a
worker restarted there). Leases that ran out lately are remembered apart, so a
worker coming back soon after can be told why it dropped out. The head owns
the pool and does the removing; this book only keeps the times and ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

Key = tuple[str, int]  # (address, shard id)


@dataclass
class Registration:
    """One worker's registration: until when it is leased (None: no lease) and for how long, and its process id."""

    until: Optional[float] = None
    lease: Optional[float] = None
    instance: Optional[str] = None
    renewed: Optional[float] = None  # when it was last renewed
    renews: bool = False  # its last ACTIVATE announced an interval it renews at (Jina's, sent once, does not)


@dataclass(frozen=True)
class Lapse:
    """A lease that ran out: when, how long it was, and the process id that held it (None: none announced)."""

    at: float
    lease: float
    instance: Optional[str] = None


class Registrations:
    """The head's book of registrations and recent lapses, keyed by (address, shard)."""

    def __init__(self, lapse_memory: float):
        self._held: dict[Key, Registration] = {}
        self._lapsed: dict[Key, Lapse] = {}
        self._lapse_memory = lapse_memory  # seconds a lapse is remembered, or its lease if longer

    def announce(self, key: Key, instance: Optional[str]) -> bool:
        """Record the process id an ACTIVATE carried; True when another one was recorded for ``key`` before
        (a worker restarted on that address). No id (a Jina worker, or one too long to keep) changes nothing."""
        if instance is None:
            return False
        held = self._held.setdefault(key, Registration())
        restarted = held.instance is not None and held.instance != instance
        held.instance = instance
        return restarted

    def renew(self, key: Key, now: float, lease: float, renews: bool = False) -> Optional[Lapse]:
        """Lease ``key`` for ``lease`` seconds from ``now`` (``renews``: its ACTIVATE said it renews); the lapse
        this renewal ends, if it came back after one."""
        held = self._held.setdefault(key, Registration())
        held.until, held.lease, held.renewed, held.renews = now + lease, lease, now, renews
        return self._lapsed.pop(key, None)

    def forget(self, key: Key) -> None:
        """Drop everything of a worker that left cleanly (DEACTIVATE): a return is no lapse."""
        self._held.pop(key, None)
        self._lapsed.pop(key, None)

    def leased(self, key: Key) -> Optional[float]:
        """The length of ``key``'s lease, or None when it holds none."""
        held = self._held.get(key)
        return None if held is None else held.lease

    def renews(self, key: Key) -> bool:
        """Whether ``key``'s last ACTIVATE announced that it renews (an interval)."""
        held = self._held.get(key)
        return held is not None and held.renews

    def instance(self, key: Key) -> Optional[str]:
        """The process id ``key`` announced last, if any."""
        held = self._held.get(key)
        return None if held is None else held.instance

    def postpone(self, seconds: float) -> None:
        """Move every lease on by ``seconds``: the head stalled that long, and could not hear renewals meanwhile."""
        for held in self._held.values():
            if held.until is not None:
                held.until += seconds

    def expired(self, now: float) -> list[Key]:
        """The registrations whose lease ran out before ``now``; forgets lapses older than their memory."""
        self._lapsed = {
            key: lapse for key, lapse in self._lapsed.items() if now - lapse.at < max(lapse.lease, self._lapse_memory)
        }
        return self.expiring(now)

    def expiring(self, by: float) -> list[Key]:
        """The registrations whose lease runs out before ``by``."""
        return [key for key, held in self._held.items() if held.until is not None and held.until < by]

    def postpone_one(self, key: Key, seconds: float) -> None:
        """Move ``key``'s lease on by ``seconds``, its last renewal's time kept (``renewed_at``)."""
        held = self._held.get(key)
        if held is not None and held.until is not None:
            held.until += seconds

    def renewed_at(self, key: Key) -> Optional[float]:
        """When ``key``'s lease was last renewed, or None when it holds none."""
        held = self._held.get(key)
        return None if held is None else held.renewed

    def lapse(self, key: Key, now: float) -> bool:
        """End ``key``'s registration for a lease that ran out, remembering the lapse; False when a renewal or a
        DEACTIVATE got there since ``expired`` listed it (it is then not the caller's to remove)."""
        held = self._held.get(key)
        if held is None or held.until is None or held.until >= now:
            return False
        del self._held[key]
        self._lapsed[key] = Lapse(now, held.lease, held.instance)
        return True
