"""The pool when replicas die, come back, or give way to something else on their port: what a review of the
pool under churn found, each against real gRPC servers on loopback (a stopped process where a hang is needed)."""

from __future__ import annotations

import asyncio
import collections
import logging
import contextlib
import signal
import subprocess
import sys
import time

import grpc
import pytest

from shardnet import DataRequest, GrpcConnectionPool, ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.policies import EjectionPolicy, RetryBudget, RetryPolicy
from shardnet.protocol import services
from shardnet.runtimes.head import Head
from shardnet.testing import EchoServer

pytestmark = pytest.mark.timeout(60)

# ejected for long: a probe's own timer never lets a replica back within a test
LONG_EJECTION = EjectionPolicy(consecutive_failures=2, base_ejection=30.0, max_ejection=30.0)


async def served_by(pool: GrpcConnectionPool, deployment: str = "d", **kwargs) -> str:
    """The name of the echo server that answered one request, or the ReplicaError's class name."""
    try:
        _, trailing = await pool.send_requests_once([DataRequest()], deployment, **kwargs)
    except ReplicaError as error:
        return type(error).__name__
    return trailing["served-by"]


async def test_the_last_replica_left_failing_lets_an_ejected_one_that_came_back_in_at_once():
    """B was ejected while down, came back, then A died: every request went to dead A (the last pickable, never
    ejected) until B's probe came round, up to 30 s later. A's failures now check B at once."""
    async with b_ejected() as (pool, replicas, a, start_b_again):
        await start_b_again()  # back, its probe 30 s away
        await a.stop()
        outcomes = [await served_by(pool) for _ in range(8)]
        # a failure or two to learn A is gone (each request tries A alone), then B's health is checked at once
        assert outcomes[4:] == ["B"] * 4, outcomes


class NoReplica:
    """Another gRPC server on a replica's port: nothing of Jina's; grpc.health (SERVING) when ``health``."""

    def __init__(self, port: int, health: bool = True):
        from grpc_health.v1 import health as health_service, health_pb2, health_pb2_grpc

        self._server = grpc.aio.server()
        self._health = health_service.aio.HealthServicer() if health else None
        self._serving = health_pb2.HealthCheckResponse.SERVING
        if self._health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")

    async def __aenter__(self) -> "NoReplica":
        if self._health is not None:
            await self._health.set("", self._serving)
        await self._server.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._server.stop(0)


@pytest.mark.parametrize("balancer", ["round_robin", "p2c_ewma"])
async def test_another_kind_of_server_on_a_replicas_port_is_failed_over_and_ejected(balancer):
    """UNIMPLEMENTED for a data method is no replica's answer: half the requests failed under round robin."""
    a, b = EchoServer("A"), EchoServer("B")
    await a.start()
    await b.start()
    pool = GrpcConnectionPool(balancer=balancer, ejection=LONG_EJECTION)
    try:
        for server in (a, b):
            pool.add_connection("d", server.address)
        await b.stop()
        async with NoReplica(b.port):
            outcomes = collections.Counter([await served_by(pool) for _ in range(40)])
            assert outcomes == {"A": 40}, outcomes
            if balancer == "round_robin":  # p2c_ewma steers clear of it after a failure or two, ejected or not
                assert pool.get_replicas("d").ejected_addresses == [b.address]
    finally:
        await pool.close()
        await a.stop()


async def test_the_only_server_being_another_kind_still_fails_naming_the_replica():
    b = EchoServer("B")
    await b.start()
    pool = GrpcConnectionPool()
    try:
        pool.add_connection("d", b.address)
        await b.stop()
        async with NoReplica(b.port):
            with pytest.raises(ReplicaError, match=f"replica {b.address}: UNIMPLEMENTED"):
                await pool.send_requests_once([DataRequest()], "d")
    finally:
        await pool.close()


class ReplicaWithoutHealth:
    """A replica that serves Jina's data methods and endpoint discovery (as a Jina worker does), no grpc.health."""

    def __init__(self, port: int = 0):
        from google.protobuf import empty_pb2

        from shardnet.protocol.proto import jina_pb2

        def unary(path: str, handler) -> grpc.GenericRpcHandler:
            service, method = path.strip("/").split("/")
            return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(handler)})

        async def echo(payload: bytes, context) -> bytes:
            context.set_trailing_metadata((("served-by", "B"),))
            return payload

        async def endpoints(payload: bytes, context) -> bytes:
            empty_pb2.Empty.FromString(payload)
            return jina_pb2.EndpointsProto(endpoints=["/default"]).SerializeToString()

        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            [unary(services.PROCESS_SINGLE_DATA, echo), unary(services.ENDPOINT_DISCOVERY, endpoints)]
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"

    async def start(self) -> "ReplicaWithoutHealth":
        await self._server.start()
        return self

    async def stop(self) -> None:
        await self._server.stop(0)


async def test_a_replica_without_a_health_service_comes_back_after_its_ejection():
    """Its probe took UNIMPLEMENTED from grpc.health for sickness: ejected once, it never came back while another
    replica was there. A replica that lists its endpoints is healthy enough."""
    a = await EchoServer("A").start()
    b = await ReplicaWithoutHealth().start()
    pool = GrpcConnectionPool(ejection=EjectionPolicy(consecutive_failures=2, base_ejection=0.2, max_ejection=0.2))
    try:
        for address in (a.address, b.address):
            pool.add_connection("d", address)
        replicas = pool.get_replicas("d")
        port = b.port
        await b.stop()
        while replicas.ejected_addresses != [b.address]:
            await served_by(pool)
        b = await ReplicaWithoutHealth(port).start()
        deadline = time.monotonic() + 5
        while replicas.ejected_addresses and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert replicas.ejected_addresses == []
        assert "B" in [await served_by(pool) for _ in range(4)]
    finally:
        await pool.close()
        await a.stop()
        await b.stop()


async def test_a_server_with_neither_health_nor_endpoints_is_not_let_back_in_by_its_probe():
    """The other side of a replica without a health service: one that does not list endpoints either is no
    replica. (One whose grpc.health says SERVING is let back in, fails over again and is ejected for longer.)"""
    a, b = EchoServer("A"), EchoServer("B")
    await a.start()
    await b.start()
    pool = GrpcConnectionPool(ejection=EjectionPolicy(consecutive_failures=2, base_ejection=0.1, max_ejection=0.1))
    try:
        for server in (a, b):
            pool.add_connection("d", server.address)
        await b.stop()
        async with NoReplica(b.port, health=False):
            replicas = pool.get_replicas("d")
            while replicas.ejected_addresses != [b.address]:
                await served_by(pool)
            await asyncio.sleep(0.5)  # several probes' turns: SERVING on grpc.health, but no endpoints
            assert replicas.ejected_addresses == [b.address]
    finally:
        await pool.close()
        await a.stop()


def stopped_echo_process() -> tuple[subprocess.Popen, str]:
    """An echo server in a process of its own (answering after 30 s), its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shardnet.testing", "--servers", "1", "--delays", "30", "--stop-on-eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    assert line.startswith("READY "), line
    return process, line.split()[1]


@pytest.mark.parametrize(
    "options",
    [{"grpc.keepalive_time_ms": 1000, "grpc.keepalive_timeout_ms": 1000},
     {"grpc.keepalive_time_ms": 1000, "grpc.http2.ping_timeout_ms": 1000}],
    ids=["keepalive-timeout", "ping-timeout"],
)
async def test_a_stopped_replica_is_given_up_on_after_keepalive_time_and_timeout(options):
    """gRPC 1.78 times a keepalive ping out by grpc.http2.ping_timeout_ms (60 s unless set), not by
    keepalive_timeout_ms: an untimed call on a SIGSTOPped replica waited 90 s where the options said 40."""
    process, address = stopped_echo_process()
    pool = GrpcConnectionPool(options=options, retry=RetryPolicy(rounds=1))
    try:
        pool.add_connection("d", address)
        call = pool.send_requests_once([DataRequest()], "d")
        await asyncio.sleep(0.3)  # the call is on its way
        process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ReplicaError, match="UNAVAILABLE"):
            await asyncio.wait_for(call, 30)
        assert time.monotonic() - started < 10
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)
        await pool.close()


async def test_requests_a_hung_and_ejected_replica_held_are_not_refused_by_the_retry_budget():
    """A SIGSTOPped replica's calls time out together once it is ejected: moving them is routing, as for a
    killed one. The budget (allowing 10 % retries here) turned most of them into DeadlineExceeded."""
    process, stopped = stopped_echo_process()
    live = await EchoServer("live").start()
    pool = GrpcConnectionPool(
        retry=RetryPolicy(attempt_timeout=0.5), retry_budget=RetryBudget(ratio=0.1, min_per_second=0.1),
        ejection=LONG_EJECTION,
    )
    try:
        pool.add_connection("d", live.address)
        pool.add_connection("d", stopped)
        process.send_signal(signal.SIGSTOP)
        outcomes = collections.Counter(await asyncio.gather(*(served_by(pool, timeout=10) for _ in range(100))))
        assert outcomes == {"live": 100}, outcomes
        assert pool.get_replicas("d").ejected_addresses == [stopped]
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(10)
        await pool.close()
        await live.stop()


async def test_a_worker_new_in_one_shard_on_the_port_of_another_shards_dead_worker_takes_its_place_there_only(
    runtimes, echo_servers
):
    """Shard 0's worker died (its lease not run out); a shard-1 worker started on its port. The head kept the port
    in shard 0 too, so shard 0's requests ran on the shard-1 process. A new process id there now removes it."""
    head = await runtimes(Head("resharded", shards=2, lease=60.0))
    server, other = await echo_servers(2)
    host, port = server.address.rsplit(":", 1)
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=5, instance="a" * 32)
    await oneshot.activate_worker(other.host, other.port, head.server.address, shard_id=1, renews_every=5,
                                  instance="c" * 32)
    # the process on the port is now another one, of shard 1
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=1, renews_every=5, instance="b" * 32)
    assert head.pool.get_replicas("resharded", shard_id=0).addresses == []
    assert sorted(head.pool.get_replicas("resharded", shard_id=1).addresses) == sorted([server.address, other.address])
    # the same process in two shards (or a Jina worker, with no id) is left as it registered
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=5, instance="b" * 32)
    assert head.pool.get_replicas("resharded", shard_id=0).addresses == [server.address]


async def test_a_deactivate_naming_no_shard_takes_the_worker_out_of_every_shard_and_its_leases(runtimes, echo_servers):
    """Jina's DEACTIVATE names no shard: the worker left shard 0 alone, and its shard-1 entry, its lease
    forgotten, stayed for good."""
    head = await runtimes(Head("everywhere", shards=2, lease=1.0))
    [server] = await echo_servers(1)
    host, port = server.address.rsplit(":", 1)
    for shard in (0, 1):
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=shard)
    await oneshot.deactivate_worker(host, int(port), head.server.address)
    for shard in (0, 1):
        assert head.pool.get_replicas("everywhere", shard_id=shard).addresses == [], shard


@contextlib.asynccontextmanager
async def b_ejected():
    """A pool over echo replicas A and B, ejecting for long, B stopped until ejected. Yields the pool, its
    replica list, A and a coroutine function starting B again on its port."""
    a, b = EchoServer("A"), EchoServer("B")
    started = [await a.start(), await b.start()]
    pool = GrpcConnectionPool(ejection=LONG_EJECTION, retry=RetryPolicy(rounds=1))
    try:
        for server in (a, b):
            pool.add_connection("d", server.address)
        replicas = pool.get_replicas("d")
        await b.stop()
        while replicas.ejected_addresses != [b.address]:
            await served_by(pool)

        async def start_b_again() -> EchoServer:
            started.append(await EchoServer("B", port=b.port).start())
            return started[-1]

        yield pool, replicas, a, start_b_again
    finally:
        await pool.close()
        for server in started:
            await server.stop()


@contextlib.asynccontextmanager
async def b_ejected_then_a_down():
    """``b_ejected``, then A stopped too (the last pickable). Yields the pool, its replica list and a coroutine
    function starting B again on its port."""
    async with b_ejected() as (pool, replicas, a, start_b_again):
        await a.stop()
        yield pool, replicas, start_b_again


async def test_a_replica_back_after_every_replica_died_is_found_within_a_second_or_so():
    """B ejected, then A (the last pickable) died too: the out-of-turn check of B failed, and the check went on
    waiting out B's 30 s back-off under the name that keeps any other check (an ACTIVATE's, the next failures')
    from starting. B back, it is now found by the next check, at most a second after the last."""
    async with b_ejected_then_a_down() as (pool, replicas, start_b_again):
        for _ in range(6):  # A's failures check B out of turn, while B is down
            assert await served_by(pool) == "ReplicaError"
            await asyncio.sleep(0.05)
        await start_b_again()
        deadline = time.monotonic() + 5
        outcomes = []
        while "B" not in outcomes[-1:] and time.monotonic() < deadline:
            outcomes.append(await served_by(pool))
            await asyncio.sleep(0.1)
        assert outcomes[-1] == "B", outcomes
        assert len(outcomes) <= 25, outcomes  # about 1.5 s: OUT_OF_TURN_CHECKS_EVERY and a check


async def test_an_out_of_turn_check_that_failed_leaves_room_for_a_registrations_own():
    """After a failed check the replica is probed on, and a new process registering there (readmit_if_healthy,
    as a head calls it on ACTIVATE) is checked at once: it was refused for as long as the back-off lasted."""
    async with b_ejected_then_a_down() as (pool, replicas, start_b_again):
        for _ in range(4):
            await served_by(pool)
        await asyncio.sleep(0.3)  # the out-of-turn check of B (down) is over
        b = await start_b_again()
        assert replicas.readmit_if_healthy(b.address)
        deadline = time.monotonic() + 3
        while replicas.ejected_addresses and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert replicas.ejected_addresses == []


async def test_a_head_passes_its_replicas_unimplemented_on_as_internal(runtimes):
    """A head whose replica is another kind of server answered UNIMPLEMENTED itself, which a pool in front of
    heads takes for another server on the head's port and sends elsewhere: uses_before ran again on each."""
    from shardnet.testing import free_port

    async with NoReplica(free_port(), health=False) as other:
        head = await runtimes(Head("relay", connections={0: [f"127.0.0.1:{other.port}"]}))
        with pytest.raises(ReplicaError) as caught:
            await oneshot.send_request_async(DataRequest(endpoint="/x"), head.server.address, timeout=5)
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "UNIMPLEMENTED" in str(caught.value) and f"127.0.0.1:{other.port}" in str(caught.value)


async def _deactivating_held_at_the_first_shard(head: Head, server: EchoServer, monkeypatch) -> tuple:
    """``server`` registered in shards 0 and 1 of ``head``, then a DEACTIVATE naming no shard sent for it, its
    removal held at the first shard until the Event returned is set. Returns (the DEACTIVATE's Task, that Event)."""
    host, port = server.address.rsplit(":", 1)
    for shard in (0, 1):
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=shard)
    entered, release = asyncio.Event(), asyncio.Event()
    remove = head.pool.remove_connection

    async def held_at_the_first(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            await release.wait()
        return await remove(*args, **kwargs)

    monkeypatch.setattr(head.pool, "remove_connection", held_at_the_first)
    leaving = asyncio.create_task(oneshot.deactivate_worker(host, int(port), head.server.address))
    await asyncio.wait_for(entered.wait(), timeout=5.0)
    return leaving, release


async def test_a_deactivate_whose_caller_leaves_between_two_shards_still_takes_the_worker_out_of_both(
    runtimes, echo_servers, eventually, monkeypatch
):
    """The removal from every shard goes on when the DEACTIVATE's caller leaves (a deadline, a disconnect): cut
    after the first shard, the worker stayed in the others, its leases forgotten, and nothing removed it."""
    head = await runtimes(Head("everywhere", shards=2, lease=60.0))
    [server] = await echo_servers(1)
    leaving, release = await _deactivating_held_at_the_first_shard(head, server, monkeypatch)
    leaving.cancel()  # the caller leaves: gRPC cancels the head's handler
    with pytest.raises(asyncio.CancelledError):
        await leaving
    release.set()
    await eventually(
        lambda: all(not head.pool.get_replicas("everywhere", shard_id=s).addresses for s in (0, 1)), timeout=5.0
    )


async def test_a_deactivate_cut_by_the_heads_stop_finishes_before_its_pool_closes(echo_servers, monkeypatch, caplog):
    """The shielded removal of a DEACTIVATE the drain cut outlived head.stop(): it ran on the closed pool, found
    nothing and said the worker was "unknown"."""
    caplog.set_level(logging.INFO, logger="shardnet")
    head = Head("everywhere", shards=2, lease=60.0)
    await head.start()
    stopping = release = None
    try:
        [server] = await echo_servers(1)
        leaving, release = await _deactivating_held_at_the_first_shard(head, server, monkeypatch)
        # the removal takes a second: the stop's drain (0.1 s) cuts the DEACTIVATE's call meanwhile
        asyncio.get_running_loop().call_later(1.0, release.set)
        stopping = asyncio.create_task(head.stop(0.1))
        await asyncio.wait_for(stopping, 5.0)
        assert leaving.done() and not head._deactivations
    finally:
        if release is not None:
            release.set()
        if stopping is None or not stopping.done():
            await head.stop(0)
    said = [record.getMessage() for record in caplog.records if "deactivated" in record.getMessage()]
    assert said and "(removed," in said[0], said
