"""``shardnet status``: is a head or worker serving, and what does it route to."""

from __future__ import annotations

import argparse
import asyncio
import re
import urllib.parse

import grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from shardnet.cli.options import add_client_tls_arguments, client_tls, positive_seconds
from shardnet.errors import MalformedReplyError, ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.addresses import entity_address
from shardnet.networking.channels import NOT_CONNECTED
from shardnet.protocol import services
from shardnet.protocol.messages import ControlRequest


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="health, endpoints and replicas of a head or worker",
        description="Health, readiness, endpoints and replicas of a head or worker. Exits 1 when it is not serving "
        "or not ready, its endpoints or replicas cannot be listed, or a shard has no replica; 0 when all is well; 2 "
        "when it cannot be reached at all.",
    )
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument(
        "--timeout", type=positive_seconds("timeout"), metavar="SECONDS", default=5.0,
        help="seconds each of its calls (health, readiness, endpoints, replicas) may take (default: %(default)g)",
    )
    add_client_tls_arguments(parser)
    parser.set_defaults(handler=run)


async def status(args: argparse.Namespace) -> int:
    tls = client_tls(args)
    try:
        health, _ = await oneshot.call_once(
            "health", health_pb2.HealthCheckRequest(), args.target, timeout=args.timeout, tls=tls
        )
    except ReplicaError as exc:
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED or exc.cause.lower().startswith(NOT_CONNECTED):
            raise  # nothing answered at all: exit 2
        print(f"{args.target}: health unknown ({exc.cause})")  # it answered, but no health check (exit 1)
        healthy = False
    except MalformedReplyError as exc:
        print(f"{args.target}: health unknown ({exc.cause})")
        healthy = False
    else:
        print(f"{args.target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}")
        healthy = health.status == health_pb2.HealthCheckResponse.SERVING
    try:  # shardnet servers also answer readiness (a head fed by discovery: once it has listed a worker of every shard)
        ready, _ = await oneshot.call_once(
            "health", health_pb2.HealthCheckRequest(service=services.READY_SERVICE), args.target,
            timeout=args.timeout, tls=tls,
        )
        print(f"ready: {health_pb2.HealthCheckResponse.ServingStatus.Name(ready.status)}")
        healthy = healthy and ready.status == health_pb2.HealthCheckResponse.SERVING
    except (ReplicaError, MalformedReplyError) as exc:  # a Jina server has no such service
        print(f"ready: unknown ({exc.cause})")
    try:  # a head asks its workers: a hung one fails this, and the replica list below still says who is there
        endpoints, _ = await oneshot.call_once(
            "discovery", empty_pb2.Empty(), args.target, timeout=args.timeout, tls=tls
        )
        print(f"endpoints: {', '.join(endpoints.endpoints) or '(none)'}")
    except (ReplicaError, MalformedReplyError) as exc:
        print(f"endpoints: unknown ({exc.cause})")
        healthy = False
    try:
        control, trailing = await oneshot.call_once(  # not send_control: the trailing metadata says what is ejected
            "control", ControlRequest("STATUS"), args.target, timeout=args.timeout, tls=tls
        )
    except (ReplicaError, MalformedReplyError) as exc:
        if getattr(exc, "code", None) == grpc.StatusCode.UNIMPLEMENTED:  # a Jina 3.34 server has no control service: no shardnet head
            print(f"replicas: none listed ({exc.cause}: not a shardnet server)")
            return 0 if healthy else 1
        print(f"replicas: unknown ({exc.cause})")  # a draining server refuses it: said, as the rest is
        return 1
    if control.is_error:
        raise ReplicaError(control.status.description, address=args.target)
    notes = _replica_notes(trailing)
    if control.related_entities or notes["empty_ranges"] or notes["empty_unlisted"]:
        print("replicas:")
    for entity in control.related_entities:
        address = entity_address(entity.address, entity.port)
        mark = " (ejected: failing, probed until healthy)" if (entity.shard_id, address) in notes["ejected"] else ""
        print(f"  shard {entity.shard_id}: {address}{mark}")
    for shard_id in notes["empty"]:
        print(f"  shard {shard_id}: no replica")
    if notes["empty_ranges"] and not notes["empty"]:  # too many to name one by one: as the head gave them
        print(f"  shards {notes['empty_ranges']}: no replica")
    if notes["empty_unlisted"]:
        print(f"  ... and {notes['empty_unlisted']} more shards with no replica, not named")
    if notes["unlisted"]:
        print(f"  ... and {notes['unlisted']} more ejected replicas, not named")
    if notes["empty_ranges"] or notes["empty_unlisted"]:
        healthy = False  # a request to ALL fails naming the shard, and one to it goes nowhere
    budget = {key: value for key, value in trailing or () if key in _BUDGET_KEYS}
    if budget:
        print("retries: " + ", ".join(f"{key} {budget[key]}" for key in _BUDGET_KEYS if key in budget))
    return 0 if healthy else 1


_BUDGET_KEYS = ("requests-seen", "retries-spent", "retries-refused", "retry-window")
_RANGES = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")  # "empty-shards" as a head writes it: "1,3-5"


def _replica_notes(trailing) -> dict:
    """A head's STATUS trailing metadata read back: ejected (shard, address) pairs, how many more were not named,
    and the empty shard ids. A worker, or a Jina head, says none of it; a value that does not read is skipped."""
    ejected, empty, unlisted, empty_unlisted, ranges = set(), [], 0, 0, ""
    for key, value in trailing or ():
        if key == services.EJECTED_METADATA:
            shard, _, address = value.partition(" ")
            if shard.isdigit() and address:
                ejected.add((int(shard), urllib.parse.unquote(address)))
        elif key == services.EJECTED_UNLISTED_METADATA and value.isdigit():
            unlisted = int(value)
        elif key == services.EMPTY_SHARDS_METADATA and _RANGES.fullmatch(value):
            empty, ranges = _shard_ids(value), value
        elif key == services.EMPTY_SHARDS_UNLISTED_METADATA and value.isdigit():
            empty_unlisted = int(value)
    return {"ejected": ejected, "empty": empty, "unlisted": unlisted, "empty_unlisted": empty_unlisted,
            "empty_ranges": ranges}


def _shard_ids(ranges: str, most: int = 65536) -> list[int]:
    """"0-3,7" (as ``_RANGES`` reads it) as [0, 1, 2, 3, 7]; nothing when that names more than ``most`` shards."""
    ids: list[int] = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        if len(ids) + int(last or first) - int(first) >= most:
            return []
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def run(args: argparse.Namespace) -> int:
    return asyncio.run(status(args))
