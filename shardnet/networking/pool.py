"""``GrpcConnectionPool``: deployments -> shards -> ``ReplicaList``, and the calls across them.

The pool chooses where a request goes (head or shard, ANY or ALL, which
shard next) and fails over to another replica when one is unreachable; each
ReplicaList holds the channels and picks the replica. Responses come back
as ``(response, trailing_metadata)``, decoded lazily: a forwarded request is
never parsed beyond what someone reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import grpc.aio
import tenacity
from google.protobuf import empty_pb2

from shardnet.errors import (
    ConfigurationError,
    ProtocolError,
    ReplicaError,
    RoutingError,
    replica_error_class,
)
from shardnet.networking import oneshot
from shardnet.networking.addresses import parse_address
from shardnet.networking.balancing import check_balancer, make_balancer
from shardnet.networking.channels import (
    ChannelOptions,
    MetadataCache,
    Stubs,
    check_endpoint_travels,
    checked_options,
    create_async_channel_stub,
    compression_options,
    default_grpc_options,
    error_cause,
    get_grpc_channel,
    never_connected_note,
    never_reached,
    replica_tls_diagnosis,
)
from shardnet.networking.policies import (
    EjectionPolicy,
    RetryBudget,
    RetryPolicy,
    check_flag,
    check_seconds,
    check_timeout,
)
from shardnet.networking.polling import PollingType
from shardnet.networking.connection import HEALTH_TIMEOUT, Connection, close_in_turn
from shardnet.networking.replica_list import ReplicaList, wrong_server
from shardnet.networking.tls import ClientTls, FollowedClientMaterial
from shardnet.protocol import services
from shardnet.protocol.messages import MAX_SHARD_ID, ControlRequest, DataRequest, is_shard_id
from shardnet.protocol.proto import jina_pb2

logger = logging.getLogger(__name__)

RENEWAL_PROBES = 3  # replicas asked whether they take renewed client TLS material before every channel gets it

MAX_UNKNOWN_NAMES_SAID = 100  # unknown deployment names warned of per pool: a caller looping over made-up names
# shards declare_shards takes at most: each is made at once (300,000 took 2.3 s and 282 MB), and each needs a worker
# of its own, of which a head holds as many at most (runtimes.head.MAX_WORKERS is this; head --shards takes no more)
MAX_SHARDS = 10_000
# seconds of the caller's deadline a failover attempt must have (after its round's back-off, if any); with less,
# the call fails at once with what it has rather than sleep to the deadline and send an attempt it cannot wait for
MIN_ATTEMPT_SECONDS = 0.05

Metadata = Union[Sequence[tuple[str, str]], Mapping[str, str]]
_METHODS = frozenset(field.name for field in dataclasses.fields(Stubs) if field.name != "streams")  # what ``call`` names
# the methods carrying data requests: their failovers are the retries the head counts (shardnet_head_retries_total)
_DATA_METHODS = frozenset(method for method in _METHODS if "data" in method)
Reply = tuple[Any, Any]
# what a Task of send_request(s) gives: the answer, of the request's own class, and the call's trailing metadata
RequestT = TypeVar("RequestT", DataRequest, ControlRequest)
Answer = tuple[RequestT, grpc.aio.Metadata]


def _check_policies(**given: tuple[Any, type]) -> None:
    """Each policy is an instance of its class (or None where that means the default): a wrong one fails here."""
    for name, (value, kind) in given.items():
        if value is not None and not isinstance(value, kind):
            # the type only: a ServerTls given for a ClientTls would print its private key
            raise ConfigurationError(
                f"{name} must be an instance of {kind.__name__} (or None), got a {type(value).__name__}"
            )


# what a send from outside a running event loop is told (asyncio's bare "no running event loop" said neither why nor
# what to do, and left a "coroutine 'GrpcConnectionPool.call' was never awaited" warning behind)
NO_RUNNING_LOOP = (
    "the pool's sends return asyncio Tasks: call them from async code in the event loop the pool's connections belong "
    "to (from another thread: asyncio.run_coroutine_threadsafe(coroutine, that_loop); from blocking code with no "
    "loop: send_request_sync)"
)


def _check_retries(retries: Any) -> None:
    """Jina's ``retries``: an integer (negative: the pool's own policy) or None."""
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        raise ConfigurationError(f"retries must be an integer (negative: the pool's policy), got {retries!r}")


def _check_names(deployment: Any, shard_id: Any) -> int:
    """A deployment is named by non-empty text and a shard by a number from 0 (the maps sort and print them);
    the shard id as a Python int."""
    if not isinstance(deployment, str) or not deployment:
        raise ConfigurationError(f"a deployment is named by non-empty text, got {deployment!r}")
    return _shard_number(deployment, shard_id)


def _unsent(error: BaseException, method: str) -> bool:
    """Whether no replica ran the request a failed attempt carried: it reached none (``never_reached``; or its time
    ran out while it waited in a request stream's queue, from which it was taken back), or one with no such data
    method answered UNIMPLEMENTED (another server on its port)."""
    if never_reached(error):
        return True
    if (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        and error.details() == services.TAKEN_BACK_DETAILS
    ):
        return True
    return isinstance(error, grpc.aio.AioRpcError) and wrong_server(method, error.code())


def _shard_number(
    deployment: str, shard_id: Any, what: str = "a shard id", most: int = MAX_SHARD_ID, why: str = ""
) -> int:
    """``shard_id`` as a Python int (one from numpy, as a computed id often is, too); ConfigurationError for
    anything but an integer from 0 to ``most`` (``why`` says why; by default MAX_SHARD_ID: a float, a bool, text,
    one no message can carry)."""
    if not is_shard_id(shard_id) or shard_id > most:
        raise ConfigurationError(
            f"deployment {deployment!r}: {what} is an integer from 0 to {most}{why}, got {shard_id!r}"
        )
    return int(shard_id)


@dataclass
class _Deployment:
    """The replica lists of one deployment: its head and its shards by id."""

    head: Optional[ReplicaList] = None
    shards: dict[int, ReplicaList] = field(default_factory=dict)
    next_shard: int = 0  # the index in ``ordered()`` an ANY request without a shard id tries first
    declared: int = 0  # shards 0..declared-1 expected (declare_shards); 0: any shard may join
    # shards' items by id, made once per change of them (``ordered``); None once they changed
    _ordered: Optional[list[tuple[int, ReplicaList]]] = field(default=None, repr=False, compare=False)

    def ordered(self) -> list[tuple[int, ReplicaList]]:
        """``shards``' (id, replicas) pairs by id, sorted once per change of the shards (``changed``), not per
        request: ANY over many shards sorted them all for every request (2,048 shards: 2,056 calls a request)."""
        if self._ordered is None:
            self._ordered = sorted(self.shards.items())
        return self._ordered

    def changed(self) -> None:
        """A shard was added to or dropped from ``shards``."""
        self._ordered = None


class _FailOver:
    """Where a fail-over stands: its latest error and replica, how many attempts, and why it may have stopped."""

    __slots__ = ("error", "connection", "method", "attempt_timeout", "attempts", "budget_refused", "out_of_time",
                 "taken")

    def __init__(self, first_error: grpc.aio.AioRpcError, first: Connection, method: str) -> None:
        self.error, self.connection, self.method = first_error, first, method
        self.attempt_timeout: Optional[float] = None
        self.attempts = 1
        self.budget_refused = False
        self.out_of_time = False  # the caller's deadline leaves another attempt too little (MIN_ATTEMPT_SECONDS)
        # the first failed attempt a replica may have run, with its replica; None while every attempt failed
        # before a replica could take it (the request is then unsent)
        self.taken: Optional[tuple[grpc.aio.AioRpcError, Connection]] = None
        self.failed(first_error)

    @property
    def unsent(self) -> bool:
        """Whether no attempt reached a replica that could have run the request."""
        return self.taken is None

    def failed(self, error: grpc.aio.AioRpcError) -> None:
        """The latest attempt, on ``connection``, failed with ``error``."""
        self.error = error
        if self.taken is None and not _unsent(error, self.method):
            self.taken = (error, self.connection)


class GrpcConnectionPool:
    """Connections to every replica of every shard of every deployment this process talks to.

    >>> pool = GrpcConnectionPool()                       # doctest: +SKIP
    >>> pool.add_connection("encoder", "127.0.0.1:50051", shard_id=0)
    >>> [task] = pool.send_request(DataRequest(endpoint="/index"), "encoder")
    >>> response, trailing = await task
    """

    # The gRPC port of every pod in Kubernetes, as Jina 3.34's constant: what shardnet's manifests give the
    # ``executor`` container and what its discovery assumes of a pod that names none (kubernetes.DEFAULT_PORT).
    # Jina's K8S_PORT_USES_BEFORE/AFTER (8078/8079: sidecars in the head's pod) and K8S_PORT_MONITORING (9090)
    # are not defined: shardnet renders no such sidecars, its metrics port is a runtime's --metrics-port (k8s
    # render --metrics, 9090 by default), and its discovery reads a uses_before/uses_after pod's port from the
    # pod like any other's.
    K8S_PORT = 8080

    # The original design hangs its one-off helpers on the pool class; keep those names. Assigned in the class
    # body (not after it) so that type checkers see them: ``GrpcConnectionPool.send_request_sync(...)``.
    get_grpc_channel = staticmethod(get_grpc_channel)
    get_default_grpc_options = staticmethod(default_grpc_options)
    create_async_channel_stub = staticmethod(create_async_channel_stub)
    send_request_sync = staticmethod(oneshot.send_request_sync)
    send_requests_sync = staticmethod(oneshot.send_requests_sync)
    send_request_async = staticmethod(oneshot.send_request_async)
    send_requests_async = staticmethod(oneshot.send_requests_async)
    send_health_check_sync = staticmethod(oneshot.send_health_check_sync)
    send_health_check_async = staticmethod(oneshot.send_health_check_async)
    activate_worker = staticmethod(oneshot.activate_worker)
    deactivate_worker = staticmethod(oneshot.deactivate_worker)
    activate_worker_sync = staticmethod(oneshot.activate_worker_sync)
    deactivate_worker_sync = staticmethod(oneshot.deactivate_worker_sync)

    def __init__(
        self,
        runtime_name: str = "",
        logger: Optional[logging.Logger] = None,
        compression: Union[str, grpc.Compression, None] = None,
        *,
        balancer: str = "round_robin",
        retry: Optional[RetryPolicy] = RetryPolicy(),
        retry_budget: Optional[RetryBudget] = None,
        ejection: Optional[EjectionPolicy] = EjectionPolicy(),
        timeout: Optional[float] = None,
        tls: Optional[ClientTls] = None,
        options: Optional[ChannelOptions] = None,
        channel_options: Optional[ChannelOptions] = None,
        metadata: Metadata = (),
        request_streams: bool = False,
        tls_check_interval: float = 30.0,
    ):
        """Jina's first three arguments keep their places: ``runtime_name``, ``logger`` (where the pool's
        replica lists log ejections; any object with ``warning`` and ``info``) and ``compression``
        (``"Gzip"``, ``"Deflate"``, ``"NoCompression"`` or a ``grpc.Compression``) for every call;
        ``channel_options`` is Jina's name for ``options``. ``request_streams``: single requests to
        shardnet workers travel as messages on a few shared streams per replica instead of a call each
        (networking/streams.py; what a head does), unary to servers that do not serve them.
        ``tls_check_interval``: how often a started pool whose ``tls`` material is in files looks for a
        renewal of them, and gives its replicas new channels when there is one."""
        if not isinstance(runtime_name, str):
            raise ConfigurationError(f"runtime_name names the pool's owner (Jina's first argument), got {runtime_name!r}")
        self.runtime_name = runtime_name  # who holds the pool, as in Jina: shown by repr
        check_balancer(balancer)  # now, not at the first add
        _check_policies(retry=(retry, RetryPolicy), retry_budget=(retry_budget, RetryBudget),
                        ejection=(ejection, EjectionPolicy), tls=(tls, ClientTls))
        check_timeout(timeout, "the pool's timeout")
        check_seconds(tls_check_interval, "tls_check_interval")
        self.balancer = balancer
        self.retry = retry if retry is not None else RetryPolicy()
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget()
        # attempts sent again to another replica since start, on the budget or not (leaving an ejected one is
        # free): the budget's own count left out most of a killed replica's fail-overs
        self.failovers = 0
        self.timeout = timeout
        self._ejection = ejection
        self._tls = tls
        self._dialling_tls = tls  # the material channels are made with: tls, or its last renewal read from its files
        self._tls_check_interval = tls_check_interval
        self._tls_follower: Optional[asyncio.Task] = None
        if options is not None and channel_options is not None:
            raise ConfigurationError("give channel options once: options= or Jina's channel_options=, not both")
        self._options = checked_options(options if options is not None else channel_options)
        self._options += compression_options(compression)
        if logger is not None and not all(callable(getattr(logger, name, None)) for name in ("warning", "info")):
            raise ConfigurationError(f"logger must have warning() and info() (a logging.Logger), got {logger!r}")
        self._logger = logger
        check_flag(request_streams, "request_streams")
        self._request_streams = request_streams
        self._deployments: dict[str, _Deployment] = {}
        self._retired: list[ReplicaList] = []  # lists of forgotten deployments whose removed channels still close
        self._unknown_named: set[str] = set()  # deployment names asked for and never known: warned of once each
        try:
            self._metadata_cache = MetadataCache(fixed=metadata)
        except ProtocolError as exc:
            raise ConfigurationError(f"the pool's metadata: {exc}") from None

    # -- membership -----------------------------------------------------------

    def _replica_list(self, deployment: str, head: bool, shard_id: int) -> ReplicaList:
        shard_id = _check_names(deployment, shard_id)
        entry = self._deployments.setdefault(deployment, _Deployment())
        name = f"{deployment}/head" if head else f"{deployment}/shard-{shard_id}"
        make = lambda: ReplicaList(  # noqa: E731
            make_balancer(self.balancer), tls=self._dialling_tls, options=self._options, ejection=self._ejection,
            name=name, logger=self._logger, request_streams=self._request_streams,
        )
        if head:
            if entry.head is None:
                entry.head = make()
            return entry.head
        replicas = entry.shards.get(shard_id)
        if replicas is None:
            replicas = entry.shards[shard_id] = make()
            entry.changed()
        return replicas

    def add_connection(self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None) -> None:
        """Register a replica (or the head) of ``deployment``; an address already there stays one connection.

        A malformed address raises ConfigurationError and leaves the pool as it was.
        """
        parse_address(address, tls=self._tls is not None)  # before any map entry is made for it
        check_flag(head, "head")  # "no" would add the replica as the deployment's head
        shard_id = _check_names(deployment, 0 if shard_id is None else shard_id)
        entry = self._deployments.get(deployment)
        if not head and entry is not None and entry.declared and shard_id >= entry.declared:
            # a replica of another shape (a shard left running after a resharding): ALL would fan out to it
            raise ConfigurationError(
                f"deployment {deployment!r}: replica {address} is of shard {shard_id}, but the deployment has "
                f"shards 0..{entry.declared - 1}"
            )
        self._replica_list(deployment, head, shard_id).add_connection(address)

    def declare_shards(self, deployment: str, count: int) -> None:
        """Make shards ``0..count-1`` known before any replica joins, so ALL reports the missing ones; from then
        on a replica of a shard beyond them is refused (ConfigurationError). Empty shards beyond them (an
        earlier, larger shape) are dropped; ones that still have replicas make it a ConfigurationError. ``count``
        is at most MAX_SHARDS, as ``head --shards``."""
        count = _shard_number(
            deployment, count, "a count of shards", MAX_SHARDS,
            " (each is made at once, and needs a worker of its own: a head holds that many at most)",
        )
        entry = self._deployments.get(deployment)
        beyond = sorted(shard for shard in entry.shards if shard >= count) if entry is not None and count else []
        held = [shard for shard in beyond if entry.shards[shard].has_connections()]
        if held:  # ALL would go on fanning out to them, past the shape declared
            raise ConfigurationError(
                f"deployment {deployment!r}: cannot declare {count} shards while shards "
                f"{', '.join(map(str, held))} still have replicas; remove them first"
            )
        self._retire([entry.shards.pop(shard) for shard in beyond])  # empty, from an earlier shape: not in ALL
        if beyond:
            entry.changed()
        for shard_id in range(count):
            self._replica_list(deployment, False, shard_id)
        if count:
            self._deployments[deployment].declared = count

    async def remove_connection(
        self,
        deployment: str,
        address: str,
        head: bool = False,
        shard_id: Optional[int] = None,
        *,
        grace: Optional[float] = None,
    ) -> Optional[Connection]:
        """Close and forget a replica; return the removed connection, or None when it was not there.

        With no ``shard_id`` every shard of the deployment is searched. A shard
        whose last replica leaves stays known (empty), so ALL can say it is missing.
        A malformed address raises ConfigurationError, whether or not the deployment is known.
        ``grace``: how long calls already on it may go on before they are cut and fail over (as
        ``ReplicaList.remove_connection``: None, as long as they last, for a replica leaving alive).
        """
        parse_address(address)
        check_flag(head, "head")
        if grace is not None:
            check_seconds(grace, "grace", zero=True)
        entry = self._deployments.get(deployment)
        if entry is None:
            return None
        if head:
            return await entry.head.remove_connection(address, grace=grace) if entry.head else None
        if shard_id is None:
            candidates = entry.shards.values()
        else:
            candidates = [entry.shards.get(_shard_number(deployment, shard_id))]
        for replicas in candidates:
            if replicas is not None:
                removed = await replicas.remove_connection(address, grace=grace)
                if removed is not None:
                    return removed
        return None

    def forget_deployment(self, deployment: str) -> bool:
        """Drop ``deployment`` if it holds no replica, head included, and declared no shards; True when dropped.

        ``remove_connection`` keeps a deployment its last replica left (ALL names the empty shard); discovery
        following a whole namespace forgets, with this, one that left it. Calls still running on the channels
        of replicas it removed keep their grace: those lists stay the pool's, to close, until their channels are.
        """
        entry = self._deployments.get(deployment)
        if entry is None or entry.declared:
            return False
        lists = ([entry.head] if entry.head else []) + list(entry.shards.values())
        if any(replicas.has_connections() for replicas in lists):
            return False
        del self._deployments[deployment]
        self._retire(lists)
        return True

    def forget_empty_shards(self, deployment: str) -> list[int]:
        """Drop the shards beyond 0 of ``deployment`` that hold no replica, when it declared no shards; the ids
        dropped. A head given no shard count calls it as workers leave: a shard id given by mistake, or one a
        resharding left, would otherwise fail every ALL and hold its list for ever."""
        entry = self._deployments.get(deployment)
        if entry is None or entry.declared:
            return []
        empty = [shard for shard, replicas in entry.shards.items() if shard and not replicas.has_connections()]
        self._retire([entry.shards.pop(shard) for shard in empty])
        if empty:
            entry.changed()
        return empty

    def held_by_forgotten_shards(self, deployment: str) -> dict[int, int]:
        """The calls still under way on removed replicas of ``deployment``'s forgotten shards (a lapsed lease took
        a shard's last worker), by shard id: their lists are kept while those channels close."""
        prefix, held = f"{deployment}/shard-", {}
        for replicas in self._retired:
            shard = replicas.name[len(prefix):] if replicas.name.startswith(prefix) else ""
            if shard.isdigit() and replicas.held_by_removed:
                held[int(shard)] = held.get(int(shard), 0) + replicas.held_by_removed
        return held

    def _retire(self, lists: list[ReplicaList]) -> None:
        """Keep ``lists``, dropped from the map, while their channels still close (calls keep their grace), and
        let go of those retired before whose channels have closed."""
        self._retired = [replicas for replicas in [*self._retired, *lists] if replicas.has_closing_channels()]

    def get_replicas(self, deployment: str, head: bool = False, shard_id: int = 0) -> Optional[ReplicaList]:
        """The ReplicaList of one shard (or of the head), or None when the pool does not know it."""
        entry = self._deployments.get(deployment)
        if entry is None:
            return None
        return entry.head if head else entry.shards.get(_shard_number(deployment, shard_id))

    def shard_ids(self, deployment: str) -> list[int]:
        """The shard ids the pool knows for ``deployment``, in order (empty shards included)."""
        entry = self._deployments.get(deployment)
        return sorted(entry.shards) if entry else []

    @property
    def request_streams(self) -> bool:
        """Whether single requests to shardnet workers go on shared streams (``request_streams=``), else unary."""
        return self._request_streams

    @property
    def tls(self) -> Optional[ClientTls]:
        """The TLS material ``https://`` replicas are dialled with (None: system roots, no client certificate)."""
        return self._tls

    @property
    def deployments(self) -> dict[str, dict[str, Any]]:
        """A snapshot: ``{deployment: {"head": [addresses], "shards": {id: [addresses]}}}``."""
        return {
            name: {
                "head": entry.head.addresses if entry.head else [],
                "shards": {shard: replicas.addresses for shard, replicas in sorted(entry.shards.items())},
            }
            for name, entry in self._deployments.items()
        }

    # -- routing ----------------------------------------------------------------

    def targets(
        self, deployment: str, head: bool, shard_id: Optional[int], polling_type: PollingType
    ) -> list[tuple[Optional[int], ReplicaList]]:
        """The (shard id, replicas) pairs a request goes to; empty for an unknown deployment or shard."""
        entry = self._deployments.get(deployment)
        if entry is None:
            return []
        if head:
            return [(None, entry.head)] if entry.head is not None and entry.head.has_connections() else []
        if polling_type == PollingType.ALL:
            return list(entry.ordered())
        if shard_id is not None:
            shard_id = _shard_number(deployment, shard_id)
            replicas = entry.shards.get(shard_id)
            return [(shard_id, replicas)] if replicas is not None and replicas.has_connections() else []
        if len(entry.shards) == 1:  # the common case, without a sort per request
            [(sid, replicas)] = entry.shards.items()
            return [(sid, replicas)] if replicas.eligible() else []
        # the next shard in turn that has a pickable replica, past those with none (one step when most serve), not
        # by listing every live shard (each asked, all sorted) for every request; each takes one request a turn
        ordered = entry.ordered()
        count = len(ordered)
        start = entry.next_shard
        for step in range(count):
            index = (start + step) % count
            chosen = ordered[index]
            if chosen[1].eligible():
                entry.next_shard = index + 1
                return [chosen]
        return []

    def _metadata_for(self, request: Any, endpoint: Optional[str], metadata: Optional[Metadata]) -> grpc.aio.Metadata:
        if endpoint is None and isinstance(request, DataRequest):
            endpoint = request.endpoint
        elif endpoint is not None:
            check_endpoint_travels(request, endpoint)
        if not metadata:
            return self._metadata_cache.for_endpoint(endpoint)
        return self._metadata_cache.for_endpoint(endpoint, metadata)

    # -- calls --------------------------------------------------------------------

    async def call(
        self,
        payload: Any,
        deployment: str,
        replicas: ReplicaList,
        *,
        shard_id: Optional[int] = None,
        method: str = "single_data",
        metadata: Metadata = (),
        timeout: Optional[float] = None,
        retries: Optional[int] = None,
        new_request: bool = True,
        budgeted: bool = True,
    ) -> Reply:
        """Send ``payload`` with ``method`` to one replica of ``replicas``, failing over as the policy allows.

        ``retries`` caps the failovers of this call (0: none; None or negative: the policy's rounds).
        ``new_request``: False for a request the retry budget already counted (a head sending one no worker
        took to another shard), which must not raise the budget's allowance.
        ``budgeted``: False for a question that is no data request (a head's endpoint discovery, which every
        ``shardnet status`` asks, with no token): its failovers, bounded by the rounds and the deadline, spend
        nothing of the budget the data requests' failovers need.
        Raises ReplicaError (or DeadlineExceeded) naming deployment, shard and
        replica, or RoutingError when the list has no replica at all.
        """
        if method not in _METHODS:
            raise ConfigurationError(f"method {method!r}: expected one of {', '.join(sorted(_METHODS))}")
        if new_request:
            self.retry_budget.record_request()
        metadata = self._metadata_cache.get(metadata)
        timeout = self.timeout if timeout is None else timeout
        connection = replicas.get_next_connection()
        if connection is None:
            replicas.nothing_to_pick()
            raise RoutingError(
                f"deployment {deployment!r}, shard {shard_id}: no live replica to send to",
                deployment=deployment,
                shard_id=shard_id,
            )
        if timeout is None and self.retry.attempt_timeout is None:  # the common case: no clock to read
            deadline = attempt_timeout = None
            callers_deadline = False
        else:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            attempt_timeout = self._attempt_timeout(deadline, loop)
            callers_deadline = self._callers_deadline(attempt_timeout)
        try:
            return await replicas.call(
                connection, method, payload, metadata, attempt_timeout, callers_deadline=callers_deadline
            )
        except grpc.aio.AioRpcError as error:
            loop = asyncio.get_running_loop()
            if retries == 0 or not self._retryable(error, method, attempt_timeout, deadline, loop):
                raise self._replica_error(
                    error, connection, deployment, shard_id, unsent=_unsent(error, method)
                ) from None
            return await self._fail_over(
                error, connection, payload, deployment, replicas, shard_id, method, metadata, deadline, retries,
                budgeted=budgeted,
            )

    def _attempt_timeout(self, deadline: Optional[float], loop: asyncio.AbstractEventLoop) -> Optional[float]:
        """What one attempt may take: the per-attempt limit, never past the call's deadline."""
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        per_attempt = self.retry.attempt_timeout
        if per_attempt is None:
            return remaining
        return per_attempt if remaining is None else min(per_attempt, remaining)

    def _callers_deadline(self, attempt_timeout: Optional[float]) -> bool:
        """True when ``attempt_timeout`` is the caller's remaining time, not the per-attempt limit: its expiry
        is the caller's, not the replica's fault (no ejection, no retry)."""
        return attempt_timeout is not None and attempt_timeout != self.retry.attempt_timeout

    def _retryable(self, error: grpc.aio.AioRpcError, method: str, attempt_timeout, deadline, loop) -> bool:
        """Whether a failed attempt may go to another replica: a code the policy retries, an attempt that ran
        out of its own time, or a server on the replica's port that is no replica (it ran nothing)."""
        if deadline is not None and loop.time() >= deadline:
            return False
        if self.retry.unsent_only and not _unsent(error, method):  # it may have run: at most once
            return False
        timed_out_attempt = attempt_timeout is not None and not self._callers_deadline(attempt_timeout)
        return self.retry.is_retryable(error.code(), timed_out_attempt) or wrong_server(method, error.code())

    async def _fail_over(
        self,
        first_error: grpc.aio.AioRpcError,
        first: Connection,
        payload: Any,
        deployment: str,
        replicas: ReplicaList,
        shard_id: Optional[int],
        method: str,
        metadata: Metadata,
        deadline: Optional[float],
        retries: Optional[int] = None,
        budgeted: bool = True,
    ) -> Reply:
        """Retry on the shard's other replicas, each at most once a round; back off between rounds."""
        loop = asyncio.get_running_loop()
        tried = {first}
        last = _FailOver(first_error, first, method)
        backoff = self.retry.backoff()

        def untried() -> list[Connection]:
            return [connection for connection in replicas.eligible() if connection not in tried]

        def wait(state: tenacity.RetryCallState) -> float:
            if untried():
                return 0.0
            tried.clear()  # a new round: every replica may be tried again
            pause = backoff(state)
            if deadline is not None and pause >= deadline - loop.time() - MIN_ATTEMPT_SECONDS:
                # slept to the deadline, the round's attempt would go with no time left: fail now (out_of_time)
                last.out_of_time = True
                return 0.0
            return pause

        def should_retry(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if not isinstance(error, grpc.aio.AioRpcError):
                return False
            last.failed(error)
            return self._retryable(error, method, last.attempt_timeout, deadline, loop)

        def out_of_time(state: Optional[tenacity.RetryCallState]) -> bool:
            """Whether the caller's deadline leaves the next attempt too little (MIN_ATTEMPT_SECONDS), the round's
            back-off included (``wait`` runs before this): sent, it would run once the caller had given up."""
            if deadline is not None and deadline - loop.time() < MIN_ATTEMPT_SECONDS:
                last.out_of_time = True
            return last.out_of_time

        def spend(state: tenacity.RetryCallState) -> bool:
            last.budget_refused = budgeted and not self.retry_budget.try_spend()
            return last.budget_refused

        # the first attempt is one of its round's while its replica is still listed; one removed under it (cut as
        # it left: a lapsed lease, a replaced address) leaves the replicas left every round of theirs, a new
        # connection added since at its address included
        first_listed = replicas.lists(first)
        max_attempts = max(1, len(replicas)) * self.retry.rounds - (1 if first_listed else 0)
        if retries is not None and retries >= 0:
            max_attempts = retries
        if max_attempts < 1:  # one round over one replica: the first attempt was all (tenacity would make one more)
            raise self._replica_error(first_error, first, deployment, shard_id, unsent=last.unsent) from None
        # leaving a replica its list already took out (ejected for its failures, or removed) is routing, not a
        # retry storm: a killed replica's streams fail everything they carried at once, a hung one's calls time
        # out together, and all of it must go elsewhere
        routed_around = not replicas.is_eligible(first)
        if out_of_time(None):  # tenacity makes its first attempt without asking ``stop``
            raise self._replica_error(
                first_error, first, deployment, shard_id,
                "the only attempt, too little of the caller's deadline left for another attempt", unsent=last.unsent,
            ) from None
        if budgeted and not routed_around and not self.retry_budget.try_spend():
            raise self._replica_error(
                first_error, first, deployment, shard_id, "the only attempt, the retry budget exhausted",
                unsent=last.unsent,
            ) from None
        retrying = tenacity.AsyncRetrying(
            # in this order: no retry token is spent on an attempt that the rounds or the time do not allow
            stop=tenacity.stop_after_attempt(max_attempts) | tenacity.stop_any(out_of_time) | tenacity.stop_any(spend),
            wait=wait,
            retry=should_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    candidates = untried() or list(replicas.eligible())
                    if not candidates:
                        break
                    connection = replicas.balancer.pick(candidates)
                    tried.add(connection)
                    last.connection = connection
                    last.attempts += 1
                    if method in _DATA_METHODS:  # a data request's failover (the retries metric), not a question's
                        self.failovers += 1
                    last.attempt_timeout = self._attempt_timeout(deadline, loop)
                    return await replicas.call(
                        connection, method, payload, metadata, last.attempt_timeout,
                        callers_deadline=self._callers_deadline(last.attempt_timeout),
                    )
        except grpc.aio.AioRpcError as error:  # retries exhausted, refused by the budget, or not retryable
            last.failed(error)
        raise self._replica_error(
            last.error, last.connection, deployment, shard_id, self._fail_over_note(last, max_attempts),
            unsent=last.unsent,
        ) from None

    def _fail_over_note(self, last: "_FailOver", max_attempts: int) -> str:
        """What a failed fail-over adds to its last error: how many attempts, why it stopped, and an earlier attempt
        that may have run the request (the last one's words, "connection refused", would read as if none had)."""
        # one attempt (no replica was left to try: the pool closed, say) is counted by none; an earlier attempt
        # that may have run (below) means two or more
        notes = [f"the last of {last.attempts} attempts"] if last.attempts > 1 else []
        if last.budget_refused:
            notes.append("the retry budget exhausted")
        if last.out_of_time and last.attempts - 1 < max_attempts:  # not when the rounds were all spent
            notes.append("too little of the caller's deadline left for another attempt")
        if self.retry.attempt_timeout is not None and last.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            if self._callers_deadline(last.attempt_timeout):  # the last one ran into the caller's deadline
                notes.append("the last ended by the caller's deadline")
            else:
                notes.append(f"each given at most the attempt timeout of {self.retry.attempt_timeout:g}s")
        note = ", ".join(notes)
        if last.taken is not None and last.taken[0] is not last.error:
            error, connection = last.taken
            note += f"; an earlier attempt, on replica {connection.address}, may have run it: {error_cause(error)}"
        return note

    @staticmethod
    def _replica_error(
        error: grpc.aio.AioRpcError,
        connection: Connection,
        deployment: str,
        shard_id: Optional[int],
        note: str = "",
        unsent: bool = False,
    ) -> ReplicaError:
        # what the failed connection's words say of TLS on both ends (a plaintext pool at a TLS worker, say)
        cause = error_cause(error) + replica_tls_diagnosis(error, connection.address, connection.tls)
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            note = "; ".join(filter(None, (never_connected_note(connection.channel), note)))
        if note:
            cause = f"{cause} ({note})"
        return replica_error_class(error.code())(
            cause, address=str(connection.address), code=error.code(), deployment=deployment, shard_id=shard_id,
            unsent=unsent,
        )

    def _spawn(
        self, payload: Any, deployment: str, shard_id, replicas, method, metadata, timeout, retries=None
    ) -> asyncio.Task:
        call = self.call(
            payload, deployment, replicas, shard_id=shard_id, method=method, metadata=metadata, timeout=timeout,
            retries=retries,
        )
        try:
            return asyncio.create_task(call)
        except RuntimeError:  # no running loop (a plain thread): refused in shardnet's words, the call never begun
            call.close()
            raise ConfigurationError(NO_RUNNING_LOOP) from None

    @staticmethod
    def _check_sending_loop() -> None:
        """Refuse a send with nothing to send to outside a running loop as one with something is (``_spawn``)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(NO_RUNNING_LOOP) from None

    @staticmethod
    def _method_for(requests: Sequence[Union[DataRequest, ControlRequest]]) -> tuple[str, Any]:
        if len(requests) == 1:
            request = requests[0]
            if isinstance(request, DataRequest):
                return "single_data", request
            if isinstance(request, ControlRequest):
                return "control", request
        for request in requests:
            if isinstance(request, ControlRequest):
                raise TypeError("control requests are sent one at a time")
            if not isinstance(request, DataRequest):
                raise TypeError(f"the pool sends DataRequest or ControlRequest objects, got {type(request).__name__}")
        return "data", list(requests)

    def send_requests(
        self,
        requests: Sequence[RequestT],
        deployment: str,
        head: bool = False,
        shard_id: Optional[int] = None,
        polling_type: Union[PollingType, str] = PollingType.ANY,
        endpoint: Optional[str] = None,
        metadata: Optional[Metadata] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = -1,
    ) -> list[asyncio.Task[Answer[RequestT]]]:
        """Send to the replicas polling selects; one Task per target, each giving (response, trailing metadata).

        ANY: one replica of one shard (the given one, else the next in turn);
        ALL: one replica of every shard, ``shard_id`` ignored; ``head``: the
        deployment's head. Unknown deployment or shard: an empty list. Under
        ALL a shard left with no replica gives a Task that raises RoutingError.
        ``retries`` as in Jina: failovers per call, negative for the pool's policy. An ``endpoint`` pair in
        ``metadata`` other than the call's endpoint is refused (heads and workers would read it, the last).
        """
        if not requests:
            raise ConfigurationError(f"send_requests to {deployment!r} needs at least one request")
        check_timeout(timeout)
        _check_retries(retries)
        if endpoint is not None and not isinstance(endpoint, str):
            raise ConfigurationError(f"endpoint must be text such as '/search', got {endpoint!r}")
        method, payload = self._method_for(requests)
        call_metadata = self._metadata_for(requests[0], endpoint, metadata)
        targets = self.targets(deployment, head, shard_id, PollingType.parse(polling_type))
        if not targets:
            self._check_sending_loop()
            self._nothing_to_send_to(deployment, head, shard_id)
        return [
            self._spawn(payload, deployment, sid, replicas, method, call_metadata, timeout, retries)
            for sid, replicas in targets
        ]

    def say_emptied(self, deployment: str, head: bool = False, shard_id: Optional[int] = None) -> None:
        """A request found nothing to send to in ``deployment`` (its head, a shard, or any shard under ANY): each
        of those lists whose last replica was removed warns so, once (``ReplicaList.nothing_to_pick``), as a call
        under ALL does; under ANY no call reaches an empty list, so this is where its emptiness is said."""
        entry = self._deployments.get(deployment)
        if entry is None:
            return
        if head:
            lists = [entry.head] if entry.head is not None else []
        elif shard_id is not None:
            lists = [entry.shards.get(_shard_number(deployment, shard_id))]
        else:
            lists = list(entry.shards.values())
        for replicas in lists:
            if replicas is not None and not replicas.eligible():
                replicas.nothing_to_pick()

    def _nothing_to_send_to(self, deployment: str, head: bool, shard_id: Optional[int]) -> None:
        """Say why a send gives no Task, as Jina's pool does (at debug level); a deployment this pool never knew
        (a typo, most often) is warned of once, since a send to it would otherwise do nothing without a word."""
        if deployment in self._deployments:
            self.say_emptied(deployment, head, shard_id)
            where = "its head" if head else "any shard" if shard_id is None else f"shard {shard_id}"
            logger.debug("no available connections for deployment %r, %s: nothing sent", deployment, where)
        elif deployment not in self._unknown_named and len(self._unknown_named) < MAX_UNKNOWN_NAMES_SAID:
            self._unknown_named.add(deployment)
            known = ", ".join(repr(name) for name in sorted(self._deployments)[:10]) or "none"
            logger.warning("deployment %r is not in this pool (it has %s): nothing sent, no Task", deployment, known)

    def send_request(
        self,
        request: RequestT,
        deployment: str,
        head: bool = False,
        shard_id: Optional[int] = None,
        polling_type: Union[PollingType, str] = PollingType.ANY,
        endpoint: Optional[str] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = -1,
        *,
        metadata: Optional[Metadata] = None,
    ) -> list[asyncio.Task[Answer[RequestT]]]:
        """``send_requests`` for a single request, its arguments in the order of Jina's ``send_request`` (which
        had no ``metadata``: it is keyword-only here)."""
        return self.send_requests(
            [request], deployment, head, shard_id, polling_type, endpoint, metadata, timeout, retries
        )

    def send_requests_once(
        self,
        requests: Sequence[RequestT],
        deployment: str,
        metadata: Optional[Metadata] = None,
        head: bool = False,
        shard_id: Optional[int] = None,
        endpoint: Optional[str] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = -1,
    ) -> Optional[asyncio.Task[Answer[RequestT]]]:
        """Send to exactly one replica (ANY); the Task, or None when the deployment has no replica.

        The arguments come in Jina's order (``metadata`` third), unlike ``send_requests``'s, as in Jina.
        """
        tasks = self.send_requests(
            requests, deployment, head, shard_id, PollingType.ANY, endpoint, metadata, timeout, retries
        )
        return tasks[0] if tasks else None

    def send_request_once(
        self,
        request: RequestT,
        deployment: str,
        head: bool = False,
        shard_id: Optional[int] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = -1,
        *,
        metadata: Optional[Metadata] = None,
        endpoint: Optional[str] = None,
    ) -> Optional[asyncio.Task[Answer[RequestT]]]:
        """``send_requests_once`` for a single request, its arguments in the order of Jina's ``send_request_once``
        (which had neither ``metadata`` nor ``endpoint``: they are keyword-only here)."""
        return self.send_requests_once([request], deployment, metadata, head, shard_id, endpoint, timeout, retries)

    def send_discover_endpoint(
        self,
        deployment: str,
        head: bool = True,
        shard_id: Optional[int] = None,
        timeout: Optional[float] = None,
        retries: Optional[int] = -1,
    ) -> Optional[asyncio.Task[tuple[jina_pb2.EndpointsProto, grpc.aio.Metadata]]]:
        """Ask one replica (the head by default, else the given or next shard) which endpoints it serves."""
        check_timeout(timeout)
        _check_retries(retries)
        targets = self.targets(deployment, head, shard_id, PollingType.ANY)
        if not targets:
            self._check_sending_loop()
            self._nothing_to_send_to(deployment, head, shard_id)
            return None
        sid, replicas = targets[0]
        return self._spawn(empty_pb2.Empty(), deployment, sid, replicas, "discovery", (), timeout, retries)

    # -- lifetime -------------------------------------------------------------------

    def start(self) -> None:
        """Begin background work: following TLS material in files for renewals (Kubernetes discovery starts
        watching here too). A pool with such material must be started in a running loop (``async with``)."""
        if self._tls is None or self._tls_follower is not None:
            return
        follower = FollowedClientMaterial(self._tls)
        if not follower.follows_files:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                "start() follows the pool's TLS files for renewals, in the event loop that sends: call it from "
                "async code (or use 'async with pool')"
            ) from None
        # every channel from now on dials with material read and checked as a whole, not with the files as they
        # happen to be when it opens (half a renewal, say); lists made before (a head's static workers) included
        self._dialling_tls = self._tls
        first = follower.renewal()
        if first is not None:
            signature, self._dialling_tls = first
            for replicas in self._replica_lists():
                replicas.dial_with(self._dialling_tls)
            follower.take(signature)
        self._tls_follower = loop.create_task(
            self._follow_tls(follower), name=f"tls-follower-{self.runtime_name or id(self)}"
        )

    async def _follow_tls(self, follower: FollowedClientMaterial) -> None:
        """Renew every replica's channel after each renewal of the client material: an open channel presents
        the certificate it was made with at every reconnection, long after that certificate has expired. A
        replica list the renewal failed to reach is tried again at the next look; the others are not."""
        taken: weakref.WeakKeyDictionary[ReplicaList, tuple] = weakref.WeakKeyDictionary()  # by each list
        refusal_said: Optional[tuple] = None
        while True:
            await asyncio.sleep(self._tls_check_interval)
            renewal = follower.renewal()
            if renewal is None:
                continue
            signature, material = renewal
            refusal = await self._renewal_refused(material)
            if refusal is not None:
                if refusal_said != signature:
                    logger.warning(
                        "client TLS material changed but is not taken: %s; channels keep the previous material, "
                        "and the new one is tried again at each look", refusal,
                    )
                    refusal_said = signature
                continue
            self._dialling_tls = material  # replicas added from now on dial with it too
            renewed, failed = 0, 0
            for replicas in self._replica_lists():
                if taken.get(replicas) == signature:
                    continue
                try:
                    renewed += await replicas.renew_channels(material)
                except Exception:  # noqa: BLE001 - the others still get it; this one is tried again
                    failed += 1
                    logger.exception("%s: renewing its channels with new client TLS material failed", replicas.name)
                else:
                    taken[replicas] = signature
            if not failed:
                follower.take(signature)
                logger.info("client TLS material changed: %d replica channels renewed with it", renewed)

    async def _renewal_refused(self, material: ClientTls) -> Optional[str]:
        """Why renewed client material is not to be taken, or None: a replica that serves the material channels
        dial with now refuses it (signed by a CA it does not trust, or trusting another CA than its own). Taken,
        every channel of every replica would be replaced by one that cannot connect; a replica refusing both, the
        previous material perhaps expired, decides nothing. A few replicas are asked, each over new channels."""
        probed = [
            connection
            for replicas in self._replica_lists()
            for connection in replicas.eligible()
            if connection.address.tls
        ][:RENEWAL_PROBES]
        for connection in probed:
            before, after = await asyncio.gather(
                connection.problem_now(HEALTH_TIMEOUT), connection.problem_now(HEALTH_TIMEOUT, tls=material)
            )
            if before is None and after is not None:
                return f"replica {connection.address} serves the previous material and not it ({after.cause})"
        return None

    def _replica_lists(self) -> list[ReplicaList]:
        return [
            replicas
            for entry in self._deployments.values()
            for replicas in ([entry.head] if entry.head else []) + list(entry.shards.values())
        ] + self._retired

    async def close(self) -> None:
        """Close every channel of every deployment, all together: calls still running get half a second, then
        are cut (UNAVAILABLE naming the replica). Cancelled, it cuts them at once; closing again finishes."""
        follower, self._tls_follower = self._tls_follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        while True:  # until no replica was added (a watch, an ACTIVATE) while the closes ran
            lists = [r for r in self._replica_lists() if r.has_connections() or r.has_closing_channels()]
            if not lists:
                break
            await close_in_turn(replicas.close() for replicas in lists)
        self._deployments, self._retired = {}, []

    async def __aenter__(self) -> "GrpcConnectionPool":
        self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        shards = sum(len(entry.shards) for entry in self._deployments.values())
        replicas = sum(len(r) for entry in self._deployments.values() for r in entry.shards.values())
        owner = f"{self.runtime_name}: " if self.runtime_name else ""
        return f"<GrpcConnectionPool {owner}{len(self._deployments)} deployments, {shards} shards, {replicas} replicas, {self.balancer}>"

