"""The floor of ``head_overhead.py``: a minimal raw-bytes grpc.aio forwarder, ANY over its replicas.

No decoding, no balancing beyond a rotation, no retries, no deadlines: the
request bytes and the ``endpoint`` metadata go to the next replica, its reply
bytes come back. What a head costs beyond this is its own.

    python _forwarder.py --loop asyncio 127.0.0.1:5001 127.0.0.1:5002   # prints "forwarder ready on HOST:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _client_worker import SINGLE_DATA, grpc_options  # noqa: E402
from _common import new_event_loop  # noqa: E402


async def serve(replicas: list[str]) -> None:
    import grpc
    import grpc.aio

    options = grpc_options()
    stubs = [grpc.aio.insecure_channel(address, options=options).unary_unary(SINGLE_DATA) for address in replicas]
    turn = 0

    async def forward(payload: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal turn
        turn = (turn + 1) % len(stubs)
        return await stubs[turn](payload, metadata=context.invocation_metadata())

    service, method = SINGLE_DATA.strip("/").split("/")
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(forward)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    print(f"forwarder ready on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("replicas", nargs="+")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    loop = new_event_loop(args.loop)
    try:
        loop.run_until_complete(serve(args.replicas))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
