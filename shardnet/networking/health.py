"""Whether a replica serves, and if not why, in an operator's words: "unreachable: Connection refused", "not
answering within 2s", "health NOT_SERVING". A pool's probes only need the yes or no, and whether the replica said
itself that it drains; ``shardnet status`` prints why."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

import grpc
import grpc.aio
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from shardnet.errors import ProtocolError
from shardnet.networking.channels import (
    NOT_CONNECTED, Stubs, checked_reply, refused_as_draining, replica_tls_diagnosis, shown_details,
)
from shardnet.networking.tls import ClientTls


@dataclass(frozen=True)
class HealthProblem:
    """Why a replica does not serve. ``draining``: the replica's own word that it drains or goes away (its health
    NOT_SERVING, or a refusal as it drains), no fault of it: a pool sets it aside rather than ejecting it."""

    cause: str
    draining: bool = False

    def __str__(self) -> str:
        return self.cause


async def health_problem(
    stubs: Stubs, address: Any, timeout: float, tls: Optional[ClientTls] = None,
) -> Optional[HealthProblem]:
    """None when the replica behind ``stubs`` answers its gRPC health check SERVING, or, having no health service
    (a Jina worker), lists its endpoints; else why not. ``timeout`` bounds both calls together; ``tls``, what the
    replica was dialled with, lets a connection closed at once be said as the TLS mismatch it likely is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        reply = checked_reply(await stubs.health(health_pb2.HealthCheckRequest(service=""), timeout=timeout), address)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            return failure_cause(error, timeout, address, tls)
        try:  # no health service: a replica still lists its endpoints
            checked_reply(await stubs.discovery(empty_pb2.Empty(), timeout=max(0.0, deadline - loop.time())), address)
        except grpc.aio.AioRpcError as error:
            listing = failure_cause(error, timeout, address, tls)
            return HealthProblem(f"no health service, and its endpoints do not list: {listing}", listing.draining)
        except ProtocolError as exc:
            return HealthProblem(f"no health service, and its endpoints do not list: {exc}")
        return None
    except ProtocolError as exc:
        return HealthProblem(f"malformed health answer: {exc}")
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthProblem(f"health {status}", draining=reply.status == health_pb2.HealthCheckResponse.NOT_SERVING)


def failure_cause(
    error: grpc.aio.AioRpcError, timeout: float, address: Any = None, tls: Optional[ClientTls] = None,
) -> HealthProblem:
    """A failed health call's cause: unreachable (gRPC's last words on the connection, with a word on TLS when
    they suggest the two ends' disagree: ``shardnet status`` said only "Socket closed"), not answering in time,
    draining, or the status and its details."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return HealthProblem(f"not answering within {timeout:.3g}s")
    if refused_as_draining(error):
        return HealthProblem(f"draining ({details})", draining=True)
    if code == grpc.StatusCode.UNAVAILABLE and details.lower().startswith(NOT_CONNECTED):
        # "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: connect: Connection refused (111)"
        hint = replica_tls_diagnosis(error, address, tls) if address is not None else ""
        return HealthProblem(f"unreachable: {details.rsplit(': ', 1)[-1]}{hint}")
    details = shown_details(details)  # the replica's own words: no line or escape of theirs in a warning
    return HealthProblem(f"{code.name}: {details}" if details else code.name)
