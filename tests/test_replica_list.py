"""ReplicaList: membership, round robin against real replicas, https address lookup."""

from __future__ import annotations

import asyncio

import gc
import logging
import time
import weakref
from typing import Any

import grpc
import pytest

from shardnet import ConfigurationError, DataRequest, EjectionPolicy, ReplicaList, RoutingError
from shardnet.networking import outliers
from shardnet.networking.connection import close_in_turn
from shardnet.networking.streams import rpc_error


@pytest.fixture
async def replicas():
    replica_list = ReplicaList(name="test/shard-0")
    try:
        yield replica_list
    finally:
        await replica_list.close()


async def test_round_robin_over_real_replicas(replicas, echo_servers):
    servers = await echo_servers(3)
    for server in servers:
        replicas.add_connection(server.address)
    served = []
    for _ in range(6):
        connection = replicas.get_next_connection()
        response, trailing = await replicas.call(connection, "single_data", DataRequest(endpoint="/x"), None, 5.0)
        assert response.endpoint == "/x"
        served.append(dict(tuple(trailing))["served-by"])
    assert served == ["echo-0", "echo-1", "echo-2"] * 2
    assert [server.calls for server in servers] == [2, 2, 2]


async def test_jinas_calls_of_a_replica_list_work(echo_servers):
    """Jina's ReplicaList is driven as ``add_connection(address, deployment_name=...)``, ``await
    get_next_connection(num_retries=3)`` and ``await reset_connection(address, deployment_name)``: they raised
    a TypeError, found a Connection that could not be awaited, and no reset_connection (found by a review)."""
    servers = await echo_servers(2)
    replicas = ReplicaList()
    try:
        first = replicas.add_connection(servers[0].address, deployment_name="probe")
        replicas.add_connection(servers[1].address, "probe")  # Jina's positional form
        assert "probe replica" in str(first.other_loop_error())  # the list has no name: the deployment's names it
        picked = [await replicas.get_next_connection(), await replicas.get_next_connection(num_retries=3)]
        assert picked == replicas.get_all_connections()
        assert replicas.get_next_connection() is first  # shardnet's own form, as before
        old = first.channel
        assert await replicas.reset_connection(servers[0].address, "probe") is first
        assert first.channel is not old  # a fresh channel, the replica kept
        response, _ = await replicas.call(first, "single_data", DataRequest(endpoint="/x"), None, 5.0)
        assert response.endpoint == "/x"
        assert await replicas.reset_connection("127.0.0.1:1", "probe") is None  # not here: nothing, as in Jina
        await replicas.remove_connection(servers[0].address)
        await replicas.remove_connection(servers[1].address)
        assert replicas.get_next_connection() is None
        with pytest.raises(RoutingError, match="no replica to pick"):  # Jina's form raises, as Jina's does
            await replicas.get_next_connection(num_retries=3)
    finally:
        await replicas.close()


async def test_add_twice_keeps_one_connection(replicas):
    first = replicas.add_connection("127.0.0.1:50001")
    assert replicas.add_connection("127.0.0.1:50001") is first
    assert replicas.add_connection("grpc://127.0.0.1:50001") is first
    assert replicas.get_all_connections() == [first] and len(replicas) == 1


async def test_remove_returns_connection_then_none(replicas):
    added = replicas.add_connection("127.0.0.1:50001")
    replicas.add_connection("127.0.0.1:50002")
    assert await replicas.remove_connection("127.0.0.1:50001") is added
    assert await replicas.remove_connection("127.0.0.1:50001") is None
    assert not replicas.has_connection("127.0.0.1:50001")
    assert replicas.addresses == ["127.0.0.1:50002"]
    assert await replicas.remove_connection("127.0.0.1:50002") is not None
    assert not replicas.has_connections() and replicas.get_next_connection() is None


async def test_https_address_is_looked_up_as_it_was_added(replicas):
    connection = replicas.add_connection("https://127.0.0.1:50003")
    assert connection.address.tls
    assert replicas.has_connection("https://127.0.0.1:50003")
    assert replicas.addresses == ["https://127.0.0.1:50003"]
    assert replicas.add_connection("https://127.0.0.1:50003") is connection
    assert await replicas.remove_connection("https://127.0.0.1:50003") is connection
    assert not replicas.has_connection("https://127.0.0.1:50003")
    assert await replicas.remove_connection("https://127.0.0.1:50003") is None


async def test_remove_keeps_the_rotation_over_the_rest(replicas):
    for port in (50001, 50002, 50003):
        replicas.add_connection(f"127.0.0.1:{port}")
    await replicas.remove_connection("127.0.0.1:50002")
    picks = {str(replicas.get_next_connection().address) for _ in range(4)}
    assert picks == {"127.0.0.1:50001", "127.0.0.1:50003"}


async def test_bad_address_raises_and_changes_nothing(replicas):
    with pytest.raises(ConfigurationError):
        replicas.add_connection("no-port")
    assert not replicas.has_connections()


async def test_close_forgets_everything(echo_servers):
    [server] = await echo_servers(1)
    replica_list = ReplicaList()
    replica_list.add_connection(server.address)
    await replica_list.close()
    assert not replica_list.has_connections() and replica_list.get_next_connection() is None


async def test_closing_channels_in_turn_lets_go_of_each_close_once_it_has_finished(replicas):
    """grpc.aio's channel close walks every task the loop still holds, finished ones too: close_in_turn held each
    close it started until the last had ended, so the 8,000 closes of a pool walked each other (15 s)."""
    connections = [replicas.add_connection(f"127.3.{index // 250}.{index % 250 + 1}:8080") for index in range(300)]
    closes: list[weakref.ref] = []
    held: list[int] = []  # at each close, how many closes started before it are still held by anyone

    async def close(connection) -> None:
        held.append(sum(ref() is not None for ref in closes))
        closes.append(weakref.ref(asyncio.current_task()))
        await connection.close(grace=0.5)

    await close_in_turn(close(connection) for connection in connections)
    assert len(held) == len(connections) and max(held) <= 2, f"up to {max(held)} finished closes were held"


async def test_closing_in_turn_raises_the_first_failure_once_every_close_has_ended(replicas):
    connections = [replicas.add_connection(f"127.3.0.{index + 1}:8080") for index in range(3)]

    async def failing() -> None:
        raise RuntimeError("first failure")

    with pytest.raises(RuntimeError, match="first failure"):
        await close_in_turn([failing(), *(connection.close(grace=0.5) for connection in connections)])
    assert all(connection.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN for connection in connections)


def live_channels() -> int:
    gc.collect()
    return sum(isinstance(obj, grpc.aio.Channel) for obj in gc.get_objects())


async def test_failing_channel_is_rebuilt_and_replaced_channels_do_not_pile_up(echo_servers, eventually):
    [sick] = await echo_servers(1, fail_with=grpc.StatusCode.UNAVAILABLE)
    replicas = ReplicaList(ejection=EjectionPolicy(consecutive_failures=1, min_rebuild_interval=0))
    try:
        connection = replicas.add_connection(sick.address)
        before = live_channels()
        first = connection.channel
        for _ in range(30):  # the only replica: never ejected, its channel rebuilt after every failure
            with pytest.raises(grpc.aio.AioRpcError):
                await replicas.call(connection, "single_data", DataRequest(), None, 5.0)
        assert connection.channel is not first and sick.calls == 30
        del first
        await eventually(lambda: live_channels() <= before + 1, timeout=5.0)
    finally:
        await replicas.close()


async def test_timeouts_rebuild_a_channel_at_most_once_per_interval_however_fast_they_come(echo_servers):
    """Under overload every call may time out; a rebuild per few failures would only slow the loop down more."""
    [slow] = await echo_servers(1, delay=1.0)
    replicas = ReplicaList(ejection=EjectionPolicy(consecutive_failures=1, min_rebuild_interval=60))
    try:
        connection = replicas.add_connection(slow.address)
        channels = [connection.channel]
        for _ in range(6):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await replicas.call(connection, "single_data", DataRequest(), None, 0.05)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if connection.channel is not channels[-1]:
                channels.append(connection.channel)
        assert len(channels) == 2  # the first timeout rebuilt it; the next five did not
        slow.fail_with, slow.delay = grpc.StatusCode.UNAVAILABLE, 0.0
        with pytest.raises(grpc.aio.AioRpcError):
            await replicas.call(connection, "single_data", DataRequest(), None, 5.0)
        assert connection.channel is not channels[-1]  # unreachable: a fresh channel reconnects without backoff
    finally:
        await replicas.close()


async def test_calls_failing_on_a_channel_already_replaced_do_not_rebuild_it_again(echo_servers):
    """A worker dying under many calls: the first failures rebuild its channel; the rest, on the old channel,
    tell nothing new (they used to rebuild it once per three)."""
    [dead] = await echo_servers(1, fail_with=grpc.StatusCode.UNAVAILABLE, delay=0.2)
    replicas = ReplicaList(ejection=EjectionPolicy(consecutive_failures=3, min_rebuild_interval=0))
    try:
        connection = replicas.add_connection(dead.address)
        channels = [connection.channel]

        async def one_call() -> None:
            with pytest.raises(grpc.aio.AioRpcError):
                await replicas.call(connection, "single_data", DataRequest(), None, 5.0)
            if connection.channel is not channels[-1]:
                channels.append(connection.channel)

        await asyncio.gather(*(one_call() for _ in range(12)))  # all on the first channel, failing together
        assert dead.calls == 12 and len(channels) == 2
    finally:
        await replicas.close()


async def call_until_ejected(replicas: ReplicaList, address: str, timeout: float, callers_deadline: bool) -> None:
    """Call the replica at ``address`` (one of two) until it is out of the picks, at most ten times."""
    [connection] = [each for each in replicas.get_all_connections() if str(each.address) == address]
    for _ in range(10):
        if not replicas.is_eligible(connection):
            return
        with pytest.raises(grpc.aio.AioRpcError):
            await replicas.call(
                connection, "single_data", DataRequest(endpoint="/x"), None, timeout, callers_deadline=callers_deadline
            )
    raise AssertionError(f"{address} was not ejected after 10 failures")


async def test_an_ejection_after_one_failure_counts_no_run(echo_servers, dead_address, caplog):
    # EjectionPolicy(consecutive_failures=1) ejected "after 1 failures in a row: UNAVAILABLE x1"
    caplog.set_level(logging.WARNING, logger="shardnet.networking.replica_list")
    [live] = await echo_servers(1)
    replicas = ReplicaList(name="dep/shard-0", ejection=EjectionPolicy(consecutive_failures=1))
    try:
        replicas.add_connection(dead_address)
        replicas.add_connection(live.address)
        await call_until_ejected(replicas, dead_address, 2.0, callers_deadline=False)
    finally:
        await replicas.close()
    [ejection] = [record.getMessage() for record in caplog.records if "ejecting replica" in record.getMessage()]
    assert " after 1 failure: UNAVAILABLE (the last: " in ejection, ejection


@pytest.mark.parametrize(
    "callers_deadline, whose", [(True, "the caller's deadline"), (False, "the pool's attempt timeout")]
)
async def test_an_ejection_names_its_failures_codes_and_whose_deadline_ran_out(
    echo_servers, dead_address, caplog, callers_deadline, whose
):
    """'ejecting replica ... after repeated failures' told a dead replica from a slow one in no way: it names
    the failures' status codes, and for a deadline whose it was (the caller's or the pool's per attempt)."""
    caplog.set_level(logging.WARNING, logger="shardnet.networking.replica_list")
    [slow] = await echo_servers(1, delay=5.0)
    [live] = await echo_servers(1)
    replicas = ReplicaList(name="dep/shard-0", ejection=EjectionPolicy(consecutive_failures=3, min_blamed_deadline=0.1))
    try:
        for address in (dead_address, slow.address, live.address):
            replicas.add_connection(address)
        await call_until_ejected(replicas, dead_address, 2.0, callers_deadline)
        await call_until_ejected(replicas, slow.address, 0.2, callers_deadline)
    finally:
        await replicas.close()
    dead, slowed = [record.getMessage() for record in caplog.records if "ejecting replica" in record.getMessage()]
    assert dead.startswith(f"dep/shard-0: ejecting replica {dead_address} for ")
    assert " after 3 failures in a row: UNAVAILABLE x3 (the last: 'failed to connect" in dead
    assert dead.endswith("Connection refused (111)')"), dead  # why, not only UNAVAILABLE (a TLS review's find)
    assert slowed.endswith(f" after 3 failures in a row: DEADLINE_EXCEEDED ({whose} of 0.2s) x3")


async def test_an_answer_from_a_replica_ends_its_run_of_short_deadlines_missed(echo_servers, eventually, monkeypatch):
    """A replica missing callers' short deadlines while the others answer them is blamed for its misses only
    since its last answer (and once its health check fails), and a single replica (no other answering) for none.
    The others' calls had a hair more time left than its own (callers with one deadline, the pool's time before
    each call apart): they count."""
    monkeypatch.setattr(outliers, "HEALTH_TIMEOUT", 0.2)  # its checks go unanswered: fail sooner
    slow, quick = await echo_servers(2)
    slow.delay = slow.health_delay = 30.0
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging = replicas.add_connection(slow.address)

        async def miss() -> None:
            with pytest.raises(grpc.aio.AioRpcError):
                await call_once(replicas, lagging, 0.05)

        async def answer() -> None:  # on another endpoint: its health check decides, as no answer to /x blames it
            await call_once(replicas, answering, 0.051, endpoint="/y")

        for _ in range(3):
            await miss()
        assert lagging.failures == 0 and slow.health_checks == 0  # alone: nobody answered in its place
        answering = replicas.add_connection(quick.address)
        slow.delay = 0.0
        await call_once(replicas, lagging, 0.05)
        slow.delay = 30.0
        await miss()
        for _ in range(5):
            await answer()
        await eventually(lambda: lagging.failures == 1)  # the one miss since its answer, once its check failed
        assert replicas.is_eligible(lagging) and slow.health_checks == 1
        await miss()
        await miss()
        await answer()
        assert replicas.is_eligible(lagging) and slow.health_checks == 1  # one answer for two misses: not asked yet
        await answer()
        await eventually(lambda: not replicas.is_eligible(lagging))
    finally:
        await replicas.close()


async def hung_and_answering(echo_servers) -> tuple[ReplicaList, Any, Any, Any]:
    """A list over a replica hung to calls and health checks alike (SIGSTOP-like) and one answering at once."""
    hung, quick = await echo_servers(2)
    hung.delay = hung.health_delay = 30.0
    replicas = ReplicaList(name="dep/shard-0")
    return replicas, replicas.add_connection(hung.address), replicas.add_connection(quick.address), hung


def lagging_checks() -> list[asyncio.Task]:
    """The health checks of replicas missing short deadlines running in this loop."""
    return [task for task in asyncio.all_tasks() if task.get_name() == outliers._LAGGING_CHECK]


async def call_once(replicas: ReplicaList, connection, timeout: float, endpoint: str = "/x") -> None:
    """One data call to ``endpoint`` (named in its metadata, as a head sends it) with a caller's ``timeout``."""
    request = DataRequest(endpoint=endpoint)
    metadata = (("endpoint", endpoint),)
    await replicas.call(connection, "single_data", request, metadata, timeout, callers_deadline=True)


async def test_a_replica_missing_short_deadlines_is_health_checked_one_check_at_a_time(echo_servers, eventually):
    """However many misses and answers come while its check is pending, a replica has one health check at a time;
    its own answer ends its run and cuts the check."""
    replicas, lagging, answering, hung = await hung_and_answering(echo_servers)
    try:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await call_once(replicas, lagging, 0.05)
            await asyncio.gather(*(call_once(replicas, answering, 0.05, endpoint="/y") for _ in range(10)))
        await eventually(lambda: hung.health_checks == 1)
        [check] = lagging_checks()
        assert lagging.failures == 0 and replicas.is_eligible(lagging)
        hung.delay = 0.0
        await call_once(replicas, lagging, 0.05)  # it answers: not hung, its run and its check are over
        await eventually(check.done)
        assert check.cancelled() and not lagging_checks() and replicas.is_eligible(lagging)
        assert hung.health_checks == 1
    finally:
        await replicas.close()


@pytest.mark.parametrize("how", ["closed", "removed"])
async def test_a_pending_health_check_of_a_lagging_replica_ends_with_the_list_or_the_replica(echo_servers, how):
    """A health check under way when the list closes (or the replica is removed) is cut and ended: no task left
    pending, nothing blamed."""
    replicas, lagging, answering, hung = await hung_and_answering(echo_servers)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await call_once(replicas, lagging, 0.05)
        await call_once(replicas, answering, 0.05, endpoint="/y")
        [check] = lagging_checks()
        if how == "removed":
            await replicas.remove_connection(hung.address, grace=0)
            await asyncio.wait([check], timeout=1.0)
    finally:
        await replicas.close()
    assert check.cancelled() and not lagging_checks() and lagging.failures == 0


async def test_a_replica_missing_short_deadlines_is_blamed_at_once_when_others_answer_its_kind(echo_servers):
    """Misses the others answer on the same endpoint (a stuck or uniformly slow replica, its health SERVING) are
    blamed as they are met, no health check asked."""
    slow, quick = await echo_servers(2)
    slow.delay = 30.0
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging, answering = replicas.add_connection(slow.address), replicas.add_connection(quick.address)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await call_once(replicas, lagging, 0.05)
        await call_once(replicas, answering, 0.05)
        assert lagging.failures == 0  # one answer for two misses
        await call_once(replicas, answering, 0.05)
        assert lagging.failures == 2 and slow.health_checks == 0 and not lagging_checks()
    finally:
        await replicas.close()


async def test_a_lagging_replica_whose_channel_is_rebuilt_under_its_check_is_not_blamed(echo_servers, eventually):
    """A regression review's find: a busy replica's check cut by its channel's rebuild (a TLS renewal, a reset)
    said "its channel was closed under the check" and blamed the run. It says nothing: the run stays, unblamed,
    and a later answer asks again."""
    busy, quick = await echo_servers(2)
    busy.delay, busy.health_delay = 30.0, 0.5
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging, answering = replicas.add_connection(busy.address), replicas.add_connection(quick.address)
        with pytest.raises(grpc.aio.AioRpcError):
            await call_once(replicas, lagging, 0.05)
        await call_once(replicas, answering, 0.05, endpoint="/y")
        [check] = lagging_checks()
        await eventually(lambda: busy.health_checks == 1)
        lagging.rebuild()
        await asyncio.wait([check], timeout=2.0)
        assert check.done() and lagging.failures == 0 and lagging.recent_failures == []
        assert replicas.is_eligible(lagging)
        await call_once(replicas, answering, 0.05, endpoint="/y")  # the run stays: asked again
        await eventually(lambda: busy.health_checks == 2)
    finally:
        await replicas.close()


async def test_a_health_check_says_why_a_replica_does_not_serve_and_whether_it_said_it_drains(replicas, echo_servers):
    """A pool sets aside a replica whose own word is that it drains (its health NOT_SERVING) and ejects one that
    fails its check otherwise: the check's answer carries which, not only the words ``shardnet status`` prints."""
    from grpc_health.v1 import health_pb2

    serving, draining, slow, gone = await echo_servers(4, names=["serving", "draining", "slow", "gone"])
    await draining.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    slow.health_delay = 1.0
    connections = {server.name: replicas.add_connection(server.address) for server in (serving, draining, slow, gone)}
    await gone.stop()
    problems = {name: await connection.problem(0.3) for name, connection in connections.items()}
    assert problems["serving"] is None
    assert (str(problems["draining"]), problems["draining"].draining) == ("health NOT_SERVING", True)
    assert (str(problems["slow"]), problems["slow"].draining) == ("not answering within 0.3s", False)
    assert str(problems["gone"]).startswith("unreachable: ") and not problems["gone"].draining


def test_outlier_detection_groups_a_call_by_the_endpoint_its_replica_runs():
    # of two endpoint pairs, heads and workers run the last: the call's latency is compared under that endpoint
    from shardnet.networking.outliers import _call_kind

    assert _call_kind("single_data", (("endpoint", "/a"), ("x", "y"), ("endpoint", "/b"))) == ("single_data", "/b")
    assert _call_kind("single_data", (("x", "y"),)) == ("single_data", None)
    # the pool's own metadata (a grpc.aio.Metadata, read by one lookup): the same kinds
    pairs = (("endpoint", "/a"), ("x", "y"), ("endpoint", "/b"))
    assert _call_kind("single_data", grpc.aio.Metadata(*pairs)) == ("single_data", "/b")
    assert _call_kind("data", grpc.aio.Metadata(("x", "y"))) == ("data", None)
    assert _call_kind("data", grpc.aio.Metadata()) == ("data", None)


class _StallThenDeadline:
    """Stubs whose every data call blocks the whole process for ``stall`` seconds (as a SIGSTOP freezes gRPC's
    timers and the loop alike) and then ends DEADLINE_EXCEEDED, as gRPC ends it on resuming."""

    def __init__(self, stall: float, stubs):
        self.stall = stall
        self.streams = stubs.streams  # what closing the connection closes

    def single_data(self, payload, metadata=None, timeout=None):
        async def call():
            time.sleep(self.stall)  # the process stopped: nothing ran, the deadline passed unseen
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

        return call()


async def test_calls_failing_long_past_their_deadline_after_a_stall_eject_no_replica(caplog):
    replicas = ReplicaList(name="stalled/shard-0")
    try:
        connections = [replicas.add_connection(f"127.0.0.1:{port}") for port in (1, 2, 3)]
        connections[0].stubs = _StallThenDeadline(1.3, connections[0].stubs)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # the calls in flight at the pause, all given 0.25 s
                with pytest.raises(grpc.aio.AioRpcError):
                    await replicas.call(
                        connections[0], "single_data", DataRequest(endpoint="/x"), None, 0.25
                    )
        assert connections[0] in replicas.eligible(), caplog.text  # not ejected for this process's own stall
        assert connections[0].times_ejected == 0
        assert "this process stalled" in caplog.text
        assert caplog.text.count("this process stalled") == 1  # said once, not per call
    finally:
        await replicas.close()


async def test_a_call_timing_out_on_time_still_counts_against_its_replica():
    replicas = ReplicaList(name="hung/shard-0")
    try:
        connections = [replicas.add_connection(f"127.0.0.1:{port}") for port in (4, 5)]
        # the deadline seen on time: what a hung replica does
        connections[0].stubs = _StallThenDeadline(0.3, connections[0].stubs)
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError):
                await replicas.call(connections[0], "single_data", DataRequest(endpoint="/x"), None, 0.25)
        assert connections[0] not in replicas.eligible()  # ejected, as before
    finally:
        await replicas.close()


async def test_a_busy_replica_answering_its_queue_is_not_ejected_for_short_deadlines_missed(echo_servers, eventually):
    """An overload review's find: under a uniform overload every replica of a shard misses some callers' short
    deadlines (the calls queued behind its work) and answers others, so each one's run of misses was met by its
    peer's answers and blamed at once: healthy replicas were ejected in turn (2x capacity, 1 s deadlines: 20
    ejections in 30 s, up to 8 s each), taking half the shard's capacity away as it was overloaded. A replica that
    answered a call of a kind after the call of that kind it missed was sent is working through its queue, not
    hung: that miss is not held against it. One answering nothing (hung, stuck) still is (the test above)."""
    busy, peer = await echo_servers(2)
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging, answering = replicas.add_connection(busy.address), replicas.add_connection(peer.address)
        busy.delay = 0.1
        taken = busy.calls
        earlier = asyncio.ensure_future(call_once(replicas, lagging, 5.0))  # ahead in its queue: answered soon
        await eventually(lambda: busy.calls > taken)  # it took the delay of 0.1 s
        busy.delay = 30.0  # the calls behind it wait longer than their callers do

        async def miss() -> None:
            with pytest.raises(grpc.aio.AioRpcError):
                await call_once(replicas, lagging, 1.0)

        misses = [asyncio.ensure_future(miss()) for _ in range(3)]
        await earlier  # answered after the three were sent, before they ran out
        await asyncio.gather(*misses)
        for _ in range(3):
            await call_once(replicas, answering, 0.3)
        assert lagging.failures == 0 and replicas.is_eligible(lagging)
    finally:
        await replicas.close()


async def test_a_busy_replica_answering_its_queue_is_not_ejected_for_long_deadlines_missed(echo_servers, eventually):
    """The same under callers' long deadlines, which count as the replica's failures on their own: three in a row
    ejected a busy replica (2x capacity, 10 s deadlines: 4 to 6 ejections in 30 s) though it answered calls all the
    while. A replica answering nothing in the meantime is still blamed (here, once the earlier call is gone)."""
    busy, peer = await echo_servers(2)
    replicas = ReplicaList(name="dep/shard-0", ejection=EjectionPolicy(min_blamed_deadline=0.2))
    try:
        lagging = replicas.add_connection(busy.address)
        replicas.add_connection(peer.address)  # not the last pickable one, which is never ejected

        async def misses(count: int) -> None:
            async def miss() -> None:
                with pytest.raises(grpc.aio.AioRpcError):
                    await call_once(replicas, lagging, 1.0)
            await asyncio.gather(*(miss() for _ in range(count)))

        busy.delay = 0.1
        taken = busy.calls
        earlier = asyncio.ensure_future(call_once(replicas, lagging, 5.0))
        await eventually(lambda: busy.calls > taken)  # it took the delay of 0.1 s
        busy.delay = 30.0
        missing = asyncio.ensure_future(misses(3))
        await earlier
        await missing
        assert lagging.failures == 0 and replicas.is_eligible(lagging)
        await misses(3)  # nothing answered since these were sent: a hung replica
        assert not replicas.is_eligible(lagging)
    finally:
        await replicas.close()


async def test_a_replica_is_no_outlier_while_its_peers_miss_callers_deadlines_too(echo_servers, eventually):
    """A shard too slow for its callers has every replica missing some deadlines and answering other calls: a peer
    that missed a caller's deadline itself while the calls it answers were under way does not make a replica
    missing deadlines the outlier by those answers (at twice the capacity with 1 s deadlines, busy replicas were ejected in turn)."""
    busy, peer = await echo_servers(2)
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging, answering = replicas.add_connection(busy.address), replicas.add_connection(peer.address)
        busy.delay = peer.delay = 30.0

        async def miss(connection, timeout: float) -> None:
            with pytest.raises(grpc.aio.AioRpcError):
                await call_once(replicas, connection, timeout)

        await asyncio.gather(*(miss(lagging, 0.3) for _ in range(3)))
        peer.delay = 0.15
        taken = peer.calls
        answers = [asyncio.ensure_future(call_once(replicas, answering, 0.3)) for _ in range(3)]
        await eventually(lambda: peer.calls >= taken + 3)  # each took the delay of 0.15 s
        peer.delay = 30.0
        await miss(answering, 0.05)  # its peer misses a deadline too while those calls are under way
        await asyncio.gather(*answers)
        await asyncio.sleep(0.1)
        assert lagging.failures == 0 and replicas.is_eligible(lagging) and busy.health_checks == 0
    finally:
        await replicas.close()


async def timed_out_attempt(replicas: ReplicaList, connection, timeout: float) -> None:
    """A pool attempt on ``connection`` that times out after ``timeout`` (the pool's attempt timeout, not a caller's
    deadline)."""
    with pytest.raises(grpc.aio.AioRpcError):
        request, metadata = DataRequest(endpoint="/x"), (("endpoint", "/x"),)
        await replicas.call(connection, "single_data", request, metadata, timeout, callers_deadline=False)


async def test_a_busy_replica_answering_its_queue_is_not_ejected_for_attempt_timeouts(echo_servers, eventually):
    """The pool's attempt timeout counts towards ejection, to fail a hung replica's calls over and take it out; a
    replica answering calls all the while is queued, not hung (an overload review: --attempt-timeout 0.3 at twice
    the capacity ejected healthy replicas 114 times in 30 s, for up to 30 s each). Its calls still fail over."""
    busy, peer = await echo_servers(2)
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging = replicas.add_connection(busy.address)
        replicas.add_connection(peer.address)

        busy.delay = 0.1
        taken = busy.calls
        earlier = asyncio.ensure_future(call_once(replicas, lagging, 5.0))
        await eventually(lambda: busy.calls > taken)  # it took the delay of 0.1 s
        busy.delay = 30.0
        attempts = asyncio.ensure_future(asyncio.gather(*(timed_out_attempt(replicas, lagging, 1.0) for _ in range(3))))
        await earlier
        await attempts
        assert lagging.failures == 0 and replicas.is_eligible(lagging)
        await asyncio.gather(*(timed_out_attempt(replicas, lagging, 1.0) for _ in range(3)))  # nothing answered: hung
        assert not replicas.is_eligible(lagging)
    finally:
        await replicas.close()


async def test_a_replica_hanging_on_some_calls_while_it_answers_later_ones_is_still_ejected(echo_servers):
    """A regression review's find: a handler hanging on some requests while the replica serves the rest (an async
    handler awaiting what never comes, one of --threads N stuck) answers calls of the kind after the hung ones were
    sent, and the overload rule took them for queued: never ejected (30% of calls hung, 48 callers, attempt
    timeout 0.3 s: 231 attempts timed out on it in 4 s and no ejection, against 5 and an ejection in 0.35 s
    before). A call overtaken by a later call of its kind was not queued behind the replica's work: it counts."""
    stuck, peer = await echo_servers(2)
    replicas = ReplicaList(name="dep/shard-0")
    try:
        lagging = replicas.add_connection(stuck.address)
        replicas.add_connection(peer.address)

        stuck.delay = 30.0  # these hang
        hung = asyncio.ensure_future(asyncio.gather(*(timed_out_attempt(replicas, lagging, 0.5) for _ in range(3))))
        await asyncio.sleep(0.05)
        stuck.delay = 0.0
        await call_once(replicas, lagging, 5.0, "/x")  # sent after them, answered at once: they were overtaken
        await hung
        assert not replicas.is_eligible(lagging)
    finally:
        await replicas.close()


def test_a_replicas_answer_times_are_kept_for_a_bounded_number_of_kinds():
    """Endpoint names come from callers: the answers noted per replica stay at MAX_RUN_KINDS kinds however many."""
    from shardnet.networking.outliers import MAX_RUN_KINDS, ShortDeadlineOutliers

    class Bare:
        answered_at: dict = {}

    connection = Bare()
    for index in range(1000):
        ShortDeadlineOutliers._note_answer(connection, ("single_data", f"/e{index}"), float(index), 0.0)
    assert len(connection.answered_at) == MAX_RUN_KINDS
