"""Channels closed on a busy head without walking the loop's tasks: a replica check's, and a removed replica's
once its calls have ended.

grpc.aio's ``Channel.close()`` looks through every task of the loop for calls to cut; a head with some thousands
of shard calls in flight spent ~50 ms per closed check channel, 64 of them ending in one loop pass: the loop
stalled for seconds and ``shardnet status`` named serving replicas as not answering (16 of 64 shards "down").
Removing replicas under load (a DEACTIVATE of many workers, Kubernetes churn, lapsed leases) stalled it ~65 ms a
removal the same way.
"""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
import grpc.aio._channel as aio_channel
import pytest

from shardnet import DataRequest, GrpcConnectionPool, ReplicaError
from shardnet.networking.addresses import parse_address
from shardnet.networking.connection import Connection
from shardnet.runtimes.replica_check import ReplicaChecks
from shardnet.testing import EchoServer


def _open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


@pytest.fixture
def walks(monkeypatch):
    """How many times grpc.aio walked the loop's tasks to close a channel."""
    counted = []
    original = aio_channel._all_tasks

    def counting():
        counted.append(1)
        return original()

    monkeypatch.setattr(aio_channel, "_all_tasks", counting)
    return counted


async def test_a_replica_check_closes_its_channels_without_walking_the_loops_tasks(walks) -> None:
    servers = [await EchoServer(f"e{index}").start() for index in range(4)]
    pool = GrpcConnectionPool()
    try:
        for index, server in enumerate(servers):
            pool.add_connection("dep", server.address, shard_id=index % 2)
        checks = ReplicaChecks(pool, "dep", asyncio.Event())
        idle = [asyncio.ensure_future(asyncio.sleep(60)) for _ in range(2000)]  # a busy head's calls, standing in
        try:
            found = await checks.check(5.0)
        finally:
            for task in idle:
                task.cancel()
            await asyncio.gather(*idle, return_exceptions=True)
        assert (found.checked, found.down, found.shards_down, found.unchecked) == (4, [], [], 0)
        assert walks == []  # before: one walk of the 2,000 tasks per replica checked
        await checks.close()
    finally:
        await pool.close()
        for server in servers:
            await server.stop(0)


def _closed(channel: grpc.aio.Channel) -> bool:
    return channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN


@pytest.mark.parametrize("request_streams", [False, True], ids=["unary", "request-streams"])
async def test_a_removed_replica_whose_calls_have_ended_is_closed_without_walking_the_loops_tasks(
    walks, pool_factory, echo_servers, eventually, request_streams
) -> None:
    leaving, staying = await echo_servers(2)
    pool = pool_factory(balancer="round_robin", request_streams=request_streams)
    for server in (leaving, staying):
        pool.add_connection("dep", server.address)
    for _ in range(4):
        await pool.send_requests_once([DataRequest()], "dep", timeout=5.0)
    assert leaving.calls == staying.calls == 2
    removed = await pool.remove_connection("dep", leaving.address, grace=5.0)
    await eventually(lambda: _closed(removed.channel), timeout=5.0)
    assert walks == []  # before: one walk of every task of the loop per removed replica
    for _ in range(2):
        await pool.send_requests_once([DataRequest()], "dep", timeout=5.0)
    assert (leaving.calls, staying.calls) == (2, 4)


async def test_a_call_still_on_a_removed_replica_when_its_grace_ends_is_cut_and_fails_over(
    walks, pool_factory, echo_servers, eventually
) -> None:
    """The calls this code does not hold itself are grpc.aio's close's to find: with one counted still running, the
    close walks the loop's tasks as before, and the call cut so goes to another replica."""
    [hung] = await echo_servers(1, delay=60.0)
    pool = pool_factory()
    pool.add_connection("dep", hung.address)
    task = pool.send_request(DataRequest(), "dep", timeout=30.0)[0]
    await eventually(lambda: hung.calls == 1, timeout=5.0)
    [other] = await echo_servers(1, names=["other"])
    pool.add_connection("dep", other.address)
    removed = await pool.remove_connection("dep", hung.address, grace=0.2)
    response, _ = await asyncio.wait_for(task, 10.0)
    assert response is not None and other.calls == 1
    await eventually(lambda: _closed(removed.channel), timeout=5.0)
    assert len(walks) == 1


async def test_a_channel_closed_so_refuses_new_calls_and_a_second_close_is_harmless() -> None:
    from shardnet.networking.connection import close_finished_channel

    async with EchoServer() as server:
        channel = grpc.aio.insecure_channel(server.address)
        await channel.channel_ready()
        await close_finished_channel(channel)
        await close_finished_channel(channel)
        await channel.close()  # grpc.aio's own close after it: nothing left to do
        with pytest.raises(Exception):
            await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=1)


async def test_a_check_of_a_hung_replica_its_caller_left_leaves_no_connection_behind(eventually):
    """A check cut short (a draining head, a caller leaving) while its connection's handshake was pending left that
    connection open, and gRPC redialling the hung replica for as long as the process lived (grpcio 1.78: its own
    close() does the same); the check now ends by its own deadline, and its channel closes then (a regression
    review)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel accepts; nothing ever answers
    connection = Connection(parse_address(f"127.0.0.1:{hung.getsockname()[1]}"))
    try:
        base = _open_fds()
        checks = [asyncio.ensure_future(connection.problem_now(1.0)) for _ in range(8)]
        await eventually(lambda: _open_fds() > base, timeout=5.0)  # dialling
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        await eventually(lambda: _open_fds() <= base, timeout=10.0)  # past the checks' own time: all closed
    finally:
        await connection.close()
        hung.close()
