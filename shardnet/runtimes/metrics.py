"""Prometheus metrics of a head or a worker (``--metrics-port``): opt-in, nothing on the request path when off.

A runtime given a metrics port owns a ``CollectorRegistry`` of its own (never prometheus_client's global one),
served by prometheus_client's aiohttp handler on the event loop that serves gRPC: what the collectors read (the
head's replica lists, its pool's retry budget, the requests under way) is read on the loop that changes it,
never from another thread. What shardnet counts already is read at scrape time, at no cost per request; per
request, a runtime with metrics adds one counter increment and one histogram observation, through a wrapper
put in place at start only when metrics are on (and a head, for an endpoint it has not learned, asks its workers
which they serve: see HeadMetrics). prometheus-client is an optional extra (``shardnet[metrics]``):
importing this module without it is refused in those words.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter as Tally
from typing import Any, Awaitable, Callable, Iterable, Iterator, Optional

from shardnet.errors import ConfigurationError, ProtocolError
from shardnet.protocol import services
from shardnet.runtimes.executor import DEFAULT, DEFAULT_ENDPOINT, DRY_RUN_ENDPOINT

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as missing:
    raise ConfigurationError(
        "--metrics-port needs prometheus-client, an optional extra: pip install 'shardnet[metrics]' (from a checkout: "
        "pip install '.[metrics]')"
    ) from missing

from shardnet.runtimes.metrics_listener import MetricsListener  # noqa: E402 - prometheus-client checked first

logger = logging.getLogger(__name__)

# Endpoints are the callers' to choose, so none gets a label of its own for naming it: a worker labels the
# endpoints its Executor binds (a set fixed when it loads), a head those its workers list (endpoint discovery).
# The labels for everything else start with "(", which no bound endpoint can (executor.requests: "/" or none).
UNBOUND_LABEL = "(unbound)"  # a worker's requests no handler serves (passed through unchanged)
OTHER = "(other)"  # a head's requests of endpoints its workers do not list (or past MAX_ENDPOINT_LABELS)
UNREADABLE_LABEL = "(unreadable)"  # requests whose bytes or header could not be read (INVALID_ARGUMENT)
MAX_ENDPOINT_LABELS = 100  # a head's backstop: at most this many listed endpoints get a label of their own
MAX_ENDPOINT_LABEL_CHARS = 200  # a longer listed endpoint is labelled OTHER too
# a head asks its workers for their endpoints when a request names one it has not learned, at most this often
LEARN_EVERY_SECONDS = 1.0
LEARN_TIMEOUT = 5.0  # how long such a question may take
MAX_WAITING_COUNTS = 10_000  # requests counted once the question in flight is answered; past these, OTHER
# what became of a request (the ``outcome`` label)
OK, ERROR, REFUSED, CANCELLED, UNBOUND = "ok", "error", "refused", "cancelled", "unbound"
# prometheus_client's default buckets (5 ms to 10 s), then 30 s, a minute and two: a model's batch, a large
# request's transfer or an overload's queue take longer than 10 s, which the default lumps into +Inf alone
DURATION_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0,
                    float("inf"))

Handle = Callable[..., Awaitable[bytes]]
Record = Callable[..., None]  # record(endpoint, outcome, seconds, code=None)
ERROR_ANSWER = "ERROR"  # the ``code`` of a failed request answered ERROR (gRPC OK, ``is-error``), not a gRPC status


class RequestMeter:
    """Requests by endpoint label and outcome (a counter), how long they took by endpoint label (a histogram),
    and readiness checks apart (Jina's dry-run requests, which are no work), of one deployment; each labelled
    child is made once and kept (the labels are a bounded set: see the module's constants)."""

    def __init__(
        self, registry: CollectorRegistry, prefix: str, constant: dict[str, str], *, what: str, outcomes: str,
        timed: str,
    ):
        names = [*constant, "endpoint"]
        self._requests = Counter(
            f"{prefix}_requests", f"{what} by endpoint and outcome ({outcomes})", [*names, "outcome"], registry=registry,
        )
        self._failed = Counter(
            f"{prefix}_requests_failed", f"{what} that failed, by endpoint and gRPC status code ({ERROR_ANSWER}: an "
            "ERROR answer), cancelled ones apart", [*names, "code"], registry=registry,
        )
        self._seconds = Histogram(f"{prefix}_{timed}_duration_seconds", f"seconds {what} took, by endpoint", names,
                                  registry=registry, buckets=DURATION_BUCKETS)
        dry_runs = Counter(f"{prefix}_dry_runs", f"readiness checks ({DRY_RUN_ENDPOINT} requests), not in the "
                           f"{prefix}_requests counts", list(constant), registry=registry)
        self.dry_run = dry_runs.labels(*constant.values()).inc
        self._constant = tuple(constant.values())
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def count(self, label: str, outcome: str, seconds: Optional[float] = None, code: Optional[str] = None) -> None:
        """One request labelled ``label`` ended with ``outcome`` after ``seconds`` (None: it never ran, not timed);
        a failed one (outcome ``error``) also by its ``code`` (a gRPC status name, or ERROR_ANSWER)."""
        if outcome == ERROR:
            self._failed.labels(*self._constant, label, code or ERROR_ANSWER).inc()
        children = self._children.get((label, outcome))
        if children is None:
            values = (*self._constant, label)
            children = self._children[(label, outcome)] = (
                self._requests.labels(*values, outcome), self._seconds.labels(*values),
            )
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)


class _Trailers:
    """A request's context, itself in all but one thing: it keeps the trailing metadata its handler sets, for
    the metrics to read (a stream's context keeps what an earlier request of it set). Only metered requests
    are given one."""

    __slots__ = ("_context", "trailing", "code")

    def __init__(self, context: Any):
        self._context = context
        self.trailing: Any = ()
        self.code: Optional[str] = None  # the gRPC status the handler aborted with

    async def abort(self, code: Any, details: str = "", *rest: Any) -> Any:
        self.code = getattr(code, "name", None) or str(code)
        return await self._context.abort(code, details, *rest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata
        self._context.set_trailing_metadata(metadata)


def _marked_error(trailing: Any) -> bool:
    """Whether the answer just given carries an error (Jina's ``is-error`` trailer, which heads and workers set
    on every ERROR answer, passed on from a worker or made by the head)."""
    return any(key == services.ERROR_METADATA for key, _ in trailing or ())


def metered(handle: Handle, meter: RequestMeter, record: Record, endpoint_of: Callable[..., str]) -> Handle:
    """``handle(requests, context, ...)`` timed and given to ``record(endpoint, outcome, seconds)`` under the
    endpoint ``endpoint_of(requests, context)`` names once it returns: ok, error (an ERROR answer, or a gRPC
    status), or cancelled (its call cut). A readiness check (the dry-run endpoint) is counted apart."""

    async def handle_metered(requests: list, context: Any, *args: Any) -> bytes:
        started = time.perf_counter()
        context = _Trailers(context)
        outcome = ERROR
        try:
            answer = await handle(requests, context, *args)
            outcome = ERROR if _marked_error(context.trailing) else OK
            return answer
        except asyncio.CancelledError:
            outcome = CANCELLED
            raise
        finally:
            endpoint = endpoint_of(requests, context)
            if endpoint == DRY_RUN_ENDPOINT:
                meter.dry_run()
            else:
                code = None
                if outcome == ERROR:  # an abort's status, an ERROR answer, else the handler's own fault (UNKNOWN)
                    code = context.code or (ERROR_ANSWER if _marked_error(context.trailing) else "UNKNOWN")
                record(endpoint, outcome, time.perf_counter() - started, code)

    return handle_metered


def header_endpoint(requests: list, context: Any) -> str:
    """The endpoint a request names: its header's (a head writes the metadata's there), else the metadata's,
    else ``/default``; UNREADABLE_LABEL when its header cannot be read (the request is refused for it)."""
    try:
        endpoint = requests[0].endpoint
    except ProtocolError:
        return UNREADABLE_LABEL
    if endpoint is None:
        endpoint = dict(context.invocation_metadata() or ()).get(services.ENDPOINT_METADATA) or "/default"
    return endpoint


def _may_be_labelled(endpoint: str) -> bool:
    """Whether a head may give ``endpoint`` a label of its own, once its workers list it: one that cannot is
    counted OTHER at once, never held for their list (a caller's header may name an endpoint of megabytes)."""
    return endpoint.startswith("/") and len(endpoint) <= MAX_ENDPOINT_LABEL_CHARS


class _Collected:
    """A custom collector: ``families()`` read at scrape time, on the event loop (see the module's docstring)."""

    def __init__(self, families: Callable[[], Iterator[Any]]):
        self.collect = families


def _registry() -> CollectorRegistry:
    """A registry of one runtime's own, with the process's CPU, memory and open files."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def _cut(name: str, what: str, labels: list[str], values: list[str], cut: Tally, label: Callable[[str], str]) -> Any:
    """The requests cut at the drain's end, by endpoint label (its endpoints as the request counters name them)."""
    family = CounterMetricFamily(name, what, labels=[*labels, "endpoint"])
    folded: Tally = Tally()
    for endpoint, count in cut.items():
        folded[label(endpoint)] += count
    for endpoint_label, count in sorted(folded.items()):
        family.add_metric([*values, endpoint_label], count)
    return family


class HeadMetrics:
    """A head's metrics: its requests (per request), and at scrape time its requests under way, its replicas
    by shard (and those ejected), its pool's retries and retry-budget refusals, and its ANY requests sent on to
    another shard.

    A request is labelled with its endpoint only when the head's workers list that endpoint (endpoint
    discovery, asked of them when a request names one not learned yet, at most every LEARN_EVERY_SECONDS; the
    requests ended meanwhile are counted once they answered), so that a caller naming endpoints at will takes
    no label from those the deployment serves."""

    def __init__(self, head: Any):
        self.registry = _registry()
        self.listener = MetricsListener(self.registry, on_stop=self._stop_learning)
        self._head = head
        self.meter = RequestMeter(
            self.registry, "shardnet_head", {"deployment": head.deployment}, what="requests through the head",
            outcomes=f"{OK}, {ERROR}, {REFUSED}, {CANCELLED}", timed="request",
        )
        self._listed: set[str] = set()  # the endpoints its workers listed: each a label of its own
        self._learning: Optional[asyncio.Task] = None  # the question to the workers in flight
        self._learnt_at = -LEARN_EVERY_SECONDS  # the loop's time the last one ended
        self._waiting: list[tuple[str, str, Optional[float], Optional[str]]] = []  # counts held until it is answered
        self._stopped = False  # the listener has closed: no more questions
        self.registry.register(_Collected(self._families))

    def meter_serve(self, serve: Handle) -> Handle:
        """The head's ``_serve``, counted and timed."""
        return metered(serve, self.meter, self.record, header_endpoint)

    def meter_admission(self, admit: Handle) -> Handle:
        """The head's ``_serve_admitted``: a request it refuses (``max_in_flight`` reached) counted ``refused``
        (the refusal is decided before anything is awaited, as here)."""
        head, record = self._head, self.record

        async def admit_metered(requests: list, context: Any) -> bytes:
            if head._full:
                endpoint = header_endpoint(requests, context)
                if endpoint == DRY_RUN_ENDPOINT:
                    self.meter.dry_run()
                else:
                    record(endpoint, REFUSED, None)  # RESOURCE_EXHAUSTED, counted as refused
            return await admit(requests, context)

        return admit_metered

    def label(self, endpoint: str) -> str:
        """The endpoint's label: itself when the workers listed it, else OTHER (UNREADABLE_LABEL kept)."""
        return endpoint if endpoint in self._listed or endpoint == UNREADABLE_LABEL else OTHER

    def record(self, endpoint: str, outcome: str, seconds: Optional[float], code: Optional[str] = None) -> None:
        """Count a request that ended; one of an endpoint not learned waits for the workers' list (asked now
        unless asked within LEARN_EVERY_SECONDS), or, past MAX_WAITING_COUNTS or with none asked, is OTHER."""
        if endpoint not in self._listed and endpoint != UNREADABLE_LABEL and _may_be_labelled(endpoint):
            loop = asyncio.get_running_loop()
            if self._learning is None and not self._stopped:
                # asked now, or once a second has passed since the last question: a request ending meanwhile
                # waits for that answer, never labelled OTHER for an endpoint the workers list only now
                wait = self._learnt_at + LEARN_EVERY_SECONDS - loop.time()
                self._learning = loop.create_task(self._learn(max(wait, 0.0)))
            if self._learning is not None and len(self._waiting) < MAX_WAITING_COUNTS:
                self._waiting.append((endpoint, outcome, seconds, code))
                return
        self.meter.count(self.label(endpoint), outcome, seconds, code)

    def unreadable(self) -> None:
        """A request list that could not be read (refused INVALID_ARGUMENT before it was served)."""
        self.meter.count(UNREADABLE_LABEL, ERROR, 0.0, "INVALID_ARGUMENT")

    async def _learn(self, delay: float = 0.0) -> None:
        """Ask the workers (and uses_before's, uses_after's) for their endpoints, after ``delay`` seconds, then
        count what waited."""
        head = self._head
        try:
            if delay:
                await asyncio.sleep(delay)
            names = [name for name in (head.deployment, head._uses_before, head._uses_after) if name is not None]
            asked = await asyncio.gather(*(head._endpoints_of(name, (head._via,), LEARN_TIMEOUT) for name in names))
            for reply, _failures in asked:
                for endpoint in reply.endpoints if reply is not None else ():
                    if _may_be_labelled(endpoint) and len(self._listed) < MAX_ENDPOINT_LABELS:
                        self._listed.add(endpoint)
        except Exception as exc:  # noqa: BLE001 - a question for the labels must not fail anything else
            logger.debug("%s: the workers' endpoints, for the metrics: %s", head.deployment, exc)
        finally:
            self._learnt_at = asyncio.get_running_loop().time()
            self._learning = None
            waiting, self._waiting = self._waiting, []
            for endpoint, outcome, seconds, code in waiting:
                self.meter.count(self.label(endpoint), outcome, seconds, code)

    async def _stop_learning(self) -> None:
        self._stopped = True  # a request ending after this is counted at once, no question asked
        learning = self._learning
        if learning is not None:
            learning.cancel()
            await asyncio.gather(learning, return_exceptions=True)

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
        ejections = CounterMetricFamily("shardnet_head_replica_ejections",
                                        "replicas ejected for repeated failures, each time (an ejection may last "
                                        "less than a scrape interval), by shard", labels=["deployment", "shard"])
        held = GaugeMetricFamily("shardnet_head_requests_held_by_removed_replicas",
                                 "requests under way on replicas no longer routed to (a lapsed lease under "
                                 "--at-most-once, a DEACTIVATE): they wait for them, their deadline or keepalive",
                                 labels=["deployment", "shard"])
        # by shard, as the others: a shard forgotten (its last worker left, no --shards) ends its series, where a
        # sum over the shards would go down, which Prometheus takes for a restart
        unblamed = CounterMetricFamily("shardnet_head_attempts_unblamed",
                                       "failed attempts held against no replica: seen over a second past their "
                                       "deadline as this process stalled, or queued behind the replica's work",
                                       labels=["deployment", "shard", "reason"])
        draining = GaugeMetricFamily("shardnet_head_replicas_draining",
                                     "replicas set aside as they drain (no failure: picked again once they serve), "
                                     "by shard", labels=["deployment", "shard"])
        # the shards, then the hops (uses_before, uses_after) as the pool names them and a hop's worker labels its
        # own metrics (deployment "idx/uses_before", shard "0"): every request crosses a hop, so its replicas count
        # as a shard's do; a hop discovery has found no replica of yet is 0, as a declared shard with none is
        for name in (deployment, *(hop for _, hop in head._hops)):
            # what removed replicas of a forgotten shard still hold is held all the same (a lapsed lease took its
            # last)
            held_by = pool.held_by_forgotten_shards(name)
            for shard_id in sorted(pool.shard_ids(name) or ([] if name == deployment else [0])):
                listed = pool.get_replicas(name, shard_id=shard_id)
                shard = str(shard_id)
                if listed is None:  # a hop with no replica listed yet
                    for family in (replicas, ejected, draining):
                        family.add_metric([name, shard], 0)
                    continue
                replicas.add_metric([name, shard], len(listed))
                set_aside = len(listed.draining_addresses)
                ejected.add_metric([name, shard], len(listed.ejected_addresses) - set_aside)
                draining.add_metric([name, shard], set_aside)
                ejections.add_metric([name, shard], listed.ejections)
                held_by[shard_id] = held_by.get(shard_id, 0) + listed.held_by_removed
                for reason, count in listed.unblamed.items():
                    unblamed.add_metric([name, shard, reason], count)
            for shard_id, count in sorted(held_by.items()):
                held.add_metric([name, str(shard_id)], count)
        yield replicas
        yield ejected
        yield draining
        yield ejections
        yield held
        yield unblamed
        budget = pool.retry_budget
        for name, what, value in (
            ("shardnet_head_retries", "attempts sent again to another replica (failovers)", pool.failovers),
            ("shardnet_head_retries_refused", "failovers the retry budget refused", budget.refused),
            ("shardnet_head_requests_resent", "ANY requests sent on to another shard as theirs had no live worker",
             head.requests_resent),
            ("shardnet_head_leases_lapsed", "worker registrations removed as their leases ran out", head.leases_lapsed),
        ):
            family = CounterMetricFamily(name, what, labels=["deployment"])
            family.add_metric([deployment], value)
            yield family
        yield _cut("shardnet_head_requests_cut", "requests cut unanswered at the drain's end", ["deployment"],
                   [deployment], head.requests_cut, self.label)


# a uses_before's or uses_after's --name as Deployment ("idx/uses_before-0") and `k8s render` ("idx/uses-before")
# give it: its deployment label names the hop, as the head's pool does, not shard 0 of the deployment
_HOP_NAME = re.compile(r"uses[_-](before|after)(-[0-9]+)?")


def worker_deployment(name: str) -> str:
    """A worker's ``deployment`` label: its name up to the first ``/``, and the hop for a uses_before or
    uses_after (``idx/uses_before``), whose requests must not be counted as those of the deployment's shard 0."""
    first, _, rest = name.partition("/")
    hop = _HOP_NAME.fullmatch(rest.split("/", 1)[0])
    return f"{first}/uses_{hop.group(1)}" if hop else first


class WorkerMetrics:
    """A worker's metrics: its requests (per request) and, at scrape time, those in their handlers and those
    cut at the drain's end. A request is labelled with the endpoint its Executor binds (a set fixed when it
    loads), ``/default`` when its default handler took it, else UNBOUND_LABEL (passed through unchanged)."""

    def __init__(self, worker: Any, deployment: str, shard_id: int, handlers: Iterable[str]):
        self.registry = _registry()
        self.listener = MetricsListener(self.registry)
        self._worker = worker
        self._labels = {"deployment": deployment, "shard": str(shard_id)}
        self._bound = frozenset(handler for handler in handlers if handler != DEFAULT)
        self._rest = DEFAULT_ENDPOINT if DEFAULT in handlers else UNBOUND_LABEL
        self.meter = RequestMeter(
            self.registry, "shardnet_worker", self._labels, what="requests the worker handled",
            outcomes=f"{OK}, {ERROR}, {UNBOUND} (no handler: passed through), {CANCELLED}", timed="handler",
        )
        self.registry.register(_Collected(self._families))

    def label(self, endpoint: str) -> str:
        """The endpoint's label: itself when bound, ``/default`` or UNBOUND_LABEL when not (UNREADABLE_LABEL kept)."""
        return endpoint if endpoint in self._bound or endpoint == UNREADABLE_LABEL else self._rest

    def record(self, endpoint: str, outcome: str, seconds: Optional[float], code: Optional[str] = None) -> None:
        """Count a request that ended (one no handler served: ``unbound``, as it passed through unchanged)."""
        label = self.label(endpoint)
        if outcome == OK and label == UNBOUND_LABEL:
            outcome = UNBOUND
        self.meter.count(label, outcome, seconds, code)

    def unreadable(self) -> None:
        """A request list that could not be read (refused INVALID_ARGUMENT before it was handled)."""
        self.meter.count(UNREADABLE_LABEL, ERROR, 0.0, "INVALID_ARGUMENT")

    def meter_handle(self, handle: Handle, endpoint_of: Callable[[Any, Any], str]) -> Handle:
        """The worker's ``_handle``, counted and timed under the endpoint ``endpoint_of(request, context)`` names."""

        def endpoint_named(requests: list, context: Any) -> str:
            try:
                return endpoint_of(requests[0], context)
            except ProtocolError:
                return UNREADABLE_LABEL

        return metered(handle, self.meter, self.record, endpoint_named)

    def _families(self) -> Iterator[Any]:
        worker = self._worker
        names, values = list(self._labels), list(self._labels.values())
        in_flight = GaugeMetricFamily("shardnet_worker_requests_in_flight",
                                      "requests in their handlers (or queued for a handler thread)", labels=names)
        # a blocking handler whose call was cut runs on in its thread: still in its handler, as the gauge says
        in_flight.add_metric(values, sum(worker._in_handlers.values()) + worker._threads.orphaned())
        yield in_flight
        yield _cut("shardnet_worker_requests_cut", "requests cut in their handlers at the drain's end", names, values,
                   worker.requests_cut, self.label)
