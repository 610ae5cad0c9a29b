"""Real gRPC servers for tests and benchmarks: echo replicas on the Jina method paths.

``EchoServer`` answers ``process_single_data`` and ``process_data`` with the
request bytes (the first request of a list), records the metadata it
received, and can be told to answer slowly, to fail with a status (always,
or the first few times), or to stop answering. It binds a free loopback
port, so tests run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import socket
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Union

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardnet.networking.channels import default_grpc_options
from shardnet.protocol import services
from shardnet.protocol.proto import jina_pb2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a server told its port before it starts.

    Picked below the kernel's ephemeral range where it can: a port from that range is what any process binding
    port 0 (every other test's server) may be given meanwhile, before this one's user binds it.
    """
    low = _ephemeral_range_start()
    candidates = random.sample(range(10_000, low), 64) if low is not None and low > 20_000 else []
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _ephemeral_range_start() -> Optional[int]:
    """The first port of the range the kernel gives port-0 binds from (Linux), or None where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def eventually(
    predicate: Callable[[], Union[bool, Awaitable[bool]]], timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; raise AssertionError after ``timeout`` seconds.

    Tests wait for a condition this way instead of sleeping a fixed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout:g}s: {getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(interval)


async def probe_health(address: str, service: str = "", timeout: float = 2.0) -> int:
    """The status a stock, plaintext grpc.health.v1 Check reads at ``address``, as the kubelet's ``grpc:`` probe
    makes it (no shardnet code on the client side)."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return reply.status


class _CountedHealth(health.aio.HealthServicer):
    """An EchoServer's health service: counts its checks, and answers them after the server's ``health_delay``."""

    def __init__(self, server: "EchoServer"):
        super().__init__()
        self._echo = server

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._echo.health_checks += 1
        if self._echo.health_delay:
            await asyncio.sleep(self._echo.health_delay)
        return await super().Check(request, context)


class EchoServer:
    """An echo replica on loopback; ``async with EchoServer() as server: server.address``."""

    record_metadata = True  # tests read received_metadata; long benchmark runs turn it off

    def __init__(
        self,
        name: str = "echo",
        *,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        delay: float = 0.0,
        endpoint_delays: Optional[dict[str, float]] = None,
        health_delay: float = 0.0,
        fail_with: Optional[grpc.StatusCode] = None,
        fail_times: Optional[int] = None,
        fail_details: Optional[str] = None,
        credentials: Optional[grpc.ServerCredentials] = None,
    ):
        self.name = name
        self.host = host
        self.port = port or 0
        self.delay = delay
        # seconds a call waits instead of ``delay`` by the endpoint its metadata names (one slow endpoint)
        self.endpoint_delays = dict(endpoint_delays or {})
        self.health_delay = health_delay  # seconds its health service waits before it answers (a hung server's)
        self.health_checks = 0  # health checks received
        self.fail_with = fail_with
        self.fail_times = fail_times  # with fail_with: only the first this many calls fail (None: all of them)
        self.fail_details = fail_details  # what the failure says (default: "NAME told to fail")
        self.received_metadata: list[dict[str, str]] = []
        self.client_names: list[Optional[list[str]]] = []  # per call: what a client certificate named (mTLS)
        self.calls = 0
        self._credentials = credentials
        self._server: Optional[grpc.aio.Server] = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _answer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        if self.record_metadata:
            self.received_metadata.append({key: value for key, value in context.invocation_metadata()})
            identities = context.peer_identities()
            self.client_names.append(None if identities is None else [name.decode() for name in identities])
        delay = self.delay
        if self.endpoint_delays:
            endpoint = dict(context.invocation_metadata() or ()).get(services.ENDPOINT_METADATA)
            delay = self.endpoint_delays.get(endpoint, delay)
        if delay:
            await asyncio.sleep(delay)
        if self.fail_with is not None and (self.fail_times is None or self.calls <= self.fail_times):
            await context.abort(self.fail_with, self.fail_details or f"{self.name} told to fail")
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
        self._server = grpc.aio.server(options=default_grpc_options())
        self._server.add_generic_rpc_handlers(self._handlers())
        self.health = _CountedHealth(self)
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


# -- echo servers in their own process (benchmarks, manual interop) -------------


class _HandlerCollector:
    """Stands in for a server to catch the handlers a generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service_name, handlers) -> None:
        return None  # the generic handler above serves the same methods


class ServedEchoServer(EchoServer):
    """An ``EchoServer`` for long runs in a process of its own.

    It keeps no log of received metadata (a benchmark sends millions of
    requests) and lists its services through gRPC reflection, which Jina 3.4+
    clients ask before they call; the trailing ``served-by`` metadata names it.
    """

    record_metadata = False

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

        names = [
            services.SINGLE_DATA_SERVICE,
            services.DATA_SERVICE,
            services.CONTROL_SERVICE,
            "grpc.health.v1.Health",
            reflection.SERVICE_NAME,
        ]
        collector = _HandlerCollector()
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), collector)
        return super()._handlers() + collector.handlers


async def serve_echo(
    count: int = 2,
    *,
    host: str = "127.0.0.1",
    delays: Optional[list[float]] = None,
    names: Optional[list[str]] = None,
    stop_on_eof: bool = False,
) -> None:
    """Serve ``count`` echo servers until SIGINT/SIGTERM (or stdin's end); print ``READY addr ...`` once up."""
    import signal
    import sys
    import threading

    delays = list(delays or [0.0])
    if len(delays) == 1:
        delays = delays * count
    if len(delays) != count:
        raise SystemExit(f"--delays needs 1 or {count} values, got {len(delays)}")
    names = names or [f"echo-{index}" for index in range(count)]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if stop_on_eof:
        def watch_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()
    servers = [ServedEchoServer(name, host=host, delay=delay) for name, delay in zip(names, delays)]
    try:
        for server in servers:
            await server.start()
        print("READY " + " ".join(server.address for server in servers), flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.stop(0)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m shardnet.testing --servers 2``: echo servers on loopback, in this process.

    Prints ``READY 127.0.0.1:PORT ...`` when they listen and serves until
    SIGINT/SIGTERM (or, with ``--stop-on-eof``, until stdin closes).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shardnet.testing", description=main.__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2, help="how many echo servers (default 2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--delays", default="0", help="seconds each server waits before answering: one value, or one per server, comma-separated"
    )
    parser.add_argument("--names", default="", help="comma-separated names (sent back as trailing metadata served-by)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--stop-on-eof", action="store_true", help="also stop when stdin closes (a parent process died)")
    args = parser.parse_args(argv)
    delays = [float(value) for value in args.delays.split(",") if value.strip()]
    names = [value.strip() for value in args.names.split(",") if value.strip()] or None
    if names is not None and len(names) != args.servers:
        parser.error(f"--names needs {args.servers} names")
    coroutine = serve_echo(args.servers, host=args.host, delays=delays, names=names, stop_on_eof=args.stop_on_eof)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
    return 0


@contextlib.asynccontextmanager
async def serving(path: str, handler: Callable, *, stream: bool = False) -> AsyncIterator[str]:
    """A gRPC server on loopback answering the method ``path`` with ``handler`` (unary, or bidirectional
    ``stream``), bytes in and out: a replica behaving as a test needs. Yields its address; stops it after."""
    server = grpc.aio.server()
    service, method = path.strip("/").split("/")
    kind = grpc.stream_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {method: kind(handler)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


if __name__ == "__main__":
    raise SystemExit(main())
