"""GrpcConnectionPool against real echo replicas: routing, metadata, failover, deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import executors
import grpc
import pytest
import tenacity

from shardnet.networking import replica_list
from shardnet.networking.connection import HEALTH_TIMEOUT
from shardnet.protocol import services
from shardnet.runtimes.worker import Worker
from shardnet.testing import serving

from shardnet import (
    ConfigurationError,
    ControlRequest,
    DataRequest,
    DeadlineExceeded,
    Document,
    EjectionPolicy,
    GrpcConnectionPool,
    PollingType,
    ProtocolError,
    ReplicaError,
    RetryBudget,
    RetryPolicy,
    RoutingError,
    create_connection_pool,
)


def served_by(reply) -> str:
    _, trailing = reply
    return dict(tuple(trailing))["served-by"]


async def send_one(pool, deployment="dep", endpoint="/index", **kwargs):
    tasks = pool.send_request(DataRequest(endpoint=endpoint), deployment, **kwargs)
    assert len(tasks) == 1
    return await tasks[0]


async def test_round_robin_over_replicas(pool, echo_servers):
    servers = await echo_servers(2)
    for server in servers:
        pool.add_connection("dep", server.address)
    order = [served_by(await send_one(pool)) for _ in range(4)]
    assert order == ["echo-0", "echo-1", "echo-0", "echo-1"]


async def test_all_goes_to_one_replica_of_every_shard(pool, echo_servers):
    servers = await echo_servers(6)
    for shard in range(3):
        pool.add_connection("dep", servers[2 * shard].address, shard_id=shard)
        pool.add_connection("dep", servers[2 * shard + 1].address, shard_id=shard)
    for _ in range(2):
        tasks = pool.send_request(DataRequest(endpoint="/search"), "dep", polling_type=PollingType.ALL, shard_id=1)
        assert len(tasks) == 3  # shard_id is ignored under ALL
        replies = await asyncio.gather(*tasks)
        assert all(isinstance(response, DataRequest) for response, _ in replies)
    # each shard saw two requests, one per replica (round robin inside the shard)
    assert [server.calls for server in servers] == [1] * 6
    assert len(pool.send_request(DataRequest(), "dep", polling_type="ALL")) == 3


async def test_declared_shards_refuse_a_replica_beyond_them(pool):
    pool.declare_shards("dep", 2)
    pool.add_connection("dep", "127.0.0.1:7", shard_id=1)
    pool.add_connection("dep", "127.0.0.1:8", head=True)  # a head is no shard
    with pytest.raises(ConfigurationError, match=r"'dep': replica 127.0.0.1:9 is of shard 2, but .* shards 0..1"):
        pool.add_connection("dep", "127.0.0.1:9", shard_id=2)
    assert pool.shard_ids("dep") == [0, 1]
    pool.add_connection("other", "127.0.0.1:9", shard_id=5)  # undeclared deployments take any shard


async def test_a_deployment_is_forgotten_only_when_empty_and_undeclared(pool):
    pool.add_connection("kept", "127.0.0.1:1")
    pool.declare_shards("declared", 2)
    pool.add_connection("emptied", "127.0.0.1:2", head=True)
    await pool.remove_connection("emptied", "127.0.0.1:2", head=True)
    assert not pool.forget_deployment("kept") and not pool.forget_deployment("declared")
    assert pool.forget_deployment("emptied") and not pool.forget_deployment("emptied")
    assert set(pool.deployments) == {"kept", "declared"}


async def test_any_to_a_given_shard(pool, echo_servers):
    shard0, shard1 = await echo_servers(2, names=["s0", "s1"])
    pool.add_connection("dep", shard0.address, shard_id=0)
    pool.add_connection("dep", shard1.address, shard_id=1)
    assert {served_by(await send_one(pool, shard_id=1)) for _ in range(3)} == {"s1"}
    assert served_by(await send_one(pool, shard_id=0)) == "s0"


async def test_any_rotates_over_shards(pool, echo_servers):
    servers = await echo_servers(3, names=["s0", "s1", "s2"])
    for shard, server in enumerate(servers):
        pool.add_connection("dep", server.address, shard_id=shard)
    order = [served_by(await send_one(pool)) for _ in range(6)]
    assert sorted(order[:3]) == ["s0", "s1", "s2"] and order[3:] == order[:3]


async def test_head_routing(pool, echo_servers):
    head, worker = await echo_servers(2, names=["head", "worker"])
    pool.add_connection("dep", head.address, head=True)
    pool.add_connection("dep", worker.address, shard_id=0)
    assert served_by(await send_one(pool, head=True)) == "head"
    assert served_by(await send_one(pool)) == "worker"
    assert (head.calls, worker.calls) == (1, 1)
    assert pool.send_request(DataRequest(), "other", head=True) == []


async def test_unknown_deployment_and_shard(pool, echo_servers, caplog):
    """No Task, as in Jina; a name the pool never knew (a typo, as "Enc" for "enc") is warned of once, where it
    did nothing without a word (a README review's find)."""
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address, shard_id=0)
    caplog.set_level(logging.DEBUG, logger="shardnet.networking.pool")
    assert pool.send_request(DataRequest(), "nope") == []
    assert pool.send_request(DataRequest(), "nope", polling_type=PollingType.ALL) == []
    assert pool.send_request_once(DataRequest(), "nope") is None
    assert pool.send_requests_once([DataRequest()], "nope", endpoint="/x") is None
    assert pool.send_discover_endpoint("nope") is None
    assert pool.send_request(DataRequest(), "dep", shard_id=7) == []
    assert server.calls == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["deployment 'nope' is not in this pool (it has 'dep'): nothing sent, no Task"], warned
    assert "no available connections for deployment 'dep', shard 7: nothing sent" in caplog.text


async def test_a_shard_emptied_under_any_is_warned_of_once_by_a_send_that_finds_nothing(pool, echo_servers, caplog):
    """The library's send under ANY found no shard to pick and gave no Task without reaching the empty list, whose
    "no replica left" WARNING only ALL's call said (a review's find)."""
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address, shard_id=0)
    await send_one(pool)
    await pool.remove_connection("dep", server.address, shard_id=0)
    caplog.set_level(logging.INFO, logger="shardnet.networking")
    assert pool.send_request(DataRequest(), "dep") == [] and pool.send_request(DataRequest(), "dep") == []
    assert caplog.text.count(f"dep/shard-0: no replica left: {server.address} was the last") == 1
    pool.add_connection("dep", server.address, shard_id=0)
    assert f"dep/shard-0: has a replica again: {server.address}" in caplog.text


async def test_send_request_once_returns_one_task(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    response, trailing = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
    assert response.endpoint == "/x" and dict(tuple(trailing))["served-by"] == "echo-0"


async def test_add_twice_keeps_one_connection_remove_twice(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address, shard_id=0)
    pool.add_connection("dep", server.address, shard_id=0)
    assert pool.deployments == {"dep": {"head": [], "shards": {0: [server.address]}}}
    assert await pool.remove_connection("dep", server.address, shard_id=0)
    assert not await pool.remove_connection("dep", server.address, shard_id=0)
    assert not await pool.remove_connection("never-added", server.address)
    assert pool.send_request(DataRequest(), "dep") == []


async def test_remove_without_shard_id_searches_every_shard(pool):
    pool.add_connection("dep", "127.0.0.1:50001", shard_id=0)
    pool.add_connection("dep", "127.0.0.1:50002", shard_id=3)
    assert await pool.remove_connection("dep", "127.0.0.1:50002")
    assert pool.deployments["dep"]["shards"] == {0: ["127.0.0.1:50001"], 3: []}


async def test_https_address_lookup_in_the_pool(pool):
    pool.add_connection("dep", "https://127.0.0.1:50001", shard_id=0)
    assert pool.get_replicas("dep", shard_id=0).has_connection("https://127.0.0.1:50001")
    assert pool.deployments["dep"]["shards"][0] == ["https://127.0.0.1:50001"]
    assert await pool.remove_connection("dep", "https://127.0.0.1:50001", shard_id=0)
    assert not await pool.remove_connection("dep", "https://127.0.0.1:50001", shard_id=0)


async def test_endpoint_metadata_arrives_at_the_server(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    await pool.send_request(DataRequest(endpoint="/index"), "dep")[0]
    await pool.send_request(DataRequest(endpoint="/index"), "dep", endpoint="/search")[0]
    await pool.send_requests([DataRequest(endpoint="/a"), DataRequest()], "dep", metadata=[("x-trace", "t1")])[0]
    await pool.send_request(DataRequest(), "dep")[0]
    first, second, third, fourth = server.received_metadata
    assert first["endpoint"] == "/index"
    assert second["endpoint"] == "/search"
    assert third["endpoint"] == "/a" and third["x-trace"] == "t1"
    assert "endpoint" not in fourth


async def test_pool_metadata_travels_with_every_call(pool_factory, echo_servers):
    [server] = await echo_servers(1)
    pool = pool_factory(metadata=[("x-tenant", "blue")])
    pool.add_connection("dep", server.address)
    await pool.send_request(DataRequest(endpoint="/i"), "dep")[0]
    assert server.received_metadata[0]["x-tenant"] == "blue"


async def test_responses_come_back_decoded_with_trailing_metadata(pool, echo_servers):
    head, worker = await echo_servers(2, names=["head", "worker"])
    pool.add_connection("dep", worker.address)
    pool.add_connection("dep", head.address, head=True)
    request = DataRequest(docs=[Document(text="hi")], endpoint="/index", parameters={"k": 1})
    response, trailing = await pool.send_request(request, "dep")[0]
    assert isinstance(response, DataRequest)
    assert response.request_id == request.request_id and response.docs.texts == ["hi"]
    assert response.parameters == {"k": 1.0}
    assert trailing["served-by"] == "worker"
    control = ControlRequest("STATUS")
    response, trailing = await pool.send_request(control, "dep", head=True)[0]
    assert isinstance(response, ControlRequest) and response.request_id == control.request_id
    assert trailing["served-by"] == "head"


async def test_several_requests_go_in_one_process_data_call(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    first, second = DataRequest(endpoint="/a"), DataRequest(endpoint="/a")
    response, _ = await pool.send_requests([first, second], "dep")[0]
    assert response.request_id == first.request_id  # the echo answers with the first of the list
    assert server.calls == 1


async def test_failover_with_one_dead_replica(pool, echo_servers, dead_address):
    [live] = await echo_servers(1)
    pool.add_connection("dep", dead_address)
    pool.add_connection("dep", live.address)
    replies = await asyncio.gather(*(send_one(pool, timeout=5.0) for _ in range(20)))
    assert {served_by(reply) for reply in replies} == {"echo-0"}
    assert live.calls == 20


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
async def test_failover_to_a_replica_that_answers_unavailable_or_cancelled(pool, echo_servers, code):
    """CANCELLED as a replica's status is its server's doing (a stop cutting calls it had taken and not handed
    over, which never ran): failed over as UNAVAILABLE is. It was passed on, and a worker stopping under a head
    that still sent to it failed a few of its callers (found by two reviews)."""
    sick, healthy = await echo_servers(2, names=["sick", "healthy"])
    sick.fail_with = code
    pool.add_connection("dep", sick.address)
    pool.add_connection("dep", healthy.address)
    for _ in range(4):
        assert served_by(await send_one(pool)) == "healthy"
    assert sick.calls >= 1


async def test_at_most_once_does_not_fail_over_a_cancelled_call_which_may_have_run(pool_factory, echo_servers):
    sick, healthy = await echo_servers(2, names=["sick", "healthy"])
    sick.fail_with = grpc.StatusCode.CANCELLED
    pool = pool_factory(retry=RetryPolicy(unsent_only=True))
    pool.add_connection("dep", sick.address)  # round robin tries it first
    pool.add_connection("dep", healthy.address)
    with pytest.raises(ReplicaError) as caught:
        await send_one(pool)
    assert caught.value.code == grpc.StatusCode.CANCELLED and healthy.calls == 0


def test_the_pool_takes_jinas_runtime_name_first():
    assert repr(GrpcConnectionPool("gateway")).startswith("<GrpcConnectionPool gateway: 0 deployments")
    with pytest.raises(ConfigurationError, match="runtime_name names the pool's owner"):
        GrpcConnectionPool(5)


@pytest.mark.parametrize("retries, calls", [(0, 1), (1, 2), (-1, 6)])
async def test_retries_caps_the_failovers_as_in_jina(pool, echo_servers, retries, calls):
    sick = await echo_servers(3)
    for server in sick:
        server.fail_with = grpc.StatusCode.UNAVAILABLE
        pool.add_connection("dep", server.address)
    with pytest.raises(ReplicaError) as caught:
        await pool.send_requests_once([DataRequest(endpoint="/x")], "dep", retries=retries)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert sum(server.calls for server in sick) == calls  # -1: the policy, RetryPolicy().rounds (2) over 3 replicas


async def test_send_requests_once_takes_jinas_argument_order_and_a_dict_of_metadata(pool, echo_servers):
    head, worker = await echo_servers(2, names=["head", "worker"])
    pool.add_connection("dep", head.address, head=True)
    pool.add_connection("dep", worker.address)
    # Jina's order: requests, deployment, metadata, head, shard_id, endpoint, timeout, retries
    response, trailing = await pool.send_requests_once(
        [DataRequest()], "dep", {"tenant": "a"}, True, None, "/search", 5.0, 0
    )
    assert trailing["served-by"] == "head" and response.endpoint is None
    assert head.received_metadata[-1]["tenant"] == "a" and head.received_metadata[-1]["endpoint"] == "/search"
    await pool.send_request_once(DataRequest(endpoint="/x"), "dep", metadata={"tenant": "b"})
    assert worker.received_metadata[-1]["tenant"] == "b"
    with pytest.raises(ConfigurationError, match="retries must be an integer"):
        pool.send_requests_once([DataRequest()], "dep", retries="3")


async def test_all_replicas_dead_names_deployment_shard_and_address(pool, dead_address):
    pool.add_connection("encoder", dead_address, shard_id=2)
    with pytest.raises(ReplicaError) as caught:
        await send_one(pool, "encoder", timeout=5.0)
    error = caught.value
    assert (error.deployment, error.shard_id, error.address) == ("encoder", 2, dead_address)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "deployment 'encoder'" in str(error) and "shard 2" in str(error) and dead_address in str(error)
    assert "the last of 2 attempts" in str(error)  # one replica, two rounds: how hard the pool tried


async def test_non_retryable_status_is_not_retried(pool, echo_servers):
    first, second = await echo_servers(2)
    first.fail_with = second.fail_with = grpc.StatusCode.INVALID_ARGUMENT
    pool.add_connection("dep", first.address)
    pool.add_connection("dep", second.address)
    with pytest.raises(ReplicaError) as caught:
        await send_one(pool)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert first.calls + second.calls == 1


async def test_retry_budget_exhausted(pool_factory, echo_servers, dead_address):
    [live] = await echo_servers(1)
    pool = pool_factory(retry_budget=RetryBudget(ratio=0.0, min_per_second=0.0))
    pool.add_connection("dep", dead_address)  # round robin tries the dead one first
    pool.add_connection("dep", live.address)
    with pytest.raises(ReplicaError, match="the only attempt, the retry budget exhausted"):  # as the README says
        await send_one(pool)
    assert pool.retry_budget.refused == 1 and live.calls == 0


async def test_a_request_another_grpc_server_refused_as_unimplemented_is_said_never_to_have_run(pool_factory):
    """No replica lacks the data methods: UNIMPLEMENTED means another server on the port, which ran nothing. The
    error said an earlier attempt "may have run it", and unsent was False (found by a review)."""
    strangers = [grpc.aio.server() for _ in range(2)]
    addresses = [f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}" for server in strangers]
    for server in strangers:
        await server.start()
    try:
        pool = pool_factory()
        for address in addresses:
            pool.add_connection("dep", address)
        with pytest.raises(ReplicaError) as caught:
            await send_one(pool)
        assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert "may have run it" not in str(caught.value) and caught.value.unsent
    finally:
        for server in strangers:
            await server.stop(0)


async def test_an_endpoint_in_the_metadata_that_differs_from_the_calls_is_refused(pool):
    """Both went out, and a head ran the first while a worker ran the last (found by a review)."""
    received = []

    async def echo(request: bytes, context) -> bytes:
        received.append(list(context.invocation_metadata()))
        return request

    async with serving(services.PROCESS_SINGLE_DATA, echo) as address:
        pool.add_connection("dep", address)
        with pytest.raises(ConfigurationError, match="the metadata names endpoint '/b' and the call endpoint '/a'"):
            pool.send_request(DataRequest(), "dep", endpoint="/a", metadata={"endpoint": "/b"})
        await pool.send_request(DataRequest(), "dep", endpoint="/a", metadata={"endpoint": "/a", "tenant": "t"})[0]
    [pairs] = received
    assert [pair for pair in pairs if pair[0] in ("endpoint", "tenant")] == [("endpoint", "/a"), ("tenant", "t")]


async def test_failing_over_from_a_replica_already_ejected_spends_no_retry_budget(pool_factory, echo_servers,
                                                                                    dead_address):
    """A killed replica fails everything it carried at once: once its list has ejected it, moving those requests
    elsewhere is routing, not a retry storm (a budget of 100 failed the excess of 900 in flight)."""
    [live] = await echo_servers(1)
    pool = pool_factory(retry_budget=RetryBudget(ratio=0.0, min_per_second=0.0), ejection=EjectionPolicy())
    pool.add_connection("dep", dead_address)
    pool.add_connection("dep", live.address)
    outcomes = await asyncio.gather(*(send_one(pool) for _ in range(20)), return_exceptions=True)
    refused = [outcome for outcome in outcomes if isinstance(outcome, ReplicaError)]
    # round robin sent 10 to the dead one: the failures before its ejection (2 of the 3 that eject it) wanted
    # the budget and found none; every one after went over to the live replica
    assert len(refused) == EjectionPolicy().consecutive_failures - 1
    assert all("retry budget exhausted" in str(error) for error in refused)
    assert live.calls == 20 - len(refused)
    # each is a fail-over all the same, as the head's shardnet_head_retries_total says (a review: 2 of 13 were)
    assert pool.failovers == 10 - len(refused) and pool.retry_budget.total_retries == 0


async def test_a_replica_refusing_as_it_drains_is_picked_no_more_until_it_serves_again(pool_factory, echo_servers,
                                                                                         eventually):
    """A draining shardnet server refuses new calls in-band: its first refusal takes it out of the picks (the
    calls it holds go on), the refused call goes over at once without spending the retry budget, and it is back
    once its health says SERVING (its next process). It took its turn of calls until three refusals in a row
    ejected it, each sent over on the budget, and an answer to one of its calls in flight in between started the
    count over: a head draining under load kept a pool's calls coming for as long as its own lasted."""
    from grpc_health.v1 import health_pb2

    draining, live = await echo_servers(2)
    draining.fail_with, draining.fail_details = grpc.StatusCode.UNAVAILABLE, services.DRAINING_DETAILS
    await draining.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    pool = pool_factory(retry_budget=RetryBudget(ratio=0.0, min_per_second=0.0))
    pool.add_connection("dep", draining.address)  # round robin tries it first
    pool.add_connection("dep", live.address)
    assert [served_by(await send_one(pool)) for _ in range(6)] == ["echo-1"] * 6
    assert draining.calls == 1 and pool.retry_budget.refused == 0
    draining.fail_with = None  # its next process
    await draining.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def both_serve() -> bool:
        return {served_by(await send_one(pool)) for _ in range(2)} == {"echo-0", "echo-1"}

    await eventually(both_serve, timeout=5)


async def test_a_replica_set_aside_as_draining_is_back_within_a_second_or_two_of_its_next_process_serving(
    pool_factory, echo_servers, eventually
):
    """A replica that drained (a head restarted in a rolling update, behind a pool with a fixed list) is checked
    every second, its channel redialled when gRPC holds it in reconnect back-off, so its next process is picked
    at once. It was probed on the ejection's doubling schedule, and waited for its old channel's back-off: a head
    back after 25 s was picked 36 s after it served, its share of calls going to the others meanwhile. A streak of
    failures of the other replica meanwhile (which has it checked out of turn) keeps that cadence: the check's
    follow-up probe went back to the doubling schedule (found by a review: picked 7.2 s after it served)."""
    from grpc_health.v1 import health_pb2

    draining, live = await echo_servers(2)
    draining.fail_with, draining.fail_details = grpc.StatusCode.UNAVAILABLE, services.DRAINING_DETAILS
    await draining.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    pool = pool_factory()
    pool.add_connection("dep", draining.address)
    pool.add_connection("dep", live.address)
    assert served_by(await send_one(pool)) == "echo-1"  # refused by the draining one, set aside
    await draining.stop()  # its process exits; the next takes its port some seconds later
    outage_began = time.monotonic()
    live.fail_with, live.fail_times, live.calls = grpc.StatusCode.UNAVAILABLE, EjectionPolicy().consecutive_failures, 0
    for _ in range(EjectionPolicy().consecutive_failures):  # the last pickable one's streak: a check out of turn
        with contextlib.suppress(ReplicaError):
            await send_one(pool)
    live.fail_with = None
    # past three probes of the doubling schedule (0.5 s, 1 s, 2 s apart), whose next is 4 s on
    await asyncio.sleep(4.5 - (time.monotonic() - outage_began))  # the outage itself: what is measured comes after
    [restarted] = await echo_servers(1, names=["echo-0"], port=draining.port)
    serving_since = time.monotonic()

    async def both_serve() -> bool:
        return {served_by(await send_one(pool)) for _ in range(2)} == {"echo-0", "echo-1"}

    await eventually(both_serve, timeout=10)
    assert time.monotonic() - serving_since < 2.5
    assert restarted.calls >= 1


async def test_call_timeout_raises_deadline_exceeded(pool, echo_servers):
    [slow] = await echo_servers(1, delay=2.0)
    pool.add_connection("dep", slow.address, shard_id=0)
    with pytest.raises(DeadlineExceeded) as caught:
        await send_one(pool, timeout=0.2)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (caught.value.deployment, caught.value.shard_id, caught.value.address) == ("dep", 0, slow.address)


async def test_pool_default_timeout(pool_factory, echo_servers):
    [slow] = await echo_servers(1, delay=2.0)
    pool = pool_factory(timeout=0.2)
    pool.add_connection("dep", slow.address)
    with pytest.raises(DeadlineExceeded):
        await send_one(pool)


async def test_all_with_an_empty_shard_reports_it(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address, shard_id=0)
    pool.add_connection("dep", "127.0.0.1:50009", shard_id=1)
    await pool.remove_connection("dep", "127.0.0.1:50009", shard_id=1)
    ok, missing = pool.send_request(DataRequest(), "dep", polling_type=PollingType.ALL)
    await ok
    with pytest.raises(RoutingError) as caught:
        await missing
    assert (caught.value.deployment, caught.value.shard_id) == ("dep", 1)


async def test_close_and_context_manager(echo_servers):
    [server] = await echo_servers(1)
    async with GrpcConnectionPool() as pool:
        pool.add_connection("dep", server.address)
        await send_one(pool)
    assert pool.deployments == {}
    assert pool.send_request(DataRequest(), "dep") == []


@pytest.mark.parametrize("arguments", [{}, {"k8s_connection_pool": True, "k8s_namespace": None}])
async def test_create_connection_pool_makes_a_plain_pool_without_a_namespace_as_jinas_does(arguments):
    """Jina's head calls it with k8s_connection_pool=True (its default) and no namespace outside Kubernetes, and
    gets a plain pool; this one refused (found by a review)."""
    pool = create_connection_pool(logger=logging.getLogger("jina-head"), **arguments)
    try:
        assert type(pool) is GrpcConnectionPool
    finally:
        await pool.close()


def _recording_logger(prefix: str) -> tuple[logging.Logger, list[logging.LogRecord]]:
    """A logger of its own (a Jina runtime's, say) and the records it receives."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    own = logging.getLogger(f"{prefix}-{id(records)}")
    own.addHandler(handler)
    return own, records


async def test_create_connection_pool_takes_the_logger_third_as_jina_3_passed_it(echo_servers, dead_address):
    """Old Jina 3 called create_connection_pool(k8s_connection_pool, k8s_namespace, logger) positionally: a
    TypeError (two positional parameters); now the logger is third and the pool logs its ejections there."""
    own, records = _recording_logger("jina3-head")
    [live] = await echo_servers(1)
    pool = create_connection_pool(False, None, own)
    try:
        assert type(pool) is GrpcConnectionPool
        pool.add_connection("dep", dead_address)
        pool.add_connection("dep", live.address)
        for _ in range(6):  # round robin: the dead replica fails every other call, three times: ejected, and logged
            await send_one(pool)
        assert any("ejecting replica" in record.getMessage() for record in records)
    finally:
        await pool.close()


def test_k8s_port_is_the_port_shardnets_manifests_and_discovery_use():
    """Jina 3.34's GrpcConnectionPool.K8S_PORT, with the value shardnet's own Kubernetes side uses; its
    uses_before/uses_after and monitoring ports name sidecars and a port shardnet does not have."""
    from shardnet.discovery.kubernetes import DEFAULT_PORT
    from shardnet.manifests.kubernetes import DeploymentSpec

    assert GrpcConnectionPool.K8S_PORT == 8080 == DEFAULT_PORT == DeploymentSpec.port
    for absent in ("K8S_PORT_USES_BEFORE", "K8S_PORT_USES_AFTER", "K8S_PORT_MONITORING"):
        assert not hasattr(GrpcConnectionPool, absent)


async def test_malformed_replies_raise_protocol_error_and_never_hang(pool, garbage_server):
    pool.add_connection("dep", garbage_server.address, head=True)
    with pytest.raises(ProtocolError, match=rf"replica {garbage_server.address}: malformed ControlRequest"):
        await pool.send_request(ControlRequest(), "dep", head=True, timeout=5.0)[0]
    response, _ = await pool.send_request(DataRequest(), "dep", head=True, timeout=5.0)[0]
    # data replies stay bytes until read; read, they name where they came from
    with pytest.raises(ProtocolError, match=rf"malformed DataRequest from dep/head replica {garbage_server.address}"):
        response.endpoint
    # the replica is still usable afterwards: nothing crashed, nothing was ejected
    assert pool.get_replicas("dep", head=True).eligible()


@pytest.mark.parametrize(
    "attempt_timeout, timeout, said",
    [
        (0.1, 5.0, "each given at most the attempt timeout of 0.1s"),
        # the second attempt ran into the caller's deadline: it was once put down to the attempt timeout (a review)
        (0.3, 0.5, "the last ended by the caller's deadline"),
    ],
)
async def test_attempts_that_outlive_their_time_say_whose_time_it_was(
    pool_factory, echo_servers, attempt_timeout, timeout, said
):
    slow_a, slow_b = await echo_servers(2, delay=2.0)
    pool = pool_factory(retry=RetryPolicy(attempt_timeout=attempt_timeout, rounds=1))
    for server in (slow_a, slow_b):
        pool.add_connection("dep", server.address)
    with pytest.raises(DeadlineExceeded, match=rf"the last of 2 attempts, {said}"):
        await send_one(pool, timeout=timeout)


async def test_attempt_timeout_fails_over_from_a_hung_replica(pool_factory, echo_servers):
    hung, healthy = await echo_servers(2, names=["hung", "healthy"])
    hung.delay = 10.0
    pool = pool_factory(retry=RetryPolicy(attempt_timeout=0.2))
    pool.add_connection("dep", hung.address)
    pool.add_connection("dep", healthy.address)
    for _ in range(3):
        assert served_by(await send_one(pool, timeout=5.0)) == "healthy"
    assert hung.calls >= 1


async def test_a_deadline_missed_on_a_connection_never_set_up_says_so(pool_factory, echo_servers):
    """A port that takes TCP but never speaks HTTP/2 (or a host dropping the handshake) failed as "DEADLINE_EXCEEDED:
    Deadline Exceeded", as a slow replica does (a review): the error says the connection is not (re)established, and a
    slow replica's says nothing of it."""
    [slow] = await echo_servers(1, delay=5.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for address, connecting in ((f"127.0.0.1:{silent.getsockname()[1]}", True), (slow.address, False)):
            pool = pool_factory()
            pool.add_connection("dep", address)
            if not connecting:
                assert await pool.get_replicas("dep").get_all_connections()[0].health()
            with pytest.raises(ReplicaError) as failed:
                await send_one(pool, timeout=0.5)
            assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert ("its connection is not (re)established" in str(failed.value)) == connecting, str(failed.value)


async def test_removing_a_replica_lets_its_request_in_flight_finish(pool, echo_servers, eventually):
    [slow] = await echo_servers(1, delay=0.3)
    pool.add_connection("dep", slow.address)
    task = pool.send_request(DataRequest(endpoint="/f"), "dep", timeout=5.0)[0]
    await eventually(lambda: slow.calls == 1, timeout=5.0)
    assert await pool.remove_connection("dep", slow.address)
    response, trailing = await task
    assert response.endpoint == "/f" and trailing["served-by"] == "echo-0"


async def a_call_left_on_a_removed_replica(pool, echo_servers, eventually):
    """A slow call in flight on replica "leaving", which is then removed with "staying" beside it: (task, staying)."""
    leaving, staying = await echo_servers(2, names=["leaving", "staying"])
    leaving.delay = 5.0
    pool.add_connection("dep", leaving.address)
    task = pool.send_request(DataRequest(endpoint="/f"), "dep", timeout=10.0)[0]
    await eventually(lambda: leaving.calls == 1, timeout=5.0)
    pool.add_connection("dep", staying.address)
    await pool.remove_connection("dep", leaving.address)  # the call goes on over the retired channel
    return task, staying


async def test_a_removed_replicas_call_outliving_the_grace_fails_over_instead_of_hanging(
    pool, echo_servers, eventually, monkeypatch
):
    monkeypatch.setattr(replica_list, "RETIRED_CHANNEL_GRACE", 0.2)  # what a day's grace does, sooner
    task, _ = await a_call_left_on_a_removed_replica(pool, echo_servers, eventually)
    response, trailing = await asyncio.wait_for(task, 4.0)  # cut at the grace, answered by the other replica
    assert trailing["served-by"] == "staying" and response.endpoint == "/f"


async def test_closing_the_pool_fails_its_calls_in_flight_naming_the_replica(pool_factory, echo_servers, eventually):
    [slow] = await echo_servers(1, delay=5.0)
    pool = pool_factory()
    pool.add_connection("dep", slow.address, shard_id=0)
    tasks = [pool.send_request(DataRequest(), "dep", timeout=10.0)[0] for _ in range(2)]
    await eventually(lambda: slow.calls == 2, timeout=5.0)
    await pool.close()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, ReplicaError), repr(outcome)  # not a CancelledError the caller takes for its own
        assert outcome.code == grpc.StatusCode.UNAVAILABLE and slow.address in str(outcome)
        assert "closed" in str(outcome) and outcome.deployment == "dep"


async def test_closing_the_pool_cuts_calls_left_on_a_removed_replica(pool_factory, echo_servers, eventually):
    # a removed replica's channel waits for its calls; the pool's close must still cut them (they ran on)
    [hung] = await echo_servers(1, delay=60.0)
    pool = pool_factory()
    pool.add_connection("dep", hung.address)
    task = pool.send_request(DataRequest(), "dep")[0]  # no deadline: only the close ends it
    await eventually(lambda: hung.calls == 1, timeout=5.0)
    await pool.remove_connection("dep", hung.address)
    await pool.close()
    with pytest.raises(ReplicaError) as cut:
        await asyncio.wait_for(task, 5.0)
    assert cut.value.code == grpc.StatusCode.UNAVAILABLE and hung.address in str(cut.value)


async def test_a_close_cut_short_cuts_the_calls_and_closing_again_finishes(pool_factory, echo_servers, eventually):
    servers = await echo_servers(3, delay=60.0)
    pool = pool_factory()
    for shard_id, server in enumerate(servers):
        pool.add_connection("dep", server.address, shard_id=shard_id)
    tasks = pool.send_request(DataRequest(), "dep", polling_type=PollingType.ALL)
    await eventually(lambda: sum(server.calls for server in servers) == 3, timeout=5.0)  # all reached their servers
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.05)  # a caller's shutdown deadline, shorter than the grace
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
    assert all(isinstance(outcome, ReplicaError) and outcome.code == grpc.StatusCode.UNAVAILABLE for outcome in outcomes)
    await asyncio.wait_for(pool.close(), 5.0)
    assert pool.deployments == {}


async def test_a_call_the_close_cuts_counts_no_attempts_when_it_made_one(pool_factory, echo_servers, eventually):
    # the failover finds no replica left to try (the close took them all): one attempt, and "(the last of 1
    # attempts)" read as if the pool had counted retries (found by a review)
    [hung] = await echo_servers(1, delay=60.0)
    pool = pool_factory()
    pool.add_connection("dep", hung.address)
    task = pool.send_request(DataRequest(), "dep")[0]
    await eventually(lambda: hung.calls == 1, timeout=5.0)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.05)  # cut short: the call is cut at once
    with pytest.raises(ReplicaError) as cut:
        await asyncio.wait_for(task, 5.0)
    assert "was closed with this call still on it" in str(cut.value)
    assert "attempt" not in str(cut.value), str(cut.value)
    await asyncio.wait_for(pool.close(), 5.0)


async def test_a_caller_cancelling_its_call_still_gets_cancelled_error(pool, echo_servers, eventually):
    [slow] = await echo_servers(1, delay=5.0)
    pool.add_connection("dep", slow.address)
    task = pool.send_request(DataRequest(), "dep", timeout=10.0)[0]
    await eventually(lambda: slow.calls == 1, timeout=5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_caller_cancelling_a_call_on_a_removed_replica_is_not_failed_over(pool, echo_servers, eventually):
    task, staying = await a_call_left_on_a_removed_replica(pool, echo_servers, eventually)
    task.cancel()
    [outcome] = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError) and staying.calls == 0  # the caller's own, not re-sent


async def test_a_hung_replica_missing_long_caller_deadlines_is_ejected(pool_factory, echo_servers):
    hung, healthy = await echo_servers(2, names=["hung", "healthy"])
    hung.delay = 10.0
    pool = pool_factory(balancer="round_robin", ejection=EjectionPolicy(min_blamed_deadline=0.2))
    for server in (hung, healthy):
        pool.add_connection("dep", server.address)
    for _ in range(6):  # round robin: three 0.3 s deadlines missed by the hung replica, each long enough to blame
        with contextlib.suppress(DeadlineExceeded):
            await send_one(pool, timeout=0.3)
    assert [c.address.target for c in pool.get_replicas("dep").eligible()] == [healthy.address]


def test_a_logger_that_cannot_log_is_refused():
    with pytest.raises(ConfigurationError, match="logger must have warning"):
        GrpcConnectionPool("gateway", "encoder")  # Jina's runtime_name, then a name where its logger goes


async def test_call_takes_metadata_as_a_dict(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    await pool.call(DataRequest(), "dep", pool.get_replicas("dep"), metadata={"tenant": "a"}, timeout=5.0)
    assert server.received_metadata[-1]["tenant"] == "a"


async def test_callers_own_short_deadlines_do_not_eject_a_replica(pool_factory, echo_servers):
    """The caller running out of time says nothing about the replica; the pool's attempt timeout does."""
    slow_a, slow_b = await echo_servers(2, delay=1.0)
    pool = pool_factory(balancer="round_robin")
    for server in (slow_a, slow_b):
        pool.add_connection("dep", server.address)
    for _ in range(6):  # three expiries in a row on each replica: the ejection threshold
        with pytest.raises(DeadlineExceeded):
            await send_one(pool, timeout=0.1)
    replicas = pool.get_replicas("dep")
    assert len(replicas.eligible()) == 2 and all(c.times_ejected == 0 for c in replicas.get_all_connections())

    strict = pool_factory(balancer="round_robin", retry=RetryPolicy(attempt_timeout=0.1, rounds=1))
    for server in (slow_a, slow_b):
        strict.add_connection("dep", server.address)
    for _ in range(3):
        with pytest.raises(ReplicaError):
            await send_one(strict, timeout=5.0)
    assert len(strict.get_replicas("dep").eligible()) == 1  # its own attempt timeouts count


async def hung_beside_a_healthy_one(pool_factory, echo_servers):
    """A pool (round robin, the default ejection policy) over two replicas of one shard, the first hung (SIGSTOP):
    it takes calls and answers none, nor its health checks."""
    hung, healthy = await echo_servers(2, names=["hung", "healthy"])
    hung.delay = hung.health_delay = 30.0
    own, records = _recording_logger("outlier")
    pool = pool_factory(balancer="round_robin", logger=own)
    for server in (hung, healthy):
        pool.add_connection("dep", server.address)
    return pool, hung, healthy, records


async def answered_in_turn(pool, count: int, timeout: float, endpoints: tuple[str, ...] = ("/index",)) -> list[bool]:
    """Send ``count`` requests one after another, each with ``timeout``, to ``endpoints`` in turn; whether each was
    answered."""
    answered = []
    for index in range(count):
        try:
            await send_one(pool, endpoint=endpoints[index % len(endpoints)], timeout=timeout)
            answered.append(True)
        except DeadlineExceeded:
            answered.append(False)
    return answered


async def test_a_hung_replica_missing_short_deadlines_its_peers_meet_is_ejected(pool_factory, echo_servers):
    """A review's find: one of two replicas hung (SIGSTOP), a Jina-style caller sending requests one at a time
    with 0.5 s deadlines: every other one failed, to the end (keepalive, some 40 s later), as a caller's deadline
    under ``min_blamed_deadline`` is never the replica's fault. It is when the other replica meets the same
    callers' deadlines on the same endpoint: the hung one is ejected after three misses, at once (no health
    check asked)."""
    pool, hung, healthy, records = await hung_beside_a_healthy_one(pool_factory, echo_servers)
    answered = await answered_in_turn(pool, 30, timeout=0.2)
    assert answered.count(False) <= 4 and all(answered[-20:]), answered
    assert [c.address.target for c in pool.get_replicas("dep").eligible()] == [healthy.address]
    [ejection] = [record.getMessage() for record in records if "ejecting replica" in record.getMessage()]
    assert ejection.endswith(
        "after 3 failures in a row: DEADLINE_EXCEEDED (callers' deadlines up to 0.2s on /index, while the other "
        "replicas answered it) x3"
    ), ejection
    assert hung.health_checks == 0


async def test_a_hung_replica_is_ejected_after_its_peer_missed_a_wave_of_deadlines_too(pool_factory, echo_servers):
    """A regression review's find: a hung replica's run of misses only grows (it never answers), and the others'
    answers had to catch up with all of it; one wave of concurrent calls the healthy replica also missed (a
    moment's slowdown) left a gap that never closed, and half the calls failed for good."""
    pool, hung, healthy, records = await hung_beside_a_healthy_one(pool_factory, echo_servers)

    async def wave() -> int:
        answers = await asyncio.gather(*(send_one(pool, timeout=0.2) for _ in range(20)), return_exceptions=True)
        return sum(not isinstance(answer, BaseException) for answer in answers)

    assert await wave() == 10  # the healthy one's answers come before the hung one's misses: none counts yet
    healthy.delay = 0.3  # the healthy replica slow for one wave: every call of it misses too
    assert await wave() == 0
    healthy.delay = 0.0
    answered = [await wave() for _ in range(3)]
    assert answered[-1] == 20, answered
    assert [c.address.target for c in pool.get_replicas("dep").eligible()] == [healthy.address]
    assert any("ejecting replica" in record.getMessage() for record in records)


async def test_a_stuck_replica_whose_health_says_serving_is_ejected_on_one_endpoint(pool_factory, echo_servers):
    """A regression review's find: a replica whose handler thread is stuck, or uniformly slow (every call 3 s),
    still answers its health check SERVING; asked for its health, it was never ejected, and every other request
    failed. Its peer answering calls of the same kind within the same deadlines blames it at once."""
    stuck, healthy = await echo_servers(2, names=["stuck", "healthy"])
    stuck.delay = 3.0
    own, records = _recording_logger("stuck")
    pool = pool_factory(balancer="round_robin", logger=own)
    for server in (stuck, healthy):
        pool.add_connection("dep", server.address)
    answered = await answered_in_turn(pool, 12, timeout=0.2, endpoints=("/index",))
    assert answered == [False, True] * 3 + [True] * 6, answered
    assert [c.address.target for c in pool.get_replicas("dep").eligible()] == [healthy.address]
    [ejection] = [record.getMessage() for record in records if "ejecting replica" in record.getMessage()]
    assert ejection.endswith("on /index, while the other replicas answered it) x3"), ejection


async def test_a_hung_replica_ejected_as_the_outlier_is_let_back_in_once_it_answers(
    pool_factory, echo_servers, eventually
):
    from grpc_health.v1 import health_pb2

    pool, hung, healthy, _ = await hung_beside_a_healthy_one(pool_factory, echo_servers)
    await answered_in_turn(pool, 6, timeout=0.2)  # three missed, three answered: ejected once its check fails
    replicas = pool.get_replicas("dep")
    [outlier] = [c for c in replicas.get_all_connections() if c.address.target == hung.address]
    await eventually(lambda: not replicas.is_eligible(outlier))
    hung.delay = hung.health_delay = 0.0
    await hung.health.set("", health_pb2.HealthCheckResponse.SERVING)
    await eventually(lambda: replicas.is_eligible(outlier), timeout=5.0)  # its probe: after base_ejection
    assert {served_by(await send_one(pool, timeout=0.2)) for _ in range(4)} == {"hung", "healthy"}


@pytest.mark.parametrize("endpoints", [1, 2, 17], ids=["one-endpoint", "two-endpoints", "seventeen-endpoints"])
async def test_a_hung_replica_missing_short_deadlines_on_endpoints_in_turn_is_ejected(
    pool_factory, echo_servers, endpoints
):
    """A regression review's find: a caller cycling endpoints one request at a time has round robin send the hung
    replica every /e0 and the healthy one every /e1 (two endpoints), or the hung one's misses spread over more
    endpoints than a replica keeps runs for (seventeen): compared endpoint by endpoint, it was never ejected, and
    every other request failed until keepalive. Its misses count against the others' answers on any endpoint
    too, and its health check, not answered within HEALTH_TIMEOUT, says it is not merely busy: ejected, its whole
    run blamed. On one endpoint it is blamed at once, no check asked."""
    pool, hung, healthy, records = await hung_beside_a_healthy_one(pool_factory, echo_servers)
    began = time.monotonic()
    answered = await answered_in_turn(pool, 30, timeout=0.1, endpoints=tuple(f"/e{n}" for n in range(endpoints)))
    assert all(answered[-8:]), answered
    assert [c.address.target for c in pool.get_replicas("dep").eligible()] == [healthy.address]
    [ejection] = [record.getMessage() for record in records if "ejecting replica" in record.getMessage()]
    if endpoints == 1:
        assert ejection.endswith("up to 0.1s on /e0, while the other replicas answered it) x3"), ejection
        assert answered.count(False) == 3 and hung.health_checks == 0
    else:
        assert ejection.endswith(
            "after 3 failures in a row: DEADLINE_EXCEEDED (callers' deadlines up to 0.1s, while the other replicas "
            f"answered; its health check: not answering within {HEALTH_TIMEOUT:g}s) x3"
        ), ejection
    assert time.monotonic() - began < HEALTH_TIMEOUT + 4  # not keepalive's 30-40 s


async def test_a_replica_whose_health_says_not_serving_is_set_aside_as_draining(pool_factory, echo_servers):
    """A regression review's find: a replica draining (its health NOT_SERVING as it drains) that misses callers'
    short deadlines on endpoints in turn was ejected as failed (a WARNING, an ejection's back-off). Its health
    check saying it goes away sets it aside as draining instead, as its refusals would."""
    from grpc_health.v1 import health_pb2

    going, healthy = await echo_servers(2, names=["going", "healthy"])
    going.delay = 30.0
    await going.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    own, records = _recording_logger("going")
    own.setLevel(logging.INFO)
    pool = pool_factory(balancer="round_robin", logger=own)
    for server in (going, healthy):
        pool.add_connection("dep", server.address)
    answered = await answered_in_turn(pool, 12, timeout=0.1, endpoints=("/a", "/b"))
    assert all(answered[-6:]), answered
    replicas = pool.get_replicas("dep")
    [aside] = [c for c in replicas.get_all_connections() if c.address.target == going.address]
    assert not replicas.is_eligible(aside) and aside.draining and aside.times_ejected == 0 and aside.failures == 0
    messages = [record.getMessage() for record in records]
    assert not [message for message in messages if "ejecting replica" in message], messages
    assert [message for message in messages if f"replica {going.address} is draining" in message], messages


async def test_replicas_missing_short_deadlines_on_a_slow_endpoint_only_are_not_ejected(pool_factory, echo_servers):
    """A regression review's find: two healthy replicas, /slow longer than the callers' deadline on either, /fast
    quick; a caller alternating them one at a time gets, by round robin, every /slow to one replica and every /fast
    to the other. The first's misses look like a hung replica's to the calls; its health check answers SERVING,
    so it is busy, not hung, and stays (it was ejected in turn with the other, five times in ten seconds)."""
    own, records = _recording_logger("endpoints")
    servers = await echo_servers(2, endpoint_delays={"/slow": 1.0})
    pool = pool_factory(balancer="round_robin", logger=own)
    for server in servers:
        pool.add_connection("dep", server.address)
    answered = await answered_in_turn(pool, 8, timeout=0.2, endpoints=("/slow", "/fast"))
    assert answered == [False, True] * 4
    replicas = pool.get_replicas("dep")
    assert len(replicas.eligible()) == 2 and all(c.times_ejected == 0 for c in replicas.get_all_connections())
    assert not [record for record in records if "ejecting replica" in record.getMessage()]
    assert servers[0].health_checks >= 1  # asked, and answered SERVING


async def test_workers_busy_on_a_blocking_endpoint_answer_their_health_check_and_are_not_ejected(
    pool_factory, runtimes
):
    """The same through real workers: a blocking handler holds one of a worker's handler threads past the
    callers' deadlines, its event loop free, so its health service answers SERVING within the check's time and
    neither worker is ejected."""
    busy = [executors.Blocking.create(), executors.Blocking.create()]
    workers = [await runtimes(Worker(executor)) for executor in busy]
    own, records = _recording_logger("busy-workers")
    pool = pool_factory(balancer="round_robin", logger=own)
    try:
        for worker in workers:
            pool.add_connection("dep", worker.server.address)
        answered = await answered_in_turn(pool, 8, timeout=0.2, endpoints=("/block", "/fast"))
        assert answered == [False, True] * 4
        replicas = pool.get_replicas("dep")
        assert len(replicas.eligible()) == 2 and all(c.times_ejected == 0 for c in replicas.get_all_connections())
        assert not [record for record in records if "ejecting replica" in record.getMessage()]
    finally:
        for executor in busy:
            executor.release.set()


async def test_replicas_all_missing_short_deadlines_are_not_ejected(pool_factory, echo_servers):
    """A shard too slow for its callers' short deadlines is no outlier's: every replica misses them (nothing
    answered), or the others answer only callers with longer deadlines. None is ejected, nor health-checked."""
    slow_a, slow_b = await echo_servers(2, delay=0.15)
    pool = pool_factory(balancer="round_robin")
    for server in (slow_a, slow_b):
        pool.add_connection("dep", server.address)
    for _ in range(3):  # round robin: slow_a misses the short deadlines, slow_b answers only long ones
        assert await answered_in_turn(pool, 1, timeout=0.05) == [False]
        assert await answered_in_turn(pool, 1, timeout=2.0) == [True]
    assert await answered_in_turn(pool, 6, timeout=0.05) == [False] * 6  # three misses each, none answered
    replicas = pool.get_replicas("dep")
    assert len(replicas.eligible()) == 2 and all(c.times_ejected == 0 for c in replicas.get_all_connections())
    assert slow_a.health_checks == slow_b.health_checks == 0


async def test_one_round_over_one_replica_is_one_attempt(pool_factory, echo_servers):
    [failing] = await echo_servers(1, fail_with=grpc.StatusCode.UNAVAILABLE)
    pool = pool_factory(retry=RetryPolicy(rounds=1))
    pool.add_connection("dep", failing.address)
    with pytest.raises(ReplicaError):
        await send_one(pool)
    assert failing.calls == 1 and pool.retry_budget.total_retries == 0


async def test_a_back_off_that_would_outlast_the_callers_deadline_ends_the_retries_at_once(
    pool_factory, echo_servers, monkeypatch
):
    """A round's back-off of 2 s against a 1 s deadline: the pool slept to the deadline, then sent an attempt with
    half a millisecond left, and the caller had its UNAVAILABLE after its whole second instead of at once (a
    review). It fails now, saying why, and sends nothing more."""
    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda low, high: high)  # the jitter's longest pause
    [failing] = await echo_servers(1, fail_with=grpc.StatusCode.UNAVAILABLE)
    pool = pool_factory(retry=RetryPolicy(rounds=3, backoff_initial=2.0, backoff_max=2.0))
    pool.add_connection("dep", failing.address)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReplicaError) as failed:
        await send_one(pool, timeout=1.0)
    assert loop.time() - started < 0.5 and failing.calls == 2  # the first failover goes at once, as before
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert "too little of the caller's deadline left for another attempt" in str(failed.value)
    assert pool.retry_budget.total_retries == 1  # the one retry made: none spent on an attempt not sent
    with pytest.raises(ReplicaError) as failed:  # its one retry spent: the retries ended it, not the time
        await send_one(pool, timeout=1.0, retries=1)
    assert "the last of 2 attempts" in str(failed.value) and "too little" not in str(failed.value)


async def test_no_attempt_within_a_round_goes_with_less_than_min_attempt_seconds_of_the_deadline(
    pool_factory, echo_servers
):
    """Two hung replicas, attempts of 0.99 s under a 1 s deadline: the second was sent the request with 10 ms
    left, and ran it once the caller had given up (a regression review)."""
    hung = await echo_servers(2, delay=10.0)
    pool = pool_factory(retry=RetryPolicy(attempt_timeout=0.99, rounds=1))
    for server in hung:
        pool.add_connection("dep", server.address)
    with pytest.raises(DeadlineExceeded, match="too little of the caller's deadline left for another attempt"):
        await send_one(pool, timeout=1.0)
    assert sorted(server.calls for server in hung) == [0, 1]


async def test_jinas_logger_compression_and_channel_options_are_taken(pool_factory, echo_servers, dead_address):
    own, records = _recording_logger("jina-style")
    [live] = await echo_servers(1)
    pool = pool_factory(logger=own, compression="Gzip", channel_options=[("grpc.primary_user_agent", "jina-style")])
    pool.add_connection("dep", dead_address)
    pool.add_connection("dep", live.address)
    for _ in range(6):  # round robin: the dead replica fails every other call, three times: ejected, and logged
        assert served_by(await send_one(pool)) == "echo-0"  # gzip-compressed calls, answered
    assert any("ejecting replica" in record.getMessage() for record in records)
    assert ("grpc.default_compression_algorithm", int(grpc.Compression.Gzip)) in pool.get_replicas("dep")._options
    with pytest.raises(ConfigurationError, match="compression 'zip'"):
        GrpcConnectionPool(compression="zip")
    with pytest.raises(ConfigurationError, match="not both"):
        GrpcConnectionPool(options=[], channel_options=[])


async def test_a_send_from_a_thread_without_a_running_loop_is_refused_saying_what_to_do(pool, echo_servers):
    """A pool filled in its loop, sent through from a plain thread (a thread pool of a blocking app): asyncio's
    bare "no running event loop", and a "coroutine ... was never awaited" warning; now shardnet's words, and
    nothing picked or left behind."""
    import warnings

    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)

    def from_a_thread() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a coroutine never awaited would be an error here
            for send in (lambda: pool.send_request(DataRequest(), "dep"), lambda: pool.send_discover_endpoint("dep")):
                with pytest.raises(ConfigurationError, match="run_coroutine_threadsafe"):
                    send()
            import gc
            gc.collect()

    await asyncio.to_thread(from_a_thread)
    await send_one(pool)  # the pool serves its own loop as before


async def test_bad_calls_are_configuration_errors_naming_what_is_wrong(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    with pytest.raises(ConfigurationError, match="method 'process_data': expected one of"):
        await pool.call(DataRequest(), "dep", pool.get_replicas("dep"), method="process_data")
    with pytest.raises(ConfigurationError, match="send_requests to 'dep' needs at least one request"):
        pool.send_requests([], "dep")
    with_dict = GrpcConnectionPool(metadata={"tenant": "a"})  # a dict, as Jina callers write metadata
    with_dict.add_connection("dep", server.address)
    try:
        await send_one(with_dict)
        assert server.received_metadata[-1]["tenant"] == "a"
    finally:
        await with_dict.close()


def test_polling_type_reads_and_prints_as_jinas_does():
    assert str(PollingType.ALL) == "ALL" and f"{PollingType.ANY}" == "ANY"
    assert PollingType.from_string("all") is PollingType.ALL and int(PollingType.ALL) == 2
    assert PollingType.ANY.to_string() == "ANY" and PollingType.ANY.is_push and not PollingType.ANY.is_block
    assert PollingType.ALL.is_block and not PollingType.ALL.is_push
    with pytest.raises(ConfigurationError, match="unknown polling True"):  # 1 to Python, ANY: read as such before
        PollingType.parse(True)


async def test_the_single_request_calls_take_jinas_positional_arguments(pool, echo_servers):
    """Jina's ``send_request(request, deployment, head, shard_id, polling_type, endpoint, timeout, retries)`` and
    ``send_request_once(request, deployment, head, shard_id, timeout, retries)``: a 5.0 in the timeout's place
    was read as metadata or a shard id (found by a review)."""
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address, shard_id=0)
    pool.add_connection("dep", server.address, head=True)
    [task] = pool.send_request(DataRequest(endpoint="/i"), "dep", False, 0, PollingType.ANY, "/search", 5.0, 0)
    await task
    assert server.received_metadata[-1]["endpoint"] == "/search"
    await pool.send_request_once(DataRequest(endpoint="/h"), "dep", True)
    await pool.send_request_once(DataRequest(endpoint="/o"), "dep", False, 0, 5.0, 0, endpoint="/e")
    assert server.calls == 3 and server.received_metadata[-1]["endpoint"] == "/e"
    with pytest.raises(ConfigurationError, match="timeout"):
        pool.send_request_once(DataRequest(), "dep", False, 0, -1.0)


async def test_discover_endpoint(pool, echo_servers):
    [head] = await echo_servers(1)
    pool.add_connection("dep", head.address, head=True)
    assert pool.send_discover_endpoint("unknown") is None
    with pytest.raises(ReplicaError) as caught:  # the echo replica has no discovery service
        await pool.send_discover_endpoint("dep")
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED and caught.value.address == head.address


async def test_an_endpoint_that_cannot_be_metadata_travels_in_the_header_and_beside_it_only_is_refused(
    pool, echo_servers
):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    response, _ = await pool.send_request_once(DataRequest(endpoint="/caf\u00e9"), "dep")
    assert response.endpoint == "/caf\u00e9" and server.calls == 1
    with pytest.raises(ProtocolError, match="printable ASCII.*set it in the request's header"):
        pool.send_request(DataRequest(), "dep", endpoint="/a\nb")  # it would reach no worker
    assert server.calls == 1


@pytest.mark.parametrize("timed, code", [(True, grpc.StatusCode.DEADLINE_EXCEEDED), (False, grpc.StatusCode.UNAVAILABLE)])
def test_a_call_ended_ok_without_an_answer_is_an_error_not_a_none_response(timed, code):
    """grpc.aio ends a call now and then with status OK and no message when its deadline expires as the answer
    is sent (seen about once in a thousand calls racing their deadline); that must not reach a caller as None."""
    from shardnet.networking.channels import checked_reply

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        checked_reply(None, "127.0.0.1:5", "dep/shard-0", timed=timed)
    assert caught.value.code() == code
    assert "127.0.0.1:5 ended the call without an answer" in caught.value.details()


async def test_a_request_refused_by_every_replica_is_marked_unsent(pool_factory, dead_address):
    # no attempt reached a replica: the one kind of failure after which a head may send an ANY request to another
    # shard without its running twice
    pool = pool_factory()
    pool.add_connection("dep", dead_address)
    with pytest.raises(ReplicaError) as caught:
        await pool.send_request(DataRequest(), "dep")[0]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.unsent


async def test_a_request_a_replica_took_is_never_marked_unsent_whatever_its_last_attempt_met(
    pool_factory, echo_servers, dead_address, eventually
):
    # the slow replica takes it, its call is cut (its lease lapsed, say), the failover meets a dead replica:
    # the last error is a refusal, but the request may have run
    [slow] = await echo_servers(1, delay=5.0)
    pool = pool_factory(balancer="round_robin")
    pool.add_connection("dep", slow.address)
    pool.add_connection("dep", dead_address)
    task = pool.send_request(DataRequest(), "dep")[0]  # round robin: the first replica added
    await eventually(lambda: slow.calls == 1, timeout=5.0)
    await pool.remove_connection("dep", slow.address, grace=0)
    with pytest.raises(ReplicaError) as caught:
        await task
    assert caught.value.address == dead_address and "Connection refused" in str(caught.value)
    assert not caught.value.unsent
    # and the words say so: the refusal alone would read as if no replica ever had the request
    assert f"an earlier attempt, on replica {slow.address}, may have run it: " in str(caught.value)
    assert "was closed with this call still on it" in str(caught.value)


async def test_a_close_cut_short_also_cuts_the_calls_left_on_a_removed_replica(pool_factory, echo_servers, eventually):
    [hung] = await echo_servers(1, delay=60.0)
    pool = pool_factory()
    pool.add_connection("dep", hung.address)
    task = pool.send_request(DataRequest(), "dep")[0]
    await eventually(lambda: hung.calls == 1, timeout=5.0)
    removed = await pool.remove_connection("dep", hung.address)  # its call keeps the grace of a replica leaving alive
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pool.close(), 0.05)
    with pytest.raises(ReplicaError) as cut:
        await asyncio.wait_for(task, 5.0)
    assert cut.value.code == grpc.StatusCode.UNAVAILABLE and hung.address in str(cut.value)
    await eventually(lambda: removed.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN, timeout=5.0)


async def test_a_replica_added_while_the_pool_closes_is_closed_too(pool_factory, echo_servers, eventually):
    [slow, other, late] = await echo_servers(3, delay=60.0)
    pool = pool_factory()
    pool.add_connection("dep", slow.address)
    pool.send_request(DataRequest(), "dep")  # keeps the close waiting its half second
    await eventually(lambda: slow.calls == 1, timeout=5.0)
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0.05)  # the close is under way (its grace is 0.5 s)
    pool.add_connection("dep", other.address)  # a watch or an ACTIVATE landing meanwhile
    pool.add_connection("new", late.address)
    added = [
        connection
        for deployment in ("dep", "new")
        for connection in pool.get_replicas(deployment).get_all_connections()
        if connection.address.target != slow.address
    ]
    assert len(added) == 2
    await asyncio.wait_for(closing, 5.0)
    assert pool.deployments == {}
    shut = grpc.ChannelConnectivity.SHUTDOWN
    await eventually(lambda: all(connection.channel.get_state() == shut for connection in added), timeout=5.0)


async def test_a_request_the_caller_got_wrong_does_not_sideline_the_replica(pool_factory, echo_servers):
    [refusing] = await echo_servers(1, fail_with=grpc.StatusCode.INVALID_ARGUMENT, fail_times=1)
    pool = pool_factory(balancer="p2c_ewma")
    pool.add_connection("dep", refusing.address)
    with pytest.raises(ReplicaError, match="INVALID_ARGUMENT"):
        await send_one(pool)
    replicas = pool.get_replicas("dep")
    [connection] = replicas.get_all_connections()
    balancer = replicas.balancer
    # what p2c weighs the replica by: the failure penalty (1 s) would send traffic elsewhere for tens of seconds
    assert balancer._cost(balancer._load(connection, balancer._clock()), balancer._clock()) < 0.5
    assert served_by(await send_one(pool)) == refusing.name


async def test_declaring_fewer_shards_drops_the_empty_ones_and_refuses_while_others_hold_replicas(pool, echo_servers):
    [zero, two] = await echo_servers(2)
    pool.declare_shards("dep", 4)
    pool.add_connection("dep", zero.address, shard_id=0)
    pool.declare_shards("dep", 2)
    assert pool.shard_ids("dep") == [0, 1]
    tasks = pool.send_request(DataRequest(), "dep", polling_type=PollingType.ALL)
    assert len(tasks) == 2  # shards 2 and 3 are no longer part of ALL
    await asyncio.gather(*tasks, return_exceptions=True)
    pool.add_connection("other", two.address, shard_id=2)
    with pytest.raises(ConfigurationError, match=r"cannot declare 2 shards while shards 2 still have replicas"):
        pool.declare_shards("other", 2)
    assert pool.shard_ids("other") == [2]


async def test_more_shards_than_a_head_holds_workers_are_refused_and_the_declared_ones_stay(pool):
    """declare_shards took up to 2**31-1 shards and made every one at once (300,000: 2.3 s and 282 MB), where
    head --shards stops at 10,000 (found by a bad-input review)."""
    from shardnet.networking.pool import MAX_SHARDS
    from shardnet.runtimes.head import MAX_WORKERS

    assert MAX_SHARDS == MAX_WORKERS == 10_000
    pool.declare_shards("dep", 2)
    for count in (MAX_SHARDS + 1, 2**31 - 1):
        with pytest.raises(ConfigurationError, match=rf"'dep': a count of shards is an integer from 0 to {MAX_SHARDS} "
                                                     rf"\(each is made at once.*got {count}$"):
            pool.declare_shards("dep", count)
    assert pool.shard_ids("dep") == [0, 1]


@pytest.mark.parametrize("grace", ["5", -3, float("nan"), True])
async def test_a_bad_grace_is_refused_and_the_replica_stays(pool, echo_servers, grace):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    with pytest.raises(ConfigurationError, match="grace must be 0 or more seconds"):
        await pool.remove_connection("dep", server.address, grace=grace)
    with pytest.raises(ConfigurationError, match="grace must be 0 or more seconds"):
        await pool.get_replicas("dep").remove_connection(server.address, grace=grace)
    assert served_by(await send_one(pool)) == server.name


async def test_a_failover_the_retry_budget_stopped_says_so(pool_factory, echo_servers):
    servers = await echo_servers(3, fail_with=grpc.StatusCode.UNAVAILABLE)
    # the floor allows one retry in the window and no more: the second failover is the budget's to refuse
    pool = pool_factory(retry_budget=RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0))
    for server in servers:
        pool.add_connection("dep", server.address)
    with pytest.raises(ReplicaError, match=r"the last of 2 attempts, the retry budget exhausted"):
        await send_one(pool)
    assert pool.retry_budget.refused == 1


async def test_an_endpoint_that_is_not_text_is_refused_naming_it(pool, echo_servers):
    [server] = await echo_servers(1)
    pool.add_connection("dep", server.address)
    with pytest.raises(ConfigurationError, match="endpoint must be text such as '/search', got 5"):
        pool.send_request(DataRequest(), "dep", endpoint=5)
    assert server.calls == 0


async def test_a_deployment_emptied_and_forgotten_is_no_warning_and_an_emptied_one_called_is_one(pool, echo_servers,
                                                                                                  caplog):
    """Discovery following a namespace removes a deployment's replicas and forgets it: each emptied list warned
    "no replica left ... requests for it fail" though none would come (a review: thousands at a namespace's
    teardown). The warning now comes with the first call that finds the list empty, once."""
    [server] = await echo_servers(1)
    with caplog.at_level(logging.WARNING):
        for name in ("gone", "kept"):
            pool.add_connection(name, server.address)
            await pool.remove_connection(name, server.address)
        assert pool.forget_deployment("gone")
        assert "no replica left" not in caplog.text
        for _ in range(3):
            with pytest.raises(RoutingError):
                await pool.send_request(DataRequest(), "kept", polling_type=PollingType.ALL)[0]
    assert caplog.text.count(f"no replica left: {server.address} was the last") == 1


# -- a review of races: a close with calls failing, a pool kept across event loops ---------------------------


async def test_failures_during_close_do_not_open_a_channel_nobody_closes(pool_factory, echo_servers):
    """Calls failing UNAVAILABLE within close()'s half-second grace used to be counted against their replica (the
    closing list still lists it), and the third rebuilt its channel after close() had closed the old one: the new
    channel was never closed, and a health check over it after the close dialled the replica again."""
    [dying] = await echo_servers(1, delay=0.2, fail_with=grpc.StatusCode.UNAVAILABLE)
    pool = pool_factory()
    pool.add_connection("d", dying.address)
    [connection] = pool.get_replicas("d").get_all_connections()
    tasks = [pool.send_request(DataRequest(endpoint="/x"), "d", retries=0)[0] for _ in range(5)]
    await asyncio.sleep(0.05)  # every call is on the replica
    await pool.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert connection.channel._channel.closed(), "the connection's channel was left open after close()"


def test_an_address_added_again_from_a_later_event_loop_gets_a_channel_there(threaded_echo):
    """A long-lived pool used by one asyncio.run per batch: the second batch's add_connection of the address the
    pool held kept the first loop's channel (its loop closed), and every send failed with a ConfigurationError
    asking to add connections from the loop that sends, which is what the caller had just done."""
    server = threaded_echo.start()
    pool = GrpcConnectionPool()

    async def batch() -> None:
        pool.add_connection("d", server.address)
        await pool.send_request(DataRequest(endpoint="/x"), "d")[0]

    asyncio.run(batch())
    asyncio.run(batch())
    asyncio.run(pool.close())


@pytest.mark.parametrize("closing", ["asyncio.run", "run_until_complete then close"])
def test_a_replica_ejected_in_an_earlier_event_loop_is_probed_again_when_added_again(threaded_echo, closing):
    """asyncio.run's teardown cancels an ejected replica's probe: in the next loop nothing checked it again, and
    it stayed ejected for good, healthy or not, though added again. A loop closed without cancelling its tasks
    (run_until_complete, then close()) left the probe pending there, still listed: no new one started either."""
    flaky, steady = threaded_echo.start("flaky"), threaded_echo.start("steady")
    pool = GrpcConnectionPool(ejection=EjectionPolicy(consecutive_failures=1, base_ejection=0.1, max_ejection=0.2))

    async def eject() -> None:
        pool.add_connection("d", flaky.address)
        pool.add_connection("d", steady.address)
        flaky.fail_with = grpc.StatusCode.UNAVAILABLE
        for _ in range(4):
            try:
                await pool.send_request(DataRequest(endpoint="/x"), "d", retries=0)[0]
            except ReplicaError:
                pass
        assert pool.get_replicas("d").ejected_addresses == [flaky.address]

    async def later() -> list[str]:
        pool.add_connection("d", flaky.address)
        pool.add_connection("d", steady.address)
        deadline = time.monotonic() + 3
        while pool.get_replicas("d").ejected_addresses and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ejected = pool.get_replicas("d").ejected_addresses
        await pool.close()
        return ejected

    if closing == "asyncio.run":
        asyncio.run(eject())
    else:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(eject())
        loop.close()  # its pending tasks (the probe) are neither cancelled nor run
    flaky.fail_with = None
    assert asyncio.run(later()) == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how", ["removed", "reset"])
def test_a_pool_closes_in_a_later_loop_after_one_closed_with_closing_channels_pending(threaded_echo, how):
    server = threaded_echo.start("one")
    pool = GrpcConnectionPool()

    async def first() -> None:
        pool.add_connection("d", server.address)
        if how == "removed":
            await pool.remove_connection("d", server.address)  # its channel closes in the background
        else:
            await pool.get_replicas("d").reset_connection(server.address)  # the old channel retires

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    loop.close()  # the closing tasks are left pending there

    async def later() -> None:
        await asyncio.wait_for(pool.close(), 5)

    asyncio.run(later())


@pytest.mark.timeout(20)
def test_a_lagging_replicas_health_check_left_in_a_closed_loop_neither_breaks_nor_blocks_the_next():
    """Its check task, pending in a loop closed without cancelling it: end_runs and close() raised 'Event loop
    is closed' (task.cancel schedules on its loop), and, the check never ending, no later one was started."""
    from shardnet.networking.outliers import ShortDeadlineOutliers, _Lagging

    outliers = ShortDeadlineOutliers(None, lambda *args: None, lambda connection: False)
    old = asyncio.new_event_loop()
    stale = old.create_task(asyncio.sleep(3600))
    old.run_until_complete(asyncio.sleep(0))
    old.close()
    for replica in ("a", "b"):
        outliers.lagging[replica] = _Lagging()
        outliers.lagging[replica].check = stale

    async def later() -> None:
        outliers.end_runs("a")
        await asyncio.wait_for(outliers.close(), 5)

    asyncio.run(later())
    assert outliers.lagging == {}


async def test_a_replicas_hostile_status_details_reach_the_error_escaped_and_bounded(echo_servers):
    """A replica's status details went into ReplicaError's message and ``cause`` as they came: a newline began a
    line of the replica's own in a caller's log, ANSI/OSC escapes (clear the screen, retitle the terminal) reached
    the terminal an uncaught error or ``logger.error("%s", exc)`` printed on, up to gRPC's 8-16 KB of metadata
    (found by a review). They are escaped as repr writes them, and cut. (5,000 characters: past 8 KB gRPC refuses
    the trailers now and then, RESOURCE_EXHAUSTED, instead of passing them on.)"""
    hostile = "boom\nshardnet: all replicas OK \x1b[2J\x1b]0;pwned\x07 " + "A" * 5_000
    [server] = await echo_servers(1, fail_with=grpc.StatusCode.INTERNAL, fail_details=hostile)
    pool = GrpcConnectionPool()
    pool.add_connection("dep", server.address, shard_id=0)
    try:
        with pytest.raises(ReplicaError) as raised:
            await send_one(pool)
    finally:
        await pool.close()
    said = str(raised.value)
    assert said.isprintable() and "\\n" in said and "\\x1b[2J" in said and "\\x07" in said
    assert len(said) < 2_300 and f"({len(hostile)} characters)" in said
    assert said.startswith(f"deployment 'dep', shard 0, replica {server.address}: INTERNAL: boom\\nshardnet")
