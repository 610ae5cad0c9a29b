"""``ReplicaList``: the replicas of one shard (or one head): who is in, who is picked, who is out and why.

The list owns its connections: it adds and removes them, picks the next replica through its balancer, counts
consecutive failures, rebuilds a channel that keeps failing, and ejects a failing replica for a while (never the
last one), health-probing it until it serves again; a replica refusing calls as it drains is set aside the same
way. Adding, removing and picking are O(1) whatever the number of replicas. Two ideas it uses live apart: a
replica's channel, from opening to closing, in ``connection`` (``Connection``), and the outlier detection of
replicas missing callers' short deadlines their peers meet in ``outliers`` (``ShortDeadlineOutliers``, one per
list, which calls back into the list to blame a replica or set it aside).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional, Sequence, Union

import grpc
import grpc.aio

from shardnet.errors import ConfigurationError, RoutingError
from shardnet.networking.addresses import Address, parse_address
from shardnet.networking.balancing import Balancer, RoundRobin, make_balancer
from shardnet.networking.channels import (
    ChannelOptions,
    checked_options,
    checked_reply,
    error_cause,
    never_connected_note,
    refused_as_draining,
    replica_tls_diagnosis,
)
from shardnet.networking.connection import (
    OTHER_LOOP,
    RETIRED_CHANNEL_GRACE,
    Connection,
    close_in_turn,
    finish_or_cut,
)
from shardnet.networking.health import HealthProblem
from shardnet.networking.outliers import ShortDeadlineOutliers
from shardnet.networking.streams import rpc_error
from shardnet.networking.policies import EjectionPolicy, check_seconds
from shardnet.networking.tls import ClientTls
from shardnet.protocol import services

module_logger = logging.getLogger(__name__)

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
# seconds a replica set aside as it drained may have no process at its address (the drain ended, the next process
# not listening yet: a restart, an Executor loading its model) and still be 'draining', not ejected: a planned
# restart is no failure, and an alert on the ejected gauge must not fire on every rolling update
DRAINED_RESTART_GRACE = 30.0


MAX_SAID_CHARS = 300  # of what gRPC said of a replica's latest failure, quoted by its ejection
# seconds past its deadline a timed call's failure may be seen and still be held against its replica: gRPC ends a
# timed call by its deadline, so one seen later than this was read late by this process, which stalled (SIGSTOP, a
# VM paused, a long GC, a blocked loop): every call in flight then fails at once, the replicas' answers unread or
# their connections cut by their keepalive, and a head or pool ejected its healthy replicas for its own stall
LOCAL_STALL_SLACK = 1.0
# seconds between the lines saying that failures seen after this process stalled were not held against replicas
STALL_LOG_INTERVAL = 60.0


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
        # the pickable replicas' runs of callers' short deadlines missed, judged by the others' answers
        self._outliers = ShortDeadlineOutliers(ejection, blame=self._blame, set_aside=self._set_aside_draining)
        self._leaving: dict[asyncio.Task, Connection] = {}  # removed connections closing once their calls end
        # the last replica to leave, while none has come since; whether a call finding none said so
        self._emptied: Optional[Address] = None
        self._said_empty = False
        self._stall_said_at = float("-inf")  # time.monotonic() of the last line saying this process stalled
        # for the metrics (read at scrape time): ejections so far, and failed calls held against no replica
        self.ejections = 0
        self.unblamed = {"stalled": 0, "queued": 0}

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
            if existing.loop is not None and existing.loop.is_closed() and asyncio._get_running_loop() is not None:
                # added again from a later event loop (one asyncio.run per batch): its channel, of a loop closed
                # since, would fail every call with an error asking for what the caller just did
                self._rebuild(existing)
                stale = self._probes.get(existing)
                if stale is not None and stale.get_loop().is_closed():
                    # that loop was closed without cancelling its tasks (run_until_complete, then close()): the
                    # probe left pending there never runs again
                    del self._probes[existing]
                if existing not in self._position and existing not in self._probes:
                    # ejected then: its probe was cancelled as that loop ended, and none would ever check it again
                    self._start_probe(existing)
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
            _cancel(probe)
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

    def lists(self, connection: Connection) -> bool:
        """Whether ``connection`` itself (not merely one at its address, added again since) is one of this list's
        replicas, ejected or not."""
        return self._connections.get(connection.address.target) is connection

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

    @property
    def held_by_removed(self) -> int:
        """Calls still under way on replicas removed from the list (a lapsed lease under --at-most-once, a
        DEACTIVATE's grace): they wait for those replicas, their deadline or keepalive."""
        return sum(connection.running.count for connection in self._leaving.values())

    @property
    def draining_addresses(self) -> list[str]:
        """Those of ``ejected_addresses`` set aside as they drain (their own refusal or health said so): no failure
        of theirs, checked every second until they serve again."""
        connections = self._connections.values()
        return [str(c.address) for c in connections if c not in self._position and c.draining]

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
            connection.gone_since = None

    def _withdraw(self, connection: Connection) -> None:
        index = self._position.pop(connection, None)
        if index is None:
            return
        self._outliers.end_runs(connection)  # out of the picks, its runs are over (its check cut): afresh when back
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
            _cancel(probe)
            self._admit(connection)
            self._logger.info("%s: replica %s let back in early: no other is left", self.name, connection.address)

    # -- outcomes ----------------------------------------------------------

    def record_failure(
        self, connection: Connection, code: grpc.StatusCode, counted: bool = False, cause: Optional[str] = None,
        said: str = "",
    ) -> None:
        """Count a transport failure (one of the policy's codes, or any when ``counted``); rebuild the channel
        and eject the replica when they pile up. The last pickable replica is not ejected: the ejected ones are
        checked at once instead (one may have come back while its probe waits), and the first healthy is let in.
        ``cause``: the failure as an ejection names it (its code, and whose deadline ran out), else the code;
        ``said``: gRPC's words on it, the latest of which an ejection quotes."""
        policy = self._ejection
        if policy is None or (code not in policy.failure_codes and not counted):
            return
        connection.failures += 1
        connection.last_failure = said
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

    def _stalled(self, connection: Connection, code: grpc.StatusCode, took: float, timeout: float) -> bool:
        """Whether a timed call failing with ``code`` after ``took`` seconds was seen more than LOCAL_STALL_SLACK
        past its ``timeout``: this process stalled meanwhile (said at most once a STALL_LOG_INTERVAL)."""
        if took <= timeout + LOCAL_STALL_SLACK:
            return False
        now = time.monotonic()
        if now - self._stall_said_at >= STALL_LOG_INTERVAL:
            self._stall_said_at = now
            self._logger.warning(
                "%s: a call to replica %s given %.3gs ended %s only after %.1fs: this process stalled (paused, a "
                "blocked event loop, CPU starvation), so the failures of calls in flight meanwhile are not held "
                "against the replicas", self.name, connection.address, timeout, code.name, took,
            )
        return True

    def _too_short(self, callers_timeout: Optional[float]) -> bool:
        """True when a caller's deadline was too short to blame the replica for missing it."""
        policy = self._ejection
        return policy is None or callers_timeout is None or callers_timeout < policy.min_blamed_deadline

    def _blame(self, connection: Connection, misses: int, cause: str) -> None:
        """Record ``misses`` failures of ``connection`` for a run of callers' short deadlines, until it is ejected."""
        for _ in range(misses):
            self.record_failure(connection, grpc.StatusCode.DEADLINE_EXCEEDED, cause=cause)
            if connection not in self._position:  # ejected: what is left of the run goes with it
                break

    def _eject(self, connection: Connection) -> None:
        self._withdraw(connection)
        self.balancer.forget(connection)  # its failures' estimate must not seed the replicas added meanwhile
        self._count_ejection(connection)
        delay = self._start_probe(connection)
        run = connection.recent_failures
        if len(run) == 1:  # EjectionPolicy(consecutive_failures=1): no run to count
            failures = f"1 failure: {run[0]}"
        else:
            causes = ", ".join(f"{cause} x{run.count(cause)}" for cause in dict.fromkeys(run))
            failures = f"{len(run)} failures in a row: {causes}"
        if connection.last_failure:  # a bad certificate, a refused connection: why, not just UNAVAILABLE
            failures += f" (the last: {connection.last_failure[:MAX_SAID_CHARS]!r})"
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

    def _count_ejection(self, connection: Connection) -> None:
        """One more ejection of ``connection`` (its back-off's step) and of this list (the metrics')."""
        if time.monotonic() - connection.admitted_at >= self._ejection.max_ejection:
            connection.times_ejected = 0  # healthy for as long as the longest ejection: an old blip is forgotten
        connection.times_ejected += 1
        self.ejections += 1

    def _eject_drained(self, connection: Connection, problem: HealthProblem) -> float:
        """Eject ``connection``, set aside as it drained, whose address no process has served for
        DRAINED_RESTART_GRACE: counted and said as an ejection, probed on its back-off; the first wait."""
        gone = time.monotonic() - (connection.gone_since or time.monotonic())
        connection.draining = False
        connection.gone_since = None
        self._count_ejection(connection)
        delay = self._ejection.ejection_time(connection.times_ejected)
        self._logger.warning(
            "%s: ejecting replica %s, drained and not served at its address for %.0fs (its health check: %s); probed "
            "every %.1fs and more until it serves", self.name, connection.address, gone, problem, delay,
        )
        return delay

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
                problem = await connection.problem()
                if problem is None:
                    self._back_in(connection, "is healthy again")
                    return
                if connection.draining and not problem.draining:  # its drain ended, and no process serves yet
                    now = time.monotonic()
                    # since the first probe that found nothing listening, reset only by SERVING (_admit): a next
                    # process that says NOT_SERVING as it loads, then dies, again and again (a crash loop) never
                    # served, and starting the grace over at each NOT_SERVING kept it 'draining' for good
                    if connection.gone_since is None:
                        connection.gone_since = now
                    elif now - connection.gone_since >= DRAINED_RESTART_GRACE:  # no restart: down, for real
                        delay = self._eject_drained(connection, problem)
                        longest = self._ejection.max_ejection
                        continue
                if not self._eligible:  # nothing else left: better a doubtful replica than none
                    self._admit(connection)
                    return
                delay = min(longest, delay * 2)
        finally:
            # not a newer probe of the same replica; nor, closed with no loop running (a loop closed with it
            # pending, collected), a question current_task() would raise on
            if asyncio._get_running_loop() is not None and self._probes.get(connection) is asyncio.current_task():
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
            _cancel(probe)  # its finally leaves the entry alone once it is ours
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
            if asyncio._get_running_loop() is not None and self._probes.get(connection) is asyncio.current_task():
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
        cut = unsent = False
        loop = connection.loop or asyncio.get_running_loop()  # the running one: check_loop saw to it
        sent_at = loop.time()
        try:
            call = getattr(connection.counted_stubs, method)(payload, metadata=metadata, timeout=timeout)
            response = checked_reply(await call, connection.address, self.name, timed=timeout is not None)
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as error:
            # a caller's own deadline, too short to say anything of the replica, is no failure of it, but no
            # answer either: given up on, as a cancelled call is (its estimate rises to the time waited, and a
            # hung replica's probes back off however short its callers' deadlines)
            code = error.code()
            now = loop.time()
            timed_out = code == grpc.StatusCode.DEADLINE_EXCEEDED
            # seen well past its deadline: this process stalled, and the failure says nothing of the replica
            stalled = timeout is not None and self._stalled(connection, code, now - sent_at, timeout)
            callers = callers_deadline and timed_out and not stalled
            if callers:
                connection.missed_at = now
            # queued, not hung: it answered a call of this kind since this one was sent (outliers.answered_since);
            # the caller's deadline or the pool's attempt timeout alike (an attempt timeout still fails it over)
            queued = timed_out and self._outliers.answered_since(connection, method, metadata, sent_at)
            blamed = not (stalled or queued or (callers and self._too_short(timeout)))
            if stalled or queued:
                self.unblamed["stalled" if stalled else "queued"] += 1
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
                said = never_connected_note(channel) if code == grpc.StatusCode.DEADLINE_EXCEEDED else (
                    error_cause(error) + replica_tls_diagnosis(error, connection.address, connection.tls)
                )
                self.record_failure(connection, code, counted=wrong_server(method, code), cause=cause, said=said)
            elif not (blamed or stalled or queued) and channel is connection.channel and connection in self._position:
                self._outliers.missed(connection, method, metadata, timeout)
            # its traceback runs through gRPC's call object, which keeps its channel's connection (socket) open
            # after the channel closes, for as long as anyone keeps the error (a failed Task, a ReplicaError's
            # context): raised from here, the error says all a caller can use
            error.__traceback__ = None
            raise
        except asyncio.CancelledError:
            if not connection.cut_by_close(channel):
                balancer.abandoned(connection, token)  # its caller gave up: no failure of the replica
                raise
            balancer.finished(connection, token, failed=True)
            cut = True  # raised below, outside this handler: raised here, the error's context (the CancelledError
            # and its traceback through gRPC's call) would keep the call, and so its closed channel's socket, alive
        except grpc.aio.UsageError:
            if not connection.closed_here(channel):
                balancer.finished(connection, token, failed=True)
                raise
            # gRPC refused to make the call on the channel we closed (a request stream's BUSY refusal falling back
            # to a unary call as the replica's close ran): it never left this process, and goes elsewhere
            balancer.abandoned(connection, token)
            unsent = True  # raised below, outside this handler (as ``cut``)
        except RuntimeError as error:
            balancer.finished(connection, token, failed=True)
            if any(words in str(error) for words in OTHER_LOOP):
                raise connection.other_loop_error() from None
            raise
        except BaseException:
            balancer.finished(connection, token, failed=True)
            raise
        finally:
            running.end()
            # a failed call's traceback keeps this frame, and a grpc.aio call object alive keeps its closed
            # channel's connection (socket) open for as long as whoever holds the error keeps it
            call = None  # noqa: F841
        if unsent:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, services.CLOSED_UNSENT_DETAILS)
        if cut:
            raise rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the channel to replica {connection.address} was closed with this call still on it "
                "(the replica was removed, its channel rebuilt, or the pool closed)",
            )
        balancer.finished(connection, token)
        connection.failures = 0
        # noted for a later timeout's judgement; while some replica misses callers' short deadlines, does this
        # answer make it the outlier?
        self._outliers.answered(connection, method, metadata, timeout, sent_at, loop.time())
        return response, trailing

    async def close(self) -> None:
        """Close every channel and stop every health probe; calls still running get half a second together,
        then are cut. Cancelled (a caller's own deadline on closing), it cuts them at once, and a later close
        finds whatever it had not reached yet."""
        for probe in list(self._probes.values()):
            _cancel(probe)
        self._probes.clear()
        await self._outliers.close()  # its health checks end before the channels they ask over close
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
                finish_or_cut(leaving, 0.5),
            )
            closed.update(connections)
        for connection in self._connections.values():
            self.balancer.forget(connection)
        self._connections.clear()

    def __repr__(self) -> str:
        ejected = len(self._connections) - len(self._eligible)
        return f"<ReplicaList {self.name or ''} {len(self._connections)} replicas, {ejected} ejected>"


def _cancel(task: asyncio.Task) -> None:
    """Cancel ``task`` unless its event loop was closed (a pool kept across loops): it never runs again, and
    cancelling it would raise "Event loop is closed" out of the caller (a close() in the next loop)."""
    if not task.get_loop().is_closed():
        task.cancel()
