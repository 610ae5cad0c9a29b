"""Benchmark 1 (supporting): shardnet's own Python per request, with the network taken out.

The end-to-end benchmarks cannot resolve a microsecond: on a shared 2-core
machine their CPU per request moves by 10 % between rounds. Here every
replica's ``process_single_data`` callable is replaced by a call whose reply
arrives on the next pass of the event loop (it still serializes the request
and wraps the reply bytes, as the real callable's serializer and deserializer
do), so what is left is the Python that shardnet runs around a gRPC call,
layer by layer:

- ``finished call``: awaiting the stand-in alone, the floor of this harness;
- ``finished call in a Task``: what ``asyncio.create_task`` adds, the price of
  ``send_requests_once`` returning a Task as Jina's does;
- ``ReplicaList.call``: one attempt (balancer bookkeeping, reply check, the
  trailing metadata returned with each reply);
- ``GrpcConnectionPool.call``: the pool's ANY path with no Task (what the head
  uses): retry budget, metadata, the pick;
- ``send_requests_once``: routing, then ``GrpcConnectionPool.call`` in a Task;
- ``Head ANY handler``: a head's ``process_single_data`` with a stand-in
  servicer context: endpoint check, deadline, polling, the pool call.

Each row runs sequentially (one request at a time: every Task costs a whole
event-loop pass) and with 64 requests in flight (passes shared, as under load).
Figures are this thread's CPU time per request, the fastest of ``--repeats``
runs (rows interleaved within each), the least noisy estimate of a fixed cost.

    python benchmarks/python_path.py                        # about 20 s
    python benchmarks/python_path.py --balancer p2c_ewma
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc.aio  # noqa: E402
from _common import exit_on_sigterm, machine_line, new_event_loop, run_script, table  # noqa: E402

from shardnet.networking.polling import PollingType  # noqa: E402
from shardnet.networking.pool import GrpcConnectionPool  # noqa: E402
from shardnet.protocol.messages import DataRequest  # noqa: E402
from shardnet.runtimes.head import Head  # noqa: E402

DEPLOYMENT = "echo"
ENDPOINT = "/index"
Row = tuple[str, Callable[[], Awaitable[Any]]]  # a label, and one request's worth of work


class FinishedCall:
    """Stands in for a ``grpc.aio`` unary call whose reply arrives on the next pass of the event loop.

    It suspends once, as a real call waits for its reply, so that with 64 requests in flight all 64
    really are in flight together (a stand-in that never suspended would run them one after another).
    """

    __slots__ = ("_reply",)

    def __init__(self, reply: Any):
        self._reply = reply

    def __await__(self):
        yield  # a bare yield: the task is rescheduled on the next pass (what asyncio.sleep(0) does)
        return self._reply

    async def trailing_metadata(self):
        return grpc.aio.Metadata.from_tuple(())  # as grpc.aio builds it from the call's status


def finished_single_data(request, metadata=None, timeout=None) -> FinishedCall:
    """What ``Stubs.single_data`` does around the network: serialize the request, wrap the reply bytes."""
    return FinishedCall(DataRequest.from_bytes(request.to_bytes()))


class StandInContext:
    """The parts of ``grpc.aio.ServicerContext`` a head's data handler reads."""

    def __init__(self):
        self.metadata = (("endpoint", ENDPOINT),)
        self.trailing = ()

    def invocation_metadata(self):
        return self.metadata

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, trailing):
        self.trailing = trailing

    async def abort(self, code, details):
        raise RuntimeError(f"the head aborted the call: {code} {details}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run of a row")
    parser.add_argument("--repeats", type=int, default=7, help="runs per row; the fastest counts")
    parser.add_argument("--balancer", choices=("round_robin", "p2c_ewma"), default="round_robin",
                        help="the pool's balancer (the head always uses p2c_ewma, its default)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    return parser.parse_args(argv)


async def measure(send: Callable[[], Awaitable[Any]], requests: int, concurrency: int) -> float:
    """CPU seconds of this thread per request, for ``requests`` awaits of ``send()`` from ``concurrency`` coroutines.

    Thread CPU time, not wall time: time the machine gives to other processes does not count.
    """

    async def one_worker(count: int) -> None:
        for _ in range(count):
            await send()

    share = requests // concurrency
    started = time.thread_time()
    await asyncio.gather(*(one_worker(share) for _ in range(concurrency)))
    return (time.thread_time() - started) / (share * concurrency)


def rows(args: argparse.Namespace, pool: GrpcConnectionPool, head: Head) -> list[Row]:
    """Each row's label and one request's worth of work; ``pool`` and ``head`` get stand-in replicas."""
    payload = DataRequest(endpoint=ENDPOINT).to_bytes()

    def stand_in_replicas(pool: GrpcConnectionPool) -> None:
        for shard_id in pool.shard_ids(DEPLOYMENT):
            replicas = pool.get_replicas(DEPLOYMENT, shard_id=shard_id)
            for connection in replicas.eligible():
                connection.stubs = dataclasses.replace(connection.stubs, single_data=finished_single_data)

    for port in (1, 2):  # channels are lazy: nothing dials these
        pool.add_connection(DEPLOYMENT, f"127.0.0.1:{port}")
    stand_in_replicas(pool)
    [(_, replicas)] = pool.targets(DEPLOYMENT, False, None, PollingType.ANY)
    connection = replicas.eligible()[0]
    call_metadata = grpc.aio.Metadata(("endpoint", ENDPOINT))  # what the pool hands to a replica list
    metadata = (("endpoint", ENDPOINT),)  # as the head passes it

    for port in (3, 4):
        head.pool.add_connection(DEPLOYMENT, f"127.0.0.1:{port}")
    stand_in_replicas(head.pool)
    context = StandInContext()

    async def finished_call():
        return await finished_single_data(DataRequest.from_bytes(payload))

    async def finished_call_in_task():
        return await asyncio.create_task(finished_call())

    async def replica_list_call():
        return await replicas.call(connection, "single_data", DataRequest.from_bytes(payload), call_metadata, None)

    async def pool_call():
        [(sid, shard)] = pool.targets(DEPLOYMENT, False, None, PollingType.ANY)
        return await pool.call(DataRequest.from_bytes(payload), DEPLOYMENT, shard, shard_id=sid, metadata=metadata)

    async def send_requests_once():
        return await pool.send_requests_once([DataRequest.from_bytes(payload)], DEPLOYMENT, endpoint=ENDPOINT)

    async def head_handler():
        return await head.process_single_data(payload, context)

    return [
        ("finished call", finished_call),
        ("finished call in a Task", finished_call_in_task),
        ("ReplicaList.call", replica_list_call),
        (f"GrpcConnectionPool.call ({args.balancer})", pool_call),
        (f"send_requests_once ({args.balancer})", send_requests_once),
        ("Head ANY handler (p2c_ewma)", head_handler),
    ]


async def run(args: argparse.Namespace) -> list[list[Any]]:
    """The table's rows, from a pool and a head with stand-in replicas, both closed afterwards."""
    pool = GrpcConnectionPool(balancer=args.balancer)
    head = Head(DEPLOYMENT)
    try:
        return await measure_rows(args, rows(args, pool, head))
    finally:
        await pool.close()
        await head.pool.close()


async def measure_rows(args: argparse.Namespace, measured: list[Row]) -> list[list[Any]]:
    """Every row at 1 and at 64 in flight, the rows interleaved within each repeat so a noisy spell hits them all."""
    cases = [(label, send, concurrency) for label, send in measured for concurrency in (1, 64)]
    for _label, send, concurrency in cases:  # warm-up
        await measure(send, args.requests // 10, concurrency)
    fastest = {(label, concurrency): float("inf") for label, _, concurrency in cases}
    for _ in range(args.repeats):
        for label, send, concurrency in cases:
            seconds = await measure(send, args.requests, concurrency)
            fastest[label, concurrency] = min(fastest[label, concurrency], seconds)
    floor = measured[0][0]
    return [
        [label, 1e6 * fastest[label, 1], 1e6 * fastest[label, 64],
         1e6 * (fastest[label, 1] - fastest[floor, 1]), 1e6 * (fastest[label, 64] - fastest[floor, 64])]
        for label, _ in measured
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    loop = new_event_loop(args.loop)
    try:
        measured = loop.run_until_complete(run(args))
    finally:
        loop.close()
    print(f"# python path: gRPC replaced by a call answered on the next loop pass; fastest of {args.repeats} runs x {args.requests} "
          f"requests per row; {machine_line()}; loop {args.loop}")
    print(table(["row", "us/req, 1 in flight", "us/req, 64 in flight", "over the floor, 1", "over the floor, 64"],
                measured))
    return 0


if __name__ == "__main__":
    run_script(main)
