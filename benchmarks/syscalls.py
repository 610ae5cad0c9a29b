"""Benchmark 1 (supporting): the system calls and thread switches each client makes per request.

CPU time says how much a client costs, not where. Here ``perf stat`` counts, in
the client's process while it runs one round, the kernel's tracepoints: every
system call, the ``getpid`` and ``epoll_wait`` calls among them, and the
scheduler's switches. Python 3.11's ``asyncio.get_running_loop()`` makes a
``getpid()`` system call each time, and ``asyncio.create_task`` calls it: a
client that returns a Task per request, as Jina's contract (and so
``send_requests_once``) asks, pays one more per request than the bare client.
Tracing slows every system call down, so the CPU column here is higher than
``pool_overhead.py``'s; compare counts.

    python benchmarks/syscalls.py            # about 40 s; needs perf and kernel tracepoints (Linux)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from _common import SHARDNET_PYTHON, EchoProcess, Worker, exit_on_sigterm, machine_line, rotated, run_script, table
from pool_overhead import request_bytes

EVENTS = {  # perf's event name -> column
    "raw_syscalls:sys_enter": "syscalls/req",
    "syscalls:sys_enter_getpid": "getpid/req",
    "syscalls:sys_enter_epoll_wait": "epoll_wait/req",
    "sched:sched_switch": "switches/req",
}
CLIENTS = (
    ("bare grpc.aio", "bare"),
    ("bare + Task + trailing", "bare-task-trailing"),
    ("bare, call started before a held loop's Task", "bare-started-task"),
    ("shardnet pool", "shardnet"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4_000, help="requests per client per round (default 4000)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    return parser.parse_args(argv)


def perf_available() -> str:
    """Why perf cannot count here, or '' when it can."""
    if shutil.which("perf") is None:
        return "perf is not installed"
    probe = subprocess.run(["perf", "stat", "-x,", "-e", ",".join(EVENTS), "true"], capture_output=True, text=True)
    if probe.returncode != 0 or "<not supported>" in probe.stderr:
        return f"perf cannot read the tracepoints {', '.join(EVENTS)}: {probe.stderr.strip()[-300:]}"
    return ""


def counted_round(worker: Worker, impl: str, requests: int, payload_path: str, scratch: str) -> tuple[dict, dict]:
    """One round of ``impl`` with perf attached to the worker process: (perf's counts, the worker's result)."""
    output = os.path.join(scratch, "perf.csv")
    perf = subprocess.Popen(["perf", "stat", "-x,", "-o", output, "-e", ",".join(EVENTS), "-p",
                             str(worker.process.pid)], stderr=subprocess.DEVNULL)
    try:
        worker.run(impl, 200, payload_path)  # perf is attached once this answers, before the counted round
        result = worker.run(impl, requests, payload_path)
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(10)
    counts = {}
    for line in Path(output).read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in EVENTS and fields[0].replace(".", "").isdigit():
            counts[fields[2]] = float(fields[0])
    return counts, result


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    why_not = perf_available()
    if why_not:
        sys.exit(f"syscalls.py: {why_not}")
    totals = {label: {"n": 0, "cpu": 0.0, **{event: 0.0 for event in EVENTS}} for label, _ in CLIENTS}
    with tempfile.TemporaryDirectory() as scratch:
        payload_path = os.path.join(scratch, "request.bin")
        Path(payload_path).write_bytes(request_bytes(64))
        with EchoProcess(2) as servers:
            worker = Worker(SHARDNET_PYTHON, servers.addresses, loop=args.loop)
            try:
                for _, impl in CLIENTS:
                    worker.run(impl, 2_000, payload_path)  # warm-up
                for round_index in range(args.rounds):
                    for label, impl in rotated(CLIENTS, round_index):
                        counts, result = counted_round(worker, impl, args.requests, payload_path, scratch)
                        total = totals[label]
                        # the 200 requests run while perf attaches are counted too: a share of every row alike
                        total["n"] += args.requests + 200
                        total["cpu"] += result["cpu"] * (args.requests + 200) / args.requests
                        for event, value in counts.items():
                            total[event] += value
            finally:
                worker.stop()
    print(f"# system calls per request: 2 echo servers (own process), concurrency 64, {args.rounds} interleaved "
          f"rounds x {args.requests} requests per client, perf attached; {machine_line()}; loop {args.loop}")
    rows = []
    base = totals[CLIENTS[0][0]]
    for label, _ in CLIENTS:
        total = totals[label]
        per = [total[event] / total["n"] for event in EVENTS]
        extra = (total["raw_syscalls:sys_enter"] / total["n"]) - (base["raw_syscalls:sys_enter"] / base["n"])
        rows.append([label, 1e6 * total["cpu"] / total["n"], *per, extra])
    print(table(["client", "CPU us/req (traced)", *EVENTS.values(), "syscalls/req over bare"], rows))
    return 0


if __name__ == "__main__":
    run_script(main)
