"""Real gRPC servers for tests and benchmarks: echo replicas on the Jina method paths.

``EchoServer`` answers ``process_single_data`` and ``process_data`` with the
request bytes (the first request of a list), records the metadata it
received, and can be told to answer slowly, to fail with a status, or to
stop answering. It binds a free loopback port, so tests run in parallel.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Optional

import grpc
import grpc.aio

from shardnet.networking.channels import default_grpc_options
from shardnet.protocol import services
from shardnet.protocol.proto import jina_pb2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class EchoServer:
    """An echo replica on loopback; ``async with EchoServer() as server: server.address``."""

    def __init__(
        self,
        name: str = "echo",
        *,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        delay: float = 0.0,
        fail_with: Optional[grpc.StatusCode] = None,
        credentials: Optional[grpc.ServerCredentials] = None,
    ):
        self.name = name
        self.host = host
        self.port = port or 0
        self.delay = delay
        self.fail_with = fail_with
        self.received_metadata: list[dict[str, str]] = []
        self.calls = 0
        self._credentials = credentials
        self._server: Optional[grpc.aio.Server] = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _answer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        self.received_metadata.append({key: value for key, value in context.invocation_metadata()})
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            await context.abort(self.fail_with, f"{self.name} told to fail")
        context.set_trailing_metadata((("served-by", self.name),))
        return payload

    async def _single(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._answer(payload, context)

    async def _many(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        requests = jina_pb2.DataRequestListEnvelope.FromString(payload).requests
        return await self._answer(requests[0] if requests else b"", context)

    async def _control(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._answer(payload, context)

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        def service(path: str, method) -> grpc.GenericRpcHandler:
            service_name, method_name = path.strip("/").split("/")
            return grpc.method_handlers_generic_handler(
                service_name, {method_name: grpc.unary_unary_rpc_method_handler(method)}
            )

        return [
            service(services.PROCESS_SINGLE_DATA, self._single),
            service(services.PROCESS_DATA, self._many),
            service(services.PROCESS_CONTROL, self._control),
        ]

    async def start(self) -> "EchoServer":
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        self._server = grpc.aio.server(options=default_grpc_options())
        self._server.add_generic_rpc_handlers(self._handlers())
        self.health = health.aio.HealthServicer()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        bind = f"{self.host}:{self.port}"
        if self._credentials is not None:
            self.port = self._server.add_secure_port(bind, self._credentials)
        else:
            self.port = self._server.add_insecure_port(bind)
        await self._server.start()
        return self

    async def stop(self, grace: Optional[float] = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> "EchoServer":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
