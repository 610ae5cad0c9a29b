"""The plain-HTTP listener serving a runtime's Prometheus metrics (``--metrics-port``), hardened for a port any
source may reach (``k8s render --network-policy`` lets it in from anywhere): at most ``MAX_CONNECTIONS`` open at
once and none idle past ``IDLE_SECONDS``, so that connections held open (or half a request that never ends)
cannot take the process's file descriptors and with them the gRPC side; and requests it cannot read said in one
WARNING per burst, not a traceback each at ERROR as aiohttp logs them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from shardnet.errors import ConfigurationError
from shardnet.runtimes.bursts import BurstLog
from shardnet.runtimes.listening import NO_IPV6, cannot_listen, wildcard_socket
from shardnet.runtimes.log_lines import quoted

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
MAX_CONNECTIONS = 64  # a scraper or two keep one each; the one past these is closed as it opens
IDLE_SECONDS = 30.0  # a connection with no request under way for this long is closed (aiohttp's default: an hour)
MAX_CAUSE_CHARS = 200
# what a stop waits for the connections (a scrape under way; a body still coming, read for ten seconds by
# aiohttp's default): a process's exit is not held by whoever is connected
STOP_SECONDS = 1.0


class _Unread(logging.LoggerAdapter):
    """aiohttp's logger for the listener's connections: a request it could not read (each a traceback at ERROR
    in aiohttp's words) is said at WARNING in one line, once per burst."""

    def __init__(self, bursts: BurstLog):
        super().__init__(logger, {})
        self._bursts = bursts

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        cause = quoted(f"{type(error).__name__}: {error}", MAX_CAUSE_CHARS)
        peer = args[0] if args else "?"
        self._bursts.note(type(error).__name__, cause, "metrics listener: a request from %s not read: %s", peer, cause)


class _Refused(asyncio.Protocol):
    """A connection past ``MAX_CONNECTIONS``: closed as it opens."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class MetricsListener:
    """The HTTP listener serving a registry's metrics at /metrics (prometheus_client's aiohttp handler)."""

    def __init__(
        self, registry: CollectorRegistry, on_stop: Optional[Callable[[], Awaitable[None]]] = None, *,
        max_connections: int = MAX_CONNECTIONS, idle_seconds: float = IDLE_SECONDS,
    ):
        self.registry = registry
        self._on_stop = on_stop  # what else the runtime's metrics end as the listener closes
        self._max_connections = max_connections
        self._idle_seconds = idle_seconds
        self._runner: Optional[web.AppRunner] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._unread = BurstLog(
            logger, "metrics listener", "%s: %d more requests not read within %gs (%s); the latest: %s"
        )
        self.port: Optional[int] = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port; a wildcard host on both families, as gRPC binds it) and return
        the port; a port in use is refused naming the flag."""
        app = web.Application()
        app.router.add_get(METRICS_PATH, make_aiohttp_handler(self.registry))
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=self._idle_seconds,
            logger=_Unread(self._unread), lingering_time=STOP_SECONDS, shutdown_timeout=STOP_SECONDS,
        )
        await runner.setup()
        connections = runner.server

        def connection() -> asyncio.BaseProtocol:
            return _Refused() if len(connections.connections) >= self._max_connections else connections()

        loop = asyncio.get_running_loop()
        try:
            # bound as gRPC binds the same host: a wildcard on both families, so IPv6 pod addresses are served too
            listener = wildcard_socket(host, port)
            if listener is None:
                server = await loop.create_server(connection, host, port, reuse_port=False)
            else:
                server = await loop.create_server(connection, sock=listener)
        except OSError as exc:
            await runner.cleanup()
            refusal = cannot_listen(host, port, exc.strerror or str(exc))
            raise ConfigurationError(f"--metrics-port {port}: {refusal}") from None
        if not server.sockets:  # asyncio skips a family this machine lacks (IPv6): none was left to bind
            server.close()
            await runner.cleanup()
            raise ConfigurationError(f"--metrics-port {port}: {cannot_listen(host, port, NO_IPV6)}")
        self._runner, self._server = runner, server
        self.port = server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()  # its connections too
        self._unread.close()
        if self._on_stop is not None:
            await self._on_stop()
