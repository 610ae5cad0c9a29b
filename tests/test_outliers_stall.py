"""A lagging replica's health check seen failing well past its own timeout: this process stalled (SIGSTOP, a
blocked loop), as a call seen failing more than LOCAL_STALL_SLACK past its deadline, and it blames no replica."""

from __future__ import annotations

import asyncio
import time

from shardnet import EjectionPolicy, ReplicaList
from shardnet.networking import connection as connection_module
from shardnet.networking import outliers
from shardnet.networking.health import HealthProblem


async def test_a_health_check_seen_failing_after_this_process_stalled_blames_no_replica(echo_servers, monkeypatch):
    lagging_server, quick = await echo_servers(2)
    replicas = ReplicaList(name="dep/shard-0", ejection=EjectionPolicy(consecutive_failures=3))
    try:
        lagging = replicas.add_connection(lagging_server.address)
        answering = replicas.add_connection(quick.address)

        original = connection_module.Connection.problem

        async def stalled_check(self, timeout: float = connection_module.HEALTH_TIMEOUT):
            if self is not lagging:
                return await original(self, timeout)
            # the replica answered at once, but this process stalled past the check's time: gRPC's deadline fired
            # first on resuming (as seen after a SIGSTOP of a head, about one time in five)
            time.sleep(timeout + 1.5)
            return HealthProblem(f"not answering within {timeout:.3g}s")

        monkeypatch.setattr(connection_module.Connection, "problem", stalled_check)
        out = replicas._outliers
        for _ in range(3):
            out.missed(lagging, "single_data", (("endpoint", "/x"),), 0.3)
        loop = asyncio.get_running_loop()
        for _ in range(3):  # answers on another endpoint: its run on any kind is met, so its health is asked
            now = loop.time()
            out.answered(answering, "single_data", (("endpoint", "/y"),), 0.3, now - 0.01, now)
        checks = [task for task in asyncio.all_tasks() if task.get_name() == outliers._LAGGING_CHECK]
        assert len(checks) == 1
        await asyncio.wait(checks, timeout=10)
        assert lagging.recent_failures == [] and replicas.is_eligible(lagging)
    finally:
        await replicas.close()
