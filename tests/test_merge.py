"""The ALL merge (documents by id, dict results under ``__results__``), on DataRequests built in memory."""

from __future__ import annotations

from shardnet import DataRequest, Document
from shardnet.runtimes.merge import merge_shard_responses


def shard_answer(results=None, **parameters) -> DataRequest:
    if results is not None:
        parameters["__results__"] = results
    return DataRequest([Document(id="q")], endpoint="/search", parameters=parameters)


def test_results_of_every_shard_are_gathered_and_a_later_same_name_replaces_an_earlier():
    merged = merge_shard_responses(
        "dep",
        [
            (0, shard_answer({"a": {"n": 1}}, k="first")),
            (1, shard_answer({"b": {"n": 2}, "a": {"n": 3}}, k="second")),
            (2, shard_answer()),
        ],
    )
    assert merged.parameters == {"k": "first", "__results__": {"a": {"n": 3.0}, "b": {"n": 2.0}}}


def test_no_shard_results_still_gives_an_empty_results_parameter_as_jinas_head_does():
    merged = merge_shard_responses("dep", [(0, shard_answer()), (1, shard_answer())])
    assert merged.parameters == {"__results__": {}}


def test_a_results_parameter_that_is_not_a_map_is_left_as_the_shard_answered():
    merged = merge_shard_responses("dep", [(0, shard_answer("not a map")), (1, shard_answer({"b": {}}))])
    assert merged.parameters == {"__results__": "not a map"}


def shard_search(shard: int) -> DataRequest:
    """What a shard answers to a query that arrived carrying chunk c1 and match m0 (m0 with its own chunk)."""
    query = Document(id="q", text="q")
    query.chunks.append(Document(id="c1"))
    carried = Document(id="m0")
    carried.chunks.append(Document(id="m0-c"))
    carried.chunks.append(Document(id=f"m0-c-from-{shard}"))  # a shard may add to a carried match too
    query.matches.append(carried)
    query.matches.append(Document(id=f"hit-{shard}"))
    return DataRequest([query, Document(id=f"only-{shard}")], endpoint="/search")


def test_documents_matches_and_chunks_merge_by_id_so_what_the_request_carried_comes_back_once():
    merged = merge_shard_responses("dep", [(shard, shard_search(shard)) for shard in range(3)])
    query, *others = merged.docs
    assert [doc.id for doc in others] == ["only-0", "only-1", "only-2"]
    assert query.chunks.ids == ["c1"]  # not once per shard
    assert query.matches.ids == ["m0", "hit-0", "hit-1", "hit-2"]
    assert query.matches[0].chunks.ids == ["m0-c", "m0-c-from-0", "m0-c-from-1", "m0-c-from-2"]  # recursively


def test_documents_without_an_id_are_never_merged_into_one():
    answers = []
    for shard in range(2):
        query = Document(id="q")
        query.matches.append(Document(text=f"anonymous-{shard}"))
        answer = DataRequest([query], endpoint="/search")
        answer.proto.data.docs.docs[0].matches[0].id = ""  # a foreign peer's: Document() always makes an id
        answers.append((shard, answer))
    [query] = merge_shard_responses("dep", answers).docs
    assert [match.text for match in query.matches] == ["anonymous-0", "anonymous-1"]


def test_many_documents_sharing_an_id_merge_in_one_pass():
    # a request of 20,000 documents all named "x", each with one match of no id, echoed by two shards: the
    # matches of every copy fold into the target's document at once (folded one copy at a time, the target's
    # map of ids was rebuilt per copy: quadratic, minutes of a head's event loop for a 200 KB request)
    def echoed() -> DataRequest:
        docs = [Document(id="x") for _ in range(20_000)]
        for i, doc in enumerate(docs):
            doc.matches.append(Document(text=str(i)))
        return DataRequest(docs, endpoint="/e")

    merged = merge_shard_responses("dep", [(0, echoed()), (1, echoed())])
    docs = merged.docs
    assert len(docs) == 20_000  # the first shard's, none added: every one of the second's has an id known
    assert len(docs[-1].matches) == 1 + 20_000  # the id maps to the last copy, which gains every other match
    assert all(len(doc.matches) == 1 for doc in list(docs)[:-1])
