"""A worker's renewal, once its lease ran out on its own clock, must wait long enough for an overloaded head."""

from __future__ import annotations

import asyncio
import logging

from shardnet import ControlRequest
from shardnet.protocol import services
from shardnet.runtimes.worker import Worker

import executors


async def test_a_renewal_sent_after_the_lease_ran_out_waits_for_a_head_that_reads_it_seconds_late(
    runtimes, eventually, caplog
):
    """A head whose queue of inbound calls is 3 s long (an overload burst) read no renewal: once the worker's
    lease had run out, each renewal gave the head 1 s, every one timed out unread, the head held the worker 6 leases
    (15 s at --register-interval 0.5) and then dropped it though it served all along: every healthy worker at once,
    an outage for the rest of the burst (a review's 30 s burst: 12,000 'no live replica' failures)."""
    from shardnet.testing import serving

    caplog.set_level(logging.DEBUG, logger="shardnet.runtimes.worker")
    activates: list[str] = []

    async def reads_renewals_3s_late(payload, context):
        activates.append(ControlRequest.from_bytes(payload).command)
        if len(activates) > 1:
            await asyncio.sleep(3.0)
        return payload

    async with serving(services.PROCESS_CONTROL, reads_renewals_3s_late) as head:
        worker = await runtimes(Worker(executors.Tagger.create(), head=head, register_interval=0.5))
        await worker.register()
        taken = lambda: caplog.text.count("registered 127.0.0.1")  # noqa: E731
        try:
            await eventually(lambda: taken() >= 2, timeout=15.0)
        finally:
            await worker.stop(0)


async def test_an_overload_whose_renewals_are_read_late_is_said_once(echo_servers, caplog):
    """Renewals read late, each after the lease ran out (a head whose queue of inbound calls is longer than the
    lease): each one read reset the 'too loaded' WARNING, said again at the next hold: 7 times in one 30 s burst."""
    import time

    from shardnet import DataRequest, Document
    from shardnet.networking import oneshot
    from shardnet.runtimes.head import Head

    [server] = await echo_servers(1)
    head = Head("late", lease=0.5)
    await head.start()
    try:
        host, port = server.address.rsplit(":", 1)
        start = time.monotonic()
        renewed = 0.0
        while time.monotonic() - start < 4.0:
            if time.monotonic() - renewed > 0.7:  # read after the lease ran out, each time
                renewed = time.monotonic()
                await oneshot.activate_worker(host, int(port), head.server.address, shard_id=0, renews_every=0.1)
            await oneshot.send_request_async(DataRequest([Document()], endpoint="/e"), head.server.address, timeout=5)
            await asyncio.sleep(0.05)
        said = [r.getMessage() for r in caplog.records if "too loaded" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        await head.stop(0)
