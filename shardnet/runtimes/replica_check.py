"""A head's check of every replica it routes to, for ``shardnet status``: whether each serves right now, asked over
a channel of its own, within the caller's time. A head that only lists its replicas says nothing of one that
refuses connections or hangs: it routes around it, and a shard may be left with one replica, or none.

STATUS needs no token, so the check is bounded whoever asks: one runs at a time per head, shared by every STATUS
asking while it runs and reused for ``REUSE_SECONDS`` after, and it opens at most ``MAX_CHECKS_AT_ONCE``
connections at once; a replica whose turn does not come within the time is reported as not checked, neither as
serving nor as down."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from shardnet.errors import ShardnetError
from shardnet.networking.addresses import entity_address
from shardnet.networking.pool import GrpcConnectionPool
from shardnet.networking.connection import Connection

# health checks (each a fresh connection, a TLS handshake under TLS) one check runs at once; the others wait their turn
MAX_CHECKS_AT_ONCE = 64
# seconds a finished check answers every STATUS that asks for one, instead of a new check
REUSE_SECONDS = 1.0
# seconds one replica's health check may take: a hung replica is named as not answering after that. Its own, not
# its caller's time: a check is shared, and one started by a caller with 0.15 s gave every other caller "not checked"
# (or "down") answers; and 64 hung replicas each given the whole time held every turn, the rest never checked
CHECK_TIMEOUT = 1.0
# seconds a check runs at most, whoever started it: each caller waits as long as it has, and reads what was found by
# then (a replica not answered yet is not checked); a check outlives a short caller for the callers after it
RUN_SECONDS = 10.0
# a replica whose turn comes with less of the check's time left than this is not checked: given less, a health call
# would name a replica that had no time to answer as "not answering"
MIN_CHECK_SECONDS = 0.05

# where a checked replica serves: a shard id, or a hop's role (uses_before, uses_after)
Where = Union[int, str]


@dataclass(frozen=True)
class ReplicaCheck:
    """What a check found: how many replicas it asked, each one down (shard id, address as a related entity names
    it, why), the shards whose replicas were all checked and none serves, how many replicas were not checked
    within the time, and how old the check is when it was reused (None: it ran for this STATUS); then the same
    of the head's hops: each replica down (role, address, why), and the hops none of whose replicas serves."""

    checked: int
    down: list[tuple[int, str, str]]
    shards_down: list[int]
    unchecked: int = 0
    age: Optional[float] = None
    hop_down: list[tuple[str, str, str]] = field(default_factory=list)
    hops_down: list[str] = field(default_factory=list)


class _Run:
    """One check of every replica listed when it began, at most ``MAX_CHECKS_AT_ONCE`` at a time, until its
    deadline; what it found so far reads at any time."""

    def __init__(self, listed: list[tuple[Where, Connection]], seconds: float):
        self.listed = listed
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + seconds
        self.found: dict[int, Optional[str]] = {}  # index in listed: why it does not serve (None: it serves)
        self.ended_at: Optional[float] = None  # loop time
        self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        turns = iter(range(len(self.listed)))
        try:
            failures = await asyncio.gather(
                *(self._take_turns(turns) for _ in range(min(MAX_CHECKS_AT_ONCE, len(self.listed)))),
                return_exceptions=True,
            )
        finally:
            self.ended_at = asyncio.get_running_loop().time()
        for failure in failures:
            if isinstance(failure, BaseException):
                raise failure

    async def _take_turns(self, turns) -> None:
        """Check the replicas whose turn comes, one after the other, while the time allows."""
        loop = asyncio.get_running_loop()
        for index in turns:
            left = self.deadline - loop.time()
            if left < MIN_CHECK_SECONDS:
                return
            try:
                problem = await self.listed[index][1].problem_now(min(left, CHECK_TIMEOUT))
                self.found[index] = None if problem is None else problem.cause
            except ShardnetError as exc:  # its TLS material unreadable now, say: not checked, so not serving
                self.found[index] = f"not checked: {exc}"

    def result(self, age: Optional[float] = None, current: Optional[set] = None) -> ReplicaCheck:
        """What the run found so far: a replica without an answer yet is not checked. ``current``: the (where,
        connection) pairs listed now; one the run checked that has left since (its lease lapsed, a DEACTIVATE)
        is left out, as the STATUS it answers no longer lists it (it was counted down, unnamed)."""
        if self.task.done() and not self.task.cancelled() and self.task.exception() is not None:
            raise self.task.exception()
        down, serving, unknown = [], set(), set()
        kept = [
            index for index, pair in enumerate(self.listed) if current is None or pair in current
        ]
        for index in kept:
            where, connection = self.listed[index]
            if index not in self.found:
                unknown.add(where)
            elif self.found[index] is None:
                serving.add(where)
            else:
                down.append((where, entity_address(*connection.address.entity()), self.found[index]))
        # listed now but not when the run began (added since: a registration, a discovery event): not checked
        added = [] if current is None else [where for where, _ in current.difference(self.listed)]
        unknown.update(added)
        may_serve = serving | unknown  # a shard or hop with a replica serving, or one not checked
        # in listed order
        none_serving = dict.fromkeys(self.listed[i][0] for i in kept if self.listed[i][0] not in may_serve)
        found = sum(1 for index in kept if index in self.found)
        return ReplicaCheck(
            found,
            [replica for replica in down if isinstance(replica[0], int)],
            sorted(where for where in none_serving if isinstance(where, int)),
            len(kept) - found + len(added),
            age,
            hop_down=[replica for replica in down if isinstance(replica[0], str)],
            hops_down=[where for where in none_serving if isinstance(where, str)],
        )


class ReplicaChecks:
    """A head's checks of its replicas, those of its hops (``hops``: (role, the pool's deployment of it)) included:
    one at a time, shared by every STATUS that asks meanwhile, its answer reused for ``REUSE_SECONDS``. A STATUS
    cancelled by its caller leaves the check running for the others; the head's drain (``stopping``) or
    ``close()`` ends it."""

    def __init__(
        self,
        pool: GrpcConnectionPool,
        deployment: str,
        stopping: asyncio.Event,
        hops: Sequence[tuple[str, str]] = (),
    ):
        self._pool = pool
        self._deployment = deployment
        self._hops = tuple(hops)
        self._stopping = stopping
        self._run: Optional[_Run] = None
        self._closed = False

    def _listed(self) -> list[tuple[Where, Connection]]:
        pool, deployment = self._pool, self._deployment
        listed: list[tuple[Where, Connection]] = [
            (shard_id, connection)
            for shard_id in pool.shard_ids(deployment)
            for connection in pool.get_replicas(deployment, shard_id=shard_id).get_all_connections()
        ]
        for role, hop in self._hops:
            replicas = pool.get_replicas(hop)
            listed.extend((role, connection) for connection in (replicas.get_all_connections() if replicas else ()))
        return listed

    async def check(self, seconds: float) -> ReplicaCheck:
        """Every replica of the deployment's shards and of its hops, ejected ones included, as far as checked
        within ``seconds`` (a hung one is named as not answering after CHECK_TIMEOUT; one not answered yet, as not
        checked): by the check running now, by one that ended less than ``REUSE_SECONDS`` ago, else by a new one."""
        loop = asyncio.get_running_loop()
        run = self._run
        if run is not None and run.ended_at is not None:
            age = loop.time() - run.ended_at
            if age <= REUSE_SECONDS:
                return run.result(age, set(self._listed()))
            run = None
        if run is None:
            if self._closed or self._stopping.is_set():  # a draining head opens no more connections
                return ReplicaCheck(0, [], [], len(self._listed()))
            run = self._run = _Run(self._listed(), RUN_SECONDS)
        stopping = loop.create_task(self._stopping.wait())
        try:  # not wait_for: a caller that gives up must not cancel the check the others wait for
            await asyncio.wait((run.task, stopping), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if self._stopping.is_set():
            await self._end(run)
        return run.result(current=set(self._listed()))

    @staticmethod
    async def _end(run: _Run) -> None:
        run.task.cancel()  # each health call's channel closes as it is cut
        await asyncio.wait((run.task,))  # not gather: cancelled while it waits, it would cut those closes

    async def close(self) -> None:
        """End the check running, if any (its channels closed), and start no more."""
        self._closed = True
        if self._run is not None:
            await self._end(self._run)
