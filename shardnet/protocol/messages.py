"""``DataRequest`` and ``ControlRequest``: the two requests of the Jina 3 wire protocol.

A DataRequest that arrives as bytes stays bytes until someone asks for more:
reading the endpoint or the request id decodes only the header (documents stay
an opaque byte string), and ``to_bytes()`` hands back the very bytes that
arrived as long as nothing asked to change the request. Fields shardnet does
not know ride along as protobuf unknown fields, untouched.
"""

from __future__ import annotations

import numbers
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, MutableSequence
from types import MappingProxyType
from typing import Any, Optional, Sequence, Union

from google.protobuf import json_format, struct_pb2, unknown_fields
from google.protobuf.message import DecodeError, Message

from shardnet.errors import PickleRefused, ProtocolError
from shardnet.protocol.documents import Document, DocumentList, to_python, update_struct
from shardnet.protocol.budget import DenseBudget
from shardnet.protocol.ids import new_id
from shardnet.protocol.proto import jina_pb2
from shardnet.protocol.wire import DocumentTally, check_document_count, count_fields, document_bound, field_spans

# shard ids travel in protobuf int32 fields (a worker's ACTIVATE) and uint32 ones (a head's STATUS reply)
MAX_SHARD_ID = 2**31 - 1
SUCCESS = jina_pb2.StatusProto.SUCCESS


def is_shard_id(value: Any) -> bool:
    """Whether ``value`` is an integer a shard id field carries: 0 to MAX_SHARD_ID (numpy's too, not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and 0 <= value <= MAX_SHARD_ID


ERROR = jina_pb2.StatusProto.ERROR


_WIRE_TYPES = {0: "a varint", 1: "8 fixed bytes", 2: "length-delimited bytes", 3: "a group", 4: "a group end", 5: "4 fixed bytes"}


# protobuf's default recursion limit: a message nested deeper does not parse
PROTOBUF_DEPTH_LIMIT = 100

# The walk that peeks a DataRequest's header costs Python work per top-level field, and so does the one over its
# data field (DataContent) that looks for a pickle. A DataRequest has 4 fields, one of them repeated: ``routes``,
# one entry per executor or head the request passed (Jina appends one each; a head holds at most 10,000 workers).
# A message with more top-level fields than this is padding (millions of 2-byte unknown fields held a head's event
# loop for seconds) and is refused; walking up to this many costs a few milliseconds.
MAX_TOP_LEVEL_FIELDS = 10_000
# An answer holds what its request held plus what each hop adds on its way back (a worker's route entry, the
# parameters a handler returned; a head of heads passes its worker's on): read with room for them, lest a request
# at the bound be run and its answer refused (which cut a head's request stream with others' requests on it).
MAX_ANSWER_FIELDS = MAX_TOP_LEVEL_FIELDS + 100
# What one worker adds to what it answers at most: a route entry, and parameters (a dict result's). A head that
# sends a request through uses_before, whose answer goes on to the shards as a request, and the merge of theirs
# on to uses_after, takes requests with room for two such hops, so that none of them is refused further on.
HOP_FIELDS = 2
# The same bound on what ``parse`` takes, counted before protobuf parses (protobuf's unknown fields are listed one
# Python object each, and a DataRequestList's empty entries decode to tens of bytes each): twice the longest
# legitimate repetition, a process_data list of 10,000 requests or an ACTIVATE naming 10,000 workers.
MAX_PARSED_FIELDS = 20_000
# Documents one request may hold, chunks and matches at every depth included. An empty document is 2 bytes on the
# wire and some 200 once decoded (protobuf's message for 20 fields), so 5 million of them (10 MB) cost a worker a
# gigabyte; at this bound the documents of a request decode to at most about 50 MB beyond their own bytes. Jina's
# clients send 100 documents per request by default; a search of 1,000 queries for their 100 best matches is
# 101,000. Counted before protobuf decodes any of them: by C code when it can tell, by a walk otherwise.
MAX_DOCUMENTS = 250_000
# The fields the count of documents may walk (wire.check_document_count): 0.1-0.2 s of Python, up to some 0.8 s
# for fields written with the longest varints protobuf reads (measured by a review); it
# walks the top-level documents (one field each; runs of them are counted by protobuf's parser) and the fields of
# documents too large for a run, so twice the bound passes any request that holds no more, and stops padding.
MAX_DOCUMENT_FIELDS = 2 * MAX_DOCUMENTS

# Documents one process_data call may hold in all, when its list is decoded: a uses_after receives every shard's
# answer in one list, so up to four answers of the most documents a request may hold (a head forwards lists
# undecoded and counts nothing)
MAX_LIST_DOCUMENTS = 4 * MAX_DOCUMENTS
# times a DataRequest may hold its header field (protobuf merges repeats; no known sender writes a second, and a
# head setting an endpoint leaves one) and its data field (none writes two, and an edit through the envelope
# would keep only the last)
MAX_FIELD_REPEATS = MappingProxyType({1: 4, 4: 1})

# header, parameters, routes, data: all length-delimited on the wire
_DATA_REQUEST_FIELDS = frozenset({1, 2, 3, 4})
_HEADER, _HEADER_AND_DATA, _DATA = frozenset({1}), frozenset({1, 4}), frozenset({4})
_DOCS, _DOCS_BYTES = frozenset({1}), frozenset({2})  # DataContent's oneof: protobuf documents, or a pickle


def _refuse_pickle(request_id: str, what: str) -> PickleRefused:
    return PickleRefused(
        f"{what} {request_id!r:.80} carries docs_bytes (a pickle): refused, send documents as protobuf "
        "(DataContent field 1)",
        request_id=request_id,
    )


def parse(message_type: type[Message], data: bytes, what: str, max_fields: int = MAX_PARSED_FIELDS) -> Message:
    """Parse ``data`` as ``message_type``; a decoding failure becomes a ProtocolError naming ``what``.

    A declared top-level field arriving with another wire type (protobuf would keep it as an unknown
    field) is refused too: it is another message sent to the wrong method, such as an ACTIVATE to
    ``process_single_data``. Undeclared fields still pass, untouched. More than ``max_fields``
    top-level fields are refused before protobuf parses anything.
    """
    # a field takes one byte at the least (a group's start or end tag): a message no longer cannot hold too many
    if len(data) > max_fields and count_fields(data, max_fields) > max_fields:
        raise ProtocolError(
            f"{what} ({len(data)} bytes) has more than {max_fields} top-level fields; refused "
            "(padding, or another kind of message)"
        )
    message = message_type()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        # protobuf says no more than that: name the causes it may hide, the depth limit above all
        raise ProtocolError(
            f"malformed {what} ({len(data)} bytes): {exc} (truncated or corrupt bytes, another message type, "
            f"text that is not UTF-8, or documents nested deeper than protobuf's limit of {PROTOBUF_DEPTH_LIMIT} "
            "levels)"
        ) from None
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        declared = message.DESCRIPTOR.fields_by_number
        for field in unknown:
            if field.field_number in declared:
                raise ProtocolError(
                    f"malformed {what} ({len(data)} bytes): field {field.field_number} "
                    f"({declared[field.field_number].name}) arrived as {_WIRE_TYPES.get(field.wire_type, 'garbage')}, "
                    f"not as its declared type; is this another message sent to the wrong method?"
                )
    return message


def wire_text(text: str) -> str:
    """``text`` as protobuf can store it: lone surrogates (file names from os.fsdecode, surrogateescape) are
    refused by protobuf's UTF-8 check, so they are written as backslash escapes (``\\udce9``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _rendered(render: Callable[[Any], str], value: Any, what: str) -> str:
    """``render(value)`` (str or repr) as protobuf can store it; when that raises or gives no text, a
    placeholder naming the type: an error report must not fail on the error it reports."""
    try:
        text = render(value)
        if not isinstance(text, str):
            raise TypeError(f"{what} returned {type(text).__name__}")
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {what}() raised {type(exc).__name__}>"
    return wire_text(text)


def _header_field(header: jina_pb2.HeaderProto) -> bytes:
    """A DataRequest's header field holding ``header``, as bytes to join to the request's other fields."""
    return jina_pb2.DataRequestEnvelope(header=header).SerializeToString()


def _one_docs_field(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]``, a DataContent, is nothing or a single ``docs`` field whose length (of up to
    two bytes) ends it exactly: a walk for ``docs_bytes`` would find none there and refuse nothing, so none is made
    (the usual request; anything else is walked)."""
    if start == end:
        return True
    if data[start] != 0x0A or start + 1 >= end:  # field 1, length-delimited
        return False
    length = data[start + 1]
    if length < 0x80:
        return start + 2 + length == end
    if start + 2 < end and data[start + 2] < 0x80:
        return start + 3 + ((length & 0x7F) | (data[start + 2] << 7)) == end
    return False


def _check_repeats(spans: Sequence[tuple[int, int, int]], what: str) -> None:
    """Refuse a header or data field sent more often than MAX_FIELD_REPEATS allows: protobuf merges the repeats
    of a field that is no list, and each data field was walked in turn up to its own bound (a thousand padded
    data fields held a head's event loop for seconds)."""
    if len(spans) < 2 or (len(spans) == 2 and spans[0][0] != spans[1][0]):  # the usual header and data field
        return
    seen: dict[int, int] = {}
    for number, _, _ in spans:
        seen[number] = seen.get(number, 0) + 1
        if seen[number] > MAX_FIELD_REPEATS[number]:
            name = "header" if number == 1 else "data"
            times = "once" if MAX_FIELD_REPEATS[number] == 1 else f"{MAX_FIELD_REPEATS[number]} times"
            raise ProtocolError(f"{what} holds its {name} field more than {times}; refused")


def require_empty(data: bytes, method: str = "endpoint_discovery") -> None:
    """Refuse anything but ``google.protobuf.Empty`` (no bytes at all), which ``method`` takes."""
    if data:
        raise ProtocolError(f"{method} takes google.protobuf.Empty, got {len(data)} bytes of something else")


class DataRequest:
    """Documents sent to an endpoint, with parameters; decoded only as far as it is read.

    >>> req = DataRequest(docs=[Document(text="hi")], endpoint="/index", parameters={"k": 1})
    >>> req.endpoint, len(req.docs), req.parameters
    ('/index', 1, {'k': 1.0})
    >>> DataRequest.from_bytes(req.to_bytes()).request_id == req.request_id
    True
    """

    # _budget: what the sparse arrays of its documents may expand to, together (budget.DenseBudget); set when
    # the documents of received bytes decode
    # _spliced_at: once an endpoint was set on received bytes, where the one header field appended to what was
    # kept of them (their header fields cut out) begins
    __slots__ = (
        "_budget", "_buffer", "_envelope", "_max_documents", "_max_fields", "_message", "_origin", "_peeked", "_spliced_at"
    )

    def __init__(
        self,
        docs: Optional[Iterable[Union[Document, Any]]] = None,
        endpoint: Optional[str] = None,
        parameters: Optional[Mapping[str, Any]] = None,
    ):
        _check_not_a_message(docs)
        self._buffer: Optional[bytes] = None
        self._envelope: Optional[jina_pb2.DataRequestEnvelope] = None
        self._peeked: Optional[jina_pb2.HeaderProto] = None
        self._origin: Optional[str] = None
        self._budget = DenseBudget(None)  # built here: the program's own arrays
        self._max_documents: Optional[int] = None
        self._max_fields = MAX_TOP_LEVEL_FIELDS
        self._spliced_at: Optional[int] = None
        self._message = jina_pb2.DataRequestProto()
        self._message.header.request_id = new_id()
        self._message.data.docs.SetInParent()
        if endpoint is not None:
            self.endpoint = endpoint
        if parameters:
            update_struct(self._message.parameters, parameters, "parameters")
        if docs is not None:
            self.docs.extend(docs)

    @classmethod
    def from_bytes(
        cls, data: bytes, origin: Optional[str] = None, max_documents: Optional[int] = MAX_DOCUMENTS,
        max_fields: int = MAX_TOP_LEVEL_FIELDS,
    ) -> "DataRequest":
        """Wrap received bytes without decoding them; errors surface on first read, naming ``origin``
        (who sent the bytes, "dep/shard-0 replica 10.0.0.7:8080" say) when given. ``max_documents``: what a
        server takes from a client; None for an answer its caller asked for (a head's merge of every
        shard's matches may hold more). ``max_fields``: the top-level fields taken (MAX_ANSWER_FIELDS for an answer
        to a request this process sent, which holds what each hop added to it)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):  # bytes() of an int or a dict means something else
            raise TypeError(
                f"DataRequest.from_bytes takes the bytes of a message, got {type(data).__name__} "
                "(a DataRequestProto goes to DataRequest.from_proto)"
            )
        request = cls.__new__(cls)
        request._buffer = bytes(data)
        request._envelope = None
        request._message = None
        request._peeked = None
        request._origin = origin
        request._budget = None  # set as the documents decode, from the size they came in
        request._max_documents = max_documents
        request._max_fields = max_fields
        request._spliced_at = None
        return request

    @staticmethod
    def bound_together(requests: Sequence["DataRequest"], size: int, what: str = "DataRequestList") -> None:
        """The requests of one call (a process_data list of ``size`` bytes), to be decoded here, share their
        bounds: at most MAX_LIST_DOCUMENTS documents in all (each still at most a request's), counted by one
        walk's work for the whole list, and one budget for their sparse arrays, sized by the whole message.
        Bounded one by one, a list of 20 held 20 times the documents of a request and could expand 20 times over."""
        budget = DenseBudget.for_message(size)
        tally = None
        # smaller, it cannot hold more (a document takes 2 bytes at least); nor with fewer bytes that can open one
        if size >= 2 * (MAX_LIST_DOCUMENTS + 1) and (
            sum(document_bound(request._buffer or b"") for request in requests) > MAX_LIST_DOCUMENTS
        ):
            # twice the bound in fields, as for one request: the worker that walks them decodes as many documents
            tally = DocumentTally(MAX_LIST_DOCUMENTS, 2 * MAX_LIST_DOCUMENTS, what, "in one call, every request of it")
        for request in requests:
            counted = request._message is None and request._buffer is not None and request._max_documents is not None
            if counted and tally is not None:  # else each keeps its own bound, checked as it decodes
                before = tally.documents
                tally.count(request._buffer, request._document_arrays(request._buffer))
                if tally.documents - before > request._max_documents:
                    raise ProtocolError(
                        f"{what}: one of its requests holds more than {request._max_documents} documents, the most "
                        "a request may hold; split it"
                    )
                request._max_documents = None  # counted here, with the others
            request._budget = budget

    @classmethod
    def from_proto(cls, message: jina_pb2.DataRequestProto) -> "DataRequest":
        request = cls.__new__(cls)
        request._buffer = None
        request._envelope = None
        request._message = message
        request._peeked = None
        request._origin = None
        request._budget = DenseBudget(None)
        request._max_documents = None
        request._max_fields = MAX_TOP_LEVEL_FIELDS
        request._spliced_at = None
        return request

    @property
    def _what(self) -> str:
        """How errors name this request: with where its bytes came from, when known."""
        return "DataRequest" if self._origin is None else f"DataRequest from {self._origin}"

    # -- decoding stages -------------------------------------------------

    def _outer(self, changing: bool = False) -> Union[jina_pb2.DataRequestProto, jina_pb2.DataRequestEnvelope]:
        """Header, parameters and routes, decoding the envelope only; ``changing`` drops the byte cache."""
        outer = self._message if self._message is not None else self._envelope
        if outer is None:
            self._header()  # the walk that refuses a pickle, whatever order it is asked in: never passed on
            outer = self._envelope = parse(jina_pb2.DataRequestEnvelope, self._buffer, self._what)
        if changing:
            self._buffer = None
        return outer

    def _without_headers(self) -> list[memoryview]:
        """The received bytes with every header field cut out (a sender may write none, or several), in pieces."""
        tags: list[int] = []
        spans = field_spans(self._buffer, _HEADER, self._what, _DATA_REQUEST_FIELDS, 0, None, self._max_fields, tags)
        received, pieces, position = memoryview(self._buffer), [], 0
        for (_, _, end), tag in zip(spans, tags):
            pieces.append(received[position:tag])
            position = end
        pieces.append(received[position:])
        return pieces

    def _header(self) -> jina_pb2.HeaderProto:
        """The header, for reading only: peeked from the bytes when nothing is decoded yet (no copy)."""
        outer = self._message if self._message is not None else self._envelope
        if outer is not None:
            return outer.header
        if self._peeked is None:
            # one walk over the top-level fields: the header is read, and documents that are a pickle are
            # refused here, before a head passes the bytes on untouched (to a Jina worker that would unpickle them)
            header, pickled = jina_pb2.HeaderProto(), False
            buffer, what = self._buffer, self._what
            spans = field_spans(buffer, _HEADER_AND_DATA, what, _DATA_REQUEST_FIELDS, max_fields=self._max_fields)
            _check_repeats(spans, what)
            for number, start, end in spans:
                if number == 4:
                    pickled = pickled or (not _one_docs_field(buffer, start, end) and bool(
                        field_spans(buffer, _DOCS_BYTES, f"{what} data", _DOCS, start, end, MAX_TOP_LEVEL_FIELDS)
                    ))
                    continue
                try:
                    header.MergeFromString(buffer[start:end])  # repeated occurrences merge, as protobuf does
                except (DecodeError, RuntimeError, ValueError) as exc:
                    raise ProtocolError(
                        f"malformed {what} header: {exc} (truncated or corrupt bytes, or text that is not UTF-8)"
                    ) from None
            if pickled:
                raise _refuse_pickle(header.request_id, self._what)
            self._peeked = header
        return self._peeked

    def _full(self) -> jina_pb2.DataRequestProto:
        """The fully decoded message; refuses pickled ``docs_bytes``."""
        if self._message is None:
            if self._buffer is not None and len(self._buffer) > self._max_fields:
                self._header()  # the bounded walk first: padding is refused before protobuf lists unknown fields
            elif self._buffer is not None and self._peeked is None:  # too small for padding: the repeats only
                _check_repeats(field_spans(self._buffer, _HEADER_AND_DATA, self._what, _DATA_REQUEST_FIELDS), self._what)
            # the byte form keeps every field, unknown ones included, whichever stage we are at
            data = self._buffer if self._buffer is not None else self._envelope.SerializeToString()
            self._check_document_count(data)
            self._message = parse(jina_pb2.DataRequestProto, data, self._what)
            if self._budget is None:
                self._budget = DenseBudget.for_message(len(data))
            self._envelope = None
        if self._message.data.WhichOneof("documents") == "docs_bytes":
            raise _refuse_pickle(self._message.header.request_id, self._what)
        self._buffer = None
        return self._message

    def _check_document_count(self, data: bytes) -> None:
        """Refuse more than ``max_documents`` documents in ``data`` before protobuf decodes them (see wire.py)."""
        if self._max_documents is None or len(data) < 2 * (self._max_documents + 1):  # a document: 2 bytes at least
            return
        check_document_count(data, self._document_arrays(data), self._max_documents, MAX_DOCUMENT_FIELDS, self._what)

    def _document_arrays(self, data: bytes) -> list[tuple[int, int]]:
        """(start, stop) of each DocumentArray message in ``data``: the documents a count walks."""
        arrays = []
        data_fields = field_spans(data, _DATA, self._what, _DATA_REQUEST_FIELDS, 0, None, self._max_fields)
        _check_repeats(data_fields, self._what)
        for _, start, end in data_fields:
            spans = field_spans(data, _DOCS, f"{self._what} data", _DOCS_BYTES, start, end, MAX_TOP_LEVEL_FIELDS)
            arrays.extend((first, last) for _, first, last in spans)
        return arrays

    @property
    def proto(self) -> jina_pb2.DataRequestProto:
        """The fully decoded protobuf message, for callers that edit it directly."""
        return self._full()

    # -- header ----------------------------------------------------------

    @property
    def header(self) -> jina_pb2.HeaderProto:
        """The header message, live and writable, as Jina's: what is written through it reaches ``to_bytes()``.

        Handing it out is a change (the byte cache is dropped) and decodes the documents, as Jina's
        ``header`` does: a view of the header-only stage would be left behind, its later edits lost, once
        the documents were read. Reading needs neither: ``request_id``, ``endpoint``, ``is_error``,
        ``timeout_ms``, ``last_executor`` (and, inside shardnet, ``_header()``)."""
        return self._full().header

    @property
    def request_id(self) -> str:
        return self._header().request_id

    @property
    def endpoint(self) -> Optional[str]:
        header = self._header()
        return header.exec_endpoint if header.HasField("exec_endpoint") else None

    @endpoint.setter
    def endpoint(self, value: Optional[str]) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"an endpoint is text like '/index', got {type(value).__name__}")
        if value is not None and wire_text(value) != value:  # protobuf would refuse it with a UnicodeEncodeError
            raise ValueError(f"endpoint {value!r:.80} is not valid UTF-8 text (it holds a lone surrogate)")
        if value is not None and self._message is None and self._envelope is None:
            # received bytes, untouched: their header fields are cut out and one holding the whole header, the
            # endpoint changed, is appended; a head sets the endpoint so without decoding parameters and routes,
            # which many tiny values make cost some 25 times their size (and its loop seconds)
            header = jina_pb2.HeaderProto()
            header.CopyFrom(self._header())  # the peek (every header field merged) refuses what it must first
            header.exec_endpoint = value
            if self._spliced_at is None:
                kept = self._without_headers()
                self._spliced_at = sum(len(piece) for piece in kept)
            else:
                kept = [memoryview(self._buffer)[: self._spliced_at]]
            self._buffer = b"".join([*kept, _header_field(header)])  # one copy of the request's bytes
            self._peeked = header
            return
        header = self._outer(changing=True).header
        if value is None:
            header.ClearField("exec_endpoint")
        else:
            header.exec_endpoint = value

    @property
    def timeout_ms(self) -> Optional[int]:
        """Milliseconds the original caller still waits, as carried in ``header.timeout``."""
        header = self._header()
        return header.timeout if header.HasField("timeout") else None

    @property
    def status(self) -> jina_pb2.StatusProto:
        """The status (code SUCCESS or ERROR, description, exception), live as Jina's: ``r.status.code = ERROR``
        reaches ``to_bytes()``. Decodes the documents and drops the byte cache, as ``header`` does; ``is_error``
        reads the code without."""
        return self._full().header.status

    @property
    def is_error(self) -> bool:
        return self._header().status.code == ERROR

    def set_exception(self, exc: BaseException, executor: str = "") -> None:
        """Mark the request failed with ``exc``, the way Jina reports an executor exception.

        Whatever the exception holds, the report is made: text protobuf refuses (lone surrogates) is
        escaped, and an exception or argument whose str() or repr() raises is named by its type instead
        (either would otherwise fail the whole answer with UNKNOWN, no Jina-shaped error at all).
        """
        description = _rendered(repr, exc, "repr")  # as Jina writes it: ValueError('bad input', 7)
        try:
            arguments = [_rendered(str, argument, "str") for argument in tuple(exc.args)]
        except Exception:  # an ``args`` of its own that raises, or is no sequence
            arguments = [description]
        try:
            stacks = [wire_text(line) for line in traceback.format_exception(type(exc), exc, exc.__traceback__)]
        except Exception as error:
            stacks = [f"<traceback of {wire_text(type(exc).__name__)} not formatted: {type(error).__name__}>"]
        status = self._outer(changing=True).header.status
        status.code = ERROR
        status.description = description
        status.exception.name = wire_text(type(exc).__name__)
        del status.exception.args[:]
        status.exception.args.extend(arguments)
        del status.exception.stacks[:]
        status.exception.stacks.extend(stacks)
        status.exception.executor = wire_text(executor)

    def add_exception(self, ex: BaseException, executor: Any = None) -> None:
        """Jina's name for ``set_exception``: ``executor`` is the Executor itself (named by its class, as Jina
        names it) or its name."""
        if executor is None:
            name = ""
        elif isinstance(executor, str):
            name = executor
        else:
            name = type(executor).__name__
        self.set_exception(ex, executor=name)

    def set_error(self, description: str, name: str = "ShardnetError", executor: str = "") -> None:
        """Mark the request failed with a plain description (no Python exception at hand)."""
        description = wire_text(description)
        status = self._outer(changing=True).header.status
        status.code = ERROR
        status.description = description
        status.exception.name = wire_text(name)
        del status.exception.args[:]
        status.exception.args.append(description)
        status.exception.executor = wire_text(executor)

    # -- body ------------------------------------------------------------

    @property
    def parameters(self) -> dict[str, Any]:
        """A copy of the parameters as a dict (assign to change them)."""
        outer = self._outer()
        try:
            return to_python(outer.parameters)
        except ProtocolError as exc:  # a Value with no kind: named with the request it came in
            raise ProtocolError(f"{self._what} {outer.header.request_id!r}: parameters: {exc}") from None

    @parameters.setter
    def parameters(self, value: Mapping[str, Any]) -> None:
        fresh = struct_pb2.Struct()
        update_struct(fresh, value, "parameters")  # all or nothing: a refused value leaves the old parameters
        self._outer(changing=True).parameters.CopyFrom(fresh)

    @property
    def docs(self) -> DocumentList:
        """The documents, as a live list-like view (decodes them on first access)."""
        return DocumentList(self._full().data.docs.docs, self._budget)

    @docs.setter
    def docs(self, docs: Iterable[Union[Document, Any]]) -> None:
        """Replace every document with ``docs`` (Documents or DocumentProtos), as ``req.data.docs = ...``."""
        self.docs.replace(docs)

    @property
    def data(self) -> "DataContent":
        """Jina's ``req.data``: the documents as ``req.data.docs``, read or assigned (Jina's gateway builds a
        request with ``req.data.docs = ...``)."""
        return DataContent(self)

    @property
    def is_decompressed(self) -> bool:
        """Whether the received bytes were parsed beyond a peek at the header (Jina's meaning: the message, with
        or without its documents, is decoded); a request built here is."""
        return self._message is not None or self._envelope is not None

    @property
    def routes(self) -> MutableSequence[jina_pb2.RouteProto]:
        """The route entries, the live protobuf list as Jina's (``routes.add()``, ``routes.append(route)``, as
        Jina's worker merges them, reach ``to_bytes()``). Decodes the documents and drops the byte cache, as
        ``header`` does; ``last_executor`` reads the last entry without."""
        return self._full().routes

    @property
    def last_executor(self) -> Optional[str]:
        """Who handled the request last (its last route entry's executor), as Jina's ``last_executor``; None
        when it has no route."""
        routes = self._outer().routes
        return routes[-1].executor if routes else None

    def add_route(self, executor: str) -> jina_pb2.RouteProto:
        """Append a route entry stamped with the current time, as a Jina worker does."""
        route = self._outer(changing=True).routes.add()
        route.executor = executor
        route.start_time.FromNanoseconds(time.time_ns())  # GetCurrentTime goes through datetime: 5x slower
        return route

    def add_executor(self, executor_name: str) -> None:
        """Append a route entry naming ``executor_name`` and nothing else, as Jina's ``add_executor`` (a worker's
        ``add_route`` also stamps the start time)."""
        self._outer(changing=True).routes.add().executor = executor_name

    # -- dict and JSON ---------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The request as Jina's ``to_dict`` gives it: header, parameters and routes as protobuf's dict (field
        names as in the proto, enums as integers), and ``data`` a list of the documents, each as protobuf's
        dict. Jina's docarray v1 writes a document through its pydantic model (every field present, empty ones
        None); here a document holds the fields it carries on the wire."""
        message = self._full()
        outer = jina_pb2.DataRequestProto(header=message.header, parameters=message.parameters, routes=message.routes)
        result = json_format.MessageToDict(outer, preserving_proto_field_name=True, use_integers_for_enums=True)
        docs = message.data.docs.docs
        result["data"] = [json_format.MessageToDict(doc, preserving_proto_field_name=True) for doc in docs]
        return result

    def to_json(self) -> str:
        """The whole message as JSON, as Jina's ``to_json``: protobuf's form, field names as in the proto, keys
        sorted."""
        return json_format.MessageToJson(self._full(), preserving_proto_field_name=True, sort_keys=True)

    # -- bytes -----------------------------------------------------------

    def received_bytes(self) -> Optional[bytes]:
        """The bytes this request came in, while nothing has decoded or changed them; else None."""
        return self._buffer

    def to_bytes(self) -> bytes:
        """The wire form; the received bytes themselves when nothing was changed."""
        if self._buffer is not None:
            return self._buffer
        if self._message is not None:
            return self._message.SerializeToString()
        return self._envelope.SerializeToString()

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name, which Jina's request answers to)
        """``to_bytes()``, under the protobuf name Jina code calls on a request."""
        return self.to_bytes()

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    @property
    def nbytes(self) -> int:
        """The size of the wire form in bytes, as Jina's ``nbytes``: counted, not written out."""
        if self._buffer is not None:
            return len(self._buffer)
        return (self._message if self._message is not None else self._envelope).ByteSize()

    def __len__(self) -> int:
        return len(self._full().data.docs.docs)

    def __repr__(self) -> str:
        try:
            header = self._header()
        except ProtocolError:
            return f"<DataRequest malformed, {len(self._buffer or b'')} bytes>"
        endpoint = header.exec_endpoint if header.HasField("exec_endpoint") else None
        state = "decoded" if self._message is not None else ("header only" if self._envelope is not None else "bytes")
        return f"<DataRequest id={header.request_id} endpoint={endpoint!r} {state}>"


class DataContent:
    """Jina's ``DataRequest.data``: ``docs`` read or assigned, through the request it belongs to."""

    __slots__ = ("_request",)

    def __init__(self, request: DataRequest):
        self._request = request

    @property
    def docs(self) -> DocumentList:
        return self._request.docs

    @docs.setter
    def docs(self, docs: Iterable[Union[Document, Any]]) -> None:
        self._request.docs = docs


def _check_not_a_message(docs: Any) -> None:
    """Refuse a message as ``DataRequest``'s first argument: Jina's constructor takes one (bytes, a proto, a
    dict or JSON text), shardnet's takes documents, and each iterates as something else (bytes as integers, a
    dict as its keys, text as its characters: "documents ... got int" or "got str" said nothing useful)."""
    if isinstance(docs, (Mapping, str)):
        builder, name = ("ParseDict", "request") if isinstance(docs, Mapping) else ("Parse", "text")
        raise TypeError(
            f"DataRequest(docs, endpoint, parameters) takes documents, got a {type(docs).__name__}, taken for a "
            f"message in Jina's DataRequest(request) form: build it with "
            f"DataRequest.from_proto(json_format.{builder}({name}, DataRequestProto())) (json_format from "
            "google.protobuf, DataRequestProto from shardnet.protocol.proto.jina_pb2)"
            + ("; a document's text goes in as DataRequest([Document(text=...)])" if isinstance(docs, str) else "")
        )
    if isinstance(docs, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"DataRequest(docs, endpoint, parameters) takes documents, got {type(docs).__name__} "
            f"({len(docs)} bytes): wrap a received message with DataRequest.from_bytes(data)"
        )
    if isinstance(docs, jina_pb2.DataRequestProto):
        raise TypeError(
            "DataRequest(docs, endpoint, parameters) takes documents, got a DataRequestProto: wrap it with "
            "DataRequest.from_proto(message)"
        )


class ControlRequest:
    """A control-plane request: STATUS, or ACTIVATE/DEACTIVATE of the workers it names.

    >>> req = ControlRequest("ACTIVATE")
    >>> req.add_related_entity("w0", "127.0.0.1", 12345, shard_id=1)
    >>> req.command, req.related_entities[0].port
    ('ACTIVATE', 12345)
    """

    __slots__ = ("_message",)

    def __init__(self, command: str = "STATUS"):
        self._message = jina_pb2.ControlRequestProto()
        self._message.header.request_id = new_id()
        self.command = command

    @classmethod
    def from_bytes(cls, data: bytes) -> "ControlRequest":
        request = cls.__new__(cls)
        request._message = parse(jina_pb2.ControlRequestProto, data, "ControlRequest")
        strays = unknown_fields.UnknownFieldSet(request._message)
        if len(strays):  # a DataRequest with no parameters parses as a STATUS: its documents are field 4
            numbers = sorted({field.field_number for field in strays})
            raise ProtocolError(
                f"a ControlRequest has fields header (1), command (2) and related_entities (3), this one also "
                f"{', '.join(map(str, numbers))}: another kind of message (a DataRequest?) sent as a control request"
            )
        if request._message.command not in jina_pb2.ControlRequestProto.Command.values():
            raise ProtocolError(
                f"unknown control command {request._message.command}: expected STATUS, ACTIVATE or DEACTIVATE"
            )
        return request

    @property
    def proto(self) -> jina_pb2.ControlRequestProto:
        return self._message

    @property
    def header(self) -> jina_pb2.HeaderProto:
        return self._message.header

    @property
    def request_id(self) -> str:
        return self._message.header.request_id

    @property
    def command(self) -> str:
        return jina_pb2.ControlRequestProto.Command.Name(self._message.command)

    @command.setter
    def command(self, name: str) -> None:
        try:
            self._message.command = jina_pb2.ControlRequestProto.Command.Value(str(name).upper())
        except ValueError:
            raise ProtocolError(f"unknown control command {name!r}: expected STATUS, ACTIVATE or DEACTIVATE") from None

    def add_related_entity(self, id: str, address: str, port: int, shard_id: Optional[int] = None) -> None:
        entity = self._message.related_entities.add()
        entity.id = id
        entity.address = address
        entity.port = port
        if shard_id is not None:
            entity.shard_id = shard_id

    @property
    def related_entities(self) -> list[jina_pb2.RelatedEntity]:
        return list(self._message.related_entities)

    @property
    def status(self) -> jina_pb2.StatusProto:
        return self._message.header.status

    @property
    def is_error(self) -> bool:
        return self._message.header.status.code == ERROR

    def to_bytes(self) -> bytes:
        return self._message.SerializeToString()

    def __repr__(self) -> str:
        return f"<ControlRequest {self.command} entities={len(self._message.related_entities)}>"
