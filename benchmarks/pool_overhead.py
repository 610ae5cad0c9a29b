"""Benchmark 1: what the shardnet pool costs per request over a bare grpc.aio client.

Two echo servers run in one child process; the clients run in worker
processes, one per event loop and virtual environment, one client at a time:
``time.process_time()`` around a run is that client's CPU (each run starts
after a garbage collection). Rounds are interleaved (bare, shardnet,
[jina-venv bare, jina], bare, shardnet, ...) after an excluded warm-up, all
against the same servers. With ``--loop both`` Jina's pool runs under each
loop too, and each shardnet row is judged against Jina's on the same loop.

    python benchmarks/pool_overhead.py                 # 20k requests per client, about 1.5 min
    python benchmarks/pool_overhead.py --peer jina     # adds Jina 3.34's pool (and a bare client on its grpcio)
    python benchmarks/pool_overhead.py --loop both     # shardnet and bare under asyncio and under uvloop
    python benchmarks/pool_overhead.py --quick
    python benchmarks/pool_overhead.py --steps --rounds 50 --no-call-path   # the pool's cost split by layer
    python benchmarks/pool_overhead.py --contract-variant --loop both --no-call-path   # the contract kept another way

Every client wraps the same request bytes per call in its own request type
(bytes, ``shardnet DataRequest.from_bytes``, ``jina DataRequest(bytes)``), as a
head holds a request it received, and sends the endpoint as metadata.
"""

from __future__ import annotations

import argparse
import os
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported: no INFO lines in the tables

from _common import (
    JINA_PYTHON,
    SHARDNET_PYTHON,
    EchoProcess,
    Tally,
    Worker,
    exit_on_sigterm,
    machine_line,
    median,
    paired_ratio_interval,
    rotated,
    run_script,
    table,
    verdict,
)


def request_bytes(size: int) -> bytes:
    """A DataRequest for endpoint ``/`` carrying one document of about ``size`` bytes."""
    from shardnet.protocol.documents import Document
    from shardnet.protocol.messages import DataRequest

    document = Document(text="x" * max(0, size)) if size < 1024 else Document(blob=os.urandom(size))
    return DataRequest(docs=[document], endpoint="/").to_bytes()


# --steps: the pool's layers one at a time, each in a Task as send_requests_once runs the whole (impl, row label)
STEPS = (
    ("step-pick", "step: pick + call + trailing"),
    ("step-replica-list", "step: ReplicaList.call"),
    ("step-pool-call", "step: GrpcConnectionPool.call"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="measured requests per client (default 20000)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds the requests are split into")
    parser.add_argument("--warmup", type=int, default=2_000, help="excluded warm-up requests per client")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--payload", type=int, default=64, help="document size in bytes (default 64)")
    parser.add_argument("--peer", choices=("none", "jina"), default="none")
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="asyncio",
                        help="event loop of the shardnet-venv clients (and of the Jina client unless 'both')")
    parser.add_argument("--no-call-path", dest="call_path", action="store_false",
                        help="skip GrpcConnectionPool.call (the head's path: no Task per request)")
    parser.add_argument("--no-task-row", dest="task_row", action="store_false",
                        help="skip the bare client wrapped in a Task, with and without fetching the trailing "
                             "metadata (what the contract of send_requests_once costs before the pool's own work)")
    parser.add_argument("--steps", action="store_true",
                        help="add rows that run the pool's layers one at a time (each in a Task, as the pool), and "
                             "the pool on gRPC's Cython call (a prototype on private API), judged against the "
                             "contract's floor; many rounds (--rounds 50) are needed to tell steps of 1-3 %% apart")
    parser.add_argument("--contract-variant", action="store_true",
                        help="add the bare client keeping the contract another way: the call started before its "
                             "Task, the Task made by a held loop (what the pool would save so; it does not do it)")
    parser.add_argument("--profile", metavar="FILE", help="after the rounds, profile one shardnet round with cProfile")
    parser.add_argument("--quick", action="store_true", help="about 20 s: 4 rounds of 2000, warm-up 1000")
    args = parser.parse_args(argv)
    if (args.steps or args.contract_variant) and not args.task_row:
        parser.error("--steps and --contract-variant are judged against 'bare + Task + trailing': drop --no-task-row")
    if args.quick:
        args.requests, args.rounds, args.warmup = 8_000, 4, 1_000
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    per_round = max(1, args.requests // args.rounds)
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    if args.peer == "jina" and not os.path.exists(JINA_PYTHON):
        sys.exit(f"--peer jina needs the Jina 3.34 venv at {JINA_PYTHON} (or set SHARDNET_JINA_PYTHON)")

    with tempfile.TemporaryDirectory() as scratch:
        payload_path = os.path.join(scratch, "request.bin")
        payload = request_bytes(args.payload)
        Path(payload_path).write_bytes(payload)
        workers: list[Worker] = []
        with EchoProcess(2) as servers:
            try:
                competitors = []  # (label, worker, impl)
                for loop in loops:
                    worker = Worker(SHARDNET_PYTHON, servers.addresses, loop=loop, concurrency=args.concurrency)
                    workers.append(worker)
                    suffix = f" [{loop}]" if len(loops) > 1 else ""
                    competitors.append((f"bare grpc.aio {worker.info['grpc']}{suffix}", worker, "bare"))
                    if args.task_row:
                        competitors.append((f"bare + asyncio.Task{suffix}", worker, "bare-task"))
                        competitors.append((f"bare + Task + trailing{suffix}", worker, "bare-task-trailing"))
                    if args.contract_variant:
                        competitors.append((f"bare, call started before a held loop's Task{suffix}", worker,
                                            "bare-started-task"))
                    if args.steps:
                        for step, label in STEPS:
                            competitors.append((f"{label}{suffix}", worker, step))
                    competitors.append((f"shardnet pool{suffix}", worker, "shardnet"))
                    if args.steps:
                        competitors.append((f"shardnet pool on the Cython call{suffix}", worker, "shardnet-core"))
                    if args.call_path:
                        competitors.append((f"shardnet pool.call{suffix}", worker, "shardnet-call"))
                if args.peer == "jina":
                    for loop in loops:  # Jina's pool on each loop shardnet runs on: same-loop pairs are judged
                        worker = Worker(JINA_PYTHON, servers.addresses, loop=loop, concurrency=args.concurrency)
                        workers.append(worker)
                        suffix = f" [{loop}]" if len(loops) > 1 else ""
                        competitors.append((f"bare grpc.aio {worker.info['grpc']} (jina venv){suffix}", worker, "bare"))
                        competitors.append((f"jina 3.34 pool{suffix}", worker, "jina"))

                for _label, worker, impl in competitors:
                    worker.run(impl, args.warmup, payload_path)
                tallies = {label: Tally(label) for label, _, _ in competitors}
                for round_index in range(args.rounds):
                    for label, worker, impl in rotated(competitors, round_index):
                        tallies[label].add(worker.run(impl, per_round, payload_path))

                profile_result = None
                if args.profile:
                    worker = workers[0]
                    worker.command(cmd="run", impl="shardnet", n=per_round, payload=payload_path,
                                   profile=args.profile)
                    profile_result = args.profile
            finally:
                for worker in workers:  # clients first, so no call sees its server go
                    worker.stop()

    print(f"# pool overhead: 2 echo servers (own process), concurrency {args.concurrency}, "
          f"{args.rounds} interleaved rounds x {per_round} requests per client, warm-up {args.warmup} excluded, "
          f"request {len(payload)} B; {machine_line()}; loop {args.loop}")
    rows = []
    for label, _, _ in competitors:
        tally = tallies[label]
        loop_us = 1e6 * sum(result["loop_cpu"] for result in tally.rounds) / tally.requests
        rows.append([label, tally.requests, tally.rps, tally.p(0.50), tally.p(0.99), tally.cpu_per_request_us,
                     loop_us, tally.failures])
    print(table(["client", "requests", "rps", "p50 ms", "p99 ms", "CPU us/req", "loop thread us/req", "failures"],
                rows))

    def ratio_row(label, numerator, denominator):
        a, b = tallies[numerator], tallies[denominator]
        per_round_cpu = [ra["cpu"] / rb["cpu"] for ra, rb in zip(a.rounds, b.rounds) if rb["cpu"]]
        low, high = paired_ratio_interval([r["cpu"] for r in a.rounds], [r["cpu"] for r in b.rounds])
        return [label, a.rps / b.rps, a.p(0.5) / b.p(0.5), a.p(0.99) / b.p(0.99),
                a.cpu_per_request_us / b.cpu_per_request_us, f"{low:.2f}-{high:.2f}", median(per_round_cpu),
                f"{min(per_round_cpu):.2f}-{max(per_round_cpu):.2f}"]

    def interval(row):
        return f"; 95 % interval {row[5]} over rounds"

    ratio_rows, checks = [], []
    checks.append(verdict("failed requests, all clients", sum(t.failures for t in tallies.values()), "<=", 0))
    labels = [label for label, _, _ in competitors]
    for loop in loops:
        suffix = f" [{loop}]" if len(loops) > 1 else ""
        bare = next(label for label in labels if label.startswith("bare grpc.aio") and label.endswith(suffix) and "jina" not in label)
        ours = f"shardnet pool{suffix}"
        ratio_rows.append(ratio_row(f"shardnet / bare{suffix}", ours, bare))
        checks.append(verdict(f"CPU/req shardnet / bare{suffix}", ratio_rows[-1][4], "<=", 1.05,
                              interval(ratio_rows[-1])))
        checks.append(verdict(f"rps shardnet / bare{suffix}", ratio_rows[-1][1], ">=", 0.95))
        if args.task_row:
            contract = f"bare + Task + trailing{suffix}"
            ratio_rows.append(ratio_row(f"bare + Task / bare{suffix}", f"bare + asyncio.Task{suffix}", bare))
            ratio_rows.append(ratio_row(f"bare + Task + trailing / bare{suffix}", contract, bare))
            ratio_rows.append(ratio_row(f"shardnet / (bare + Task + trailing){suffix}", ours, contract))
        if args.contract_variant:
            variant = f"bare, call started before a held loop's Task{suffix}"
            ratio_rows.append(ratio_row(f"started-before-Task / bare{suffix}", variant, bare))
            ratio_rows.append(ratio_row(f"started-before-Task / (bare + Task + trailing){suffix}", variant,
                                        f"bare + Task + trailing{suffix}"))
        if args.call_path:
            ratio_rows.append(ratio_row(f"pool.call / bare{suffix}", f"shardnet pool.call{suffix}", bare))
        if args.steps:
            floor = f"bare + Task + trailing{suffix}"
            for _step, label in STEPS:
                ratio_rows.append(ratio_row(f"{label} / (bare + Task + trailing){suffix}", f"{label}{suffix}", floor))
            ratio_rows.append(ratio_row(f"shardnet / pool on the Cython call{suffix}", ours,
                                        f"shardnet pool on the Cython call{suffix}"))
    if len(loops) > 1:
        ratio_rows.append(ratio_row("bare uvloop / asyncio", "bare grpc.aio " + labels[0].split()[2] + " [uvloop]",
                                    labels[0]))
        ratio_rows.append(ratio_row("shardnet uvloop / asyncio", "shardnet pool [uvloop]", "shardnet pool [asyncio]"))
    if args.peer == "jina":
        for loop in loops:
            suffix = f" [{loop}]" if len(loops) > 1 else ""
            jina_bare = next(label for label in labels if "(jina venv)" in label and label.endswith(suffix))
            ratio_rows.append(ratio_row(f"jina / bare (jina venv){suffix}", f"jina 3.34 pool{suffix}", jina_bare))
            ratio_rows.append(ratio_row(f"shardnet / jina{suffix}", f"shardnet pool{suffix}", f"jina 3.34 pool{suffix}"))
            checks.append(verdict(f"CPU/req shardnet / jina{suffix}", ratio_rows[-1][4], "<=", 0.80,
                                  interval(ratio_rows[-1])))
    print()
    print(table(["ratio", "rps", "p50", "p99", "CPU/req", "CPU/req 95 % interval", "CPU/req median of rounds",
                 "CPU/req range"], ratio_rows))
    print("(95 % interval: of the CPU/req ratio, the run's rounds drawn again with replacement, pairs kept)")
    print()
    print("targets:")
    print("\n".join(checks))

    if profile_result:
        print()
        print(f"# cProfile of one shardnet round ({per_round} requests), top 25 by own time; full dump in {profile_result}")
        stats = pstats.Stats(profile_result)
        stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    run_script(main)
