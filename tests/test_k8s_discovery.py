"""Kubernetes discovery against a loopback API server, through the real kubernetes_asyncio client.

Every test runs its own FakeApiServer on a free port, a kubeconfig in its
tmp_path and a real ApiClient built from it, so tests run in parallel. Waits
poll with a deadline (``eventually``); "X never shows up" is checked by
waiting for a sentinel change made after X, which the watch delivers in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections import Counter
from typing import Any, AsyncIterator, Callable, Optional

import executors
import aiohttp
import grpc
import pytest
import trustme
from k8s_apiserver import FakeApiServer, endpoint_slice, pod, write_kubeconfig
from kubernetes_asyncio import config as k8s_config
from grpc_health.v1 import health_pb2
from kubernetes_asyncio.client import ApiClient, Configuration

from shardnet.cli.main import main as cli_main
from shardnet.cli.status import DEGRADED
from shardnet.discovery.configuration import load_api_client
from shardnet.discovery.kubernetes import (
    LIST_BATCH, PODS, SLICES, K8sGrpcConnectionPool, Member, _Ledger, pod_members, slice_members,
)
from shardnet.discovery.watch import LIST_PAGE_SIZE, MAX_EMPTY_PAGES, EndlessList, ListProgress, WatchOptions
from shardnet.errors import ConfigurationError, DiscoveryError, ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.policies import EjectionPolicy
from shardnet.networking.pool import GrpcConnectionPool
from shardnet.networking.polling import PollingMap, PollingType
from shardnet.protocol import services
from shardnet.protocol.messages import DataRequest
from shardnet.runtimes.head import DISCOVERED, Head
from shardnet.runtimes.processes import ShardnetProcess
from shardnet.runtimes.worker import Worker
from shardnet.testing import EchoServer, eventually

NS = "default"
FAST = WatchOptions(read_timeout=5.0, connect_timeout=1.0, list_timeout=5.0, backoff_initial=0.02, backoff_max=0.2)


def replicas(pool: K8sGrpcConnectionPool, deployment: str = "dep", shard_id: int = 0, head: bool = False) -> set[str]:
    """The addresses the pool holds for one shard (or head) of a deployment."""
    found = pool.get_replicas(deployment, head=head, shard_id=shard_id)
    return set(found.addresses) if found is not None else set()


class RecordingPool(K8sGrpcConnectionPool):
    """The real pool, noting every membership call discovery makes (to catch duplicates and churn)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.changes: list[tuple[str, str, str]] = []

    def add_connection(self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None) -> None:
        self.changes.append(("add", deployment, address))
        super().add_connection(deployment, address, head=head, shard_id=shard_id)

    async def remove_connection(
        self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None
    ):
        self.changes.append(("remove", deployment, address))
        return await super().remove_connection(deployment, address, head=head, shard_id=shard_id)

    def forget_deployment(self, deployment: str) -> bool:
        forgotten = super().forget_deployment(deployment)
        if forgotten:
            self.changes.append(("forget", deployment, ""))
        return forgotten


class RoleCheckingPool(RecordingPool):
    """A RecordingPool noting, the moment it happens, an address routed as two roles at once, of its deployment
    or across deployments (a request for one shard, or one deployment, could reach a worker of another), and a
    shard or head left with no replica."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.faults: list[str] = []

    def add_connection(self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None) -> None:
        super().add_connection(deployment, address, head=head, shard_id=shard_id)
        holding = [role for name in self.deployments for role in self._roles_at(name, address)]
        if len(holding) > 1:
            self.faults.append(f"{address} routed as {holding}")

    def _roles_at(self, deployment: str, address: str) -> list[tuple[str, str, Optional[int]]]:
        """The roles of ``deployment`` routed to ``address``: (deployment, "head" or "shard", shard id)."""
        roles = [("head", None)] + [("shard", shard) for shard in self.shard_ids(deployment)]
        return [
            (deployment, kind, shard) for kind, shard in roles
            if address in replicas(self, deployment, shard or 0, kind == "head")
        ]

    async def remove_connection(
        self, deployment: str, address: str, head: bool = False, shard_id: Optional[int] = None
    ):
        if replicas(self, deployment, shard_id or 0, head) == {address}:
            self.faults.append(f"{'head' if head else f'shard {shard_id}'} emptied by removing {address}")
        return await super().remove_connection(deployment, address, head=head, shard_id=shard_id)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
async def api_server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        yield server


@pytest.fixture
def kubeconfig(api_server: FakeApiServer, tmp_path) -> str:
    return str(write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS))


@pytest.fixture
async def kube_client(kubeconfig: str) -> AsyncIterator[ApiClient]:
    client = await k8s_config.new_client_from_config(config_file=kubeconfig, persist_config=False)
    async with client:
        yield client


@pytest.fixture
async def start_pool(kube_client: ApiClient) -> AsyncIterator[Callable[..., Any]]:
    """``await start_pool(**options)``: a started, synced RecordingPool, closed after the test."""
    pools: list[K8sGrpcConnectionPool] = []

    async def start(sync: bool = True, pool_class: type = RecordingPool, **options: Any) -> RecordingPool:
        options.setdefault("watch", FAST)
        pool = pool_class(NS, kube_client, **options)
        pools.append(pool)
        pool.start()
        if sync:
            await pool.wait_synced(timeout=5)
        return pool

    yield start
    for pool in pools:
        await pool.close()


# -- what an object contributes (pure mapping) -----------------------------------------


def test_pod_roles_ports_and_addresses() -> None:
    head = pod("h", pod_type="HEAD", shard_id="", ip="10.0.0.2", port=9000)
    before = pod("b", pod_type="USES_BEFORE", shard_id=None, ip="10.0.0.3")
    after = pod("a", pod_type="uses-after", ip="fd00::4")
    worker = pod("w", pod_type="Worker", shard_id="3", ip="10.0.0.5")
    assert pod_members(head) == {Member("dep", True, None, "10.0.0.2:9000")}
    assert pod_members(before) == {Member("dep/uses_before", False, 0, "10.0.0.3:8080")}
    assert pod_members(after) == {Member("dep/uses_after", False, 0, "[fd00::4]:8080")}
    assert pod_members(worker) == {Member("dep", False, 3, "10.0.0.5:8080")}
    assert pod_members(pod("x", shard_id="three")) == frozenset()
    assert pod_members(pod("x", pod_type="GATEWAY")) == frozenset()
    assert pod_members(pod("x", ready=False)) == frozenset()
    assert pod_members(pod("x", ready=False), ready_only=False) == {Member("dep", False, 0, "10.0.0.1:8080")}
    assert pod_members(pod("x", shard_id="1_0")) == frozenset()  # int() would read shard 10


def test_a_pod_counts_when_kubernetes_calls_it_ready() -> None:
    # a node that stopped answering: the node controller clears the Ready condition, containers still say ready
    assert pod_members(pod("x", ready=True, ready_condition=False)) == frozenset()
    # a readiness gate still pending looks the same; and the condition decides the other way too
    assert {m.address for m in pod_members(pod("x", ready=False, ready_condition=True))} == {"10.0.0.1:8080"}
    no_conditions = pod("x")
    del no_conditions["status"]["conditions"]  # not set yet: the containers' readiness decides
    assert {m.address for m in pod_members(no_conditions)} == {"10.0.0.1:8080"}
    no_conditions["status"]["containerStatuses"][0]["ready"] = False
    assert pod_members(no_conditions) == frozenset()


def test_a_pod_is_reached_on_its_port_named_grpc() -> None:
    metrics_first = pod("x", ports=[{"name": "metrics", "containerPort": 9090}, {"name": "grpc", "containerPort": 8081}])
    assert {m.address for m in pod_members(metrics_first)} == {"10.0.0.1:8081"}
    unnamed = pod("x", ports=[{"containerPort": 7000}, {"containerPort": 7001}])
    assert {m.address for m in pod_members(unnamed)} == {"10.0.0.1:7000"}  # none named: the first, as before


def test_slice_conditions(caplog) -> None:
    endpoints = [
        ("10.0.1.1", None, None),
        ("10.0.1.2", True, None),
        ("10.0.1.3", False, None),
        ("10.0.1.4", True, True),
    ]
    members = slice_members(endpoint_slice("s", "svc", endpoints, shard="2", port=7000))
    assert {m.address for m in members} == {"10.0.1.1:7000", "10.0.1.2:7000"}
    assert {m.shard_id for m in members} == {2}
    no_grpc_port = endpoint_slice("s", "svc", endpoints)
    no_grpc_port["ports"][0]["name"] = "http"
    assert slice_members(no_grpc_port) == frozenset()
    # dropped without a word before (a k8s review's find)
    assert "EndpointSlice None/s of 'dep' has no port named 'grpc': its endpoints are not followed" in caplog.text


def test_bad_sources_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        K8sGrpcConnectionPool(NS, sources=("services",))
    with pytest.raises(ConfigurationError):
        K8sGrpcConnectionPool(NS, sources=())


@pytest.mark.parametrize(
    "namespace, words",
    [
        ("Default", "cannot be a Kubernetes namespace: lower-case letters"),
        ("my_ns", "cannot be a Kubernetes namespace"),
        ("-ns", "a letter or digit at each end"),
        ("n" * 64, "63 at most"),
        ("$(POD_NAMESPACE)", "(a variable left unexpanded?)"),
    ],
)
def test_a_namespace_kubernetes_cannot_have_is_refused(namespace: str, words: str) -> None:
    """The API server lists nothing, without an error, in a namespace that cannot exist: a head given one turned
    ready with no worker and said nothing (found by a Kubernetes review)."""
    with pytest.raises(ConfigurationError, match=r"namespace .* cannot be a Kubernetes namespace") as refused:
        K8sGrpcConnectionPool(namespace)
    assert words in str(refused.value)


async def test_a_head_whose_discovery_finds_no_worker_says_so_naming_the_namespace(
    api_server: FakeApiServer, kubeconfig: str, caplog, eventually
) -> None:
    """A namespace typed wrong lists empty: the head said "discovery listed a worker for every shard; ready"."""
    api_server.apply("pods", pod("w0", deployment="other", ip="10.0.0.1"))
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, deployments=("dep",))
    head = Head("dep", pool=pool)
    await head.start()
    try:
        await eventually(lambda: "discovery found no worker of it" in caplog.text, timeout=10)
        assert "dep: discovery found no worker of it in namespace 'default'; ready, and every request fails until " \
            "one appears" in caplog.text
        assert "listed a worker for every shard" not in caplog.text
    finally:
        await head.stop(0.5)


async def test_a_head_told_of_no_uses_before_says_so_of_the_uses_before_pods_discovery_found(
    api_server: FakeApiServer, kubeconfig: str, caplog, eventually
) -> None:
    """Pods labelled pod_type=uses_before were listed as replicas and never called, without a word (a Kubernetes
    review's find): a head calls the uses_before given by --uses-before, and k8s render renders none."""
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    api_server.apply("pods", pod("before", pod_type="uses_before", shard_id=None, ip="10.0.0.2"))
    head = Head("dep", pool=K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, deployments=("dep",)))
    await head.start()
    try:
        await eventually(lambda: head.server.ready_at_start, timeout=10)  # set once ready
        assert "dep: discovery found uses_before pods of it (10.0.0.2:8080) but this head has no --uses-before: they " \
            "are not called" in caplog.text
        assert "uses_after pods" not in caplog.text
    finally:
        await head.stop(0.5)


async def test_an_api_server_that_never_answers_a_list_is_named_as_such(caplog) -> None:
    """A hung API server was logged as "TimeoutError: " and nothing more (found by a Kubernetes review)."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepted, never answered

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ApiClient(Configuration(host=f"http://127.0.0.1:{port}"))
    try:
        options = WatchOptions(list_timeout=0.3, connect_timeout=1.0, backoff_initial=0.02, backoff_max=0.1)
        async with K8sGrpcConnectionPool(NS, client, watch=options, sources=("pods",)) as pool:
            with pytest.raises(DiscoveryError) as failed:
                await pool.wait_synced(timeout=2)
        assert "no whole answer to the list within 0.3s" in str(failed.value), str(failed.value)
        assert "no whole answer to the list within 0.3s" in caplog.text
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
        await client.close()


# -- pods ----------------------------------------------------------------------------


async def test_initial_list(api_server: FakeApiServer, start_pool) -> None:
    api_server.apply("pods", pod("w0", ip="10.0.0.1", port=50051))
    api_server.apply("pods", pod("w1", shard_id="1", ip="10.0.0.2"))
    api_server.apply("pods", pod("h", pod_type="HEAD", shard_id="", ip="10.0.0.3"))
    api_server.apply("pods", pod("ub", pod_type="uses_before", ip="10.0.0.4"))
    api_server.apply("pods", pod("ua", pod_type="USES_AFTER", ip="10.0.0.5"))
    api_server.apply("pods", pod("starting", ip="10.0.0.6", ready=False))
    api_server.apply("pods", pod("other-ns", ip="10.0.0.7"), namespace="elsewhere")
    pool = await start_pool()

    assert replicas(pool, shard_id=0) == {"10.0.0.1:50051"}
    assert replicas(pool, shard_id=1) == {"10.0.0.2:8080"}
    assert replicas(pool, head=True) == {"10.0.0.3:8080"}
    assert replicas(pool, "dep/uses_before") == {"10.0.0.4:8080"}
    assert replicas(pool, "dep/uses_after") == {"10.0.0.5:8080"}
    [listed] = api_server.list_requests("pods")
    assert listed["labelSelector"] == "jina_deployment_name,pod_type"
    await eventually(lambda: api_server.watch_requests("pods"))
    watched = api_server.watch_requests("pods")[0]
    assert watched["resourceVersion"] == str(api_server.version)  # from the list's version
    assert watched["allowWatchBookmarks"].lower() == "true" and watched["timeoutSeconds"] == "300"
    assert "watching" in repr(pool) and pool.watching


async def test_a_pool_narrowed_to_its_deployments_lists_and_keeps_only_theirs(
    api_server: FakeApiServer, start_pool
) -> None:
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    api_server.apply("pods", pod("ua", pod_type="uses_after", ip="10.0.0.2"))
    api_server.apply("pods", pod("x0", deployment="other", ip="10.0.0.3"))
    pool = await start_pool(deployments=("dep",))
    assert set(pool.deployments) == {"dep", "dep/uses_after"}  # the other deployment's pod is not followed
    assert api_server.list_requests("pods")[0]["labelSelector"] == "jina_deployment_name in (dep),pod_type"
    api_server.apply("pods", pod("x1", deployment="other", ip="10.0.0.4"))
    api_server.apply("pods", pod("w1", ip="10.0.0.5"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.5:8080"})
    assert "other" not in pool.deployments


async def test_a_pool_following_the_namespace_forgets_a_deployment_whose_last_pod_left(
    api_server: FakeApiServer, start_pool
) -> None:
    """A gateway's pool kept every deployment it ever saw, emptied, for ever (a namespace of per-job deployments
    grows without end); a head's pool keeps its own, so ALL can name the shard that has no worker left."""
    for index in range(3):
        api_server.apply("pods", pod(f"job-{index}", deployment=f"job-{index}", ip=f"10.0.1.{index}"))
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    gateway, head = await start_pool(), await start_pool(deployments=("dep",))
    assert set(gateway.deployments) == {"dep", "job-0", "job-1", "job-2"}
    for index in range(3):
        api_server.delete("pods", f"job-{index}")
    api_server.delete("pods", "w0")
    await eventually(lambda: set(gateway.deployments) == set())
    await eventually(lambda: head.deployments == {"dep": {"head": [], "shards": {0: []}}})
    api_server.apply("pods", pod("job-1", deployment="job-1", ip="10.0.1.1"))  # back: known again
    await eventually(lambda: gateway.deployments == {"job-1": {"head": [], "shards": {0: ["10.0.1.1:8080"]}}})


@pytest.mark.parametrize("deployments", ["dep", (), ("a b",), ("x" * 64,)])
def test_deployments_must_be_label_values(deployments) -> None:
    with pytest.raises(ConfigurationError, match="deployment"):
        K8sGrpcConnectionPool(NS, deployments=deployments)


async def test_added_pod_joins(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool()
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    api_server.apply("pods", pod("w9", shard_id="9", ip="10.0.0.9"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080"} and replicas(pool, shard_id=9) == {"10.0.0.9:8080"})


async def test_readiness_flips(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool()
    api_server.apply("pods", pod("w", ip="10.0.0.1", ready=False))
    api_server.apply("pods", pod("sentinel", ip="10.0.0.99"))
    await eventually(lambda: "10.0.0.99:8080" in replicas(pool))
    assert "10.0.0.1:8080" not in replicas(pool)

    api_server.apply("pods", pod("w", ip="10.0.0.1", ready=True))
    await eventually(lambda: "10.0.0.1:8080" in replicas(pool))
    api_server.apply("pods", pod("w", ip="10.0.0.1", ready=False))
    await eventually(lambda: "10.0.0.1:8080" not in replicas(pool))
    api_server.apply("pods", pod("w", ip="10.0.0.1", ready=True))
    await eventually(lambda: "10.0.0.1:8080" in replicas(pool))
    api_server.apply("pods", pod("w", ip="10.0.0.1", phase="Failed"))
    await eventually(lambda: "10.0.0.1:8080" not in replicas(pool))
    assert pool.changes.count(("add", "dep", "10.0.0.1:8080")) == 2
    assert pool.changes.count(("remove", "dep", "10.0.0.1:8080")) == 2


async def test_deletion(api_server: FakeApiServer, start_pool) -> None:
    api_server.apply("pods", pod("gone", ip="10.0.0.1"))
    api_server.apply("pods", pod("leaving", ip="10.0.0.2"))
    api_server.apply("pods", pod("head", pod_type="HEAD", shard_id="", ip="10.0.0.3"))
    pool = await start_pool()
    assert replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"}

    api_server.delete("pods", "gone")  # DELETED while still Running and ready
    await eventually(lambda: replicas(pool) == {"10.0.0.2:8080"})
    api_server.apply("pods", pod("leaving", ip="10.0.0.2", deleting=True))  # still ready, but terminating
    await eventually(lambda: replicas(pool) == set())
    api_server.delete("pods", "head")
    await eventually(lambda: replicas(pool, head=True) == set())


async def test_unlabelled_pods_ignored(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool()
    api_server.apply("pods", pod("bare", deployment=None, pod_type=None, shard_id=None, ip="10.0.0.1"))
    api_server.apply("pods", pod("no-type", pod_type=None, ip="10.0.0.2"))
    api_server.apply("pods", pod("gateway", pod_type="GATEWAY", ip="10.0.0.3"))
    api_server.apply("pods", pod("labelled", ip="10.0.0.4"))
    await eventually(lambda: replicas(pool) == {"10.0.0.4:8080"})
    assert set(pool.deployments) == {"dep"} and pool.shard_ids("dep") == [0]

    relabelled = api_server.get("pods", "labelled")
    del relabelled["metadata"]["labels"]["pod_type"]  # leaves the selector: the server says DELETED
    api_server.apply("pods", relabelled)
    await eventually(lambda: replicas(pool) == set())


async def test_flapping_pod_ends_where_its_last_event_says(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool(sources=("pods",))
    api_server.apply("pods", pod("w", ip="10.0.0.1"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080"})
    for _ in range(5):  # unready and ready again back to back: each re-add lands after its removal closed
        api_server.apply("pods", pod("w", ip="10.0.0.1", ready=False))
        api_server.apply("pods", pod("w", ip="10.0.0.1", ready=True))
    api_server.apply("pods", pod("sentinel", ip="10.0.0.99"))
    await eventually(lambda: "10.0.0.99:8080" in replicas(pool))
    await eventually(lambda: not pool._ledger._removals)
    assert replicas(pool) == {"10.0.0.1:8080", "10.0.0.99:8080"}
    assert pool.changes.count(("add", "dep", "10.0.0.1:8080")) == 6


async def test_a_pod_flapping_while_a_call_runs_on_it_answers_that_call_and_ends_routed(
    api_server: FakeApiServer, start_pool
) -> None:
    """Unready, ready, unready, ready while a slow call runs on the pod: each removal lets the old channel drain
    on its own, the pod is routed again on a new one at once, and the call still gets its answer."""
    async with EchoServer("slow", delay=1.0) as slow:
        api_server.apply("pods", pod("w", ip="127.0.0.1", port=slow.port))
        pool = await start_pool(sources=("pods",))
        in_flight = pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        await eventually(lambda: slow.calls == 1)
        for ready in (False, True, False, True):
            api_server.apply("pods", pod("w", ip="127.0.0.1", port=slow.port, ready=ready))
        api_server.apply("pods", pod("sentinel", deployment="other", ip="10.0.0.99"))
        await eventually(lambda: "10.0.0.99:8080" in replicas(pool, "other"))
        assert not in_flight.done() and replicas(pool) == {slow.address}
        assert pool.changes.count(("remove", "dep", slow.address)) == 2
        assert pool.changes.count(("add", "dep", slow.address)) == 3

        _, trailing = await in_flight  # on the first channel, drained rather than cut
        assert dict(tuple(trailing))["served-by"] == "slow" and slow.calls == 1
        _, trailing = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        assert dict(tuple(trailing))["served-by"] == "slow" and slow.calls == 2


async def test_malformed_pod_is_skipped(api_server: FakeApiServer, start_pool, caplog) -> None:
    pool = await start_pool(sources=("pods",))
    broken = pod("broken", ip="10.0.0.1")
    broken["spec"]["containers"][0]["ports"] = [{"containerPort": "not-a-port"}]
    api_server.apply("pods", broken)
    api_server.apply("pods", pod("fine", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.2:8080"})
    assert "ignoring malformed pods default/broken" in caplog.text


@pytest.mark.parametrize(
    "event",
    [
        {"type": "MODIFIED", "object": {"metadata": True}},
        {"type": "ADDED", "object": ["not", "an", "object"]},
        ["not", "an", "event"],
    ],
)
async def test_an_event_that_is_no_object_is_a_broken_stream_resumed(api_server, start_pool, caplog, event) -> None:
    pool = await start_pool(sources=("pods",))
    api_server.apply("pods", pod("first", ip="10.0.0.1"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080"})
    watches = len(api_server.watch_requests("pods"))
    api_server.raw_event("pods", event)
    await eventually(lambda: len(api_server.watch_requests("pods")) > watches)  # it watched again
    api_server.apply("pods", pod("second", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})
    assert "unreadable watch event" in caplog.text or "carries no Kubernetes object" in caplog.text


async def test_list_items_that_are_no_objects_are_skipped_and_the_rest_is_used(api_server, start_pool, caplog) -> None:
    api_server.junk_items = [["a", "list"], 7, {"metadata": "not an object"}]
    api_server.apply("pods", pod("fine", ip="10.0.0.3"))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: replicas(pool) == {"10.0.0.3:8080"})
    assert "ignored 3 list items that are not Kubernetes objects" in caplog.text


# -- endpointslices ----------------------------------------------------------------------


async def test_slices_of_a_service_are_merged(api_server: FakeApiServer, start_pool) -> None:
    api_server.apply(
        "endpointslices", endpoint_slice("svc-a", "svc", [("10.1.0.1", True, None), ("10.1.0.2", True, None)])
    )
    api_server.apply("endpointslices", endpoint_slice("svc-b", "svc", [("10.1.0.3", None, None)]))
    api_server.apply("endpointslices", endpoint_slice("head-a", "head-svc", [("10.1.0.9", True, None)], role="head"))
    pool = await start_pool(sources=("endpointslices",))
    assert replicas(pool) == {"10.1.0.1:50051", "10.1.0.2:50051", "10.1.0.3:50051"}
    assert replicas(pool, head=True) == {"10.1.0.9:50051"}
    assert api_server.list_requests("endpointslices")[0]["labelSelector"] == "shardnet.io/deployment"
    assert api_server.list_requests("pods") == []

    # an endpoint moving between slices: in both for a moment, then only in the other
    api_server.apply(
        "endpointslices", endpoint_slice("svc-b", "svc", [("10.1.0.3", None, None), ("10.1.0.2", True, None)])
    )
    api_server.apply("endpointslices", endpoint_slice("svc-a", "svc", [("10.1.0.1", True, None)]))
    api_server.delete("endpointslices", "svc-a")
    await eventually(lambda: replicas(pool) == {"10.1.0.2:50051", "10.1.0.3:50051"})
    assert ("remove", "dep", "10.1.0.2:50051") not in pool.changes


async def test_terminating_endpoints_are_out(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool(sources=("endpointslices",))
    endpoints = [
        ("10.1.0.1", None, None),
        ("10.1.0.2", False, None),
        ("10.1.0.3", True, True),
        ("10.1.0.4", True, False),
    ]
    api_server.apply("endpointslices", endpoint_slice("s", "svc", endpoints, role="uses-before"))
    await eventually(lambda: replicas(pool, "dep/uses_before") == {"10.1.0.1:50051", "10.1.0.4:50051"})
    api_server.apply(
        "endpointslices",
        endpoint_slice("s", "svc", [("10.1.0.1", True, True), ("10.1.0.4", True, False)], role="uses-before"),
    )
    await eventually(lambda: replicas(pool, "dep/uses_before") == {"10.1.0.4:50051"})


def test_an_endpoint_not_serving_is_out_though_ready_says_true_behind_publish_not_ready_addresses() -> None:
    """On a Service with publishNotReadyAddresses (a StatefulSet's headless one, often), the controller sets
    ready true for every pod: only serving tells (a k8s review's find: a pod that was not ready got requests)."""
    endpoint_slice_of = endpoint_slice("s", "svc", [("10.1.0.1", True, False), ("10.1.0.2", True, False)])
    endpoint_slice_of["endpoints"][0]["conditions"]["serving"] = False
    endpoint_slice_of["endpoints"][1]["conditions"]["serving"] = True
    assert slice_members(endpoint_slice_of) == {Member("dep", False, 0, "10.1.0.2:50051")}


async def test_a_replica_held_by_both_sources_leaves_with_the_last(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool()
    api_server.apply("pods", pod("p", ip="10.2.0.1", port=50051))
    api_server.apply("endpointslices", endpoint_slice("s", "svc", [("10.2.0.1", True, None)]))
    api_server.apply("endpointslices", endpoint_slice("later", "svc", [("10.2.0.2", True, None)]))
    # the two sources are separate streams: "later" showing up means the slice watch has seen "s" too
    await eventually(lambda: replicas(pool) == {"10.2.0.1:50051", "10.2.0.2:50051"})
    api_server.delete("pods", "p")
    api_server.apply("pods", pod("sentinel", ip="10.2.0.9"))
    await eventually(lambda: "10.2.0.9:8080" in replicas(pool))
    assert "10.2.0.1:50051" in replicas(pool)
    api_server.delete("endpointslices", "s")
    await eventually(lambda: replicas(pool) == {"10.2.0.2:50051", "10.2.0.9:8080"})
    assert pool.changes.count(("add", "dep", "10.2.0.1:50051")) == 1


# -- the watch protocol ------------------------------------------------------------------


@pytest.mark.parametrize("gone_as", ["event", "status"])
async def test_410_relists_and_reconciles(api_server: FakeApiServer, start_pool, gone_as: str) -> None:
    api_server.gone_as = gone_as
    for name, ip in (("stays", "10.0.0.1"), ("vanishes", "10.0.0.2"), ("unready", "10.0.0.3")):
        api_server.apply("pods", pod(name, ip=ip))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)

    # While the client is disconnected the world changes and the history is compacted:
    # its resume version is too old, so it must re-list and diff.
    api_server.drop_streams()
    api_server.delete("pods", "vanishes")
    api_server.apply("pods", pod("unready", ip="10.0.0.3", ready=False))
    api_server.apply("pods", pod("appears", ip="10.0.0.4"))
    api_server.compact()

    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.4:8080"})
    assert len(api_server.list_requests("pods")) == 2
    assert pool.changes.count(("add", "dep", "10.0.0.1:8080")) == 1  # reconciled, not wiped and re-added
    assert ("remove", "dep", "10.0.0.1:8080") not in pool.changes

    api_server.apply("pods", pod("later", ip="10.0.0.5"))  # and the new watch follows
    await eventually(lambda: "10.0.0.5:8080" in replicas(pool))


async def test_watches_dropped_again_and_again_are_said_once_and_followed(api_server, start_pool, caplog) -> None:
    """A proxy resetting the watch streams every few seconds: each reset was an INFO line of its own, for ever (a
    Kubernetes pause review: 35,000 a day at one in 5 s); the resumes themselves stay quiet and correct."""
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    caplog.set_level(logging.DEBUG, logger="shardnet.discovery.watch")
    for index in range(1, 5):
        await eventually(lambda: api_server.open_streams("pods") == 1)
        api_server.apply("pods", pod(f"w{index}", ip=f"10.0.0.{index + 1}"))  # a line on the stream: no "at once"
        await eventually(lambda: f"10.0.0.{index + 1}:8080" in replicas(pool))
        api_server.drop_streams()
        await eventually(lambda: sum("watch stream dropped" in r.getMessage() for r in caplog.records) == index)
    said = [r for r in caplog.records if "watch stream dropped" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO] + [logging.DEBUG] * 3, [r.getMessage() for r in said]
    assert "said again at most every 300s" in said[0].getMessage()
    api_server.apply("pods", pod("w9", ip="10.0.0.9"))
    await eventually(lambda: "10.0.0.9:8080" in replicas(pool))
    assert len(api_server.list_requests("pods")) == 1  # resumed each time, never listed again


async def test_a_relist_that_drops_thousands_of_pods_lets_each_removal_start_before_the_next(
    api_server, start_pool
) -> None:
    # each removed replica's channel closes, and grpc.aio's close walks every task of the loop: a relist that
    # started 3000 closes at once held the loop for 16 s here; each removal now has a loop pass of its own
    count = 3000
    for index in range(count):
        api_server.apply("pods", pod(f"w{index}", ip=f"10.1.{index // 250}.{index % 250 + 1}"))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)
    assert len(replicas(pool)) == count

    passes = 0  # loop passes, counted by a task that yields at every one
    passes_at_removal: list[int] = []
    remove_connection = pool.remove_connection

    async def counted_remove_connection(*args: Any, **kwargs: Any) -> Any:
        passes_at_removal.append(passes)
        return await remove_connection(*args, **kwargs)

    async def count_passes() -> None:
        nonlocal passes
        while True:
            await asyncio.sleep(0)
            passes += 1

    pool.remove_connection = counted_remove_connection
    counter = asyncio.create_task(count_passes())
    try:
        api_server.drop_streams()
        for index in range(count):
            api_server.delete("pods", f"w{index}")
        api_server.apply("pods", pod("stays", ip="10.9.0.1"))
        api_server.compact()
        await eventually(lambda: replicas(pool) == {"10.9.0.1:8080"}, timeout=60)
        await eventually(lambda: len(passes_at_removal) == count)
    finally:
        counter.cancel()
    assert len(api_server.lists_started("pods")) == 2  # it was a relist
    together = sum(later == earlier for earlier, later in zip(passes_at_removal, passes_at_removal[1:]))
    assert not together, f"{together} removals started in the same loop pass as the one before"


async def test_a_rolling_update_a_relist_takes_in_turns_never_leaves_the_deployment_unroutable(
    api_server, start_pool
) -> None:
    """While the watch was away, dep rolled: its old pod (listed first) went unready, its new one (listed after
    250 pods of another deployment) is ready. Taken in turns, the relist took the old pod out first and the new
    one in turns later: a namespace-wide pool forgot dep for those turns (a regression review's find). Pods that
    contribute less than before now come last."""
    api_server.apply("pods", pod("a-old", deployment="dep", ip="10.9.0.1"))
    for index in range(2 * LIST_BATCH + 50):
        api_server.apply("pods", pod(f"other-{index}", deployment="other", ip=f"10.8.{index // 250}.{index % 250 + 1}"))
    pool = await start_pool(sources=("pods",), pool_class=RoleCheckingPool)  # the whole namespace, as a gateway
    assert replicas(pool, "dep") == {"10.9.0.1:8080"}
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.drop_streams()
    api_server.apply("pods", pod("a-old", deployment="dep", ip="10.9.0.1", ready=False, deleting=True))
    api_server.apply("pods", pod("zz-new", deployment="dep", ip="10.9.0.2"))
    api_server.compact()
    unroutable = 0  # loop passes in which dep had no replica to route to

    async def look_every_pass() -> None:
        nonlocal unroutable
        while True:
            await asyncio.sleep(0)
            unroutable += not replicas(pool, "dep")

    looking = asyncio.create_task(look_every_pass())
    try:
        await eventually(lambda: replicas(pool, "dep") == {"10.9.0.2:8080"}, timeout=20)
    finally:
        looking.cancel()
    assert unroutable == 0 and pool.faults == []


async def test_a_pod_the_slices_call_terminating_leaves_though_the_pods_watch_is_stalled(api_server, start_pool):
    """A soak's find: the pods watch stalled (open, silent: noticed only at its read timeout, 90 s by default), dep's
    pod deleted, its slice saying it terminates, then dropping it, and its IP taken by a pod of another deployment:
    the pods' stale hold kept routing dep's requests to that deployment's worker. An endpoint terminating is the
    slices' final word on the pod it names, as a pod being deleted is the pods' word on its endpoint."""
    a0 = api_server.apply("pods", pod("a-0", deployment="dep", ip="10.0.0.5", port=9000))
    a1 = api_server.apply("pods", pod("a-1", deployment="dep", ip="10.0.0.6", port=9000))
    both = {"10.0.0.5": a0, "10.0.0.6": a1}
    api_server.apply("endpointslices", endpoint_slice(
        "dep-s", "dep", [("10.0.0.5", True, None), ("10.0.0.6", True, None)], port=9000, pods=both))
    pool = await start_pool(deployments=("dep",), watch=dataclasses.replace(FAST, read_timeout=60.0))
    assert replicas(pool) == {"10.0.0.5:9000", "10.0.0.6:9000"}
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.silence_streams("pods")
    api_server.apply("pods", pod("a-0", deployment="dep", ip="10.0.0.5", port=9000, deleting=True))
    api_server.apply("endpointslices", endpoint_slice(
        "dep-s", "dep", [("10.0.0.5", False, True), ("10.0.0.6", True, None)], port=9000, pods=both))
    api_server.delete("pods", "a-0")
    api_server.apply("endpointslices", endpoint_slice("dep-s", "dep", [("10.0.0.6", True, None)], port=9000, pods=both))
    api_server.apply("pods", pod("b-0", deployment="other", ip="10.0.0.5", port=9000))
    await eventually(lambda: replicas(pool) == {"10.0.0.6:9000"}, timeout=5)  # before: 10.0.0.5 until the timeout


async def test_two_deployments_swapping_pod_addresses_in_a_relist_are_not_forgotten_between_its_turns(
    api_server, start_pool
) -> None:
    """x's and y's pods swapped addresses while the watch was away (the old ones unready, being deleted), and a turn
    of the relist fell between the two new pods: y's took x's old address, x had no pod for a turn, and a
    namespace-wide pool forgot it (a regression review). With an address in one deployment at a time one of them
    must be empty a moment; neither is forgotten for it: a deployment emptied during a relist is forgotten only
    if still empty at its end."""
    api_server.apply("pods", pod("a-x-old", deployment="x", ip="10.9.0.1"))
    api_server.apply("pods", pod("b-y-old", deployment="y", ip="10.9.0.2"))
    api_server.apply("pods", pod("d-gone", deployment="gone", ip="10.9.0.3"))
    for index in range(LIST_BATCH - 1):  # listed before the new pods: a turn ends between them
        api_server.apply("pods", pod(f"m-{index:04d}", deployment="other", ip=f"10.8.0.{index + 1}"))
    pool = await start_pool(sources=("pods",), pool_class=RoleCheckingPool)
    assert replicas(pool, "gone") == {"10.9.0.3:8080"}
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.drop_streams()
    api_server.apply("pods", pod("a-x-old", deployment="x", ip="10.9.0.1", ready=False, deleting=True))
    api_server.apply("pods", pod("b-y-old", deployment="y", ip="10.9.0.2", ready=False, deleting=True))
    api_server.apply("pods", pod("c-y-new", deployment="y", ip="10.9.0.1"))
    api_server.apply("pods", pod("z-x-new", deployment="x", ip="10.9.0.2"))
    api_server.apply("pods", pod("d-gone", deployment="gone", ip="10.9.0.3", ready=False))  # emptied for good
    api_server.compact()
    await eventually(
        lambda: replicas(pool, "x") == {"10.9.0.2:8080"} and replicas(pool, "y") == {"10.9.0.1:8080"}, timeout=20
    )
    await eventually(lambda: "gone" not in pool.deployments, timeout=5)  # still forgotten, once the relist ends
    assert [change for change in pool.changes if change[0] == "forget"] == [("forget", "gone", "")]
    assert not [fault for fault in pool.faults if "routed as" in fault]  # no address in two deployments at once


class CountedRecords(dict):
    """The ledger's records, counting the entries read by every look over all of them."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.read = 0

    def __iter__(self):
        self.read += len(self)
        return super().__iter__()

    def keys(self):
        self.read += len(self)
        return super().keys()

    def values(self):
        self.read += len(self)
        return super().values()

    def items(self):
        self.read += len(self)
        return super().items()


async def test_a_relist_moving_every_pods_ip_to_another_deployments_pod_costs_linear_work() -> None:
    """While the watch was away every pod's IP moved to another deployment's pod's old one (IPs reused across a
    namespace): each claim let go of the member at its address, and looked for who held that member by reading
    every record of the ledger, n times n. Counted here as records read: a look at each record a few times is
    linear; a look at all of them per pod is n * n (251,000 read for these 500 pods; 3 s for 4,000)."""
    count = 500

    def pods(shift: int) -> list[dict]:
        """Pod i of deployment d<i>, at the IP of pod i + shift of the first listing."""
        listed = []
        for index in range(count):
            moved = (index + shift) % count
            item = pod(f"p{index}", deployment=f"d{index}", ip=f"10.1.{moved // 250}.{moved % 250 + 1}", port=9000)
            item["metadata"].update(uid=f"uid-{index}", namespace=NS)
            listed.append(item)
        return listed

    pool = K8sGrpcConnectionPool(NS)  # not started: its handlers are fed the lists as its watch would
    try:
        await pool._on_list(PODS, pods(0))
        records = pool._ledger._records = CountedRecords(pool._ledger._records)
        await pool._on_list(PODS, pods(1))
        await pool._ledger.drain()
        assert pool._ledger._records is records  # still the records counted
        assert records.read <= 10 * count, f"a relist of {count} pods read {records.read} records"
        for index in range(count):
            moved = (index + 1) % count
            assert replicas(pool, f"d{index}") == {f"10.1.{moved // 250}.{moved % 250 + 1}:9000"}
    finally:
        await pool.close()


async def test_a_list_of_thousands_of_pods_hands_the_loop_back_as_it_is_applied_and_the_pool_closes_promptly(
    api_server, start_pool
) -> None:
    """A list of 8,000 pods was applied in one synchronous stretch (1.6 s in which no request through the pool
    moved), a relist too, and the pool then took 15 s to close. The loop now gets control every LIST_BATCH pods
    of a list or a relist, and the close lets go of each finished channel close."""
    count = 1000
    for index in range(count):
        api_server.apply("pods", pod(f"w{index}", ip=f"127.1.{index // 250}.{index % 250 + 1}"))
    passes, longest = 0, 0.0  # loop passes, counted by a task that yields at every one; the longest wait for one
    added_at: list[int] = []

    async def count_passes() -> None:
        nonlocal passes, longest
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0)
            passes += 1
            longest = max(longest, loop.time() - before)

    def added_in_one_pass() -> int:
        """The most pods added in one loop pass."""
        return max(Counter(added_at).values())

    counter = asyncio.create_task(count_passes())
    try:
        pool = await start_pool(sources=("pods",), sync=False)
        add_connection = pool.add_connection

        def counted_add_connection(*args: Any, **kwargs: Any) -> None:
            added_at.append(passes)
            add_connection(*args, **kwargs)

        pool.add_connection = counted_add_connection
        await pool.wait_synced(timeout=30)
        assert len(replicas(pool)) == count
        assert added_in_one_pass() <= LIST_BATCH, f"{added_in_one_pass()} pods were added in one loop pass"

        await eventually(lambda: api_server.open_streams("pods") == 1)
        api_server.drop_streams()
        for index in range(0, count, 2):  # half the pods replaced while the watch was away
            api_server.delete("pods", f"w{index}")
            api_server.apply("pods", pod(f"n{index}", ip=f"127.2.{index // 250}.{index % 250 + 1}"))
        api_server.compact()
        added_at.clear()
        await eventually(lambda: len(api_server.lists_started("pods")) == 2 and api_server.open_streams("pods"),
                         timeout=30)
        assert len(replicas(pool)) == count and "127.2.0.1:8080" in replicas(pool)
        assert len(added_at) == count // 2
        assert added_in_one_pass() <= LIST_BATCH, f"{added_in_one_pass()} pods were added in one loop pass"
        print(f"longest wait for a loop pass while listing {count} pods and relisting: {longest * 1000:.0f} ms")

        started = asyncio.get_running_loop().time()
        await pool.close()
        took = asyncio.get_running_loop().time() - started
        assert took < 5, f"closing a pool of {count} replicas took {took:.1f} s"
    finally:
        counter.cancel()


async def test_410_error_event_mid_watch(api_server: FakeApiServer, start_pool) -> None:
    api_server.apply("pods", pod("w", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.error(410, "Expired", "too old resource version")
    await eventually(lambda: len(api_server.list_requests("pods")) == 2)
    api_server.apply("pods", pod("x", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})
    assert pool.changes == [("add", "dep", "10.0.0.1:8080"), ("add", "dep", "10.0.0.2:8080")]



# -- lists in pages --------------------------------------------------------------------

PAGED = 1200  # pods: pages of 500, 500 and 200


def _apply_paged_pods(api_server: FakeApiServer) -> None:
    """``PAGED`` ready pods, w0000 to w1199 (listed in that order), each at an address of its own."""
    for index in range(PAGED):
        api_server.apply("pods", pod(f"w{index:04d}", ip=f"10.1.{index // 250}.{index % 250 + 1}"))


def _paged_address(index: int) -> str:
    return f"10.1.{index // 250}.{index % 250 + 1}:8080"


def _change_mid_list(api_server: FakeApiServer) -> set[str]:
    """Change a pod on the first page, delete one on the last, add one; return the addresses routed after it."""
    api_server.between_pages = None  # once
    api_server.apply("pods", pod("w0000", ip="10.1.0.1", ready=False))
    api_server.delete("pods", "w1100")
    api_server.apply("pods", pod("x-late", ip="10.2.0.1"))
    return {_paged_address(index) for index in range(PAGED) if index not in (0, 1100)} | {"10.2.0.1:8080"}


def _pages(api_server: FakeApiServer) -> list[tuple[Optional[str], bool]]:
    """Each pods list request as (its limit, whether it continued a list)."""
    return [(query.get("limit"), bool(query.get("continue"))) for query in api_server.list_requests("pods")]


async def test_a_list_of_1200_pods_arrives_in_3_pages_and_is_handed_over_whole(
    api_server: FakeApiServer, start_pool
) -> None:
    """A namespace was listed in one answer, parsed in one stretch of the loop (8,000 small pods: 55 ms); it is
    read in pages of LIST_PAGE_SIZE now, as client-go's reflector reads it, and reconciled only once all are in."""
    _apply_paged_pods(api_server)
    listed_at = api_server.version
    pool = await start_pool(sources=("pods",), sync=False)
    held_between_pages: list[int] = []  # the replicas the pool held as each page after the first was asked for
    api_server.between_pages = lambda: held_between_pages.append(len(replicas(pool)))
    await pool.wait_synced(timeout=10)

    assert LIST_PAGE_SIZE == 500 and _pages(api_server) == [("500", False), ("500", True), ("500", True)]
    assert held_between_pages == [0, 0]  # nothing handed over before the last page was in
    assert replicas(pool) == {_paged_address(index) for index in range(PAGED)}
    assert sum(change[0] == "add" for change in pool.changes) == PAGED
    await eventually(lambda: api_server.watch_requests("pods"))
    assert api_server.watch_requests("pods")[0]["resourceVersion"] == str(listed_at)


async def test_a_continue_token_expiring_mid_list_lists_all_again_in_one_request(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """The history is compacted between two pages: the token of the first is 410 Gone. What the first page said
    is never handed over (it is of a snapshot no longer served); the list is read again whole, as client-go's
    pager does."""
    _apply_paged_pods(api_server)

    expected: set[str] = set()

    def change_and_compact() -> None:
        expected.update(_change_mid_list(api_server))
        api_server.compact()

    api_server.between_pages = change_and_compact
    with caplog.at_level(logging.INFO, logger="shardnet.discovery.watch"):
        pool = await start_pool(sources=("pods",))

    assert _pages(api_server) == [("500", False), ("500", True), (None, False)]
    assert "continue token expired after 500 objects" in caplog.text
    assert expected and replicas(pool) == expected
    assert [change for change in pool.changes if change[0] != "add"] == []  # the abandoned page added nothing
    await eventually(lambda: api_server.watch_requests("pods"))
    assert api_server.watch_requests("pods")[0]["resourceVersion"] == str(api_server.version)
    api_server.apply("pods", pod("y-later", ip="10.2.0.2"))  # and the watch from the full list's version follows
    await eventually(lambda: "10.2.0.2:8080" in replicas(pool))


async def test_a_change_between_two_pages_comes_by_the_watch_from_the_lists_version(
    api_server: FakeApiServer, start_pool
) -> None:
    """The pages after the first come from the first one's snapshot, so they do not show what changed in
    between; the watch from that snapshot's version brings it, and nothing is lost."""
    _apply_paged_pods(api_server)
    listed_at = api_server.version

    expected: set[str] = set()
    api_server.between_pages = lambda: expected.update(_change_mid_list(api_server))  # the last page still has w1100
    pool = await start_pool(sources=("pods",))
    assert _pages(api_server) == [("500", False), ("500", True), ("500", True)]
    await eventually(lambda: expected and replicas(pool) == expected)
    assert api_server.watch_requests("pods")[0]["resourceVersion"] == str(listed_at)
    assert len(api_server.lists_started("pods")) == 1


async def test_the_fake_api_server_pages_lists_as_the_real_one(api_server: FakeApiServer, kubeconfig) -> None:
    """The wire shapes the paging tests rely on: continue and remainingItemCount (left out under a selector),
    one resourceVersion for every page, 410 Expired with an inconsistent token once compacted, 400 for junk."""
    for index in range(5):
        api_server.apply("pods", pod(f"w{index}", ip=f"10.0.0.{index + 1}"))
    url = f"{api_server.url}/api/v1/namespaces/{NS}/pods"
    headers = {"Authorization": f"Bearer {api_server.token}"}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def get(**query: str) -> tuple[int, dict]:
            async with session.get(url, params=query) as response:
                return response.status, await response.json()

        status, first = await get(limit="2")
        assert status == 200 and [item["metadata"]["name"] for item in first["items"]] == ["w0", "w1"]
        assert first["metadata"]["remainingItemCount"] == 3 and first["metadata"]["continue"]
        api_server.apply("pods", pod("w5"))  # not in the snapshot the pages come from
        status, second = await get(limit="2", **{"continue": first["metadata"]["continue"]})
        assert [item["metadata"]["name"] for item in second["items"]] == ["w2", "w3"]
        assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        status, last = await get(limit="2", **{"continue": second["metadata"]["continue"]})
        assert [item["metadata"]["name"] for item in last["items"]] == ["w4"]
        assert "continue" not in last["metadata"] and "remainingItemCount" not in last["metadata"]

        status, selected = await get(limit="2", labelSelector="pod_type")
        assert selected["metadata"]["continue"] and "remainingItemCount" not in selected["metadata"]
        api_server.apply("pods", pod("w6"))
        api_server.compact()
        stale = selected["metadata"]["continue"]
        status, expired = await get(limit="2", labelSelector="pod_type", **{"continue": stale})
        assert status == 410 and (expired["kind"], expired["reason"], expired["code"]) == ("Status", "Expired", 410)
        inconsistent = expired["metadata"]["continue"]  # the rest as things are now, offered with the 410
        status, rest = await get(limit="10", labelSelector="pod_type", **{"continue": inconsistent})
        assert status == 200 and [item["metadata"]["name"] for item in rest["items"]] == ["w2", "w3", "w4", "w5", "w6"]
        status, bad = await get(limit="2", **{"continue": "junk"})
        assert status == 400 and bad["reason"] == "BadRequest"


# the words each way of never ending is said in, and the requests each failed attempt takes
ENDLESS = {
    "repeat": ("page 2 gives again the continue token page 1 gave", 2),
    "renew": ("page 2 gives again the object", 2),
    "empty": (f"{MAX_EMPTY_PAGES} pages in a row gave no object yet a continue token", 1 + MAX_EMPTY_PAGES),
}


@pytest.mark.parametrize("how", sorted(ENDLESS))
async def test_a_list_whose_continue_tokens_never_end_fails_said_backed_off_and_recovers(
    api_server: FakeApiServer, start_pool, caplog, how: str
) -> None:
    """A server (or a proxy in front of it) that answers every page with a continue token, the same again or new
    ones that bring nothing new, kept the list going for ever: discovery never synced, never watched, and said
    nothing. Each such list now fails at once, said, and is tried again after the usual backoff; once the server
    answers as it should, the list goes through and the watch follows."""
    caplog.set_level(logging.DEBUG, logger="shardnet.discovery.watch")  # a failure said again is at debug level
    said, requests_per_attempt = ENDLESS[how]
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    api_server.endless_continue = how
    pool = await start_pool(sources=("pods",), sync=False)

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("pods in default: attempt")]

    await eventually(lambda: len(failures()) >= 3)
    failed, requests = len(failures()), len(api_server.list_requests("pods"))  # at one moment: no await between
    # each attempt ends after its few requests and waits out a backoff before the next: no spinning loop
    assert failed * requests_per_attempt <= requests <= (failed + 1) * requests_per_attempt
    first = failures()[0]
    assert first.levelno == logging.WARNING and "EndlessList: the API server's list of pods in default" in (
        first.getMessage()) and said in first.getMessage() and "retrying in" in first.getMessage()
    assert not api_server.watch_requests("pods")
    with pytest.raises(DiscoveryError, match=f"pods in default not listed .* last failure: EndlessList: .*{said}"):
        await pool.wait_synced(timeout=0.05)

    api_server.endless_continue = None  # the server answers as it should again
    await pool.wait_synced(timeout=5)
    assert replicas(pool) == {"10.0.0.1:8080"}
    api_server.apply("pods", pod("b", ip="10.0.0.2"))  # and the watch follows
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})


def test_list_progress_tells_a_list_going_round_from_one_whose_pages_are_merely_empty() -> None:
    """A token seen before ends the list however long the round (A, B, A); empty pages the API allows (all of a
    page's objects filtered out) end it only MAX_EMPTY_PAGES in a row; items that are no objects are not held
    against it."""
    def obj(name: str) -> dict:
        return {"metadata": {"namespace": NS, "name": name}}

    progress = ListProgress("pods in default")
    progress.check([obj("a")], "A")
    progress.check([obj("b")], "B")
    with pytest.raises(EndlessList, match="page 3 gives again the continue token page 1 gave"):
        progress.check([obj("c")], "A")

    progress = ListProgress("pods in default")
    progress.check([obj("a"), 7, {}, {}], "A")
    for index in range(MAX_EMPTY_PAGES - 1):
        progress.check([], f"empty-{index}")
    progress.check([obj("b"), {"metadata": "junk"}, {}], "B")
    for index in range(MAX_EMPTY_PAGES - 1):
        progress.check([], f"empty-again-{index}")
    progress.check([obj("c")], None)  # the last page: a list that ends is never held against
    with pytest.raises(EndlessList, match=f"{MAX_EMPTY_PAGES} pages in a row gave no object"):
        stalled = ListProgress("pods in default")
        for index in range(MAX_EMPTY_PAGES + 1):
            stalled.check([], f"stalled-{index}")


async def test_a_version_the_server_has_not_reached_relists(api_server: FakeApiServer, start_pool) -> None:
    """After an etcd restore the server's versions are older than ours: "Too large resource version" (504)
    on every watch until the client lists again, which is what it must do."""
    for name, ip in (("stays", "10.0.0.1"), ("lost-in-restore", "10.0.0.2")):
        api_server.apply("pods", pod(name, ip=ip))
    for index in range(4):  # history the restore will lose: the client's version stays ahead of the server's
        api_server.apply("pods", pod(f"other-{index}", deployment="other"))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.rewind(1)
    api_server.delete("pods", "lost-in-restore")
    api_server.apply("pods", pod("restored", ip="10.0.0.3"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.3:8080"})
    assert len(api_server.list_requests("pods")) == 2
    api_server.apply("pods", pod("later", ip="10.0.0.4"))  # and the watch from the new list follows
    await eventually(lambda: "10.0.0.4:8080" in replicas(pool))


async def test_a_watch_that_ends_at_once_backs_off(api_server: FakeApiServer, start_pool) -> None:
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    api_server.end_watches_at_once = True  # 200 and an empty body: a proxy or a server shutting down
    pool = await start_pool(sources=("pods",))
    assert replicas(pool) == {"10.0.0.1:8080"}
    await asyncio.sleep(1.0)  # a rate over a second: without a pause this is hundreds of watches
    assert 2 <= len(api_server.watch_requests("pods")) <= 30
    api_server.end_watches_at_once = False
    api_server.apply("pods", pod("b", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"}, timeout=5)


async def test_a_server_that_lists_but_never_lets_a_watch_through_is_followed_by_listing_again(
    api_server: FakeApiServer, start_pool
) -> None:
    """Watches ending at once for good (a proxy), or refused while lists are not: the members froze at the
    first list, the watch retried from its version for ever (1 list against 17 watches in a review's run)."""
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    api_server.end_watches_at_once = True
    pool = await start_pool(sources=("pods",))
    api_server.apply("pods", pod("a", ip="10.0.0.1", ready=False))
    api_server.apply("pods", pod("b", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.2:8080"}, timeout=10)
    assert len(api_server.list_requests("pods")) >= 2


async def test_dropped_stream_resumes_from_last_version(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool(sources=("pods",))
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080"})
    seen = api_server.version

    api_server.drop_streams()  # the changes below are queued behind the drop: only the next watch can carry them
    api_server.apply("pods", pod("b", ip="10.0.0.2"))
    api_server.delete("pods", "a")
    await eventually(lambda: replicas(pool) == {"10.0.0.2:8080"})

    second = api_server.watch_requests("pods")[1]
    assert second["resourceVersion"] == str(seen)
    assert len(api_server.list_requests("pods")) == 1
    assert pool.changes == [
        ("add", "dep", "10.0.0.1:8080"),
        ("add", "dep", "10.0.0.2:8080"),
        ("remove", "dep", "10.0.0.1:8080"),
    ]


async def test_bookmarks_move_the_resume_version(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)
    for index in range(3):  # changes this watch does not select still advance the version
        api_server.apply("pods", pod(f"unrelated-{index}", deployment=None, pod_type=None, shard_id=None))
    api_server.bookmark()
    await eventually(lambda: pool._watches["pods"].resource_version == str(api_server.version))
    api_server.drop_streams()
    await eventually(lambda: len(api_server.watch_requests("pods")) == 2)
    assert api_server.watch_requests("pods")[1]["resourceVersion"] == str(api_server.version)


async def test_server_timeout_ends_the_watch_and_it_resumes(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool(sources=("pods",), watch=WatchOptions(timeout_seconds=1, backoff_initial=0.02))
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    await eventually(lambda: len(api_server.watch_requests("pods")) >= 2)  # the server ended the first after 1s
    assert api_server.watch_requests("pods")[1]["resourceVersion"] == str(api_server.version)
    api_server.apply("pods", pod("b", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})
    assert len(api_server.list_requests("pods")) == 1


async def test_silent_stream_is_noticed_and_resumed(api_server: FakeApiServer, start_pool) -> None:
    pool = await start_pool(sources=("pods",), watch=WatchOptions(read_timeout=0.2, backoff_initial=0.02))
    await eventually(lambda: len(api_server.watch_requests("pods")) >= 3)  # each 0.2s of silence ends a stream
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080"})
    assert len(api_server.list_requests("pods")) == 1


@pytest.mark.parametrize("how", ["refuse", "unavailable"])
async def test_api_server_down_then_up(api_server: FakeApiServer, start_pool, how: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="shardnet.discovery.watch")
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)

    await api_server.go_down(how)
    api_server.apply("pods", pod("b", ip="10.0.0.2"))  # happens while nobody can watch
    await eventually(lambda: "watch failed" in caplog.text)  # retried, and said so
    assert pool.watching and replicas(pool) == {"10.0.0.1:8080"}

    await api_server.come_back()
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})
    assert len(api_server.list_requests("pods")) == 1  # resumed: the history was still there


@contextlib.asynccontextmanager
async def followed_over_https(tmp_path, ca) -> AsyncIterator[tuple[FakeApiServer, Any, Any, K8sGrpcConnectionPool]]:
    """(server, its ssl context, the CA file, a synced pool of its own client trusting that file): a fake API
    server over HTTPS, with a certificate ``ca`` issued and pod ``a`` listed."""
    import ssl

    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(serving)
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem.bytes())
    async with FakeApiServer(ssl_context=serving) as server:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url, namespace=NS,
                                      certificate_authority=str(ca_file))
        server.apply("pods", pod("a", ip="10.0.0.1"))
        async with K8sGrpcConnectionPool(NS, kubeconfig=str(kubeconfig), watch=FAST) as pool:
            await pool.wait_synced(timeout=5)
            yield server, serving, ca_file, pool


async def reconnected_with(server: FakeApiServer, pool: K8sGrpcConnectionPool, ip: str) -> None:
    """Reset every connection (the next ones shake hands anew), add a pod at ``ip``, and wait for the pool to hold it."""
    await server.go_down("refuse")
    await server.come_back()
    server.apply("pods", pod(f"p-{ip}", ip=ip))
    await eventually(lambda: f"{ip}:8080" in replicas(pool), timeout=10)


async def test_a_rotated_api_server_ca_is_taken_from_its_file_and_membership_followed_on(tmp_path) -> None:
    """The library reads the CA once: after the cluster's CA rotated, a head never reconnected, yet stayed ready
    with the members it had (CERTIFICATE_VERIFY_FAILED at every retry)."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    async with followed_over_https(tmp_path, old_ca) as (server, serving, ca_file, pool):
        assert replicas(pool) == {"10.0.0.1:8080"}
        ca_file.write_bytes(new_ca.cert_pem.bytes())  # the Secret or kubeconfig is renewed first
        new_ca.issue_cert("127.0.0.1").configure_cert(serving)  # then the server presents the new certificate
        await reconnected_with(server, pool, "10.0.0.2")
        assert replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"}


async def test_a_ca_file_rewritten_with_the_same_certificate_keeps_the_client(tmp_path, caplog) -> None:
    """The kubelet rewrites a service account's whole volume at every token refresh (a new ca.crt inode, the same
    bytes): taken for a CA rotation by its stat, it made a new client under the running watches, hourly."""
    caplog.set_level(logging.INFO, logger="shardnet.discovery.kubernetes")
    ca = trustme.CA()
    async with followed_over_https(tmp_path, ca) as (server, _, ca_file, pool):
        client = pool._client
        swapped = tmp_path / "ca.crt.new"
        swapped.write_bytes(ca_file.read_bytes())
        os.replace(swapped, ca_file)  # a new inode, mtime and ctime; the same content
        await pool._follow_ca()  # what each list and watch does first
        await reconnected_with(server, pool, "10.0.0.2")
        assert pool._client is client and "CA file changed" not in caplog.text


async def test_a_ca_file_missing_or_half_written_keeps_the_client_that_works(tmp_path) -> None:
    """Taken for a rotation, a CA file removed (a temp file cleaned) or half written stopped every list and
    watch, though the client in hand held the CA in memory and still worked."""
    ca = trustme.CA()
    async with followed_over_https(tmp_path, ca) as (server, _, ca_file, pool):
        for change, ip in ((lambda: ca_file.write_bytes(ca.cert_pem.bytes()[:200]), "10.0.0.2"),
                           (ca_file.unlink, "10.0.0.3")):
            change()
            await reconnected_with(server, pool, ip)


async def test_a_failure_that_keeps_coming_is_warned_of_once_not_at_every_retry(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """A Role granting pods only warned of the refused slices at every retry, for ever (a k8s review's find): a
    failure said already is said again at debug level until REPEAT_WARNING_SECONDS pass."""
    caplog.set_level(logging.DEBUG, logger="shardnet.discovery.watch")
    api_server.forbidden = {"endpointslices"}
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    await start_pool()

    def attempts(level: int) -> int:
        return sum(1 for r in caplog.records if "endpointslices in default: attempt" in r.getMessage() and r.levelno == level)

    await eventually(lambda: attempts(logging.DEBUG) >= 3)  # retried, and said quietly
    assert attempts(logging.WARNING) == 1


async def test_a_watch_that_answers_again_clears_the_failures_before_it(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """Failures were counted until a watch *ended* well (minutes later): one blip after an outage counted as the
    5th in a row and listed everything again; the recovery was said only then."""
    caplog.set_level(logging.DEBUG, logger="shardnet.discovery.watch")  # a failure said again is at debug level
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    api_server.failing_watches = 4
    api_server.drop_streams()  # the next four watches answer 503, the fifth works
    api_server.apply("pods", pod("b", ip="10.0.0.2"))
    # said at the working watch's first line, not when it ends
    await eventually(lambda: "pods in default: watching again after 4 failures" in caplog.text)
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})
    api_server.failing_watches = 1  # then the working watch ends by a 410 (one list), and the next one blips
    api_server.compact()
    api_server.error()
    api_server.apply("pods", pod("c", ip="10.0.0.3"))

    def failed() -> list[str]:
        return [record.getMessage() for record in caplog.records if "watch failed" in record.getMessage()]

    # the relist may bring c in before the blip is said: wait for both
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"})
    await eventually(lambda: len(failed()) >= 5)
    assert len(failed()) == 5 and not any("re-listing" in message for message in failed()), failed()
    assert len(api_server.list_requests("pods")) == 2  # the first, and the 410's: the blip watched again


async def test_a_watch_that_stays_open_after_an_outage_clears_its_failures_in_a_quiet_namespace(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """Only a watch's first line cleared the failures before it: in a namespace where nothing changed after an
    outage, the next single blip counted as one more in a row, waited the capped back-off and listed everything
    again (a review measured 1.7-5 s before a new pod was routed, 0.01 s without the outage before)."""
    from shardnet.discovery.watch import RELIST_AFTER_FAILURES, VERY_SHORT_WATCH

    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    watch = pool._watches["pods"]
    api_server.failing_watches = RELIST_AFTER_FAILURES + 1  # an outage of the watches alone: they re-list
    api_server.drop_streams()
    await eventually(lambda: api_server.failing_watches == 0 and api_server.open_streams("pods") == 1)
    loop = asyncio.get_running_loop()
    await eventually(lambda: watch._opened_at is not None and loop.time() - watch._opened_at > VERY_SHORT_WATCH)
    lists = len(api_server.list_requests("pods"))
    api_server.failing_watches = 1  # a blip
    api_server.drop_streams()
    api_server.apply("pods", pod("b", ip="10.0.0.2"))
    await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"})
    assert len(api_server.list_requests("pods")) == lists  # watched again, not listed
    blip = [record.getMessage() for record in caplog.records if "watch failed" in record.getMessage()][-1]
    assert "watching again in" in blip, blip


async def test_an_address_two_slices_give_two_shards_is_routed_as_neither_until_one_lets_go(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """A pod IP reused by a pod of shard 0 while shard 2's EndpointSlice still listed it (two Services' slices
    update on their own) was routed as both shards: a request for shard 2 reached shard 0's worker until shard 2's
    slice caught up (a churn review's find). Neither until one lets go; then the one left, at once."""
    api_server.apply("endpointslices", endpoint_slice("s2", "dep-2", [("10.0.0.7", True, None)], shard="2"))
    api_server.apply("endpointslices", endpoint_slice("s1", "dep-1", [("10.0.0.8", True, None)], shard="1"))
    pool = await start_pool(sources=("endpointslices",))
    assert replicas(pool, shard_id=2) == {"10.0.0.7:50051"}
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [("10.0.0.7", True, None)], shard="0"))
    await eventually(lambda: "10.0.0.7:50051 of 'dep' is listed as shard 0 and as shard 2 at once" in caplog.text)
    # said as the contest is seen; shard 2's replica is taken out by a removal task a loop pass or so later (a
    # loaded machine failed an assertion made at once)
    await eventually(lambda: replicas(pool, shard_id=0) == replicas(pool, shard_id=2) == set(), timeout=2.0)
    api_server.apply("endpointslices", endpoint_slice("s2", "dep-2", [], shard="2"))
    await eventually(lambda: replicas(pool, shard_id=0) == {"10.0.0.7:50051"})
    assert replicas(pool, shard_id=2) == set() and replicas(pool, shard_id=1) == {"10.0.0.8:50051"}


async def test_an_address_listed_as_a_shard_and_as_a_hop_of_one_deployment_is_routed_as_neither(
    api_server: FakeApiServer, start_pool: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A hop's replicas are filed under ``dep/uses_after``, which the one-role rule took for another deployment: an
    IP reused by shard 0 while the hop's slice still listed it was routed as both, and some of shard 0's requests
    ran on the hop's Executor, some uses_after calls (every shard's answers) on a shard's (a hops review's find)."""
    api_server.apply("endpointslices", endpoint_slice("ua", "dep-uses-after", [("10.0.0.9", True, None)],
                                                      role="uses_after", shard=""))
    pool = await start_pool(sources=("endpointslices",))
    assert replicas(pool, "dep/uses_after") == {"10.0.0.9:50051"}
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [("10.0.0.9", True, None)], shard="0"))
    await eventually(lambda: "10.0.0.9:50051 of 'dep' is listed as shard 0 and as its uses_after at once" in caplog.text)
    assert replicas(pool) == replicas(pool, "dep/uses_after") == set()
    api_server.apply("endpointslices", endpoint_slice("ua", "dep-uses-after", [], role="uses_after", shard=""))
    await eventually(lambda: replicas(pool) == {"10.0.0.9:50051"})


async def test_a_contest_settled_by_another_record_meanwhile_leaves_the_member_left_routed(kubeconfig: str) -> None:
    """A regression review's find: a record that contested an address took the rival out after awaiting its own
    removals, by which time another record (the pods' word withdrawing the stale slice endpoint) had settled the
    contest and put the rival back: it stayed held, contested by no one, and never routed."""
    from shardnet.discovery.kubernetes import NOTHING

    x, y = "10.0.0.7:50051", "10.0.0.8:50051"
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST)  # its ledger, driven without a watch
    ledger = pool._ledger
    try:
        await ledger.record("endpointslices", "s0", frozenset({Member("dep", False, 0, x), Member("dep", False, 0, y)}))
        others = frozenset(Member("dep", False, 2, f"10.0.1.{i}:50051") for i in range(5))
        await ledger.record("endpointslices", "s2", others)
        stale = Member("dep", False, 2, x)
        contesting = asyncio.ensure_future(ledger.record("endpointslices", "s2", frozenset({stale})))
        await asyncio.sleep(0)  # it took shard 0 at x out of the routing, and awaits its removals of the others
        await ledger.change("endpointslices", "s2", frozenset({stale}), NOTHING)
        await contesting
        await ledger.drain()
        assert replicas(pool, shard_id=0) == {x, y} and replicas(pool, shard_id=2) == set()
    finally:
        await pool.close()


async def test_a_stale_slice_the_pods_and_another_slice_contradict_gives_way_whichever_came_first(
    kubeconfig: str, caplog
) -> None:
    """A pod IP reused by shard 0: the pods and shard 0's slice say so, shard 2's slice still lists it. When the
    pods had said it first, the lagging slice's claim began a contest and shard 0 lost its replica until that
    slice caught up (a regression review's find; the other way round, the pods' word let go of the stale one).
    It gives way to the two; were the pods to let go, it is weighed again when said again: a contest."""
    from shardnet.discovery.kubernetes import NOTHING

    x = "10.0.0.7:50051"
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST)  # its ledger, driven without a watch
    ledger = pool._ledger
    shard_0, shard_2 = Member("dep", False, 0, x), Member("dep", False, 2, x)
    try:
        await ledger.record("pods", "w0", frozenset({shard_0}))
        await ledger.record("endpointslices", "s0", frozenset({shard_0}))
        await ledger.record("endpointslices", "s2", frozenset({shard_2}))
        await ledger.drain()
        assert replicas(pool, shard_id=0) == {x} and replicas(pool, shard_id=2) == set()
        assert (f"{x} of 'dep' is listed as shard 2 by the endpointslices in namespace {NS}, while the "
                "endpointslices and the pods say shard 0: routed as shard 0") in caplog.text
        await ledger.record("pods", "w0", NOTHING)  # the pod goes; shard 0's slice still lists it
        await ledger.record("endpointslices", "s2", frozenset({shard_2}))  # said again: two slices, no third word
        await ledger.drain()
        assert replicas(pool, shard_id=0) == replicas(pool, shard_id=2) == set()
        await ledger.record("endpointslices", "s2", NOTHING)
        await ledger.drain()
        assert replicas(pool, shard_id=0) == {x}
    finally:
        await pool.close()


async def test_a_pods_relist_moving_an_address_to_another_shard_is_not_outvoted_by_its_own_previous_listing(
    kubeconfig: str,
) -> None:
    """A regression review's find: the pods' previous listing (pod w0, shard 0, gone while the watch was away) and
    shard 0's lagging slice made two sources that outvoted the new pod w2 at the same IP (shard 2): requests for
    shard 0 reached shard 2's pod, and once the slice caught up neither shard had it."""
    x = "10.0.0.7:50051"
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST)  # its ledger, driven without a watch
    ledger = pool._ledger
    shard_0, shard_2 = Member("dep", False, 0, x), Member("dep", False, 2, x)
    try:
        await ledger.record("pods", "w0", frozenset({shard_0}))
        await ledger.record("endpointslices", "s0", frozenset({shard_0}))
        listed = {"w2": frozenset({shard_2})}
        await ledger.replace("pods", listed, listed.__getitem__)
        await ledger.drain()
        assert replicas(pool, shard_id=0) == set() and replicas(pool, shard_id=2) == {x}
    finally:
        await pool.close()


async def test_starts_while_api_server_is_down(api_server: FakeApiServer, start_pool) -> None:
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    await api_server.go_down("unavailable")
    pool = await start_pool(sync=False, sources=("pods",))
    await eventually(lambda: len(api_server.list_requests("pods")) >= 2)
    assert pool.watching and replicas(pool) == set()
    await api_server.come_back()
    await pool.wait_synced(timeout=5)
    assert replicas(pool) == {"10.0.0.1:8080"}


# -- configuration and lifetime ------------------------------------------------------------


async def test_no_client_loads_the_kubeconfig(api_server: FakeApiServer, kubeconfig: str) -> None:
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    async with K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST) as pool:
        await pool.wait_synced(timeout=5)
        assert replicas(pool) == {"10.0.0.1:8080"}
    assert not pool.watching and pool.deployments == {}
    await eventually(lambda: api_server.open_streams() == 0)


async def test_configuration_lookup_order_is_kubectls(api_server: FakeApiServer, kubeconfig: str, tmp_path) -> None:
    """A kubeconfig file that exists wins, in a pod too (KUBECONFIG's missing entries skipped); the service
    account is used only when there is none; with neither, the error names what was looked for."""
    client = await load_api_client(environ={"KUBECONFIG": f"{tmp_path}/missing:{kubeconfig}"})
    async with client:
        assert client.configuration.host == api_server.url

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("in-cluster-token")
    trustme.CA().cert_pem.write_to_path(str(account / "ca.crt"))
    in_a_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    client = await load_api_client(environ={**in_a_pod, "KUBECONFIG": kubeconfig}, service_account_dir=str(account))
    async with client:  # as kubectl in a pod: the kubeconfig given points elsewhere, and is meant
        assert client.configuration.host == api_server.url

    only_missing = {**in_a_pod, "KUBECONFIG": f"{tmp_path}/missing"}
    client = await load_api_client(environ=only_missing, service_account_dir=str(account))
    async with client:
        assert client.configuration.host == "https://10.96.0.1:443"
        assert client.configuration.api_key["BearerToken"] == "Bearer in-cluster-token"

    with pytest.raises(k8s_config.ConfigException, match=r"no kubeconfig file at .*missing, and not in a pod"):
        await load_api_client(environ={"KUBECONFIG": f"{tmp_path}/missing"})


async def test_in_a_pod_without_a_token_the_error_names_the_service_account(tmp_path) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    cluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
               "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    with pytest.raises(k8s_config.ConfigException, match=r"in-cluster service account: .*token.*no-kubeconfig"):
        await load_api_client(environ=cluster, service_account_dir=str(account))


# an exec credential plugin as ``aws eks get-token`` is one: it prints the token its folder holds, which lapses
# at once by the library's reckoning (five minutes' margin), and counts its runs
EXEC_PLUGIN = """
import datetime, json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
runs = folder / "runs"
runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": (folder / "token").read_text(),
                             "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"""


@pytest.mark.parametrize("credential", ["exec-plugin", "token-file"])
async def test_a_kubeconfigs_expiring_credentials_are_renewed(
    credential: str, api_server: FakeApiServer, tmp_path
) -> None:
    """The API server stops taking the first token; the pool's next requests carry the renewed one, so pods
    that come and go afterwards are still followed (before: 401 for ever, the members frozen)."""
    (tmp_path / "token").write_text("token-1")
    api_server.token = "token-1"
    if credential == "exec-plugin":
        (tmp_path / "plugin.py").write_text(EXEC_PLUGIN)
        user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                         "args": [str(tmp_path / "plugin.py"), str(tmp_path)]}}
    else:
        user = {"tokenFile": str(tmp_path / "token")}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS, user=user)
    client = await load_api_client(str(kubeconfig), environ={}, credentials_check_interval=0.1)
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    watch = WatchOptions(timeout_seconds=1, read_timeout=5.0, connect_timeout=1.0, list_timeout=5.0,
                         backoff_initial=0.02, backoff_max=0.2)
    async with client, K8sGrpcConnectionPool(NS, client, watch=watch, sources=("pods",)) as pool:
        await pool.wait_synced(timeout=10)
        assert replicas(pool) == {"10.0.0.1:8080"}
        (tmp_path / "token").write_text("token-2")
        api_server.token = "token-2"  # the issuer no longer takes token-1; the open watch ends within a second
        api_server.apply("pods", pod("b", ip="10.0.0.2"))
        api_server.delete("pods", "a")
        await eventually(lambda: replicas(pool) == {"10.0.0.2:8080"}, timeout=15)
        await client.configuration.refresh_api_key_hook.close()  # a plugin run under way ends with the test
    if credential == "exec-plugin":
        assert int((tmp_path / "runs").read_text()) >= 2


# an exec plugin that answers once, then hangs as a login waiting for a browser would; it notes its pid to be killed
HANGING_PLUGIN = """
import datetime, json, os, pathlib, sys, time
folder = pathlib.Path(sys.argv[1])
(folder / f"plugin-{os.getpid()}").touch()
if (folder / "answered").exists():
    time.sleep(300)
(folder / "answered").touch()
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=4)  # within the library's 5
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                  "status": {"token": "test-token", "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"""


def kill_plugins(folder) -> None:
    """Kill every plugin process that noted its pid in ``folder``."""
    for marker in folder.glob("plugin-*"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(marker.name.split("-")[1]), signal.SIGKILL)


async def test_a_credentials_reload_that_hangs_does_not_hold_discovery(api_server: FakeApiServer, tmp_path) -> None:
    """The reload runs beside the requests: while a plugin hangs, the token held still serves every list and watch
    (a first version awaited it before each request, and discovery froze without a word; found by a review)."""
    (tmp_path / "plugin.py").write_text(HANGING_PLUGIN)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                     "args": [str(tmp_path / "plugin.py"), str(tmp_path)]}}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS, user=user)
    client = await load_api_client(str(kubeconfig), environ={}, credentials_check_interval=0)
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    watch = WatchOptions(timeout_seconds=1, read_timeout=5.0, connect_timeout=1.0, list_timeout=5.0,
                         backoff_initial=0.02, backoff_max=0.2)
    try:
        async with client, K8sGrpcConnectionPool(NS, client, watch=watch, sources=("pods",)) as pool:
            await pool.wait_synced(timeout=10)
            await eventually(lambda: len(list(tmp_path.glob("plugin-*"))) >= 2, timeout=10)  # the second one hangs
            api_server.apply("pods", pod("b", ip="10.0.0.2"))
            await eventually(lambda: replicas(pool) == {"10.0.0.1:8080", "10.0.0.2:8080"}, timeout=10)
            kill_plugins(tmp_path)  # before the reload is stopped: one stopped reading a live plugin leaks its pipe
            await client.configuration.refresh_api_key_hook.close()
    finally:
        kill_plugins(tmp_path)


async def test_a_reload_that_hangs_past_its_timeout_is_awaited_not_started_again(tmp_path, caplog) -> None:
    """A plugin that hangs past the reload's timeout is waited for, not given up and run again: the library does not
    stop a plugin whose read it is cancelled from, and a version that gave up started a new one every time the
    timeout and the interval passed, each left hanging (a process more every minute, for as long as the login
    waits)."""
    from shardnet.discovery.configuration import KubeconfigCredentials

    (tmp_path / "plugin.py").write_text(HANGING_PLUGIN)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                     "args": [str(tmp_path / "plugin.py"), str(tmp_path)]}}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:1", namespace=NS, user=user)
    configuration = type.__call__(Configuration)
    loader = await k8s_config.load_kube_config(
        config_file=str(kubeconfig), client_configuration=configuration, persist_config=False)
    credentials = KubeconfigCredentials(loader, interval=0, reload_timeout=0.1)
    caplog.set_level(logging.WARNING, logger="shardnet.discovery.configuration")
    try:
        await credentials(configuration)
        await eventually(lambda: "took more than 0.1s to reload" in caplog.text, timeout=10)
        for _ in range(5):  # each would start a reload of its own were the hung one given up
            await credentials(configuration)
            await asyncio.sleep(0.15)
        assert len(list(tmp_path.glob("plugin-*"))) == 2  # the one the loader ran and the one that hangs
        assert caplog.text.count("took more than") == 1
        assert configuration.api_key["BearerToken"] == "Bearer test-token"  # the token held still serves
    finally:
        kill_plugins(tmp_path)
        await credentials.close()


async def test_a_credentials_reload_that_fails_keeps_the_last_ones(
    api_server: FakeApiServer, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin that starts failing is reported, and the credentials it gave before are used meanwhile."""
    (tmp_path / "token").write_text("test-token")
    (tmp_path / "plugin.py").write_text(EXEC_PLUGIN)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable,
                     "args": [str(tmp_path / "plugin.py"), str(tmp_path)]}}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, namespace=NS, user=user)
    client = await load_api_client(str(kubeconfig), environ={}, credentials_check_interval=0)  # every request
    (tmp_path / "plugin.py").write_text("import sys; sys.exit('the identity provider is down')")
    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    caplog.set_level(logging.WARNING, logger="shardnet.discovery.configuration")
    async with client, K8sGrpcConnectionPool(NS, client, watch=FAST, sources=("pods",)) as pool:
        await pool.wait_synced(timeout=10)
        assert replicas(pool) == {"10.0.0.1:8080"}
        await eventually(lambda: "could not reload the kubeconfig's credentials, keeping the last ones" in caplog.text,
                         timeout=10)
        await client.configuration.refresh_api_key_hook.close()


async def test_a_jina_style_core_api_client_is_taken_and_anything_else_refused(
    api_server: FakeApiServer, kube_client: ApiClient
) -> None:
    from kubernetes_asyncio.client import CoreV1Api

    api_server.apply("pods", pod("a", ip="10.0.0.1"))
    async with K8sGrpcConnectionPool(NS, CoreV1Api(kube_client), watch=FAST, sources=("pods",)) as pool:
        await pool.wait_synced(timeout=5)
        assert replicas(pool) == {"10.0.0.1:8080"}
    with pytest.raises(ConfigurationError, match="ApiClient"):
        K8sGrpcConnectionPool(NS, client=object())


async def test_jinas_positional_form_takes_the_logger_third(
    api_server: FakeApiServer, kube_client: ApiClient, dead_address: str
) -> None:
    """Jina 3 builds the pool as ``K8sGrpcConnectionPool(namespace, client, logger)``: the third argument was
    refused (TypeError, keywords only after the client; found by a review). It is the pool's logger, as Jina's,
    where the replica lists say an ejection."""
    from kubernetes_asyncio.client import CoreV1Api

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    own = logging.getLogger(f"jina-k8s-{id(records)}")
    own.addHandler(handler)
    with pytest.raises(ConfigurationError, match="logger must have warning"):
        K8sGrpcConnectionPool(NS, None, "jina-head")  # the third is the logger, checked as GrpcConnectionPool's
    async with EchoServer("live") as live:
        api_server.apply("pods", pod("dead", ip="127.0.0.1", port=int(dead_address.rsplit(":", 1)[1])))
        api_server.apply("pods", pod("live", ip="127.0.0.1", port=live.port))
        async with K8sGrpcConnectionPool(NS, CoreV1Api(kube_client), own, watch=FAST, sources=("pods",)) as pool:
            await pool.wait_synced(timeout=5)
            assert len(replicas(pool)) == 2
            for _ in range(6):  # round robin: the dead replica fails every other call, three times: ejected
                [task] = pool.send_request(DataRequest(endpoint="/index"), "dep")
                await task
    own.removeHandler(handler)
    assert any("ejecting replica" in record.getMessage() for record in records)


async def test_wrong_credentials_are_retried_not_fatal(api_server: FakeApiServer, tmp_path) -> None:
    path = write_kubeconfig(tmp_path / "bad", api_server.url, token="wrong")
    async with K8sGrpcConnectionPool(NS, kubeconfig=str(path), watch=FAST, sources=("pods",)) as pool:
        await eventually(lambda: len(api_server.list_requests("pods")) >= 2)
        assert pool.watching
        with pytest.raises(DiscoveryError, match=r"namespace 'default': pods in default not listed .*HTTP 401"):
            await pool.wait_synced(timeout=0.3)


async def test_a_kubeconfig_that_can_never_work_is_refused_when_the_pool_is_made(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=r"kubeconfig .*missing: no such file"):
        K8sGrpcConnectionPool(NS, kubeconfig=str(tmp_path / "missing"))
    (tmp_path / "broken").write_text("clusters: [unclosed")
    with pytest.raises(ConfigurationError, match="is not readable YAML"):
        K8sGrpcConnectionPool(NS, kubeconfig=str(tmp_path / "broken"))


async def test_waiting_for_a_pool_that_cannot_configure_itself_says_why(tmp_path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "https://127.0.0.1:1")
    unusable = K8sGrpcConnectionPool(NS, kubeconfig=str(kubeconfig), watch=FAST)
    kubeconfig.unlink()  # gone before the pool starts: what it retries, as a file may be written again
    with pytest.raises(ConfigurationError, match="not started"):
        await unusable.wait_synced(timeout=0.3)
    async with unusable:
        with pytest.raises(DiscoveryError, match=r"its Kubernetes configuration not listed .*last failure: .*config"):
            await unusable.wait_synced(timeout=0.5)


# -- requests reach what discovery found -----------------------------------------------------


@pytest.mark.parametrize("source", ["pods", "endpointslices"])
async def test_requests_reach_discovered_replicas(api_server: FakeApiServer, start_pool, source: str) -> None:
    async with EchoServer("replica-a") as a, EchoServer("replica-b") as b:

        def publish(name: str, server: EchoServer, ready: bool) -> None:
            if source == "pods":
                api_server.apply("pods", pod(name, ip="127.0.0.1", port=server.port, ready=ready))
            else:  # one slice per port, both of the same service
                api_server.apply(
                    "endpointslices", endpoint_slice(name, "svc", [("127.0.0.1", ready, None)], port=server.port)
                )

        publish("a", a, True)
        publish("b", b, True)
        pool = await start_pool(sources=(source,))
        assert replicas(pool) == {a.address, b.address}

        async def served_by() -> str:
            _, trailing = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
            return dict(tuple(trailing))["served-by"]

        assert {await served_by() for _ in range(4)} == {"replica-a", "replica-b"}
        assert a.received_metadata[-1]["endpoint"] == "/x"

        publish("a", a, False)
        await eventually(lambda: replicas(pool) == {b.address})
        assert {await served_by() for _ in range(4)} == {"replica-b"}


async def test_a_deployment_forgotten_while_its_last_replica_still_answers_loses_no_request(
    api_server: FakeApiServer, start_pool
) -> None:
    """A namespace-wide pool forgot a deployment by closing its lists, which cut the calls still running on the
    channel of the replica just removed, after half a second (found by a review)."""
    async with EchoServer("slow", delay=1.5) as slow:
        api_server.apply("pods", pod("w", ip="127.0.0.1", port=slow.port))
        pool = await start_pool()
        in_flight = pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        await eventually(lambda: slow.calls == 1)
        api_server.apply("pods", pod("w", ip="127.0.0.1", port=slow.port, deleting=True))  # terminating: it drains
        await eventually(lambda: "dep" not in pool.deployments)
        _, trailing = await in_flight  # answered, after the forget
        assert dict(tuple(trailing))["served-by"] == "slow"


async def test_a_relist_adds_a_deployments_new_pod_before_it_removes_the_old_one(
    api_server: FakeApiServer, start_pool
) -> None:
    """A deployment rolled from one pod to another while the watch was away: the relist removed the old pod
    before it added the new, and a namespace-wide pool forgot the deployment in between (found by a review)."""
    api_server.apply("pods", pod("old", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.drop_streams()
    api_server.apply("pods", pod("new", ip="10.0.0.2"))
    api_server.delete("pods", "old")
    api_server.compact()  # its resume version is too old: it re-lists
    await eventually(lambda: replicas(pool) == {"10.0.0.2:8080"})
    assert pool.changes.index(("add", "dep", "10.0.0.2:8080")) < pool.changes.index(("remove", "dep", "10.0.0.1:8080"))
    assert ("forget", "dep", "") not in pool.changes


async def test_a_relist_never_routes_a_reused_address_to_two_shards_nor_empties_a_shard(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """Pods replaced while the watch was away, an IP reused by a pod of another shard: the relist added the new
    shard's replica at once and removed the old one only after every listed pod, so the address served both
    shards meanwhile (a document indexed into the wrong shard; found by a review). The old one now goes just
    before, and a shard's new replica at a fresh address comes in before a reused one takes its old one away."""
    api_server.apply("pods", pod("w0", shard_id="0", ip="10.0.0.1"))
    api_server.apply("pods", pod("w1", shard_id="1", ip="10.0.0.2"))
    pool = await start_pool(sources=("pods",), pool_class=RoleCheckingPool)
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.drop_streams()
    api_server.delete("pods", "w0")
    api_server.delete("pods", "w1")
    api_server.apply("pods", pod("n1", shard_id="1", ip="10.0.0.1"))  # listed first: w0's IP, another shard
    api_server.apply("pods", pod("n0", shard_id="0", ip="10.0.0.3"))
    api_server.compact()  # its resume version is too old: it re-lists
    await eventually(lambda: replicas(pool, shard_id=0) == {"10.0.0.3:8080"})
    await eventually(lambda: replicas(pool, shard_id=1) == {"10.0.0.1:8080"})
    assert len(api_server.list_requests("pods")) == 2  # it was a relist
    assert pool.faults == []
    assert "the pods' previous listing had it as shard 0" in caplog.text


@pytest.mark.parametrize("reused_as", ["WORKER", "HEAD"])
async def test_a_relist_never_routes_a_reused_address_to_two_deployments_nor_empties_one(
    api_server: FakeApiServer, start_pool, caplog, reused_as: str
) -> None:
    """A namespace-wide pool (a gateway's): deployment A's pod replaced while the watch was away, its IP taken by
    a pod of deployment B (a worker, or B's head) listed first; the relist added B's replica at once and removed
    A's only after every listed pod, so A's requests could reach B's Executor meanwhile (found by a review).
    A's new replica at a fresh address comes in first, then A's old one goes just before B's takes its IP."""
    api_server.apply("pods", pod("a0", deployment="A", ip="10.0.0.1"))
    api_server.apply("pods", pod("b0", deployment="B", pod_type=reused_as, ip="10.0.0.2"))
    pool = await start_pool(sources=("pods",), pool_class=RoleCheckingPool)
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.drop_streams()
    api_server.delete("pods", "a0")
    api_server.delete("pods", "b0")
    api_server.apply("pods", pod("b1", deployment="B", pod_type=reused_as, ip="10.0.0.1"))  # listed first: a0's IP
    api_server.apply("pods", pod("a1", deployment="A", ip="10.0.0.3"))
    api_server.compact()  # its resume version is too old: it re-lists
    head = reused_as == "HEAD"
    await eventually(lambda: replicas(pool, "B", head=head) == {"10.0.0.1:8080"})
    await eventually(lambda: replicas(pool, "A") == {"10.0.0.3:8080"})
    assert len(api_server.list_requests("pods")) == 2  # it was a relist
    assert pool.faults == []
    assert not [change for change in pool.changes if change[0] == "forget"]
    assert "the pods' previous listing had it as shard 0" in caplog.text


async def test_one_address_listed_for_several_deployments_stays_in_each_across_a_relist(
    api_server: FakeApiServer, start_pool
) -> None:
    """Deployments listed at one address are each routed there, and a relist that lists them so again leaves
    them as they were, even when the one that newly claims it comes first: only what the previous listing held
    and the new one does not say again gives way to another deployment's claim."""
    api_server.apply("pods", pod("b0", deployment="B", ip="10.0.0.1", ready=False))
    api_server.apply("pods", pod("a0", deployment="A", ip="10.0.0.1"))
    api_server.apply("pods", pod("c0", deployment="C", ip="10.0.0.1"))
    pool = await start_pool(sources=("pods",))
    assert replicas(pool, "A") == replicas(pool, "C") == {"10.0.0.1:8080"}
    await eventually(lambda: api_server.open_streams("pods") == 1)
    api_server.drop_streams()
    api_server.apply("pods", pod("b0", deployment="B", ip="10.0.0.1"))  # listed first, now ready
    api_server.compact()  # its resume version is too old: it re-lists
    await eventually(lambda: replicas(pool, "B") == {"10.0.0.1:8080"})
    await eventually(lambda: api_server.open_streams("pods") == 1)  # the relist is over: it watches again
    assert len(api_server.list_requests("pods")) == 2  # it was a relist
    assert replicas(pool, "A") == replicas(pool, "C") == {"10.0.0.1:8080"}
    assert [change for change in pool.changes if change[0] != "add"] == []


# -- the head process follows the cluster ------------------------------------------------------


@pytest.mark.parametrize("given_by", ["KUBECONFIG", "--kubeconfig"])
async def test_head_process_with_k8s_namespace_routes_to_what_the_cluster_shows(
    given_by: str, api_server: FakeApiServer, kubeconfig: str, tmp_path
) -> None:
    """``shardnet head --k8s-namespace`` (a real process), its kubeconfig in its env or named by the flag
    (which wins over a KUBECONFIG that points nowhere)."""
    args = ["head", "--deployment", "dep", "--port", "0", "--k8s-namespace", NS]
    if given_by == "--kubeconfig":
        args += ["--kubeconfig", kubeconfig]
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing")}
    else:
        env = {**os.environ, "KUBECONFIG": kubeconfig}
    async with EchoServer("replica-a") as a, EchoServer("replica-b") as b:
        api_server.apply("pods", pod("a", ip="127.0.0.1", port=a.port, ready=True))
        head = ShardnetProcess("head", args, tmp_path / "head.log", env=env)
        head.launch()
        try:
            address = await asyncio.to_thread(head.wait_ready, 30.0)

            async def served_by() -> Optional[str]:
                try:
                    _, trailing = await oneshot.call_once(
                        "single_data", DataRequest(endpoint="/x"), address, timeout=2.0, metadata=[("endpoint", "/x")]
                    )
                except ReplicaError:
                    return None
                return dict(tuple(trailing)).get("served-by")

            await eventually(lambda: _is(served_by(), "replica-a"), timeout=10)
            api_server.apply("pods", pod("b", ip="127.0.0.1", port=b.port, ready=True))
            api_server.apply("pods", pod("a", ip="127.0.0.1", port=a.port, ready=False))
            await eventually(lambda: _is(served_by(), "replica-b"), timeout=10)
            assert {await served_by() for _ in range(4)} == {"replica-b"}
        finally:
            head.stop()
        assert head.popen.returncode == 0


async def test_a_head_fed_by_discovery_is_alive_but_not_ready_until_its_first_list(
    api_server: FakeApiServer, tmp_path
) -> None:
    """Readiness probes ask for ``READY_SERVICE``: a head whose API server refuses it must not take traffic."""
    api_server.token = "right"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url, token="wrong")
    pool = K8sGrpcConnectionPool(NS, kubeconfig=str(kubeconfig), watch=FAST, sources=("pods",))
    head = Head("dep", pool=pool)
    await head.start()
    try:
        address = head.server.address

        async def health(service: str) -> int:
            reply, _ = await oneshot.call_once(
                "health", health_pb2.HealthCheckRequest(service=service), address, timeout=2.0
            )
            return reply.status

        await eventually(lambda: len(api_server.list_requests("pods")) >= 2)  # refused, and tried again
        assert await health("") == health_pb2.HealthCheckResponse.SERVING  # alive: liveness must not kill it
        assert await health(services.READY_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        api_server.token = "wrong"  # the credentials work now: the next list succeeds
        await eventually(
            lambda: _is(health(services.READY_SERVICE), health_pb2.HealthCheckResponse.SERVING), timeout=10
        )
    finally:
        await head.stop(0.5)


async def _is(awaitable, expected: Any) -> bool:
    return await awaitable == expected


async def test_a_source_the_cluster_does_not_serve_is_left_out_saying_so_not_blaming_the_role(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """A 404 was told to grant list and watch in the Role, which cannot help (a k8s review's find)."""
    api_server.missing = {"endpointslices"}
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    pool = await start_pool()  # synced
    assert replicas(pool) == {"10.0.0.1:8080"}
    await pool.wait_synced(timeout=10)  # asked again: said once all the same
    said = [record.getMessage() for record in caplog.records
            if "following pods in default only" in record.getMessage() and record.levelno == logging.WARNING]
    assert len(said) == 1 and "HTTP 404" in said[0] and "does not serve it" in said[0] and "Role" not in said[0], said


async def test_a_source_the_role_does_not_grant_is_left_out_and_the_head_turns_ready_on_the_other(
    api_server: FakeApiServer, kubeconfig: str, caplog, eventually
) -> None:
    """A Role granting pods only (Jina's): the endpointslices watch was refused for ever, wait_synced with it, and
    the head never turned ready though the pods had given it every worker (found by a Kubernetes review)."""
    api_server.forbidden = {"endpointslices"}
    api_server.apply("pods", pod("w0", ip="127.0.0.1", port=50001))
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, deployments=("dep",))
    head = Head("dep", pool=pool, shards=1)
    await head.start()
    try:
        await pool.wait_synced(timeout=10)
        assert pool.deployments["dep"]["shards"] == {0: ["127.0.0.1:50001"]}
        assert "following pods in default only: endpointslices in default refused (Refused: HTTP 403" in caplog.text

        async def ready() -> int:
            request = health_pb2.HealthCheckRequest(service=services.READY_SERVICE)
            reply, _ = await oneshot.call_once("health", request, head.server.address, timeout=2.0)
            return reply.status

        await eventually(lambda: _is(ready(), health_pb2.HealthCheckResponse.SERVING), timeout=10)
        api_server.forbidden = set()  # granted later: a retry lists the slices too
        api_server.apply("endpointslices", endpoint_slice("dep-s", "dep-svc", [("127.0.0.2", True, None)], port=50002))
        await eventually(lambda: "127.0.0.2:50002" in pool.deployments["dep"]["shards"][0], timeout=10)
    finally:
        await head.stop(0.5)


async def test_a_pod_deleted_while_the_other_source_fails_is_no_longer_routed_nor_its_address_reused_wrongly(
    api_server: FakeApiServer, start_pool, caplog, eventually
) -> None:
    """The slices refused after the first list (a Role edited), then a shard-0 pod deleted and its address taken
    by a shard-1 pod: the slices' stale hold kept the address in shard 0 for as long as they failed, and the
    shard-1 worker answered shard 0's part of every ALL (found by a Kubernetes review). What the failing source
    still shows comes back with its next list."""
    api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    api_server.apply("pods", pod("w0b", ip="10.0.0.2", port=9000))
    api_server.apply(
        "endpointslices",
        endpoint_slice("s0", "dep-0", [("10.0.0.1", True, None), ("10.0.0.2", True, None)], port=9000),
    )
    pool = await start_pool()
    assert replicas(pool, shard_id=0) == {"10.0.0.1:9000", "10.0.0.2:9000"}

    api_server.forbidden = {"endpointslices"}
    api_server.drop_streams()
    await eventually(lambda: pool.failing_sources() == {"endpointslices"}, timeout=10)

    api_server.delete("pods", "w0")
    api_server.apply("pods", pod("w1", shard_id="1", ip="10.0.0.1", port=9000))
    await eventually(lambda: replicas(pool, shard_id=1) == {"10.0.0.1:9000"}, timeout=10)
    await eventually(lambda: replicas(pool, shard_id=0) == {"10.0.0.2:9000"}, timeout=10)
    assert "shard 0 replica 10.0.0.1:9000 of 'dep' is gone from the pods in default, and the endpointslices, " \
        "failing, cannot say so: no longer routed to" in caplog.text

    # the slices answer again, showing the shard-0 address still (a slice not updated yet): it comes back with them
    api_server.forbidden = set()
    await eventually(lambda: not pool.failing_sources() and replicas(pool, shard_id=0) == {"10.0.0.1:9000",
                                                                                           "10.0.0.2:9000"},
                     timeout=10)


async def test_a_member_dropped_during_a_watch_blip_comes_back_when_the_blip_ends(
    api_server: FakeApiServer, start_pool, eventually
) -> None:
    """The pod watch blipping (503s, which it resumes from, without a list), the slice that also held a ready
    pod deleted: the pod's hold, taken for stale, was dropped, and the resumed watch never gave it back (found by
    a review of the first fix). The source lists again instead of resuming once it has lost a hold so."""
    api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [("10.0.0.1", True, None)], port=9000))
    pool = await start_pool(watch=WatchOptions(read_timeout=5.0, connect_timeout=1.0, list_timeout=5.0,
                                               backoff_initial=0.3, backoff_max=0.6))
    lists_before = len(api_server.list_requests("pods"))
    api_server.failing_watches, api_server.failing_watches_of = 3, "pods"
    api_server.drop_streams()
    await eventually(lambda: pool.failing_sources() == {"pods"}, timeout=10)
    api_server.delete("endpointslices", "s0")  # the Service went; the pod stays ready and untouched
    await eventually(lambda: not pool.failing_sources() and replicas(pool) == {"10.0.0.1:9000"}, timeout=15)
    assert len(api_server.list_requests("pods")) == lists_before + 1  # listed again rather than resumed


async def test_an_address_reused_by_a_pod_of_another_shard_leaves_the_old_shard_while_the_slices_lag(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """One address, one shard, the freshest claim winning: a pod force-deleted and its IP given to a pod of
    another shard stayed in the old shard too while its EndpointSlice lagged (found by a review)."""
    address = "10.0.0.7"
    api_server.apply("pods", pod("w0", shard_id="0", ip=address))
    api_server.apply("endpointslices", endpoint_slice("dep-0-x", "dep-0", [(address, True, None)], shard="0", port=8080))
    pool = await start_pool()
    assert replicas(pool, shard_id=0) == {f"{address}:8080"}
    api_server.delete("pods", "w0")  # the slice still lists it: routed still
    api_server.apply("pods", pod("w1", shard_id="1", ip=address))
    await eventually(lambda: replicas(pool, shard_id=1) == {f"{address}:8080"})
    assert replicas(pool, shard_id=0) == set()
    assert "serves shard 1 by the pods" in caplog.text and "still list it as shard 0" in caplog.text
    api_server.apply("endpointslices", endpoint_slice("dep-0-x", "dep-0", [], shard="0", port=8080))  # caught up
    api_server.apply("endpointslices", endpoint_slice("dep-1-x", "dep-1", [(address, True, None)], shard="1", port=8080))
    api_server.apply("pods", pod("sentinel", shard_id="1", ip="10.0.0.99"))
    await eventually(lambda: "10.0.0.99:8080" in replicas(pool, shard_id=1))
    assert replicas(pool, shard_id=0) == set() and f"{address}:8080" in replicas(pool, shard_id=1)


async def test_a_source_that_answers_does_not_drop_what_another_answering_source_holds(
    api_server: FakeApiServer, start_pool, eventually
) -> None:
    """Both sources answering: a pod deleted while its endpoint is still in a slice stays routed until the slice
    lets go too (each source's own removal decides, not the first to speak)."""
    api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [("10.0.0.1", True, None)], port=9000))
    pool = await start_pool()
    api_server.delete("pods", "w0")
    api_server.apply("pods", pod("sentinel", ip="10.0.0.9", port=9000))  # delivered after the deletion
    await eventually(lambda: "10.0.0.9:9000" in replicas(pool), timeout=10)
    assert "10.0.0.1:9000" in replicas(pool)
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [], port=9000))
    await eventually(lambda: replicas(pool) == {"10.0.0.9:9000"}, timeout=10)


async def test_a_pool_every_source_of_which_is_refused_is_synced_once_one_is_granted(
    api_server: FakeApiServer, kubeconfig: str, eventually
):
    """Both refused at first, then a Role granting pods only bound: the wait, decided when both had been
    refused, then waited for both to list, for ever (found by a review of the first fix)."""
    api_server.forbidden = {"pods", "endpointslices"}
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    async with K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST) as pool:
        with pytest.raises(DiscoveryError, match=r"pods in default and endpointslices in default not listed .*403"):
            await pool.wait_synced(timeout=1.0)
        waiting = asyncio.ensure_future(pool.wait_synced(timeout=10))
        await eventually(lambda: len(api_server.list_requests("endpointslices")) >= 2)  # both refused, more than once
        assert not waiting.done()
        api_server.forbidden = {"endpointslices"}
        await waiting
        assert replicas(pool) == {"10.0.0.1:8080"}


async def test_a_head_fed_by_discovery_refuses_membership_changes_and_pods_beyond_its_shards(
    api_server: FakeApiServer, kubeconfig: str, caplog
) -> None:
    """Kubernetes owns such a head's workers: an ACTIVATE from any pod would route the deployment's requests to
    it, a DEACTIVATE would drop a Ready pod that no relist brings back; a pod of a shard the head does not
    have (left running after a resharding) is not routed to, and said so."""
    async with EchoServer("replica-a") as a, EchoServer("stale") as stale, EchoServer("intruder") as intruder:
        api_server.apply("pods", pod("a", ip="127.0.0.1", port=a.port))
        api_server.apply("pods", pod("stale", shard_id="2", ip="127.0.0.1", port=stale.port))
        pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, sources=("pods",))
        head = Head("dep", pool=pool, shards=2)
        await head.start()
        try:
            await pool.wait_synced(timeout=5)
            address = head.server.address
            for change in (oneshot.activate_worker, oneshot.deactivate_worker):
                target = intruder if change is oneshot.activate_worker else a
                with pytest.raises(ReplicaError) as refused:
                    await change("127.0.0.1", target.port, address, shard_id=0)
                assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert "takes its workers from Kubernetes discovery" in str(refused.value)
            assert replicas(pool) == {a.address}
            assert pool.get_replicas("dep", shard_id=2) is None
            assert f"replica {stale.address} is of shard 2, but the deployment has shards 0..1" in caplog.text
            answers = [await oneshot.call_once("single_data", DataRequest(endpoint="/x"), address, timeout=5)
                       for _ in range(3)]
            assert {dict(tuple(trailing))["served-by"] for _, trailing in answers} == {"replica-a"}
        finally:
            await head.stop(0.5)


async def test_status_of_a_head_fed_by_discovery_checks_the_pods_it_routes_to(
    api_server: FakeApiServer, kubeconfig: str, dead_address: str, capsys
) -> None:
    """Its replicas come from the cluster, not from --connection: a pod Kubernetes calls Ready whose process
    refuses connections is named down all the same, and the exit says degraded."""
    worker = Worker(executors.Tagger.create({}))
    await worker.start()
    api_server.apply("pods", pod("a", ip="127.0.0.1", port=worker.server.port))
    api_server.apply("pods", pod("b", ip="127.0.0.1", port=int(dead_address.rsplit(":", 1)[1])))
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, sources=("pods",))
    head = Head("dep", pool=pool)
    try:
        await head.start()
        try:
            await pool.wait_synced(timeout=5)
            capsys.readouterr()
            code = await asyncio.to_thread(cli_main, ["status", head.server.address])
            printed = capsys.readouterr().out
        finally:
            await head.stop(0.5)
    finally:
        await worker.stop(0)
    assert code == DEGRADED, printed
    assert f"  shard 0: {worker.server.address}\n" in printed
    assert f"  shard 0: {dead_address} (down: unreachable: " in printed, printed


# -- the pods' word on slices that lag --------------------------------------------------


async def test_a_pod_being_deleted_leaves_at_once_though_its_slice_still_lists_it_ready(
    api_server: FakeApiServer, start_pool, eventually, caplog
) -> None:
    """A terminating pod stayed routed until the EndpointSlice controller caught up (its worker refused new calls
    while draining, so each one failed over): the pods say so first, and the slice's stale endpoint is vetoed."""
    caplog.set_level(logging.INFO, logger="shardnet.discovery.kubernetes")
    w0 = api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    w1 = api_server.apply("pods", pod("w1", ip="10.0.0.2", port=9000))
    lagging = endpoint_slice("s0", "dep-0", [("10.0.0.1", True, None), ("10.0.0.2", True, None)], port=9000,
                             pods={"10.0.0.1": w0, "10.0.0.2": w1})
    api_server.apply("endpointslices", lagging)
    pool = await start_pool()
    assert replicas(pool) == {"10.0.0.1:9000", "10.0.0.2:9000"}
    api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000, deleting=True))
    await eventually(lambda: replicas(pool) == {"10.0.0.2:9000"}, timeout=10)
    assert "10.0.0.1:9000 of 'dep' (shard 0) is in its EndpointSlice still, but the pods say its pod w0 is being " \
        "deleted or has ended: not routed to" in caplog.text
    # the pod goes; the slice, still lagging, changes for another reason and lists it still: out it stays
    api_server.delete("pods", "w0")
    api_server.apply("endpointslices", {**lagging, "metadata": {**lagging["metadata"], "annotations": {"x": "1"}}})
    api_server.apply("pods", pod("sentinel", ip="10.0.0.9", port=9000))
    await eventually(lambda: "10.0.0.9:9000" in replicas(pool), timeout=10)
    assert replicas(pool) == {"10.0.0.2:9000", "10.0.0.9:9000"}


async def test_a_pod_merely_not_ready_is_left_to_its_slice(api_server: FakeApiServer, start_pool, eventually) -> None:
    """Readiness comes back, and the slice follows it soon enough: only a final word (deleted, being deleted, an
    IP taken over) vetoes, so a veto never outlives its cause while the pods source fails."""
    w0 = api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000))
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [("10.0.0.1", True, None)], port=9000,
                                                      pods={"10.0.0.1": w0}))
    pool = await start_pool(sources=("pods", "endpointslices"))
    api_server.apply("pods", pod("w0", ip="10.0.0.1", port=9000, ready=False))
    api_server.apply("pods", pod("sentinel", ip="10.0.0.9", port=9000))
    await eventually(lambda: "10.0.0.9:9000" in replicas(pool), timeout=10)
    assert "10.0.0.1:9000" in replicas(pool)  # held by the slice, which says ready still


async def test_a_pool_following_the_namespace_does_not_route_a_deleted_pods_ip_to_another_deployment(
    api_server: FakeApiServer, start_pool, eventually
) -> None:
    """'enc''s pod deleted while its slice lagged, and its IP given to an 'idx' pod: 'enc''s requests went to
    'idx''s Executor (a Kubernetes review's find). The pods saw the deletion: the stale endpoint is out."""
    address = "10.0.0.7"
    enc = api_server.apply("pods", pod("enc-0", deployment="enc", ip=address, port=9000))
    api_server.apply("endpointslices", endpoint_slice("enc-s", "enc-0", [(address, True, None)], deployment="enc",
                                                      port=9000, pods={address: enc}))
    pool = await start_pool()
    assert replicas(pool, "enc") == {f"{address}:9000"}
    api_server.delete("pods", "enc-0")
    api_server.apply("pods", pod("idx-0", deployment="idx", ip=address, port=9000))
    await eventually(lambda: replicas(pool, "idx") == {f"{address}:9000"}, timeout=10)
    await eventually(lambda: replicas(pool, "enc") == set(), timeout=10)


async def test_pods_on_the_host_network_share_an_ip_without_vetoing_each_other(
    api_server: FakeApiServer, start_pool, eventually
) -> None:
    """Host-network pods of one node all have its IP: none of them says another's endpoint is stale."""
    def host_pod(name: str, shard: str, port: int) -> dict:
        made = pod(name, shard_id=shard, ip="192.168.1.5", port=port)
        made["spec"]["hostNetwork"] = True
        return made

    a = api_server.apply("pods", host_pod("a", "0", 9000))
    b = api_server.apply("pods", host_pod("b", "1", 9001))
    api_server.apply("endpointslices", endpoint_slice("s0", "dep-0", [("192.168.1.5", True, None)], shard="0",
                                                      port=9000, pods={"192.168.1.5": a}))
    api_server.apply("endpointslices", endpoint_slice("s1", "dep-1", [("192.168.1.5", True, None)], shard="1",
                                                      port=9001, pods={"192.168.1.5": b}))
    pool = await start_pool(sources=("endpointslices", "pods"))
    api_server.apply("pods", pod("sentinel", ip="10.0.0.9", port=9000))
    await eventually(lambda: "10.0.0.9:9000" in replicas(pool), timeout=10)
    assert "192.168.1.5:9000" in replicas(pool, shard_id=0) and replicas(pool, shard_id=1) == {"192.168.1.5:9001"}


def test_the_pods_word_remembers_deletions_boundedly_and_forgets_one_of_a_pod_back_in_the_selector() -> None:
    """A long-lived head following a busy namespace does not grow with every pod that ever went; a slice lagging
    behind a deletion may name the pod after it went; a pod whose label was edited away and back comes as DELETED,
    then ADDED with its uid (a regression review's find: its deletion outlived it)."""
    from shardnet.discovery import pods_word
    from shardnet.discovery.pods_word import PodsWord, SliceEndpoint

    word = PodsWord()
    pod_a = {"metadata": {"uid": "u1", "name": "a"}, "status": {"podIP": "10.0.0.1", "phase": "Running"}}
    endpoint = SliceEndpoint(Member("dep", False, 0, "10.0.0.1:8080"), "u1")
    word.pod_deleted(pod_a)  # before any slice names it
    word.slice_seen("s", [endpoint])
    assert word.routed("s") == frozenset() and word.veto(endpoint) == "its pod a was deleted"
    assert word.pod_seen(pod_a) == {"u1"}  # back in the selector: its slices are looked at again
    assert word.veto(endpoint) is None and word.changed("s") == (frozenset(), {endpoint.member})
    word.pod_deleted(pod_a)
    for uid in range(pods_word.REMEMBERED_DELETIONS):
        word.pod_deleted({"metadata": {"uid": f"x{uid}", "name": f"x{uid}"}})
    assert word.veto(endpoint) is None and len(word._deleted) == pods_word.REMEMBERED_DELETIONS
    assert word.pod_seen({"metadata": {"uid": "bad"}, "status": "garbage"}) == set()  # unreadable: left out


async def test_a_head_with_a_discovered_uses_after_is_not_ready_until_discovery_lists_one(
    api_server: FakeApiServer, kubeconfig: str, caplog
) -> None:
    """Its shards' workers listed, a head whose uses_after discovery finds (k8s render --uses-after) was ready
    at once, and every request failed until the hop's pod was: it waits for the hop as for its shards."""
    caplog.set_level(logging.INFO, logger="shardnet.runtimes.head")
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, deployments=("dep",))
    head = Head("dep", pool=pool, shards=1, uses_after=DISCOVERED)
    await head.start()
    try:
        async def readiness() -> int:
            request = health_pb2.HealthCheckRequest(service=services.READY_SERVICE)
            reply, _ = await oneshot.call_once("health", request, head.server.address, timeout=2.0)
            return reply.status

        await eventually(lambda: "not ready until uses_after has one" in caplog.text, timeout=10)
        assert await readiness() == health_pb2.HealthCheckResponse.NOT_SERVING
        api_server.apply("pods", pod("after", pod_type="USES_AFTER", shard_id="", ip="10.0.0.2"))
        await eventually(lambda: _is(readiness(), health_pb2.HealthCheckResponse.SERVING), timeout=10)
        assert "dep: discovery listed a replica of every shard and of uses_after; ready" in caplog.text
    finally:
        await head.stop(0.5)


async def test_a_kubernetes_heads_no_replica_errors_name_discovery_and_the_hop_not_activate_or_shards(
    api_server: FakeApiServer, kubeconfig: str
) -> None:
    """A discovered uses_before with no pod was refused as if it were the head's shards, in ACTIVATE's words
    ("no worker has registered (ACTIVATE), none was given (--connection)"; once its pod went, "shard(s) 0 have
    no replica (... their leases lapsed)"); a regression review's find. Said for the hop, and for discovery."""
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, deployments=("dep",))
    head = Head("dep", pool=pool, shards=1, uses_before=DISCOVERED, shards_wait=0)
    await head.start()
    try:
        async def refusal() -> str:
            with pytest.raises(ReplicaError, match="UNAVAILABLE") as refused:
                await oneshot.send_request_async(DataRequest(endpoint="/x"), head.server.address, timeout=5)
            return str(refused.value)

        labels = f"in namespace {NS!r} (pods labelled jina_deployment_name=dep, pod_type="
        await pool.wait_synced(timeout=10)  # listed: before that, the refusal says discovery has not listed yet
        said = await refusal()
        assert ("deployment 'dep/uses_before' has no live replica: discovery has found none " + labels
                + "USES_BEFORE, or Services shardnet.io/deployment=dep, shardnet.io/role=uses_before)") in said, said
        api_server.apply("pods", pod("before", pod_type="USES_BEFORE", shard_id="", ip="10.0.0.2"))
        await eventually(lambda: pool.shard_ids("dep/uses_before") == [0], timeout=10)
        api_server.delete("pods", "before")
        await eventually(lambda: not pool.targets("dep/uses_before", False, None, PollingType.ANY), timeout=10)
        said = await refusal()
        assert ("deployment 'dep/uses_before' has no live replica: the replicas discovery found of it are gone or "
                "not ready now " + labels + "USES_BEFORE") in said, said
        assert "ACTIVATE" not in said and "shard(s)" not in said and "lease" not in said, said
        assert head._why_none("dep") == ": shard(s) 0 have no replica discovery lists ready " + labels + (
            "WORKER, or Services shardnet.io/deployment=dep, shardnet.io/role=worker)")  # declared, none found
    finally:
        await head.stop(0.5)


def test_where_a_kubernetes_pool_finds_replicas_names_only_the_sources_it_follows(kubeconfig: str) -> None:
    """A pool following pods alone was said to look for Services too: an operator would label the wrong thing."""
    pods_only = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, sources=("pods",))
    slices_only = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, sources=("endpointslices",))
    assert pods_only.where_replicas_are_found("dep", "uses_after") == (
        f"namespace {NS!r} (pods labelled jina_deployment_name=dep, pod_type=USES_AFTER)")
    assert slices_only.where_replicas_are_found("dep") == (
        f"namespace {NS!r} (Services shardnet.io/deployment=dep, shardnet.io/role=worker)")


async def test_a_pod_restarted_in_place_is_health_checked_once_ready_again_not_after_its_ejection(
    api_server: FakeApiServer, start_pool
) -> None:
    """A container restarted on its pod's address (kill -9, an OOM kill) turns the pod Ready again while the lagging
    slice still holds it: nothing changed in the pool, and the restarted worker waited out its ejection's probe
    back-off (up to 30 s) while it could serve; a worker that registers again is checked at once (a rolling-update
    review). A pod Ready again is now such a sign too."""
    with socket.socket() as holder:  # a port free now, for the worker that dies and its successor
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    address = f"127.0.0.1:{port}"
    async with EchoServer("other") as other:
        crashed = api_server.apply("pods", pod("w0", ip="127.0.0.1", port=port))
        kept = api_server.apply("pods", pod("w1", ip="127.0.0.1", port=other.port))
        api_server.apply("endpointslices", endpoint_slice("s0", "svc", [("127.0.0.1", True, False)], port=port,
                                                          pods={"127.0.0.1": crashed}))
        api_server.apply("endpointslices", endpoint_slice("s1", "svc", [("127.0.0.1", True, False)],
                                                          port=other.port, pods={"127.0.0.1": kept}))
        pool = await start_pool(pool_class=K8sGrpcConnectionPool,
                                ejection=EjectionPolicy(base_ejection=4.0, max_ejection=30.0))
        replicas = pool.get_replicas("dep", shard_id=0)
        for _ in range(8):  # nothing listens at the dead one's address: it fails its turns and is ejected
            [task] = pool.send_request(DataRequest(endpoint="/x"), "dep")
            await task
        assert replicas.ejected_addresses == [address]
        api_server.apply("pods", pod("w0", ip="127.0.0.1", port=port, ready=False))  # the kubelet restarts it
        async with EchoServer("restarted", port=port):
            api_server.apply("pods", pod("w0", ip="127.0.0.1", port=port, ready=True))  # and it serves again
            await eventually(lambda: address not in replicas.ejected_addresses, timeout=1.5)


class _LedgerPool(GrpcConnectionPool):
    namespace = "ns"

    def failing_sources(self) -> set[str]:
        return set()


async def test_a_pod_ready_again_of_a_shard_no_replica_list_can_have_is_ignored_not_raised():
    """The readmission of a pod Ready again raised out of the ledger for a shard id past int32 (the pods watch
    failed and backed off, skipping the removals after it), where _add says and ignores it (a regression review)."""
    pool = _LedgerPool()
    ledger = _Ledger(pool)
    try:
        await ledger.record(PODS, "p1", frozenset({Member("dep", False, 0, "10.0.0.2:9000")}))
        member = Member("dep", False, 2**31, "10.0.0.1:9000")  # shard label "2147483648" on its pod and Service
        await ledger.record(SLICES, "s0", frozenset({member}))
        await ledger.record(PODS, "p0", frozenset({member}))  # Ready while its slice holds it: no exception
    finally:
        await pool.close()



@pytest.mark.parametrize("polling", ["ANY", "ALL"])
async def test_a_head_not_listed_yet_says_so_when_it_refuses(tmp_path, polling: str) -> None:
    """A head whose discovery has not listed yet (the API server refusing) refused a request saying its shards had
    no replica "discovery lists ready" in namespace ... (pods labelled ...): read as mislabelled pods, while the
    503 was in its log only (a review playing Kubernetes with head replicas)."""
    async with FakeApiServer() as api_server:
        api_server.apply("pods", pod("w0", deployment="dep", ip="127.0.0.1", port=50001))
        await api_server.go_down("unavailable")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api_server.url)
        pool = K8sGrpcConnectionPool("default", kubeconfig=str(kubeconfig), watch=FAST, deployments=("dep",))
        head = Head("dep", pool=pool, shards=2, polling=PollingMap.parse(polling))
        await head.start()
        try:
            await eventually(lambda: len(api_server.list_requests("pods")) >= 1)
            with pytest.raises(ReplicaError) as refused:
                await oneshot.call_once("single_data", DataRequest(endpoint="/x"), head.server.address, timeout=3.0,
                                        metadata=[("endpoint", "/x")])
            said = str(refused.value)
            assert "not listed" in said and "503" in said, said
            assert "pods labelled" not in said, said
        finally:
            await head.stop(0.5)


def _lax_cluster_certificates(folder, name: str = "127.0.0.1") -> tuple[Any, Any]:
    """(CA file, ssl context serving a leaf it signed) as MicroK8s and older clusters issue them: the CA's
    basicConstraints not critical, no keyUsage, no key identifiers. kubectl (Go) takes them; Python 3.13's
    default TLS context (VERIFY_X509_STRICT) does not."""
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-ca")])
    ca = (x509.CertificateBuilder().subject_name(issuer).issuer_name(issuer).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_file, leaf_file, key_file = folder / "ca.crt", folder / "tls.crt", folder / "tls.key"
    ca_file.write_bytes(ca.public_bytes(pem))
    leaf_file.write_bytes(leaf.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(leaf_file, key_file)
    return ca_file, serving


@contextlib.asynccontextmanager
async def _pool_over_tls(tmp_path, serving, ca_file) -> AsyncIterator[K8sGrpcConnectionPool]:
    """A pool following a fake API server served with ``serving``, trusting ``ca_file``; one pod listed there."""
    async with FakeApiServer(ssl_context=serving) as server:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url, namespace=NS,
                                      certificate_authority=str(ca_file))
        server.apply("pods", pod("a", ip="10.0.0.1"))
        async with K8sGrpcConnectionPool(NS, kubeconfig=str(kubeconfig), watch=FAST) as pool:
            yield pool


async def test_an_api_server_certificate_kubectl_takes_is_taken_on_every_python(tmp_path) -> None:
    """Python 3.13 made its default TLS context strict: a head following a MicroK8s cluster (a CA whose
    basicConstraints is not critical, no Authority Key Identifier) synced on 3.12 and never on 3.13, each
    attempt failing with CERTIFICATE_VERIFY_FAILED: Missing Authority Key Identifier."""
    ca_file, serving = _lax_cluster_certificates(tmp_path)
    async with _pool_over_tls(tmp_path, serving, ca_file) as pool:
        await pool.wait_synced(timeout=5)
        assert replicas(pool) == {"10.0.0.1:8080"}


async def test_an_api_server_certificate_of_another_ca_is_still_refused(tmp_path) -> None:
    """The strictness relaxed, the chain is verified as before: a CA file that did not sign it is refused."""
    _, serving = _lax_cluster_certificates(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _ = _lax_cluster_certificates(other)
    async with _pool_over_tls(tmp_path, serving, other_ca) as pool:
        with pytest.raises(DiscoveryError, match="CERTIFICATE_VERIFY_FAILED"):
            await pool.wait_synced(timeout=2)


async def test_a_followed_deployment_scaled_to_zero_warns_once_a_forgotten_one_not_as_emptied(
    api_server: FakeApiServer, start_pool, caplog
) -> None:
    """A followed deployment scaled to 0 warns once at the first send; a namespace pool forgets it, unsaid."""
    api_server.apply("pods", pod("w0", ip="10.0.0.1"))
    gateway, head = await start_pool(), await start_pool(deployments=("dep",))
    await eventually(lambda: replicas(head) == {"10.0.0.1:8080"} and replicas(gateway) == {"10.0.0.1:8080"})
    api_server.delete("pods", "w0")
    await eventually(lambda: head.deployments == {"dep": {"head": [], "shards": {0: []}}})
    await eventually(lambda: set(gateway.deployments) == set())
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert head.send_request(DataRequest(endpoint="/x"), "dep") == []
        assert gateway.send_request(DataRequest(endpoint="/x"), "dep") == []
    assert caplog.text.count("dep/shard-0: no replica left: 10.0.0.1:8080 was the last") == 1, caplog.text


async def test_an_api_servers_words_reach_the_discovery_error_escaped(api_server: FakeApiServer, kubeconfig: str):
    """A Status message (the API server's, or a proxy's in front of it) went into DiscoveryError and the log as it
    came: a newline began a line of its own, escapes reached the terminal (an error-API review's left-alone item)."""
    api_server.forbidden = {"pods", "endpointslices"}
    api_server.forbidden_message = "denied\nshardnet: all replicas OK \x1b[2J"
    async with K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST) as pool:
        with pytest.raises(DiscoveryError) as refused:
            await pool.wait_synced(timeout=1.0)
    said = str(refused.value)
    assert "denied\\nshardnet: all replicas OK \\x1b[2J" in said and "\n" not in said and "\x1b" not in said, said
