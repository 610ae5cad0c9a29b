"""``Connection``: one replica's channel over its lifetime: opened, used, replaced and closed.

A connection opens its channel in the event loop that sends (and refuses calls from another loop), counts the
calls and streamed requests running on it, replaces it (``rebuild``) while the old one's calls finish there, and
closes it with a grace after which what still runs is cut. It also asks the replica for its health, over that
channel or over one of its own. How a channel lives and ends is the same whichever list holds it, so it is kept
apart from ``replica_list``, which decides which replica is picked, ejected and let back in. ``close_in_turn``
closes many connections at once without their closes walking each other.
"""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from typing import Any, Awaitable, Generator, Iterable, Optional

import grpc.aio

from shardnet.errors import ConfigurationError
from shardnet.networking.addresses import Address
from shardnet.networking.channels import CONNECT_TIMEOUT, ChannelOptions, Stubs, get_grpc_channel, message_limits
from shardnet.networking.health import HealthProblem, health_problem
from shardnet.networking.streams import RequestStreams
from shardnet.networking.tls import ClientTls

# asyncio's words when a channel made in one event loop is used from another (or after its loop closed)
OTHER_LOOP = ("attached to a different loop", "Event loop is closed")

# how long a replaced or removed replica's channel waits for the calls still on it before it is closed
# anyway: as long as they last, in practice (a call cut off here fails over, it is not lost, but it runs twice)
RETIRED_CHANNEL_GRACE = 24 * 3600.0

# what a health check's connection attempt (problem_now) is given beyond the check's time, in milliseconds
CONNECT_SLACK_MS = 100
# seconds a replica's health check over its channel may take (an ejected one's probe, a lagging one's check): one
# not answering within it is not healthy. The same bound both ways: a replica is blamed for missing callers' short
# deadlines only when it fails the very check that would let it back in, or it would be ejected and let back in
# in turn. Its own, not the callers' time: a check with a caller's 0.05 s would name a busy machine's healthy
# replica as hung
HEALTH_TIMEOUT = 1.0


async def finish_or_cut(closings: dict[asyncio.Task, Any], grace: float) -> None:
    """Give background closes ``grace`` seconds; those still waiting on calls stop waiting and close at once
    (their calls are cut: ``ReplicaList.call`` reports them as UNAVAILABLE)."""
    # a close left pending in an event loop closed since (run_until_complete, then close()) never runs again:
    # waiting on it, or cancelling it, raises "Event loop is closed" (its channel went with that loop)
    closings = {closing: what for closing, what in closings.items() if not closing.get_loop().is_closed()}
    if not closings:
        return
    pending = set(closings)  # all of them, when the wait itself is cancelled: then none may wait on
    try:
        _, pending = await asyncio.wait(closings, timeout=grace)
    finally:
        for closing in pending:
            closing.cancel()  # a cancelled close cuts what it waited for (_ChannelInUse.close)
    await asyncio.gather(*pending, return_exceptions=True)


def close_finished_channel(channel: grpc.aio.Channel) -> Awaitable[None]:
    """Close ``channel``, whose calls have all ended (answered, or cancelled with their caller), without grpc.aio's
    ``close()``: that walks every task of the loop for calls to cut (some 50 ms with 4,000 tasks, 250 ms with
    20,000), and a replica check of a busy head (64 checks ending in one loop pass, each channel closed so)
    stalled the loop for seconds and named serving replicas as not answering. What it does once it finds
    no call is done here: refuse new calls, then close the core channel. A grpc.aio without those (not seen)
    gets its own close."""
    core = getattr(channel, "_channel", None)
    if core is None or not all(callable(getattr(core, name, None)) for name in ("closed", "closing", "close")):
        return channel.close()
    if not core.closed():
        core.closing()
        core.close()
    return _closed()


async def _closed() -> None:
    return None


def _retrieved(task: asyncio.Task) -> None:
    """Read a check's outcome no one waits for any more (its caller was cancelled), so none is said unretrieved."""
    if not task.cancelled():
        task.exception()


async def close_in_turn(closes: Iterable[Awaitable[Any]]) -> None:
    """Start each close a loop pass after the one before, then wait for them all: grpc.aio's channel close walks
    every task of the loop, and thousands started at once walked each other. A close that has finished is let
    go of at once: held until the last one ends, the 8,000 finished closes of a pool were walked by every close
    after them (15 s). The first failure is raised once every close has ended. Cancelled, it cancels every close
    still running (each then cuts what it waited for)."""
    running: set[asyncio.Future] = set()
    failures: list[BaseException] = []

    def finished(task: asyncio.Future) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())

    try:
        for close in closes:
            task = asyncio.ensure_future(close)
            running.add(task)
            task.add_done_callback(finished)
            await asyncio.sleep(0)
        while running:
            await asyncio.wait(running)
    finally:
        for task in running:
            task.cancel()
    if failures:
        raise failures[0]


class _Running:
    """The calls and streamed requests running on one channel, counted by ``ReplicaList.call``, so that a close
    can wait for them itself: grpc.aio's own grace, once cancelled, leaves its calls running uncut."""

    __slots__ = ("count", "checks", "_idle")

    def __init__(self) -> None:
        self.count = 0
        # health checks on the channel (``Connection.problem``): not waited for, but cut by grpc.aio's close (the
        # fast close of a channel with nothing running leaves a call on it hanging to its deadline)
        self.checks = 0
        self._idle: Optional[asyncio.Future] = None

    def end(self) -> None:
        self.count -= 1
        if not self.count and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def idle(self, timeout: float) -> None:
        """Return once none runs, or after ``timeout`` seconds."""
        if self.count:
            if self._idle is None or self._idle.done():  # shared by everyone waiting (a close after a removal)
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._idle], timeout=timeout)


class _ChannelInUse:
    """A channel, the request streams on it (None without) and what runs on it, closed together: closing a
    channel does not end its streams, and their requests must get the same grace as its calls."""

    __slots__ = ("channel", "streams", "running", "handed_out")

    def __init__(
        self, channel: grpc.aio.Channel, streams: Optional[RequestStreams], running: _Running, handed_out: bool = False
    ):
        self.channel = channel
        self.streams = streams
        self.running = running
        # its stubs were given out (``Connection.stubs``): calls made on them are not counted, and only grpc.aio's
        # close reaches them
        self.handed_out = handed_out

    async def close(self, grace: Optional[float]) -> None:
        """Give calls and streamed requests ``grace`` seconds (None: none), then cut them; cancelled while it
        waits, it cuts them at once. A channel none of whose counted calls or health checks runs any more, its
        stubs never handed out, is closed without grpc.aio's walk of the loop's tasks (65 ms a removal on a busy
        head): what else may be on it (a call made on ``Connection.channel`` directly) has a deadline or an
        answer of its own to end by."""
        try:
            if grace:
                await self.running.idle(grace)
        finally:
            if self.streams is not None:
                await self.streams.close(None)  # its stream calls cut; their requests fail over
            if self.running.count or self.running.checks or self.handed_out:
                await self.channel.close(None)  # calls this close cannot reach itself: grpc.aio's close cuts them
            else:
                await close_finished_channel(self.channel)



class Connection:
    """One replica: its address, its channel and the method callables on it."""

    __slots__ = (
        "address", "_tls", "_options", "channel", "counted_stubs", "_handed_out", "running", "failures",
        "times_ejected", "_retiring", "_closed", "_origin", "_request_streams", "rebuilt_at", "admitted_at",
        "checked_at", "draining", "loop", "_loop_thread", "recent_failures", "last_failure", "answered_at", "missed_at", "gone_since",
    )

    def __init__(
        self,
        address: Address,
        tls: Optional[ClientTls] = None,
        options: Optional[ChannelOptions] = None,
        owner: str = "",
        request_streams: bool = False,
    ):
        self.address = address
        self._request_streams = request_streams
        self._origin = f"{owner} replica {address}" if owner else f"replica {address}"  # named by malformed replies
        self._tls = tls if address.tls else None
        self._options = options
        self.failures = 0
        # the latest failures' causes (a status code, and whose deadline ran out), written on failures only: the
        # last EjectionPolicy.consecutive_failures of them are the run an ejection names
        self.recent_failures: list[str] = []
        self.last_failure = ""  # what gRPC said of the latest of them, but a deadline's (a handshake refused, say)
        self.times_ejected = 0
        # loop time of its latest answer to each kind of call (method and endpoint; outliers.MAX_RUN_KINDS kinds,
        # the latest): a replica that answered a kind after a call of that kind it missed was sent is queued
        # behind its own work (overloaded), not hung, and that miss is not held against it (outliers)
        self.answered_at: dict = {}
        # loop time of the latest caller's deadline it missed: a replica missing callers' deadlines itself does not
        # make another the outlier by answering others (outliers)
        self.missed_at = float("-inf")
        self.admitted_at = float("-inf")  # time.monotonic() when it last joined the picks
        self.rebuilt_at = float("-inf")  # loop time of the last rebuild
        self.checked_at = float("-inf")  # time.monotonic() of the last health check out of turn (ejected)
        self.draining = False  # set aside as it drains (not ejected): checked every second until it serves again
        # time.monotonic() since which a replica set aside as it drained has had no process at its address (its
        # drain ended: a restart's gap, or gone for good); None: none seen
        self.gone_since: Optional[float] = None
        self._retiring: dict[asyncio.Task, _ChannelInUse] = {}  # replaced channels closing in the background
        self._closed: weakref.WeakSet = weakref.WeakSet()  # channels we closed: their cancelled calls were cut by us
        self._open()

    def _open(self) -> None:
        try:
            self.channel = get_grpc_channel(self.address, options=self._options, asyncio=True, tls=self._tls)
        except RuntimeError as error:  # grpc.aio wants an event loop to attach the channel to
            if "event loop" not in str(error):
                raise
            raise ConfigurationError(
                f"replica {self.address}: no event loop to open its channel in; add connections from async code "
                "in the loop that sends"
            ) from None
        # the loop gRPC bound the channel to (grpc.aio keeps it as _loop; None: unknown, and gRPC's own error then
        # says it, after the call was made)
        self.loop: Optional[asyncio.AbstractEventLoop] = getattr(self.channel, "_loop", None)
        self._loop_thread: Optional[int] = None  # the thread that loop was seen running in (check_loop)
        self._handed_out = False
        # shardnet's own callables on the channel: ``ReplicaList.call`` counts what it sends on them in ``running``,
        # so that a close with none running need not look for calls (``stubs`` is the same, for callers' own calls)
        self.counted_stubs = Stubs.for_channel(
            self.channel,
            origin=self._origin,
            request_streams=self._request_streams,
            limits=message_limits(self._options),
        )
        self.running = _Running()

    @property
    def stubs(self) -> Stubs:
        """The method callables on the channel. Calls made on them directly (not through ``ReplicaList.call``) are
        not counted among those a close waits for; the channel's close cuts them (grpc.aio's, which walks the
        loop's tasks to find them), as it cuts the counted ones still running after the grace."""
        self._handed_out = True
        return self.counted_stubs

    @stubs.setter
    def stubs(self, stubs: Stubs) -> None:
        self._handed_out = True
        self.counted_stubs = stubs

    @property
    def tls(self) -> Optional[ClientTls]:
        """The material the next channel is dialled with; None for a replica dialled in plaintext."""
        return self._tls

    def dial_with(self, tls: ClientTls) -> None:
        """Open the next channel with ``tls`` (renewed material); a replica dialled in plaintext stays so."""
        if self._tls is not None:
            self._tls = tls

    def rebuild(self) -> None:
        """Replace the channel with a fresh one; the old one closes once the calls still on it end. TLS material
        in files that cannot be read now raises ConfigurationError and leaves the connection as it was. A closed
        connection (removed, or its list closing) is left closed: calls failing within the close's grace still
        count as failures, and a channel opened then would be closed by no one."""
        if self.channel in self._closed:
            return
        retired = _ChannelInUse(self.channel, self.counted_stubs.streams, self.running, self._handed_out)
        self._open()  # first: a failure to open changes nothing
        self.rebuilt_at = asyncio.get_running_loop().time()
        self._closed.add(retired.channel)
        closing = asyncio.get_running_loop().create_task(retired.close(RETIRED_CHANNEL_GRACE))
        self._retiring[closing] = retired
        closing.add_done_callback(self._retiring.pop)

    def check_loop(self) -> None:
        """Refuse, before gRPC makes a call, a channel whose event loop is not the one sending: one that runs no
        more (closed, or a loop the pool was filled in before ``asyncio.run``), or one running in another thread.
        gRPC would queue the call on it, never to run (a coroutine never awaited, its call held) or to run
        whenever that loop wakes, long after the caller was refused. The running loop is asked for when the
        thread calling is not the one it was last seen running in (its lookup makes a system call)."""
        loop = self.loop
        if loop is None:
            return
        if not loop.is_running():
            raise self.other_loop_error()
        thread = threading.get_ident()
        if thread != self._loop_thread:  # the first call, or the loop run again from another thread, or a stranger
            if asyncio._get_running_loop() is not loop:
                raise self.other_loop_error()
            self._loop_thread = thread

    def other_loop_error(self) -> ConfigurationError:
        return ConfigurationError(
            f"{self._origin}: its channel belongs to another event loop than the one sending; add connections from "
            "async code in the loop that sends (not before asyncio.run, nor in an earlier one)"
        )

    def closed_here(self, channel: grpc.aio.Channel) -> bool:
        """True when ``channel`` is one of this connection's that it closed itself (removed, rebuilt)."""
        return channel in self._closed

    def cut_by_close(self, channel: grpc.aio.Channel) -> bool:
        """True when a call on ``channel`` was cancelled because we closed the channel, not by its caller."""
        if channel not in self._closed:
            return False
        task = asyncio.current_task()
        return task is None or not task.cancelling()  # the caller's task being cancelled: its own doing

    async def health(self, timeout: float = HEALTH_TIMEOUT) -> bool:
        """True when the replica's gRPC health service answers SERVING, or, for a replica without one, when it
        lists its endpoints (every Jina and shardnet server does; another server on its port does not); False
        when the check fails (``problem``)."""
        return await self.problem(timeout) is None

    async def problem(self, timeout: float = HEALTH_TIMEOUT) -> Optional[HealthProblem]:
        """Why the replica does not serve (None: it serves), asked over its channel, the one its calls take (a
        connection that hangs fails the check as it fails them); its channel closed under the check, cutting it
        (health checks are not counted among the calls a close waits for), is a problem, and no cancellation of
        the caller's."""
        channel, running = self.channel, self.running
        self.check_loop()
        running.checks += 1
        try:
            return await health_problem(self.counted_stubs, self.address, timeout, self._tls)
        except asyncio.CancelledError:
            if self.cut_by_close(channel):
                return HealthProblem("its channel was closed under the check")
            raise
        except grpc.aio.UsageError:  # closed between its two questions (health, then endpoints): the second refused
            if self.closed_here(channel):
                return HealthProblem("its channel was closed under the check")
            raise
        finally:
            running.checks -= 1

    async def problem_now(self, timeout: float, tls: Optional[ClientTls] = None) -> Optional[HealthProblem]:
        """Why the replica does not serve right now (None: it serves), as ``health`` asks it but over a channel of
        its own, closed after: the routing channel may wait out a reconnect back-off of minutes though the replica
        is back, and a status check must not replace it. Its connection attempt lasts as long as the check, a
        little more (so that a hung replica is named by the call's deadline, as not answering): gRPC's 20 s would
        keep a connection to it open that long after the channel closed. ``tls``: other material to dial with
        than the connection's (a renewal tried before it is taken)."""
        options = {**dict(self._options or ()), CONNECT_TIMEOUT: math.ceil(timeout * 1000) + CONNECT_SLACK_MS}
        channel = get_grpc_channel(self.address, options=options, asyncio=True, tls=tls or self._tls)
        # the check runs in a task of its own, left to end by its deadline when the caller is cancelled: a call
        # cancelled while its connection's handshake is pending (a hung replica) left that connection open and
        # gRPC redialling the replica for as long as the process lived, its channel closed or not (grpcio 1.78)
        check = asyncio.ensure_future(health_problem(
            Stubs.for_channel(channel, origin=self._origin), self.address, timeout, tls or self._tls
        ))
        check.add_done_callback(lambda _: asyncio.ensure_future(close_finished_channel(channel)))
        try:
            return await asyncio.shield(check)
        except asyncio.CancelledError:
            check.add_done_callback(_retrieved)
            raise

    async def close(self, grace: Optional[float] = None) -> None:
        """Close the channel, giving calls in flight ``grace`` seconds; replaced channels get the same.

        Calls still running after that are cancelled; ``ReplicaList.call`` turns that into UNAVAILABLE.
        """
        self._closed.add(self.channel)
        retiring, self._retiring = dict(self._retiring), {}
        cut = False
        try:
            await _ChannelInUse(self.channel, self.counted_stubs.streams, self.running, self._handed_out).close(grace)
        except asyncio.CancelledError:
            cut = True  # cancelled itself (a pool closing): the replaced channels are cut at once too
            raise
        finally:
            await finish_or_cut(retiring, 0 if cut else grace or 0)

    def __await__(self) -> Generator[Any, None, "Connection"]:
        """``await replicas.get_next_connection()``, Jina's form, gives the connection: shardnet's pick is
        synchronous, and its own callers take the connection without awaiting."""
        yield from ()
        return self

    def __repr__(self) -> str:
        return f"<Connection {self.address} failures={self.failures}>"
