"""Small hostile requests must not cost a head or a worker huge memory or a blocked event loop.

Each test sends what a hostile review sent: a request padded with millions of
tiny fields (the header walk), millions of empty documents, sparse arrays that
claim huge shapes, executor exceptions whose text protobuf cannot store. Work
is asserted by counting what the code reads or allocates, never by timing.
"""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

import executors
from shardnet import ControlRequest, DataRequest, Document, ProtocolError
from shardnet.protocol import services
from shardnet.protocol.messages import MAX_PARSED_FIELDS, MAX_TOP_LEVEL_FIELDS
from shardnet.protocol.wire import count_fields, field_spans
from shardnet.runtimes.head import Head
from shardnet.runtimes.worker import Worker

PADDING = b"\x78\x00"  # field 15, varint 0: unknown to every message here, 2 bytes each


def ld(tag: int, body: bytes) -> bytes:
    """A length-delimited field: tag byte, varint length, body."""
    out, n = bytearray([tag]), len(body)
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out) + body


class CountingBytes(bytes):
    """Bytes that count how often a byte is read from them: the work a walk does, whatever the machine's speed."""

    def __getitem__(self, index):
        self.reads = getattr(self, "reads", 0) + 1
        return super().__getitem__(index)


async def raw_call(address: str, payload: bytes, timeout: float = 30.0) -> tuple[bytes, dict]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(services.PROCESS_SINGLE_DATA)(payload, timeout=timeout)
        reply = await call
        return reply, dict(tuple(await call.trailing_metadata()))


# -- 1. the header walk ---------------------------------------------------------------------------------------


def test_a_request_padded_with_tiny_fields_is_refused_after_a_bounded_walk():
    """10 million 2-byte unknown fields (20 MB) took the header walk 3.4 s per 19 MiB, on the event loop."""
    request = DataRequest.from_bytes(b"")
    request._buffer = CountingBytes(b"\x0a\x04\x0a\x02id" + PADDING * 10_000_000)
    with pytest.raises(ProtocolError, match=f"DataRequest .* has more than {MAX_TOP_LEVEL_FIELDS} top-level fields"):
        request.request_id
    # a tag and a varint per field, then it stopped: the padding's size did not matter
    assert request._buffer.reads <= 3 * (MAX_TOP_LEVEL_FIELDS + 1)


def test_padding_inside_the_data_field_is_refused_after_a_bounded_walk():
    """The walk that looks for a pickle in the documents field is bounded the same way."""
    data = ld(0x0A, b"\x0a\x02id") + ld(0x22, ld(0x0A, b"") + PADDING * 1_000_000)
    request = DataRequest.from_bytes(b"")
    request._buffer = CountingBytes(data)
    with pytest.raises(ProtocolError, match=f"DataRequest data .* has more than {MAX_TOP_LEVEL_FIELDS} top-level"):
        request.endpoint
    assert request._buffer.reads <= 3 * (MAX_TOP_LEVEL_FIELDS + 1) + 10


def test_a_request_with_many_routes_is_still_taken():
    """The bound is far above what a real request carries: routes, one per executor passed, are the repetition."""
    request = DataRequest([Document(text="a")], endpoint="/tag")
    for index in range(1_000):
        request.add_route(f"executor-{index}")
    back = DataRequest.from_bytes(request.to_bytes())
    assert back.endpoint == "/tag" and len(back.routes) == 1_000 and back.docs[0].text == "a"


@pytest.mark.parametrize("decode", [lambda data: DataRequest.from_bytes(data).docs, ControlRequest.from_bytes])
def test_parse_refuses_padding_before_protobuf_lists_it(decode):
    """protobuf keeps unknown fields; listing millions of them (to check their wire types) took seconds."""
    with pytest.raises(ProtocolError, match="more than .* top-level fields"):
        decode(PADDING * 1_000_000)
    counted = CountingBytes(PADDING * 1_000_000)
    assert count_fields(counted, MAX_PARSED_FIELDS) == MAX_PARSED_FIELDS + 1
    assert counted.reads <= 3 * (MAX_PARSED_FIELDS + 1)


def test_field_spans_refuses_past_max_fields_and_takes_up_to_it():
    data = PADDING * 5 + ld(0x0A, b"x")
    assert field_spans(data, frozenset({1}), "m", max_fields=6) == [(1, 12, 13)]
    with pytest.raises(ProtocolError, match=r"m \(13 bytes\) has more than 5 top-level fields"):
        field_spans(data, frozenset({1}), "m", max_fields=5)


async def test_a_head_refuses_a_padded_request_and_keeps_serving(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create(label="t")))
    head = await runtimes(Head("padded", connections={0: [worker.server.address]}))
    good = DataRequest([Document(text="a")], endpoint="/tag").to_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw_call(head.server.address, good + PADDING * 500_000)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than {MAX_TOP_LEVEL_FIELDS} top-level fields" in refused.value.details()
    reply, _ = await raw_call(head.server.address, good)
    answer = DataRequest.from_bytes(reply)
    assert not answer.is_error and answer.docs[0].tags["by"] == "t"
