"""Prometheus metrics (--metrics-port): in-process heads and workers on free loopback ports, scraped over real
HTTP with urllib, read back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import urllib.request

import executors
import grpc
import pytest
import trustme
from google.protobuf import empty_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shardnet import ConfigurationError, DataRequest, Document, ReplicaError
from shardnet.cli.main import main as cli_main
from shardnet.networking import oneshot
from shardnet.networking.addresses import entity_address
from shardnet.runtimes.head import Head
from shardnet.networking.tls import ServerTls
from shardnet.protocol import services
from shardnet.runtimes import server as server_module
from shardnet.runtimes.metrics import MAX_ENDPOINT_LABELS, MetricsListener, OTHER, UNBOUND_LABEL, UNREADABLE_LABEL
from shardnet.runtimes import listening
from shardnet.runtimes.listening import check_can_listen
from shardnet.runtimes.server import ServerConfig
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


async def counted(runtime, requests: int) -> dict[tuple[str, frozenset], float]:
    """The samples once ``requests`` requests are counted in all (a head counts one of an endpoint it has not
    learned once its workers said which they serve: a moment after it answered)."""
    prefix = "shardnet_head" if isinstance(runtime, Head) else "shardnet_worker"
    samples: dict = {}

    async def all_counted() -> bool:
        samples.update(await scrape(runtime))
        return sum(value for (name, _), value in samples.items() if name == f"{prefix}_requests_total") == requests

    await eventually(all_counted)
    return samples


async def send(address: str, endpoint: str) -> DataRequest:
    return await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint=endpoint), address, timeout=10)


async def test_head_and_worker_count_and_time_requests_by_endpoint_and_outcome(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 0}), METERED, name="tags/shard-0/rep-0"))
    head = await runtimes(Head("tags", METERED, connections={0: [worker.server.address]}))
    for endpoint in ("/tag", "/tag", "/fail", "/unknown"):
        await send(head.server.address, endpoint)

    at_head = await counted(head, 4)
    # an endpoint the workers do not list has no label of its own (the caller chose it)
    for endpoint, outcome, count in (("/tag", "ok", 2), ("/fail", "error", 1), (OTHER, "ok", 1)):
        assert sample(at_head, "shardnet_head_requests_total", deployment="tags", endpoint=endpoint,
                      outcome=outcome) == count
        assert sample(at_head, "shardnet_head_request_duration_seconds_count", deployment="tags",
                      endpoint=endpoint) == count
    assert sample(at_head, "shardnet_head_request_duration_seconds_bucket", deployment="tags", endpoint="/tag",
                  le="+Inf") == 2
    for past_ten_seconds in ("30.0", "60.0", "120.0"):  # a model's batch or an overload's queue: not all in +Inf
        assert sample(at_head, "shardnet_head_request_duration_seconds_bucket", deployment="tags", endpoint="/tag",
                      le=past_ten_seconds) == 2
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
    for endpoint, outcome, count in (("/tag", "ok", 2), ("/fail", "error", 1), (UNBOUND_LABEL, "unbound", 1)):
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
    samples = await counted(head, 2)
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


def test_a_metrics_port_taken_on_ipv6_only_is_refused_before_the_executor_loads_naming_the_family(
    tmp_path, monkeypatch, capsys
):
    """The metrics listener binds a wildcard host on both families ([::], dual-stack), but the check before the
    Executor loads probed only what 0.0.0.0 resolves to (IPv4): a port taken on IPv6 alone passed it, and was
    refused after the load, blamed on 0.0.0.0 (a regression review's find). The check binds what the listener
    binds, and the refusal names the family that has the port."""
    with socket.socket(socket.AF_INET6) as holder:
        holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        holder.bind(("::", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        monkeypatch.chdir(tmp_path)  # where MarksItsStart leaves its mark once constructed
        code = cli_main(["worker", "--uses", f"{executors.__file__}:MarksItsStart", "--host", "0.0.0.0", "--port",
                         "0", "--metrics-port", str(taken)])
    assert code == 2
    assert (f"--metrics-port {taken}: cannot listen on 0.0.0.0:{taken}: Address already in use on IPv6 "
            f"([::]:{taken})") in capsys.readouterr().err
    assert not (tmp_path / "started.mark").exists(), "the Executor was loaded before the port was checked"


class _NoIPv6Socket(socket.socket):
    """A socket of a machine without IPv6 (``ipv6.disable=1``): the family is refused as the kernel refuses it."""

    def __init__(self, family: int = socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        super().__init__(family, *args, **kwargs)


def test_without_ipv6_a_host_of_ipv6_is_refused_naming_it_and_the_host_flag_not_a_traceback(monkeypatch, capsys):
    """On a machine without IPv6, --host :: crashed the check before the load with a traceback (the probe's
    socket was made outside its try: OSError EAFNOSUPPORT; a regression review's find)."""
    monkeypatch.setattr(socket, "socket", _NoIPv6Socket)
    assert cli_main(["worker", "--uses", f"{executors.__file__}:Tagger", "--host", "::", "--port", "0",
                     "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on [::]:0: this machine has no IPv6" in err and "--host 0.0.0.0" in err, err
    assert "Traceback" not in err, err
    with pytest.raises(ConfigurationError, match=r"cannot listen on \[::\]:0: this machine has no IPv6"):
        listening._check_metrics_port_free("::", 0)  # what the listener binds: wildcard_socket's rule


async def test_without_ipv6_a_metrics_listener_on_an_ipv6_host_is_refused_naming_the_flag(monkeypatch):
    """MetricsListener.start("::", 0) raised IndexError there: asyncio skips a family the machine lacks, and
    nothing was bound (a regression review's find). 0.0.0.0 still serves, on IPv4."""
    monkeypatch.setattr(socket, "socket", _NoIPv6Socket)
    for host in ("::", "::1"):  # the wildcard (wildcard_socket's rule) and any other (what asyncio skipped)
        listener = MetricsListener(CollectorRegistry())
        refused = r"--metrics-port 0: cannot listen on \[::1?\]:0: this machine has no IPv6"
        with pytest.raises(ConfigurationError, match=refused):
            await listener.start(host, 0)
    listener = MetricsListener(CollectorRegistry())
    try:
        assert await listener.start("0.0.0.0", 0) > 0
    finally:
        await listener.stop()


async def test_the_metrics_listener_closes_connections_past_its_cap_and_idle_ones(eventually):
    """A metrics review's find: connections that sent nothing (or half a request) stayed open for an hour each,
    1,100 of them took a head's 1,024 file descriptors, and with them new gRPC connections. Past the cap one is
    closed as it opens; an idle one once its time is up, and a scrape gets through again."""
    listener = MetricsListener(CollectorRegistry(), max_connections=2, idle_seconds=0.5)
    port = await listener.start("127.0.0.1", 0)
    held = []
    try:
        for _ in range(2):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        held[1][1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request: its headers never end
        refused_reader, refused_writer = await asyncio.open_connection("127.0.0.1", port)
        held.append((refused_reader, refused_writer))
        assert await asyncio.wait_for(refused_reader.read(), 5) == b""  # closed as it opened
        for reader, _ in held[:2]:
            await asyncio.wait_for(reader.read(), 5)  # read to its end: closed for idling
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        held.append((reader, writer))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in held:
            writer.close()
        await listener.stop()


async def test_a_stop_is_not_held_by_a_request_body_still_coming():
    """A regression review's find: one client sending a request's body slowly held a worker's exit 10 s (aiohttp
    reads what is left of a body that long); a stop waits a second for the listener's connections."""
    listener = MetricsListener(CollectorRegistry())
    port = await listener.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        assert b" 200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)  # answered, its body unread
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(listener.stop(), 5)  # 10 s before
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        writer.close()


async def test_requests_the_metrics_listener_cannot_read_are_said_once_a_burst_not_a_traceback_each(caplog):
    """A metrics review's find: each malformed request wrote aiohttp's traceback at ERROR (200 bad requests:
    1,800 lines in half a second, from anyone the port lets in)."""
    listener = MetricsListener(CollectorRegistry())
    port = await listener.start("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.1\r\nBad Header\x01: x\r\n\r\n")
                assert b" 400 Bad Request" in await asyncio.wait_for(reader.read(), 5)
                writer.close()
    finally:
        await listener.stop()  # says what the burst held
    lines = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.levelname for record in lines] == ["WARNING", "WARNING"], caplog.text
    assert "metrics listener: a request from 127.0.0.1 not read: BadHttpMessage" in lines[0].getMessage()
    assert "metrics listener: 19 more requests not read within" in lines[1].getMessage()
    assert "Traceback" not in caplog.text


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


async def test_endpoints_a_caller_makes_up_take_no_label_from_those_the_deployment_serves(runtimes):
    """A review: 100 junk endpoints, first, had every real one counted "other" for the process's life."""
    worker = await runtimes(Worker(executors.Tagger.create(), METERED))
    head = await runtimes(Head("junk", METERED, connections={0: [worker.server.address]}))
    junk = [f"/junk{n}" for n in range(MAX_ENDPOINT_LABELS + 1)] + ["(other)", "(unbound)"]
    await asyncio.gather(*(send(head.server.address, endpoint) for endpoint in junk))
    for _ in range(2):
        assert not (await send(head.server.address, "/tag")).is_error
    at_head, at_worker = await counted(head, len(junk) + 2), await counted(worker, len(junk) + 2)
    assert sample(at_head, "shardnet_head_requests_total", deployment="junk", endpoint="/tag", outcome="ok") == 2
    assert sample(at_head, "shardnet_head_requests_total", deployment="junk", endpoint=OTHER, outcome="ok") == len(junk)
    shard = {"deployment": "Tagger", "shard": "0"}
    assert sample(at_worker, "shardnet_worker_requests_total", endpoint="/tag", outcome="ok", **shard) == 2
    assert sample(at_worker, "shardnet_worker_requests_total", endpoint=UNBOUND_LABEL, outcome="unbound",
                  **shard) == len(junk)
    for samples in (at_head, at_worker):
        assert {dict(labels)["endpoint"] for name, labels in samples if name.endswith("_requests_total")} <= {
            "/tag", OTHER, UNBOUND_LABEL,
        }


async def test_a_worker_with_a_default_handler_counts_what_it_took_as_default(runtimes):
    worker = await runtimes(Worker(executors.NamedDefault.create(), METERED))
    for endpoint in ("/other", "/anything", "/default"):
        assert not (await send(worker.server.address, endpoint)).is_error
    samples = await scrape(worker)
    shard = {"deployment": "NamedDefault", "shard": "0"}
    assert sample(samples, "shardnet_worker_requests_total", endpoint="/other", outcome="ok", **shard) == 1
    assert sample(samples, "shardnet_worker_requests_total", endpoint="/default", outcome="ok", **shard) == 2


async def test_unreadable_requests_are_counted_apart_single_or_listed(runtimes):
    """A review: at the head one was counted under /default and a list not at all, at the worker as "other"."""
    worker = await runtimes(Worker(executors.Tagger.create(), METERED))
    head = await runtimes(Head("garbage", METERED, connections={0: [worker.server.address]}))
    for runtime in (head, worker):
        async with grpc.aio.insecure_channel(runtime.server.address) as channel:
            for method in (services.PROCESS_SINGLE_DATA, services.PROCESS_DATA):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary(method)(b"\xff\xff\xff garbage", timeout=5)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    at_head, at_worker = await counted(head, 2), await counted(worker, 2)
    assert sample(at_head, "shardnet_head_requests_total", deployment="garbage", endpoint=UNREADABLE_LABEL,
                  outcome="error") == 2
    assert sample(at_worker, "shardnet_worker_requests_total", deployment="Tagger", shard="0",
                  endpoint=UNREADABLE_LABEL, outcome="error") == 2


async def test_readiness_checks_are_counted_apart_from_requests(runtimes):
    """Jina's gateway asks with data requests to _jina_dry_run_, its Client with the dry_run RPC: no work."""
    worker = await runtimes(Worker(executors.Tagger.create(), METERED))
    head = await runtimes(Head("ready", METERED, connections={0: [worker.server.address]}))
    for _ in range(2):
        await send(head.server.address, "_jina_dry_run_")
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        await channel.unary_unary(services.DRY_RUN)(b"", timeout=5)
    at_head, at_worker = await scrape(head), await scrape(worker)
    assert not any(name.endswith(("_requests_total", "_duration_seconds_count")) for name, _ in [*at_head, *at_worker])
    assert sample(at_head, "shardnet_head_dry_runs_total", deployment="ready") == 2
    assert sample(at_worker, "shardnet_worker_dry_runs_total", deployment="Tagger", shard="0") == 3


async def test_a_stream_of_requests_through_a_metered_head_counts_each_answer_as_it_was(runtimes):
    """JinaRPC/Call: one context serves the stream; an ERROR answer's trailer must not mark the next one."""
    worker = await runtimes(Worker(executors.Tagger.create(), METERED))
    head = await runtimes(Head("stream", METERED, connections={0: [worker.server.address]}))
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        call = channel.stream_stream(services.STREAM_CALL)
        payloads = [DataRequest([Document()], endpoint=endpoint).to_bytes() for endpoint in ("/fail", "/tag") * 2]
        assert len([answer async for answer in call(iter(payloads), timeout=5)]) == 4
    samples = await counted(head, 4)
    for outcome in ("ok", "error"):
        assert sample(samples, "shardnet_head_requests_total", deployment="stream", endpoint="/tag" if outcome == "ok"
                      else "/fail", outcome=outcome) == 2


def test_without_metrics_a_streamed_request_context_is_the_one_it_was():
    """The metrics keep a request's trailer in a context of their own: the stream's context is untouched."""
    assert not {"set_trailing_metadata", "trailing_metadata"} & set(vars(server_module._OneRequestOfAStream))


async def test_a_tls_server_warns_that_its_metrics_are_plain_http(runtimes, caplog):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    tls = ServerTls(certificate_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
                    private_key=cert.private_key_pem.bytes(), client_ca=ca.cert_pem.bytes())
    caplog.set_level("WARNING", logger="shardnet")
    head = await runtimes(Head("secret", ServerConfig(metrics_port=0, tls=tls)))
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("plain HTTP" in message and head.server.metrics_address in message and "--tls-client-ca" in message
               for message in warned), warned
    caplog.clear()
    await runtimes(Head("plain", METERED))
    assert not any("plain HTTP" in record.getMessage() for record in caplog.records)


def _connects(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.settimeout(5)
        return probe.connect_ex((host, port)) == 0


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
async def test_a_wildcard_host_serves_metrics_over_both_families_as_grpc_and_health_are(runtimes, wildcard):
    """Pods bind 0.0.0.0, which gRPC binds dual-stack: the metrics port is bound by the same rule, so a scrape
    of an IPv6 pod address is answered as its probes are (needs an IPv6 loopback, which the test checks first)."""
    assert socket.has_ipv6 and _connects_at_all_over_ipv6_loopback()
    head = await runtimes(Head("both", ServerConfig(host=wildcard, port=0, health_port=0, metrics_port=0)))
    server = head.server
    for loopback in ("127.0.0.1", "::1"):
        assert [_connects(loopback, port) for port in (server.port, server.health_port)] == [True, True], loopback
        url = f"http://{entity_address(loopback, server.metrics_port)}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "shardnet_head_requests_in_flight" in text, loopback


def _connects_at_all_over_ipv6_loopback() -> bool:
    """Whether this machine has an IPv6 loopback to test over (a listener of its own on ::1, dialled)."""
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        return _connects("::1", listener.getsockname()[1])


# -- a metrics review: discovery failovers, hops labelled as shard 0, requests ending right after a learn --


async def test_endpoint_discovery_is_not_counted_as_a_data_request_retry(runtimes, dead_address):
    """shardnet_head_retries_total counts "attempts sent again to another replica (failovers)" of requests; a
    monitor's endpoint discovery (`shardnet status`, a gateway's) through a head with a dead replica is no
    request, and must not show as retries of one, nor spend the retry budget data requests need."""
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 0}), METERED, name="tags/shard-0/rep-0"))
    head = await runtimes(Head("tags", METERED, connections={0: [worker.server.address, dead_address]}))
    for _ in range(10):  # as `shardnet status` asks, every few seconds
        await oneshot.call_once("discovery", empty_pb2.Empty(), head.server.address, timeout=5)
    at_head = await scrape(head)
    assert sample(at_head, "shardnet_head_retries_total", deployment="tags") == 0


async def test_a_uses_before_is_not_counted_as_shard_0_of_its_deployment(runtimes):
    """Deployment names a uses_before 'idx/uses_before-0' and `k8s render` 'idx/uses-before': its requests must
    not land in the very series of shard 0's workers (`sum by (deployment, shard)` would add them up)."""
    shard_worker = await runtimes(Worker(executors.CountingBefore.create({}), METERED, name="idx/shard-0/rep-0"))
    hops = [
        await runtimes(Worker(executors.CountingBefore.create({}), METERED, name=name))
        for name in ("idx/uses_before-0", "idx/uses-after")
    ]
    label_sets = []
    for worker in (shard_worker, *hops):
        await send(worker.server.address, "/x")
        label_sets.append({
            labels for (name, labels), _ in (await scrape(worker)).items() if name == "shardnet_worker_requests_total"
        })
    assert label_sets[0].isdisjoint(label_sets[1]) and label_sets[0].isdisjoint(label_sets[2]), label_sets


async def test_an_endpoint_served_is_labelled_as_such_even_right_after_a_learn_that_missed_it(runtimes):
    """A head whose first request came before its workers (a fresh deployment, a gateway's first request) learns
    no endpoint then; the requests of a served endpoint that end in the next second must still be counted under
    it (README: the requests ending while the workers are asked are counted once they answered), not (other)."""
    head = await runtimes(Head("tags", METERED, connections={}))
    try:
        await send(head.server.address, "/tag")  # no worker yet: UNAVAILABLE, and the head learns nothing
    except Exception:  # noqa: BLE001
        pass
    await asyncio.sleep(0.2)  # that learn has ended
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 0}), METERED, name="tags/shard-0/rep-0"))
    head.pool.add_connection("tags", worker.server.address, shard_id=0)
    for _ in range(3):
        await send(head.server.address, "/tag")
    await asyncio.sleep(1.5)
    at_head = await scrape(head)
    served = {
        dict(labels)["endpoint"]: value for (name, labels), value in at_head.items()
        if name == "shardnet_head_requests_total" and dict(labels)["outcome"] == "ok"
    }
    assert served == {"/tag": 3}, served


async def test_an_endpoint_that_can_have_no_label_is_counted_other_at_once_not_held_for_the_workers_list(runtimes):
    """An endpoint a head can never label (past MAX_ENDPOINT_LABEL_CHARS, or without a leading "/") is counted
    OTHER when its request ends: held until the workers' list came back (a second and more), a caller's header
    naming endpoints of a megabyte each kept those megabytes after their answers, past --max-in-flight."""
    worker = await runtimes(Worker(executors.Tagger.create({"shard_id": 0}), METERED, name="tags/shard-0/rep-0"))
    head = await runtimes(Head("tags", METERED, connections={0: [worker.server.address]}))
    for index in range(3):
        request = DataRequest([Document(text="x")], endpoint=f"/{index}-" + "y" * 100_000)  # the header names it
        await oneshot.send_request_async(request, head.server.address, endpoint="/tag", timeout=10)
    assert head.metrics._waiting == [], f"{sum(len(held[0]) for held in head.metrics._waiting)} characters held"
    at_head = await scrape(head)
    assert sample(at_head, "shardnet_head_requests_total", deployment="tags", endpoint=OTHER, outcome="ok") == 3
