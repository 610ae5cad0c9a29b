"""How long removing replicas holds a busy process's event loop: the fast close against grpc.aio's own.

A head with thousands of requests in flight has thousands of tasks on its loop; grpc.aio's ``Channel.close()``
walks every one of them looking for calls to cut. A removed replica whose counted calls and health checks have
all ended is closed without that walk (``_ChannelInUse.close``); one whose stubs were handed out to a caller (or
with calls still running) gets grpc.aio's close. Both run here side by side, in interleaved rounds, on one loop
holding ``--tasks`` idle tasks: per round, ``--replicas`` replicas (in-process echo servers on loopback, each
having answered two requests) are removed one after another, and a ticker measures the loop's longest stall
until every removed channel is shut down.

    python benchmarks/removal_stall.py                  # 4,000 tasks, 32 replicas, 5 rounds
    python benchmarks/removal_stall.py --tasks 20000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from shardnet import DataRequest, GrpcConnectionPool
from shardnet.testing import EchoServer


async def _longest_stall_while(removing, ticks: float = 0.001) -> tuple[float, float]:
    """(seconds the removals took until every channel shut down, the loop's longest stall meanwhile)."""
    worst, last, done = 0.0, time.perf_counter(), asyncio.Event()

    async def ticker() -> None:
        nonlocal worst, last
        while not done.is_set():
            await asyncio.sleep(ticks)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    began = time.perf_counter()
    await removing()
    took = time.perf_counter() - began
    done.set()
    await ticking
    return took, worst


async def _one_round(servers: list[EchoServer], handed_out: bool) -> tuple[float, float]:
    pool = GrpcConnectionPool()
    pool.start()
    try:
        for server in servers:
            pool.add_connection("dep", server.address)
        for _ in range(2 * len(servers)):
            await pool.send_requests_once([DataRequest()], "dep", timeout=10)
        if handed_out:  # a caller took each pick's stubs: only grpc.aio's close (the walk) reaches their calls
            for connection in pool.get_replicas("dep").get_all_connections():
                connection.stubs

        async def removing() -> None:
            removed = [await pool.remove_connection("dep", server.address, grace=1.0) for server in servers]
            while any(r.channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN for r in removed):
                await asyncio.sleep(0.005)

        return await _longest_stall_while(removing)
    finally:
        await pool.close()


async def main(arguments: argparse.Namespace) -> None:
    servers = [await EchoServer(f"e{index}").start() for index in range(arguments.replicas)]
    idle = [asyncio.ensure_future(asyncio.sleep(3600)) for _ in range(arguments.tasks)]
    results: dict[str, list[tuple[float, float]]] = {"fast close": [], "grpc.aio close": []}
    try:
        for _ in range(arguments.rounds):
            results["fast close"].append(await _one_round(servers, handed_out=False))
            results["grpc.aio close"].append(await _one_round(servers, handed_out=True))
    finally:
        for task in idle:
            task.cancel()
        await asyncio.gather(*idle, return_exceptions=True)
        for server in servers:
            await server.stop(0)
    print(f"# removal stall: {arguments.replicas} replicas removed per round, {arguments.tasks} idle tasks on the "
          f"loop, {arguments.rounds} interleaved rounds; {time.strftime('%Y-%m-%d %H:%M')}")
    columns = ("removals ms (median)", "longest stall ms (median)", "longest stall ms (max)")
    print(f"{'close':<16} {columns[0]:>21} {columns[1]:>26} {columns[2]:>23}")
    medians = {}
    for name, rounds in results.items():
        took = statistics.median(t for t, _ in rounds) * 1000
        stall = statistics.median(s for _, s in rounds) * 1000
        medians[name] = (took, stall)
        print(f"{name:<16} {took:>21.1f} {stall:>26.1f} {max(s for _, s in rounds) * 1000:>23.1f}")
    fast, walked = medians["fast close"], medians["grpc.aio close"]
    print(f"ratio fast / grpc.aio: removals {fast[0] / walked[0]:.3f}, longest stall {fast[1] / walked[1]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000, help="idle tasks on the loop (a busy head's calls)")
    parser.add_argument("--replicas", type=int, default=32, help="replicas removed per round")
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
