"""A benchmark client process, driven by JSON lines on stdin.

Runs in shardnet's virtual environment (impls ``bare``, ``bare-task``,
``bare-task-trailing``, ``shardnet``, ``shardnet-call``, and for ``--steps`` ``step-pick``,
``step-replica-list``, ``step-pool-call``, ``shardnet-core``) or in the Jina peer's (``bare`` and ``jina``);
it imports shardnet or jina only for the impl that needs it. One process may
hold several impls, run one at a time: each ``run`` collects garbage first (so
one impl's leftovers are not collected on another's clock), then answers one
JSON line with the request count, wall time, this process's CPU time during
the run (``time.process_time``) and every latency, so the parent can
interleave rounds across workers.

    {"cmd": "run", "impl": "bare", "n": 4000, "payload": "/tmp/x.bin", "concurrency": 64}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import traceback

SINGLE_DATA = "/jina.JinaSingleDataRequestRPC/process_single_data"
DEPLOYMENT = "echo"
ENDPOINT = "/"


class Bare:
    """One grpc.aio channel per address, rotated; bytes in, bytes out, the endpoint as metadata."""

    def __init__(self, addresses, options):
        import grpc.aio

        self.channels = [grpc.aio.insecure_channel(address, options=options) for address in addresses]
        self.stubs = [channel.unary_unary(SINGLE_DATA) for channel in self.channels]
        # built once, as the pool's cache hands it on: a tuple would be made into Metadata on every call
        self.metadata = grpc.aio.Metadata(("endpoint", ENDPOINT))
        self.next = 0

    def wrap(self, payload: bytes):
        return payload

    async def send(self, request):
        stubs = self.stubs
        index = self.next
        self.next = (index + 1) % len(stubs)
        return await stubs[index](request, metadata=self.metadata)

    async def close(self):
        for channel in self.channels:
            await channel.close()


class BareTask(Bare):
    """The bare client with each call wrapped in an ``asyncio.Task``, as ``send_requests_once`` must return one.

    Not a competitor: it shows what the Task alone costs, so the pool's own share can be read off.
    """

    async def send(self, request):
        return await asyncio.create_task(Bare.send(self, request))


class BareTaskTrailing(Bare):
    """The bare client in a Task that also fetches each call's trailing metadata: what the pool's contract
    (Jina's: a Task per call giving ``(response, trailing metadata)``) costs before the pool does any work.

    Not a competitor either: the floor any pool keeping that contract on grpc.aio's public API stands on.
    """

    async def send(self, request):
        return await asyncio.create_task(self._call_with_trailing(request))

    async def _call_with_trailing(self, request):
        stubs = self.stubs
        index = self.next
        self.next = (index + 1) % len(stubs)
        call = stubs[index](request, metadata=self.metadata)
        return await call, await call.trailing_metadata()


class BareStartedTask(Bare):
    """The contract kept another way (``--contract-variant``): the call started before its Task, and the Task
    made by a loop held since the first request (``asyncio.create_task`` looks the loop up, which on Python 3.11
    costs a ``getpid()`` system call). What the pool would save this way; it does not do it, as a Task cancelled
    before its first step would leave its call running unwatched, and a held loop can be the wrong one."""

    loop = None

    def send(self, request):
        stubs = self.stubs
        index = self.next
        self.next = (index + 1) % len(stubs)
        call = stubs[index](request, metadata=self.metadata)
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop.create_task(self._finish(call))

    @staticmethod
    async def _finish(call):
        return await call, await call.trailing_metadata()


class Shardnet:
    """``shardnet.networking.pool.GrpcConnectionPool.send_requests_once`` (round robin)."""

    def __init__(self, addresses, balancer="round_robin"):
        from shardnet.networking.pool import GrpcConnectionPool
        from shardnet.protocol.messages import DataRequest

        self.pool = GrpcConnectionPool(balancer=balancer)
        for address in addresses:
            self.pool.add_connection(DEPLOYMENT, address)
        self.DataRequest = DataRequest

    def wrap(self, payload: bytes):
        return self.DataRequest.from_bytes(payload)  # as a head holds a request it received

    async def send(self, request):
        response, _trailing = await self.pool.send_requests_once([request], DEPLOYMENT, endpoint=ENDPOINT)
        return response

    async def close(self):
        await self.pool.close()


class ShardnetCall(Shardnet):
    """``GrpcConnectionPool.call`` on the shard's replica list: the head's path, no Task per request."""

    def __init__(self, addresses, balancer="round_robin"):
        super().__init__(addresses, balancer)
        from shardnet.networking.polling import PollingType

        self.PollingType = PollingType
        self.metadata = (("endpoint", ENDPOINT),)

    async def send(self, request):
        [(shard_id, replicas)] = self.pool.targets(DEPLOYMENT, False, None, self.PollingType.ANY)
        response, _trailing = await self.pool.call(request, DEPLOYMENT, replicas, shard_id=shard_id,
                                                   metadata=self.metadata)
        return response


class PoolStep(Shardnet):
    """One of the pool's layers alone, in a Task of its own as ``send_requests_once`` runs it, to split the pool's
    cost step by step (``pool_overhead.py --steps``): ``pick`` is a replica picked and called with the trailing
    metadata fetched and nothing else, ``replica-list`` is ``ReplicaList.call``, ``pool-call`` is
    ``GrpcConnectionPool.call``; the full pool adds ``send_requests``'s routing to the last."""

    def __init__(self, addresses, step: str):
        super().__init__(addresses)
        from shardnet.networking.channels import MetadataCache

        self.replicas = self.pool.get_replicas(DEPLOYMENT)
        self.metadata = MetadataCache().for_endpoint(ENDPOINT)  # as send_requests hands it on
        self.layer = {"pick": self._pick, "replica-list": self._replica_list, "pool-call": self._pool_call}[step]

    async def send(self, request):
        response, _trailing = await asyncio.create_task(self.layer(request))
        return response

    async def _pick(self, request):
        call = self.replicas.get_next_connection().stubs.single_data(request, metadata=self.metadata, timeout=None)
        return await call, await call.trailing_metadata()

    async def _replica_list(self, request):
        replicas = self.replicas
        return await replicas.call(replicas.get_next_connection(), "single_data", request, self.metadata, None)

    async def _pool_call(self, request):
        return await self.pool.call(request, DEPLOYMENT, self.replicas, shard_id=0, metadata=self.metadata)


class ShardnetCore(Shardnet):
    """The full pool with each replica's ``single_data`` replaced by a call on gRPC's Cython channel
    (``grpc.aio.Channel._channel``, private API; no grpc.aio call object, no Task of grpc.aio's): what the pool
    would save on the call path ``transports.py``'s core-call row measures for a bare client. A benchmark
    prototype only: no deadlines, no cancellation, no close grace."""

    def __init__(self, addresses, balancer="round_robin"):
        super().__init__(addresses, balancer)
        import dataclasses

        for connection in self.pool.get_replicas(DEPLOYMENT).eligible():
            core = _CoreSingleData(connection.channel, self.DataRequest.from_bytes)
            connection.stubs = dataclasses.replace(connection.stubs, single_data=core)


class _CoreSingleData:
    """``process_single_data`` on a channel's Cython object, called as the pool calls ``Stubs.single_data``."""

    def __init__(self, channel, wrap_reply):
        self._core = channel._channel
        self._method = SINGLE_DATA.encode()
        self._wrap_reply = wrap_reply

    def __call__(self, request, metadata=None, timeout=None):
        return _CoreCall(self, request, tuple(metadata or ()))


class _CoreCall:
    __slots__ = ("_owner", "_request", "_metadata", "_trailing")

    def __init__(self, owner, request, metadata):
        self._owner, self._request, self._metadata, self._trailing = owner, request, metadata, ()

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        owner = self._owner
        call = owner._core.call(owner._method, None, None, None)  # method, deadline, credentials, wait_for_ready
        reply = await call.unary_unary(self._request.to_bytes(), self._metadata)
        if not call.is_ok():
            raise RuntimeError(f"core call failed: {call}")
        self._trailing = (await call.status()).trailing_metadata()
        return owner._wrap_reply(reply)

    async def trailing_metadata(self):
        import grpc.aio

        return grpc.aio.Metadata.from_tuple(self._trailing)


class Jina:
    """``jina.serve.networking.GrpcConnectionPool.send_requests_once`` from jina 3.34."""

    def __init__(self, addresses):
        from jina.serve.networking import GrpcConnectionPool
        from jina.types.request.data import DataRequest

        self.pool = GrpcConnectionPool(runtime_name="bench")
        for address in addresses:
            self.pool.add_connection(DEPLOYMENT, address)
        self.DataRequest = DataRequest

    def wrap(self, payload: bytes):
        return self.DataRequest(payload)  # as Jina's head holds a request it received

    async def send(self, request):
        result = await self.pool.send_requests_once([request], DEPLOYMENT, endpoint=ENDPOINT)
        if isinstance(result, BaseException):  # Jina's pool returns errors instead of raising
            raise result
        return result[0]

    async def close(self):
        await self.pool.close()


def grpc_options():
    """shardnet's channel options; in the Jina venv (no shardnet there) the same list, spelled out."""
    import importlib.util

    if importlib.util.find_spec("shardnet") is not None:
        from shardnet.networking.channels import default_grpc_options

        return default_grpc_options()
    size = 256 * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
    ]


async def closed_loop(client, payload: bytes, requests: int, concurrency: int) -> dict:
    """``requests`` calls from ``concurrency`` coroutines, each sending its next request when the last returns."""
    latencies = []
    failures = 0
    remaining = requests
    clock = time.perf_counter

    async def one_worker():
        nonlocal remaining, failures
        wrap, send, record = client.wrap, client.send, latencies.append
        while remaining > 0:
            remaining -= 1
            started = clock()
            try:
                await send(wrap(payload))
            except Exception:
                failures += 1
            record(clock() - started)

    cpu0, thread0, wall0 = time.process_time(), time.thread_time(), clock()
    await asyncio.gather(*(one_worker() for _ in range(min(concurrency, requests))))
    wall, cpu, loop_cpu = clock() - wall0, time.process_time() - cpu0, time.thread_time() - thread0
    return {"n": requests, "wall": wall, "cpu": cpu, "loop_cpu": loop_cpu, "failures": failures,
            "lat": [round(value, 7) for value in latencies]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("addresses", nargs="+")
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    import grpc

    clients = {}
    payloads = {}

    def client(impl: str, balancer: str = "round_robin"):
        key = (impl, balancer)
        if key not in clients:
            if impl == "bare":
                clients[key] = Bare(args.addresses, grpc_options())
            elif impl == "bare-task":
                clients[key] = BareTask(args.addresses, grpc_options())
            elif impl == "bare-task-trailing":
                clients[key] = BareTaskTrailing(args.addresses, grpc_options())
            elif impl == "bare-started-task":
                clients[key] = BareStartedTask(args.addresses, grpc_options())
            elif impl == "shardnet":
                clients[key] = Shardnet(args.addresses, balancer)
            elif impl == "shardnet-call":
                clients[key] = ShardnetCall(args.addresses, balancer)
            elif impl.startswith("step-"):
                clients[key] = PoolStep(args.addresses, impl[len("step-"):])
            elif impl == "shardnet-core":
                clients[key] = ShardnetCore(args.addresses, balancer)
            elif impl == "jina":
                clients[key] = Jina(args.addresses)
            else:
                raise ValueError(f"unknown impl {impl!r}")
        return clients[key]

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "grpc": grpc.__version__, "loop": args.loop, "python": sys.executable})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            try:
                if command["cmd"] != "run":
                    raise ValueError(f"unknown command {command['cmd']!r}")
                path = command["payload"]
                if path not in payloads:
                    with open(path, "rb") as handle:
                        payloads[path] = handle.read()
                concurrency = command.get("concurrency", args.concurrency)
                runner = client(command["impl"], command.get("balancer", "round_robin"))
                coroutine = closed_loop(runner, payloads[path], command["n"], concurrency)
                gc.collect()  # outside the timed run: the previous impl's garbage is not this one's cost
                if command.get("profile"):
                    import cProfile

                    profiler = cProfile.Profile()
                    profiler.enable()
                    result = loop.run_until_complete(coroutine)
                    profiler.disable()
                    profiler.dump_stats(command["profile"])
                else:
                    result = loop.run_until_complete(coroutine)
                reply(result)
            except Exception:
                reply({"error": traceback.format_exc()})
    finally:
        for runner in clients.values():
            loop.run_until_complete(runner.close())
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
