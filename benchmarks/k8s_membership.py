"""Benchmark: how long a pod event takes from the API server's wire to the pool's membership.

The loopback API server of the tests (``tests/k8s_apiserver.py``) and a
``K8sGrpcConnectionPool`` talking to it through the real kubernetes_asyncio
client run in this one process. Each pod goes through four events, one at a
time: ADDED ready (joins), MODIFIED not ready (leaves), MODIFIED ready (joins
again), DELETED (leaves). The latency of an event is from the moment the
server handed its line to the socket to the moment the pool's membership
changed; then a burst of pods is added at once and the last one's latency
is reported. Target: p99 under 100 ms.

    python benchmarks/k8s_membership.py                  # 200 pods, 800 events, a few seconds
    python benchmarks/k8s_membership.py --pods 1000 --loop uvloop
    python benchmarks/k8s_membership.py --gc-freeze      # freeze the startup heap, as a long-lived head should

The worst case is usually a full (generation 2) garbage collection of the
process's large startup heap (kubernetes_asyncio's models, grpc): the run
reports those pauses next to the table, and ``--gc-freeze`` shows the
latency once ``gc.freeze()`` has moved that heap out of the collector's way.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import machine_line, new_event_loop, percentile, table, verdict  # noqa: E402
from k8s_apiserver import FakeApiServer, pod, write_kubeconfig  # noqa: E402

from shardnet.discovery.kubernetes import K8sGrpcConnectionPool  # noqa: E402
from shardnet.discovery.watch import WatchOptions  # noqa: E402

TARGET_MS = 100.0


class TimedPool(K8sGrpcConnectionPool):
    """The real pool, stamping the moment each address joins or leaves.

    A removal is stamped as it starts: the replica list forgets the address
    before its first await, so that is when the change becomes visible.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps: dict[tuple[str, str], float] = {}
        self.changed = asyncio.Event()

    def add_connection(self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None) -> None:
        super().add_connection(deployment, address, head=head, shard_id=shard_id)
        self.stamps[("join", address)] = time.perf_counter()
        self.changed.set()

    async def remove_connection(
        self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None
    ):
        self.stamps[("leave", address)] = time.perf_counter()
        self.changed.set()
        return await super().remove_connection(deployment, address, head=head, shard_id=shard_id)

    async def wait_for(self, change: str, address: str, timeout: float = 5.0) -> float:
        """The stamp of ``change`` for ``address``, waiting for it (and consuming it)."""
        deadline = time.perf_counter() + timeout
        while (change, address) not in self.stamps:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.perf_counter()))
        return self.stamps.pop((change, address))


class GcPauses:
    """Full collections longer than a millisecond while installed, in ms."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif (pause := (time.perf_counter() - self._started) * 1000) > 1.0:
            self.pauses.append(pause)


def ip_of(index: int) -> str:
    return f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"


async def run(pods: int, burst: int, pauses: GcPauses, freeze: bool = False) -> list[list]:
    from kubernetes_asyncio import config

    latencies: dict[str, list[float]] = {
        name: []
        for name in ("ADDED -> joins", "MODIFIED unready -> leaves", "MODIFIED ready -> joins", "DELETED -> leaves")
    }
    async with FakeApiServer() as server:
        with tempfile.TemporaryDirectory() as scratch:
            kubeconfig = write_kubeconfig(Path(scratch) / "kubeconfig", server.url)
            client = await config.new_client_from_config(config_file=str(kubeconfig), persist_config=False)
        async with client:
            pool = TimedPool("default", client, sources=("pods",), watch=WatchOptions(backoff_initial=0.05))
            async with pool:
                await pool.wait_synced(timeout=10)
                while not server.open_streams("pods"):
                    await asyncio.sleep(0.01)
                if freeze:
                    gc.collect()
                    gc.freeze()
                pauses.pauses.clear()  # count the measured part only

                async def step(label: str, change: str, address: str, obj: Optional[dict], name: str) -> None:
                    stored = server.apply("pods", obj) if obj is not None else server.delete("pods", name)
                    version = int(stored["metadata"]["resourceVersion"])
                    visible = await pool.wait_for(change, address)
                    latencies[label].append((visible - server.written_at[version]) * 1000)

                for index in range(pods):
                    name, ip = f"p{index}", ip_of(index)
                    address = f"{ip}:8080"
                    await step("ADDED -> joins", "join", address, pod(name, ip=ip), name)
                    await step("MODIFIED unready -> leaves", "leave", address, pod(name, ip=ip, ready=False), name)
                    await step("MODIFIED ready -> joins", "join", address, pod(name, ip=ip), name)
                    await step("DELETED -> leaves", "leave", address, None, name)

                burst_pods = [
                    server.apply("pods", pod(f"p{index}", ip=ip_of(index))) for index in range(pods, pods + burst)
                ]
                versions = [int(stored["metadata"]["resourceVersion"]) for stored in burst_pods]
                last = await pool.wait_for("join", f"{ip_of(pods + burst - 1)}:8080")
                first_written = server.written_at[versions[0]]
                burst_ms = (last - first_written) * 1000

    rows = [
        [label, len(values), percentile(values, 0.5), percentile(values, 0.99), max(values)]
        for label, values in latencies.items()
    ]
    everything = [value for values in latencies.values() for value in values]
    rows.append(
        ["all events", len(everything), percentile(everything, 0.5), percentile(everything, 0.99), max(everything)]
    )
    return rows + [
        [f"burst of {burst} ADDED: first written -> last joined", burst, float("nan"), float("nan"), burst_ms]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=200, help="pods taken through the four events one at a time")
    parser.add_argument("--burst", type=int, default=200, help="pods added at once at the end")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the pool has synced")
    args = parser.parse_args()

    loop = new_event_loop(args.loop)
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        rows = loop.run_until_complete(run(args.pods, args.burst, pauses, args.gc_freeze))
    finally:
        gc.callbacks.remove(pauses)
        loop.close()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    frozen = "gc frozen after sync" if args.gc_freeze else "gc as is"
    print(f"k8s membership latency: wire -> pool, {args.loop} loop, {frozen}; {machine_line()}; load {load}")
    print(table(["event", "n", "p50 ms", "p99 ms", "max ms"], rows))
    worst = f", longest {max(pauses.pauses):.0f} ms" if pauses.pauses else ""
    print(f"  full GC pauses over 1 ms while measuring: {len(pauses.pauses)}{worst}")
    print(verdict("p99 of all events, ms", rows[-2][3], "<=", TARGET_MS))
    print(verdict("max of all events, ms", rows[-2][4], "<=", TARGET_MS))


if __name__ == "__main__":
    main()
