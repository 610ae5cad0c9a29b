"""Which replica of a shard gets the next request.

``RoundRobin`` rotates. ``PeakEwma`` is power-of-two-choices over a cost of
(decaying peak latency) x (outstanding requests + 1), where a request still
out for longer than the average counts by its age, so a replica that hangs
loses its share at once instead of after its requests time out (the Finagle
and Linkerd balancer). A replica it has no history for (new, or forgotten on
readmission) starts at the median estimate of its peers rather than at zero,
so it competes on equal terms instead of taking a whole burst; two idle
replicas whose costs are within a small margin of each other are a coin
flip, so identical replicas share one-at-a-time traffic instead of the
lower estimate taking it all.
Balancers own the in-flight bookkeeping; replica lists tell them when a
request starts and ends, and whether its end told anything about the replica.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
import types
from typing import Any, Optional, Protocol, Sequence

from shardnet.errors import ConfigurationError
from shardnet.networking.policies import check_seconds


class Balancer(Protocol):
    """What a replica list needs of a balancer: a pick, and the start and end of every request."""

    def pick(self, candidates: Sequence[Any]) -> Any:
        """The candidate (a non-empty sequence) the next request goes to."""

    def started(self, connection: Any) -> Any:
        """A request to ``connection`` starts; the token returned is handed back when it ends."""

    def finished(self, connection: Any, token: Any, failed: bool = False) -> None:
        """The request ended with an answer, or ``failed`` by the replica's fault (an error, a timeout)."""

    def abandoned(self, connection: Any, token: Any) -> None:
        """The request ended without an answer because its own caller cancelled it: no longer outstanding, and
        no failure of the replica; at most a lower bound of its latency."""

    def forget(self, connection: Any) -> None:
        """Drop what is known of ``connection`` (removed, ejected or readmitted: its past no longer counts)."""


class RoundRobin:
    """Each pick takes the next candidate in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Any]) -> Any:
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]

    def started(self, connection: Any) -> None:
        return None

    def finished(self, connection: Any, token: Any, failed: bool = False) -> None:
        return None

    def abandoned(self, connection: Any, token: Any) -> None:
        """Nothing to undo: rotation keeps no per-request state."""
        return None

    def forget(self, connection: Any) -> None:
        return None


class _Load:
    """One replica's latency estimate and its requests still out (token -> start, oldest first)."""

    __slots__ = ("ewma", "stamp", "outstanding", "prior", "failures")

    def __init__(self, ewma: float, now: float):
        self.ewma = ewma
        self.stamp = now
        self.outstanding: dict[int, float] = {}
        self.prior = True  # ewma is a seed, not a measurement: the first request's latency replaces it outright
        # its last requests in a row that failed by its fault, or were given up on after longer than its
        # estimate: each doubles the quiet before it is probed (a hung replica's probes are callers' waits)
        self.failures = 0


# the most doublings of probe_after a replica failing again and again waits before a probe: 64 s by default
MAX_PROBE_BACKOFF = 6
# the most doublings of a replica's cost for its failures in a row: its first failure weighs failure_penalty, each
# further one twice as much, so a replica failing every call at once never undercuts loaded healthy peers
MAX_FAILURE_DOUBLINGS = 20
# a request given up on after this share of its replica's estimate or more counts against it (``abandoned``)
ABANDONED_AS_SLOW = 0.9


class PeakEwma:
    """Power of two choices weighted by peak-EWMA latency times outstanding requests.

    ``default_latency`` seeds the first replica it learns of (later ones start at the median of their peers);
    costs of two idle replicas within ``tie_margin`` (relative) of each other are a coin flip, so noise between
    identical replicas does not send all one-at-a-time traffic to one of them. A replica with nothing out and
    no answer for ``probe_after`` seconds, picked against a rival heard of since, weighs at most as the rival,
    and the probe's answer replaces its estimate: a single slow peak (a pause's held requests) no longer
    starves it until the estimate decays, for a minute. Each failure in a row (a timeout, a hung handler, a
    request given up on) doubles that quiet, up to 64 times: a hung replica's probes are callers' waits; and each
    after the first doubles its cost, as one failing at once would otherwise undercut loaded healthy peers.
    """

    name = "p2c_ewma"
    seed_sample = 15  # at most this many peers (the longest known) are read to seed a new load: O(1) per new replica

    def __init__(
        self,
        decay: float = 10.0,
        failure_penalty: float = 1.0,
        clock=time.monotonic,
        rng=None,
        *,
        default_latency: float = 0.0,
        tie_margin: float = 0.1,
        probe_after: float = 1.0,
    ):
        check_seconds(decay, "PeakEwma decay")
        check_seconds(failure_penalty, "PeakEwma failure_penalty")
        check_seconds(default_latency, "PeakEwma default_latency", zero=True)
        check_seconds(probe_after, "PeakEwma probe_after")
        if isinstance(tie_margin, bool) or not isinstance(tie_margin, (int, float)) or not 0 <= tie_margin < 1:
            raise ConfigurationError(f"PeakEwma tie_margin must be a fraction from 0 up to 1, got {tie_margin!r}")
        if not callable(clock) or (rng is not None and not callable(getattr(rng, "random", None))):
            raise ConfigurationError("PeakEwma clock must be callable and rng have a random() method")
        self._decay = decay
        self._failure_penalty = failure_penalty
        self._clock = clock
        self._rng = rng or random.Random()
        self._default_latency = default_latency
        self._tie_margin = tie_margin
        self._probe_after = probe_after
        self._loads: dict[Any, _Load] = {}
        self._tokens = itertools.count()

    def _seed(self, now: float) -> float:
        """The estimate a load without history starts at: the median of its peers' (a sample of them, decayed to
        ``now``), so a new or readmitted replica neither takes a burst for free nor starts starved."""
        peers = itertools.islice(self._loads.values(), self.seed_sample)
        estimates = [load.ewma * math.exp(-(now - load.stamp) / self._decay) for load in peers]
        return statistics.median(estimates) if estimates else self._default_latency

    def _load(self, connection: Any, now: float) -> _Load:
        load = self._loads.get(connection)
        if load is None:
            load = self._loads[connection] = _Load(self._seed(now), now)
        return load

    def _cost(self, load: _Load, now: float, doubled: bool = True) -> float:
        latency = load.ewma * math.exp(-(now - load.stamp) / self._decay)
        if load.outstanding:
            oldest_age = now - next(iter(load.outstanding.values()))
            latency = max(latency, oldest_age)
        if doubled and load.failures > 1:  # failing again and again: a fixed penalty is under a loaded peer's cost
            latency *= 1 << min(load.failures - 1, MAX_FAILURE_DOUBLINGS)
        return latency * (len(load.outstanding) + 1)

    def _stale(self, load: _Load, now: float) -> bool:
        """Idle and unheard of for ``probe_after`` (doubled for each failure in a row, up to 64 times): its
        estimate may be an old peak's."""
        idle_for = now - load.stamp
        if load.outstanding or idle_for <= self._probe_after:  # under load, what nearly every pick meets
            return False
        return not load.failures or idle_for > self._probe_after * (1 << min(load.failures, MAX_PROBE_BACKOFF))

    def cost(self, connection: Any, now: float) -> float:
        """What a pick at ``now`` weighs ``connection`` by; one without history by the estimate it would start at."""
        load = self._loads.get(connection)
        if load is None:
            return self._seed(now)
        return self._cost(load, now)

    def pick(self, candidates: Sequence[Any]) -> Any:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        if count == 2:  # the two choices are both candidates: no draw needed
            a, b = candidates
        else:
            draw = self._rng.random  # two uniform indexes, distinct; random() is several times cheaper than randrange()
            first = int(draw() * count)
            second = int(draw() * (count - 1))
            if second >= first:
                second += 1
            a, b = candidates[first], candidates[second]
        now = self._clock()
        loads = self._loads
        load_a = loads.get(a) or self._load(a, now)  # a replica new to it is seeded here, once
        load_b = loads.get(b) or self._load(b, now)
        stale_a, stale_b = self._stale(load_a, now), self._stale(load_b, now)
        # a failing replica left alone for its probe's quiet is due a probe: its failures' doubling no longer
        # holds it off, or, against a rival as idle (one request every few seconds), it waited minutes
        cost_a, cost_b = self._cost(load_a, now, not stale_a), self._cost(load_b, now, not stale_b)
        if stale_a != stale_b:  # one unheard of while its rival served: it weighs at most as the rival (a probe)
            if stale_a:
                cost_a = min(cost_a, cost_b)
            else:
                cost_b = min(cost_a, cost_b)
        if cost_b < cost_a:
            a, b, cost_a, cost_b = b, a, cost_b, cost_a
        # two idle replicas whose estimates differ by noise: a coin flip, or the first would take all of
        # one-at-a-time traffic; under load a near tie is no such thing (the one with requests out may be slow)
        if cost_b - cost_a <= cost_b * self._tie_margin and not (load_a.outstanding or load_b.outstanding):
            if self._rng.random() < 0.5:
                return b
        return a

    def started(self, connection: Any) -> int:
        token = next(self._tokens)
        now = self._clock()
        self._load(connection, now).outstanding[token] = now
        return token

    def _ended(self, connection: Any, token: int) -> tuple[Optional[_Load], float, float]:
        """The load request ``token`` was out on, its start and now; a None load when it was forgotten since."""
        load = self._loads.get(connection)
        started = None if load is None else load.outstanding.pop(token, None)
        if started is None:
            return None, 0.0, 0.0
        return load, started, self._clock()

    def finished(self, connection: Any, token: int, failed: bool = False) -> None:
        load, started, now = self._ended(connection, token)
        if load is None:
            return
        rtt = max(now - started, self._failure_penalty) if failed else now - started
        # peak: jump up at once; a seed, or an estimate nothing was heard of for probe_after before this request
        # started (a probe's), gives way to the new measurement outright
        if rtt > load.ewma or load.prior or (started - load.stamp > self._probe_after and not failed):
            load.ewma = rtt
            load.prior = False
        else:
            weight = math.exp(-(now - load.stamp) / self._decay)
            load.ewma = load.ewma * weight + rtt * (1.0 - weight)
        load.stamp = now
        load.failures = load.failures + 1 if failed else 0

    def abandoned(self, connection: Any, token: int) -> None:
        """The request ended without an answer, its caller having given up: no failure of the replica (a
        penalty would starve a healthy one), but it did take at least that long. A wait about as long as the
        estimate or longer (``ABANDONED_AS_SLOW``: the estimate may be an earlier such wait) raises the
        estimate to it (a hung replica whose callers all give up must not look fast) and counts as a failure
        in a row: its probes back off. Either way the replica was tried now, and its next probe waits: when
        nothing was noted, a hung replica's probes that each waited less than its estimate left no trace, and
        it was probed at almost every pick."""
        load, started, now = self._ended(connection, token)
        if load is None:
            return
        waited = now - started
        estimate = load.ewma * math.exp(-(now - load.stamp) / self._decay)  # decayed to now, as stamped now
        load.stamp = now  # tried now: a probe that was given up on waits its quiet again, like any other
        if waited >= estimate * ABANDONED_AS_SLOW:
            load.ewma = max(estimate, waited)
            load.prior = False
            load.failures += 1  # a probe soon would send one more caller into the same wait
        else:
            load.ewma = estimate

    def forget(self, connection: Any) -> None:
        """Drop the connection's history; its next load is seeded from its peers as a new replica's is."""
        self._loads.pop(connection, None)

    def outstanding(self, connection: Any) -> int:
        load = self._loads.get(connection)
        return len(load.outstanding) if load else 0


BALANCERS = types.MappingProxyType({RoundRobin.name: RoundRobin, PeakEwma.name: PeakEwma})  # read-only


def check_balancer(name: str) -> None:
    """Refuse a balancer name that is not one of ``BALANCERS``, naming those there are."""
    if not isinstance(name, str) or name not in BALANCERS:
        raise ConfigurationError(f"unknown balancer {name!r}: choose one of {', '.join(BALANCERS)}")


def make_balancer(name: str) -> Balancer:
    """A fresh balancer by name: ``round_robin`` or ``p2c_ewma``."""
    check_balancer(name)
    return BALANCERS[name]()
