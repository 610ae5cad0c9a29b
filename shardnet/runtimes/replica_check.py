"""A head's check of every replica it routes to, for ``shardnet status``: each asked at once, over a channel of
its own, whether it serves right now, within the caller's time. A head that only lists its replicas says nothing
of one that refuses connections or hangs: it routes around it, and a shard may be left with one replica, or none."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shardnet.errors import ShardnetError
from shardnet.networking.addresses import entity_address
from shardnet.networking.pool import GrpcConnectionPool


@dataclass(frozen=True)
class ReplicaCheck:
    """What a check found: how many replicas it asked, each one down (shard id, address as a related entity names
    it, why), and the shards that have replicas but none serving."""

    checked: int
    down: list[tuple[int, str, str]]
    shards_down: list[int]


async def check_replicas(pool: GrpcConnectionPool, deployment: str, timeout: float) -> ReplicaCheck:
    """Health-check every replica of ``deployment``'s shards, ejected ones included, all at once, each within
    ``timeout`` seconds (a hung one is named as not answering, not waited for)."""
    listed = [
        (shard_id, connection)
        for shard_id in pool.shard_ids(deployment)
        for connection in pool.get_replicas(deployment, shard_id=shard_id).get_all_connections()
    ]
    problems = await asyncio.gather(
        *(connection.problem_now(timeout) for _, connection in listed), return_exceptions=True
    )
    down, serving = [], set()
    for (shard_id, connection), problem in zip(listed, problems):
        if isinstance(problem, ShardnetError):  # its TLS material unreadable now, say: not checked, so not serving
            problem = f"not checked: {problem}"
        elif isinstance(problem, BaseException):
            raise problem
        if problem is None:
            serving.add(shard_id)
        else:
            down.append((shard_id, entity_address(*connection.address.entity()), problem))
    return ReplicaCheck(len(listed), down, sorted({shard_id for shard_id, _ in listed} - serving))
