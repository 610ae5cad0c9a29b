"""Request streams between a head and its shardnet workers (networking/streams.py), on real servers.

Each test checks what a caller of the head sees (answers matched to their own
requests, errors with the status a unary call would have had, nothing lost) and
that the requests did travel the way the test is about (on a stream, or unary).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
from pathlib import Path

import executors
import grpc
import grpc.aio
import pytest

from shardnet import DataRequest, DeadlineExceeded, Document, GrpcConnectionPool, PollingMap, ReplicaError
from shardnet.errors import ConfigurationError
from shardnet.networking import oneshot, streams
from shardnet.networking.streams import MAX_STREAMED_BYTES, STATUS_EXCEPTION, status_message, stream_status_error
from shardnet.protocol import services
from shardnet.runtimes.head import Head
from shardnet.runtimes.processes import ShardnetProcess
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes import worker as worker_module
from shardnet.runtimes.worker import Worker
from shardnet.testing import EchoServer, eventually, serving


async def start_worker(runtimes, executor_class=executors.Sleepy, **config) -> Worker:
    return await runtimes(Worker(executor_class.create(), ServerConfig(**config)))


async def start_head(runtimes, workers: list, **options) -> Head:
    addresses = [worker if isinstance(worker, str) else worker.server.address for worker in workers]
    return await runtimes(Head("dep", connections={0: addresses}, **options))


def streams_of(head: Head, index: int = 0):
    return head.pool.get_replicas("dep").get_all_connections()[index].stubs.streams


def request(endpoint: str, text: str, request_id: str | None = None, **parameters) -> DataRequest:
    built = DataRequest([Document(text=text)], endpoint=endpoint, parameters=parameters)
    if request_id is not None:
        built.header.request_id = request_id
    return built


async def send(head: Head, built: DataRequest, timeout: float = 10.0) -> DataRequest:
    return await oneshot.send_request_async(built, head.server.address, timeout=timeout)


async def warm_up(head: Head, endpoint: str = "/sleep") -> None:
    """Send until every stream to every replica carries requests (the first go unary while they open);
    a few at a time, so that the balancer spreads them."""
    connections = head.pool.get_replicas("dep").get_all_connections()

    async def all_open() -> bool:
        await asyncio.gather(*(send(head, request(endpoint, "warm-up", seconds=0.005)) for _ in range(16)))
        return all(c.stubs.streams.open_streams == len(c.stubs.streams._lanes) for c in connections)

    await eventually(all_open)


async def test_answers_finishing_out_of_order_each_reach_their_own_caller(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    before = streams_of(head).streamed
    rng = random.Random(7)
    texts = [f"doc-{index}" for index in range(200)]
    answers = await asyncio.gather(
        *(send(head, request("/sleep", text, seconds=rng.choice([0, 0.001, 0.01, 0.03]))) for text in texts)
    )
    assert [answer.docs[0].text for answer in answers] == texts
    assert all("slept" in answer.docs[0].tags for answer in answers)
    assert streams_of(head).streamed - before == len(texts)  # every one of them went on a stream


async def test_requests_sharing_a_request_id_are_all_answered_and_not_mixed_up(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    before = streams_of(head).streamed
    texts = [f"twin-{index}" for index in range(40)]
    answers = await asyncio.gather(
        *(send(head, request("/sleep", text, request_id="same-id", seconds=0.05 + 0.01 * (index % 3)))
          for index, text in enumerate(texts))
    )
    assert [answer.docs[0].text for answer in answers] == texts
    streamed = streams_of(head).streamed - before
    assert 0 < streamed < len(texts)  # one per stream at a time: the others went unary


async def test_a_head_given_a_pool_calls_as_that_pool_does_and_refuses_a_request_streams_it_would_ignore(runtimes):
    """Head(pool=P, request_streams=False) called its workers on P's streams all the same, saying nothing (a knobs
    review's find): the head makes no pool of its own when given one."""
    worker = await start_worker(runtimes)
    for given in (False, True):
        with pytest.raises(ConfigurationError, match=rf"^Head\(request_streams={given}\) and a pool given with "
                                                     rf"request_streams={not given}: "):
            Head("dep", connections={0: [worker.server.address]}, pool=GrpcConnectionPool(request_streams=not given),
                 request_streams=given)
    with pytest.raises(ConfigurationError, match="request_streams is True or False, got 'no'"):
        Head("dep", pool=GrpcConnectionPool(), request_streams="no")
    unary = await start_head(runtimes, [worker], pool=GrpcConnectionPool(), request_streams=False)  # they agree
    streamed = await start_head(runtimes, [worker], pool=GrpcConnectionPool(request_streams=True))  # the pool's
    await warm_up(streamed)
    assert (await send(unary, request("/sleep", "one", seconds=0))).docs[0].text == "one"
    assert streams_of(unary) is None


async def test_a_request_that_reads_as_a_status_message_goes_unary_and_is_answered(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    before = streams_of(head).streamed
    crafted = DataRequest.from_bytes(status_message("r-9", grpc.StatusCode.CANCELLED, "not really"))
    crafted.endpoint = "/sleep"
    answer = await send(head, crafted)
    assert answer.request_id == "r-9" and answer.is_error  # passed through the handler untouched, as sent
    assert streams_of(head).streamed == before


async def test_a_request_without_an_id_is_answered(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    before = streams_of(head).streamed
    answer = await send(head, request("/sleep", "anonymous", request_id=""))
    assert answer.docs[0].text == "anonymous"
    assert streams_of(head).streamed == before  # no id to match its answer by: it went unary


async def test_a_server_without_request_streams_is_called_unary(runtimes):
    async with EchoServer() as echo:
        head = await start_head(runtimes, [echo.address])
        answers = [await send(head, request("/anything", f"echo-{index}")) for index in range(5)]
        assert [answer.docs[0].text for answer in answers] == [f"echo-{index}" for index in range(5)]
        streams = streams_of(head)
        assert streams.unary_only and streams.streamed == 0
        assert echo.calls == 5


async def test_a_pool_with_request_streams_returns_a_unary_servers_trailing_metadata(runtimes):
    """Through a pool with request streams, a unary-only server's trailing metadata still comes back."""
    async with EchoServer(name="plain") as echo:
        async with GrpcConnectionPool(request_streams=True) as pool:
            pool.add_connection("dep", echo.address)
            replicas = pool.get_replicas("dep")
            for _ in range(3):
                response, trailing = await pool.call(request("/x", "t"), "dep", replicas)
                assert dict(tuple(trailing))["served-by"] == "plain"


async def test_an_executor_error_comes_back_with_its_status_and_the_is_error_trailer(runtimes):
    worker = await start_worker(runtimes, executors.Tagger)
    head = await start_head(runtimes, [worker])
    await warm_up(head, "/tag")
    before = streams_of(head).streamed
    response, trailing = await oneshot.call_once(
        "single_data", request("/fail", "x"), head.server.address, timeout=10, metadata=[("endpoint", "/fail")]
    )
    assert streams_of(head).streamed == before + 1  # it went on a stream: the trailer was read off its status
    assert response.is_error and "bad input" in response.status.description
    assert dict(tuple(trailing))[services.ERROR_METADATA] == "true"


async def test_an_answer_over_the_heads_limit_fails_alone_with_the_limit_named(runtimes):
    worker = await start_worker(runtimes)  # takes the default 256 MB
    head = await runtimes(Head("dep", ServerConfig(max_message_bytes=2 * 1024 * 1024),
                               connections={0: [worker.server.address]}))
    await warm_up(head)
    big = send(head, request("/big", "big", bytes=3 * 1024 * 1024))
    small = [send(head, request("/sleep", f"small-{index}", seconds=0.05)) for index in range(10)]
    outcomes = await asyncio.gather(big, *small, return_exceptions=True)
    assert isinstance(outcomes[0], ReplicaError)
    assert outcomes[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the receiving head's max message size of 2097152 bytes" in str(outcomes[0])
    assert [answer.docs[0].text for answer in outcomes[1:]] == [f"small-{index}" for index in range(10)]
    assert streams_of(head).open_streams == len(streams_of(head)._lanes)  # the streams lived on


async def test_a_request_bigger_than_a_stream_takes_goes_unary_and_is_answered(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    before = streams_of(head).streamed
    text = "y" * (MAX_STREAMED_BYTES + 1)
    answer = await send(head, request("/sleep", text))
    assert answer.docs[0].text == text
    assert streams_of(head).streamed == before


async def test_a_caller_whose_deadline_passes_gets_deadline_exceeded_and_the_stream_carries_on(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    with pytest.raises(ReplicaError) as caught:
        await send(head, request("/sleep", "late", seconds=2), timeout=0.5)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: worker.executor.cancelled == 1)
    answers = await asyncio.gather(*(send(head, request("/sleep", f"after-{index}")) for index in range(8)))
    assert [answer.docs[0].text for answer in answers] == [f"after-{index}" for index in range(8)]
    assert streams_of(head).open_streams == len(streams_of(head)._lanes)


async def test_a_cancelled_caller_leaves_the_stream_working(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    replicas = head.pool.get_replicas("dep")
    waiting = asyncio.ensure_future(head.pool.call(request("/sleep", "gone", seconds=1), "dep", replicas))
    await eventually(lambda: any(lane and lane.pending for lane in streams_of(head)._lanes))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not any(lane and lane.pending for lane in streams_of(head)._lanes)
    await eventually(lambda: worker.executor.cancelled == 1)  # the worker stopped its work, as for a call
    answer = await send(head, request("/sleep", "next"))
    assert answer.docs[0].text == "next"


async def test_a_worker_process_killed_9_under_load_loses_no_request(runtimes, tmp_path):
    uses = f"{Path(executors.__file__).resolve()}:Sleepy"
    processes = [
        ShardnetProcess(f"worker-{index}", ["worker", "--uses", uses, "--port", "0"], tmp_path / f"worker-{index}.log")
        for index in range(2)
    ]
    try:
        addresses = []
        for process in processes:
            process.launch()
            addresses.append(await asyncio.to_thread(process.wait_ready, 30.0))
        head = await start_head(runtimes, addresses)
        await warm_up(head)
        for round_index in range(3):  # the break races the head's writes differently each time
            texts = [f"r{round_index}-{index}" for index in range(80)]
            sending = asyncio.gather(*(send(head, request("/sleep", text, seconds=0.05)) for text in texts))
            await eventually(lambda: any(lane and lane.pending for lane in streams_of(head)._lanes if lane))
            victim = processes[round_index % 2]
            victim.kill()  # SIGKILL: no drain, no DEACTIVATE; the streams break under their requests
            answers = await sending
            assert [answer.docs[0].text for answer in answers] == texts
            victim.launch()
            await asyncio.to_thread(victim.wait_ready, 30.0)
            await head.pool.remove_connection("dep", addresses[round_index % 2])
            addresses[round_index % 2] = victim.address
            head.pool.add_connection("dep", victim.address, shard_id=0)
    finally:
        for process in processes:
            process.kill()


@pytest.mark.parametrize("leaving", ["dies", "drains"])
async def test_a_worker_leaving_mid_stream_loses_nothing(runtimes, leaving):
    """Dies: its server gone at once, the streams break under their requests, which fail over. Drains: it
    answers what it took, then ends its streams; what the head sent after that fails over."""
    leaver = await start_worker(runtimes)
    stayer = await start_worker(runtimes)
    head = await start_head(runtimes, [leaver, stayer])
    await warm_up(head)
    texts = [f"doc-{index}" for index in range(60)]
    sending = asyncio.gather(*(send(head, request("/sleep", text, seconds=0.3)) for text in texts))
    await eventually(lambda: any(lane and lane.pending for lane in streams_of(head)._lanes if lane))
    await leaver.stop(0 if leaving == "dies" else 5)  # grace 0: its calls and streams cut at once
    answers = await sending
    assert [answer.docs[0].text for answer in answers] == texts


async def test_a_draining_worker_refuses_new_stream_requests_at_once_so_they_fail_over_in_time(runtimes):
    """Draining, a worker finishes what it took; what its streams bring meanwhile is answered UNAVAILABLE at once
    (it was held until the slowest handler finished, past its callers' deadlines, a healthy replica idle)."""
    leaver = await runtimes(Worker(executors.Sleepy.create(), name="leaver"))
    stayer = await runtimes(Worker(executors.Sleepy.create(), name="stayer"))
    head = await runtimes(Head("dep", connections={0: [leaver.server.address, stayer.server.address]},
                               pool=GrpcConnectionPool(balancer="round_robin", request_streams=True)))
    await warm_up(head)
    slow = asyncio.gather(*(send(head, request("/sleep", f"slow-{n}", seconds=3)) for n in range(4)))
    await eventually(lambda: any(lane and lane.pending for lane in streams_of(head, 0)._lanes if lane))
    stopping = asyncio.create_task(leaver.stop(10))
    try:
        await eventually(leaver.server.stopping.is_set)
        texts = [f"quick-{n}" for n in range(10)]  # round robin sends half of them to the draining worker
        answers = await asyncio.gather(*(send(head, request("/sleep", text, seconds=0.01), timeout=1.5)
                                         for text in texts))
        assert [answer.docs[0].text for answer in answers] == texts
        assert {answer.routes[-1].executor for answer in answers} == {"stayer"}  # none taken while draining
        assert [answer.docs[0].text for answer in await slow] == [f"slow-{n}" for n in range(4)]
    finally:
        await stopping


async def test_removing_a_replica_lets_its_requests_finish_then_closes_its_channel(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    replicas = head.pool.get_replicas("dep")
    in_flight = asyncio.gather(*(send(head, request("/sleep", f"doc-{index}", seconds=0.5)) for index in range(8)))
    await eventually(lambda: sum(len(lane.pending) for lane in streams_of(head)._lanes if lane) == 8)
    connection = await head.pool.remove_connection("dep", worker.server.address)
    answers = await in_flight
    assert [answer.docs[0].text for answer in answers] == [f"doc-{index}" for index in range(8)]
    # the streams half-close once answered, the worker ends them, and the channel's close completes
    await eventually(lambda: not replicas._leaving, timeout=5)
    assert connection.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN


async def test_a_head_without_request_streams_calls_unary(runtimes):
    worker = await start_worker(runtimes)
    head = await start_head(runtimes, [worker], request_streams=False)
    answer = await send(head, request("/sleep", "plain"))
    assert answer.docs[0].text == "plain"
    assert streams_of(head) is None


async def test_a_worker_capping_concurrent_calls_serves_no_streams_and_is_called_unary(runtimes):
    worker = await start_worker(runtimes, max_concurrent_rpcs=4)
    head = await start_head(runtimes, [worker])
    answers = [await send(head, request("/sleep", f"capped-{index}")) for index in range(3)]
    assert [answer.docs[0].text for answer in answers] == [f"capped-{index}" for index in range(3)]
    assert streams_of(head).unary_only


async def test_all_polling_reads_every_shards_answer_off_the_streams(runtimes):
    workers = [await start_worker(runtimes, executors.Tagger) for _ in range(2)]
    head = await runtimes(Head("dep", connections={0: [workers[0].server.address], 1: [workers[1].server.address]},
                               polling=PollingMap.parse("ALL")))
    for _ in range(10):
        await send(head, request("/tag", "all"))
    shard_streams = [head.pool.get_replicas("dep", shard_id=shard).get_all_connections()[0].stubs.streams
                     for shard in (0, 1)]
    assert all(streams.streamed > 0 for streams in shard_streams)
    answer = await send(head, request("/tag", "merged"))
    assert {doc.text for doc in answer.docs} == {"merged"}


# -- the worker's side, spoken to directly -------------------------------------------------------------------------


async def open_stream(worker: Worker, limit: int | str | None = None):
    channel = grpc.aio.insecure_channel(worker.server.address)
    metadata = () if limit is None else (("shardnet-max-message-bytes", str(limit)),)
    return channel, channel.stream_stream(services.REQUEST_STREAM)(metadata=metadata)


async def test_a_worker_refuses_an_unreadable_stream_message_with_invalid_argument(runtimes):
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker)
    try:
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request stream: malformed DataRequest" in caught.value.details()
    finally:
        await channel.close()


async def test_a_worker_answers_what_came_before_an_unreadable_stream_message_then_refuses_the_stream(runtimes):
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker)
    try:
        for n in range(3):
            await call.write(request("/sleep", f"s{n}", request_id=f"before-{n}", seconds=0.3).to_bytes())
        await call.write(b"\xff\xff\xff")
        answered = set()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while True:
                answered.add(DataRequest.from_bytes(await call.read()).request_id)
        assert answered == {"before-0", "before-1", "before-2"}
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()


@pytest.mark.parametrize("second_id", ["twice", ""])
async def test_a_request_id_still_worked_on_or_none_ends_the_stream_after_the_answers_before_it(runtimes, second_id):
    """Two requests under one id got one answer, and the other's handler ran on with nobody to answer nor to
    cancel it; a request with no id is one whose answer no sender can match (found by a review)."""
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker)
    try:
        await call.write(request("/sleep", "first", request_id="twice", seconds=0.3).to_bytes())
        await call.write(request("/sleep", "second", request_id=second_id, seconds=0).to_bytes())
        answer = DataRequest.from_bytes(await asyncio.wait_for(call.read(), 5))
        assert answer.request_id == "twice" and answer.docs.texts == ["first"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        expected = "request id 'twice' is still being worked on" if second_id else "a request with no request id"
        assert expected in caught.value.details()
    finally:
        await channel.close()


async def test_an_id_answered_may_be_used_again_on_the_stream(runtimes):
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker)
    try:
        for text in ("one", "two"):
            await call.write(request("/sleep", text, request_id="again", seconds=0).to_bytes())
            answer = DataRequest.from_bytes(await asyncio.wait_for(call.read(), 5))
            assert answer.request_id == "again" and answer.docs.texts == [text]
    finally:
        await channel.close()


async def test_a_worker_reads_no_more_of_a_stream_whose_sender_does_not_read_its_answers(runtimes, monkeypatch):
    """A sender that wrote and never read had every answer queued in the worker, without bound (a review: 5,000
    answers of 20 KB grew the worker by 93 MB)."""
    monkeypatch.setattr(streams, "WRITER_BACKLOG_MESSAGES", 8)
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker)
    try:
        sent = 300
        for n in range(sent):  # small requests, each answered with 200 KB
            await call.write(request("/big", "", request_id=f"r{n}", bytes=200_000).to_bytes())
        await eventually(lambda: worker.executor.made_big >= 8)
        await asyncio.sleep(0.3)  # a negative cannot be polled for: the worker has stopped taking requests
        assert worker.executor.made_big < 40
        ids = set()
        for _ in range(sent):  # once read, every answer comes, nothing was dropped
            answer = DataRequest.from_bytes(await asyncio.wait_for(call.read(), 10))
            assert not answer.is_error and len(answer.docs[0].text) == 200_000
            ids.add(answer.request_id)
        assert ids == {f"r{n}" for n in range(sent)} and worker.executor.made_big == sent
    finally:
        await channel.close()


async def test_requests_whose_callers_left_a_hung_replicas_stream_are_taken_back_not_held(tmp_path):
    """A replica that stops reading (SIGSTOPped): each request queued behind it stayed queued after its caller
    left, with a CANCELLED message beside it, and the replica ran them all when it woke (a review: 1,800 of
    64 KB, 109 MB held). Now a request not yet written is taken back when its caller leaves."""
    worker = ShardnetProcess("hung", ["worker", "--uses", "shardnet.examples.echo:Echo", "--port", "0"],
                             tmp_path / "hung.log")
    pool = GrpcConnectionPool(request_streams=True)
    try:
        worker.launch()
        pool.add_connection("dep", await asyncio.to_thread(worker.wait_ready, 30.0))
        lanes = pool.get_replicas("dep").get_all_connections()[0].stubs.streams

        async def streams_open() -> bool:  # the first calls go unary and connect the channel; streams open then
            await asyncio.gather(*(pool.send_request(request("/x", "warm"), "dep", timeout=5)[0] for _ in range(8)))
            return lanes.open_streams == len(lanes._lanes)

        await eventually(streams_open, timeout=10)
        os.kill(worker.pid, signal.SIGSTOP)
        big = "x" * 64 * 1024

        async def send(index: int) -> None:
            with pytest.raises(DeadlineExceeded):
                await pool.send_request(request("/x", big, request_id=f"r{index}"), "dep", timeout=0.3)[0]

        for first in (0, 300):
            await asyncio.gather(*(send(index) for index in range(first, first + 300)))
        writers = [lane.writer for lane in lanes._lanes if lane is not None and lane.writer is not None]
        held = sum(writer.queued_bytes for writer in writers)
        assert held < 2 * 1024 * 1024, held  # before: every request not yet written, some 30 MB, and more to come
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(worker.pid, signal.SIGCONT)
        await pool.close()
        worker.kill()


async def test_a_fault_of_the_worker_itself_on_a_stream_is_answered_internal_not_left_unanswered(runtimes):
    worker = await start_worker(runtimes)

    async def faulty(*arguments):  # a bug of ours (fault injection): neither an abort nor the executor's error
        raise KeyError("a bug of ours")

    worker._handle = faulty
    channel, call = await open_stream(worker)
    try:
        await call.write(request("/tag", "t", request_id="unlucky").to_bytes())
        answer = DataRequest.from_bytes(await asyncio.wait_for(call.read(), 5))  # before: no answer, ever
        assert answer.request_id == "unlucky" and answer.is_error
        assert list(answer.status.exception.args)[0] == "INTERNAL" and "KeyError" in answer.status.exception.args[1]
    finally:
        await channel.close()


async def test_a_pickled_request_on_a_stream_is_refused_alone_and_the_stream_goes_on(runtimes):
    """Its refusal quotes at most 80 characters of its id (it quoted the whole id, three times in the answer)."""
    worker = await start_worker(runtimes)
    pickled_id = "pickled" + "-" * 10_000
    pickled = request("/tag", "p", request_id=pickled_id).proto
    pickled.data.docs_bytes = b"\x80\x04K\x01."
    channel, call = await open_stream(worker)
    try:
        await call.write(pickled.SerializeToString())
        await call.write(request("/tag", "after", request_id="after").to_bytes())
        answers = {}
        for _ in range(2):
            answer = DataRequest.from_bytes(await asyncio.wait_for(call.read(), 5))
            answers[answer.request_id] = answer
        assert list(answers[pickled_id].status.exception.args)[0] == "INVALID_ARGUMENT"
        assert "docs_bytes" in answers[pickled_id].status.exception.args[1]
        assert len(answers[pickled_id].to_bytes()) < len(pickled_id) + 1000
        assert not answers["after"].is_error and answers["after"].docs[0].text == "after"
    finally:
        await channel.close()


async def test_a_worker_takes_a_stream_limit_of_thousands_of_digits_as_none_given(runtimes):
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker, limit="9" * 5000)
    try:
        await call.write(request("/tag", "t", request_id="huge-limit").to_bytes())
        answer = DataRequest.from_bytes(await call.read())
        assert answer.request_id == "huge-limit" and not answer.is_error and answer.docs[0].text == "t"
    finally:
        await channel.close()


async def test_a_worker_names_its_limit_and_refuses_a_single_answer_too_big_for_the_sender(runtimes):
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker, limit=1000)
    try:
        assert (await call.initial_metadata()).get("shardnet-max-message-bytes") == str(256 * 1024 * 1024)
        await call.write(request("/big", "b", request_id="big-one", bytes=5000).to_bytes())
        await call.write(request("/sleep", "s", request_id="small-one").to_bytes())
        answers = {}
        for _ in range(2):
            answer = DataRequest.from_bytes(await call.read())
            answers[answer.request_id] = answer
        assert answers["small-one"].docs[0].text == "s"
        refused = answers["big-one"]
        assert refused.status.exception.args[0] == "RESOURCE_EXHAUSTED"
        assert "over the receiving head's max message size of 1000 bytes" in refused.status.exception.args[1]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    finally:
        await channel.close()


def test_a_status_message_says_which_request_and_why():
    answer = DataRequest.from_bytes(status_message("r-1", grpc.StatusCode.INVALID_ARGUMENT, "bad"))
    assert answer.request_id == "r-1" and answer.is_error
    assert list(answer.status.exception.args) == ["INVALID_ARGUMENT", "bad"]


async def test_a_stream_answer_that_cannot_be_read_fails_its_stream_by_name_and_the_next_request_reopens(runtimes):
    """A fake replica that serves the stream but answers with bytes that are no DataRequest."""

    async def garbage(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", "1000000"),))
        async for _ in requests:
            await context.write(b"\xff\xff\xff")

    async with one_stream_to(garbage) as (pool, replicas, address):
        with pytest.raises(ReplicaError) as caught:
            await pool.call(request("/x", "x"), "dep", replicas, retries=0)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # so that what was on the stream fails over
        assert f"{address} sent an unreadable answer on its request stream" in str(caught.value)
        streams = replicas.get_all_connections()[0].stubs.streams
        await eventually(lambda: streams._lanes[0] is None)


@pytest.mark.parametrize("code_name", ["OK", "__class__", "NOT_A_CODE"])
async def test_a_status_answer_with_no_failed_calls_code_is_a_malformed_answer_naming_the_replica(code_name):
    """Code OK had a head abort with OK (an AssertionError in gRPC) and its caller wait to its deadline, or for
    ever; a name that is an attribute of StatusCode but no status was an AttributeError naming no replica."""

    async def lying(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", "1000000"),))
        async for data in requests:
            answer = DataRequest()  # a status message as status_message writes one, with the code named
            answer.header.request_id = DataRequest.from_bytes(data).request_id
            answer.header.status.code = answer.header.status.ERROR
            answer.header.status.exception.name = STATUS_EXCEPTION
            answer.header.status.exception.args.extend([code_name, "whatever"])
            await context.write(answer.to_bytes())

    async with one_stream_to(lying) as (pool, replicas, address):
        with pytest.raises(ReplicaError) as caught:
            await asyncio.wait_for(pool.call(request("/x", "x"), "dep", replicas, retries=0), timeout=5)
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert address in str(caught.value) and "malformed status answer" in str(caught.value)


@contextlib.asynccontextmanager
async def one_stream_to(handler):
    """(pool, replicas, address) of a pool whose next call goes on a request stream, open, to a fake replica
    serving the stream with ``handler``."""
    async with serving(services.REQUEST_STREAM, handler, stream=True) as address:
        async with GrpcConnectionPool(request_streams=True) as pool:
            pool.add_connection("dep", address)
            replicas = pool.get_replicas("dep")
            connection = replicas.get_all_connections()[0]
            streams = connection.stubs.streams
            await asyncio.wait_for(connection.channel.channel_ready(), timeout=5)  # streams open on a connected one
            lane = streams.lane()
            await eventually(lambda: lane.ready or lane.task.done())
            streams._turn = 0  # the next call takes the lane now open
            yield pool, replicas, address


def test_the_command_line_turns_request_streams_off():
    from shardnet.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["head", "--deployment", "d"]).request_streams is True
    assert parser.parse_args(["head", "--deployment", "d", "--no-request-streams"]).request_streams is False



def test_a_deployment_passes_its_request_streams_switch_to_its_head():
    from shardnet import ConfigurationError, Deployment

    assert "--no-request-streams" in Deployment(executors.Tagger, request_streams=False)._head_options
    assert "--no-request-streams" not in Deployment(executors.Tagger)._head_options
    with pytest.raises(ConfigurationError, match="request_streams is True or False"):
        Deployment(executors.Tagger, request_streams="no")
    with pytest.raises(ConfigurationError, match="request_streams is True or False"):
        GrpcConnectionPool(request_streams=1)


async def test_an_id_reused_after_its_caller_gave_up_never_gets_the_late_answer(runtimes):
    """Callers that keep one request id and a deadline about as long as the work: a late answer to an
    abandoned request must never reach the next request with that id."""
    worker = await start_worker(runtimes)
    async with GrpcConnectionPool(request_streams=True) as pool:
        pool.add_connection("dep", worker.server.address)
        replicas = pool.get_replicas("dep")
        streams = replicas.get_all_connections()[0].stubs.streams
        await eventually(lambda: _open_all(pool, replicas, streams))
        outcomes = {"answered": 0, "timed out": 0, "wrong": []}

        async def caller(key: int) -> None:
            rng = random.Random(key)
            for call in range(40):  # work of 30 ms, deadlines of 15 to 60 ms: some answered, some not, loaded or not
                sent = f"id{key}-call{call}"
                try:
                    answer, _ = await pool.call(request("/sleep", sent, request_id=f"id{key}", seconds=0.03), "dep",
                                                replicas, timeout=rng.uniform(0.015, 0.06), retries=0)
                except ReplicaError:
                    outcomes["timed out"] += 1
                    continue
                outcomes["answered"] += 1
                if answer.docs[0].text != sent:
                    outcomes["wrong"].append((sent, answer.docs[0].text))

        await asyncio.gather(*(caller(key) for key in range(6)))
        assert outcomes["wrong"] == []
        assert outcomes["answered"] and outcomes["timed out"] and streams.streamed  # both cases happened, on streams


async def _open_all(pool, replicas, streams) -> bool:
    try:
        await pool.call(request("/sleep", "warm-up"), "dep", replicas)
    except ReplicaError:  # a replica just started: its channel may still be backing off
        return False
    return streams.open_streams == len(streams._lanes)


async def test_closing_a_pool_cuts_what_waits_on_its_streams(runtimes):
    worker = await start_worker(runtimes)
    pool = GrpcConnectionPool(request_streams=True)
    try:
        pool.add_connection("dep", worker.server.address)
        replicas = pool.get_replicas("dep")
        streams = replicas.get_all_connections()[0].stubs.streams
        await eventually(lambda: _open_all(pool, replicas, streams))
        waiting = asyncio.ensure_future(pool.call(request("/sleep", "long", seconds=30), "dep", replicas, retries=0))
        await eventually(lambda: any(lane and lane.pending for lane in streams._lanes))
    finally:
        await asyncio.wait_for(pool.close(), 5)
    with pytest.raises(ReplicaError) as caught:
        await asyncio.wait_for(waiting, 5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "was closed with this request on it" in str(caught.value)


async def test_a_worker_that_was_down_at_first_gets_its_streams_once_it_is_up(runtimes):
    from shardnet.testing import free_port

    port = free_port()
    async with GrpcConnectionPool(request_streams=True, retry=None) as pool:
        pool.add_connection("dep", f"127.0.0.1:{port}")
        replicas = pool.get_replicas("dep")
        connection = replicas.get_all_connections()[0]
        with pytest.raises(ReplicaError):
            await pool.call(request("/sleep", "too early"), "dep", replicas, retries=0, timeout=2)
        assert not connection.stubs.streams.unary_only  # refused, not unimplemented: it may serve streams later
        await start_worker(runtimes, port=port)
        # (the channel itself is rebuilt if failures pile up: read the streams of the current one)
        await eventually(lambda: _open_all(pool, replicas, connection.stubs.streams))
        assert not connection.stubs.streams.unary_only



async def test_a_request_over_the_senders_own_send_limit_goes_unary_and_fails_alone(runtimes):
    worker = await start_worker(runtimes)
    async with GrpcConnectionPool(request_streams=True, options=[("grpc.max_send_message_length", 4000)]) as pool:
        pool.add_connection("dep", worker.server.address)
        replicas = pool.get_replicas("dep")
        streams = replicas.get_all_connections()[0].stubs.streams
        await eventually(lambda: _open_all(pool, replicas, streams))
        before = streams.streamed
        small = [pool.call(request("/sleep", f"small-{index}", seconds=0.05), "dep", replicas) for index in range(8)]
        big = pool.call(request("/sleep", "b" * 8000), "dep", replicas, retries=0)
        *answers, refused = await asyncio.gather(*small, big, return_exceptions=True)
        assert [answer.docs[0].text for answer, _ in answers] == [f"small-{index}" for index in range(8)]
        assert isinstance(refused, ReplicaError) and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert streams.streamed - before == 8


async def test_a_worker_whose_limit_is_a_float_still_serves_streams(runtimes):
    worker = await start_worker(runtimes, max_message_bytes=8e6)
    head = await start_head(runtimes, [worker])
    await warm_up(head)
    assert streams_of(head).open_streams == len(streams_of(head)._lanes)


async def test_a_draining_workers_stream_refusal_says_the_request_never_ran(runtimes, pool_factory):
    # in the words of its unary refusal: a head may then send an ANY request to another shard (it was refused as
    # "NAME is stopping", which no sender could tell from work done)
    leaver = await runtimes(Worker(executors.Sleepy.create(), name="leaver"))
    pool = pool_factory(request_streams=True)
    pool.add_connection("dep", leaver.server.address)
    streams = pool.get_replicas("dep").get_all_connections()[0].stubs.streams

    async def open_streams() -> bool:
        await asyncio.gather(*(pool.send_request(request("/sleep", "warm-up", seconds=0.005), "dep")[0]
                               for _ in range(16)))
        return streams.open_streams == len(streams._lanes)

    await eventually(open_streams)
    slow = asyncio.gather(*(pool.send_request(request("/sleep", f"slow-{n}", seconds=2), "dep")[0] for n in range(8)))
    await eventually(lambda: all(lane and lane.pending for lane in streams._lanes))
    stopping = asyncio.create_task(leaver.stop(10))
    try:
        await eventually(leaver.server.stopping.is_set)
        with pytest.raises(ReplicaError) as caught:
            await pool.send_request(request("/sleep", "refused", seconds=0.01), "dep", retries=0)[0]
        assert caught.value.unsent and services.DRAINING_DETAILS in str(caught.value), caught.value
        assert len(await slow) == 8  # what it took, it finished
    finally:
        await stopping


async def test_requests_left_unread_when_a_worker_ends_its_stream_cleanly_are_refused_as_never_run(runtimes):
    """A draining worker ends its stream, status OK, once every request it took is answered: those still on
    their way to it were never run, yet failed as "ended its request stream before answering", which no
    sender can tell from work done, so an ANY request was not sent to another shard (found by a head review).
    A fake replica here takes one request without reading it and ends the stream as a drained worker does."""

    async def drained(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", "1000000"),))
        await requests.__anext__()  # on its way, and never read further: the stream ends, status OK

    async with one_stream_to(drained) as (pool, replicas, _):
        with pytest.raises(ReplicaError) as caught:
            await pool.call(request("/x", "x"), "dep", replicas, retries=0)
        assert caught.value.unsent and services.DRAINING_DETAILS in str(caught.value), caught.value


async def test_no_stream_is_opened_to_a_replica_that_is_down_and_one_opens_once_it_is_up(dead_address, runtimes):
    """A shard's last replica, dead, is never ejected: each request tried it, opening a request stream that
    failed at once, and grpcio keeps a few hundred bytes of every such call (a head's RSS grew about a megabyte
    per shard outage, without end; found by a soak). Until its channel connects, requests go unary."""
    from shardnet.networking.policies import RetryPolicy

    async with GrpcConnectionPool(request_streams=True, retry=RetryPolicy(rounds=1)) as pool:
        pool.add_connection("dep", dead_address)
        [connection] = pool.get_replicas("dep").get_all_connections()
        for index in range(30):
            with pytest.raises(ReplicaError):
                await pool.send_request(request("/x", f"r{index}"), "dep", timeout=5)[0]
        assert connection.stubs.streams.opened == 0

    worker = await start_worker(runtimes)
    async with GrpcConnectionPool(request_streams=True) as pool:
        pool.add_connection("dep", worker.server.address)
        streams = pool.get_replicas("dep").get_all_connections()[0].stubs.streams
        for index in range(30):
            await pool.send_request(request("/sleep", f"s{index}", seconds=0), "dep", timeout=5)[0]
        assert streams.opened >= 1 and streams.streamed >= 1  # the first went unary and connected the channel


async def test_an_unreadable_answer_ends_its_stream_without_cutting_the_other_requests_on_it():
    """The requests sharing the stream with one answered unreadably are answered, not failed (and so not sent
    elsewhere while the replica still ran them: a review saw 7 of 30 run twice); only the unmatched one fails."""
    taken: list[str] = []

    async def one_garbled(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", "1000000"),))
        async for data in requests:
            taken.append(DataRequest.from_bytes(data).request_id)
            if len(taken) == 2:
                await context.write(b"\xff\xff\xff")  # the first one's answer, garbled
                await context.write(data)  # the second's, echoed

    async with one_stream_to(one_garbled) as (pool, replicas, address):
        streams = replicas.get_all_connections()[0].stubs.streams
        first = asyncio.create_task(pool.call(request("/x", "one", request_id="one"), "dep", replicas, retries=0))
        await eventually(lambda: "one" in streams._lanes[0].pending)
        streams._turn = 0  # the same stream
        second = asyncio.create_task(pool.call(request("/x", "two", request_id="two"), "dep", replicas, retries=0))
        answer, _ = await asyncio.wait_for(second, 5)
        assert answer.request_id == "two" and answer.docs[0].text == "two"
        with pytest.raises(ReplicaError) as caught:
            await asyncio.wait_for(first, 5)
        assert f"{address} sent an unreadable answer on its request stream" in str(caught.value)
        assert not caught.value.unsent  # it may have run
        assert taken == ["one", "two"]
        await eventually(lambda: streams._lanes[0] is None)


async def test_requests_still_queued_when_a_stream_breaks_fail_as_never_sent():
    """A replica that stops reading holds the stream's writes; what still waits in the writer's queue when the
    stream breaks was never written and fails over as unsent, while what was written may have run."""
    stop = asyncio.Event()

    async def stalled(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", str(2**28)),))
        await requests.__anext__()
        await stop.wait()  # reads no more: HTTP/2's flow control holds the sender's writes
        await context.abort(grpc.StatusCode.INTERNAL, "gone")

    async with one_stream_to(stalled) as (pool, replicas, address):
        streams = replicas.get_all_connections()[0].stubs.streams
        calls, lane = [], streams._lanes[0]
        for number in range(60):
            streams._turn = 0  # each on the one open stream
            built = request("/x", "x" * 200_000, request_id=f"r{number}")
            calls.append(asyncio.create_task(pool.call(built, "dep", replicas, retries=0)))
            await eventually(lambda: len(lane.pending) == number + 1)
        await eventually(lambda: lane.writer.queued_bytes > 0)
        queued = len(lane.writer._queue)
        stop.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, ReplicaError) for outcome in outcomes), outcomes
        unsent = [outcome for outcome in outcomes if outcome.unsent]
        assert 0 < len(unsent) <= queued  # (one more may have gone to be written since)
        assert all(services.UNWRITTEN_DETAILS in str(outcome) for outcome in unsent)
        assert all("broke: INTERNAL" in str(outcome) for outcome in outcomes if not outcome.unsent)


@dataclasses.dataclass
class _HungWorker:
    """Two Sleepy workers behind a pool with request streams, the first (A) SIGSTOPped with 120 requests of 200 KB
    sent: ``written`` names those A's writers handed to gRPC's write (they may have reached it), ``runs`` holds a
    file per request naming each run."""

    workers: list
    pool: GrpcConnectionPool
    lanes: list
    victim: list
    written: set
    calls: dict
    runs: Path


@contextlib.asynccontextmanager
async def _hung_worker(tmp_path: Path, **pool_options):
    runs = tmp_path / "runs"
    runs.mkdir()
    uses = f"{Path(executors.__file__).resolve()}:Sleepy"
    workers = [
        ShardnetProcess(f"worker-{index}", ["worker", "--uses", uses, "--port", "0"], tmp_path / f"worker-{index}.log")
        for index in range(2)
    ]
    pool = GrpcConnectionPool(request_streams=True, ejection=None, **pool_options)
    try:
        for worker in workers:
            worker.launch()
        addresses = [await asyncio.to_thread(worker.wait_ready, 30.0) for worker in workers]
        for address in addresses:
            pool.add_connection("dep", address)
        connections = pool.get_replicas("dep").get_all_connections()

        async def streams_open() -> bool:  # the first calls go unary and connect the channels; streams open then
            warm = (pool.send_requests_once([request("/sleep", "warm")], "dep", timeout=5) for _ in range(16))
            await asyncio.gather(*warm)
            return all(c.stubs.streams.open_streams == len(c.stubs.streams._lanes) for c in connections)

        await eventually(streams_open, timeout=10)
        lanes = [lane for c in connections for lane in c.stubs.streams._lanes]
        victim = next(c for c in connections if str(c.address) == addresses[0]).stubs.streams._lanes
        written: set[str] = set()

        def recording(write):
            async def handed(message: bytes) -> None:
                written.add(DataRequest.from_bytes(message).request_id)
                await write(message)
            return handed

        for lane in victim:
            lane.writer._write = recording(lane.writer._write)
        os.kill(workers[0].pid, signal.SIGSTOP)
        calls = {}
        for index in range(120):  # some 12 MB to A, more than its transport takes in (4-5 MB) before writes block
            built = DataRequest([Document(id=f"q{index}", text="x" * 200_000)], endpoint="/sleep",
                                parameters={"record": str(runs)})
            built.header.request_id = f"q{index}"
            calls[f"q{index}"] = pool.send_requests_once([built], "dep", timeout=20)
        yield _HungWorker(workers, pool, lanes, victim, written, calls, runs)
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(workers[0].pid, signal.SIGCONT)
        await pool.close()
        for worker in workers:
            worker.kill()


async def test_requests_queued_for_a_killed_workers_streams_fail_over_under_at_most_once(tmp_path):
    """Worker A hung (SIGSTOP) holds its streams' writes, the requests behind them wait in the pool's writer
    queues; A is then killed -9. What was never handed to gRPC's write fails over as unsent, even under
    at-most-once (unsent_only); what was handed over may have run and fails; nothing runs twice. The writer
    emptied its queue as its blocked write failed, often before the reader asked what was never written: a
    review saw 44-59 of 59 failed as "the stream broke"."""
    from shardnet.networking.policies import RetryPolicy

    async with _hung_worker(tmp_path, retry=RetryPolicy(unsent_only=True)) as hung:
        calls, written = hung.calls, hung.written
        handed = [-1]

        def backed_up() -> bool:  # every request is on a stream or answered; A's writers hold some back, blocked
            placed = sum(len(lane.pending) for lane in hung.lanes) + sum(call.done() for call in calls.values())
            stalled, handed[0] = handed[0] == len(written), len(written)  # no write went out since the last look
            return placed == len(calls) and all(lane.writer._queue for lane in hung.victim) and stalled

        await eventually(backed_up, timeout=10, interval=0.2)
        hung.workers[0].kill()  # SIGKILL: its streams break under the writes they held
        outcomes = dict(zip(calls, await asyncio.gather(*calls.values(), return_exceptions=True)))
        ran = {path.name: len(path.read_text().split()) for path in hung.runs.iterdir()}
        failed = {name: outcome for name, outcome in outcomes.items() if isinstance(outcome, BaseException)}
        assert set(failed) == written, {name: str(failed[name])[-120:] for name in set(failed) - written}
        assert all(isinstance(outcome, ReplicaError) and not outcome.unsent for outcome in failed.values()), failed
        assert ran == {name: 1 for name in calls if name not in written}  # the rest ran once, on B; none twice
        assert len(set(calls) - written) >= len(calls) // 2 + 10  # (many that A's writers held back went over)


async def test_a_worker_takes_no_more_of_a_stream_than_it_works_on_at_once(runtimes, monkeypatch):
    """Handlers slower than the sender: every request written was worked on at once, and its answer held, however
    many came (a review: 12,000 requests grew a worker from 69 MB to 314 MB). Past STREAM_WORK_LIMIT a request is
    refused as never run, and the stream is still read: the CANCELLED of what is under way gets through (a
    first version stopped reading instead, and cancellations waited behind the requests unread)."""
    monkeypatch.setattr(worker_module, "STREAM_WORK_LIMIT", 8)
    worker = await start_worker(runtimes)
    channel, call = await open_stream(worker)
    try:
        for n in range(12):
            await call.write(request("/sleep", "s", request_id=f"r{n}", seconds=3600).to_bytes())
        refused = [DataRequest.from_bytes(await asyncio.wait_for(call.read(), 10)) for _ in range(4)]
        assert sorted(answer.request_id for answer in refused) == ["r10", "r11", "r8", "r9"]
        assert all(list(answer.status.exception.args) == ["UNAVAILABLE", services.BUSY_DETAILS] for answer in refused)
        assert worker.executor.most_sleeping == 8
        for n in range(8):  # the callers stop waiting
            await call.write(status_message(f"r{n}", grpc.StatusCode.CANCELLED, "gone"))
        acknowledged = [DataRequest.from_bytes(await asyncio.wait_for(call.read(), 10)) for _ in range(8)]
        assert all(answer.status.exception.args[0] == "CANCELLED" for answer in acknowledged)
        assert worker.executor.cancelled == 8
        await call.write(request("/sleep", "quick", request_id="quick").to_bytes())
        answer = DataRequest.from_bytes(await asyncio.wait_for(call.read(), 10))
        assert answer.request_id == "quick" and not answer.is_error
    finally:
        await channel.close()


def test_a_busy_workers_refusal_reads_as_never_run():
    from shardnet.networking.channels import never_reached
    from shardnet.networking.streams import rpc_error

    assert never_reached(rpc_error(grpc.StatusCode.UNAVAILABLE, services.BUSY_DETAILS))

async def test_a_stream_with_an_unreadable_answer_is_cut_once_only_what_may_be_garbled_waits():
    """A replica that answered one request unreadably and holds the stream open (a handler still under way):
    once the other's caller leaves, nothing waits but the garbled one, which fails then, not when (if ever) the
    replica ends the stream (a regression review: it waited for good, its lane never replaced)."""
    seen: list[str] = []

    async def garble_then_hold(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", "1000000"),))
        async for data in requests:
            received = DataRequest.from_bytes(data)
            if received.is_error and stream_status_error(received) is not None:  # a CANCELLED: acknowledged, as a worker does
                await context.write(status_message(received.request_id, grpc.StatusCode.CANCELLED, "cancelled"))
                continue
            seen.append(received.request_id)
            if len(seen) == 2:
                await context.write(b"\xff\xff\xff")  # the first one's answer, garbled; the second under way
        await asyncio.Event().wait()  # it holds the stream open

    async with one_stream_to(garble_then_hold) as (pool, replicas, address):
        streams = replicas.get_all_connections()[0].stubs.streams
        lane = streams._lanes[0]
        first = asyncio.create_task(pool.call(request("/x", "one", request_id="one"), "dep", replicas, retries=0))
        await eventually(lambda: "one" in lane.pending)
        streams._turn = 0
        second = asyncio.create_task(
            pool.call(request("/x", "two", request_id="two"), "dep", replicas, retries=0, timeout=0.5)
        )
        await eventually(lambda: "two" in lane.pending)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(second, 5)
        with pytest.raises(ReplicaError) as caught:
            await asyncio.wait_for(first, 5)
        assert f"{address} sent an unreadable answer on its request stream" in str(caught.value)
        await eventually(lambda: streams._lanes[0] is None)


async def test_a_garbled_answer_whose_caller_leaves_does_not_cut_a_request_still_under_way():
    """The garbled one's caller gave up; the other, still worked on, was failed as unreadable when the stream was
    cut on a count of what waited (a regression review). Its answer comes, and then the stream is cut."""

    async def garble_one_answer_two_later(requests, context):
        await context.send_initial_metadata((("shardnet-max-message-bytes", "1000000"),))
        taken = []
        async for data in requests:
            received = DataRequest.from_bytes(data)
            if received.is_error and stream_status_error(received) is not None:
                continue  # a CANCELLED of what it already answered: nothing to acknowledge
            taken.append(data)
            if len(taken) == 2:
                await context.write(b"\xff\xff\xff")  # one's answer, garbled
                await asyncio.sleep(1.0)
                await context.write(taken[1])  # two's, in time

    async with one_stream_to(garble_one_answer_two_later) as (pool, replicas, address):
        streams = replicas.get_all_connections()[0].stubs.streams
        lane = streams._lanes[0]
        first = asyncio.create_task(
            pool.call(request("/x", "one", request_id="one"), "dep", replicas, retries=0, timeout=0.3)
        )
        await eventually(lambda: "one" in lane.pending)
        streams._turn = 0
        second = asyncio.create_task(pool.call(request("/x", "two", request_id="two"), "dep", replicas, retries=0))
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(first, 5)
        answer, _ = await asyncio.wait_for(second, 5)
        assert answer.request_id == "two" and answer.docs[0].text == "two"
        await eventually(lambda: streams._lanes[0] is None)


async def test_a_request_a_busy_stream_refuses_goes_unary_to_the_same_replica(runtimes, monkeypatch):
    """A stream at its worker's limit of requests under way is full, not the worker: the refusal was a failure
    of the replica (three rebuilt its channel; with one replica, callers failed). The request goes unary there."""
    monkeypatch.setattr(worker_module, "STREAM_WORK_LIMIT", 0)
    worker = await start_worker(runtimes)
    async with GrpcConnectionPool(request_streams=True) as pool:
        pool.add_connection("dep", worker.server.address)
        connection = pool.get_replicas("dep").get_all_connections()[0]
        await asyncio.wait_for(connection.channel.channel_ready(), timeout=5)

        async def one_streamed() -> bool:
            [task] = pool.send_request(request("/sleep", "s"), "dep", timeout=5)
            answer, _ = await task
            assert not answer.is_error and answer.docs[0].text == "s"
            return connection.stubs.streams.streamed > 0

        await eventually(one_streamed, timeout=10)
        answers = await asyncio.gather(*(pool.send_request(request("/sleep", str(n)), "dep")[0] for n in range(20)))
        assert [answer.docs[0].text for answer, _ in answers] == [str(n) for n in range(20)]
        assert connection.failures == 0 and connection.stubs.streams.streamed > 1


async def test_an_error_request_passed_through_unchanged_gets_the_trailers_a_unary_call_gets(runtimes):
    """A request already marked ERROR that a worker passes back unchanged (no handler for its endpoint): a unary
    call's answer comes without ``is-error`` (the worker sets it only for a failure of its own); a streamed one
    came with it, so the trailers a caller saw depended on whether the stream had opened yet."""
    worker = await start_worker(runtimes, executors.KnownOnly)
    head = await start_head(runtimes, [worker])
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        call = channel.unary_unary(services.PROCESS_SINGLE_DATA)

        async def trailer_of(built: DataRequest) -> tuple:
            pending = call(built.to_bytes(), timeout=5, metadata=((services.ENDPOINT_METADATA, built.endpoint),))
            await pending
            return tuple(item for item in await pending.trailing_metadata() if item[0] == services.ERROR_METADATA)

        await eventually(lambda: _streams_open(head, trailer_of))
        failed = request("/other", "x")
        failed.set_error("an upstream executor failed", name="ValueError")
        streamed = streams_of(head).streamed
        assert await trailer_of(failed) == ()
        assert streams_of(head).streamed == streamed + 1  # it did go on a stream
        assert await trailer_of(request("/fail-not-bound", "y")) == ()  # and a plain pass-through has none either


async def _streams_open(head, trailer_of) -> bool:
    await asyncio.gather(*(trailer_of(request("/known", "warm-up")) for _ in range(8)))
    return streams_of(head).open_streams == len(streams_of(head)._lanes)


async def test_requests_taken_back_out_of_order_behind_a_stalled_stream_cost_no_search_and_are_let_go():
    """Behind a replica that stopped reading, every caller that leaves takes its request back out of the writer's
    queue (``withdraw``): that searched the queue, and callers leaving in another order than they came (mixed
    deadlines, cancellations) stalled the event loop quadratically (20,000 queued, taken back newest first: 20 s
    of a stalled head, deadlines firing that much late). Now each costs the same whatever the queue holds; what is
    taken back is skipped, never written, and its bytes are let go at once."""
    written: list[bytes] = []
    release = asyncio.Event()

    async def write(message: bytes) -> None:
        await release.wait()
        written.append(message)

    writer = streams.StreamWriter(write)
    first = b"first"
    writer.send(first)  # handed to the write, which blocks: no longer taken back
    await asyncio.sleep(0)
    messages = [f"m{index}".encode() * 10 for index in range(20_000)]
    for message in messages:
        writer.send(message)
    assert writer.full
    loop = asyncio.get_running_loop()
    started = loop.time()
    kept = messages[::1000]
    for message in reversed(messages):
        if message not in kept:
            assert writer.withdraw(message)
    assert loop.time() - started < 1.0
    assert not writer.withdraw(first) and not writer.withdraw(messages[1])  # being written; already taken back
    assert writer.queued_bytes == len(first) + sum(map(len, kept)) and not writer.full
    repeated = b"again"  # one object queued twice: taken back once, written once
    writer.send(repeated)
    writer.send(repeated)
    assert writer.withdraw(repeated)
    release.set()
    writer.finish()
    await asyncio.wait_for(writer.task, 5)
    assert written == [first, *kept, repeated] and writer.queued_bytes == 0
    assert not writer.withdraw(repeated)


async def stuck_writer() -> streams.StreamWriter:
    """A writer whose first message is being written, for ever (a replica that stopped reading): what is sent
    after it waits in the queue."""
    async def write(message: bytes) -> None:
        await asyncio.Event().wait()

    writer = streams.StreamWriter(write)
    writer.send(b"being written")
    await asyncio.sleep(0)
    return writer


async def test_a_stopped_writer_hands_back_only_what_was_not_taken_back():
    writer = await stuck_writer()
    queued = [b"a", b"b", b"c"]
    for message in queued:
        writer.send(message)
    assert writer.withdraw(queued[1])
    writer.task.cancel()
    await asyncio.gather(writer.task, return_exceptions=True)
    assert writer.take_queued() == [b"a", b"c"] and writer.queued_bytes == 0


async def test_requests_whose_attempt_timed_out_in_a_hung_workers_queue_fail_over_under_at_most_once(tmp_path):
    """Worker A hung (SIGSTOP); the requests its streams never wrote wait in the pool's writer queues until their
    attempt timeout takes them back. Never written, they never reached A, and go to B even under at-most-once
    (unsent_only), as those a broken stream leaves unwritten do; what was handed to gRPC's write may have reached A
    and fails. They failed as "may have run" (a review, head --at-most-once --attempt-timeout 1 over mutual TLS:
    150 of 300 answered ReplicaLost, 134 of them never run anywhere, the other worker idle)."""
    from shardnet.networking.policies import RetryPolicy

    retry = RetryPolicy(unsent_only=True, attempt_timeout=1.0)
    async with _hung_worker(tmp_path, balancer="round_robin", retry=retry) as hung:
        calls, written = hung.calls, hung.written
        outcomes = dict(zip(calls, await asyncio.gather(*calls.values(), return_exceptions=True)))
        os.kill(hung.workers[0].pid, signal.SIGCONT)
        failed = {name: outcome for name, outcome in outcomes.items() if isinstance(outcome, BaseException)}
        assert set(failed) <= written, {name: str(failed[name])[-160:] for name in set(failed) - written}
        assert all(isinstance(outcome, ReplicaError) and not outcome.unsent for outcome in failed.values()), failed
        # A, woken, reads what was written to it and the CANCELLED behind each, and answers every one
        await eventually(lambda: not any(lane.abandoned or lane.pending for lane in hung.victim), timeout=20)
        ran = {path.name: len(path.read_text().split()) for path in hung.runs.iterdir()}
        assert all(ran.get(name) == 1 for name in calls if name not in written)  # once, on B
        assert len(set(calls) - written) >= len(calls) // 2 + 10  # (many that A's writers held back went over)


async def test_random_interleavings_never_write_a_message_taken_back_and_keep_no_cells():
    """send / withdraw / writes completing in random order, with repeats of one object: what ``withdraw`` said was
    taken back is never written, everything else is written once per send, and the counts and cells end empty."""
    for seed in range(30):
        rng = random.Random(seed)
        gates: list[asyncio.Future] = []
        written: list[bytes] = []

        async def write(message: bytes) -> None:
            gate = asyncio.get_running_loop().create_future()
            gates.append(gate)
            await gate
            written.append(message)

        writer = streams.StreamWriter(write)
        objects = [bytes([index]) * (10 + index) for index in range(8)]
        sent: list[bytes] = []
        taken_back: list[bytes] = []
        for _ in range(300):
            op = rng.random()
            if op < 0.45:
                message = rng.choice(objects)
                writer.send(message)
                sent.append(message)
            elif op < 0.7:
                message = rng.choice(objects)
                if writer.withdraw(message):
                    taken_back.append(message)
            else:
                for gate in gates:
                    if not gate.done():
                        gate.set_result(None)
            await asyncio.sleep(0)
            live = [cell for cell in writer._queue if cell[0] is not None]
            assert writer._count == len(live)
            assert sum(len(cell) for cell in writer._cells.values()) == len(live)
            assert all(cell[0] is not None for cells in writer._cells.values() for cell in cells)
        writer.finish()
        while not writer.task.done():
            for gate in gates:
                if not gate.done():
                    gate.set_result(None)
            await asyncio.sleep(0)
        expected = list(sent)
        for message in taken_back:
            expected.remove(message)
        assert sorted(written) == sorted(expected)
        assert writer._cells == {} and writer._count == 0 and writer.queued_bytes == 0 and not writer._queue


async def test_cells_are_let_go_when_the_stream_breaks_and_its_queue_is_taken():
    async def write(message: bytes) -> None:
        raise streams.rpc_error(grpc.StatusCode.UNAVAILABLE, "broke")

    writer = streams.StreamWriter(write)
    for index in range(5):
        writer.send(b"x%d" % index)
    await asyncio.wait_for(writer.task, 5)
    assert len(writer._cells) == 4  # the first went to the failed write
    assert writer.take_queued() == [b"x1", b"x2", b"x3", b"x4"]
    assert writer._cells == {} and writer._count == 0 and writer.queued_bytes == 0


async def test_room_is_made_when_a_withdrawal_ends_fullness():
    writer = await stuck_writer()
    messages = [b"%d" % index for index in range(streams.WRITER_BACKLOG_MESSAGES)]
    for message in messages:
        writer.send(message)
    assert writer.full
    room = asyncio.ensure_future(writer.room())
    await asyncio.sleep(0)
    assert not room.done()
    assert writer.withdraw(messages[500])
    await asyncio.wait_for(room, 1)
    writer.task.cancel()
    await asyncio.gather(writer.task, return_exceptions=True)
