"""Merge the answers of every shard (ALL polling) into one response.

Documents are merged by id: a document several shards return keeps its first
copy, with the others' matches and chunks appended; new ids are appended in
shard order. A shard that failed or answered with an error is named in the
merged status, so the client learns which shard to look at.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from shardnet.protocol.messages import DataRequest

ShardOutcome = tuple[Optional[int], Union[DataRequest, BaseException]]


def merge_documents(target: DataRequest, others: Sequence[DataRequest]) -> None:
    """Fold the documents of ``others`` into ``target`` by id (matches and chunks concatenated)."""
    docs = target.proto.data.docs.docs
    by_id = {doc.id: doc for doc in docs}
    for other in others:
        for doc in other.proto.data.docs.docs:
            existing = by_id.get(doc.id)
            if existing is None:
                added = docs.add()
                added.CopyFrom(doc)
                by_id[doc.id] = added
            else:
                existing.matches.extend(doc.matches)
                existing.chunks.extend(doc.chunks)


def merge_shard_responses(deployment: str, outcomes: Sequence[ShardOutcome]) -> DataRequest:
    """One response from the shards' responses (or failures), in shard order.

    Raises the first shard's exception when no shard answered at all.
    """
    answered = [(shard, result) for shard, result in outcomes if isinstance(result, DataRequest)]
    failed = [(shard, result) for shard, result in outcomes if not isinstance(result, DataRequest)]
    if not answered:
        raise failed[0][1]
    merged = answered[0][1]
    merge_documents(merged, [response for _, response in answered[1:]])
    parameters = merged.parameters
    parameters.setdefault("__results__", {})
    merged.parameters = parameters
    problems = [f"shard {shard} of {deployment!r} failed: {error}" for shard, error in failed]
    for shard, response in answered:
        if response.is_error:
            problems.append(f"shard {shard} of {deployment!r} answered an error: {response.status.description}")
            if not merged.is_error:
                merged.header.status.CopyFrom(response.status)
    if problems:
        status = merged.header.status
        first_exception = status.exception.name if status.code else ""
        merged.set_error("; ".join(problems), name=first_exception or "ShardError", executor=deployment)
    return merged
