"""A gRPC health Watch stream open on a server must not hold its drain to the whole grace.

A Watch is answered by gRPC's reference servicer, which never ends the stream: the drain's ``server.stop(grace)``
waited for it as for a call, so an idle worker watched by a monitor (or by gRPC's client-side health checking,
which uses Watch) stopped only when its grace ran out instead of at once."""

from __future__ import annotations

import asyncio
import time

import executors
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker
from shardnet.testing import eventually


async def test_a_watch_sees_not_serving_and_does_not_hold_the_drain():
    worker = Worker(executors.Tagger.create({"shard_id": 0}, label="w"), ServerConfig(drain_grace=5.0))
    await worker.start()
    seen = []
    try:
        async with grpc.aio.insecure_channel(worker.server.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

            async def read():
                try:
                    async for answer in stream:
                        seen.append(answer.status)
                except grpc.aio.AioRpcError as error:  # cut by the stop
                    seen.append(error.code())

            reader = asyncio.create_task(read())
            await eventually(lambda: seen)
            began = time.monotonic()
            await worker.stop()  # the config's grace, 5 s
            took = time.monotonic() - began
            await asyncio.wait_for(reader, 2)
    finally:
        await worker.stop(0)
    assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert took < 2.0, f"the drain took {took:.1f}s of its 5s grace: the Watch stream held it"


async def test_a_watch_of_an_unknown_service_says_so_and_ends_with_the_drain():
    worker = Worker(executors.Tagger.create({"shard_id": 0}, label="w"), ServerConfig(drain_grace=5.0))
    await worker.start()
    seen = []
    try:
        async with grpc.aio.insecure_channel(worker.server.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="no.such"))

            async def read():
                async for answer in stream:
                    seen.append(answer.status)

            reader = asyncio.create_task(read())
            await eventually(lambda: seen)
            began = time.monotonic()
            await worker.stop()
            took = time.monotonic() - began
            await asyncio.wait_for(reader, 2)
    finally:
        await worker.stop(0)
    assert seen == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
    assert took < 2.0
