"""A replica's channel closed under what is about to be sent on it (its removal's grace over): a request between a
request stream's BUSY refusal and the unary call it falls back to, a health check between its two questions, a
request cut as its replica left. What never left the process goes elsewhere; nothing raises grpc's raw UsageError."""

from __future__ import annotations

import asyncio

import executors
import grpc
import pytest

from shardnet import DataRequest, Document, GrpcConnectionPool
from shardnet.networking import streams
from shardnet.networking.policies import RetryPolicy
from shardnet.protocol import services
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker
from shardnet.testing import eventually, serving


async def busy_stream(requests, context):
    """A replica whose request streams refuse every request as BUSY (as a worker's full stream does)."""
    await context.send_initial_metadata(((streams.LIMIT_METADATA, "0"),))
    async for message in requests:
        request_id = DataRequest.from_bytes(message).request_id
        yield streams.status_message(request_id, grpc.StatusCode.UNAVAILABLE, services.BUSY_DETAILS)


@pytest.mark.parametrize("unsent_only", [False, True])
async def test_a_busy_refusal_read_as_its_replica_closes_fails_over_not_a_raw_usage_error(
    runtimes, monkeypatch, unsent_only
):
    other = await runtimes(Worker(executors.Sleepy.create(), ServerConfig()))
    entered, released, held = asyncio.Event(), asyncio.Event(), []

    def deliver_late(lane, message):  # the BUSY answer reaches its caller only once the test lets it
        future = lane.pending.pop(DataRequest.from_bytes(message).request_id)
        entered.set()

        async def later():
            await released.wait()
            future.set_result(DataRequest.from_bytes(message))

        held.append(asyncio.ensure_future(later()))

    async with serving(services.REQUEST_STREAM, busy_stream, stream=True) as busy:
        async with GrpcConnectionPool(request_streams=True, retry=RetryPolicy(unsent_only=unsent_only)) as pool:
            pool.add_connection("dep", busy)
            replicas = pool.get_replicas("dep")
            connection = replicas.get_all_connections()[0]
            await asyncio.wait_for(connection.channel.channel_ready(), timeout=5)
            lane = connection.stubs.streams.lane()
            await eventually(lambda: lane.ready or lane.task.done())
            connection.stubs.streams._turn = 0
            monkeypatch.setattr(streams._Lane, "_deliver", deliver_late)

            [task] = pool.send_request(
                DataRequest([Document(text="x")], endpoint="/sleep", parameters={"seconds": 0}), "dep"
            )
            await asyncio.wait_for(entered.wait(), timeout=5)
            pool.add_connection("dep", other.server.address)
            await pool.remove_connection("dep", busy, grace=0)  # a lapsed lease's cut, a replaced address
            await eventually(lambda: not replicas.has_closing_channels())
            released.set()
            answer, _ = await asyncio.wait_for(task, timeout=5)
            assert answer.docs[0].text == "x"
            assert answer.routes[-1].executor == other.name


async def test_a_health_check_whose_channel_closes_between_its_two_questions_names_a_problem_not_a_usage_error():
    """A replica with no health service (a Jina worker) is asked for its endpoints after its health check comes
    back UNIMPLEMENTED; its channel replaced and closed in between (a rebuild, a TLS renewal) is a problem of the
    check, as a close during either call is, not a raw UsageError that kills the probe (and the replica's way back
    into the picks) or an outlier check."""
    import dataclasses

    from google.protobuf import empty_pb2
    from shardnet.networking.replica_list import ReplicaList

    async def endpoints(request, context):
        return b""

    async with serving(services.ENDPOINT_DISCOVERY, endpoints) as address:
        replicas = ReplicaList(name="dep/shard-0")
        connection = replicas.add_connection(address)
        try:
            assert await connection.problem() is None  # it lists its endpoints: healthy
            real = connection.stubs.health

            async def health_then_rebuilt(request, timeout=None):
                try:
                    return await real(request, timeout=timeout)
                finally:  # the answer is in; the channel is replaced and closed before the next question
                    connection.rebuild()
                    await eventually(lambda: not connection._retiring)

            connection.stubs = dataclasses.replace(connection.stubs, health=health_then_rebuilt)
            problem = await connection.problem()
            assert problem is not None and "closed" in problem.cause
        finally:
            await replicas.close()


async def test_a_request_cut_on_a_removed_replica_still_gets_every_round_on_the_replicas_left():
    """RetryPolicy: up to ``rounds`` rounds, each trying every replica once. A request cut as its replica is
    removed (grace 0: a lapsed lease) fails over to the one left; that one failing once, round two tries it again
    rather than the removed replica's absence costing the request its second round."""
    calls = {"flaky": 0}

    async def slow(request, context):
        await asyncio.sleep(5)
        return request

    async def flaky(request, context):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "a blip")
        return request

    async with serving(services.PROCESS_SINGLE_DATA, slow) as leaving, \
            serving(services.PROCESS_SINGLE_DATA, flaky) as staying:
        async with GrpcConnectionPool() as pool:
            pool.add_connection("dep", leaving)
            [task] = pool.send_request(DataRequest([Document(text="x")], endpoint="/x"), "dep")
            replicas = pool.get_replicas("dep")
            await eventually(lambda: replicas.get_all_connections()[0].running.count == 1)  # on the slow one
            pool.add_connection("dep", staying)
            await pool.remove_connection("dep", leaving, grace=0)
            answer, _ = await asyncio.wait_for(task, timeout=5)
            assert answer.docs[0].text == "x" and calls["flaky"] == 2


async def test_a_request_cut_on_a_replica_removed_and_added_again_at_its_address_gets_every_round_on_the_new_one():
    """The same as above when the replica left is a new connection at the removed one's address (a pod restarted on
    its IP, an ACTIVATE after a lapsed lease): the cut attempt was on a connection no longer listed, so the new one
    gets every round of its own, not one fewer because its address is the same."""
    calls = {"n": 0}

    async def handler(request, context):
        calls["n"] += 1
        if calls["n"] == 1:
            await asyncio.sleep(5)  # cut by the removal
        elif calls["n"] == 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "a blip")
        return request

    async with serving(services.PROCESS_SINGLE_DATA, handler) as address:
        async with GrpcConnectionPool() as pool:
            pool.add_connection("dep", address)
            [task] = pool.send_request(DataRequest([Document(text="x")], endpoint="/x"), "dep")
            await eventually(lambda: calls["n"] == 1)  # the replica holds it (else the failover would be its first)
            await pool.remove_connection("dep", address, grace=0)
            pool.add_connection("dep", address)
            answer, _ = await asyncio.wait_for(task, timeout=5)
            assert answer.docs[0].text == "x" and calls["n"] == 3


@pytest.mark.parametrize("how", ["removal", "pool close"])
async def test_a_call_made_on_a_picks_stubs_directly_is_cut_when_its_replica_is_removed(how):
    """A Jina-style caller's own call on a pick's ``stubs`` (no deadline) is not counted among the calls a close
    waits for: the channel's close must cut it (a regression review: a channel closed without grpc.aio's walk of
    the loop's tasks left it running until keepalive, 41 s, against a hung replica)."""
    started = asyncio.Event()

    async def hung(request, context):
        started.set()
        await asyncio.sleep(30)
        return request

    async with serving(services.PROCESS_SINGLE_DATA, hung) as address:
        pool = GrpcConnectionPool()
        try:
            pool.add_connection("dep", address)
            connection = await pool.get_replicas("dep").get_next_connection(num_retries=1)
            call = asyncio.ensure_future(connection.stubs.single_data(DataRequest([Document(text="x")], endpoint="/x")))
            await asyncio.wait_for(started.wait(), timeout=5)
            if how == "removal":
                await pool.remove_connection("dep", address, grace=0.1)
            else:
                await pool.close()
            done, _ = await asyncio.wait([call], timeout=3)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            assert done, "the direct call still runs 3 s after its replica's channel was closed"
        finally:
            await pool.close()
