"""Benchmark 2b (supporting): does any gRPC or scheduler knob move the floor a head stands on?

``head_overhead.py`` puts shardnet's ANY head within a few per cent of its
floor, ``_forwarder.py``: a raw-bytes grpc.aio forwarder that does nothing but
pass each request on. The issue's ANY targets (0.5x a direct call, 1.3x Jina's
head) sit at or above that floor on a 2-core machine, so a head can only meet
them if something makes the forwarding itself cheaper. This script runs the
floor as it is and with each knob below, in front of the same two Echo workers,
with the same load client, in interleaved rotated rounds (as
``head_overhead.py``), and prints each row against the plain floor:

- ``grpc.optimization_target=throughput`` on the forwarder's server and channels;
- gRPC core experiments (``GRPC_EXPERIMENTS``, set in that forwarder's
  environment only) that touch its pollers, listeners and TCP reads;
- gRPC's thread-pool server and blocking client calls instead of grpc.aio;
- the forwarder under SCHED_BATCH, whose woken threads wait for the scheduler
  tick instead of preempting the thread that runs (a process-wide scheduling
  choice, not a gRPC one);
- shardnet's own ANY heads (``p2c_ewma`` and ``round_robin``), to place them,
  and the ``p2c_ewma`` head started under SCHED_BATCH with ``chrt --batch 0``
  (when util-linux's ``chrt`` is installed).

    python benchmarks/floor_variants.py            # about 2.5 minutes
    python benchmarks/floor_variants.py --quick    # about 45 s
    python benchmarks/floor_variants.py --concurrency 1 --cpu-hogs 2   # light load on CPUs others keep busy
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # this script's own gRPC use: no INFO lines in the tables

from _common import _stop_process, exit_on_sigterm, machine_line, rotated, run_script, table  # noqa: E402
from head_overhead import (  # noqa: E402
    Child,
    Competitor,
    LoadClient,
    forwarder,
    request_bytes,
    round_ratios,
    shardnet_head,
    shardnet_worker,
)

FLOOR = "floor: bare forwarder"
DIRECT = "direct to one worker"
# gRPC 1.78's experiments that concern polling, listeners or TCP reads ('-name' turns a default-on one off)
DEFAULT_EXPERIMENTS = (
    "event_engine_poller_for_python",
    "-event_engine_client,-event_engine_listener",
    "pollset_alternative,event_engine_callback_cq",
    "tcp_rcv_lowat,tcp_frame_size_tuning",
    "prioritize_finished_requests",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved measured rounds")
    parser.add_argument("--round-seconds", type=float, default=0.7, help="about how long one round of a row lasts")
    parser.add_argument("--warmup-seconds", type=float, default=1.5, help="excluded warm-up per row")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight from the client")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop",
                        help="event loop of the forwarders, heads, workers and client")
    parser.add_argument("--experiment", action="append", dest="experiments", metavar="GRPC_EXPERIMENTS",
                        help="a GRPC_EXPERIMENTS value to run a floor row under (repeatable; default: "
                             + "; ".join(DEFAULT_EXPERIMENTS) + ")")
    parser.add_argument("--cpu-hogs", type=int, default=0, metavar="N",
                        help="N busy-loop processes running throughout: CPUs taken by work that is not the pipeline")
    parser.add_argument("--quick", action="store_true", help="4 short rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.round_seconds, args.warmup_seconds = 4, 0.5, 0.6
    args.experiments = args.experiments or list(DEFAULT_EXPERIMENTS)
    return args


def floor_rows(replicas: list[str], logs: Path, args: argparse.Namespace) -> dict[str, Child]:
    """The plain floor and each variant, started (not yet ready)."""
    loop = args.loop
    rows = {
        FLOOR: forwarder("floor", replicas, logs, loop),
        "floor, optimization_target=throughput": forwarder(
            "floor-throughput", replicas, logs, loop, extra=["--option", "grpc.optimization_target=throughput"]),
    }
    for index, experiments in enumerate(args.experiments):
        rows[f"floor, GRPC_EXPERIMENTS={experiments}"] = forwarder(
            f"floor-experiment-{index}", replicas, logs, loop, env=dict(os.environ, GRPC_EXPERIMENTS=experiments))
    rows["floor, gRPC thread-pool server"] = forwarder("floor-sync", replicas, logs, loop, extra=["--server", "sync"])
    rows["floor, SCHED_BATCH"] = forwarder("floor-batch", replicas, logs, loop, extra=["--sched-batch"])
    rows["shardnet head ANY, p2c_ewma"] = shardnet_head("head-p2c", [replicas], logs, loop)
    rows["shardnet head ANY, round robin"] = shardnet_head("head-rr", [replicas], logs, loop, balancer="round_robin")
    if shutil.which("chrt"):  # util-linux: how an operator would start a head under SCHED_BATCH
        rows["shardnet head ANY, p2c_ewma, SCHED_BATCH"] = shardnet_head(
            "head-p2c-batch", [replicas], logs, loop, launcher=["chrt", "--batch", "0"])
    return rows


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        for line in status.splitlines():
            if "ctxt_switches:" in line:  # voluntary_ctxt_switches, nonvoluntary_ctxt_switches
                total += int(line.split()[1])
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started = time.monotonic()
    children: list[Child] = []
    client: Optional[LoadClient] = None
    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(scratch)
        payload = logs / "request.bin"
        payload.write_bytes(request_bytes("/index", 4, 64))
        hogs: list[subprocess.Popen] = []
        try:
            hogs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.cpu_hogs))
            workers = [shardnet_worker(f"worker-{index}", logs, args.loop, None) for index in range(2)]
            children.extend(workers)
            for worker in workers:
                worker.wait_ready_line()
            replicas = [worker.address for worker in workers]
            backends = [worker.pid for worker in workers]
            rows = floor_rows(replicas, logs, args)
            children.extend(rows.values())
            competitors = [Competitor(DIRECT, "direct", "/index", None, backends[:1], args.concurrency)]
            for label, child in rows.items():
                child.wait_ready_line()
                competitors.append(Competitor(label, child.label, "/index", child, backends, args.concurrency))
            targets = {"direct": replicas[0]} | {child.label: child.address for child in rows.values()}
            client = LoadClient(targets, loop=args.loop, concurrency=args.concurrency)
            for competitor in competitors:
                warm = competitor.run(client, args.warmup_seconds, str(payload), record=False)
                if warm["failures"]:
                    where = competitor.head or workers[0]
                    raise RuntimeError(f"{competitor.label}: {warm['failures']} of {warm['n']} warm-up requests "
                                       f"failed; {where.label}'s log ends:\n{where.tail()}")
            switches = dict.fromkeys(rows, 0)  # the forwarding process's context switches in measured rounds
            for round_index in range(args.rounds):
                for competitor in rotated(competitors, round_index):
                    before = context_switches(competitor.head.pid) if competitor.head else 0
                    competitor.run(client, args.round_seconds, str(payload), record=True)
                    if competitor.head:
                        switches[competitor.label] += context_switches(competitor.head.pid) - before
        finally:
            if client is not None:
                client.stop()
            for child in children:
                child.terminate()
            for child in reversed(children):
                child.stop()
            for hog in hogs:
                _stop_process(hog)

    by_label = {competitor.label: competitor for competitor in competitors}
    floor, direct = by_label[FLOOR], by_label[DIRECT]
    print(f"# floor variants: 2 Echo workers, client at concurrency {args.concurrency}, {args.loop} everywhere, "
          f"{args.rounds} interleaved rounds of {args.round_seconds:g}s per row after {args.warmup_seconds:g}s of "
          f"warm-up; {args.cpu_hogs} busy-loop processes alongside; total {time.monotonic() - started:.0f}s; "
          f"{machine_line()}")
    print(table(
        ["row", "requests", "rps", "p50 ms", "p99 ms", "forwarder CPU us/req", "switches/req",
         "backends CPU us/req", "rps / floor", "CPU/req / floor", "rps / direct"],
        [[c.label, c.tally.requests, c.tally.rps, c.tally.p(0.5), c.tally.p(0.99), c.head_us(),
          switches[c.label] / c.tally.requests if c.head else float("nan"), c.backend_us(),
          *round_ratios(c, floor), round_ratios(c, direct)[0]] for c in competitors],
    ))
    print("(ratios: medians of the per-round ratios; 'forwarder' is the floor, a variant or a head: its process's "
          "CPU time, and its threads' context switches, voluntary and not)")
    return 0


if __name__ == "__main__":
    run_script(main)
