"""Request streams: a head's single DataRequests multiplexed over a few long-lived streams per worker.

A unary gRPC call opens an HTTP/2 stream and sends headers and trailers both
ways; a message on a stream that is already open costs both ends far less
(``benchmarks/head_overhead.py`` runs a head each way). A shardnet worker serves
``services.REQUEST_STREAM``: it reads DataRequests, works on them concurrently
and writes each answer when it is ready, carrying the request's own
``request_id``, by which the sending side matches it. What a unary call carries
beside its message travels inside the messages instead:

- the endpoint rides in the header (``exec_endpoint``), where Jina workers read it too;
- a gRPC status other than OK for one request comes back as a status message:
  an answer whose exception is named ``STATUS_EXCEPTION``, its args the code's
  name and details; the same message sent the other way, CANCELLED, tells the
  worker that the caller stopped waiting (its deadline passed, or it went),
  and the worker cancels that request's work as gRPC would cancel a call's.
  The worker sends one message back for every request, its answer or, when it
  cancelled the work, a CANCELLED status message; until that comes, the
  request's id stays taken on its stream, so that a late answer never reaches
  a later request that reuses the id;
- the ``is-error`` trailer is read off the answer's status;
- each end's receive limit goes once, as stream metadata, so that neither sends
  a message too big for the other (gRPC would end the whole stream): the worker
  refuses such an answer by name, the sender sends such a request unary. The
  worker's metadata also says that it serves the stream at all: requests go on
  a stream only once it has come.

A request goes unary instead when a stream cannot carry it faithfully: no
request id or one still due on that stream, metadata beyond its endpoint (and
the heads it passed, which a worker has no use for), a
request that would read as a status message, more than ``MAX_STREAMED_BYTES``,
or a replica that does not serve the stream (a Jina worker answers
UNIMPLEMENTED once; its connection is unary from then on).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable, Optional

import grpc
import grpc.aio

from shardnet.errors import ProtocolError
from shardnet.protocol import services
from shardnet.protocol.messages import MAX_ANSWER_FIELDS, DataRequest

# the stream metadata key carrying the sender's receive limit, in bytes
LIMIT_METADATA = "shardnet-max-message-bytes"
# the exception name of an answer that stands for a gRPC status of its request alone
STATUS_EXCEPTION = "grpc.StatusCode"
# bigger requests go unary: they gain nothing from a shared stream and would hold up the requests behind them
MAX_STREAMED_BYTES = 256 * 1024
# streams per replica: one write at a time goes on each, so a few let writes overlap
LANES = 4
# a writer holding this many messages, or bytes, waiting for the other end to read is full: a worker reads no
# more requests from a stream whose answers back up so (a sender that never reads would grow it without bound)
WRITER_BACKLOG_MESSAGES = 1024
WRITER_BACKLOG_BYTES = 16 * 1024 * 1024


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An AioRpcError as a unary call would have raised it, for one request on a stream."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def status_message(request_id: str, code: grpc.StatusCode, details: str) -> bytes:
    """The message that stands for ``code`` for request ``request_id``: a worker's abort of that request, or
    the sender's cancellation of it."""
    answer = DataRequest()
    answer.header.request_id = request_id
    answer.header.status.code = answer.header.status.ERROR
    answer.header.status.description = f"{code.name}: {details}"
    answer.header.status.exception.name = STATUS_EXCEPTION
    answer.header.status.exception.args.extend([code.name, details])
    return answer.to_bytes()


def stream_status_error(answer: DataRequest) -> Optional[grpc.aio.AioRpcError]:
    """The gRPC error ``answer`` stands for, when it is a status answer."""
    exception = answer._header().status.exception  # read only: the answer's bytes stay its cache, documents undecoded
    if exception.name != STATUS_EXCEPTION or len(exception.args) != 2:
        return None
    code = grpc.StatusCode.__members__.get(exception.args[0])
    if code is None or code == grpc.StatusCode.OK:  # no status, or one no failed call ends with: the sender's fault
        return rpc_error(
            grpc.StatusCode.INTERNAL,
            f"a malformed status answer on the request stream (code {exception.args[0]!r:.40}): {exception.args[1]:.200}",
        )
    return rpc_error(code, exception.args[1])


class StreamWriter:
    """Writes one stream's messages in order from a task of its own.

    gRPC takes one write at a time per stream, and a write cancelled halfway
    cancels the whole stream: so no caller writes, each only queues.
    """

    __slots__ = ("_write", "_finish", "_queue", "_cells", "_count", "_queued_bytes", "_wake", "_room", "_finishing",
                 "task")

    def __init__(self, write: Callable[[bytes], Awaitable[None]], finish: Optional[Callable[[], Awaitable[None]]] = None):
        self._write = write
        self._finish = finish
        # each message waiting to be written, in a cell of its own ([message]) that ``withdraw`` empties (None) in
        # place: a search of the queue for each caller that leaves stalled the loop behind a replica that stopped
        # reading (16,000 waiting, half their callers leaving: seconds), and the bytes withdrawn are let go at once
        self._queue: collections.deque[list] = collections.deque()
        self._cells: dict[int, list] = {}  # id(message) -> the cells holding it, oldest first (one, but for a repeat)
        self._count = 0  # the messages waiting, withdrawn ones not counted
        self._queued_bytes = 0
        self._wake: Optional[asyncio.Future] = None
        self._room: Optional[asyncio.Future] = None  # set once a full writer has room again (or stops)
        self._finishing = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    def send(self, message: bytes) -> None:
        cell = [message]
        self._queue.append(cell)
        self._cells.setdefault(id(message), []).append(cell)
        self._count += 1
        self._queued_bytes += len(message)
        self._wake_up()

    @property
    def queued_bytes(self) -> int:
        """The bytes of the messages waiting to be written."""
        return self._queued_bytes

    @property
    def full(self) -> bool:
        """Whether the messages waiting to be written reached the backlog bounds."""
        return self._count >= WRITER_BACKLOG_MESSAGES or self._queued_bytes >= WRITER_BACKLOG_BYTES

    async def room(self) -> None:
        """Return once the writer is not full, or has stopped (a stream ended writes nothing more)."""
        while self.full and not self.task.done():
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    def withdraw(self, message: bytes) -> bool:
        """Take ``message`` (this very object) out of the queue if it has not been written yet; whether it was."""
        cell = self._take_cell(message)
        if cell is None:
            return False
        cell[0] = None  # skipped when its turn comes
        self._count -= 1
        self._queued_bytes -= len(message)
        if self._room is not None and not self.full:
            self._room_made()
        return True

    def _take_cell(self, message: bytes) -> Optional[list]:
        """The oldest cell still holding ``message``, no longer listed under it; None when none does."""
        key = id(message)
        cells = self._cells.get(key)
        if cells is None:
            return None
        cell = cells.pop(0)
        if not cells:
            del self._cells[key]
        return cell

    def take_queued(self) -> list[bytes]:
        """Empty the queue, returning what was in it: messages never handed to ``write`` (the one being written is
        not, nor any the writer took before it stopped). A writer that stopped keeps its queue for this."""
        queued = [cell[0] for cell in self._queue if cell[0] is not None]
        self._queue.clear()
        self._cells.clear()
        self._count = 0
        self._queued_bytes = 0
        self._room_made()
        return queued

    def finish(self) -> None:
        """Write what is queued, then half-close the stream (``finish``) and stop."""
        self._finishing = True
        self._wake_up()

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._queue:
                    message = self._queue.popleft()[0]
                    if message is None:  # withdrawn
                        continue
                    self._take_cell(message)
                    self._count -= 1
                    await self._write(message)
                    self._queued_bytes -= len(message)
                    if self._room is not None and not self.full:
                        self._room_made()
                if self._finishing:
                    if self._finish is not None:
                        await self._finish()
                    return
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            # the stream was cancelled under us (its channel closed): its reader reports that
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the stream ended: its reader fails what was waiting for an answer
        finally:
            # the queue stays: which messages were never written is for the stream's owner to take, whenever it
            # sees the end (its reader may see it after this writer's failed write, or before)
            self._room_made()

    def _room_made(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)


class _Lane:
    """One stream to the replica: its writer, its reader, and the requests waiting for an answer on it.

    It carries requests only once the replica has answered the stream's opening with its receive limit
    (a shardnet worker does so at once); until then, and on a server that does not (it refuses the method),
    requests go unary.
    """

    __slots__ = ("_owner", "call", "pending", "abandoned", "writer", "limit", "ready", "task", "garbled", "unreadable")

    def __init__(self, owner: "RequestStreams"):
        self._owner = owner
        self.call = owner._open(metadata=owner._stream_metadata)
        self.pending: dict[str, asyncio.Future] = {}
        self.abandoned: set[str] = set()  # ids whose callers left before their answers came, which are still due
        self.ready = False
        self.writer: Optional[StreamWriter] = None
        self.limit = owner.max_request_bytes
        self.garbled = 0  # answers that could not be read (_set_aside), and the first one's error
        self.unreadable: Optional[ProtocolError] = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, request_id: str, data: bytes) -> Optional[asyncio.Future]:
        """The future of ``data``'s answer; None when it must go unary (stream not open yet, the same id
        still due here, or bigger than the replica takes). Behind a replica that stopped reading, the request
        waits in the writer's queue as long as its caller does (``forget`` takes it back), no longer."""
        if not self.ready or request_id in self.pending or request_id in self.abandoned or len(data) > self.limit:
            return None
        future = self.pending[request_id] = asyncio.get_running_loop().create_future()
        self.writer.send(data)
        return future

    def forget(self, request_id: str, future: asyncio.Future, data: bytes) -> bool:
        """The call is over; if its answer never came (deadline, cancellation), the request is taken back when
        it has not been written yet (the replica never hears of it), else the worker is told to stop its work.
        Whether it was taken back."""
        taken_back = False
        if self.pending.get(request_id) is future:
            del self.pending[request_id]
            taken_back = self.writer.withdraw(data)
            if not taken_back:
                self.abandoned.add(request_id)
                self.writer.send(status_message(request_id, grpc.StatusCode.CANCELLED, "the caller stopped waiting"))
            if self.garbled:
                self._cut_once_only_garbled_are_due()
        if not self.pending and self._owner.retired:
            self.finish()
        return taken_back

    def finish(self) -> None:
        """Half-close once the answers waited for are in (the replica then ends the stream); not yet open: drop it."""
        if self.writer is not None:
            self.writer.finish()
        else:
            self.call.cancel()

    async def _run(self) -> None:
        owner = self._owner
        error: Exception = rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            f"{owner.origin} ended its request stream before answering (it is stopping)",
        )
        try:
            offered = (await self.call.initial_metadata()).get(LIMIT_METADATA)
            if offered is None:  # the stream did not open: why?
                if await self.call.code() == grpc.StatusCode.UNIMPLEMENTED:  # no shardnet worker (Jina's refuse it)
                    owner.unary_only = True
                return  # down, or stopping: a later request opens the stream again
            worker_limit = byte_count(offered)
            if worker_limit is None:  # a server speaking some other stream on this path: not ours to use
                owner.unary_only = True
                self.call.cancel()
                return
            if worker_limit:  # 0: none
                self.limit = min(self.limit, worker_limit)
            self.writer = StreamWriter(self.call.write, self.call.done_writing)
            self.ready = not owner.retired
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                try:
                    self._deliver(message)
                except ProtocolError as exc:
                    self._set_aside(exc)
                if self.garbled:
                    self._cut_once_only_garbled_are_due()
            if self.pending and self.garbled == 0 and await self.call.code() == grpc.StatusCode.OK:
                # a shardnet worker ends its stream so only once every request it took is answered (it drains):
                # what is left never reached it, and is refused in the words that say so, to go elsewhere
                error = rpc_error(grpc.StatusCode.UNAVAILABLE, services.DRAINING_DETAILS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                owner.unary_only = True
            # the stream broke, not the requests on it (a write racing the break even reads INTERNAL):
            # UNAVAILABLE, so that they fail over as calls to a vanished replica do
            error = rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the request stream to {owner.origin} broke: {exc.code().name}: {exc.details()}",
            )
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise
            error = rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the request stream to {owner.origin} was closed with this request on it (the replica was "
                "removed, its channel rebuilt, or the pool closed)",
            )
        finally:
            self.ready = False
            owner._lane_ended(self)
            if error.details() != services.DRAINING_DETAILS:  # (a drain's refusal says "never ran" too, and more)
                self._fail_unwritten()
            if self.unreadable is not None:  # what still waited when the stream ended may be what was garbled
                error = rpc_error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{owner.origin} sent an unreadable answer on its request stream: {self.unreadable}",
                )
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()
            self.abandoned.clear()
            if self.writer is not None:
                self.writer.task.cancel()

    def _set_aside(self, unreadable: ProtocolError) -> None:
        """An answer we cannot match to its request: this stream takes no more requests, and is not cut yet, since
        the replica still runs what it took and cutting would fail those requests (which then go elsewhere too)
        while it does (``_cut_once_only_garbled_are_due``)."""
        self.garbled += 1
        if self.unreadable is None:
            self.unreadable = unreadable
            self.ready = False

    def _cut_once_only_garbled_are_due(self) -> None:
        """Cut the stream once no more messages are due on it than came garbled: the replica sends one for each
        request, its answer or the acknowledgement of its CANCELLED, so what still waits then is what was garbled.
        (A replica holding the stream open would hold them for good; one that ends it fails them as it does.)"""
        if len(self.pending) + len(self.abandoned) <= self.garbled:
            self.call.cancel()

    def _fail_unwritten(self) -> None:
        """Fail the requests still queued in the writer when the stream ended (broke, was cut or closed) as never
        written, so that they go elsewhere as a call that found no connection does: the replica cannot have run
        them. The others on the stream, each handed to gRPC's write, may have run (a write whose completion was
        never seen may still have reached the replica)."""
        if self.writer is None:
            return
        unsent = rpc_error(grpc.StatusCode.UNAVAILABLE, services.UNWRITTEN_DETAILS)
        for message in self.writer.take_queued():
            try:
                request_id = DataRequest.from_bytes(message).request_id
            except ProtocolError:  # (ours: it was read before it was queued)
                continue
            future = self.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(unsent)

    def _deliver(self, message: bytes) -> None:
        answer = DataRequest.from_bytes(
            message, origin=self._owner.origin, max_documents=None, max_fields=MAX_ANSWER_FIELDS
        )
        request_id = answer.request_id
        future = self.pending.pop(request_id, None)
        if future is None:  # its caller stopped waiting (deadline, cancellation): the id is free again
            self.abandoned.discard(request_id)
        elif not future.done():
            future.set_result(answer)


class RequestStreams:
    """The request streams to one replica over one channel, opened as they are needed."""

    __slots__ = ("_channel", "_open", "_unary", "_decoded_unary", "decode_answer", "max_request_bytes",
                 "_stream_metadata", "_lanes", "_turn", "origin", "unary_only", "retired", "streamed", "opened")

    def __init__(
        self,
        channel: grpc.aio.Channel,
        unary: Callable[..., Any],
        decoded_unary: Callable[..., Any],
        decode_answer: Callable[[bytes], Any],
        limits: tuple[int, int],
        origin: str,
        lanes: int = LANES,
    ):
        self._channel = channel
        self._open = channel.stream_stream(services.REQUEST_STREAM)
        self._unary = unary
        self._decoded_unary = decoded_unary
        self.decode_answer = decode_answer  # what the decoded unary method makes of an answer's bytes
        max_send_bytes, max_receive_bytes = limits  # this side's (-1: none)
        # requests go on a stream only when this side may send them: gRPC would end the stream over one too big
        self.max_request_bytes = MAX_STREAMED_BYTES if max_send_bytes < 0 else min(MAX_STREAMED_BYTES, max_send_bytes)
        self._stream_metadata = ((LIMIT_METADATA, str(max(max_receive_bytes, 0))),)  # 0: no limit
        self._lanes: list[Optional[_Lane]] = [None] * lanes
        self._turn = 0
        self.origin = origin
        self.unary_only = False  # the replica does not serve request streams
        self.retired = False
        self.streamed = 0  # requests sent on a stream so far
        self.opened = 0  # streams opened so far

    def single_data(self, request: Any, metadata: Any = None, timeout: Optional[float] = None) -> Any:
        """``process_single_data`` as a stream message when it can go as one, else the unary call."""
        data = self._streamable(request, metadata)
        if data is None:
            return self._unary(request, metadata=metadata, timeout=timeout)
        return StreamedCall(self, request, data, metadata, timeout, decode=False)

    def decoded_single_data(self, request: Any, metadata: Any = None, timeout: Optional[float] = None) -> Any:
        """As ``single_data``, the answer decoded on arrival."""
        data = self._streamable(request, metadata)
        if data is None:
            return self._decoded_unary(request, metadata=metadata, timeout=timeout)
        return StreamedCall(self, request, data, metadata, timeout, decode=True)

    def _streamable(self, request: Any, metadata: Any) -> Optional[bytes]:
        """``request``'s bytes when a stream carries it faithfully (module docstring), else None."""
        if self.unary_only or self.retired or not isinstance(request, DataRequest):
            return None
        try:
            if not request.request_id or (request.is_error and stream_status_error(request) is not None):
                return None  # no id to match its answer by, or it would read as a status message
            for key, value in metadata or ():
                if key == services.VIA_HEAD_METADATA:
                    continue  # a head's loop guard: only a worker serves the stream, and a worker forwards nothing
                if key != services.ENDPOINT_METADATA or request.endpoint != value:
                    return None
            return request.to_bytes()  # (its size is for the stream it would go on to judge: _Lane.submit)
        except ProtocolError:
            return None  # the unary call reports it

    @property
    def open_streams(self) -> int:
        """How many of the streams carry requests now."""
        return sum(1 for lane in self._lanes if lane is not None and lane.ready)

    def lane(self) -> Optional[_Lane]:
        """The next stream in turn, opened if it is not; None when it is not and the channel is not connected.

        A stream opens only on a connected channel: one to a replica that is down fails at once, and grpcio
        (1.78, grpc/grpc#43360) keeps a few hundred bytes of every stream call that fails so, which a head
        trying a shard's last, dead replica under load grew by a megabyte an outage. Until the channel
        connects, requests go unary (whose calls connect it).
        """
        turn = self._turn
        self._turn = (turn + 1) % len(self._lanes)
        lane = self._lanes[turn]
        if lane is None:
            if self._channel.get_state() != grpc.ChannelConnectivity.READY:
                return None
            lane = self._lanes[turn] = _Lane(self)
            self.opened += 1
        return lane

    def _lane_ended(self, lane: _Lane) -> None:
        for index, held in enumerate(self._lanes):
            if held is lane:
                self._lanes[index] = None

    def retire(self) -> None:
        """Take no more requests; each stream half-closes once its answers are in, so its channel can close."""
        self.retired = True
        for lane in self._lanes:
            if lane is not None:
                lane.ready = False
                if not lane.pending:
                    lane.finish()

    def take_back_unwritten(self) -> None:
        """Fail what still waits unwritten in every stream's queue as never sent, so that it goes to another
        replica now: this one (stalled, its lease lapsed) cannot have run it. What was written stays on the
        stream, to be answered or cut."""
        for lane in self._lanes:
            if lane is not None:
                lane._fail_unwritten()

    async def close(self, grace: Optional[float]) -> None:
        """Retire, give the requests still waiting ``grace`` seconds (None: none), then cut the streams: what is
        still on them fails with UNAVAILABLE and fails over. (Closing the channel does not end its streams.)"""
        self.retire()
        lanes = [lane for lane in self._lanes if lane is not None]
        if lanes and grace:
            await asyncio.wait([lane.task for lane in lanes], timeout=grace)
        for lane in lanes:
            lane.call.cancel()
        if lanes:
            await asyncio.wait([lane.task for lane in lanes])

    def unary(self, decode: bool) -> Callable[..., Any]:
        return self._decoded_unary if decode else self._unary


class StreamedCall:
    """One request on a request stream, awaited as a grpc.aio unary call is (``await``, ``trailing_metadata()``)."""

    __slots__ = ("_streams", "_request", "_data", "_metadata", "_timeout", "_decode", "_trailing")

    def __init__(self, streams: RequestStreams, request: DataRequest, data: bytes, metadata: Any,
                 timeout: Optional[float], decode: bool):
        self._streams = streams
        self._request = request
        self._data = data
        self._metadata = metadata
        self._timeout = timeout
        self._decode = decode
        self._trailing: Any = ()

    def __await__(self):
        return self._run().__await__()

    async def trailing_metadata(self) -> Any:
        return self._trailing

    async def _run(self) -> Any:
        streams = self._streams
        request_id = self._request.request_id
        lane = streams.lane()
        future = None if lane is None else lane.submit(request_id, self._data)
        if future is None:
            return await self._unary()
        streams.streamed += 1
        timer = loop = None
        if self._timeout is not None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            timer = loop.call_later(self._timeout, _expire, future)
        forgotten = False
        try:
            answer = await future
        except grpc.aio.AioRpcError as error:
            forgotten = True
            if lane.forget(request_id, future, self._data) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # its time ran out while it waited in the queue, never written: in words that say it never reached
                # the replica, so that even at most once it may go to another (an attempt's own timeout)
                raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, services.TAKEN_BACK_DETAILS) from None
            raise
        finally:
            if not forgotten:
                lane.forget(request_id, future, self._data)
            if timer is not None:
                timer.cancel()
        if answer.is_error:  # (read once: each read is a header lookup)
            error = stream_status_error(answer)
            if error is not None:
                if error.details() == services.BUSY_DETAILS:  # this stream is full, not the replica: a call has room
                    return await self._unary(
                        None if loop is None else max(0.0, self._timeout - (loop.time() - started))
                    )
                raise error
            if not _status_passed_through(self._request, answer):
                self._trailing = services.ERROR_TRAILER
        if self._decode:
            return streams.decode_answer(answer.to_bytes())
        return answer

    async def _unary(self, timeout: Optional[float] = None) -> Any:
        timeout = self._timeout if timeout is None else timeout
        call = self._streams.unary(self._decode)(self._request, metadata=self._metadata, timeout=timeout)
        answer = await call
        self._trailing = await call.trailing_metadata()
        return answer


def byte_count(text: str) -> Optional[int]:
    """A limit as metadata carries it (digits; a float's text is taken too), or None when it is none (no number,
    or one past any float, as thousands of digits are)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if 0 <= value < float("inf") else None


def _status_passed_through(request: DataRequest, answer: DataRequest) -> bool:
    """Whether ``answer``'s ERROR status is its request's own, passed back unchanged (no handler for its endpoint,
    a readiness check): a worker sets ``is-error`` on a call only for a failure of its own, so a unary call's
    answer then comes with no such trailer, and a streamed one must not either."""
    return request.is_error and request._header().status == answer._header().status


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

