"""A Deployment supervised from a thread (revive(), restart_worker(), members(): what deploy's loop and a
program's own supervisor call) beside the program's own grpc.aio event loop: its control calls made a second
grpc.aio loop (oneshot.run_sync), and grpc.aio's process-wide poller then woke both, the program's loop logging
"Exception in callback PollerCompletionQueue._handle_events ... BlockingIOError" tracebacks (a soak's find,
two at a single revive of a killed worker)."""

from __future__ import annotations

import asyncio
import logging
import threading

import executors
import pytest

from shardnet import DataRequest, Document, GrpcConnectionPool
from shardnet.runtimes.deployment import Deployment

pytestmark = pytest.mark.timeout(120)


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + repr(record.exc_info)
        if "PollerCompletionQueue" in text or "BlockingIOError" in text:
            self.seen.append(text)


def test_members_from_a_thread_logs_no_poller_race_on_the_programs_own_loop():
    counter = _Count()
    logging.getLogger("asyncio").addHandler(counter)
    try:
        with Deployment(uses=executors.Tagger, name="noise", request_streams=False) as dep:
            done = threading.Event()

            def supervise() -> None:
                try:
                    for _ in range(300):
                        dep.members(timeout=5)
                finally:
                    done.set()

            async def client() -> int:
                pool = GrpcConnectionPool("user")
                pool.add_connection("noise", dep.address, head=True)
                threading.Thread(target=supervise, daemon=True).start()
                sent = 0
                while not done.is_set():
                    await pool.send_requests_once([DataRequest([Document()], endpoint="/tag")], "noise",
                                                  head=True, endpoint="/tag", timeout=10)
                    sent += 1
                await pool.close()
                return sent

            sent = asyncio.run(client())
    finally:
        logging.getLogger("asyncio").removeHandler(counter)
    assert sent > 0
    assert counter.seen == [], f"{len(counter.seen)} poller tracebacks on the program's loop: {counter.seen[0]}"
