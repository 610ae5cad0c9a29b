"""Prometheus metrics (--metrics-port): in-process heads and workers on free loopback ports, scraped over real
HTTP with urllib, read back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.request

import executors
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardnet import ConfigurationError, DataRequest, Document, ReplicaError
from shardnet.cli.main import main as cli_main
from shardnet.networking import oneshot
from shardnet.runtimes.head import Head
from shardnet.runtimes.metrics import OTHER, EndpointLabels
from shardnet.runtimes.server import ServerConfig, check_can_listen
from shardnet.runtimes.worker import Worker
from shardnet.testing import eventually

METERED = ServerConfig(metrics_port=0)


async def scrape(runtime) -> dict[tuple[str, frozenset], float]:
    """Every sample a runtime's /metrics serves, keyed by name and labels."""
    url = f"http://{runtime.server.metrics_address}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
            return answer.read().decode()

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def send(address: str, endpoint: str) -> DataRequest:
    return await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint=endpoint), address, timeout=10)


async def test_head_and_worker_count_and_time_requests_by_endpoint_and_outcome(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 0}), METERED, name="tags/shard-0/rep-0"))
    head = await runtimes(Head("tags", METERED, connections={0: [worker.server.address]}))
    for endpoint in ("/tag", "/tag", "/fail", "/unknown"):
        await send(head.server.address, endpoint)

    at_head = await scrape(head)
    for endpoint, outcome, count in (("/tag", "ok", 2), ("/fail", "error", 1), ("/unknown", "ok", 1)):
        assert sample(at_head, "shardnet_head_requests_total", deployment="tags", endpoint=endpoint,
                      outcome=outcome) == count
        assert sample(at_head, "shardnet_head_request_duration_seconds_count", deployment="tags",
                      endpoint=endpoint) == count
    assert sample(at_head, "shardnet_head_request_duration_seconds_bucket", deployment="tags", endpoint="/tag",
                  le="+Inf") == 2
    assert sample(at_head, "shardnet_head_request_duration_seconds_sum", deployment="tags", endpoint="/tag") > 0
    assert not any(name == "shardnet_head_requests_total" and ("outcome", "error") in labels
                   and ("endpoint", "/tag") in labels for name, labels in at_head)
    assert sample(at_head, "shardnet_head_requests_in_flight", deployment="tags") == 0
    assert sample(at_head, "shardnet_head_replicas", deployment="tags", shard="0") == 1
    assert sample(at_head, "shardnet_head_replicas_ejected", deployment="tags", shard="0") == 0
    assert sample(at_head, "shardnet_head_retries_total", deployment="tags") == 0
    assert sample(at_head, "shardnet_head_retries_refused_total", deployment="tags") == 0
    assert sample(at_head, "shardnet_head_requests_resent_total", deployment="tags") == 0

    at_worker = await scrape(worker)
    shard = {"deployment": "tags", "shard": "0"}
    for endpoint, outcome, count in (("/tag", "ok", 2), ("/fail", "error", 1), ("/unknown", "unbound", 1)):
        assert sample(at_worker, "shardnet_worker_requests_total", endpoint=endpoint, outcome=outcome,
                      **shard) == count
        assert sample(at_worker, "shardnet_worker_handler_duration_seconds_count", endpoint=endpoint, **shard) == count
    assert sample(at_worker, "shardnet_worker_requests_in_flight", **shard) == 0
    assert not any(name.startswith("shardnet_head") for name, _ in at_worker)


async def test_a_call_sent_to_the_worker_itself_is_counted_with_its_gRPC_error(runtimes):
    """Unary, not on the head's request stream: an ERROR answer and an answer refused as too big."""
    worker = await runtimes(Worker(executors.Sleepy.create(), ServerConfig(metrics_port=0, max_message_bytes=4096)))
    assert not (await send(worker.server.address, "/sleep")).is_error
    with pytest.raises(ReplicaError) as refused:
        await oneshot.send_request_async(
            DataRequest([Document()], endpoint="/big", parameters={"bytes": 10_000}), worker.server.address, timeout=10
        )
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    samples = await scrape(worker)
    labels = {"deployment": "Sleepy", "shard": "0"}
    assert sample(samples, "shardnet_worker_requests_total", endpoint="/sleep", outcome="ok", **labels) == 1
    assert sample(samples, "shardnet_worker_requests_total", endpoint="/big", outcome="error", **labels) == 1


async def test_head_counts_requests_it_refuses_past_max_in_flight_and_in_flight_ones(runtimes):
    worker = await runtimes(Worker(executors.Sleepy.create()))
    head = await runtimes(Head("sleepy", METERED, connections={0: [worker.server.address]}, max_in_flight=1))
    held = asyncio.ensure_future(oneshot.send_request_async(
        DataRequest([Document()], endpoint="/sleep", parameters={"seconds": 0.5}), head.server.address, timeout=10
    ))
    try:
        await eventually(lambda: worker.executor.sleeping == 1)
        assert sample(await scrape(head), "shardnet_head_requests_in_flight", deployment="sleepy") == 1
        with pytest.raises(ReplicaError) as refused:
            await send(head.server.address, "/sleep")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await held
    finally:
        held.cancel()
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_requests_total", deployment="sleepy", endpoint="/sleep", outcome="ok") == 1
    assert sample(samples, "shardnet_head_requests_total", deployment="sleepy", endpoint="/sleep",
                  outcome="refused") == 1
    # a refused request never ran: not timed
    assert sample(samples, "shardnet_head_request_duration_seconds_count", deployment="sleepy", endpoint="/sleep") == 1


async def test_replica_gauges_follow_workers_registering_and_leaving(runtimes):
    workers = [await runtimes(Worker(executors.Tagger.create({"shard_id": shard}))) for shard in (0, 1)]
    head = await runtimes(Head("joined", METERED))
    assert not any(name == "shardnet_head_replicas" for name, _ in await scrape(head))
    for shard, worker in enumerate(workers):
        host, port = worker.server.address.rsplit(":", 1)
        await oneshot.activate_worker(host, int(port), head.server.address, shard_id=shard)
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replicas", deployment="joined", shard="0") == 1
    assert sample(samples, "shardnet_head_replicas", deployment="joined", shard="1") == 1
    host, port = workers[1].server.address.rsplit(":", 1)
    await oneshot.deactivate_worker(host, int(port), head.server.address, shard_id=1)
    samples = await scrape(head)
    assert sample(samples, "shardnet_head_replicas", deployment="joined", shard="0") == 1
    assert ("shardnet_head_replicas", frozenset({"deployment": "joined", "shard": "1"}.items())) not in samples


async def test_an_any_request_sent_on_to_another_shard_is_counted(runtimes, dead_address):
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 1})))
    head = await runtimes(Head("resend", METERED, connections={0: [dead_address], 1: [worker.server.address]}))
    for _ in range(2):  # turn by turn, shard 0 (dead) takes one of them
        assert not (await send(head.server.address, "/tag")).is_error
    assert sample(await scrape(head), "shardnet_head_requests_resent_total", deployment="resend") == 1


async def test_a_metrics_port_in_use_is_refused_naming_the_flag_and_nothing_stays_listening():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = ServerConfig(metrics_port=taken)
        with pytest.raises(ConfigurationError, match=f"--metrics-port {taken}: cannot listen on 127.0.0.1:{taken}"):
            check_can_listen(config)
        head = Head("busy", config)
        with pytest.raises(ConfigurationError, match=f"--metrics-port {taken}: cannot listen"):
            await head.start()
        try:
            assert head.server.metrics_address is None
            with socket.socket() as probe:  # the gRPC port bound before is let go too
                assert probe.connect_ex(("127.0.0.1", head.server.port)) != 0
        finally:
            await head.stop(0)


def test_the_cli_refuses_a_metrics_port_in_use_before_serving(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        assert cli_main(["head", "--deployment", "d", "--metrics-port", str(taken)]) == 2
    assert f"--metrics-port {taken}: cannot listen on 127.0.0.1:{taken}" in capsys.readouterr().err


def test_metrics_without_prometheus_client_are_refused_naming_the_extra(monkeypatch, capsys):
    """The library missing, as an import of it fails (sys.modules holding None for it), this test's alone."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "shardnet.runtimes.metrics")
    assert cli_main(["worker", "--uses", "executors:Tagger", "--metrics-port", "0"]) == 2
    assert "pip install 'shardnet[metrics]'" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match=r"--metrics-port needs prometheus-client.*shardnet\[metrics\]"):
        Head("no-library", ServerConfig(metrics_port=0))


def test_a_metrics_port_must_differ_from_the_others():
    with pytest.raises(ConfigurationError, match="must differ"):
        ServerConfig(port=5000, metrics_port=5000)
    with pytest.raises(ConfigurationError, match="outside 0..65535"):
        ServerConfig(metrics_port=70000)


async def test_without_a_metrics_port_nothing_listens_and_the_request_path_is_untouched(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create()))
    head = await runtimes(Head("plain", connections={0: [worker.server.address]}, max_in_flight=5))
    assert not (await send(head.server.address, "/tag")).is_error
    for runtime in (head, worker):
        assert runtime.metrics is None and runtime.server.metrics is None
        assert runtime.server.metrics_address is None
    # no wrapper in place: the methods a request runs through are the class's own
    assert not {"_serve", "_serve_admitted"} & set(vars(head)) and "_handle" not in vars(worker)


async def test_the_metrics_listener_closes_with_the_runtime(runtimes):
    head = Head("closing", METERED)
    await head.start()
    address = head.server.metrics_address
    host, port = address.rsplit(":", 1)
    await head.stop(0)
    with socket.socket() as probe:
        assert probe.connect_ex((host, int(port))) != 0


def test_endpoint_labels_are_capped_and_long_ones_folded():
    labels = EndpointLabels(limit=3)
    assert [labels(f"/e{n}") for n in range(5)] == ["/e0", "/e1", "/e2", OTHER, OTHER]
    assert labels("/e1") == "/e1"  # one seen keeps its label
    assert EndpointLabels()("/" + "x" * 300) == OTHER
