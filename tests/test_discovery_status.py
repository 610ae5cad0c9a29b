"""What a Kubernetes head says of its discovery (``discovery_problem``, STATUS's discovery-failing, `shardnet status`)
over the combinations of its sources listed, never listed, failing, refused at start or later, and recovered
(a regression review)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2

import executors
from k8s_apiserver import FakeApiServer, pod, status_object
from test_k8s_discovery import FAST, NS, api_server, kubeconfig  # noqa: F401 (fixtures)

from shardnet.cli.main import main as cli_main
from shardnet.cli.status import DEGRADED
from shardnet.discovery.kubernetes import K8sGrpcConnectionPool
from shardnet.discovery.watch import WatchOptions
from shardnet.networking import oneshot
from shardnet.protocol import services
from shardnet.runtimes.head import Head
from shardnet.runtimes.worker import Worker
from shardnet.testing import eventually

P, S = f"pods in {NS}", f"endpointslices in {NS}"


def unavailable_for(api_server: FakeApiServer, resource: str) -> None:
    plain_list = api_server._list

    def patched(res, namespace, selector, query):
        if res == resource:
            return web.json_response(status_object(503, "ServiceUnavailable", f"no {res} now"), status=503)
        return plain_list(res, namespace, selector, query)

    api_server._list = patched


async def started(kubeconfig: str, **options) -> K8sGrpcConnectionPool:
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, **options)
    pool.start()
    await eventually(lambda: pool._configured.is_set(), timeout=5)
    return pool


async def test_both_listed_then_none(api_server, kubeconfig):
    pool = await started(kubeconfig)
    try:
        await pool.wait_synced(5)
        assert pool.discovery_problem() is None
    finally:
        await pool.close()


async def test_slices_refused_at_start_left_out_then_pods_outage_quotes_pods(api_server, kubeconfig):
    api_server.forbidden.add("endpointslices")
    pool = await started(kubeconfig)
    try:
        await pool.wait_synced(5)
        assert pool.discovery_problem() is None
        await api_server.go_down("unavailable")
        # the stream's drop first, then the relist's 503
        await eventually(lambda: "503" in (pool._watches["pods"].last_failure or ""), timeout=10)
        problem = pool.discovery_problem()
        assert problem.startswith(f"{P} failing: the workers routed to may be stale; last failure: "), problem
        assert "forbidden" not in problem and "503" in problem, problem
        await api_server.come_back()
        await eventually(lambda: not pool._watches["pods"].failing, timeout=10)
        assert pool.discovery_problem() is None
    finally:
        await pool.close()


async def test_both_refused_at_start(api_server, kubeconfig):
    api_server.forbidden |= {"pods", "endpointslices"}
    pool = await started(kubeconfig)
    try:
        await eventually(lambda: all(w.refused for w in pool._watches.values()), timeout=10)
        problem = pool.discovery_problem()
        assert problem.startswith(f"{P} and {S} not listed yet; last failure: "), problem
    finally:
        await pool.close()


async def test_role_edited_later_then_restored(api_server, kubeconfig):
    pool = await started(kubeconfig)
    try:
        await pool.wait_synced(5)
        api_server.forbidden.add("endpointslices")
        # the slices' stream only: the pods' watch, dropped as soon as opened, would be failing too for a while
        api_server.drop_streams("endpointslices")
        await eventually(lambda: pool._watches["endpointslices"].refused, timeout=10)
        problem = pool.discovery_problem()
        assert problem.startswith(f"{S} failing: the workers routed to may be stale; last failure: "), problem
        assert "forbidden" in problem, problem
        api_server.forbidden.clear()
        await eventually(lambda: not pool._watches["endpointslices"].failing, timeout=10)
        assert pool.discovery_problem() is None
    finally:
        await pool.close()


async def test_unlisted_and_failing_both_named(api_server, kubeconfig):
    unavailable_for(api_server, "endpointslices")
    pool = await started(kubeconfig)
    try:
        await eventually(lambda: pool._watches["pods"].synced.is_set(), timeout=10)
        await eventually(lambda: pool._watches["endpointslices"].last_failure, timeout=10)
        problem = pool.discovery_problem()
        assert problem.startswith(f"{S} not listed yet; last failure: "), problem
        await api_server.go_down("unavailable")
        await eventually(lambda: pool._watches["pods"].failing, timeout=10)
        problem = pool.discovery_problem()
        assert problem.startswith(f"{S} not listed yet; {P} failing: the workers routed to may be stale; "
                                  "last failure: "), problem
    finally:
        await pool.close()


async def test_pods_only_head_outage(api_server, kubeconfig):
    pool = await started(kubeconfig, sources=("pods",))
    try:
        await pool.wait_synced(5)
        assert pool.discovery_problem() is None
        api_server.forbidden.add("pods")
        api_server.drop_streams()
        await eventually(lambda: pool._watches["pods"].refused, timeout=10)
        problem = pool.discovery_problem()
        assert problem.startswith(f"{P} failing: the workers routed to may be stale; last failure: "), problem
    finally:
        await pool.close()


async def status_of(head: Head, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", head.server.address])
    return code, capsys.readouterr().out


async def ready(head: Head) -> bool:
    reply, _ = await oneshot.call_once(
        "health", health_pb2.HealthCheckRequest(service=services.READY_SERVICE), head.server.address, timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.asynccontextmanager
async def head_over_one_pod(api_server: FakeApiServer, kubeconfig: str, **pool_options) -> AsyncIterator[tuple]:
    """A Kubernetes head of shard 0 of 'dep' whose discovery finds one pod, a live worker: (worker, pool, head)."""
    worker = Worker(executors.Tagger.create({}))
    await worker.start()
    try:
        api_server.apply("pods", pod("a", ip="127.0.0.1", port=worker.server.port))
        pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, watch=FAST, **pool_options)
        head = Head("dep", pool=pool, shards=1)
        await head.start()
        try:
            yield worker, pool, head
        finally:
            await head.stop(0.5)
    finally:
        await worker.stop(0)


async def test_status_of_a_head_whose_watch_fails_says_its_view_may_be_stale(api_server, kubeconfig, capsys):
    """The API server gone after the first list: the head routes on by what it had (rightly), but `shardnet
    status` said all was well, the failure in the head's log only (a left-alone item of an earlier session)."""
    async with head_over_one_pod(api_server, kubeconfig, sources=("pods",)) as (worker, pool, head):
        await pool.wait_synced(timeout=5)
        assert (await status_of(head, capsys))[0] == 0
        await api_server.go_down("unavailable")
        await eventually(lambda: pool.failing_sources(), timeout=10)
        code, printed = await status_of(head, capsys)
        await api_server.come_back()
        await eventually(lambda: not pool.failing_sources(), timeout=10)
        assert (await status_of(head, capsys))[0] == 0
    assert code == DEGRADED, printed
    assert f"  shard 0: {worker.server.address}\n" in printed
    assert f"discovery: {P} failing: the workers routed to may be stale; last failure: " in printed, printed


async def test_status_of_a_head_whose_role_grants_pods_only_is_not_degraded_for_ever(api_server, kubeconfig, capsys):
    """A Role granting pods only (Jina's): the slices are left out, as README says, and the head routes by the
    pods, which are current. status said 'endpointslices failing: the workers routed to may be stale' and exited
    3, for ever (a regression review)."""
    api_server.forbidden = {"endpointslices"}
    async with head_over_one_pod(api_server, kubeconfig) as (worker, pool, head):
        await pool.wait_synced(timeout=5)  # the slices refused and left out
        code, printed = await status_of(head, capsys)
    assert code == 0 and "discovery:" not in printed, printed


async def test_a_head_whose_slices_were_never_listed_says_not_listed_yet_not_stale(api_server, kubeconfig, capsys):
    """A head (re)started while the slices' list fails (503: an outage, the pods listed already): not ready, and
    `status` said "endpointslices in NS failing: the workers routed to may be stale", of a source that never
    gave it anything, and never why the head is not ready (it waits for that source's first list)."""
    unavailable_for(api_server, "endpointslices")
    async with head_over_one_pod(api_server, kubeconfig) as (worker, pool, head):
        await eventually(lambda: pool._watches and pool._watches["pods"].synced.is_set(), timeout=10)
        await eventually(lambda: len(api_server.list_requests("endpointslices")) >= 2, timeout=10)
        assert not await ready(head)
        code, printed = await status_of(head, capsys)
    assert code == 1, printed
    assert "may be stale" not in printed, printed
    assert f"discovery: {S} not listed yet" in printed, printed


async def test_head_exit_codes_across_role_edits(api_server, kubeconfig, capsys):
    """A pods-only Role, then slices granted, then pods revoked (exit 3, still ready), then pods granted again."""
    api_server.forbidden.add("endpointslices")  # pods-only Role
    async with head_over_one_pod(api_server, kubeconfig) as (worker, pool, head):
        await eventually(lambda: pool._watches and pool._watches["pods"].synced.is_set(), timeout=10)
        await eventually(lambda: ready(head), timeout=10)
        code, printed = await status_of(head, capsys)
        assert code == 0 and "discovery" not in printed, printed
        api_server.forbidden.discard("endpointslices")  # Role edited to grant slices: listed at next retry
        await eventually(lambda: pool._watches["endpointslices"].synced.is_set(), timeout=10)
        code, printed = await status_of(head, capsys)
        assert code == 0, printed
        api_server.forbidden.add("pods")  # Role edited: pods revoked
        # the pods' stream only: the slices' watch, dropped as soon as opened, would be failing too for a while
        api_server.drop_streams("pods")
        await eventually(lambda: pool._watches["pods"].refused, timeout=10)
        code, printed = await status_of(head, capsys)
        assert await ready(head)
        assert code == DEGRADED, printed
        assert f"discovery: {P} failing: the workers routed to may be stale; last failure: " in printed
        api_server.forbidden.discard("pods")
        await eventually(lambda: not pool._watches["pods"].failing, timeout=10)
        code, printed = await status_of(head, capsys)
        assert code == 0 and "discovery" not in printed, printed


async def test_hung_api_server_noticed_after(api_server, kubeconfig):
    """An API server that takes connections and never answers: how long until status says so (read_timeout 1 s)."""
    pool = K8sGrpcConnectionPool(NS, kubeconfig=kubeconfig, sources=("pods",),
                                 watch=WatchOptions(read_timeout=1.0, connect_timeout=1.0, list_timeout=5.0,
                                                    backoff_initial=0.02, backoff_max=0.2))
    pool.start()
    try:
        await pool.wait_synced(5)
        await eventually(lambda: api_server.open_streams("pods"), timeout=5)
        hang = asyncio.Event()
        plain_watch = api_server._watch

        async def hung(*args, **kwargs):
            await hang.wait()
            return await plain_watch(*args, **kwargs)

        api_server._watch = hung  # new watches never answer; the open one is silent already
        loop = asyncio.get_running_loop()
        began = loop.time()
        await eventually(lambda: pool._watches["pods"].failing, timeout=10)
        took = loop.time() - began
        hang.set()
        # README: "noticed only after one to two of the watch's read timeouts": the silent open watch, then the next
        assert took > 1.5, took
    finally:
        await pool.close()
