"""Supporting benchmark: what grpc.aio charges per request for each way a client can reach a server.

The pool sends one unary call per request, over TCP, on channels with gRPC's
full filter stack (a head sends its workers requests on long-lived request
streams instead, the row ``bidi stream`` measures what that way costs). This
script asks whether another way would cost less, against one echo server
process, each row a client in this process:

- ``unary, TCP``: what the pool does (the reference of every ratio);
- ``unary, TCP, minimal stack``: the client channel with ``grpc.minimal_stack``
  (fewer filters; it also drops the client's own message size checks);
- ``unary, unix socket``: the same call over a Unix domain socket;
- ``bidi stream, TCP``: one long-lived stream (as Jina's ``JinaRPC/Call``)
  carrying every request; one task writes, one reads, replies are matched in
  order (the server echoes them in order);
- ``unary, TCP, optimization_target=throughput``: the channel option that asks
  gRPC's HTTP/2 transport to favour throughput;
- ``unary, TCP, core call``: the same call without grpc.aio's per-call object
  and the Task it runs in, awaiting gRPC's Cython call directly. That is
  private API, and it bypasses what ``Channel.close(grace)`` waits for, so
  shardnet does not do it; the row measures what grpc.aio's wrapper costs.

Rounds are interleaved and rotated after an excluded warm-up. The client's
CPU is this process's ``time.process_time()``, the server's comes from
``/proc/PID/stat``; ratios are medians of the per-round ratios to the first row.

    python benchmarks/transports.py           # about 1 minute
    python benchmarks/transports.py --quick   # about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported: no INFO lines in the tables

from _common import (  # noqa: E402 - after the path and GRPC_VERBOSITY are set
    ROOT,
    SHARDNET_PYTHON,
    _stop_process,
    exit_on_sigterm,
    machine_line,
    median,
    rotated,
    run_script,
    table,
)

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

from shardnet.networking.channels import default_grpc_options  # noqa: E402

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Send = Callable[[bytes], Awaitable[bytes]]


# -- the server (a child process) -----------------------------------------------------------


async def serve(unix_path: str) -> None:
    """Echo on ``UNARY`` and, in order, on ``STREAM``; listen on loopback TCP and on ``unix_path``."""

    async def unary(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload

    async def stream(requests, context: grpc.aio.ServicerContext):
        async for payload in requests:
            yield payload

    server = grpc.aio.server(options=default_grpc_options())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_insecure_port(f"unix:{unix_path}")
    await server.start()
    print(f"READY {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.stop(0.5)


# -- the clients ----------------------------------------------------------------------------


def channel(target: str, extra_options: tuple = ()) -> grpc.aio.Channel:
    """A channel with shardnet's options, plus ``extra_options``."""
    return grpc.aio.insecure_channel(target, options=default_grpc_options() + list(extra_options))


def unary_sender(target: str, extra_options: tuple = ()) -> tuple[Send, Callable[[], Awaitable[None]]]:
    unary_channel = channel(target, extra_options)
    return unary_channel.unary_unary(UNARY), unary_channel.close


def core_call_sender(target: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """Unary calls on the channel's Cython object (``grpc.aio.Channel._channel``): no call object, no Task."""
    core_channel = channel(target)
    cython_channel, method = core_channel._channel, UNARY.encode()

    async def send(payload: bytes) -> bytes:
        call = cython_channel.call(method, None, None, None)  # method, deadline, credentials, wait_for_ready
        reply = await call.unary_unary(payload, ())
        if not call.is_ok():
            raise RuntimeError(f"core call failed: {call}")
        return reply

    return send, core_channel.close


class StreamSender:
    """Requests multiplexed over one bidi stream: a writer task (gRPC takes one write at a time), a reader task."""

    def __init__(self, target: str):
        self._channel = channel(target)
        self._call = self._channel.stream_stream(STREAM)()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._waiting: collections.deque = collections.deque()
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def _write(self) -> None:
        while True:
            await self._call.write(await self._outbox.get())

    async def _read(self) -> None:
        while (reply := await self._call.read()) is not grpc.aio.EOF:
            self._waiting.popleft().set_result(reply)

    def __call__(self, payload: bytes) -> Awaitable[bytes]:
        reply = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        self._outbox.put_nowait(payload)
        return reply

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._call.cancel()
        await self._channel.close()


async def closed_loop(send: Send, payload: bytes, requests: int, concurrency: int) -> float:
    """Send ``requests`` at ``concurrency``; return the wall time."""
    left = requests

    async def one_worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reply = await send(payload)
            if len(reply) != len(payload):
                raise RuntimeError(f"echo returned {len(reply)} bytes for {len(payload)}")

    started = time.perf_counter()
    await asyncio.gather(*(one_worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def measure(args: argparse.Namespace, server_pid: int, port: int, unix_path: str) -> list[list]:
    from shardnet.protocol.documents import Document
    from shardnet.protocol.messages import DataRequest

    payload = DataRequest(docs=[Document(text="x" * 64)], endpoint="/index").to_bytes()
    tcp = f"127.0.0.1:{port}"
    rows: dict[str, tuple[Send, Callable[[], Awaitable[None]]]] = {
        "unary, TCP": unary_sender(tcp),
        "unary, TCP, minimal stack": unary_sender(tcp, (("grpc.minimal_stack", 1),)),
        "unary, unix socket": unary_sender(f"unix:{unix_path}"),
    }
    stream = StreamSender(tcp)
    rows["bidi stream, TCP"] = (stream, stream.close)
    rows["unary, TCP, optimization_target=throughput"] = unary_sender(tcp, (("grpc.optimization_target", "throughput"),))
    rows["unary, TCP, core call"] = core_call_sender(tcp)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rows}  # (rps, client us, server us)
    try:
        for send, _ in rows.values():
            await closed_loop(send, payload, args.warmup, args.concurrency)
        for round_index in range(args.rounds):
            for name in rotated(list(rows), round_index):
                client_before, server_before = time.process_time(), process_cpu(server_pid)
                wall = await closed_loop(rows[name][0], payload, args.requests, args.concurrency)
                client = time.process_time() - client_before
                server = process_cpu(server_pid) - server_before
                samples[name].append((args.requests / wall, 1e6 * client / args.requests, 1e6 * server / args.requests))
    finally:
        for _, close in rows.values():
            await close()
    reference = samples["unary, TCP"]
    result = []
    for name, rounds in samples.items():
        ratios = [[mine[i] / theirs[i] for mine, theirs in zip(rounds, reference)] for i in range(3)]
        result.append([name, *(median(sample[i] for sample in rounds) for i in range(3)), *(median(r) for r in ratios)])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=3_000, help="requests per row and round")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="4 rounds of 1000, warm-up 500")
    parser.add_argument("--serve", metavar="UNIX_PATH", help=argparse.SUPPRESS)  # the server child
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    if args.quick:
        args.rounds, args.requests, args.warmup = 4, 1_000, 500
    exit_on_sigterm()
    with tempfile.TemporaryDirectory() as scratch:
        unix_path = str(Path(scratch) / "echo.sock")
        server = subprocess.Popen([SHARDNET_PYTHON, __file__, "--serve", unix_path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            line = server.stdout.readline()
            if not line.startswith("READY "):
                raise RuntimeError(f"echo server did not start: {line!r}")
            rows = asyncio.run(measure(args, server.pid, int(line.split()[1]), unix_path))
        finally:
            _stop_process(server)
    print(f"# transports: one echo server (own process), client in this process, concurrency {args.concurrency}, "
          f"{args.rounds} interleaved rounds x {args.requests} requests per row, warm-up {args.warmup} excluded; "
          f"{machine_line()}")
    print(table(["row", "rps", "client CPU us/req", "server CPU us/req",
                 "rps / unary TCP", "client CPU / unary TCP", "server CPU / unary TCP"], rows))
    return 0


if __name__ == "__main__":
    run_script(main)
