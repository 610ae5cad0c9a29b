"""The Kubernetes membership ledger under a randomized model check (``ledger_model.py``), and the cases it found.

The pool is not started: its handlers are fed the events and lists its watches would hand over.
"""

from __future__ import annotations

import pytest
from k8s_apiserver import endpoint_slice, pod
import ledger_model as lm
from ledger_model import generate, run_actions, run_concurrent

from shardnet.discovery.kubernetes import PODS, SLICES, K8sGrpcConnectionPool


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


@pytest.mark.parametrize("seed", range(0, 100, 10))
async def test_randomized_model_check_of_the_ledger(seed):
    """Ten seeds per case, 150 steps each, sequential handlers: invariants 1-5 at each step, truth at quiescence."""
    for one in range(seed, seed + 10):
        actions, followed, _, how, fault = await generate(one, 150)
        if fault is None:
            fault = await run_actions(actions, followed, one, how)
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
