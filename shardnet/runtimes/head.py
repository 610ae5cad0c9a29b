"""The head: one address in front of a deployment's shards and replicas.

Data requests are routed by the polling of their endpoint (the ``endpoint``
metadata, else ``header.exec_endpoint``): ANY forwards the request bytes to
one replica of one shard without decoding its documents; ALL sends it to one
replica of every shard and merges the answers. ``uses_before`` sees the
request first; ``uses_after`` receives the answers of the shards polling chose
(every shard under ALL, one under ANY) in one ``process_data`` call, and its
answer is the response. Workers join and leave
through ACTIVATE / DEACTIVATE control requests, guarded by a token or a
client certificate when configured.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import urllib.parse
from collections import Counter
from typing import Any, Mapping, NoReturn, Optional, Sequence

import grpc
import grpc.aio
from google.protobuf import empty_pb2

from shardnet.errors import (
    ConfigurationError,
    DeadlineExceeded,
    MalformedReplyError,
    ProtocolError,
    ReplicaError,
    RoutingError,
    ShardnetError,
)
from shardnet.networking.addresses import (
    Address,
    dialled_host,
    entity_address,
    host_is_local,
    host_is_loopback,
    is_own_address,
    parse_address,
    same_host,
)
from shardnet.networking.channels import message_size_options
from shardnet.networking.connection import Connection
from shardnet.networking.policies import check_count, check_flag, check_seconds
from shardnet.networking.polling import PollingMap, PollingType
from shardnet.networking.pool import MAX_SHARDS, GrpcConnectionPool
from shardnet.protocol import services
from shardnet.protocol.ids import new_id
from shardnet.protocol.messages import (
    HOP_FIELDS,
    MAX_SHARD_ID,
    MAX_TOP_LEVEL_FIELDS,
    ControlRequest,
    DataRequest,
    is_shard_id,
    require_empty,
)
from shardnet.protocol.proto import jina_pb2
from shardnet.runtimes.bursts import BurstLog
from shardnet.runtimes.executor import DRY_RUN_ENDPOINT
from shardnet.runtimes.lifecycle import serve_until_signalled
from shardnet.runtimes.log_lines import MAX_ID_CHARS, quoted
from shardnet.runtimes.merge import (
    every_shard_failed, failure_word, failures_said, merge_shard_responses, report_shard_problems,
)
from shardnet.runtimes.refusals import RefusalLog
from shardnet.runtimes.registrations import Registrations
from shardnet.runtimes.replica_check import ReplicaCheck, ReplicaChecks
from shardnet.runtimes.server import (
    ControlGuard,
    ServerConfig,
    jina_server,
    request_list,
    within_message_limit,
)

logger = logging.getLogger(__name__)
# characters of a failed request's cause its log line shows (it may name every shard's failure)
MAX_FAILURE_CHARS = 1000

USES_BEFORE = "uses_before"
# the trailers a head sets on a gathered answer itself: a shard's (a head in front of a head) are not passed on
_OWN_TRAILERS = frozenset({"total_shards", "failed_shards"})

USES_AFTER = "uses_after"
# given as a head's uses_before or uses_after (--uses-before/--uses-after) under Kubernetes discovery: the hop's
# replicas are the pods (and EndpointSlices) discovery finds of it, as its workers are, not an address of its own
DISCOVERED = "discovered"
# seconds the head keeps from its caller's deadline to send back its own DEADLINE_EXCEEDED naming the shard
DEADLINE_MARGIN = 0.25
# seconds a head gives its workers to list their endpoints, or to answer a dry run, when its caller sets no shorter
# deadline
DISCOVERY_TIMEOUT = 5.0
# without --lease, a worker that says how often it repeats ACTIVATE is leased for this many times that
IMPLIED_LEASE_FACTOR = 5
# how often implied leases are checked
IMPLIED_LEASE_CHECK = 0.5
# how often a head fed by discovery looks whether every declared shard has a worker yet, before it turns ready
SHARDS_LOOKED_AT_EVERY = 0.2
# how long it waits for them at most (Head(shards_wait=...), head --shards-wait): as long as a worker may take to
# load its Executor, as a Kubernetes startup probe allows by default; then it turns ready without them, and says so
SHARDS_WAIT = 180.0
# the longest renewal interval a worker may announce (its implied lease is IMPLIED_LEASE_FACTOR times it)
MAX_RENEWAL_INTERVAL = 300.0
# seconds a lapsed registration is remembered (or its lease, if longer), to say so when the worker comes back
LAPSE_MEMORY = 60.0
# seconds the requests a worker holds when its lease lapses get before they are cut (UNAVAILABLE) and fail over:
# the head presumes it dead or cut off (a SIGSTOP, a partition), and without a cut they would wait for keepalive
LAPSED_LEASE_GRACE = 0.5
# a lease that ran out while the head read no worker's renewal for half a lease, of a worker that shows it lives
# (``Head._hold_for_overload``), is held on for at most this many leases more: the renewals sat in the head's own
# queue of inbound calls (overloaded; --max-in-flight does not stop that), and dropping every worker that answers
# made an overload an outage
OVERLOAD_HOLD_LEASES = 6
# leases without a hold that end an overload episode: the next hold is said again (a renewal read late between
# two holds ended none: a 30 s burst said it 7 times)
OVERLOAD_QUIET_LEASES = 2
# seconds of a caller's deadline an ANY request must have left to be sent to another shard after its own failed
MIN_RESEND_SECONDS = 0.1
# seconds a shard whose attempt failed before any worker took it is passed over when another ANY request is sent on
# from its failed shard: a dead sole worker is never ejected, and a resend landing on a second dead shard failed a
# request that live shards could have served (a shard passed over is still taken when every other failed too)
RECENT_SHARD_FAILURE = 2.0
SHARD_FAILURES_KEPT = 64
# characters of the worker process id an ACTIVATE may carry (a shardnet worker's: 32)
MAX_INSTANCE_CHARS = 64
# workers one ACTIVATE or DEACTIVATE may name (each costs the head a channel and some 10 KB)
MAX_CONTROL_ENTITIES = 10_000
# workers a head holds at most, over all ACTIVATEs: many small ones must not add up to what one may not name; as
# many as a pool declares shards at most (every shard needs a worker), one constant for both
MAX_WORKERS = MAX_SHARDS


def _later_hop_wins(earlier: Sequence[tuple[str, str]], later: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Trailing metadata of two hops of one request, as Jina's head merges them: a key the later hop sends replaces
    the earlier's (uses_before, then the shards, then uses_after); this head's own shard counts stay its own."""
    given = [pair for pair in later or () if pair[0] not in _OWN_TRAILERS]
    replaced = {key for key, _ in given}
    return [pair for pair in earlier or () if pair[0] not in replaced] + given


def _discovery_time_left(context: grpc.aio.ServicerContext) -> float:
    """What a head gives its workers to list their endpoints or answer a dry run: the caller's time left, at
    most DISCOVERY_TIMEOUT."""
    left = _time_left(context)
    return DISCOVERY_TIMEOUT if left is None else min(DISCOVERY_TIMEOUT, max(left, 0.001))


def _on_this_machine(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is on this machine: over
    loopback or a Unix socket, or from one of the machine's own addresses (a worker dialling the head by them)."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host_is_loopback(host) or is_own_address(host)


def _time_left(context: grpc.aio.ServicerContext) -> Optional[float]:
    """The caller's time left, less a margin: the head gives up just before the caller does, so it learns why."""
    timeout = context.time_remaining()
    if timeout is not None:
        timeout -= min(DEADLINE_MARGIN, timeout / 10)
    return timeout


class _Deadline:
    """When a request's time at this head runs out (None: never). Each hop (uses_before, the shards, uses_after,
    a shard tried after another) is given what is left of it then, not the whole again: the head's own error,
    naming the hop that took the time, must reach the caller before its deadline does. ``per_hop``, the head's
    own timeout, bounds each hop as well, as Jina's head gives each of its sends its timeout_send."""

    __slots__ = ("_at", "_clock", "_per_hop", "_callers_bound", "_hop_started")

    def __init__(self, seconds: Optional[float], per_hop: Optional[float] = None):
        self._per_hop = per_hop
        self._callers_bound = False  # whether the caller's deadline, not per_hop, bounds the latest hop
        self._hop_started: Optional[float] = None  # when the latest hop started (with per_hop only)
        self._clock = None if seconds is None and per_hop is None else asyncio.get_running_loop().time
        self._at = None if seconds is None else self._clock() + seconds

    def callers_ran_out(self) -> bool:
        """Whether the latest hop ran into the caller's deadline (less the head's margin), rather than the head's
        own timeout or an attempt timeout well before it. Heads in front of heads each give up a margin before
        the deadline they were given, so a deadline that runs out below comes back up to a margin early at each
        level: two margins are allowed for."""
        return self._callers_bound and self._clock() >= self._at - 2 * DEADLINE_MARGIN

    def left(self) -> Optional[float]:
        """Seconds the next hop may take (0 once past: a call given them fails at once, naming where it was
        going), or None; noted as the bound of the hop about to start (``callers_ran_out``)."""
        if self._per_hop is not None:
            self._hop_started = self._clock()
        if self._at is not None:
            self._callers_bound = self._per_hop is None or self._at - self._clock() <= self._per_hop
        return self.remaining()

    def heads_timeout_bound(self) -> Optional[float]:
        """The head's own timeout per hop when it, not the caller's deadline, bounded the latest hop and that hop
        took all of it (not cut sooner by an attempt timeout, nor answered DEADLINE_EXCEEDED by its replica); else
        None."""
        if self._per_hop is None or self._callers_bound or self._hop_started is None:
            return None
        took = self._clock() - self._hop_started
        return self._per_hop if took >= self._per_hop - min(DEADLINE_MARGIN, self._per_hop / 10) else None

    def remaining(self) -> Optional[float]:
        """``left()`` as a look only, for a hop that may not start."""
        if self._at is None:
            return self._per_hop
        left = max(0.0, self._at - self._clock())
        return left if self._per_hop is None else min(left, self._per_hop)


# STATUS's trailing metadata stays under gRPC's 8 KB soft limit (a client may refuse more, past 16 KB it must, and
# with it the whole answer): at most 32 ejected replicas are named, in at most EJECTED_ROOM bytes, and then
# counted; empty shards are given as ranges in at most EMPTY_SHARDS_ROOM characters, and then counted; the hops'
# replicas (uses_before, uses_after) are named in at most HOPS_ROOM bytes, and then counted
EJECTED_LISTED = 32
EJECTED_ROOM = 5120
EMPTY_SHARDS_ROOM = 1024
HOPS_ROOM = 512
# a replica check (``shardnet status``) adds its shards down as ranges in at most SHARDS_DOWN_ROOM characters and its
# hops down, then names the replicas down, the hops' first (each cause cut to MAX_CAUSE_CHARS), in what the rest left
# of STATUS_ROOM, then counts them
STATUS_ROOM = 7936
# characters of a discovery problem STATUS says, percent-encoded in at most MAX_DISCOVERY_BYTES (a character outside
# ASCII is up to 12 bytes so: 400 of them were 4,800, past what the rest of STATUS_ROOM leaves)
MAX_DISCOVERY_CHARS = 400
MAX_DISCOVERY_BYTES = 1200
SHARDS_DOWN_ROOM = 512
MAX_CAUSE_CHARS = 240  # a TLS mismatch's hint (about 220) whole
_CAUSE_SAFE = "".join(chr(code) for code in range(32, 127) if chr(code) != "%")  # printable ASCII, as metadata is
MAX_ENDPOINT_CHARS = 1024  # an endpoint from a request's header that a head forwards as metadata
MAX_HEADS_PASSED = 16  # heads a request may have crossed (their ids travel on with it as metadata)
_HEAD_ID = re.compile(r"[0-9a-f]{32}")  # what new_id() gives a head


def _in_shard_order(failure: str) -> tuple:
    """A failure's sort key: the shard it names as a number (shard 2 before shard 10), then its text."""
    found = re.search(r"shard (\d+)", failure)
    return (int(found.group(1)) if found else -1, failure)


def _listed(shard_ids: list[int]) -> str:
    """Sorted shard ids as a log line names them: ranges, then how many more did not fit."""
    ranges, unlisted = _shard_ranges(shard_ids)
    return f"{ranges} and {unlisted} more" if unlisted else ranges


def _awaited(shard_ids: list[int], hops: list[str]) -> str:
    """What a head waits for, as its log line names it: "shard(s) 1-2 and uses_after"."""
    return " and ".join(([f"shard(s) {_listed(shard_ids)}"] if shard_ids else []) + hops)


def _with_note(outcome: Any, note: str) -> Any:
    """``outcome``, a DEADLINE_EXCEEDED replica failure with ``note`` added to its cause; any other as it is."""
    if not isinstance(outcome, ReplicaError) or outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED:
        return outcome
    return outcome.noted(note)


def _shard_that_took_the_time(outcomes: list[tuple[int, Any]]) -> ShardnetError:
    """Of the shards' outcomes, the failure to raise once they took the caller's whole time: one that ran out of
    it, else the first; it may have run elsewhere (the other shards did)."""
    failures = [outcome for _, outcome in outcomes if isinstance(outcome, ShardnetError)]
    failure = next((f for f in failures if getattr(f, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED), failures[0])
    failure.unsent = False
    return failure


def _metadata_size(pairs: Sequence[tuple[str, str]]) -> int:
    """What ``pairs`` count towards gRPC's metadata limit: 32 bytes per entry besides key and value (HPACK's)."""
    return sum(len(key) + len(value) + 32 for key, value in pairs)


def _quoted_entity(address: str) -> str:
    """A replica's address as a related entity names it, percent-encoded (metadata is ASCII, and space-separated)."""
    return urllib.parse.quote(entity_address(*parse_address(address).entity()), safe=":/[]")


def _check_metadata(check: ReplicaCheck, room: int) -> tuple[tuple[str, str], ...]:
    """A replica check as STATUS trailing metadata in about ``room`` bytes (what the rest left under gRPC's soft
    limit): how many replicas it checked and did not reach in time, how old it is when reused, the shards and the
    hops none of whose replicas serves, and each replica down with why (the hops' first: every request crosses
    them), as many as fit, then how many more."""
    pairs = [(services.REPLICAS_CHECKED_METADATA, str(check.checked))]
    if check.unchecked:
        pairs.append((services.REPLICAS_UNCHECKED_METADATA, str(check.unchecked)))
    if check.age is not None:
        pairs.append((services.REPLICA_CHECK_AGE_METADATA, f"{check.age:.2f}"))
    if check.shards_down:
        ranges, unlisted = _shard_ranges(check.shards_down, SHARDS_DOWN_ROOM)
        pairs.append((services.SHARDS_DOWN_METADATA, ranges))
        if unlisted:
            pairs.append((services.SHARDS_DOWN_UNLISTED_METADATA, str(unlisted)))
    if check.hops_down:
        pairs.append((services.HOPS_DOWN_METADATA, ",".join(check.hops_down)))
    room -= _metadata_size(pairs) + _metadata_size([(services.REPLICAS_DOWN_UNLISTED_METADATA, str(check.checked))])
    down = [(services.HOP_DOWN_METADATA, *replica) for replica in check.hop_down]
    down += [(services.REPLICA_DOWN_METADATA, *replica) for replica in check.down]
    named = 0
    for key, where, address, cause in down:
        address = urllib.parse.quote(address, safe=":/[]")
        value = f"{where} {address} {urllib.parse.quote(cause[:MAX_CAUSE_CHARS].strip(), safe=_CAUSE_SAFE)}"
        room -= _metadata_size([(key, value)])
        if room < 0:
            break
        pairs.append((key, value))
        named += 1
    if len(down) > named:
        pairs.append((services.REPLICAS_DOWN_UNLISTED_METADATA, str(len(down) - named)))
    return tuple(pairs)


def _shard_ranges(shard_ids: list[int], room: int = EMPTY_SHARDS_ROOM) -> tuple[str, int]:
    """Sorted shard ids as ranges, "0-3,7" (a declared 400-shard head with no worker yet says it in 5 bytes), at
    most ``room`` characters of them; and how many shards did not fit."""
    ranges: list[list[int]] = []
    for shard_id in shard_ids:
        if ranges and shard_id == ranges[-1][1] + 1:
            ranges[-1][1] = shard_id
        else:
            ranges.append([shard_id, shard_id])
    texts, used, left = [], -1, len(shard_ids)
    for first, last in ranges:
        text = str(first) if first == last else f"{first}-{last}"
        if used + 1 + len(text) > room:
            break
        texts.append(text)
        used += 1 + len(text)
        left -= last - first + 1
    return ",".join(texts), left


# the exception name and note of a request answered ERROR because a replica may have run it before it failed
MAY_HAVE_RUN_ERROR = "ReplicaLost"
MAY_HAVE_RUN_NOTE = (
    " (a replica may have run it: sent again, it could run twice, on another replica or, under ANY, another "
    "shard; send again only what is safe to run twice)"
)


def _may_have_run(failed: grpc.StatusCode, sent: bool, deadline: Optional[_Deadline], at_most_once: bool) -> bool:
    """Whether a request that failed with ``failed`` is to be answered as one a replica may have run: it was
    ``sent``, and callers send again on such a failure (Jina's pool on UNAVAILABLE and DEADLINE_EXCEEDED, each
    attempt with a deadline of its own; shardnet's on UNAVAILABLE). A deadline that was the caller's stays
    DEADLINE_EXCEEDED, gRPC's word for what it expects, unless the head runs at most once: the head gives up a
    margin before the caller, and a Jina caller would send it again, with a fresh deadline, elsewhere."""
    if not sent:
        return False
    if failed == grpc.StatusCode.DEADLINE_EXCEEDED:
        return at_most_once or deadline is None or not deadline.callers_ran_out()
    return failed == grpc.StatusCode.UNAVAILABLE


class _LoopedBack(Exception):
    """A request this head forwarded came back to it: one of its replicas is the head itself."""


def _check_pool(pool: GrpcConnectionPool, request_streams: Optional[bool]) -> None:
    """Refuse a ``request_streams`` that disagrees with the given pool's: the head makes no pool of its own then,
    and would call its workers as the pool does, silently ignoring it."""
    if request_streams is None:  # not given: the pool's is the head's
        return
    check_flag(request_streams, "request_streams")
    if request_streams != pool.request_streams:
        raise ConfigurationError(
            f"Head(request_streams={request_streams!r}) and a pool given with "
            f"request_streams={pool.request_streams!r}: "
            "the head calls its workers through the pool given, as it is; give the pool the request_streams wanted "
            "and leave the head's out"
        )


class Head:
    """Routes a deployment's requests over its shards; its pool's membership is its state."""

    def __init__(
        self,
        deployment: str,
        config: ServerConfig = ServerConfig(),
        *,
        polling: PollingMap = PollingMap({}),
        pool: Optional[GrpcConnectionPool] = None,
        connections: Optional[Mapping[int, Sequence[str]]] = None,
        uses_before: Optional[str] = None,
        uses_after: Optional[str] = None,
        shards: int = 0,
        lease: Optional[float] = None,
        request_streams: Optional[bool] = None,
        max_in_flight: Optional[int] = None,
        max_workers: int = MAX_WORKERS,
        shards_wait: float = SHARDS_WAIT,
    ):
        """``pool``: the pool it dials its workers with, else one of its own, which calls them with the message
        limit of ``config`` (their answers pass through it) and, unless ``request_streams=False``, sends single
        requests on shared streams to shardnet workers (unary to others). A given pool is used as it is, its own
        message size options included (a larger limit lets shards' answers that uses_after shrinks reach the
        head); a ``request_streams`` that disagrees with it is refused. ``uses_before``/``uses_after``: the
        hop's address, or DISCOVERED when the Kubernetes pool's discovery finds its replicas."""
        if not deployment:
            raise ConfigurationError("a head needs a deployment name")
        self.deployment = deployment
        self.polling = polling
        if pool is None:
            pool = GrpcConnectionPool(
                balancer="p2c_ewma", options=message_size_options(config.max_message_bytes),
                request_streams=True if request_streams is None else request_streams,
            )
        else:
            _check_pool(pool, request_streams)
        self.pool = pool
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 0:
            raise ConfigurationError(f"shards must be a whole number from 0 (0: not declared), got {shards!r}")
        check_count(max_workers, "max_workers", 1)
        if max_in_flight is not None:
            check_count(max_in_flight, "max_in_flight", 1)
        if lease is not None:
            check_seconds(lease, "lease")
        check_seconds(shards_wait, "shards_wait", zero=True)
        self._shards_wait = shards_wait
        static = sum(len(addresses) for addresses in (connections or {}).values())
        if static > max_workers:
            raise ConfigurationError(
                f"deployment {deployment!r}: {static} static connections, over max_workers={max_workers}"
            )
        self.pool.declare_shards(deployment, shards)
        self._shards = shards  # when given, ACTIVATE (or a static connection) for a shard beyond them is refused
        for shard_id, addresses in (connections or {}).items():
            if shards and shard_id >= shards:
                raise ConfigurationError(
                    f"deployment {deployment!r}: a connection for shard {shard_id}, but the head has shards "
                    f"0..{shards - 1} (shards={shards})"
                )
            for address in addresses:
                self.pool.add_connection(deployment, address, shard_id=shard_id)
        self._uses_before = f"{deployment}/{USES_BEFORE}" if uses_before else None
        self._uses_after = f"{deployment}/{USES_AFTER}" if uses_after else None
        # (role, the pool's deployment of it) of each hop the head calls, in the order it calls them
        self._hops = [(role, hop) for role, hop in ((USES_BEFORE, self._uses_before), (USES_AFTER, self._uses_after))
                      if hop is not None]
        # what uses_before answers goes on to the shards, and their merged answers to uses_after, as requests:
        # a request takes room for what those hops add, so that the next does not refuse it after one ran it
        self._max_request_fields = MAX_TOP_LEVEL_FIELDS - HOP_FIELDS * (bool(uses_before) + bool(uses_after))
        hops_given = ((USES_BEFORE, self._uses_before, uses_before), (USES_AFTER, self._uses_after, uses_after))
        # the hops whose replicas discovery finds: the head is not ready until it has listed one of each
        self._discovered_hops = [role for role, _, given in hops_given if given == DISCOVERED]
        for role, hop, given in hops_given:
            if given == DISCOVERED:
                if not hasattr(self.pool, "namespace"):  # what the head's readiness also reads: a Kubernetes pool
                    raise ConfigurationError(
                        f"deployment {deployment!r}: {role}={DISCOVERED!r} takes its replicas from Kubernetes "
                        "discovery, and this head's pool follows no namespace (--k8s-namespace)"
                    )
            elif given:
                self.pool.add_connection(hop, given)
        self._max_workers = max_workers  # an ACTIVATE that would take the head past it is refused whole
        # with a limit, a request past it is refused at once (RESOURCE_EXHAUSTED) instead of queueing without bound
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        # by endpoint: data requests under way through the head (not the streams they came on: one a gateway holds
        # open between requests carries none), and those the drain's end cut, which stay counted; what is left
        # here once the drain is over was cut
        self._under_way: Counter[str] = Counter()
        # by endpoint: the requests still under way when the drain's grace ended, cut unanswered; set once the
        # head has stopped (a head run exits DRAIN_CUT_EXIT then)
        self.requests_cut: Counter[str] = Counter()
        # with a lease, a worker that stops re-sending ACTIVATE (killed -9, partitioned) leaves on its own; without
        # one, so does a worker that says how often it re-sends it (a shardnet worker), leased for a few times that
        self._lease = lease
        self._registrations = Registrations(lapse_memory=LAPSE_MEMORY)
        self._resend_turn = 0  # which live shard takes the next ANY request a dead shard could not
        self._shard_failed_at: dict[int, float] = {}  # loop time of each shard's latest attempt failed unsent
        self._short_lease_warned = False
        self._renewal_read_at = float("-inf")  # loop time of the latest renewal (ACTIVATE) read, any worker's
        # loop time a lease was last held as the head read no renewal: an overload's WARNING is said once an episode,
        # the episode ending after OVERLOAD_QUIET_LEASES leases without one (renewals read late, between holds, do not)
        self._overload_held_at = float("-inf")
        # health checks of held workers the head sent nothing lately (a deep overload: every request it reads is
        # past its deadline), and when each last ended and whether it said SERVING
        self._hold_checks: dict[tuple[str, int], asyncio.Task] = {}
        self._hold_checked: dict[tuple[str, int], tuple[float, bool]] = {}
        self._expiry: Optional[asyncio.Task] = None
        self._deactivations: set[asyncio.Task] = set()  # removals under way, kept from the garbage collector
        mutual_tls = config.tls is not None and config.tls.client_ca is not None
        self._guard = ControlGuard(config.control_token, mutual_tls)
        self._refusals = RefusalLog(deployment)
        # requests it failed for want of a replica, or as a shard failed: counted, one line a second at most
        self._failed_requests = BurstLog(
            logger, deployment, "%r: %d more requests failed within %gs (%s); the latest: %s"
        )
        # a draining head refuses new calls in-band and closes its listener once its calls are done and no more
        # come: gRPC's stop() under load cancelled calls it had taken but not picked up (see server.py)
        self.server = jina_server(config, self)
        # what STATUS asks of every replica, the hops' included (``shardnet status``): one check at a time, shared,
        # bounded
        self._replica_checks = ReplicaChecks(self.pool, deployment, self.server.stopping, self._hops)
        # beside every request it forwards: a request coming back with it was routed to this head by itself
        self._via = (services.VIA_HEAD_METADATA, new_id())
        # a pool fed by discovery (Kubernetes) knows no worker until its first list: not ready before that
        self._discovery_synced = getattr(self.pool, "wait_synced", None)
        self.server.ready_at_start = self._discovery_synced is None
        self._readiness: Optional[asyncio.Task] = None
        self.requests_resent = 0  # ANY requests sent on to another shard, theirs having no worker to take them
        self.leases_lapsed = 0  # registrations removed as their leases ran out (the metrics')
        self.metrics = None
        if config.metrics_port is not None:
            self._meter()

    def _meter(self) -> None:
        """Count and time every request (--metrics-port): wrappers put in place of ``_serve`` (and
        ``_serve_admitted``) here, so that a head without metrics runs the very same request path."""
        from shardnet.runtimes.metrics import HeadMetrics  # an optional extra: imported only when asked for

        self.metrics = HeadMetrics(self)
        self.server.metrics = self.metrics.listener
        self._serve = self.metrics.meter_serve(self._serve)
        if self._max_in_flight is not None:
            self._serve_admitted = self.metrics.meter_admission(self._serve_admitted)

    # -- data ------------------------------------------------------------------------

    async def process_single_data(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = DataRequest.from_bytes(payload, max_fields=self._max_request_fields)
        if self._max_in_flight is not None:
            return await self._serve_admitted([request], context)
        return await self._serve([request], context)

    async def process_data(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            requests = request_list(payload, decoded_here=False, max_fields=self._max_request_fields)
        except ProtocolError as exc:
            if self.metrics is not None:  # refused before it is served, counted here
                self.metrics.unreadable()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self._max_in_flight is not None:
            return await self._serve_admitted(requests, context)
        return await self._serve(requests, context)

    async def dry_run(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Jina's ``Client.is_flow_ready()`` pointed at this head: a dry-run request through ``uses_before``,
        every shard and ``uses_after``, as a Jina gateway sends one through its graph; SUCCESS when each
        answered, else ERROR saying why. Admitted as a data request is (``max_in_flight``), and it never fails
        over: a readiness check must not spend the retry budget requests need."""
        try:
            require_empty(payload, "dry_run")
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        status = jina_pb2.StatusProto(code=jina_pb2.StatusProto.SUCCESS)
        if self._full:
            status.code = jina_pb2.StatusProto.ERROR
            status.description = (
                f"head of {self.deployment!r}: as many requests in flight as it takes (--max-in-flight)"
            )
            return status.SerializeToString()
        self._in_flight += 1
        metadata = ((services.ENDPOINT_METADATA, DRY_RUN_ENDPOINT), self._via)
        deadline = _Deadline(_discovery_time_left(context))  # a hung shard must not hold a readiness check for ever
        dry = [DataRequest(endpoint=DRY_RUN_ENDPOINT)]
        try:
            if self._uses_before is not None:
                response, _ = await self._one(self._uses_before, dry, metadata, deadline, decoded=True, retries=0)
                dry = [response]
            if not dry[0].is_error:
                response, _ = await self._gather(dry, metadata, deadline, PollingType.ALL, retries=0)
            if response.is_error:
                status.CopyFrom(response._header().status)
        except ShardnetError as exc:
            status.code, status.description = jina_pb2.StatusProto.ERROR, f"{self.deployment}: {exc}"
        finally:
            self._in_flight -= 1
        return status.SerializeToString()

    @property
    def _full(self) -> bool:
        """Whether ``max_in_flight`` requests are under way already (never, without a limit)."""
        return self._max_in_flight is not None and self._in_flight >= self._max_in_flight

    async def _serve_admitted(self, requests: list[DataRequest], context: grpc.aio.ServicerContext) -> bytes:
        """``_serve`` within ``max_in_flight``: past it, RESOURCE_EXHAUSTED at once, naming the limit.

        A request counts until its call has ended, its answer written out (or the call cut), not only until this
        returns: gRPC holds an answer its caller does not read (a client that stopped reading, its flow-control
        window shut), and counted only while handled, a caller that sends and never reads made the head hold
        answer after answer without bound, the limit refusing none (a review: 400 answers of 1 MiB, 922 MB)."""
        if self._full:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"head of {self.deployment!r}: {self._in_flight} requests in flight already, as many as it takes "
                "(--max-in-flight); try again later",
            )
        self._in_flight += 1
        context.add_done_callback(self._call_ended)
        return await self._serve(requests, context)

    def _call_ended(self, _context: Any) -> None:
        """An admitted call ended (gRPC's done callback): its answer is out, or it was cut; it counts no more."""
        self._in_flight -= 1

    async def _serve(self, requests: list[DataRequest], context: grpc.aio.ServicerContext) -> bytes:
        worked = False  # whether a hop ran it already (uses_before): a failure after is no "never ran"
        deadline: Optional[_Deadline] = None
        under_way = self._under_way
        counted: Optional[str] = None  # the endpoint it is counted under while under way
        try:
            endpoint, metadata = self._settle_endpoint(requests, context)
            under_way[endpoint] = under_way.get(endpoint, 0) + 1  # not += (Counter.__missing__ is Python)
            counted = endpoint
            deadline = _Deadline(_time_left(context), per_hop=self.pool.timeout)
            before_trailing = ()
            if self._uses_before is not None:
                # no shard has a replica (a head started again, its workers not registered yet): refused now,
                # UNAVAILABLE and safe to send again, not answered ERROR after uses_before ran it ("a replica may
                # have run it"), though no shard ever saw it
                # (a hop with no replica itself is left to say so as it is called)
                if not self._routable(self.deployment) and self._routable(self._uses_before):
                    raise self._no_live_replica(self.deployment)
                response, before_trailing = await self._one(
                    self._uses_before, requests, metadata, deadline, decoded=True
                )
                if response.is_error:  # the shards would only work on a request that already failed
                    context.set_trailing_metadata(tuple(before_trailing or ()))
                    return response.to_bytes()
                requests = [response]
                worked = True
            polling = self.polling[endpoint]
            if polling == PollingType.ANY and self._uses_after is None:  # the fast path: bytes in, bytes out
                try:
                    response, trailing = await self._one(self.deployment, requests, metadata, deadline)
                except ReplicaError as exc:
                    response, trailing = await self._on_another_shard(exc, requests, metadata, deadline)
                try:
                    response.request_id  # noqa: B018 - reading the header refuses an answer carrying a pickle
                except ProtocolError as exc:  # the replica's fault (its bytes are named), not the caller's
                    await context.abort(grpc.StatusCode.INTERNAL, f"{self.deployment}: {exc}")
            else:
                try:
                    response, trailing = await self._gather(requests, metadata, deadline, polling)
                except ReplicaError as exc:
                    if polling != PollingType.ANY:
                        raise
                    response, trailing = await self._on_another_shard(exc, requests, metadata, deadline)
            if before_trailing:
                trailing = _later_hop_wins(before_trailing, trailing)
        except asyncio.CancelledError:  # its call cut: its caller left, or the drain's grace ended
            if self.server.grace_is_over():
                counted = None  # kept in _under_way: _end names it
            raise
        except _LoopedBack:  # refused, not forwarded again: one request would otherwise fan out without end
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"head of {self.deployment!r} received a request it had forwarded itself: one of its replicas is "
                "this head (an ACTIVATE or --connection naming its own address another way?); DEACTIVATE it",
            )
        except MalformedReplyError as exc:  # a replica's answer, not the caller's request, was malformed
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.deployment}: {exc}")
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RoutingError as exc:
            self._note_failed(requests[0], exc)
            if not worked:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            response, trailing = self._failed_after_running(requests[0], f"UNAVAILABLE: {exc}")
        except ReplicaError as exc:
            self._note_failed(requests[0], exc, callers=deadline is not None and deadline.callers_ran_out())
            failed = exc.code if exc.code not in (None, grpc.StatusCode.OK) else grpc.StatusCode.UNAVAILABLE
            if failed == grpc.StatusCode.UNIMPLEMENTED:  # the head serves the method: its replica did not, and
                failed = grpc.StatusCode.INTERNAL  # a caller must not take it for another server and go elsewhere
            notes = self._timeout_note(failed, deadline) + self._queued_note(
                failed, deadline, self.polling[counted] if counted is not None else PollingType.ANY
            )
            if not _may_have_run(failed, worked or not exc.unsent, deadline, self.pool.retry.unsent_only):
                # (one the head's --timeout took back from a hung worker's stream, never sent: not the caller's)
                await context.abort(failed, f"{exc}{notes}")
            response, trailing = self._failed_after_running(requests[0], f"{failed.name}: {exc}{notes}")
        finally:
            if counted is not None:
                left = under_way[counted] - 1
                if left:
                    under_way[counted] = left
                else:  # callers choose endpoints: none is kept once its requests ended (pop: dict's, in C)
                    under_way.pop(counted)
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        answer = response.to_bytes()
        if len(answer) <= self.server.config.max_message_bytes:  # the common case, without a coroutine
            return answer
        return await within_message_limit(
            context,
            answer,
            self.server.config.max_message_bytes,
            f"{self.deployment}: the answer (under ALL, every shard's merged)",
            "this head's",
        )

    def _timeout_note(self, failed: grpc.StatusCode, deadline: Optional[_Deadline]) -> str:
        """What a DEADLINE_EXCEEDED the head's own --timeout caused adds to its description: which bound ran out
        (gRPC's "Deadline Exceeded" alone reads as the caller's, on a call whose caller allowed far longer)."""
        if failed != grpc.StatusCode.DEADLINE_EXCEEDED or deadline is None:
            return ""
        bound = deadline.heads_timeout_bound()  # None when an attempt timeout ended the hop sooner: the pool says so
        if bound is None:
            return ""
        return f" (the head's timeout of {bound:g}s for each hop ran out: head --timeout, Deployment(timeout=))"

    def _queued_note(
        self, failed: grpc.StatusCode, deadline: Optional[_Deadline], polling: PollingType = PollingType.ANY
    ) -> str:
        """What a DEADLINE_EXCEEDED of the caller's own deadline adds: how many requests this head had under way,
        and, without --max-in-flight, that it queues them all. gRPC's bare "Deadline Exceeded" after a replica's
        address reads as that replica hung; under an overload it was the queue (a review: at twice the capacity,
        1 s deadlines, 88% of the requests failed so, none saying why, goodput a quarter of the capacity)."""
        if failed != grpc.StatusCode.DEADLINE_EXCEEDED or deadline is None or not deadline.callers_ran_out():
            return ""
        under_way = sum(self._under_way.values())
        count = f"{under_way} request{'' if under_way == 1 else 's'} under way at this head"
        # a queue only when more are under way than replicas take them at once, else a stuck or slow replica, which
        # the flag would not help (a soak review: the hint came with 1 request under way behind a stopped worker):
        # under ALL each takes one of every shard (the shard with fewest bounds them), under ANY one of any, and a
        # hop (uses_before/after) sees every request
        shards = [len(self.pool.get_replicas(self.deployment, shard_id=shard) or ())
                  for shard in self.pool.shard_ids(self.deployment)]
        routed_to = (min(shards) if polling == PollingType.ALL else sum(shards)) if shards else 0
        for _, hop in self._hops:
            routed_to = min(routed_to, len(self.pool.get_replicas(hop) or ()))
        if self._max_in_flight is not None or under_way <= routed_to:
            return f" (the caller's deadline ran out, {count})"
        return (
            f" (the caller's deadline ran out, {count}, which queues all it is "
            "sent: if its workers cannot keep up, head --max-in-flight refuses the excess at once, RESOURCE_EXHAUSTED)"
        )

    def _settle_endpoint(
        self, requests: list[DataRequest], context: grpc.aio.ServicerContext
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The request's endpoint (its metadata's, else its header's), written into a header that names none
        (Jina workers read the header only), and the metadata to forward with it: the endpoint when gRPC can send
        it (not ``/søg``: the header alone carries that), the heads it passed (a cycle of heads comes back to one
        of them) and this head; _LoopedBack when this head is among them."""
        endpoint, vias = None, ()
        for pair in context.invocation_metadata():
            if pair[0] == services.ENDPOINT_METADATA:
                endpoint = pair[1]  # the last of several, as Jina's head, this head's metrics and a worker take it
            elif pair[0] == services.VIA_HEAD_METADATA:
                vias = self._passed(vias, pair)
        header_endpoint = requests[0].endpoint
        sendable = True  # an endpoint that came as metadata can go on as metadata
        if endpoint is None:
            endpoint = header_endpoint or "/default"
            sendable = services.endpoint_fits_metadata(endpoint)
            if len(endpoint) > MAX_ENDPOINT_CHARS:  # the replica's gRPC would refuse the metadata, blamed on it
                raise ProtocolError(
                    f"endpoint {endpoint[:40]!r}... has {len(endpoint)} characters; a head forwards at most "
                    f"{MAX_ENDPOINT_CHARS} (it travels as gRPC metadata)"
                )
        # a header naming an endpoint is kept, as Jina's head keeps it: its workers run that one, whatever the
        # metadata (which chose the polling) says
        if header_endpoint is None:
            requests[0].endpoint = endpoint
        for request in requests[1:]:
            if request.endpoint is None:
                request.endpoint = endpoint
        forwarded = ((services.ENDPOINT_METADATA, endpoint),) if sendable else ()
        return endpoint, (*forwarded, *vias, self._via)

    def _passed(self, vias: tuple[tuple[str, str], ...], pair: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        """``vias`` and the head id of ``pair``, a ``shardnet-via-head`` metadata pair; _LoopedBack when it is this
        head's own, ProtocolError when it is no head id or one too many."""
        if pair[1] == self._via[1]:
            raise _LoopedBack()
        if len(vias) >= MAX_HEADS_PASSED or not _HEAD_ID.fullmatch(pair[1]):
            raise ProtocolError(
                f"{services.VIA_HEAD_METADATA} metadata: at most {MAX_HEADS_PASSED} head ids of 32 hex "
                f"digits, got {pair[1][:40]!r} as number {len(vias) + 1}"
            )
        return vias + ((pair[0], pair[1]),)

    @staticmethod
    def _method(requests: list[DataRequest], decoded: bool = False) -> tuple[str, Any]:
        """The stub and payload for ``requests``; ``decoded`` replies are decoded on arrival (ALL reads them all)."""
        single, many = ("decoded_single_data", "decoded_data") if decoded else ("single_data", "data")
        return (single, requests[0]) if len(requests) == 1 else (many, requests)

    async def _one(
        self, deployment: str, requests: list[DataRequest], metadata, deadline: _Deadline, decoded: bool = False,
        retries: Optional[int] = None,
    ) -> tuple[DataRequest, Any]:
        """One replica's answer, within what is left of ``deadline``; ``decoded`` when the head reads it
        (uses_before/after), not only forwards it; ``retries`` as ``GrpcConnectionPool.call`` takes it."""
        targets = self.pool.targets(deployment, False, None, PollingType.ANY)
        if not targets:
            raise self._no_live_replica(deployment)
        shard_id, replicas = targets[0]
        method, payload = self._method(requests, decoded)
        timeout = deadline.left()
        if timeout == 0:  # sent now, it would run after the caller gave up (gRPC sends a call already past due)
            raise DeadlineExceeded(
                "the caller's deadline ran out before it could be sent",
                code=grpc.StatusCode.DEADLINE_EXCEEDED, deployment=deployment, unsent=True,
            )
        return await self.pool.call(
            payload, deployment, replicas, shard_id=shard_id, method=method, metadata=metadata,
            timeout=timeout, retries=retries,
        )

    def _routable(self, deployment: str) -> bool:
        """Whether some shard of ``deployment`` has a replica to pick (read without moving ANY's turn)."""
        return any(replicas.eligible() for _, replicas in self.pool.targets(deployment, False, None, PollingType.ALL))

    def _no_live_replica(self, deployment: str) -> RoutingError:
        self.pool.say_emptied(deployment)  # a shard whose last replica left: said once, by name (README)
        return RoutingError(f"deployment {deployment!r} has no live replica{self._why_none(deployment)}",
                            deployment=deployment)

    def _why_none(self, deployment: str) -> str:
        """What a "no live replica" refusal adds: which shards (or which hop: uses_before, uses_after) are known,
        with none to pick, and how that comes about, in the words of where this head's replicas come from:
        ACTIVATE and --connection, or Kubernetes discovery (which owns a Kubernetes head's membership)."""
        shard_ids = self.pool.shard_ids(deployment)
        # a hop given an address has it always (its last replica is never ejected): one with none is discovered
        role = next((role for role, hop in self._hops if hop == deployment), None)
        discovered = getattr(self.pool, "where_replicas_are_found", None)  # a K8sGrpcConnectionPool's
        if discovered is not None:
            not_listed = self._not_listed_yet()
            if not_listed:  # the API server down or refusing since the start: nothing to do with the labels
                return not_listed
            where = discovered(self.deployment, role or "worker")
            if not shard_ids:
                return f": discovery has found none in {where}"
            if role is None:  # shards declared (--shards) or found before
                return f": shard(s) {_listed(shard_ids)} have no replica discovery lists ready in {where}"
            return f": the replicas discovery found of it are gone or not ready now in {where}"
        if not shard_ids:
            return ": no worker has registered (ACTIVATE), none was given (--connection)"
        return (f": shard(s) {_listed(shard_ids)} have no replica (none registered yet, or their workers deactivated "
                "or their leases lapsed)")

    def _not_listed_yet(self) -> str:
        """What a refusal for want of a replica says while this head's Kubernetes discovery has listed nothing
        yet (and its last failure); "" otherwise, and for a head with no discovery."""
        pending = getattr(self.pool, "not_listed_yet", lambda: None)()
        return f": discovery has not listed namespace {self.pool.namespace!r} yet ({pending})" if pending else ""

    def _another_shard(self, failure: ReplicaError) -> Optional[int]:
        """Another shard with a replica to pick for an ANY request its shard failed, in turn (the next one
        alone would take the dead shard's whole share), or None when the request must not go elsewhere: unless
        no attempt reached a worker (no connection, or refused as it drained), one may have run it, if only
        stalled, and another shard would store it twice; uses_before/after have no other shard."""
        failed = failure.shard_id
        if not failure.unsent or failure.deployment != self.deployment or failed is None:
            return None
        now = asyncio.get_running_loop().time()
        self._note_shard_failed(failed, now)
        pool = self.pool
        live = [
            shard for shard in pool.shard_ids(self.deployment)
            if shard != failed and pool.get_replicas(self.deployment, shard_id=shard).eligible()
        ]
        if not live:
            return None
        failed_at = self._shard_failed_at
        fresh = [shard for shard in live if now - failed_at.get(shard, -math.inf) >= RECENT_SHARD_FAILURE]
        choices = fresh or live
        self._resend_turn += 1
        return choices[self._resend_turn % len(choices)]

    def _note_shard_failed(self, shard_id: int, now: float) -> None:
        """Remember that an attempt on ``shard_id`` failed before a worker took it (see RECENT_SHARD_FAILURE);
        what is older than that is let go once many shards are remembered (registrations choose shard ids)."""
        failed_at = self._shard_failed_at
        failed_at[shard_id] = now
        if len(failed_at) > SHARD_FAILURES_KEPT:
            self._shard_failed_at = {
                shard: at for shard, at in failed_at.items() if now - at < RECENT_SHARD_FAILURE
            }

    def _note_failed(self, request: DataRequest, *failures: ShardnetError, callers: bool = False) -> None:
        """Count ``request``, failed for want of a replica or as shards failed (``failures``, one per shard that
        did): the first of a burst is logged at once, the rest once a second by shard and cause (``BurstLog``),
        so that a shard gone, every request failing, is never silent and never a line per request."""
        # one request failed in several shards is one kind, "shard 0 & shard 1: UNAVAILABLE": the burst line joins
        # kinds with ", ", so the shards of one request must read apart from the kinds of others
        places: dict[str, list[str]] = {}
        for failure in failures:
            where, status = self._failure_kind(failure)
            if callers and status == grpc.StatusCode.DEADLINE_EXCEEDED.name:
                # the caller's own deadline ran out (not --timeout, not an attempt timeout): the replica named
                # may be healthy, only slower than this caller waits, as the ejection's WARNING says it too
                status += " (the caller's deadline)"
            places.setdefault(status, []).append(where)
        kind = " + ".join(f"{' & '.join(wheres)}: {status}" for status, wheres in places.items())
        latest = quoted(failures[0], MAX_FAILURE_CHARS)  # a worker's answer may quote what the caller sent
        self._failed_requests.note(
            kind, latest, "%r: request %s failed (%s): %s", self.deployment, quoted(request.request_id, MAX_ID_CHARS),
            kind, latest,
        )

    def _failure_kind(self, failure: ShardnetError) -> tuple[str, str]:
        """Where a request failed and why, in a few words: (``shard 1``, ``no replica``), (``shard 0``,
        ``UNAVAILABLE``), (``dep/uses_after``, ``DEADLINE_EXCEEDED``)."""
        deployment, shard_id = getattr(failure, "deployment", ""), getattr(failure, "shard_id", None)
        where = f"shard {shard_id}" if shard_id is not None and deployment in ("", self.deployment) else (
            deployment or self.deployment
        )
        return where, failure_word(failure)

    def _failed_after_running(self, request: DataRequest, details: str) -> tuple[DataRequest, list[tuple[str, str]]]:
        """A request a replica may have run, then failed: answered ERROR (``is-error: true``, gRPC OK), as an
        Executor's exception is, with the failure in its description and its documents as they came. Not as a
        gRPC status: pools send UNAVAILABLE and DEADLINE_EXCEEDED again, to any shard under ANY, where it would
        run twice; and a Jina gateway passes any other status on to its client as UNKNOWN."""
        request.set_error(details + MAY_HAVE_RUN_NOTE, name=MAY_HAVE_RUN_ERROR, executor=self.deployment)
        return request, list(services.ERROR_TRAILER)

    async def _on_another_shard(
        self, failure: ReplicaError, requests: list[DataRequest], metadata, deadline: _Deadline
    ) -> tuple[DataRequest, Any]:
        """An ANY request no worker of its shard took (after failing over within it), sent once to another shard:
        a shard's last replica is never ejected, so rotation keeps choosing a shard whose only worker died until
        its lease lapses, and any shard serves ANY. With at least ``MIN_RESEND_SECONDS`` of the caller's deadline
        left, and without a retry from the budget: a request no worker took adds no load by going elsewhere (it
        is routing, as leaving an ejected replica is), and the budget, spent on the dead shard's own failover
        under steady traffic, would fail a third of all requests while the dead worker's lease runs. When the
        resend fails too, ``failure`` is raised with its outcome appended, so both shards are named."""
        shard_id = self._another_shard(failure)
        timeout = deadline.remaining()  # a look: the failed hop's bound still decides what its failure was
        if shard_id is None or (timeout is not None and timeout < MIN_RESEND_SECONDS):
            raise failure
        timeout = deadline.left()
        logger.debug(
            "%s: %s; sending the ANY request to shard %d instead", self.deployment, quoted(failure, MAX_FAILURE_CHARS),
            shard_id,
        )
        self.requests_resent += 1
        try:
            if self._uses_after is not None:
                return await self._gather(requests, metadata, deadline, PollingType.ANY, shard_id=shard_id)
            replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id)
            method, payload = self._method(requests)
            return await self.pool.call(
                payload, self.deployment, replicas, shard_id=shard_id, method=method, metadata=metadata,
                timeout=timeout, new_request=False,
            )
        except (ReplicaError, RoutingError) as resent:
            if isinstance(resent, ReplicaError) and resent.deployment != self.deployment:
                # the shard answered and uses_after failed: the hop is what failed (and is counted), not the shard
                raise type(resent)(
                    f"{resent.cause} (after shard {shard_id} answered: the request went to it as shard "
                    f"{failure.shard_id} took it nowhere: {failure.cause})",
                    address=resent.address, code=resent.code, deployment=resent.deployment,
                    shard_id=resent.shard_id, unsent=False,
                ) from None
            if getattr(resent, "unsent", True):
                self._note_shard_failed(shard_id, asyncio.get_running_loop().time())
            raise type(failure)(
                f"{failure.cause}; sent on to shard {shard_id}, which failed too: {resent}",
                # the resend's status: what the caller's request ended with (its deadline, say), not the first shard's
                address=failure.address, code=getattr(resent, "code", None) or failure.code,
                deployment=failure.deployment, shard_id=failure.shard_id,
                unsent=getattr(resent, "unsent", True),  # the first shard's surely ran nothing (it is resent)
            ) from None

    async def _gather(
        self, requests: list[DataRequest], metadata, deadline: _Deadline, polling: PollingType,
        retries: Optional[int] = None, shard_id: Optional[int] = None,
    ) -> tuple[DataRequest, list]:
        """The answers of the shards ``polling`` selects (one under ANY, ``shard_id`` when given; every one under
        ALL), merged or handed to ``uses_after`` in one call."""
        targets = self.pool.targets(self.deployment, False, shard_id, polling)
        if not targets:
            self.pool.say_emptied(self.deployment, shard_id=shard_id)  # ANY with a uses_after comes here, not _one
            missing = "live replica" if polling == PollingType.ANY else "shard"
            raise RoutingError(f"deployment {self.deployment!r} has no {missing}{self._why_none(self.deployment)}",
                               deployment=self.deployment)
        method, payload = self._method(requests, decoded=True)
        timeout = deadline.left()
        results = await asyncio.gather(
            *(
                self.pool.call(
                    payload, self.deployment, replicas, shard_id=sid, method=method, metadata=metadata,
                    timeout=timeout, retries=retries,
                )
                for sid, replicas in targets
            ),
            return_exceptions=True,
        )
        # whether the caller's deadline is what the shards ran into: judged now, before uses_after's hop (bound by
        # what is left of it) makes itself the latest and a shard cut by the head's --timeout read as the caller's
        callers = deadline.callers_ran_out()
        outcomes, trailing, seen, failed = [], [], set(), 0
        for (shard_id, _), result in zip(targets, results):
            if isinstance(result, MalformedReplyError):  # the shard's fault, not the caller's: a failed shard
                result = ReplicaError(
                    result.cause,
                    address=result.address,
                    code=grpc.StatusCode.INTERNAL,
                    deployment=self.deployment,
                    shard_id=shard_id,
                )
            if isinstance(result, BaseException):
                if not isinstance(result, (ReplicaError, RoutingError)):
                    raise result
                if isinstance(result, RoutingError) and (not_listed := self._not_listed_yet()):
                    # a shard with no replica before discovery listed anything: said, or it reads as a shard gone
                    result = RoutingError(f"{result}{not_listed}", deployment=result.deployment, shard_id=shard_id)
                outcomes.append((shard_id, result))
                failed += 1
                continue
            response, shard_trailing = result
            outcomes.append((shard_id, response))
            for pair in shard_trailing or ():  # each distinct pair once, in shard order
                if pair not in seen and pair[0] not in _OWN_TRAILERS:  # a head's shard may be a head: ours win
                    seen.add(pair)
                    trailing.append(pair)
        trailing += [("total_shards", str(len(targets))), ("failed_shards", str(failed))]
        if 0 < failed < len(outcomes) and (note := self._timeout_note(grpc.StatusCode.DEADLINE_EXCEEDED, deadline)):
            # a shard the head's --timeout cut, the others answered: said in the answer as when every shard failed
            # (_serve says it then), or it reads as the caller's deadline
            outcomes = [(sid, _with_note(outcome, note)) for sid, outcome in outcomes]
        if self._uses_after is not None:
            answered = [outcome for _, outcome in outcomes if isinstance(outcome, DataRequest)]
            if not answered:
                raise every_shard_failed(self.deployment, outcomes)
            if failed and deadline.remaining() == 0:
                # a shard took the caller's time: its failure is the answer (uses_after, given none, would run
                # once the caller had given up, and be named as the hop that took it)
                raise _shard_that_took_the_time(outcomes)
            try:
                response, after_trailing = await self._one(
                    self._uses_after, answered, metadata, deadline, decoded=True, retries=retries
                )
                trailing = _later_hop_wins(trailing, after_trailing)
            except ReplicaError as exc:
                exc.unsent = False  # the shards ran it
                raise
            except RoutingError as exc:
                cause = str(exc).removeprefix(f"deployment {self._uses_after!r} ")  # said once, by the error
                raise ReplicaError(cause, code=grpc.StatusCode.UNAVAILABLE, deployment=self._uses_after,
                                   unsent=False) from None
            report_shard_problems(response, self.deployment, outcomes)
        else:
            response = merge_shard_responses(self.deployment, outcomes)  # raises when every shard failed
        # some shards answered, others failed (when all fail, _serve counts what is raised); a readiness check
        # (the dry run) is no request failed: a shard down would be counted at every probe
        if failed and requests[0].endpoint != DRY_RUN_ENDPOINT:
            self._note_failed(
                requests[0], *(result for _, result in outcomes if not isinstance(result, DataRequest)),
                callers=callers,
            )
        if failed and response.is_error and services.ERROR_TRAILER[0] not in trailing:
            # an error this head made (a shard down): what a Jina gateway stops a flow on. A worker's or uses_after's
            # own failure came with the trailer already; a request that came ERROR, passed back as it was, gets none,
            # as under ANY and as a worker answers it
            trailing += services.ERROR_TRAILER
        return response, trailing

    # -- control -----------------------------------------------------------------------

    async def process_control(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            request = ControlRequest.from_bytes(payload)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        command = request.command
        if command == "STATUS":
            trailing = (
                self._retry_metadata() + self._replica_metadata() + self._hop_metadata() + self._discovery_metadata()
            )
            if any(key == services.CHECK_REPLICAS_METADATA for key, _ in context.invocation_metadata() or ()):
                check = await self._replica_checks.check(_discovery_time_left(context))
                trailing += _check_metadata(check, STATUS_ROOM - _metadata_size(trailing))
            context.set_trailing_metadata(trailing)
            return self._status(request).to_bytes()
        if not self._guard.allows(context):
            await self._refuse(
                context, command, grpc.StatusCode.UNAUTHENTICATED,
                self._guard.refusal(context, f"{command} on head of {self.deployment!r}"),
            )
        if self._discovery_synced is not None:
            # Kubernetes owns this head's membership: a DEACTIVATE would drop a Ready pod no relist brings back,
            # and an ACTIVATE from any pod of the cluster would route the deployment's requests to it
            await self._refuse(
                context, command, grpc.StatusCode.FAILED_PRECONDITION,
                f"{command} refused: the head of {self.deployment!r} takes its workers from Kubernetes discovery; "
                "scale or remove their pods instead",
            )
        if len(request.related_entities) > MAX_CONTROL_ENTITIES:
            await self._refuse(
                context, command, grpc.StatusCode.INVALID_ARGUMENT,
                f"{command} refused: it names {len(request.related_entities)} workers, a head takes at most "
                f"{MAX_CONTROL_ENTITIES} per request",
            )
        peer = context.peer()
        changes = []
        interval = self._announced_interval(context) if command == "ACTIVATE" else None
        instance = None
        if command == "ACTIVATE":  # a worker's id is 32 hex digits: anything long is no id, and is not kept
            instance = dict(context.invocation_metadata()).get(services.INSTANCE_METADATA)
            instance = instance if instance is not None and len(instance) <= MAX_INSTANCE_CHARS else None
        dial_tls = self.pool.tls is not None  # a head given TLS material dials its workers over TLS
        for entity in request.related_entities:
            try:
                parsed = parse_address(entity_address(entity.address, entity.port), tls=dial_tls)
            except ConfigurationError as exc:
                await self._refuse(context, command, grpc.StatusCode.INVALID_ARGUMENT, f"{command} refused: {exc}")
            address = str(parsed)
            # 0.0.0.0, ::, ::ffff:127.0.0.1, 127.1 and localhost. reach this machine too: a bridge to a loopback-only
            # port as well. Names are not resolved: a lookup per ACTIVATE would make registration hang on DNS (and
            # fail with it), and a name may resolve elsewhere at the check and to this machine at the dial
            local_only = parsed.unix_path is not None or host_is_loopback(dialled_host(parsed.host))
            if command == "ACTIVATE" and local_only and not _on_this_machine(peer):
                # a socket or port only this machine reaches: a remote caller must not make the head a bridge to it
                await self._refuse(
                    context, command, grpc.StatusCode.PERMISSION_DENIED,
                    f"ACTIVATE refused: {address} is reached on the head's machine only, and the caller ({peer}) "
                    "is not on it (not over loopback, a Unix socket, or from one of its own addresses)",
                )
            if command == "ACTIVATE" and self._is_own(parsed):
                await self._refuse(
                    context, command, grpc.StatusCode.INVALID_ARGUMENT,
                    f"ACTIVATE refused: {address} is this head of {self.deployment!r} itself; it would send "
                    "requests to itself without end",
                )
            shard_id = entity.shard_id if entity.HasField("shard_id") else None
            if shard_id is not None and not is_shard_id(shard_id):  # a uint32 on the wire; the pool takes int32's
                await self._refuse(
                    context, command, grpc.StatusCode.INVALID_ARGUMENT,
                    f"{command} refused: {address} names shard {shard_id} of {self.deployment!r}, and a shard id "
                    f"is at most {MAX_SHARD_ID}",
                )
            if command == "ACTIVATE" and self._shards and (shard_id or 0) >= self._shards:
                # a worker configured for another shape: ALL would fan out to a shard nobody expects
                await self._refuse(
                    context, command, grpc.StatusCode.INVALID_ARGUMENT,
                    f"ACTIVATE refused: {address} claims shard {shard_id} of {self.deployment!r}, "
                    f"which has shards 0..{self._shards - 1} (head --shards {self._shards})",
                )
            changes.append((address, shard_id))
        if command == "ACTIVATE":
            await self._check_room(changes, context)
        for address, shard_id in changes:
            if command == "ACTIVATE":
                replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id or 0)
                known = replicas is not None and replicas.has_connection(address)
                if not known:
                    await self._drop_predecessors(address, shard_id or 0, instance)
                self.pool.add_connection(self.deployment, address, shard_id=shard_id or 0)
                restarted = self._registrations.announce((address, shard_id or 0), instance) and known
                lease = self._lease_for(interval, address)
                if lease is not None:
                    self._renew_lease(address, shard_id or 0, lease, interval)
                if not known:  # workers repeat ACTIVATE every few seconds: log the news only
                    logger.info(
                        "%s: activated %s in shard %s (by %s)", self.deployment, address, shard_id or 0, quoted(peer)
                    )
                elif restarted and replicas.readmit_if_healthy(address):  # ejected while dead, started again there
                    logger.info(
                        "%s: %s (shard %s), ejected, registered again as a new process: checking its health now",
                        self.deployment, address, shard_id or 0,
                    )
            else:
                # forgotten before the removal yields: an ACTIVATE handled meanwhile (a renewal already under way)
                # adds the worker again, and its lease must stay, or nothing would ever remove it
                # Jina's DEACTIVATE names no shard: the worker leaves every shard it is in
                shards = [shard_id] if shard_id is not None else self.pool.shard_ids(self.deployment)
                for leased_shard in shards:
                    self._registrations.forget((address, leased_shard))
                    self._hold_checked.pop((address, leased_shard), None)
                # finished even if its caller leaves: cut between two shards, the worker would stay in the rest
                # with no lease left to remove it
                removal = asyncio.ensure_future(self._deactivate(address, shards, peer))
                self._deactivations.add(removal)
                removal.add_done_callback(self._deactivations.discard)
                await asyncio.shield(removal)
        return request.to_bytes()

    async def _deactivate(self, address: str, shards: list[int], peer: str) -> None:
        removed = [await self.pool.remove_connection(self.deployment, address, shard_id=s) for s in shards]
        outcome = "removed" if any(removed) else "unknown"
        logger.info("%s: deactivated %s (%s, by %s)", self.deployment, address, outcome, quoted(peer))
        self._forget_empty_shards()

    async def _drop_predecessors(self, address: str, shard_id: int, instance: Optional[str]) -> None:
        """Remove ``address`` from the other shards where another process registered it: a worker new here, on
        the port of one that died (its lease not yet run out), would otherwise answer that one's shard too.
        Its calls there are cut, to fail over to that shard's other replicas."""
        if instance is None:  # a Jina worker announces no process id: nothing tells a new process from the old
            return
        for other in self.pool.shard_ids(self.deployment):
            known = self._registrations.instance((address, other))
            if other == shard_id or known is None or known == instance:
                continue
            self._registrations.forget((address, other))
            self._hold_checked.pop((address, other), None)
            await self.pool.remove_connection(self.deployment, address, shard_id=other, grace=0)
            logger.warning(
                "%s: %s registered in shard %d as a new process: removed from shard %d, where the process it "
                "replaced had registered", self.deployment, address, shard_id, other,
            )

    def _forget_empty_shards(self) -> None:
        """Without --shards, a shard beyond 0 whose last worker left is forgotten (ALL leaves it out, as before
        it registered): with --shards, ALL names it as missing."""
        forgotten = self.pool.forget_empty_shards(self.deployment)
        if forgotten:
            logger.info(
                "%s: shard(s) %s have no worker left and no --shards names them: forgotten (ALL leaves them out)",
                self.deployment, _listed(sorted(forgotten)),
            )

    async def _check_room(self, changes: list[tuple[str, Optional[int]]], context: grpc.aio.ServicerContext) -> None:
        """Refuse (RESOURCE_EXHAUSTED) an ACTIVATE whose new workers would take the head past ``max_workers``;
        renewals, the usual ACTIVATE, add none and cost a lookup each."""
        new = set()
        for address, shard_id in changes:
            replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id or 0)
            if replicas is None or not replicas.has_connection(address):
                new.add((parse_address(address).target, shard_id or 0))  # as the pool keys it: one per target
        if not new:
            return
        total = self._worker_count()
        if total + len(new) > self._max_workers:
            await self._refuse(
                context, "ACTIVATE", grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"ACTIVATE refused: the head of {self.deployment!r} holds {total} workers and takes at most "
                f"{self._max_workers}; this one would add {len(new)}",
            )

    def _worker_count(self) -> int:
        """The workers this head holds, over every shard."""
        pool = self.pool
        return sum(len(pool.get_replicas(self.deployment, shard_id=shard)) for shard in pool.shard_ids(self.deployment))

    def _is_own(self, address: Address) -> bool:
        """Whether ``address`` is one this head listens on, as a worker on its machine would name it."""
        if address.unix_path is not None:
            return self.server.is_own_unix_socket(address.unix_path)
        host, bound = address.host.lower(), self.server.config.host.lower()
        if address.port != self.server.port:
            return False
        if bound in ("0.0.0.0", "::", ""):  # every local address is this head's
            # and every address of the machine's own interfaces (how a worker elsewhere would name it)
            return host_is_local(host) or host_is_loopback(dialled_host(host)) or is_own_address(dialled_host(host))
        return same_host(dialled_host(host), dialled_host(bound)) or (host == "localhost" and host_is_loopback(bound))

    def _discovery_metadata(self) -> tuple[tuple[str, str], ...]:
        """A Kubernetes head's discovery problem (not listed yet, a watch failing) as STATUS trailing metadata, its
        text percent-encoded and cut to MAX_DISCOVERY_CHARS."""
        problem = getattr(self.pool, "discovery_problem", lambda: None)()
        if problem is None:
            return ()
        value = urllib.parse.quote(problem[:MAX_DISCOVERY_CHARS].strip(), safe=_CAUSE_SAFE)
        if len(value) > MAX_DISCOVERY_BYTES:  # cut between escapes, never inside one
            value = re.sub(r"%[0-9A-Fa-f]?$", "", value[:MAX_DISCOVERY_BYTES])
            # and between characters: a character's UTF-8 cut short would read back as U+FFFD in shardnet status
            value = urllib.parse.quote(urllib.parse.unquote(value, errors="ignore"), safe=_CAUSE_SAFE)
        return ((services.DISCOVERY_FAILING_METADATA, value),)

    def _retry_metadata(self) -> tuple[tuple[str, str], ...]:
        """The retry budget as STATUS trailing metadata: spent and refused since start, the window's use."""
        budget = self.pool.retry_budget
        return (
            ("requests-seen", str(budget.total_requests)),
            ("retries-spent", str(budget.total_retries)),
            ("retries-refused", str(budget.refused)),
            ("retry-window", f"{budget.retries}/{budget.allowance:g}"),
        )

    def _replica_metadata(self) -> tuple[tuple[str, str], ...]:
        """What STATUS's related entities cannot say (Jina's message has no field for it), as trailing metadata:
        the replicas ejected for repeated failures and the shards with no replica at all (declared, or left by
        their last one), which ALL cannot serve. Bounded, whatever the deployment's size: gRPC refuses trailing
        metadata past 16 KB, and with it the whole answer."""
        shard_ids = self.pool.shard_ids(self.deployment)
        # a head no worker has joined yet knows no shard, but shard 0 is where every request would go
        empty, ejected = ([] if shard_ids else [0]), []
        for shard_id in shard_ids:
            replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id)
            if not replicas.has_connections():
                empty.append(shard_id)
            draining = set(replicas.draining_addresses)  # set aside as they drain: said so, not "failing"
            ejected.extend(
                (shard_id, address, " draining" if address in draining else "")
                for address in replicas.ejected_addresses
            )
        pairs = []
        if empty:
            ranges, unlisted = _shard_ranges(empty)
            pairs.append((services.EMPTY_SHARDS_METADATA, ranges))
            if unlisted:
                pairs.append((services.EMPTY_SHARDS_UNLISTED_METADATA, str(unlisted)))
        room, named = EJECTED_ROOM, 0
        for shard_id, address, mark in ejected[:EJECTED_LISTED]:
            # the address as the related entity names it; " draining" for one set aside as it drains
            value = f"{shard_id} {_quoted_entity(address)}{mark}"
            room -= len(services.EJECTED_METADATA) + len(value) + 32  # 32: what HPACK counts per entry
            if room < 0:
                break
            pairs.append((services.EJECTED_METADATA, value))
            named += 1
        if len(ejected) > named:
            pairs.append((services.EJECTED_UNLISTED_METADATA, str(len(ejected) - named)))
        return tuple(pairs)

    def _hop_metadata(self) -> tuple[tuple[str, str], ...]:
        """The replicas of the hops the head calls (uses_before, uses_after), as STATUS trailing metadata: a related
        entity has a shard id and no field to say a hop. Each one "ROLE ADDRESS", " ejected" added for one ejected
        for repeated failures, in at most HOPS_ROOM bytes, then how many more; the hops with no replica (left by
        their last one under discovery), through which every request fails."""
        pairs, empty, unlisted, room = [], [], 0, HOPS_ROOM
        for role, hop in self._hops:
            replicas = self.pool.get_replicas(hop)
            if replicas is None or not replicas.has_connections():
                empty.append(role)
                continue
            ejected, draining = set(replicas.ejected_addresses), set(replicas.draining_addresses)
            for address in replicas.addresses:
                value = f"{role} {_quoted_entity(address)}"
                said = [(services.HOP_METADATA, value + (" ejected" if address in ejected - draining else ""))]
                if address in draining:  # set aside as it drains: said apart (see HOP_DRAINING_METADATA)
                    said.append((services.HOP_DRAINING_METADATA, value))
                room -= _metadata_size(said)
                if room < 0:
                    unlisted += 1
                else:
                    pairs.extend(said)
        if unlisted:
            pairs.append((services.HOPS_UNLISTED_METADATA, str(unlisted)))
        if empty:
            pairs.append((services.EMPTY_HOPS_METADATA, ",".join(empty)))
        return tuple(pairs)

    def _status(self, request: ControlRequest) -> ControlRequest:
        """Answer STATUS with every replica the head routes to, as related entities."""
        for shard_id in self.pool.shard_ids(self.deployment):
            for address in self.pool.get_replicas(self.deployment, shard_id=shard_id).addresses:
                request.add_related_entity(address, *parse_address(address).entity(), shard_id)
        return request

    async def endpoint_discovery(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The endpoints of the first shard that answers (all shards run the same Executor), with those of
        uses_before and uses_after, as Jina's head lists them.

        No replica at all: an empty list. Replicas that all fail to answer: UNAVAILABLE naming each failure,
        as Jina's head does, so a caller does not read a hung worker as one serving nothing. The question
        carries the heads it passed, as a request does: round a cycle of heads it is refused, not asked again.
        """
        vias: tuple[tuple[str, str], ...] = ()
        try:
            require_empty(payload)
            for pair in context.invocation_metadata():
                if pair[0] == services.VIA_HEAD_METADATA:
                    vias = self._passed(vias, pair)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except _LoopedBack:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"head of {self.deployment!r} was asked for its endpoints by way of itself: its replicas lead back "
                "to it (a cycle of heads)",
            )
        timeout, metadata = _discovery_time_left(context), (*vias, self._via)
        # uses_before and uses_after serve endpoints of their own, listed beside the shards', as Jina's head does
        names = [name for name in (self.deployment, self._uses_before, self._uses_after) if name is not None]
        asked = await asyncio.gather(*(self._endpoints_of(name, metadata, timeout) for name in names))
        (reply, failures), others = asked[0], asked[1:]
        if reply is None:
            if failures:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"endpoint discovery: {failures_said(failures)}")
            return jina_pb2.EndpointsProto().SerializeToString()  # no replica at all
        if not others:
            return reply.SerializeToString()
        listed = set(reply.endpoints)
        for name, (other, failed) in zip(names[1:], others):
            if other is None:
                reasons = failures_said(failed) or "it has no replica"
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"endpoint discovery of {name}: {reasons}")
            listed.update(other.endpoints)
        del reply.endpoints[:]
        reply.endpoints.extend(sorted(listed - {DRY_RUN_ENDPOINT}) + sorted(listed & {DRY_RUN_ENDPOINT}))
        return reply.SerializeToString()

    async def _endpoints_of(
        self, deployment: str, metadata: Sequence[tuple[str, str]], timeout: Optional[float]
    ) -> tuple[Optional[jina_pb2.EndpointsProto], list[str]]:
        """The endpoints of ``deployment``'s first shard that answers (all run the same Executor), every shard
        asked at once so that a hung one does not take the time the others would answer in; else None and why
        each failed (none: no replica at all)."""
        asked = {
            asyncio.ensure_future(
                self.pool.call(
                    empty_pb2.Empty(), deployment, replicas, shard_id=shard_id, method="discovery",
                    # no request of the retry budget's: a monitor asking every second (`shardnet status` lists
                    # endpoints) raised the retries data requests were allowed, one count per shard asked
                    metadata=metadata, timeout=timeout, new_request=False,
                    # nor its failovers: STATUS needs no token, and a monitor's spent the budget the data requests'
                    # failovers need (retries refused while no request was seen); each replica asked once at most,
                    # a shard's only one twice (after a back-off: a reset connection, a restart, fails one call)
                    budgeted=False, retries=max(1, len(replicas) - 1),
                )
            )
            for shard_id in self.pool.shard_ids(deployment)
            if (replicas := self.pool.get_replicas(deployment, shard_id=shard_id)).has_connections()
        }
        failures: list[str] = []
        try:
            pending = asked
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    try:
                        reply, _ = task.result()
                    except (ReplicaError, RoutingError) as exc:
                        failures.append(str(exc))
                        continue
                    return reply, []
        finally:
            for task in asked:
                task.cancel()
            await asyncio.gather(*asked, return_exceptions=True)
        return None, sorted(failures, key=_in_shard_order)

    # -- lifetime -----------------------------------------------------------------------

    @staticmethod
    def _announced_interval(context: grpc.aio.ServicerContext) -> Optional[float]:
        """The interval at which an ACTIVATE's worker says it renews (positive seconds), or None when it says none."""
        offered = dict(context.invocation_metadata()).get(services.RENEWAL_METADATA, "")
        try:
            interval = float(offered)
        except ValueError:
            return None
        return interval if 0 < interval < math.inf else None

    def _lease_for(self, interval: Optional[float], address: str) -> Optional[float]:
        """The head's --lease, else a few times the ``interval`` at which the worker says it renews, else None."""
        if interval is None:
            return self._lease
        if self._lease is not None:
            if interval >= self._lease and not self._short_lease_warned:
                self._short_lease_warned = True  # once: every worker renews every few seconds
                logger.warning(
                    "%s: --lease %gs is not longer than the %gs at which %s renews its registration: it will drop "
                    "out between renewals again and again; give the head a --lease a few times the workers' "
                    "--register-interval", self.deployment, self._lease, interval, address,
                )
            return self._lease
        return IMPLIED_LEASE_FACTOR * min(interval, MAX_RENEWAL_INTERVAL)  # no registration for ever

    def _renew_lease(self, address: str, shard_id: int, lease: float, interval: Optional[float] = None) -> None:
        """Lease ``address`` in ``shard_id`` for ``lease`` seconds more; one coming back after its lease lapsed is
        told why it dropped out, by what the ``interval`` it announced says of the lapse."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        lapsed = self._registrations.renew((address, shard_id), now, lease, renews=interval is not None)
        self._hold_checked.pop((address, shard_id), None)  # a check before this renewal says nothing of the next
        self._renewal_read_at = now
        if self._expiry is None:  # implied leases start the expiry on the first one
            self._expiry = loop.create_task(self._expire_leases())
        if lapsed is None:
            return
        instance = self._registrations.instance((address, shard_id))
        if None not in (lapsed.instance, instance) and lapsed.instance != instance:  # not the one that lapsed
            logger.info(
                "%s: %s (shard %d) registered as a new process, %.1fs after the lease of the one before it ran out",
                self.deployment, address, shard_id, now - lapsed.at,
            )
            return
        if interval is not None and lease >= 2 * interval:  # the lease had room for renewals: none came
            logger.warning(
                "%s: %s (shard %d) registered again %.1fs after its %gs lease ran out, though it renews every %gs: "
                "it did not renew for the whole lease, so it stalled (a paused process, a blocked event loop, CPU "
                "starvation) or was cut off from the head",
                self.deployment, address, shard_id, now - lapsed.at, lease, interval,
            )
            return
        logger.warning(
            "%s: %s (shard %d) registered again %.1fs after its %gs lease ran out: it is alive but renews less "
            "often than the lease, so it keeps dropping out; give the head a --lease longer than the worker's "
            "--register-interval",
            self.deployment, address, shard_id, now - lapsed.at, lease,
        )

    async def _expire_leases(self) -> None:
        """Remove ACTIVATEd workers whose lease ran out without a fresh ACTIVATE.

        A pass that wakes late (the head itself stalled: its renewals could not be read either) first moves
        every lease on by the delay, so that a stalled head does not drop the workers it failed to hear.
        """
        loop = asyncio.get_running_loop()
        period = self._lease / 4 if self._lease is not None else IMPLIED_LEASE_CHECK
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            now = loop.time()
            stalled = now - due
            if stalled > period:
                self._registrations.postpone(stalled)
            expired = self._registrations.expired(now)
            # one whose lease runs out before the next pass is no replica to fail over to either: it stopped
            # renewing with these (one ACTIVATE for several leases them microseconds apart, a pass between them)
            lapsing = set(self._registrations.expiring(now + period))
            for address, shard_id in expired:
                if self._hold_for_overload(address, shard_id, now):
                    continue
                # each removal lets other requests run: a DEACTIVATE may have dropped this lease since, an
                # ACTIVATE renewed it; either way it is not this pass's to remove
                if not self._registrations.lapse((address, shard_id), now):
                    continue
                self._hold_checked.pop((address, shard_id), None)
                self.leases_lapsed += 1
                # what it holds is cut to fail over where the shard has another replica to take it; with none, cut
                # calls would only fail, and a worker that was merely stalled may still answer them
                # (one whose lease lapses in this pass or the next is no other: a stalled node takes all its replicas)
                replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id)
                others = replicas is not None and any(
                    str(c.address) != address and (str(c.address), shard_id) not in lapsing for c in replicas.eligible()
                )
                held = replicas is not None and any(
                    c.running.count for c in replicas.get_all_connections() if str(c.address) == address
                )
                # under --at-most-once a cut request may have run, so it fails rather than fail over: cut, it could
                # only fail, where a worker that merely stalled answers it once it resumes
                cut = others and not self.pool.retry.unsent_only
                removed = await self.pool.remove_connection(
                    self.deployment, address, shard_id=shard_id, grace=LAPSED_LEASE_GRACE if cut else None
                )
                streams = removed.counted_stubs.streams if removed is not None and others and not cut else None
                if streams is not None:  # what its streams never wrote cannot have run: it goes elsewhere now
                    streams.take_back_unwritten()
                logger.warning(
                    "%s: %s (shard %d) stopped renewing its registration: removed%s", self.deployment, address,
                    shard_id,
                    "" if not held else ", and the requests it held cut (they fail over)" if cut
                    else " (--at-most-once: the requests it holds may have run, and go to no other replica: they "
                    "wait for it, their deadline or keepalive)" if others
                    else " (no other replica of its shard can take the requests it holds: they wait for it, their "
                    "deadline or keepalive)",
                )
                self._forget_empty_shards()

    def _hold_for_overload(self, address: str, shard_id: int, now: float) -> bool:
        """Whether a lease that ran out is held one pass more (OVERLOAD_HOLD_LEASES leases past its end at most):
        the head read no worker's renewal for half a lease, this worker said it renews, and it shows it lives: it
        answered the head's calls since its last renewal and lately, or, sent nothing lately (a deep overload:
        every request the head reads is past its deadline), its health check says SERVING. Its renewals then sit
        in the head's own queue of inbound calls (a head offered more than it can do starts every call it is sent,
        an ACTIVATE only after the thousands before it), not in a stalled worker: a stalled or dead one answers
        nothing."""
        key = (address, shard_id)
        lease, renewed = self._registrations.leased(key), self._registrations.renewed_at(key)
        if lease is None or renewed is None or now - self._renewal_read_at < lease / 2:
            return False  # some worker's renewals get through: this one's stopped
        if not self._registrations.renews(key):
            return False  # it never said it renews (Jina's ACTIVATE, sent once): no renewal of its waits unread
        if now - (renewed + lease) > OVERLOAD_HOLD_LEASES * lease:
            return False
        replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id)
        connection = None if replicas is None else next(
            (c for c in replicas.get_all_connections() if str(c.address) == address), None
        )
        if connection is None:
            return False
        period = IMPLIED_LEASE_CHECK if self._lease is None else self._lease / 4
        answered = max((at for at, _sent in connection.answered_at.values()), default=float("-inf"))
        if answered <= renewed or now - answered > lease / 2:
            if connection.running.count:
                return False  # calls on it, none answered lately: stalled
            checked = self._hold_checked.get(key)
            if checked is None or checked[0] <= renewed or now - checked[0] > lease / 2:
                # asked its health, answered or not by the next pass (a check timing out with it found pending
                # held a hung worker a pass more); held meanwhile, and nothing said of an overload yet
                if key not in self._hold_checks:
                    self._hold_checks[key] = asyncio.ensure_future(self._check_held(key, connection, period * 3 / 4))
                self._registrations.postpone_one(key, period)
                return True
            if not checked[1]:
                return False
        self._registrations.postpone_one(key, period)
        quiet = now - self._overload_held_at > OVERLOAD_QUIET_LEASES * lease
        self._overload_held_at = now
        if quiet:
            logger.warning(
                "%s: no worker's renewal (ACTIVATE) reached the head for %.1fs, though its workers answer its calls "
                "(or, sent none lately, a health check): the head is too loaded to read its own inbound calls in time "
                "(%d requests under way; --max-in-flight refuses requests only once read, so it does not stop this: "
                "more heads or less traffic do), and keeps the workers that answer, for %d leases at most",
                self.deployment, now - self._renewal_read_at, sum(self._under_way.values()), OVERLOAD_HOLD_LEASES,
            )
        return True

    async def _check_held(self, key: tuple[str, int], connection: Connection, timeout: float) -> None:
        """Ask a held worker the head sent nothing lately for its health, within ``timeout`` (less than a pass's
        period: its answer, or its silence, is known at the next pass)."""
        try:
            problem = await connection.problem_now(timeout)
        except Exception:  # noqa: BLE001 - no answer is no answer
            problem = "failed"
        finally:
            self._hold_checks.pop(key, None)
        if self._registrations.leased(key) is not None:  # not lapsed, DEACTIVATEd or replaced meanwhile
            self._hold_checked[key] = (asyncio.get_running_loop().time(), problem is None)

    async def _ready_once_discovered(self) -> None:
        """Turn readiness SERVING once discovery has listed the workers (it retries, with backoff, until then)
        and every declared shard has one, and every discovered hop (uses_before, uses_after) a replica: traffic
        taken before would fail, at a first deployment and when a resharding rolls out a head for a shard whose
        workers still load (the old head serves meanwhile). It waits for them at most ``shards_wait`` seconds: a
        head restarted while a shard is down serves the others."""
        await self._discovery_synced()
        waiting, hops = self._shards_without_workers(), self._hops_without_replicas()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shards_wait
        if waiting or hops:
            logger.info(
                "%s: discovery listed its workers; not ready until %s %s one (for %gs at most)",
                self.deployment, _awaited(waiting, hops), "have" if waiting else "has", self._shards_wait,
            )
        while (waiting or hops) and loop.time() < deadline:
            await asyncio.sleep(min(SHARDS_LOOKED_AT_EVERY, max(0.0, deadline - loop.time())))
            waiting, hops = self._shards_without_workers(), self._hops_without_replicas()
        where = f" in namespace {self.pool.namespace!r}" if hasattr(self.pool, "namespace") else ""
        if not self._shards and not any(map(self._has_workers, self.pool.shard_ids(self.deployment))):
            logger.warning(  # no shard declared to wait for: ready at once, but not as if all were well
                "%s: discovery found no worker of it%s; ready, and every request fails until one appears (is the "
                "namespace right? pods are found by the label jina_deployment_name=%s, Services by "
                "shardnet.io/deployment=%s)",
                self.deployment, where, self.deployment, self.deployment,
            )
        elif waiting or hops:
            consequences = ["ALL requests name them as failed"] if waiting else []
            consequences += [f"every request fails until {hop} has one" for hop in hops]
            logger.warning(
                "%s: ready after %gs without a %s of %s%s: %s", self.deployment, self._shards_wait,
                "worker" if waiting else "replica", _awaited(waiting, hops), where, "; ".join(consequences),
            )
        elif self._discovered_hops:
            logger.info("%s: discovery listed a replica of every shard and of %s; ready", self.deployment,
                        " and ".join(self._discovered_hops))
        else:
            logger.info("%s: discovery listed a worker for every shard; ready", self.deployment)
        self._say_unused_hops()
        await self.server.mark_ready()

    def _say_unused_hops(self) -> None:
        """Warn of uses_before/uses_after pods discovery found for a head not told to use them: they were listed
        as replicas and never called, without a word (a Kubernetes review's find)."""
        for role, used in ((USES_BEFORE, self._uses_before), (USES_AFTER, self._uses_after)):
            found = self.pool.get_replicas(f"{self.deployment}/{role}")
            if used is None and found is not None and found.has_connections():
                logger.warning(
                    "%s: discovery found %s pods of it (%s) but this head has no --%s: they are not called (a "
                    "head calls one %s, given by its address, or --%s %s for those pods, as k8s render gives it)",
                    self.deployment, role, ", ".join(found.addresses), role.replace("_", "-"), role,
                    role.replace("_", "-"), DISCOVERED,
                )

    def _hops_without_replicas(self) -> list[str]:
        """The discovered hops (uses_before, uses_after) the pool holds no replica of."""
        hops = [(role, self.pool.get_replicas(f"{self.deployment}/{role}")) for role in self._discovered_hops]
        return [role for role, replicas in hops if replicas is None or not replicas.has_connections()]

    def _shards_without_workers(self) -> list[int]:
        """The declared shards the pool holds no worker of."""
        return [shard_id for shard_id in range(self._shards) if not self._has_workers(shard_id)]

    def _has_workers(self, shard_id: int) -> bool:
        replicas = self.pool.get_replicas(self.deployment, shard_id=shard_id)
        return replicas is not None and replicas.has_connections()

    async def _refuse(
        self, context: grpc.aio.ServicerContext, command: str, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        """Refuse a control call with ``code``: logged with its caller (a burst counted, see RefusalLog)."""
        self._refusals.note(command, context.peer(), message)
        await context.abort(code, message)

    def _warn_of_exposure(self) -> None:
        """Say at start where membership or the control token is exposed beyond this machine."""
        config = self.server.config
        if self._discovery_synced is not None or host_is_loopback(config.host):
            return  # Kubernetes owns membership / only this machine reaches the head
        where = entity_address(config.host, config.port) if config.port else f"{config.host} (a port picked at start)"
        if self._guard.open:
            logger.warning(
                "%s: anyone who reaches %s may add or remove its workers (ACTIVATE/DEACTIVATE): set a control "
                "token (SHARDNET_CONTROL_TOKEN, with TLS) or require client certificates (--tls-client-ca)",
                self.deployment, where,
            )
        elif self._guard.by_certificate_only:
            logger.warning(
                "%s: every client holding a certificate of its client CA, its data clients too, may add or remove "
                "its workers on %s (ACTIVATE/DEACTIVATE): set a control token as well (SHARDNET_CONTROL_TOKEN) to "
                "keep that to its workers", self.deployment, where,
            )
        elif config.tls is None:
            logger.warning(
                "%s: the control token crosses the network in cleartext on %s (its workers send it with every "
                "ACTIVATE): serve TLS too (--tls-cert, --tls-key)",
                self.deployment, where,
            )
        if config.tls is not None and self.pool.tls is None:
            logger.warning(
                "%s: clients reach this head over TLS, but it dials its workers in plaintext: give it --root-ca "
                "(and its workers TLS) unless they are on this machine",
                self.deployment,
            )

    def _begin(self) -> None:
        self._warn_of_exposure()
        self.pool.start()
        loop = asyncio.get_running_loop()
        if self._lease is not None:
            self._expiry = loop.create_task(self._expire_leases())
        if self._discovery_synced is not None:
            self._readiness = loop.create_task(self._ready_once_discovered())

    async def _end(self) -> None:
        # once the drain is over (the calls it cut cancelled, whichever order their tasks see it in): what is left
        # under way was cut, said in a WARNING naming each endpoint and how many of its requests
        self.requests_cut = self.server.requests_cut(
            self._under_way, logger, self.deployment,
            "still under way, cut unanswered (their callers got UNAVAILABLE, and the head's calls for them to its "
            "workers were cancelled)",
        )
        for task in (self._expiry, self._readiness):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._expiry = self._readiness = None
        for check in list(self._hold_checks.values()):
            check.cancel()
        await asyncio.gather(*self._hold_checks.values(), return_exceptions=True)
        # a DEACTIVATE whose caller the drain cut finishes its removals (a few loop passes) before the pool closes
        await asyncio.gather(*self._deactivations, return_exceptions=True)
        self._refusals.close()
        self._failed_requests.close()
        await self._replica_checks.close()
        await self.pool.close()

    async def start(self) -> None:
        """Serve, and start lease expiry and discovery-driven readiness where configured."""
        self._begin()
        await self.server.start()

    async def stop(self, grace: Optional[float] = None) -> None:
        """Stop serving, letting calls in flight finish within ``grace`` seconds, then close the pool."""
        await self.server.drain(grace)
        await self._end()

    async def run(self, parent_pid: Optional[int] = None, ready_fd: Optional[int] = None) -> int:
        """Serve until SIGTERM/SIGINT/SIGHUP (or until process ``parent_pid`` exits), then drain and close the
        pool. ``ready_fd``: as ``serve_until_signalled`` takes it."""
        self._begin()

        def ready_line(address: str) -> str:  # not str.format: the deployment's name may hold a brace
            if self._discovery_synced is None:
                return f"shardnet head {self.deployment} ready on {address}"
            # listening is not ready yet: it waits for discovery's first list
            return (
                f"shardnet head {self.deployment} listening on {address}; ready (its health's "
                f"{services.READY_SERVICE!r} service SERVING) once Kubernetes discovery lists its workers"
            )

        try:
            return await serve_until_signalled(
                self.server, ready_line=ready_line, parent_pid=parent_pid, ready_fd=ready_fd
            )
        finally:
            await self._end()

