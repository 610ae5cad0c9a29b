"""gRPC method paths of the Jina 3 protocol, read from the compiled service descriptors."""

from __future__ import annotations

from shardnet.protocol.proto import jina_pb2


def _path(service: str, method: str) -> str:
    descriptor = jina_pb2.DESCRIPTOR.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}"


SINGLE_DATA_SERVICE = jina_pb2.DESCRIPTOR.services_by_name["JinaSingleDataRequestRPC"].full_name
DATA_SERVICE = jina_pb2.DESCRIPTOR.services_by_name["JinaDataRequestRPC"].full_name
CONTROL_SERVICE = jina_pb2.DESCRIPTOR.services_by_name["JinaControlRequestRPC"].full_name
DISCOVERY_SERVICE = jina_pb2.DESCRIPTOR.services_by_name["JinaDiscoverEndpointsRPC"].full_name
CALL_SERVICE = jina_pb2.DESCRIPTOR.services_by_name["JinaRPC"].full_name
DRY_RUN_SERVICE = jina_pb2.DESCRIPTOR.services_by_name["JinaGatewayDryRunRPC"].full_name

PROCESS_SINGLE_DATA = _path("JinaSingleDataRequestRPC", "process_single_data")
PROCESS_DATA = _path("JinaDataRequestRPC", "process_data")
PROCESS_CONTROL = _path("JinaControlRequestRPC", "process_control")
ENDPOINT_DISCOVERY = _path("JinaDiscoverEndpointsRPC", "endpoint_discovery")
STREAM_CALL = _path("JinaRPC", "Call")
DRY_RUN = _path("JinaGatewayDryRunRPC", "dry_run")
# shardnet's own: single DataRequests both ways, answered concurrently, matched by request_id
# (networking/streams.py); Jina's Call above answers one request at a time, in order
REQUEST_STREAM = "/shardnet.RequestStream/Call"

# metadata keys that travel beside requests
ENDPOINT_METADATA = "endpoint"


def endpoint_fits_metadata(endpoint: str) -> bool:
    """Whether gRPC can send ``endpoint`` as metadata (printable ASCII); one that cannot (``/søg``) travels in
    the request's header alone, which Jina's workers and shardnet's read first."""
    return endpoint.isascii() and endpoint.isprintable()


ERROR_METADATA = "is-error"
ERROR_TRAILER = ((ERROR_METADATA, "true"),)  # what marks an answer carrying an executor's error, as in Jina
AUTHORIZATION_METADATA = "authorization"
# beside an ACTIVATE: how often (seconds) the worker repeats it; a head without --lease then leases it for a few times
# that, so a worker killed without DEACTIVATE leaves (Jina's workers send none: they are never leased implicitly)
RENEWAL_METADATA = "shardnet-renews-every"
# beside an ACTIVATE: a random id the worker process drew at start; a known address naming a new one is a worker
# restarted there, which a head checks at once rather than waiting out an ejection its dead predecessor earned
INSTANCE_METADATA = "shardnet-instance"
# beside a head's STATUS answer, what its related entities cannot carry: "SHARD ADDRESS" (the address percent-encoded,
# as metadata is ASCII) of each replica ejected for repeated failures, up to a few dozen, and how many more there are;
# the shards with no replica at all (ALL cannot be served while there is one), as ranges: "1,3-5"
EJECTED_METADATA = "ejected"
EJECTED_UNLISTED_METADATA = "ejected-unlisted"
EMPTY_SHARDS_METADATA = "empty-shards"
EMPTY_SHARDS_UNLISTED_METADATA = "empty-shards-unlisted"  # empty shards past what "empty-shards" has room for
# beside a STATUS request (``shardnet status`` sends it): check every replica now. The head then adds how many it
# checked, the shards none of whose replicas serves, as ranges, and "SHARD ADDRESS CAUSE" (both percent-encoded) of
# each replica down, as many as fit, then how many more
CHECK_REPLICAS_METADATA = "shardnet-check-replicas"
REPLICAS_CHECKED_METADATA = "replicas-checked"
# replicas a check did not reach within its caller's time (neither serving nor down), and, for a check ended
# before this STATUS came and answered it again, its age in seconds
REPLICAS_UNCHECKED_METADATA = "replicas-unchecked"
REPLICA_CHECK_AGE_METADATA = "replica-check-age"
REPLICA_DOWN_METADATA = "replica-down"
REPLICAS_DOWN_UNLISTED_METADATA = "replicas-down-unlisted"
SHARDS_DOWN_METADATA = "shards-down"
SHARDS_DOWN_UNLISTED_METADATA = "shards-down-unlisted"
# beside a head's STATUS answer, its uses_before and uses_after (a related entity has no field to say a hop): "HOP
# ADDRESS" (HOP: uses_before or uses_after; the address percent-encoded), then " ejected" for one ejected for repeated
# failures, for as many as fit, then how many more; the hops with no replica at all: "uses_before,uses_after". A
# check adds "HOP ADDRESS CAUSE" of each one down (named before the shards' replicas), and the hops none of whose
# replicas serves, as "empty-hops" gives them: every request through the head fails then
# a Kubernetes head's discovery not listed yet, or a source whose latest list or watch failed: its view of the
# workers may be stale (percent-encoded text)
DISCOVERY_FAILING_METADATA = "discovery-failing"
HOP_METADATA = "hop"
HOPS_UNLISTED_METADATA = "hops-unlisted"
EMPTY_HOPS_METADATA = "empty-hops"
HOP_DOWN_METADATA = "hop-down"
# "HOP ADDRESS" of a hop's replica set aside as it drains, listed unmarked under "hop" (an earlier version's status
# reads no other mark there than " ejected", and would drop the line)
HOP_DRAINING_METADATA = "hop-draining"
HOPS_DOWN_METADATA = "hops-down"
# beside every request a head forwards: the head's own random id, so that a head asked to route to itself (an
# ACTIVATE naming its own address another way, a cycle of heads) refuses the request instead of looping
VIA_HEAD_METADATA = "shardnet-via-head"

# the parameter under which executors' dict results travel, keyed by executor name (ALL replies always carry it)
RESULTS_PARAMETER = "__results__"

# the health service readiness probes ask for: SERVING once fit for traffic ("" answers whether it is alive)
READY_SERVICE = "shardnet.ready"

# the details of the UNAVAILABLE a shardnet server answers once it drains: the call never reached a handler, so
# any client may send it again elsewhere (or to a new connection) without it being processed twice
DRAINING_DETAILS = "the server is stopping: send elsewhere"
# the details of the UNAVAILABLE of a request that waited in a request stream's queue when the stream broke: it
# was never written, so the replica cannot have run it, and it goes elsewhere as a refused one does
UNWRITTEN_DETAILS = "the request stream broke before this request was written: send elsewhere"
# the details of the UNAVAILABLE a worker answers on a request stream with as many requests under way as it takes
# (runtimes.worker.STREAM_WORK_LIMIT): it did not run the request
BUSY_DETAILS = "the worker has as many requests of this stream under way as it takes: send elsewhere"
# the details of the DEADLINE_EXCEEDED of a request whose deadline (its attempt's) ran out while it still waited in
# its request stream's queue, behind a replica that stopped reading: taken back, it never reached the replica, and
# may go elsewhere even at most once (networking/streams.py)
TAKEN_BACK_DETAILS = (
    "Deadline Exceeded (taken back before it was written to the request stream: it never reached the replica)"
)
# the details of the UNAVAILABLE of a call gRPC refused to make because its replica's channel had been closed (the
# replica removed, its grace over, between a request stream's BUSY refusal and the unary call it falls back to):
# it never left this process
CLOSED_UNSENT_DETAILS = "the replica's channel was closed before this request was sent: send elsewhere"
# the details that say a request surely did not run
NEVER_RAN_DETAILS = (DRAINING_DETAILS, UNWRITTEN_DETAILS, BUSY_DETAILS, CLOSED_UNSENT_DETAILS)
