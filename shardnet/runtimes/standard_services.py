"""gRPC's health and reflection services, their requests read by shardnet rather than by gRPC.

Registered as their packages register them, a malformed request fails in gRPC's
deserializer: the caller gets UNKNOWN ("Unexpected DecodeError") and the server
logs a traceback, one per request anyone may send. Read here, it is refused with
INVALID_ARGUMENT naming what was wrong, and nothing is logged.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from shardnet.errors import ProtocolError
from shardnet.protocol.messages import parse

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_CHECK_METHOD = "Check"


async def _read(message_type: Any, data: bytes, context: grpc.aio.ServicerContext) -> Any:
    """``data`` as ``message_type``, or the call aborted INVALID_ARGUMENT saying why."""
    try:
        return parse(message_type, data, message_type.DESCRIPTOR.full_name)
    except ProtocolError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def health_handler(servicer: health.aio.HealthServicer, *, watch: bool = True) -> grpc.GenericRpcHandler:
    """grpc.health.v1 on ``servicer``: Check, and Watch unless ``watch`` is False (it answers UNIMPLEMENTED)."""

    async def check(data: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return await servicer.Check(await _read(health_pb2.HealthCheckRequest, data, context), context)

    async def watch_status(data: bytes, context: grpc.aio.ServicerContext) -> None:
        await servicer.Watch(await _read(health_pb2.HealthCheckRequest, data, context), context)

    answer = health_pb2.HealthCheckResponse.SerializeToString
    methods = {HEALTH_CHECK_METHOD: grpc.unary_unary_rpc_method_handler(check, response_serializer=answer)}
    if watch:
        methods["Watch"] = grpc.unary_stream_rpc_method_handler(watch_status, response_serializer=answer)
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, methods)


def reflection_handler(service_names: Sequence[str]) -> grpc.GenericRpcHandler:
    """grpc.reflection.v1alpha listing ``service_names`` (and itself)."""
    servicer = reflection.aio.ReflectionServicer([*service_names, reflection.SERVICE_NAME])

    async def info(
        incoming: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for data in incoming:
                yield await _read(reflection_pb2.ServerReflectionRequest, data, context)

        async for answer in servicer.ServerReflectionInfo(requests(), context):
            yield answer

    method = grpc.stream_stream_rpc_method_handler(
        info, response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString
    )
    return grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, {"ServerReflectionInfo": method})
