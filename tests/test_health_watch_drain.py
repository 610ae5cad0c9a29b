"""A gRPC health Watch stream open on a server must not hold its drain to the whole grace.

A Watch is answered by gRPC's reference servicer, which never ends the stream: the drain's ``server.stop(grace)``
waited for it as for a call, so an idle worker watched by a monitor (or by gRPC's client-side health checking,
which uses Watch) stopped only when its grace ran out instead of at once."""

from __future__ import annotations

import asyncio
import time

import executors
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker
from shardnet.testing import eventually


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "service, expected",
    [("", [SERVING, NOT_SERVING]), ("no.such", [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN])],
)
async def test_a_watch_says_the_drain_and_ends_without_holding_it(service, expected):
    """A watch of the server, or of a service it does not serve, sees its last word and ends as the drain begins,
    the stop taking well under its 5 s grace."""
    worker = Worker(executors.Tagger.create({"shard_id": 0}, label="w"), ServerConfig(drain_grace=5.0))
    await worker.start()
    seen = []
    try:
        async with grpc.aio.insecure_channel(worker.server.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

            async def read():
                try:
                    async for answer in stream:
                        seen.append(answer.status)
                except grpc.aio.AioRpcError as error:  # cut by the stop: the stream held the drain
                    seen.append(error.code())

            reader = asyncio.create_task(read())
            await eventually(lambda: seen)
            began = time.monotonic()
            await worker.stop()  # the config's grace, 5 s
            took = time.monotonic() - began
            await asyncio.wait_for(reader, 2)
    finally:
        await worker.stop(0)
    assert seen == expected
    assert took < 2.0, f"the drain took {took:.1f}s of its 5s grace: the Watch stream held it"
