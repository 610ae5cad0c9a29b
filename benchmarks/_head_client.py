"""The load client of ``head_overhead.py``: a process of its own, driven by JSON lines on stdin.

It holds one bare grpc.aio client (``_client_worker.Bare``: one channel, bytes
in and out) per named target and answers each ``run`` with one JSON line in
the shape of ``_client_worker.closed_loop`` (request count, wall time, this
client's CPU, every latency): ``n`` requests, or as many as ``seconds`` allow.
The endpoint travels as gRPC metadata, as a gateway sends it, and every timed
request carries a request_id of its own, as a Jina or shardnet client's does (a
head matches answers on its request streams by it; requests sharing one would
go unary there). ``check`` sends
one request and decodes its answer (status, documents), which the timed runs
never do: a head answering gRPC-OK with an ERROR status would count as served.

    python _head_client.py --loop uvloop direct=127.0.0.1:5001 head=127.0.0.1:5002
    {"cmd": "run", "target": "head", "endpoint": "/index", "payload": "/tmp/index.bin", "seconds": 0.7}
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _client_worker import Bare, closed_loop, grpc_options  # noqa: E402
from _common import new_event_loop  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("targets", nargs="+", metavar="NAME=HOST:PORT")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    targets = dict(target.split("=", 1) for target in args.targets)

    loop = new_event_loop(args.loop)
    import grpc

    clients: dict[str, Bare] = {}
    payloads: dict[str, bytes] = {}

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "grpc": grpc.__version__, "loop": args.loop})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                command = json.loads(line)
                if command.get("cmd") not in ("run", "check"):
                    raise ValueError(f"unknown command {command.get('cmd')!r}")
                name = command["target"]
                if name not in clients:
                    clients[name] = loop.run_until_complete(_make_client(targets[name]))
                client = clients[name]
                client.metadata = (("endpoint", command["endpoint"]),)
                path = command["payload"]
                if path not in payloads:
                    payloads[path] = Path(path).read_bytes()
                concurrency = command.get("concurrency", args.concurrency)
                if command["cmd"] == "check":
                    reply(loop.run_until_complete(check(client, payloads[path])))
                    continue
                if "seconds" in command:
                    run = timed_loop(client, payloads[path], command["seconds"], concurrency)
                else:
                    run = closed_loop(client, payloads[path], command["n"], concurrency)
                reply(loop.run_until_complete(run))
            except Exception:  # noqa: BLE001 - report to the parent, keep serving
                reply({"error": traceback.format_exc()})
    finally:
        for client in clients.values():
            loop.run_until_complete(client.close())
        loop.close()
    return 0


async def timed_loop(client: Bare, payload: bytes, seconds: float, concurrency: int) -> dict:
    """``closed_loop`` for a time instead of a count: ``concurrency`` senders until ``seconds`` have passed.

    Requests still in flight then are awaited and counted, so the servers' CPU read after the run
    belongs to exactly the requests reported. Same result shape as ``closed_loop``.
    """
    latencies: list[float] = []
    failures = 0
    clock = time.perf_counter
    deadline = clock() + seconds

    fresh = FreshIds(payload)

    async def sender() -> None:
        nonlocal failures
        send, record = client.send, latencies.append
        while clock() < deadline:
            started = clock()
            try:
                await send(fresh())
            except Exception:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
                failures += 1
            record(clock() - started)

    cpu0, thread0, wall0 = time.process_time(), time.thread_time(), clock()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    wall, cpu, loop_cpu = clock() - wall0, time.process_time() - cpu0, time.thread_time() - thread0
    return {"n": len(latencies), "wall": wall, "cpu": cpu, "loop_cpu": loop_cpu, "failures": failures,
            "lat": [round(value, 7) for value in latencies]}


class FreshIds:
    """``template`` with a new request_id at each call: the id's bytes replaced in place by a counter of the same
    width, so the message needs no encoding (nor any length field a change)."""

    def __init__(self, template: bytes):
        from shardnet.protocol.proto import jina_pb2

        request_id = jina_pb2.DataRequestProto.FromString(template).header.request_id.encode()
        at = template.index(request_id)
        self._before, self._after = template[:at], template[at + len(request_id):]
        self._format = f"0{len(request_id)}x"
        self._counter = itertools.count()

    def __call__(self) -> bytes:
        return self._before + format(next(self._counter), self._format).encode() + self._after


async def check(client: Bare, payload: bytes) -> dict:
    """One request, its answer decoded: the status code and description and the number of documents."""
    from shardnet.protocol.proto import jina_pb2

    answer = jina_pb2.DataRequestProto.FromString(await client.send(payload))
    status = answer.header.status
    return {"code": status.code, "description": status.description, "docs": len(answer.data.docs.docs)}


async def _make_client(address: str) -> Bare:
    """A Bare client created inside the running loop (grpc.aio channels belong to their loop)."""
    return Bare([address], grpc_options())


if __name__ == "__main__":
    raise SystemExit(main())
