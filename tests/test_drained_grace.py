"""A replica set aside as it drained, whose address then has no process for DRAINED_RESTART_GRACE, is ejected; a
next process coming back within it is no failure. A ReplicaList with a real gRPC health server per replica."""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from shardnet.networking import replica_list
from shardnet.networking.policies import EjectionPolicy
from shardnet.networking.replica_list import ReplicaList

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _serve(port: int, status: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    servicer = HealthServicer()
    await servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_a_crash_looping_next_process_that_says_not_serving_as_it_loads_is_ejected(monkeypatch, eventually):
    """Its next process comes up NOT_SERVING (loading) for a moment, then dies, again and again: each NOT_SERVING
    started the grace over, and it stayed 'draining' for good, never ejected, counted nor said (a regression
    review)."""
    monkeypatch.setattr(replica_list, "DRAINED_RESTART_GRACE", 2.0)
    ports = [_free_port(), _free_port()]
    servers = [await _serve(port, SERVING) for port in ports]
    replicas = ReplicaList(ejection=EjectionPolicy(), name="d")
    connections = [replicas.add_connection(f"127.0.0.1:{port}") for port in ports]

    async def crash_loop() -> None:
        while True:
            await asyncio.sleep(1.0)  # down
            loading = await _serve(ports[1], NOT_SERVING)
            try:
                await asyncio.sleep(1.0)  # loading, then it dies
            finally:
                await loading.stop(0)

    looping = None
    try:
        assert replicas._set_aside_draining(connections[1])
        await servers[1].stop(0)  # its drain ended: nothing listens at its address
        looping = asyncio.create_task(crash_loop())
        await eventually(lambda: replicas.ejections == 1, timeout=15.0)
        assert replicas.draining_addresses == [] and replicas.ejected_addresses == [f"127.0.0.1:{ports[1]}"]
    finally:
        if looping is not None:
            looping.cancel()
            await asyncio.gather(looping, return_exceptions=True)
        await replicas.close()
        await servers[0].stop(0)
