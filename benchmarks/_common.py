"""Shared pieces of the benchmark scripts: server processes, client workers, statistics, tables.

Standard library only, so that the client worker can import it from the Jina
peer's virtual environment as well as from shardnet's.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARDNET_PYTHON = sys.executable
JINA_PYTHON = os.environ.get("SHARDNET_JINA_PYTHON", str(ROOT / ".venv-jina" / "bin" / "python"))


# -- processes ----------------------------------------------------------------------


def _stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a child we started: continue it (it may be SIGSTOPped), SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGCONT)
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
        process.wait(timeout)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        process.kill()
        process.wait(timeout)


class EchoProcess:
    """``python -m shardnet.testing`` in a child process: echo servers on loopback.

    >>> with EchoProcess(2) as servers:          # doctest: +SKIP
    ...     servers.addresses
    ['127.0.0.1:40123', '127.0.0.1:40125']
    """

    def __init__(self, count: int = 1, *, delays: Sequence[float] = (0.0,), names: Sequence[str] = (), loop: str = "asyncio"):
        self.count = count
        self.delays = list(delays)
        self.names = list(names)
        self.loop = loop
        self.process: Optional[subprocess.Popen] = None
        self.addresses: list[str] = []

    def start(self) -> "EchoProcess":
        return self.launch().wait_ready()

    def launch(self) -> "EchoProcess":
        """Start the child without waiting for it (start several, then ``wait_ready`` on each)."""
        command = [
            SHARDNET_PYTHON, "-m", "shardnet.testing",
            "--servers", str(self.count),
            "--delays", ",".join(str(delay) for delay in self.delays),
            "--loop", self.loop,
            "--stop-on-eof",
        ]
        if self.names:
            command += ["--names", ",".join(self.names)]
        env = dict(os.environ)
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                        env=env)
        return self

    def wait_ready(self) -> "EchoProcess":
        try:
            line = self.process.stdout.readline()
            if not line.startswith("READY "):
                raise RuntimeError(f"echo servers did not start: {line!r}")
        except BaseException:
            self.stop()
            raise
        self.addresses = line.split()[1:]
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)
            self.process = None

    def __enter__(self) -> "EchoProcess":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def start_all(processes: Sequence["EchoProcess"]) -> None:
    """Launch every echo process at once, then wait for each; on failure stop them all."""
    try:
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready()
    except BaseException:
        for process in processes:
            process.stop()
        raise


def stop_all(processes: Sequence["EchoProcess"]) -> None:
    """Stop every echo process, signalling all of them before waiting for any."""
    for process in processes:
        if process.process is not None and process.process.poll() is None:
            try:
                process.process.send_signal(signal.SIGCONT)
                process.process.terminate()
            except OSError:
                pass
    for process in processes:
        process.stop()


class JsonProcess:
    """A benchmark process (a script of this folder) in a given Python, driven by one JSON command per line."""

    def __init__(self, python: str, script: str, arguments: Sequence[str] = (), extra_env: Optional[dict] = None):
        env = dict(os.environ, JINA_OPTOUT_TELEMETRY="1")
        env.pop("PYTHONPATH", None)  # never let one venv see the other's packages
        env.update(extra_env or {})
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        self.process = subprocess.Popen([python, str(HERE / script), *arguments], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            self.info = self._read()
        except BaseException:
            self.stop()
            raise

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark process {self.process.args[:2]} exited (code {self.process.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark process failed: {reply['error']}")
        return reply

    def command(self, **command: Any) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        _stop_process(self.process)


class Worker(JsonProcess):
    """A client worker process (``_client_worker.py``)."""

    def __init__(self, python: str, addresses: Sequence[str], *, loop: str = "asyncio", concurrency: int = 64,
                 extra_env: Optional[dict] = None):
        arguments = ["--loop", loop, "--concurrency", str(concurrency), *addresses]
        super().__init__(python, "_client_worker.py", arguments, extra_env)

    def run(self, impl: str, requests: int, payload_bytes: int) -> dict:
        return self.command(cmd="run", impl=impl, n=requests, payload=payload_bytes)


# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in 0..1)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


class Tally:
    """Accumulates rounds of one competitor: requests, wall time, CPU time and latencies."""

    def __init__(self, name: str):
        self.name = name
        self.requests = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.failures = 0
        self.latencies: list[float] = []
        self.rounds: list[dict] = []

    def add(self, result: dict) -> None:
        self.requests += result["n"]
        self.wall += result["wall"]
        self.cpu += result["cpu"]
        self.failures += result.get("failures", 0)
        self.latencies.extend(result["lat"])
        self.rounds.append(result)

    @property
    def rps(self) -> float:
        """Answered requests per second: a failure that came back fast is no throughput."""
        return (self.requests - self.failures) / self.wall if self.wall else math.nan

    @property
    def cpu_per_request_us(self) -> float:
        return 1e6 * self.cpu / self.requests if self.requests else math.nan

    def p(self, fraction: float) -> float:
        return 1e3 * percentile(self.latencies, fraction)


def rotated(items: Sequence[Any], round_index: int) -> list:
    """``items`` starting at position ``round_index``: over the rounds each competitor runs first, middle
    and last equally often, so whatever favours a place in the round (a warm cache, a neighbour's burst)
    does not favour one competitor."""
    shift = round_index % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def paired_ratio_interval(
    numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.95, draws: int = 4000
) -> tuple[float, float]:
    """A bootstrap interval for sum(numerators) / sum(denominators) over paired rounds: the rounds are drawn
    again with replacement, pairs kept together, so that a ratio read off one run says how far another run
    of the same length could land from it. Seeded: the same rounds give the same interval."""
    pairs = [(a, b) for a, b in zip(numerators, denominators)]
    if len(pairs) < 2:
        return math.nan, math.nan
    draw = random.Random(0).choices
    ratios = []
    for _ in range(draws):
        sample = draw(pairs, k=len(pairs))
        below = sum(b for _, b in sample)
        if below:
            ratios.append(sum(a for a, _ in sample) / below)
    tail = (1 - confidence) / 2
    return percentile(ratios, tail), percentile(ratios, 1 - tail)


# -- output ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned numbers."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    lines = ["  ".join(str(header).rjust(width) if i else str(header).ljust(width)
                       for i, (header, width) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * width for width in widths))
    for row in cells:
        lines.append("  ".join(value.rjust(width) if i else value.ljust(width)
                               for i, (value, width) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def verdict(label: str, value: float, op: str, target: float, detail: str = "") -> str:
    met = value <= target if op == "<=" else value >= target
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)  # a count stays a count
    return f"  [{'met' if met else 'MISSED'}] {label}: {shown} (target {op} {target:g}){detail}"


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the ``finally`` blocks that stop child processes run."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def new_event_loop(kind: str):
    """A fresh event loop of the asked kind (``asyncio`` or ``uvloop``)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    import asyncio

    return asyncio.new_event_loop()


def machine_line() -> str:
    return f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}"


def run_script(main) -> None:
    """Run a benchmark's ``main()`` as the script's exit code; Ctrl-C exits 130 after the cleanup ran."""
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

