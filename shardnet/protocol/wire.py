"""Read one field of a protobuf message straight from its bytes, without decoding the rest.

A head reads the header of every request it routes. Decoding even the
envelope copies the documents (4 MB of them cost hundreds of microseconds);
walking the top-level tags and slicing out field 1 copies the header alone, and
the same walk over the documents field's own fields finds Jina's pickled
``docs_bytes`` without decoding a document. The walk checks the framing of
every field it passes, so truncated bytes are caught.

Walking costs Python work per field, so every walk here is bounded: a walk
gives up, refusing the message, past a number of fields its caller chooses
(a request padded with millions of 2-byte fields would otherwise hold the
event loop for seconds), and ``check_document_count`` counts documents in
Python only when bounds computed by C code (sizes, byte counts) cannot answer.
"""

from __future__ import annotations

import contextlib

from typing import Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from shardnet.errors import ProtocolError

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(data: bytes, position: int, what: str, size: int, start: int = 0) -> tuple[int, int]:
    """The varint at ``position`` and the position after it; it must end before ``size`` (errors count from
    ``start``, where the message walked begins)."""
    result = shift = 0
    while True:
        if position >= size:
            raise ProtocolError(f"malformed {what} ({size - start} bytes): truncated varint at byte {position - start}")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ProtocolError(
                f"malformed {what} ({size - start} bytes): varint longer than 10 bytes at byte {position - start}"
            )


def _long_tag(data: bytes, position: int, what: str, size: int, start: int = 0) -> tuple[int, int]:
    """A tag of more than one byte and the position after it. A tag is a 32-bit varint of at most 5 bytes: a
    longer or larger one is refused, as protobuf's parser refuses it, since C++ protobuf keeps only its low 32 bits,
    and a walk that read it whole would see an unknown field where such a peer sees another (``docs_bytes``)."""
    tag, after = _varint(data, position, what, size, start)
    if after - position > 5 or tag >> 32:
        raise ProtocolError(
            f"malformed {what} ({size - start} bytes): a tag out of protobuf's range at byte {position - start}"
        )
    return tag, after


def field_spans(
    data: bytes,
    numbers: frozenset,
    what: str,
    known: frozenset = frozenset(),
    start: int = 0,
    stop: Optional[int] = None,
    max_fields: Optional[int] = None,
    tags: Optional[list[int]] = None,
) -> list[tuple[int, int, int]]:
    """(field number, start, end) of every occurrence of the length-delimited fields ``numbers`` among the
    top-level fields of the message in ``data[start:stop]``, copying nothing; ``tags``, when given, gets where
    each occurrence's tag begins (its whole field is ``data[tag:end]``).

    A large field (a request's documents) is skipped by its length, so looking
    for a field costs a few tags whatever the size of the message. Tags and
    lengths of up to two bytes are read inline, longer ones by ``_varint``.
    More than ``max_fields`` top-level fields is a ProtocolError: the walk's
    cost is the number of fields, not bytes, and tiny fields are cheap to send.
    """
    found: list[tuple[int, int, int]] = []
    position, size = start, len(data) if stop is None else stop
    fields = 0
    while position < size:
        fields += 1
        opened = position
        if max_fields is not None and fields > max_fields:
            raise ProtocolError(
                f"{what} ({size - start} bytes) has more than {max_fields} top-level fields; refused "
                "(padding, or another kind of message)"
            )
        tag = data[position]
        if tag < 0x80:
            position += 1
        else:
            tag, position = _long_tag(data, position, what, size, start)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise ProtocolError(f"malformed {what} ({size - start} bytes): field number 0 at byte {position - start}")
        if wire_type == _LENGTH_DELIMITED:
            length = data[position] if position < size else 0x80
            if length < 0x80:
                position += 1
            elif position + 1 < size and data[position + 1] < 0x80:  # up to 16 KiB: documents of a small request
                length = (length & 0x7F) | (data[position + 1] << 7)
                position += 2
            else:
                length, position = _varint(data, position, what, size, start)
            end = position + length
            if end > size:
                raise ProtocolError(
                    f"malformed {what} ({size - start} bytes): field {field} claims {length} bytes, {size - position} left"
                )
            if field in numbers:
                found.append((field, position, end))
                if tags is not None:
                    tags.append(opened)
            position = end
            continue
        if field in numbers or field in known:
            raise ProtocolError(f"malformed {what} ({size - start} bytes): field {field} has wire type {wire_type}, expected 2")
        if wire_type == _VARINT:
            _, position = _varint(data, position, what, size, start)
        elif wire_type == _FIXED64:
            position += 8
        elif wire_type == _FIXED32:
            position += 4
        else:
            raise ProtocolError(f"malformed {what} ({size - start} bytes): unsupported wire type {wire_type} for field {field}")
        if position > size:
            raise ProtocolError(f"malformed {what} ({size - start} bytes): field {field} runs past the end")
    return found


def count_fields(data: bytes, limit: int) -> int:
    """The number of top-level fields in ``data``, counted no further than ``limit + 1``.

    For a bound checked before protobuf's parser runs: the count stops quietly
    where the framing breaks (the parser then names the fault in its own
    words, having read no more fields than were counted). Groups, which the
    parser keeps as unknown fields, count their start, end and every field
    inside as fields of their own.
    """
    count, position, size = 0, 0, len(data)
    with contextlib.suppress(ProtocolError):  # a varint cut short: broken framing, the parser's to name
        while position < size and count <= limit:
            count += 1
            tag = data[position]
            if tag < 0x80:
                position += 1
            else:
                tag, position = _varint(data, position, "", size)
            wire_type = tag & 7
            if wire_type == _LENGTH_DELIMITED:
                length, position = _varint(data, position, "", size)
                position += length
            elif wire_type == _VARINT:
                _, position = _varint(data, position, "", size)
            elif wire_type == _FIXED64:
                position += 8
            elif wire_type == _FIXED32:
                position += 4
            elif wire_type not in (3, 4):  # 6 and 7 mean nothing: broken framing
                break
    return count


# The first byte of every tag that can open a document: field 1 of a DocumentArray, 14 (chunks) or 15 (matches) of
# a Document, length-delimited, written in one byte or as the first of a longer (overlong) varint. Every document
# at any depth starts with one of these bytes, so their count in a message bounds its documents from above.
_DOCUMENT_TAG_STARTS = bytes((0x0A, 0x8A, 0x72, 0xF2, 0x7A, 0xFA))
_NOT_DOCUMENT_TAG_STARTS = bytes(sorted(set(range(256)) - set(_DOCUMENT_TAG_STARTS)))
# Bytes of consecutive fields that protobuf's parser counts the documents of at once (a run): what that parse
# allocates (some 50 bytes a document, a few MB at most) is freed before the next run.
_RUN_BYTES = 65_536
_DEPTH_LIMIT = 100  # protobuf's: a message nested deeper does not parse


def _counting_types() -> tuple[type[Message], type[Message]]:
    """A DocumentArray and a Document that declare nothing but documents (``docs``; ``chunks``, ``matches``).

    Parsed with these, bytes become a tree of documents alone, whatever else the documents hold (kept as
    unknown bytes, then discarded): the cheapest structure protobuf's C parser can count documents with.
    """
    message = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="shardnet_count.proto", package="shardnet_count", syntax="proto3")
    document = file.message_type.add(name="Document")
    array = file.message_type.add(name="DocumentArray")
    for owner, name, number in ((document, "chunks", 14), (document, "matches", 15), (array, "docs", 1)):
        owner.field.add(
            name=name,
            number=number,
            type=message.TYPE_MESSAGE,
            type_name=".shardnet_count.Document",
            label=message.LABEL_REPEATED,
        )
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: nothing registered globally
    pool.Add(file)
    found = pool.FindMessageTypeByName
    return (
        message_factory.GetMessageClass(found("shardnet_count.DocumentArray")),
        message_factory.GetMessageClass(found("shardnet_count.Document")),
    )


_COUNTING_ARRAY, _COUNTING_DOCUMENT = _counting_types()


class DocumentTally:
    """Documents counted and fields walked so far, in one message or in the messages of one call (a
    process_data list shares one), refused past their bounds; ``scope`` says which in the refusal."""

    __slots__ = ("documents", "fields", "limit", "max_fields", "scope", "what")

    def __init__(self, limit: int, max_fields: int, what: str, scope: str = "in one request"):
        self.documents = self.fields = 0
        self.limit, self.max_fields, self.what, self.scope = limit, max_fields, what, scope

    def field(self) -> None:
        self.fields += 1
        if self.fields > self.max_fields:
            raise ProtocolError(
                f"{self.what}: its documents could not be counted within {self.max_fields} fields (padding, or "
                "very many documents); refused: split the request"
            )

    def add(self, documents: int) -> None:
        self.documents += documents
        if self.documents > self.limit:
            raise ProtocolError(
                f"{self.what} holds too many documents: at most {self.limit} are taken {self.scope}, chunks and "
                "matches included; split it"
            )

    def count(self, data: bytes, arrays: list[tuple[int, int]]) -> None:
        """Count the documents of the DocumentArray messages at ``arrays`` (start, stop) of ``data`` into this
        tally, by the walk alone (see check_document_count)."""
        for start, stop in arrays:
            _count_fields(data, start, stop, True, self, 1)


def check_document_count(data: bytes, arrays: list[tuple[int, int]], limit: int, max_fields: int, what: str) -> None:
    """Refuse (ProtocolError) more than ``limit`` documents, counting chunks and matches at every depth, in the
    DocumentArray messages at ``arrays`` (start, stop) of ``data``, before protobuf decodes any of them.

    An empty document is 2 bytes on the wire and some 200 once decoded, so the count is what bounds a
    decoded request. It is found as cheaply as it can be: a message too short to hold more (a document
    takes 2 bytes at least) passes at once; then the bytes that can start a document's tag are counted
    in C (an upper bound, enough for most messages); otherwise the top-level fields are walked, runs of
    them counted by protobuf's parser (documents only: see _count_run), and documents too large for a
    run walked in turn. The walk visits ``max_fields`` fields at most, then refuses the message: walking
    costs Python work per field, and padding is cheap to send.
    """
    if sum(stop - start for start, stop in arrays) < 2 * (limit + 1):
        return
    if document_bound(data) <= limit:  # one C pass over a superset of the arrays
        return
    DocumentTally(limit, max_fields, what).count(data, arrays)


def document_bound(data: bytes) -> int:
    """A bound above the documents ``data`` can hold, found in C: the bytes that can open a document's tag."""
    return len(data.translate(None, _NOT_DOCUMENT_TAG_STARTS))


def _count_fields(data: bytes, begin: int, end: int, is_array: bool, tally: DocumentTally, depth: int) -> None:
    """Count the documents among the fields at ``data[begin:end]`` (a DocumentArray's, or a Document's whose
    documents are its chunks and matches) and below them, into ``tally``. Hot: tags, lengths and varints of
    one byte are read inline, and the fields walked are counted in a local until they are handed back."""
    if depth > _DEPTH_LIMIT:
        raise ProtocolError(f"{tally.what}: documents nested deeper than protobuf's limit of {_DEPTH_LIMIT} levels")
    what, run_bytes = tally.what, _RUN_BYTES
    fields, most = tally.fields, tally.max_fields
    run = position = begin
    groups = 0  # open groups: a run ends outside them, or protobuf could not parse it alone
    while position < end:
        fields += 1
        if fields > most:
            tally.fields = fields
            tally.field()  # raises
        start = position
        tag = data[position]
        if tag < 0x80:
            position += 1
        elif position + 1 < end and data[position + 1] < 0x80:  # fields 16 to 2047
            tag = (tag & 0x7F) | (data[position + 1] << 7)
            position += 2
        else:
            tag, position = _long_tag(data, position, what, end, begin)
        wire_type = tag & 7
        if wire_type == 2:  # length-delimited
            length = data[position] if position < end else 0x80
            if length < 0x80:
                position += 1 + length
            elif position + 1 < end and data[position + 1] < 0x80:  # up to 16 KiB: runs take them whole
                position += 2 + ((length & 0x7F) | (data[position + 1] << 7))
            else:
                length, position = _varint(data, position, what, end, begin)
                if length > run_bytes and groups <= 0:  # counted on its own (a document), or skipped
                    if position + length > end:
                        raise ProtocolError(
                            f"malformed {what}: a document's field claims {length} bytes, {end - position} left"
                        )
                    tally.fields = fields
                    _count_run(data, run, start, is_array, tally)
                    field = tag >> 3
                    if (field == 1) if is_array else (field == 14 or field == 15):
                        tally.add(1)
                        _count_fields(data, position, position + length, False, tally, depth + 1)
                    fields = tally.fields
                    run = position = position + length
                    continue
                position += length
        elif wire_type == 0:  # varint
            if position < end and data[position] < 0x80:
                position += 1
            else:
                _, position = _varint(data, position, what, end, begin)
        elif wire_type == 1:  # 8 bytes
            position += 8
        elif wire_type == 5:  # 4 bytes
            position += 4
        elif wire_type == 3:  # a group, kept by protobuf as unknown fields (what it holds is no document)
            groups += 1
        elif wire_type == 4:
            groups -= 1
        else:
            raise ProtocolError(f"malformed {what}: unsupported wire type {wire_type} in its documents")
        if position - run >= run_bytes and groups <= 0:
            tally.fields = fields
            _count_run(data, run, min(position, end), is_array, tally)
            run = position
    tally.fields = fields
    if position > end:
        raise ProtocolError(f"malformed {what}: a field of its documents runs past their end")
    _count_run(data, run, end, is_array, tally)


def _count_run(data: bytes, start: int, stop: int, is_array: bool, tally: DocumentTally) -> None:
    """Add the documents of the fields at ``data[start:stop]``, at every depth, parsed by protobuf as documents
    alone (a run is about _RUN_BYTES long: what the parse allocates stays a few MB).

    Every document takes 2 bytes at least of the run's documents-only encoding (its tag and its length),
    so half its size bounds them from above: exactly, but for one more for each document whose chunks
    and matches take 128 bytes or more there. When that bound would pass the limit, the run's documents
    are counted one by one (a run holds some 30,000 at most), so its slack alone refuses nothing.
    """
    if stop <= start:
        return
    counting = (_COUNTING_ARRAY if is_array else _COUNTING_DOCUMENT)()
    try:
        counting.ParseFromString(data[start:stop])
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"malformed {tally.what}: its documents do not parse: {exc}") from None
    counting.DiscardUnknownFields()
    bound = counting.ByteSize() // 2
    if tally.documents + bound <= tally.limit:
        tally.add(bound)
        return
    stack = list(counting.docs) if is_array else [*counting.chunks, *counting.matches]
    if bound == len(stack) or tally.documents + len(stack) > tally.limit:  # none nested, or too many anyway
        tally.add(len(stack))
        return
    documents = 0
    while stack:
        document = stack.pop()
        documents += 1
        stack.extend(document.chunks)
        stack.extend(document.matches)
    tally.add(documents)
