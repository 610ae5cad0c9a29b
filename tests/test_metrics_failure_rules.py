"""The metrics under the failure rules a head applies: replicas set aside as they drain, ejections shorter than a
scrape, lapsed leases and the requests they hold, failed requests by their status code, a blocking handler whose
caller left. In-process heads and workers (a SIGSTOPped one is a process of its own), scraped over HTTP."""

from __future__ import annotations

import asyncio
import signal

import executors
from test_head_recovery import one_worker_a_shard
from test_metrics import METERED, counted, sample, scrape

from shardnet import DataRequest, Document, GrpcConnectionPool
from shardnet.cli.main import main as cli_main
from shardnet.errors import DeadlineExceeded, ReplicaError
from shardnet.networking import oneshot, replica_list
from shardnet.runtimes.head import Head
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker


async def test_a_blocking_handler_whose_caller_left_is_still_in_flight_until_its_thread_ends(runtimes, eventually):
    """Its thread runs on (README), and what is queued for the worker's threads waits behind it: the in-flight
    gauge said 0, an idle worker, while its only thread was stuck (a metrics review)."""
    executor = executors.Blocking.create()
    worker = await runtimes(Worker(executor, METERED))
    try:
        try:
            await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/block"),
                                             worker.server.address, timeout=0.5)
        except DeadlineExceeded:
            pass
        assert executor.entered.is_set()
        samples = await scrape(worker)
        assert sample(samples, "shardnet_worker_requests_in_flight", deployment="Blocking", shard="0") == 1
        assert sample(samples, "shardnet_worker_requests_total", deployment="Blocking", shard="0", endpoint="/block",
                      outcome="cancelled") == 1
    finally:
        executor.release.set()

    async def idle() -> bool:
        return sample(await scrape(worker), "shardnet_worker_requests_in_flight", deployment="Blocking",
                      shard="0") == 0

    await eventually(idle, timeout=10.0)


async def set_aside_as_it_drains(runtimes, eventually, name: str, holding: float):
    """A head of two workers, the second draining (stopping) while it holds a request for ``holding`` seconds, and
    set aside by the head as it refused one: (head, workers, its connection, a task ending once it has stopped)."""
    sleepy = executors.Sleepy.create()
    workers = [await runtimes(Worker(executors.Sleepy.create())), await runtimes(Worker(sleepy))]
    head = await runtimes(Head(name, METERED, connections={0: [w.server.address for w in workers]}))
    replicas = head.pool.get_replicas(name, shard_id=0)
    held = asyncio.create_task(oneshot.send_request_async(
        DataRequest([Document(text="x")], endpoint="/sleep", parameters={"seconds": holding}),
        workers[1].server.address, timeout=10))
    await eventually(lambda: sleepy.sleeping == 1)
    stopping = asyncio.create_task(workers[1].stop(10))  # drains: it still answers the held request
    draining = next(c for c in replicas.get_all_connections() if str(c.address) == workers[1].server.address)

    async def set_aside() -> bool:
        await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/sleep"), head.server.address,
                                         timeout=5)
        return draining.draining

    await eventually(set_aside, timeout=10.0)
    return head, workers, draining, asyncio.gather(held, stopping)


async def test_a_replica_set_aside_as_it_drains_is_neither_failing_nor_counted_ejected(runtimes, eventually, capsys):
    """README: one refusing as it drains is picked no more, "though that counts as no ejection"; the ejected gauge
    ("for repeated failures") counted it, and `shardnet status` called it "ejected: failing" (a metrics review)."""
    head, workers, draining, drained = await set_aside_as_it_drains(runtimes, eventually, "dep", holding=4.0)
    samples = await scrape(head)
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", head.server.address])
    printed = capsys.readouterr().out
    await drained
    assert sample(samples, "shardnet_head_replicas_ejected", deployment="dep", shard="0") == 0
    assert sample(samples, "shardnet_head_replicas_draining", deployment="dep", shard="0") == 1
    assert f"{workers[1].server.address} (draining: not picked until it serves again" in printed, printed
    assert "failing" not in printed and code != 0, printed  # it is down (draining): degraded, not failing


async def test_an_ejection_shorter_than_a_scrape_interval_is_still_counted(runtimes, dead_address):
    """The gauge, sampled every 15 s, misses the first ejection's half second: the counter keeps it."""
    worker = await runtimes(Worker(executors.Tagger.create()))
    pool = GrpcConnectionPool(balancer="round_robin")  # the dead replica keeps its turns until it is ejected
    head = await runtimes(Head("flaky", METERED, pool=pool, connections={0: [worker.server.address, dead_address]}))
    replicas = head.pool.get_replicas("flaky", shard_id=0)
    for _ in range(40):
        await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/tag"), head.server.address,
                                         timeout=5)
        if replicas.ejected_addresses:
            break
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replica_ejections_total", deployment="flaky", shard="0") == 1
    assert sample(samples, "shardnet_head_replicas_ejected", deployment="flaky", shard="0") == 1


async def test_a_lapsed_lease_and_the_requests_its_replica_holds_are_counted(runtimes, eventually, tmp_path):
    """A shard's only worker stalls past its lease: removed, it keeps its requests (README), and no replica list
    names it any more; the metrics say a lease lapsed and how many requests a replica no longer routed to holds."""
    head = await runtimes(Head("split", METERED, lease=1.0))
    workers = await one_worker_a_shard(head, tmp_path, eventually)
    try:
        stalled = head.pool.get_replicas("split", shard_id=0)
        [connection] = stalled.get_all_connections()
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 0.5})
        pending = [asyncio.create_task(oneshot.send_request_async(request, head.server.address, timeout=30))
                   for _ in range(2)]
        await eventually(lambda: connection.running.count == 1, timeout=5.0, interval=0.005)
        workers[0].signal(signal.SIGSTOP)
        await eventually(lambda: not stalled.addresses, timeout=10.0)
        samples = await scrape(head)
        assert sample(samples, "shardnet_head_leases_lapsed_total", deployment="split") == 1
        assert sample(samples, "shardnet_head_requests_held_by_removed_replicas", deployment="split", shard="0") == 1
        workers[0].signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*pending), 20.0)
        samples = await scrape(head)
        assert sample(samples, "shardnet_head_requests_held_by_removed_replicas", deployment="split", shard="0") == 0
    finally:
        for worker in workers:
            worker.signal(signal.SIGCONT)
            worker.kill()


async def test_failed_requests_are_counted_by_their_code_so_a_deadline_reads_apart_from_a_fault(runtimes):
    """outcome="error" lumps an Executor's exception with a deadline that ran out at the head (an overload) and a
    replica lost: requests_failed_total says which, by gRPC status (ERROR: an ERROR answer)."""
    worker = await runtimes(Worker(executors.Sleepy.create(), METERED))
    tagger = await runtimes(Worker(executors.Tagger.create(), METERED))
    head = await runtimes(Head("slow", METERED, connections={0: [worker.server.address]}))
    try:
        await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/sleep",
                                                     parameters={"seconds": 3}), head.server.address, timeout=1)
    except ReplicaError as exc:
        assert exc.code.name == "DEADLINE_EXCEEDED", exc
    answer = await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/fail"),
                                              tagger.server.address, timeout=5)
    assert answer.is_error
    samples = await counted(head, 1)
    failed = {dict(labels)["code"]: value for (name, labels), value in samples.items()
              if name == "shardnet_head_requests_failed_total"}
    errors = sample(samples, "shardnet_head_requests_total", deployment="slow", endpoint="/sleep", outcome="error")
    # the head's abort or the caller's leaving, whichever came first: an error is counted by its code, a cancel not
    assert failed == ({"DEADLINE_EXCEEDED": 1.0} if errors else {}), (failed, errors)
    samples = await counted(tagger, 1)
    assert sample(samples, "shardnet_worker_requests_failed_total", deployment="Tagger", shard="0", endpoint="/fail",
                  code="ERROR") == 1


async def test_a_drained_replica_whose_next_process_is_loading_is_draining_not_ejected(runtimes, eventually):
    """A planned restart: the drained process exited and its next one listens on the same address seconds later (an
    Executor loading its model). Flipped to ejected at the first probe that found nothing there, it read 'ejected:
    failing' and fired the ejected gauge's alert on every rolling restart (a regression review)."""
    head, workers, draining, drained = await set_aside_as_it_drains(runtimes, eventually, "restart", holding=1.0)
    replicas = head.pool.get_replicas("restart", shard_id=0)
    await drained
    await eventually(lambda: draining.gone_since is not None, timeout=10.0)  # a probe found nothing listening
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replicas_draining", deployment="restart", shard="0") == 1
    assert sample(samples, "shardnet_head_replicas_ejected", deployment="restart", shard="0") == 0
    port = int(workers[1].server.address.rsplit(":", 1)[1])
    await runtimes(Worker(executors.Sleepy.create(), ServerConfig(port=port)))  # the next process serves
    await eventually(lambda: replicas.ejected_addresses == [], timeout=5.0)  # picked again within its 1 s probes
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replica_ejections_total", deployment="restart", shard="0") == 0


async def test_a_drained_replica_that_never_comes_back_is_ejected_not_draining_for_ever(
    runtimes, eventually, monkeypatch
):
    """Its probes found nothing at its address past a restart's grace, but it stayed 'draining' (no failure) for
    good: the ejected gauge, which an alert reads, never counted a static replica whose restart failed (a
    regression review)."""
    monkeypatch.setattr(replica_list, "DRAINED_RESTART_GRACE", 1.0)  # its restart's grace, shortened
    head, workers, draining, drained = await set_aside_as_it_drains(runtimes, eventually, "gone", holding=2.0)
    replicas = head.pool.get_replicas("gone", shard_id=0)
    await drained  # gone for good: nothing serves its address again
    await eventually(lambda: not draining.draining, timeout=10.0)  # its probes said unreachable, not draining
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replicas_draining", deployment="gone", shard="0") == 0
    assert sample(samples, "shardnet_head_replicas_ejected", deployment="gone", shard="0") == 1
    assert replicas.ejected_addresses == [workers[1].server.address]
    assert sample(samples, "shardnet_head_replica_ejections_total", deployment="gone", shard="0") == 1


async def test_requests_a_forgotten_shards_lapsed_worker_holds_are_still_gauged(runtimes, eventually, tmp_path):
    """Without --shards a head forgets a shard beyond 0 once its last worker left (a lapsed lease): the gauge of
    requests held by removed replicas went with it, though the lapsed worker still held them (a regression
    review)."""
    head = await runtimes(Head("split1", METERED, lease=1.0))
    workers = await one_worker_a_shard(head, tmp_path, eventually)
    pending = None
    try:
        [connection] = head.pool.get_replicas("split1", shard_id=1).get_all_connections()
        request = DataRequest([Document(text="q")], endpoint="/sleep", parameters={"seconds": 0.5})
        pending = head.pool.send_requests_once([request], "split1", shard_id=1, timeout=30)
        await eventually(lambda: connection.running.count == 1, timeout=5.0, interval=0.005)
        workers[1].signal(signal.SIGSTOP)
        await eventually(lambda: 1 not in head.pool.shard_ids("split1"), timeout=10.0)
        assert connection.running.count == 1  # still held, on a replica no longer routed to
        samples = await scrape(head)
        assert sample(samples, "shardnet_head_requests_held_by_removed_replicas", deployment="split1", shard="1") == 1
    finally:
        for worker in workers:
            worker.signal(signal.SIGCONT)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        for worker in workers:
            worker.kill()
