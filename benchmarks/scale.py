"""Benchmark 4: pool operations at 10 to 10,000 replicas, and the memory an idle connection holds.

For each size, in a fresh child process (so memory figures do not inherit
freed arenas): add N replicas of one shard with ``GrpcConnectionPool.add_connection``,
pick with ``ReplicaList.get_next_connection`` (round robin and p2c_ewma),
remove a sample with ``remove_connection`` (bookkeeping only: the channel
closes in a background task, as it waits for calls still on it). Adds are
timed into a shard that already exists. Channels are lazy, so an idle
connection costs only its channel object; a second part adds a few hundred
replicas with real echo servers behind them, connects each (its own TCP
connection) and measures again, pool entries included.

    python benchmarks/scale.py            # about 1 min
    python benchmarks/scale.py --quick    # sizes 10..1,000 and 100 connected channels
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EchoProcess, exit_on_sigterm, machine_line, run_script, table, verdict

PICKS = 200_000
# "flat" as a verdict: the largest size's time per operation at most this many times the smallest's. Over the
# default 1,000-fold growth O(log n) gives 4x and O(n) 1000x; noise between fresh processes moves a cell by ~1.5x
FLAT_AT_MOST = 3.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def addresses(count: int, first_port: int = 20_000) -> list[str]:
    """Distinct loopback addresses nobody listens on (channels stay idle: nothing connects)."""
    return [f"127.0.0.{1 + index // 40_000}:{first_port + index % 40_000}" for index in range(count)]


async def one_size(count: int, removals: int) -> dict:
    """Add ``count`` replicas, pick, remove ``removals`` of them; times per operation and memory per replica."""
    from shardnet.networking.pool import GrpcConnectionPool

    result = {"n": count}
    targets = addresses(count)
    warm = GrpcConnectionPool()  # grpc's one-off start-up (threads, pollers) falls outside the measures
    for address in addresses(20, first_port=60_000):
        warm.add_connection("warm", address)
    for address in addresses(20, first_port=60_000):
        await warm.remove_connection("warm", address)
    await warm.close()
    repeats = max(1, 2000 // count)  # small sizes: repeat the add/remove cycle so each figure averages >= 2000 ops
    for balancer in ("round_robin", "p2c_ewma"):
        add_seconds = remove_seconds = 0.0
        removed = 0
        for repeat in range(repeats):
            targets = addresses(count, first_port=20_000 + (repeat * count) % 20_000)  # fresh targets each cycle
            pool = GrpcConnectionPool(balancer=balancer)
            # the deployment, its shard and its replica list exist before the clock starts: their one-off
            # creation (about 20 times an add) is not a cost of adding the N-th replica
            pool.add_connection("dep", "127.0.0.1:19999")
            gc.collect()
            rss0 = rss_bytes()
            started = time.perf_counter()
            for address in targets:
                pool.add_connection("dep", address)
            add_seconds += time.perf_counter() - started
            if repeat == 0 and balancer == "round_robin":
                gc.collect()
                result["rss_per_replica"] = (rss_bytes() - rss0) / count
            if repeat == 0:
                pick = pool.get_replicas("dep").get_next_connection
                for _ in range(min(PICKS, 10 * count)):  # p2c_ewma creates its per-replica record on first sight
                    pick()
                started = time.perf_counter()
                for _ in range(PICKS):
                    pick()
                pick_seconds = time.perf_counter() - started
            step = max(1, count // removals)
            victims = targets[::step][:removals]
            started = time.perf_counter()
            for address in victims:
                await pool.remove_connection("dep", address)
            remove_seconds += time.perf_counter() - started
            removed += len(victims)
            await pool.close()
        result[balancer] = {
            "add_us": 1e6 * add_seconds / (count * repeats),
            "pick_us": 1e6 * pick_seconds / PICKS,
            "remove_us": 1e6 * remove_seconds / removed,
        }
    # Python-side memory alone, in a pass of its own (tracemalloc slows every allocation), into an existing shard
    pool = GrpcConnectionPool()
    pool.add_connection("dep", "127.0.0.1:19999")
    gc.collect()
    tracemalloc.start()
    traced0, _ = tracemalloc.get_traced_memory()
    for address in targets:
        pool.add_connection("dep", address)
    gc.collect()
    traced1, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result["traced_per_replica"] = (traced1 - traced0) / count
    await pool.close()
    return result


async def connected(count: int, servers: list[str]) -> dict:
    """Memory of ``count`` connections, each added to the pool and then carrying one request (its own TCP
    connection each): everything a connection costs, its replica and channel objects included."""
    from shardnet.networking.pool import GrpcConnectionPool
    from shardnet.protocol.messages import DataRequest

    # a local subchannel pool per channel: otherwise grpc shares one TCP connection per target
    pool = GrpcConnectionPool(options=[("grpc.use_local_subchannel_pool", 1)])
    request = DataRequest(endpoint="/")

    async def connect(first: int, last: int) -> None:
        for index in range(first, last):
            pool.add_connection(f"dep{index}", servers[index % len(servers)])
        await asyncio.gather(*(pool.send_request_once(request, f"dep{index}") for index in range(first, last)))

    await connect(0, 10)  # a first batch, so grpc's own one-off costs (threads, pollers) fall outside the measure
    gc.collect()
    rss0 = rss_bytes()
    started = time.perf_counter()
    await connect(10, count)
    connect_seconds = time.perf_counter() - started
    gc.collect()
    rss1 = rss_bytes()
    # Python-side memory in a pass of its own: tracemalloc would inflate the RSS reading above
    tracemalloc.start()
    traced0, _ = tracemalloc.get_traced_memory()
    await connect(count, 2 * count - 10)
    gc.collect()
    traced1, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    await pool.close()
    return {"n": count - 10, "rss_per_connection": (rss1 - rss0) / (count - 10),
            "traced_per_connection": (traced1 - traced0) / (count - 10), "connect_s": connect_seconds,
            "idle_rss": rss0}


def child(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int)
    parser.add_argument("--removals", type=int, default=1000)
    parser.add_argument("--connected", type=int)
    parser.add_argument("--servers", nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.connected:
        result = asyncio.run(connected(args.connected, args.servers))
    else:
        result = asyncio.run(one_size(args.size, min(args.removals, args.size)))
    print(json.dumps(result))
    return 0


def run_child(*arguments: str) -> dict:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    output = subprocess.run([sys.executable, __file__, "--child", *arguments], check=True, capture_output=True,
                            text=True, env=env, timeout=600)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--connected", type=int, default=300, help="channels to connect to real servers")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if args.quick:
        args.sizes, args.connected = "10,100,1000", 100
    sizes = [int(value) for value in args.sizes.split(",")]

    print(f"# scale: one shard of N replicas (lazy channels, nothing listening), each size in a fresh process; "
          f"{PICKS:,} picks; {machine_line()}")
    rows = []
    for size in sizes:
        result = run_child("--size", str(size))
        rr, ewma = result["round_robin"], result["p2c_ewma"]
        rows.append([f"{size:,}", rr["add_us"], rr["remove_us"], rr["pick_us"], ewma["pick_us"],
                     result["rss_per_replica"] / 1024, result["traced_per_replica"] / 1024])
    print(table(["replicas", "add us", "remove us", "pick rr us", "pick p2c us", "RSS KiB/replica",
                 "Python KiB/replica"], rows))
    for first in rows[:-1]:  # against every smaller size: a baseline's noise cannot hide growth
        last = rows[-1]
        print(f"  {last[0]} vs {first[0]} replicas: add x{last[1] / first[1]:.2f}, remove x{last[2] / first[2]:.2f}, "
              f"pick rr x{last[3] / first[3]:.2f}, pick p2c x{last[4] / first[4]:.2f} (flat = about 1)")
    if len(rows) > 1:
        print()
        print(f"targets (flat: each operation's time at {rows[-1][0]} replicas at most {FLAT_AT_MOST:g}x its time at the "
              "smaller sizes, the worst of them):")
        for column, operation in ((1, "add"), (2, "remove"), (3, "pick round robin"), (4, "pick p2c_ewma")):
            worst = max(rows[-1][column] / row[column] for row in rows[:-1])
            print(verdict(f"{operation}, {rows[-1][0]} replicas / smaller", worst, "<=", FLAT_AT_MOST))

    if args.connected:
        print()
        with EchoProcess(4) as servers:
            result = run_child("--connected", str(args.connected + 10), "--servers", *servers.addresses)
        print(f"# {result['n']} replicas added and connected to 4 echo servers on loopback (one TCP connection "
              f"each), after 10 first")
        print(table(["channels", "RSS KiB/connection", "Python KiB/connection", "connect+call s"],
                    [[result["n"], result["rss_per_connection"] / 1024, result["traced_per_connection"] / 1024,
                      result["connect_s"]]]))
    return 0


if __name__ == "__main__":
    run_script(main)
