"""A STATUS answered with a check that began before a replica left (its lease lapsed, a DEACTIVATE) counted that
replica as down though the answer no longer lists it: `shardnet status` printed 5 replicas, none marked, and
"1 of 6 replicas down ... (degraded)", exit 3 (a soak: a worker SIGSTOPped past its lease)."""

from __future__ import annotations

import asyncio

from shardnet.networking.pool import GrpcConnectionPool
from shardnet.runtimes.replica_check import ReplicaChecks


async def test_a_replica_removed_after_the_check_began_is_not_reported_down(echo_servers):
    [live] = await echo_servers(1)
    dead = "127.0.0.1:1"  # refused
    pool = GrpcConnectionPool()
    pool.add_connection("dep", live.address, shard_id=0)
    pool.add_connection("dep", dead, shard_id=0)
    checks = ReplicaChecks(pool, "dep", asyncio.Event())
    try:
        first = await checks.check(5.0)
        assert first.checked == 2 and [address for _, address, _ in first.down] == [dead]
        await pool.remove_connection("dep", dead, shard_id=0)  # its lease lapsed: no longer routed to, nor listed
        again = await checks.check(5.0)  # within REUSE_SECONDS: the same check answers
        assert again.down == [] and again.checked == 1 and again.unchecked == 0, again
    finally:
        await checks.close()
        await pool.close()


async def test_a_replica_added_after_the_check_began_is_counted_not_checked(echo_servers):
    """The STATUS a check answers (reused for REUSE_SECONDS) lists a replica added since (a registration, a
    discovery event): neither checked nor not, status said 'all 1 listed replicas serving' over two, one of them
    refusing connections (a regression review)."""
    [live] = await echo_servers(1)
    pool = GrpcConnectionPool()
    pool.add_connection("dep", live.address, shard_id=0)
    checks = ReplicaChecks(pool, "dep", asyncio.Event())
    try:
        first = await checks.check(5.0)
        assert first.checked == 1 and first.down == []
        pool.add_connection("dep", "127.0.0.1:1", shard_id=0)  # refused; listed from now on
        again = await checks.check(5.0)  # within REUSE_SECONDS: the same check answers
        assert (again.checked, again.unchecked) == (1, 1), again
    finally:
        await checks.close()
        await pool.close()
