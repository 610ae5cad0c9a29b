"""Outlier detection: a replica missing callers' short deadlines that the shard's other replicas meet.

A caller's deadline shorter than ``EjectionPolicy.min_blamed_deadline`` says more about the caller than the
replica, so missing one is no failure by itself; missing it while the other replicas answer calls as short is
(Envoy judges a host against its cluster, not alone). ``ShortDeadlineOutliers`` keeps each pickable replica's runs
of such misses, by kind of call and on any kind, counts the others' answers against them, and blames the outlier,
or has its health checked first when the calls cannot tell a hung replica from a busy one. It is its own
bookkeeping, kept apart from ``replica_list``: the list owns one per list, tells it of misses and answers, and is
called back to blame a replica or set it aside as draining.

A replica's runs (ended by its next answer) are kept by kind of call (method and endpoint; the ``MAX_RUN_KINDS``
missed latest) and on any kind. Once the others answered as many calls of one kind, within deadlines no longer,
as it missed of that kind, the run is blamed at once: a hung, stuck or uniformly slow replica. Once they answered
as many of any kind as it missed in all, the calls cannot tell a hung replica from one busy on slow calls (round
robin sends a caller alternating /slow and /fast every /slow to one replica), so its health is asked, one check at
a time per replica, within ``HEALTH_TIMEOUT``: SERVING ends that run unblamed, draining sets the replica aside,
its channel closed under the check leaves the run to be asked again, anything else blames it. Left uncovered: a
stuck or slow replica whose health says SERVING, behind callers alternating endpoints in step with round robin.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional, Sequence

import grpc
import grpc.aio

from shardnet.networking.connection import HEALTH_TIMEOUT, Connection
from shardnet.networking.policies import EjectionPolicy
from shardnet.protocol import services

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
# a kind of call a replica never answered: (answered at, the latest send time of the calls of it answered)
_NEVER_ANSWERED = (float("-inf"), float("inf"))
# seconds past HEALTH_TIMEOUT after which a failed check was seen by a process that stalled meanwhile (paused, its
# loop blocked, starved of CPU): as for a call (replica_list.LOCAL_STALL_SLACK), it says nothing of the replica
CHECK_STALL_SLACK = 1.0


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
    metadata names (the last, as heads and workers read it; None for one sent in the request's header alone)."""
    if type(metadata) is grpc.aio.Metadata:  # the pool's (MetadataCache): one lookup, not its Python iteration
        endpoints = metadata.get_all(services.ENDPOINT_METADATA)
        return method, endpoints[-1] if endpoints else None
    endpoint = None
    for key, value in metadata or ():
        if key == services.ENDPOINT_METADATA:
            endpoint = value
    return method, endpoint


class ShortDeadlineOutliers:
    """The runs of callers' short deadlines one list's pickable replicas missed, judged by the others' answers.

    ``blame(connection, misses, cause)`` records a run's misses as failures of a replica (until it is ejected);
    ``set_aside(connection)`` takes one found draining out of the picks, True when it is out of them.
    """

    __slots__ = ("lagging", "_counted", "_blame", "_set_aside")

    def __init__(
        self,
        ejection: Optional[EjectionPolicy],
        blame: Callable[[Connection, int, str], None],
        set_aside: Callable[[Connection], bool],
    ) -> None:
        # the replicas with a run of callers' short deadlines missed, their others' answers counted; read by
        # ReplicaList.call on every answer (empty: nothing to judge)
        self.lagging: dict[Connection, _Lagging] = {}
        # whether a miss may be blamed at all: not without an ejection policy, nor one not counting deadlines
        self._counted = ejection is not None and grpc.StatusCode.DEADLINE_EXCEEDED in ejection.failure_codes
        self._blame = blame
        self._set_aside = set_aside

    def missed(
        self,
        connection: Connection,
        method: str,
        metadata: Optional[Sequence[tuple[str, str]]],
        callers_timeout: Optional[float],
    ) -> None:
        """``connection`` missed a caller's deadline too short to blame it for: one more of its runs, on this
        kind of call and on any, blamed after all as the shard's other replicas answer (``answered``)."""
        if not self._counted or callers_timeout is None:
            return
        lagging = self.lagging.get(connection)
        if lagging is None:
            lagging = self.lagging[connection] = _Lagging()
        lagging.missed(_call_kind(method, metadata), callers_timeout)

    @staticmethod
    def answered_since(
        connection: Connection, method: str, metadata: Optional[Sequence[tuple[str, str]]], sent_at: float
    ) -> bool:
        """Whether ``connection`` answered a call of this kind (method and endpoint) after loop time ``sent_at``:
        a call of that kind sent then whose caller's deadline ran out was queued behind the replica's work
        (overloaded, as its peers likely are), not lost to a hung or stuck replica: the miss is not its failure.
        Callers' long deadlines missed so counted as failures on their own, three in a row ejecting a replica
        answering all the while (an overload review, twice the capacity, 10 s deadlines: 4 to 6 ejections in
        30 s; none since)."""
        # (and no call of the kind sent after it was answered before it: a replica working through a queue answers
        # its calls in order, so one overtaken by a later call was not queued but stuck, as a handler hanging on
        # some requests while it serves the rest leaves them; such calls count against it, as they did before)
        answered_at, latest_sent = connection.answered_at.get(_call_kind(method, metadata), _NEVER_ANSWERED)
        return answered_at > sent_at and latest_sent < sent_at

    @staticmethod
    def _note_answer(connection: Connection, kind: tuple[str, Optional[str]], at: float, sent_at: float) -> None:
        """Record that ``connection`` answered a call of ``kind``, sent at loop time ``sent_at``, at ``at`` (see
        ``answered_since``)."""
        answered = connection.answered_at
        latest = answered.get(kind)
        if latest is None and len(answered) >= MAX_RUN_KINDS:  # (the kind seen first goes: a kind that
            del answered[next(iter(answered))]  # is answered often comes back at its next answer)
        answered[kind] = (at, sent_at if latest is None else max(latest[1], sent_at))

    def answered(
        self,
        connection: Connection,
        method: str,
        metadata: Optional[Sequence[tuple[str, str]]],
        timeout: Optional[float],
        sent_at: float,
        at: float,
    ) -> None:
        """A call on ``connection`` with ``timeout``, sent at loop time ``sent_at``, was answered at ``at``: noted
        for ``answered_since``. While replicas miss callers' short deadlines, its own runs are over, and it counts for every other's whose deadlines were no shorter
        (``SAME_DEADLINE_SLACK``). One the others have answered as many calls of a kind (method and endpoint) as
        it missed of that kind is the outlier, hung or stuck, and blamed at once for that kind's run. One they
        answered as many calls of any kind as it missed in all is hung, or merely busy on slow calls (round robin
        sends a caller alternating a slow endpoint and a quick one every slow call to one replica, every quick
        one to the other): the calls cannot tell the two apart, so its health service is asked
        (``_check``), one check at a time per replica."""
        kind = _call_kind(method, metadata)
        self._note_answer(connection, kind, at, sent_at)
        if not self.lagging:  # no replica misses callers' short deadlines: no answer makes one the outlier
            return
        self.end_runs(connection)
        if timeout is None:  # no deadline: no answer within one as short as theirs
            return
        if connection.missed_at >= sent_at:
            # it missed a caller's deadline itself while this call was under way (``sent_at``, loop time): it does
            # not meet the deadlines the others miss, it is as short of time as they are. Under an overload every
            # replica misses some deadlines and answers other calls, and its answers made its busy peers the
            # outliers: an overload review saw healthy replicas ejected in turn (20 times in 30 s at twice the
            # capacity, 1 s deadlines, up to 8 s each), the shard's capacity halved as it was overloaded
            return
        for replica, lagging in list(self.lagging.items()):
            run = lagging.kinds.get(kind)
            if run is not None and run.met(timeout):
                self._blame_kind(replica, lagging, kind, run)
            elif lagging.total.met(timeout) and (lagging.check is None or lagging.check.get_loop().is_closed()):
                check = self._check(replica, lagging)
                lagging.check = asyncio.get_running_loop().create_task(check, name=_LAGGING_CHECK)

    def _blame_kind(
        self, connection: Connection, lagging: _Lagging, kind: tuple[str, Optional[str]], run: _ShortRun
    ) -> None:
        """Blame ``connection`` for its run of misses on ``kind``, which the others answered: its misses leave
        its run on any kind, and its ejection names the endpoint and the deadlines."""
        del lagging.kinds[kind]
        lagging.total.misses = max(0, lagging.total.misses - run.misses)
        if not lagging.kinds and not lagging.total.misses:
            self.end_runs(connection)
        on = f"on {kind[1]:.80}" if kind[1] is not None else f"on {kind[0]} calls naming no endpoint"
        cause = (
            f"DEADLINE_EXCEEDED (callers' deadlines up to {run.deadline:.3g}s {on}, while the other replicas "
            "answered it)"
        )
        self._blame(connection, run.misses, cause)

    async def _check(self, connection: Connection, lagging: _Lagging) -> None:
        """Ask ``connection``, whose misses on any kind of call the others met, for its health over its channel
        within ``HEALTH_TIMEOUT``. SERVING, it is busy on slow calls, not hung: its run on any kind ends unblamed
        (its runs by kind go on). Its channel replaced under the check (renewed or rebuilt) says nothing: the run
        stays, and a later answer asks again. NOT_SERVING or refusing as it drains, it is going away: set aside
        as draining (the last pickable one is blamed, as its refusals are). Not answering in time, or any other
        problem: blamed for the run (failures towards ``consecutive_failures``), its ejection naming the
        deadlines and what the check found."""
        channel = connection.channel
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            problem = await connection.problem(HEALTH_TIMEOUT)
        finally:
            lagging.check = None
        if self.lagging.get(connection) is not lagging:  # its runs ended meanwhile (it answered, left the picks)
            return
        if problem is not None and loop.time() - started > HEALTH_TIMEOUT + CHECK_STALL_SLACK:
            # seen failing well past its own time: this process stalled under the check (gRPC's deadline fires
            # before the answer waiting in the socket is read on resuming), so it is inconclusive: the run stays,
            # and a later answer asks again (a SIGSTOPped head ejected a healthy replica one time in five)
            return
        if problem is not None and channel is not connection.channel:  # inconclusive: asked over a closed channel
            return
        run = lagging.total
        if problem is None:  # busy, not hung: its runs by kind go on
            lagging.total = _ShortRun()
            if not lagging.kinds:
                self.end_runs(connection)
            return
        self.end_runs(connection)  # every miss it has is answered for now, its runs by kind too
        if problem.draining and self._set_aside(connection):
            return
        cause = (
            f"DEADLINE_EXCEEDED (callers' deadlines up to {run.deadline:.3g}s, while the other replicas answered; "
            f"its health check: {problem})"
        )
        self._blame(connection, run.misses, cause)

    def end_runs(self, connection: Connection) -> None:
        """Forget ``connection``'s runs of callers' short deadlines missed, if any, and stop its health check:
        it answered, or left the picks (afresh when back)."""
        lagging = self.lagging.pop(connection, None)
        if lagging is not None and lagging.check is not None and not lagging.check.get_loop().is_closed():
            lagging.check.cancel()

    async def close(self) -> None:
        """Forget every run and end every health check under way: none outlives the list, nor asks over a
        channel the list closes next."""
        checks = [  # but those of a loop closed since, which never run again (see replica_list._cancel)
            lagging.check for lagging in self.lagging.values()
            if lagging.check is not None and not lagging.check.get_loop().is_closed()
        ]
        for check in checks:
            check.cancel()
        self.lagging.clear()
        if checks:
            await asyncio.wait(checks)
