"""Merge the answers of every shard (ALL polling) into one response.

Documents are merged by id: a document several shards return keeps its first
copy, and gains the others' matches and chunks it does not hold yet (merged by
id the same way, as docarray's ``reduce`` does); new ids are appended in shard
order. A shard that failed or answered with an error is named in the
merged status, so the client learns which shard to look at.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from shardnet.protocol.messages import DataRequest
from shardnet.protocol.services import RESULTS_PARAMETER as RESULTS

ShardOutcome = tuple[Optional[int], Union[DataRequest, BaseException]]


def merge_documents(target: DataRequest, others: Sequence[DataRequest]) -> None:
    """Fold the documents of ``others`` into ``target`` by id, and their matches and chunks the same way."""
    docs = target.proto.data.docs.docs
    for other in others:
        _reduce(docs, other.proto.data.docs.docs)


def _reduce(target: Any, source: Any) -> None:
    """Fold the ``source`` documents into the ``target`` list by id, recursively (docarray's ``reduce``).

    A document ``target`` already holds keeps its fields and gains the matches and chunks it lacks, so a
    match or chunk the request carried to every shard comes back once, not once per shard. Documents
    without an id are always added: there is nothing to tell them apart by. The matches and chunks of all
    the source documents that share an id are folded in together, once: folding them in one document at a
    time would rebuild the target's map of ids for each (quadratic in a request of many equal ids).
    """
    by_id = {doc.id: doc for doc in target if doc.id}
    folding: dict[str, list[Any]] = {}  # id -> the source documents that fold into the target's document
    for doc in source:
        existing = by_id.get(doc.id) if doc.id else None
        if existing is None:
            added = target.add()
            added.CopyFrom(doc)
            if doc.id:
                by_id[doc.id] = added
        elif doc.matches or doc.chunks:  # most shards add neither to a document: nothing to fold
            folding.setdefault(doc.id, []).append(doc)
    for doc_id, docs in folding.items():
        existing = by_id[doc_id]
        for field in ("matches", "chunks"):
            gained = [item for doc in docs for item in getattr(doc, field)]
            if gained:
                _reduce(getattr(existing, field), gained)


def merge_shard_responses(deployment: str, outcomes: Sequence[ShardOutcome]) -> DataRequest:
    """One response from the shards' responses (or failures), in shard order.

    Raises the first shard's exception when no shard answered at all.
    """
    answered = [(shard, result) for shard, result in outcomes if isinstance(result, DataRequest)]
    failed = [(shard, result) for shard, result in outcomes if not isinstance(result, DataRequest)]
    if not answered:
        raise failed[0][1]
    merged, others = answered[0][1], [response for _, response in answered[1:]]
    merge_documents(merged, others)
    merge_results(merged, others)
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
    first shard error's exception (name, stack) unless it is an error of its
    own, whose description then comes first.
    """
    problems = []
    first_error = None
    for shard, outcome in outcomes:
        if not isinstance(outcome, DataRequest):
            problems.append(f"shard {shard} of {deployment!r} failed: {outcome}")
        elif outcome.is_error:
            problems.append(f"shard {shard} of {deployment!r} answered an error: {outcome.status.description}")
            first_error = first_error or outcome.status
    if not problems:
        return
    status = response.header.status
    if response.is_error:
        if not any(outcome is response for _, outcome in outcomes):
            problems.insert(0, status.description)
    elif first_error is not None:
        status.CopyFrom(first_error)
    name = status.exception.name if status.code else ""
    response.set_error("; ".join(problems), name=name or "ShardError", executor=deployment)
