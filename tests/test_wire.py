"""Reading the header of a DataRequest from its bytes without decoding the documents."""

import pytest

from shardnet import DataRequest, Document, ProtocolError
from shardnet.protocol.proto import jina_pb2
from shardnet.protocol.wire import field_spans


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_header_is_read_without_decoding_documents():
    original = DataRequest([Document(blob=b"x" * 1_000_000)], endpoint="/search")
    data = original.to_bytes()
    routed = DataRequest.from_bytes(data)
    assert (routed.endpoint, routed.request_id, routed.is_error) == ("/search", original.request_id, False)
    assert routed._envelope is None and routed._message is None  # nothing beyond the header was decoded
    assert routed.to_bytes() is routed._buffer


def test_header_found_after_other_fields_and_repeated_headers_merge():
    first = jina_pb2.HeaderProto(request_id="abc").SerializeToString()
    second = jina_pb2.HeaderProto(exec_endpoint="/late").SerializeToString()
    unknown_varint = bytes([15 << 3 | 0, 0x96, 0x01])  # field 15, varint 150
    data = _field(2, b"") + unknown_varint + _field(1, first) + _field(1, second)
    request = DataRequest.from_bytes(data)
    assert (request.request_id, request.endpoint) == ("abc", "/late")
    assert jina_pb2.DataRequestProto.FromString(data).header.exec_endpoint == "/late"  # protobuf agrees


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x0a\x05ab", "claims 5 bytes"),
        (b"\x08\x01", "wire type 0"),  # the header field as a varint
        (b"\x7f", "unsupported wire type 7"),  # field 15
        (b"\x00\x00", "field number 0"),
        (b"\x80", "truncated varint"),
    ],
)
def test_broken_framing_is_a_protocol_error(data, reason):
    with pytest.raises(ProtocolError, match=reason):
        DataRequest.from_bytes(data).endpoint


def test_each_occurrence_of_the_field_comes_back_as_its_own_span():
    data = _field(3, b"route") + _field(4, b"docs") + _field(3, b"again")
    assert [data[start:end] for _, start, end in field_spans(data, frozenset({3}), "test")] == [b"route", b"again"]


@pytest.mark.parametrize("size", [127, 128, 200, 16_383, 16_384, 2_000_000])  # lengths of 1, 2 and 3+ varint bytes
def test_fields_of_every_length_encoding_are_skipped_exactly(size):
    header = jina_pb2.HeaderProto(exec_endpoint="/after").SerializeToString()
    data = jina_pb2.DataRequestProto(header=jina_pb2.HeaderProto(request_id="r")).SerializeToString()
    data += bytes([15 << 3 | 2]) + _varint(size) + b"d" * size + _field(1, header)  # an unknown field, a second header
    assert DataRequest.from_bytes(data).endpoint == "/after"
    assert jina_pb2.DataRequestProto.FromString(data).header.exec_endpoint == "/after"  # protobuf agrees


@pytest.mark.parametrize("data", [b"\x22\x80", b"\x22\xc8\x01"])  # a two-byte length cut short; one past the end
def test_a_length_cut_short_or_past_the_end_is_a_protocol_error(data):
    with pytest.raises(ProtocolError, match="truncated varint|claims"):
        DataRequest.from_bytes(data).endpoint


def test_field_spans_walks_a_message_nested_in_another_by_its_offsets():
    inner = b"\x12\x02ab" + b"\x0a\x01x"  # field 2 "ab", field 1 "x"
    outer = b"\x0a\x03hdr" + b"\x22" + bytes([len(inner)]) + inner + b"\x12\x00"
    [(number, start, stop)] = field_spans(outer, frozenset({4}), "outer")
    assert number == 4 and outer[start:stop] == inner
    assert [(n, outer[a:b]) for n, a, b in field_spans(outer, frozenset({1, 2}), "inner", start=start, stop=stop)] == [
        (2, b"ab"), (1, b"x")]
    cut = outer[: start + 3]  # inner's first field claims 2 bytes, the walk may read 1: sizes are the inner's own
    with pytest.raises(ProtocolError, match=r"malformed inner \(3 bytes\): field 2 claims 2 bytes, 1 left"):
        field_spans(cut, frozenset({2}), "inner", start=start, stop=start + 3)
