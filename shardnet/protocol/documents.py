"""``Document`` and ``DocumentList``: Python views over the docarray protobuf messages.

A Document wraps one ``DocumentProto`` and reads and writes it in place, so a
document that arrived in a request is never copied field by field, and fields
shardnet does not model (location, evaluations, ...) survive untouched.
"""

from __future__ import annotations

import functools
import mimetypes
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Optional, SupportsIndex, Union, overload

from google.protobuf import message, struct_pb2

from shardnet.errors import ProtocolError
from shardnet.protocol.budget import MAX_DENSE_BYTES, DenseBudget
from shardnet.protocol.ids import new_id
from shardnet.protocol.proto import docarray_pb2

if TYPE_CHECKING:
    import numpy as np

# the protobuf levels a tag or parameter value may take: protobuf reads (and writes) 100 levels, Jina's as
# shardnet's, and a request's parameters sit 4 levels down (message, Struct, entry, Value); a dict takes 3 more
# (Struct, entry, Value), a list 2 (ListValue, Value). So whatever a request brought fits, to be written back
VALUE_LEVELS = 96
# ... and a tag value's: a document's tags sit 3 levels deeper (data, docs, the document), and 3 more leave room
# for matches and chunks of them. Taken as deep as parameters, they made an answer no reader could parse: the
# worker ran its handler and its caller got "malformed DataRequest". (The deepest tags a top-level document can
# bring, 4 levels more, are refused if written back)
TAG_LEVELS = VALUE_LEVELS - 6


def to_python(value: Any) -> Any:
    """Turn protobuf Struct/ListValue values into plain dicts and lists (numbers as floats, NaN kept).

    A Value with no kind set (valid protobuf that is no JSON value) is a ProtocolError naming its key.
    """
    if isinstance(value, struct_pb2.Struct):
        return {key: to_python(_entry(value, key)) for key in value.keys()}
    if isinstance(value, struct_pb2.ListValue):
        return [to_python(_entry(value, index)) for index in range(len(value))]
    return value


def _entry(container: Union[struct_pb2.Struct, struct_pb2.ListValue], key: Union[str, int]) -> Any:
    try:
        return container[key]
    except ValueError:  # protobuf's "Value not set"
        raise ProtocolError(
            f"entry {key!r} is a google.protobuf.Value with no kind set (neither null, number, text, bool, "
            "struct nor list)"
        ) from None


def _too_deep() -> ProtocolError:
    return ProtocolError(
        "a document nests chunks, matches and tags deeper than protobuf's limit of 100 levels: no reader could "
        "parse the request (the documents were left as they were)"
    )


def _proto_of(doc: Any) -> docarray_pb2.DocumentProto:
    if isinstance(doc, Document):
        return doc._pb
    if isinstance(doc, docarray_pb2.DocumentProto):
        return doc
    raise TypeError(f"documents are shardnet.Document (or DocumentProto) objects, got {type(doc).__name__}")


_DEEPEST = 2**32 - 1  # adjacency and granularity are uint32: a parent already there keeps its children there


def _as_match_of(parent: docarray_pb2.DocumentProto, match: docarray_pb2.DocumentProto) -> None:
    match.adjacency = min(parent.adjacency + 1, _DEEPEST)


def _as_chunk_of(parent: docarray_pb2.DocumentProto, chunk: docarray_pb2.DocumentProto) -> None:
    chunk.parent_id = parent.id
    chunk.granularity = min(parent.granularity + 1, _DEEPEST)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"Document.{field} takes text, got {type(value).__name__}")
    if not value.isascii():
        _check_encodes(value, f"Document.{field}")
    return value


def _check_encodes(text: str, what: str) -> None:
    """Refuse text UTF-8 cannot carry (a lone surrogate, as a bad decode leaves), naming where it was to go:
    protobuf's own error named neither the field nor the document."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _not_utf8(what, exc) from None


def _not_utf8(what: str, exc: UnicodeEncodeError) -> TypeError:
    return TypeError(
        f"{what} takes text UTF-8 can carry: {exc.object[exc.start:exc.end]!r} at position {exc.start} is a lone "
        "surrogate (text decoded with errors='surrogateescape'?)"
    )


def _level(value: Any, field: str) -> int:
    """A uint32 protobuf field's value: a whole number from 0 (not a bool, not 2.5)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**32:
        raise TypeError(f"Document.{field} takes a whole number from 0 to {2**32 - 1}, got {value!r}")
    return int(value)  # a numpy integer too


def _deeper_than(value: Any, levels: int) -> bool:
    """Whether ``value`` as a protobuf Value takes more than ``levels`` levels below its own (a dict 3, a list 2;
    a list holding itself does, at once)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple)):
            depth, children = depth + 2, item
        elif isinstance(item, Mapping):
            depth, children = depth + 3, item.values()
        else:
            continue
        if depth > levels:
            return True
        # text and numbers, most of what a value holds, are not pushed (Mapping's isinstance is slow on them)
        stack.extend((child, depth) for child in children if not isinstance(child, _SCALARS))
    return False


_SCALARS = (str, int, float, type(None))  # bool is an int


def update_struct(struct: struct_pb2.Struct, values: Any, what: str, levels: int = VALUE_LEVELS) -> None:
    """``struct.update`` all or nothing, with an error that says which value could not be stored and why; a value
    may take ``levels`` protobuf levels below its own."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} take a mapping of text keys to JSON-like values, got {type(values).__name__}")
    checked = struct_pb2.Struct()  # protobuf leaves an empty entry behind when a value fails: fill a scratch one first
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys are text, got {key!r}")
        if _deeper_than(value, levels):
            raise TypeError(
                f"{what}[{key!r}] nests lists and dicts deeper than protobuf can carry (at most 100 levels in all, "
                f"{levels} below the value: a dict takes 3, a list 2)"
            )
        try:
            checked.update({key: value})
        except UnicodeEncodeError as exc:  # in the key or in text within the value
            raise _not_utf8(f"{what}[{key!r}]", exc) from None
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int past a double's range
            raise TypeError(
                f"{what}[{key!r}] must be JSON-like (text, number, bool, None, list, dict), got {value!r:.80}"
            ) from None
    struct.MergeFrom(checked)  # map entries are replaced, not merged into


class StructView(MutableMapping[str, Any]):
    """A dict-like view of a protobuf ``Struct`` (JSON semantics: numbers come back as floats)."""

    __slots__ = ("_struct",)

    def __init__(self, struct: struct_pb2.Struct):
        self._struct = struct

    def __getitem__(self, key: str) -> Any:
        if key not in self._struct:
            raise KeyError(key)
        return to_python(_entry(self._struct, key))

    def __setitem__(self, key: str, value: Any) -> None:
        update_struct(self._struct, {key: value}, "tags", TAG_LEVELS)

    def __delitem__(self, key: str) -> None:
        if key not in self._struct:
            raise KeyError(key)
        del self._struct[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._struct.keys()))

    def __len__(self) -> int:
        return len(self._struct)

    def __repr__(self) -> str:
        return repr(dict(self))


class NamedScore(float):
    """One named score of a document: its value, a float, that also reads as docarray's ``NamedScore``
    (``.value``, ``.op_name``, ``.ref_id``); setting one of those writes through to the document, as
    ``doc.scores["cosine"].value = 0.5`` does in docarray (the float itself keeps the value it was read with;
    ``.value`` reads the document's)."""

    __slots__ = ("_description", "_document", "_name", "_op_name", "_ref_id")

    def _stored(self) -> Optional["docarray_pb2.NamedScoreProto"]:
        scores = self._document._pb.scores
        return scores[self._name] if self._name in scores else None

    @property
    def value(self) -> float:
        stored = self._stored()  # read through, as docarray's: a value just set reads back
        return float(self) if stored is None else stored.value

    @value.setter
    def value(self, value: float) -> None:
        self._document.set_score(self._name, value)

    @property
    def op_name(self) -> str:
        stored = self._stored()
        return self._op_name if stored is None else stored.op_name

    @op_name.setter
    def op_name(self, value: str) -> None:
        self._document.set_score(self._name, self.value, op_name=value)

    @property
    def description(self) -> str:
        stored = self._stored()
        return self._description if stored is None else stored.description

    @description.setter
    def description(self, value: str) -> None:
        self._document.set_score(self._name, self.value, description=value)

    @property
    def ref_id(self) -> str:
        stored = self._stored()
        return self._ref_id if stored is None else stored.ref_id

    @ref_id.setter
    def ref_id(self, value: str) -> None:
        self._document.set_score(self._name, self.value, ref_id=value)


class ScoresView(MutableMapping[str, NamedScore]):
    """A document's named scores, read and written through: ``doc.scores["cosine"]`` is a ``NamedScore`` (a float
    with docarray's ``.value``), ``doc.scores["cosine"] = 0.5`` sets it (keeping its op_name and ref_id), as does
    ``doc.scores["cosine"].value = 0.5`` for a score the document has."""

    __slots__ = ("_document",)

    def __init__(self, document: "Document"):
        self._document = document

    def __getitem__(self, name: str) -> NamedScore:
        scores = self._document._pb.scores
        if not isinstance(name, str) or name not in scores:
            raise KeyError(
                f"{name!r}: no such score on document {self._document.id!r} (docarray makes one as it is read; "
                f"here set it: doc.scores[{name!r}] = value)"
            )
        stored = scores[name]
        score = NamedScore(stored.value)
        score._document, score._name, score._op_name, score._ref_id = self._document, name, stored.op_name, stored.ref_id
        score._description = stored.description
        return score

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(value, (Mapping, docarray_pb2.NamedScoreProto)) or hasattr(value, "op_name"):
            # docarray's NamedScore(value=..., op_name=...), a dict of its fields, or another document's score
            fields = value if isinstance(value, Mapping) else {
                field: getattr(value, field, None) for field in ("value", "op_name", "description", "ref_id")
            }
            self._document.set_score(
                name, fields.get("value") or 0.0, op_name=fields.get("op_name") or None,
                ref_id=fields.get("ref_id") or None, description=fields.get("description") or None,
            )
            return
        self._document.set_score(name, value)

    def __delitem__(self, name: str) -> None:
        if name not in self._document._pb.scores:
            raise KeyError(name)
        del self._document._pb.scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._document._pb.scores.keys()))

    def __len__(self) -> int:
        return len(self._document._pb.scores)

    def __repr__(self) -> str:
        return repr({name: float(score) for name, score in self.items()})


class Document:
    """One document: an id plus text, blob or tensor, an embedding, tags, matches and chunks.

    >>> doc = Document(text="hello", tags={"lang": "en"})
    >>> doc.text, doc.tags["lang"], len(doc.id)
    ('hello', 'en', 32)
    """

    # _budget: what the sparse arrays of the message this document came in may still expand to (shared with the
    # other documents of that message); None for a document wrapped on its own, given one when it first needs it
    __slots__ = ("__weakref__", "_budget", "_pb")

    def __init__(
        self,
        id: Optional[str] = None,
        text: Optional[str] = None,
        blob: Optional[bytes] = None,
        tensor: Optional[np.ndarray] = None,
        embedding: Optional[np.ndarray] = None,
        tags: Optional[Mapping[str, Any]] = None,
        *,
        uri: Optional[str] = None,
        mime_type: Optional[str] = None,
        proto: Optional[docarray_pb2.DocumentProto] = None,
    ):
        self._pb = proto if proto is not None else docarray_pb2.DocumentProto()
        if proto is not None:
            self._budget: Optional[DenseBudget] = None  # a message from anywhere: bounded when read
            return
        self._budget = DenseBudget(None)  # built here: the program's own arrays
        self._pb.id = _text(id, "id") if id else new_id()
        if text is not None:
            self.text = text
        if blob is not None:
            self.blob = blob
        if tensor is not None:
            self.tensor = tensor
        if embedding is not None:
            self.embedding = embedding
        if tags:
            update_struct(self._pb.tags, tags, "tags", TAG_LEVELS)
        if mime_type is not None:  # before the uri, whose setter would guess one
            self.mime_type = mime_type
        if uri is not None:
            self.uri = uri

    @classmethod
    def _view(cls, proto: docarray_pb2.DocumentProto, budget: DenseBudget) -> "Document":
        """A view of a document of a list, sharing the list's budget for sparse arrays."""
        document = cls.__new__(cls)
        document._pb, document._budget = proto, budget
        if budget._views is not None:  # a worker's handler is running: detached when it is done
            budget.hold(document)
        return document

    def _detach(self) -> None:
        """View a copy of this document of its own, not the message it is part of (which it would keep alive)."""
        copy = docarray_pb2.DocumentProto()
        copy.CopyFrom(self._pb)
        self._pb, self._budget = copy, None

    def _dense_budget(self) -> DenseBudget:
        if self._budget is None:  # wrapped on its own: as much as one small message may expand to
            self._budget = DenseBudget(MAX_DENSE_BYTES)
        return self._budget

    @property
    def proto(self) -> docarray_pb2.DocumentProto:
        """The underlying protobuf message (shared, not a copy)."""
        return self._pb

    @property
    def id(self) -> str:
        return self._pb.id

    @id.setter
    def id(self, value: str) -> None:
        self._pb.id = _text(value, "id")

    @property
    def text(self) -> str:
        return self._pb.text

    @text.setter
    def text(self, value: Optional[str]) -> None:
        """``None`` clears it, as docarray's: an Executor drops a text once it encoded it."""
        if value is None:
            self._pb.ClearField("text")
        else:
            self._pb.text = _text(value, "text")

    @property
    def uri(self) -> str:
        return self._pb.uri

    @uri.setter
    def uri(self, value: Optional[str]) -> None:
        """As docarray's: a document with no ``mime_type`` yet gets the one the uri's extension names; ``None``
        clears it."""
        if value is None:
            self._pb.ClearField("uri")
            return
        self._pb.uri = _text(value, "uri")
        if value and not self._pb.mime_type:
            self._pb.mime_type = mimetypes.guess_type(value)[0] or ""

    @property
    def mime_type(self) -> str:
        return self._pb.mime_type

    @mime_type.setter
    def mime_type(self, value: Optional[str]) -> None:
        """``None`` clears it, as docarray's."""
        if value is None:
            self._pb.ClearField("mime_type")
        else:
            self._pb.mime_type = _text(value, "mime_type")

    @property
    def parent_id(self) -> str:
        """The id of the document this one is a chunk of ("" for none), as docarray sets it."""
        return self._pb.parent_id

    @parent_id.setter
    def parent_id(self, value: str) -> None:
        self._pb.parent_id = _text(value, "parent_id")

    @property
    def granularity(self) -> int:
        """How deep a chunk this is (0: a document), as docarray counts it."""
        return self._pb.granularity

    @granularity.setter
    def granularity(self, value: int) -> None:
        self._pb.granularity = _level(value, "granularity")

    @property
    def adjacency(self) -> int:
        """How deep a match this is (0: a document), as docarray counts it."""
        return self._pb.adjacency

    @adjacency.setter
    def adjacency(self, value: int) -> None:
        self._pb.adjacency = _level(value, "adjacency")

    @property
    def blob(self) -> bytes:
        return self._pb.blob

    @blob.setter
    def blob(self, value: Optional[bytes]) -> None:
        """``None`` clears it, as docarray's: an Executor drops the raw bytes once it encoded them."""
        if value is None:
            self._pb.ClearField("blob")
        elif not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"Document.blob takes bytes (or None to clear it), got {type(value).__name__}")
        else:
            self._pb.blob = bytes(value)

    @property
    def tensor(self) -> Optional[np.ndarray]:
        """A copy of the tensor: edit it and assign it back (``doc.tensor = t``) for the edit to travel."""
        return self._array("tensor")

    @tensor.setter
    def tensor(self, value: Optional[np.ndarray]) -> None:
        self._set_array("tensor", value)  # None, as docarray: drops the raw data, keeps a text or blob

    @property
    def embedding(self) -> Optional[np.ndarray]:
        """A copy of the embedding: ``doc.embedding /= n`` works, ``doc.embedding[0] = x`` edits only the copy."""
        return self._array("embedding")

    @embedding.setter
    def embedding(self, value: Optional[np.ndarray]) -> None:
        self._set_array("embedding", value)

    def _array(self, field: str) -> Optional[np.ndarray]:
        """The array of ``field`` (tensor or embedding) as numpy; None if not set. A refusal names the field."""
        if not self._pb.HasField(field):
            return None
        from shardnet.protocol import ndarray  # numpy, loaded with the first array: a head never needs it

        try:
            return ndarray.from_proto(getattr(self._pb, field), self._dense_budget())
        except ProtocolError as exc:
            raise ProtocolError(f"{self._whose(field)}: {exc}") from None

    def _set_array(self, field: str, value: Optional[np.ndarray]) -> None:
        if value is None:
            self._pb.ClearField(field)
            return
        from shardnet.protocol import ndarray  # numpy, loaded with the first array: a head never needs it

        try:
            ndarray.to_proto(value, getattr(self._pb, field))
        except ProtocolError as exc:
            raise ProtocolError(f"{self._whose(field)}: {exc}") from None

    def _whose(self, field: str) -> str:
        """``field`` of this document, by id when it has one (a long id is cut: refusals travel in answers)."""
        if not self._pb.id:
            return f"{field} of a document"
        shown = self._pb.id if len(self._pb.id) <= 64 else self._pb.id[:64] + "..."
        return f"{field} of document {shown!r}"

    @property
    def tags(self) -> StructView:
        """Tags as a live dict-like view: ``doc.tags['k'] = v`` writes into the message; a nested dict or
        list read from it is a copy (assign it back after editing)."""
        return StructView(self._pb.tags)

    @tags.setter
    def tags(self, value: Mapping[str, Any]) -> None:
        replacement = struct_pb2.Struct()
        update_struct(replacement, value, "tags", TAG_LEVELS)  # checked first: a bad value leaves the old tags as they were
        self._pb.tags.CopyFrom(replacement)

    @property
    def matches(self) -> "DocumentList":
        """The matches; one added gets adjacency one more than this document's, as docarray gives it."""
        return DocumentList(self._pb.matches, self._dense_budget(), functools.partial(_as_match_of, self._pb))

    @matches.setter
    def matches(self, docs: Iterable[DocumentLike]) -> None:
        """``doc.matches = [...]`` replaces them all, as in docarray: stored copies of ``docs`` (views of it
        included), which a Document given then views, as after ``append``."""
        self.matches.replace(docs)

    @property
    def chunks(self) -> "DocumentList":
        """The chunks; one added gets this document's id as ``parent_id`` and granularity one more than its, as
        docarray gives them."""
        return DocumentList(self._pb.chunks, self._dense_budget(), functools.partial(_as_chunk_of, self._pb))

    @chunks.setter
    def chunks(self, docs: Iterable[DocumentLike]) -> None:
        self.chunks.replace(docs)

    @property
    def scores(self) -> ScoresView:
        """Named scores, read and written through (``ScoresView``): ``doc.scores["cosine"]`` reads as a float and,
        as docarray's, has ``.value``; ``doc.scores["cosine"] = 0.5`` (or ``.value = 0.5``) sets it. It was a copy,
        and such writes were lost without a word."""
        return ScoresView(self)

    def set_score(
        self, name: str, value: float, op_name: Optional[str] = None, ref_id: Optional[str] = None,
        description: Optional[str] = None,
    ) -> None:
        """Set the named score's value, and its ``op_name``, ``ref_id`` (the query's id) and ``description`` when
        given; what is not given is kept, as docarray's ``doc.scores[name].value = v`` keeps it (a re-ranker must
        not lose them)."""
        _text(name, "scores' name")
        score = docarray_pb2.NamedScoreProto()  # filled first: a refused value leaves the score as it was
        if name in self._pb.scores:
            score.CopyFrom(self._pb.scores[name])
        score.value = value
        if op_name is not None:
            score.op_name = _text(op_name, f"scores[{name!r}].op_name")
        if ref_id is not None:
            score.ref_id = _text(ref_id, f"scores[{name!r}].ref_id")
        if description is not None:
            score.description = _text(description, f"scores[{name!r}].description")
        self._pb.scores[name].CopyFrom(score)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Document) and self._pb == other._pb

    def __repr__(self) -> str:
        content = self._pb.WhichOneof("content")
        detail = f" text={self.text[:30]!r}" if content == "text" else (f" {content}" if content else "")
        return f"<Document id={self.id}{detail} matches={len(self._pb.matches)}>"


DocumentLike = Union[Document, docarray_pb2.DocumentProto]


def _position(index: Any) -> Optional[int]:
    """``index`` as a list takes a position (an int, or numpy's integers: ``docs[np.argmax(scores)]``); None if
    it is none."""
    if isinstance(index, int):
        return index
    try:
        return operator.index(index)
    except TypeError:
        return None


def _copies_checked(protos: list[docarray_pb2.DocumentProto]) -> Any:
    """Copies of ``protos`` in a list of their own. Protobuf reads each back as it copies it, and refuses there one
    nested too deep to send: checked so before a list they go to changes, that list stays as it was."""
    copies = docarray_pb2.DocumentArrayProto().docs
    try:
        copies.extend(protos)
    except (message.DecodeError, SystemError):
        raise _too_deep() from None
    return copies


class DocumentList:
    """A list-like view over a repeated ``DocumentProto`` field.

    Appending, inserting or assigning a Document copies it into the field and
    rebinds the Document to the stored copy, so later edits through the same object are not lost (and
    a Document appended to two lists follows the second). ``"id" in docs`` and
    ``doc in docs`` look documents up by id. A request's ``docs`` are such a
    view; to build documents, make a plain list of Document. The sparse arrays
    of a list's documents share one budget (``DenseBudget``): the
    request's, or for a list made directly, what one small message may expand to.
    """

    __slots__ = ("_budget", "_field", "_stamp")

    def __init__(
        self,
        field: Any,
        budget: Optional[DenseBudget] = None,
        stamp: Optional[Callable[[docarray_pb2.DocumentProto], None]] = None,
    ):
        if isinstance(field, (list, tuple)) or not hasattr(field, "add"):
            raise TypeError(
                "DocumentList is a view over a message's documents (request.docs, doc.matches, doc.chunks); "
                "to build documents, make a plain list of Document"
            )
        self._field = field
        self._budget = budget if budget is not None else DenseBudget(MAX_DENSE_BYTES)
        self._stamp = stamp  # what a document added here gets from the list's owner (a match's adjacency)

    @property
    def budget(self) -> DenseBudget:
        """What the sparse arrays of these documents may still expand to, shared with their request's other views."""
        return self._budget

    def __contains__(self, item: object) -> bool:
        """By id, as a DocumentArray answers it: a text id, or a Document whose id is here."""
        wanted = item.id if isinstance(item, Document) else item
        return isinstance(wanted, str) and any(pb.id == wanted for pb in self._field)

    def __len__(self) -> int:
        return len(self._field)

    @overload
    def __getitem__(self, index: Union[SupportsIndex, str]) -> Document: ...

    @overload
    def __getitem__(self, index: slice) -> list[Document]: ...

    def __getitem__(self, index: Union[SupportsIndex, str, slice]) -> Union[Document, list[Document]]:
        """A document by position, or a list of them by slice; by id (``docs["d1"]``), as docarray's
        ``DocumentArray``, the first with that id (KeyError when none has it). Lists of positions or of booleans,
        which a ``DocumentArray`` also takes, are refused naming what to write instead."""
        if isinstance(index, slice):
            return [Document._view(pb, self._budget) for pb in self._field[index]]
        if isinstance(index, str):
            return self._by_id(index)
        position = _position(index)
        if position is None:
            raise TypeError(
                f"documents are indexed by position, slice or id, not by {type(index).__name__}: shardnet has no "
                "DocumentArray; write [docs[i] for i in positions], or [d for d, keep in zip(docs, mask) if keep]"
            )
        return Document._view(self._field[position], self._budget)

    def _by_id(self, wanted: str) -> Document:
        for pb in self._field:
            if pb.id == wanted:
                return Document._view(pb, self._budget)
        raise KeyError(f"no document with id {wanted!r} among these {len(self._field)}")

    def __setitem__(self, index: Union[int, slice], value: Any) -> None:
        """Put copies of documents where others were, as a list's item or slice assignment (an extended slice
        takes one for each position). A Document given then views its stored copy, as after ``append``. The
        document that was there is taken out, not written over, so a view of it keeps it: ``docs[0], docs[1] =
        docs[1], docs[0]`` swaps them."""
        if isinstance(index, slice):
            self._assign_slice(index, list(value))  # taken whole first: ``value`` may read this very list
            return
        position = _position(index)
        if position is None:
            raise TypeError(
                f"documents are assigned by position or slice, not by {type(index).__name__}; to replace the "
                "one with an id, assign at its position: docs.ids.index(id)"
            )
        self._put(range(len(self._field))[position], value, _proto_of(value))  # an IndexError as a list's

    def _assign_slice(self, index: slice, docs: list[DocumentLike]) -> None:
        protos = [_proto_of(doc) for doc in docs]
        _copies_checked(protos)  # every one before anything changes: the slice is taken out before they go in
        positions = range(len(self._field))[index]
        if index.step is None or index.step == 1:  # as a list's: any number, in place of the slice
            del self._field[index]
            for offset, (doc, proto) in enumerate(zip(docs, protos)):
                self._insert_at(positions.start + offset, doc, proto)
            return
        if len(docs) != len(positions):
            raise ValueError(
                f"attempt to assign sequence of size {len(docs)} to extended slice of size {len(positions)}"
            )
        for position, doc, proto in zip(positions, docs, protos):
            self._put(position, doc, proto)

    def _put(self, position: int, doc: DocumentLike, proto: docarray_pb2.DocumentProto) -> None:
        self._insert_at(position, doc, proto)  # first: one refused leaves the document that was there
        del self._field[position + 1]

    def insert(self, index: int, doc: DocumentLike) -> None:
        """Put a copy of ``doc`` before position ``index``, as ``list.insert``; a Document then views it."""
        proto = _proto_of(doc)
        self._insert_at(slice(index, None).indices(len(self._field))[0], doc, proto)  # clamped as a list's

    def _insert_at(self, position: int, doc: DocumentLike, proto: docarray_pb2.DocumentProto) -> None:
        count = len(self._field)
        try:
            self._field.insert(position, proto)  # protobuf's own: a copy, the rest moved along, not copied
        except (message.DecodeError, SystemError):  # its copy reads the document back: SystemError wraps that
            if len(self._field) > count:  # put in before protobuf found it could not read it
                del self._field[position]
            raise _too_deep() from None
        self._took(doc, self._field[position])

    def _took(self, doc: DocumentLike, stored: docarray_pb2.DocumentProto) -> None:
        """Give ``stored``, the copy of ``doc`` just stored, what the list's owner stamps; rebind a Document to it."""
        if self._stamp is not None:
            self._stamp(stored)
        if isinstance(doc, Document):
            self._budget.absorb(doc._budget)
            doc._pb = stored
            if self._budget._views is not None:  # now a view of this list's message
                self._budget.hold(doc)

    def __delitem__(self, index: Union[int, slice, str]) -> None:
        """By position or slice, as a list's; by id (``del docs["d1"]``), as docarray's, the first with that id."""
        if isinstance(index, str):
            for position, pb in enumerate(self._field):
                if pb.id == index:
                    del self._field[position]
                    return
            raise KeyError(f"no document with id {index!r} among these {len(self._field)}")
        del self._field[index]

    def __iter__(self) -> Iterator[Document]:
        budget = self._budget
        return (Document._view(pb, budget) for pb in self._field)

    def append(self, doc: DocumentLike) -> None:
        proto = _proto_of(doc)  # before add(): a refused value leaves no empty document behind
        stored = self._field.add()
        stored.CopyFrom(proto)
        self._took(doc, stored)

    def extend(self, docs: Iterable[DocumentLike]) -> None:
        # taken whole first: ``docs`` may read this very list (``docs.extend(docs)``, a generator over it), which
        # would grow as fast as it is read, for ever
        for doc in list(docs):
            self.append(doc)

    def clear(self) -> None:
        del self._field[:]

    def replace(self, docs: Iterable[DocumentLike]) -> None:
        """Swap the whole content for ``docs`` (safe when ``docs`` are views into this list)."""
        docs = list(docs)
        copies = _copies_checked([_proto_of(doc) for doc in docs])  # before the documents here are let go
        for doc, copy in zip(docs, copies):
            if self._stamp is not None:
                self._stamp(copy)
            if isinstance(doc, Document):
                self._budget.absorb(doc._budget)
        self.clear()
        self._field.extend(copies)
        for doc, stored in zip(docs, self._field):  # as after append: a Document given views its stored copy,
            if isinstance(doc, Document):  # so ``doc.matches = ms`` then ``ms[0].scores[...] = s`` sticks
                doc._pb = stored
                if self._budget._views is not None:
                    self._budget.hold(doc)

    @property
    def texts(self) -> list[str]:
        return [pb.text for pb in self._field]

    @property
    def ids(self) -> list[str]:
        return [pb.id for pb in self._field]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DocumentList):
            other = list(other)
        return isinstance(other, list) and list(self) == other

    def __repr__(self) -> str:
        return f"<DocumentList of {len(self)}>"
