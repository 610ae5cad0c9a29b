"""Benchmark 2: what a head costs in front of its workers, against a direct call and against Jina's head.

Two ``shardnet worker``s serve ``shardnet.examples.echo:Echo`` (a handler that
does nothing), each in a process of its own. In front of them, each head in a
process of its own: a shardnet head shaped 1 shard x 2 replicas (ANY, on
``/index``) and one shaped 2 shards x 1 replica (ALL, on ``/search``), with
``--polling '{"/search": "ALL", "*": "ANY"}'``, on uvloop (the default when it
is installed) and on asyncio; a floor row, ``_forwarder.py``, the least a
grpc.aio process can do to pass a request on with a call per request; a
shardnet ANY head with ``--no-request-streams`` (a call per request to its
workers, where the others send on streams); with the peer, Jina 3.34 heads of
the same two shapes (``jina executor --native --runtime-cls HeadRuntime``, which
picks ALL on /search and ANY on /index from the ``endpoint`` metadata, and runs
on uvloop when installed, as it is in the peer's venv) in front of the same
workers. The workers also listen on Unix sockets (``--unix-socket``), and one
row puts a shardnet ANY head in front of them through those (``--connection
0=unix:/...``), as a head on its workers' machine can be set up; every other
row dials TCP. Heads balance with their default, ``p2c_ewma``; one more ANY
row runs ``--balancer round_robin``, to show what latency awareness costs when
every replica is healthy (``balancing.py`` shows what it buys when one is
not). A wide row puts a shardnet head (and a Jina head) in front of 64 echo
servers of ``python -m shardnet.testing`` in one process, ALL on ``/search``:
a head only needs replies.

The load comes from one client process (``_head_client.py``, bare grpc.aio,
closed loop), so no head shares a process with it. Rounds are interleaved
(direct, shardnet ANY, floor, jina ANY, shardnet ALL, jina ALL, ..., then the
same list rotated by one, so no row always runs first) after an excluded
warm-up; each round lasts about ``--round-seconds``. The
head's CPU time per request comes from ``/proc/PID/stat`` (utime + stime of
the head and any process it started) read before and after each of its rounds.
On a shared machine only the ratios mean much: the targets are checked on the
median of the per-round ratios (a pair's rounds run next to each other, but
where the rotation splits them).

    python benchmarks/head_overhead.py                  # about 2.5 minutes
    python benchmarks/head_overhead.py --quick          # about 30 s
    python benchmarks/head_overhead.py --peer none --head-loop uvloop
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # this script's own health checks: no INFO lines in the tables

from _common import (
    JINA_PYTHON,
    ROOT,
    SHARDNET_PYTHON,
    EchoProcess,
    Tally,
    Worker,
    _stop_process,
    exit_on_sigterm,
    machine_line,
    median,
    rotated,
    run_script,  # noqa: E402
    table,
    verdict,
)

DEPLOYMENT = "echo"
POLLING = json.dumps({"/search": "ALL", "*": "ANY"})
READY_TIMEOUT = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
UNIX_ROW = "shardnet head ANY, unix sockets [{loop}]"
UNARY_ROW = "shardnet head ANY, unary [{loop}]"
ROUND_ROBIN_ROW = "shardnet head ANY, round robin [{loop}]"


# -- processes ------------------------------------------------------------------------


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants, from ``/proc``."""
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                text = handle.read().decode()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
        own[int(entry)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += own.get(current, 0.0)
        stack.extend(children.get(current, ()))
    return total


class Child:
    """A server process we started: stderr to a log file, stopped (with its session, if it has one) on exit."""

    def __init__(self, label: str, command: Sequence[str], logs: Path, *, env: Optional[dict] = None,
                 own_session: bool = False):
        self.label = label
        self.log_path = logs / f"{label}.log"
        self.own_session = own_session
        self.address = ""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=log, cwd=ROOT, env=env, start_new_session=own_session)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return process_tree_cpu(self.pid)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _failed(self, why: str) -> RuntimeError:
        return RuntimeError(f"{self.label} {why}; its log ends:\n{self.tail()}")

    def wait_ready_line(self, timeout: float = READY_TIMEOUT) -> "Child":
        """Wait for ``... ready on HOST:PORT`` on stdout and keep the address."""
        deadline = time.monotonic() + timeout
        fd, buffer = self.process.stdout.fileno(), b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failed(f"printed no ready line within {timeout:g}s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise self._failed(f"exited with {self.process.wait()} before it was ready")
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode()
        if " ready on " not in line:
            raise self._failed(f"printed {line!r} instead of a ready line")
        self.address = line.rsplit(" ready on ", 1)[1].split()[0]
        return self

    def wait_serving(self, address: str, timeout: float = READY_TIMEOUT) -> "Child":
        """Poll gRPC health at ``address`` until it answers SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise self._failed(f"exited with {self.process.returncode} before serving")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise self._failed(f"did not serve on {address} within {timeout:g}s")
                time.sleep(0.1)
        self.address = address
        return self

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; ``stop`` waits, and kills what lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.send_signal(signal.SIGCONT)
                self.process.terminate()

    def stop(self) -> None:
        _stop_process(self.process)
        if self.own_session:  # whatever it started in its session goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.stdout is not None:
            self.process.stdout.close()


def shardnet_worker(label: str, logs: Path, loop: str, unix_socket: Optional[Path]) -> Child:
    listen = ["--unix-socket", str(unix_socket)] if unix_socket else []
    return Child(label, [SHARDNET_PYTHON, "-m", "shardnet", "worker", "--uses", "shardnet.examples.echo:Echo",
                         "--port", "0", "--loop", loop, *listen], logs)


def shardnet_head(label: str, shards: Sequence[Sequence[str]], logs: Path, loop: str,
                  balancer: str = "p2c_ewma", launcher: Sequence[str] = (), extra: Sequence[str] = ()) -> Child:
    """A ``shardnet head`` process; ``launcher`` goes before the command (``chrt --batch 0``, say), ``extra``
    after it."""
    connections = [f"--connection={shard}={address}" for shard, replicas in enumerate(shards) for address in replicas]
    command = [SHARDNET_PYTHON, "-m", "shardnet", "head", "--deployment", DEPLOYMENT, "--port", "0",
               "--polling", POLLING, "--loop", loop, "--balancer", balancer, *extra, *connections]
    return Child(label, [*launcher, *command], logs)


def forwarder(label: str, replicas: Sequence[str], logs: Path, loop: str, extra: Sequence[str] = (),
              env: Optional[dict] = None) -> Child:
    """``_forwarder.py``: the least a grpc.aio process can do to pass a request on (the floor of a head)."""
    script = Path(__file__).resolve().parent / "_forwarder.py"
    return Child(label, [SHARDNET_PYTHON, str(script), "--loop", loop, *extra, *replicas], logs, env=env)


def jina_head(label: str, shards: Sequence[Sequence[str]], logs: Path) -> tuple[Child, str]:
    """A Jina 3.34 head on a free port, and that address (it prints no ready line of ours)."""
    from shardnet.testing import free_port

    port = free_port()
    jina = str(Path(JINA_PYTHON).parent / "jina")
    env = dict(os.environ, JINA_OPTOUT_TELEMETRY="1")
    env.pop("PYTHONPATH", None)
    connection_list = json.dumps({str(shard): list(replicas) for shard, replicas in enumerate(shards)})
    command = [jina, "executor", "--native", "--runtime-cls", "HeadRuntime", "--polling", "ANY",
               "--port", str(port), "--host", "127.0.0.1", "--connection-list", connection_list]
    return Child(label, command, logs, env=env, own_session=True), f"127.0.0.1:{port}"


class LoadClient(Worker):
    """``_head_client.py`` in shardnet's Python; ``Worker``'s JSON-line plumbing, our own script."""

    def __init__(self, targets: dict[str, str], *, loop: str, concurrency: int):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        script = Path(__file__).resolve().parent / "_head_client.py"
        command = [SHARDNET_PYTHON, str(script), "--loop", loop, "--concurrency", str(concurrency),
                   *(f"{name}={address}" for name, address in targets.items())]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                        env=env)
        try:
            self.info = self._read()
        except BaseException:
            self.stop()
            raise


# -- load ---------------------------------------------------------------------------------


def request_bytes(endpoint: str, docs: int, size: int) -> bytes:
    """A DataRequest for ``endpoint`` (header and, when sent, metadata) with ``docs`` text documents."""
    from shardnet.protocol.documents import Document
    from shardnet.protocol.messages import DataRequest

    return DataRequest(docs=[Document(text="x" * size) for _ in range(docs)], endpoint=endpoint).to_bytes()


@dataclass
class Competitor:
    """One row: where the client sends, which endpoint, whose CPU is the head's and the backends'."""

    label: str
    target: str  # the client's name for the address it sends to
    endpoint: str
    head: Optional[Child]  # None for the direct call
    backends: list[int]  # pids of the processes behind it
    concurrency: int
    tally: Tally = field(init=False)
    head_cpu: list[float] = field(default_factory=list)
    backend_cpu: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tally = Tally(self.label)

    def run(self, client: LoadClient, seconds: float, payload: str, record: bool) -> dict:
        head_before = self.head.cpu() if self.head else 0.0
        backend_before = sum(process_tree_cpu(pid) for pid in self.backends)
        result = client.command(cmd="run", target=self.target, endpoint=self.endpoint, payload=payload,
                                seconds=seconds, concurrency=self.concurrency)
        head_spent = (self.head.cpu() - head_before) if self.head else 0.0
        backend_spent = sum(process_tree_cpu(pid) for pid in self.backends) - backend_before
        if record:
            self.tally.add(result)
            self.head_cpu.append(head_spent)
            self.backend_cpu.append(backend_spent)
        return result

    def head_us(self) -> float:
        return 1e6 * sum(self.head_cpu) / self.tally.requests if self.head and self.tally.requests else float("nan")

    def backend_us(self) -> float:
        return 1e6 * sum(self.backend_cpu) / self.tally.requests if self.tally.requests else float("nan")


def round_ratios(mine: Competitor, theirs: Competitor) -> tuple[float, float]:
    """Medians over the rounds of mine / theirs: throughput, and head CPU per request (nan when either has no head)."""
    pairs = list(zip(mine.tally.rounds, theirs.tally.rounds, mine.head_cpu, theirs.head_cpu))
    answered = lambda result: result["n"] - result.get("failures", 0)  # noqa: E731 (a fast failure is no throughput)
    rps = median((answered(a) / a["wall"]) / (answered(b) / b["wall"]) for a, b, _, _ in pairs)
    cpu = median((cpu_a / a["n"]) / (cpu_b / b["n"]) for a, b, cpu_a, cpu_b in pairs if cpu_a and cpu_b)
    return rps, cpu


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=14, help="interleaved measured rounds (default 14)")
    parser.add_argument("--round-seconds", type=float, default=0.7, help="about how long one round of a row lasts")
    parser.add_argument("--warmup-seconds", type=float, default=1.5, help="excluded warm-up per competitor")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight from the client")
    parser.add_argument("--docs", type=int, default=4, help="documents per request (default 4)")
    parser.add_argument("--doc-bytes", type=int, default=64, help="text size of each document")
    parser.add_argument("--wide", type=int, default=64, help="shards of the wide ALL row (0: skip it)")
    parser.add_argument("--wide-concurrency", type=int, default=8,
                        help="requests in flight on the wide rows (each fans out to every shard)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the row of a minimal raw-bytes grpc.aio forwarder (what a head cannot go below)")
    parser.add_argument("--no-unix", dest="unix", action="store_false",
                        help="skip the row of a shardnet ANY head dialing its workers over Unix sockets")
    parser.add_argument("--no-unary", dest="unary", action="store_false",
                        help="skip the row of a shardnet ANY head calling its workers unary (--no-request-streams)")
    parser.add_argument("--no-round-robin", dest="round_robin", action="store_false",
                        help="skip the row of a shardnet ANY head balancing round robin instead of p2c_ewma")
    parser.add_argument("--peer", choices=("auto", "none", "jina"), default="auto",
                        help="compare with Jina 3.34 heads (auto: when the Jina venv exists)")
    parser.add_argument("--head-loop", choices=("asyncio", "uvloop", "both"), default=None,
                        help="event loop of the shardnet heads (--loop); 'both': a row for each (the default, "
                             "uvloop alone with --quick)")
    parser.add_argument("--worker-loop", choices=("asyncio", "uvloop"), default="uvloop",
                        help="event loop of the shardnet workers (uvloop, as Jina's own workers use)")
    parser.add_argument("--client-loop", choices=("asyncio", "uvloop"), default="uvloop",
                        help="event loop of the load client (uvloop: the client takes less of the shared CPUs)")
    parser.add_argument("--quick", action="store_true", help="about 30 s: 3 short rounds, uvloop heads only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.round_seconds, args.warmup_seconds = 3, 0.6, 0.6
    if args.head_loop is None:
        args.head_loop = "uvloop" if args.quick else "both"
    if args.peer == "auto":
        args.peer = "jina" if os.path.exists(JINA_PYTHON) else "none"
    elif args.peer == "jina" and not os.path.exists(JINA_PYTHON):
        sys.exit(f"--peer jina needs the Jina 3.34 venv at {JINA_PYTHON} (or set SHARDNET_JINA_PYTHON)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    head_loops = ["uvloop", "asyncio"] if args.head_loop == "both" else [args.head_loop]
    started = time.monotonic()
    children: list[Child] = []
    echo: Optional[EchoProcess] = None
    client: Optional[LoadClient] = None
    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(scratch)
        payloads = {}
        for endpoint in ("/index", "/search"):
            path = logs / f"request{endpoint.replace('/', '-')}.bin"
            path.write_bytes(request_bytes(endpoint, args.docs, args.doc_bytes))
            payloads[endpoint] = str(path)
        try:
            workers: list[Child] = []
            for index in range(2):
                unix_socket = logs / f"worker-{index}.sock" if args.unix else None
                workers.append(shardnet_worker(f"worker-{index}", logs, args.worker_loop, unix_socket))
                children.append(workers[-1])
            if args.wide:
                echo = EchoProcess(args.wide).launch()
            for worker in workers:
                worker.wait_ready_line()
            worker_pids = [worker.pid for worker in workers]
            replicas = [worker.address for worker in workers]
            shapes = {"ANY": ("/index", [replicas]), "ALL": ("/search", [[address] for address in replicas])}

            concurrency = args.concurrency
            competitors = [Competitor("direct to one worker", "direct", "/index", None, worker_pids[:1], concurrency)]
            for kind, (endpoint, shape) in shapes.items():
                for loop in head_loops:
                    suffix = f" [{loop}]" if len(head_loops) > 1 else ""
                    head = shardnet_head(f"sn-{kind}-{loop}", shape, logs, loop)
                    children.append(head)
                    competitors.append(Competitor(f"shardnet head {kind}{suffix}", head.label, endpoint, head,
                                                  worker_pids, concurrency))
                if kind == "ANY" and args.unix:
                    sockets = [f"unix:{logs / f'worker-{index}.sock'}" for index in range(len(workers))]
                    head = shardnet_head(f"sn-{kind}-unix", [sockets], logs, head_loops[0])
                    children.append(head)
                    competitors.append(Competitor(UNIX_ROW.format(loop=head_loops[0]), head.label, endpoint, head,
                                                  worker_pids, concurrency))
                if kind == "ANY" and args.unary:
                    head = shardnet_head(f"sn-{kind}-unary", shape, logs, head_loops[0],
                                         extra=["--no-request-streams"])
                    children.append(head)
                    competitors.append(Competitor(UNARY_ROW.format(loop=head_loops[0]), head.label, endpoint,
                                                  head, worker_pids, concurrency))
                if kind == "ANY" and args.round_robin:
                    head = shardnet_head(f"sn-{kind}-rr", shape, logs, head_loops[0], balancer="round_robin")
                    children.append(head)
                    competitors.append(Competitor(ROUND_ROBIN_ROW.format(loop=head_loops[0]), head.label, endpoint,
                                                  head, worker_pids, concurrency))
                if kind == "ANY" and args.floor:
                    head = forwarder("floor", replicas, logs, head_loops[0])
                    children.append(head)
                    competitors.append(Competitor(f"floor: bare forwarder ANY [{head_loops[0]}]", head.label,
                                                  endpoint, head, worker_pids, concurrency))
                if args.peer == "jina":
                    head, head.address = jina_head(f"jina-{kind}", shape, logs)
                    children.append(head)
                    competitors.append(Competitor(f"jina 3.34 head {kind}", head.label, endpoint, head, worker_pids, concurrency))
            if echo is not None:
                echo.wait_ready()
                wide = [[address] for address in echo.addresses]
                head = shardnet_head("sn-wide", wide, logs, head_loops[0])
                children.append(head)
                competitors.append(Competitor(f"shardnet head ALL x{args.wide}", head.label, "/search", head,
                                              [echo.pid], args.wide_concurrency))
                if args.peer == "jina":
                    head, head.address = jina_head("jina-wide", wide, logs)
                    children.append(head)
                    competitors.append(Competitor(f"jina 3.34 head ALL x{args.wide}", head.label, "/search", head,
                                                  [echo.pid], args.wide_concurrency))
            for competitor in competitors[1:]:  # all of them started: now wait for each
                head = competitor.head
                if head.label.startswith("jina"):
                    head.wait_serving(head.address)
                else:
                    head.wait_ready_line()

            targets = {"direct": workers[0].address} | {c.target: c.head.address for c in competitors[1:]}
            client = LoadClient(targets, loop=args.client_loop, concurrency=args.concurrency)
            setup = time.monotonic() - started

            for competitor in competitors:  # warm-up: connections, caches, the JIT-less interpreters' first calls
                warm = competitor.run(client, args.warmup_seconds, payloads[competitor.endpoint], record=False)
                answer = client.command(cmd="check", target=competitor.target, endpoint=competitor.endpoint,
                                        payload=payloads[competitor.endpoint])
                if warm["failures"] or answer["code"] != 0 or answer["docs"] != args.docs:
                    head = competitor.head or workers[0]
                    raise RuntimeError(f"{competitor.label}: {warm['failures']} of {warm['n']} warm-up requests "
                                       f"failed, a checked answer was {answer}; {head.label}'s log ends:\n"
                                       f"{head.tail()}")
            for round_index in range(args.rounds):
                for competitor in rotated(competitors, round_index):
                    competitor.run(client, args.round_seconds, payloads[competitor.endpoint], record=True)
        finally:
            if client is not None:
                client.stop()  # the client first, so no call sees its server go
            for child in children:  # signal every server first, then wait for each: they drain in parallel
                child.terminate()
            for child in reversed(children):
                child.stop()
            if echo is not None:
                echo.stop()

    print(f"# head overhead: Echo workers (own processes, {args.worker_loop}), client {args.client_loop} at "
          f"concurrency {args.concurrency} ({args.wide_concurrency} on x{args.wide} rows), {args.rounds} interleaved "
          f"rounds of {args.round_seconds:g}s per row after {args.warmup_seconds:g}s of warm-up; {args.docs} docs x "
          f"{args.doc_bytes} B per request; setup {setup:.0f}s, total {time.monotonic() - started:.0f}s; "
          f"{machine_line()}")
    print(table(
        ["row", "requests", "rps", "p50 ms", "p99 ms", "head CPU us/req", "backends CPU us/req", "failures"],
        [[c.label, c.tally.requests, c.tally.rps, c.tally.p(0.5), c.tally.p(0.99), c.head_us(), c.backend_us(),
          c.tally.failures] for c in competitors],
    ))

    by_label = {c.label: c for c in competitors}

    def ratio(label: str, ours: str, theirs: str) -> list:
        """Pooled ratios, and the median of the per-round ratios (rounds of a pair run next to each other)."""
        a, b = by_label[ours], by_label[theirs]
        rps_rounds, cpu_rounds = round_ratios(a, b)
        cpu = a.head_us() / b.head_us() if a.head and b.head else float("nan")
        return [label, a.tally.rps / b.tally.rps, rps_rounds, a.tally.p(0.5) / b.tally.p(0.5),
                a.tally.p(0.99) / b.tally.p(0.99), cpu, cpu_rounds]

    ratios, checks, disclosed = [], [], []
    checks.append(verdict("failed requests, all rows", sum(c.tally.failures for c in competitors), "<=", 0))
    for loop in head_loops:
        suffix = f" [{loop}]" if len(head_loops) > 1 else ""
        ratios.append(ratio(f"shardnet ANY{suffix} / direct", f"shardnet head ANY{suffix}", "direct to one worker"))
        checks.append(verdict(f"rps shardnet head ANY{suffix} / direct", ratios[-1][2], ">=", 0.5))
    unix_row = UNIX_ROW.format(loop=head_loops[0])
    if args.unix:
        ratios.append(ratio("shardnet ANY unix / direct", unix_row, "direct to one worker"))
        checks.append(verdict("rps shardnet head ANY, unix sockets / direct", ratios[-1][2], ">=", 0.5))
    if args.floor:
        floor = f"floor: bare forwarder ANY [{head_loops[0]}]"
        suffix = f" [{head_loops[0]}]" if len(head_loops) > 1 else ""
        ratios.append(ratio("floor / direct (a unary grpc.aio forwarder)", floor, "direct to one worker"))
        ratios.append(ratio(f"shardnet ANY{suffix} / floor", f"shardnet head ANY{suffix}", floor))
        if args.unix:
            ratios.append(ratio("shardnet ANY unix / floor (TCP)", unix_row, floor))
    if args.unary:
        suffix = f" [{head_loops[0]}]" if len(head_loops) > 1 else ""
        unary_row = UNARY_ROW.format(loop=head_loops[0])
        ratios.append(ratio("shardnet ANY unary / direct", unary_row, "direct to one worker"))
        ratios.append(ratio(f"shardnet ANY{suffix} request streams / unary", f"shardnet head ANY{suffix}", unary_row))
        if args.floor:
            ratios.append(ratio("shardnet ANY unary / floor", unary_row, floor))
    if args.round_robin:
        suffix = f" [{head_loops[0]}]" if len(head_loops) > 1 else ""
        ratios.append(ratio(f"shardnet ANY{suffix} p2c_ewma / round robin", f"shardnet head ANY{suffix}",
                            ROUND_ROBIN_ROW.format(loop=head_loops[0])))
    if len(head_loops) > 1:
        for kind in ("ANY", "ALL"):
            ratios.append(ratio(f"shardnet {kind} uvloop / asyncio", f"shardnet head {kind} [uvloop]",
                                f"shardnet head {kind} [asyncio]"))
    if args.peer == "jina":
        for loop in head_loops:
            suffix = f" [{loop}]" if len(head_loops) > 1 else ""
            for kind, cpu_target in (("ANY", 0.9), ("ALL", 0.7)):
                ratios.append(ratio(f"shardnet {kind}{suffix} / jina {kind}", f"shardnet head {kind}{suffix}",
                                    f"jina 3.34 head {kind}"))
                checks.append(verdict(f"rps shardnet {kind}{suffix} / jina", ratios[-1][2], ">=", 1.3))
                checks.append(verdict(f"head CPU/req shardnet {kind}{suffix} / jina", ratios[-1][6], "<=", cpu_target))
        if args.unary:  # like for like: a head calling its workers unary, as shardnet's does any non-shardnet worker
            ratios.append(ratio("shardnet ANY unary / jina ANY", UNARY_ROW.format(loop=head_loops[0]),
                                "jina 3.34 head ANY"))
            disclosed.append(f"  [info] rps shardnet ANY unary / jina (no target: the same transport to the workers "
                             f"as Jina's head, what a shardnet head gives non-shardnet workers): {ratios[-1][2]:.3f}")
        if args.unix:
            ratios.append(ratio("shardnet ANY unix / jina ANY", unix_row, "jina 3.34 head ANY"))
            checks.append(verdict("rps shardnet ANY, unix sockets / jina", ratios[-1][2], ">=", 1.3))
            checks.append(verdict("head CPU/req shardnet ANY, unix sockets / jina", ratios[-1][6], "<=", 0.9))
        if args.wide:
            ratios.append(ratio(f"shardnet ALL x{args.wide} / jina", f"shardnet head ALL x{args.wide}",
                                f"jina 3.34 head ALL x{args.wide}"))
    print()
    print(table(["ratio", "rps", "rps (median of rounds)", "p50", "p99", "head CPU/req",
                 "head CPU/req (median of rounds)"], ratios))
    print()
    print("targets (on the median of the per-round ratios; the pooled ratio is the table's rps column):")
    print("\n".join(checks + disclosed))
    return 0


if __name__ == "__main__":
    run_script(main)
