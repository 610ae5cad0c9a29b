"""A Deployment supervised from a thread (revive(), restart_worker(), members(): what deploy's loop and a
program's own supervisor call) beside the program's own grpc.aio event loop: its control calls made a second
grpc.aio loop (oneshot.run_sync), and grpc.aio's process-wide poller then woke both, the program's loop logging
"Exception in callback PollerCompletionQueue._handle_events ... BlockingIOError" tracebacks (a soak's find,
two at a single revive of a killed worker). The same on a worker's serving loop whose blocking handlers call the
blocking helpers, and on a program's pool loop beside another thread calling them, under asyncio and uvloop
alike (a uvloop review)."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading

import executors
import pytest
import uvloop

from shardnet import DataRequest, Document, Executor, GrpcConnectionPool, requests
from shardnet.networking import oneshot
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.worker import Worker

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


@pytest.fixture(params=["asyncio", "uvloop"])
def run_on_loop(request):
    """Runs a coroutine to completion on a fresh loop of each kind (the suite's own loop is asyncio's)."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


class Forwarder(Executor):
    """Each request forwarded, from the handler's thread, with the blocking helper."""

    target = ""

    @requests
    def forward(self, docs, **kwargs):
        oneshot.send_request_sync(DataRequest([Document()], endpoint="/x"), self.target, timeout=10)


class Answerer(Executor):
    @requests
    def answer(self, docs, **kwargs):
        pass


def test_a_workers_loop_logs_no_poller_race_when_its_handlers_call_blocking_helpers(run_on_loop):
    counter = _Count()
    logging.getLogger("asyncio").addHandler(counter)

    async def scenario() -> None:
        target = Worker(Answerer.create())
        forwarder = Worker(Forwarder.create(), threads=4)
        await target.start()
        await forwarder.start()
        try:
            Forwarder.target = target.server.address

            async def client() -> None:
                for _ in range(40):
                    answer = await oneshot.send_request_async(
                        DataRequest([Document()], endpoint="/x"), forwarder.server.address, timeout=10
                    )
                    assert not answer.is_error, answer.status.description

            await asyncio.gather(*(client() for _ in range(6)))
        finally:
            await forwarder.stop(0)
            await target.stop(0)

    try:
        run_on_loop(scenario())
    finally:
        logging.getLogger("asyncio").removeHandler(counter)
    assert counter.seen == [], f"{len(counter.seen)} poller tracebacks on the worker's loop: {counter.seen[0][:300]}"


@pytest.fixture
def worker_process():
    """A Tagger worker in a process of its own (no grpc.aio loop of it in this process); its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shardnet", "worker", "--uses", f"{executors.__file__}:Tagger", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        for line in process.stdout:
            found = re.search(r"ready on (\S+)", line)
            if found:
                yield found.group(1)
                break
        else:
            raise AssertionError("the worker never said it was ready")
    finally:
        process.terminate()
        process.wait(20)
        process.stdout.close()


def test_a_programs_pool_loop_logs_no_poller_race_when_another_thread_calls_blocking_helpers(
    run_on_loop, worker_process
):
    """A program sending through its GrpcConnectionPool while another of its threads calls send_request_sync
    (or Deployment.post): the program's loop logged about 70 tracebacks in 150 blocking calls."""
    counter = _Count()
    logging.getLogger("asyncio").addHandler(counter)

    async def scenario() -> None:
        done = threading.Event()

        def blocking() -> None:
            try:
                for _ in range(150):
                    oneshot.send_request_sync(DataRequest([Document()], endpoint="/tag"), worker_process, timeout=5)
            finally:
                done.set()

        pool = GrpcConnectionPool("user")
        pool.start()
        pool.add_connection("w", worker_process)
        threading.Thread(target=blocking, daemon=True).start()
        try:
            while not done.is_set():
                await pool.send_requests_once([DataRequest([Document()], endpoint="/tag")], "w", endpoint="/tag",
                                              timeout=10)
        finally:
            await pool.close()

    try:
        run_on_loop(scenario())
    finally:
        logging.getLogger("asyncio").removeHandler(counter)
    assert counter.seen == [], f"{len(counter.seen)} poller tracebacks on the program's loop: {counter.seen[0][:300]}"
