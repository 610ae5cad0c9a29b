"""Deadlines: the head passes its caller's remaining time on to the worker, and says who was too slow.

A head runs in the test's loop in front of either a recording replica (a raw
gRPC server that notes ``context.time_remaining()`` of every call it gets) or
a real Worker whose async handler sleeps, so the test sees what the next hop
sees and whether its work is stopped when the caller gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
import grpc.aio
import pytest

from shardnet import DataRequest, Document, Executor, GrpcConnectionPool, requests
from shardnet.networking.channels import Stubs
from shardnet.protocol import services
from shardnet.networking.policies import RetryPolicy
from shardnet.networking.polling import PollingMap
from shardnet.runtimes.head import Head
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker

pytestmark = pytest.mark.timeout(30)


class RecordingReplica:
    """A replica on loopback that records the deadline each call arrives with, then answers after ``delay``."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.remaining: list = []
        self.cancelled = asyncio.Event()
        self._server = grpc.aio.server()
        service, method = services.PROCESS_SINGLE_DATA.strip("/").split("/")
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(self._answer)})]
        )
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    async def _answer(self, payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.remaining.append(context.time_remaining())
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return payload

    async def __aenter__(self) -> "RecordingReplica":
        await self._server.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._server.stop(0)


class Sleeper(Executor):
    """``/sleep`` waits ``parameters['seconds']``; notes whether it finished or was stopped."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.finished = 0
        self.stopped = asyncio.Event()

    @requests(on="/sleep")
    async def sleep(self, docs, parameters, **kwargs):
        try:
            await asyncio.sleep(float(parameters["seconds"]))
        except asyncio.CancelledError:
            self.stopped.set()
            raise
        self.finished += 1


async def started_head(replica_address: str, **pool_options) -> Head:
    head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(**pool_options), connections={0: [replica_address]})
    await head.start()
    return head


async def call_head(head: Head, request: DataRequest, timeout) -> tuple[grpc.StatusCode, str, float]:
    """Call the head over a raw channel; return (status code, details, seconds taken)."""
    channel = grpc.aio.insecure_channel(head.server.address)
    try:
        started = time.monotonic()
        try:
            answer = await Stubs.for_channel(channel).single_data(request, timeout=timeout)
            return grpc.StatusCode.OK, answer.status.description, time.monotonic() - started
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", time.monotonic() - started
    finally:
        await channel.close()


async def test_worker_sees_the_callers_remaining_deadline():
    async with RecordingReplica() as replica:
        head = await started_head(replica.address)
        try:
            code, _, _ = await call_head(head, DataRequest(endpoint="/x"), timeout=2.0)
            assert code == grpc.StatusCode.OK
            code, _, _ = await call_head(head, DataRequest(endpoint="/x"), timeout=None)
            assert code == grpc.StatusCode.OK
        finally:
            await head.stop(0)
    with_deadline, without = replica.remaining
    assert with_deadline is not None and 1.0 < with_deadline <= 2.05  # what was left of the caller's 2 s
    assert without is None  # no deadline anywhere: none invented


async def test_heads_own_timeout_applies_when_the_caller_sets_none():
    async with RecordingReplica() as replica:
        head = await started_head(replica.address, timeout=0.8)
        try:
            code, _, _ = await call_head(head, DataRequest(endpoint="/x"), timeout=None)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK
    [remaining] = replica.remaining
    assert remaining is not None and 0.3 < remaining <= 0.85


async def test_callers_deadline_exceeded_names_deployment_and_shard_and_stops_the_worker():
    """The caller gives up after 2.5 s: the answer names the head's deployment and shard, the replica's work is cancelled."""
    async with RecordingReplica(delay=5.0) as replica:
        head = await started_head(replica.address)
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=2.5)
            await asyncio.wait_for(replica.cancelled.wait(), 2.0)  # the next hop stopped too
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 3.5
    assert "deployment 'dl'" in details and "shard 0" in details and replica.address in details, details
    # not only gRPC's "Deadline Exceeded" after the replica's address, which reads as that replica hung: an
    # overload review's callers saw nothing else while the head queued far more than its workers could answer
    assert "the caller's deadline ran out, 1 request under way at this head" in details, details
    assert "--max-in-flight" not in details, details  # one request on one replica: no queue, a slow replica


async def test_a_callers_deadline_running_out_behind_more_requests_than_replicas_suggests_max_in_flight():
    """Requests queued at a head without --max-in-flight: the caller is told it queues all it is sent, and how to
    refuse the excess (an overload review's callers saw nothing else than 'Deadline Exceeded')."""
    async with RecordingReplica(delay=5.0) as replica:
        head = await started_head(replica.address)
        try:
            # 3 s: the head answers a quarter second before the caller gives up, room for a loaded machine
            answers = await asyncio.gather(
                *(call_head(head, DataRequest(endpoint="/x"), timeout=3.0) for _ in range(3))
            )
        finally:
            await head.stop(0)
    assert {code for code, _, _ in answers} == {grpc.StatusCode.DEADLINE_EXCEEDED}, answers
    assert any("requests under way at this head, which queues all it is sent" in details
               and "--max-in-flight" in details for _, details, _ in answers), answers


@pytest.mark.parametrize("polling", ["ANY", "ALL"])
async def test_a_callers_deadline_running_out_below_a_head_of_heads_is_deadline_exceeded_at_the_top(polling):
    """The inner head gives up a margin before the deadline it was given, so its DEADLINE_EXCEEDED came back before
    the outer head's own margin, and the outer head answered it as a replica's loss (ERROR) though the deadline
    was the caller's (a regression review's find)."""
    async with RecordingReplica(delay=5.0) as replica:
        inner = await started_head(replica.address)
        outer = Head("outer", ServerConfig(), pool=GrpcConnectionPool(), connections={0: [inner.server.address]},
                     polling=PollingMap.parse(polling))
        await outer.start()
        try:
            code, details, took = await call_head(outer, DataRequest(endpoint="/x"), timeout=2.0)
        finally:
            await outer.stop(0)
            await inner.stop(0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 2.5, (code, details)


async def test_at_most_once_a_callers_deadline_the_head_gives_up_on_first_is_answered_error():
    """The head gives up a margin before its caller; its DEADLINE_EXCEEDED, which Jina's pool sends again with a
    fresh deadline to another replica or shard, ran an --at-most-once request 4 times (a regression review's find)."""
    from shardnet import RetryPolicy

    async with RecordingReplica(delay=5.0) as replica:
        head = await started_head(replica.address, retry=RetryPolicy(unsent_only=True))
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=1.5)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK and details.startswith("DEADLINE_EXCEEDED: ") and "may have run it" in details
    assert took < 1.5


@pytest.mark.parametrize("more", [0.4, 5.0])
async def test_the_heads_own_timeout_is_answered_error_whatever_the_callers_longer_deadline(more):
    """A caller's deadline a little longer than the head's --timeout: the ANY path looked at the time left to
    send elsewhere, which noted the caller's deadline as the hop's bound, and the head's own timeout was answered
    DEADLINE_EXCEEDED, which Jina's pool sent again, 4 runs (a regression review's find)."""
    async with RecordingReplica(delay=5.0) as replica:
        head = await started_head(replica.address, timeout=0.6)
        try:
            code, details, _ = await call_head(head, DataRequest(endpoint="/x"), timeout=0.6 + more)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK and details.startswith("DEADLINE_EXCEEDED: ") and "may have run it" in details


async def test_a_request_sent_on_to_another_shard_ends_with_that_shards_status(dead_address):
    """Shard 0 dead, shard 1 hung past the caller's deadline: the answer carried the first shard's UNAVAILABLE, as
    a replica lost with it (ERROR), instead of the caller's DEADLINE_EXCEEDED (a regression review's find)."""
    async with RecordingReplica(delay=5.0) as hung:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(), connections={0: [dead_address], 1: [hung.address]})
        await head.start()
        try:
            outcomes = [await call_head(head, DataRequest(endpoint="/x"), timeout=1.5) for _ in range(2)]
        finally:
            await head.stop(0)
    assert [code for code, _, _ in outcomes] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2, outcomes


async def test_heads_own_timeout_exceeded_names_deployment_and_shard():
    """Answered ERROR, not DEADLINE_EXCEEDED, which Jina's pool sends again: the replica may have run it."""
    async with RecordingReplica(delay=5.0) as replica:
        head = await started_head(replica.address, timeout=0.4)
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=None)
            await asyncio.wait_for(replica.cancelled.wait(), 2.0)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK and details.startswith("DEADLINE_EXCEEDED: ") and "may have run it" in details
    assert took < 2.0
    assert "deployment 'dl'" in details and "shard 0" in details and replica.address in details, details


async def test_the_heads_timeout_bounds_a_callers_longer_deadline():
    """As Jina's head holds its calls to its timeout_send whatever the caller sent: a caller allowing 3 s of a head
    whose --timeout is 0.3 s hears from the head after 0.3 s (an ERROR answer: its replica may have run it), not
    the replica's answer at 0.6 s."""
    async with RecordingReplica(delay=0.6) as replica:
        head = await started_head(replica.address, timeout=0.3)
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=3.0)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK and details.startswith("DEADLINE_EXCEEDED: "), details
    assert "deployment 'dl'" in details and replica.address in details, details
    assert took < 2.0
    assert replica.remaining[0] <= 0.35


async def test_the_heads_timeout_bounds_each_hop_not_their_sum_as_jinas_timeout_send():
    """uses_before and the shard take 0.6 s each under a head whose --timeout is 1 s: Jina's head, giving each
    send its timeout_send, answers; a first version gave both hops one second together and failed."""
    async with RecordingReplica(delay=0.6) as before, RecordingReplica(delay=0.6) as replica:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(timeout=1.0), connections={0: [replica.address]},
                    uses_before=before.address)
        await head.start()
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=None)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK, details
    assert took > 1.1
    assert before.remaining[0] <= 1.05 and replica.remaining[0] <= 1.05  # each hop given the head's timeout


async def test_a_callers_shorter_deadline_wins_over_the_heads_timeout():
    async with RecordingReplica() as replica:
        head = await started_head(replica.address, timeout=30.0)
        try:
            code, _, _ = await call_head(head, DataRequest(endpoint="/x"), timeout=2.0)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK
    assert 1.0 < replica.remaining[0] <= 2.05


async def test_a_real_workers_handler_is_stopped_when_the_caller_gives_up():
    executor = Sleeper.create()
    worker = Worker(executor, ServerConfig())
    await worker.start()
    try:
        head = await started_head(worker.server.address)
        try:
            request = DataRequest(docs=[Document(text="a")], endpoint="/sleep", parameters={"seconds": 5})
            code, details, took = await call_head(head, request, timeout=2.5)
            await asyncio.wait_for(executor.stopped.wait(), 2.0)
            quick = DataRequest(docs=[Document(text="b")], endpoint="/sleep", parameters={"seconds": 0})
            after, _, _ = await call_head(head, quick, timeout=5.0)  # the worker still serves
        finally:
            await head.stop(0)
    finally:
        await worker.stop(0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 3.5
    assert "deployment 'dl'" in details and "shard 0" in details, details
    assert executor.finished == 1 and after == grpc.StatusCode.OK


@pytest.mark.parametrize("polling", ["ANY", "ALL"])
async def test_each_hop_is_given_what_is_left_of_the_callers_time_not_the_whole_again(polling):
    """uses_before took half the caller's time, and the shard was given the whole of it again: the caller's
    deadline passed first, and it got a bare "Deadline Exceeded" instead of the head's error naming the shard
    (under ALL with uses_after, the other shards' answers were lost with it). Found by a head review."""
    async with RecordingReplica(delay=0.5) as before, RecordingReplica(delay=5.0) as shard:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(), connections={0: [shard.address]},
                    uses_before=before.address, polling=PollingMap.parse(polling))
        await head.start()
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=1.5)
        finally:
            await head.stop(0)
    assert took < 1.5
    if polling == "ANY":
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deployment 'dl'" in details and "shard 0" in details and shard.address in details, details
    [given] = shard.remaining
    assert given is not None and given < 1.05  # what was left after uses_before, less the margin


def _failed_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "shardnet.runtimes.head" and r.levelno >= logging.WARNING and "failed" in r.getMessage()]


async def test_a_callers_own_deadline_is_logged_as_the_callers_not_blamed_on_the_replica(caplog, eventually):
    """A caller's short deadline, a healthy replica: the head's WARNING blamed "replica ADDRESS: DEADLINE_EXCEEDED"
    once a second (1,200 lines in a 20-minute soak), as if the replica had failed (a soak review's find)."""
    caplog.set_level(logging.INFO)
    async with RecordingReplica(delay=3.0) as replica:
        head = await started_head(replica.address)
        try:
            code, _, _ = await call_head(head, DataRequest(endpoint="/x"), timeout=0.3)
            # the caller's deadline can pass a moment before the head's own ends and it logs (a loaded run stopped
            # the head in between)
            with contextlib.suppress(AssertionError):
                await eventually(lambda: _failed_lines(caplog), timeout=5.0)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    lines = _failed_lines(caplog)
    assert lines, "the head logs the request it gave up on"
    # the replica was healthy and answering in its time: the caller chose 0.3 s
    assert all("the caller's deadline" in line for line in lines), lines


async def test_the_heads_own_timeout_is_still_a_shard_failure(caplog):
    caplog.set_level(logging.INFO)
    async with RecordingReplica(delay=3.0) as replica:
        head = await started_head(replica.address, timeout=0.3)
        try:
            await call_head(head, DataRequest(endpoint="/x"), timeout=None)
        finally:
            await head.stop(0)
    lines = _failed_lines(caplog)
    assert lines and not any("the caller's deadline" in line for line in lines), lines


async def test_heads_own_timeout_on_a_shard_is_not_blamed_on_the_caller_under_uses_after(caplog):
    # uses_after's hop, bound by what was left of the caller's deadline, ran after the shards and made the head's
    # own --timeout on shard 1 read as the caller's (a regression review's find)
    caplog.set_level(logging.INFO)
    async with RecordingReplica(delay=0.0) as fast, RecordingReplica(delay=3.0) as slow, \
            RecordingReplica(delay=0.0) as after:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(timeout=0.6),
                    connections={0: [fast.address], 1: [slow.address]}, uses_after=after.address,
                    polling=PollingMap.parse("ALL"))
        await head.start()
        try:
            # the caller waits 1.0 s; the head's --timeout (0.6 s) cuts shard 1 well before that
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=1.0)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK, (code, details)
    lines = _failed_lines(caplog)
    assert lines, "the head logs the shard that failed"
    assert not any("the caller's deadline" in line for line in lines), lines


@pytest.mark.parametrize("hop", ["uses_before", "shard", "uses_after"])
async def test_the_heads_own_timeout_is_named_in_the_answer(hop):
    """A hop cut by the head's --timeout was answered "DEADLINE_EXCEEDED: ... Deadline Exceeded (a replica may
    have run it ...)", on a call whose caller allowed 10 s: nothing said the head's own timeout ran out, which
    read as the caller's deadline (a hops-under-faults review's find)."""
    async with RecordingReplica(delay=5.0 if hop == "uses_before" else 0) as before, \
            RecordingReplica(delay=5.0 if hop == "shard" else 0) as shard, \
            RecordingReplica(delay=5.0 if hop == "uses_after" else 0) as after:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(timeout=0.4), connections={0: [shard.address]},
                    uses_before=before.address, uses_after=after.address)
        await head.start()
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=10)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK and details.startswith("DEADLINE_EXCEEDED: ") and "may have run it" in details
    assert "the head's timeout of 0.4s for each hop ran out" in details, details
    assert took < 2.0


@pytest.mark.parametrize("attempt", [0.3, 0.5, 2.0])
async def test_heads_timeout_note_with_an_attempt_timeout(attempt):
    """--timeout 0.5 cuts the hop, the caller allowed 10 s: with an attempt timeout shorter than it, the answer said
    the caller's deadline ended the last attempt, and no note named the head's timeout (a regression review)."""
    async with RecordingReplica(delay=5.0) as one, RecordingReplica(delay=5.0) as two:
        pool = GrpcConnectionPool(timeout=0.5, retry=RetryPolicy(attempt_timeout=attempt,
                                                                 retry_on=frozenset({grpc.StatusCode.UNAVAILABLE})))
        head = Head("dl", ServerConfig(), pool=pool, connections={0: [one.address, two.address]})
        await head.start()
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=10)
        finally:
            await head.stop(0)
    assert "the head's timeout of 0.5s for each hop ran out" in details, details


class AbortingReplica(RecordingReplica):
    """A replica that answers DEADLINE_EXCEEDED at once (its own deadline on something it called, say)."""

    async def _answer(self, payload, context):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "its own downstream deadline")


async def test_a_replicas_own_deadline_exceeded_is_not_blamed_on_the_heads_timeout():
    """A replica answering DEADLINE_EXCEEDED at once (its own downstream deadline) was said to have run out the
    head's --timeout of 5 s (a regression review)."""
    async with AbortingReplica() as replica:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(timeout=5.0), connections={0: [replica.address]})
        await head.start()
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=10)
        finally:
            await head.stop(0)
    assert took < 1.0
    assert "the head's timeout" not in details, details


@pytest.mark.parametrize("uses_after", [False, True])
async def test_all_one_shard_cut_by_the_heads_timeout(uses_after):
    """Under ALL, a shard the head's --timeout cut while the other answered was named without the note said when
    every shard fails (a regression review)."""
    async with RecordingReplica(delay=5.0) as hung, RecordingReplica() as fine, RecordingReplica() as after:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(timeout=0.4),
                    connections={0: [hung.address], 1: [fine.address]}, polling=PollingMap.parse("ALL"),
                    uses_after=after.address if uses_after else None)
        await head.start()
        try:
            code, details, took = await call_head(head, DataRequest(endpoint="/x"), timeout=10)
        finally:
            await head.stop(0)
    assert code == grpc.StatusCode.OK and "shard 0 of 'dl' failed" in details, details
    assert "the head's timeout of 0.4s for each hop ran out" in details, details


async def test_under_all_the_queue_is_counted_per_shard_not_over_the_replicas_of_every_shard():
    """Each request takes a replica of every shard: 3 requests over 3 shards of one replica each are 3 on each
    replica, queued as 9 over 3 replicas of one shard are under ANY; summing the replicas of every shard said no
    queue (a regression review)."""
    async with RecordingReplica(delay=5.0) as a, RecordingReplica(delay=5.0) as b, RecordingReplica(delay=5.0) as c:
        head = Head("dl", ServerConfig(), pool=GrpcConnectionPool(), polling=PollingMap({"/x": "ALL"}),
                    connections={0: [a.address], 1: [b.address], 2: [c.address]})
        await head.start()
        try:
            # 3 s: the head answers a quarter second before the caller gives up, room for a loaded machine
            answers = await asyncio.gather(
                *(call_head(head, DataRequest(endpoint="/x"), timeout=3.0) for _ in range(3))
            )
        finally:
            await head.stop(0)
    assert {code for code, _, _ in answers} == {grpc.StatusCode.DEADLINE_EXCEEDED}, answers
    assert any("--max-in-flight" in details for _, details, _ in answers), answers
