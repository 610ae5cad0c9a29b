"""What every shardnet server shares: binding, TLS, health, reflection, control auth and drain.

Workers and heads register their Jina methods as raw-bytes handlers (so a
request is decoded only as far as the runtime needs), list them through
reflection (Jina 3.4+ clients skip services that reflection does not list),
answer the gRPC health service, and drain on shutdown: health turns
NOT_SERVING, new calls are refused, in-flight calls finish within a grace.

A draining server refuses new calls itself and
closes its listener only once the calls in flight are done (a worker's once its
Executor is closed too): grpcio 1.78 can crash (SIGSEGV in its C core) when a
client connects as ``stop()`` closes the listener, and a crash then would lose
the answers it owes and what ``close()`` saves. Its callers (heads, pools) fail
an in-band UNAVAILABLE over at once, and pools pick it no more. The calls
grpc.aio had taken up when the drain began are served, not refused, though
their handlers may start later. A head's or worker's server waits, besides, until no call has
come for a while (``quiet_seconds``): ``stop()`` cancels the calls gRPC's core
holds and grpc.aio's request loop has not picked up yet (the client reads
CANCELLED, which Jina's pools and most clients do not send again, though they
never ran; shardnet's pools do), and a server under load
holds many; once callers have stopped coming, it holds none. A head stopped at
once as gRPC does, relying on its GOAWAY, and lost those calls; so did a worker
whose head still sent to it.

A process's life around its server (stop signals, its launcher's exit, the ready fd) is ``lifecycle.py``; the
checks, before anything loads, that it can listen where it is told are ``listening.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import math
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn, Optional, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from shardnet.errors import ConfigurationError, PickleRefused, ProtocolError
from shardnet.networking.addresses import (
    MAX_UNIX_PATH_BYTES,
    UNIX_SCHEME,
    canonical_host,
    entity_address,
    parse_address,
    unix_target,
)
from shardnet.networking.channels import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    check_control_token,
    default_grpc_options,
    tolerate_poller_race_here,
)
from shardnet.networking.tls import ServerTls
from shardnet.protocol import services
from shardnet.protocol.messages import MAX_TOP_LEVEL_FIELDS, DataRequest, parse
from shardnet.protocol.proto import jina_pb2
from shardnet.protocol.services import AUTHORIZATION_METADATA
from shardnet.runtimes.bursts import BurstLog
from shardnet.runtimes.listening import WILDCARD_TO_LOOPBACK, check_unix_path_free, warn_if_socket_folder_shared
from shardnet.runtimes.log_lines import quoted
from shardnet.runtimes.standard_services import health_handler, reflection_handler

logger = logging.getLogger(__name__)

# the plaintext health listener answers anyone who reaches it, so it serves only what a probe sends: a Check, a
# small message. No Watch: a stream held open there by others would outlive every probe (and a cap on calls
# would let whoever fills it fail the probes, and have the pod restarted)
HEALTH_MESSAGE_BYTES = 4096

# requests one process_data call may carry: Jina sends one, or one per shard to a uses_after, and a head holds at
# most 10,000 workers; each request costs a wrapper and a header rewrite, so a longer list is memory for the asking
MAX_REQUESTS_PER_CALL = 10_000
# a draining head or worker closes its listener once its calls are done and no call has come (refused ones count)
# for this long: stop() cancels every call gRPC's core took and grpc.aio's request loop had not picked up yet (the
# client reads CANCELLED, which other clients than shardnet's pools do not send again), and callers not yet told to
# go away still send; once nothing came for a while, nothing waits unseen in the core
DRAIN_QUIET_SECONDS = 0.2
# how long at most, once its calls are done, a draining server waits for that quiet: callers that keep sending
# whatever it answers (a pool keeping it in rotation, a client whose one connection cannot move) never let it
# come, and are refused until the listener closes, when its GOAWAY moves them
DRAIN_QUIET_WAIT_MAX = 0.5
# endpoints a warning of requests cut at the drain's end names at most (callers choose endpoints)
CUT_ENDPOINTS_NAMED = 10
# how long a handler whose answer or status could not be sent waits for gRPC to learn that its caller left
# (``_quiet_if_the_caller_left``)
CALLER_LEFT_NOTICE = 0.1

# seconds a connection has to complete its handshake, as long as a gRPC client waits for its connection (its
# minimum connect timeout): a client still handshaking past it has given up already
HANDSHAKE_TIMEOUT = 20.0

RawHandler = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]
StreamHandler = Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]


@dataclass(frozen=True)
class ServerConfig:
    """How a server listens: address, TLS, limits, who may change membership, how long to drain.

    ``unix_socket``, an absolute path, adds a plaintext listener on a Unix
    domain socket for a head on the same machine (no TCP stack on that hop).
    ``health_port`` adds a plaintext listener on ``host`` answering only the gRPC
    health service, for Kubernetes' ``grpc:`` probes, which cannot speak TLS
    (0: a free port picked at start; None: no such listener). ``metrics_port`` likewise adds an HTTP listener
    on ``host`` serving Prometheus metrics at /metrics (a head's or worker's, runtimes/metrics.py).
    ``handshake_timeout``: seconds a connection has to complete its handshake (TLS, the HTTP/2 preface and
    SETTINGS) before the server closes it; gRPC's own 120 s let idle connections hold a descriptor each.
    """

    host: str = "127.0.0.1"
    port: int = 0
    tls: Optional[ServerTls] = None
    control_token: Optional[str] = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: Optional[int] = None
    drain_grace: float = 10.0
    unix_socket: Optional[str] = None
    health_port: Optional[int] = None
    metrics_port: Optional[int] = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigurationError(f"host must be a name or an IP address, got {self.host!r}")
        if self.host.startswith(UNIX_SCHEME) or "/" in self.host:  # gRPC would bind the socket, unchecked
            raise ConfigurationError(
                f"host {self.host!r:.80} is no name or IP address: a Unix socket is given as --unix-socket PATH "
                "(unix_socket=), beside the TCP host"
            )
        host = self.host.strip()
        if host.count(":") == 1 or (host.startswith("[") and "]:" in host):  # no name nor IPv6 address has one
            raise ConfigurationError(
                f"host {self.host!r:.80} holds a port: give the host alone, and the port as --port (port=); a host "
                "holding it was refused by the resolver only as the server started, as 'HOST:PORT:0'"
            )
        # as gRPC binds it and clients dial it: "[::1]" and "0:0::1" are "::1" (frozen: set as __init__ would)
        object.__setattr__(self, "host", canonical_host(self.host))
        if self.unix_socket is not None:
            if self.tls is not None:
                raise ConfigurationError(
                    "a Unix socket listener is plaintext: serve either TLS or a Unix socket, not both"
                )
            parse_address(f"{UNIX_SCHEME}{self.unix_socket}")  # absolute, short enough for sun_path
        if not 0 <= self.port < 65536:
            raise ConfigurationError(f"port {self.port} is outside 0..65535")
        if self.health_port is not None:
            if not 0 <= self.health_port < 65536:
                raise ConfigurationError(f"health port {self.health_port} is outside 0..65535")
            if self.port and self.health_port == self.port:
                raise ConfigurationError(
                    f"health_port (--health-port) must differ from port (--port, {self.port}): the health check "
                    "listens on a second, plaintext port beside the one serving"
                )
        if self.metrics_port is not None:
            if isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int) or not (
                0 <= self.metrics_port < 65536
            ):
                raise ConfigurationError(f"metrics port (--metrics-port) {self.metrics_port!r} is outside 0..65535")
            if self.metrics_port and self.metrics_port in (self.port, self.health_port):
                raise ConfigurationError(
                    f"metrics_port (--metrics-port, {self.metrics_port}) must differ from port (--port) and "
                    "health_port (--health-port): metrics are served over HTTP on a port of their own"
                )
        check_control_token(self.control_token)
        if self.max_message_bytes <= 0:
            raise ConfigurationError("max message size must be positive")
        if self.max_message_bytes > MAX_MESSAGE_BYTES:
            raise ConfigurationError(
                f"max message size must be at most {MAX_MESSAGE_BYTES} bytes (gRPC counts them in a 32-bit int), "
                f"got {self.max_message_bytes}"
            )
        if not self.drain_grace >= 0 or math.isinf(self.drain_grace):  # NaN fails the first test
            raise ConfigurationError(f"drain grace must be a finite number of seconds, not negative, got {self.drain_grace}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ConfigurationError(f"max_concurrent_rpcs must be at least 1 (or None), got {self.max_concurrent_rpcs}")
        if not 0 < self.handshake_timeout < math.inf:  # NaN fails it too
            raise ConfigurationError(f"handshake_timeout must be a positive, finite number of seconds, got "
                                     f"{self.handshake_timeout!r}")

    def handshake_options(self) -> list[tuple[str, int]]:
        """The gRPC server option that closes a connection whose handshake is not done within handshake_timeout."""
        return [("grpc.server_handshake_timeout_ms", max(1, round(self.handshake_timeout * 1000)))]


# the keepalive pings a server takes while a call sends nothing: gRPC's default (one per 5 minutes, and a
# GOAWAY "too_many_pings" at the third strike) cut every call that ran 2 minutes without data under shardnet's
# 30 s client keepalive (and Jina's 10 s one), and a head ran it again elsewhere. A strike is a ping read less
# than a second after the one before: a server starved of CPU reads pings sent 5 s apart back to back (at a
# 4 s minimum, a loaded test machine struck out a client pinging every 5 s); ten strikes are borne over a call
# that sends nothing, and a client flooding pings is still sent away at the eleventh. (The first name is gRPC's own
# spelling; its C macro reads MIN_RECV_PING_INTERVAL, and a name gRPC does not know is dropped without a word)
PING_POLICY = (
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    ("grpc.http2.max_ping_strikes", 10),
)


def unary_service(path: str, handler: RawHandler) -> grpc.GenericRpcHandler:
    """A generic handler serving one unary method path with bytes in and out."""
    service, method = path.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(handler)})


def stream_service(path: str, handler: StreamHandler) -> grpc.GenericRpcHandler:
    """A generic handler serving one bidirectional-stream method path with bytes in and out."""
    service, method = path.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.stream_stream_rpc_method_handler(handler)})


class RequestAborted(grpc.aio.AbortError):
    """One request of several on a call refused with a gRPC status, by a handler's ``abort``: that request
    alone fails, the call goes on."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class _OneRequestOfAStream:
    """The context one request of a ``JinaRPC/Call`` stream is handled with: the call's own, but its ``abort``
    fails that request alone (RequestAborted), as Jina's head answers such a request ERROR and goes on, and its
    ``add_done_callback`` calls back once that request's answer is written out (or the stream ended), not at the
    stream's end: a head counts a request in flight (--max-in-flight) until its answer is out."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._done: list[Callable[[Any], None]] = []  # the request's callbacks, run once its answer is out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise RequestAborted(code, details)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._done.append(callback)

    def answered(self) -> None:
        """The request's answer is out (gRPC resumes a stream's handler once it wrote what it yielded), or the
        stream ended: run its done callbacks."""
        done, self._done = self._done, []
        for callback in done:
            callback(self)


async def _quiet_if_the_caller_left(context: grpc.aio.ServicerContext, work: Awaitable[Any]) -> Any:
    """What a handler's ``work`` returns, its writes and statuses included; a caller's leaving is routine, and
    ends it as gRPC ends a call its caller left (CancelledError, logged at DEBUG), not with a traceback at ERROR.

    A write or status to a caller that has just left (cancelled, or its deadline over) fails with gRPC's
    InternalError, which gRPC logs at ERROR with a traceback unless it has already seen the call end: it sees
    that from its core a moment later (a review: a traceback for 19 of 20 Call streams left with answers being
    written, and for 3 of 4 runs of 1-20 ms deadlines, from an abort after the deadline). That moment is given,
    the failure raised after it: gRPC then cancels a handler still writing, and passes over a failure of a
    call it knows ended; one of any other cause is logged as before. An answer returned past the caller's
    deadline, which gRPC would fail to send the same way, waits for that moment too."""
    try:
        answer = await work
    except grpc.aio.InternalError:
        await asyncio.sleep(CALLER_LEFT_NOTICE)
        raise
    if context.time_remaining() == 0:  # gRPC learns of the deadline's end as it sends the answer: let it first
        await asyncio.sleep(CALLER_LEFT_NOTICE)
    return answer


# the logger and words with which gRPC says an answer could not be sent, a traceback at ERROR for each
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
UNSENT_ANSWER_WORDS = "ExecuteBatchError raised in core by servicer method"


class AnswersToCallersGone(logging.Filter):
    """Takes gRPC's traceback at ERROR for an answer it could not send, its call ended in its core meanwhile (the
    caller cancelled, or its deadline ran out as the answer was being sent), and says those in a burst's line at
    INFO instead: a caller leaving is routine, and an overloaded head's answers finished a loop pass past their
    callers' deadlines (a soak: 980 tracebacks in 7 bursts, which ``_quiet_if_the_caller_left`` cannot reach:
    gRPC sends a unary answer after its handler returned)."""

    def __init__(self, said_by: logging.Logger) -> None:
        super().__init__()
        self._said = BurstLog(
            said_by, "server", "%s: %d more answers not sent within %.0fs, their callers gone (%s); the latest: %s",
            level=logging.INFO,
        )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(UNSENT_ANSWER_WORDS):
            return True
        try:
            asyncio.get_running_loop()  # said from the server's loop, as gRPC's aio server does
        except RuntimeError:
            return True
        method = message[len(UNSENT_ANSWER_WORDS):].strip(" []")
        self._said.note(method, method, "an answer to %s was not sent: its caller had gone (cancelled, or its "
                        "deadline ran out as the answer was being sent)", method)
        return False

    def close(self) -> None:
        self._said.close()


def _writing_what_it_yields(handler: StreamHandler) -> StreamHandler:
    """A stream handler yielding its answers made one writing them to its context itself, in turn: gRPC writes
    what a handler yields out of the handler's reach, so that a write failing as the caller leaves could not be
    told apart from a fault (``_quiet_if_the_caller_left``)."""

    async def written(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async with contextlib.aclosing(handler(requests, context)) as answers:  # its finally runs now
            async for answer in answers:
                await context.write(answer)

    return written


def _error_answer(payload: bytes, aborted: RequestAborted, limit: int) -> Optional[bytes]:
    """The request answered ERROR with the status its handler refused it with, as Jina's head answers a
    request that failed: its documents as they came, or its header alone when they would take the answer past
    ``limit`` (gRPC would end the stream). None for a request that cannot be read, or a header past it.
    One whose documents are a pickle (``docs_bytes``) is readable: answered by its request id alone, its
    documents never passed back (a review: it ended the client's whole stream, the requests behind it lost)."""
    try:
        try:
            request = DataRequest.from_bytes(payload)
            request._header()  # the walk that refuses a pickle
        except PickleRefused as refused:
            request = DataRequest()
            request.header.request_id = refused.request_id
        request.set_error(f"{aborted.code.name}: {aborted.details}", name="RpcError")
        answer = request.to_bytes()
        if len(answer) > limit:
            header_only = DataRequest()
            header_only.header.CopyFrom(request._header())  # not the live header: it would decode the documents
            answer = header_only.to_bytes()
        # documents are passed on as they came, undecoded: ones the caller could not read back (text that is not
        # UTF-8, nesting past protobuf's limit) would reach it as an answer it cannot parse, the cause unsaid
        parse(jina_pb2.DataRequestProto, answer, "answer")
    except ProtocolError:
        return None
    return answer if len(answer) <= limit else None


def _settle(reading: Optional[asyncio.Future]) -> None:
    """Cancel a stream's read still waiting, or take the outcome of one that ended unread (the stream's end,
    StopAsyncIteration, once its call was cancelled mid-request): left alone, asyncio logged "Task exception was
    never retrieved" with a traceback for every stream a client cancelled."""
    if reading is None:
        return
    if not reading.done():
        reading.cancel()
    elif not reading.cancelled():
        reading.exception()


def one_by_one(handler: RawHandler, stopping: asyncio.Event, limit: int) -> Callable[..., AsyncIterator[bytes]]:
    """Jina's ``JinaRPC/Call`` over a unary handler: each request on the stream answered in turn, as a Jina
    worker or head answers the stream its ``Client`` opens; one its handler refuses is answered ERROR, the
    others go on. One that cannot be read ends the stream with its status, as its unary call would fail.
    Once the server is ``stopping`` the stream ends UNAVAILABLE after the answer under way (an open stream
    would otherwise hold the drain to its whole grace, and what it brought meanwhile would be served or cut),
    so that the client sends elsewhere."""

    async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        incoming = requests.__aiter__()
        stop = asyncio.ensure_future(stopping.wait())
        each = _OneRequestOfAStream(context)
        next_request: Optional[asyncio.Future] = None
        try:
            while True:
                next_request = asyncio.ensure_future(incoming.__anext__())
                await asyncio.wait((next_request, stop), return_when=asyncio.FIRST_COMPLETED)
                if not next_request.done():
                    next_request.cancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, services.DRAINING_DETAILS)
                try:
                    payload = next_request.result()
                except StopAsyncIteration:
                    return
                try:
                    answer = await handler(payload, each)
                except RequestAborted as aborted:
                    answer = _error_answer(payload, aborted, limit)
                    if answer is None:
                        await context.abort(aborted.code, aborted.details)
                yield answer
                each.answered()
        finally:
            stop.cancel()
            _settle(next_request)
            each.answered()  # the stream ended with a request's answer unsent, or its handler failed

    return call


# what a refusal for the token says of giving one: the caller is often a shardnet worker or command
_HOW_TO_GIVE_A_TOKEN = (
    " (sent as authorization: Bearer TOKEN; shardnet workers and commands send the one in SHARDNET_CONTROL_TOKEN "
    "or --control-token-file)"
)


class ControlGuard:
    """Decides whether a caller may change membership: the bearer token when one is set (a client certificate
    alone does not do: every data client of a mutual-TLS head has one), else a verified client certificate."""

    def __init__(self, token: Optional[str], mutual_tls: bool):
        self._expected = f"Bearer {token}".encode() if token else None
        self._mutual_tls = mutual_tls

    @property
    def open(self) -> bool:
        return self._expected is None and not self._mutual_tls

    @property
    def by_certificate_only(self) -> bool:
        """Guarded by client certificates alone, which every data client of a mutual-TLS server holds too."""
        return self._expected is None and self._mutual_tls

    def allows(self, context: grpc.aio.ServicerContext) -> bool:
        if self._expected is None:
            # open, or mutual TLS: its TLS layer lets only certificates signed by the client CA through
            return True
        offered = dict(context.invocation_metadata()).get(AUTHORIZATION_METADATA, "")
        return hmac.compare_digest(offered.encode(), self._expected)

    def refusal(self, context: grpc.aio.ServicerContext, what: str) -> str:
        """Why ``what`` is refused: no token offered, or one that does not match (never which part)."""
        if AUTHORIZATION_METADATA in dict(context.invocation_metadata()):
            return f"{what}: the control token given does not match this one's{_HOW_TO_GIVE_A_TOKEN}"
        return f"{what} needs the control token{_HOW_TO_GIVE_A_TOKEN}"


class Server:
    """A grpc.aio server with health, reflection and graceful drain around the given handlers.

    Health answers for two services: ``""`` (alive: SERVING once started; liveness and startup
    probes) and ``services.READY_SERVICE`` (fit for traffic; readiness probes), which each service
    served (``jina.JinaSingleDataRequestRPC``, ...) reports too, as on a Jina server. A head whose
    workers come from discovery sets ``ready_at_start`` False and calls ``mark_ready`` once
    discovery has listed a worker of every shard (or it waited long enough).

    With ``config.health_port`` the same health service (the same statuses) is answered in
    plaintext on a second listener serving nothing else, for probes that cannot speak TLS; it
    answers NOT_SERVING while the server drains and closes right after it.
    """

    def __init__(
        self,
        config: ServerConfig,
        service_names: Sequence[str],
        *,
        quiet_seconds: float = 0.0,
    ):
        self.config = config
        self.quiet_seconds = quiet_seconds  # see drain(); 0: stop once idle
        self.ready_at_start = True
        self._handlers: list[grpc.GenericRpcHandler] = []  # serve_unary / serve_stream, before start
        self._service_names = list(service_names)
        self.health = health.aio.HealthServicer()
        self._server: Optional[grpc.aio.Server] = None
        self._health_server: Optional[grpc.aio.Server] = None  # the plaintext health-only listener (health_port)
        # while it serves: gRPC's tracebacks for answers to callers gone, said in bursts instead
        self._answers_unsent: Optional[AnswersToCallersGone] = None
        self.port: int = config.port
        self.health_port: Optional[int] = None  # bound at start when config.health_port is set
        # what serves the metrics on config.metrics_port: the runtime's (runtimes/metrics.py), given before start
        self.metrics: Any = None
        self.metrics_port: Optional[int] = None  # bound at start when config.metrics_port is set
        self.draining = False
        self.drain_deadline: Optional[float] = None  # the loop's time at which a drain under way cuts the calls
        self._drain_grace: Optional[float] = None  # seconds the drain under way was given
        self.stopping = asyncio.Event()  # set as the drain begins: long-lived streams end once their answers are out
        self._calls = 0  # calls under way in the handlers served (health and reflection aside)
        self._idle = asyncio.Event()  # set whenever _calls drops to 0: what a drain waits for
        self._unix_socket: Optional[int] = None  # an O_PATH descriptor of the socket bound (_bind_unix)
        self._last_arrival = float("-inf")  # the loop's time of the last call refused while draining (only then kept)
        self._taken_before: frozenset = frozenset()  # while a drain waits for its calls: the tasks running at its start

    def serve_unary(self, path: str, handler: RawHandler) -> None:
        """Serve the unary method ``path`` with ``handler`` (bytes in and out), counted and refused while draining."""

        async def gated(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if self.draining:
                await self._refuse_new(context)
            self._calls += 1
            try:
                return await _quiet_if_the_caller_left(context, handler(payload, context))
            finally:
                self._call_ended()

        self._handlers.append(unary_service(path, gated))

    def serve_stream(self, path: str, handler: StreamHandler) -> None:
        """Serve the bidirectional-stream method ``path`` with ``handler`` (an async generator of answers, or a
        coroutine writing them to its context), counted for the stream's whole life and refused while draining."""
        written = _writing_what_it_yields(handler) if inspect.isasyncgenfunction(handler) else handler

        async def gated(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            async with self._counted_stream(context):
                await _quiet_if_the_caller_left(context, written(requests, context))

        self._handlers.append(stream_service(path, gated))

    @contextlib.asynccontextmanager
    async def _counted_stream(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """A stream, refused while draining, else counted as a call for its whole life (``serve_unary`` counts
        inline instead: no context manager per request)."""
        if self.draining:
            await self._refuse_new(context)
        self._calls += 1
        try:
            yield
        finally:
            self._call_ended()

    async def _refuse_new(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a call (UNAVAILABLE) that came once the server drains: the caller sends elsewhere. Its arrival is
        noted, as the drain stops only once calls no longer come (``quiet_seconds``). A call gRPC handed over
        before the drain began, its handler only starting now (a loop under load), is let in as long as the drain
        waits for its calls: it runs in a task that was there at the start. (A call let in is counted in
        ``_calls`` by its wrapper, inline, and its arrival is not noted: nothing more per request.)"""
        if asyncio.current_task() in self._taken_before:
            return
        self._last_arrival = asyncio.get_running_loop().time()
        await context.abort(grpc.StatusCode.UNAVAILABLE, services.DRAINING_DETAILS)

    def _call_ended(self) -> None:
        self._calls -= 1
        if not self._calls:
            self._idle.set()

    @property
    def dial_host(self) -> str:
        """The host a client on this machine dials: loopback for a wildcard bind (``0.0.0.0``, ``::``)."""
        return WILDCARD_TO_LOOPBACK.get(self.config.host, self.config.host)

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``) to dial this server from this machine."""
        return entity_address(self.dial_host, self.port)

    @property
    def health_address(self) -> Optional[str]:
        """``host:port`` of the plaintext health-only listener, when the server has one (``config.health_port``)."""
        return None if self.health_port is None else entity_address(self.dial_host, self.health_port)

    @property
    def metrics_address(self) -> Optional[str]:
        """``host:port`` of the HTTP listener serving metrics at /metrics, when the server has one."""
        return None if self.metrics_port is None else entity_address(self.dial_host, self.metrics_port)

    @property
    def unix_address(self) -> Optional[str]:
        """``unix:/path`` when the server also listens on a Unix socket."""
        return None if self.config.unix_socket is None else f"{UNIX_SCHEME}{self.config.unix_socket}"

    async def start(self) -> None:
        """Bind every listener, then serve; a listener refused stops those already bound, so a failed start
        leaves nothing listening."""
        config = self.config
        tolerate_poller_race_here()  # its blocking handlers may call blocking helpers (see there)
        server = grpc.aio.server(
            # no SO_REUSEPORT: a second server on a port in use must fail, not silently share its traffic
            options=default_grpc_options(config.max_message_bytes)
            + [("grpc.so_reuseport", 0), *PING_POLICY, *config.handshake_options()],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers(self._handlers)
        # reflection lists the services as a Jina server does, without grpc.health.v1.Health (which it serves):
        # Jina's pools make a stub for every service listed, from a table that has no Health (a KeyError)
        server.add_generic_rpc_handlers(
            (health_handler(self.health, stopping=self.stopping), reflection_handler(self._service_names))
        )
        bound: list[grpc.aio.Server] = []  # each holds its port until stopped
        started: list[grpc.aio.Server] = []
        try:
            self.port = _bind(server, config.host, config.port, config.tls)
            bound.append(server)
            self._server = server  # _bind_unix binds on it
            if config.unix_socket is not None:
                self._bind_unix(config.unix_socket)
            if config.health_port is not None:
                # the same servicer: both listeners always report the same statuses; nothing else is served there
                health_server = grpc.aio.server(
                    options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", HEALTH_MESSAGE_BYTES),
                             *config.handshake_options()],
                )
                health_server.add_generic_rpc_handlers((health_handler(self.health, watch=False),))
                self.health_port = _bind(health_server, config.host, config.health_port, None)
                bound.append(health_server)
                self._health_server = health_server  # a drain from now on stops it too
            if config.metrics_port is not None:
                self.metrics_port = await self.metrics.start(config.host, config.metrics_port)
            for listener in bound:
                await listener.start()
                started.append(listener)
        except BaseException:
            self._server = self._health_server = None
            self.health_port = self.metrics_port = None
            if self.metrics is not None:
                await self.metrics.stop()
            for listener in bound:
                if listener not in started:  # bound but never started, it would hold its port until exit
                    with contextlib.suppress(Exception):
                        await listener.start()
                with contextlib.suppress(Exception):
                    await listener.stop(0)
            self._remove_unix_socket()
            raise
        self._answers_unsent = AnswersToCallersGone(logger)
        logging.getLogger(GRPC_CORE_LOGGER).addFilter(self._answers_unsent)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        ready = health_pb2.HealthCheckResponse.SERVING if self.ready_at_start else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._set_readiness(ready)
        if self.health_address is not None:
            logger.info("health check (plaintext) on %s", self.health_address)
        if self.metrics_address is not None:
            logger.info("metrics on http://%s/metrics", self.metrics_address)
            if config.tls is not None:  # the one listener of a TLS server that neither encrypts nor authenticates
                logger.warning(
                    "metrics on %s are served over plain HTTP, unauthenticated, to anyone who reaches the port, "
                    "while gRPC here takes TLS%s: bind --host to an internal interface, or protect port %d "
                    "(a firewall, a NetworkPolicy)",
                    self.metrics_address,
                    " and client certificates (--tls-client-ca)" if config.tls.client_ca is not None else "",
                    self.metrics_port,
                )

    async def mark_ready(self) -> None:
        """Report readiness SERVING, now or when the server starts (a draining one stays NOT_SERVING)."""
        self.ready_at_start = True
        if self._server is not None:
            await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)

    async def _set_readiness(self, status: int) -> None:
        """Readiness under ``services.READY_SERVICE`` and, as a Jina server reports it, under each service
        served, so that a probe naming one (``grpc_health_probe -service=jina.JinaSingleDataRequestRPC``) works."""
        for name in (services.READY_SERVICE, *self._service_names, reflection.SERVICE_NAME):
            await self.health.set(name, status)

    def _bind_unix(self, path: str) -> None:
        """Listen on ``path``; a socket left by a dead server is replaced, one a live server holds is refused.

        gRPC binds a private name beside ``path``, renamed onto it at once (which replaces a stale socket in one
        step): gRPC unlinks the path it bound when it stops, whatever is there by then, and a newer server may
        have bound ``path`` while this one drained. The socket is held (an O_PATH descriptor, so that its inode
        number cannot be given to another file meanwhile) until ``_remove_unix_socket`` compares it with ``path``.
        """
        check_unix_path_free(path)
        warn_if_socket_folder_shared(path)
        private = _private_socket_path(path)
        try:
            self._server.add_insecure_port(unix_target(private))  # the fallback private == path may need encoding
            if private != path:
                os.rename(private, path)
            self._unix_socket = os.open(path, os.O_PATH | os.O_NOFOLLOW)
        except RuntimeError as exc:
            raise ConfigurationError(f"cannot listen on unix:{path}: folder missing or not writable ({exc})") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on unix:{path}: {exc.strerror}") from None

    def is_own_unix_socket(self, path: str) -> bool:
        """Whether ``path`` names the socket this server listens on (by device and inode, however it is written:
        ``//``, ``/./``, ``..`` or a symbolic link to its folder)."""
        held = self._unix_socket
        if held is None:
            return False
        try:
            there, ours = os.stat(path), os.fstat(held)
        except (OSError, ValueError):  # no such file, or a path no file could have
            return False
        return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)

    def _remove_unix_socket(self) -> None:
        """Remove the socket file we bound, only while ``path`` still is it (by device and inode): never one we
        were refused, which belongs to a live server, nor one a newer server bound there since."""
        held, self._unix_socket = self._unix_socket, None
        if held is None:
            return
        path = self.config.unix_socket
        try:
            ours = os.fstat(held)
            with contextlib.suppress(FileNotFoundError):
                there = os.lstat(path)
                if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
                    os.unlink(path)
                else:
                    logger.info("unix:%s is another server's socket now: left in place", path)
        finally:
            os.close(held)

    async def drain(
        self, grace: Optional[float] = None, when_idle: Optional[Callable[[], Awaitable[None]]] = None
    ) -> None:
        """Refuse new calls, let in-flight ones finish (up to ``grace`` seconds), then stop.

        ``when_idle`` runs once no call is in flight: before the listener closes when they all ended within the
        grace (see the module's docstring), else once ``stop()`` has cut the rest. With ``quiet_seconds`` the
        listener closes only once, besides, no call has come for that long (the drain's start counts as one),
        ``DRAIN_QUIET_WAIT_MAX`` after the calls ended at most, and never past the grace.
        """
        server, self._server = self._server, None
        if server is None:
            return
        grace = self.config.drain_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        self._drain_grace = grace  # what the cut's warning names: stop()'s grace when given, else the config's
        deadline = self.drain_deadline = loop.time() + grace
        # the calls gRPC handed over before the drain are served, not refused as new (see _refuse_new): grpc.aio
        # starts each call's handler in a task of its own a pass of the loop after it took the call
        await asyncio.sleep(0)
        self._taken_before = frozenset(asyncio.all_tasks())
        self._last_arrival = loop.time()  # a call gRPC took just before may reach its handler (refused) only now
        self.draining = True
        self.stopping.set()
        await self.health.enter_graceful_shutdown()
        idle = not self._calls
        if not idle:
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
            idle = not self._calls
        self._taken_before = frozenset()  # from here on every call is new: once idle, idle it stays
        if idle and when_idle is not None:
            await when_idle()
            when_idle = None
        if idle and self.quiet_seconds:
            await self._until_quiet(deadline)
        try:
            await server.stop(max(0.0, deadline - loop.time()))
        finally:
            # probes saw NOT_SERVING throughout the drain; the health listener goes once the server has
            await self._stop_health_listener()
            if self._answers_unsent is not None:
                logging.getLogger(GRPC_CORE_LOGGER).removeFilter(self._answers_unsent)
                self._answers_unsent.close()
                self._answers_unsent = None
        self._remove_unix_socket()
        if when_idle is not None:
            await when_idle()
        await self._stop_metrics_listener()  # scraped through the drain, its cuts included, until the end

    async def _stop_metrics_listener(self) -> None:
        if self.metrics is not None and self.metrics_port is not None:
            self.metrics_port = None
            await self.metrics.stop()

    def grace_is_over(self) -> bool:
        """Whether a drain's grace has ended: a call cancelled now was cut by the stop (or its caller left as it
        came), not given up on by its caller while the server served."""
        deadline = self.drain_deadline
        return deadline is not None and asyncio.get_running_loop().time() >= deadline

    def requests_cut(self, under_way: Counter[str], log: logging.Logger, name: str, what: str) -> Counter[str]:
        """Once the drain is over: the requests ``under_way`` then, by endpoint (a runtime keeps those the
        drain's end cancelled counted), were cut; said in one WARNING to ``log`` naming each endpoint and how
        many of its requests, ``what`` saying where they were and what their callers got. Empty when the drain
        ended within its grace; a head or worker process exits DRAIN_CUT_EXIT (cli.stopping) when some were."""
        if not self.grace_is_over():
            return Counter()  # every call ended within the grace: none was cut
        cut = +under_way
        if cut:
            named = cut.most_common(CUT_ENDPOINTS_NAMED)
            endpoints = ", ".join(f"{quoted(endpoint)} x{count}" for endpoint, count in named)
            if len(cut) > len(named):
                endpoints += f" and {len(cut) - len(named)} more endpoint(s)"
            log.warning("%s: the drain's grace (%gs) ended with %d request(s) %s: %s", name,
                        self.config.drain_grace if self._drain_grace is None else self._drain_grace,
                        cut.total(), what, endpoints)
        return cut

    async def _until_quiet(self, deadline: float) -> None:
        """Return once no call has come for ``quiet_seconds``, ``DRAIN_QUIET_WAIT_MAX`` from now at most, or at
        ``deadline`` (the loop's time)."""
        loop = asyncio.get_running_loop()
        give_up = min(deadline, loop.time() + DRAIN_QUIET_WAIT_MAX)
        while True:
            now = loop.time()
            quiet_at = self._last_arrival + self.quiet_seconds
            if now >= quiet_at or now >= give_up:
                return
            await asyncio.sleep(min(quiet_at, give_up) - now)

    async def _stop_health_listener(self) -> None:
        """Stop the plaintext health-only listener, if any (it has no calls worth waiting for)."""
        health_server, self._health_server = self._health_server, None
        if health_server is not None:
            await health_server.stop(0)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _private_socket_path(path: str) -> str:
    """A name beside ``path`` no file has, for gRPC to bind before the rename onto ``path`` (see
    ``Server._bind_unix``), as short as a socket path must be; ``path`` itself when its folder leaves no room for
    a name of 8 random characters or more (gRPC then removes whatever is at ``path`` when it stops)."""
    folder = os.path.dirname(path)
    room = MAX_UNIX_PATH_BYTES - len(os.path.join(folder, ".").encode())
    if room >= 8:
        for _ in range(8):
            candidate = os.path.join(folder, "." + secrets.token_hex(6)[:room])
            if not os.path.lexists(candidate):
                return candidate
    return path


def _bind(server: grpc.aio.Server, host: str, port: int, tls: Optional[ServerTls]) -> int:
    """Bind ``server`` on ``host:port`` (TLS when ``tls`` is given) and return the port bound; a refusal is a
    ConfigurationError naming the address and its likely cause."""
    bind = entity_address(host, port)  # an IPv6 host in brackets
    try:
        if tls is not None:
            return server.add_secure_port(bind, tls.credentials())
        return server.add_insecure_port(bind)
    except RuntimeError as exc:
        cause = "port in use or address not local"
        if 0 < port < 1024:
            cause += ", or this user may not listen below 1024"
        if tls is not None:  # gRPC fails the bind alike when its TLS library refuses the material
            cause += ", or TLS material gRPC's TLS library refused (its own log lines above say which)"
        raise ConfigurationError(f"cannot listen on {bind}: {cause} ({exc})") from None


def request_list(
    payload: bytes, decoded_here: bool = True, max_fields: int = MAX_TOP_LEVEL_FIELDS
) -> list[DataRequest]:
    """The requests of a ``process_data`` call; ProtocolError when the list is malformed, empty or longer than
    MAX_REQUESTS_PER_CALL (refused before any is wrapped). ``decoded_here``: their documents share one call's
    bounds (DataRequest.bound_together); a head forwards them undecoded and leaves that to who decodes them.
    ``max_fields``: each request's top-level fields taken."""
    envelope = parse(jina_pb2.DataRequestListEnvelope, payload, "DataRequestList")
    if not envelope.requests:
        raise ProtocolError("process_data received an empty request list")
    if len(envelope.requests) > MAX_REQUESTS_PER_CALL:
        raise ProtocolError(
            f"process_data received {len(envelope.requests)} requests in one list; at most "
            f"{MAX_REQUESTS_PER_CALL} are taken"
        )
    requests = [DataRequest.from_bytes(item, max_fields=max_fields) for item in envelope.requests]
    if decoded_here:
        DataRequest.bound_together(requests, len(payload))  # one call's bounds, not one request's each
    return requests


async def within_message_limit(
    context: grpc.aio.ServicerContext, answer: bytes, limit: int, what: str, whose: str
) -> bytes:
    """``answer``, or an abort naming ``what`` it is and ``whose`` limit it passes ("this worker's"): gRPC would
    refuse to send it with a bare "Sent message larger than max" and a traceback in the server's log."""
    if len(answer) > limit:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} is {len(answer)} bytes, over {whose} max message size of {limit} bytes (--max-message-mb)",
        )
    return answer


def jina_server(config: ServerConfig, runtime) -> Server:
    """A Server exposing ``runtime``'s Jina methods (process_single_data, process_data, process_control,
    endpoint_discovery, dry_run, and Call over process_single_data) and listing their services through reflection.

    A runtime with a ``request_stream`` handler serves shardnet's request streams too
    (networking/streams.py), unless ``max_concurrent_rpcs`` caps it: a stream is one RPC however
    many requests it carries, so a capped server leaves its callers to call it unary.
    Heads and workers alike close their listener once no call has come for ``DRAIN_QUIET_SECONDS`` (see the
    module's docstring): a worker a head still sends to (its membership behind: a static list, a watch lagging,
    a container restarted in place) had calls cut CANCELLED by ``stop()``, which the head does not send again.
    """
    server = Server(
        config,
        [services.SINGLE_DATA_SERVICE, services.DATA_SERVICE, services.CONTROL_SERVICE, services.DISCOVERY_SERVICE,
         services.CALL_SERVICE, services.DRY_RUN_SERVICE],
        quiet_seconds=DRAIN_QUIET_SECONDS,
    )
    server.serve_unary(services.PROCESS_SINGLE_DATA, runtime.process_single_data)
    server.serve_unary(services.PROCESS_DATA, runtime.process_data)
    server.serve_unary(services.PROCESS_CONTROL, runtime.process_control)
    server.serve_unary(services.ENDPOINT_DISCOVERY, runtime.endpoint_discovery)
    server.serve_unary(services.DRY_RUN, runtime.dry_run)
    request_stream = getattr(runtime, "request_stream", None)
    if request_stream is not None and config.max_concurrent_rpcs is None:
        server.serve_stream(services.REQUEST_STREAM, request_stream)
    server.serve_stream(
        services.STREAM_CALL, one_by_one(runtime.process_single_data, server.stopping, config.max_message_bytes)
    )
    return server

