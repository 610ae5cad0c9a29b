"""Which replica of a shard gets the next request.

``RoundRobin`` rotates. ``PeakEwma`` is power-of-two-choices over a cost of
(decaying peak latency) x (outstanding requests + 1), where a request still
out for longer than the average counts by its age, so a replica that hangs
loses its share at once instead of after its requests time out (the Finagle
and Linkerd balancer). Balancers own the in-flight bookkeeping; replica lists
tell them when a request starts and ends.
"""

from __future__ import annotations

import itertools
import math
import random
import time
import types
from typing import Any, Protocol, Sequence

from shardnet.errors import ConfigurationError


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Any]) -> Any: ...

    def started(self, connection: Any) -> Any: ...

    def finished(self, connection: Any, token: Any, failed: bool = False) -> None: ...

    def forget(self, connection: Any) -> None: ...


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

    def forget(self, connection: Any) -> None:
        return None


class _Load:
    __slots__ = ("ewma", "stamp", "outstanding")

    def __init__(self, now: float):
        self.ewma = 0.0
        self.stamp = now
        self.outstanding: dict[int, float] = {}


class PeakEwma:
    """Power of two choices weighted by peak-EWMA latency times outstanding requests."""

    name = "p2c_ewma"

    def __init__(self, decay: float = 10.0, failure_penalty: float = 1.0, clock=time.monotonic, rng=None):
        self._decay = decay
        self._failure_penalty = failure_penalty
        self._clock = clock
        self._rng = rng or random.Random()
        self._loads: dict[Any, _Load] = {}
        self._tokens = itertools.count()

    def _load(self, connection: Any) -> _Load:
        load = self._loads.get(connection)
        if load is None:
            load = self._loads[connection] = _Load(self._clock())
        return load

    def cost(self, connection: Any, now: float) -> float:
        load = self._loads.get(connection)
        if load is None:  # never used: nothing known against it
            return 0.0
        latency = load.ewma * math.exp(-(now - load.stamp) / self._decay)
        if load.outstanding:
            oldest_age = now - next(iter(load.outstanding.values()))
            latency = max(latency, oldest_age)
        return latency * (len(load.outstanding) + 1)

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
        return a if self.cost(a, now) <= self.cost(b, now) else b

    def started(self, connection: Any) -> int:
        token = next(self._tokens)
        self._load(connection).outstanding[token] = self._clock()
        return token

    def finished(self, connection: Any, token: int, failed: bool = False) -> None:
        load = self._loads.get(connection)
        if load is None:
            return
        started = load.outstanding.pop(token, None)
        if started is None:
            return
        now = self._clock()
        rtt = max(now - started, self._failure_penalty) if failed else now - started
        if rtt > load.ewma:
            load.ewma = rtt  # peak: jump up at once
        else:
            weight = math.exp(-(now - load.stamp) / self._decay)
            load.ewma = load.ewma * weight + rtt * (1.0 - weight)
        load.stamp = now

    def forget(self, connection: Any) -> None:
        self._loads.pop(connection, None)

    def outstanding(self, connection: Any) -> int:
        load = self._loads.get(connection)
        return len(load.outstanding) if load else 0


BALANCERS = types.MappingProxyType({RoundRobin.name: RoundRobin, PeakEwma.name: PeakEwma})  # read-only


def make_balancer(name: str) -> Balancer:
    """A fresh balancer by name: ``round_robin`` or ``p2c_ewma``."""
    try:
        return BALANCERS[name]()
    except KeyError:
        raise ConfigurationError(f"unknown balancer {name!r}: choose one of {', '.join(BALANCERS)}") from None
