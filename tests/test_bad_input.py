"""Bad input of every kind gets a clear error, and nothing dies.

A worker and a head run as processes (the worker's messages are capped at
1 MiB, the head's at 4 MiB; the head needs a control token). Raw gRPC calls
send them bytes: hypothesis-made garbage, truncated messages, messages of the
wrong type on each method, pickled ``docs_bytes``, huge and empty requests,
odd endpoints, ACTIVATEs naming bad addresses. Every answer is either a
well-formed reply or a non-OK status with a readable message, and both
processes keep serving with the head's membership unchanged. Bad command
lines and bad configuration objects fail with a message saying what is wrong.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import empty_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import _varint

from shardnet import ControlRequest, DataRequest, Document
from shardnet.cli.head import parse_connections
from shardnet.errors import ConfigurationError, ProtocolError
from shardnet.networking import oneshot
from shardnet.networking.addresses import parse_address
from shardnet.networking.channels import default_grpc_options
from shardnet.networking.policies import EjectionPolicy, RetryBudget, RetryPolicy
from shardnet.networking.polling import PollingMap, PollingType
from shardnet.networking.pool import GrpcConnectionPool
from shardnet.networking.replica_list import ReplicaList
from shardnet.networking.tls import ClientTls, ServerTls
from shardnet.protocol import services
from shardnet.protocol.proto import jina_pb2
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.head import Head
from shardnet.runtimes.processes import ShardnetProcess, stop_all
from shardnet.runtimes.server import ServerConfig
from shardnet.testing import EchoServer

pytestmark = pytest.mark.timeout(90)

EXECUTOR = f"{Path(__file__).resolve().parent.parent / 'benchmarks' / '_fault_executor.py'}:FaultExecutor"
TOKEN = "bad-input-token"
METHODS = [services.PROCESS_SINGLE_DATA, services.PROCESS_DATA, services.PROCESS_CONTROL, services.ENDPOINT_DISCOVERY]
REPLY_TYPES = {
    services.PROCESS_SINGLE_DATA: jina_pb2.DataRequestProto,
    services.PROCESS_DATA: jina_pb2.DataRequestProto,
    services.PROCESS_CONTROL: jina_pb2.ControlRequestProto,
    services.ENDPOINT_DISCOVERY: jina_pb2.EndpointsProto,
}
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Servers:
    """The worker and head processes, a raw channel to each, and the head's expected membership."""

    def __init__(self, folder: Path):
        env = {**os.environ, "SHARDNET_CONTROL_TOKEN": TOKEN}
        self.worker = ShardnetProcess(
            "worker",
            ["worker", "--uses", EXECUTOR, "--workspace", str(folder), "--max-message-mb", "1"],
            folder / "worker.log",
        )
        self.head = ShardnetProcess("head", [], folder / "head.log", env=env)
        self.channels: dict[str, grpc.Channel] = {}

    def start(self) -> "Servers":
        worker_address = self.worker.launch().wait_ready()
        self.head.arguments = ["head", "--deployment", "bad", "--shards", "1", "--max-message-mb", "4",
                               "--connection", f"0={worker_address}"]
        self.head.launch().wait_ready()
        for name, process in (("worker", self.worker), ("head", self.head)):
            self.channels[name] = grpc.insecure_channel(process.address, options=default_grpc_options())
        self.members = self.status()
        assert self.members == [worker_address]
        return self

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        stop_all([self.head, self.worker])

    def call(self, server: str, method: str, payload: bytes, metadata=(), timeout: float = 10.0):
        """(status code, details, reply bytes) of one raw call."""
        try:
            reply = self.channels[server].unary_unary(method)(payload, metadata=metadata, timeout=timeout)
            return grpc.StatusCode.OK, "", reply
        except grpc.RpcError as error:
            return error.code(), error.details() or "", b""

    def status(self) -> list[str]:
        code, details, reply = self.call("head", services.PROCESS_CONTROL, ControlRequest("STATUS").to_bytes())
        assert code == grpc.StatusCode.OK, details
        return sorted(f"{e.address}:{e.port}" for e in jina_pb2.ControlRequestProto.FromString(reply).related_entities)

    def assert_healthy(self) -> None:
        """Both processes alive, both answer a good request, the head's membership as it was."""
        assert self.worker.alive and self.head.alive, (self.worker.tail(), self.head.tail())
        for server in ("worker", "head"):
            request = DataRequest(docs=[Document(id="still-there")], endpoint="/any")
            code, details, reply = self.call(server, services.PROCESS_SINGLE_DATA, request.to_bytes())
            assert code == grpc.StatusCode.OK, details
            assert DataRequest.from_bytes(reply).docs[0].id == "still-there"
        assert self.status() == self.members


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    servers = Servers(tmp_path_factory.mktemp("bad-input"))
    try:
        yield servers.start()
    finally:
        servers.stop()


def assert_clear(code: grpc.StatusCode, details: str, reply: bytes, method: str, *, refused: bool = False) -> None:
    """A well-formed reply of the method's type, or a non-OK status with a readable message."""
    if code == grpc.StatusCode.OK and not refused:
        REPLY_TYPES[method].FromString(reply)
        return
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED), (code, details)
    assert len(details) > 10 and details.isprintable(), details


# -- garbage and truncated messages -------------------------------------------------------------------


@pytest.mark.parametrize("server", ["worker", "head"])
@pytest.mark.parametrize("method", METHODS, ids=lambda path: path.rsplit("/", 1)[1])
def test_random_bytes_get_a_clear_answer(servers, server, method):
    @FUZZ
    @given(payload=st.binary(max_size=400))
    def fuzz(payload):
        assert_clear(*servers.call(server, method, payload), method)

    fuzz()
    servers.assert_healthy()


VALID = {
    services.PROCESS_SINGLE_DATA: DataRequest(
        docs=[Document(id="d", text="hello", tags={"k": 1}, embedding=[1.0, 2.0])], endpoint="/any", parameters={"p": 1}
    ).to_bytes(),
    services.PROCESS_DATA: jina_pb2.DataRequestListEnvelope(
        requests=[DataRequest(docs=[Document(id=f"d{i}", text="x" * 30)], endpoint="/any").to_bytes() for i in range(3)]
    ).SerializeToString(),
    services.PROCESS_CONTROL: ControlRequest("STATUS").to_bytes(),
}


@pytest.mark.parametrize("server", ["worker", "head"])
@pytest.mark.parametrize("method", list(VALID), ids=lambda path: path.rsplit("/", 1)[1])
def test_truncated_messages_get_a_clear_answer(servers, server, method):
    whole = VALID[method]

    @FUZZ
    @given(cut=st.integers(min_value=1, max_value=len(whole) - 1), flip=st.integers(min_value=0, max_value=255))
    def fuzz(cut, flip):
        truncated = whole[:cut]
        assert_clear(*servers.call(server, method, truncated), method)
        damaged = bytearray(whole)
        damaged[cut] ^= flip  # and one byte changed
        assert_clear(*servers.call(server, method, bytes(damaged)), method)

    fuzz()
    servers.assert_healthy()


def _grpc_frames(path: str, authority: str, body: bytes) -> bytes:
    """An HTTP/2 connection preface, SETTINGS, and one gRPC request stream (1 s deadline) ending after ``body``."""

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def literal(name: bytes, value: bytes) -> bytes:  # HPACK literal header without indexing, no Huffman
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    headers = b"".join(
        literal(name, value)
        for name, value in [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", authority.encode()),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"1S"),
        ]
    )
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(0x4, 0, 0, b"")  # SETTINGS
        + frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
    )


def _grpc_status(sock: socket.socket, timeout: float = 5.0) -> str:
    """Read frames until stream 1 ends; its grpc-status from the trailers, or 'reset' / 'goaway' / 'closed'."""
    sock.settimeout(timeout)
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9:9 + length], buffer[9 + length:]
            if stream == 1 and kind == 0x1 and flags & 0x1:  # trailers: gRPC writes grpc-status as a plain literal
                found = re.search(rb"grpc-status[\x00-\x7f](\d+)", payload)
                return found.group(1).decode() if found else "trailers"
            if stream == 1 and kind == 0x3:
                return "reset"
            if kind == 0x7:
                return "goaway"
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return "closed"
        buffer += chunk
    return "nothing"


@pytest.mark.parametrize("server", ["worker", "head"])
@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x00\x00\x00\x64" + b"only ten b",  # the length prefix promises 100 bytes, 10 arrive
        b"\x00\x00\x00",  # a prefix cut short
        b"\x01\x00\x00\x00\x03abc",  # flagged compressed, with no grpc-encoding
    ],
    ids=["short-message", "short-prefix", "bogus-compression"],
)
def test_truncated_grpc_frames_end_the_stream_and_the_server_keeps_serving(servers, server, body):
    """gRPC itself answers a broken frame: at once, or (a message cut short) when the call's deadline passes."""
    process = getattr(servers, server)
    host, port = process.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_grpc_frames(services.PROCESS_SINGLE_DATA, process.address, body))
        status = _grpc_status(sock)
    assert status not in ("0", "nothing", "closed"), status  # a non-OK grpc-status or a reset, never silence
    servers.assert_healthy()


# -- wrong message types ----------------------------------------------------------------------------------


def _activate(host: str, port: int, shard_id=0) -> ControlRequest:
    request = ControlRequest("ACTIVATE")
    # a fixed id: read as a DataRequest list, a random hex id parses (as protobuf) about once in 120 draws,
    # and "zz..." never does ('z' opens a length-delimited field longer than what follows)
    request.proto.header.request_id = "zz" + "0" * 30
    request.add_related_entity(f"{host}:{port}", host, port, shard_id)
    return request


WRONG_TYPES = {
    # refused: the bytes cannot be the method's message
    "activate-to-single-data": (services.PROCESS_SINGLE_DATA, _activate("127.0.0.1", 9).to_bytes(), True),
    "deactivate-to-single-data": (services.PROCESS_SINGLE_DATA, ControlRequest("DEACTIVATE").to_bytes(), True),
    "endpoints-to-single-data": (services.PROCESS_SINGLE_DATA, jina_pb2.EndpointsProto(
        endpoints=["/a"]).SerializeToString(), True),
    "data-request-to-process-data": (services.PROCESS_DATA, VALID[services.PROCESS_SINGLE_DATA], True),
    "control-to-process-data": (services.PROCESS_DATA, _activate("127.0.0.1", 9).to_bytes(), True),
    "data-request-to-control": (services.PROCESS_CONTROL, VALID[services.PROCESS_SINGLE_DATA], True),
    "data-request-to-discovery": (services.ENDPOINT_DISCOVERY, VALID[services.PROCESS_SINGLE_DATA], True),
    "control-to-discovery": (services.ENDPOINT_DISCOVERY, ControlRequest("STATUS").to_bytes(), True),
    # protobuf cannot tell: a STATUS is byte for byte a DataRequest with only a header, and the reverse;
    # these are answered as the method's own (documentless) message, or refused
    "status-to-single-data": (services.PROCESS_SINGLE_DATA, ControlRequest("STATUS").to_bytes(), False),
    "list-to-single-data": (services.PROCESS_SINGLE_DATA, VALID[services.PROCESS_DATA], False),
    "bare-data-request-to-control": (services.PROCESS_CONTROL, DataRequest().to_bytes(), False),
}


@pytest.mark.parametrize("server", ["worker", "head"])
@pytest.mark.parametrize("method, payload, refused", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_wrong_message_types(servers, server, method, payload, refused):
    code, details, reply = servers.call(server, method, payload, metadata=((services.AUTHORIZATION_METADATA,
                                                                           f"Bearer {TOKEN}"),))
    assert_clear(code, details, reply, method, refused=refused)
    if refused:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert servers.status() == servers.members


# -- documents, sizes, endpoints -------------------------------------------------------------------------


def _with_docs_bytes() -> bytes:
    message = jina_pb2.DataRequestProto()
    message.header.request_id = "pickled"
    message.header.exec_endpoint = "/any"
    message.data.docs_bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    return message.SerializeToString()


@pytest.mark.parametrize("server", ["worker", "head"])
def test_docs_bytes_is_refused_naming_it(servers, server):
    listed = jina_pb2.DataRequestListEnvelope(requests=[VALID[services.PROCESS_SINGLE_DATA], _with_docs_bytes()])
    for method, payload in ((services.PROCESS_SINGLE_DATA, _with_docs_bytes()),
                            (services.PROCESS_DATA, listed.SerializeToString())):
        code, details, _ = servers.call(server, method, payload)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "docs_bytes" in details, (code, details)
    servers.assert_healthy()


@pytest.mark.parametrize("server", ["worker", "head"])
def test_docs_bytes_on_a_call_stream_is_refused_alone_and_the_stream_goes_on(servers, server):
    """One request of a JinaRPC/Call stream carrying a pickle is answered ERROR by its request id, as a request its
    handler refuses is; it ended the whole stream, and the requests the client had sent behind it were lost."""
    sent = [DataRequest(docs=[Document(id="before")], endpoint="/any").to_bytes(), _with_docs_bytes(),
            DataRequest(docs=[Document(id="after")], endpoint="/any").to_bytes()]
    call = servers.channels[server].stream_stream(services.STREAM_CALL)
    answers = [DataRequest.from_bytes(answer) for answer in call(iter(sent), timeout=10)]
    assert [answer.request_id for answer in answers][1] == "pickled"
    assert [answer.docs[0].id for answer in (answers[0], answers[2])] == ["before", "after"]
    refused = answers[1]
    assert refused.is_error and "docs_bytes" in refused.status.description
    assert refused.proto.data.WhichOneof("documents") != "docs_bytes"  # never passed back
    servers.assert_healthy()


def test_an_endpoint_given_twice_as_metadata_is_the_last_one_through_a_head_as_at_a_worker(servers):
    """Jina's head, this head's metrics and a worker take the last ``endpoint`` metadata of several; the head
    routed on the first, so the same request ran one endpoint sent to a worker and another through the head."""
    ran = {}
    for server in ("worker", "head"):
        request = DataRequest(docs=[Document(id="twice")])  # no endpoint in its header: the metadata's is taken
        request.proto.header.ClearField("exec_endpoint")
        code, details, reply = servers.call(server, services.PROCESS_SINGLE_DATA, request.to_bytes(),
                                            metadata=(("endpoint", "/first"), ("endpoint", "/last")))
        assert code == grpc.StatusCode.OK, details
        ran[server] = DataRequest.from_bytes(reply).endpoint
    assert ran == {"worker": None, "head": "/last"}  # the head writes the endpoint it took into the header



ODD_TAGS = {  # a 2 of field 2 (docs_bytes) or 4 (data) as C++ protobuf reads it: only a tag's low 32 bits
    "bit-32": lambda tag: _varint(tag | 1 << 32),
    "bit-63": lambda tag: _varint(tag | 1 << 63),
    "six-bytes": lambda tag: bytes([tag | 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]),
}


@pytest.mark.parametrize("server", ["worker", "head"])
@pytest.mark.parametrize("odd", ODD_TAGS.values(), ids=ODD_TAGS.keys())
def test_docs_bytes_behind_a_tag_out_of_protobufs_range_is_refused_not_passed_on(servers, server, odd):
    """Such a tag was read whole, an unknown field skipped, and the head passed the pickle on, where a C++ protobuf
    peer (keeping the tag's low 32 bits) would read docs_bytes (a review's find)."""
    pickle = _with_docs_bytes()[-30:]
    header = jina_pb2.DataRequestProto(header=jina_pb2.HeaderProto(request_id="odd", exec_endpoint="/any"))
    head = header.SerializeToString()
    in_data = head + b"\x22" + _varint(len(odd(0x12)) + 1 + len(pickle)) + odd(0x12) + _varint(len(pickle)) + pickle
    data_field = b"\x12" + _varint(len(pickle)) + pickle
    as_data = head + odd(0x22) + _varint(len(data_field)) + data_field
    for payload in (in_data, as_data):
        code, details, _ = servers.call(server, services.PROCESS_SINGLE_DATA, payload)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "a tag out of protobuf's range" in details and not details.startswith("deployment"), details
    servers.assert_healthy()


@pytest.mark.parametrize("server", ["worker", "head"])
def test_a_parameter_value_with_no_kind_is_refused_naming_it_and_blames_no_replica(servers, server):
    message = jina_pb2.DataRequestProto()
    message.header.request_id = "valueless"
    message.header.exec_endpoint = "/any"
    message.parameters.fields["top_k"].SetInParent()  # valid protobuf, but a Value that is no JSON value
    for _ in range(8):  # through the head on a request stream: more failures than eject a replica, if blamed
        code, details, _ = servers.call(server, services.PROCESS_SINGLE_DATA, message.SerializeToString(), timeout=5)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "'valueless'" in details and "'top_k'" in details and "no kind set" in details, details
    _, status = servers.channels["head"].unary_unary(services.PROCESS_CONTROL).with_call(
        ControlRequest("STATUS").to_bytes(), timeout=5
    )
    assert services.EJECTED_METADATA not in dict(status.trailing_metadata())
    servers.assert_healthy()


def _huge(megabytes: float) -> bytes:
    return DataRequest(docs=[Document(id="huge", blob=b"\x00" * int(megabytes * 2**20))], endpoint="/any").to_bytes()


@pytest.mark.parametrize(
    "server, megabytes, names_the_shard",
    [("worker", 2, False), ("head", 5, False), ("head", 2, True)],  # 2 MiB pass the head's 4, not the worker's 1
    ids=["worker-over-its-limit", "head-over-its-limit", "head-forwards-over-the-worker-limit"],
)
def test_oversized_requests_are_resource_exhausted(servers, server, megabytes, names_the_shard):
    code, details, _ = servers.call(server, services.PROCESS_SINGLE_DATA, _huge(megabytes))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "larger than max" in details or "exceeds" in details, details
    if names_the_shard:
        assert "deployment 'bad'" in details and "shard 0" in details, details
    servers.assert_healthy()


@pytest.mark.parametrize("server", ["worker", "head"])
def test_empty_requests(servers, server):
    """No bytes at all: a documentless request (answered), an empty list (refused), a STATUS, an Empty."""
    for method in METHODS:
        code, details, reply = servers.call(server, method, b"")
        if method == services.PROCESS_DATA:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty request list" in details
        else:
            assert code == grpc.StatusCode.OK, details
            REPLY_TYPES[method].FromString(reply)
    servers.assert_healthy()


@pytest.mark.parametrize("server", ["worker", "head"])
def test_any_endpoint_is_answered_or_refused_clearly(servers, server):
    @FUZZ
    @given(endpoint=st.text(max_size=40), as_metadata=st.booleans())
    def fuzz(endpoint, as_metadata):
        request = DataRequest(docs=[Document(id="e")], endpoint=endpoint)
        metadata = ((services.ENDPOINT_METADATA, endpoint),) if as_metadata else ()
        legal_metadata = endpoint.isascii() and endpoint.isprintable()
        try:
            code, details, reply = servers.call(server, services.PROCESS_SINGLE_DATA, request.to_bytes(), metadata)
        except ValueError:  # gRPC's client refuses some metadata that is not printable ASCII before sending...
            assert as_metadata and not legal_metadata
            return
        if as_metadata and not legal_metadata:  # ...and fails the call on the rest
            assert code == grpc.StatusCode.INTERNAL and "metadata" in details.lower(), (code, details)
            return
        assert_clear(code, details, reply, services.PROCESS_SINGLE_DATA)
        if code == grpc.StatusCode.OK:
            assert DataRequest.from_bytes(reply).docs[0].id == "e"
        else:
            assert "endpoint" in details

    fuzz()
    servers.assert_healthy()


# -- the control plane ---------------------------------------------------------------------------------


BAD_ENTITIES = {
    "empty-host": ("", 5000),
    "blank-host": ("  ", 5000),
    "port-0": ("127.0.0.1", 0),
    "port-70000": ("127.0.0.1", 70000),
    "host-with-port": ("127.0.0.1:80", 5000),
    "host-with-path": ("host/path", 5000),
    "host-with-user": ("user@host", 5000),
    "unclosed-ipv6": ("[::1", 5000),
    "scheme-only": ("http://", 5000),
}


@pytest.mark.parametrize("host, port", BAD_ENTITIES.values(), ids=BAD_ENTITIES.keys())
def test_activate_with_a_bad_address_is_refused_and_changes_nothing(servers, host, port):
    good_and_bad = ControlRequest("ACTIVATE")
    good_and_bad.add_related_entity("fine", "127.0.0.1", 5999, 0)  # valid, but its request is refused whole
    good_and_bad.add_related_entity("bad", host, port, 0)
    for command in ("ACTIVATE", "DEACTIVATE"):
        good_and_bad.command = command
        code, details, _ = servers.call(
            "head", services.PROCESS_CONTROL, good_and_bad.to_bytes(),
            metadata=((services.AUTHORIZATION_METADATA, f"Bearer {TOKEN}"),),
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert f"{command} refused" in details and "bad address" in details, details
        assert servers.status() == servers.members
    servers.assert_healthy()


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.mark.parametrize("server", ["worker", "head"])
def test_malformed_health_and_reflection_requests_are_refused_by_name_and_log_nothing(servers, server):
    """gRPC's own deserializers answered UNKNOWN ("Unexpected DecodeError") and logged a traceback per request
    (found by a review: 100 bad calls, 97 KB of log)."""
    process = getattr(servers, server)
    logged_before = process.log_path.read_text(errors="replace").count("Traceback")
    channel = servers.channels[server]
    garbage = b"\xff\xff\xff"
    attempts = {
        "Check": lambda: channel.unary_unary(HEALTH_CHECK)(garbage, timeout=5),
        "Watch": lambda: next(iter(channel.unary_stream(HEALTH_WATCH)(garbage, timeout=5))),
        "reflection": lambda: next(iter(channel.stream_stream(REFLECTION)(iter([garbage]), timeout=5))),
    }
    for name, attempt in attempts.items():
        with pytest.raises(grpc.RpcError) as refused:
            attempt()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, refused.value.details())
        assert "malformed grpc." in refused.value.details(), (name, refused.value.details())
    good = channel.unary_unary(HEALTH_CHECK)(b"", timeout=5)  # an empty HealthCheckRequest: the server as a whole
    assert good == b"\x08\x01"  # status: SERVING
    listing = next(iter(channel.stream_stream(REFLECTION)(iter([b"\x3a\x00"]), timeout=5)))  # list_services
    assert b"jina.JinaSingleDataRequestRPC" in listing
    servers.assert_healthy()
    assert process.log_path.read_text(errors="replace").count("Traceback") == logged_before


def test_activate_for_a_shard_beyond_the_heads_shards_is_refused(servers):
    beyond = ControlRequest("ACTIVATE")
    beyond.add_related_entity("stray", "127.0.0.1", 5998, 1)  # the head was started with --shards 1
    code, details, _ = servers.call(
        "head", services.PROCESS_CONTROL, beyond.to_bytes(),
        metadata=((services.AUTHORIZATION_METADATA, f"Bearer {TOKEN}"),),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "127.0.0.1:5998 claims shard 1 of 'bad', which has shards 0..0 (head --shards 1)" in details, details
    assert servers.status() == servers.members


@pytest.mark.parametrize("shard_id", [2**31, 2**32 - 1])
def test_a_shard_id_the_wire_carries_but_no_pool_takes_is_refused_by_name(servers, shard_id):
    """A uint32 past int32's range was answered UNKNOWN with a traceback logged (found by a review)."""
    for command in ("ACTIVATE", "DEACTIVATE"):
        far = ControlRequest(command)
        far.add_related_entity("far", "127.0.0.1", 5997, 0)
        far.related_entities[0].shard_id = shard_id
        code, details, _ = servers.call(
            "head", services.PROCESS_CONTROL, far.to_bytes(),
            metadata=((services.AUTHORIZATION_METADATA, f"Bearer {TOKEN}"),),
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert f"127.0.0.1:5997 names shard {shard_id} of 'bad', and a shard id is at most 2147483647" in details
        assert servers.status() == servers.members
    servers.assert_healthy()


def test_activate_accepts_exactly_what_parse_address_accepts(servers):
    @FUZZ
    @given(host=st.text(max_size=30), port=st.integers(min_value=0, max_value=2**32 - 1))
    def fuzz(host, port):
        code, details, _ = servers.call(
            "head", services.PROCESS_CONTROL, _activate(host, port, shard_id=0).to_bytes(),
            metadata=((services.AUTHORIZATION_METADATA, f"Bearer {TOKEN}"),),
        )
        bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
        try:
            parse_address(f"{bracketed}:{port}")
        except ConfigurationError:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "ACTIVATE refused" in details, (code, details)
            assert servers.status() == servers.members
            return
        assert code == grpc.StatusCode.OK, details
        deactivate = _activate(host, port, shard_id=0)
        deactivate.command = "DEACTIVATE"
        code, details, _ = servers.call(
            "head", services.PROCESS_CONTROL, deactivate.to_bytes(),
            metadata=((services.AUTHORIZATION_METADATA, f"Bearer {TOKEN}"),),
        )
        assert code == grpc.StatusCode.OK, details
        assert servers.status() == servers.members

    fuzz()
    servers.assert_healthy()


def test_membership_commands_without_the_token_are_refused(servers):
    host, port = servers.worker.address.rsplit(":", 1)
    deactivate = _activate(host, int(port))
    deactivate.command = "DEACTIVATE"
    for request in (_activate("127.0.0.1", 5998), deactivate):
        code, details, _ = servers.call("head", services.PROCESS_CONTROL, request.to_bytes())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "control token" in details
    servers.assert_healthy()


# -- command lines and configuration ------------------------------------------------------------------------


BAD_COMMAND_LINES = {  # test_cli.py has --uses, --connection, --polling and --port; these are the rest
    "uses-with-not-object": (["worker", "--uses", EXECUTOR, "--uses-with", "[1]"], "must be a JSON object"),
    "negative-shard": (["worker", "--uses", EXECUTOR, "--shard-id", "-1"], "--shard-id"),
    "head-address-garbage": (["worker", "--uses", EXECUTOR, "--head", "not an address"], "bad address"),
    "register-interval-zero": (["worker", "--uses", EXECUTOR, "--register-interval", "0"], "--register-interval"),
    "tls-files-missing": (["worker", "--uses", EXECUTOR, "--tls-cert", "/nonexistent/cert.pem", "--tls-key",
                           "/nonexistent/key.pem"], "cannot read server certificate chain"),
    "max-message-zero": (["worker", "--uses", EXECUTOR, "--max-message-mb", "0"], "max message size must be positive"),
    "drain-negative": (["head", "--deployment", "d", "--drain-seconds", "-1"], "drain grace must be 0 to 1e+09 seconds"),
    "attempt-timeout-zero": (["head", "--deployment", "d", "--attempt-timeout", "0"], "attempt timeout must be positive"),
    "timeout-negative": (["head", "--deployment", "d", "--timeout", "-1"], "timeout must be positive"),
    "host-not-local": (["head", "--deployment", "d", "--host", "203.0.113.7"], "cannot listen on 203.0.113.7"),
    "uses-after-garbage": (["head", "--deployment", "d", "--uses-after", "x:y:z"], "bad address"),
    "unknown-balancer": (["head", "--deployment", "d", "--balancer", "random"], "invalid choice: 'random'"),
}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-message-mb", "0"], "max message size must be positive"),
        (["--head", "not an address"], "bad address 'not an address'"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/x.pem"], "/nonexistent.pem"),
    ],
)
def test_a_worker_checks_its_flags_before_it_loads_the_executor(tmp_path, flags, message):
    uses = f"{Path(__file__).resolve().parent / 'executors.py'}:MarksItsStart"
    finished = subprocess.run(
        [sys.executable, "-m", "shardnet", "worker", "--uses", uses, *flags],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )
    assert finished.returncode == 2 and message in finished.stderr, finished.stderr
    assert not (tmp_path / "started.mark").exists()


def test_bad_command_lines_exit_with_a_clear_message():
    """Each command must exit non-zero within 30 s, saying what is wrong (four at a time, to spare the CPUs)."""
    problems = []
    names = list(BAD_COMMAND_LINES)
    for batch in (names[i:i + 4] for i in range(0, len(names), 4)):
        started = {
            name: subprocess.Popen(
                [sys.executable, "-m", "shardnet", *BAD_COMMAND_LINES[name][0]],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for name in batch
        }
        deadline = time.monotonic() + 30
        try:
            for name, process in started.items():
                try:
                    stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    problems.append(f"{name}: still running (it accepted the arguments)")
                    continue
                expected = BAD_COMMAND_LINES[name][1]
                if process.returncode == 0 or expected not in stderr or "Traceback" in stderr or "ready on" in stdout:
                    problems.append(f"{name}: exit {process.returncode}, stderr {stderr.strip()[-300:]!r}")
        finally:
            for process in started.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert problems == []


BAD_CONFIGURATIONS = {
    "port-negative": (lambda: ServerConfig(port=-1), "port -1"),
    "port-too-big": (lambda: ServerConfig(port=65536), "65536"),
    "message-size-zero": (lambda: ServerConfig(max_message_bytes=0), "max message size"),
    "drain-negative": (lambda: ServerConfig(drain_grace=-0.5), "drain grace"),
    "drain-nan": (lambda: ServerConfig(drain_grace=float("nan")), "drain grace must be a finite number"),
    "message-size-over-int32": (lambda: ServerConfig(max_message_bytes=2**31), "at most 2147483647 bytes"),
    "concurrency-zero": (lambda: ServerConfig(max_concurrent_rpcs=0), "max_concurrent_rpcs"),
    "handshake-zero": (lambda: ServerConfig(handshake_timeout=0), "handshake_timeout must be a positive, finite"),
    "handshake-nan": (lambda: ServerConfig(handshake_timeout=float("nan")), "handshake_timeout must be a positive"),
    "rounds-zero": (lambda: RetryPolicy(rounds=0), "rounds"),
    "attempt-timeout-zero": (lambda: RetryPolicy(attempt_timeout=0), "attempt_timeout"),
    "retry-invalid-argument": (lambda: RetryPolicy(retry_on=frozenset({grpc.StatusCode.INVALID_ARGUMENT})),
                               "INVALID_ARGUMENT"),
    "backoff-negative": (lambda: RetryPolicy(backoff_initial=-1), "backoff"),
    "unsent-only-not-a-bool": (lambda: RetryPolicy(unsent_only="yes"), "unsent_only is True or False"),
    "ejection-zero-failures": (lambda: EjectionPolicy(consecutive_failures=0), "consecutive_failures"),
    "ejection-zero-time": (lambda: EjectionPolicy(base_ejection=0), "base_ejection"),
    "ejection-max-below-base": (lambda: EjectionPolicy(base_ejection=5, max_ejection=1), "max_ejection"),
    "budget-ratio": (lambda: RetryBudget(ratio=1.5), "ratio"),
    "budget-floor": (lambda: RetryBudget(min_per_second=-1), "min_per_second"),
    "budget-window": (lambda: RetryBudget(window=0), "window"),
    "polling-word": (lambda: PollingMap.parse("SOMETIMES"), "unknown polling"),
    "polling-json": (lambda: PollingMap.parse('{"/a": "ALL"'), "not valid JSON"),
    "polling-kind": (lambda: PollingMap.parse({"/a": "EVERY"}), "unknown polling"),
    "polling-null": (lambda: PollingMap.parse({"/a": None}), "unknown polling"),
    "polling-empty-endpoint": (lambda: PollingMap.parse({"": "ALL"}), "empty endpoint"),
    # the constructor stored whatever it was given: repr and Deployment(polling=...) failed later, AttributeError
    "polling-map-kind": (lambda: PollingMap({"/x": "BOGUS"}), "polling map '/x': unknown polling 'BOGUS'"),
    "polling-map-default": (lambda: PollingMap({}, default="SOME"), "polling map default: unknown polling 'SOME'"),
    "polling-map-key-number": (lambda: PollingMap({1: "ALL"}), "polling map key 1: an endpoint is text"),
    "polling-map-key-star": (lambda: PollingMap({"*": "ALL"}), "give PollingMap the default as default="),
    "polling-map-empty-endpoint": (lambda: PollingMap({"": "ALL"}), "empty endpoint"),
    "polling-map-text": (lambda: PollingMap("{"), "PollingMap takes a mapping of endpoint to polling, got '{'"),
    "pool-balancer": (lambda: GrpcConnectionPool(balancer="random"), "unknown balancer"),
    "pool-timeout": (lambda: GrpcConnectionPool(timeout=0), "timeout"),
    "deployment-shards": (lambda: Deployment(uses=EXECUTOR, shards=0), "at least 1 shard"),
    "deployment-shards-text": (lambda: Deployment(uses=EXECUTOR, shards="2"), "shards='2'"),
    "deployment-replicas-fraction": (lambda: Deployment(uses=EXECUTOR, replicas=1.5), "replicas=1.5"),
    "deployment-uses-number": (lambda: Deployment(uses=5), "uses must be an Executor subclass"),
    "deployment-name-path": (lambda: Deployment(uses=EXECUTOR, name="a b/c"), "deployment name 'a b/c'"),
    "deployment-uses-with-list": (lambda: Deployment(uses=EXECUTOR, uses_with=[1]), "uses_with must be a mapping"),
    "deployment-uses-with-object": (lambda: Deployment(uses=EXECUTOR, uses_with={"x": object()}), "JSON-like"),
    "deployment-balancer": (lambda: Deployment(uses=EXECUTOR, balancer="random"), "unknown balancer"),
    "head-shards-negative": (lambda: Head("d", shards=-1), "shards must be a whole number from 0"),
    "pool-retry-text": (lambda: GrpcConnectionPool(retry="x"), "retry must be an instance of RetryPolicy"),
    "pool-budget-number": (lambda: GrpcConnectionPool(retry_budget=3), "retry_budget must be an instance of RetryBudget"),
    "pool-ejection-text": (lambda: GrpcConnectionPool(ejection="x"), "ejection must be an instance of EjectionPolicy"),
    "pool-tls-path": (lambda: GrpcConnectionPool(tls="cert.pem"), "tls must be an instance of ClientTls"),
    "pool-timeout-text": (lambda: GrpcConnectionPool(timeout="5"), "timeout must be positive seconds"),
    "pool-timeout-infinite": (lambda: GrpcConnectionPool(timeout=float("inf")), "timeout must be positive seconds"),
    "pool-tls-check-interval-huge": (lambda: GrpcConnectionPool(tls_check_interval=1e300),
                                     "tls_check_interval must be positive seconds up to 1e+09, got 1e+300"),
    "pool-tls-check-interval-nan": (lambda: GrpcConnectionPool(tls_check_interval=float("nan")),
                                    "tls_check_interval must be positive seconds up to 1e+09, got nan"),
    "replicas-balancer-name": (lambda: ReplicaList("random"), "unknown balancer 'random'"),
    "replicas-balancer-object": (lambda: ReplicaList(5), "balancer must be a balancer name or object"),
    "pool-option-single": (lambda: GrpcConnectionPool(options=[("x",)]), "(name, value) pairs, got ('x',)"),
    "pool-option-text": (lambda: GrpcConnectionPool(options="abc"), "(name, value) pairs, got 'a'"),
    "pool-option-number-name": (lambda: GrpcConnectionPool(options=[(5, 1)]), "channel option (5, 1)"),
    "pool-option-object-value": (lambda: GrpcConnectionPool(options=[("grpc.x", None)]), "channel option ('grpc.x', None)"),
    "tls-unreadable": (lambda: ServerTls("/nonexistent.pem", "/nonexistent.pem"), "cannot read"),
    "tls-not-pem": (lambda: ServerTls(b"hello", b"world"), "not PEM"),
    "client-tls-half-pair": (lambda: ClientTls(private_key=b"-----BEGIN KEY-----"), "both a client private key"),
    "pool-metadata-key": (lambda: GrpcConnectionPool(metadata=[("X-Tenant", "blue")]), "not a gRPC header name"),
    "pool-metadata-value": (lambda: GrpcConnectionPool(metadata=[("x-tenant", "blue\n")]), "printable ASCII"),
    "address-none": (lambda: parse_address(None), "bad address"),
    "address-no-port": (lambda: parse_address("localhost"), "bad address"),
}


BAD_CALLS = {
    "timeout-zero": ({"timeout": 0}, ConfigurationError, "timeout must be positive seconds"),
    "timeout-negative": ({"timeout": -1}, ConfigurationError, "timeout must be positive seconds"),
    "timeout-nan": ({"timeout": float("nan")}, ConfigurationError, "timeout must be positive seconds"),
    # gRPC's deadline overflows: every call failed at once with DEADLINE_EXCEEDED
    "timeout-infinite": ({"timeout": float("inf")}, ConfigurationError, "timeout must be positive seconds up to 1e+09"),
    "timeout-huge": ({"timeout": 1e12}, ConfigurationError, "(None for no deadline), got 1000000000000.0"),
    "metadata-uppercase-key": ({"metadata": [("X-Trace", "1")]}, ProtocolError, "'X-Trace' is not a gRPC header name"),
    "metadata-reserved-key": ({"metadata": [("grpc-timeout", "1S")]}, ProtocolError, "not starting with 'grpc-'"),
    "metadata-newline": ({"metadata": [("x-trace", "a\nb")]}, ProtocolError, "printable ASCII text"),
    "metadata-number": ({"metadata": [("x-trace", 7)]}, ProtocolError, "printable ASCII text, got 7"),
    "metadata-bin-text": ({"metadata": [("x-blob-bin", "text")]}, ProtocolError, "its value must be bytes"),
    "metadata-not-pairs": ({"metadata": ["x-trace"]}, ProtocolError, "must be (key, value) pairs"),
}


NOT_REQUESTS = {  # built in the test: a DataRequest's random id in a test id would differ between xdist workers
    "bytes": lambda: [b"bytes"],
    "none": lambda: [None],
    "mixed": lambda: [DataRequest(), "text"],
    "a-string": lambda: "ab",
}


@pytest.mark.parametrize("make", NOT_REQUESTS.values(), ids=NOT_REQUESTS.keys())
async def test_the_pool_and_helpers_send_request_objects_only(echo_servers, make):
    [server] = await echo_servers(1)
    requests = make()
    async with GrpcConnectionPool() as pool:
        pool.add_connection("dep", server.address)
        with pytest.raises(TypeError, match="DataRequest or ControlRequest objects, got"):
            pool.send_requests(requests, "dep")
    with pytest.raises(TypeError, match="one or more DataRequest objects"):
        await oneshot.send_requests_async(requests, server.address)
    assert server.calls == 0


@pytest.mark.parametrize("head", ["yes", "no", 1, None])
async def test_a_head_flag_that_is_no_bool_is_refused_and_the_pool_stays_as_it_was(head):
    """head="no" was truthy: the replica was added as the deployment's head (found by a bad-input review)."""
    async with GrpcConnectionPool() as pool:
        pool.add_connection("dep", "127.0.0.1:50001")
        with pytest.raises(ConfigurationError, match=re.escape(f"head is True or False, got {head!r}")):
            pool.add_connection("dep", "127.0.0.1:50002", head=head)
        with pytest.raises(ConfigurationError, match=re.escape(f"head is True or False, got {head!r}")):
            await pool.remove_connection("dep", "127.0.0.1:50001", head=head)
        assert pool.get_replicas("dep", head=True) is None
        assert [str(c.address) for c in pool.get_replicas("dep").get_all_connections()] == ["127.0.0.1:50001"]


@pytest.mark.parametrize(
    "deployment, shard_id, message",
    [(None, 0, "non-empty text, got None"), ("", 0, "non-empty text"), ("d", "0", "got '0'"),
     ("d", 1.5, "got 1.5"), ("d", -1, "got -1"), ("d", True, "got True")],
)
async def test_deployments_and_shards_are_named_by_text_and_numbers(deployment, shard_id, message):
    async with GrpcConnectionPool() as pool:
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            pool.add_connection(deployment, "127.0.0.1:50001", shard_id=shard_id)
        assert pool.deployments == {}


async def test_a_shard_id_computed_with_numpy_is_taken_as_the_int_it_is(echo_servers):
    """np.argmin and friends give numpy integers: they name a shard as an int does (a float still does not)."""
    [server] = await echo_servers(1)
    async with GrpcConnectionPool() as pool:
        pool.add_connection("d", server.address, shard_id=np.int64(1))
        assert pool.shard_ids("d") == [1] and type(pool.shard_ids("d")[0]) is int
        assert pool.get_replicas("d", shard_id=np.int32(1)).addresses == [server.address]
        response, _ = await pool.send_requests_once([DataRequest(endpoint="/x")], "d", shard_id=np.uint8(1))
        assert not response.is_error and server.calls == 1
        for float_id in (np.float64(1.0), 1.0, np.float64(0.0)):  # a float names no shard, 0.0 neither
            with pytest.raises(ConfigurationError, match="a shard id is an integer from 0"):
                pool.add_connection("d", server.address, shard_id=float_id)
            with pytest.raises(ConfigurationError, match="a shard id is an integer from 0"):
                pool.get_replicas("d", shard_id=float_id)
            with pytest.raises(ConfigurationError, match="a shard id is an integer from 0"):
                pool.send_requests_once([DataRequest(endpoint="/x")], "d", shard_id=float_id)
            with pytest.raises(ConfigurationError, match="a shard id is an integer from 0"):
                await pool.remove_connection("d", server.address, shard_id=float_id)
        pool.declare_shards("e", np.int64(3))
        assert pool.shard_ids("e") == [0, 1, 2] and type(pool._deployments["e"].declared) is int
        with pytest.raises(ConfigurationError, match="a shard id is an integer from 0 to 2147483647, got '1'"):
            pool.add_connection("e", server.address, shard_id="1")  # not numpy's own error from the comparison
        # one no message can carry: a head's STATUS failed inside gRPC with a servicer traceback
        with pytest.raises(ConfigurationError, match="from 0 to 2147483647, got 99999999999"):
            pool.add_connection("e", server.address, shard_id=99_999_999_999)
        with pytest.raises(ConfigurationError, match=r"--connection '2147483648=127\.0\.0\.1:1'.*from 0 to 2147483647"):
            parse_connections(["2147483648=127.0.0.1:1"])
        assert parse_connections(["2147483647=127.0.0.1:1"]) == {2147483647: ["127.0.0.1:1"]}


@pytest.mark.parametrize("arguments, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
async def test_a_bad_timeout_or_metadata_is_refused_before_anything_is_sent(echo_servers, arguments, error, message):
    [server] = await echo_servers(1)
    async with GrpcConnectionPool() as pool:
        pool.add_connection("dep", server.address)
        with pytest.raises(error, match=re.escape(message)):
            pool.send_request(DataRequest(endpoint="/x"), "dep", **arguments)
        with pytest.raises(error, match=re.escape(message)):  # the one-off helpers check the same way
            await oneshot.call_once(
                "single_data",
                DataRequest(endpoint="/x"),
                server.address,
                timeout=arguments.get("timeout", 5.0),
                metadata=arguments.get("metadata", ()),
            )
    assert server.calls == 0
    good = [("x-blob-bin", b"\x00\xff"), ("x-trace", "t-1")]
    async with GrpcConnectionPool() as pool:
        pool.add_connection("dep", server.address)
        await pool.send_request(DataRequest(endpoint="/x"), "dep", metadata=good, timeout=5)[0]
    assert server.received_metadata[-1]["x-trace"] == "t-1"


@pytest.mark.parametrize("make, message", BAD_CONFIGURATIONS.values(), ids=BAD_CONFIGURATIONS.keys())
def test_bad_configuration_is_a_configuration_error(make, message):
    with pytest.raises(ConfigurationError) as refused:
        make()
    assert message in str(refused.value), str(refused.value)


def test_a_pool_filled_outside_the_loop_that_sends_says_so():
    opening = asyncio.new_event_loop()  # what a module-level pool gets: a loop that is not asyncio.run's
    try:
        asyncio.set_event_loop(opening)
        pool = GrpcConnectionPool()
        pool.add_connection("dep", "127.0.0.1:5000")
    finally:
        asyncio.set_event_loop(None)

    async def send():
        await pool.send_request(DataRequest(endpoint="/x"), "dep", timeout=2)[0]

    try:
        with pytest.raises(ConfigurationError, match="replica 127.0.0.1:5000: its channel belongs to another event loop"):
            asyncio.run(send())
        assert not asyncio.all_tasks(opening)  # refused before gRPC queued the call on the loop the channel knows
    finally:  # the channel ends in the loop it belongs to
        opening.run_until_complete(pool.close())
        opening.close()


def test_a_request_refused_for_another_loops_channel_never_reaches_the_replica():
    opening = asyncio.new_event_loop()  # a module-level pool's loop, which the program runs again later
    try:
        asyncio.set_event_loop(opening)
        server = opening.run_until_complete(EchoServer("echo").start())
        pool = GrpcConnectionPool()
        pool.add_connection("dep", server.address)
    finally:
        asyncio.set_event_loop(None)

    async def send():
        await pool.send_request(DataRequest(endpoint="/x"), "dep", timeout=2)[0]

    try:
        with pytest.raises(ConfigurationError, match="its channel belongs to another event loop"):
            asyncio.run(send())
        opening.run_until_complete(asyncio.sleep(0.5))  # that loop runs again: nothing of the refused call is left
        assert server.calls == 0
    finally:
        opening.run_until_complete(pool.close())
        opening.run_until_complete(server.stop())
        opening.close()


def test_a_request_refused_for_a_channel_of_a_loop_running_in_another_thread_never_reaches_the_replica():
    """The check let a loop running elsewhere through: gRPC queued the call on it from the wrong thread, the caller
    was refused, and the replica ran the request once that loop woke (found by a review)."""
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, name="other-loop")
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(EchoServer("echo").start(), other).result(10)
        pool = GrpcConnectionPool()

        async def fill():
            pool.add_connection("dep", server.address)

        asyncio.run_coroutine_threadsafe(fill(), other).result(10)

        async def send():
            await pool.send_request(DataRequest(endpoint="/x"), "dep", timeout=2)[0]

        with pytest.raises(ConfigurationError, match="its channel belongs to another event loop"):
            asyncio.run(send())

        async def served_there() -> int:
            await pool.send_request(DataRequest(endpoint="/x"), "dep", timeout=2)[0]  # its own loop: served
            await asyncio.sleep(0.3)  # anything queued from the refused call would have run by now
            return server.calls

        assert asyncio.run_coroutine_threadsafe(served_there(), other).result(10) == 1
        asyncio.run_coroutine_threadsafe(pool.close(), other).result(10)
        asyncio.run_coroutine_threadsafe(server.stop(), other).result(10)
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(10)
        other.close()


def test_a_loop_run_again_from_another_thread_keeps_its_pool():
    """asyncio lets a loop run in one thread, stop, and run again in another: the thread check refused the pool
    there (found by a review of the check). Both threads stay alive, so neither reuses the other's id."""
    loop = asyncio.new_event_loop()
    held = threading.Event()
    state: dict = {}
    threads = []

    def run_in_a_thread(coroutine) -> object:
        outcome: dict = {}
        ran = threading.Event()

        def run() -> None:
            try:
                outcome["result"] = loop.run_until_complete(coroutine)
            except BaseException as exc:  # reported below, in the test's thread
                outcome["result"] = exc
            ran.set()
            held.wait()

        thread = threading.Thread(target=run)
        threads.append(thread)
        thread.start()
        ran.wait(30)
        return outcome.get("result")

    async def start() -> None:
        state["server"] = await EchoServer("echo").start()
        state["pool"] = GrpcConnectionPool()
        state["pool"].add_connection("dep", state["server"].address)

    async def send() -> str:
        _, trailing = await state["pool"].send_request(DataRequest(endpoint="/x"), "dep", timeout=5)[0]
        return dict(tuple(trailing))["served-by"]

    try:
        assert run_in_a_thread(start()) is None
        assert run_in_a_thread(send()) == "echo"  # the first thread
        assert run_in_a_thread(send()) == "echo"  # the same loop run from another thread
    finally:
        held.set()
        for thread in threads:
            thread.join(10)
        if "pool" in state:
            loop.run_until_complete(state["pool"].close())
            loop.run_until_complete(state["server"].stop())
        loop.close()


def test_a_pool_used_again_after_its_loop_closed_says_so():
    pool = GrpcConnectionPool()

    async def fill():
        pool.add_connection("dep", "127.0.0.1:5000")

    async def send():
        await pool.send_request(DataRequest(endpoint="/x"), "dep", timeout=2)[0]

    asyncio.run(fill())  # the loop the channel belongs to ends here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigurationError, match="dep/shard-0 replica 127.0.0.1:5000: its channel belongs to"):
            asyncio.run(send())
        gc.collect()
    # refused before gRPC made a call whose coroutine the closed loop could never run
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
    with pytest.raises(ConfigurationError, match="replica 127.0.0.1:5001: no event loop to open its channel in"):
        pool.add_connection("dep", "127.0.0.1:5001")  # no loop at all now


def test_a_polling_key_without_its_slash_is_taken_as_written_and_warned_about(caplog):
    with caplog.at_level("WARNING", logger="shardnet.networking.polling"):
        polling = PollingMap.parse({"tag": "ALL"})
    assert polling["tag"] == PollingType.ALL and polling["/tag"] == PollingType.ANY
    assert "polling map key 'tag' has no leading '/'" in caplog.text


def test_a_polling_map_made_with_names_holds_polling_types():
    """PollingMap({"/search": "ANY"}, default="ALL") kept the text: its /search equalled no PollingType, and its
    repr and a Deployment given it failed with AttributeError (found by a bad-input review)."""
    polling = PollingMap({"/search": "any", "/tag": PollingType.ALL}, default=" ALL")
    assert polling["/search"] is PollingType.ANY and polling["/tag"] is PollingType.ALL
    assert polling["/other"] is PollingType.ALL and polling["/index"] is PollingType.ANY
    assert repr(polling) == 'PollingMap({"/search": "ANY", "/index": "ANY", "/tag": "ALL", "*": "ALL"})'
    assert PollingMap.parse(polling) is polling  # valid as made
    assert Deployment(uses=EXECUTOR, polling=polling).polling is polling


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_parse_address_accepts_or_says_why(text):
    try:
        address = parse_address(text)
    except ConfigurationError as exc:
        assert "bad address" in str(exc)
    else:
        assert 0 < address.port < 65536 and address.host and parse_address(str(address)) == address


def test_empty_protobuf_is_what_endpoint_discovery_takes():
    assert empty_pb2.Empty().SerializeToString() == b""  # so refusing any other byte refuses no real client
