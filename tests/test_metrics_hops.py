"""The hops' replicas (uses_before, uses_after) in the head's per-replica metrics, as a shard's: every request
crosses a hop, so a hop replica ejected, draining or holding requests must be as visible as a shard's. Labelled as
the pool names the hop and as its own worker labels its metrics: deployment "NAME/uses_before", shard "0"."""

from __future__ import annotations

import executors
from test_metrics import METERED, sample, scrape

from shardnet import DataRequest, Document, GrpcConnectionPool
from shardnet.networking import oneshot
from shardnet.runtimes.head import Head
from shardnet.runtimes.worker import Worker


async def test_a_hop_replica_ejected_is_counted_as_a_shard_replica_is(runtimes, dead_address):
    shard, before, after = (
        await runtimes(Worker(executors.Tagger.create())), await runtimes(Worker(executors.Tagger.create())),
        await runtimes(Worker(executors.Tagger.create())),
    )
    pool = GrpcConnectionPool(balancer="round_robin")  # the dead replica keeps its turns until it is ejected
    head = await runtimes(Head("hopped", METERED, pool=pool, connections={0: [shard.server.address]},
                               uses_before=before.server.address, uses_after=after.server.address))
    head.pool.add_connection("hopped/uses_before", dead_address)  # a second replica, as discovery adds one
    replicas = head.pool.get_replicas("hopped/uses_before")
    for _ in range(40):
        await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/tag"), head.server.address,
                                         timeout=5)
        if replicas.ejected_addresses:
            break
    assert replicas.ejected_addresses
    samples = await scrape(head)
    hop = {"deployment": "hopped/uses_before", "shard": "0"}
    assert sample(samples, "shardnet_head_replicas", **hop) == 2
    assert sample(samples, "shardnet_head_replicas_ejected", **hop) == 1
    assert sample(samples, "shardnet_head_replica_ejections_total", **hop) == 1
    assert sample(samples, "shardnet_head_replicas_draining", **hop) == 0
    assert sample(samples, "shardnet_head_requests_held_by_removed_replicas", **hop) == 0
    after_hop = {"deployment": "hopped/uses_after", "shard": "0"}
    assert sample(samples, "shardnet_head_replicas", **after_hop) == 1
    assert sample(samples, "shardnet_head_replica_ejections_total", **after_hop) == 0
    # the shard's series are as they were: the hops are not counted in the deployment's
    assert sample(samples, "shardnet_head_replicas", deployment="hopped", shard="0") == 1
    assert sample(samples, "shardnet_head_replica_ejections_total", deployment="hopped", shard="0") == 0
    # bounded: one series per hop and family, none for a head without hops
    assert {dict(labels)["deployment"] for name, labels in samples if name == "shardnet_head_replicas"} == {
        "hopped", "hopped/uses_before", "hopped/uses_after"}


async def test_a_head_without_hops_has_no_hop_series(runtimes):
    shard = await runtimes(Worker(executors.Tagger.create()))
    head = await runtimes(Head("plain", METERED, connections={0: [shard.server.address]}))
    samples = await scrape(head)
    assert {dict(labels)["deployment"] for name, labels in samples if name == "shardnet_head_replicas"} == {"plain"}


async def test_a_hop_left_with_no_replica_reads_0_not_absent(runtimes):
    """As discovery leaves a hop when its last pod goes (every request through the head fails): an alert on
    `shardnet_head_replicas == 0` must fire for it as for a declared shard with none, not find no series."""
    shard, after = await runtimes(Worker(executors.Tagger.create())), await runtimes(Worker(executors.Tagger.create()))
    head = await runtimes(Head("emptied", METERED, connections={0: [shard.server.address]},
                               uses_after=after.server.address))
    await head.pool.remove_connection("emptied/uses_after", after.server.address)
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replicas", deployment="emptied/uses_after", shard="0") == 0
    assert sample(samples, "shardnet_head_replicas_ejected", deployment="emptied/uses_after", shard="0") == 0
