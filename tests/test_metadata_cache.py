"""MetadataCache: a call's gRPC metadata is built once per endpoint and reused, bounded, and checked."""

from __future__ import annotations

import grpc.aio
import pytest

from shardnet import ProtocolError
from shardnet.networking.channels import MetadataCache


def test_one_metadata_object_per_endpoint_and_extra_pairs():
    cache = MetadataCache(fixed=[("x-tenant", "blue")])
    index = cache.for_endpoint("/index")
    assert isinstance(index, grpc.aio.Metadata)
    assert cache.for_endpoint("/index") is index
    assert list(index) == [("endpoint", "/index"), ("x-tenant", "blue")]
    traced = cache.for_endpoint("/index", (("x-trace", "t1"),))
    assert traced is not index and list(traced)[-1] == ("x-trace", "t1")
    assert list(cache.for_endpoint(None)) == [("x-tenant", "blue")]  # no endpoint: no endpoint pair


def test_the_cache_forgets_everything_at_its_limit():
    cache = MetadataCache(limit=2)
    first = cache.for_endpoint("/a")
    cache.for_endpoint("/b")
    cache.for_endpoint("/c")  # the limit was reached: /a and /b are forgotten
    again = cache.for_endpoint("/a")
    assert again is not first and list(again) == list(first)


def test_an_endpoint_grpc_cannot_send_is_left_to_the_requests_header():
    cache = MetadataCache(fixed=(("x-tenant", "blue"),))
    assert list(cache.for_endpoint("/caf\u00e9")) == [("x-tenant", "blue")]
    assert list(cache.for_endpoint("/line\nbreak")) == [("x-tenant", "blue")]


def test_unhashable_extra_pairs_are_built_without_caching():
    cache = MetadataCache()
    extra = [["x-trace", "t1"]]  # lists, as a caller might pass them
    built = cache.for_endpoint("/index", extra)
    assert list(built) == [("endpoint", "/index"), ("x-trace", "t1")]
    assert cache.for_endpoint("/index", extra) is not built


def test_tuples_given_to_get_are_built_once_and_anything_else_passes_through():
    cache = MetadataCache()
    pairs = (("endpoint", "/index"),)
    assert cache.get(pairs) is cache.get(pairs)
    already = grpc.aio.Metadata(("endpoint", "/x"))
    assert cache.get(already) is already
    assert cache.get(()) == ()
