"""gRPC's health and reflection services, their requests read by shardnet rather than by gRPC.

Registered as their packages register them, a malformed request fails in gRPC's
deserializer: the caller gets UNKNOWN ("Unexpected DecodeError") and the server
logs a traceback, one per request anyone may send. Read here, it is refused with
INVALID_ARGUMENT naming what was wrong, and nothing is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Optional, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from shardnet.errors import ProtocolError
from shardnet.protocol.messages import parse

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_CHECK_METHOD = "Check"
# how long a Watch stream, once its server drains, waits for its NOT_SERVING to be written before it ends
WATCH_LAST_WORD_SECONDS = 1.0
_FINAL_STATUSES = (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)


class _SentStatus:
    """A Watch's context, noting the last status written to the stream."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self.last: Optional[int] = None
        self.written = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        self.last = message.status
        self.written.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _watch_until_stopping(
    servicer: health.aio.HealthServicer, request: Any, context: grpc.aio.ServicerContext, stopping: asyncio.Event
) -> None:
    """gRPC's Watch, ended (OK) once the server drains and the stream has said NOT_SERVING: gRPC's servicer never
    ends it, and an open stream held the drain's ``server.stop(grace)`` to the whole grace."""
    sent = _SentStatus(context)
    watching = asyncio.ensure_future(servicer.Watch(request, sent))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((watching, stop), return_when=asyncio.FIRST_COMPLETED)
        if watching.done():
            return watching.result()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + WATCH_LAST_WORD_SECONDS
        while sent.last not in _FINAL_STATUSES and not watching.done() and loop.time() < give_up:
            sent.written.clear()
            written = asyncio.ensure_future(sent.written.wait())
            try:
                await asyncio.wait((watching, written), timeout=give_up - loop.time(),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                written.cancel()
    finally:
        stop.cancel()
        watching.cancel()
        with contextlib.suppress(BaseException):
            await watching


async def _read(message_type: Any, data: bytes, context: grpc.aio.ServicerContext) -> Any:
    """``data`` as ``message_type``, or the call aborted INVALID_ARGUMENT saying why."""
    try:
        return parse(message_type, data, message_type.DESCRIPTOR.full_name)
    except ProtocolError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def health_handler(
    servicer: health.aio.HealthServicer, *, watch: bool = True, stopping: Optional[asyncio.Event] = None
) -> grpc.GenericRpcHandler:
    """grpc.health.v1 on ``servicer``: Check, and Watch unless ``watch`` is False (it answers UNIMPLEMENTED).
    With ``stopping`` (set as the server drains), a Watch stream ends once it has said NOT_SERVING."""

    async def check(data: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return await servicer.Check(await _read(health_pb2.HealthCheckRequest, data, context), context)

    async def watch_status(data: bytes, context: grpc.aio.ServicerContext) -> None:
        request = await _read(health_pb2.HealthCheckRequest, data, context)
        if stopping is None:
            await servicer.Watch(request, context)
        else:
            await _watch_until_stopping(servicer, request, context, stopping)

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
