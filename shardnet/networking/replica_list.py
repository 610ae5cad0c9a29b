"""``ReplicaList``: the replicas of one shard (or one head), their channels and their health.

The list owns its connections: it opens and closes channels, picks the next
replica through its balancer, counts consecutive failures, rebuilds a channel
that keeps failing, and ejects a failing replica for a while (never the last
one), letting it back in once the gRPC health service says it serves.
Adding, removing and picking are O(1) whatever the number of replicas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from typing import Any, Awaitable, Generator, Iterable, Optional, Sequence, Union

import grpc
import grpc.aio

from shardnet.errors import ConfigurationError, RoutingError
from shardnet.networking.addresses import Address, parse_address
from shardnet.networking.balancing import Balancer, RoundRobin, make_balancer
from shardnet.networking.channels import (
    CONNECT_TIMEOUT,
    ChannelOptions,
    Stubs,
    checked_options,
    checked_reply,
    get_grpc_channel,
    message_limits,
    refused_as_draining,
)
from shardnet.networking.health import HealthProblem, health_problem
from shardnet.networking.streams import RequestStreams, rpc_error
from shardnet.networking.policies import EjectionPolicy, check_seconds
from shardnet.networking.tls import ClientTls
from shardnet.protocol import services

module_logger = logging.getLogger(__name__)

# asyncio's words when a channel made in one event loop is used from another (or after its loop closed)
_OTHER_LOOP = ("attached to a different loop", "Event loop is closed")

# how long a replaced or removed replica's channel waits for the calls still on it before it is closed
# anyway: as long as they last, in practice (a call cut off here fails over, it is not lost, but it runs twice)
RETIRED_CHANNEL_GRACE = 24 * 3600.0

# what a replica answers to a request whose content is at fault (malformed, unknown): every replica of the shard
# would answer it so, so the balancer counts it as an answer, not as the replica's failure. Not UNIMPLEMENTED,
# FAILED_PRECONDITION, UNAUTHENTICATED or PERMISSION_DENIED: those may be one replica's own (another server on
# its port, a head misconfigured, other credentials), and one answering them to everything must not draw traffic
CALLERS_FAULT = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
})

# the methods every replica serves, a Jina or shardnet worker or head alike: UNIMPLEMENTED for one of them is
# another server on the replica's port (a reused pod IP, a restarted machine), which failed the call without
# running it, as a refused connection does
DATA_METHODS = frozenset({"single_data", "data", "decoded_single_data", "decoded_data"})


def wrong_server(method: str, code: grpc.StatusCode) -> bool:
    """Whether a call of ``method`` ending with ``code`` met a server that is no replica at all."""
    return code == grpc.StatusCode.UNIMPLEMENTED and method in DATA_METHODS


# the name of the task that checks an ejected replica's health at once when it registers again (readmit_if_healthy)
_READMISSION = "shardnet-readmission"
# how often at most the last pickable replica's failures have an ejected one checked out of turn: every streak
# of failures asks, and a check of a replica refusing connections takes a millisecond
OUT_OF_TURN_CHECKS_EVERY = 1.0
# how often at most a replica set aside as draining is checked: its next process (a restart, a rolling update) is
# expected within seconds, so its checks do not back off as an ejected replica's do
DRAINING_CHECKS_EVERY = 1.0
# what a health check's connection attempt (problem_now) is given beyond the check's time, in milliseconds
CONNECT_SLACK_MS = 100
# seconds a replica's health check over its channel may take (an ejected one's probe, a lagging one's check): one
# not answering within it is not healthy. The same bound both ways: a replica is blamed for missing callers' short
# deadlines only when it fails the very check that would let it back in, or it would be ejected and let back in
# in turn. Its own, not the callers' time: a check with a caller's 0.05 s would name a busy machine's healthy
# replica as hung
HEALTH_TIMEOUT = 1.0
# how much longer than the longest of a replica's run of callers' short deadlines missed another's answered call
# may have had and still count against it: callers with the same deadline reach a replica with what they have
# left of it, which differs by the pool's time before the call (microseconds, or milliseconds on a busy loop)
SAME_DEADLINE_SLACK = 1.1
# the others' answers that judge a replica's run of callers' short deadlines missed, however long the run: a hung
# replica never answers, so its run only grows, and one wave of its peers' own misses (a moment's slowdown) left a
# gap of answers to misses that never closed: it stayed picked for good, half the calls failing (a review)
ANSWERS_TO_JUDGE = 3
# how many kinds of call (method and endpoint) a replica keeps runs of callers' short deadlines missed for: endpoint
# names come from callers, so a new kind beyond these drops the one missed least recently (its misses still count
# in the replica's run on any endpoint)
MAX_RUN_KINDS = 8
# the name of the task that asks a replica missing callers' short deadlines its peers meet for its health
_LAGGING_CHECK = "shardnet-lagging-check"


async def _finish_or_cut(closings: dict[asyncio.Task, Any], grace: float) -> None:
    """Give background closes ``grace`` seconds; those still waiting on calls stop waiting and close at once
    (their calls are cut: ``ReplicaList.call`` reports them as UNAVAILABLE)."""
    if not closings:
        return
    pending = set(closings)  # all of them, when the wait itself is cancelled: then none may wait on
    try:
        _, pending = await asyncio.wait(closings, timeout=grace)
    finally:
        for closing in pending:
            closing.cancel()  # a cancelled close cuts what it waited for (_ChannelInUse.close)
    await asyncio.gather(*pending, return_exceptions=True)


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

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
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

    __slots__ = ("channel", "streams", "running")

    def __init__(self, channel: grpc.aio.Channel, streams: Optional[RequestStreams], running: _Running):
        self.channel = channel
        self.streams = streams
        self.running = running

    async def close(self, grace: Optional[float]) -> None:
        """Give calls and streamed requests ``grace`` seconds (None: none), then cut them; cancelled while it
        waits, it cuts them at once."""
        try:
            if grace:
                await self.running.idle(grace)
        finally:
            if self.streams is None:
                await self.channel.close(None)
            else:
                await asyncio.gather(self.streams.close(None), self.channel.close(None))


class _ShortRun:
    """A run of callers' short deadlines a replica missed: how many, the longest of them (seconds), and how many
    calls the shard's other replicas answered since the first within deadlines no longer."""

    __slots__ = ("misses", "answered", "deadline")

    def __init__(self) -> None:
        self.misses = 0
        self.answered = 0
        self.deadline = 0.0

    def missed(self, callers_timeout: float) -> None:
        """One more miss, of a caller's deadline of ``callers_timeout``."""
        self.misses += 1
        self.deadline = max(self.deadline, callers_timeout)

    def met(self, timeout: float) -> bool:
        """Count another replica's answer within ``timeout`` if that is no longer than the run's deadlines
        (``SAME_DEADLINE_SLACK``); True once such answers are as many as the misses, or ``ANSWERS_TO_JUDGE``."""
        if self.misses == 0 or timeout > self.deadline * SAME_DEADLINE_SLACK:
            return False
        self.answered += 1
        return self.answered >= min(self.misses, ANSWERS_TO_JUDGE)


class _Lagging:
    """What a replica missing callers' short deadlines has open: its runs by kind of call (method and endpoint; at
    most MAX_RUN_KINDS), its run on any kind, and the health check that run's being met started (None: none)."""

    __slots__ = ("kinds", "total", "check")

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, Optional[str]], _ShortRun] = {}
        self.total = _ShortRun()
        self.check: Optional[asyncio.Task] = None

    def missed(self, kind: tuple[str, Optional[str]], callers_timeout: float) -> None:
        """One more miss of a call of ``kind``: counted in its kind's run and in the run on any kind."""
        run = self.kinds.pop(kind, None)  # put back last: the kinds kept are the ones missed latest
        if run is None:
            run = _ShortRun()
            if len(self.kinds) >= MAX_RUN_KINDS:
                del self.kinds[next(iter(self.kinds))]
        self.kinds[kind] = run
        run.missed(callers_timeout)
        self.total.missed(callers_timeout)


def _call_kind(method: str, metadata: Optional[Sequence[tuple[str, str]]]) -> tuple[str, Optional[str]]:
    """A call's kind, which the outlier detection compares like with like first: its method and the endpoint its
    metadata names (the first, as a head reads it; None for one sent in the request's header alone)."""
    for key, value in metadata or ():
        if key == services.ENDPOINT_METADATA:
            return method, value
    return method, None


class Connection:
    """One replica: its address, its channel and the method callables on it."""

    __slots__ = (
        "address", "_tls", "_options", "channel", "stubs", "running", "failures", "times_ejected", "_retiring",
        "_closed", "_origin", "_request_streams", "rebuilt_at", "admitted_at", "checked_at", "draining", "loop",
        "_loop_thread", "recent_failures",
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
        self.times_ejected = 0
        self.admitted_at = float("-inf")  # time.monotonic() when it last joined the picks
        self.rebuilt_at = float("-inf")  # loop time of the last rebuild
        self.checked_at = float("-inf")  # time.monotonic() of the last health check out of turn (ejected)
        self.draining = False  # set aside as it drains (not ejected): checked every second until it serves again
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
        self.stubs = Stubs.for_channel(
            self.channel,
            origin=self._origin,
            request_streams=self._request_streams,
            limits=message_limits(self._options),
        )
        self.running = _Running()

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
        in files that cannot be read now raises ConfigurationError and leaves the connection as it was."""
        retired = _ChannelInUse(self.channel, self.stubs.streams, self.running)
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
        connection that hangs fails the check as it fails them); its channel closed under the check (renewed
        or rebuilt: health checks are not counted among the calls a close waits for) is a problem, and no
        cancellation of the caller's."""
        channel = self.channel
        self.check_loop()
        try:
            return await health_problem(self.stubs, self.address, timeout)
        except asyncio.CancelledError:
            if self.cut_by_close(channel):
                return HealthProblem("its channel was closed under the check")
            raise

    async def problem_now(self, timeout: float) -> Optional[HealthProblem]:
        """Why the replica does not serve right now (None: it serves), as ``health`` asks it but over a channel of
        its own, closed after: the routing channel may wait out a reconnect back-off of minutes though the replica
        is back, and a status check must not replace it. Its connection attempt lasts as long as the check, a
        little more (so that a hung replica is named by the call's deadline, as not answering): gRPC's 20 s would
        keep a connection to it open that long after the channel closed."""
        options = {**dict(self._options or ()), CONNECT_TIMEOUT: math.ceil(timeout * 1000) + CONNECT_SLACK_MS}
        channel = get_grpc_channel(self.address, options=options, asyncio=True, tls=self._tls)
        try:
            return await health_problem(Stubs.for_channel(channel, origin=self._origin), self.address, timeout)
        finally:
            # shielded: a check cut short (a head draining) and cut again as the close runs left the channel open,
            # and gRPC dialling the replica again and again for as long as the channel object lived
            await asyncio.shield(channel.close())

    async def close(self, grace: Optional[float] = None) -> None:
        """Close the channel, giving calls in flight ``grace`` seconds; replaced channels get the same.

        Calls still running after that are cancelled; ``ReplicaList.call`` turns that into UNAVAILABLE.
        """
        self._closed.add(self.channel)
        retiring, self._retiring = dict(self._retiring), {}
        cut = False
        try:
            await _ChannelInUse(self.channel, self.stubs.streams, self.running).close(grace)
        except asyncio.CancelledError:
            cut = True  # cancelled itself (a pool closing): the replaced channels are cut at once too
            raise
        finally:
            await _finish_or_cut(retiring, 0 if cut else grace or 0)

    def __await__(self) -> Generator[Any, None, "Connection"]:
        """``await replicas.get_next_connection()``, Jina's form, gives the connection: shardnet's pick is
        synchronous, and its own callers take the connection without awaiting."""
        yield from ()
        return self

    def __repr__(self) -> str:
        return f"<Connection {self.address} failures={self.failures}>"


def _cause(code: grpc.StatusCode, timeout: Optional[float], callers_deadline: bool) -> str:
    """A failed call's cause as an ejection names it: its status code, and for DEADLINE_EXCEEDED whose deadline
    it was (the caller's own, or the pool's per-attempt timeout) and how long, so that an operator tells a slow
    replica (deadlines) from a dead or unreachable one (UNAVAILABLE)."""
    if code != grpc.StatusCode.DEADLINE_EXCEEDED or timeout is None:
        return code.name
    whose = "the caller's deadline" if callers_deadline else "the pool's attempt timeout"
    return f"{code.name} ({whose} of {timeout:.3g}s)"


class ReplicaList:
    """The connections to the replicas of one shard, with balancing and ejection.

    >>> replicas = ReplicaList()            # doctest: +SKIP
    >>> replicas.add_connection("127.0.0.1:50051")
    >>> replicas.get_next_connection()
    <Connection 127.0.0.1:50051 failures=0>
    >>> await replicas.get_next_connection(num_retries=3)  # Jina's form
    <Connection 127.0.0.1:50051 failures=0>
    """

    def __init__(
        self,
        balancer: Union[Balancer, str, None] = None,
        tls: Optional[ClientTls] = None,
        options: Optional[ChannelOptions] = None,
        ejection: Optional[EjectionPolicy] = EjectionPolicy(),
        name: str = "",
        logger: Optional[logging.Logger] = None,
        request_streams: bool = False,
    ):
        if isinstance(balancer, str):  # a name, as the pool takes it
            balancer = make_balancer(balancer)
        methods = ("pick", "started", "finished", "abandoned", "forget")
        if balancer is not None and not all(callable(getattr(balancer, method, None)) for method in methods):
            raise ConfigurationError(
                f"balancer must be a balancer name or object (pick, started, finished, abandoned, forget), got "
                f"{balancer!r}"
            )
        self.balancer = balancer if balancer is not None else RoundRobin()
        self.name = name
        self._logger = logger if logger is not None else module_logger
        self._tls = tls
        self._options = checked_options(options)
        self._ejection = ejection
        self._request_streams = request_streams  # single requests to shardnet workers go on shared streams
        self._connections: dict[str, Connection] = {}
        self._eligible: list[Connection] = []  # picked from; swap-removal keeps it O(1)
        self._position: dict[Connection, int] = {}
        self._probes: dict[Connection, asyncio.Task] = {}
        # the pickable replicas with a run of callers' short deadlines missed, their others' answers counted
        self._lagging: dict[Connection, _Lagging] = {}
        self._leaving: dict[asyncio.Task, Connection] = {}  # removed connections closing once their calls end
        # the last replica to leave, while none has come since; whether a call finding none said so
        self._emptied: Optional[Address] = None
        self._said_empty = False

    # -- membership --------------------------------------------------------

    def add_connection(self, address: str, deployment_name: Optional[str] = None) -> Connection:
        """Open a channel to ``address`` unless one is already there; return the connection. A list given TLS
        material dials every replica over TLS (a bare ``host:port`` too; a ``unix:`` socket, plaintext, is
        refused), as the one-off helpers given it do. ``deployment_name``, Jina's argument, names the replica
        in its errors when the list has no name of its own."""
        parsed = parse_address(address, tls=self._tls is not None)
        existing = self._connections.get(parsed.target)
        if existing is not None:
            # a scheme the caller wrote that contradicts the replica's: keeping either would silently drop what
            # was asked (a bare host:port, as an ACTIVATE names a worker, asks nothing: the replica is as it is)
            if existing.address.tls != parsed.tls and "://" in address:
                raise ConfigurationError(
                    f"{self.name or 'replica list'}: {address!r} is already a replica dialled "
                    f"{'with' if existing.address.tls else 'without'} TLS as {str(existing.address)!r}; "
                    "remove it first to change how it is dialled"
                )
            return existing
        connection = Connection(
            parsed, tls=self._tls, options=self._options, owner=self.name or deployment_name or "",
            request_streams=self._request_streams,
        )
        self._connections[parsed.target] = connection
        self._admit(connection)
        return connection

    async def remove_connection(self, address: str, *, grace: Optional[float] = None) -> Optional[Connection]:
        """Close and forget the connection to ``address``; return it, or None when it was not there.

        ``grace``: how long the calls already on it may go on before they are cut (UNAVAILABLE, which fails
        over): None, as long as they last (``RETIRED_CHANNEL_GRACE``), for a replica that leaves alive
        (DEACTIVATE, a drain); a replica presumed dead or cut off (its lease lapsed) gets little or none, or what
        it holds waits for keepalive.
        """
        target = parse_address(address).target
        if grace is not None:
            check_seconds(grace, "grace", zero=True)
        connection = self._connections.pop(target, None)
        if connection is None:
            return None
        self._withdraw(connection)
        probe = self._probes.pop(connection, None)
        if probe is not None:
            probe.cancel()
        self.balancer.forget(connection)
        # calls already on it still get their answers (a draining worker gives them); the channel closes after
        grace = RETIRED_CHANNEL_GRACE if grace is None else grace
        closing = asyncio.get_running_loop().create_task(connection.close(grace=grace))
        self._leaving[closing] = connection
        closing.add_done_callback(self._leaving.pop)
        # the close starts before the caller removes another: grpc.aio's close walks every task of the loop, and
        # thousands of closes started at once walked each other (one DEACTIVATE of 4000 stalled a head for 25 s)
        await asyncio.sleep(0)
        return connection

    async def reset_connection(self, address: str, deployment_name: Optional[str] = None) -> Optional[Connection]:
        """Jina's ``reset_connection``: give the replica at ``address`` a fresh channel, as a run of failures
        does (calls on the old one finish there); return its connection, or None, doing nothing as Jina's does,
        when it is not here. ``deployment_name`` is taken for Jina's signature: the replica keeps its name. TLS
        files that cannot be read now raise ConfigurationError, the channel left as it was."""
        connection = self._connections.get(parse_address(address).target)
        if connection is None:
            return None
        connection.rebuild()
        return connection

    def dial_with(self, tls: ClientTls) -> None:
        """Make every channel opened from now on (a replica added, a channel rebuilt) with ``tls``."""
        self._tls = tls
        for connection in self._connections.values():
            connection.dial_with(tls)

    async def renew_channels(self, tls: ClientTls) -> int:
        """Dial every replica with ``tls`` from now on (renewed client material): each TLS replica gets a new
        channel, and calls on the old channels finish there. Returns how many were renewed."""
        self.dial_with(tls)
        renewed = 0
        for connection in list(self._connections.values()):
            if connection.address.tls and self._connections.get(connection.address.target) is connection:
                connection.rebuild()
                renewed += 1
                await asyncio.sleep(0)  # one close started per loop pass (see remove_connection)
        return renewed

    def has_connection(self, address: str) -> bool:
        """True when ``address`` is one of this list's replicas, ejected or not."""
        return parse_address(address).target in self._connections

    def has_connections(self) -> bool:
        """True when the list holds any replica, ejected or not."""
        return bool(self._connections)

    def has_closing_channels(self) -> bool:
        """True while channels of replicas removed from the list still close, their calls finishing."""
        return bool(self._leaving)

    def get_all_connections(self) -> list[Connection]:
        """Every replica, ejected ones included."""
        return list(self._connections.values())

    @property
    def addresses(self) -> list[str]:
        return [str(connection.address) for connection in self._connections.values()]

    @property
    def ejected_addresses(self) -> list[str]:
        """The replicas ejected for repeated failures, not picked until a health probe lets them back in."""
        connections = self._connections.values()
        return [str(connection.address) for connection in connections if connection not in self._position]

    def __len__(self) -> int:
        return len(self._connections)

    # -- picking -----------------------------------------------------------

    def get_next_connection(self, num_retries: Optional[int] = None) -> Optional[Connection]:
        """The replica the balancer chooses among those not ejected; None when the list is empty. Jina's
        ``await replicas.get_next_connection(num_retries=3)`` works too (a Connection awaited gives itself);
        given ``num_retries``, as Jina's callers give it, an empty list raises RoutingError as Jina's raises
        (there is nothing to wait for: no replica is ever half-reset here, which Jina's retries wait out)."""
        if not self._eligible:
            if num_retries is not None:
                raise RoutingError(f"{self.name or 'replica list'}: no replica to pick; add one with add_connection")
            return None
        return self.balancer.pick(self._eligible)

    def is_eligible(self, connection: Connection) -> bool:
        """Whether picks may choose ``connection``: in this list and not ejected."""
        return connection in self._position

    def eligible(self) -> Sequence[Connection]:
        """The replicas a pick may choose from: all but the ejected (a live view, do not modify)."""
        return self._eligible

    def _admit(self, connection: Connection) -> None:
        if connection not in self._position:
            if self._emptied is not None:
                self._refilled(connection)
            self._position[connection] = len(self._eligible)
            self._eligible.append(connection)
            connection.admitted_at = time.monotonic()
            connection.draining = False

    def _withdraw(self, connection: Connection) -> None:
        index = self._position.pop(connection, None)
        if index is None:
            return
        if connection in self._lagging:  # out of the picks, its runs are over (its check cut): afresh when back
            self._end_runs(connection)
        last = self._eligible.pop()
        if last is not connection:
            self._eligible[index] = last
            self._position[last] = index
        if not self._eligible and self._probes:  # the last pickable replica left: the ejected are all there is
            self._readmit_ejected()
        if not self._eligible:
            self._emptied = connection.address  # the one place a replica leaves the picks (an ejection or a drain
            # never takes the last one): a removal, DEACTIVATE, a lapsed lease, discovery

    def nothing_to_pick(self) -> None:
        """A call found no replica to pick: warn once, when its last replica was removed, that every request
        fails until one comes (the log must say so by shard, not leave it to a count of failures). Said at the
        first call that fails, not at the removal: a list emptied on its way to being forgotten (a shard no
        --shards declares, a deployment gone from a namespace) gets no call, and is no fault."""
        if self._emptied is not None and not self._said_empty:
            self._said_empty = True
            self._logger.warning(
                "%s: no replica left: %s was the last (removed); requests for it fail until a replica is added",
                self.name or "replica list", self._emptied,
            )

    def _refilled(self, connection: Connection) -> None:
        """The list has a replica again, ``connection``: said when its emptiness was."""
        if self._said_empty:
            self._logger.info("%s: has a replica again: %s", self.name or "replica list", connection.address)
        self._emptied, self._said_empty = None, False

    def _readmit_ejected(self) -> None:
        """Let every ejected replica back in at once (their probes stop): a shard with replicas is never left
        with none to pick while it waits for a probe's timer."""
        probes, self._probes = self._probes, {}
        for connection, probe in probes.items():
            probe.cancel()
            self._admit(connection)
            self._logger.info("%s: replica %s let back in early: no other is left", self.name, connection.address)

    # -- outcomes ----------------------------------------------------------

    def record_failure(
        self, connection: Connection, code: grpc.StatusCode, counted: bool = False, cause: Optional[str] = None
    ) -> None:
        """Count a transport failure (one of the policy's codes, or any when ``counted``); rebuild the channel
        and eject the replica when they pile up. The last pickable replica is not ejected: the ejected ones are
        checked at once instead (one may have come back while its probe waits), and the first healthy is let in.
        ``cause``: the failure as an ejection names it (its code, and whose deadline ran out), else the code."""
        policy = self._ejection
        if policy is None or (code not in policy.failure_codes and not counted):
            return
        connection.failures += 1
        recent = connection.recent_failures
        recent.append(cause or code.name)
        del recent[:-policy.consecutive_failures]  # the run an ejection names, no more
        if connection.failures < policy.consecutive_failures:
            return
        connection.failures = 0
        # a run of timeouts rebuilds at most once per interval: under overload every call may time out, and
        # rebuilds (each old channel's close walks every task of the loop) would slow the loop down ever more;
        # a run ending UNAVAILABLE always does, as a fresh channel reconnects without the old one's backoff
        now = asyncio.get_running_loop().time()
        if code == grpc.StatusCode.UNAVAILABLE or now - connection.rebuilt_at >= policy.min_rebuild_interval:
            self._rebuild(connection)
        if len(self._eligible) > 1 and connection in self._position:
            self._eject(connection)
        elif connection in self._position:  # the last one pickable
            now = time.monotonic()
            for ejected in list(self._probes):
                if now - ejected.checked_at >= OUT_OF_TURN_CHECKS_EVERY:
                    self._check_now(ejected)

    def _rebuild(self, connection: Connection) -> None:
        """Give ``connection`` a fresh channel. When the TLS files a new channel reads
        cannot be read now (a rotation that deletes and rewrites them, a file moved away), the replica keeps the
        channel it has, which a warning says: the failover or health check that asked for the rebuild must not
        fail on it. The next rebuild reads the files again."""
        try:
            connection.rebuild()
        except ConfigurationError as exc:
            self._logger.warning(
                "%s: replica %s keeps its current channel, as a new one cannot be made: %s",
                self.name or "replica list", connection.address, exc,
            )

    def _set_aside_draining(self, connection: Connection) -> bool:
        """Pick ``connection`` no more, from its first refusal as it drains, until its health check says SERVING
        (its next process on the address), probed as an ejected replica is, though the drain counts as no
        ejection: it would otherwise take its turn of calls, each refused and sent again, for as long as its
        calls in flight last (their answers keep its failures from adding up), and a draining head waits for its
        callers to stop sending. The calls on it go on. Not the last pickable replica (its refusals are then
        failures, and have the set-aside ones checked), nor without an ejection policy. True when it is out of
        the picks, set aside now or before (a refusal of a call sent before the first one's: nothing to count)."""
        if connection not in self._position:
            return True
        if self._ejection is None or len(self._eligible) < 2:
            return False
        self._withdraw(connection)
        self.balancer.forget(connection)
        connection.failures = 0
        connection.draining = True
        self._start_probe(connection)
        self._logger.info("%s: replica %s is draining: not picked until it serves again", self.name, connection.address)
        return True

    def _too_short(self, callers_timeout: Optional[float]) -> bool:
        """True when a caller's deadline was too short to blame the replica for missing it."""
        policy = self._ejection
        return policy is None or callers_timeout is None or callers_timeout < policy.min_blamed_deadline

    def _missed_short(
        self,
        connection: Connection,
        method: str,
        metadata: Optional[Sequence[tuple[str, str]]],
        callers_timeout: Optional[float],
    ) -> None:
        """``connection`` missed a caller's deadline too short to blame it for (``_too_short``): one more of its
        runs, on this kind of call and on any, blamed after all as the shard's other replicas answer (``_answered``)."""
        policy = self._ejection
        if policy is None or callers_timeout is None or grpc.StatusCode.DEADLINE_EXCEEDED not in policy.failure_codes:
            return
        lagging = self._lagging.get(connection)
        if lagging is None:
            lagging = self._lagging[connection] = _Lagging()
        lagging.missed(_call_kind(method, metadata), callers_timeout)

    def _answered(
        self,
        connection: Connection,
        method: str,
        metadata: Optional[Sequence[tuple[str, str]]],
        timeout: Optional[float],
    ) -> None:
        """A call on ``connection`` with ``timeout`` was answered while replicas miss callers' short deadlines:
        its own runs are over, and it counts for every other's whose deadlines were no shorter
        (``SAME_DEADLINE_SLACK``). One the others have answered as many calls of a kind (method and endpoint) as
        it missed of that kind is the outlier, hung or stuck, and blamed at once for that kind's run. One they
        answered as many calls of any kind as it missed in all is hung, or merely busy on slow calls (round robin
        sends a caller alternating a slow endpoint and a quick one every slow call to one replica, every quick
        one to the other): the calls cannot tell the two apart, so its health service is asked
        (``_check_lagging``), one check at a time per replica."""
        if connection in self._lagging:
            self._end_runs(connection)
        if timeout is None:  # no deadline: no answer within one as short as theirs
            return
        kind = _call_kind(method, metadata)
        for replica, lagging in list(self._lagging.items()):
            run = lagging.kinds.get(kind)
            if run is not None and run.met(timeout):
                self._blame_kind(replica, lagging, kind, run)
            elif lagging.total.met(timeout) and lagging.check is None:
                check = self._check_lagging(replica, lagging)
                lagging.check = asyncio.get_running_loop().create_task(check, name=_LAGGING_CHECK)

    def _blame_kind(
        self, connection: Connection, lagging: _Lagging, kind: tuple[str, Optional[str]], run: _ShortRun
    ) -> None:
        """Blame ``connection`` for its run of misses on ``kind``, which the others answered: its misses leave
        its run on any kind, and its ejection names the endpoint and the deadlines."""
        del lagging.kinds[kind]
        lagging.total.misses = max(0, lagging.total.misses - run.misses)
        if not lagging.kinds and not lagging.total.misses:
            self._end_runs(connection)
        on = f"on {kind[1]:.80}" if kind[1] is not None else f"on {kind[0]} calls naming no endpoint"
        cause = (
            f"DEADLINE_EXCEEDED (callers' deadlines up to {run.deadline:.3g}s {on}, while the other replicas "
            "answered it)"
        )
        self._blame(connection, run.misses, cause)

    def _blame(self, connection: Connection, misses: int, cause: str) -> None:
        """Record ``misses`` failures of ``connection`` for a run of callers' short deadlines, until it is ejected."""
        for _ in range(misses):
            self.record_failure(connection, grpc.StatusCode.DEADLINE_EXCEEDED, cause=cause)
            if connection not in self._position:  # ejected: what is left of the run goes with it
                break

    async def _check_lagging(self, connection: Connection, lagging: _Lagging) -> None:
        """Ask ``connection``, whose misses on any kind of call the others met, for its health over its channel
        within ``HEALTH_TIMEOUT``. SERVING, it is busy on slow calls, not hung: its run on any kind ends unblamed
        (its runs by kind go on). Its channel replaced under the check (renewed or rebuilt) says nothing: the run
        stays, and a later answer asks again. NOT_SERVING or refusing as it drains, it is going away: set aside
        as draining (the last pickable one is blamed, as its refusals are). Not answering in time, or any other
        problem: blamed for the run (failures towards ``consecutive_failures``), its ejection naming the
        deadlines and what the check found."""
        channel = connection.channel
        try:
            problem = await connection.problem(HEALTH_TIMEOUT)
        finally:
            lagging.check = None
        if self._lagging.get(connection) is not lagging:  # its runs ended meanwhile (it answered, left the picks)
            return
        if problem is not None and channel is not connection.channel:  # inconclusive: asked over a closed channel
            return
        run = lagging.total
        if problem is None:  # busy, not hung: its runs by kind go on
            lagging.total = _ShortRun()
            if not lagging.kinds:
                self._end_runs(connection)
            return
        self._end_runs(connection)  # every miss it has is answered for now, its runs by kind too
        if problem.draining and self._set_aside_draining(connection):
            return
        cause = (
            f"DEADLINE_EXCEEDED (callers' deadlines up to {run.deadline:.3g}s, while the other replicas answered; "
            f"its health check: {problem})"
        )
        self._blame(connection, run.misses, cause)

    def _end_runs(self, connection: Connection) -> None:
        """Forget ``connection``'s runs of callers' short deadlines missed, and stop its health check."""
        lagging = self._lagging.pop(connection)
        if lagging.check is not None:
            lagging.check.cancel()

    def _eject(self, connection: Connection) -> None:
        self._withdraw(connection)
        self.balancer.forget(connection)  # its failures' estimate must not seed the replicas added meanwhile
        if time.monotonic() - connection.admitted_at >= self._ejection.max_ejection:
            connection.times_ejected = 0  # healthy for as long as the longest ejection: an old blip is forgotten
        connection.times_ejected += 1
        delay = self._start_probe(connection)
        run = connection.recent_failures
        if len(run) == 1:  # EjectionPolicy(consecutive_failures=1): no run to count
            failures = f"1 failure: {run[0]}"
        else:
            causes = ", ".join(f"{cause} x{run.count(cause)}" for cause in dict.fromkeys(run))
            failures = f"{len(run)} failures in a row: {causes}"
        self._logger.warning(
            "%s: ejecting replica %s for %.1fs after %s", self.name, connection.address, delay, failures
        )

    def _start_probe(self, connection: Connection) -> float:
        """Have ``connection`` health-checked on its schedule (``_probe_schedule``) until it serves; the first wait."""
        delay, longest = self._probe_schedule(connection)
        self._probes[connection] = asyncio.get_running_loop().create_task(
            self._probe_until_healthy(connection, delay, longest)
        )
        return delay

    def _probe_schedule(self, connection: Connection) -> tuple[float, float]:
        """The first wait and the longest of ``connection``'s health checks while out of the picks: its ejection's
        back-off, or, set aside as it drains, at most a second apart whoever started them (its probe, or an out
        of turn check that found it not serving yet and handed over to a new probe)."""
        if connection.draining:
            longest = min(DRAINING_CHECKS_EVERY, self._ejection.max_ejection)
            return min(self._ejection.base_ejection, longest), longest
        return self._ejection.ejection_time(connection.times_ejected), self._ejection.max_ejection

    async def _probe_until_healthy(self, connection: Connection, delay: float, longest: float) -> None:
        """Check ``connection``'s health after ``delay``, then at doubling intervals up to ``longest``, until it
        serves. A channel gRPC holds in reconnect back-off (up to two minutes) is replaced first: it would fail
        the check at once, though the replica is back."""
        try:
            while True:
                await asyncio.sleep(delay)
                if self._connections.get(connection.address.target) is not connection:
                    return
                if connection.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    self._rebuild(connection)
                if await connection.health():
                    self._back_in(connection, "is healthy again")
                    return
                if not self._eligible:  # nothing else left: better a doubtful replica than none
                    self._admit(connection)
                    return
                delay = min(longest, delay * 2)
        finally:
            if self._probes.get(connection) is asyncio.current_task():  # not a newer probe of the same replica
                del self._probes[connection]

    def _back_in(self, connection: Connection, why: str) -> None:
        """Let an ejected replica that answers its health check back into the picks, its past forgotten (its
        failures' penalty would keep the balancer from it for many seconds)."""
        self._admit(connection)
        self.balancer.forget(connection)
        self._logger.info("%s: replica %s %s", self.name, connection.address, why)

    def readmit_if_healthy(self, address: str) -> bool:
        """Check an ejected replica's health now, in the background, and let it back in on SERVING rather than
        when its ejection (up to ``EjectionPolicy.max_ejection``) runs out: for a replica known to have started
        again on its address (a head hears it from an ACTIVATE naming a new worker process), whose predecessor
        earned the ejection. The check takes the place of the pending probe, which starts over if the replica is
        not healthy yet.

        True when a check was started; False, doing nothing, when ``address`` is not ejected here or a check is
        under way."""
        connection = self._connections.get(parse_address(address).target)
        if connection is None:
            return False
        return self._check_now(connection)

    def _check_now(self, connection: Connection) -> bool:
        """``readmit_if_healthy`` for a connection of this list."""
        if connection in self._position:
            return False
        probe = self._probes.get(connection)
        if probe is not None and probe.get_name() == _READMISSION:
            return False
        if probe is not None:
            probe.cancel()  # its finally leaves the entry alone once it is ours
        connection.checked_at = time.monotonic()
        self._probes[connection] = asyncio.get_running_loop().create_task(self._readmit(connection), name=_READMISSION)
        return True

    async def _readmit(self, connection: Connection) -> None:
        """``readmit_if_healthy``'s check: admit ``connection`` if it serves, else probe on as after an ejection."""
        try:
            if connection.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # the old channel waits out its reconnect backoff (up to minutes); a new one dials now
                self._rebuild(connection)
            healthy = await connection.health()
            if self._connections.get(connection.address.target) is not connection or connection in self._position:
                return
            if healthy:
                self._back_in(connection, "answers its health check again: back in rotation")
                return
            # probed on as after its ejection, by a probe another check may take the place of (this one, while it
            # waits out its back-off, would keep any from starting)
            self._start_probe(connection)
        finally:
            if self._probes.get(connection) is asyncio.current_task():
                del self._probes[connection]

    # -- calls ---------------------------------------------------------------

    async def call(
        self,
        connection: Connection,
        method: str,
        payload: Any,
        metadata: Optional[Sequence[tuple[str, str]]],
        timeout: Optional[float],
        *,
        callers_deadline: bool = False,
    ) -> tuple[Any, Any]:
        """Call ``method`` (a Stubs field) on ``connection``; return (response, trailing metadata).

        Outcomes feed the balancer and the failure counts; gRPC errors propagate unchanged.
        ``callers_deadline``: ``timeout`` is what the caller had left, so its
        expiry counts towards ejection only when it was long (``EjectionPolicy.min_blamed_deadline``),
        or once the shard's other replicas answered as many calls within deadlines as short and its
        health check then fails (it is hung, not busy on slow calls).
        A call cut because its channel was closed under it (the replica removed
        or its channel rebuilt while the call outlived the grace, or the list
        closed) raises UNAVAILABLE naming the replica rather than a
        CancelledError the caller would take for its own.
        """
        connection.check_loop()  # before gRPC queues a call on a loop that will not run it
        balancer = self.balancer
        token = balancer.started(connection)
        channel = connection.channel
        running = connection.running  # the channel's: a close waits for it
        running.count += 1
        try:
            call = getattr(connection.stubs, method)(payload, metadata=metadata, timeout=timeout)
            response = checked_reply(await call, connection.address, self.name, timed=timeout is not None)
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as error:
            # a caller's own deadline, too short to say anything of the replica, is no failure of it, but no
            # answer either: given up on, as a cancelled call is (its estimate rises to the time waited, and a
            # hung replica's probes back off however short its callers' deadlines)
            code = error.code()
            blamed = not (callers_deadline and code == grpc.StatusCode.DEADLINE_EXCEEDED and self._too_short(timeout))
            if blamed:
                balancer.finished(connection, token, failed=code not in CALLERS_FAULT)
            else:
                balancer.abandoned(connection, token)
            # a call on a channel already replaced tells nothing new: the failures that replaced it were counted
            # (a worker dying under many calls would otherwise rebuild its channel once per three of them)
            # nor does a call on a replica already removed (its cut calls would rebuild a channel no one closes)
            listed = self._connections.get(connection.address.target) is connection
            # a refusal as it drains is no failure of the replica: it is going away, and said so
            set_aside = listed and refused_as_draining(error) and self._set_aside_draining(connection)
            if blamed and channel is connection.channel and listed and not set_aside:
                cause = _cause(code, timeout, callers_deadline)
                self.record_failure(connection, code, counted=wrong_server(method, code), cause=cause)
            elif not blamed and channel is connection.channel and connection in self._position:
                self._missed_short(connection, method, metadata, timeout)
            raise
        except asyncio.CancelledError:
            if connection.cut_by_close(channel):
                balancer.finished(connection, token, failed=True)
                raise rpc_error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the channel to replica {connection.address} was closed with this call still on it "
                    "(the replica was removed, its channel rebuilt, or the pool closed)",
                ) from None
            balancer.abandoned(connection, token)  # its caller gave up: no failure of the replica
            raise
        except RuntimeError as error:
            balancer.finished(connection, token, failed=True)
            if any(words in str(error) for words in _OTHER_LOOP):
                raise connection.other_loop_error() from None
            raise
        except BaseException:
            balancer.finished(connection, token, failed=True)
            raise
        finally:
            running.end()
        balancer.finished(connection, token)
        connection.failures = 0
        if self._lagging:  # some replica misses callers' short deadlines: does this answer make it the outlier?
            self._answered(connection, method, metadata, timeout)
        return response, trailing

    async def close(self) -> None:
        """Close every channel and stop every health probe; calls still running get half a second together,
        then are cut. Cancelled (a caller's own deadline on closing), it cuts them at once, and a later close
        finds whatever it had not reached yet."""
        for probe in list(self._probes.values()):
            probe.cancel()
        self._probes.clear()
        checks = [lagging.check for lagging in self._lagging.values() if lagging.check is not None]
        for check in checks:
            check.cancel()
        self._lagging.clear()
        if checks:  # ended before the channels they ask over close: no task outlives the list
            await asyncio.wait(checks)
        closed: set[Connection] = set()
        while True:  # until no replica was added (a watch, an ACTIVATE) while the closes ran
            self._eligible.clear()  # no pick, failover included, lands on a closing channel
            self._position.clear()
            connections = [connection for connection in self._connections.values() if connection not in closed]
            leaving, self._leaving = dict(self._leaving), {}
            if not connections and not leaving:
                break
            await asyncio.gather(
                close_in_turn(connection.close(grace=0.5) for connection in connections),
                _finish_or_cut(leaving, 0.5),
            )
            closed.update(connections)
        for connection in self._connections.values():
            self.balancer.forget(connection)
        self._connections.clear()

    def __repr__(self) -> str:
        ejected = len(self._connections) - len(self._eligible)
        return f"<ReplicaList {self.name or ''} {len(self._connections)} replicas, {ejected} ejected>"
