"""Balancers: RoundRobin rotates, PeakEwma prefers the fast and the idle replica."""

from __future__ import annotations

import random

import pytest

from shardnet import ConfigurationError, DataRequest, GrpcConnectionPool, PeakEwma, RoundRobin
from shardnet.networking.balancing import make_balancer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_rotates_and_survives_a_shrinking_list():
    balancer = RoundRobin()
    assert [balancer.pick("abc") for _ in range(4)] == ["a", "b", "c", "a"]
    assert [balancer.pick("xy") for _ in range(3)] == ["y", "x", "y"]


def served(balancer, clock, connection, seconds, failed=False):
    token = balancer.started(connection)
    clock.now += seconds
    balancer.finished(connection, token, failed=failed)


def test_peak_ewma_prefers_the_faster_replica():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(7))
    served(balancer, clock, "slow", 0.5)
    served(balancer, clock, "fast", 0.01)
    assert all(balancer.pick(["slow", "fast"]) == "fast" for _ in range(20))
    assert balancer.cost("slow", clock.now) > balancer.cost("fast", clock.now)


def test_peak_ewma_counts_outstanding_requests():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(1))
    served(balancer, clock, "a", 0.1)
    served(balancer, clock, "b", 0.1)
    tokens = [balancer.started("a") for _ in range(3)]
    assert balancer.outstanding("a") == 3
    assert balancer.pick(["a", "b"]) == "b"
    for token in tokens:
        balancer.finished("a", token)
    assert balancer.outstanding("a") == 0


def test_peak_ewma_a_hanging_request_counts_by_its_age():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock)
    served(balancer, clock, "a", 0.01)
    balancer.started("a")
    clock.now += 5.0  # still out, far longer than its average
    assert balancer.cost("a", clock.now) >= 5.0


def test_peak_ewma_failure_is_penalised_and_peak_decays():
    clock = FakeClock()
    balancer = PeakEwma(decay=1.0, failure_penalty=1.0, clock=clock)
    served(balancer, clock, "a", 0.001, failed=True)
    assert balancer.cost("a", clock.now) == pytest.approx(1.0)
    clock.now += 5.0
    assert balancer.cost("a", clock.now) < 0.01  # forgiven after a few decay periods
    balancer.forget("a")
    assert balancer.cost("a", clock.now) == 0.0


def test_unknown_balancer_name():
    assert isinstance(make_balancer("p2c_ewma"), PeakEwma)
    with pytest.raises(ConfigurationError, match="unknown balancer"):
        make_balancer("random")
    with pytest.raises(ConfigurationError):
        GrpcConnectionPool(balancer="random")


async def test_slow_replica_gets_fewer_picks(pool_factory, echo_servers):
    slow, fast = await echo_servers(2, names=["slow", "fast"])
    slow.delay = 0.1
    pool = pool_factory(balancer="p2c_ewma")
    pool.add_connection("dep", slow.address)
    pool.add_connection("dep", fast.address)
    for _ in range(40):
        await pool.send_request(DataRequest(), "dep", timeout=5.0)[0]
    assert slow.calls + fast.calls == 40
    assert slow.calls <= 3, (slow.calls, fast.calls)
