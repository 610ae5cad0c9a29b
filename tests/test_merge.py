"""The ALL merge's handling of dict results (``__results__``), on DataRequests built in memory."""

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
