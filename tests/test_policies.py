"""RetryPolicy, RetryBudget and EjectionPolicy as values, and ejection/readmission against real replicas."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shardnet import ConfigurationError, DataRequest, EjectionPolicy, ReplicaList, RetryBudget, RetryPolicy


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- RetryBudget ---------------------------------------------------------------------


def test_retry_budget_ratio():
    budget = RetryBudget(ratio=0.2, min_per_second=0, window=10.0, clock=FakeClock())
    for _ in range(10):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    assert (budget.retries, budget.requests, budget.refused) == (2, 10, 1)
    assert "2/10" in repr(budget)


def test_retry_budget_floor_lets_a_quiet_deployment_retry():
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=3.0, clock=FakeClock())
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_retry_budget_window_forgets_old_traffic():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=2.0, clock=clock)
    for _ in range(4):
        budget.record_request()
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    clock.now += 1.0  # still inside the window
    assert not budget.try_spend()
    clock.now += 1.0  # the first second left the window: requests and retries are forgotten
    assert (budget.requests, budget.retries) == (0, 0)
    assert not budget.try_spend()  # no recent traffic, no floor
    budget.record_request()
    budget.record_request()
    assert budget.try_spend() and not budget.try_spend()


def test_retry_budget_window_moves_with_requests_alone():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, window=2.0, clock=clock)
    for second in range(5):  # one request a second: the window never holds more than two
        budget.record_request()
        assert budget.requests == min(second + 1, 2)
        clock.now += 1.0
    assert budget.total_requests == 5


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": -0.1}, {"ratio": 1.5}, {"min_per_second": -1}, {"window": 0}, {"ratio": "0.2"},
     {"ratio": float("nan")}, {"window": float("nan")}],
)
def test_retry_budget_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigurationError):
        RetryBudget(**kwargs)


# -- RetryPolicy and EjectionPolicy values --------------------------------------------


def test_retry_policy():
    policy = RetryPolicy()
    assert policy.is_retryable(grpc.StatusCode.UNAVAILABLE)
    assert not policy.is_retryable(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert policy.is_retryable(grpc.StatusCode.DEADLINE_EXCEEDED, timed_out_attempt=True)
    assert not policy.is_retryable(grpc.StatusCode.INTERNAL)
    with pytest.raises(ConfigurationError):
        RetryPolicy(rounds=0)
    with pytest.raises(ConfigurationError, match="INVALID_ARGUMENT"):
        RetryPolicy(retry_on=frozenset({grpc.StatusCode.INVALID_ARGUMENT}))
    with pytest.raises(ConfigurationError):
        RetryPolicy(attempt_timeout=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RetryPolicy(attempt_timeout="1"),
        lambda: RetryPolicy(attempt_timeout=float("nan")),  # every call would fail at once
        lambda: RetryPolicy(rounds="2"),
        lambda: RetryPolicy(rounds=2.5),
        lambda: RetryPolicy(retry_on={"UNAVAILABLE"}),  # names as text match no status code
        lambda: RetryPolicy(backoff_max=float("nan")),
        lambda: EjectionPolicy(consecutive_failures="3"),
        lambda: EjectionPolicy(base_ejection=float("nan")),
        lambda: EjectionPolicy(failure_codes={"UNAVAILABLE"}),
        lambda: RetryPolicy(attempt_timeout=1e10),  # gRPC takes it as expired: every call failed at once, blamed
        lambda: RetryPolicy(retry_on=None),  # a bare TypeError before
        lambda: RetryPolicy(backoff_max=1e300),  # asyncio's clock overflows in a sleep that long
        lambda: EjectionPolicy(failure_codes=None),
    ],
)
def test_policies_refuse_values_of_the_wrong_kind_by_name(make):
    with pytest.raises(ConfigurationError, match=r"(RetryPolicy|EjectionPolicy)\.\w+"):
        make()


def test_codes_given_as_a_generator_or_a_list_are_kept_as_a_frozenset():
    """A generator was used up by the check, and the policy retried nothing; a list made it unhashable."""
    once = RetryPolicy(retry_on=(code for code in [grpc.StatusCode.UNAVAILABLE]))
    assert once.is_retryable(grpc.StatusCode.UNAVAILABLE)
    assert hash(RetryPolicy(retry_on=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])) == hash(RetryPolicy())
    assert EjectionPolicy(failure_codes=[grpc.StatusCode.INTERNAL]).failure_codes == frozenset({grpc.StatusCode.INTERNAL})


def test_ejection_time_doubles_up_to_the_cap():
    policy = EjectionPolicy(base_ejection=0.5, max_ejection=3.0)
    assert [policy.ejection_time(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    # a crash loop re-registering for hours: 2**1024 is no float, and the ejecting request failed with OverflowError
    assert policy.ejection_time(2000) == 3.0 and EjectionPolicy().ejection_time(10**9) == EjectionPolicy().max_ejection
    tiny = EjectionPolicy(base_ejection=1e-300, max_ejection=1e9)  # max/base is no float: the cap is taken in logs
    assert tiny.ejection_time(1) == 1e-300 and tiny.ejection_time(10**6) == 1e9
    with pytest.raises(ConfigurationError):
        EjectionPolicy(consecutive_failures=0)
    with pytest.raises(ConfigurationError):
        EjectionPolicy(base_ejection=2.0, max_ejection=1.0)


# -- ejection against real replicas --------------------------------------------------


@pytest.fixture
async def ejecting_replicas():
    replicas = ReplicaList(ejection=EjectionPolicy(consecutive_failures=2, base_ejection=0.1, max_ejection=0.2))
    try:
        yield replicas
    finally:
        await replicas.close()


async def call(replicas, connection):
    return await replicas.call(connection, "single_data", DataRequest(endpoint="/e"), None, 5.0)


async def test_failing_replica_is_ejected_then_readmitted_when_serving(ejecting_replicas, echo_servers, eventually):
    sick, healthy = await echo_servers(2, names=["sick", "healthy"])
    sick.fail_with = grpc.StatusCode.UNAVAILABLE
    await sick.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    bad = ejecting_replicas.add_connection(sick.address)
    good = ejecting_replicas.add_connection(healthy.address)
    first_channel = bad.channel
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await call(ejecting_replicas, bad)
    assert list(ejecting_replicas.eligible()) == [good]
    assert bad.times_ejected == 1 and bad.channel is not first_channel  # rebuilt, not kept
    assert {ejecting_replicas.get_next_connection() for _ in range(4)} == {good}
    # the probe waits for SERVING: past several probe intervals it is still out
    await asyncio.sleep(0.5)
    assert bad not in ejecting_replicas.eligible()
    sick.fail_with = None
    await sick.health.set("", health_pb2.HealthCheckResponse.SERVING)
    await eventually(lambda: bad in ejecting_replicas.eligible(), timeout=5.0)
    _, trailing = await call(ejecting_replicas, bad)
    assert trailing["served-by"] == "sick"


async def test_an_ejection_after_a_success_names_only_the_failures_of_its_own_run(echo_servers, caplog):
    """The causes an ejection quotes are the run that ejected the replica: failures before a call that succeeded
    ended their run, and are not named with it. A review took recent_failures, kept across a success, for a
    leak of the old run into the ejection's line; record_failure keeps only the last consecutive_failures causes,
    which at an ejection are its own run's, and this keeps it so."""
    sick, healthy = await echo_servers(2, names=["sick", "healthy"])
    codes = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    replicas = ReplicaList(
        name="runs", ejection=EjectionPolicy(consecutive_failures=3, base_ejection=5.0, max_ejection=5.0,
                                             failure_codes=codes),
    )
    try:
        connection = replicas.add_connection(sick.address)
        replicas.add_connection(healthy.address)
        sick.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED  # an old run of two, short of an ejection
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await call(replicas, connection)
        sick.fail_with = None
        await call(replicas, connection)  # the run ends
        sick.fail_with = grpc.StatusCode.UNAVAILABLE
        with caplog.at_level("WARNING", logger="shardnet.networking.replica_list"):
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(replicas, connection)
        [ejection] = [record.getMessage() for record in caplog.records if "ejecting replica" in record.getMessage()]
        assert "after 3 failures in a row: UNAVAILABLE x3 (the last: " in ejection, ejection
        assert connection not in replicas.eligible()
    finally:
        await replicas.close()


async def test_last_replica_is_never_ejected(ejecting_replicas, echo_servers):
    [only] = await echo_servers(1, fail_with=grpc.StatusCode.UNAVAILABLE)
    connection = ejecting_replicas.add_connection(only.address)
    for _ in range(6):
        with pytest.raises(grpc.aio.AioRpcError):
            await call(ejecting_replicas, connection)
        assert ejecting_replicas.get_next_connection() is connection
    assert only.calls == 6 and connection.times_ejected == 0


async def test_other_codes_do_not_count_towards_ejection(ejecting_replicas, echo_servers):
    wrong, other = await echo_servers(2, fail_with=grpc.StatusCode.INVALID_ARGUMENT)
    connection = ejecting_replicas.add_connection(wrong.address)
    ejecting_replicas.add_connection(other.address)
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError):
            await call(ejecting_replicas, connection)
    assert connection in ejecting_replicas.eligible() and connection.failures == 0


async def test_pool_stops_sending_to_an_ejected_replica(pool_factory, echo_servers):
    sick, healthy = await echo_servers(2, names=["sick", "healthy"])
    sick.fail_with = grpc.StatusCode.UNAVAILABLE
    await sick.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    pool = pool_factory(ejection=EjectionPolicy(consecutive_failures=2, base_ejection=5.0, max_ejection=5.0))
    pool.add_connection("dep", sick.address)
    pool.add_connection("dep", healthy.address)
    for _ in range(10):
        _, trailing = await pool.send_request(DataRequest(), "dep")[0]
        assert trailing["served-by"] == "healthy"
    assert sick.calls == 2  # two failures, then out of rotation


async def test_removing_the_last_pickable_replica_lets_the_ejected_ones_back_at_once(echo_servers, pool_factory):
    # a replica ejected after a blip and healthy again, then its only peer leaves (scale-down, DEACTIVATE, a
    # lapsed lease): the shard must not sit with nothing to pick until the probe's timer fires
    blipped, leaving = await echo_servers(2, names=["blipped", "leaving"])
    blipped.fail_with = grpc.StatusCode.UNAVAILABLE
    pool = pool_factory(ejection=EjectionPolicy(consecutive_failures=2, base_ejection=60.0, max_ejection=60.0))
    pool.add_connection("dep", blipped.address)
    pool.add_connection("dep", leaving.address)
    replicas = pool.get_replicas("dep")
    [bad] = [c for c in replicas.get_all_connections() if str(c.address) == blipped.address]
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await call(replicas, bad)
    assert replicas.ejected_addresses == [blipped.address]
    blipped.fail_with = None
    await pool.remove_connection("dep", leaving.address)
    assert list(replicas.eligible()) == [bad] and replicas.ejected_addresses == []
    [task] = pool.send_request(DataRequest(), "dep")
    _, trailing = await task
    assert trailing["served-by"] == "blipped"
    assert not replicas._probes  # its probe stopped: a later ejection starts one of its own


async def test_an_old_blip_is_forgotten_once_the_replica_served_as_long_as_the_longest_ejection(echo_servers):
    sick, healthy = await echo_servers(2, names=["sick", "healthy"])
    replicas = ReplicaList(ejection=EjectionPolicy(consecutive_failures=1, base_ejection=0.5, max_ejection=30.0))
    try:
        bad = replicas.add_connection(sick.address)
        replicas.add_connection(healthy.address)
        sick.fail_with = grpc.StatusCode.UNAVAILABLE
        for expected in (1, 2, 3):  # blips in a row: each ejection twice the last
            with pytest.raises(grpc.aio.AioRpcError):
                await call(replicas, bad)
            assert bad.times_ejected == expected
            replicas._readmit_ejected()
        bad.admitted_at -= 30.0  # back for 30 s, the longest ejection: the next blip starts over
        with pytest.raises(grpc.aio.AioRpcError):
            await call(replicas, bad)
        assert bad.times_ejected == 1
    finally:
        await replicas.close()


async def test_the_same_replica_dialled_with_and_without_tls_is_refused_naming_both(pool_factory):
    pool = pool_factory()
    pool.add_connection("dep", "10.0.0.7:8443")
    with pytest.raises(ConfigurationError, match=r"'https://10.0.0.7:8443' is already a replica dialled without TLS"):
        pool.add_connection("dep", "https://10.0.0.7:8443")
    other = pool_factory()
    other.add_connection("dep", "https://10.0.0.7:8443")
    with pytest.raises(ConfigurationError, match=r"'grpc://10.0.0.7:8443' is already a replica dialled with TLS"):
        other.add_connection("dep", "grpc://10.0.0.7:8443")
    assert pool.get_replicas("dep").addresses == ["10.0.0.7:8443"]
    other.add_connection("dep", "https://10.0.0.7:8443")  # the same again: nothing to refuse
    # a bare host:port says nothing of TLS (an ACTIVATE names a worker so, whose static entry said https): kept
    [kept] = other.get_replicas("dep").get_all_connections()
    other.add_connection("dep", "10.0.0.7:8443")
    assert other.get_replicas("dep").get_all_connections() == [kept] and kept.address.tls
