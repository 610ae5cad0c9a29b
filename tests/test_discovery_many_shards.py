"""Endpoint discovery of a head with many shards, all failing: the refusal stays within gRPC's trailer limit."""

from __future__ import annotations

import socket

import grpc
import pytest
from google.protobuf import empty_pb2

from shardnet import PollingMap
from shardnet.runtimes.head import Head
from shardnet.runtimes.server import ServerConfig


def _dead_addresses(count: int) -> list[str]:
    holders = [socket.socket() for _ in range(count)]
    for holder in holders:
        holder.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{holder.getsockname()[1]}" for holder in holders]
    for holder in holders:
        holder.close()
    return addresses


async def test_endpoint_discovery_failing_on_100_shards_says_why_within_the_trailer_limit(runtimes) -> None:
    """Each shard's failure (~230 characters) joined whole made 23 KB of details: the caller got RESOURCE_EXHAUSTED
    ("received metadata size exceeds hard limit") and `shardnet status` said nothing of the shards."""
    connections = {shard: [address] for shard, address in enumerate(_dead_addresses(100))}
    head = await runtimes(
        Head("d", ServerConfig(port=0), polling=PollingMap.parse("ALL"), shards=100, connections=connections)
    )
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        ask = channel.unary_unary("/jina.JinaDiscoverEndpointsRPC/endpoint_discovery")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ask(empty_pb2.Empty().SerializeToString(), timeout=20)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    said = failed.value.details()
    assert said.startswith("endpoint discovery: deployment 'd', shard 0, replica"), said[:200]
    assert "deployment 'd', shard 1, replica" in said  # in shard order: 1 after 0, not 10
    assert said.endswith("more failed (unnamed: a gRPC status's details must stay small)"), said[-200:]
    assert len(said) < 8192
