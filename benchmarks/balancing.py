"""Benchmark 3: round robin versus peak-EWMA power of two choices over 4 replicas of one shard.

Each replica is an echo server in a process of its own (so one can be
SIGSTOPped). Two scenarios, both closed loops, both balancers in the same run
against the same servers:

* slow: one replica answers 50 ms later than the others; concurrency 4 and 32,
  rounds interleaved (round robin, p2c_ewma, round robin, ...). Throughput,
  p50/p99 and the share of requests each replica served.
* hang: one replica is stopped with SIGSTOP for 3 s, then SIGCONT; the pools
  carry ``RetryPolicy(attempt_timeout=...)`` so a call stuck on it is retried
  on another replica. Throughput before, during and after the hang, failures.

    python benchmarks/balancing.py            # about 1 min
    python benchmarks/balancing.py --quick    # about 25 s (the hang itself lasts 3 s)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported: no INFO lines in the tables

from _common import (
    EchoProcess, machine_line, new_event_loop, percentile, rotated, start_all, stop_all, table, verdict,
)

BALANCERS = ("round_robin", "p2c_ewma")
STOPPED: set[int] = set()  # pids this run SIGSTOPped and has not continued yet
DEPLOYMENT = "echo"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-delay", type=float, default=0.050, help="extra latency of the slow replica (s)")
    parser.add_argument("--concurrency", default="4,32")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per balancer and concurrency")
    parser.add_argument("--round-seconds", type=float, default=2.5)
    parser.add_argument("--hang-seconds", type=float, default=3.0)
    parser.add_argument("--hang-concurrency", type=int, default=4)
    parser.add_argument("--before-seconds", type=float, default=2.0)
    parser.add_argument("--after-seconds", type=float, default=3.0)
    parser.add_argument("--attempt-timeout", type=float, default=0.2, help="RetryPolicy.attempt_timeout in the hang scenario")
    parser.add_argument("--warmup-seconds", type=float, default=1.0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.round_seconds, args.before_seconds, args.after_seconds = 1, 1.5, 1.0, 1.0
        args.warmup_seconds = 0.5
    args.concurrency = [int(value) for value in args.concurrency.split(",")]
    return args


def payload() -> bytes:
    from shardnet.protocol.documents import Document
    from shardnet.protocol.messages import DataRequest

    return DataRequest(docs=[Document(text="hello")], endpoint="/").to_bytes()


async def closed_loop(pool, request_bytes: bytes, concurrency: int, seconds: float, records: list) -> None:
    """``concurrency`` callers send back to back for ``seconds``; each completion appends (done_at, latency, replica)."""
    from shardnet.protocol.messages import DataRequest

    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    clock = time.perf_counter

    async def caller():
        while loop.time() < stop_at:
            started = clock()
            try:
                _response, trailing = await pool.send_request_once(
                    DataRequest.from_bytes(request_bytes), DEPLOYMENT, endpoint="/"
                )
                replica = trailing["served-by"]
            except Exception as exc:
                replica = f"failed: {type(exc).__name__}"
            done = clock()
            records.append((done, done - started, replica))

    await asyncio.gather(*(caller() for _ in range(concurrency)))


def make_pool(balancer: str, addresses, retry=None):
    from shardnet.networking.policies import RetryPolicy
    from shardnet.networking.pool import GrpcConnectionPool

    pool = GrpcConnectionPool(balancer=balancer, retry=retry or RetryPolicy())
    for address in addresses:
        pool.add_connection(DEPLOYMENT, address)
    return pool


# -- scenario 1: one slow replica ----------------------------------------------------------


async def slow_scenario(args, request_bytes: bytes):
    names = ["r0", "r1", "r2", "r3-slow"]
    servers = [EchoProcess(1, delays=[args.slow_delay if name.endswith("slow") else 0.0], names=[name])
               for name in names]
    try:
        start_all(servers)
        addresses = [server.addresses[0] for server in servers]
        pools = {balancer: make_pool(balancer, addresses) for balancer in BALANCERS}
        try:
            for balancer in BALANCERS:  # warm-up: channels connected, EWMA has seen every replica
                await closed_loop(pools[balancer], request_bytes, 4, args.warmup_seconds, [])
            results = {}
            for concurrency in args.concurrency:
                records = {balancer: [] for balancer in BALANCERS}
                seconds = collections.Counter()
                for round_index in range(args.rounds):
                    for balancer in rotated(BALANCERS, round_index):  # neither always goes first
                        started = time.perf_counter()
                        await closed_loop(pools[balancer], request_bytes, concurrency, args.round_seconds,
                                          records[balancer])
                        seconds[balancer] += time.perf_counter() - started
                for balancer in BALANCERS:
                    results[(concurrency, balancer)] = (records[balancer], seconds[balancer])
        finally:
            for pool in pools.values():
                await pool.close()
    finally:
        stop_all(servers)
    return names, results


def report_slow(args, names, results) -> list[str]:
    print(f"## one replica {args.slow_delay * 1000:g} ms slower: 4 replicas, closed loop, "
          f"{args.rounds} interleaved rounds x {args.round_seconds:g} s per balancer")
    rows, checks = [], []
    for concurrency in args.concurrency:
        for balancer in BALANCERS:
            records, seconds = results[(concurrency, balancer)]
            latencies = [latency for _, latency, _ in records]
            served = collections.Counter(replica for _, _, replica in records)
            failures = sum(count for replica, count in served.items() if replica.startswith("failed"))
            shares = [f"{100 * served[name] / len(records):.1f}" for name in names]
            rows.append([concurrency, balancer, (len(records) - failures) / seconds, 1e3 * percentile(latencies, 0.5),
                         1e3 * percentile(latencies, 0.99), *shares, failures])
    headers = ["conc", "balancer", "rps", "p50 ms", "p99 ms", *[f"% {name}" for name in names], "failures"]
    print(table(headers, rows))
    by_key = {(row[0], row[1]): row for row in rows}
    print()
    ratio_rows = []
    for concurrency in args.concurrency:
        rr, ewma = by_key[(concurrency, "round_robin")], by_key[(concurrency, "p2c_ewma")]
        ratio_rows.append([concurrency, ewma[2] / rr[2], ewma[3] / rr[3], ewma[4] / rr[4]])
    print(table(["conc", "rps p2c/rr", "p50 p2c/rr", "p99 p2c/rr"], ratio_rows))
    first = args.concurrency[0]
    rr, ewma = by_key[(first, "round_robin")], by_key[(first, "p2c_ewma")]
    checks.append(verdict(f"conc {first}: p99 p2c_ewma / round_robin", ewma[4] / rr[4], "<=", 1 / 3))
    checks.append(verdict(f"conc {first}: rps p2c_ewma / round_robin", ewma[2] / rr[2], ">=", 2.0))
    healthy_min = min(float(share) for share in ewma[5:8])
    checks.append(verdict(f"conc {first}: smallest share of a healthy (fast) replica under p2c_ewma, %",
                          healthy_min, ">=", 10.0))
    return checks


# -- scenario 2: one replica hung ----------------------------------------------------------


async def hang_scenario(args, request_bytes: bytes):
    from shardnet.networking.policies import RetryPolicy

    names = ["r0", "r1-hung", "r2", "r3"]
    servers = [EchoProcess(1, names=[name]) for name in names]
    victim = servers[1]
    results = {}
    try:
        start_all(servers)
        addresses = [server.addresses[0] for server in servers]
        for balancer in BALANCERS:
            pool = make_pool(balancer, addresses, RetryPolicy(attempt_timeout=args.attempt_timeout))
            try:
                await closed_loop(pool, request_bytes, args.hang_concurrency, args.warmup_seconds, [])  # warm-up
                records: list = []
                marks = {}

                async def saboteur(marks=marks):
                    await asyncio.sleep(args.before_seconds)
                    marks["stop"] = time.perf_counter()
                    STOPPED.add(victim.pid)
                    os.kill(victim.pid, signal.SIGSTOP)
                    try:
                        await asyncio.sleep(args.hang_seconds)
                    finally:
                        os.kill(victim.pid, signal.SIGCONT)
                        STOPPED.discard(victim.pid)
                        marks["cont"] = time.perf_counter()

                marks["start"] = time.perf_counter()
                total = args.before_seconds + args.hang_seconds + args.after_seconds
                await asyncio.gather(closed_loop(pool, request_bytes, args.hang_concurrency, total, records), saboteur())
                marks["end"] = time.perf_counter()
                ejections = sum(connection.times_ejected
                                for connection in pool.get_replicas(DEPLOYMENT).get_all_connections())
                results[balancer] = (records, marks, pool.retry_budget, ejections)
            finally:
                await pool.close()
    finally:
        stop_all(servers)
    return names, results


def report_hang(args, names, results) -> list[str]:
    print(f"## one replica SIGSTOPped for {args.hang_seconds:g} s: 4 replicas, closed loop at concurrency "
          f"{args.hang_concurrency}, RetryPolicy(attempt_timeout={args.attempt_timeout:g})")
    rows, checks = [], []
    for balancer in BALANCERS:
        records, marks, budget, ejections = results[balancer]
        phases = [("before", marks["start"], marks["stop"]), ("during", marks["stop"], marks["cont"]),
                  ("after", marks["cont"], marks["end"])]
        rates = []
        for _, begin, end in phases:
            done = [record for record in records if begin <= record[0] < end and not record[2].startswith("failed")]
            rates.append(len(done) / (end - begin))
        # the worst 250 ms of the hang
        window, worst = 0.25, float("inf")
        begin = marks["stop"]
        while begin + window <= marks["cont"]:
            count = sum(1 for record in records if begin <= record[0] < begin + window and not record[2].startswith("failed"))
            worst = min(worst, count / window)
            begin += window / 2
        failures = sum(1 for record in records if record[2].startswith("failed"))
        rows.append([balancer, *rates, rates[1] / rates[0], worst, failures, budget.total_retries, ejections])
    print(table(["balancer", "rps before", "rps during", "rps after", "during/before", "worst 250ms rps",
                 "failures", "retries", "ejections"], rows))
    ewma = rows[1]
    checks.append(verdict("hang: p2c_ewma rps during / before", ewma[4], ">=", 0.5))
    checks.append(verdict("hang: p2c_ewma failures", ewma[6], "<=", 0))
    return checks


async def run(args) -> int:
    request_bytes = payload()
    print(f"# balancing: {machine_line()}; loop {args.loop}")
    names, slow = await slow_scenario(args, request_bytes)
    checks = report_slow(args, names, slow)
    print()
    names, hang = await hang_scenario(args, request_bytes)
    checks += report_hang(args, names, hang)
    print()
    print("targets:")
    print("\n".join(checks))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("shardnet").setLevel(logging.ERROR)  # ejections are counted in the table instead
    loop = new_event_loop(args.loop)
    task = loop.create_task(run(args))
    for signum in (signal.SIGINT, signal.SIGTERM):  # cancel the run, so its finally blocks stop the servers
        loop.add_signal_handler(signum, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for pid in list(STOPPED):  # never leave a replica stopped behind us
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        loop.close()


if __name__ == "__main__":
    raise SystemExit(main())
