"""``shardnet status``: is a head or worker serving, and what does it route to."""

from __future__ import annotations

import argparse
import asyncio

from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from shardnet.cli.options import add_client_tls_arguments, client_tls
from shardnet.errors import ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.addresses import entity_address
from shardnet.protocol import services


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="health, endpoints and replicas of a head or worker")
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--timeout", type=float, default=5.0)
    add_client_tls_arguments(parser)
    parser.set_defaults(handler=run)


async def status(args: argparse.Namespace) -> int:
    tls = client_tls(args)
    health, _ = await oneshot.call_once(
        "health", health_pb2.HealthCheckRequest(), args.target, timeout=args.timeout, tls=tls
    )
    print(f"{args.target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}")
    healthy = health.status == health_pb2.HealthCheckResponse.SERVING
    try:  # shardnet servers also answer readiness (a head fed by discovery: once it has listed its workers)
        ready, _ = await oneshot.call_once(
            "health", health_pb2.HealthCheckRequest(service=services.READY_SERVICE), args.target,
            timeout=args.timeout, tls=tls,
        )
        print(f"ready: {health_pb2.HealthCheckResponse.ServingStatus.Name(ready.status)}")
        healthy = healthy and ready.status == health_pb2.HealthCheckResponse.SERVING
    except ReplicaError as exc:  # a Jina server has no such service
        print(f"ready: unknown ({exc.cause})")
    try:  # a head asks its workers: a hung one fails this, and the replica list below still says who is there
        endpoints, _ = await oneshot.call_once(
            "discovery", empty_pb2.Empty(), args.target, timeout=args.timeout, tls=tls
        )
        print(f"endpoints: {', '.join(endpoints.endpoints) or '(none)'}")
    except ReplicaError as exc:
        print(f"endpoints: unknown ({exc.cause})")
        healthy = False
    control = await oneshot.send_control("STATUS", args.target, timeout=args.timeout, tls=tls)
    if control.related_entities:
        print("replicas:")
        for entity in control.related_entities:
            print(f"  shard {entity.shard_id}: {entity_address(entity.address, entity.port)}")
    return 0 if healthy else 1


def run(args: argparse.Namespace) -> int:
    return asyncio.run(status(args))
