"""Balancers: RoundRobin rotates, PeakEwma prefers the fast and the idle replica."""

from __future__ import annotations

import asyncio
import math
import random
import time

import grpc
import pytest

from shardnet import (
    ConfigurationError, DataRequest, GrpcConnectionPool, PeakEwma, ReplicaError, ReplicaList, RoundRobin,
)
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


def one_at_a_time(balancer, clock, candidates, requests, seconds, failing=(), gap=0.0) -> list:
    """``requests`` picks in a row, each served in ``seconds[replica]`` (failed on a replica in ``failing``) and
    ``gap`` seconds apart; the replicas picked, in order."""
    picks = []
    for _ in range(requests):
        connection = balancer.pick(candidates)
        picks.append(connection)
        served(balancer, clock, connection, seconds[connection], failed=connection in failing)
        clock.now += gap
    return picks


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
    for connection in pool.get_replicas("dep").get_all_connections():  # connected first: a first answer that
        assert await connection.health()  # paid for the connection (slow on a busy machine) is no latency sample
    for _ in range(40):
        await pool.send_request(DataRequest(), "dep", timeout=5.0)[0]
    assert slow.calls + fast.calls == 40
    assert slow.calls <= 3, (slow.calls, fast.calls)


def test_an_abandoned_request_is_no_failure_but_a_lower_bound_of_the_latency():
    from shardnet.networking.balancing import Balancer

    assert callable(getattr(Balancer, "abandoned", None))
    assert RoundRobin().abandoned("x", RoundRobin().started("x")) is None
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(3))
    served(balancer, clock, "a", 0.01)
    token = balancer.started("a")
    clock.now += 0.005  # its caller gives up sooner than the replica usually answers: nothing learnt
    balancer.abandoned("a", token)
    assert balancer.outstanding("a") == 0
    assert balancer.cost("a", clock.now) == pytest.approx(0.01 * math.exp(-0.005 / 10.0))  # no failure penalty
    token = balancer.started("a")
    clock.now += 0.5  # given up after half a second: it took at least that long (a hung replica must not look fast)
    balancer.abandoned("a", token)
    assert balancer.cost("a", clock.now) == pytest.approx(0.5)  # the time waited, not the 1 s failure penalty
    balancer.finished("a", token, failed=True)  # a late end of the same request changes nothing
    assert balancer.cost("a", clock.now) == pytest.approx(0.5)
    balancer.abandoned("unknown", 12345)  # harmless


def test_a_hung_replica_whose_callers_all_give_up_loses_its_share():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(5))
    for _ in range(5):
        served(balancer, clock, "a", 0.01)
        served(balancer, clock, "hung", 0.009)  # the faster one, until it hangs
    picks = []
    for _ in range(40):  # one at a time, each caller giving up after 0.5 s if no answer came
        chosen = balancer.pick(["a", "hung"])
        picks.append(chosen)
        if chosen == "hung":
            token = balancer.started(chosen)
            clock.now += 0.5
            balancer.abandoned(chosen, token)
        else:
            served(balancer, clock, chosen, 0.01)
    assert picks.count("hung") <= 2, picks


def test_a_hung_replica_probed_by_callers_who_give_up_before_its_estimate_is_not_probed_at_every_pick():
    """Abandoned waits shorter than its estimate left no trace: the replica stayed "unheard of" and was probed
    whenever drawn idle, a caller's wait each (a regression review's find: 115 of 247 picks in a minute)."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(1))
    served(balancer, clock, "R", 0.02)
    served(balancer, clock, "H", 0.8)  # slow, then it hangs
    picks = {"R": 0, "H": 0}
    end = clock.now + 60.0
    while clock.now < end:
        chosen = balancer.pick(["R", "H"])
        picks[chosen] += 1
        token = balancer.started(chosen)
        if chosen == "R":
            clock.now += 0.02
            balancer.finished(chosen, token)
        else:
            clock.now += 0.5  # its caller's deadline
            balancer.abandoned(chosen, token)
    assert picks["H"] <= 61 and picks["R"] > 1900, picks  # once a probe_after at most, as a finished probe is


def burst(balancer, candidates, requests):
    """``requests`` concurrent requests (each picked and started, none finished yet): the share of each."""
    shares = dict.fromkeys(candidates, 0)
    for _ in range(requests):
        connection = balancer.pick(candidates)
        balancer.started(connection)
        shares[connection] += 1
    return shares


def test_new_replica_starts_at_its_peers_median_and_does_not_take_a_burst():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(5))
    served(balancer, clock, "a", 0.05)
    served(balancer, clock, "b", 0.06)
    b_measured = clock.now
    served(balancer, clock, "c", 0.08)
    now = clock.now
    median = 0.06 * math.exp(-(now - b_measured) / 10.0)  # b's estimate, decayed as cost decays it
    assert balancer.cost("new", now) == pytest.approx(median)
    shares = burst(balancer, ["a", "b", "c", "new"], 60)
    assert shares["new"] <= 20, shares  # about a fair share (15), not most of the burst
    assert min(shares.values()) >= 8, shares


def test_a_seed_gives_way_to_the_first_measurement():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(5))
    served(balancer, clock, "a", 0.5)
    served(balancer, clock, "new", 0.01)  # seeded at 0.5, measured at 0.01: the measurement wins
    assert balancer.cost("new", clock.now) == pytest.approx(0.01)
    assert all(balancer.pick(["a", "new"]) == "new" for _ in range(20))


def test_forgotten_replica_is_seeded_from_its_peers_again():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(11))
    served(balancer, clock, "a", 0.001, failed=True)  # its estimate is the 1 s failure penalty
    served(balancer, clock, "b", 0.02)
    served(balancer, clock, "c", 0.02)
    balancer.forget("a")  # readmitted after ejection: neither starved by the penalty nor free
    assert balancer.cost("a", clock.now) == pytest.approx(0.02, rel=1e-3)
    shares = burst(balancer, ["a", "b", "c"], 30)
    assert shares["a"] <= 13, shares  # about a fair share (10)
    assert min(shares.values()) >= 7, shares


def test_identical_replicas_share_one_at_a_time_traffic():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(2))
    served(balancer, clock, "x", 0.01)
    served(balancer, clock, "y", 0.01)  # alike but for a sliver of decay: a near tie, not a verdict for x
    picks = [balancer.pick(["x", "y"]) for _ in range(100)]
    assert 30 <= picks.count("x") <= 70, picks.count("x")
    for seed in range(10):  # latency noise (a spread of 50 %) must not hand one replica nearly everything
        balancer = PeakEwma(clock=clock, rng=random.Random(seed))
        jitter = random.Random(seed)
        shares = {"x": 0, "y": 0}
        for _ in range(200):
            connection = balancer.pick(["x", "y"])
            shares[connection] += 1
            served(balancer, clock, connection, 0.001 * (1.0 + 0.5 * jitter.random()))
            clock.now += 0.0002
        assert min(shares.values()) >= 60, (seed, shares)


def test_a_clearly_slower_or_hung_replica_is_still_avoided():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(4))
    served(balancer, clock, "slow", 0.0125)  # 25 % slower: beyond the near-tie margin
    served(balancer, clock, "fast", 0.01)
    for _ in range(50):
        assert balancer.pick(["slow", "fast"]) == "fast"
        served(balancer, clock, "fast", 0.01)
    served(balancer, clock, "slow", 0.01)  # now alike
    balancer.started("slow")  # hangs
    clock.now += 0.05
    assert all(balancer.pick(["slow", "fast"]) == "fast" for _ in range(20))


async def test_a_callers_cancellation_or_short_deadline_is_no_failure_of_the_replica(echo_servers):
    # a call its own caller cancelled (a client gone) or gave too short a deadline says nothing against the
    # replica: before, each stamped a 1 s failure penalty on it, and a healthy replica got no sequential
    # traffic for some 40 s
    [replica] = await echo_servers(1, delay=0.2)
    balancer = PeakEwma()
    replicas = ReplicaList(balancer=balancer)
    try:
        connection = replicas.add_connection(replica.address)
        call = asyncio.ensure_future(replicas.call(connection, "single_data", DataRequest(endpoint="/e"), None, None))
        while not replica.calls:  # the replica has it: the caller then gives up
            await asyncio.sleep(0.005)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert balancer.outstanding(connection) == 0
        assert balancer.cost(connection, time.monotonic()) < 0.05  # no penalty: nothing was measured
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await replicas.call(connection, "single_data", DataRequest(endpoint="/e"), None, 0.02,
                                callers_deadline=True)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.0 < balancer.cost(connection, time.monotonic()) < 0.5  # the time it waited, not the 1 s penalty
        assert connection.failures == 0
    finally:
        await replicas.close()


async def test_a_hung_replicas_probes_back_off_however_short_its_callers_deadlines(echo_servers):
    """A caller's short deadline running out on a hung replica counted as an answer: its failures in a row went
    back to none, and it was probed once a probe_after, a caller's wait each, for as long as it hung (a
    faults review's find). It is given up on now, as a cancelled call is, and its quiet doubles."""
    [hung] = await echo_servers(1, delay=30.0)
    [fast] = await echo_servers(1)
    offset = [0.0]  # the balancer's clock runs ahead by this much: time passing without a wait
    balancer = PeakEwma(clock=lambda: time.monotonic() + offset[0], probe_after=1.0)
    replicas = ReplicaList(balancer=balancer)
    try:
        slow, quick = replicas.add_connection(hung.address), replicas.add_connection(fast.address)
        await replicas.call(quick, "single_data", DataRequest(endpoint="/e"), None, 5.0)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await replicas.call(slow, "single_data", DataRequest(endpoint="/e"), None, 0.05, callers_deadline=True)
        offset[0] += 1.5  # past probe_after, short of it doubled
        await replicas.call(quick, "single_data", DataRequest(endpoint="/e"), None, 5.0)  # its rival was heard of
        assert slow not in [balancer.pick([slow, quick]) for _ in range(40)]  # a probe was a coin flip
        offset[0] += 100.0  # past the longest quiet: probed again, once it is due
        await replicas.call(quick, "single_data", DataRequest(endpoint="/e"), None, 5.0)
        assert slow in [balancer.pick([slow, quick]) for _ in range(40)]
    finally:
        await replicas.close()


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"decay": 0}, "decay must be positive seconds"),
        ({"decay": float("nan")}, "decay must be positive seconds"),
        ({"decay": -1}, "decay must be positive seconds"),
        ({"failure_penalty": "1"}, "failure_penalty must be positive seconds"),
        ({"default_latency": -0.1}, "default_latency must be 0 or more seconds"),
        ({"tie_margin": "x"}, "tie_margin must be a fraction"),
        ({"tie_margin": 1.5}, "tie_margin must be a fraction"),
        ({"clock": 5}, "clock must be callable"),
        ({"rng": object()}, "rng have a random"),
    ],
)
def test_peak_ewma_refuses_what_would_fail_inside_a_call(arguments, message):
    with pytest.raises(ConfigurationError, match=message):
        PeakEwma(**arguments)


def test_a_replica_starved_by_one_peak_is_tried_again_after_probe_after():
    """A replica paused for 20 s answers what it held 20 s late: its estimate peaks at 20 s and, decaying over
    10 s, kept it from every pick for about a minute after it resumed (a review measured 59 s). Idle and unheard
    of for ``probe_after``, it is weighed at its peers' median: one request tests it, and it is back."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(3), probe_after=1.0)
    served(balancer, clock, "steady", 0.01)
    served(balancer, clock, "paused", 20.0)
    picks = one_at_a_time(balancer, clock, ["steady", "paused"], 400, {"steady": 0.005, "paused": 0.005})  # 2 s
    assert "paused" not in picks[:150], "tried again before probe_after passed"
    assert picks[250:].count("paused") >= 50, picks[250:].count("paused")  # its answer reset it: it shares again


def test_a_slow_replica_is_tested_once_per_probe_after_and_no_more():
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(5), probe_after=1.0)
    served(balancer, clock, "fast", 0.01)
    served(balancer, clock, "slow", 0.05)
    picks = one_at_a_time(balancer, clock, ["fast", "slow"], 300, {"fast": 0.01, "slow": 0.05})  # 3 s
    assert 1 <= picks.count("slow") <= 3, picks.count("slow")


def test_a_replica_failing_again_and_again_is_probed_ever_less_often():
    """Each probe of a hung replica is a user's request waiting out its deadline: each failure in a row doubles
    the quiet before the next, so a minute of traffic sends it a handful, not one a second."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(6), probe_after=1.0)
    served(balancer, clock, "healthy", 0.01)
    served(balancer, clock, "hung", 2.0, failed=True)
    # 60 s of one-at-a-time traffic; every request to the hung one fails
    picks = one_at_a_time(balancer, clock, ["healthy", "hung"], 6000, {"healthy": 0.01, "hung": 0.01}, failing={"hung"})
    assert 2 <= picks.count("hung") <= 6, picks.count("hung")  # probes after 2, 4, 8, 16 and 32 s of quiet


def test_a_replica_failing_every_call_at_once_draws_no_traffic_from_loaded_peers():
    """A replica answering RESOURCE_EXHAUSTED to everything (neither retried nor ejected) fails in a millisecond:
    it weighed its fixed 1 s penalty, less than a loaded healthy replica's latency times its requests out, and
    took most picks it was drawn into under load, every one a caller's failure (a review: 375 failed at
    concurrency 32). Each failure in a row after the first doubles its cost."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(7))
    healthy = ["ok0", "ok1", "ok2"]
    for replica in healthy:
        served(balancer, clock, replica, 0.1)
    for _ in range(3):
        served(balancer, clock, "failing", 0.001, failed=True)
    for replica in healthy:  # concurrency 32: about ten requests out on each
        for _ in range(10):
            balancer.started(replica)
    clock.now += 0.05
    picks = [balancer.pick(healthy + ["failing"]) for _ in range(1000)]
    assert picks.count("failing") == 0, picks.count("failing")


def test_a_replica_that_failed_many_times_in_a_row_is_probed_under_light_traffic_too():
    """The doubling of a failing replica's cost must not outlast its probe's quiet: under light traffic (a request
    every 2 s, longer than probe_after) its healthy rival is idle too, so no probe caps its cost, and a replica
    that failed 20 times in a row, recovered since, waited about three minutes (2**19 to decay) for a pick."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(3))
    served(balancer, clock, "ok", 0.01)
    served(balancer, clock, "flaky", 0.01)
    for _ in range(20):
        served(balancer, clock, "flaky", 0.001, failed=True)
    last_failure, first_pick = clock.now, None
    while clock.now - last_failure < 300:
        clock.now += 2.0
        picked = balancer.pick(["ok", "flaky"])
        if picked == "flaky":
            first_pick = clock.now - last_failure
            break
        served(balancer, clock, picked, 0.01)
    assert first_pick is not None and first_pick <= 70, first_pick  # its probe after 64 s of quiet


def test_a_replica_whose_held_requests_were_given_up_on_is_probed_soon_after():
    """A pause's held requests ended by their callers' deadlines (no answer): one failure in a row, so the probe
    comes after 2 s of quiet, not after the minute the raised estimate takes to decay."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(8), probe_after=1.0)
    served(balancer, clock, "steady", 0.005)
    token = balancer.started("paused")
    clock.now += 3.0
    balancer.abandoned("paused", token)
    # 3 s of one-at-a-time traffic, the paused replica healthy again
    picks = one_at_a_time(balancer, clock, ["steady", "paused"], 600, {"steady": 0.005, "paused": 0.005})
    assert "paused" not in picks[:150] and picks[500:].count("paused") >= 25, picks.count("paused")


def test_at_a_low_rate_a_much_slower_replica_is_not_probed_into_half_the_traffic():
    """A request every 1.5 s: both replicas are unheard of for probe_after at every pick, so neither is a probe
    against the other, and their estimates decide (it had been a coin flip: half the requests at 0.5 s)."""
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(9), probe_after=1.0)
    served(balancer, clock, "fast", 0.005)
    served(balancer, clock, "slow", 0.5)
    picks = one_at_a_time(balancer, clock, ["fast", "slow"], 100, {"fast": 0.005, "slow": 0.5}, gap=1.5)
    assert picks.count("slow") <= 10, picks.count("slow")


async def test_a_replica_answering_unimplemented_to_everything_draws_no_traffic(pool_factory, echo_servers):
    """UNIMPLEMENTED may be one replica's own fault (another server on its port): it counts as a failure, so a
    replica answering it to everything is avoided, not taken for the fastest."""
    [healthy] = await echo_servers(1)
    stranger = grpc.aio.server()  # no service at all: UNIMPLEMENTED to every call
    port = stranger.add_insecure_port("127.0.0.1:0")
    await stranger.start()
    try:
        pool = pool_factory(balancer="p2c_ewma")
        pool.add_connection("dep", f"127.0.0.1:{port}")
        pool.add_connection("dep", healthy.address)
        refused = 0
        for _ in range(200):
            try:
                await pool.send_request(DataRequest(), "dep")[0]
            except ReplicaError as error:
                assert error.code == grpc.StatusCode.UNIMPLEMENTED
                refused += 1
        assert refused <= 5 and healthy.calls == 200 - refused, refused
    finally:
        await stranger.stop(0)
