"""DataRequest and ControlRequest: public surface, wire layout, lazy decoding, unknown fields, malformed bytes."""

from __future__ import annotations

import json
import re

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from test_wire import _varint

from shardnet import ControlRequest, DataRequest, Document, ProtocolError
from shardnet.protocol.proto import docarray_pb2, jina_pb2

STRING, UINT32, MESSAGE, ENUM, BYTES = (
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_MESSAGE,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_BYTES,
)

# an unknown field: number 127, varint 42 (tag = 127 << 3 | 0, as a two-byte varint)
UNKNOWN_FIELD = b"\xf8\x07\x2a"


def sample_request() -> DataRequest:
    return DataRequest(
        docs=[Document(text="alpha", tags={"n": 1}), Document(text="beta")],
        endpoint="/index",
        parameters={"top_k": 3, "name": "x"},
    )


# -- public surface ------------------------------------------------------------


def test_data_request_surface():
    request = sample_request()
    assert request.endpoint == "/index"
    assert request.header.exec_endpoint == "/index"
    assert request.parameters == {"top_k": 3.0, "name": "x"}
    assert re.fullmatch(r"[0-9a-f]{32}", request.request_id)
    assert request.status.code == jina_pb2.StatusProto.SUCCESS
    assert not request.is_error
    docs = request.docs
    assert len(docs) == 2 and docs.texts == ["alpha", "beta"]
    assert docs[0].tags["n"] == 1.0 and docs[-1].text == "beta"
    assert [doc.text for doc in docs] == ["alpha", "beta"]
    docs.append(Document(text="gamma"))
    docs.extend([Document(text="delta")])
    assert request.docs.texts == ["alpha", "beta", "gamma", "delta"]


def test_request_ids_are_unique():
    assert len({DataRequest().request_id for _ in range(100)}) == 100


def test_defaults_and_setters():
    request = DataRequest()
    assert request.endpoint is None and request.parameters == {} and len(request.docs) == 0
    request.endpoint = "/search"
    request.parameters = {"a": [1, 2]}
    assert request.endpoint == "/search" and request.parameters == {"a": [1.0, 2.0]}
    request.endpoint = None
    assert request.endpoint is None


def test_round_trip_through_bytes():
    request = sample_request()
    back = DataRequest.from_bytes(request.to_bytes())
    assert back.request_id == request.request_id
    assert back.endpoint == "/index"
    assert back.parameters == request.parameters
    assert back.docs.texts == ["alpha", "beta"]
    assert back.docs.ids == request.docs.ids
    assert back.docs[0].tags == {"n": 1.0}


def test_set_exception_marks_error_like_jina():
    request = sample_request()
    try:
        raise KeyError("missing")
    except KeyError as exc:
        request.set_exception(exc, executor="enc")
    back = DataRequest.from_bytes(request.to_bytes())
    assert back.is_error
    exception = back.status.exception
    assert (exception.name, list(exception.args), exception.executor) == ("KeyError", ["missing"], "enc")
    assert any("KeyError" in line for line in exception.stacks)


def test_control_request_surface():
    request = ControlRequest("activate")
    assert request.command == "ACTIVATE"
    request.add_related_entity("w0", "10.0.0.1", 8080, shard_id=2)
    request.add_related_entity("w1", "10.0.0.2", 8081)
    back = ControlRequest.from_bytes(request.to_bytes())
    assert back.command == "ACTIVATE" and back.request_id == request.request_id
    first, second = back.related_entities
    assert (first.id, first.address, first.port, first.shard_id) == ("w0", "10.0.0.1", 8080, 2)
    assert first.HasField("shard_id") and not second.HasField("shard_id")
    assert ControlRequest().command == "STATUS"
    assert ControlRequest("DEACTIVATE").command == "DEACTIVATE"


def test_control_request_unknown_command():
    with pytest.raises(ProtocolError, match="unknown control command"):
        ControlRequest("REBOOT")


def test_a_data_request_sent_as_a_control_request_is_refused_not_taken_for_a_status():
    request = DataRequest([Document(text="x")], endpoint="/tag")  # no parameters: nothing of field 2 to trip on
    with pytest.raises(ProtocolError, match=r"this one also 4: another kind of message \(a DataRequest\?\)"):
        ControlRequest.from_bytes(request.to_bytes())


# -- wire layout (PROTOCOL.md) -----------------------------------------------------


def _fields(message) -> dict[str, tuple[int, int]]:
    return {field.name: (field.number, field.type) for field in message.DESCRIPTOR.fields}


def test_field_numbers_match_the_jina_wire_protocol():
    assert _fields(jina_pb2.HeaderProto) == {
        "request_id": (1, STRING),
        "status": (2, MESSAGE),
        "exec_endpoint": (3, STRING),
        "target_executor": (4, STRING),
        "timeout": (5, UINT32),
    }
    assert _fields(jina_pb2.StatusProto) == {"code": (1, ENUM), "description": (2, STRING), "exception": (3, MESSAGE)}
    assert _fields(jina_pb2.DataRequestProto) == {
        "header": (1, MESSAGE),
        "parameters": (2, MESSAGE),
        "routes": (3, MESSAGE),
        "data": (4, MESSAGE),
    }
    assert _fields(jina_pb2.DataContentProto) == {"docs": (1, MESSAGE), "docs_bytes": (2, BYTES)}
    assert _fields(jina_pb2.RelatedEntity) == {
        "id": (1, STRING),
        "address": (2, STRING),
        "port": (3, UINT32),
        "shard_id": (4, UINT32),
    }
    assert _fields(jina_pb2.ControlRequestProto) == {
        "header": (1, MESSAGE),
        "command": (2, ENUM),
        "related_entities": (3, MESSAGE),
    }
    assert dict(jina_pb2.ControlRequestProto.Command.items()) == {"STATUS": 0, "ACTIVATE": 1, "DEACTIVATE": 2}
    assert _fields(jina_pb2.EndpointsProto) == {
        "endpoints": (1, STRING),
        "write_endpoints": (2, STRING),
        "schemas": (3, MESSAGE),
    }
    assert jina_pb2.DESCRIPTOR.package == "jina"
    assert docarray_pb2.DESCRIPTOR.package == "docarray"


def test_service_paths():
    from shardnet.protocol import services

    assert services.PROCESS_SINGLE_DATA == "/jina.JinaSingleDataRequestRPC/process_single_data"
    assert services.PROCESS_DATA == "/jina.JinaDataRequestRPC/process_data"
    assert services.PROCESS_CONTROL == "/jina.JinaControlRequestRPC/process_control"
    assert services.STREAM_CALL == "/jina.JinaRPC/Call"
    assert services.ENDPOINT_DISCOVERY == "/jina.JinaDiscoverEndpointsRPC/endpoint_discovery"


def test_envelope_and_full_message_share_one_wire_form():
    request = sample_request()
    envelope = jina_pb2.DataRequestEnvelope.FromString(request.to_bytes())
    full = jina_pb2.DataRequestProto.FromString(envelope.SerializeToString())
    assert full.header.exec_endpoint == "/index" and [d.text for d in full.data.docs.docs] == ["alpha", "beta"]


# -- lazy decoding -------------------------------------------------------------------


def test_routed_request_keeps_the_very_same_bytes():
    raw = sample_request().to_bytes()
    request = DataRequest.from_bytes(raw)
    assert request.endpoint == "/index"
    assert request.request_id
    assert request.parameters["top_k"] == 3.0
    assert request.to_bytes() is raw
    assert "header only" in repr(request)


def test_from_bytes_does_not_decode_until_read():
    # documents that would fail to decode do not matter to a request only routed
    request = DataRequest(endpoint="/index")
    envelope = jina_pb2.DataRequestEnvelope.FromString(request.to_bytes())
    envelope.data = b"\x0a\x03\xff\xff\xff"  # DataContent.docs, framed, holding garbage
    raw = envelope.SerializeToString()
    routed = DataRequest.from_bytes(raw)
    assert routed.endpoint == "/index"
    assert routed.to_bytes() is raw
    with pytest.raises(ProtocolError, match="malformed DataRequest"):
        routed.docs


def test_reading_the_header_checks_the_framing_of_the_documents_field():
    # the peek walks DataContent's own fields (to find a pickle), so a corrupt length there is caught at once
    envelope = jina_pb2.DataRequestEnvelope.FromString(DataRequest(endpoint="/index").to_bytes())
    envelope.data = b"\x0a\xff\xff"  # DataContent.docs with a corrupt length
    with pytest.raises(ProtocolError, match="malformed DataRequest data"):
        DataRequest.from_bytes(envelope.SerializeToString()).endpoint


# -- unknown fields -------------------------------------------------------------------


def test_unknown_field_survives_reading_the_endpoint():
    raw = sample_request().to_bytes() + UNKNOWN_FIELD
    request = DataRequest.from_bytes(raw)
    assert request.endpoint == "/index"
    assert request.to_bytes() == raw


def plain_request() -> DataRequest:
    """A request without map fields (Struct parameters or tags): protobuf re-encodes it to the same bytes.

    Maps have no canonical order on the wire, so once a request is re-encoded only its content, and the
    unknown field's bytes, can be compared with what arrived.
    """
    return DataRequest(docs=[Document(text="alpha"), Document(text="beta")], endpoint="/index")


def same_content(first: bytes, second: bytes) -> bool:
    return jina_pb2.DataRequestProto.FromString(first) == jina_pb2.DataRequestProto.FromString(second)


@pytest.mark.parametrize("make", [plain_request, sample_request])
def test_unknown_field_survives_changing_the_endpoint(make):
    raw = make().to_bytes() + UNKNOWN_FIELD
    request = DataRequest.from_bytes(raw)
    request.endpoint = "/search"
    changed = request.to_bytes()
    assert UNKNOWN_FIELD in changed and len(changed) == len(raw) + 1  # the header moved to the end, "/search"
    assert DataRequest.from_bytes(changed).endpoint == "/search"
    assert jina_pb2.DataRequestProto.FromString(changed).header.exec_endpoint == "/search"
    request.endpoint = "/index"
    restored = request.to_bytes()
    assert same_content(restored, raw) and len(restored) == len(raw)  # replaced, not another one added


@pytest.mark.parametrize("make", [plain_request, sample_request])
def test_unknown_field_survives_reading_docs(make):
    raw = make().to_bytes() + UNKNOWN_FIELD
    request = DataRequest.from_bytes(raw)
    assert request.docs.texts == ["alpha", "beta"]
    after_read = request.to_bytes()
    assert after_read.endswith(UNKNOWN_FIELD) and same_content(after_read, raw)
    if make is plain_request:
        assert after_read == raw
    request.docs.append(Document(text="gamma"))
    assert request.to_bytes().endswith(UNKNOWN_FIELD)


def test_unknown_fields_inside_header_and_documents_survive():
    proto = jina_pb2.DataRequestProto.FromString(sample_request().to_bytes())
    header = proto.header.SerializeToString() + UNKNOWN_FIELD
    doc = proto.data.docs.docs[0].SerializeToString() + UNKNOWN_FIELD
    proto.data.docs.docs[0].ParseFromString(doc)
    proto.header.ParseFromString(header)
    raw = proto.SerializeToString()
    request = DataRequest.from_bytes(raw)
    request.endpoint = "/other"
    request.docs[1].text = "changed"
    again = jina_pb2.DataRequestProto.FromString(request.to_bytes())
    assert again.header.SerializeToString().endswith(UNKNOWN_FIELD)
    assert again.data.docs.docs[0].SerializeToString().endswith(UNKNOWN_FIELD)
    assert again.header.exec_endpoint == "/other" and again.data.docs.docs[1].text == "changed"


# -- malformed bytes -------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"garbage!", b"\x0a\x80"])
def test_garbage_raises_protocol_error(garbage):
    request = DataRequest.from_bytes(garbage)  # wrapping never fails: decoding is lazy
    with pytest.raises(ProtocolError, match=rf"malformed DataRequest \({len(garbage)} bytes\)"):
        request.endpoint
    with pytest.raises(ProtocolError):
        request.docs
    assert "malformed" in repr(request)


def test_documents_nested_past_protobufs_depth_limit_are_refused_saying_so():
    request = jina_pb2.DataRequestProto()
    doc = request.data.docs.docs.add(id="root")
    for level in range(120):  # chunks of chunks: protobuf stops parsing at 100 levels
        doc = doc.chunks.add(id=f"level-{level}")
    with pytest.raises(ProtocolError, match="nested deeper than protobuf's limit of 100 levels"):
        DataRequest.from_bytes(request.SerializeToString()).docs


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads here are under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


@pytest.mark.parametrize("where, read", [
    ("request id", lambda request: request.request_id),
    ("document text", lambda request: request.docs),
])
def test_text_that_is_not_utf8_is_refused_with_that_named_among_the_causes(where, read):
    """protobuf says only "Error parsing message" (a review asked for the cause to be named)."""
    bad = b"\xc3\x28"
    if where == "request id":
        raw = _field(1, _field(1, bad))
    else:
        raw = _field(1, _field(1, b"ok")) + _field(4, _field(1, _field(1, _field(4, bad))))
    with pytest.raises(ProtocolError, match="text that is not UTF-8"):
        read(DataRequest.from_bytes(raw))


@pytest.mark.parametrize("wrong", [{"header": {}}, 42, jina_pb2.DataRequestProto()])
def test_from_bytes_takes_bytes_and_says_where_a_proto_goes(wrong):
    with pytest.raises(TypeError, match="from_proto"):
        DataRequest.from_bytes(wrong)


def test_garbage_control_request_raises_protocol_error():
    with pytest.raises(ProtocolError, match="malformed ControlRequest"):
        ControlRequest.from_bytes(b"\xff\xff\xff")


def test_every_truncation_decodes_or_raises_protocol_error():
    raw = sample_request().to_bytes()
    refused = 0
    for cut in range(len(raw)):
        request = DataRequest.from_bytes(raw[:cut])
        try:
            request.endpoint
            len(request.docs)
            request.to_bytes()
        except ProtocolError:
            refused += 1
    # only the cuts that fall exactly between top-level fields still decode
    assert refused >= len(raw) - 5


def test_docs_bytes_is_refused_never_unpickled():
    proto = jina_pb2.DataRequestProto()
    proto.header.request_id = "r1"
    proto.header.exec_endpoint = "/index"
    proto.data.docs_bytes = b"\x80\x04\x95 a pickle that must not be loaded"
    raw = proto.SerializeToString()
    # not even routed: a head passes the bytes of a request it only routes on untouched, and a Jina worker
    # would unpickle them; reading the header is where every head and worker starts
    for read in (lambda r: r.endpoint, lambda r: r.request_id, lambda r: r.docs, len, lambda r: r.parameters):
        with pytest.raises(ProtocolError, match="'r1' carries docs_bytes"):
            read(DataRequest.from_bytes(raw))
    envelope = jina_pb2.DataRequestEnvelope.FromString(raw)  # the header changed first: the envelope path refuses
    changed = DataRequest.from_bytes(envelope.SerializeToString())
    with pytest.raises(ProtocolError, match="docs_bytes"):
        changed.endpoint = "/search"
    hidden = DataRequest.from_bytes(raw + b"\x22\x00")  # an empty data after it: a bytes field would keep only
    with pytest.raises(ProtocolError, match="docs_bytes|data field more than once"):  # that one, protobuf merges
        hidden.parameters  # both; parameters read first
    proto.data.docs.SetInParent()  # the pickle first, documents after: protobuf keeps the last, we refuse anyway
    both = raw + proto.SerializeToString()
    with pytest.raises(ProtocolError, match="docs_bytes|data field more than once"):
        DataRequest.from_bytes(both).endpoint


@pytest.mark.parametrize("text_size", [0, 1, 120, 130, 16370, 16390, 70000])
def test_docs_bytes_beside_documents_of_any_size_is_refused(text_size):
    """The header read skips its walk for docs_bytes when the data field is a single docs field whose one- or
    two-byte length ends it exactly (the usual request): documents of lengths around those bounds, with a pickle
    after them or before them, are still refused, and are read without one."""
    proto = jina_pb2.DataRequestProto()
    proto.header.request_id = "r1"
    proto.data.docs.docs.add(text="x" * text_size)
    assert DataRequest.from_bytes(proto.SerializeToString()).request_id == "r1"
    docs_field = jina_pb2.DataContentProto(docs=proto.data.docs).SerializeToString()
    pickle_field = jina_pb2.DataContentProto(docs_bytes=b"\x80\x04 a pickle").SerializeToString()
    header = jina_pb2.DataRequestProto(header=proto.header).SerializeToString()
    for data in (docs_field + pickle_field, pickle_field + docs_field):
        raw = header + b"\x22" + _varint(len(data)) + data  # field 4 (data) holding both, as a sender may lay it out
        with pytest.raises(ProtocolError, match="docs_bytes"):
            DataRequest.from_bytes(raw).request_id



def test_an_endpoint_protobuf_cannot_store_is_refused_by_name_and_changes_nothing():
    """A lone surrogate (what os.fsdecode gives for bytes that are no UTF-8) raised protobuf's UnicodeEncodeError."""
    raw = DataRequest([Document(text="a")], endpoint="/index").to_bytes()
    for request in (DataRequest.from_bytes(raw), DataRequest([Document(text="a")], endpoint="/index")):
        with pytest.raises(ValueError, match="is not valid UTF-8 text"):
            request.endpoint = "/caf\udce9"
        assert request.endpoint == "/index"


# -- live header, status and routes, as Jina's ------------------------------------------------------------------


def _received(executor: str = "a", **kwargs) -> DataRequest:
    """A request as it arrives: bytes, nothing decoded, with one route entry."""
    request = DataRequest([Document(text="hi")], endpoint="/x", **kwargs)
    request.add_route(executor)
    return DataRequest.from_bytes(request.to_bytes())


def _merge_routes(requests):  # verbatim from Jina 3.34's WorkerRequestHandler.merge_routes
    if len(requests) <= 1:
        return
    existing_executor_routes = [r.executor for r in requests[0].routes]
    for request in requests[1:]:
        for route in request.routes:
            if route.executor not in existing_executor_routes:
                requests[0].routes.append(route)
                existing_executor_routes.append(route.executor)


def test_jinas_edits_through_routes_and_status_reach_the_bytes():
    """routes and status were copies: Jina's merge_routes, routes.add() and status.code = ERROR did nothing and the
    request went out unchanged (an error answer as SUCCESS)."""
    requests = [_received("a"), _received("b"), _received("c")]
    _merge_routes(requests)
    requests[0].routes.add().executor = "gateway"
    requests[0].status.code = jina_pb2.StatusProto.ERROR
    requests[0].status.description = "failed downstream"
    back = DataRequest.from_bytes(requests[0].to_bytes())
    assert [route.executor for route in back.routes] == ["a", "b", "c", "gateway"]
    assert back.is_error and back.status.description == "failed downstream" and back.docs.texts == ["hi"]


def test_edits_through_a_view_reach_the_bytes_at_every_decoding_stage():
    """A view taken before the documents decode, after a spliced endpoint or an edit of the envelope stage,
    still reaches to_bytes(): its request is decoded once, into the message the view belongs to."""
    spliced = _received()
    spliced.endpoint = "/spliced"  # received bytes, header spliced in, nothing decoded
    header = spliced.header
    assert spliced.docs.texts == ["hi"]  # the documents read after the view was taken
    header.exec_endpoint = "/edited"
    spliced.routes.add().executor = "gateway"
    back = DataRequest.from_bytes(spliced.to_bytes())
    assert back.endpoint == "/edited" and [r.executor for r in back.routes] == ["a", "gateway"]

    enveloped = _received(parameters={"k": 1})
    enveloped.parameters = {"k": 2}  # an edit at the envelope stage (documents undecoded)
    enveloped.status.code = jina_pb2.StatusProto.ERROR
    back = DataRequest.from_bytes(enveloped.to_bytes())
    assert back.is_error and back.parameters == {"k": 2.0} and back.docs.texts == ["hi"]


def test_reading_without_a_view_keeps_the_received_bytes_as_the_answer():
    """What the request path reads (and shardnet reads there) must not drop the byte cache: a forwarded answer
    would be re-serialised."""
    received = _received()
    data = received.received_bytes()
    assert (received.request_id, received.endpoint, received.is_error, received.last_executor) == (
        received.request_id, "/x", False, "a"
    )
    assert received._header().status.code == jina_pb2.StatusProto.SUCCESS
    assert received.received_bytes() is data and received.to_bytes() is data
    received.status  # handing out a live view is a change
    assert received.received_bytes() is None


# -- Jina's request API -------------------------------------------------------------------------------------------

# a request Jina 3.34 read the same way: its to_dict (but for "data", which docarray v1 writes through its pydantic
# model) and its to_json give what the tests below expect of shardnet's
JINA_CHECKED = bytes.fromhex(
    "0a2e0a027231122008011204626f6f6d1a160a0a56616c75654572726f721204626f6f6d220265781a062f696e64657812320a1c0a066e"
    "657374656412122a100a0e0a0161120911000000000000f03f0a120a05746f705f6b12091100000000000008401a040a026578220f0a0d"
    "0a0b0a026431220568656c6c6f"
)


def test_to_dict_and_to_json_give_what_jinas_give_for_the_same_bytes():
    import json

    request = DataRequest.from_bytes(JINA_CHECKED)
    assert not request.is_decompressed
    assert request.to_dict() == {
        "header": {
            "request_id": "r1", "exec_endpoint": "/index",
            "status": {
                "code": 1, "description": "boom",
                "exception": {"name": "ValueError", "args": ["boom"], "executor": "ex"},
            },
        },
        "parameters": {"top_k": 3.0, "nested": {"a": 1.0}},
        "routes": [{"executor": "ex"}],
        "data": [{"id": "d1", "text": "hello"}],
    }
    assert request.is_decompressed  # read, not changed (a Struct's map is written back in another order)
    parsed = jina_pb2.DataRequestProto.FromString
    assert parsed(request.to_bytes()) == parsed(JINA_CHECKED)
    as_json = json.loads(request.to_json())
    assert as_json["data"] == {"docs": {"docs": [{"id": "d1", "text": "hello"}]}}
    assert as_json["header"]["status"]["code"] == "ERROR"  # protobuf's JSON names enums, as Jina's to_json does
    assert list(json.loads(request.to_json())) == sorted(as_json)


def test_jinas_request_idioms():
    """data.docs get and set, a docs setter, add_executor, nbytes, SerializeToString and bytes() were missing."""
    request = DataRequest([Document(text="a")], endpoint="/x")
    assert request.data.docs.texts == ["a"]
    request.data.docs = [Document(text="b"), Document(text="c")]  # as Jina's gateway builds a request
    assert request.docs.texts == ["b", "c"]
    request.docs = [docarray_pb2.DocumentProto(text="d")]
    assert request.docs.texts == ["d"]
    request.add_executor("gateway")
    assert request.last_executor == "gateway" and not request.routes[0].HasField("start_time")
    wire = request.to_bytes()
    assert bytes(request) == request.SerializeToString() == wire and request.nbytes == len(wire)
    received = DataRequest.from_bytes(wire)
    received.add_executor("exec")
    received.data.docs = [Document(text="e")]
    assert received.nbytes == len(received.to_bytes())  # counted without writing it out
    back = DataRequest.from_bytes(received.to_bytes())
    assert [r.executor for r in back.routes] == ["gateway", "exec"] and back.docs.texts == ["e"]


@pytest.mark.parametrize("message", [b"\x0a\x00", bytearray(b"\x0a\x00"), memoryview(b"\x0a\x00")])
def test_a_message_as_the_first_argument_is_refused_with_the_constructor_to_use(message):
    """DataRequest(some_bytes), Jina's form, said "documents are shardnet.Document ... got int"."""
    with pytest.raises(TypeError, match=r"\(2 bytes\): wrap a received message with DataRequest.from_bytes"):
        DataRequest(message)
    with pytest.raises(TypeError, match=r"got a DataRequestProto: wrap it with DataRequest.from_proto"):
        DataRequest(jina_pb2.DataRequestProto())


JINAS_DICT_FORM = {"header": {"exec_endpoint": "/index"}, "data": {"docs": {"docs": [{"id": "a", "text": "hi"}]}}}


@pytest.mark.parametrize("message, builder", [
    (JINAS_DICT_FORM, json_format.ParseDict),
    (json.dumps(JINAS_DICT_FORM), json_format.Parse),
], ids=["dict", "json"])
def test_a_message_as_a_dict_or_json_is_refused_saying_how_to_build_it(message, builder):
    """Jina's DataRequest(dict) and DataRequest('{json}') said "documents are shardnet.Document objects, got
    str" (the dict's keys, the text's characters): what the argument was taken for, and the way that works."""
    with pytest.raises(TypeError) as refused:
        DataRequest(message)
    said = str(refused.value)
    assert f"got a {type(message).__name__}" in said and "Jina's DataRequest(request) form" in said
    assert f"DataRequest.from_proto(json_format.{builder.__name__}(" in said
    built = DataRequest.from_proto(builder(message, jina_pb2.DataRequestProto()))  # what it says to write works
    assert built.endpoint == "/index" and built.docs.texts == ["hi"]


def test_jinas_add_exception_marks_the_request_failed():
    """Jina's head, gateway and worker code write ``request.add_exception(ex, executor)`` (the executor an object,
    named by its class); shardnet had only ``set_exception`` and the ported call failed with AttributeError."""

    class Encoder:  # Jina passes the Executor itself
        pass

    request = sample_request()
    try:
        raise ValueError("bad", 7)
    except ValueError as exc:
        request.add_exception(exc, Encoder())
    back = DataRequest.from_bytes(request.to_bytes())
    assert back.is_error and back.status.description == "ValueError('bad', 7)"
    exception = back.status.exception
    assert (exception.name, list(exception.args), exception.executor) == ("ValueError", ["bad", "7"], "Encoder")
    assert any("ValueError" in line for line in exception.stacks)
    named = sample_request()
    named.add_exception(KeyError("k"), executor="enc")  # a name, as set_exception takes
    assert named.status.exception.executor == "enc"
    bare = sample_request()
    bare.add_exception(RuntimeError("x"))
    assert bare.is_error and bare.status.exception.executor == ""
