"""Pool membership under random add/remove sequences, checked against a plain dict model with hypothesis.

ReplicaList channels are lazy, so no server is needed: only the maps are checked.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardnet import ConfigurationError, GrpcConnectionPool
from shardnet.networking.polling import PollingType

# address as written -> (identity key, the form the pool shows); spellings of one replica share a key
ADDRESSES = {
    "127.0.0.1:50001": ("127.0.0.1:50001", "127.0.0.1:50001"),
    "grpc://127.0.0.1:50001": ("127.0.0.1:50001", "127.0.0.1:50001"),
    "127.0.0.1:50002": ("127.0.0.1:50002", "127.0.0.1:50002"),
    "https://127.0.0.1:50003": ("127.0.0.1:50003", "https://127.0.0.1:50003"),
    "grpcs://127.0.0.1:50003": ("127.0.0.1:50003", "https://127.0.0.1:50003"),
    "localhost:50004": ("localhost:50004", "localhost:50004"),
}
BAD_ADDRESSES = ["localhost", "127.0.0.1:0", "ftp://127.0.0.1:1"]
DEPLOYMENTS = ["encoder", "indexer"]
SHARDS = [None, 0, 1, 2]

operations = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove"]),
        st.sampled_from(DEPLOYMENTS),
        st.sampled_from(list(ADDRESSES) + BAD_ADDRESSES),
        st.booleans(),  # head
        st.sampled_from(SHARDS),
    ),
    max_size=30,
)


class Model:
    """What the pool should hold: {deployment: {"head": {key: shown}, "shards": {id: {key: shown}}}}."""

    def __init__(self) -> None:
        self.deployments: dict[str, dict] = {}

    def add(self, deployment: str, address: str, head: bool, shard_id: Optional[int]) -> None:
        entry = self.deployments.setdefault(deployment, {"head": {}, "shards": {}})
        replicas = entry["head"] if head else entry["shards"].setdefault(shard_id or 0, {})
        key, shown = ADDRESSES[address]
        replicas.setdefault(key, shown)

    def remove(self, deployment: str, address: str, head: bool, shard_id: Optional[int]) -> bool:
        entry = self.deployments.get(deployment)
        if entry is None:
            return False
        key, _ = ADDRESSES[address]
        if head:
            candidates = [entry["head"]]
        elif shard_id is None:
            candidates = list(entry["shards"].values())  # searched in the order shards appeared
        else:
            candidates = [entry["shards"].get(shard_id, {})]
        for replicas in candidates:
            if replicas.pop(key, None) is not None:
                return True
        return False

    def snapshot(self) -> dict:
        return {
            name: {
                "head": list(entry["head"].values()),
                "shards": {shard: list(replicas.values()) for shard, replicas in sorted(entry["shards"].items())},
            }
            for name, entry in self.deployments.items()
        }

    def holds(self, deployment: str, address: str, head: bool, shard_id: int) -> bool:
        entry = self.deployments.get(deployment, {"head": {}, "shards": {}})
        replicas = entry["head"] if head else entry["shards"].get(shard_id, {})
        return ADDRESSES[address][0] in replicas


def check(pool: GrpcConnectionPool, model: Model) -> None:
    assert pool.deployments == model.snapshot()
    for deployment in DEPLOYMENTS:
        for head, shard_id in [(True, 0)] + [(False, shard) for shard in (0, 1, 2)]:
            replicas = pool.get_replicas(deployment, head=head, shard_id=shard_id)
            for address in ADDRESSES:
                held = replicas is not None and replicas.has_connection(address)
                assert held == model.holds(deployment, address, head, shard_id), (deployment, address, head, shard_id)
            if replicas is not None:  # nothing failed, so every replica is in rotation, each once
                eligible = list(replicas.eligible())
                assert len(eligible) == len(set(eligible)) and set(eligible) == set(replicas.get_all_connections())


async def run(steps) -> None:
    pool = GrpcConnectionPool()
    model = Model()
    try:
        for action, deployment, address, head, shard_id in steps:
            if address in BAD_ADDRESSES:
                with pytest.raises(ConfigurationError):
                    if action == "add":
                        pool.add_connection(deployment, address, head=head, shard_id=shard_id)
                    else:
                        await pool.remove_connection(deployment, address, head=head, shard_id=shard_id)
            elif action == "add":
                pool.add_connection(deployment, address, head=head, shard_id=shard_id)
                model.add(deployment, address, head, shard_id)
            else:
                removed = await pool.remove_connection(deployment, address, head=head, shard_id=shard_id)
                assert bool(removed) == model.remove(deployment, address, head, shard_id)
            check(pool, model)
    finally:
        await pool.close()
    assert pool.deployments == {}


@settings(max_examples=75, deadline=None, database=None)
@given(operations)
def test_random_add_remove_keeps_the_maps_consistent(steps):
    asyncio.run(run(steps))


async def test_any_over_many_shards_takes_each_live_shard_in_turn_without_a_sort_per_request(monkeypatch):
    # ANY with no shard id listed and sorted every shard for every request (2,048 shards: 2,056 calls a request);
    # the shards are sorted once per change, and each live shard still takes one request a turn
    from shardnet.networking import pool as pool_module

    pool = GrpcConnectionPool()
    try:
        for shard in range(64):
            pool.add_connection("d", f"127.0.0.1:{21000 + shard}", shard_id=shard)
        sorts = []
        real_sorted = sorted
        monkeypatch.setattr(pool_module, "sorted", lambda *a, **k: sorts.append(1) or real_sorted(*a, **k),
                            raising=False)
        picks = [pool.targets("d", False, None, PollingType.ANY)[0][0] for _ in range(128)]
        assert len(sorts) <= 1 and picks == list(range(64)) * 2
        # a shard whose last replica leaves is skipped; the others keep one request a turn each
        await pool.remove_connection("d", "127.0.0.1:21005", shard_id=5)
        picks = [pool.targets("d", False, None, PollingType.ANY)[0][0] for _ in range(63 * 2)]
        assert sorted(picks) == real_sorted([s for s in range(64) if s != 5] * 2)
        # a shard added later joins the turn
        pool.add_connection("d", "127.0.0.1:21100", shard_id=100)
        picks = {pool.targets("d", False, None, PollingType.ANY)[0][0] for _ in range(64)}
        assert 100 in picks and 5 not in picks
    finally:
        await pool.close()


shard_changes = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 6), st.integers(0, 2)),
        st.tuples(st.just("remove"), st.integers(0, 6), st.integers(0, 2)),
        st.tuples(st.just("forget_empty"), st.just(0), st.just(0)),
        st.tuples(st.just("declare"), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("forget_deployment"), st.just(0), st.just(0)),
        st.tuples(st.just("any"), st.integers(1, 9), st.just(0)),
        st.tuples(st.just("all_mutate"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


async def run_shard_changes(steps) -> None:
    pool = GrpcConnectionPool()
    try:
        for op, a, b in steps:
            if op == "add":
                try:
                    pool.add_connection("d", f"127.0.0.1:{24000 + a * 10 + b}", shard_id=a)
                except ConfigurationError:
                    pass
            elif op == "remove":
                await pool.remove_connection("d", f"127.0.0.1:{24000 + a * 10 + b}", shard_id=a)
            elif op == "forget_empty":
                pool.forget_empty_shards("d")
            elif op == "declare":
                try:
                    pool.declare_shards("d", a)
                except ConfigurationError:
                    pass
            elif op == "forget_deployment":
                pool.forget_deployment("d")
            elif op == "any":
                for _ in range(a):
                    pool.targets("d", False, None, PollingType.ANY)
            elif op == "all_mutate":
                got = pool.targets("d", False, None, PollingType.ALL)
                got.reverse()
                got.append((99, None))
            entry = pool._deployments.get("d")
            shards = {} if entry is None else entry.shards
            assert pool.targets("d", False, None, PollingType.ALL) == sorted(shards.items())
            live = {s for s, r in shards.items() if r.eligible()}
            picks = []
            for _ in range(len(live)):
                [(sid, replicas)] = pool.targets("d", False, None, PollingType.ANY)
                assert shards.get(sid) is replicas
                picks.append(sid)
            assert Counter(picks) == Counter(live), (picks, live)
            if not live:
                assert pool.targets("d", False, None, PollingType.ANY) == []
    finally:
        await pool.close()


@settings(max_examples=200, deadline=None, database=None)
@given(shard_changes)
def test_any_turn_and_all_order_follow_every_change_of_the_shards(steps):
    """ANY's order is cached per change of the shards: after every add, remove, forget and declare, ALL is every
    shard in id order, and the next ANY picks (as many as live shards) are each live shard once."""
    asyncio.run(run_shard_changes(steps))
