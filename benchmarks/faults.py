"""Fault injection: what clients see when replicas die, hang, slow down or lie, and when the head restarts.

Each scenario starts a real local Deployment (a head and 2 shards x 3
replicas of ``_fault_executor.FaultExecutor``, all on loopback), runs a
bounded closed-loop load through a GrpcConnectionPool to the head, injects
one fault, and prints one table row:

    sent, ok, failed (of which expected), lost (never answered), duplicate
    answers, requests executed more than once by a shard, p50/p99 latency of
    the requests started during the fault, and the head's retries against
    its retry budget (the worst window seen).

    python benchmarks/faults.py             # every scenario, about 4 minutes
    python benchmarks/faults.py --quick     # shorter loads and a 2 s hang, about 2 minutes
    python benchmarks/faults.py --scenario hang --scenario kill-1

The clients never retry (a failure at the head is a failure here), and each
call has a deadline; "lost" counts calls that ended without an answer. The
fault window of each scenario is what the p50/p99 columns cover.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import grpc

from shardnet import ControlRequest, DataRequest, Document, GrpcConnectionPool
from shardnet.errors import ReplicaError, RoutingError
from shardnet.networking import oneshot
from shardnet.networking.policies import NO_RETRIES
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.head import MAY_HAVE_RUN_ERROR
from shardnet.testing import EchoServer

if __package__:  # imported as benchmarks.faults (the test suite runs the scenarios' short versions)
    from ._common import machine_line, percentile, table
    from ._fault_executor import read_seen, set_fault
else:  # run as a script: this folder is sys.path[0]
    from _common import machine_line, percentile, table
    from _fault_executor import read_seen, set_fault

HERE = Path(__file__).resolve().parent

EXECUTOR = f"{HERE / '_fault_executor.py'}:FaultExecutor"
ANY, ALL = "/any", "/all"
POLLING = {ALL: "ALL", "*": "ANY"}
CLIENT = "faults"  # the deployment name the clients' pool knows the head by


@dataclass
class Settings:
    """How hard and how long to push, and how the head is tuned."""

    concurrency: int = 8
    max_requests: int = 50_000
    warmup: float = 1.5  # load before the fault
    tail: float = 1.5  # load after the fault ends
    fault: float = 5.0  # how long a timed fault lasts (hang, slow, errors)
    deadline: float = 5.0  # each client call's deadline
    attempt_timeout: float = 0.5  # the head gives up on one replica after this long
    shards: int = 2
    replicas: int = 3
    register_interval: float = 0.5

    @classmethod
    def quick(cls) -> "Settings":
        return cls(warmup=0.7, tail=0.7, fault=2.0)

    def deployment(self, **options: Any) -> Deployment:
        """The Deployment every scenario runs against (not started)."""
        return Deployment(
            uses=EXECUTOR,
            shards=self.shards,
            replicas=self.replicas,
            polling=POLLING,
            name="faults",
            attempt_timeout=self.attempt_timeout,
            register_interval=self.register_interval,
            **options,
        )


# -- load ------------------------------------------------------------------------------


@dataclass
class Call:
    key: str
    start: float
    end: float = math.nan
    outcome: str = "pending"  # ok | app-error | failed | lost
    code: str = ""
    request_id: str = ""


class Load:
    """Closed-loop clients through one pool to the head, bounded by count and by ``stop()``."""

    def __init__(self, address: str, endpoint: str, settings: Settings, tag: str):
        self.endpoint = endpoint
        self.settings = settings
        self.tag = tag
        self.calls: list[Call] = []
        self.answered: dict[str, int] = {}
        self.duplicates = 0
        self._stop = asyncio.Event()
        self._counter = itertools.count()
        self._pool = GrpcConnectionPool(retry=NO_RETRIES, timeout=settings.deadline)
        self._pool.add_connection(CLIENT, address, head=True)
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Load":
        self._pool.start()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.settings.concurrency)]
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.stop()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), self.settings.deadline + 5)
        finally:
            for task in self._tasks:
                task.cancel()
            await self._pool.close()
        for call in self.calls:  # anything still pending never got an answer
            if call.outcome == "pending":
                call.outcome = "lost"

    def stop(self) -> None:
        self._stop.set()

    async def _client(self) -> None:
        loop = asyncio.get_running_loop()
        replicas = self._pool.get_replicas(CLIENT, head=True)
        metadata = (("endpoint", self.endpoint),)
        while not self._stop.is_set():
            index = next(self._counter)
            if index >= self.settings.max_requests:
                return
            key = f"{self.tag}-{index:06d}"
            request = DataRequest(docs=[Document(id=key)], endpoint=self.endpoint)
            call = Call(key, loop.time(), request_id=request.request_id)
            self.calls.append(call)
            try:
                response, _ = await self._pool.call(request, CLIENT, replicas, metadata=metadata)
            except ReplicaError as exc:
                call.code = exc.code.name if exc.code is not None else type(exc).__name__
                call.outcome = "lost" if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED else "failed"
            except RoutingError as exc:
                call.code, call.outcome = type(exc).__name__, "failed"
            else:
                answered = response.request_id
                self.answered[answered] = self.answered.get(answered, 0) + 1
                if self.answered[answered] > 1 or answered != request.request_id:
                    self.duplicates += 1
                call.outcome = "app-error" if response.is_error else "ok"
                if response.is_error:
                    call.code = f"ERROR {response.status.description[:120]}"
                if response.is_error and response.status.exception.name == MAY_HAVE_RUN_ERROR:
                    call.outcome = "failed"  # the head's word that a replica died or hung with it: no app error
                    call.code = f"{MAY_HAVE_RUN_ERROR} {response.status.description.partition(':')[0]}"
            call.end = loop.time()


class BudgetWatch:
    """Samples the head's retry counters (STATUS trailing metadata) while the load runs."""

    def __init__(self, head: Callable[[], str], interval: float = 0.25):
        self._head = head
        self._interval = interval
        self.spent = 0
        self.refused = 0
        self.peak = (0, 0.0)  # (retries, allowance) of the fullest window seen
        self.over_budget = False
        self._base = {"retries-spent": 0, "retries-refused": 0}
        self._last = dict(self._base)
        self._task: Optional[asyncio.Task] = None

    async def sample(self) -> None:
        try:
            _, trailing = await oneshot.call_once("control", ControlRequest("STATUS"), self._head(), timeout=1.0)
        except (ReplicaError, Exception):  # the head may be down (head restart): the next sample counts
            return
        values = dict(tuple(trailing or ()))
        if "retries-spent" not in values:
            return
        for key in self._base:
            value = int(values[key])
            if value < self._last[key]:  # a new head process: its counters start again
                self._base[key] += self._last[key]
            self._last[key] = value
        self.spent = self._base["retries-spent"] + self._last["retries-spent"]
        self.refused = self._base["retries-refused"] + self._last["retries-refused"]
        used, allowed = values["retry-window"].split("/")
        used, allowed = int(used), float(allowed)
        if used / allowed >= self.peak[0] / max(self.peak[1], 1e-9):
            self.peak = (used, allowed)
        self.over_budget |= used > allowed

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self._interval)

    async def __aenter__(self) -> "BudgetWatch":
        await self.sample()
        self._start = (self.spent, self.refused)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.sample()
        self.spent -= self._start[0]
        self.refused -= self._start[1]


# -- scenarios -----------------------------------------------------------------------------


@dataclass
class Window:
    """When the fault was on (loop time), and when requests were expected to fail (head down)."""

    start: float = math.nan
    end: float = math.nan
    outage: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    scenario: str
    polling: str
    balancer: str
    sent: int
    ok: int
    failed: int
    expected: int  # failures the scenario expects (application errors, head down)
    lost: int
    duplicates: int
    reexecuted: int  # requests a shard executed more than once
    errors_retried: int  # requests failed by an injected application error, then executed again or answered OK
    p50: float  # ms, requests started during the fault
    p99: float
    max: float
    retries: int
    refused: int
    peak_window: tuple[int, float]
    over_budget: bool
    codes: dict[str, int]
    notes: list[str]
    outage: tuple[int, int, float] = (0, 0, math.nan)  # calls failed by an outage, of them executed, their p99 ms
    misses: list[str] = field(default_factory=list)

    @property
    def row(self) -> list[Any]:
        used, allowed = self.peak_window
        return [
            self.scenario, self.polling, self.balancer, self.sent, self.ok, self.failed, self.expected, self.lost, self.duplicates,
            self.reexecuted, self.p50, self.p99, self.max, self.retries, self.refused, f"{used}/{allowed:g}",
            "met" if not self.misses else "MISSED",
        ]


HEADERS = [
    "scenario", "poll", "balancer", "sent", "ok", "failed", "expected", "lost", "dup", "re-exec",
    "p50 ms", "p99 ms", "max ms", "retries", "refused", "peak window", "targets",
]

Fault = Callable[[Deployment, "Context"], Awaitable[None]]


@dataclass
class Scenario:
    name: str
    endpoint: str
    fault: Fault
    targets: Callable[[Report, Settings], list[str]]
    doc: str
    balancer: str = "p2c_ewma"  # the head's; round_robin keeps sending to a sick replica until it is ejected


class Context:
    """What a fault function gets: the window to mark, the settings, a clock."""

    def __init__(self, settings: Settings, deployment: Deployment):
        self.settings = settings
        self.deployment = deployment
        self.window = Window()
        self.loop = asyncio.get_running_loop()

    def begin(self) -> None:
        self.window.start = self.loop.time()

    def end(self) -> None:
        self.window.end = self.loop.time()

    @contextlib.contextmanager
    def outage(self):
        """Requests started inside this block are expected to fail (fast)."""
        start = self.loop.time()
        try:
            yield
        finally:
            self.window.outage.append((start, self.loop.time()))


def _head_of(deployment: Deployment) -> str:
    return deployment.address


async def _relaunch(deployment: Deployment, shard: int, replica: int) -> None:
    """Bring a killed worker back, the head told first to forget the registration it died with."""
    await asyncio.to_thread(deployment.restart_worker, shard, replica)


def kill(*replicas: tuple[int, int]) -> Fault:
    async def fault(deployment: Deployment, ctx: Context) -> None:
        ctx.begin()
        for key in replicas:
            deployment.workers[key].kill()
        await asyncio.sleep(ctx.settings.fault)
        ctx.end()
        ctx.window.notes.append("killed " + ", ".join(f"worker-{s}-{r}" for s, r in replicas))

    fault.cleanup = lambda deployment: asyncio.gather(*(_relaunch(deployment, *key) for key in replicas))
    return fault


async def hang(deployment: Deployment, ctx: Context) -> None:
    process = deployment.workers[(0, 1)]
    ctx.begin()
    process.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(ctx.settings.fault)
    finally:
        process.signal(signal.SIGCONT)
    await asyncio.sleep(min(1.0, ctx.settings.tail))  # requests queued at the hung replica drain now
    ctx.end()
    ctx.window.notes.append(f"worker-0-1 stopped {ctx.settings.fault:g} s")


def misbehave(**fault_spec: Any) -> Fault:
    async def fault(deployment: Deployment, ctx: Context) -> None:
        ctx.begin()
        set_fault(deployment.workspace, 0, 1, **fault_spec)
        try:
            await asyncio.sleep(ctx.settings.fault)
        finally:
            set_fault(deployment.workspace, 0, 1)
        ctx.end()

    return fault


async def unavailable(deployment: Deployment, ctx: Context) -> None:
    """A replica that answers every call UNAVAILABLE joins shard 0 in place of worker-0-0."""
    head = deployment.address
    token = deployment.control_token_file.read_text().strip()  # the deployment's head takes control calls with it
    await asyncio.to_thread(deployment.workers[(0, 0)].stop)  # drains and DEACTIVATEs
    async with EchoServer("liar", fail_with=grpc.StatusCode.UNAVAILABLE) as liar:
        host, port = liar.address.rsplit(":", 1)
        ctx.begin()
        await oneshot.activate_worker(host, int(port), head, 0, token=token)
        try:
            await asyncio.sleep(ctx.settings.fault)
        finally:
            await oneshot.deactivate_worker(host, int(port), head, 0, token=token)
        ctx.end()
        ctx.window.notes.append(f"liar answered {liar.calls} calls UNAVAILABLE")


async def _restart_worker_back(deployment: Deployment) -> None:
    process = deployment.workers[(0, 0)]
    if not process.alive:
        process.launch()
        await asyncio.to_thread(process.wait_ready, deployment.startup_timeout)
        await asyncio.to_thread(deployment.wait_registered)


unavailable.cleanup = _restart_worker_back


def rolling(*replicas: tuple[int, int]) -> Fault:
    """Restart the given workers (all of them when none is given) one after the other."""

    async def fault(deployment: Deployment, ctx: Context) -> None:
        keys = list(replicas) or sorted(deployment.workers)
        ctx.begin()
        for key in keys:
            await asyncio.to_thread(deployment.restart_worker, *key)  # SIGTERM: DEACTIVATE, drain, exit
        ctx.end()
        ctx.window.notes.append(f"restarted {len(keys)} workers one by one")

    return fault


async def head_restart(deployment: Deployment, ctx: Context) -> None:
    ctx.begin()
    with ctx.outage():
        await asyncio.to_thread(deployment.restart_head)  # returns once every worker re-registered
    ctx.end()


def nothing_lost(report: Report, settings: Settings) -> list[str]:
    misses = []
    if report.failed - report.expected:
        misses.append(f"{report.failed - report.expected} failed")
    if report.lost:
        misses.append(f"{report.lost} lost")
    if report.duplicates:
        misses.append(f"{report.duplicates} duplicate answers")
    if report.over_budget:
        misses.append("retries above the budget")
    return misses


def bounded_hang(report: Report, settings: Settings) -> list[str]:
    misses = nothing_lost(report, settings)
    bound = 1e3 * (settings.attempt_timeout + 0.25)
    if not report.p99 <= bound:
        misses.append(f"p99 {report.p99:.0f} ms above attempt timeout + 250 ms ({bound:.0f} ms)")
    return misses


def not_retried(report: Report, settings: Settings) -> list[str]:
    """Application errors come back as answers (status ERROR), each executed once, never retried elsewhere.

    The head's retry count is no evidence here: an attempt timeout on a busy machine retries a healthy call.
    """
    misses = []
    if report.failed != report.expected or report.lost:
        misses.append("failures other than the application errors")
    if report.errors_retried:
        misses.append(f"{report.errors_retried} application errors retried")
    if report.expected == 0:
        misses.append("no application error was produced")
    return misses


def fail_fast_outage(report: Report, settings: Settings) -> list[str]:
    misses = nothing_lost(report, settings)
    failed, executed, p99 = report.outage
    if executed:
        misses.append(f"{executed} calls failed during the outage although a worker executed them")
    if not p99 <= 1e3:
        misses.append(f"calls during the outage took {p99:.0f} ms (p99) to fail, not fast")
    return misses


SCENARIOS = [
    Scenario("kill-1", ANY, kill((0, 1)), nothing_lost, "kill -9 of one replica"),
    Scenario("kill-1", ALL, kill((0, 1)), nothing_lost, "kill -9 of one replica"),
    Scenario("kill-1", ANY, kill((0, 1)), nothing_lost, "kill -9 of one replica", "round_robin"),
    Scenario("kill-2", ANY, kill((0, 1), (0, 2)), nothing_lost, "kill -9 of two replicas of shard 0"),
    Scenario("kill-2", ALL, kill((0, 1), (0, 2)), nothing_lost, "kill -9 of two replicas of shard 0"),
    Scenario("hang", ANY, hang, bounded_hang, "SIGSTOP one replica, SIGCONT later"),
    Scenario("hang", ALL, hang, bounded_hang, "SIGSTOP one replica, SIGCONT later"),
    Scenario("hang", ANY, hang, bounded_hang, "SIGSTOP one replica, SIGCONT later", "round_robin"),
    Scenario("slow", ANY, misbehave(delay=0.3), nothing_lost, "one replica answers 300 ms late"),
    Scenario("unavailable", ANY, unavailable, nothing_lost, "one replica answers UNAVAILABLE"),
    Scenario("unavailable", ANY, unavailable, nothing_lost, "one replica answers UNAVAILABLE", "round_robin"),
    Scenario("app-errors", ANY, misbehave(fail=True), not_retried, "one replica's executor raises"),
    Scenario("rolling", ANY, rolling(), nothing_lost, "restart every replica, one at a time"),
    Scenario("rolling", ALL, rolling(), nothing_lost, "restart every replica, one at a time"),
    Scenario("head", ANY, head_restart, fail_fast_outage, "restart the head; workers re-register"),
]


def find(name: str, endpoint: str = ANY, balancer: str = "p2c_ewma") -> Scenario:
    """The scenario of the table with this name, polling endpoint and balancer."""
    for scenario in SCENARIOS:
        if (scenario.name, scenario.endpoint, scenario.balancer) == (name, endpoint, balancer):
            return scenario
    raise KeyError(f"no scenario {name!r} with {endpoint} and {balancer}")


async def run_scenario(scenario: Scenario, deployment: Deployment, settings: Settings) -> Report:
    """Run ``scenario`` against a started ``deployment``; leave the deployment whole again."""
    ctx = Context(settings, deployment)
    tag = f"{scenario.name}{scenario.endpoint.replace('/', '-')}-{time.monotonic_ns()}"
    try:
        async with BudgetWatch(lambda: _head_of(deployment)) as budget:
            async with Load(deployment.address, scenario.endpoint, settings, tag) as load:
                await asyncio.sleep(settings.warmup)
                await scenario.fault(deployment, ctx)
                await asyncio.sleep(settings.tail)
    finally:
        cleanup = getattr(scenario.fault, "cleanup", None)
        if cleanup is not None:
            await cleanup(deployment)
    seen, injected = read_seen(deployment.workspace), read_seen(deployment.workspace, "failed")
    return _report(scenario, settings, ctx.window, load, budget, seen, injected)


def _report(scenario, settings, window: Window, load: Load, budget: BudgetWatch, seen, injected) -> Report:
    calls = load.calls
    failed = [call for call in calls if call.outcome in ("failed", "app-error")]
    lost = [call for call in calls if call.outcome == "lost"]
    # a call alive at any moment of an outage (the head stopping, away, or re-learning its workers) may fail
    caught = [c for c in failed if any(c.start <= end and c.end >= start for start, end in window.outage)]
    expected = caught + [c for c in failed if c.outcome == "app-error" and scenario.targets is not_retried]
    during = [1e3 * (c.end - c.start) for c in calls if window.start <= c.start <= window.end and c.outcome != "lost"]
    codes: dict[str, int] = {}
    for call in failed + lost:
        codes[call.code or call.outcome] = codes.get(call.code or call.outcome, 0) + 1
    reexecuted = errors_retried = 0
    for call in calls:
        shards = [shard for shard, _ in seen.get(call.key, [])]
        reexecuted += len(shards) != len(set(shards))
        errors_retried += call.key in injected and (call.outcome == "ok" or len(shards) != len(set(shards)))
    notes = list(window.notes)
    raised = sum(1 for call in calls if call.key in injected)
    if raised:
        notes.append(f"{raised} requests raised in the executor, {errors_retried} of them retried")
    if window.outage:
        span = sum(end - start for start, end in window.outage)
        outage = (len(caught), sum(1 for c in caught if c.key in seen), percentile([1e3 * (c.end - c.start) for c in caught], 0.99))
        notes.append(
            f"head stopping/away/re-learning for {span:.1f} s: {outage[0]} calls failed fast "
            f"(p99 {outage[2]:.0f} ms), {outage[1]} of them executed by a worker"
        )
    report = Report(
        scenario=scenario.name,
        polling="ALL" if scenario.endpoint == ALL else "ANY",
        balancer=scenario.balancer,
        sent=len(calls),
        ok=sum(1 for c in calls if c.outcome == "ok"),
        failed=len(failed),
        expected=len(expected),
        lost=len(lost),
        duplicates=load.duplicates,
        reexecuted=reexecuted,
        errors_retried=errors_retried,
        p50=percentile(during, 0.50),
        p99=percentile(during, 0.99),
        max=max(during, default=math.nan),
        retries=budget.spent,
        refused=budget.refused,
        peak_window=budget.peak,
        over_budget=budget.over_budget,
        codes=codes,
        notes=notes,
    )
    if window.outage:
        report.outage = outage
    report.misses = scenario.targets(report, settings)
    return report


async def run_all(names: list[str], settings: Settings, *, log_dir: Optional[str] = None) -> list[Report]:
    # Deployment's blocking helpers run event loops of their own in threads: grpc/grpc#25364
    asyncio.get_running_loop().set_exception_handler(oneshot.tolerate_grpc_poller_race)
    reports = []
    for scenario in SCENARIOS:
        if names and scenario.name not in names:
            continue
        # a workspace of its own: the executors' seen/failed logs there count this scenario's runs alone
        with tempfile.TemporaryDirectory(prefix="shardnet-faults-") as workspace:
            async with settings.deployment(balancer=scenario.balancer, workspace=workspace) as deployment:
                report = await run_scenario(scenario, deployment, settings)
        reports.append(report)
        print(f"  {scenario.name:12} {report.polling} {scenario.balancer:11}: {scenario.doc}; "
              f"{report.sent} sent, {'targets met' if not report.misses else 'MISSED: ' + '; '.join(report.misses)}",
              flush=True)
    return reports


def render(reports: list[Report], settings: Settings) -> str:
    lines = [table(HEADERS, [report.row for report in reports]), ""]
    for report in reports:
        details = list(report.notes)
        if report.codes:
            details.append("non-OK: " + ", ".join(f"{code} x{count}" for code, count in sorted(report.codes.items())))
        if report.misses:
            details.append("MISSED: " + "; ".join(report.misses))
        if details:
            lines.append(f"{report.scenario} {report.polling} {report.balancer}: " + "; ".join(details))
    lines.append("")
    lines.append(
        f"load: {settings.concurrency} closed-loop clients, no client retries, deadline {settings.deadline:g} s; "
        f"head --attempt-timeout {settings.attempt_timeout:g} s; faults last {settings.fault:g} s; "
        f"latencies cover the answers to requests started during the fault; 're-exec': requests a shard executed "
        f"twice (an attempt abandoned on a dead, hung or CPU-starved replica, retried: at-least-once); "
        f"'peak window': the head's fullest retry-budget window (retries/allowed)"
    )
    lines.append(machine_line())
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loads and a 2 s hang")
    parser.add_argument("--scenario", action="append", default=[], choices=sorted({s.name for s in SCENARIOS}))
    parser.add_argument("--concurrency", type=int, help="closed-loop clients (default 8)")
    parser.add_argument("--attempt-timeout", type=float, help="the head's --attempt-timeout (default 0.5 s)")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.concurrency:
        settings.concurrency = args.concurrency
    if args.attempt_timeout:
        settings.attempt_timeout = args.attempt_timeout
    print(f"fault injection: head + {settings.shards} shards x {settings.replicas} replicas per scenario", flush=True)
    reports = asyncio.run(run_all(args.scenario, settings))
    print()
    print(render(reports, settings))
    return 0 if all(not report.misses for report in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())
