"""Merge the answers of every shard (ALL polling) into one response.

Documents are merged by id, as docarray's ``reduce`` does: a document several
shards return keeps its first copy, takes from the later copies each field the
first left empty (an embedding, a uri, tags; content of another kind, as
docarray's setters replace it), and gains their matches and
chunks it does not hold yet (merged by id the same way, fields included); new
ids are appended in shard order. Documents sharing an id merge by position
among those of that id (a later shard's second "dup" into the first's second),
so no copy's matches are lost. A shard that failed or answered with an
error is named in the merged status, so the client learns which shard to look
at; the executor's exception (name, arguments, stack) reaches it as raised.
"""

from __future__ import annotations

import types
from collections import Counter, deque
from typing import Any, Callable, Optional, Sequence, Union

from shardnet.errors import ReplicaError, RoutingError
from shardnet.protocol.messages import DataRequest, wire_text
from shardnet.protocol.proto import docarray_pb2
from shardnet.protocol.services import RESULTS_PARAMETER as RESULTS

ShardOutcome = tuple[Optional[int], Union[DataRequest, BaseException]]
# characters of the shards' failures a request every shard failed is refused with names: the refusal is a gRPC
# status, whose details travel in trailers a client takes 8 KB of by default (past 16 KB it must fail the call)
FAILURES_ROOM = 4096
_MERGED_APART = frozenset({"id", "parent_id", "matches", "chunks"})  # docarray never copies these from a later copy


def merge_documents(target: DataRequest, others: Sequence[DataRequest]) -> None:
    """Fold the documents of ``others`` into ``target`` by id, and their matches and chunks the same way."""
    if others:
        _reduce(target.proto.data.docs.docs, [other.proto.data.docs.docs for other in others])


def _reduce(target: Any, sources: Sequence[Any]) -> None:
    """Fold each of the ``sources`` document lists into the ``target`` list by id, in order, recursively
    (docarray's ``reduce``, one source after the other).
    A document ``target`` already holds keeps the fields it set, takes the others from the source's copy,
    and gains the matches and chunks it lacks, so a
    match or chunk the request carried to every shard comes back once, not once per shard. Documents
    without an id are always added: there is nothing to tell them apart by. Documents sharing an id fold by
    position: a source's n-th of an id into the target's n-th of it, and one past the target's count is
    added (docarray's map of ids gives every copy to one document, and Jina's head loses some copies' matches).
    The index of the target's ids is built once and kept as documents are added: rebuilt for every source, a
    64-shard merge of a hundred matches each read the target's growing list 64 times over (quadratic, seconds
    of the head's loop).
    """
    positions: dict[str, list[int]] = {}  # each id's documents in the target, by index, in order
    for index, doc in enumerate(target):
        if doc.id:
            positions.setdefault(doc.id, []).append(index)
    # by index of the target's document: the sources' copies whose matches and chunks fold into it, in order
    folding: dict[int, list[Any]] = {}
    for source in sources:
        taken: dict[str, int] = {}  # per id: how many of this source's copies of it came so far
        for doc in source:
            if not doc.id:
                target.add().CopyFrom(doc)
                continue
            nth = taken.get(doc.id, 0)
            taken[doc.id] = nth + 1
            held = positions.setdefault(doc.id, [])
            if nth >= len(held):
                held.append(len(target))
                target.add().CopyFrom(doc)
                continue
            existing = target[held[nth]]
            if doc.matches or doc.chunks:
                _fill_empty_fields(existing, doc)
                folding.setdefault(held[nth], []).append(doc)  # its matches and chunks fold in by id
            elif doc != existing:  # a leaf (most matches): an echoed copy, the same to the last field, has nothing
                # to add, which protobuf tells in C some ten times faster than a fill finds it
                _fill_empty_fields(existing, doc)
    for index, copies in folding.items():
        existing = target[index]
        for field in ("matches", "chunks"):
            gained = [getattr(doc, field) for doc in copies if getattr(doc, field)]
            if gained:
                _reduce(getattr(existing, field), gained)


def _fill_empty_fields(target: Any, source: Any) -> None:
    """Copy into ``target`` each field ``source`` set that ``target`` left empty: docarray's rule, the first copy
    wins where both set one. Content (text, blob, tensor) is one protobuf field but three of docarray's: a later
    copy's content of another kind replaces the first's, as docarray's setters do; of the same kind it does not.
    Runs for every copy of every document and match (an echoed query's hundred matches per shard), so it reads
    the source's set fields only and asks the target about each by its kind."""
    for field, value in source.ListFields():
        kind = _KIND.get(field.name)
        if kind is None:  # id, parent_id, matches, chunks: docarray never copies them from a later copy
            continue
        name = field.name
        if kind is _SCALAR:
            if not getattr(target, name):
                setattr(target, name, value)
        elif kind is _MESSAGE:
            if value.ByteSize() and not (target.HasField(name) and getattr(target, name).ByteSize()):
                getattr(target, name).CopyFrom(value)
        elif kind is _MANY:
            if not len(getattr(target, name)):
                getattr(target, name).MergeFrom(value)
        elif value if field.message_type is None else value.ByteSize():  # content; an empty one is none
            held = target.WhichOneof("content")
            if held is not None and not _holds(target, held):
                held = None  # an empty text or blob (set, cleared) is none either
            if held != name:  # none yet, or another kind: the later copy's replaces it
                if field.message_type is None:
                    setattr(target, name, value)
                else:
                    getattr(target, name).CopyFrom(value)


_SCALAR, _MESSAGE, _MANY, _CONTENT = "scalar", "message", "many", "content"


def _holds(document: Any, content: str) -> bool:
    """Whether the ``content`` field ``document`` has set holds anything (docarray counts ``""`` as no text)."""
    value = getattr(document, content)
    return bool(value.ByteSize() if content == "tensor" else value)


def _kinds() -> dict[str, str]:
    """How each field of a document is filled from a later copy; the fields docarray merges apart are absent."""
    kinds = {}
    for field in docarray_pb2.DocumentProto.DESCRIPTOR.fields:
        if field.name in _MERGED_APART:
            continue
        if field.containing_oneof is not None:
            kinds[field.name] = _CONTENT
        elif field.is_repeated:
            kinds[field.name] = _MANY  # lists and maps
        elif field.message_type is not None:
            kinds[field.name] = _MESSAGE
        else:
            kinds[field.name] = _SCALAR
    return kinds


_KIND = types.MappingProxyType(_kinds())


def first_failure(outcomes: Sequence[ShardOutcome]) -> BaseException:
    """Of shards that all failed, the failure to raise: the first that may have run the request (a ReplicaError
    not ``unsent``), else the first. Raised as the first, a shard with no replica hid another that had run it,
    and the caller was told it never ran, safe to retry."""
    failures = [result for _, result in outcomes if not isinstance(result, DataRequest)]
    return next((failure for failure in failures if getattr(failure, "unsent", True) is False), failures[0])


def every_shard_failed(deployment: str, outcomes: Sequence[ShardOutcome]) -> BaseException:
    """What to raise when no shard answered: ``first_failure``'s kind, status and ``unsent``, with a message
    counting the shards by status and naming every shard's problem (as an answer with some shards failed names
    each), the one whose status is raised first, the rest in shard order, as many as fit in FAILURES_ROOM
    characters, then how many more failed. Raised as ``first_failure`` alone, the caller
    learnt why shard 0 failed and nothing of the others (each over its size limit, say, or one down and one
    refusing). One shard's failure is raised as it came; an exception not shardnet's (no replica's) too."""
    chosen = first_failure(outcomes)
    failures = [(shard, failure) for shard, failure in outcomes if not isinstance(failure, DataRequest)]
    if len(failures) < 2 or not isinstance(chosen, (ReplicaError, RoutingError)):
        return chosen
    failures.sort(key=lambda pair: pair[1] is not chosen)  # the one whose status is raised named first, whatever fits
    named, unnamed = _within_room(
        [_kept(f"shard {shard} of {deployment!r} failed: ", str(failure)) for shard, failure in failures], _said_size
    )
    message = f"all {len(failures)} shards of {deployment!r} failed ({_by_status(failures)}): {'; '.join(named)}" + (
        f"; and {unnamed} more shards failed (unnamed: a gRPC status's details must stay small)" if unnamed else ""
    )
    if isinstance(chosen, RoutingError):
        return RoutingError(message, deployment=chosen.deployment)
    combined = type(chosen)(
        message, address=chosen.address, code=chosen.code, deployment=chosen.deployment, role=chosen.role,
        unsent=chosen.unsent,
    )
    combined.args = (message,)  # said as is: it names each shard and replica itself
    return combined


def _by_status(failures: Sequence[ShardOutcome]) -> str:
    """How many shards failed with each status, most first ("40 UNAVAILABLE, 24 DEADLINE_EXCEEDED"): what the
    named ones leave out when they do not all fit."""
    counts = Counter(failure_word(failure) for _, failure in failures)
    return ", ".join(f"{count} {status}" for status, count in counts.most_common())


def failure_word(failure: BaseException) -> str:
    """A shard's failure in a word: its gRPC status, or "no replica" for a shard that had none to send to."""
    if isinstance(failure, RoutingError):
        return "no replica"
    code = getattr(failure, "code", None)
    return code.name if code is not None else type(failure).__name__


def merge_shard_responses(deployment: str, outcomes: Sequence[ShardOutcome]) -> DataRequest:
    """One response from the shards' responses (or failures), in shard order.

    Raises when no shard answered at all, naming each shard's failure (``every_shard_failed``).
    """
    answered = [(shard, result) for shard, result in outcomes if isinstance(result, DataRequest)]
    if not answered:
        raise every_shard_failed(deployment, outcomes)
    merged, others = answered[0][1], [response for _, response in answered[1:]]
    merge_documents(merged, others)
    if others:  # as Jina's head, which reduces only two answers or more: one is passed on as it came
        merge_results(merged, others)
    if merged.is_error:  # Jina builds on the first shard that did the work: its route entries are the answer's
        worked = next((response for response in others if not response.is_error), None)
        if worked is not None:
            routes = merged.proto.routes
            del routes[:]
            routes.extend(worked.proto.routes)
    report_shard_problems(merged, deployment, outcomes)
    return merged


def merge_results(target: DataRequest, others: Sequence[DataRequest]) -> None:
    """Give ``target`` a ``__results__`` parameter holding every shard's dict results (as Jina's head does).

    Each worker files its results under its own name, so the shards' entries
    sit side by side; a later shard's entry replaces an earlier one of the same name.
    """
    parameters = target.proto.parameters  # decoded by the merge: edit the Struct itself, no dict round trip
    if RESULTS in parameters.fields and not parameters.fields[RESULTS].HasField("struct_value"):
        return  # an executor put something else there: leave it as it answered
    results = parameters.get_or_create_struct(RESULTS)
    for other in others:
        theirs = other.proto.parameters.fields.get(RESULTS)
        if theirs is not None and theirs.HasField("struct_value"):
            results.MergeFrom(theirs.struct_value)


def report_shard_problems(response: DataRequest, deployment: str, outcomes: Sequence[ShardOutcome]) -> None:
    """Mark ``response`` failed, naming each shard that failed or answered an error; no-op when none did.

    ``response`` is the merged answer or the uses_after's answer. It takes the
    first shard error's exception as the executor raised it (name, arguments,
    executor, stack: what a Jina client reads), unless it is an error of its
    own, which it keeps; the description names every shard's problem.
    """
    problems = []
    first_error = first_problem = None
    for shard, outcome in outcomes:
        if not isinstance(outcome, DataRequest):
            problems.append(_kept(f"shard {shard} of {deployment!r} failed: ", str(outcome)))
        elif outcome.is_error:
            # read only (the live ``status`` would decode the shard's documents and drop its byte cache)
            status = outcome._header().status
            problems.append(_kept(f"shard {shard} of {deployment!r} answered an error: ", status.description))
            if first_error is None:
                first_error, first_problem = status, problems[-1]
    if not problems:
        return
    status = response._outer(changing=True).header.status  # an edit of the header alone: documents undecoded
    if response.is_error:
        carried = first_error is not None and status.description == first_error.description  # passed on as it came
        if not carried and not any(outcome is response for _, outcome in outcomes):
            first_problem = _kept("", status.description)  # its own error: the exception the answer carries
            problems.append(first_problem)
    elif first_error is not None:
        status.CopyFrom(first_error)
    else:  # only failed calls: no executor raised anything
        response.set_error(_problems_said(problems), name="ShardError", executor=deployment)
        return
    # whoever's exception the answer carries is named first, whatever else fits (as every_shard_failed names it):
    # failed calls before it filled the room, and it went unnamed
    problems.remove(first_problem)
    problems.insert(0, first_problem)
    status.description = wire_text(_problems_said(problems))


def _kept(prefix: str, text: str) -> tuple[str, int]:
    """A problem as ``_within_room`` takes it: ``prefix`` and as much of ``text`` as the room could ever say (a
    character takes one at the least), with the whole length. Quoted whole, 64 shards answering an error that
    quotes a 10 MB input made 640 MB of problems, seconds of copying, of which 4 KB was said."""
    return prefix + text[: FAILURES_ROOM + 1], len(prefix) + len(text)


def _within_room(problems: Sequence[tuple[str, int]], size: Callable[[str], int] = len) -> tuple[list[str], int]:
    """As many of ``problems`` as fit in FAILURES_ROOM characters joined (the first always, cut to it), and how
    many are left out: a gRPC status's details, and an answer's description, must stay small. ``size``: how many
    characters a text takes (``_said_size`` for a status's details: gRPC percent-encodes their non-ASCII bytes).
    Each problem comes as ``_kept`` makes it: its start and its whole length."""
    named, room = [], FAILURES_ROOM
    for problem, _ in problems:
        if named and size(problem[: room + 1]) + 2 > room:  # a character takes one at the least
            break
        named.append(_cut(problem, room, size))
        room -= size(named[-1]) + 2
    if len(named[0]) < problems[0][1]:
        named[0] += f"... ({problems[0][1]} characters, cut)"
    return named, len(problems) - len(named)


# the bytes gRPC sends as they are in a status's details (grpc-message); any other is sent as %XX
_SAID_AS_IS = bytes(byte for byte in range(0x20, 0x7F) if byte != 0x25)


def _said_size(text: str) -> int:
    """The characters ``text`` takes as a gRPC status's details (grpc-message): each UTF-8 byte of one that is not
    printable ASCII, or ``%``, percent-encoded (counted as characters, 4,096 of ``é`` made 24 KB of trailer, which
    a client refuses past 16 KB: the caller got RESOURCE_EXHAUSTED instead of the shards' failures)."""
    raw = text.encode("utf-8", "backslashreplace")
    return len(raw) + 2 * len(raw.translate(None, _SAID_AS_IS))


def _cut(text: str, room: int, size: Callable[[str], int]) -> str:
    """``text``, or as much of its start as takes at most ``room`` by ``size`` (whole characters)."""
    cut = text[:room]  # a character takes one at the least
    if size(cut) <= room:
        return cut
    taken = 0
    for index, character in enumerate(cut):
        taken += size(character)
        if taken > room:
            return cut[:index]
    return cut


def failures_said(failures: Sequence[str]) -> str:
    """Failures (one text each) joined as a gRPC status's details say them: as many as fit in FAILURES_ROOM, then
    how many more. Joined whole, a head of 100 shards whose endpoint discovery failed on each sent 23 KB of
    details, past the 16 KB a client takes of trailers: the caller got RESOURCE_EXHAUSTED ("received metadata
    size exceeds hard limit") instead of why."""
    if not failures:
        return ""
    named, unnamed = _within_room([_kept("", failure) for failure in failures], _said_size)
    return "; ".join(named) + (
        f"; and {unnamed} more failed (unnamed: a gRPC status's details must stay small)" if unnamed else ""
    )


def _problems_said(problems: Sequence[tuple[str, int]]) -> str:
    """The shards' problems as an answer's description says them, within room. Joined whole, it repeated each
    shard's (an executor's error quoting its input, the same on every shard): the answer grew by that much per
    shard, past the head's message limit when every shard's own answer fitted, and the caller got
    RESOURCE_EXHAUSTED instead of the error; the first error's exception still travels whole in the status."""
    named, unnamed = _within_room(problems)
    left_out = f"; and {unnamed} more shard problem(s), unnamed to keep the answer small" if unnamed else ""
    return "; ".join(named) + left_out
