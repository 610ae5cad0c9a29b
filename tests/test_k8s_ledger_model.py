"""The Kubernetes membership ledger under a randomized model check (``ledger_model.py``), and the cases it found.

The pool is not started: its handlers are fed the events and lists its watches would hand over.
"""

from __future__ import annotations

import asyncio

import pytest
from k8s_apiserver import endpoint_slice, pod
import ledger_model as lm
from ledger_model import generate, run_actions, run_concurrent

from shardnet.discovery.kubernetes import PODS, SLICES, K8sGrpcConnectionPool, Member
from shardnet.networking.connection import Connection


def _pod(uid: str, shard: str, ip: str, **kwargs) -> dict:
    item = pod(f"p-{uid}", shard_id=shard, ip=ip, port=9000, **kwargs)
    item["metadata"].update(uid=uid, namespace="default")
    return item


def _slice(uid: str, shard: str, role: str, listed: list[dict]) -> dict:
    ips = {p["status"]["podIP"]: p for p in listed}
    item = endpoint_slice(f"s-{uid}", f"dep-{shard}", [(ip, True, None) for ip in ips], shard=shard, role=role,
                          port=9000, pods=ips)
    item["metadata"].update(uid=uid, namespace="default")
    return item


def _routed(pool: K8sGrpcConnectionPool) -> set[tuple]:
    return {
        (name, "head", address) for name, entry in pool.deployments.items() for address in entry["head"]
    } | {
        (name, shard, address) for name, entry in pool.deployments.items()
        for shard, addresses in entry["shards"].items() for address in addresses
    }


@pytest.mark.parametrize("followed", [None, ("dep",)])
async def test_a_pod_not_ready_then_deleted_while_the_pods_watch_was_away_vetoes_its_lagging_slice_endpoint(followed):
    """A pod gone not ready held no member of the pods' ledger; deleted while the pods' watch was away (410), the
    relist without it did not count it as deleted, as only pods the ledger held were, and its slice, lagging,
    kept its IP routed: to a deleted pod, or whatever pod takes the IP next. README: an endpoint whose pod the pods
    show deleted is not routed, whatever its slice still says."""
    pool = K8sGrpcConnectionPool("default", deployments=followed)
    try:
        await pool._on_list(PODS, [])
        await pool._on_list(SLICES, [])
        w = _pod("u1", "1", "10.0.0.5")
        await pool._on_event(PODS, "ADDED", w)
        await pool._on_event(SLICES, "ADDED", _slice("s1", "1", "worker", [w]))
        await pool._on_event(PODS, "MODIFIED", _pod("u1", "1", "10.0.0.5", ready=False))
        assert _routed(pool) == {("dep", 1, "10.0.0.5:9000")}  # the slice's word: not yet told it is not ready
        await pool._on_list(PODS, [])  # deleted while the watch was away: the relist no longer has it
        await pool._ledger.drain()
        assert _routed(pool) == set()
    finally:
        await pool.close()


async def test_a_pod_whose_hold_a_fresher_slice_claim_replaced_then_deleted_while_away_vetoes_its_endpoint():
    """The same through the other way a pod holds nothing in the ledger: its claim (worker, shard 0) gave way to
    the slice's fresher one (the head's slice, the pod relabelled), so the pods' relist without it did not count
    it as deleted, and the head stayed routed to a deleted pod's IP by its lagging slice."""
    pool = K8sGrpcConnectionPool("default")
    try:
        await pool._on_list(PODS, [])
        await pool._on_list(SLICES, [])
        w = _pod("u2", "0", "10.0.0.5")
        await pool._on_event(PODS, "ADDED", w)
        head = _pod("u2", "0", "10.0.0.5", pod_type="HEAD")
        await pool._on_event(SLICES, "ADDED", _slice("sh", "0", "head", [head]))
        assert _routed(pool) == {("dep", "head", "10.0.0.5:9000")}
        await pool._on_list(PODS, [])
        await pool._ledger.drain()
        assert _routed(pool) == set()
    finally:
        await pool.close()


# a relist in which two addresses swap roles of one deployment (10.0.0.4 shard 2 -> uses_after, 10.0.0.5 uses_after
# -> head): one at a time, with one role per address, one of them is empty between the two, a limitation the
# README states; for these seeds every other invariant is still checked
ROLE_SWAP_CYCLES = {38}


@pytest.mark.parametrize("seed", range(0, 100, 10))
async def test_randomized_model_check_of_the_ledger(seed):
    """Ten seeds per case, 150 steps each, sequential handlers: invariants 1-5 at each step, truth at quiescence."""
    for one in range(seed, seed + 10):
        actions, followed, _, how, fault = await generate(one, 150)
        if fault is None:
            fault = await run_actions(actions, followed, one, how)
        if one in ROLE_SWAP_CYCLES:
            assert fault is None or " R: " in fault, f"seed {one}: {fault}"
        else:
            assert fault is None, f"seed {one}: {fault}"


@pytest.mark.parametrize("followed", [None, ("dep2",)])
async def test_a_relist_takes_in_a_relabelled_pod_before_a_pod_gone_unready_leaves_the_same_deployment(followed):
    """A relist sorted a pod relabelled while the watch was away (into dep2) with the pods gone unready, as it
    gives up a member, and took the unready one of dep2 out first: dep2 had no replica for a loop pass (a request
    then failed), though it had one before and after. README: the relist itself never empties a deployment."""
    pool = lm.CheckingPool("default", deployments=followed)
    try:
        await pool._on_list(SLICES, [])
        await pool._on_list(PODS, [_pod("u5", "1", "10.0.0.3", deployment="dep"),
                                   _pod("u9", "2", "10.0.0.4", deployment="dep2")])
        assert pool.deployments["dep2"]["shards"] == {2: ["10.0.0.4:9000"]}
        emptied: list = []
        remove = pool.remove_connection

        async def noting(deployment, *args, **kwargs):
            removed = await remove(deployment, *args, **kwargs)
            entry = pool.deployments.get(deployment)
            if entry is not None and not entry["head"] and not any(entry["shards"].values()):
                emptied.append(deployment)
            return removed

        pool.remove_connection = noting
        await pool._on_list(PODS, [_pod("u5", "1", "10.0.0.3", deployment="dep2"),
                                   _pod("u9", "2", "10.0.0.4", deployment="dep2", deleting=True)])
        await pool._ledger.drain()
        assert pool.deployments["dep2"]["shards"][1] == ["10.0.0.3:9000"]
        assert "dep2" not in emptied
    finally:
        await pool.close()


def _ep(ip: str) -> dict:
    return {"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False}}


def _worker(uid: str, dep: str, role: str, shard: int, ip: str) -> dict:
    return lm.pod_obj(uid, lm.Pod(f"p-{uid}", dep, role, shard, ip, True))


def _noting_emptied(pool: K8sGrpcConnectionPool) -> list:
    """Deployments and (deployment, shard)s the pool's removals leave with no replica, as each removal returns."""
    emptied: list = []
    remove = pool.remove_connection

    async def noting(deployment, address, head=False, shard_id=None, **kwargs):
        removed = await remove(deployment, address, head=head, shard_id=shard_id, **kwargs)
        entry = pool.deployments.get(deployment)
        if entry is not None and not entry["head"] and not any(entry["shards"].values()):
            emptied.append(deployment)
        return removed

    pool.remove_connection = noting
    return emptied


async def test_a_relist_moving_an_address_to_another_role_does_not_empty_its_deployment_between_out_and_in():
    """dep2's one replica, 10.0.0.5 as shard 0 (its slice), is dep2's head by the pods' relist, while the pods'
    previous listing still held that IP for another deployment: the record let both stale members go, one removal
    and one turn of the loop each, and only then routed the head, so whenever dep2's removal came first (set order:
    PYTHONHASHSEED, the model's seed 20093) dep2 had no replica for turns, though routed before and after. README:
    the relist itself never empties a deployment. The other deployment's name is chosen to make that order."""
    address = "10.0.0.5:9000"
    mine, claim = lm.Member("dep2", False, 0, address), lm.Member("dep2", True, None, address)
    other = None
    for name in [f"x{i}" for i in range(64)]:  # the name putting dep2's member first in the ledger's set
        held = {mine}
        held.add(lm.Member(name, False, 0, address))
        if next(iter(held - {claim})) == mine:
            other = name
            break
    assert other is not None
    pool = lm.CheckingPool("default")
    try:
        await pool._on_list(SLICES, [lm.slice_obj(("dep2", "WORKER", 0), "a", 0, [_ep("10.0.0.5")])])
        await pool._on_list(PODS, [_worker("u4", other, "WORKER", 0, "10.0.0.5")])
        assert _routed(pool) == {("dep2", 0, address), (other, 0, address)}
        emptied = _noting_emptied(pool)
        await pool._on_list(PODS, [_worker("u11", "dep2", "HEAD", 0, "10.0.0.5")])
        await pool._ledger.drain()
        assert ("dep2", "head", address) in _routed(pool)
        assert "dep2" not in emptied
    finally:
        await pool.close()


async def test_a_relist_lets_go_of_a_contested_address_before_the_last_routed_replica_of_its_deployment():
    """Shard 0's two slices list 10.0.0.2 and 10.0.0.1, shard 1's lists 10.0.0.1 too: 10.0.0.1 is routed as
    neither (contested), dep by 10.0.0.2 alone. Shard 0's Service deleted while the watch was away, the relist
    took its slices out in the ledger's order: 10.0.0.2's first, and dep had no replica until the other's, going,
    settled the contest and routed 10.0.0.1 as shard 1 (the model's seed 20063). The one that frees a rival
    goes first."""
    pool = lm.CheckingPool("default", deployments=("dep",), sources=(SLICES,))
    try:
        zero_b = lm.slice_obj(("dep", "WORKER", 0), "b", 0, [_ep("10.0.0.2")])
        zero_a = lm.slice_obj(("dep", "WORKER", 0), "a", 0, [_ep("10.0.0.1")])
        one = lm.slice_obj(("dep", "WORKER", 1), "a", 0, [_ep("10.0.0.1")])
        await pool._on_list(SLICES, [zero_b, zero_a])
        await pool._on_event(SLICES, "ADDED", one)
        await pool._ledger.drain()
        assert _routed(pool) == {("dep", 0, "10.0.0.2:9000")}  # 10.0.0.1 contested: neither shard's
        emptied = _noting_emptied(pool)
        await pool._on_list(SLICES, [one])
        await pool._ledger.drain()
        assert _routed(pool) == {("dep", 1, "10.0.0.1:9000")}
        assert "dep" not in emptied
    finally:
        await pool.close()


async def test_a_relist_routes_a_contested_address_it_settles_before_another_deployment_takes_an_address_over():
    """10.0.0.4 is contested in dep (shard 0's slice and shard 2's), dep routed by 10.0.0.5 (shard 1) alone. The
    relist says 10.0.0.5 is dep2's now and 10.0.0.4 shard 0's (a new slice): both objects 'take an address held
    as another member', so they came in the listing's order, dep2's first, which took dep's last routed replica
    before shard 0's came in (the model's seed 103). An address held only contested displaces nothing routed:
    the object claiming it comes in first."""
    pool = lm.CheckingPool("default", sources=(SLICES,))
    try:
        await pool._on_list(SLICES, [
            lm.slice_obj(("dep", "WORKER", 2), "b", 0, [_ep("10.0.0.4")]),
            lm.slice_obj(("dep", "WORKER", 1), "b", 0, [_ep("10.0.0.5")]),
            lm.slice_obj(("dep", "WORKER", 0), "a", 0, [_ep("10.0.0.4")]),
        ])
        await pool._ledger.drain()
        assert _routed(pool) == {("dep", 1, "10.0.0.5:9000")}  # 10.0.0.4 contested: neither shard's
        emptied = _noting_emptied(pool)
        await pool._on_list(SLICES, [
            lm.slice_obj(("dep2", "WORKER", 1), "b", 0, [_ep("10.0.0.5")]),
            lm.slice_obj(("dep", "WORKER", 0), "b", 0, [_ep("10.0.0.4")]),
        ])
        await pool._ledger.drain()
        assert _routed(pool) == {("dep", 0, "10.0.0.4:9000"), ("dep2", 1, "10.0.0.5:9000")}
        assert "dep" not in emptied
    finally:
        await pool.close()


async def test_a_relist_moves_a_hop_to_its_new_address_before_another_role_takes_its_old_one():
    """uses_after's slice moved its one endpoint from 10.0.0.1 to 10.0.0.5 while shard 1's new slice lists
    10.0.0.1: the slice that moved counted as one that shrinks and came after the one that 'takes an address held
    as another member', which took uses_after's only replica out before its new one came in (the model's seed
    617, shrunk). A member given up for another of the same shard, head or hop is no shrink: it comes in first."""
    pool = lm.CheckingPool("default", deployments=("dep",), sources=(SLICES,))
    try:
        hop = lm.slice_obj(("dep", "USES_AFTER", 0), "b", 0, [_ep("10.0.0.1")])
        await pool._on_list(SLICES, [hop, lm.slice_obj(("dep", "WORKER", 2), "a", 0, [_ep("10.0.0.2")])])
        assert _routed(pool) == {("dep/uses_after", 0, "10.0.0.1:9000"), ("dep", 2, "10.0.0.2:9000")}
        emptied = _noting_emptied(pool)
        await pool._on_list(SLICES, [
            lm.slice_obj(("dep", "WORKER", 1), "a", 0, [_ep("10.0.0.1")]),
            lm.slice_obj(("dep", "WORKER", 0), "b", 0, [_ep("10.0.0.2")]),
            lm.slice_obj(("dep", "USES_AFTER", 0), "b", 0, [_ep("10.0.0.5")]),
        ])
        await pool._ledger.drain()
        assert _routed(pool) == {
            ("dep/uses_after", 0, "10.0.0.5:9000"), ("dep", 1, "10.0.0.1:9000"), ("dep", 0, "10.0.0.2:9000")
        }
        assert "dep/uses_after" not in emptied
    finally:
        await pool.close()


async def test_a_relabelled_slice_does_not_start_every_close_at_once(monkeypatch):
    """Members of one object all moving to another role at their addresses (a slice of 1,000 endpoints relabelled
    to another shard) started every channel close in one loop pass; grpc.aio's close walks every task of the loop,
    and 1,000 at once stalled it 1.5 s (a regression review's find)."""
    seen: list[int] = []
    close = Connection.close

    async def counting_close(self, *args, **kwargs):
        seen.append(len(asyncio.all_tasks()))  # what grpc.aio's close walks
        return await close(self, *args, **kwargs)

    monkeypatch.setattr(Connection, "close", counting_close)
    pool = K8sGrpcConnectionPool("default")
    ledger = pool._ledger
    addresses = [f"10.{i // 250}.{i % 250}.1:9000" for i in range(400)]
    try:
        await ledger.record("endpointslices", "s", frozenset(Member("dep", False, 0, a) for a in addresses))
        await ledger.drain()
        await ledger.record("endpointslices", "s", frozenset(Member("dep", False, 1, a) for a in addresses))
        await ledger.drain()
        assert len(pool.deployments["dep"]["shards"][1]) == 400
        assert len(seen) == 400
        assert max(seen) < 100, f"a close walked {max(seen)} tasks"
    finally:
        await pool.close()


# the model's seeds 5044 and 5277: a pod relabelled away from its slice's shard and back took the slice's hold (the
# fresher claim); the pods then failed, the pod ended, and its slice dropped it: the ledger looked only at what the
# slice's record held (no longer that member), and the failing pods' stale hold kept the ended pod routed until
# the pods answered (a regression review)
_SEED_5044 = [('new_pod', 'u2', 'dep', 'WORKER', 1, '10.0.0.2', True), ('ready', 'u2', False), ('relist', 'pods'),
              ('new_pod', 'u4', 'dep', 'WORKER', 2, '10.0.0.5', True), ('ready', 'u2', True), ('deliver', 'pods'),
              ('sync', ('dep', 'WORKER', 2), 5), ('relabel', 'u4', 'dep', 'WORKER', 0), ('deliver', 'pods'),
              ('relabel', 'u4', 'dep', 'WORKER', 2), ('deliver', 'endpointslices'), ('end', 'u4', 'Succeeded'),
              ('deliver', 'endpointslices'), ('deliver', 'pods'), ('deliver', 'pods'), ('down', 'pods'),
              ('sync', ('dep', 'WORKER', 2), 13), ('deliver', 'endpointslices')]
_SEED_5277 = [('new_pod', 'u2', 'dep', 'HEAD', 0, '10.0.0.3', True), ('relabel', 'u2', 'dep', 'WORKER', 1),
              ('sync', ('dep', 'WORKER', 1), 12), ('end', 'u2', 'Succeeded'), ('deliver', 'endpointslices'),
              ('deliver', 'pods'), ('deliver', 'pods'), ('down', 'pods'), ('sync', ('dep', 'WORKER', 1), 8),
              ('deliver', 'endpointslices')]


@pytest.mark.parametrize("actions, seed, how", [(_SEED_5044, 5044, "relist"), (_SEED_5277, 5277, "resume")],
                         ids=["relabelled-worker", "relabelled-head"])
async def test_a_slice_dropping_a_pod_whose_hold_a_relabel_took_lets_it_go_while_the_pods_fail(actions, seed, how):
    assert await run_actions(actions, ("dep",), seed, how) is None
