"""Shared fixtures: echo replicas on free loopback ports, pools that always close, polling with a deadline.

Every server a fixture starts is stopped when the test ends, passed or failed.
Servers bind port 0 (the OS picks), so tests run in parallel under xdist.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
from typing import Any, Awaitable, Callable, Union

import pytest

from shardnet import GrpcConnectionPool
from shardnet.testing import EchoServer
from shardnet.testing import eventually as eventually_until

Predicate = Callable[[], Union[bool, Awaitable[bool]]]


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path_factory, monkeypatch):
    """Each test's own cache folder (``XDG_CACHE_HOME``), its processes' too: a Deployment or worker given no
    workspace keeps its Executor's state there, and tests running side by side must not share it, nor fill
    the user's ``~/.cache``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def socket_dir():
    """A fresh folder under /tmp for Unix sockets (pytest's tmp_path can outgrow the 107 bytes a socket path holds)."""
    folder = tempfile.mkdtemp(prefix="sn-", dir="/tmp")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def eventually():
    """``await eventually(lambda: cond, timeout=2.0)``: poll until true, fail past the deadline."""
    return eventually_until


@pytest.fixture
async def echo_servers():
    """Factory: ``a, b = await echo_servers(2, delay=0.1)`` starts EchoServers named echo-0, echo-1, ...

    Keyword arguments go to every EchoServer; ``names=[...]`` names them. All are stopped at teardown.
    """
    started: list[EchoServer] = []

    async def start(count: int = 1, *, names: Union[list[str], None] = None, **kwargs: Any) -> list[EchoServer]:
        servers = []
        for index in range(count):
            name = names[index] if names else f"echo-{len(started)}"
            server = EchoServer(name, **kwargs)
            started.append(server)
            servers.append(await server.start())
        return servers

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


class GarbageServer(EchoServer):
    """An EchoServer whose every answer is bytes that decode as no protobuf message."""

    GARBAGE = b"\xff\xff\xff"

    async def _answer(self, payload: bytes, context) -> bytes:
        self.calls += 1
        self.received_metadata.append(dict(context.invocation_metadata()))
        return self.GARBAGE


@pytest.fixture
async def garbage_server():
    """A replica that answers every call with malformed bytes; stopped at teardown."""
    server = GarbageServer("garbage")
    try:
        yield await server.start()
    finally:
        await server.stop()


class ThreadedEcho:
    """EchoServers on an event loop of their own thread, for blocking (``*_sync``) callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="threaded-echo", daemon=True)
        self._thread.start()
        self.servers: list[EchoServer] = []

    def run(self, coroutine: Awaitable[Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, name: str = "echo", **kwargs: Any) -> EchoServer:
        server = EchoServer(name, **kwargs)
        self.servers.append(server)
        return self.run(server.start())

    def close(self) -> None:
        try:
            for server in self.servers:
                self.run(server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def threaded_echo():
    """``server = threaded_echo.start(delay=...)``: an EchoServer another thread serves (for sync tests)."""
    threaded = ThreadedEcho()
    try:
        yield threaded
    finally:
        threaded.close()


@pytest.fixture
async def pool_factory():
    """Factory: ``pool = pool_factory(timeout=1.0, ...)`` makes GrpcConnectionPools closed at teardown."""
    pools: list[GrpcConnectionPool] = []

    def make(**options: Any) -> GrpcConnectionPool:
        pool = GrpcConnectionPool(**options)
        pool.start()
        pools.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            await pool.close()


@pytest.fixture
async def pool(pool_factory):
    """A default GrpcConnectionPool, closed at teardown."""
    return pool_factory()


@pytest.fixture
def dead_address():
    """A loopback address nothing listens on (calls fail fast with UNAVAILABLE).

    The port stays bound, never listening, for the whole test, so no other test can start a server on it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{holder.getsockname()[1]}"


# -- appended for the runtime tests (test_worker.py, test_head.py, test_interop_jina.py) -------------------


@pytest.fixture
async def runtimes():
    """Factory: ``worker = await runtimes(Worker(executor))`` or ``head = await runtimes(Head(...))``.

    Starts an in-process shardnet runtime (anything with ``start()`` and ``stop(grace)``, bound to a free
    loopback port by its ServerConfig's port 0) and returns it; all are stopped at teardown, passed or failed.
    """
    started: list[Any] = []

    async def start(runtime: Any) -> Any:
        started.append(runtime)
        await runtime.start()
        return runtime

    try:
        yield start
    finally:
        for runtime in reversed(started):
            await runtime.stop(0)
