"""Prometheus metrics of a head or a worker (``--metrics-port``): opt-in, nothing on the request path when off.

A runtime given a metrics port owns a ``CollectorRegistry`` of its own (never prometheus_client's global one),
served by prometheus_client's aiohttp handler on the event loop that serves gRPC: what the collectors read (the
head's replica lists, its pool's retry budget, the requests under way) is read on the loop that changes it,
never from another thread. What shardnet counts already is read at scrape time, at no cost per request; per
request, a runtime with metrics adds one counter increment and one histogram observation, through a wrapper
put in place at start only when metrics are on. prometheus-client is an optional extra (``shardnet[metrics]``):
importing this module without it is refused in those words.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from typing import Any, Awaitable, Callable, Iterator, Optional

from aiohttp import web

from shardnet.errors import ConfigurationError, ProtocolError
from shardnet.networking.addresses import entity_address
from shardnet.protocol import services

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
    from prometheus_client.aiohttp import make_aiohttp_handler
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as missing:
    raise ConfigurationError(
        "--metrics-port needs prometheus-client, an optional extra: pip install 'shardnet[metrics]'"
    ) from missing

METRICS_PATH = "/metrics"
# endpoints are the callers' to choose: the first this many seen get a label of their own, the rest share OTHER
MAX_ENDPOINT_LABELS = 100
MAX_ENDPOINT_LABEL_CHARS = 200  # a longer endpoint is labelled OTHER too
OTHER = "other"
# what became of a request (the ``outcome`` label)
OK, ERROR, REFUSED, CANCELLED, UNBOUND = "ok", "error", "refused", "cancelled", "unbound"

Handle = Callable[..., Awaitable[bytes]]


class EndpointLabels:
    """The ``endpoint`` label of an endpoint: itself for the first MAX_ENDPOINT_LABELS seen (short enough),
    OTHER for the rest, so that callers naming endpoints at will cannot grow the series without bound."""

    def __init__(self, limit: int = MAX_ENDPOINT_LABELS):
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, endpoint: str) -> str:
        if endpoint in self._seen:
            return endpoint
        if len(self._seen) >= self._limit or len(endpoint) > MAX_ENDPOINT_LABEL_CHARS:
            return OTHER
        self._seen.add(endpoint)
        return endpoint


class RequestMeter:
    """Requests by endpoint and outcome (a counter) and how long they took by endpoint (a histogram), of one
    deployment; each labelled child is made once and kept (at most MAX_ENDPOINT_LABELS + 1 endpoints)."""

    def __init__(
        self, registry: CollectorRegistry, prefix: str, constant: dict[str, str], *, what: str, outcomes: str,
        timed: str,
    ):
        names = [*constant, "endpoint"]
        self._requests = Counter(
            f"{prefix}_requests", f"{what} by endpoint and outcome ({outcomes})", [*names, "outcome"], registry=registry,
        )
        self._seconds = Histogram(f"{prefix}_{timed}_duration_seconds", f"seconds {what} took, by endpoint", names,
                                  registry=registry)
        self._constant = tuple(constant.values())
        self.labels = EndpointLabels()
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def count(self, endpoint: str, outcome: str, seconds: Optional[float] = None) -> None:
        """One request of ``endpoint`` ended with ``outcome`` after ``seconds`` (None: it never ran, not timed)."""
        label = self.labels(endpoint)
        children = self._children.get((label, outcome))
        if children is None:
            values = (*self._constant, label)
            children = self._children[(label, outcome)] = (
                self._requests.labels(*values, outcome), self._seconds.labels(*values),
            )
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)


def _marked_error(context: Any) -> bool:
    """Whether the answer just given carries an error (Jina's ``is-error`` trailer, which heads and workers set
    on every ERROR answer, passed on from a worker or made by the head)."""
    return any(key == services.ERROR_METADATA for key, _ in context.trailing_metadata() or ())


def metered(
    handle: Handle, meter: RequestMeter, endpoint_of: Callable[..., str], *, unbound: Optional[Callable[[str], bool]] = None,
) -> Handle:
    """``handle(requests, context, ...)`` counted and timed by ``meter`` under the endpoint ``endpoint_of(requests,
    context)`` names once it returns: ok, error (an ERROR answer, or a gRPC status), cancelled (its call cut),
    or, where ``unbound(endpoint)`` says no handler serves it, unbound."""

    async def handle_metered(requests: list, context: Any, *args: Any) -> bytes:
        started = time.perf_counter()
        outcome = ERROR
        try:
            answer = await handle(requests, context, *args)
            outcome = ERROR if _marked_error(context) else OK
            return answer
        except asyncio.CancelledError:
            outcome = CANCELLED
            raise
        finally:
            endpoint = endpoint_of(requests, context)
            if outcome == OK and unbound is not None and unbound(endpoint):
                outcome = UNBOUND
            meter.count(endpoint, outcome, time.perf_counter() - started)

    return handle_metered


def header_endpoint(requests: list, context: Any) -> str:
    """The endpoint a request names: its header's (a head writes the metadata's there), else the metadata's,
    else ``/default``; a header that cannot be read names none."""
    try:
        endpoint = requests[0].endpoint
    except ProtocolError:
        endpoint = None
    if endpoint is None:
        endpoint = dict(context.invocation_metadata() or ()).get(services.ENDPOINT_METADATA) or "/default"
    return endpoint


class _Collected:
    """A custom collector: ``families()`` read at scrape time, on the event loop (see the module's docstring)."""

    def __init__(self, families: Callable[[], Iterator[Any]]):
        self.collect = families


class MetricsListener:
    """The HTTP listener serving a registry's metrics at /metrics (prometheus_client's aiohttp handler)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port) and return the port; a port in use is refused naming the flag."""
        app = web.Application()
        app.router.add_get(METRICS_PATH, make_aiohttp_handler(self.registry))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=False).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigurationError(
                f"--metrics-port {port}: cannot listen on {entity_address(host, port)}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def _registry() -> CollectorRegistry:
    """A registry of one runtime's own, with the process's CPU, memory and open files."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def _cut(name: str, what: str, labels: list[str], values: list[str], cut: Tally, endpoints: EndpointLabels) -> Any:
    """The requests cut at the drain's end, by endpoint label (its endpoints as the request counters name them)."""
    family = CounterMetricFamily(name, what, labels=[*labels, "endpoint"])
    folded: Tally = Tally()
    for endpoint, count in cut.items():
        folded[endpoints(endpoint)] += count
    for label, count in sorted(folded.items()):
        family.add_metric([*values, label], count)
    return family


class HeadMetrics:
    """A head's metrics: its requests (per request), and at scrape time its requests under way, its replicas
    by shard (and those ejected), its pool's retries and retry-budget refusals, and its ANY requests sent on to
    another shard."""

    def __init__(self, head: Any):
        self.registry = _registry()
        self.listener = MetricsListener(self.registry)
        self._head = head
        self.meter = RequestMeter(
            self.registry, "shardnet_head", {"deployment": head.deployment}, what="requests through the head",
            outcomes=f"{OK}, {ERROR}, {REFUSED}, {CANCELLED}", timed="request",
        )
        self.registry.register(_Collected(self._families))

    def meter_serve(self, serve: Handle) -> Handle:
        """The head's ``_serve``, counted and timed."""
        return metered(serve, self.meter, header_endpoint)

    def meter_admission(self, admit: Handle) -> Handle:
        """The head's ``_serve_admitted``: a request it refuses (``max_in_flight`` reached) counted ``refused``
        (the refusal is decided before anything is awaited, as here)."""
        head, meter = self._head, self.meter

        async def admit_metered(requests: list, context: Any) -> bytes:
            if head._full:
                meter.count(header_endpoint(requests, context), REFUSED)
            return await admit(requests, context)

        return admit_metered

    def _families(self) -> Iterator[Any]:
        head, pool = self._head, self._head.pool
        deployment = head.deployment
        in_flight = GaugeMetricFamily("shardnet_head_requests_in_flight", "requests under way through the head",
                                      labels=["deployment"])
        in_flight.add_metric([deployment], sum(head._under_way.values()))
        yield in_flight
        replicas = GaugeMetricFamily("shardnet_head_replicas", "replicas the head routes to, by shard",
                                     labels=["deployment", "shard"])
        ejected = GaugeMetricFamily("shardnet_head_replicas_ejected",
                                    "replicas ejected for repeated failures (not picked until healthy), by shard",
                                    labels=["deployment", "shard"])
        for shard_id in sorted(pool.shard_ids(deployment)):
            listed = pool.get_replicas(deployment, shard_id=shard_id)
            replicas.add_metric([deployment, str(shard_id)], len(listed))
            ejected.add_metric([deployment, str(shard_id)], len(listed.ejected_addresses))
        yield replicas
        yield ejected
        budget = pool.retry_budget
        for name, what, value in (
            ("shardnet_head_retries", "attempts sent again to another replica (failovers)", budget.total_retries),
            ("shardnet_head_retries_refused", "failovers the retry budget refused", budget.refused),
            ("shardnet_head_requests_resent", "ANY requests sent on to another shard as theirs had no live worker",
             head.requests_resent),
        ):
            family = CounterMetricFamily(name, what, labels=["deployment"])
            family.add_metric([deployment], value)
            yield family
        yield _cut("shardnet_head_requests_cut", "requests cut unanswered at the drain's end", ["deployment"],
                   [deployment], head.requests_cut, self.meter.labels)


class WorkerMetrics:
    """A worker's metrics: its requests (per request) and, at scrape time, those in their handlers and those
    cut at the drain's end."""

    def __init__(self, worker: Any, deployment: str, shard_id: int):
        self.registry = _registry()
        self.listener = MetricsListener(self.registry)
        self._worker = worker
        self._labels = {"deployment": deployment, "shard": str(shard_id)}
        self.meter = RequestMeter(
            self.registry, "shardnet_worker", self._labels, what="requests the worker handled",
            outcomes=f"{OK}, {ERROR}, {UNBOUND} (no handler: passed through), {CANCELLED}", timed="handler",
        )
        self.registry.register(_Collected(self._families))

    def meter_handle(self, handle: Handle, endpoint_of: Callable[..., str], unbound: Callable[[str], bool]) -> Handle:
        """The worker's ``_handle``, counted and timed."""
        return metered(handle, self.meter, endpoint_of, unbound=unbound)

    def _families(self) -> Iterator[Any]:
        worker = self._worker
        names, values = list(self._labels), list(self._labels.values())
        in_flight = GaugeMetricFamily("shardnet_worker_requests_in_flight",
                                      "requests in their handlers (or queued for a handler thread)", labels=names)
        in_flight.add_metric(values, sum(worker._in_handlers.values()))
        yield in_flight
        yield _cut("shardnet_worker_requests_cut", "requests cut in their handlers at the drain's end", names, values,
                   worker.requests_cut, self.meter.labels)
