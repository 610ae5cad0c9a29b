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

from typing import Optional

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


def field_spans(
    data: bytes,
    numbers: frozenset,
    what: str,
    known: frozenset = frozenset(),
    start: int = 0,
    stop: Optional[int] = None,
    max_fields: Optional[int] = None,
) -> list[tuple[int, int, int]]:
    """(field number, start, end) of every occurrence of the length-delimited fields ``numbers`` among the
    top-level fields of the message in ``data[start:stop]``, copying nothing.

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
        if max_fields is not None and fields > max_fields:
            raise ProtocolError(
                f"{what} ({size - start} bytes) has more than {max_fields} top-level fields; refused "
                "(padding, or another kind of message)"
            )
        tag = data[position]
        if tag < 0x80:
            position += 1
        else:
            tag, position = _varint(data, position, what, size, start)
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
    try:
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
    except ProtocolError:  # a varint cut short: broken framing, the parser's to name
        pass
    return count
