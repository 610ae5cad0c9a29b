"""Interoperability with the reference peer, Jina 3.34, run from its own virtual environment.

(a) a shardnet head in front of a real Jina executor process; (b) a Jina head
in front of a shardnet worker; (c) Jina's own connection pool calling a
shardnet worker. Jina is never imported here: it runs as child processes of
``.venv-jina`` (installed by ``scripts/test``), with JINA_OPTOUT_TELEMETRY set in
their environment only. Each test starts its own Jina process, waits for it
with a deadline, and kills it in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardnet import DataRequest, Document, PollingMap
from shardnet.cli.main import main as cli_main
from shardnet.networking import oneshot
from shardnet.protocol import ndarray, services
from shardnet.protocol.proto import docarray_pb2, jina_pb2
from shardnet.runtimes.head import Head
from shardnet.runtimes.worker import Worker
from shardnet.testing import free_port

import executors

pytestmark = pytest.mark.interop

JINA_VENV = Path(__file__).resolve().parents[1] / ".venv-jina"
JINA = JINA_VENV / "bin" / "jina"
JINA_PYTHON = JINA_VENV / "bin" / "python"
READY_TIMEOUT = 30.0

JINA_EXECUTOR = """
from jina import Executor, requests
from docarray import Document


class JinaTagger(Executor):
    @requests(on="/tag")
    def tag(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.tags["by"] = "jina"
            doc.text = doc.text + parameters.get("suffix", "")

    @requests(on="/search")
    def search(self, docs, **kwargs):
        for doc in docs:
            doc.matches.append(Document(id="jina-match", text="from jina"))

    @requests(on="/fail")
    def fail(self, docs, **kwargs):
        raise ValueError("jina refuses", 7)
"""

JINA_POOL_CLIENT = """
import asyncio, json, sys
from docarray import Document, DocumentArray
from jina.serve.networking import GrpcConnectionPool
from jina.types.request.data import DataRequest


async def send(pool, endpoint, texts, deployment="shardnet", head=False):
    request = DataRequest()
    request.header.exec_endpoint = endpoint
    request.data.docs = DocumentArray([Document(text=text) for text in texts])
    result = await pool.send_requests_once([request], deployment, head=head, endpoint=endpoint, timeout=10)
    if isinstance(result, BaseException):
        return {"exception": repr(result)}
    response, metadata = result
    status = response.header.status
    return {
        "request_id": response.header.request_id,
        "sent_request_id": request.header.request_id,
        "code": int(status.code),
        "exception": status.exception.name,
        "args": list(status.exception.args),
        "texts": [doc.text for doc in response.docs],
        "tags": [dict(doc.tags) for doc in response.docs],
        "routes": [route.executor for route in response.routes],
        "trailing": {key: value for key, value in (metadata or ())},
    }


async def main(worker, head):
    pool = GrpcConnectionPool(runtime_name="interop-client")
    pool.add_connection("shardnet", worker)
    pool.add_connection("shardnet-head", head, head=True)
    try:
        answers = {
            "tag": await send(pool, "/tag", ["one", "two"]),
            "fail": await send(pool, "/fail", ["x"]),
            "via_head": await send(pool, "/tag", ["three"], deployment="shardnet-head", head=True),
        }
        discovery = await pool.send_discover_endpoint("shardnet", head=False, timeout=10)
        answers["endpoints"] = list(discovery[0].endpoints) if isinstance(discovery, tuple) else repr(discovery)
    finally:
        await pool.close()
    print("RESULT " + json.dumps(answers), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture
def jina_peer() -> Path:
    """The ``jina`` command of the peer environment; a missing peer fails the test (it is never skipped)."""
    if not JINA.exists():
        pytest.fail(
            f"the Jina 3.34 peer is not installed ({JINA} does not exist): run .ci/run, "
            "which creates .venv-jina from scripts/jina-peer-requirements.txt"
        )
    return JINA


def jina_env() -> dict[str, str]:
    """The child's environment: ours plus the telemetry opt-out (this process's environment is not touched)."""
    return {**os.environ, "JINA_OPTOUT_TELEMETRY": "1"}


class JinaProcess:
    """One Jina child process in a session of its own, logging to a file; ``kill()`` ends its whole group."""

    def __init__(self, arguments: list[str], log: Path, cwd: Path):
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                arguments,
                cwd=cwd,
                env=jina_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def wait_serving(self, address: str, timeout: float = READY_TIMEOUT) -> None:
        """Poll gRPC health at ``address`` until SERVING; fail with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.popen.poll() is not None:
                    pytest.fail(f"Jina exited with {self.popen.returncode} before serving:\n{self.tail()}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"Jina did not serve on {address} within {timeout:g}s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # its own session: the group is Jina and its helpers only
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


async def jina_script(folder: Path, source: str, *arguments: str) -> dict:
    """Run ``source`` in the Jina environment (killed past the timeout); the JSON of its ``RESULT`` line."""
    script = folder / "jina_side.py"
    script.write_text(source)
    child = await asyncio.create_subprocess_exec(
        str(JINA_PYTHON), str(script), *arguments, cwd=folder, env=jina_env(),
        stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(child.communicate(), READY_TIMEOUT)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    text = output.decode(errors="replace")
    assert child.returncode == 0, text
    return json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


async def call(address: str, endpoint: str, docs, parameters=None) -> tuple[DataRequest, dict]:
    request = DataRequest(list(docs), endpoint=endpoint, parameters=parameters)
    response, trailing = await oneshot.call_once(
        "single_data", request, address, timeout=10, metadata=[(services.ENDPOINT_METADATA, endpoint)]
    )
    return response, dict(tuple(trailing))


async def test_shardnet_head_in_front_of_a_jina_executor(jina_peer, tmp_path, runtimes, capsys):
    (tmp_path / "jina_tagger.py").write_text(textwrap.dedent(JINA_EXECUTOR))
    port = free_port()
    executor = JinaProcess(
        [str(jina_peer), *"executor --native --uses JinaTagger --py-modules jina_tagger.py --host 127.0.0.1".split()]
        + ["--port", str(port)],
        tmp_path / "jina-executor.log",
        tmp_path,
    )
    try:
        jina_address = f"127.0.0.1:{port}"
        await executor.wait_serving(jina_address)
        # a healthy Jina server has no control service (no STATUS): shardnet status said it failed (exit 1)
        capsys.readouterr()
        assert await asyncio.to_thread(cli_main, ["status", jina_address]) == 0, capsys.readouterr().out
        assert "not a shardnet server" in capsys.readouterr().out
        head = await runtimes(
            Head(
                "jina-backed",
                polling=PollingMap.parse('{"/search": "ALL", "*": "ANY"}'),
                connections={0: [jina_address]},
            )
        )
        address = head.server.address

        response, _ = await call(address, "/tag", [Document(id="d1", text="hi")], {"suffix": "!"})
        assert not response.is_error, response.status
        assert response.docs.ids == ["d1"] and response.docs.texts == ["hi!"]
        assert response.docs[0].tags["by"] == "jina"
        assert response.parameters.get("suffix") == "!"
        assert len(response.routes) == 1  # Jina's worker appended its route entry

        # endpoint in the metadata only: the head must write it into the header, where a Jina worker looks
        bare = DataRequest([Document(id="m", text="meta")])
        routed, _ = await oneshot.call_once(
            "single_data", bare, address, timeout=10, metadata=[(services.ENDPOINT_METADATA, "/tag")]
        )
        assert routed.docs[0].tags["by"] == "jina" and routed.endpoint == "/tag"

        searched, trailing = await call(address, "/search", [Document(id="q")])
        assert not searched.is_error
        assert searched.docs[0].matches.ids == ["jina-match"]
        assert "__results__" not in searched.parameters  # one answer: passed on as a Jina head does (a review)
        assert trailing["total_shards"] == "1" and trailing["failed_shards"] == "0"

        failed, trailing = await call(address, "/fail", [Document()])
        assert failed.is_error
        assert failed.status.exception.name == "ValueError"
        assert list(failed.status.exception.args) == ["jina refuses", "7"]
        assert failed.status.exception.executor == "JinaTagger", failed.status
        assert any("jina refuses" in line for line in failed.status.exception.stacks)

        back, _ = await call(address, "/nothing-here", [Document(id="u", text="same")])
        assert not back.is_error and back.docs.ids == ["u"] and back.docs.texts == ["same"]

        endpoints, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), address, timeout=10)
        assert {"/tag", "/search", "/fail"} <= set(endpoints.endpoints)

        await _pickles_stop_at_the_head(address, tmp_path / "unpickled")
        again, _ = await call(address, "/tag", [Document(id="d2", text="still")])  # and serves on
        assert again.docs.texts == ["still"] and again.docs[0].tags["by"] == "jina"
    finally:
        executor.kill()


class _TouchOnUnpickle:
    """Unpickling this touches ``path``: proof that a Jina worker loaded what a client sent as docs_bytes."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


async def _pickles_stop_at_the_head(address: str, marker: Path) -> None:
    """docs_bytes sent through a shardnet head to a Jina worker, under ANY and ALL, one request and a list:
    the head refuses each (INVALID_ARGUMENT) and the worker never unpickles it."""
    import pickle  # only to build the hostile bytes, never to load any

    for endpoint in ("/tag", "/search"):  # ANY: bytes passed on untouched; ALL: decoded to merge
        message = DataRequest([Document()], endpoint=endpoint).proto
        message.data.docs_bytes = pickle.dumps(_TouchOnUnpickle(marker))
        raw = message.SerializeToString()
        async with grpc.aio.insecure_channel(address) as channel:
            for method, payload in (
                (services.PROCESS_SINGLE_DATA, raw),
                (services.PROCESS_DATA, jina_pb2.DataRequestListEnvelope(requests=[raw]).SerializeToString()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary(method)(
                        payload, timeout=10, metadata=((services.ENDPOINT_METADATA, endpoint),)
                    )
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
                assert "docs_bytes" in refused.value.details()
    assert not marker.exists(), "the Jina worker unpickled a client's docs_bytes"


async def test_jina_head_in_front_of_a_shardnet_worker(jina_peer, tmp_path, runtimes):
    worker = await runtimes(Worker(executors.Tagger.create(label="shardnet")))
    port = free_port()
    head = JinaProcess(
        [str(jina_peer), *"executor --native --runtime-cls HeadRuntime --polling ANY --host 127.0.0.1".split()]
        + ["--port", str(port), "--connection-list", json.dumps({"0": [worker.server.address]})],
        tmp_path / "jina-head.log",
        tmp_path,
    )
    try:
        address = f"127.0.0.1:{port}"
        await head.wait_serving(address)
        response, _ = await call(address, "/tag", [Document(id="a", text="x")], {"suffix": "?"})
        assert not response.is_error, response.status
        assert response.docs.ids == ["a"] and response.docs.texts == ["x?"]
        assert response.docs[0].tags["by"] == "shardnet"
        assert "Tagger" in [route.executor for route in response.routes]

        failed, _ = await call(address, "/fail", [Document()])
        assert failed.is_error and failed.status.exception.name == "ValueError"
        assert list(failed.status.exception.args) == ["bad input", "42"]
        assert worker.executor.calls == 1

        counted, _ = await call(address, "/count", [Document(id="c", text="y")])  # a dict result, through Jina's head
        assert not counted.is_error, counted.status
        assert counted.parameters["__results__"] == {"Tagger": {"docs": 1.0, "shard": 0.0}}
        assert counted.docs.texts == ["y"]
    finally:
        head.kill()


async def test_jina_head_polling_all_gathers_the_dict_results_of_shardnet_shards(jina_peer, tmp_path, runtimes):
    shards = [
        await runtimes(Worker(executors.Tagger.create({"shard_id": shard}), name=f"tags/shard-{shard}/rep-0"))
        for shard in range(2)
    ]
    port = free_port()
    head = JinaProcess(
        [str(jina_peer), *"executor --native --runtime-cls HeadRuntime --polling ALL --host 127.0.0.1".split()]
        + ["--port", str(port), "--connection-list", json.dumps({str(i): [w.server.address] for i, w in enumerate(shards)})],
        tmp_path / "jina-head-all.log",
        tmp_path,
    )
    try:
        address = f"127.0.0.1:{port}"
        await head.wait_serving(address)
        response, _ = await call(address, "/count", [Document(id="c", text="y")])
        assert not response.is_error, response.status
        assert response.parameters["__results__"] == {
            "tags/shard-0/rep-0": {"docs": 1.0, "shard": 0.0},
            "tags/shard-1/rep-0": {"docs": 1.0, "shard": 1.0},
        }
    finally:
        head.kill()


async def test_jina_connection_pool_calls_a_shardnet_worker_and_head(jina_peer, tmp_path, runtimes):
    worker = await runtimes(Worker(executors.Tagger.create(label="shardnet")))
    head = await runtimes(Head("tagging", connections={0: [worker.server.address]}))
    result = await jina_script(tmp_path, textwrap.dedent(JINA_POOL_CLIENT), worker.server.address, head.server.address)

    tag = result["tag"]
    assert tag["code"] == 0 and tag["request_id"] == tag["sent_request_id"]
    assert tag["texts"] == ["one", "two"] and [t["by"] for t in tag["tags"]] == ["shardnet", "shardnet"]
    assert tag["routes"][-1] == "Tagger"

    fail = result["fail"]
    assert fail["code"] == 1 and fail["exception"] == "ValueError" and fail["args"] == ["bad input", "42"]
    assert fail["trailing"].get("is-error") == "true"

    via_head = result["via_head"]
    assert via_head["code"] == 0 and via_head["texts"] == ["three"] and via_head["tags"][0]["by"] == "shardnet"
    assert worker.executor.calls == 2

    assert {"/tag", "/fail"} <= set(result["endpoints"])


JINA_CLIENT = """
import json, sys
from docarray import Document, DocumentArray
from jina import Client

results = {}
for name, address in (("worker", sys.argv[1]), ("head", sys.argv[2])):
    host, port = address.rsplit(":", 1)
    client = Client(host=host, port=int(port))
    docs = client.post("/tag", DocumentArray([Document(text=str(n)) for n in range(5)]), request_size=2,
                       parameters={"suffix": "!"})
    results[name] = {"texts": [doc.text for doc in docs], "by": [doc.tags.get("by") for doc in docs],
                     "ready": client.is_flow_ready()}
host, port = sys.argv[3].rsplit(":", 1)
results["empty_head_ready"] = Client(host=host, port=int(port)).is_flow_ready()
print("RESULT " + json.dumps(results), flush=True)
"""


async def test_jinas_client_posts_to_a_shardnet_worker_and_head(jina_peer, tmp_path, runtimes):
    """jina.Client talks jina.JinaRPC/Call to whatever it is pointed at (a gateway, or an executor or head)."""
    worker = await runtimes(Worker(executors.Tagger.create(label="shardnet")))
    head = await runtimes(Head("tagging", connections={0: [worker.server.address]}))
    empty = await runtimes(Head("empty", shards=1))  # no worker: not ready
    result = await jina_script(
        tmp_path, textwrap.dedent(JINA_CLIENT), worker.server.address, head.server.address, empty.server.address
    )
    for name in ("worker", "head"):
        assert result[name]["texts"] == [f"{n}!" for n in range(5)], result  # 3 requests of at most 2, in order
        assert result[name]["by"] == ["shardnet"] * 5, result
        assert result[name]["ready"] is True, result  # Client.is_flow_ready(): jina.JinaGatewayDryRunRPC
    assert result["empty_head_ready"] is False
    assert worker.executor.calls == 6  # the readiness checks ran no handler


JINA_PLAIN_TENSORS = """
import json, sys
import numpy as np
from docarray import Document, DocumentArray
from jina import Client

sent = {"str": np.array(["a", "bc"]), "bytes": np.array([b"a", b"bc"]),
        "datetime64": np.array(["2020-01-01", "NaT"], dtype="datetime64[D]"),
        "timedelta64": np.array([[1, -2]], dtype="timedelta64[ms]")}
host, port = sys.argv[1].rsplit(":", 1)
docs = DocumentArray([Document(id=name, tensor=array) for name, array in sent.items()])
docs.append(Document(id="words", text="to be or not"))
answer = Client(host=host, port=int(port)).post("/echo", docs)
back = {doc.id: doc for doc in answer}
print("RESULT " + json.dumps({
    "same": {name: back[name].tensor.dtype == array.dtype
                   and bool(np.array_equal(back[name].tensor, array, equal_nan=name == "datetime64"))
             for name, array in sent.items()},
    "read": {doc.id: doc.tags["dtype"] for doc in answer},
    "words": [np.asarray(back["words"].tensor).dtype.str, np.asarray(back["words"].tensor).tolist()],
}), flush=True)
"""


async def test_string_bytes_and_datetime_tensors_cross_between_jina_and_a_shardnet_handler(
    jina_peer, tmp_path, runtimes
):
    """docarray sends them as plain buffers: a shardnet handler reads them, writes them back (and writes a tensor of
    strings), and Jina's client reads what it wrote."""
    worker = await runtimes(Worker(executors.Arrays.create()))
    result = await jina_script(tmp_path, JINA_PLAIN_TENSORS, worker.server.address)
    assert result["read"] == {
        "str": "<U2", "bytes": "|S2", "datetime64": "<M8[D]", "timedelta64": "<m8[ms]", "words": "<U3"
    }, result
    assert result["same"] == {"str": True, "bytes": True, "datetime64": True, "timedelta64": True}, result
    assert result["words"] == ["<U3", ["to", "be", "or", "not"]], result


DOCARRAY_SPARSE = """
import json, sys
import numpy as np
from docarray.proto.docarray_pb2 import NdArrayProto
from docarray.proto.io.ndarray import _set_torch_sparse, read_ndarray

ours = NdArrayProto()
ours.ParseFromString(bytes.fromhex(sys.argv[1]))
read = read_ndarray(ours)  # a scipy matrix when labelled as one; None when docarray does not know the label


class TorchSparse:  # what docarray's torch writer reads of a torch sparse tensor: indices are (ndim, nnz)
    def coalesce(self):
        return self
    def indices(self):
        return type("T", (), {"numpy": lambda _: np.array([[0, 1, 2], [2, 3, 0]])})()
    def values(self):
        return type("T", (), {"numpy": lambda _: np.array([5.0, 7.0, 9.0])})()
    def size(self):
        return (3, 4)


theirs = NdArrayProto()
_set_torch_sparse(theirs, TorchSparse())
print("RESULT " + json.dumps({"read": None if read is None else read.toarray().tolist(),
                              "torch": theirs.SerializeToString().hex()}), flush=True)
"""


async def test_sparse_tensors_cross_to_docarray_and_back(jina_peer, tmp_path):
    """A sparse matrix we write is one docarray reads (scipy's coo); torch's (ndim, nnz) layout reads right here."""
    ours = docarray_pb2.NdArrayProto()
    ndarray.write_sparse(np.array([[0, 1], [2, 0]]), np.array([5.0, 7.0]), (3, 2), ours)
    result = await jina_script(tmp_path, DOCARRAY_SPARSE, ours.SerializeToString().hex())
    assert result["read"] == [[0, 5.0], [0, 0], [7.0, 0]]
    theirs = docarray_pb2.NdArrayProto()
    theirs.ParseFromString(bytes.fromhex(result["torch"]))
    expected = np.zeros((3, 4))
    expected[0, 2], expected[1, 3], expected[2, 0] = 5.0, 7.0, 9.0
    np.testing.assert_array_equal(ndarray.from_proto(theirs), expected)


async def test_a_shardnet_head_merges_all_answers_as_a_jina_head_does(jina_peer, tmp_path, runtimes):
    # the same two shards behind a Jina 3.34 head and a shardnet head, polling ALL: shard 0 echoes the query
    # with its text, shard 1 also sets its tensor, embedding and uri, and tags a hit both return; a Jina head
    # keeps what shard 1 found (docarray's reduce), and so must a shardnet head
    shards = [
        await runtimes(Worker(executors.Fetcher.create({"shard_id": shard}), name=f"store/shard-{shard}/rep-0"))
        for shard in range(2)
    ]
    connections = {shard: [worker.server.address] for shard, worker in enumerate(shards)}
    port = free_port()
    jina_head = JinaProcess(
        [str(jina_peer), *"executor --native --runtime-cls HeadRuntime --polling ALL --host 127.0.0.1".split()]
        + ["--port", str(port), "--connection-list", json.dumps({str(s): a for s, a in connections.items()})],
        tmp_path / "jina-head-merge.log",
        tmp_path,
    )
    try:
        await jina_head.wait_serving(f"127.0.0.1:{port}")
        ours = await runtimes(Head("store", polling=PollingMap.parse("ALL"), connections=connections))
        answers = {}
        for name, address in (("jina", f"127.0.0.1:{port}"), ("shardnet", ours.server.address)):
            response, _ = await call(address, "/fetch", [Document(id="img-7", text="find img-7")])
            assert not response.is_error, (name, response.status)
            [query] = response.docs
            answers[name] = {
                "content": query.proto.WhichOneof("content"),
                "tensor": None if query.tensor is None else query.tensor.tolist(),
                "embedding": None if query.embedding is None else query.embedding.tolist(),
                "uri": query.proto.uri,
                "hits": query.matches.ids,
                "shared hit tags": dict(query.matches[query.matches.ids.index("shared-hit")].tags),
            }
        assert answers["shardnet"] == answers["jina"], answers
        assert answers["jina"]["content"] == "tensor" and answers["jina"]["uri"] == "found-by-1"
    finally:
        jina_head.kill()
