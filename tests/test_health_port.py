"""The plaintext health-only listener (``--health-port``) for Kubernetes' gRPC probes, which cannot speak TLS.

Real gRPC servers on loopback, ports picked at run time; every runtime started is stopped by the
``runtimes`` fixture, passed or failed. Certificates are made in the test (trustme), as in test_tls.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator

import executors
import grpc
import grpc.aio
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardnet import ClientTls, ConfigurationError, DataRequest, Document, GrpcConnectionPool, ServerTls
from shardnet.cli.main import build_parser
from shardnet.cli.options import server_config
from shardnet.networking import oneshot
from shardnet.protocol import services
from shardnet.runtimes import head as head_module
from shardnet.runtimes import server as server_module
from shardnet.runtimes.head import Head
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker
from shardnet.testing import probe_health

SERVING = health_pb2.HealthCheckResponse.SERVING
JINA_DATA_SERVICE = "jina.JinaSingleDataRequestRPC"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def server_tls() -> tuple[ServerTls, bytes]:
    """A server certificate for localhost/127.0.0.1 and the CA PEM that signed it."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    return ServerTls(certificate_chain=chain, private_key=cert.private_key_pem.bytes()), ca.cert_pem.bytes()


async def health_error(address: str, service: str = "", timeout: float = 2.0) -> grpc.StatusCode:
    """The status code a plaintext health Check to ``address`` fails with (the test fails if it answers)."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await probe_health(address, service, timeout)
    return failed.value.code()


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def port_in_use() -> Iterator[int]:
    """A loopback port a plain socket listens on for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


class GatedPool(GrpcConnectionPool):
    """A pool that, like discovery's, has ``wait_synced``: its head is not ready until ``synced`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.synced = asyncio.Event()

    async def wait_synced(self, timeout: float | None = None) -> None:
        await self.synced.wait()


# -- serving ------------------------------------------------------------------------------


async def test_a_tls_worker_answers_plaintext_health_only_on_its_health_port(runtimes, server_tls):
    tls, ca_pem = server_tls
    worker = await runtimes(Worker(executors.Tagger.create(), ServerConfig(tls=tls, health_port=0)))
    server = worker.server
    assert server.health_port not in (None, 0, server.port)
    assert server.health_address == f"127.0.0.1:{server.health_port}"

    assert await probe_health(server.health_address) == SERVING
    assert await probe_health(server.health_address, services.READY_SERVICE) == SERVING
    # the main port still serves TLS only: a plaintext client gets nothing there
    assert await health_error(server.address) == grpc.StatusCode.UNAVAILABLE
    reply, _ = await oneshot.call_once(
        "health", health_pb2.HealthCheckRequest(service=services.READY_SERVICE), server.address,
        timeout=5.0, tls=ClientTls(root_certificates=ca_pem),
    )
    assert reply.status == SERVING
    # nothing but health on the plaintext port: no data, no reflection
    async with grpc.aio.insecure_channel(server.health_address) as channel:
        for path in (services.PROCESS_SINGLE_DATA, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(path)(DataRequest([Document()]).to_bytes(), timeout=2)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, path


async def test_the_plaintext_health_port_serves_only_checks_of_a_small_size(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create(), ServerConfig(health_port=0)))
    address = worker.server.health_address
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # a Watch stream would stay open for as long as its caller likes, on a port anyone may reach
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await watch.read()
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        checks = [stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5) for _ in range(64)]
        assert {reply.status for reply in await asyncio.gather(*checks)} == {SERVING}  # no cap to fill
        oversized = health_pb2.HealthCheckRequest(service="x" * server_module.HEALTH_MESSAGE_BYTES)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Check(oversized, timeout=2)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with grpc.aio.insecure_channel(worker.server.address) as channel:  # the main port serves Watch
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        watch.cancel()


async def test_no_health_listener_unless_asked(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create()))
    assert worker.server.health_port is None and worker.server.health_address is None


async def test_a_head_waiting_for_discovery_is_not_ready_on_its_health_port_until_it_has_synced(runtimes, eventually):
    pool = GatedPool()
    head = await runtimes(Head("dep", ServerConfig(health_port=0), pool=pool))
    address = head.server.health_address
    assert await probe_health(address) == SERVING  # alive: liveness must not kill it
    assert await probe_health(address, services.READY_SERVICE) == NOT_SERVING
    assert await probe_health(address, JINA_DATA_SERVICE) == NOT_SERVING  # a Jina-style probe reads readiness
    pool.synced.set()

    async def ready() -> bool:
        return await probe_health(address, services.READY_SERVICE) == SERVING

    await eventually(ready, timeout=5)
    assert await probe_health(head.server.address, services.READY_SERVICE) == SERVING  # the same on both
    assert await probe_health(address, JINA_DATA_SERVICE) == SERVING


@pytest.mark.parametrize("service", [
    "jina.JinaSingleDataRequestRPC", "jina.JinaDataRequestRPC", "jina.JinaRPC", "jina.JinaDiscoverEndpointsRPC",
    "grpc.reflection.v1alpha.ServerReflection",  # Jina's servers report reflection too
])
async def test_a_probe_naming_a_service_a_jina_server_names_is_answered_as_jinas_is(runtimes, service):
    """A Jina server reports each service it serves SERVING; a probe naming one got NOT_FOUND (found by a review)."""
    worker = await runtimes(Worker(executors.Tagger.create()))
    assert await probe_health(worker.server.address, service) == SERVING
    assert await health_error(worker.server.address, "jina.NoSuchService") == grpc.StatusCode.NOT_FOUND


async def test_a_head_fed_by_discovery_is_ready_only_once_every_declared_shard_has_a_worker(
    runtimes, eventually, caplog, monkeypatch
):
    monkeypatch.setattr(head_module, "SHARDS_LOOKED_AT_EVERY", 0.01)
    pool = GatedPool()
    head = await runtimes(Head("dep", ServerConfig(health_port=0), pool=pool, shards=2))
    address = head.server.health_address

    async def ready() -> bool:
        return await probe_health(address, services.READY_SERVICE) == SERVING

    with caplog.at_level(logging.INFO, logger="shardnet.runtimes.head"):
        pool.synced.set()
        await eventually(lambda: any("shard(s) 0-1 have one" in r.getMessage() for r in caplog.records))
    assert not await ready()  # listed, but no worker yet
    pool.add_connection("dep", "127.0.0.1:1", shard_id=0)
    await asyncio.sleep(0.2)  # twenty looks: a negative cannot be polled for
    assert not await ready()  # shard 1 has none yet
    pool.add_connection("dep", "127.0.0.1:2", shard_id=1)
    await eventually(ready, timeout=5)
    await pool.remove_connection("dep", "127.0.0.1:2", shard_id=1)
    await asyncio.sleep(0.2)
    assert await ready()  # once ready, a shard left without workers is reported by ALL, not by readiness


async def test_a_head_waits_for_its_shards_only_so_long_then_serves_the_others_and_says_so(
    runtimes, eventually, caplog
):
    pool = GatedPool()
    head = await runtimes(Head("dep", ServerConfig(health_port=0), pool=pool, shards=3, shards_wait=0.3))
    pool.add_connection("dep", "127.0.0.1:1", shard_id=0)  # a head restarted while shards 1 and 2 are down
    with caplog.at_level(logging.WARNING, logger="shardnet.runtimes.head"):
        pool.synced.set()

        async def ready() -> bool:
            return await probe_health(head.server.health_address, services.READY_SERVICE) == SERVING

        await eventually(ready, timeout=5)
    [warning] = [r.getMessage() for r in caplog.records if "without a worker" in r.getMessage()]
    assert "after 0.3s without a worker of shard(s) 1-2" in warning


@pytest.mark.parametrize("wait", [-1, float("nan"), "5", True])
def test_a_bad_shards_wait_is_refused(wait):
    with pytest.raises(ConfigurationError, match="shards_wait"):
        Head("dep", shards=2, shards_wait=wait)


async def test_the_health_port_says_not_serving_through_a_drain_and_closes_after_it(runtimes, eventually):
    blocking = executors.Blocking.create()
    worker = await runtimes(Worker(blocking, ServerConfig(health_port=0), threads=2))
    address, port = worker.server.health_address, worker.server.health_port
    try:
        in_flight = asyncio.ensure_future(
            oneshot.send_request_async(DataRequest([Document()], endpoint="/block"), worker.server.address, timeout=20)
        )
        assert await asyncio.to_thread(blocking.entered.wait, 10)
        stopping = asyncio.ensure_future(worker.stop(20))
        await eventually(lambda: worker.server.draining, timeout=5)
        for service in ("", services.READY_SERVICE, JINA_DATA_SERVICE):
            assert await probe_health(address, service) == NOT_SERVING
        assert not in_flight.done() and not stopping.done()
    finally:
        blocking.release.set()
    assert (await in_flight).docs.texts == ["unblocked"]
    await asyncio.wait_for(stopping, 10)
    assert not listening(port)
    assert await health_error(address) == grpc.StatusCode.UNAVAILABLE


async def test_the_health_listener_logs_its_address_once_at_start(runtimes, caplog):
    caplog.set_level(logging.INFO, logger="shardnet.runtimes.server")
    worker = await runtimes(Worker(executors.Tagger.create(), ServerConfig(health_port=0)))
    lines = [record.getMessage() for record in caplog.records if "health check" in record.getMessage()]
    assert lines == [f"health check (plaintext) on {worker.server.health_address}"]


# -- refused configurations ----------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"port": 5005, "health_port": 5005}, r"health_port \(--health-port\) must differ from port \(--port, 5005\)"),
        ({"health_port": -1}, "health port -1 is outside 0..65535"),
        ({"health_port": 70000}, "health port 70000 is outside 0..65535"),
    ],
)
def test_bad_health_ports_are_refused(settings, message):
    with pytest.raises(ConfigurationError, match=message):
        ServerConfig(**settings)


def test_health_port_zero_beside_port_zero_is_accepted():
    assert ServerConfig(port=0, health_port=0).health_port == 0


async def test_a_health_port_in_use_fails_the_start_naming_it_and_leaves_nothing_listening(runtimes, port_in_use):
    worker = Worker(executors.Tagger.create(), ServerConfig(health_port=port_in_use))
    with pytest.raises(ConfigurationError, match=f"cannot listen on 127.0.0.1:{port_in_use}: port in use"):
        await runtimes(worker)
    assert worker.server.port != 0 and not listening(worker.server.port)  # the main port was bound, then let go
    assert worker.server.health_port is None


async def test_a_unix_socket_refused_leaves_the_main_port_not_listening_either(runtimes, socket_dir):
    path = os.path.join(socket_dir, "missing", "w.sock")
    worker = Worker(executors.Tagger.create(), ServerConfig(unix_socket=path, health_port=0))
    with pytest.raises(ConfigurationError, match="folder missing"):
        await runtimes(worker)
    assert worker.server.port != 0 and not listening(worker.server.port)


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["worker", "--uses", "m:C"], ["head", "--deployment", "d"]])
def test_health_port_flag_reaches_the_server_config(command, monkeypatch):
    monkeypatch.delenv("SHARDNET_CONTROL_TOKEN", raising=False)
    parser = build_parser()
    assert server_config(parser.parse_args([*command, "--port", "8080", "--health-port", "8081"])).health_port == 8081
    assert server_config(parser.parse_args(command)).health_port is None
    with pytest.raises(ConfigurationError, match=r"\(--health-port\) must differ from port \(--port"):
        server_config(parser.parse_args([*command, "--port", "8080", "--health-port", "8080"]))


def test_the_cli_refuses_a_health_port_in_use_naming_the_flag(capsys, port_in_use):
    from shardnet.cli.main import main as cli_main

    assert cli_main(["head", "--deployment", "d", "--health-port", str(port_in_use)]) == 2
    assert f"--health-port {port_in_use}: cannot listen on 127.0.0.1:{port_in_use}" in capsys.readouterr().err
