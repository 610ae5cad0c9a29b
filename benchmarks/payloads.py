"""Benchmark 5: throughput in MB/s for 1 KB, 100 KB and 4 MB requests, shardnet pool versus a bare client.

Same setup as benchmark 1 (two echo servers in their own process, the
clients in worker processes, one at a time, interleaved rounds after a
warm-up), one size at a time. MB/s counts the request bytes of answered
requests (the echo sends as many back).

    python benchmarks/payloads.py               # about 20 s
    python benchmarks/payloads.py --peer jina   # adds Jina 3.34's pool
    python benchmarks/payloads.py --quick
"""

from __future__ import annotations

import argparse
import os
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
    rotated,
    run_script,
    table,
    verdict,
)

# size label, document bytes, requests per round, concurrency
SIZES = [("1 KB", 1024, 3000, 32), ("100 KB", 100 * 1024, 1000, 16), ("4 MB", 4 * 1024 * 1024, 40, 4)]


def request_bytes(size: int) -> bytes:
    from shardnet.protocol.documents import Document
    from shardnet.protocol.messages import DataRequest

    return DataRequest(docs=[Document(blob=os.urandom(size))], endpoint="/").to_bytes()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peer", choices=("none", "jina"), default="none")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--quick", action="store_true", help="3 rounds of half the requests")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    scale = 0.5 if args.quick else 1.0
    if args.quick:
        args.rounds = 3

    rows, ratio_rows, checks = [], [], []
    with tempfile.TemporaryDirectory() as scratch, EchoProcess(2) as servers:
        workers = []
        try:
            ours = Worker(SHARDNET_PYTHON, servers.addresses, loop=args.loop)
            workers.append(ours)
            competitors = [(f"bare grpc.aio {ours.info['grpc']}", ours, "bare"), ("shardnet pool", ours, "shardnet")]
            if args.peer == "jina":
                peer = Worker(JINA_PYTHON, servers.addresses, loop=args.loop)
                workers.append(peer)
                competitors.append(("jina 3.34 pool", peer, "jina"))
            for label, size, per_round, concurrency in SIZES:
                path = os.path.join(scratch, f"{size}.bin")
                payload = request_bytes(size)
                Path(path).write_bytes(payload)
                per_round = max(4, int(per_round * scale))
                tallies = {name: Tally(name) for name, _, _ in competitors}
                for name, worker, impl in competitors:  # warm-up
                    worker.command(cmd="run", impl=impl, n=max(4, per_round // 4), payload=path, concurrency=concurrency)
                for round_index in range(args.rounds):
                    for name, worker, impl in rotated(competitors, round_index):
                        tallies[name].add(worker.command(cmd="run", impl=impl, n=per_round, payload=path,
                                                         concurrency=concurrency))
                for name, _, _ in competitors:
                    tally = tallies[name]
                    megabytes = (tally.requests - tally.failures) * len(payload) / 1e6  # answered ones only
                    rows.append([label, name, concurrency, tally.requests, megabytes / tally.wall, tally.p(0.5),
                                 tally.p(0.99), tally.cpu_per_request_us, tally.failures])
                bare, shardnet = tallies[competitors[0][0]], tallies["shardnet pool"]
                per_round_mbs = [((a["n"] - a["failures"]) / a["wall"]) / ((b["n"] - b["failures"]) / b["wall"])
                                 for a, b in zip(shardnet.rounds, bare.rounds)]  # answered requests, as the MB/s
                ratio_rows.append([label, "shardnet / bare", shardnet.rps / bare.rps, median(per_round_mbs),
                                   shardnet.cpu_per_request_us / bare.cpu_per_request_us])
                checks.append(verdict(f"{label}: MB/s shardnet / bare", shardnet.rps / bare.rps, ">=", 0.95))
                checks.append(verdict(f"{label}: failed requests", sum(t.failures for t in tallies.values()), "<=", 0))
                if args.peer == "jina":
                    jina = tallies["jina 3.34 pool"]
                    ratio_rows.append([label, "shardnet / jina", shardnet.rps / jina.rps, float("nan"),
                                       shardnet.cpu_per_request_us / jina.cpu_per_request_us])
        finally:
            for worker in workers:
                worker.stop()

    print(f"# payloads: 2 echo servers (own process), {args.rounds} interleaved rounds per size, warm-up excluded; "
          f"{machine_line()}; loop {args.loop}")
    print(table(["size", "client", "conc", "requests", "MB/s", "p50 ms", "p99 ms", "CPU us/req", "failures"], rows))
    print()
    print(table(["size", "ratio", "MB/s", "MB/s median of rounds", "CPU/req"], ratio_rows))
    print()
    print("targets (the issue sets none for payloads; 0.95 as for benchmark 1):")
    print("\n".join(checks))
    return 0


if __name__ == "__main__":
    run_script(main)
