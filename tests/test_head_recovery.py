"""How a head recovers from workers that stall, die or come back: requests held by a worker whose lease lapsed
fail over at once, a worker restarted on its address is back in rotation at its next ACTIVATE, ANY leaves a
shard whose only replica is dead, and a lapse is explained by what the worker announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path
from typing import AsyncIterator

import executors
import grpc
import pytest
from test_head import head_over, send, shard_workers

from shardnet import ControlRequest, DataRequest, Document, GrpcConnectionPool, ReplicaError, RetryBudget, RetryPolicy
from shardnet.networking import oneshot
from shardnet.networking.policies import EjectionPolicy
from shardnet.networking.polling import PollingMap
from shardnet.networking.replica_list import ReplicaList
from shardnet.runtimes.head import LAPSED_LEASE_GRACE, Head
from shardnet.runtimes.processes import ShardnetProcess
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker

EXECUTORS = Path(executors.__file__).resolve()


def sleepy_workers(head: Head, folder: Path, shards: list[int], register_interval: float) -> list[ShardnetProcess]:
    """Worker processes of ``executors.Sleepy`` registering with ``head``, one per entry of ``shards`` (its id)."""
    return [
        ShardnetProcess(
            f"worker-{n}",
            ["worker", "--uses", f"{EXECUTORS}:Sleepy", "--port", "0", "--head", head.server.address,
             "--shard-id", str(shard), "--register-interval", str(register_interval),
             "--name", f"worker-{n}"],  # what its route entries say (the name's first part, as Jina's do)
            folder / f"worker-{n}.log",
        )
        for n, shard in enumerate(shards)
    ]


async def launched(workers: list[ShardnetProcess]) -> list[str]:
    """Launch ``workers``; their addresses once each serves."""
    for worker in workers:
        worker.launch()
    return [await asyncio.to_thread(worker.wait_ready, 30.0) for worker in workers]


async def two_replicas_of_shard_0(head: Head, folder: Path, eventually, register_interval: float):
    """Two Sleepy worker processes registering with ``head`` as shard 0's replicas, once it routes to both:
    (workers, their addresses, the shard's replica list); the caller kills them."""
    workers = sleepy_workers(head, folder, shards=[0, 0], register_interval=register_interval)
    try:
        addresses = await launched(workers)
        replicas = head.pool.get_replicas(head.deployment, shard_id=0)
        await eventually(lambda: sorted(replicas.addresses) == sorted(addresses), timeout=10.0)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers, addresses, replicas


async def one_worker_a_shard(head: Head, folder: Path, eventually) -> list[ShardnetProcess]:
    """Two Sleepy worker processes registering with ``head`` (every 0.2 s), shard 0's and shard 1's, once it routes
    to both; the caller kills them."""
    workers = sleepy_workers(head, folder, shards=[0, 1], register_interval=0.2)
    try:
        addresses = await launched(workers)
        await eventually(lambda: head.pool.deployments[head.deployment]["shards"] == {0: [addresses[0]],
                                                                                      1: [addresses[1]]}, timeout=10.0)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


# -- a lapsed lease cuts what the worker held ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("request_streams", [True, False], ids=["streams", "unary"])
async def test_requests_held_by_a_stopped_worker_are_answered_by_the_other_once_its_lease_lapses(
    runtimes, eventually, tmp_path, request_streams
):
    """Without an attempt timeout (the default), a SIGSTOPped worker's requests waited for keepalive (20-30 s)
    after its lease lapsed, since a removed replica keeps its channel for the calls on it: a lapse now cuts them
    and they fail over to the live replica."""
    head = await runtimes(Head("stalled", lease=1.5, request_streams=request_streams))
    workers, addresses, replicas = await two_replicas_of_shard_0(head, tmp_path, eventually, 0.25)
    try:
        connections = {str(connection.address): connection for connection in replicas.get_all_connections()}
        stopped, live = workers[0], workers[1]

        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 1.0})
        pending = [
            asyncio.create_task(oneshot.send_request_async(request, head.server.address, timeout=20.0))
            for _ in range(6)
        ]
        # both workers hold some (the head's balancer spreads them); then one stops, holding its share
        await eventually(lambda: all(c.running.count for c in connections.values()), timeout=5.0, interval=0.005)
        stopped.signal(signal.SIGSTOP)
        held = connections[stopped.address].running.count
        assert held >= 1
        began = time.monotonic()

        answers = await asyncio.wait_for(asyncio.gather(*pending), 8.0)
        took = time.monotonic() - began
        assert [answer.docs[0].tags["slept"] for answer in answers] == [1.0] * 6
        assert stopped.alive and replicas.addresses == [live.address]  # so the live one answered them all
        # the lease (1.5 s, checked every 0.375 s), the cut's grace (0.5 s), then 1 s on the live worker
        assert took < 6.0, f"answered {took:.1f}s after the stop"
    finally:
        for worker in workers:
            worker.signal(signal.SIGCONT)
            worker.kill()


async def test_a_removal_with_no_grace_cuts_the_calls_on_the_replica_as_unavailable(echo_servers, eventually):
    """``remove_connection(grace=0)``: what the replica held ends UNAVAILABLE naming it, which the pool fails
    over; the default grace still lets calls finish (DEACTIVATE, drains)."""
    slow, patient = await echo_servers(2, delay=1.0)
    replicas = ReplicaList()
    try:
        for server in (slow, patient):
            replicas.add_connection(server.address)
        by_address = {str(c.address): c for c in replicas.get_all_connections()}
        request = DataRequest(endpoint="/x")
        cut = asyncio.create_task(replicas.call(by_address[slow.address], "single_data", request, None, None))
        kept = asyncio.create_task(replicas.call(by_address[patient.address], "single_data", request, None, None))
        await eventually(lambda: slow.calls and patient.calls, timeout=5.0)  # each server holds its call
        began = time.monotonic()
        await replicas.remove_connection(slow.address, grace=0)
        await replicas.remove_connection(patient.address)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(cut, 1.0)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and slow.address in caught.value.details()
        assert time.monotonic() - began < 1.0
        response, _ = await asyncio.wait_for(kept, 5.0)  # the default grace: answered
        assert response is not None
    finally:
        await replicas.close()


# -- a worker restarted on its address ---------------------------------------------------------------------------


async def test_a_worker_restarted_on_its_address_is_back_in_rotation_at_its_next_activate(runtimes, eventually):
    """Killed, ejected while dead, restarted on the same port: its ACTIVATE (the address already known) changed
    nothing, and it got no traffic until its probe, up to 30 s later. Its channel was in reconnect backoff too.
    The new process names a new instance; a renewal naming the old one (a hung replica renewing) changes nothing."""
    pool = GrpcConnectionPool(
        balancer="round_robin", request_streams=True, ejection=EjectionPolicy(base_ejection=30.0, max_ejection=30.0)
    )
    head = await runtimes(Head("restarts", pool=pool))
    steady = await runtimes(Worker(executors.Tagger.create({}, label="steady")))
    flaky = await runtimes(Worker(executors.Tagger.create({}, label="first")))
    port = int(flaky.server.address.rsplit(":", 1)[1])
    for worker, instance in ((steady, "steady"), (flaky, "first")):
        host, worker_port = worker.server.address.rsplit(":", 1)
        await oneshot.activate_worker(
            host, int(worker_port), head.server.address, shard_id=0, renews_every=1.0, instance=instance
        )
    replicas = head.pool.get_replicas("restarts", shard_id=0)

    await flaky.stop(0)  # as good as killed: its port refuses connections

    async def ejected() -> bool:
        answer = await send(head.server.address, "/tag", [Document()], timeout=5)  # failed over: still answered
        assert answer.docs[0].tags["by"] == "steady"
        return replicas.ejected_addresses == [flaky.server.address]

    await eventually(ejected, timeout=5.0, interval=0.0)
    [connection] = [c for c in replicas.get_all_connections() if str(c.address) == flaky.server.address]
    assert not await connection.health()  # a probe's look while it was dead: the channel backs off reconnecting

    restarted = await runtimes(Worker(executors.Tagger.create({}, label="restarted"), ServerConfig(port=port)))
    assert restarted.server.address == flaky.server.address
    await oneshot.activate_worker(
        "127.0.0.1", port, head.server.address, shard_id=0, renews_every=1.0, instance="first"
    )  # the same process renewing: its ejection runs its course
    assert replicas.ejected_addresses == [flaky.server.address]
    assert replicas._probes[connection].get_name() != "shardnet-readmission"
    await oneshot.activate_worker(
        "127.0.0.1", port, head.server.address, shard_id=0, renews_every=1.0, instance="second"
    )
    await eventually(lambda: replicas.ejected_addresses == [], timeout=3.0)
    labels = {(await send(head.server.address, "/tag", [Document()], timeout=5)).docs[0].tags["by"] for _ in range(4)}
    assert labels == {"steady", "restarted"}


async def test_only_an_ejected_replica_is_checked_and_one_check_at_a_time(echo_servers):
    replicas = ReplicaList(ejection=EjectionPolicy(consecutive_failures=1, base_ejection=30.0, max_ejection=30.0))
    try:
        sick, other = await echo_servers(2)
        connection = replicas.add_connection(sick.address)
        replicas.add_connection(other.address)
        assert not replicas.readmit_if_healthy(sick.address)  # not ejected: nothing to do
        replicas.record_failure(connection, grpc.StatusCode.UNAVAILABLE)
        assert replicas.ejected_addresses == [sick.address]
        assert replicas.readmit_if_healthy(sick.address)
        assert not replicas.readmit_if_healthy(sick.address)  # one under way
        probes = dict(replicas._probes)
        await asyncio.wait_for(asyncio.gather(*probes.values(), return_exceptions=True), 5.0)
        assert replicas.ejected_addresses == []  # SERVING: back in at once, not after 30 s
    finally:
        await replicas.close()


# -- ANY and a dead shard ------------------------------------------------------------------------------------------


async def test_any_leaves_a_shard_whose_only_replica_is_dead_for_a_live_shard_and_all_does_not(
    runtimes, dead_address, caplog
):
    """shards=2, replicas=1, one worker killed: half of the ANY requests failed UNAVAILABLE until its lease
    lapsed, as rotation kept choosing its shard (a shard's last replica is never ejected). ALL still names the
    dead shard, and ANY fails as before once no shard has a live replica."""
    caplog.set_level(logging.DEBUG, logger="shardnet.runtimes.head")
    [live] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await head_over(runtimes, "halves", [live], '{"/count": "ALL", "*": "ANY"}')
    head.pool.add_connection("halves", dead_address, shard_id=1)  # shard 1's only worker, dead
    for _ in range(6):
        response = await send(head.server.address, "/tag", [Document()], timeout=5)
        assert not response.is_error and response.docs[0].tags["shard"] == 0
    assert live.executor.calls == 6
    rerouted = [r for r in caplog.records if "sending the ANY request to shard 0 instead" in r.getMessage()]
    assert len(rerouted) == 3 and all(r.levelno == logging.DEBUG for r in rerouted)  # every other one, quietly
    assert f"shard 1, replica {dead_address}: UNAVAILABLE" in rerouted[0].getMessage()

    response = await send(head.server.address, "/count", [Document()], timeout=5)  # ALL: not sent elsewhere
    assert response.is_error and "shard 1" in response.status.description
    await live.stop(0)  # no shard has a live replica now: the failure is the caller's to see
    with pytest.raises(ReplicaError) as caught:
        for _ in range(2):  # whichever shard rotation picks first
            await send(head.server.address, "/tag", [Document()], timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_request_both_shards_fail_names_both_and_the_first_failure_keeps_its_code(
    runtimes, dead_address
):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:  # a second address nothing listens on
        holder.bind(("127.0.0.1", 0))
        other_dead = f"127.0.0.1:{holder.getsockname()[1]}"
        head = await runtimes(Head("gone", connections={0: [dead_address], 1: [other_dead]}))
        with pytest.raises(ReplicaError) as caught:
            await send(head.server.address, "/tag", [Document()], timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    message = str(caught.value)
    assert "which failed too" in message and dead_address in message and other_dead in message, message
    assert "shard 0" in message and "shard 1" in message


async def test_an_any_request_sent_on_from_a_dead_shard_passes_over_another_dead_one(runtimes, dead_address):
    """Two of four shards' only workers dead (a static list, or leases not lapsed yet): a request sent on from a
    dead shard went, a time in three, to the other dead one and failed, while two shards served (a review found
    20 of 120 failed). A shard whose attempt just failed unsent is passed over while another is fresh."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:  # a second address nothing listens on
        holder.bind(("127.0.0.1", 0))
        other_dead = f"127.0.0.1:{holder.getsockname()[1]}"
        workers = await shard_workers(runtimes, executors.Tagger, 2)
        head = await runtimes(Head("quarters", connections={
            0: [workers[0].server.address], 1: [dead_address], 2: [workers[1].server.address], 3: [other_dead],
        }))
        answers = [await send(head.server.address, "/tag", [Document()], timeout=5) for _ in range(24)]
    assert not any(answer.is_error for answer in answers)
    assert sum(worker.executor.calls for worker in workers) == 24


async def test_a_request_no_worker_took_goes_to_another_shard_even_with_the_retry_budget_spent(
    runtimes, dead_address
):
    # the dead shard's own failover spends the budget under steady traffic; a resend charged to it as well failed
    # a third of all requests while the dead worker's lease ran, though going elsewhere adds no load
    [live] = await shard_workers(runtimes, executors.Tagger, 1)
    pool = GrpcConnectionPool(retry_budget=RetryBudget(ratio=0.0, min_per_second=0.0))
    head = await head_over(runtimes, "halves", [live], "ANY", pool=pool)
    head.pool.add_connection("halves", dead_address, shard_id=1)
    answers = await asyncio.gather(*(send(head.server.address, "/tag", [Document()], timeout=5) for _ in range(4)))
    assert all(answer.docs[0].tags["shard"] == 0 for answer in answers) and live.executor.calls == 4
    assert head.pool.retry_budget.refused >= 2  # the dead shard's own retries were refused: only routing helped


@pytest.mark.timeout(60)
async def test_a_stalled_only_replica_keeps_what_it_holds_when_its_lease_lapses(
    runtimes, eventually, tmp_path, caplog
):
    """A shard whose only worker stalls past its lease: cutting what it held would only fail it, or send it to
    another shard while the stalled worker may still run it (stored twice). It is left to the worker, which
    answers once it resumes."""
    head = await runtimes(Head("split", lease=1.0))
    workers = await one_worker_a_shard(head, tmp_path, eventually)
    try:
        stalled_replicas = head.pool.get_replicas("split", shard_id=0)
        [connection] = stalled_replicas.get_all_connections()
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 0.5})
        # ANY rotates over the shards: of two requests in a row, one is shard 0's
        pending = [
            asyncio.create_task(oneshot.send_request_async(request, head.server.address, timeout=30))
            for _ in range(2)
        ]
        await eventually(lambda: connection.running.count == 1, timeout=5.0, interval=0.005)
        workers[0].signal(signal.SIGSTOP)
        await eventually(lambda: not stalled_replicas.addresses, timeout=10.0)  # its lease lapsed: removed
        held = [task for task in pending if not task.done()]
        assert held
        # said when it holds some (once the removal, awaited before it, is done)
        await eventually(lambda: "can take the requests it holds: they wait for it" in caplog.text, timeout=5.0)
        # past the grace a cut would have had (an absence: a bounded wait, nothing to poll), neither cut nor sent on
        done, _ = await asyncio.wait(held, timeout=LAPSED_LEASE_GRACE + 1.0)
        assert not done, [task.result() for task in done]
        workers[0].signal(signal.SIGCONT)
        answers = await asyncio.wait_for(asyncio.gather(*held), 20.0)
        assert all(answer.routes[-1].executor == "worker-0" for answer in answers), [
            answer.routes[-1].executor for answer in answers
        ]
    finally:
        for worker in workers:
            worker.signal(signal.SIGCONT)
            worker.kill()


async def test_any_with_uses_after_leaves_a_shard_whose_only_replica_is_dead(runtimes, dead_address):
    after = await runtimes(Worker(executors.CountingAfter.create()))
    [live] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await head_over(runtimes, "halves", [live], "ANY", uses_after=after.server.address)
    head.pool.add_connection("halves", dead_address, shard_id=1)
    for _ in range(4):
        response = await send(head.server.address, "/tag", [Document(id="d")], timeout=5)
        assert not response.is_error, response.status.description
        assert response.docs[0].tags["shards"] == [0]  # uses_after received shard 0's answer, each time
    assert live.executor.calls == 4


# -- what a lapse is blamed on -------------------------------------------------------------------------------------


async def test_a_worker_back_after_its_lease_lapsed_is_told_why_by_the_interval_it_announced(
    runtimes, eventually, caplog
):
    """A lease several times the interval a worker announced, lapsed: the worker stalled (a paused process, a
    blocked loop), yet the head said to give it a --lease longer than the interval. That advice stays for a lease
    under two intervals, or when no interval was said. The workers here are ACTIVATEs only, on ports held free."""
    head = await runtimes(Head("leased", lease=0.6))
    holders = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for holder in holders:
            holder.bind(("127.0.0.1", 0))
        stalled_port, short_port, silent_port = (holder.getsockname()[1] for holder in holders)
        cases = {
            stalled_port: (0.1, "it did not renew for the whole lease, so it stalled"),  # six intervals, none came
            short_port: (0.5, "give the head a --lease longer than the worker's --register-interval"),  # too short
            silent_port: (None, "give the head a --lease longer than the worker's --register-interval"),  # none said
        }
        for port, (interval, _) in cases.items():
            await oneshot.activate_worker("127.0.0.1", port, head.server.address, shard_id=0, renews_every=interval)
        await eventually(lambda: caplog.text.count("stopped renewing") == 3, timeout=5.0)
        for port, (interval, blamed) in cases.items():
            await oneshot.activate_worker("127.0.0.1", port, head.server.address, shard_id=0, renews_every=interval)
            [line] = [r.getMessage() for r in caplog.records if f"{port} (shard 0) registered again" in r.getMessage()]
            assert blamed in line, line
        back = f"{stalled_port} (shard 0) registered again"
        [stalled] = [r.getMessage() for r in caplog.records if back in r.getMessage()]
        assert "--register-interval" not in stalled and "renews every 0.1s" in stalled
    finally:
        for holder in holders:
            holder.close()


async def test_the_worker_ids_a_head_keeps_are_short_and_leave_with_their_workers(runtimes, dead_address):
    head = await runtimes(Head("ids"))
    host, port = dead_address.rsplit(":", 1)
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=1.0, instance="x" * 65)
    key = (dead_address, 0)
    assert head._registrations.instance(key) is None  # no id of a shardnet worker: not kept (up to 8 KB each)
    await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=1.0, instance="a" * 32)
    assert head._registrations.instance(key) == "a" * 32
    await oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=0)
    assert head._registrations.instance(key) is None and head._registrations.leased(key) is None


async def test_replicas_whose_leases_lapse_together_keep_what_they_hold(echo_servers):
    # a stalled node takes every replica of a shard with it: the first one lapsing must not count the second,
    # lapsing in the same pass, as another replica to fail over to (its requests were cut, then failed)
    first, second = await echo_servers(2, delay=2.0)
    head = Head("together", lease=0.5, pool=GrpcConnectionPool(balancer="round_robin"))
    await head.start()
    try:
        both = ControlRequest("ACTIVATE")  # one ACTIVATE for both: one lease, lapsing in one pass
        for server in (first, second):
            host, port = server.address.rsplit(":", 1)
            both.add_related_entity(server.address, host, int(port), 0)
        await oneshot.call_once("control", both, head.server.address, timeout=5)
        held = [asyncio.create_task(send(head.server.address, "/e", [Document()], timeout=10)) for _ in range(2)]
        answers = await asyncio.wait_for(asyncio.gather(*held), 8.0)  # kept for the replicas, not cut at 0.5 s
        assert len(answers) == 2 and first.calls == 1 and second.calls == 1
        assert head.pool.get_replicas("together", shard_id=0).addresses == []  # both lapsed meanwhile
    finally:
        await head.stop(0)


async def test_replicas_whose_leases_lapse_a_pass_apart_keep_what_they_hold(echo_servers):
    # two workers of a stalled node whose last renewals came a little apart: their leases run out in passes
    # next to each other, and the first pass took the second for a replica to fail over to; it cut the first's
    # requests, which went to the second, whose removal a pass later cut them again (seen in CI: one ACTIVATE for
    # both leases them microseconds apart, and a pass fell between)
    first, second = await echo_servers(2, delay=2.0)
    head = Head("apart", lease=0.5, pool=GrpcConnectionPool(balancer="round_robin"))
    await head.start()
    try:
        for server in (first, second):
            host, port = server.address.rsplit(":", 1)
            await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)
            await asyncio.sleep(0.1)  # most of a pass (a quarter of the lease) apart
        held = [asyncio.create_task(send(head.server.address, "/e", [Document()], timeout=10)) for _ in range(2)]
        answers = await asyncio.wait_for(asyncio.gather(*held), 8.0)
        assert len(answers) == 2 and first.calls == 1 and second.calls == 1
        assert head.pool.get_replicas("apart", shard_id=0).addresses == []
    finally:
        await head.stop(0)


async def test_a_deactivate_racing_a_renewal_never_leaves_a_worker_listed_without_a_lease(runtimes, dead_address):
    head = await runtimes(Head("race", lease=30.0))
    host, port = dead_address.rsplit(":", 1)
    for _ in range(100):  # a renewal lands while the DEACTIVATE's removal yields, or before, or after
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=1.0)
        await asyncio.gather(
            oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=0),
            oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=1.0),
        )
        listed = head.pool.get_replicas("race", shard_id=0).addresses
        assert all(head._registrations.leased((address, 0)) for address in listed), listed


async def test_a_dead_shards_requests_go_to_the_other_shards_in_turn_and_count_once(runtimes, dead_address):
    live = await shard_workers(runtimes, executors.Tagger, 3)
    head = await head_over(runtimes, "thirds", live, "ANY")
    await head.pool.remove_connection("thirds", live[1].server.address, shard_id=1)
    head.pool.add_connection("thirds", dead_address, shard_id=1)
    for _ in range(6):  # rotation: 0, 1, 2, 0, 1, 2; shard 1's two turns go to shards 2 and 0 (not both to 2)
        await send(head.server.address, "/tag", [Document()], timeout=5)
    assert (live[0].executor.calls, live[2].executor.calls) == (3, 3)
    assert head.pool.retry_budget.total_requests == 6  # a resend is no new request of the budget's


def assert_failed_after_running(answer: DataRequest, *words: str) -> None:
    """``answer`` is the head's ERROR for a request a replica may have run, naming ``words``."""
    description = answer.status.description
    assert answer.is_error and answer.status.exception.name == "ReplicaLost", answer.status
    assert "a replica may have run it" in description and all(word in description for word in words), description


@pytest.mark.timeout(60)
@pytest.mark.parametrize("request_streams", [True, False], ids=["streams", "unary"])
async def test_a_request_a_killed_worker_may_have_run_is_answered_error_so_a_retrying_caller_runs_it_nowhere_else(
    runtimes, eventually, tmp_path, request_streams
):
    """The head failed it with its worker's UNAVAILABLE, which a caller's pool retries by default: through the
    head again, to the other shard under ANY, where it ran a second time (a faults review's find). It is answered
    ERROR now, as an Executor's failure is: no pool sends an answer again (nor does a Jina gateway, which turned
    the ABORTED that came first into UNKNOWN for its client, an interop review's find)."""
    head = await runtimes(Head("halves", request_streams=request_streams))
    workers = sleepy_workers(head, tmp_path, shards=[0, 1], register_interval=0.25)
    client = GrpcConnectionPool()  # its default RetryPolicy retries UNAVAILABLE
    try:
        addresses = await launched(workers)
        await eventually(lambda: head.pool.deployments["halves"]["shards"] == {0: [addresses[0]], 1: [addresses[1]]},
                         timeout=10.0)
        client.add_connection("halves", head.server.address)
        marks = tmp_path / "marks"
        marks.mkdir()
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 2.0, "mark": str(marks)})
        pending = [client.send_requests_once([request], "halves", timeout=20.0) for _ in range(2)]
        # one on each shard, each worker holding it (a call counted before it was sent would go elsewhere, unsent)
        await eventually(lambda: len(list(marks.iterdir())) == 2, timeout=5.0, interval=0.005)
        workers[0].kill()
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await client.close()
        for worker in workers:
            worker.kill()
    answers = [response for response, _ in outcomes]  # no exception: each answered
    [failed] = [answer for answer in answers if answer.is_error]
    assert_failed_after_running(failed, "UNAVAILABLE", "shard 0", addresses[0])
    assert [dict(tuple(metadata)).get("is-error") for response, metadata in outcomes if response.is_error] == ["true"]


@pytest.mark.parametrize("at_most_once", [True, False], ids=["at-most-once", "at-least-once"])
async def test_a_request_the_heads_own_deadline_cut_after_its_replica_took_it_is_answered_error(runtimes, at_most_once):
    """The head's own per-hop deadline ran out on a request its worker held: it answered DEADLINE_EXCEEDED, which
    Jina's pool (a gateway's, a Jina head's) sends again, to either shard under ANY: the handler ran 4 times under
    --at-most-once (an interop review's find)."""
    workers = await shard_workers(runtimes, executors.Sleepy, 2)
    pool = GrpcConnectionPool(timeout=0.3, retry=RetryPolicy(unsent_only=at_most_once))
    head = await head_over(runtimes, "slow", workers, "ANY", pool=pool)
    answer = await send(head.server.address, "/sleep", [Document()], parameters={"seconds": 1.0}, timeout=5)
    assert_failed_after_running(answer, "DEADLINE_EXCEEDED", "'slow'")  # an answer: no pool sends it again


async def test_a_request_whose_uses_after_fails_after_the_shards_ran_it_is_answered_error_not_unavailable(
    runtimes, dead_address
):
    """The head answered UNAVAILABLE, "safe to retry", though its shards had run the request: the failure's own
    word (no connection to uses_after) was taken for the whole request's (a regression review's find)."""
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await head_over(runtimes, "after", [worker], "ANY", uses_after=dead_address)
    answer = await send(head.server.address, "/tag", [Document()], timeout=5)
    assert_failed_after_running(answer, "UNAVAILABLE", "after/uses_after")
    assert worker.executor.calls == 1


@pytest.mark.timeout(60)
async def test_under_all_a_shard_without_replicas_does_not_hide_another_that_ran_the_request(
    runtimes, eventually, tmp_path
):
    """Every shard failed: shard 0 had no replica (never ran it), shard 1's worker died with it (may have run
    it). The head raised shard 0's failure, UNAVAILABLE, "safe to retry" (a regression review's find)."""
    head = await runtimes(Head("both", shards=2, polling=PollingMap.parse("ALL")))
    [doomed] = sleepy_workers(head, tmp_path, shards=[1], register_interval=0.25)
    try:
        [address] = await launched([doomed])
        await eventually(lambda: head.pool.deployments["both"]["shards"].get(1) == [address], timeout=10.0)
        marks = tmp_path / "marks"
        marks.mkdir()
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 2.0, "mark": str(marks)})
        answer = asyncio.create_task(oneshot.send_request_async(request, head.server.address, timeout=20))
        # the worker holds it: a call is counted before it is written, and a kill in between leaves it unsent, which
        # the head rightly answers UNAVAILABLE (this failed once under load, waiting on the count)
        await eventually(lambda: len(list(marks.iterdir())) == 1, timeout=5.0, interval=0.005)
        doomed.kill()
        answered = await answer
    finally:
        doomed.kill()
    assert_failed_after_running(answered, "UNAVAILABLE", "shard 1")


@pytest.mark.timeout(60)
async def test_at_most_once_fails_a_request_a_dead_replica_may_have_run_and_fails_over_one_none_took(
    runtimes, eventually, tmp_path, dead_address
):
    """A head fails over within a shard by default (at least once); with its pool's RetryPolicy(unsent_only=True)
    (head --at-most-once) a request a replica may have run fails, answered ERROR, and only one no replica took
    goes on."""
    pool = GrpcConnectionPool(balancer="round_robin", retry=RetryPolicy(unsent_only=True))
    head = await runtimes(Head("once", pool=pool))
    workers, addresses, replicas = await two_replicas_of_shard_0(head, tmp_path, eventually, 0.25)
    try:
        marks = tmp_path / "marks"
        marks.mkdir()
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 2.0, "mark": str(marks)})
        pending = [asyncio.create_task(oneshot.send_request_async(request, head.server.address, timeout=20))
                   for _ in range(2)]
        await eventually(lambda: len(list(marks.iterdir())) == 2, timeout=5.0, interval=0.005)  # each worker has one
        workers[0].kill()
        outcomes = await asyncio.gather(*pending)
        [failed] = [answer for answer in outcomes if answer.is_error]  # not run again
        assert_failed_after_running(failed, "UNAVAILABLE", "shard 0")
        head.pool.add_connection("once", dead_address, shard_id=0)  # a replica no request can reach
        answers = [await oneshot.send_request_async(DataRequest(endpoint="/sleep"), head.server.address, timeout=10)
                   for _ in range(4)]  # some go to the dead address first: never taken, so failed over
        assert all(not answer.is_error for answer in answers)
    finally:
        for worker in workers:
            worker.kill()


@pytest.mark.timeout(60)
async def test_at_most_once_a_stalled_worker_answers_what_it_held_once_it_resumes(
    runtimes, eventually, tmp_path, caplog
):
    """Under --at-most-once a request cut from a worker whose lease lapsed may have run, so it fails rather than
    fail over: the cut failed every request a worker paused past its lease held (25 of 25 in a review's run, all
    of which it answered on resuming), and the head's log said they 'fail over'."""
    pool = GrpcConnectionPool(balancer="p2c_ewma", request_streams=True, retry=RetryPolicy(unsent_only=True))
    head = await runtimes(Head("once", lease=1.0, pool=pool))
    workers, addresses, replicas = await two_replicas_of_shard_0(head, tmp_path, eventually, 0.2)
    try:
        connections = {str(c.address): c for c in replicas.get_all_connections()}
        stopped = workers[0]
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 1.0})
        pending = [
            asyncio.create_task(oneshot.send_request_async(request, head.server.address, timeout=30.0))
            for _ in range(6)
        ]
        await eventually(lambda: all(c.running.count for c in connections.values()), timeout=5.0, interval=0.005)
        stopped.signal(signal.SIGSTOP)
        await eventually(lambda: stopped.address not in replicas.addresses, timeout=10.0)  # lapsed: removed
        await asyncio.sleep(1.5)  # past the cut's grace (0.5 s)
        stopped.signal(signal.SIGCONT)
        answers = await asyncio.wait_for(asyncio.gather(*pending), 20.0)
        assert not any(answer.is_error for answer in answers), [a.status.description for a in answers if a.is_error]
        assert "cut (they fail over)" not in caplog.text
    finally:
        for worker in workers:
            worker.signal(signal.SIGCONT)
            worker.kill()


@pytest.mark.timeout(60)
async def test_at_most_once_what_a_lapsed_workers_streams_never_wrote_goes_to_another_replica_at_once(
    runtimes, eventually, tmp_path, monkeypatch
):
    """Under --at-most-once a lapsed worker's requests wait for it (they may have run), but those still queued
    unwritten on its request streams (a paused process stops reading: its window fills) cannot have run: they
    waited with the rest, for gRPC's ping timeout (10 s on a busy connection), then failed, where they may go to
    another replica at once (a regression review)."""
    from shardnet.networking import streams as streams_module

    taken_back: list[str] = []
    take_back = streams_module.RequestStreams.take_back_unwritten

    def recorded(self) -> None:
        for lane in self._lanes:
            for cell in lane.writer._queue if lane is not None and lane.writer is not None else ():
                if cell[0] is not None:
                    taken_back.append(DataRequest.from_bytes(cell[0]).request_id)
        take_back(self)

    monkeypatch.setattr(streams_module.RequestStreams, "take_back_unwritten", recorded)
    runs = tmp_path / "runs"
    runs.mkdir()
    pool = GrpcConnectionPool(balancer="round_robin", request_streams=True, retry=RetryPolicy(unsent_only=True))
    head = await runtimes(Head("once", lease=3.0, pool=pool))
    workers, addresses, replicas = await two_replicas_of_shard_0(head, tmp_path, eventually, 0.2)
    try:
        stopped = next(w for w in workers if w.address == addresses[0])
        lanes = next(c for c in replicas.get_all_connections() if str(c.address) == stopped.address).stubs.streams
        warm = DataRequest([Document(text="w")], endpoint="/sleep", parameters={"seconds": 0.0})
        for _ in range(8):  # the head's streams to both open
            await oneshot.send_request_async(warm, head.server.address, timeout=10.0)
        stopped.signal(signal.SIGSTOP)
        resumed = asyncio.Event()

        def held_until_resumed(write):  # its window full at once, as a paused reader's fills, whatever the
            async def held(message: bytes) -> None:  # kernel's socket buffers take in first
                await resumed.wait()
                await write(message)
            return held

        for lane in lanes._lanes:
            if lane is not None and lane.writer is not None:
                lane.writer._write = held_until_resumed(lane.writer._write)
        sent = {}
        for index in range(40):
            request = DataRequest([Document(id=f"q{index}", text="x" * 200_000)], endpoint="/sleep",
                                  parameters={"record": str(runs)})
            request.header.request_id = f"q{index}"
            sent[f"q{index}"] = asyncio.create_task(
                oneshot.send_request_async(request, head.server.address, timeout=30.0)
            )
        # its streams' writes held, what is sent to it after waits in their queues, until its lease lapses
        await eventually(lambda: any(lane and lane.writer and lane.writer._queue for lane in lanes._lanes), timeout=10)
        await eventually(lambda: stopped.address not in replicas.addresses, timeout=10.0)
        # what its streams still queued, never written, taken back once the removal's close has started (the head
        # yields to the loop in between: this test may see the address gone first)
        await eventually(lambda: taken_back, timeout=5.0)
        await eventually(lambda: all(sent[name].done() for name in taken_back), timeout=5.0)
        assert not any(sent[name].result().is_error for name in taken_back)
        other = str(next(w for w in workers if w is not stopped).pid)
        assert all((runs / name).read_text().split() == [other] for name in taken_back)  # on the other, once
        stopped.signal(signal.SIGCONT)
        resumed.set()
        await asyncio.wait_for(asyncio.gather(*sent.values(), return_exceptions=True), 30.0)
        ran = {path.name: len(path.read_text().split()) for path in runs.iterdir()}
        assert max(ran.values()) == 1  # none twice
    finally:
        for worker in workers:
            worker.signal(signal.SIGCONT)
            worker.kill()


async def test_a_head_reading_no_renewal_keeps_a_worker_answering_its_calls_for_a_few_leases(echo_servers, eventually):
    """A head offered more than it can do (no --max-in-flight) reads an ACTIVATE only after the thousands of calls
    queued before it: a soak's 5x burst had every renewal time out for 52 s, and the head dropped all 4 healthy
    workers at once, 14 s in, failing every request "no live replica" for the rest of the burst. No renewal read
    from any worker, and answers from this one since its last: the head is the one not listening. Bounded:
    a worker that answers but never renews again is dropped OVERLOAD_HOLD_LEASES leases late."""
    from shardnet.runtimes.head import OVERLOAD_HOLD_LEASES as hold

    [server] = await echo_servers(1)
    head = Head("busy", lease=0.5)
    await head.start()
    try:
        host, port = server.address.rsplit(":", 1)
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=0.1)  # then no renewal reaches it
        replicas = head.pool.get_replicas("busy", shard_id=0)
        start = time.monotonic()
        while time.monotonic() - start < 1.5:  # three leases, its answers going on
            await send(head.server.address, "/e", [Document()], timeout=5)
            await asyncio.sleep(0.05)
        assert [str(a) for a in replicas.addresses] == [server.address]
        await eventually(lambda: not replicas.addresses, timeout=hold * 0.5 + 2.0)
        assert time.monotonic() - start < hold * 0.5 + 3.0
    finally:
        await head.stop(0)


async def test_a_head_reading_other_renewals_drops_a_worker_whose_renewals_stopped(echo_servers, eventually):
    """The hold above is for a head that reads no renewal at all: with another worker's renewals read, one whose
    renewals stopped lapses on time, answers or not."""
    first, second = await echo_servers(2)
    head = Head("one-stopped", lease=0.5)
    await head.start()
    try:
        for server in (first, second):
            host, port = server.address.rsplit(":", 1)
            await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)
        replicas = head.pool.get_replicas("one-stopped", shard_id=0)
        host, port = second.address.rsplit(":", 1)
        start = time.monotonic()
        while str(first.address) in [str(a) for a in replicas.addresses] and time.monotonic() - start < 3.0:
            await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)  # second renews
            await send(head.server.address, "/e", [Document()], timeout=5)
            await asyncio.sleep(0.05)
        assert [str(a) for a in replicas.addresses] == [second.address]
        assert time.monotonic() - start < 1.5
    finally:
        await head.stop(0)


async def test_a_head_reading_no_renewal_keeps_a_healthy_worker_it_sent_nothing_lately(echo_servers, eventually):
    """A deep overload: every request the head reads is past its deadline and goes to no worker, so its healthy
    workers answer nothing; the head, reading no renewal, dropped them all at once (a 10x burst review: 620, with
    --max-in-flight 2,160 'no live replica' failures as normal traffic came back). One with nothing left
    unanswered on it is asked its health, and kept while it serves."""
    [server] = await echo_servers(1)
    head = Head("collapsed", lease=0.5)
    await head.start()
    try:
        host, port = server.address.rsplit(":", 1)
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=0.1)  # then no renewal, no call
        replicas = head.pool.get_replicas("collapsed", shard_id=0)
        await asyncio.sleep(1.5)  # three leases
        assert [str(a) for a in replicas.addresses] == [server.address]
    finally:
        await head.stop(0)


async def test_a_head_reading_no_renewal_drops_a_dead_worker_it_sent_nothing_lately(echo_servers, eventually):
    """The health check above holds a worker one pass at most: a dead one lapses a quarter lease late."""
    [server] = await echo_servers(1)
    head = Head("dead-idle", lease=0.5)
    await head.start()
    try:
        host, port = server.address.rsplit(":", 1)
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=0.1)
        replicas = head.pool.get_replicas("dead-idle", shard_id=0)
        start = time.monotonic()
        await server.stop()
        await eventually(lambda: not replicas.addresses, timeout=3.0)
        assert time.monotonic() - start < 1.2
    finally:
        await head.stop(0)


async def test_a_worker_that_activated_once_leaves_a_head_with_a_lease_after_that_lease(echo_servers, caplog, eventually):
    """Jina's ACTIVATE, sent once, says nothing of renewing: a head given --lease keeps it for that lease, not the
    6 more an overload hold gives workers whose renewals wait unread (a regression review: 7 leases, and a WARNING
    of an overload the idle head did not have)."""
    [server] = await echo_servers(1)
    head = Head("jina", lease=0.4)
    await head.start()
    try:
        host, port = server.address.rsplit(":", 1)
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0)
        replicas = head.pool.get_replicas("jina", shard_id=0)
        started = time.monotonic()
        await eventually(lambda: not replicas.addresses, timeout=5.0)
        assert time.monotonic() - started < 2 * 0.4
        assert not [record for record in caplog.records if "too loaded" in record.getMessage()]
    finally:
        await head.stop(0)


async def test_a_hung_worker_on_an_idle_head_lapses_a_quarter_lease_late_at_most_and_no_overload_is_said(
    caplog, eventually
):
    """A worker that accepts connections and never answers (its process stopped), on a head reading no renewal:
    its health check, a pass's time at most, lets it lapse a quarter lease late (it was half), and the head says
    no overload (it said one, and that its workers answer)."""
    async with a_hung_worker_registered("hung") as (head, _):
        replicas = head.pool.get_replicas("hung", shard_id=0)
        started = time.monotonic()
        await eventually(lambda: not replicas.addresses, timeout=5.0)
        # found a pass (a quarter lease) late at most, as any lapse, and a pass more for its check (before: two)
        assert time.monotonic() - started < LEASE + LEASE / 2 + 0.2
        assert not [record for record in caplog.records if "too loaded" in record.getMessage()]
        assert head._hold_checked == {}  # nothing kept of a worker gone


async def test_a_worker_deactivated_while_its_hold_check_runs_leaves_nothing_behind(eventually):
    async with a_hung_worker_registered("gone") as (head, port):
        await eventually(lambda: bool(head._hold_checks), timeout=5.0)
        await oneshot.deactivate_worker("127.0.0.1", port, head.server.address, shard_id=0)
        await eventually(lambda: not head._hold_checks, timeout=5.0)
        assert head._hold_checked == {}  # before: the gone worker's key, for the head's lifetime
    assert not head._hold_checks


LEASE = 2.0  # long enough that a quarter of it stands clear of a loaded machine's delays


@contextlib.asynccontextmanager
async def a_hung_worker_registered(deployment: str) -> AsyncIterator[tuple[Head, int]]:
    """A head (a lease of LEASE seconds) and the port of a worker registered with it that renews no more and answers
    nothing (it takes connections: a stopped process)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        head = Head(deployment, lease=LEASE)
        await head.start()
        try:
            await oneshot.activate_worker("127.0.0.1", port, head.server.address, shard_id=0, renews_every=0.1)
            yield head, port
        finally:
            await head.stop(0)


async def test_an_overload_whose_renewals_are_read_late_is_said_once(echo_servers, caplog):
    """Renewals read late, each after the lease ran out (a head whose queue of inbound calls is longer than the
    lease): each one read reset the 'too loaded' WARNING, said again at the next hold: 7 times in one 30 s burst."""
    [server] = await echo_servers(1)
    head = Head("late", lease=0.5)
    await head.start()
    try:
        host, port = server.address.rsplit(":", 1)
        start = time.monotonic()
        renewed = 0.0
        while time.monotonic() - start < 2.5:
            if time.monotonic() - renewed > 0.7:  # read after the lease ran out, each time
                renewed = time.monotonic()
                await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=0.1)
            await oneshot.send_request_async(DataRequest([Document()], endpoint="/e"), head.server.address, timeout=5)
            await asyncio.sleep(0.05)
        said = [r.getMessage() for r in caplog.records if "too loaded" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        await head.stop(0)
