"""The worker: serves one Executor over the Jina methods.

It decodes each request, runs the handler bound to its endpoint (header
``exec_endpoint``, else the ``endpoint`` metadata), and answers with the
edited request plus one route entry. A handler may return Documents (they
replace the request's) or, as in Jina, a dict: it is filed under the
worker's name in the ``__results__`` parameter. A handler exception becomes an ERROR
status carrying the exception's name, args and stack (trailing metadata
``is-error: true``, gRPC status OK), as in Jina; the worker keeps serving.
An endpoint nobody handles comes back unchanged with SUCCESS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import math
import threading
import time
import uuid
from collections import Counter
from typing import Any, AsyncIterator, Optional

import grpc
import grpc.aio

from shardnet.errors import ConfigurationError, PickleRefused, ProtocolError, ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.addresses import entity_address, host_is_loopback, parse_address
from shardnet.networking.channels import NOT_CONNECTED, check_control_token
from shardnet.networking.streams import (
    LIMIT_METADATA,
    WRITER_BACKLOG_MESSAGES,
    StreamWriter,
    byte_count,
    status_message,
    stream_status_error,
)
from shardnet.networking.tls import ClientTls, FollowedClientMaterial
from shardnet.protocol import services
from shardnet.protocol.budget import DenseBudget
from shardnet.protocol.documents import Document, DocumentList
from shardnet.protocol.messages import ControlRequest, DataRequest, require_empty
from shardnet.protocol.proto import docarray_pb2, jina_pb2
from shardnet.runtimes.bursts import BurstLog
from shardnet.runtimes.executor import (
    DEFAULT, DEFAULT_ENDPOINT, DRY_RUN_ENDPOINT, AnswerTooBig, Executor, handler_table,
)
from shardnet.runtimes.head import IMPLIED_LEASE_FACTOR, MAX_RENEWAL_INTERVAL
from shardnet.runtimes.lifecycle import serve_until_signalled
from shardnet.runtimes.log_lines import CLOSE_STEP, MAX_ID_CHARS, quoted
from shardnet.runtimes.server import (
    RequestAborted,
    ServerConfig,
    jina_server,
    request_list,
    within_message_limit,
)

logger = logging.getLogger(__name__)

# after DEACTIVATE a worker serves on until no call came for SETTLE_QUIET seconds (SETTLE_BOUND at most):
# calls the head sent before it knew still arrive, and are served here rather than refused once the drain begins
SETTLE_QUIET = 0.1
SETTLE_BOUND = 1.0
# the handler threads' names begin so: a stop tells them from the Executor's own threads
HANDLER_THREAD_PREFIX = "handler"
# seconds between the warnings of a worker whose head keeps refusing (or missing) its renewals
REGISTRATION_LOG_INTERVAL = 60.0
# seconds a renewal waits for the head's answer at least (all it had once; now, while a lease holds, half of what
# is left of it: a head whose queue held calls longer than 1 s never read a renewal in time, and dropped the worker)
RENEWAL_TIMEOUT = 1.0
# seconds an ACTIVATE is given at least when asking the head about renewed TLS material took its time first
MIN_ACTIVATE_TIMEOUT = 0.5
# the share of what is left of its lease a renewal may wait for: the rest leaves time for another try within it
RENEWAL_SHARE_OF_LEASE = 0.5
# leases a renewal sent after ours ran out waits for the head (half the OVERLOAD_HOLD_LEASES it holds us for)
HELD_RENEWAL_LEASES = 3
# seconds a DEACTIVATE may take at most (less with a shorter drain grace)
DEACTIVATE_TIMEOUT = 5.0
# seconds an Executor's close() may run past the drain's grace (what is left of it, when its calls ended sooner):
# one that does not return by then is logged and left behind, and the worker exits without it (a close() hung
# on a lock or a lost connection kept its worker running for ever, its parent's kill -9 and further signals
# too)
CLOSE_GRACE = 5.0
BLOCKED_CLOSE_SLACK = 0.5  # seconds past close()'s bound, the loop still blocked, before an async close() is named
THREAD_EXIT_GRACE = 5.0  # seconds the threads an Executor started get to end once the program ended
EXIT_SECONDS = 2  # seconds left to a process to exit once its Executor's close() has returned or been left behind
# seconds a process needs after its drain, every bound it has on its way out: its Executor's close() up to
# CLOSE_GRACE, then the threads the Executor started up to THREAD_EXIT_GRACE more, then its exit. What a
# Deployment's stop and restart give a process beyond its drains, and a pod's grace under k8s render beyond its
# drain (DRAIN_MARGIN) before SIGKILL: a margin of CLOSE_GRACE alone let a close() that used it all run into the
# kill, one without the threads' grace a flusher's last write
AFTER_DRAIN_SECONDS = math.ceil(CLOSE_GRACE + THREAD_EXIT_GRACE) + EXIT_SECONDS
CLOSE_THREAD_NAME = "executor-close"  # the thread close() runs on, which an exit leaves behind once abandoned
# the shortest interval between a worker's ACTIVATEs: each is a call to its head, and 1e-6 s flooded it
MIN_REGISTER_INTERVAL = 0.1
SHORTEST_INTERVAL_WHY = " (a worker renews its registration with its head that often: a shorter one floods the head)"
# seconds between looks at the files of the TLS material a worker registers with, for a renewal (as a pool's)
HEAD_TLS_CHECK_INTERVAL = 30.0

# characters of a failed request's description (its exception, which may quote what the caller sent) a line shows
MAX_DESCRIPTION_CHARS = 1000
# endpoints without a handler logged (once each); past that, one line says so and no more are kept or logged
UNBOUND_LOGGED = 100
# a call this big (received bytes) has its parameters made into Python objects, and a list's requests joined, in a
# thread, which lets the event loop run meanwhile: it does both object by object, and a request's million parameter
# values held the loop for a second, a list of 10,000 requests for seconds
OFF_LOOP_BYTES = 256 * 1024
# requests of one stream worked on at once: past it a request is refused as never run (services.BUSY_DETAILS), so
# that a sender writing faster than the handlers answer cannot pile up work, and answers, without bound
STREAM_WORK_LIMIT = WRITER_BACKLOG_MESSAGES


def _cleartext_beyond_this_machine(head: str) -> bool:
    """Whether a call to ``head`` (as ``--head`` gives it) crosses a network unencrypted."""
    address = parse_address(head)
    return not address.tls and address.unix_path is None and not host_is_loopback(address.host)


# what a head answers an ACTIVATE it refuses: it took nothing
_HEAD_REFUSALS = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED,
})


def _refused_as_stopping(error: BaseException) -> bool:
    """Whether a registration failed only because the head drains (its own refusal as it stops)."""
    return (
        isinstance(error, ReplicaError) and error.code == grpc.StatusCode.UNAVAILABLE
        and error.cause == services.DRAINING_DETAILS
    )


def _tls_hint(error: Exception, head_tls: Optional[ClientTls]) -> str:
    """The worker's flags for TLS to its head, when its own connection failed in words that suggest the two ends
    disagree about TLS (not a status the head sent): what to give when it dials in plaintext, what to look at
    in the flags it gave (``head_tls``) when it dials over TLS."""
    if not isinstance(error, ReplicaError):
        return ""
    cause = error.cause.lower()
    if not cause.startswith(NOT_CONNECTED):
        return ""
    if not any(word in cause for word in ("socket closed", "handshake", "certificate", "ssl")):
        return ""
    if head_tls is None:
        return (
            " (if the head serves TLS, give --head-root-ca; with mutual TLS also --head-client-cert and "
            "--head-client-key, signed by its client CA)"
        )
    if "wrong_version_number" in cause:
        return (
            " (this worker dials its head over TLS, as --head-root-ca or a client certificate was given: if the "
            "head serves plaintext, give it --tls-cert and --tls-key, or drop the worker's --head-* TLS flags)"
        )
    if "socket closed" in cause and head_tls.certificate_chain is None:
        return (
            " (if the head requires client certificates (mutual TLS), give --head-client-cert and "
            "--head-client-key, signed by its --tls-client-ca)"
        )
    if "socket closed" in cause:
        return (
            " (if the head requires client certificates (mutual TLS), its --tls-client-ca must have signed "
            "--head-client-cert)"
        )
    return (
        " (--head-root-ca must have signed the head's certificate, and that certificate must name the address in "
        "--head, or the name given as --head-server-name)"
    )


def _drop_if_current(tasks: dict[str, asyncio.Task], key: str, task: asyncio.Task) -> None:
    if tasks.get(key) is task:
        del tasks[key]


class _MessageContext:
    """What ``Worker._handle`` asks of a call's context, for one request on a request stream: an abort refuses
    that request alone, no metadata comes with it (its endpoint is in its header), and the ``is-error``
    trailer is read off its status by the receiving side."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RequestAborted(code, details)

    @staticmethod
    def invocation_metadata() -> tuple:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Nothing to send: the receiving side reads ``is-error`` off the answer's status."""


_MESSAGE_CONTEXT = _MessageContext()  # it holds nothing: one serves every streamed request


def _detach_views(budgets: list[DenseBudget]) -> None:
    """Give the Documents a handler left viewing these messages copies of their own (``DenseBudget.detach_views``)."""
    for budget in budgets:
        budget.detach_views()


def _cancelled_from_outside() -> bool:
    """Whether the running task itself was asked to stop (its call cancelled), rather than a CancelledError
    surfacing from something the handler awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class HandlerThreads(concurrent.futures.ThreadPoolExecutor):
    """The blocking handlers' threads, which know the calls they still run: a call cut at the gRPC level (its
    caller's deadline, a cancel, the drain) leaves its handler running on, and a stop must know."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._running: set[concurrent.futures.Future] = set()
        # each call's future by the task that submitted it (run_in_executor submits from the awaiting task)
        self._by_task: dict[Any, concurrent.futures.Future] = {}
        self._orphaned: set[concurrent.futures.Future] = set()  # running on, their calls cut

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future = super().submit(fn, *args, **kwargs)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        try:
            task = asyncio.current_task()
        except RuntimeError:  # submitted from no loop (the Executor's own thread): no caller to leave
            task = None
        if task is not None:
            self._by_task[task] = future
            future.add_done_callback(lambda _done: self._by_task.pop(task, None))
        return future

    def orphan_current(self) -> None:
        """The running task's call was cut while its handler runs on in a thread: counted until that ends."""
        future = self._by_task.pop(asyncio.current_task(), None)
        if future is not None and not future.done():
            self._orphaned.add(future)
            future.add_done_callback(self._orphaned.discard)

    def orphaned(self) -> int:
        """Handlers still running in their threads whose calls were cut (their callers left)."""
        return sum(1 for future in list(self._orphaned) if not future.done())

    def running(self) -> list[concurrent.futures.Future]:
        return [future for future in list(self._running) if not future.done()]


class Worker:
    """Serves ``executor`` on ``config``'s address; optionally registers with a head."""

    def __init__(
        self,
        executor: Executor,
        config: ServerConfig = ServerConfig(),
        *,
        threads: int = 1,
        head: Optional[str] = None,
        shard_id: int = 0,
        control_token: Optional[str] = None,
        head_tls: Optional[ClientTls] = None,
        advertise_host: Optional[str] = None,
        register_interval: float = 2.0,
        name: Optional[str] = None,
    ):
        check_control_token(control_token)  # before serving: a token gRPC cannot carry would fail every ACTIVATE
        if not register_interval >= MIN_REGISTER_INTERVAL:  # NaN too
            raise ConfigurationError(
                f"register_interval must be at least {MIN_REGISTER_INTERVAL:g} seconds{SHORTEST_INTERVAL_WHY}, "
                f"got {register_interval!r}"
            )
        self.executor = executor
        # in error reports and as the key of a dict result (Jina names it deployment/shard-S/rep-R)
        self.name = name or type(executor).__name__
        self._route_name = self.name.split("/", 1)[0]  # a route names the deployment, as a Jina worker's does
        self._handlers = handler_table(type(executor))
        self._threads = HandlerThreads(max_workers=threads, thread_name_prefix=HANDLER_THREAD_PREFIX)
        # one thread counts the documents of process_data lists, out of the loop's way (a padded list's count takes
        # seconds) and of the default executor's, where close() runs: calls past it wait for it, none cancels it
        self._counting = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="list-count")
        self._unbound_logged: set[str] = set()
        # an Executor raising on every request must not write a line per request (a review: 401 a second)
        self._failures = BurstLog(
            logger, self.name, "%s: %d more handler failures within %gs (%s); the latest: %s"
        )
        self._head = head
        self._shard_id = shard_id
        self._control_token = control_token
        # what ACTIVATE dials the head with: the files as last read whole and checked, so that half a renewal
        # on disk (a new certificate whose key is not written yet) or a file missing a moment is not used
        self._head_tls = head_tls
        self._head_tls_files = FollowedClientMaterial(head_tls) if head_tls is not None else None
        self._head_tls_next_look = 0.0  # time.monotonic() of the next look at those files
        self._head_tls_taken_once = False  # a read of them checked out and was taken: a renewal is asked about first
        self._head_tls_refusal_said: Optional[tuple] = None  # the renewal the head refused, said once
        self._advertise_host = advertise_host
        self._register_interval = register_interval
        self._instance = uuid.uuid4().hex  # this process's, sent with every ACTIVATE: a restart draws a new one
        self._keep_registered: Optional[asyncio.Task] = None
        self._taken = False  # a head took, or may have taken, an ACTIVATE of ours (a DEACTIVATE has something to undo)
        self._renewed_at = float("-inf")  # time.monotonic() when the last ACTIVATE the head took was sent
        self._last_call = 0.0  # time.monotonic() of the latest data call
        self.server = jina_server(config, self)
        self._closed = False  # the Executor's close() has run
        self.close_abandoned = False  # its close() did not return within its bound, and was left running
        # by endpoint: requests in their handlers (those queued for a handler thread too), and those the drain's
        # end cut, which stay counted; what is left here once the drain is over was cut
        self._in_handlers: Counter[str] = Counter()
        # by endpoint: the requests still in their handlers when the drain's grace ended, cut unanswered (their
        # callers got UNAVAILABLE); set once the drain is over
        self.requests_cut: Counter[str] = Counter()
        self._metas_name = executor.metas.name  # what executor-specific parameters address
        self.metrics = None
        if config.metrics_port is not None:
            self._meter(shard_id)

    def _meter(self, shard_id: int) -> None:
        """Count and time every request (--metrics-port): a wrapper put in place of ``_handle`` here, so that a
        worker without metrics runs the very same request path."""
        from shardnet.runtimes.metrics import WorkerMetrics, worker_deployment  # an optional extra: only when asked

        self.metrics = WorkerMetrics(self, worker_deployment(self.name), shard_id, self._handlers)
        self.server.metrics = self.metrics.listener
        self._handle = self.metrics.meter_handle(self._handle, self._endpoint_of)

    @property
    def endpoints(self) -> list[str]:
        """What endpoint discovery lists, as a Jina worker does: the bound endpoints, ``/default`` when a default
        handler takes the rest (a Jina gateway skips a worker listing neither the request's endpoint nor it),
        and the dry-run endpoint."""
        listed = {endpoint for endpoint in self._handlers if endpoint != DEFAULT}
        if DEFAULT in self._handlers:
            listed.add(DEFAULT_ENDPOINT)
        return sorted(listed) + [DRY_RUN_ENDPOINT]

    # -- data ---------------------------------------------------------------------

    @staticmethod
    async def _decode(payload: bytes, context: grpc.aio.ServicerContext, parse_one) -> Any:
        try:
            return parse_one(payload)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _endpoint_of(self, request: DataRequest, context: grpc.aio.ServicerContext) -> str:
        endpoint = request.endpoint
        if endpoint is None:
            endpoint = dict(context.invocation_metadata()).get(services.ENDPOINT_METADATA) or DEFAULT_ENDPOINT
        return endpoint

    async def dry_run(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Jina's ``Client.is_flow_ready()`` pointed at this worker: serving, so ready (no handler runs)."""
        await self._decode(payload, context, functools.partial(require_empty, method="dry_run"))
        return jina_pb2.StatusProto(code=jina_pb2.StatusProto.SUCCESS).SerializeToString()

    async def process_single_data(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._last_call = time.monotonic()
        request = await self._decode(payload, context, DataRequest.from_bytes)
        return await self._handle([request], context)

    async def process_data(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._last_call = time.monotonic()
        try:
            requests = await asyncio.get_running_loop().run_in_executor(self._counting, request_list, payload)
        except ProtocolError as exc:
            if self.metrics is not None:  # refused before it is handled, counted here
                self.metrics.unreadable()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await self._handle(requests, context)

    async def request_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """shardnet's request stream (networking/streams.py): each request handled as it arrives, each answer
        written when ready; once the server drains, the stream ends after the answers of what it took."""
        loop = asyncio.get_running_loop()
        limit, whose = self._stream_limit(context)
        # what we take, which also tells the sender that this is a request stream it may use
        await context.send_initial_metadata(((LIMIT_METADATA, str(int(self.server.config.max_message_bytes))),))
        writer = StreamWriter(context.write)
        working: dict[str, asyncio.Task] = {}  # by request id: the sender keeps them distinct on a stream
        unreadable: list[ProtocolError] = []

        async def take() -> None:
            async for payload in requests:
                self._last_call = time.monotonic()
                if writer.full:  # the sender is not reading its answers: read no more of its requests until it does
                    await writer.room()
                try:
                    request = DataRequest.from_bytes(payload)
                    request_id = request.request_id  # the header decodes here, or the request cannot be answered
                    # a status answer on a request stream: the sender stopped waiting
                    cancelled = request.is_error and stream_status_error(request) is not None
                    if not cancelled and (not request_id or request_id in working):
                        raise ProtocolError(
                            f"request id {request_id!r:.80} is still being worked on in this stream: its answers "
                            "could not be told apart" if request_id else
                            "a request with no request id, whose answer could not be matched to it"
                        )
                except PickleRefused as exc:  # readable, so refused alone: the stream goes on
                    writer.send(status_message(exc.request_id, grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
                    continue
                except ProtocolError as exc:
                    unreadable.append(exc)
                    return
                if cancelled:
                    task = working.get(request_id)
                    if task is not None:
                        task.cancel()
                    continue
                if draining.is_set() or len(working) >= STREAM_WORK_LIMIT:  # refused at once, in words that tell
                    # every sender it never ran: the sender fails it over now, not when the stream ends. Past the
                    # limit, handlers are slower than the sender, and each request taken would hold its answer in
                    # the writer's backlog; the stream is still read, for the CANCELLED of what is under way
                    refusal = services.DRAINING_DETAILS if draining.is_set() else services.BUSY_DETAILS
                    writer.send(status_message(request_id, grpc.StatusCode.UNAVAILABLE, refusal))
                    continue
                task = working[request_id] = loop.create_task(
                    self._answer_streamed(request, request_id, writer, limit, whose)
                )
                task.add_done_callback(functools.partial(_drop_if_current, working, request_id))

        draining = self.server.stopping
        taking = loop.create_task(take())
        stopping = loop.create_task(draining.wait())
        try:
            await asyncio.wait((taking, stopping), return_when=asyncio.FIRST_COMPLETED)
            if working:  # draining: finish what was taken, while new requests are refused as they come
                await asyncio.wait(list(working.values()))
            taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)
            writer.finish()  # the answers to what came before an unreadable message go out first
            await writer.task
            if unreadable:  # no request id to answer by: the stream as a whole is refused
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request stream: {unreadable[0]}")
        except asyncio.CancelledError:  # the sender went away: nobody waits for these answers any more
            for task in working.values():
                task.cancel()
            raise
        finally:
            stopping.cancel()
            taking.cancel()
            writer.task.cancel()

    def _stream_limit(self, context: grpc.aio.ServicerContext) -> tuple[int, str]:
        """The largest answer a stream's sender takes, and whose limit that is."""
        own = int(self.server.config.max_message_bytes)
        offered = dict(context.invocation_metadata()).get(LIMIT_METADATA, "")
        theirs = byte_count(offered) or 0  # 0: none given (or none that reads as a number of bytes)
        return (theirs, "the receiving head's") if 0 < theirs < own else (own, "this worker's")

    async def _answer_streamed(
        self, request: DataRequest, request_id: str, writer: StreamWriter, limit: int, whose: str
    ) -> None:
        try:
            answer = await self._handle([request], _MESSAGE_CONTEXT, limit, whose)
        except RequestAborted as aborted:
            answer = status_message(request_id, aborted.code, aborted.details)
        except asyncio.CancelledError:  # its sender stopped waiting: that is acknowledged, so it may reuse the id
            answer = status_message(request_id, grpc.StatusCode.CANCELLED, "cancelled at the sender's request")
        except Exception as exc:  # a fault of ours: the sender still gets an answer, not a wait to its deadline
            logger.exception("%s: request %s on a request stream failed", self.name, quoted(request_id, MAX_ID_CHARS))
            answer = status_message(request_id, grpc.StatusCode.INTERNAL, f"{self.name}: {type(exc).__name__}: {exc}")
        writer.send(answer)

    async def _handle(
        self,
        requests: list[DataRequest],
        context: grpc.aio.ServicerContext,
        limit: Optional[int] = None,
        whose: str = "this worker's",
    ) -> bytes:
        first = requests[0]
        try:
            endpoint = self._endpoint_of(first, context)
            if endpoint == DRY_RUN_ENDPOINT:  # a readiness check: answered as served, no handler runs
                first.add_route(self._route_name).end_time.FromNanoseconds(time.time_ns())
                return first.to_bytes()
            handler = self._handlers.get(endpoint) or self._handlers.get(DEFAULT)
            if handler is None:
                self._log_unbound(endpoint)
                return first.to_bytes()
            received = first.received_bytes()  # what a failed handler's answer carries, not its half-made edits
            docs = first.docs
            # Jina's docs_map: each request's documents by the deployment that handled it last (a uses_after's
            # shards share one name, as under Jina: the last one's column stays; docs_matrix holds them all)
            senders = [request.last_executor for request in requests] if handler.takes("docs_map") else None
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        started = time.time_ns()
        try:
            # the bytes received (a list's others are still undecoded); a request made here has none: measured
            size = len(received) if received is not None else first.proto.ByteSize()
            if len(requests) > 1:
                size += sum(len(request.received_bytes() or b"") for request in requests[1:])
            if size < OFF_LOOP_BYTES:
                matrix, parameters = _join(requests)
            else:
                matrix, parameters = await asyncio.get_running_loop().run_in_executor(self._counting, _join, requests)
        except ProtocolError as exc:  # one that protobuf parsed but that is no JSON (a Value with no kind)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        specific = parameters.get(self._metas_name)
        if isinstance(specific, dict):  # Jina's executor-specific parameters: {"index": {"top_k": 3}} for "index"
            parameters = {**parameters, **specific}
        # tracing_context: Jina gives every handler one (None without OpenTelemetry, which shardnet has not)
        arguments = {"docs": docs, "parameters": parameters, "docs_matrix": matrix, "tracing_context": None}
        if handler.takes("endpoint"):  # only a handler naming it: Jina passes none (executor.NAMED_ONLY_ARGUMENTS)
            arguments["endpoint"] = endpoint
        if senders is not None:
            arguments["docs_map"] = dict(zip(senders, matrix))
        if not any(len(column) for column in matrix):  # as Jina's: no request holds a document, no matrix at all
            arguments["docs_matrix"] = None
        answer_limit = self.server.config.max_message_bytes if limit is None else limit
        in_handlers = self._in_handlers
        in_handlers[endpoint] = in_handlers.get(endpoint, 0) + 1  # not += (Counter.__missing__ is Python)
        cut = False
        # the Documents the handler is given view the requests' messages: those it keeps get copies of their own
        # once it is done (detached), as docarray's are, not the whole request each (budgets: one per message)
        budgets = {id(budget): budget for budget in (docs.budget, *(column.budget for column in matrix))}
        for budget in budgets.values():
            budget.track_views()
        handler_running = True
        try:
            returned = await handler(self.executor, self._threads, answer_limit=answer_limit, **arguments)
            if isinstance(returned, dict):
                self._file_result(first, returned, handler.name)
            elif returned is not None:
                self._replace_docs(first, returned, handler.name)
        except AnswerTooBig as exc:  # refused as an answer returned whole would be, by within_message_limit
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.name}: the answer of {endpoint} is over {exc.size} bytes (Documents yielded, not all read), "
                f"over {whose} max message size of {answer_limit} bytes (--max-message-mb)",
            )
        # the executor's failure is the client's answer, not the worker's crash; sys.exit() or KeyboardInterrupt
        # in a handler too (a library parsing arguments, say): it would stop the worker without a DEACTIVATE; any
        # other BaseException would leave the call unanswered; and a CancelledError the handler let out of a task
        # someone else cancelled: gRPC would take it for the call's own cancellation and send no answer at all,
        # leaving a caller without a deadline waiting for ever
        except GeneratorExit:
            raise  # this coroutine is being closed: nothing may run in it (a handler's own came as a RuntimeError)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancelled_from_outside():
                cut = self.server.grace_is_over()  # kept in _in_handlers: _finish names it
                # a blocking handler's thread runs on, and may still be making views: left as they are; an async
                # handler's coroutine ended with the cut (a view it kept would keep the whole request alive)
                handler_running = handler.is_async
                if not handler.is_async and not cut:  # still in its handler: the in-flight gauge counts it on
                    self._threads.orphan_current()
                raise  # the call itself: its client left, or the drain's grace ended
            if received is not None:  # as Jina's worker answers: the documents as they came, not half edited
                first = DataRequest.from_bytes(received)
            first.set_exception(exc, executor=type(self.executor).__name__)  # Jina names the class
            # the description set_exception made, which holds even for an exception that cannot be printed
            # (cut: a refusal may quote what the caller sent, and a log line per request must stay small)
            self._log_failure(handler.name, endpoint, first)
            context.set_trailing_metadata(services.ERROR_TRAILER)
        else:  # a route entry for work done, as a Jina worker adds one only then
            route = first.add_route(self._route_name)
            route.start_time.FromNanoseconds(started)
            route.end_time.FromNanoseconds(time.time_ns())
        finally:
            if handler_running:
                # once this step of the loop is over: a list the handler returned (stored in the answer by then)
                # is still held until it is (a blocking handler's future, in the loop's callback now running), and
                # each of its Documents would be copied as if the Executor kept it (1,000 returned: 2.5 times the
                # request's time)
                returned = None
                asyncio.get_running_loop().call_soon(_detach_views, list(budgets.values()))
            if not cut:
                left = in_handlers[endpoint] - 1
                if left:
                    in_handlers[endpoint] = left
                else:  # callers choose endpoints: none is kept once its calls ended (pop: dict's, in C)
                    in_handlers.pop(endpoint)
        answer = first.to_bytes()
        if len(answer) <= answer_limit:  # the common case, without within_message_limit's coroutine
            return answer
        return await within_message_limit(
            context, answer, answer_limit, f"{self.name}: the answer of {endpoint}", whose
        )

    def _warn_of_requests_cut(self) -> None:
        """Once the drain is over: the requests still in their handlers then were cut (``requests_cut``), said
        in a WARNING naming each endpoint and how many of its requests; a worker run exits DRAIN_CUT_EXIT then."""
        self.requests_cut = self.server.requests_cut(
            self._in_handlers, logger, self.name,
            "still in their handlers, cut unanswered (their callers got UNAVAILABLE)",
        )

    def _log_failure(self, handler_name: str, endpoint: str, request: DataRequest) -> None:
        """Log that ``handler_name`` failed on ``endpoint`` (``request`` answered with its exception): the first of a
        burst at once, naming the request; the rest counted by handler and endpoint, with the latest exception,
        once a second (``BurstLog``). The description is cut: a refusal may quote what the caller sent."""
        kind = f"{handler_name} on {quoted(endpoint)}"
        description = quoted(request._header().status.description, MAX_DESCRIPTION_CHARS)
        self._failures.note(
            kind, f"{kind}: {description}", "%s.%s failed on %s (request %s): %s",
            self.name, handler_name, quoted(endpoint), quoted(request.request_id, MAX_ID_CHARS), description,
        )

    def _file_result(self, request: DataRequest, result: dict, handler_name: str) -> None:
        """Put a handler's dict under ``parameters["__results__"][worker name]``, as Jina's worker does."""
        parameters = request.parameters
        results = parameters.get(services.RESULTS_PARAMETER)
        if not isinstance(results, dict):
            results = parameters[services.RESULTS_PARAMETER] = {}
        results[self.name] = result
        try:
            request.parameters = parameters
        except (TypeError, ValueError) as exc:  # protobuf's Struct takes JSON-like values only
            raise TypeError(f"handler {handler_name} returned a dict that is not JSON-like: {exc}") from None

    @staticmethod
    def _replace_docs(request: DataRequest, returned: Any, handler_name: str) -> None:
        if isinstance(returned, (str, bytes)) or not hasattr(returned, "__iter__"):
            raise TypeError(
                f"handler {handler_name} returned {type(returned).__name__}: a handler returns Documents, a dict or None"
            )
        returned = list(returned)
        strays = [type(item).__name__ for item in returned if not isinstance(item, Document)]
        if strays:
            raise TypeError(
                f"handler {handler_name} returned {strays[0]} among its Documents: "
                "a handler returns Documents, a dict or None"
            )
        request.docs.replace(returned)

    def _log_unbound(self, endpoint: str) -> None:
        """Log each unbound endpoint once, the first UNBOUND_LOGGED of them: endpoints are the callers' to choose."""
        endpoint = endpoint[:200]  # the log stays small whatever a caller names (the set too)
        if endpoint in self._unbound_logged or len(self._unbound_logged) > UNBOUND_LOGGED:
            return
        self._unbound_logged.add(endpoint)
        if len(self._unbound_logged) > UNBOUND_LOGGED:
            logger.info("%s: more than %d endpoints without a handler; no more are logged", self.name, UNBOUND_LOGGED)
        else:
            logger.info("%s has no handler for %s: requests pass through unchanged", self.name, quoted(endpoint))

    # -- control and discovery -------------------------------------------------------

    async def process_control(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = await self._decode(payload, context, ControlRequest.from_bytes)
        if request.command != "STATUS":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"a worker answers STATUS only, not {request.command}"
            )
        return request.to_bytes()

    async def endpoint_discovery(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._decode(payload, context, require_empty)
        reply = jina_pb2.EndpointsProto()
        reply.endpoints.extend(self.endpoints)
        return reply.SerializeToString()

    # -- lifetime ---------------------------------------------------------------------

    def _advertised(self) -> tuple[str, int]:
        """What the head should dial: our Unix socket when we listen on one (the head is local), else host and port."""
        if self.server.unix_address is not None:
            return self.server.unix_address, 0
        host = self._advertise_host or self.server.dial_host
        return host, self.server.port

    async def register(self) -> None:
        """ACTIVATE with the head, then keep re-sending it so a restarted head learns of us again.

        A head that is not up yet is retried by the refresh loop; a head that
        refuses us (a wrong token, say) stops the worker with that error.
        """
        if self._control_token and self._head_tls is None and _cleartext_beyond_this_machine(self._head):
            logger.warning(
                "sending the control token to head %s in cleartext with every ACTIVATE: give the worker "
                "--head-root-ca (and the head TLS) so that nobody on the way can read it",
                self._head,
            )
        try:
            await self._activate()
        except ReplicaError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                raise ConfigurationError(
                    f"head {self._head} takes no registration (ACTIVATE: {exc.cause}): it is no shardnet head; a "
                    "Jina head takes its workers from its --connection-list only: list this worker there, and "
                    "start it without --head"
                ) from None
            if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            logger.warning(
                "head %s is not reachable yet, will keep trying: %s%s", self._head, exc, _tls_hint(exc, self._head_tls)
            )
        self._keep_registered = asyncio.get_running_loop().create_task(self._refresh_registration())

    async def _head_material(self) -> Optional[ClientTls]:
        """The TLS material to reach the head with, its files looked at for a renewal every
        HEAD_TLS_CHECK_INTERVAL; until a first read checks out, the files as they are. A renewal the head refuses
        while it takes the material in use (a client certificate of a CA it does not trust, yet) is not taken:
        every ACTIVATE would fail, and the head drop this worker when its lease runs out; it is asked about again
        at the next look, as a pool asks its replicas."""
        follower = self._head_tls_files
        now = time.monotonic()
        if follower is not None and now >= self._head_tls_next_look:
            self._head_tls_next_look = now + HEAD_TLS_CHECK_INTERVAL
            renewal = follower.renewal()  # a refusal is logged there, naming the files
            if renewal is not None:
                signature, material = renewal
                refusal = await self._head_refuses(material) if self._head_tls_taken_once else None
                if refusal is None:
                    self._head_tls, self._head_tls_taken_once = material, True
                    follower.take(signature)
                elif self._head_tls_refusal_said != signature:
                    self._head_tls_refusal_said = signature
                    logger.warning(
                        "head TLS material changed but is not taken: head %s takes the previous material and not "
                        "it (%s); ACTIVATE goes on with the previous, and the new one is asked about at each look",
                        self._head, refusal,
                    )
        return self._head_tls

    async def _head_refuses(self, material: ClientTls) -> Optional[str]:
        """Why the head refuses renewed material while it takes the one in use, over new connections (a health
        check: its TLS handshake is what is asked); None when it takes both, or neither (that decides nothing)."""

        async def problem(tls: Optional[ClientTls]) -> Optional[str]:
            try:
                await oneshot.send_health_check_async(self._head, timeout=RENEWAL_TIMEOUT, tls=tls)
            except ReplicaError as exc:
                return exc.cause
            except Exception as exc:  # noqa: BLE001 - anything else: no refusal to hold against the renewal
                return repr(exc)
            return None

        before, after = await asyncio.gather(problem(self._head_tls), problem(material))
        return after if before is None and after is not None else None

    async def _activate(self, timeout: float = 5.0) -> None:
        host, port = self._advertised()
        sent = time.monotonic()
        tls = await self._head_material()
        # a renewal asked about (up to RENEWAL_TIMEOUT) comes out of the call's time, not on top of it
        timeout = max(MIN_ACTIVATE_TIMEOUT, timeout - (time.monotonic() - sent))
        try:
            await oneshot.activate_worker(
                host, port, self._head, self._shard_id, token=self._control_token, tls=tls,
                timeout=timeout, renews_every=self._register_interval, instance=self._instance,
            )
        except ReplicaError as exc:
            # a deadline, a connection cut: the head may have taken it all the same, and must hear DEACTIVATE
            self._taken = self._taken or not (exc.code in _HEAD_REFUSALS or exc.unsent)
            raise
        self._taken = True
        self._renewed_at = sent  # the head leased us when it read it, after this: what is left is at least that
        logger.debug("registered %s with head %s as shard %d", entity_address(host, port), self._head, self._shard_id)

    def _renewal_timeout(self) -> float:
        """How long a renewal may wait for the head: RENEWAL_SHARE_OF_LEASE of what is left of the lease the last
        ACTIVATE taken gave us (the one the head implies from our interval), RENEWAL_TIMEOUT at least. A busy
        head reads a renewal late, but within the lease still renews it; one given up on after 1 s counted
        for nothing, and a head under load dropped every worker whose renewals it was too busy to read."""
        lease = IMPLIED_LEASE_FACTOR * min(self._register_interval, MAX_RENEWAL_INTERVAL)
        left = self._renewed_at + lease - time.monotonic()
        if left <= 0:  # run out: the head holds us only while it reads no renewal (overloaded, its queue of inbound
            # calls seconds long); one given up on after 1 s never reached it, and 6 leases on it dropped every
            # worker at once. Read late, within HELD_RENEWAL_LEASES, it renews us and tells the head its renewals
            # get through again
            return max(RENEWAL_TIMEOUT, HELD_RENEWAL_LEASES * lease)
        return max(RENEWAL_TIMEOUT, RENEWAL_SHARE_OF_LEASE * left)

    async def _refresh_registration(self) -> None:
        """Repeat ACTIVATE every interval, even while the head is away (it needs one as soon as it is back); say
        so when it stops taking them, then at most once a REGISTRATION_LOG_INTERVAL, and when it takes them again."""
        failing_since: Optional[float] = None
        said_at = 0.0
        said_stopping = False
        while True:
            await asyncio.sleep(self._register_interval)
            try:
                await self._activate(timeout=self._renewal_timeout())
            except Exception as exc:  # noqa: BLE001 - anything (a TLS file gone a moment): said, and tried again
                now = time.monotonic()
                logger.debug("head %s did not take our registration: %s", self._head, exc)
                if _refused_as_stopping(exc):  # a restart, a deployment's stop: no failure to warn of
                    if not said_stopping:
                        said_stopping = True
                        logger.info("head %s is stopping: our registration goes to its next process", self._head)
                    continue
                if failing_since is None:
                    failing_since = said_at = now
                    logger.warning(
                        "head %s did not take our registration: %s%s", self._head, exc, _tls_hint(exc, self._head_tls)
                    )
                elif now - said_at >= REGISTRATION_LOG_INTERVAL:
                    said_at = now
                    logger.warning("head %s has not taken our registration for %.0fs: %s", self._head,
                                   now - failing_since, exc)
                continue
            said_stopping = False
            if failing_since is not None:
                logger.info("head %s takes our registration again, after %.0fs", self._head,
                            time.monotonic() - failing_since)
                failing_since = None

    async def deregister(self) -> None:
        """Tell the head to stop routing here (DEACTIVATE) and stop renewing the registration. Both take at most
        the drain's grace (half a second at least, DEACTIVATE_TIMEOUT at most): a silent head held a worker
        stopping with --drain-seconds 0 for 5 s. A worker the head cannot have
        taken (each ACTIVATE refused, or never reaching it) sends none."""
        if self._keep_registered is not None:
            self._keep_registered.cancel()
            await asyncio.gather(self._keep_registered, return_exceptions=True)
        grace = self.server.config.drain_grace
        if not self._taken:
            logger.debug("head %s cannot have taken our registration: no DEACTIVATE", self._head)
            return
        host, port = self._advertised()
        try:
            await oneshot.deactivate_worker(
                host, port, self._head, self._shard_id, token=self._control_token, tls=self._head_tls,
                timeout=min(DEACTIVATE_TIMEOUT, max(0.5, grace)),
            )
        except ReplicaError as exc:
            if not exc.unsent:
                raise
            # a head stopping with its workers (a deploy's Ctrl-C) closed its port first: it routes nothing here
            logger.info("head %s no longer listens (stopped or draining): no DEACTIVATE to send", self._head)
            return
        left = time.monotonic()
        while time.monotonic() - left < min(SETTLE_BOUND, grace):
            now = time.monotonic()
            if now - left >= SETTLE_QUIET and now - self._last_call >= SETTLE_QUIET:
                break
            await asyncio.sleep(SETTLE_QUIET / 4)

    async def start(self) -> None:
        """Serve (the Executor is built already); joining a head is ``register()``, as ``run()`` does once ready."""
        await self.server.start()

    async def stop(self, grace: Optional[float] = None) -> None:
        """Stop renewing any registration and stop serving, with ``grace`` seconds for calls in flight
        (``deregister()`` first tells the head to route elsewhere, as ``run()`` does)."""
        if self._keep_registered is not None:  # registered but stopped without deregister: stop renewing
            self._keep_registered.cancel()
            await asyncio.gather(self._keep_registered, return_exceptions=True)
            self._keep_registered = None
        await self.server.drain(grace, when_idle=self._finish)
        await self._finish()  # when the drain did not get to it

    async def _finish(self) -> None:
        """After the last request: the Executor's ``close()`` (once), then its threads go.

        A handler whose call has ended (its caller's deadline, a cancel) may still run on its thread: ``close()``
        waits for it until the drain's grace ends (an index saved in ``close()`` then holds its work), then runs
        on a thread of its own rather than behind one still stuck, which ``handlers_still_running`` counts.
        ``close()`` itself gets what is left of the grace and CLOSE_GRACE seconds more (``_close_executor``).
        """
        if not self._closed:
            self._closed = True
            self._warn_of_requests_cut()
            await self._wait_for_handlers()
            await self._close_executor()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._counting.shutdown(wait=False, cancel_futures=True)
        self._failures.close()  # failures counted but not yet said are said, not lost

    async def _close_executor(self) -> None:
        """Run the Executor's ``close()`` on a thread of its own, for what is left of the drain's grace
        and CLOSE_GRACE seconds more; one that has not returned by then is logged and left behind
        (``close_abandoned``), so that neither the drain nor the process's exit waits for it: a thread of the
        loop's default executor would be joined by both. What it raises, any BaseException, is logged."""
        loop = asyncio.get_running_loop()
        closed: asyncio.Future = loop.create_future()

        awaiting: list[asyncio.Task] = []

        def run_on_loop(returned: Any) -> None:
            """An async def close() runs on this loop, where the Executor's async handlers ran and made its
            queues, tasks and clients (on a loop of its own it hung or failed awaiting them)."""
            if closed.done():  # given up on meanwhile: not started at all
                _close_awaitable(returned)
                return
            task = loop.create_task(_awaited(returned))
            awaiting.append(task)
            # cancelled by no one here (the bound cancels ``closed`` first): a CancelledError of its own, which
            # ended it before its work was done, is a failure, not a return
            task.add_done_callback(
                lambda done: _settle(closed, asyncio.CancelledError("close() was cancelled") if done.cancelled()
                                     else done.exception())
            )

        def close() -> None:
            try:
                returned = self.executor.close()
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which says what it was
                outcome: Optional[BaseException] = exc
            else:
                outcome = None
                if inspect.isawaitable(returned):  # an async def close(): awaited, not dropped unawaited
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(run_on_loop, returned)
                    return
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the worker went on without it
                loop.call_soon_threadsafe(_settle, closed, outcome)

        deadline = self.server.drain_deadline
        left = self.server.config.drain_grace if deadline is None else max(0.0, deadline - loop.time())
        bound = left + CLOSE_GRACE
        logger.info("%s (%s): its close() gets %.1fs at most", CLOSE_STEP, type(self.executor).__name__, bound)
        # not a daemon: threads close() starts inherit that, and the exit must wait for them (an index saved on
        # a writer thread of its own); one left hung is not waited for (cli.stopping.exit_leaving_stuck_handlers)
        threading.Thread(target=close, name=CLOSE_THREAD_NAME).start()

        def blocking() -> None:  # on a timer's thread: an async close() blocking the loop keeps the bound from firing
            if awaiting and not closed.done():
                logger.error(
                    "%s: the Executor's async close() (%s) has blocked the event loop past its %.1fs bound (a "
                    "blocking call in an async def: make close() a plain def, or run the call with "
                    "asyncio.to_thread): the bound cannot cut it, and the stop waits for it", self.name,
                    type(self.executor).__name__, bound,
                )

        watchdog = threading.Timer(bound + BLOCKED_CLOSE_SLACK, blocking)
        watchdog.daemon = True
        watchdog.start()
        try:
            done, _ = await asyncio.wait([closed], timeout=bound)
        finally:
            watchdog.cancel()
        if not done:
            self.close_abandoned = True
            closed.cancel()  # given up on: a coroutine a slow sync close() returns later is closed, never started
            for task in awaiting:  # an async close() past its bound is cancelled, not left running on the loop
                task.cancel()
            logger.error(
                "%s: the Executor's close() did not return within %.1fs (what was left of the drain's grace and "
                "%gs more): stopping without it, its state may not be saved", self.name, bound, CLOSE_GRACE,
            )
            return
        failure = closed.exception()
        if failure is not None:  # logged, and the stop goes on: KeyboardInterrupt or sys.exit() too, which
            # skipped the server's stop and the socket's removal, and ended the worker without a word
            logger.error("%s: the Executor's close() (%s) failed: %r", self.name, type(self.executor).__name__,
                         failure, exc_info=failure)

    async def _wait_for_handlers(self) -> None:
        running = self._threads.running()
        deadline = self.server.drain_deadline
        if not running or deadline is None:
            return
        loop = asyncio.get_running_loop()
        await asyncio.wait([asyncio.wrap_future(future) for future in running], timeout=max(0.0, deadline - loop.time()))
        stuck = self.handlers_still_running()
        if stuck:
            logger.warning("%s: %d handler call(s) still running past the drain's grace; closing the Executor anyway",
                           self.name, stuck)

    def handlers_still_running(self) -> int:
        """How many blocking handler calls are still running on their threads (their callers may have gone)."""
        return len(self._threads.running())

    async def run(self, parent_pid: Optional[int] = None, ready_fd: Optional[int] = None) -> int:
        """Serve until SIGTERM/SIGINT/SIGHUP (or until process ``parent_pid`` exits): register with the head once
        ready, deregister then drain on stop. ``ready_fd``: as ``serve_until_signalled`` takes it."""
        try:
            return await serve_until_signalled(
                self.server,
                on_ready=self.register if self._head else None,
                on_stop=self.deregister if self._head else None,
                ready_line=lambda address: f"shardnet worker {self.name} ready on {address}",
                parent_pid=parent_pid,
                ready_fd=ready_fd,
                when_idle=self._finish,  # the Executor's close() before the listener closes: see server.py
            )
        finally:
            await self._finish()


async def _awaited(awaitable: Any) -> Any:
    """``awaitable``'s outcome, from a coroutine (``create_task`` takes nothing else)."""
    return await awaitable


def _close_awaitable(awaitable: Any) -> None:
    """Let go of an awaitable never awaited without a "never awaited" warning (a coroutine's)."""
    close = getattr(awaitable, "close", None)
    if inspect.iscoroutine(awaitable) and close is not None:
        close()


def _settle(future: asyncio.Future, outcome: Optional[BaseException]) -> None:
    """Give ``future`` the ``outcome`` of what ran on a thread (None: it returned), unless it was given up on."""
    if future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)


def _join(requests: list[DataRequest]) -> tuple[list[DocumentList], dict[str, Any]]:
    """The handler's ``docs_matrix`` and ``parameters``: one column per request (Jina gives one column even for a
    single request, so a reducer reading docs_matrix[0] runs alone too), once the first request holds every
    request's documents and ``__results__`` (as Jina's worker joins a list: a uses_after under ALL gets each
    shard's dict results).

    The first column gets a copy of its own, as its field is about to hold every document; protobuf joins them
    (document by document in Python, 10,000 requests' million documents took 4 s).
    """
    first = requests[0]
    parameters = first.parameters
    if len(requests) == 1:
        return [first.docs], parameters
    others = [request.docs for request in requests[1:]]
    gathered: dict[str, Any] = {}
    for request in requests:
        results = request.parameters.get(services.RESULTS_PARAMETER)
        if isinstance(results, dict):
            gathered.update(results)
    if gathered:
        parameters[services.RESULTS_PARAMETER] = gathered
        first.parameters = parameters
    docs = first.docs
    joined = first.proto.data.docs.docs
    first_column = docarray_pb2.DocumentArrayProto()
    first_column.docs.MergeFrom(joined)
    for request, column in zip(requests[1:], others):
        docs.budget.absorb(column.budget)  # what their sparse arrays may expand to comes along
        joined.MergeFrom(request.proto.data.docs.docs)
    return [DocumentList(first_column.docs, docs.budget), *others], parameters
