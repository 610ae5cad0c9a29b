"""Small hostile requests must not cost a head or a worker huge memory or a blocked event loop.

Each test sends what a hostile review sent: a request padded with millions of
tiny fields (the header walk), millions of empty documents, sparse arrays that
claim huge shapes, executor exceptions whose text protobuf cannot store. Work
is asserted by counting what the code reads or allocates, never by timing.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import executors
import grpc
import grpc.aio
import numpy as np
import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from shardnet import ControlRequest, DataRequest, Document, Executor, ProtocolError, requests
from shardnet.protocol import budget, messages, ndarray, services
from shardnet.protocol.messages import (
    MAX_DOCUMENT_FIELDS,
    MAX_ANSWER_FIELDS,
    MAX_DOCUMENTS,
    MAX_LIST_DOCUMENTS,
    MAX_PARSED_FIELDS,
    MAX_TOP_LEVEL_FIELDS,
    parse,
)
from shardnet.protocol.proto import docarray_pb2, jina_pb2
from shardnet.protocol.documents import DocumentList
from shardnet.protocol.wire import DocumentTally, check_document_count, count_fields, field_spans
from shardnet.runtimes.head import Head
from shardnet.runtimes.processes import ShardnetProcess, stop_all
from shardnet.runtimes.server import request_list
from shardnet.runtimes.worker import Worker
from shardnet.testing import EchoServer

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


async def raw_call(
    address: str, payload: bytes, timeout: float = 30.0, method: str = services.PROCESS_SINGLE_DATA
) -> tuple[bytes, dict]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(method)(payload, timeout=timeout)
        reply = await call
        return reply, dict(tuple(await call.trailing_metadata()))


# -- 1. the header walk ---------------------------------------------------------------------------------------


def test_a_request_padded_with_tiny_fields_is_refused_after_a_bounded_walk():
    """10 million 2-byte unknown fields (20 MB) took the header walk 3.4 s per 19 MiB, on the event loop."""
    request = DataRequest.from_bytes(b"")
    request._buffer = CountingBytes(b"\x0a\x04\x0a\x02id" + PADDING * 10_000_000)
    with pytest.raises(ProtocolError, match=f"DataRequest .* has more than {MAX_TOP_LEVEL_FIELDS} top-level fields"):
        request.request_id  # noqa: B018
    # a tag and a varint per field, then it stopped: the padding's size did not matter
    assert request._buffer.reads <= 3 * (MAX_TOP_LEVEL_FIELDS + 1)


def test_padding_inside_the_data_field_is_refused_after_a_bounded_walk():
    """The walk that looks for a pickle in the documents field is bounded the same way."""
    data = ld(0x0A, b"\x0a\x02id") + ld(0x22, ld(0x0A, b"") + PADDING * 1_000_000)
    request = DataRequest.from_bytes(b"")
    request._buffer = CountingBytes(data)
    with pytest.raises(ProtocolError, match=f"DataRequest data .* has more than {MAX_TOP_LEVEL_FIELDS} top-level"):
        request.endpoint  # noqa: B018
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


async def test_a_request_at_the_field_bound_gets_its_answer_through_a_head(runtimes):
    """The worker adds a route entry and the parameters of a dict result: the answer of a request at the bound is
    read with room for them. Refused, it cut the head's request stream, and the others on it ran twice."""
    worker = await runtimes(Worker(executors.Tagger.create(label="t")))
    head = await runtimes(Head("bound", connections={0: [worker.server.address]}))
    at_bound = DataRequest([Document(text="a")], endpoint="/count")
    for _ in range(MAX_TOP_LEVEL_FIELDS - 2):  # header and data are the other two
        at_bound.add_route("")
    for _ in range(2):  # the first opens the head's streams; the second goes on one
        reply, _ = await raw_call(head.server.address, at_bound.to_bytes())
        answer = DataRequest.from_bytes(reply, max_documents=None, max_fields=MAX_ANSWER_FIELDS)
        assert not answer.is_error, answer.status
        assert [result["docs"] for result in answer.parameters["__results__"].values()] == [1]
        assert len(answer.routes) == MAX_TOP_LEVEL_FIELDS - 1


def with_routes(fields: int, endpoint: str = "/count") -> DataRequest:
    """A request of ``fields`` top-level fields: header, data and empty route entries."""
    request = DataRequest([Document(text="a")], endpoint=endpoint)
    for _ in range(fields - 2):
        request.add_route("")
    return request


async def test_a_head_with_uses_before_and_after_takes_requests_with_room_for_their_hops(runtimes):
    """uses_before's answer goes on to the shards as a request, and the merge of theirs to uses_after: a request
    at the bound was refused by the shards once uses_before had run it (a regression review). Now the head
    takes two hops' additions fewer fields, refusing more up front, before anything runs."""
    before, shard, after = [await runtimes(Worker(executors.Tagger.create(label=label))) for label in "bsa"]
    head = await runtimes(Head("hops", connections={0: [shard.server.address]},
                               uses_before=before.server.address, uses_after=after.server.address))
    bound = MAX_TOP_LEVEL_FIELDS - 2 * messages.HOP_FIELDS
    reply, _ = await raw_call(head.server.address, with_routes(bound).to_bytes())
    answer = DataRequest.from_bytes(reply, max_documents=None, max_fields=MAX_ANSWER_FIELDS)
    assert not answer.is_error, answer.status
    assert len(answer.routes) == bound - 2 + 3  # each of the three ran it, and returned a dict
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw_call(head.server.address, with_routes(bound + 1, "/tag").to_bytes())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than {bound} top-level fields" in refused.value.details()
    assert [worker.executor.calls for worker in (before, shard, after)] == [0, 0, 0]  # refused before any ran it


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


# -- 2. documents ---------------------------------------------------------------------------------------------

HEADER = ld(0x0A, b"\x0a\x02id\x1a\x06/count")  # request id "id", endpoint /count


def request_of(array: bytes) -> bytes:
    """A DataRequest whose documents field holds the DocumentArray ``array`` (its bytes)."""
    return HEADER + ld(0x22, ld(0x0A, array))


def documents_in(array: docarray_pb2.DocumentArrayProto) -> int:
    """What protobuf decodes: every document, chunks and matches at every depth."""
    stack, count = list(array.docs), 0
    while stack:
        document = stack.pop()
        count += 1
        stack.extend(document.chunks)
        stack.extend(document.matches)
    return count


def check(array: bytes, limit: int, max_fields: int = 10**9) -> None:
    check_document_count(array, [(0, len(array))], limit, max_fields, "test")


@pytest.mark.parametrize(
    "array",
    [
        b"\x0a\x00" * (MAX_DOCUMENTS + 1),  # empty top-level documents: 2 bytes each, some 200 decoded
        ld(0x0A, b"\x7a\x00" * (MAX_DOCUMENTS + 1)),  # as the matches of one document (a field too large for a run)
        ld(0x0A, ld(0x72, b"\x7a\x00" * MAX_DOCUMENTS)),  # matches of a chunk
    ],
    ids=["top-level", "matches", "matches-of-a-chunk"],
)
def test_more_documents_than_the_bound_are_refused_before_decoding_after_bounded_work(array):
    request = DataRequest.from_bytes(b"")
    request._buffer = CountingBytes(request_of(array))
    with pytest.raises(ProtocolError, match=f"too many documents: at most {MAX_DOCUMENTS} are taken in one request"):
        request.docs  # noqa: B018
    assert request._message is None  # nothing was decoded
    # a tag and a length per field walked at most, and no more fields than the walk's bound
    assert request._buffer.reads <= 3 * MAX_DOCUMENT_FIELDS


def test_a_request_at_the_bound_is_taken():
    array = b"\x0a\x00" * (MAX_DOCUMENTS - 1) + ld(0x0A, b"\x0a\x01x")  # the last one has an id: "x"
    request = DataRequest.from_bytes(request_of(array))
    assert len(request.docs) == MAX_DOCUMENTS and request.docs[MAX_DOCUMENTS - 1].id == "x"


def test_padding_inside_documents_stops_the_count_at_its_field_bound():
    """Fields that are no documents, but whose bytes could start one (0x72 'r'), make the count walk them."""
    array = ld(0x0A, b"\xa8\x01\x72" * (MAX_DOCUMENT_FIELDS + 10))  # field 21, varint 114 ('r'), in one document
    counted = CountingBytes(array)
    with pytest.raises(ProtocolError, match=f"could not be counted within {MAX_DOCUMENT_FIELDS} fields"):
        check(counted, MAX_DOCUMENTS, MAX_DOCUMENT_FIELDS)
    assert counted.reads <= 5 * MAX_DOCUMENT_FIELDS  # a tag's two bytes (one read twice), a value byte


def test_a_list_of_millions_of_empty_requests_is_refused_before_protobuf_parses_it():
    """The list's own entries decode to tens of bytes each: counted first, like any parse."""
    with pytest.raises(ProtocolError, match=f"DataRequestList .* has more than {MAX_PARSED_FIELDS} top-level fields"):
        parse(jina_pb2.DataRequestListEnvelope, b"\x0a\x00" * 5_000_000, "DataRequestList")


documents = st.recursive(
    st.builds(lambda text: docarray_pb2.DocumentProto(text=text), st.sampled_from(["", "r", "z" * 200, "rose"])),
    lambda children: st.builds(
        lambda chunks, matches, blob: docarray_pb2.DocumentProto(chunks=chunks, matches=matches, blob=blob),
        st.lists(children, max_size=4),
        st.lists(children, max_size=4),
        st.sampled_from([b"", b"\x72\x7a" * 40, b"\x0a" * 70_000]),  # tag-like bytes; one too large for a run
    ),
    max_leaves=40,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(documents, max_size=12))
def test_the_count_agrees_with_protobuf_at_the_bound_and_one_below(docs):
    """Whatever the nesting, and whichever of the count's ways answers: the bound is exact."""
    array = docarray_pb2.DocumentArrayProto(docs=docs)
    data, count = array.SerializeToString(), documents_in(array)
    check(data, count)  # exactly as many as allowed: taken
    if count:
        with pytest.raises(ProtocolError, match="too many documents"):
            check(data, count - 1)


def test_documents_larger_than_a_run_are_walked_and_their_nested_documents_counted():
    inner = docarray_pb2.DocumentProto(blob=b"r" * 100_000, matches=[docarray_pb2.DocumentProto()] * 3)
    outer = docarray_pb2.DocumentProto(blob=b"z" * 100_000, chunks=[inner] * 2, matches=[docarray_pb2.DocumentProto()])
    array = docarray_pb2.DocumentArrayProto(docs=[outer, docarray_pb2.DocumentProto(text="r")])
    data = array.SerializeToString()
    assert documents_in(array) == 11
    check(data, 11)
    with pytest.raises(ProtocolError, match="too many documents: at most 10"):
        check(data, 10)


EXECUTOR = f"{Path(executors.__file__).resolve()}:Tagger"


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))


@pytest.mark.timeout(120)
def test_a_worker_refuses_millions_of_empty_documents_without_decoding_them(tmp_path):
    """5 million empty documents in 9.5 MiB cost a worker 1.1 GB before; now INVALID_ARGUMENT and no balloon."""
    worker = ShardnetProcess("worker", ["worker", "--uses", EXECUTOR, "--workspace", str(tmp_path)], tmp_path / "w.log")
    try:
        address = worker.launch().wait_ready()
        base = peak_rss_mib(worker.pid)
        payload = request_of(b"\x0a\x00" * 5_000_000)
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(services.PROCESS_SINGLE_DATA)(payload, timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"at most {MAX_DOCUMENTS} are taken in one request" in refused.value.details()
            good = DataRequest([Document(text="a")], endpoint="/tag").to_bytes()
            assert not DataRequest.from_bytes(channel.unary_unary(services.PROCESS_SINGLE_DATA)(good)).is_error
        # the request's bytes a few times over (gRPC's buffer, our copy), not the gigabyte of its documents
        assert peak_rss_mib(worker.pid) - base < 10 * len(payload) / 2**20
    finally:
        stop_all([worker])


# -- 3. sparse arrays -----------------------------------------------------------------------------------------


def huge_sparse(doc_id: str) -> Document:
    """One value in 8192 x 8191 float32: 256 MiB once dense (just under the limit for one array), 60 bytes sent."""
    doc = Document(id=doc_id)
    ndarray.write_sparse(np.zeros((1, 2), dtype="<i8"), np.ones(1, dtype="<f4"), (8192, 8191), doc.proto.embedding)
    return doc


def embedding_of_100_in_100k(doc_id: str, seed: int) -> Document:
    """A legitimate sparse embedding: 100 values in 100,000 float32 dimensions (2 KB sent, 400 KB dense)."""
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(100_000, size=100, replace=False))
    doc = Document(id=doc_id)
    indices = np.stack([np.zeros(100, dtype="<i8"), positions.astype("<i8")], axis=1)
    ndarray.write_sparse(indices, rng.random(100).astype("<f4"), (1, 100_000), doc.proto.embedding)
    return doc


class Stacker(Executor):
    """What an indexer does: read every embedding of the request (and keep them all, as np.stack would)."""

    @requests(on="/index")
    def index(self, docs, parameters, **kwargs):
        embeddings = [doc.embedding for doc in docs]
        return {"rows": len(embeddings), "values": float(sum(embedding.sum() for embedding in embeddings))}


async def test_sparse_arrays_of_one_request_share_a_budget_end_to_end(runtimes):
    """12 documents of some 1,000 bytes in all made a worker allocate 3 GB: each array was bounded, not their sum."""
    worker = await runtimes(Worker(Stacker.create()))
    payload = DataRequest([huge_sparse(f"d{i}") for i in range(12)], endpoint="/index").to_bytes()
    assert len(payload) < 1_200
    reply, trailing = await raw_call(worker.server.address, payload)
    answer = DataRequest.from_bytes(reply)
    assert answer.is_error and trailing.get("is-error") == "true"
    assert answer.status.exception.name == "ProtocolError"
    assert f"of a request of {len(payload)} bytes" in answer.status.description
    assert f"may expand to in all: {budget.MAX_DENSE_BYTES} bytes" in answer.status.description
    # legitimate sparse embeddings still go through, a Jina-sized batch and more
    docs = [embedding_of_100_in_100k(f"e{i}", i) for i in range(200)]
    reply, _ = await raw_call(worker.server.address, DataRequest(docs, endpoint="/index").to_bytes())
    results = DataRequest.from_bytes(reply).parameters["__results__"]
    assert not DataRequest.from_bytes(reply).is_error and next(iter(results.values()))["rows"] == 200


def test_an_array_read_again_is_charged_once_and_the_budget_grows_with_the_message():
    docs = [embedding_of_100_in_100k(f"e{i}", i) for i in range(640)]  # 256 MB dense: within the budget's floor
    request = DataRequest.from_bytes(DataRequest(docs, endpoint="/index").to_bytes())
    for _ in range(3):  # three passes over the same arrays cost what one does
        assert sum(int(doc.embedding.shape[1]) for doc in request.docs) == 640 * 100_000
    assert request._budget.used == 640 * 400_000 <= request._budget.limit == budget.MAX_DENSE_BYTES
    twice = DataRequest(docs * 2, endpoint="/index").to_bytes()  # 1,280 of them in 2.7 MB: 512 MB dense
    with pytest.raises(ProtocolError, match="sparse arrays of a request of .* may expand to in all"):
        [doc.embedding for doc in DataRequest.from_bytes(twice).docs]
    padded = twice + ld(0x7A, b"x" * 6_000_000)  # an unknown field makes the message 8.7 MB: 64 times that fits
    bigger = DataRequest.from_bytes(padded)
    assert len([doc.embedding for doc in bigger.docs]) == 1_280
    assert bigger._budget.limit == budget.DENSE_PER_MESSAGE_BYTE * len(padded)


def test_documents_wrapped_or_listed_on_their_own_have_a_budget_too():
    """A list made over a message's field (as a worker does for docs_matrix) or a document wrapped alone."""
    field = docarray_pb2.DocumentArrayProto(docs=[huge_sparse(f"d{i}").proto for i in range(2)]).docs
    listed = list(DocumentList(field))
    assert listed[0].embedding.shape == (8192, 8191)
    with pytest.raises(ProtocolError, match="documents read outside a request"):
        listed[1].embedding  # noqa: B018
    alone = Document(proto=huge_sparse("a").proto)
    assert alone.embedding.shape == alone.embedding.shape == (8192, 8191)  # the same array twice: charged once
    assert Document(id="mine", embedding=np.ones(3)).embedding.sum() == 3  # built here: unbounded


def test_documents_moved_into_another_request_bring_their_budget():
    """A worker joining the shards' answers (uses_after over ALL) moves every document into the first's list."""
    answers = [
        DataRequest.from_bytes(DataRequest([huge_sparse(f"s{shard}")], endpoint="/index").to_bytes())
        for shard in range(3)
    ]
    first = answers[0].docs
    first.replace([doc for answer in answers for doc in answer.docs])
    assert [doc.embedding.shape for doc in first] == [(8192, 8191)] * 3


# -- 4. executor exceptions protobuf cannot store as they are --------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


SURROGATE_NAME = b"caf\xe9.txt".decode("utf-8", "surrogateescape")  # what os.fsdecode gives for a Latin-1 name


class Nasty(Executor):
    """Handlers that raise what a real one may: file names that are no UTF-8, objects that cannot be printed."""

    @requests(on="/surrogate")
    def surrogate(self, docs, parameters, **kwargs):
        raise FileNotFoundError(f"no such file: {SURROGATE_NAME}", 2)

    @requests(on="/unprintable-argument")
    def unprintable_argument(self, docs, parameters, **kwargs):
        raise ValueError(Unprintable(), "and text")

    @requests(on="/unprintable-exception")
    def unprintable_exception(self, docs, parameters, **kwargs):
        raise UnprintableError("hidden")


@pytest.mark.parametrize(
    "endpoint, name, args",
    [
        ("/surrogate", "FileNotFoundError", ["no such file: caf\\udce9.txt", "2"]),
        ("/unprintable-argument", "ValueError", ["<unprintable Unprintable: str() raised RuntimeError>", "and text"]),
        ("/unprintable-exception", "UnprintableError", ["hidden"]),
    ],
)
async def test_an_executor_exception_protobuf_cannot_store_as_is_still_arrives_jina_shaped(
    runtimes, endpoint, name, args
):
    """Such an exception failed the answer itself: the client got UNKNOWN "Unexpected UnicodeEncodeError" (or the
    RuntimeError of a __str__), not the executor's error."""
    # the worker logs the description set_exception made: an exception that cannot be printed is logged too (pytest's
    # capturing handler would raise what logging's own handlers only report, so this also checks the log line)
    worker = await runtimes(Worker(Nasty.create()))
    request = DataRequest([Document(text="a")], endpoint=endpoint)
    reply, trailing = await raw_call(worker.server.address, request.to_bytes())
    answer = DataRequest.from_bytes(reply)
    assert answer.is_error and trailing.get("is-error") == "true"
    exception = answer.status.exception
    assert (exception.name, list(exception.args), exception.executor) == (name, args, "Nasty")
    assert answer.status.description  # repr(exc), or what stands for it
    assert exception.stacks and "raise " in "".join(exception.stacks)
    assert answer.docs[0].text == "a"  # nothing lost: the documents come back
    reply, _ = await raw_call(worker.server.address, DataRequest([Document(text="b")], endpoint="/nothing").to_bytes())
    assert not DataRequest.from_bytes(reply).is_error  # and the worker serves on


def test_set_error_escapes_what_protobuf_would_refuse():
    request = DataRequest([Document(text="a")])
    request.set_error(f"cannot open {SURROGATE_NAME}", name=f"Err{SURROGATE_NAME[3]}", executor=SURROGATE_NAME)
    back = DataRequest.from_bytes(request.to_bytes())
    assert back.status.description == "cannot open caf\\udce9.txt" and back.status.exception.name == "Err\\udce9"


# -- 5. bounds a call shares, and what they leave alone (a second review) --------------------------------------


def test_a_header_or_data_field_sent_over_and_over_is_refused():
    """Each data field was walked up to its own bound: a thousand padded ones held a head's loop for seconds."""
    for repeated in (HEADER + ld(0x22, PADDING * 10) * 1000, ld(0x22, b"") + HEADER + ld(0x22, b"")):
        with pytest.raises(ProtocolError, match="holds its data field more than once"):
            DataRequest.from_bytes(repeated).endpoint  # noqa: B018
    with pytest.raises(ProtocolError, match="holds its header field more than 4 times"):
        DataRequest.from_bytes(HEADER * 5).endpoint  # noqa: B018
    assert DataRequest.from_bytes(HEADER * 4 + ld(0x22, b"")).endpoint == "/count"  # merged, as protobuf does


async def test_a_request_list_shares_one_calls_bounds_end_to_end(runtimes):
    """Bounded one by one, a process_data list of 20 requests held 20 times the documents a request may (5 million
    empty ones: 5.8 GB), and its sparse arrays expanded 6 times over the budget of one (found by a review). A list
    decoded by a worker now holds at most MAX_LIST_DOCUMENTS in all (a uses_after's: four of the largest answers),
    counted by one walk's work; a head forwards lists undecoded and counts nothing."""
    counter = await runtimes(Worker(executors.Tagger.create()))
    head = await runtimes(Head("dep", connections={0: [counter.server.address]}))
    fifth = request_of(b"\x0a\x00" * (MAX_LIST_DOCUMENTS // 5 + 1))  # each alone is taken
    envelope = jina_pb2.DataRequestListEnvelope(requests=[fifth] * 5).SerializeToString()
    for address in (counter.server.address, head.server.address):  # the head forwards; its worker refuses
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw_call(address, envelope, method=services.PROCESS_DATA)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, address
        assert f"at most {MAX_LIST_DOCUMENTS} are taken in one call, every request of it" in refused.value.details()
    # more than one request may hold: three shards' answers of 101,000 matches each, to a uses_after
    answers = [request_of(b"\x0a\x00" * 101_000)] * 3
    reply, _ = await raw_call(
        counter.server.address, jina_pb2.DataRequestListEnvelope(requests=answers).SerializeToString(),
        method=services.PROCESS_DATA,
    )
    [counted] = DataRequest.from_bytes(reply, max_documents=None).parameters["__results__"].values()
    assert counted["docs"] == 303_000
    # documents of large blobs are counted as the few they are (a bound of them refused two 1 MB documents)
    blobs = [DataRequest([Document(blob=b"r" * 1_100_000)], endpoint="/count").to_bytes()] * 2
    reply, _ = await raw_call(
        counter.server.address, jina_pb2.DataRequestListEnvelope(requests=blobs).SerializeToString(),
        method=services.PROCESS_DATA,
    )
    [counted] = DataRequest.from_bytes(reply).parameters["__results__"].values()
    assert counted["docs"] == 2
    worker = await runtimes(Worker(Stacker.create()))
    sparse = [DataRequest([huge_sparse(f"s{i}")], endpoint="/index").to_bytes() for i in range(6)]
    envelope = jina_pb2.DataRequestListEnvelope(requests=sparse).SerializeToString()
    reply, trailing = await raw_call(worker.server.address, envelope, method=services.PROCESS_DATA)
    answer = DataRequest.from_bytes(reply)
    assert answer.is_error and answer.status.exception.name == "ProtocolError", answer.status.description
    assert f"may expand to in all: {budget.MAX_DENSE_BYTES} bytes" in answer.status.description


def test_an_answer_its_caller_asked_for_may_hold_more_documents_than_a_request():
    """A head's ALL merge of three shards' 101,000 matches each holds 303,000: its caller must read it."""
    merged = request_of(b"\x0a\x00" * (MAX_DOCUMENTS + 1))
    with pytest.raises(ProtocolError, match="too many documents"):
        DataRequest.from_bytes(merged).docs  # noqa: B018
    assert len(DataRequest.from_bytes(merged, max_documents=None).docs) == MAX_DOCUMENTS + 1


def test_a_head_sets_an_endpoint_without_decoding_parameters_and_routes():
    """Setting the endpoint parsed parameters and routes: 57 MB of empty parameter values took a head 1.9 GB and
    its loop 7 s when the header named another endpoint than the call (found by a review). A header field
    appended now carries it, merged by every protobuf reader."""
    original = DataRequest([Document(text="a")], endpoint="/index", parameters={"k": [None] * 1000, "top_k": 3})
    original.add_route("gateway")
    request = DataRequest.from_bytes(original.to_bytes())
    request.endpoint = "/search"
    assert repr(request).endswith("bytes>")  # nothing decoded: neither parameters nor routes
    assert request.endpoint == "/search"
    forwarded = jina_pb2.DataRequestProto.FromString(request.to_bytes())  # as Jina reads it
    assert forwarded.header.exec_endpoint == "/search"
    assert forwarded.header.request_id == original.request_id
    assert len(forwarded.parameters["k"]) == 1000 and forwarded.routes[0].executor == "gateway"
    again = DataRequest.from_bytes(request.to_bytes())
    assert (again.endpoint, again.request_id, again.docs.texts) == ("/search", original.request_id, ["a"])


@pytest.mark.parametrize("headers", [0, 1, 2, 4])
def test_an_endpoint_is_set_without_decoding_however_many_header_fields_came(headers):
    """Bytes with no header field, or several (a sender may write them; protobuf merges them), took the decoding
    path, so a crafted request made a head decode its parameters after all (found by a review): every header
    field is cut out and one holding them merged, the endpoint changed, is appended, so hops never add up."""
    header = jina_pb2.HeaderProto(request_id="r1", exec_endpoint="/index")
    body = jina_pb2.DataRequestProto(parameters=struct_pb2.Struct(fields={"k": struct_pb2.Value(string_value="v")}))
    body.data.docs.docs.add(text="a")
    pieces = [ld(0x0A, header.SerializeToString())] * min(headers, 1) + [ld(0x0A, b"\x1a\x02/x")] * max(0, headers - 1)
    raw = b"".join(pieces) + body.SerializeToString()
    request = DataRequest.from_bytes(raw)
    request.endpoint = "/search"
    assert repr(request).endswith("bytes>")  # nothing decoded: neither parameters nor routes
    sent = request.to_bytes()
    assert len(field_spans(sent, frozenset({1}), "test")) == 1
    forwarded = jina_pb2.DataRequestProto.FromString(sent)
    assert forwarded.header.exec_endpoint == "/search" and forwarded.parameters["k"] == "v"
    assert forwarded.header.request_id == ("r1" if headers else "")
    assert forwarded.data.docs.docs[0].text == "a"
    hop = DataRequest.from_bytes(sent)  # the next hop sets it again: still one header field
    hop.endpoint = "/other"
    assert len(field_spans(hop.to_bytes(), frozenset({1}), "test")) == 1
    assert DataRequest.from_bytes(hop.to_bytes()).endpoint == "/other"


def test_a_list_of_one_request_keeps_a_requests_bound_and_its_repeat_check():
    """A list small enough not to be counted as a whole let each request decode with no bound (999,000 documents
    in a list of one), and a later one decode its data field twice (found by a review)."""
    over = request_of(b"\x0a\x00" * (MAX_DOCUMENTS + 1))
    [alone] = request_list(jina_pb2.DataRequestListEnvelope(requests=[over]).SerializeToString())
    with pytest.raises(ProtocolError, match=f"at most {MAX_DOCUMENTS} are taken in one request"):
        alone.docs  # noqa: B018
    twice = HEADER + ld(0x22, ld(0x0A, ld(0x0A, b"\x0a\x01a"))) * 2
    _, second = request_list(jina_pb2.DataRequestListEnvelope(requests=[HEADER, twice]).SerializeToString())
    with pytest.raises(ProtocolError, match="holds its data field more than once"):
        second.docs  # noqa: B018
    big = request_of(b"\x0a\x00" * (MAX_DOCUMENTS + 1))
    padded = [big, request_of(b"\x0a\x00" * (MAX_LIST_DOCUMENTS // 4))] * 2  # counted as a whole: over 2 MB
    with pytest.raises(ProtocolError, match=f"one of its requests holds more than {MAX_DOCUMENTS} documents"):
        request_list(jina_pb2.DataRequestListEnvelope(requests=padded).SerializeToString())


async def test_a_head_forwards_a_list_without_counting_its_documents(runtimes, monkeypatch):
    """Counting is for who decodes: 40 walks held a head's loop for 10 s when it counted (found by a review)."""
    walked = []
    monkeypatch.setattr(DocumentTally, "count", lambda self, data, arrays: walked.append(len(data)))
    async with EchoServer("echo") as echo:
        head = await runtimes(Head("dep", connections={0: [echo.address]}))
        fifth = request_of(b"\x0a\x00" * (MAX_LIST_DOCUMENTS // 5 + 1))
        envelope = jina_pb2.DataRequestListEnvelope(requests=[fifth] * 5).SerializeToString()
        with contextlib.suppress(grpc.aio.AioRpcError):  # the echo's answer is a list, no request: not the point
            await raw_call(head.server.address, envelope, method=services.PROCESS_DATA)
        assert echo.calls >= 1  # forwarded
    assert walked == []
