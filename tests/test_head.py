"""The head, end to end: in-process heads in front of in-process workers on free loopback ports.

Polling (ANY, ALL, a JSON map), merging by document id, uses_before/uses_after,
the control plane and its token, and what a stock gRPC client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import executors
import grpc
import grpc.aio
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shardnet import (
    ConfigurationError,
    DataRequest,
    Document,
    GrpcConnectionPool,
    PollingMap,
    ProtocolError,
    ReplicaError,
)
from shardnet.cli.main import main as cli_main
from shardnet.cli.stopping import DRAIN_CUT_EXIT
from shardnet.cli.status import _replica_notes
from shardnet.networking import oneshot
from shardnet.networking.channels import message_size_options
from shardnet.protocol import services
from shardnet.protocol.messages import ControlRequest
from shardnet.protocol.proto import jina_pb2
from shardnet.runtimes.head import STATUS_ROOM, Head, _check_metadata, _metadata_size
from shardnet.runtimes.processes import ShardnetProcess
from shardnet.runtimes.replica_check import ReplicaCheck
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker
from shardnet.testing import free_port, serving

EXECUTORS = Path(executors.__file__).resolve()


async def shard_workers(runtimes, executor_class, shards: int) -> list[Worker]:
    """One in-process worker per shard, each knowing its shard id."""
    return [await runtimes(Worker(executor_class.create({"shard_id": shard}))) for shard in range(shards)]


async def head_over(runtimes, deployment: str, workers: list[Worker], polling: str, **options) -> Head:
    """A started head routing ``deployment`` by ``polling`` to ``workers``, one shard each, in order."""
    connections = {shard: [worker.server.address] for shard, worker in enumerate(workers)}
    return await runtimes(Head(deployment, polling=PollingMap.parse(polling), connections=connections, **options))


async def send(address: str, endpoint: str, docs=(), parameters=None, timeout: float = 10.0) -> DataRequest:
    return await oneshot.send_request_async(
        DataRequest(list(docs), endpoint=endpoint, parameters=parameters), address, timeout=timeout
    )


async def send_with_trailing(address: str, endpoint: str, docs=()) -> tuple[DataRequest, dict]:
    response, trailing = await oneshot.call_once(
        "single_data",
        DataRequest(list(docs), endpoint=endpoint),
        address,
        timeout=10,
        metadata=[("endpoint", endpoint)],
    )
    return response, dict(tuple(trailing))


# -- ANY, membership -------------------------------------------------------------------------


async def test_any_reaches_one_worker_through_the_head(runtimes):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("tagging", connections={0: [worker.server.address]}))
    response = await send(head.server.address, "/tag", [Document(text="x")])
    assert not response.is_error and response.docs[0].tags["by"] == "tagger"
    assert worker.executor.calls == 1


async def test_an_endpoint_grpc_cannot_send_as_metadata_travels_in_the_header_through_head_and_pool(runtimes):
    """/søg: a Jina head and a Jina or shardnet worker serve it (they read the header); the head and the pool
    refused it, as it cannot travel as gRPC metadata. ANY and ALL, unary and on request streams."""
    endpoint = "/s\u00f8g"
    workers = [await runtimes(Worker(executors.Nordic.create())) for _ in range(2)]
    any_head = await runtimes(Head("nordic", connections={0: [workers[0].server.address]}))
    all_head = await runtimes(Head("nordic-all", connections={0: [workers[0].server.address],
                                                              1: [workers[1].server.address]},
                                   polling=PollingMap.parse("ALL")))
    for address in (workers[0].server.address, any_head.server.address, all_head.server.address):
        response = await send(address, endpoint, [Document(id="d", text="x")])
        assert not response.is_error, response.status
        assert response.docs[0].text == "handled x"
    async with GrpcConnectionPool() as pool:
        pool.add_connection("nordic", any_head.server.address)
        response, _ = await pool.send_requests_once([DataRequest([Document(text="y")], endpoint=endpoint)], "nordic")
        assert response.docs[0].text == "handled y"
        with pytest.raises(ProtocolError, match="set it in the request's header"):  # beside it only: reaches no one
            pool.send_requests_once([DataRequest([Document(text="z")])], "nordic", endpoint=endpoint)


async def test_activate_then_deactivate_makes_sends_succeed_then_fail_naming_the_deployment(runtimes):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("catalog"))
    host, port = worker.server.address.rsplit(":", 1)

    with pytest.raises(ReplicaError) as before:
        await send(head.server.address, "/tag", [Document()])
    assert before.value.code == grpc.StatusCode.UNAVAILABLE and "catalog" in str(before.value)

    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)
    assert (await send(head.server.address, "/tag", [Document()])).docs[0].tags["by"] == "tagger"
    status = await oneshot.send_control("STATUS", head.server.address)
    assert [(e.address, e.port, e.shard_id) for e in status.related_entities] == [(host, int(port), 0)]

    await oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=0)
    with pytest.raises(ReplicaError) as after:
        await send(head.server.address, "/tag", [Document()], timeout=5)
    assert after.value.code == grpc.StatusCode.UNAVAILABLE
    assert "catalog" in str(after.value) and "no live replica" in str(after.value)
    assert (await oneshot.send_control("STATUS", head.server.address)).related_entities == []
    assert worker.executor.calls == 1



async def test_status_names_ejected_replicas_and_empty_shards_and_the_cli_prints_them(
    runtimes, eventually, dead_address, capsys
):
    """STATUS's related entities (Jina's message) cannot say a replica is ejected or a shard has no replica;
    its trailing metadata does, and ``shardnet status`` prints it beside the retry budget."""
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    pool = GrpcConnectionPool(balancer="round_robin")  # the dead replica keeps being picked until it is ejected
    head = await runtimes(
        Head("ejecting", pool=pool, shards=2, connections={0: [worker.server.address, dead_address]})
    )

    async def status() -> tuple[list, dict]:
        response, trailing = await oneshot.call_once("control", ControlRequest("STATUS"), head.server.address, timeout=5)
        pairs = list(tuple(trailing))
        return [(e.shard_id, e.port) for e in response.related_entities], pairs

    entities, pairs = await status()
    assert ("empty-shards", "1") in pairs and not [key for key, _ in pairs if key == "ejected"]

    async def dead_one_ejected() -> bool:  # every request still answered: failover to the live replica
        assert not (await send(head.server.address, "/tag", [Document()], timeout=5)).is_error
        return ("ejected", f"0 {dead_address}") in (await status())[1]

    await eventually(dead_one_ejected, timeout=10.0, interval=0.0)
    entities, pairs = await status()
    dead_port, live_port = int(dead_address.rsplit(":", 1)[1]), int(worker.server.address.rsplit(":", 1)[1])
    assert sorted(entities) == sorted([(0, live_port), (0, dead_port)])  # ejected is still a member
    assert dict(pairs)["retries-spent"] != "0"

    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", head.server.address])
    printed = capsys.readouterr().out
    assert code == 1, printed  # shard 1 has no replica: a readiness gate built on it must not pass
    assert f"shard 0: {dead_address} (ejected" in printed
    assert f"shard 0: {worker.server.address}\n" in printed
    assert "shard 1: no replica" in printed
    assert re.search(r"retries: requests-seen \d+, retries-spent [1-9]", printed), printed


async def test_status_stays_answerable_with_a_non_ascii_ejected_address_and_hundreds_of_empty_shards(
    runtimes, eventually, tmp_path, capsys
):
    """Metadata is ASCII and bounded (16 KB): an ejected replica on a socket under a non-ASCII folder, and 400
    declared shards with no worker yet, must not make STATUS itself fail (it did: its callers waited out
    their deadlines, Deployment.members() and revive() with them)."""
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    dead = f"unix:{tmp_path / 'sôck.sock'}"  # nothing listens there
    pool = GrpcConnectionPool(balancer="round_robin")
    head = await runtimes(Head("wide", pool=pool, shards=400, connections={0: [worker.server.address, dead]}))

    async def ejected() -> bool:
        assert not (await send(head.server.address, "/tag", [Document()], timeout=5)).is_error
        _, trailing = await oneshot.call_once("control", ControlRequest("STATUS"), head.server.address, timeout=5)
        return any(key == "ejected" for key, _ in tuple(trailing))

    await eventually(ejected, timeout=10.0, interval=0.0)
    _, trailing = await oneshot.call_once("control", ControlRequest("STATUS"), head.server.address, timeout=5)
    pairs = dict(tuple(trailing))
    assert pairs["empty-shards"] == "1-399" and pairs["ejected"] == "0 unix:" + str(tmp_path / "s%C3%B4ck.sock")

    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["status", head.server.address]) == 1
    printed = capsys.readouterr().out
    assert f"shard 0: {dead} (ejected" in printed
    assert "shard 1: no replica" in printed and "shard 399: no replica" in printed


def test_status_names_a_few_dozen_ejected_replicas_and_counts_the_rest():
    head = Head("many", shards=1)
    replicas = head.pool.get_replicas("many", shard_id=0)
    ejected = [f"10.0.0.{n}:50051" for n in range(40)]
    replicas.__class__ = type("Ejecting", (type(replicas),), {"ejected_addresses": property(lambda self: ejected)})
    replicas.has_connections = lambda: True
    pairs = head._replica_metadata()
    assert [value for key, value in pairs if key == "ejected"] == [f"0 {address}" for address in ejected[:32]]
    assert ("ejected-unlisted", "8") in pairs
    assert sum(len(key) + len(value) + 32 for key, value in pairs) < 8192  # gRPC's soft limit for a client


def long_name(n: int) -> str:
    """A replica's address as long as an ACTIVATE may give: 250 characters in labels of at most 63."""
    return f"{'h' * 63}.{'h' * 63}.{'h' * 63}.{'h' * 50}{n:02d}.example:50051"


async def sprawling_status_metadata() -> tuple[tuple[str, str], ...]:
    """STATUS's trailing metadata at its largest: 32 ejected replicas with the longest names an ACTIVATE may give,
    4,000 empty shards, every other one, a uses_before of 8 such replicas, all ejected (more than there is room
    to name), and a uses_after left with none. Built in the test's loop (the hops' channels open in it), closed
    after."""
    head = Head("sprawling", shards=8000, uses_before=long_name(0), uses_after="127.0.0.1:1")
    for n in range(1, 8):
        head.pool.add_connection("sprawling/uses_before", long_name(n))
    before = head.pool.get_replicas("sprawling/uses_before")
    before.__class__ = type("Ejecting", (type(before),), {"ejected_addresses": property(lambda self: self.addresses)})
    head.pool.get_replicas("sprawling/uses_after").has_connections = lambda: False
    replicas = head.pool.get_replicas("sprawling", shard_id=0)
    ejected = [long_name(n) for n in range(32)]
    replicas.__class__ = type("Ejecting", (type(replicas),), {"ejected_addresses": property(lambda self: ejected)})
    head.pool.declare_shards("sprawling", 8000)
    for shard_id in range(1, 8000, 2):  # every other shard has a replica: the empty ones make 4000 ranges
        head.pool.get_replicas("sprawling", shard_id=shard_id).has_connections = lambda: True
    replicas.has_connections = lambda: True
    try:
        return head._replica_metadata() + head._retry_metadata() + head._hop_metadata()
    finally:  # the hops' channels: the pool's close would wait for the shards said to have replicas to have none
        await asyncio.gather(before.close(), head.pool.get_replicas("sprawling/uses_after").close())


async def test_status_metadata_stays_under_grpcs_soft_limit_with_long_hosts_and_scattered_empty_shards():
    pairs = await sprawling_status_metadata()
    assert sum(len(key) + len(value) + 32 for key, value in pairs) < 8192  # gRPC's soft limit for a client
    named = [value for key, value in pairs if key == "ejected"]
    assert 0 < len(named) < 32 and ("ejected-unlisted", str(32 - len(named))) in pairs
    ranges = dict(pairs)["empty-shards"]
    assert ranges.startswith("2,4,6,") and len(ranges) <= 1024
    assert len(ranges.split(",")) + int(dict(pairs)["empty-shards-unlisted"]) == 4000 - 1  # shard 0 has a replica
    notes = _replica_notes(pairs)  # as `shardnet status` reads them back
    assert _replica_notes([("empty-shards", "0-69999")])["empty_ranges"] == "0-69999"  # past what it names one by one
    assert _replica_notes([("empty-shards", "0-69999")])["empty"] == []
    assert _replica_notes([("empty-shards", "1,x")])["empty_ranges"] == ""  # what does not read is skipped
    assert notes["empty"][:3] == [2, 4, 6] and len(notes["empty"]) + notes["empty_unlisted"] == 3999
    assert notes["unlisted"] == 32 - len(named)
    assert notes["hops"] == [("uses_before", long_name(0))] and ("uses_before", long_name(0)) in notes["ejected"]
    assert notes["hops_unlisted"] == 7 and notes["empty_hops"] == ["uses_after"]


async def test_a_replica_check_takes_the_room_the_rest_of_status_left_and_reads_back():
    """A check adds the shards none serves and each replica down with why: past the sprawling worst case above it
    must still stay under gRPC's soft limit (a client refuses the whole answer past 16 KB), naming what fits."""
    down = [(shard_id, f"{'h' * 63}.example:50051", "unreachable: " + "x" * 300) for shard_id in range(1, 8000, 2)]
    hop_down = [("uses_before", long_name(n), "not answering within 4.65s " + "x" * 300) for n in range(8)]
    check = ReplicaCheck(
        checked=8000, down=down, shards_down=list(range(1, 8000, 2)), unchecked=99999, age=0.99,
        hop_down=hop_down, hops_down=["uses_before", "uses_after"],
    )
    pairs = await sprawling_status_metadata()
    pairs += _check_metadata(check, STATUS_ROOM - _metadata_size(pairs))
    assert _metadata_size(pairs) < 8192
    notes = _replica_notes(pairs)
    assert notes["checked"] == 8000 and notes["shards_down"][:3] == [1, 3, 5]
    assert len(notes["shards_down"]) + notes["shards_down_unlisted"] == 4000
    assert notes["hops_down"] == ["uses_before", "uses_after"]  # what the exit code needs fits, whatever the rest
    assert len(notes["down"]) + notes["down_unlisted"] == 4000 + 8 and notes["down_unlisted"] > 0

    # with the room, the hops' replicas down are named first: every request crosses them
    few = ReplicaCheck(
        3, [(0, "127.0.0.1:2", "health NOT_SERVING")], [], hop_down=hop_down[:1], hops_down=["uses_before"]
    )
    named = [key for key, _ in _check_metadata(few, 7000) if key.endswith("-down")]
    assert named == ["hops-down", "hop-down", "replica-down"]
    assert _replica_notes(_check_metadata(few, 7000))["down"][("uses_before", long_name(0))].startswith("not answering")

    cause = "unreachable: No such file: /tmp/sôck 100%"
    alone = _check_metadata(ReplicaCheck(2, [(0, "unix:/tmp/sôck", cause)], [0]), 7000)
    assert all(value.isascii() for _, value in alone)  # metadata is ASCII: non-ASCII and % travel percent-encoded
    notes = _replica_notes(alone)
    assert notes["down"] == {(0, "unix:/tmp/sôck"): cause}
    assert notes["shards_down"] == [0] and notes["checked"] == 2 and notes["down_unlisted"] == 0


async def test_an_activate_naming_the_head_itself_is_refused(runtimes):
    head = await runtimes(Head("selfish"))
    # 0.0.0.0 and ::ffff:127.0.0.1 land on 127.0.0.1 too (found by a runtimes review)
    for host in ("127.0.0.1", "localhost", "0.0.0.0", "::ffff:127.0.0.1"):
        with pytest.raises(ReplicaError) as refused:
            await oneshot.activate_worker(host, head.server.port, head.server.address, shard_id=0)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "is this head of 'selfish' itself" in str(refused.value)
    assert (await oneshot.send_control("STATUS", head.server.address)).related_entities == []
    # another loopback address on the same port is another socket (the head binds 127.0.0.1 only)
    await oneshot.activate_worker("127.0.0.2", head.server.port, head.server.address, shard_id=0)
    status = await oneshot.send_control("STATUS", head.server.address)
    assert [(e.address, e.port) for e in status.related_entities] == [("127.0.0.2", head.server.port)]


@pytest.mark.parametrize("via", [["not-a-head-id"], ["0" * 32] * 17, ["a" * 4000]])
async def test_head_ids_a_client_sends_are_checked_before_they_are_passed_on(runtimes, via):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("guarded", connections={0: [worker.server.address]}))
    metadata = tuple((services.VIA_HEAD_METADATA, value) for value in via)
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(services.PROCESS_SINGLE_DATA)(
                DataRequest([Document()], endpoint="/tag").to_bytes(), metadata=metadata, timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 16 head ids of 32 hex digits" in refused.value.details()
    assert worker.executor.calls == 0


async def test_a_head_routed_to_itself_or_round_a_cycle_of_heads_refuses_instead_of_looping(runtimes):
    port = free_port()  # its own address another way: a static connection, before it knows it is its own
    selfish = await runtimes(Head("selfish", ServerConfig(port=port), connections={0: [f"127.0.0.1:{port}"]}))
    first, second = free_port(), free_port()
    await runtimes(Head("a", ServerConfig(port=first), connections={0: [f"127.0.0.1:{second}"]}))
    await runtimes(Head("b", ServerConfig(port=second), connections={0: [f"127.0.0.1:{first}"]}))
    for address in (selfish.server.address, f"127.0.0.1:{first}"):
        with pytest.raises(ReplicaError) as refused:
            await send(address, "/tag", [Document()], timeout=10)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value
        assert "received a request it had forwarded itself" in str(refused.value)


async def test_a_replicas_answer_carrying_a_pickle_is_not_passed_on_under_any(runtimes):
    from conftest import GarbageServer

    class PicklingReplica(GarbageServer):
        answer = DataRequest([Document()], endpoint="/tag").proto
        answer.data.docs_bytes = b"\x80\x04K\x01."  # a pickle: a Jina gateway behind the head would load it
        GARBAGE = answer.SerializeToString()

    replica = await PicklingReplica("pickling").start()
    try:
        head = await runtimes(Head("pickled", connections={0: [replica.address]}))
        async with grpc.aio.insecure_channel(head.server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # ANY: bytes in, bytes out, but read first
                await channel.unary_unary(services.PROCESS_SINGLE_DATA)(
                    DataRequest([Document()], endpoint="/tag").to_bytes(), timeout=10
                )
        assert refused.value.code() == grpc.StatusCode.INTERNAL  # the replica's fault, not the caller's
        assert "docs_bytes" in refused.value.details() and replica.address in refused.value.details()
    finally:
        await replica.stop()


async def test_a_header_endpoint_too_long_to_travel_as_metadata_is_refused_naming_its_length(runtimes):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("long", connections={0: [worker.server.address]}))
    request = DataRequest([Document()], endpoint="/" + "x" * 20_000)  # in the header only, as a Jina client may
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(services.PROCESS_SINGLE_DATA)(request.to_bytes(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 20001 characters; a head forwards at most 1024" in refused.value.details()
    assert worker.executor.calls == 0


async def test_a_deactivate_of_thousands_of_replicas_leaves_the_head_answering(runtimes, tmp_path):
    # each removed replica's channel closes, and grpc.aio's close walks every task of the loop: thousands of
    # closes started at once walked each other, and the head answered nothing for seconds (25 s for 4000)
    worker = await runtimes(Worker(executors.Tagger.create()))
    head = ShardnetProcess(  # a process of its own: a stall of its loop must not stall the caller's clock too
        "head", ["head", "--deployment", "crowded", "--port", "0", "--connection", f"0={worker.server.address}"],
        tmp_path / "head.log",
    )
    head.launch()
    try:
        address = await asyncio.to_thread(head.wait_ready, 30.0)
        requests = {command: ControlRequest(command) for command in ("ACTIVATE", "DEACTIVATE")}
        for shard_id in range(1, 3001):
            for request in requests.values():
                request.add_related_entity(f"w{shard_id}", "127.0.0.1", 7, shard_id=shard_id)  # nothing on 7
        for request in requests.values():
            await oneshot.call_once("control", request, address, timeout=60)
        answer = await send(address, "/tag", [Document()], timeout=3)  # answered while the closes go on
        assert answer.docs[0].tags["by"] == "tagger"
        status = await oneshot.send_control("STATUS", address, timeout=3)
        assert [entity.shard_id for entity in status.related_entities] == [0]
    finally:
        head.stop()


async def test_a_worker_that_stops_renewing_its_lease_is_dropped(runtimes, eventually):
    head = await runtimes(Head("leased", lease=0.6))

    async def members() -> set[tuple[str, int]]:
        status = await oneshot.send_control("STATUS", head.server.address)
        return {(entity.address, entity.port) for entity in status.related_entities}

    await oneshot.activate_worker("127.0.0.1", 40001, head.server.address, shard_id=0)
    await oneshot.activate_worker("127.0.0.1", 40002, head.server.address, shard_id=0)
    loop = asyncio.get_running_loop()
    renew_until = loop.time() + 1.5  # three leases' worth: the renewed one must survive them
    while loop.time() < renew_until:
        await oneshot.activate_worker("127.0.0.1", 40002, head.server.address, shard_id=0)
        await asyncio.sleep(0.1)
    assert await members() == {("127.0.0.1", 40002)}


async def test_a_renewal_or_deactivate_during_an_expiry_pass_is_honoured_and_expiry_goes_on(runtimes, eventually):
    # removals yield to other requests (ReplicaList.remove_connection): a DEACTIVATE of a worker the pass was about
    # to drop killed the expiry task (KeyError), and a renewal arriving mid-pass was undone. The lease is long
    # enough for the pass to end before the renewed one's own runs out on a loaded machine (at 0.5 s, with the
    # pass's 298 removals slowed down, it lapsed in the next pass before the test looked: flaky under load)
    head = await runtimes(Head("leased", lease=2.0))
    replicas = lambda: head.pool.get_replicas("leased", shard_id=0)  # noqa: E731
    activate = ControlRequest("ACTIVATE")
    for n in range(300):
        activate.add_related_entity(f"w{n}", "127.0.0.1", 20000 + n, shard_id=0)
    await oneshot.call_once("control", activate, head.server.address, timeout=30)
    await eventually(lambda: len(replicas().get_all_connections()) < 300, timeout=5.0, interval=0)  # the pass began
    await oneshot.deactivate_worker("127.0.0.1", 20298, head.server.address, shard_id=0)
    await oneshot.activate_worker("127.0.0.1", 20299, head.server.address, shard_id=0)  # a renewal, mid-pass
    await eventually(lambda: len(replicas().get_all_connections()) == 1, timeout=5.0)
    assert replicas().has_connection("127.0.0.1:20299") and not head._expiry.done()
    await eventually(lambda: not replicas().has_connections(), timeout=5.0)  # its own lease runs out in turn


async def test_without_a_lease_a_worker_saying_how_often_it_renews_is_leased_and_one_saying_nothing_is_not(
    runtimes, eventually
):
    """A shardnet worker killed -9 leaves a head that has no --lease; a Jina worker (one ACTIVATE, no renewal
    interval) stays until it says DEACTIVATE, as in Jina."""
    head = await runtimes(Head("implied"))

    async def members() -> set[int]:
        status = await oneshot.send_control("STATUS", head.server.address)
        return {entity.port for entity in status.related_entities}

    await oneshot.activate_worker("127.0.0.1", 40001, head.server.address, shard_id=0)  # as Jina's workers do
    await oneshot.activate_worker("127.0.0.1", 40002, head.server.address, shard_id=0, renews_every=0.1)
    await oneshot.activate_worker("127.0.0.1", 40003, head.server.address, shard_id=0, renews_every=0.1)
    assert await members() == {40001, 40002, 40003}

    async def renewing_one_only() -> bool:  # 40003 renews as it said it would; 40002 "was killed"
        await oneshot.activate_worker("127.0.0.1", 40003, head.server.address, shard_id=0, renews_every=0.1)
        return await members() == {40001, 40003}

    await eventually(renewing_one_only, timeout=5.0, interval=0.05)


async def test_a_head_that_stalls_past_a_lease_does_not_drop_the_workers_it_could_not_hear(runtimes, caplog):
    """The head's loop blocked longer than the lease (CPU starvation, a paused process): the renewals wait in
    its socket, so a lease running out meanwhile says nothing about the worker."""
    head = await runtimes(Head("stalling"))

    async def members() -> set[int]:
        status = await oneshot.send_control("STATUS", head.server.address)
        return {entity.port for entity in status.related_entities}

    for _ in range(3):
        await oneshot.activate_worker("127.0.0.1", 40005, head.server.address, shard_id=0, renews_every=0.1)
    time.sleep(1.5)  # the fault itself: this loop, the head's, blocked for three implied leases (0.5 s)
    await oneshot.activate_worker("127.0.0.1", 40005, head.server.address, shard_id=0, renews_every=0.1)
    assert await members() == {40005}
    assert "stopped renewing" not in caplog.text


async def test_a_head_process_holds_its_workers_answers_to_its_own_message_limit(runtimes, tmp_path):
    worker = await runtimes(Worker(executors.Tagger.create()))  # the worker's own limit is the default 256 MB
    head = ShardnetProcess(
        "head",
        ["head", "--deployment", "sized", "--port", "0", "--max-message-mb", "1",
         "--connection", f"0={worker.server.address}"],
        tmp_path / "head.log",
    )
    head.launch()
    try:
        address = await asyncio.to_thread(head.wait_ready, 30.0)
        request = DataRequest(docs=[Document()], endpoint="/grow", parameters={"bytes": 2 * 2**20})
        with pytest.raises(ReplicaError) as caught:
            await oneshot.send_request_async(request, address, timeout=10.0)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = str(caught.value)
        assert "Received message larger than max" in message and worker.server.address in message
        assert "calling side's own message size limit" in message  # the head's: it was what refused the answer
        request.parameters = {"bytes": 1000}
        assert len((await oneshot.send_request_async(request, address, timeout=10.0)).docs[0].text) == 1000
    finally:
        head.stop()


async def test_an_all_answer_merged_past_the_heads_limit_is_refused_by_name(runtimes):
    workers = await shard_workers(runtimes, executors.Tagger, 2)
    head = await head_over(
        runtimes, "merging", workers, "ALL", config=ServerConfig(max_message_bytes=2**20),
        pool=GrpcConnectionPool(balancer="p2c_ewma"),  # the default limit: each shard's answer reaches the head
    )
    # ...and the merged one would not leave it
    request = DataRequest(docs=[Document()], endpoint="/grow", parameters={"bytes": 1_100_000})
    with pytest.raises(ReplicaError) as caught:
        await oneshot.send_request_async(request, head.server.address, timeout=10.0)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "merging" in str(caught.value) and "--max-message-mb" in str(caught.value)


async def test_all_with_every_shard_failing_names_each_shards_problem(runtimes):
    """Each shard's answer over its worker's limit: the head refused the request naming shard 0 alone (a
    review's find), where one shard failing is answered naming it."""
    workers = [
        await runtimes(Worker(executors.Tagger.create({"shard_id": shard}), ServerConfig(max_message_bytes=2**20)))
        for shard in range(2)
    ]
    head = await head_over(runtimes, "sized", workers, "ALL")
    request = DataRequest(docs=[Document()], endpoint="/grow", parameters={"bytes": 1_100_000})
    with pytest.raises(ReplicaError) as caught:
        await oneshot.send_request_async(request, head.server.address, timeout=10.0)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = str(caught.value)
    assert f"{head.server.address}: RESOURCE_EXHAUSTED: all 2 shards of 'sized' failed (2 RESOURCE_EXHAUSTED): " \
        "shard 0 of 'sized' failed: " in message, message
    for shard, worker in enumerate(workers):
        assert f"shard {shard} of 'sized' failed: deployment 'sized', shard {shard}, replica " \
            f"{worker.server.address}: RESOURCE_EXHAUSTED: " in message, message
    assert message.count("over this worker's max message size of 1048576 bytes") == 2, message


async def test_a_request_over_the_servers_message_limit_says_whose_limit_to_raise(runtimes):
    """Over the calling side's limit the error said which to raise; over the server's, gRPC's words alone (a
    README review's find)."""
    worker = await runtimes(Worker(executors.Tagger.create(), ServerConfig(max_message_bytes=2**20)))
    request = DataRequest(docs=[Document(text="x" * (2 * 2**20))], endpoint="/tag")
    with pytest.raises(ReplicaError) as caught:
        await oneshot.send_request_async(request, worker.server.address, timeout=10.0)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the receiving server's message size limit: raise that worker's or head's --max-message-mb" in str(
        caught.value), caught.value


def test_a_head_made_in_code_dials_its_workers_with_its_own_message_limit():
    head = Head("sized", ServerConfig(max_message_bytes=512 * 2**20))
    options = dict(head.pool.get_default_grpc_options()) | dict(head.pool._options)
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 512 * 2**20


async def test_a_one_off_call_takes_its_own_message_limit(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create()))
    request = DataRequest(docs=[Document()], endpoint="/grow", parameters={"bytes": 2 * 2**20})
    with pytest.raises(ReplicaError, match="calling side's own message size limit"):
        await oneshot.send_request_async(
            request, worker.server.address, timeout=10.0, channel_options=message_size_options(2**20)
        )
    response = await oneshot.send_request_async(request, worker.server.address, timeout=10.0)
    assert len(response.docs[0].text) == 2 * 2**20


async def test_a_worker_renewing_slower_than_the_lease_is_told_so(runtimes, eventually, caplog):
    head = await runtimes(Head("leased", lease=1.0))  # room for the second ACTIVATE on a loaded machine
    await oneshot.activate_worker("127.0.0.1", 40003, head.server.address, shard_id=0)
    await eventually(lambda: "stopped renewing" in caplog.text, timeout=5.0)  # alive, but its interval is longer
    await oneshot.activate_worker("127.0.0.1", 40003, head.server.address, shard_id=0)
    assert "longer than the worker's --register-interval" in caplog.text
    assert "127.0.0.1:40003 (shard 0) registered again" in caplog.text


async def test_a_new_process_registering_after_its_predecessors_lease_ran_out_is_no_stalled_worker(
    runtimes, eventually, caplog
):
    """A worker killed and started again on its address after its lease ran out was logged as one that had
    stalled: the lapse kept no process id to tell the new one by."""
    caplog.set_level(logging.INFO, logger="shardnet.runtimes.head")
    head = await runtimes(Head("restarted", lease=1.0))
    await oneshot.activate_worker("127.0.0.1", 40004, head.server.address, shard_id=0, renews_every=0.2,
                                  instance="a" * 32)
    await eventually(lambda: "stopped renewing" in caplog.text, timeout=5.0)
    assert "requests it hold" not in caplog.text  # it was sent none (the lapse said it held some, every time)
    await oneshot.activate_worker("127.0.0.1", 40004, head.server.address, shard_id=0, renews_every=0.2,
                                  instance="b" * 32)
    assert "127.0.0.1:40004 (shard 0) registered as a new process" in caplog.text
    assert "stalled" not in caplog.text


async def test_a_lease_shorter_than_the_interval_a_worker_announces_is_said_at_once(runtimes, eventually, caplog):
    """A --lease far below the workers' --register-interval made them drop out and come back every interval with
    no word: the lapse was forgotten after one (tiny) lease (found by a first-use review). The head now says so
    at the first ACTIVATE, once, and still names the worker that comes back after its lease ran out."""
    head = await runtimes(Head("leased", lease=0.05))
    for port in (40004, 40005):
        await oneshot.activate_worker("127.0.0.1", port, head.server.address, shard_id=0, renews_every=2.0)
    assert caplog.text.count("--lease 0.05s is not longer than the 2s at which 127.0.0.1:40004 renews") == 1
    assert "40005 renews" not in caplog.text
    await eventually(lambda: "127.0.0.1:40004 (shard 0) stopped renewing" in caplog.text, timeout=5.0)
    await asyncio.sleep(0.2)  # four leases: longer than the head used to remember a lapse
    await oneshot.activate_worker("127.0.0.1", 40004, head.server.address, shard_id=0, renews_every=2.0)
    assert "127.0.0.1:40004 (shard 0) registered again" in caplog.text


@pytest.mark.parametrize("lease", [0, -1, float("nan"), "5"])
def test_a_lease_must_be_positive_seconds(lease):
    with pytest.raises(ConfigurationError, match="lease"):
        Head("leased", lease=lease)

# -- ALL --------------------------------------------------------------------------------------


async def test_all_over_three_shards_merges_by_document_id(runtimes):
    workers = await shard_workers(runtimes, executors.ShardSearch, 3)
    head = await head_over(runtimes, "search", workers, "ALL")
    queries = [Document(id="q1", text="one"), Document(id="q2", text="two")]
    response, trailing = await send_with_trailing(head.server.address, "/search", queries)
    assert not response.is_error
    # the queries once each (matches of every shard concatenated in shard order), then each shard's new document
    assert response.docs.ids == ["q1", "q2", "only-shard-0", "only-shard-1", "only-shard-2"]
    for query in response.docs[:2]:
        assert query.matches.ids == ["match-0", "match-1", "match-2"]
    assert [doc.tags["shard"] for doc in response.docs[2:]] == [0, 1, 2]
    assert "__results__" in response.parameters
    assert trailing["total_shards"] == "3" and trailing["failed_shards"] == "0"
    assert [w.executor.calls for w in workers] == [{"/search": 1}] * 3


@pytest.mark.parametrize("polling", ["ANY", "ALL"])
async def test_search_goes_to_every_shard_and_index_to_one_whatever_the_polling_as_on_a_jina_head(runtimes, polling):
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, polling)
    searched, _ = await send_with_trailing(head.server.address, "/search", [Document(id="q")])
    assert searched.docs.ids == ["q", "only-shard-0", "only-shard-1"]
    await send_with_trailing(head.server.address, "/index", [Document(id="d")])
    assert sum(worker.executor.calls.get("/index", 0) for worker in workers) == 1
    overridden = await head_over(runtimes, "search", workers, '{"/search": "ANY", "*": "ALL"}')
    searched, _ = await send_with_trailing(overridden.server.address, "/search", [Document(id="q")])
    assert len(searched.docs) == 2  # a map that names /search decides it


async def test_all_keeps_every_shards_dict_results_side_by_side(runtimes):
    workers = [
        await runtimes(Worker(executors.Tagger.create({"shard_id": shard}), name=f"count/shard-{shard}/rep-0"))
        for shard in range(3)
    ]
    head = await head_over(runtimes, "count", workers, "ALL")
    response = await send(head.server.address, "/count", [Document(text="a"), Document(text="b")], {"k": "v"})
    assert not response.is_error
    assert response.parameters == {
        "k": "v",
        "__results__": {f"count/shard-{shard}/rep-0": {"docs": 2.0, "shard": float(shard)} for shard in range(3)},
    }


async def test_a_shard_answering_garbage_is_a_failed_shard_named_with_its_replica(runtimes, garbage_server):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(
        Head(
            "mixed",
            polling=PollingMap.parse("ALL"),
            connections={0: [worker.server.address], 1: [garbage_server.address]},
        )
    )
    response, trailing = await send_with_trailing(head.server.address, "/tag", [Document(id="a", text="a")])
    assert response.docs.texts == ["a"] and response.docs[0].tags["by"] == "tagger"  # shard 0's answer is kept
    assert response.is_error
    assert f"shard 1 of 'mixed' failed: deployment 'mixed', shard 1, replica {garbage_server.address}: INTERNAL: " \
        "malformed DataRequest (3 bytes)" in response.status.description
    assert trailing["failed_shards"] == "1"

    alone = await runtimes(
        Head("garbage", polling=PollingMap.parse("ALL"), connections={0: [garbage_server.address]})
    )
    with pytest.raises(ReplicaError) as caught:  # nothing answered: the caller learns who sent what, not INVALID_ARGUMENT
        await send(alone.server.address, "/tag", [Document(text="a")])
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert f"replica {garbage_server.address}: INTERNAL: malformed DataRequest" in str(caught.value)


async def test_all_names_the_shard_that_raised_and_keeps_the_others_answers(runtimes):
    workers = await shard_workers(runtimes, executors.ShardSearch, 3)
    head = await head_over(runtimes, "search", workers, "ALL")
    response, trailing = await send_with_trailing(head.server.address, "/broken", [Document(id="q")])
    assert response.is_error and trailing["failed_shards"] == "0"  # the shard answered: with an error
    assert "shard 1" in response.status.description and "search" in response.status.description
    assert "broken" in response.status.description
    assert response.docs.ids == ["q"]


async def test_when_the_first_shard_raises_the_answer_carries_the_route_of_the_shard_that_worked(runtimes):
    """Jina builds an ALL answer on the first shard that succeeded; the answer had no route at all (a review)."""
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, "ALL")
    response, _ = await send_with_trailing(head.server.address, "/broken-first", [Document(id="q")])
    assert response.is_error and "shard 0 is broken" in response.status.description
    assert [route.executor for route in response.routes] == [workers[1].name.split("/")[0]]


async def test_an_error_answer_the_head_makes_or_its_uses_after_gives_carries_the_is_error_trailer(runtimes):
    """What a Jina gateway stops a flow on: a head's answer for a shard down, or its uses_after's error, came
    without it (found by a review)."""
    [worker] = await shard_workers(runtimes, executors.ShardSearch, 1)
    head = await runtimes(
        Head("search", polling=PollingMap.parse("ALL"), connections={0: [worker.server.address]}, shards=2)
    )
    response, trailing = await send_with_trailing(head.server.address, "/search", [Document(id="q")])
    assert response.is_error and trailing["is-error"] == "true" and trailing["failed_shards"] == "1"

    after = await runtimes(Worker(executors.Tagger.create()))
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, "ALL", uses_after=after.server.address)
    response, trailing = await send_with_trailing(head.server.address, "/fail", [Document(id="q")])
    assert response.is_error and "bad input" in response.status.description  # the uses_after raised
    assert trailing["is-error"] == "true" and trailing["failed_shards"] == "0"


async def test_a_head_in_front_of_a_head_sends_its_own_shard_counts_only(runtimes):
    """The inner head's total_shards and failed_shards came first, beside the outer's (found by a review)."""
    [worker] = await shard_workers(runtimes, executors.ShardSearch, 1)
    inner = await runtimes(
        Head("inner", polling=PollingMap.parse("ALL"), connections={0: [worker.server.address]}, shards=2)
    )
    outer = await runtimes(Head("outer", polling=PollingMap.parse("ALL"), connections={0: [inner.server.address]}))
    response, trailing = await oneshot.call_once(
        "single_data", DataRequest([Document(id="q")], endpoint="/search"), outer.server.address, timeout=10,
        metadata=[("endpoint", "/search")],
    )
    pairs = list(tuple(trailing))
    assert response.is_error  # the inner head's: one of its shards has no worker
    assert [pair for pair in pairs if pair[0] in ("total_shards", "failed_shards")] == [
        ("total_shards", "1"), ("failed_shards", "0"),
    ]
    assert ("is-error", "true") in pairs


async def test_a_header_naming_an_endpoint_is_kept_and_run_while_the_metadata_chooses_the_polling(runtimes):
    """As through a Jina head: header /index, metadata /search polls ALL (as /search) and runs /index on every
    shard; the head wrote /search into the header, and /search ran instead (found by a review)."""
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, "ANY")  # Jina's defaults: /search ALL, /index ANY
    response, trailing = await oneshot.call_once(
        "single_data", DataRequest([Document(id="q")], endpoint="/index"), head.server.address, timeout=10,
        metadata=[("endpoint", "/search")],
    )
    assert response.endpoint == "/index" and dict(tuple(trailing))["total_shards"] == "2"
    assert [worker.executor.calls for worker in workers] == [{"/index": 1}, {"/index": 1}]
    assert response.docs[0].matches.ids == []


async def test_all_with_a_shard_without_replica_fails_fast_naming_deployment_and_shard(runtimes):
    [worker] = await shard_workers(runtimes, executors.ShardSearch, 1)
    head = await runtimes(
        Head("search", polling=PollingMap.parse("ALL"), connections={0: [worker.server.address]}, shards=2)
    )
    response, trailing = await asyncio.wait_for(
        send_with_trailing(head.server.address, "/search", [Document(id="q")]), 5
    )
    assert response.is_error
    description = response.status.description
    assert "'search'" in description and "shard 1" in description
    assert response.docs[0].matches.ids == ["match-0"]  # shard 0's answer is still there
    assert trailing["total_shards"] == "2" and trailing["failed_shards"] == "1"


async def test_json_polling_map_chooses_all_or_any_per_endpoint(runtimes):
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, '{"/search": "ALL", "*": "ANY"}')
    searched = await send(head.server.address, "/search", [Document(id="q")])
    assert searched.docs[0].matches.ids == ["match-0", "match-1"]
    for _ in range(4):
        indexed = await send(head.server.address, "/index", [Document(id="d")])
        assert indexed.docs.ids == ["d"]  # one shard answered: no merge
    index_calls = [w.executor.calls.get("/index", 0) for w in workers]
    assert sum(index_calls) == 4 and all(index_calls), f"ANY should spread over the shards: {index_calls}"
    assert [w.executor.calls["/search"] for w in workers] == [1, 1]


# -- uses_before / uses_after -----------------------------------------------------------------


async def test_uses_before_and_uses_after_see_every_request(runtimes):
    before = await runtimes(Worker(executors.CountingBefore.create()))
    after = await runtimes(Worker(executors.CountingAfter.create()))
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(
        runtimes,
        "search",
        workers,
        "ALL",
        uses_before=before.server.address,
        uses_after=after.server.address,
    )
    for sent in range(1, 6):
        [merged] = (await send(head.server.address, "/search", [Document(id="q")])).docs
        assert merged.id == "after" and merged.tags["after_calls"] == sent
        assert merged.tags["before_calls"] == sent  # the shards got what uses_before made
        # one column per shard: the query plus that shard's own document, in shard order
        assert merged.tags["matrix"] == [2, 2]
        assert merged.text == "q,only-shard-0,q,only-shard-1"
    assert before.executor.calls == 5 and after.executor.calls == 5
    assert [w.executor.calls["/search"] for w in workers] == [5, 5]


async def test_a_shard_that_takes_the_callers_time_is_named_and_uses_after_is_not_sent_it_too_late(runtimes, eventually):
    """Under ALL with uses_after, a shard slower than the caller's deadline: the head sent uses_after the other
    shard's answer with no time left, which it ran once the caller had given up, and the caller's error named
    uses_after, the hop that took no time (a review). The slow shard's failure is what the caller gets."""
    after = await runtimes(Worker(executors.CountingAfter.create()))
    fast = await runtimes(Worker(executors.Tagger.create({"shard_id": 0})))
    slow = await runtimes(Worker(executors.Sleepy.create({"shard_id": 1})))
    head = await head_over(runtimes, "slowish", [fast, slow], "ALL", uses_after=after.server.address)
    failure = None
    try:
        answer = await send(head.server.address, "/sleep", [Document()], parameters={"seconds": 3}, timeout=1.0)
        assert answer.is_error
        failure = answer.status.description
    except ReplicaError as exc:
        failure = str(exc)
    assert "shard 1" in failure and "DEADLINE_EXCEEDED" in failure and "uses_after" not in failure, failure
    await eventually(lambda: slow.executor.cancelled == 1, timeout=5.0)  # the head gave up on it
    assert after.executor.calls == 0


async def test_uses_after_takes_every_shards_answer_of_large_documents(runtimes):
    """A list's bound once summed each request's bound on its documents: two shards answering with a 300 KB
    query were refused as "too many documents" at the uses_after (found by a review)."""
    after = await runtimes(Worker(executors.CountingAfter.create()))
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, "ALL", uses_after=after.server.address)
    response = await send(head.server.address, "/search", [Document(id="q", text="x" * 300_000)])
    assert not response.is_error, response.status.description
    assert after.executor.calls == 1 and response.docs[0].tags["matrix"] == [2, 2]


async def test_uses_after_under_any_gets_one_shards_answer_and_the_shards_take_turns(runtimes):
    after = await runtimes(Worker(executors.CountingAfter.create()))
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(
        runtimes,
        "index",
        workers,
        '{"/search": "ALL", "*": "ANY"}',
        uses_after=after.server.address,
    )
    seen_shards = []
    for _ in range(4):
        response, trailing = await send_with_trailing(head.server.address, "/index", [Document(id="d")])
        [merged] = response.docs
        assert merged.text == "d" and merged.tags["matrix"] == [1]  # one request reached uses_after: a one-column matrix
        assert trailing["total_shards"] == "1"
        seen_shards.append(merged.tags["shards"])
    assert [w.executor.calls.get("/index", 0) for w in workers] == [2, 2]  # each document written once, in turn
    assert sorted(seen_shards) == [[0], [0], [1], [1]]


async def test_uses_after_under_all_receives_every_shards_dict_results(runtimes):
    after = await runtimes(Worker(executors.Tagger.create(), name="count/uses_after"))
    workers = [
        await runtimes(Worker(executors.Tagger.create({"shard_id": shard}), name=f"count/shard-{shard}/rep-0"))
        for shard in range(2)
    ]
    head = await head_over(runtimes, "count", workers, "ALL", uses_after=after.server.address)
    response = await send(head.server.address, "/count", [Document(text="a")])
    assert not response.is_error
    assert response.parameters["__results__"] == {
        "count/shard-0/rep-0": {"docs": 1.0, "shard": 0.0},
        "count/shard-1/rep-0": {"docs": 1.0, "shard": 1.0},
        "count/uses_after": {"docs": 2.0, "shard": 0.0},  # uses_after saw both shards' copies of the document
    }


async def test_an_any_request_resent_to_another_shard_whose_uses_after_fails_names_uses_after(
    runtimes, dead_address, caplog
):
    """Shard 0 took it nowhere, shard 1 ran it, uses_after failed: the answer said "sent on to shard 1, which failed
    too", and the failure was counted against shard 0, though shard 1 answered and uses_after failed (a review)."""
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("resent", connections={0: [dead_address], 1: [worker.server.address]},
                               uses_after=f"127.0.0.1:{free_port()}"))
    answer = await send(head.server.address, "/tag", [Document(text="a")])
    said = answer.status.description
    assert answer.is_error and "a replica may have run it" in said, said
    assert said.startswith("UNAVAILABLE: deployment 'resent/uses_after'") and "after shard 1 answered" in said, said
    assert "which failed too" not in said, said
    assert worker.executor.calls == 1


def test_a_static_connection_beyond_the_declared_shards_is_refused():
    with pytest.raises(ConfigurationError, match=r"shard 5, but the head has shards 0\.\.1"):
        Head("x", connections={5: ["127.0.0.1:5000"]}, shards=2)


@pytest.mark.parametrize("role", ["uses_before", "uses_after"])
async def test_a_uses_before_or_after_answering_garbage_is_named_not_blamed_on_the_caller(runtimes, garbage_server, role):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("wrapped", connections={0: [worker.server.address]}, **{role: garbage_server.address}))
    with pytest.raises(ReplicaError) as caught:
        await send(head.server.address, "/tag", [Document(text="a")])
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert f"replica {garbage_server.address}: malformed DataRequest (3 bytes)" in str(caught.value)


@pytest.mark.parametrize("role", ["uses_before", "uses_after"])
async def test_a_dead_uses_before_or_after_is_named(runtimes, dead_address, role):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("wrapped", connections={0: [worker.server.address]}, **{role: dead_address}))
    # nothing ran it before a dead uses_before: safe to retry; the shard did before a dead uses_after: answered
    # ERROR, as an Executor's failure is, so that no caller sends it again
    if role == "uses_before":
        with pytest.raises(ReplicaError) as caught:
            await send(head.server.address, "/tag", [Document(text="a")])
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        said = str(caught.value)
    else:
        answer = await send(head.server.address, "/tag", [Document(text="a")])
        assert answer.is_error and "a replica may have run it" in answer.status.description, answer.status
        said = answer.status.description
    assert f"'wrapped/{role}'" in said and dead_address in said


async def test_a_dead_replica_beside_a_live_one_is_failed_over_and_a_dead_shard_is_named(runtimes, dead_address):
    [live] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await head_over(runtimes, "halfdead", [live], "ANY")
    head.pool.add_connection("halfdead", dead_address, shard_id=0)
    for _ in range(4):  # whichever replica the balancer picks first, the answer comes from the live one
        [doc] = (await send(head.server.address, "/tag", [Document(text="a")])).docs
        assert doc.tags["by"] == "tagger"
    head.pool.add_connection("halfdead", dead_address, shard_id=1)  # a second shard whose only replica is dead
    head.polling = PollingMap.parse("ALL")
    response, trailing = await send_with_trailing(head.server.address, "/tag", [Document(text="b")])
    assert response.is_error and "shard 1" in response.status.description and dead_address in response.status.description
    assert dict(trailing)["failed_shards"] == "1"


# -- forwarding on the wire ------------------------------------------------------------------


async def test_any_forwards_the_request_bytes_and_sets_endpoint_in_header_and_metadata(runtimes, echo_servers):
    [echo] = await echo_servers(1)
    head = await runtimes(Head("echoes", connections={0: [echo.address]}))
    doc = Document(text="opaque")
    doc.proto.location.extend([3.0])  # not modelled by shardnet: must survive
    request = DataRequest([doc], endpoint="/index")
    payload = request.to_bytes()
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        reply = await channel.unary_unary(services.PROCESS_SINGLE_DATA)(
            payload, metadata=(("endpoint", "/index"),), timeout=10
        )
    assert reply == payload
    assert echo.received_metadata[-1]["endpoint"] == "/index"

    # endpoint only in the metadata: the head writes it into the header too (Jina workers route on the header)
    bare = DataRequest([Document(text="b")])
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        reply = await channel.unary_unary(services.PROCESS_SINGLE_DATA)(
            bare.to_bytes(), metadata=(("endpoint", "/search"),), timeout=10
        )
    forwarded = DataRequest.from_bytes(reply)
    assert forwarded.endpoint == "/search" and forwarded.docs.texts == ["b"]
    assert echo.received_metadata[-1]["endpoint"] == "/search"


async def test_head_forwards_endpoint_discovery_which_is_no_request_of_the_retry_budgets(runtimes):
    """A monitor listing endpoints every second (`shardnet status` does) counted as requests, one per shard
    asked, and raised the retries data requests were allowed (a regression review)."""
    workers = await shard_workers(runtimes, executors.Tagger, 2)
    head = await head_over(runtimes, "tagging", workers, "ANY")
    for _ in range(3):
        reply, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=5)
        assert "/tag" in reply.endpoints
    assert head.pool.retry_budget.total_requests == 0


async def test_endpoint_discovery_lists_uses_before_and_uses_after_endpoints_too_as_jinas_head(runtimes):
    """A client checking an endpoint against the list (``shardnet send`` warns, a Jina gateway may skip) was told
    uses_before's own endpoints were not served, though the head routes them."""
    before = await runtimes(Worker(executors.Tagger.create()))
    after = await runtimes(Worker(executors.CountingAfter.create()))
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(runtimes, "search", workers, "ALL", uses_before=before.server.address,
                           uses_after=after.server.address)
    reply, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=5)
    endpoints = list(reply.endpoints)
    assert {"/search", "/index", "/tag", "/fail", "/default"} <= set(endpoints)
    assert len(endpoints) == len(set(endpoints)) and endpoints[-1] == "_jina_dry_run_"

    await before.stop(0)  # a uses_before that does not answer: said, not left out of the list
    with pytest.raises(ReplicaError, match=r"endpoint discovery of search/uses_before") as failed:
        await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=5)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and before.server.address in str(failed.value)


async def test_stock_grpc_client_sees_the_heads_health_and_reflection(runtimes):
    head = await runtimes(Head("plain"))
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = set()
        async for response in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        ):
            listed |= {service.name for service in response.list_services_response.service}
    assert {"jina.JinaSingleDataRequestRPC", "jina.JinaDataRequestRPC", "jina.JinaControlRequestRPC"} <= listed
    # as a Jina server lists them: Jina's pools make a stub for each service listed, and had none for Health
    assert "grpc.health.v1.Health" not in listed


# -- control token ------------------------------------------------------------------------------


async def test_control_token_refuses_strangers_and_accepts_the_right_token(runtimes):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("guarded", ServerConfig(control_token="s3cret")))
    host, port = worker.server.address.rsplit(":", 1)
    for token, why in ((None, "needs the control token"), ("wrong", "the control token given does not match"),
                       ("s3cret-and-more", "the control token given does not match")):
        with pytest.raises(ReplicaError) as caught:
            await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, token=token)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert why in str(caught.value) and "s3cret" not in str(caught.value)
        assert "SHARDNET_CONTROL_TOKEN or --control-token-file" in str(caught.value)  # how to give one
    status = await oneshot.send_control("STATUS", head.server.address)  # STATUS needs no token
    assert status.related_entities == []
    with pytest.raises(ReplicaError):
        await send(head.server.address, "/tag", [Document()], timeout=5)

    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, token="s3cret")
    assert (await send(head.server.address, "/tag", [Document()])).docs[0].tags["by"] == "tagger"
    with pytest.raises(ReplicaError) as caught:
        await oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=0)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert len((await oneshot.send_control("STATUS", head.server.address)).related_entities) == 1


async def test_control_token_from_the_environment_of_a_head_process(tmp_path, runtimes):
    """SHARDNET_CONTROL_TOKEN set in the child's environment only; this process's environment stays as it is."""
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    host, port = worker.server.address.rsplit(":", 1)
    env = {**os.environ, "SHARDNET_CONTROL_TOKEN": "from-env"}
    head = ShardnetProcess("head", ["head", "--deployment", "envguard", "--port", "0"], tmp_path / "head.log", env=env)
    head.launch()
    try:
        address = await asyncio.to_thread(head.wait_ready, 20)
        with pytest.raises(ReplicaError) as caught:
            await oneshot.activate_worker(host, int(port), address, shard_id=0, token="guess")
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        await oneshot.activate_worker(host, int(port), address, shard_id=0, token="from-env")
        assert (await send(address, "/tag", [Document()])).docs[0].tags["by"] == "tagger"
    finally:
        head.kill()


async def test_uses_after_response_still_names_a_failed_shard(runtimes):
    after = await runtimes(Worker(executors.CountingAfter.create()))
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    head = await head_over(
        runtimes,
        "search",
        workers,
        "ALL",
        uses_after=after.server.address,
        shards=3,  # shard 2 has no replica
    )
    response, trailing = await send_with_trailing(head.server.address, "/broken", [Document(id="q")])
    assert trailing["total_shards"] == "3" and trailing["failed_shards"] == "1"
    assert after.executor.calls == 1  # uses_after still merged what the shards answered
    assert response.is_error
    description = response.status.description
    assert "shard 1" in description and "broken" in description  # answered with an error
    assert "shard 2" in description and "'search'" in description  # had no replica


# -- admission -------------------------------------------------------------------------------------------------


async def test_a_head_past_its_max_in_flight_refuses_at_once_and_health_still_answers(runtimes, eventually):
    worker = await runtimes(Worker(executors.Sleepy.create()))
    head = await runtimes(Head("dep", connections={0: [worker.server.address]}, max_in_flight=3))
    slow = [asyncio.ensure_future(send(head.server.address, "/sleep", [Document(text=f"slow-{index}")],
                                       parameters={"seconds": 1})) for index in range(3)]
    await eventually(lambda: head._in_flight == 3)
    with pytest.raises(ReplicaError) as caught:
        await send(head.server.address, "/sleep", [Document(text="one too many")], timeout=5)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 requests in flight already, as many as it takes (--max-in-flight)" in str(caught.value)
    async with grpc.aio.insecure_channel(head.server.address) as channel:  # health is no data request: it answers
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    answers = await asyncio.gather(*slow)
    assert [answer.docs[0].text for answer in answers] == [f"slow-{index}" for index in range(3)]
    # a call counts until gRPC's done callback for it runs, once its answer is out: maybe after the client has it
    await eventually(lambda: head._in_flight == 0)
    assert (await send(head.server.address, "/sleep", [Document(text="room again")])).docs[0].text == "room again"


class _NonReadingClient:
    """A raw HTTP/2 client that never reads an answer's bytes: it opens with a flow-control window of 0, so gRPC
    can send headers but no message, and it answers SETTINGS and PINGs, so keepalive never cuts it. What a
    client that stopped reading looks like to a server (no gRPC client lets its window be shut at will)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self.answered: set[int] = set()  # streams whose response headers came: their handler has returned
        self._reading = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, address: str) -> "_NonReadingClient":
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, (4).to_bytes(2, "big") + bytes(4)))
        return cls(reader, writer)

    def send(self, stream_id: int, path: str, payload: bytes) -> None:
        headers = b"".join(
            _literal(name, value) for name, value in (
                (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "shardnet"),
                ("content-type", "application/grpc"), ("te", "trailers"),
            )
        )
        message = b"\x00" + len(payload).to_bytes(4, "big") + payload
        self._writer.write(_frame(1, 4, stream_id, headers) + _frame(0, 1, stream_id, message))

    async def _read(self) -> None:
        while True:
            head = await self._reader.readexactly(9)
            kind, flags, stream_id = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            body = await self._reader.readexactly(int.from_bytes(head[:3], "big"))
            if kind == 1:
                self.answered.add(stream_id)
            elif kind == 4 and not flags & 1:
                self._writer.write(_frame(4, 1, 0))
            elif kind == 6 and not flags & 1:
                self._writer.write(_frame(6, 1, 0, body))

    async def close(self) -> None:
        self._reading.cancel()
        self._writer.close()
        await asyncio.gather(self._reading, self._writer.wait_closed(), return_exceptions=True)


def _frame(kind: int, flags: int, stream_id: int, body: bytes = b"") -> bytes:
    return len(body).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + body


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field, not indexed, with a short name and value."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


async def test_max_in_flight_counts_an_answer_its_caller_does_not_read_until_it_is_out(runtimes, eventually):
    """A client that sends and never reads made the head hold every answer (gRPC keeps it until it is written)
    while the limit, counting a request only until its handler returned, refused none: memory without bound."""
    worker = await runtimes(Worker(executors.Sleepy.create()))
    head = await runtimes(Head("dep", connections={0: [worker.server.address]}, max_in_flight=2))
    stalled = await _NonReadingClient.connect(head.server.address)
    try:
        big = DataRequest([Document(text="q")], endpoint="/big", parameters={"bytes": 256 * 1024}).to_bytes()
        for stream_id in (1, 3):
            stalled.send(stream_id, services.PROCESS_SINGLE_DATA, big)
        await eventually(lambda: stalled.answered == {1, 3})  # both handled: their answers wait to be read
        assert head._in_flight == 2
        with pytest.raises(ReplicaError) as caught:
            await send(head.server.address, "/sleep", [Document(text="one too many")], timeout=5)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "head of 'dep': 2 requests in flight already, as many as it takes (--max-in-flight)" in str(caught.value)
    finally:
        await stalled.close()
    await eventually(lambda: head._in_flight == 0)  # the connection gone, its calls ended
    assert (await send(head.server.address, "/sleep", [Document(text="room again")])).docs[0].text == "room again"


async def test_max_in_flight_counts_each_request_of_a_call_stream_until_its_answer_not_the_streams_end(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create()))
    head = await runtimes(Head("dep", connections={0: [worker.server.address]}, max_in_flight=1))
    requests = [DataRequest([Document(text=f"doc-{index}")], endpoint="/tag") for index in range(4)]
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        call = channel.stream_stream(services.STREAM_CALL)(iter([request.to_bytes() for request in requests]), timeout=10)
        answers = [DataRequest.from_bytes(answer) async for answer in call]
    assert [answer.is_error for answer in answers] == [False] * 4
    assert [answer.docs[0].text for answer in answers] == [f"doc-{index}" for index in range(4)]
    assert head._in_flight == 0


def test_max_in_flight_must_be_a_whole_number_from_one():
    from shardnet import Deployment

    for bad in (0, 2.5, True, "8"):
        with pytest.raises(ConfigurationError, match="max_in_flight must be a whole number of at least 1"):
            Head("dep", max_in_flight=bad)
        with pytest.raises(ConfigurationError, match="max_in_flight must be a whole number of at least 1"):
            Deployment(executors.Tagger, max_in_flight=bad)
    assert Deployment(executors.Tagger, max_in_flight=64)._head_options[-2:] == ["--max-in-flight", "64"]


async def test_a_control_request_naming_too_many_workers_is_refused_whole(runtimes):
    # each named worker costs the head a channel and some 10 KB: 30,000 in one ACTIVATE held its loop for seconds
    from shardnet.runtimes.head import MAX_CONTROL_ENTITIES

    head = await runtimes(Head("capped"))
    request = ControlRequest("ACTIVATE")
    for n in range(MAX_CONTROL_ENTITIES + 1):
        request.add_related_entity(f"w{n}", "127.0.0.1", 1 + n, shard_id=0)
    with pytest.raises(ReplicaError) as refused:
        await oneshot.call_once("control", request, head.server.address, timeout=30)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"names {MAX_CONTROL_ENTITIES + 1} workers, a head takes at most {MAX_CONTROL_ENTITIES}" in str(refused.value)
    status = await oneshot.send_control("STATUS", head.server.address, timeout=5)
    assert list(status.related_entities) == []


async def test_workers_activated_one_by_one_stop_at_the_heads_cap_and_known_ones_still_renew(runtimes):
    """Each ACTIVATE may name 10,000 workers; without a cap over all of them, many small ones added up to
    what one may not name (a channel and some 10 KB each)."""
    head = await runtimes(Head("capped", max_workers=2))
    await oneshot.activate_worker("127.0.0.1", 40001, head.server.address, shard_id=0)
    await oneshot.activate_worker("127.0.0.1", 40002, head.server.address, shard_id=1)
    await oneshot.activate_worker("127.0.0.1", 40001, head.server.address, shard_id=0)  # a renewal: not new
    with pytest.raises(ReplicaError) as refused:
        await oneshot.activate_worker("127.0.0.1", 40003, head.server.address, shard_id=0)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "head of 'capped' holds 2 workers and takes at most 2; this one would add 1" in str(refused.value)
    status = await oneshot.send_control("STATUS", head.server.address, timeout=5)
    assert sorted(entity.port for entity in status.related_entities) == [40001, 40002]
    with pytest.raises(ConfigurationError, match="max_workers"):
        Head("capped", max_workers=0)
    with pytest.raises(ConfigurationError, match="3 static connections, over max_workers=2"):
        Head("capped", max_workers=2, connections={0: ["127.0.0.1:1", "127.0.0.1:2"], 1: ["127.0.0.1:3"]})


async def test_a_head_at_its_cap_still_takes_renewals_and_counts_a_worker_once_however_it_is_spelt(runtimes):
    head = await runtimes(Head("full", max_workers=2, connections={0: ["127.0.0.1:40001", "127.0.0.1:40002"]}))
    await oneshot.activate_worker("127.0.0.1", 40001, head.server.address, shard_id=0)  # known: adds none
    crowded = await runtimes(Head("one", max_workers=1))
    request = ControlRequest("ACTIVATE")
    request.add_related_entity("a", "127.0.0.1", 40005, shard_id=0)
    request.add_related_entity("b", "grpc://127.0.0.1", 40005, shard_id=0)  # the same worker: one connection
    await oneshot.call_once("control", request, crowded.server.address, timeout=10)
    status = await oneshot.send_control("STATUS", crowded.server.address, timeout=5)
    assert [entity.port for entity in status.related_entities] == [40005]


async def test_a_worker_cannot_lease_itself_for_ever(runtimes):
    from shardnet.runtimes.head import IMPLIED_LEASE_FACTOR, MAX_RENEWAL_INTERVAL

    head = await runtimes(Head("leased"))
    await oneshot.activate_worker("127.0.0.1", 40001, head.server.address, shard_id=0, renews_every=1e9)
    assert head._registrations.leased(("127.0.0.1:40001", 0)) == IMPLIED_LEASE_FACTOR * MAX_RENEWAL_INTERVAL


async def test_a_dry_run_reaches_every_shard_and_says_which_did_not_answer(runtimes, caplog):
    """jina.JinaGatewayDryRunRPC/dry_run, what Client.is_flow_ready() asks: SUCCESS when every shard answered
    the dry run (no handler runs), else ERROR naming the shard. A readiness check is no request failed: it is not
    counted in the head's log of failed requests (each probe of a head with a shard down was one, found by a
    review)."""
    caplog.set_level(logging.WARNING)
    workers = await shard_workers(runtimes, executors.ShardSearch, 2)
    full = await head_over(runtimes, "search", workers, "ANY")
    partial = await runtimes(Head("search", connections={0: [workers[0].server.address]}, shards=2))
    async with grpc.aio.insecure_channel(full.server.address) as channel:
        ready = await channel.unary_unary(services.DRY_RUN)(b"", timeout=5)
    async with grpc.aio.insecure_channel(partial.server.address) as channel:
        not_ready = await channel.unary_unary(services.DRY_RUN)(b"", timeout=5)
    assert jina_pb2.StatusProto.FromString(ready).code == jina_pb2.StatusProto.SUCCESS
    status = jina_pb2.StatusProto.FromString(not_ready)
    assert status.code == jina_pb2.StatusProto.ERROR and "shard 1" in status.description, status
    assert all(worker.executor.calls == {} for worker in workers)  # the dry run ran no handler
    assert "failed (" not in caplog.text, caplog.text


async def test_a_dry_run_without_a_deadline_gives_up_on_a_hung_shard(runtimes, echo_servers, monkeypatch):
    import shardnet.runtimes.head as head_module

    monkeypatch.setattr(head_module, "DISCOVERY_TIMEOUT", 0.3)  # the bound a caller without a deadline gets
    [hung] = await echo_servers(1, delay=30)
    head = await runtimes(Head("hung", connections={0: [hung.address]}))
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        answer = await asyncio.wait_for(channel.unary_unary(services.DRY_RUN)(b""), 10)  # no gRPC deadline
    status = jina_pb2.StatusProto.FromString(answer)
    assert status.code == jina_pb2.StatusProto.ERROR and "DEADLINE_EXCEEDED" in status.description, status


@pytest.mark.parametrize("role", ["uses_before", "uses_after"])
async def test_a_dry_run_goes_through_the_hops_refuses_a_payload_and_never_fails_over(runtimes, dead_address, role):
    """uses_after too: the dry run reaches it through the shards' gathering, which failed it over (a review)."""
    [worker] = await shard_workers(runtimes, executors.ShardSearch, 1)
    head = await runtimes(Head("before", connections={0: [worker.server.address]}, **{role: dead_address}))
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        dry_run = channel.unary_unary(services.DRY_RUN)
        status = jina_pb2.StatusProto.FromString(await dry_run(b"", timeout=5))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dry_run(b"not an Empty message", timeout=5)
    assert status.code == jina_pb2.StatusProto.ERROR and role in status.description, status
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert head.pool.retry_budget.total_retries == 0  # a readiness check spends none of the requests' budget


# -- draining ---------------------------------------------------------------------------------


async def test_a_draining_head_refuses_new_calls_in_band_until_its_own_are_done(runtimes, eventually):
    """A draining head refuses new calls (UNAVAILABLE, "the server is stopping: send elsewhere": none ran, and
    pools send them elsewhere) while its calls in flight finish, then stops. A stock client balancing round
    robin over two heads, as behind a headless Service, sees no error when it retries UNAVAILABLE (a gRPC
    retry policy), and nothing but those refusals when it does not, until the head has stopped and its GOAWAY
    moved it. (A head stopped at once, as gRPC does, which cancelled the calls it had taken and not yet
    picked up: CANCELLED, which no pool sends again.)"""
    blocking = executors.Blocking.create()
    worker = await runtimes(Worker(blocking, threads=2))
    heads = [await head_over(runtimes, "pair", [worker], "ANY") for _ in range(2)]
    draining_head, other = heads
    body = DataRequest([Document()], endpoint="/fast").to_bytes()
    targets = f"ipv4:{','.join(head.server.address for head in heads)}"
    retry_unavailable = json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{}], "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.05s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }}],
    })
    async with grpc.aio.insecure_channel(targets, options=[("grpc.service_config", retry_unavailable)]) as retrying, \
            grpc.aio.insecure_channel(
                targets, options=[("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 0)]
            ) as plain:
        retried = retrying.unary_unary(services.PROCESS_SINGLE_DATA)
        once = plain.unary_unary(services.PROCESS_SINGLE_DATA)

        async def outcomes(call, times: int) -> list[str]:
            seen = []
            for _ in range(times):
                try:
                    answer = DataRequest.from_bytes(await call(body, metadata=(("endpoint", "/fast"),), timeout=5))
                    seen.append("ERROR" if answer.is_error else "ok")
                except grpc.aio.AioRpcError as exc:
                    seen.append(f"{exc.code().name}: {exc.details()}")
            return seen

        assert await outcomes(retried, 4) == await outcomes(once, 4) == ["ok"] * 4  # both heads serving
        in_flight = asyncio.ensure_future(
            oneshot.send_request_async(DataRequest([Document()], endpoint="/block"), draining_head.server.address,
                                       timeout=20)
        )
        try:
            assert await asyncio.to_thread(blocking.entered.wait, 10)
            stopping = asyncio.ensure_future(draining_head.stop(20))
            await eventually(lambda: draining_head.server.draining, timeout=5)
            assert await outcomes(retried, 20) == ["ok"] * 20
            refusal = f"UNAVAILABLE: {services.DRAINING_DETAILS}"
            seen = await outcomes(once, 20)
            assert set(seen) == {"ok", refusal}, seen  # round robin: every other call went to the draining head
            assert not in_flight.done() and not stopping.done()
        finally:
            blocking.release.set()
        response = await in_flight
        assert not response.is_error and response.docs.texts == ["unblocked"]  # its call finished within the grace
        await asyncio.wait_for(stopping, 10)
        assert await outcomes(once, 10) == ["ok"] * 10  # its GOAWAY moved the client to the other head


class _Load:
    """Callers sending short /sleep requests to deployment "front" through a pool, counting what comes back."""

    def __init__(self, pool: GrpcConnectionPool):
        self.pool = pool
        self.answered = 0
        self.failures: list[str] = []
        self.calling = True

    async def caller(self) -> None:
        while self.calling:
            request = DataRequest([Document()], endpoint="/sleep", parameters={"seconds": 0.01})
            try:
                [task] = self.pool.send_request(request, "front", timeout=20)
                response, _ = await task
            except ReplicaError as exc:
                self.failures.append(f"{exc.code.name if exc.code else None}: {exc}")
                continue
            if response.is_error:
                self.failures.append(f"ERROR: {response.status.description}")
            else:
                self.answered += 1


@contextlib.asynccontextmanager
async def _under_load(pool: GrpcConnectionPool, eventually, callers: int = 200):
    """200 callers through ``pool``: the body runs once 400 calls were answered, and 400 more must be after it."""
    load = _Load(pool)
    tasks = [asyncio.ensure_future(load.caller()) for _ in range(callers)]
    try:
        await eventually(lambda: load.answered >= 400, timeout=20)
        yield load
        then = load.answered
        await eventually(lambda: load.answered >= then + 400, timeout=20)
    finally:
        load.calling = False
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_a_head_drained_under_load_fails_no_caller_while_a_second_head_serves(runtimes, pool, eventually):
    """Two heads before the same two workers, called through a pool by 200 callers at once, one head drained
    under that load (a rolling restart): every call is answered, by one head or the other. The head stopped
    as gRPC does, at once, which cancelled the calls gRPC had taken and its loop not picked up yet: their
    callers read CANCELLED (never run, and sent again by no pool: some 80 of 1,100 calls here, 141 of
    7,182 at 256 callers across processes). It now refuses calls in-band while its own finish (pools send those elsewhere at once), and
    stops once they are done and no more come."""
    workers = [await runtimes(Worker(executors.Sleepy.create())) for _ in range(2)]
    connections = {0: [worker.server.address for worker in workers]}
    drained, other = [await runtimes(Head("front", connections=connections)) for _ in range(2)]
    for head in (drained, other):
        pool.add_connection("front", head.server.address)
    async with _under_load(pool, eventually) as load:  # both heads busy; the other takes it all after
        started = time.monotonic()
        await asyncio.wait_for(drained.stop(10), 15)
        stopped_after = time.monotonic() - started
    assert not load.failures, f"{len(load.failures)} of {len(load.failures) + load.answered} calls failed: " \
        f"{load.failures[:3]}"
    assert stopped_after < 5  # once its calls were done and no more came, not at the grace's end


async def test_a_worker_drained_under_load_while_its_head_still_sends_to_it_fails_no_caller(runtimes, pool, eventually):
    """A head with a fixed list of two workers (as one whose Kubernetes watch is behind, or whose worker restarts
    in its container) keeps sending to the one that drains, under 200 callers: every call is answered. The worker
    closed its port as soon as its own calls were done, and gRPC's stop() cancelled the calls it had taken and not
    handed over yet: the head read CANCELLED, which it does not send again (a review lost 2-3 calls in 2 of 9 runs
    across processes). It now waits, as a head does, until calls have stopped coming (each refused in-band, which
    the head sends to the other worker). In one process the race did not show without the fix, in 7 runs: this
    guards the whole path (unary, as a Jina head calls workers) against coming back worse."""
    drained, other = [await runtimes(Worker(executors.Sleepy.create())) for _ in range(2)]
    addresses = [drained.server.address, other.server.address]
    head = await runtimes(Head("front", connections={0: addresses}, request_streams=False))
    pool.add_connection("front", head.server.address)
    async with _under_load(pool, eventually) as load:  # both workers busy; the other takes it all after
        await asyncio.wait_for(drained.stop(10), 15)
    assert not load.failures, f"{len(load.failures)} of {len(load.failures) + load.answered} calls failed: " \
        f"{load.failures[:3]}"


async def test_endpoint_discovery_round_a_cycle_of_heads_is_refused_at_once(runtimes):
    """Head A's only replica is head B and B's is A: one endpoint discovery became thousands of calls between
    them until the caller's deadline (found by a head review); data requests were refused already."""
    first = await runtimes(Head("cycle"))
    second = await runtimes(Head("cycle", connections={0: [first.server.address]}))
    first.pool.add_connection("cycle", second.server.address)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ReplicaError) as caught:
        await oneshot.call_once("discovery", empty_pb2.Empty(), first.server.address, timeout=10)
    assert asyncio.get_running_loop().time() - started < 3
    assert "cycle of heads" in str(caught.value), caught.value


async def test_endpoint_discovery_asks_every_shard_at_once_so_a_hung_one_takes_no_time_of_the_others(runtimes):
    """Shards were asked in turn, each given the whole time: a hung shard 0 made a caller wait 5 s for what
    shard 1 answers at once, or fail when its deadline was shorter (found by a head review)."""
    async def never(payload, context):
        await asyncio.sleep(30)

    async with serving(services.ENDPOINT_DISCOVERY, never) as hung:
        [worker] = await shard_workers(runtimes, executors.Tagger, 1)
        head = await runtimes(Head("disc", connections={0: [hung], 1: [worker.server.address]}))
        started = asyncio.get_running_loop().time()
        reply, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=3)
        assert asyncio.get_running_loop().time() - started < 1.5
        assert "/tag" in list(reply.endpoints)


async def test_a_head_without_shards_forgets_a_shard_its_last_worker_left(runtimes, dead_address, eventually):
    """A shard id given by mistake, or one a resharding left: a head with no --shards kept its empty list for ever,
    so every ALL failed naming it and each new id held memory (a soak review: 20,000 ids, 150 MB). It now
    forgets such a shard when its last worker leaves, by DEACTIVATE or a lapsed lease; shard 0 stays."""
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    # shard 0 listed from the start (no lease to lapse); the others register
    head = await runtimes(
        Head("reshaped", polling=PollingMap.parse("ALL"), lease=0.5, connections={0: [worker.server.address]})
    )
    dead_host, dead_port = dead_address.rsplit(":", 1)
    for shard_id in range(1, 201):  # each id once, then gone
        await oneshot.activate_worker(dead_host, int(dead_port), head.server.address, shard_id=shard_id)
        await oneshot.deactivate_worker(dead_host, int(dead_port), head.server.address, shard_id=shard_id)
    assert head.pool.shard_ids("reshaped") == [0]
    answer = await send(head.server.address, "/tag", [Document()])
    assert not answer.is_error and answer.docs[0].tags["by"] == "tagger"
    # a lapsed lease forgets it too
    await oneshot.activate_worker(dead_host, int(dead_port), head.server.address, shard_id=7, renews_every=0.1)
    assert head.pool.shard_ids("reshaped") == [0, 7]
    await eventually(lambda: head.pool.shard_ids("reshaped") == [0], timeout=10.0)


async def test_a_head_with_shards_keeps_an_empty_shard_so_all_names_it(runtimes, dead_address):
    head = await runtimes(Head("declared", polling=PollingMap.parse("ALL"), shards=2))
    dead_host, dead_port = dead_address.rsplit(":", 1)
    await oneshot.activate_worker(dead_host, int(dead_port), head.server.address, shard_id=1)
    await oneshot.deactivate_worker(dead_host, int(dead_port), head.server.address, shard_id=1)
    assert head.pool.shard_ids("declared") == [0, 1]


async def test_a_request_failed_in_two_shards_reads_as_one_kind_in_the_burst_line(
    runtimes, eventually, caplog, dead_address
):
    """ALL requests each failing in shards 1 and 2 were counted as "shard 1: UNAVAILABLE, shard 2: UNAVAILABLE x19",
    the shards of one request joined as the burst line joins its kinds, so that no count could be read off (a
    review). One request's shards are joined with "&", statuses with "+"."""
    caplog.set_level(logging.INFO)
    with socket.socket() as holder:  # a second address nothing listens on
        holder.bind(("127.0.0.1", 0))
        dead = [dead_address, f"127.0.0.1:{holder.getsockname()[1]}"]
        [live] = await shard_workers(runtimes, executors.Tagger, 1)
        connections = {0: [live.server.address], 1: [dead[0]], 2: [dead[1]]}
        head = await runtimes(Head("both", polling=PollingMap.parse("ALL"), connections=connections))
        for _ in range(5):
            assert (await send(head.server.address, "/tag", [Document()], timeout=5)).is_error

    def bursts() -> list[str]:
        return [record.getMessage() for record in caplog.records if "more requests failed" in record.getMessage()]

    await eventually(lambda: bursts(), timeout=5.0)
    assert all("(shard 1 & shard 2: UNAVAILABLE x" in line for line in bursts()), bursts()


@pytest.mark.parametrize("uses_after", [False, True])
async def test_a_shard_left_without_a_replica_under_any_is_warned_of_and_its_refilling_said(
    runtimes, caplog, uses_after
):
    """The emptied shard's WARNING and its refilling's INFO came only under ALL: ANY (the default) refused with
    "no live replica" before a call met the empty list, and the log said neither (found by a review); ANY with a
    uses_after refuses in ``_gather``, not ``_one`` (a regression review)."""
    caplog.set_level(logging.INFO)
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 0})))
    after = (await runtimes(Worker(executors.CountingAfter.create()))).server.address if uses_after else None
    head = await runtimes(Head("solo", polling=PollingMap.parse("ANY"), shards=1, uses_after=after))
    host, port = worker.server.address.rsplit(":", 1)
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)
    assert not (await send(head.server.address, "/tag", [Document()])).is_error
    await oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=0)
    for _ in range(5):
        with pytest.raises(ReplicaError, match="has no live replica"):
            await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), head.server.address,
                                             timeout=10)
    assert caplog.text.count(f"solo/shard-0: no replica left: {worker.server.address} was the last") == 1
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)
    assert f"solo/shard-0: has a replica again: {worker.server.address}" in caplog.text


async def test_a_replicas_details_relayed_by_a_head_are_escaped_once(runtimes, echo_servers):
    """Worker details -> head -> caller: escaped at the head, then not again (backslashes are printable)."""
    [server] = await echo_servers(1, fail_with=grpc.StatusCode.INTERNAL, fail_details="line1\nline2\x1b[2J")
    head = await runtimes(Head("relay", polling=PollingMap.parse("ANY"), connections={0: [server.address]}))
    with pytest.raises(ReplicaError) as raised:
        await oneshot.send_request_async(DataRequest([Document()], endpoint="/x"), head.server.address, timeout=10)
    said = str(raised.value)
    assert "line1\\nline2\\x1b[2J" in said, said
    assert "\\\\n" not in said and "\n" not in said, said


async def test_a_shard_left_without_a_replica_is_warned_of_and_the_requests_it_fails_are_counted(
    runtimes, eventually, caplog
):
    """A shard whose last worker left (a crash-looping worker's DEACTIVATE) was an INFO line, then silence while
    every request failed (a review: 3,000 ERROR answers in 30 s, nothing logged). The shard's emptying is a
    WARNING naming deployment and shard, its refilling an INFO; the failed requests, the first at once and the
    rest of the burst counted by shard and cause once a second."""
    caplog.set_level(logging.INFO)
    workers = await shard_workers(runtimes, executors.Tagger, 2)
    head = await runtimes(
        Head("halved", polling=PollingMap.parse("ALL"), shards=2, connections={0: [workers[0].server.address]})
    )
    host, port = workers[1].server.address.rsplit(":", 1)
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=1)
    assert not (await send(head.server.address, "/tag", [Document()])).is_error
    assert "no replica left" not in caplog.text
    await oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=1)

    sent = [DataRequest([Document()], endpoint="/tag") for _ in range(20)]
    for request in sent:
        assert (await oneshot.send_request_async(request, head.server.address, timeout=10)).is_error
    # said by the first request that found the shard empty (once): not by the removal itself, which a shard
    # forgotten on purpose (no --shards names it) also goes through, and which no request would then meet
    assert caplog.text.count(f"halved/shard-1: no replica left: {workers[1].server.address} was the last") == 1

    def failure_lines() -> list[str]:
        return [record.getMessage() for record in caplog.records if "failed (" in record.getMessage()
                or "more requests failed" in record.getMessage()]

    await eventually(lambda: any("more requests failed" in line for line in failure_lines()), timeout=5.0)
    first, burst = failure_lines()
    assert first.startswith(f"'halved': request {sent[0].request_id} failed (shard 1: no replica): ")
    assert burst.startswith("'halved': 19 more requests failed within 1s (shard 1: no replica x19); the latest: ")

    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=1)
    assert f"halved/shard-1: has a replica again: {workers[1].server.address}" in caplog.text
    assert not (await send(head.server.address, "/tag", [Document()])).is_error


# -- the drain's end ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def head_process(tmp_path, worker: Worker, drain_seconds: str):
    """A ``shardnet head`` process routing to ``worker`` (shard 0) with ``--drain-seconds``: (process, address);
    killed at the end, whatever happened."""
    head = ShardnetProcess(
        "head", ["head", "--deployment", "cutter", "--port", "0", "--connection", f"0={worker.server.address}",
                 "--drain-seconds", drain_seconds], tmp_path / "head.log",
    )
    head.launch()
    try:
        yield head, await asyncio.to_thread(head.wait_ready, 30.0)
    finally:
        head.kill()


async def exit_code(process: ShardnetProcess, timeout: float = 10.0) -> int:
    return await asyncio.to_thread(process.popen.wait, timeout)


async def sent_unary(address: str, request: DataRequest) -> DataRequest:
    return await oneshot.send_request_async(request, address, timeout=30)


async def sent_on_a_call_stream(address: str, request: DataRequest) -> DataRequest:
    """``request`` sent on a ``JinaRPC/Call`` stream, as Jina's Client sends, and its answer (a draining head
    ends the stream UNAVAILABLE once it is out)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(services.STREAM_CALL)(timeout=30)
        await call.write(request.to_bytes())
        answer = await call.read()
        if answer is grpc.aio.EOF:
            await call  # raises the status the stream ended with
        return DataRequest.from_bytes(answer)


def status_of_failure(failure: BaseException) -> grpc.StatusCode:
    return failure.code if isinstance(failure, ReplicaError) else failure.code()


@pytest.mark.parametrize("sent", [sent_unary, sent_on_a_call_stream], ids=["unary", "call-stream"])
async def test_a_head_whose_drain_ends_with_requests_under_way_warns_naming_them_and_exits_4(
    runtimes, tmp_path, eventually, sent
):
    """A head draining (its workers still serving, as Deployment.stop() and deploy drain it first) whose grace
    ended with a request under way cut it, and cancelled its worker's handler, without a word, and exited 0:
    deploy and Deployment.stop() saw a clean stop (a review's find). It warns, naming each endpoint and how
    many of its requests were cut, and exits DRAIN_CUT_EXIT."""
    worker = await runtimes(Worker(executors.Sleepy.create()))
    async with head_process(tmp_path, worker, "0.5") as (head, address):
        in_flight = asyncio.ensure_future(
            sent(address, DataRequest([Document()], endpoint="/sleep", parameters={"seconds": 30}))
        )
        try:
            await eventually(lambda: worker.executor.sleeping == 1, timeout=10)
            answered = await send(address, "/big", parameters={"bytes": 1})
            assert not answered.is_error  # answered before the stop: not cut
            head.signal(signal.SIGTERM)
            assert await exit_code(head) == DRAIN_CUT_EXIT, head.tail()
            with pytest.raises((ReplicaError, grpc.aio.AioRpcError)) as cut:
                await in_flight
            assert status_of_failure(cut.value) == grpc.StatusCode.UNAVAILABLE, cut.value
        finally:
            in_flight.cancel()
            await asyncio.gather(in_flight, return_exceptions=True)
        await eventually(lambda: worker.executor.cancelled == 1, timeout=5)  # its call to the worker went too
        [line] = [line for line in head.tail().splitlines() if "still under way" in line]
    assert " WARNING " in line and "/big" not in line
    assert line.endswith(
        "cutter: the drain's grace (0.5s) ended with 1 request(s) still under way, cut unanswered (their callers got "
        "UNAVAILABLE, and the head's calls for them to its workers were cancelled): /sleep x1"
    ), line


async def test_a_head_holding_an_idle_call_stream_at_its_drain_exits_zero(runtimes, tmp_path):
    """A gateway holds its Call stream to a head open between requests: open and idle, it carries no request
    under way, and a drain that ends it is no cut."""
    worker = await runtimes(Worker(executors.Sleepy.create()))
    async with head_process(tmp_path, worker, "0.5") as (head, address):
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_stream(services.STREAM_CALL)(timeout=30)
            await call.write(DataRequest([Document()], endpoint="/sleep", parameters={"seconds": 0}).to_bytes())
            assert not DataRequest.from_bytes(await call.read()).is_error  # answered: the stream now idle
            head.signal(signal.SIGTERM)
            assert await exit_code(head) == 0, head.tail()
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # as the drain began: go elsewhere
        assert "still under way" not in head.tail(), head.tail()


async def test_a_head_whose_requests_all_finish_within_its_drain_exits_zero(runtimes, tmp_path, eventually):
    worker = await runtimes(Worker(executors.Sleepy.create()))
    async with head_process(tmp_path, worker, "10") as (head, address):
        slow = [DataRequest([Document()], endpoint="/sleep", parameters={"seconds": 0.5}) for _ in range(2)]
        in_flight = [asyncio.ensure_future(sent_unary(address, slow[0])),
                     asyncio.ensure_future(sent_on_a_call_stream(address, slow[1]))]
        try:
            await eventually(lambda: worker.executor.sleeping == 2, timeout=10)
            head.signal(signal.SIGTERM)
            answers = await asyncio.gather(*in_flight)
        finally:
            for call in in_flight:
                call.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        assert [answer.is_error for answer in answers] == [False, False]
        assert [answer.docs[0].tags["slept"] for answer in answers] == [0.5, 0.5]
        assert await exit_code(head) == 0, head.tail()
        assert "still under way" not in head.tail(), head.tail()


@pytest.mark.parametrize("polling", ["ANY", "ALL"])
@pytest.mark.parametrize("hops", [("uses_before",), ("uses_after",), ("uses_before", "uses_after")])
async def test_the_hops_trailing_metadata_is_merged_as_jinas_head_merges_it(runtimes, echo_servers, polling, hops):
    """Jina's head merges the trailing metadata of uses_before, the shards and uses_after, a later hop's key
    replacing an earlier's; this head dropped the hops' (a Kubernetes hops review's find). Each echo server here
    sends ``served-by`` with its name."""
    servers = await echo_servers(1 + len(hops), names=["shard", *hops])
    head = await runtimes(Head(
        "merged", connections={0: [servers[0].address]}, polling=PollingMap.parse(polling),
        **{hop: server.address for hop, server in zip(hops, servers[1:])},
    ))
    _, trailing = await oneshot.call_once(
        "single_data", DataRequest([Document(id="d")], endpoint="/x"), head.server.address, timeout=5.0
    )
    said = [value for key, value in trailing if key == "served-by"]
    assert said == ["uses_after" if "uses_after" in hops else "shard"], trailing


@pytest.mark.parametrize("polling", ["ANY", "ALL"])
@pytest.mark.parametrize("request_streams", [False, True])
async def test_a_request_that_came_error_and_is_passed_back_gets_no_error_trailer_whatever_the_polling(
    runtimes, polling, request_streams, dead_address
):
    """A request already ERROR, which its worker passes back unchanged (no handler for its endpoint): a worker
    answers it with no ``is-error`` trailer, and a head under ANY passed that on, but under ALL the head added
    one, so the same request's outcome (and its metrics label) depended on the polling (a regression review)."""
    workers = await shard_workers(runtimes, executors.KnownOnly, 2)
    head = await head_over(runtimes, "passed", workers, polling, request_streams=request_streams)
    came = DataRequest([Document(text="x")], endpoint="/other")
    came.set_error("upstream failed", name="ValueError")
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        for _ in range(3):  # the first goes before any stream opens, the later ones on them
            pending = channel.unary_unary(services.PROCESS_SINGLE_DATA)(
                came.to_bytes(), timeout=5, metadata=((services.ENDPOINT_METADATA, "/other"),))
            answer = DataRequest.from_bytes(await pending)
            said = [pair for pair in await pending.trailing_metadata() if pair[0] == services.ERROR_METADATA]
            assert answer.is_error and "upstream failed" in answer.status.description and said == [], said
    # still said where the head made the error: a shard down
    down = await runtimes(Head("down", polling=PollingMap.parse("ALL"), request_streams=request_streams,
                               connections={0: [workers[0].server.address], 1: [dead_address]}))
    answer, trailing = await send_with_trailing(down.server.address, "/known", [Document(text="y")])
    assert answer.is_error and trailing.get(services.ERROR_METADATA) == "true"


async def _jina_replica(answer) -> tuple[grpc.aio.Server, str]:
    """A replica serving health (SERVING) that answers every Jina method with ``answer(request, context)``."""

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method.startswith("/jina."):
                return grpc.unary_unary_rpc_method_handler(answer)
            return None

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _busy(request: bytes, context) -> bytes:
    """UNAVAILABLE to everything: retryable, over a connection that works (no ejection for connection failures)."""
    await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")


async def test_endpoint_discovery_asked_by_monitors_spends_no_retry_budget(runtimes):
    """`shardnet status` (STATUS needs no token: anyone may run it, and a monitor runs it every few seconds) makes
    the head ask every shard for its endpoints; the failovers of those questions spent the head's retry budget,
    which the data requests' failovers need, and left them refused ("the retry budget exhausted") while no data
    request was even seen (a review of send and status)."""
    made = [await _jina_replica(_busy) for _ in range(4)]
    try:
        head = await runtimes(Head("budget", connections={0: [address for _, address in made]}))
        for _ in range(40):  # a monitor's `shardnet status` every second, for 40 s, asks this each time
            try:
                await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=5)
            except Exception:
                pass
        budget = head.pool.retry_budget
        assert budget.total_requests == 0
        assert budget.total_retries == 0 and budget.refused == 0, (budget.total_retries, budget.refused)
    finally:
        await asyncio.gather(*(server.stop(None) for server, _ in made))


async def test_discovery_over_a_one_replica_shard_survives_one_transient_failure(runtimes):
    """Asking each replica once, unbudgeted, left a shard's only replica no second try: one reset connection
    failed discovery, and `shardnet status` said "endpoints: unknown", exit 1 (a regression review)."""
    calls = []

    async def flaky_once(request: bytes, context) -> bytes:  # its connection just reset, say; then fine
        calls.append(1)
        if len(calls) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "transient")
        return jina_pb2.EndpointsProto(endpoints=["/tag", "_jina_dry_run_"]).SerializeToString()

    server, address = await _jina_replica(flaky_once)
    try:
        head = await runtimes(Head("one", connections={0: [address]}))
        reply, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=5)
        assert "/tag" in reply.endpoints and len(calls) == 2
        assert head.pool.retry_budget.total_retries == 0  # still unbudgeted
    finally:
        await server.stop(None)


@pytest.mark.parametrize("polling", ["ANY", "ALL"])
async def test_a_head_with_no_shard_replica_refuses_before_uses_before_runs_it(runtimes, polling):
    """A head with a uses_before whose shards have no replica yet (a head just started again, before its workers'
    ACTIVATE; a soak's find: ~1 s of such answers after every head restart, graceful restart_head included) ran
    uses_before, then answered ERROR "UNAVAILABLE: deployment ... has no live replica ... (a replica may have run
    it ...)": not retried by its caller, a Jina gateway stopping the flow on it, though no shard ever saw the
    request. It is refused UNAVAILABLE before the hop runs it."""
    before = await runtimes(Worker(executors.CountingBefore.create()))
    head = await runtimes(Head("idx", shards=2, polling=PollingMap.parse(polling),
                               uses_before=before.server.address))
    with pytest.raises(ReplicaError) as refused:
        await send(head.server.address, "/index", [Document(id="q")])
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "no live replica" in str(refused.value)
    assert before.executor.calls == 0


def test_a_discovery_problem_outside_ascii_stays_within_its_room_and_reads_back():
    """400 characters outside ASCII percent-encoded to 4,800 bytes of STATUS trailing metadata, past what the
    rest of its 8 KB leaves (a regression review)."""
    from shardnet.runtimes.head import MAX_DISCOVERY_BYTES

    class Discovering(GrpcConnectionPool):
        def __init__(self, problem):
            super().__init__()
            self.problem = problem

        def discovery_problem(self):
            return self.problem

    for problem in ("pods in ns failing; last failure: " + "\U0001f600" * 500, "pods in ns failing: é " * 40,
                    "plain ascii: 100% sure", "pods failing: " + "\u20ac" * 400, "x" + "\u20ac\n%" * 130):
        [(key, value)] = Head("dep", pool=Discovering(problem))._discovery_metadata()
        assert key == services.DISCOVERY_FAILING_METADATA
        assert value.isascii() and len(value) <= MAX_DISCOVERY_BYTES, len(value)
        shown = _replica_notes([(key, value)])["discovery"]
        assert "\ufffd" not in shown and problem.startswith(shown), (shown[-20:], problem[:80])
