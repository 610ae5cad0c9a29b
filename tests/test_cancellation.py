"""Calls cut or given up on: what they leave behind (sockets held by kept errors; worker calls a head's client
no longer waits for)."""

from __future__ import annotations

import os

import executors
import pytest

from shardnet import DataRequest, Document, PollingMap
from shardnet.errors import ReplicaError
from shardnet.networking import oneshot
from shardnet.runtimes.head import Head
from shardnet.runtimes.worker import Worker


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("streams", [True, False])
@pytest.mark.parametrize("polling", ["ALL", "ANY"])
async def test_a_client_leaving_a_head_cancels_the_worker_calls(runtimes, eventually, streams, polling):
    """A client's deadline passing while the head waits for its workers cancels their calls, and the head's
    in-flight count comes back to zero."""
    workers = [await runtimes(Worker(executors.Sleepy.create({"shard_id": s}))) for s in range(2)]
    head = await runtimes(Head(
        "sleepy", polling=PollingMap.parse(polling), request_streams=streams, max_in_flight=10,
        connections={s: [w.server.address] for s, w in enumerate(workers)},
    ))
    for _ in range(3):
        with pytest.raises(Exception, match="(?i)deadline"):
            await oneshot.send_request_async(
                DataRequest([Document(text="x")], endpoint="/sleep", parameters={"seconds": 3}),
                head.server.address, timeout=0.3,
            )
    await eventually(lambda: sum(w.executor.sleeping for w in workers) == 0, timeout=2.0)
    await eventually(lambda: head._in_flight == 0 and not head._under_way, timeout=2.0)
    assert sum(w.executor.cancelled for w in workers) == (6 if polling == "ALL" else 3)


async def test_calls_cut_by_a_removal_do_not_keep_the_closed_channels_sockets_open(pool, echo_servers, eventually):
    """A call cut by remove_connection(grace=0) fails with a ReplicaError; a caller keeping that error (a list of
    failed tasks, say) kept the removed channel's TCP connection open, both ends, for as long (58 sockets for 30)."""
    [server] = await echo_servers(1, delay=0.05)
    pool.add_connection("dep", server.address)
    await pool.send_requests_once([DataRequest(endpoint="/x")], "dep")
    before = _open_fds()
    kept = []
    for _ in range(30):
        calls = server.calls
        [task] = pool.send_request(DataRequest(endpoint="/x"), "dep", retries=0)
        await eventually(lambda: server.calls > calls, timeout=5.0)  # the call is on the replica
        await pool.remove_connection("dep", server.address, grace=0)
        pool.add_connection("dep", server.address)
        with pytest.raises(ReplicaError, match="closed with this call still on it"):
            await task
        kept.append(task)
    await eventually(lambda: _open_fds() - before < 10, timeout=5.0)


async def test_calls_given_up_on_do_not_keep_a_closed_channels_socket_open(pool, echo_servers, eventually):
    """A call past its deadline on a hung replica: the ReplicaError kept gRPC's error as its context, whose
    traceback held gRPC's call object and with it the channel's socket, after the channel closed."""
    [server] = await echo_servers(1, delay=5.0)
    before = _open_fds()
    kept = []
    for _ in range(20):
        pool.add_connection("dep", server.address)
        [task] = pool.send_request(DataRequest(endpoint="/x"), "dep", timeout=0.05, retries=0)
        with pytest.raises(ReplicaError, match="(?i)deadline"):
            await task
        kept.append(task)
        await pool.remove_connection("dep", server.address, grace=0)
    await eventually(lambda: _open_fds() - before < 6, timeout=5.0)


async def test_one_off_calls_that_time_out_leave_no_socket_open(echo_servers, eventually):
    """Each one-off call's error held its call, and so its closed channel's connection, open: as long as the
    error was kept, and otherwise until a full garbage collection (tenacity's frames make it a cycle)."""
    [server] = await echo_servers(1, delay=1.0)
    before = _open_fds()
    kept = []
    for _ in range(20):
        with pytest.raises(Exception, match="(?i)deadline") as failed:
            await oneshot.send_request_async(DataRequest(endpoint="/x"), server.address, timeout=0.05)
        kept.append(failed.value)
    await eventually(lambda: _open_fds() - before < 6, timeout=5.0)
