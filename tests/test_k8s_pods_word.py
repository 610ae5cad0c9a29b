"""The pods' word on lagging EndpointSlices, against a loopback API server and the real client: the cases a
regression review of the first version broke (``discovery/pods_word.py``).

Fixtures come from test_k8s_discovery; as there, "X never shows up" is checked by waiting for a sentinel
change made after X, which the watch delivers in order.
"""

from __future__ import annotations

import asyncio

import pytest
from k8s_apiserver import endpoint_slice, pod
from test_k8s_discovery import api_server, kube_client, kubeconfig, replicas, start_pool  # noqa: F401 - fixtures

from shardnet.discovery.kubernetes import PODS, SLICES, K8sGrpcConnectionPool


def _slice(name: str, shard: str, pods: list[dict]) -> dict:
    """Shard ``shard``'s slice listing ``pods`` ready on port 9000, each named by its targetRef."""
    ips = {p["status"]["podIP"]: p for p in pods}
    return endpoint_slice(name, f"dep-{shard}", [(ip, True, None) for ip in ips], shard=shard, port=9000, pods=ips)


async def _sentinel(api_server, pool, shard: str = "9") -> None:
    """Wait until a pod applied now is routed: every event before it has been handled."""
    api_server.apply("pods", pod("sentinel", shard_id=shard, ip="10.0.0.99", port=9000))
    await _until(lambda: replicas(pool, shard_id=int(shard)) == {"10.0.0.99:9000"})


async def _until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("new_shard", ["0", "1"])
async def test_while_the_pods_fail_a_new_pod_at_a_reused_ip_is_routed_from_its_slice(api_server, start_pool, new_shard):
    """Who holds an IP changes while the pods cannot say so: their stale word kept a new pod at a deleted pod's IP
    out of its shard for as long as they failed."""
    w0 = api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    w0b = api_server.apply("pods", pod("w0b", ip="10.0.0.2", port=9000))
    api_server.apply("endpointslices", _slice("s0", "0", [w0, w0b]))
    api_server.apply("endpointslices", _slice("s1", "1", []))
    pool = await start_pool()
    api_server.forbidden = {"pods"}  # a Role edited
    api_server.drop_streams()
    await _until(lambda: pool.failing_sources() == {"pods"})
    api_server.delete("pods", "w0")
    new = api_server.apply("pods", pod("w-new", shard_id=new_shard, ip="10.0.0.1", port=9000))
    if new_shard == "0":
        api_server.apply("endpointslices", _slice("s0", "0", [new, w0b]))
    else:
        api_server.apply("endpointslices", _slice("s0", "0", [w0b]))
        api_server.apply("endpointslices", _slice("s1", "1", [new]))
    api_server.apply("endpointslices", endpoint_slice("s9", "dep-9", [("10.0.0.9", True, None)], shard="9", port=9000))
    await _until(lambda: replicas(pool, shard_id=9) == {"10.0.0.9:9000"})
    assert "10.0.0.1:9000" in replicas(pool, shard_id=int(new_shard))


async def test_while_the_pods_fail_a_lagging_slice_keeps_a_reused_ip_in_no_shard_and_lets_it_go_to_its_new_one(
    api_server, start_pool
):
    """A deleted pod's IP reused by a pod of shard 1 while the pods fail and shard 0's slice lags: the pods' stale
    word on the deleted pod outvoted shard 1's slice, so shard 0's requests went to a shard-1 worker, and once the
    lag ended shard 1 never got it (a Kubernetes pause review). Now contested, it is neither shard's meanwhile."""
    w0 = api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    w0b = api_server.apply("pods", pod("w0b", ip="10.0.0.2", port=9000))
    api_server.apply("endpointslices", _slice("s0", "0", [w0, w0b]))
    api_server.apply("endpointslices", _slice("s1", "1", []))
    pool = await start_pool()
    api_server.forbidden = {"pods"}
    api_server.drop_streams()
    await _until(lambda: pool.failing_sources() == {"pods"})
    api_server.delete("pods", "w0")
    new = api_server.apply("pods", pod("w-new", shard_id="1", ip="10.0.0.1", port=9000))
    api_server.apply("endpointslices", _slice("s1", "1", [new]))  # s0 still lists 10.0.0.1: it lags
    # the slices' sentinel (the pods' fails): every slice event before it has been handled
    api_server.apply("endpointslices", endpoint_slice("s9", "dep-9", [("10.0.0.9", True, None)], shard="9", port=9000))
    await _until(lambda: replicas(pool, shard_id=9) == {"10.0.0.9:9000"})
    assert replicas(pool) == {"10.0.0.2:9000"}, replicas(pool)  # no shard-0 request to the shard-1 worker
    api_server.apply("endpointslices", _slice("s0", "0", [w0b]))  # the slice controller catches up
    await _until(lambda: replicas(pool, shard_id=1) == {"10.0.0.1:9000"})
    assert replicas(pool) == {"10.0.0.2:9000"}


async def test_a_veto_does_not_bring_back_what_the_ledger_let_go_as_stale(api_server, start_pool):
    """The slices failing, a not-ready pod's hold by them was dropped as stale; a veto on another endpoint of the
    same slice recorded the slice's whole contribution again, and the not-ready pod came back."""
    a, b, c = (api_server.apply("pods", pod(n, ip=f"10.0.0.{i}", port=9000)) for i, n in ((1, "a"), (2, "b"), (3, "c")))
    api_server.apply("endpointslices", _slice("s0", "0", [a, b, c]))
    pool = await start_pool()
    api_server.forbidden = {"endpointslices"}
    api_server.drop_streams()
    await _until(lambda: pool.failing_sources() == {"endpointslices"})
    api_server.apply("pods", pod("a", ip="10.0.0.1", port=9000, ready=False))
    await _until(lambda: replicas(pool) == {"10.0.0.2:9000", "10.0.0.3:9000"})
    api_server.apply("pods", pod("b", ip="10.0.0.2", port=9000, deleting=True))
    await _sentinel(api_server, pool)
    assert replicas(pool) == {"10.0.0.3:9000"}


async def test_a_veto_does_not_bring_back_a_slice_claim_a_fresher_one_replaced(api_server, start_pool):
    """A pod relabelled from shard 0 to shard 1 (the pods' claim wins over the lagging slice's); then another pod
    of that slice terminating put the stale shard-0 claim back, and it won over the pods'."""
    p = api_server.apply("pods", pod("p", ip="10.0.0.1", port=9000))
    q = api_server.apply("pods", pod("q", ip="10.0.0.2", port=9000))
    api_server.apply("endpointslices", _slice("s0", "0", [p, q]))
    pool = await start_pool()
    api_server.apply("pods", pod("p", shard_id="1", ip="10.0.0.1", port=9000))
    await _until(lambda: replicas(pool, shard_id=1) == {"10.0.0.1:9000"} and replicas(pool) == {"10.0.0.2:9000"})
    api_server.apply("pods", pod("q", ip="10.0.0.2", port=9000, deleting=True))
    await _sentinel(api_server, pool)
    assert replicas(pool, shard_id=1) == {"10.0.0.1:9000"} and replicas(pool) == set()


async def test_a_slices_relist_records_each_contribution_as_it_stands_when_recorded() -> None:
    """A re-list computed every slice's contribution first, then recorded them one by one, yielding between: a pod
    event handled meanwhile was overwritten, and the pod stayed routed even after its deletion. The pool's own
    handlers are interleaved as its two watch tasks can run them."""
    def named(obj: dict, uid: str) -> dict:
        obj["metadata"].update(uid=uid, namespace="default")
        return obj

    pool = K8sGrpcConnectionPool("default")
    p = named(pod("p", ip="10.0.0.2", port=9000), "uid-p")
    await pool._on_list(PODS, [p, named(pod("q", ip="10.0.0.1", port=9000), "uid-q")])
    s1 = named(endpoint_slice("s1", "dep-1", [("10.0.0.5", True, None)], shard="1", port=9000), "uid-s1")
    s2 = named(endpoint_slice("s2", "dep-0", [("10.0.0.2", True, None)], port=9000, pods={"10.0.0.2": p}), "uid-s2")
    await pool._on_list(SLICES, [s1, s2])
    try:
        emptied = named(endpoint_slice("s1", "dep-1", [], shard="1", port=9000), "uid-s1")
        relist = asyncio.ensure_future(pool._on_list(SLICES, [emptied, s2]))
        await asyncio.sleep(0)  # the re-list runs until its first removal yields
        deleting = named(pod("p", ip="10.0.0.2", port=9000, deleting=True), "uid-p")
        await pool._on_event(PODS, "MODIFIED", deleting)
        await relist
        await pool._ledger.drain()
        assert replicas(pool) == {"10.0.0.1:9000"}
    finally:
        await pool.close()


@pytest.mark.parametrize("where", ["list", "event"])
@pytest.mark.parametrize("field", ["status", "spec"])
async def test_a_malformed_pod_is_skipped_and_the_others_followed(api_server, start_pool, where, field):
    """The pods' word read a pod's fields unguarded: one malformed pod stopped pod discovery, re-listing in a loop."""
    broken = pod("broken", ip="10.0.0.1")
    broken[field] = "garbage" if field == "status" else ["garbage"]
    if where == "list":
        api_server.apply("pods", broken)
    pool = await start_pool(sync=False, sources=("pods",))
    if where == "event":
        await pool.wait_synced(timeout=5)
        api_server.apply("pods", broken)
    api_server.apply("pods", pod("fine", ip="10.0.0.2"))
    await _until(lambda: replicas(pool) == {"10.0.0.2:8080"})
    await pool.wait_synced(timeout=5)


async def test_a_slice_naming_a_pod_after_its_deletion_was_seen_does_not_route_it(api_server, start_pool):
    """A deletion was remembered only when a slice named the pod already: a slice update made before the deletion
    and delivered after it routed the deleted pod."""
    a = api_server.apply("pods", pod("a", ip="10.0.0.1", port=9000))
    b = api_server.apply("pods", pod("b", ip="10.0.0.2", port=9000))
    api_server.apply("endpointslices", _slice("s0", "0", [b]))
    pool = await start_pool()
    api_server.delete("pods", "a")
    api_server.apply("endpointslices", _slice("s0", "0", [a, b]))  # made while a was ready, delivered late
    await _sentinel(api_server, pool)
    assert replicas(pool) == {"10.0.0.2:9000"}


@pytest.mark.parametrize("pods_port", [9000, 9001], ids=["same-port", "slice-only-port"])
async def test_a_pod_back_in_the_selector_is_routed_from_its_slice_whichever_watch_says_so_first(pods_port) -> None:
    """A pod's label edited away (DELETED) and back, the slices' watch ahead of the pods': its slice's word was
    spent while the deletion still stood, and the slice's endpoint stayed out until the slice changed again (a
    regression review's find; it shows where the slice holds what the pods do not, another port here)."""
    def named(obj: dict, uid: str) -> dict:
        obj["metadata"].update(uid=uid, namespace="default")
        return obj

    pool = K8sGrpcConnectionPool("default")
    p = named(pod("p", ip="10.0.0.1", port=pods_port), "uid-p")

    def listed(ready: bool) -> dict:
        endpoints = [("10.0.0.1", True, None)] if ready else []
        return named(endpoint_slice("s0", "dep-0", endpoints, port=9000, pods={"10.0.0.1": p}), "uid-s0")

    try:
        await pool._on_list(PODS, [p])
        await pool._on_list(SLICES, [listed(True)])
        await pool._on_event(PODS, "DELETED", p)  # out of the selector
        await pool._on_event(SLICES, "MODIFIED", listed(False))
        await pool._on_event(SLICES, "MODIFIED", listed(True))  # back: the slices say so first
        await pool._on_event(PODS, "ADDED", p)
        await pool._ledger.drain()
        assert replicas(pool) == {"10.0.0.1:9000", f"10.0.0.1:{pods_port}"}
    finally:
        await pool.close()
