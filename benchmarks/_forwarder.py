"""The floor of ``head_overhead.py``: a minimal raw-bytes gRPC forwarder, ANY over its replicas.

No decoding, no balancing beyond a rotation, no retries, no deadlines: the
request bytes and the ``endpoint`` metadata go to the next replica, its reply
bytes come back. What a head costs beyond this is its own.

``floor_variants.py`` also runs it with extra channel options (``--option``),
on gRPC's thread-pool server instead of grpc.aio (``--server sync``), and with
the process on the kernel's SCHED_BATCH policy (``--sched-batch``), to see
whether any of those moves the floor.

    python _forwarder.py --loop asyncio 127.0.0.1:5001 127.0.0.1:5002   # prints "forwarder ready on HOST:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _client_worker import SINGLE_DATA, grpc_options  # noqa: E402
from _common import new_event_loop  # noqa: E402

SYNC_SERVER_THREADS = 64  # more than the benchmarks' 32 requests in flight: no request waits for a thread


def _unary_service(handler):
    import grpc

    service, method = SINGLE_DATA.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(handler)})


async def serve_aio(replicas: list[str], options: list) -> None:
    import grpc.aio

    stubs = [grpc.aio.insecure_channel(address, options=options).unary_unary(SINGLE_DATA) for address in replicas]
    turn = 0

    async def forward(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal turn
        turn = (turn + 1) % len(stubs)
        return await stubs[turn](payload, metadata=context.invocation_metadata())

    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers([_unary_service(forward)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print(f"forwarder ready on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def serve_sync(replicas: list[str], options: list) -> None:
    """The same forwarder on gRPC's blocking API: a thread per request in flight, blocking client calls."""
    import grpc

    stubs = itertools.cycle([grpc.insecure_channel(address, options=options).unary_unary(SINGLE_DATA)
                             for address in replicas])
    rotation = threading.Lock()

    def forward(payload: bytes, context: grpc.ServicerContext) -> bytes:
        with rotation:
            stub = next(stubs)
        return stub(payload, metadata=context.invocation_metadata())

    server = grpc.server(ThreadPoolExecutor(max_workers=SYNC_SERVER_THREADS), options=options)
    server.add_generic_rpc_handlers([_unary_service(forward)])
    port = server.add_insecure_port("127.0.0.1:0")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"forwarder ready on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(0.5).wait()


def channel_option(text: str) -> tuple:
    """``NAME=VALUE`` as gRPC takes it: the value a number when it is one."""
    name, separator, value = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return (name, int(value) if value.lstrip("-").isdigit() else value)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("replicas", nargs="+")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--server", choices=("aio", "sync"), default="aio")
    parser.add_argument("--option", type=channel_option, action="append", default=[],
                        help="an extra channel and server option, NAME=VALUE (repeatable)")
    parser.add_argument("--sched-batch", action="store_true",
                        help="run under SCHED_BATCH: woken threads wait for the tick instead of preempting")
    args = parser.parse_args()
    if args.sched_batch:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # this process; threads started later inherit it
    options = grpc_options() + args.option
    if args.server == "sync":
        serve_sync(args.replicas, options)
        return 0
    loop = new_event_loop(args.loop)
    try:
        loop.run_until_complete(serve_aio(args.replicas, options))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
