"""The ALL merge (documents by id, dict results under ``__results__``), on DataRequests built in memory."""

from __future__ import annotations

import numpy as np

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


def test_one_answer_is_passed_on_as_it_came_as_jinas_head_does_which_reduces_two_or_more():
    """An interop review's find: one shard under ALL (or one of two answering) gained ``__results__: {}``, which a
    Jina head, reducing only two answers or more, does not add."""
    for outcomes in ([(0, shard_answer(k="v"))], [(0, shard_answer(k="v")), (1, ConnectionError("down"))]):
        assert merge_shard_responses("dep", outcomes).parameters == {"k": "v"}


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


def test_an_identical_echo_still_adds_its_matches_without_an_id():
    """Skipping a copy that compares equal to the one held skipped its id-less matches too: one copy where a
    copy differing in an unrelated field gave two, as Jina (which gives each a random id) does."""
    answers = []
    for shard in range(2):
        query = Document(id="q", text="same")
        query.matches.append(Document(text="anonymous"))
        answer = DataRequest([query], endpoint="/search")
        answer.proto.data.docs.docs[0].matches[0].id = ""
        answers.append((shard, answer))
    [query] = merge_shard_responses("dep", answers).docs
    assert [match.text for match in query.matches] == ["anonymous", "anonymous"]


def test_many_documents_sharing_an_id_merge_in_one_pass():
    # a request of 20,000 documents all named "x", each with one match of no id, echoed by two shards: each copy
    # folds into the target's document at its position (folded one copy at a time into one document, the
    # target's map of ids was rebuilt per copy: quadratic, minutes of a head's event loop for a 200 KB request)
    def echoed() -> DataRequest:
        docs = [Document(id="x") for _ in range(20_000)]
        for i, doc in enumerate(docs):
            doc.matches.append(Document(text=str(i)))
        return DataRequest(docs, endpoint="/e")

    merged = merge_shard_responses("dep", [(0, echoed()), (1, echoed())])
    docs = merged.docs
    assert len(docs) == 20_000  # the first shard's, none added: every one of the second's has a partner
    assert all([match.text for match in doc.matches] == [str(i)] * 2 for i, doc in enumerate(docs))


def searched_twice(shard: int, copies: int = 2) -> DataRequest:
    """A shard's answer to a request of documents sharing the id "dup": each gains a hit of the shard's own,
    and the shard sets a uri naming it and the copy's position."""
    docs = [Document(id="dup", text=f"copy {n}") for n in range(copies)]
    for n, doc in enumerate(docs):
        doc.matches.append(Document(id=f"m-{shard}", text=f"shard {shard}"))
        doc.uri = f"shard-{shard}-copy-{n}"
    return DataRequest(docs, endpoint="/search")


def test_documents_sharing_an_id_each_gain_what_a_later_shard_found_for_the_copy_at_their_position():
    # keyed by id alone, the second copy gained shard 1's hits of both copies and the first none (Jina's head
    # gives both copies shard 1's hit only, losing shard 0's); by position nothing is lost
    merged = merge_shard_responses("dep", [(0, searched_twice(0)), (1, searched_twice(1)), (2, searched_twice(2))])
    assert [(doc.id, doc.text, doc.matches.ids) for doc in merged.docs] == [
        ("dup", "copy 0", ["m-0", "m-1", "m-2"]),
        ("dup", "copy 1", ["m-0", "m-1", "m-2"]),
    ]
    assert [doc.uri for doc in merged.docs] == ["shard-0-copy-0", "shard-0-copy-1"]  # the first shard's, each


def test_copies_of_an_id_a_later_shard_has_more_of_are_added_not_folded():
    unique = DataRequest([Document(id="dup", text="copy 0"), Document(id="other")], endpoint="/search")
    unique.docs[0].matches.append(Document(id="m-0"))
    merged = merge_shard_responses("dep", [(0, unique), (1, searched_twice(1, copies=3))])
    assert [(doc.text, doc.matches.ids) for doc in merged.docs] == [
        ("copy 0", ["m-0", "m-1"]), ("", []), ("copy 1", ["m-1"]), ("copy 2", ["m-1"])
    ]
    query = Document(id="q")  # and among matches: a shard's answer holding one hit twice keeps both
    query.matches.extend([Document(id="hit", text="once"), Document(id="hit", text="twice")])
    merged = merge_shard_responses("dep", [(0, DataRequest([Document(id="q")])), (1, DataRequest([query]))])
    assert [match.text for match in merged.docs[0].matches] == ["once", "twice"]


def shard_copy(uri: str = "", mime_type: str = "", **fields) -> DataRequest:
    """A shard's answer holding query ``q`` with ``fields`` set on it (and on its match ``m``)."""
    query, match = Document(id="q", **fields), Document(id="m", **fields)
    for doc in (query, match):
        doc.proto.uri, doc.proto.mime_type = uri, mime_type
    query.matches.append(match)
    return DataRequest([query], endpoint="/search")


def test_a_field_only_a_later_shard_set_is_kept_as_docarrays_reduce_keeps_it():
    # shard 1 embeds the query and names its uri; shard 0 set neither: a Jina head returns both (the fields
    # of a later copy fill what the first left empty), and so must a shardnet head, matches included
    later = shard_copy(uri="found-by-1", embedding=[1.0, 2.0, 3.0], tags={"by": 1})
    later.proto.data.docs.docs[0].scores["cosine"].value = 0.5
    later.proto.data.docs.docs[0].location.extend([4.0, 5.0])
    merged = merge_shard_responses("dep", [(0, shard_copy()), (1, later)])
    [query] = merged.docs
    assert query.proto.uri == "found-by-1"
    assert list(query.embedding) == [1.0, 2.0, 3.0]
    assert query.tags == {"by": 1}
    assert query.proto.scores["cosine"].value == 0.5
    assert list(query.proto.location) == [4.0, 5.0]
    assert query.matches[0].proto.uri == "found-by-1" and list(query.matches[0].embedding) == [1.0, 2.0, 3.0]
    assert query.matches.ids == ["m"]  # merged, not repeated


def test_where_several_shards_set_a_field_the_first_shards_value_wins():
    merged = merge_shard_responses(
        "dep", [(0, shard_copy(uri="first")), (1, shard_copy(uri="second", mime_type="text/plain"))]
    )
    [query] = merged.docs
    assert (query.proto.uri, query.proto.mime_type) == ("first", "text/plain")


def test_content_of_another_kind_from_a_later_copy_replaces_the_first_as_docarrays_setters_do():
    # a store-like shard sets the tensor of a query another shard echoed with its text: a Jina head returns the
    # tensor (docarray's text, blob and tensor are three fields, each setter clearing the others)
    merged = merge_shard_responses(
        "dep", [(0, shard_copy(text="echoed")), (1, shard_copy(tensor=np.arange(3, dtype=np.float32)))]
    )
    [query] = merged.docs
    assert query.proto.WhichOneof("content") == "tensor" and list(query.tensor) == [0.0, 1.0, 2.0]


def test_content_of_the_same_kind_keeps_the_first_copys():
    merged = merge_shard_responses("dep", [(0, shard_copy(text="kept")), (1, shard_copy(text="other"))])
    assert merged.docs[0].text == "kept"


def test_content_only_a_later_copy_holds_is_taken():
    merged = merge_shard_responses("dep", [(0, shard_copy()), (1, shard_copy(blob=b"found"))])
    assert merged.docs[0].blob == b"found"


def test_tags_present_but_empty_count_as_not_set():
    first = shard_copy()
    first.proto.data.docs.docs[0].tags.SetInParent()  # touched, never filled
    merged = merge_shard_responses("dep", [(0, first), (1, shard_copy(tags={"k": "v"}))])
    assert merged.docs[0].tags == {"k": "v"}


def raised(error: BaseException, executor: str = "Probe") -> DataRequest:
    answer = shard_answer()
    try:
        raise error
    except type(error) as caught:
        answer.set_exception(caught, executor=executor)
    return answer


def test_a_shards_executor_error_reaches_the_client_as_raised_with_every_shard_named_in_the_description():
    merged = merge_shard_responses("dep", [(0, raised(ValueError("boom", 7))), (1, shard_answer())])
    status = merged.status
    assert merged.is_error
    assert (status.exception.name, list(status.exception.args), status.exception.executor) == (
        "ValueError", ["boom", "7"], "Probe"
    )  # as a Jina head passes it on: a client reading the arguments gets the executor's own
    assert any("ValueError" in line for line in status.exception.stacks)
    assert status.description == "shard 0 of 'dep' answered an error: ValueError('boom', 7)"


def test_a_failed_shard_beside_an_erroring_one_is_named_too_and_the_executors_error_kept():
    merged = merge_shard_responses(
        "dep", [(0, shard_answer()), (1, raised(KeyError("k"))), (2, ConnectionError("refused"))]
    )
    status = merged.status
    assert (status.exception.name, list(status.exception.args)) == ("KeyError", ["k"])
    assert status.description == (
        "shard 1 of 'dep' answered an error: KeyError('k'); shard 2 of 'dep' failed: refused"
    )


def test_shards_that_only_failed_give_a_shard_error_naming_them():
    merged = merge_shard_responses("dep", [(0, shard_answer()), (1, ConnectionError("refused"))])
    status = merged.status
    assert (status.exception.name, status.exception.executor) == ("ShardError", "dep")
    assert list(status.exception.args) == [status.description] == ["shard 1 of 'dep' failed: refused"]


def test_empty_content_from_a_later_copy_replaces_nothing_and_an_empty_first_content_is_none():
    # a shard that cleared the echoed query's text (set, empty) must not wipe the tensor another found
    cleared = shard_copy(text="")
    merged = merge_shard_responses(
        "dep", [(0, shard_copy(tensor=np.arange(3, dtype=np.float32))), (1, cleared)]
    )
    assert merged.docs[0].proto.WhichOneof("content") == "tensor"
    merged = merge_shard_responses("dep", [(0, shard_copy(text="keep me")), (1, shard_copy(blob=b""))])
    assert merged.docs[0].text == "keep me"
    merged = merge_shard_responses("dep", [(0, shard_copy(text="")), (1, shard_copy(text="found"))])
    assert merged.docs[0].text == "found"  # docarray counts "" as no text: the later copy's fills it


def test_a_uses_after_passing_a_shards_error_on_is_not_named_twice():
    """A uses_after answers with the shard's error as it came: the description said it, then the shard's again."""
    from shardnet.runtimes.merge import report_shard_problems

    failed = DataRequest([Document(id="a")])
    failed.set_exception(ValueError("boom"), executor="Idx")
    passed_on = DataRequest.from_bytes(failed.to_bytes())  # what the uses_after answered, the error kept
    report_shard_problems(passed_on, "idx", [(1, failed)])
    assert passed_on.status.description == "shard 1 of 'idx' answered an error: ValueError('boom')"
    own = DataRequest([Document(id="a")])
    own.set_exception(RuntimeError("reducer broke"), executor="After")  # an error of the uses_after's own stays first
    report_shard_problems(own, "idx", [(1, failed)])
    assert own.status.description == "RuntimeError('reducer broke'); shard 1 of 'idx' answered an error: ValueError('boom')"


def test_every_shard_failed_names_each_shard_within_room_and_keeps_the_status_of_one_that_may_have_run():
    import grpc

    from shardnet.errors import ReplicaError, RoutingError
    from shardnet.runtimes.merge import FAILURES_ROOM, every_shard_failed

    def failed(shard, unsent=True, cause="down"):
        return shard, ReplicaError(cause, address=f"10.0.0.{shard}:1", code=grpc.StatusCode.UNAVAILABLE,
                                   deployment="dep", shard_id=shard, unsent=unsent)

    two = every_shard_failed("dep", [failed(0), (1, failed(1, unsent=False)[1])])
    assert str(two) == (  # shard 1, whose status is raised (it may have run the request), named first
        "all 2 shards of 'dep' failed (2 UNAVAILABLE): shard 1 of 'dep' failed: deployment 'dep', shard 1, replica "
        "10.0.0.1:1: UNAVAILABLE: down; shard 0 of 'dep' failed: deployment 'dep', shard 0, replica 10.0.0.0:1: "
        "UNAVAILABLE: down"
    )
    assert two.code == grpc.StatusCode.UNAVAILABLE and two.unsent is False  # shard 1 may have run it
    many = every_shard_failed("dep", [failed(shard, cause="x" * 500) for shard in range(100)])
    assert len(str(many)) < FAILURES_ROOM + 200 and "shard 0 of 'dep'" in str(many)
    # a review's 64 shards, mostly down, the last hung: the status raised is the hung one's (it may have run), and
    # the message named only down shards, past its room before the hung one; now it comes first, with the counts
    hung = ReplicaError("timed out", address="10.0.0.63:1", code=grpc.StatusCode.DEADLINE_EXCEEDED, deployment="dep",
                        shard_id=63)
    mixed = every_shard_failed("dep", [failed(shard, cause="x" * 500) for shard in range(63)] + [(63, hung)])
    assert mixed.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(mixed).startswith("all 64 shards of 'dep' failed (63 UNAVAILABLE, 1 DEADLINE_EXCEEDED): shard 63 of")
    empty = (2, RoutingError("no live replica", deployment="dep", shard_id=2))  # a status word, not a class name
    assert "failed (1 UNAVAILABLE, 1 no replica): " in str(every_shard_failed("dep", [failed(0), empty]))
    assert str(many).endswith("more shards failed (unnamed: a gRPC status's details must stay small)")
    one = failed(3)[1]
    assert every_shard_failed("dep", [(3, one)]) is one


def test_an_error_every_shard_answers_is_named_within_room_not_repeated_whole_per_shard():
    """Each shard's error quoted whole, 16 shards raising a 100 KB message made a 1.6 MB description: the merged
    answer passed the head's limit though each shard's fitted, and the caller got RESOURCE_EXHAUSTED, not the
    error. The first error's exception still comes whole."""
    from shardnet.runtimes.merge import FAILURES_ROOM

    message = "bad input " + "x" * 100_000
    merged = merge_shard_responses("dep", [(shard, raised(ValueError(message))) for shard in range(16)])
    status = merged.status
    assert list(status.exception.args) == [message]  # the executor's own, whole
    assert len(status.description) < FAILURES_ROOM + 200
    assert status.description.startswith("shard 0 of 'dep' answered an error: ValueError('bad input xxx")
    assert status.description.endswith("; and 15 more shard problem(s), unnamed to keep the answer small")
    assert len(merged.to_bytes()) < 2 * len(raised(ValueError(message)).to_bytes())


def test_every_shard_failed_keeps_its_message_within_what_grpc_sends_of_non_ascii_text():
    """gRPC percent-encodes each byte of a status's details that is not printable ASCII (three characters a byte):
    counted in characters, 4,096 of them made up to 48 KB of trailer, past the 16 KB a client takes, and the
    caller got RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit' instead of the shards' failures."""
    import grpc

    from shardnet.errors import ReplicaError
    from shardnet.runtimes.merge import every_shard_failed

    def said(text: str) -> int:  # the size of grpc-message on the wire
        raw = text.encode("utf-8")
        return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in raw)

    for cause in ("é" * 1200, "日" * 900, "%" * 2000, "x" * 100 + "é" * 5000):
        failures = [(shard, ReplicaError(cause, address=f"10.0.0.{shard}:1", code=grpc.StatusCode.INTERNAL,
                                         deployment="dep", shard_id=shard)) for shard in range(3)]
        message = str(every_shard_failed("dep", failures))
        assert said(message) <= 8192, (cause[:3], said(message))
        assert message.startswith("all 3 shards of 'dep' failed (3 INTERNAL): shard 0 of 'dep' failed: ")


def test_the_shard_whose_exception_the_answer_carries_is_named_even_when_failed_calls_fill_the_room():
    """Failed calls come first in shard order: a long one (a head behind the head, naming its own shards) filled
    the room, and the description named only it while the answer carried another shard's ValueError, unnamed."""
    import grpc

    from shardnet.errors import ReplicaError

    down = ReplicaError("all 3 shards of 'inner' failed: " + "y" * 5000, address="10.0.0.0:1",
                        code=grpc.StatusCode.UNAVAILABLE, deployment="dep", shard_id=0)
    merged = merge_shard_responses("dep", [(0, down), (1, raised(ValueError("bad input"))), (2, shard_answer())])
    status = merged.status
    assert status.exception.name == "ValueError"
    assert status.description.startswith("shard 1 of 'dep' answered an error: ValueError('bad input')"), \
        status.description[:120]


def test_shards_long_errors_are_cut_before_they_are_quoted_not_copied_whole_per_shard():
    """Each shard's error was quoted whole in a problem text before the room cut it: 64 shards answering an error
    that quotes a 10 MB input made 640 MB more text (seconds, and the head's memory twice the answers'), of which
    4 KB was said. A problem holds no more of its shard's text than the room could say; the length said is whole."""
    import tracemalloc

    from shardnet.runtimes.merge import FAILURES_ROOM

    message = "bad input " + "é" * 1_000_000
    outcomes = [(shard, raised(ValueError(message))) for shard in range(16)]
    for _, outcome in outcomes:
        assert outcome.is_error  # its header read before the measure
    tracemalloc.start()
    try:
        merged = merge_shard_responses("dep", outcomes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    description = merged.status.description
    assert peak < 6 * len(message), peak  # a few shards' texts at a time (each read once), not all 16 copied
    assert description.startswith("shard 0 of 'dep' answered an error: ValueError('bad input éé")
    whole = len(f"shard 0 of 'dep' answered an error: {raised(ValueError(message)).status.description}")
    assert f"... ({whole} characters, cut)" in description  # the whole length, not the part kept
    assert len(description) < FAILURES_ROOM + 200
    assert description.endswith("; and 15 more shard problem(s), unnamed to keep the answer small")
