"""``shardnet demo``: a sharded text index, 2 shards x 2 replicas, indexed and searched end to end, and a replica
killed under load and started again."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Callable, Optional

from shardnet.cli.options import whole_number
from shardnet.cli.stopping import run_stoppable
from shardnet.errors import ConfigurationError
from shardnet.examples.text_index import TextIndexer
from shardnet.networking.polling import PollingType
from shardnet.networking.pool import GrpcConnectionPool
from shardnet.protocol.documents import Document
from shardnet.protocol.messages import DataRequest
from shardnet.runtimes.deployment import Deployment

CORPUS = (
    "Sharding splits an index so that each machine holds a part of it",
    "Replicas of a shard answer the same queries and take over when one dies",
    "A head routes every request to the shards and merges their answers",
    "gRPC carries protobuf messages over HTTP/2 between the processes",
    "Kubernetes restarts pods and the head follows them by watching the API server",
    "Token overlap is a simple way to rank short texts against a query",
    "Power of two choices picks the less loaded of two random replicas",
    "A retry budget keeps retries to a fraction of the traffic",
)
QUERIES = ("which replica answers when one dies", "how does the head merge shards", "rank texts by token overlap")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the ``shardnet`` parser."""
    parser = subparsers.add_parser(
        "demo", help="run a local 2x2 text index, index, search, measure, stop",
        description="Start a local deployment of 2 shards x 2 replicas of a text index, index a few texts, search "
        "them, measure throughput, kill -9 a worker under load to show nothing is lost, then stop everything.",
    )
    parser.add_argument(
        "--requests",
        type=whole_number("requests", 1),
        default=2000,
        help="search requests for the throughput figure (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=whole_number("concurrency", 1),
        default=32,
        help="searches in flight at once (default: %(default)s)",
    )
    parser.set_defaults(handler=run)


async def measure(
    address: str, total: int, concurrency: int, midway: Optional[Callable[[], None]] = None
) -> tuple[float, int]:
    """Send ``total`` searches through the head with ``concurrency`` in flight; return (seconds, errors).

    ``midway`` runs (in a thread) once a third of the searches were sent: the demo kills a replica there.
    """
    for what, value in (("total", total), ("concurrency", concurrency)):
        if value < 1:
            raise ConfigurationError(f"{what} must be an integer >= 1, got {value}: nothing would be measured")
    errors = 0
    async with GrpcConnectionPool() as pool:
        pool.add_connection("demo", address, head=True)
        remaining = iter(range(total))

        async def client() -> None:
            nonlocal errors
            for i in remaining:
                if midway is not None and i == total // 3:
                    await asyncio.to_thread(midway)
                request = DataRequest([Document(text=QUERIES[i % len(QUERIES)])], endpoint="/search")
                response, _ = await pool.send_request_once(request, "demo", head=True)
                errors += response.is_error

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - started, errors


def run(args: argparse.Namespace) -> int:
    """Start a 2x2 text index, index and search it, print a throughput figure, stop it; 1 if any search failed.

    It runs as one coroutine: SIGTERM, a closed terminal and Ctrl-C cancel it wherever it waits, the Deployment
    stops every process and removes every folder, and the exit code is the signal's (``run_stoppable``).
    """
    return run_stoppable(demo(args))


async def demo(args: argparse.Namespace) -> int:
    """The demo's steps, ``run``'s exit code: index, search, measure, survive a replica's death, stop."""
    print("starting a text index: 1 head, 2 shards x 2 replicas ...")
    polling = {"/search": PollingType.ALL.name, "/count": PollingType.ALL.name, "*": PollingType.ANY.name}
    with tempfile.TemporaryDirectory(prefix="shardnet-demo-workspace-") as workspace:  # a fresh index each run
        return await _demo(polling, workspace, args)


async def _demo(polling: dict, workspace: str, args: argparse.Namespace) -> int:
    async with Deployment(TextIndexer, shards=2, replicas=2, polling=polling, name="demo",
                          workspace=workspace, log_level=args.log_level) as deployment:
        print(deployment.table(), "\n", flush=True)  # what a log or a pipe shows while the rest runs
        for text in CORPUS:
            await deployment.post_async("/index", [Document(text=text)])
        counts = await deployment.post_async("/count")
        print(f"indexed {len(CORPUS)} texts: " + ", ".join(f"shard {int(d.tags['shard'])} holds {d.text}" for d in counts))
        for query in QUERIES:
            [result] = await deployment.post_async("/search", [Document(text=query)], parameters={"top_k": 2})
            print(f"\nsearch {query!r}")
            ranked = sorted(result.matches, key=lambda m: -m.scores["jaccard"])
            for match in ranked[:3]:
                print(f"  {match.scores['jaccard']:.2f}  shard {int(match.tags['shard'])}  {match.text}")
        seconds, errors = await measure(deployment.address, args.requests, args.concurrency)
        print(
            f"\nthroughput: {args.requests} searches (ALL over 2 shards) in {seconds:.2f}s = "
            f"{args.requests / seconds:.0f} requests/s at concurrency {min(args.concurrency, args.requests)}, "
            f"{errors} errors"
        )
        errors += await survive_a_replica(deployment, args)
    print("stopped every process; bye")
    return 0 if errors == 0 else 1


async def survive_a_replica(deployment: Deployment, args: argparse.Namespace) -> int:
    """Kill -9 a replica of shard 0 a third of the way through a run of searches, then start it again, as
    ``shardnet deploy`` does by itself; return the searches that failed (the head fails over: none should)."""
    victim = deployment.workers[(0, 1)]
    killed = victim.pid
    before = await search_result(deployment)
    _, errors = await measure(deployment.address, args.requests, args.concurrency, midway=victim.kill)
    print(f"\nkill -9 of {victim.role} (pid {killed}) a third of the way through {args.requests} more searches: "
          f"{args.requests - errors} answered, {errors} errors")
    revived = await asyncio.to_thread(deployment.revive)
    same = await search_result(deployment) == before
    dialled = deployment.head_dials(victim)
    print(f"started again: {', '.join(revived) or 'nothing'} serves on {dialled} (pid {victim.pid}); "
          f"the same search {'gives the same' if same else 'now gives other'} matches")
    if dialled != victim.address:  # a new process binds a new TCP port; the head never dialled that one
        print(f"  (the same socket as before, which the head dials; the new process's TCP port is {victim.address})")
    return errors + (not same)


async def search_result(deployment: Deployment) -> list[tuple[str, float]]:
    """The matches of one search, asked once per replica and again (the balancer spreads the asks over the
    replicas of each shard): what a restarted replica must give as before, having reloaded its shard's file."""
    results = []
    for _ in range(deployment.replicas * 2):
        [result] = await deployment.post_async("/search", [Document(text=QUERIES[0])], parameters={"top_k": 3})
        results.append(sorted((match.text, round(match.scores["jaccard"], 6)) for match in result.matches))
    if any(other != results[0] for other in results):
        return [("replicas disagree", 0.0)]
    return results[0]
