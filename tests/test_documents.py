"""Document and DocumentList views, tensors through NdArray, and malformed arrays."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardnet import DataRequest, Document, DocumentList, ProtocolError
from shardnet.protocol import budget, ndarray
from shardnet.protocol.documents import TAG_LEVELS
from shardnet.protocol.proto import docarray_pb2


def test_document_fields():
    doc = Document(id="d1", text="hello", tags={"lang": "en", "n": 2})
    assert (doc.id, doc.text) == ("d1", "hello")
    assert doc.tags == {"lang": "en", "n": 2.0}
    doc.tags["extra"] = True
    del doc.tags["n"]
    assert dict(doc.tags) == {"lang": "en", "extra": True}
    assert len(Document().id) == 32 and Document().id != Document().id
    blob = Document(blob=b"\x00\x01")
    assert blob.blob == b"\x00\x01" and blob.proto.WhichOneof("content") == "blob"


def test_matches_and_chunks_are_assigned_a_list_as_in_docarray():
    query = Document(text="q")
    query.matches = [Document(id="a"), Document(id="b")]
    assert query.matches.ids == ["a", "b"]
    query.matches = query.matches[1:]  # views into the very list
    assert query.matches.ids == ["b"]
    query.chunks = (Document(text=word) for word in "two words".split())
    assert query.chunks.texts == ["two", "words"]
    with pytest.raises(TypeError, match="got str"):
        query.matches = ["not a document"]
    assert query.matches.ids == ["b"]  # a refused assignment leaves the matches as they were


def test_a_document_has_docarrays_uri_mime_type_and_placement_fields_as_attributes():
    """The README named them, but they were reachable through ``doc.proto`` only (a README review's find)."""
    doc = Document(id="d", uri="s3://bucket/a.png", mime_type="image/x-mine")
    assert (doc.uri, doc.mime_type) == ("s3://bucket/a.png", "image/x-mine")  # a type given is kept
    assert Document(uri="photo.png").mime_type == "image/png"  # as docarray's setter guesses it
    assert Document(uri="no-extension").mime_type == ""
    query = Document(id="q")
    query.chunks = [doc]
    query.matches = [Document(id="m")]
    chunk, match = query.chunks[0], query.matches[0]
    assert (chunk.parent_id, chunk.granularity, chunk.adjacency) == ("q", 1, 0)
    assert (match.adjacency, match.granularity, match.parent_id) == (1, 0, "")
    match.adjacency, chunk.parent_id, chunk.granularity = 3, "other", np.uint32(2)  # numpy's integers too
    assert (match.proto.adjacency, chunk.proto.parent_id, chunk.granularity) == (3, "other", 2)
    for field, value in (("adjacency", -1), ("granularity", 2**32), ("adjacency", True), ("granularity", 1.5),
                         ("uri", b"x"), ("parent_id", 7)):
        with pytest.raises(TypeError, match=f"Document.{field} takes"):
            setattr(match, field, value)
    assert match.adjacency == 3  # refused values leave it as it was


def test_matches_and_chunks_added_are_placed_under_their_document_as_docarray_places_them():
    """docarray gives a match adjacency one more than its document's, and a chunk granularity one more and the
    document's id as parent; a Jina worker's answers carry them, and a shardnet worker's did not (a review)."""
    query = Document(id="q")
    query.matches.append(Document(id="m"))
    query.matches.extend([Document(id="n")])
    query.chunks = [Document(id="c")]
    assert [m.proto.adjacency for m in query.matches] == [1, 1]
    chunk = query.chunks[0]
    assert (chunk.proto.parent_id, chunk.proto.granularity) == ("q", 1)
    chunk.matches.append(Document())
    chunk.chunks.append(Document())
    assert chunk.matches[0].proto.adjacency == 1
    assert (chunk.chunks[0].proto.parent_id, chunk.chunks[0].proto.granularity) == ("c", 2)
    deepest = Document()
    deepest.proto.adjacency = 2**32 - 1  # from the network: uint32's last value stays, no overflow
    deepest.matches.append(Document())
    assert deepest.matches[0].proto.adjacency == 2**32 - 1


def test_tensor_and_embedding_round_trip():
    tensor = np.arange(12, dtype=np.float32).reshape(3, 4)
    embedding = np.array([0.5, -1.0], dtype="<f8")
    doc = Document(tensor=tensor, embedding=embedding)
    back = Document(proto=docarray_pb2.DocumentProto.FromString(doc.proto.SerializeToString()))
    np.testing.assert_array_equal(back.tensor, tensor)
    assert back.tensor.dtype == np.float32
    np.testing.assert_array_equal(back.embedding, embedding)
    assert back.proto.embedding.dense.dtype == "<f8"
    back.embedding = None
    assert back.embedding is None and Document().tensor is None


def test_tensor_none_drops_the_tensor_and_keeps_a_text_as_docarray_does():
    texted = Document(text="hello")
    texted.tensor = None
    assert texted.text == "hello" and texted.proto.WhichOneof("content") == "text"
    tensored = Document(tensor=np.arange(3))
    tensored.tensor = None
    assert tensored.tensor is None and tensored.proto.WhichOneof("content") is None


REFUSED_ARRAYS = [np.array([object(), 1], dtype=object), np.zeros(2, dtype="f4,i4"), np.zeros(2, dtype="V8")]


def test_a_time_without_a_unit_is_refused_when_set_not_only_when_read():
    """np.array([np.datetime64("NaT")]) has no unit: it was sent, went through a worker, and failed only where
    its answer was read, far from its cause (a regression review)."""
    document = Document(id="d", text="kept")
    with pytest.raises(ProtocolError, match="tensor of document 'd': cannot send .*a time without a unit"):
        document.tensor = np.array([np.datetime64("NaT")] * 2)
    assert document.text == "kept"
    document.tensor = np.array(["2026-11-28"], dtype="datetime64[D]")  # with a unit, it travels
    assert document.tensor.dtype == np.dtype("<M8[D]")


@pytest.mark.parametrize("refused", REFUSED_ARRAYS)
def test_an_array_refused_leaves_the_documents_content_and_arrays_as_they_were(refused):
    texted = Document(id="t-1", text="hello", embedding=np.ones(4))
    for field in ("tensor", "embedding"):
        with pytest.raises(ProtocolError, match=f"^{field} of document 't-1': cannot send an array of dtype .*: only"):
            setattr(texted, field, refused)
    assert texted.text == "hello" and texted.proto.WhichOneof("content") == "text"
    np.testing.assert_array_equal(texted.embedding, np.ones(4))
    tensored = Document(tensor=np.arange(3.0))
    with pytest.raises(ProtocolError):
        tensored.tensor = refused
    np.testing.assert_array_equal(tensored.tensor, np.arange(3.0))
    target = docarray_pb2.NdArrayProto()
    ndarray.to_proto(np.arange(2), target)
    for values in (refused, np.array(["a", "b"])):  # a sparse array's values are added up when densified
        with pytest.raises(ProtocolError, match="only numbers travel"):
            ndarray.write_sparse(np.array([[0], [1]]), values, (2,), target)
    np.testing.assert_array_equal(ndarray.from_proto(target), np.arange(2))


# what docarray sends as plain buffers (dtype.str, ``tobytes()``), and a Jina executor reads and writes
PLAIN_ARRAYS = {
    "str": np.array(["a", "bc"]),
    "str_big_endian": np.array([["é", "naïve"], ["", "🙂"]], dtype=">U5"),
    "bytes": np.array([b"a", b"b\x00c"]),
    "datetime64": np.array(["2020-01-01", "NaT"], dtype="datetime64[D]"),
    "datetime64_ns": np.array(["2020-01-01T12:00:00.000000001"], dtype="datetime64[ns]"),
    "timedelta64": np.array([1, -2], dtype="timedelta64[s]"),
    "str_scalar": np.array("one"),
    "str_empty": np.zeros((0, 3), dtype="<U4"),
    "float32": np.arange(4, dtype=np.float32),
}


@pytest.mark.parametrize("name", PLAIN_ARRAYS)
def test_strings_bytes_and_datetimes_round_trip_as_docarray_writes_them(name):
    array = PLAIN_ARRAYS[name]
    doc = Document(tensor=array, embedding=array)
    back = Document(proto=docarray_pb2.DocumentProto.FromString(doc.proto.SerializeToString()))
    for read in (back.tensor, back.embedding):
        assert read.dtype == array.dtype and read.shape == array.shape
        np.testing.assert_array_equal(read, array)
    dense = back.proto.tensor.dense  # docarray's form: the C-ordered buffer, the shape and dtype.str
    assert (dense.dtype, dense.buffer, tuple(dense.shape)) == (array.dtype.str, array.tobytes(), array.shape)


def test_sparse_array_is_densified():
    target = docarray_pb2.NdArrayProto()
    ndarray.write_sparse(np.array([[0, 1], [2, 0]]), np.array([5.0, 7.0]), (3, 2), target)
    dense = ndarray.from_proto(target)
    np.testing.assert_array_equal(dense, np.array([[0, 5.0], [0, 0], [7.0, 0]]))


def test_a_coordinate_a_sparse_array_gives_twice_holds_the_sum_as_docarray_reads_it():
    target = docarray_pb2.NdArrayProto()  # scipy's COO keeps duplicates, and toarray() (torch's coalesce) sums them
    ndarray.write_sparse(np.array([[0, 1], [0, 1], [1, 0]]), np.array([1.0, 2.0, 4.0]), (2, 2), target)
    np.testing.assert_array_equal(ndarray.from_proto(target), np.array([[0, 3.0], [4.0, 0]]))


def test_sparse_arrays_are_labelled_as_docarray_reads_them():
    matrix, cube = docarray_pb2.NdArrayProto(), docarray_pb2.NdArrayProto()
    ndarray.write_sparse(np.array([[0, 1]]), np.array([5.0]), (3, 2), matrix)
    assert matrix.cls_name == "scipy" and matrix.parameters["sparse_format"] == "coo"
    ndarray.write_sparse(np.array([[0, 1, 1]]), np.array([5.0]), (3, 2, 2), cube)
    assert cube.cls_name == "tensorflow"  # (nnz, ndim), as ours
    assert ndarray.from_proto(cube)[0, 1, 1] == 5.0


def test_torch_sparse_indices_are_read_in_torchs_layout():
    """torch keeps indices as (ndim, nnz); read as (nnz, ndim) they put values in the wrong cells."""
    target = docarray_pb2.NdArrayProto()
    ndarray.write_dense(np.array([[0, 1], [2, 3]]), target.sparse.indices)  # two values, at [0, 2] and [1, 3]
    ndarray.write_dense(np.array([5.0, 7.0]), target.sparse.values)
    target.sparse.shape.extend((3, 4))
    target.cls_name = "torch"
    dense = ndarray.from_proto(target)
    assert dense[0, 2] == 5.0 and dense[1, 3] == 7.0 and dense.sum() == 12.0


def _units(unit: bytes, dtype: str) -> docarray_pb2.DenseNdArrayProto:
    return docarray_pb2.DenseNdArrayProto(buffer=unit * 4, dtype=dtype)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda dense: setattr(dense, "buffer", b"\x00" * 3), "buffer holds 3 bytes"),
        (lambda dense: setattr(dense, "dtype", "O"), "dtype 'O' is not plain data"),
        (lambda dense: setattr(dense, "dtype", "V16"), "dtype 'V16' is not plain data"),
        (lambda dense: setattr(dense, "dtype", "<f4,<i4,<f8"), "is not plain data"),  # fields
        (lambda dense: setattr(dense, "dtype", "(2,)<f8"), "is not plain data"),  # a subarray
        (lambda dense: setattr(dense, "dtype", "<U4"), "buffer holds 16 bytes, shape (2, 2) of <U4 needs 64"),
        (lambda dense: setattr(dense, "dtype", "|S3"), "buffer holds 16 bytes, shape (2, 2) of |S3 needs 12"),
        (lambda dense: setattr(dense, "dtype", "<U0"), "dtype '<U0' has no size"),
        (lambda dense: setattr(dense, "dtype", "S"), "dtype 'S' has no size"),
        # a time without a unit: numpy gave its values out as None (a regression review)
        (lambda dense: setattr(dense, "dtype", "<M8"), "dtype '<M8' is a time without a unit"),
        (lambda dense: setattr(dense, "dtype", "<m8"), "dtype '<m8' is a time without a unit"),
        # four UCS-4 units, each past U+10FFFF
        (lambda dense: dense.MergeFrom(_units(b"\xff\xff\xff\xff", "<U1")), "holds 0xffffffff, past U+10FFFF"),
        (lambda dense: dense.MergeFrom(_units(b"\0\x11\0\0", ">U1")), "holds 0x110000, past U+10FFFF"),
        (lambda dense: setattr(dense, "dtype", "no-such-dtype"), "unknown dtype"),
        (lambda dense: setattr(dense, "dtype", ","), "unknown dtype"),  # numpy raises SyntaxError for this one
        # numpy reads this as int32; the sender's text would be parsed and cached whole
        (lambda dense: setattr(dense, "dtype", "<i" + "0" * 100_000 + "4"), "dtype name has 100003 characters"),
    ],
)
def test_malformed_ndarray_raises_protocol_error(mutate, message):
    target = docarray_pb2.NdArrayProto()
    ndarray.to_proto(np.zeros((2, 2), dtype=np.float32), target)
    mutate(target.dense)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        ndarray.from_proto(target)


def test_a_shape_whose_size_overflows_64_bits_is_refused_not_reshaped():
    target = docarray_pb2.NdArrayProto()
    target.dense.dtype = "<f8"
    target.dense.shape.extend([65536, 65536, 65536, 65536])  # 2**64 elements: wraps to 0 in int64, as the buffer is
    with pytest.raises(ProtocolError, match="buffer holds 0 bytes"):
        ndarray.from_proto(target)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_shape_of_hundreds_of_thousands_of_dimensions_is_refused_before_its_size_is_computed(kind):
    target = docarray_pb2.NdArrayProto()
    if kind == "dense":
        target.dense.dtype = "<f8"
        target.dense.shape.extend([2] * 500_000)  # half a megabyte of request; the product alone took seconds
    else:
        ndarray.write_sparse(np.zeros((0, 2), dtype=np.int64), np.zeros(0), (2, 2), target)
        del target.sparse.shape[:]
        target.sparse.shape.extend([2] * 500_000)
    with pytest.raises(ProtocolError, match="shape has 500000 dimensions; at most 64"):
        ndarray.from_proto(target)


def test_a_sparse_array_may_not_expand_beyond_the_limit():
    target = docarray_pb2.NdArrayProto()
    ndarray.write_sparse(np.zeros((0, 2), dtype=np.int64), np.zeros(0), (100_000, 125_000), target)  # 93 GiB dense
    with pytest.raises(ProtocolError, match="would expand to 100000000000 bytes"):
        ndarray.from_proto(target)
    within = docarray_pb2.NdArrayProto()
    ndarray.write_sparse(np.array([[1, 2]]), np.array([3.0]), (1024, 1024), within)
    assert ndarray.from_proto(within)[1, 2] == 3.0


def _sparse(indices: docarray_pb2.DenseNdArrayProto, values: docarray_pb2.DenseNdArrayProto, shape):
    target = docarray_pb2.NdArrayProto()
    target.sparse.indices.CopyFrom(indices)
    target.sparse.values.CopyFrom(values)
    target.sparse.shape.extend(shape)
    return target


def _dense(array: np.ndarray) -> docarray_pb2.DenseNdArrayProto:
    message = docarray_pb2.DenseNdArrayProto()
    ndarray.write_dense(array, message)
    return message


@pytest.mark.parametrize(
    "target, message",
    [
        (_sparse(_dense(np.zeros((1, 0), np.int64)), _dense(np.array(5.0)), ()), "at least one dimension"),  # 0-d
        (_sparse(_dense(np.zeros((1, 0), np.int64)), _dense(np.array([5.0])), ()), "at least one dimension"),
        (_sparse(_dense(np.zeros((1, 1), np.int64)), _dense(np.array(5.0)), (2,)), "do not fit values"),
        (_sparse(_dense(np.array([[0.5, 1.0]])), _dense(np.array([1.0])), (2, 2)), "indices must be integers"),
        (_sparse(_dense(np.zeros((1, 1), np.int64)), _dense(np.array(["a"])), (2,)), "values must be numbers"),
        (_sparse(_dense(np.zeros((0, 3), np.int64)), _dense(np.zeros(0)), (0, 2**31, 2**31)), "is not usable"),
    ],
)
def test_malformed_sparse_arrays_raise_protocol_error(target, message):
    with pytest.raises(ProtocolError, match=message):
        ndarray.from_proto(target)


def test_an_empty_shape_numpy_calls_too_big_is_a_protocol_error():
    target = docarray_pb2.NdArrayProto()
    target.dense.dtype = "<f8"
    target.dense.shape.extend([0, 2**30, 2**30])
    with pytest.raises(ProtocolError, match="is not usable"):
        ndarray.from_proto(target)


def test_object_arrays_do_not_travel():
    with pytest.raises(ProtocolError, match="only numbers, strings, bytes, datetimes and timedeltas travel"):
        Document(tensor=np.array([object()]))


def test_an_unreadable_array_names_its_field_and_document():
    doc = Document(id="doc-7", tensor=np.zeros(2), embedding=np.zeros(2))
    doc.proto.tensor.dense.dtype, doc.proto.embedding.dense.dtype = "O", "<U3"
    with pytest.raises(ProtocolError, match="^tensor of document 'doc-7': NdArray dtype 'O' is not plain data"):
        doc.tensor
    with pytest.raises(ProtocolError, match=r"^embedding of document 'doc-7': NdArray buffer holds 16 bytes"):
        doc.embedding
    doc.proto.id = "x" * 100_000  # a refusal travels in an answer: the id in it is cut
    with pytest.raises(ProtocolError, match="^tensor of document 'x{64}\\.\\.\\.'"):
        doc.tensor


def test_document_list_is_list_like():
    request = DataRequest(docs=[Document(text=str(i)) for i in range(5)])
    docs = request.docs
    assert len(docs) == 5
    assert [doc.text for doc in docs[1:3]] == ["1", "2"]
    del docs[0]
    assert docs.texts == ["1", "2", "3", "4"]
    docs.replace(reversed(list(docs)))
    assert docs.texts == ["4", "3", "2", "1"]
    docs.clear()
    assert len(request.docs) == 0


def test_assigning_and_inserting_documents_reaches_the_wire():
    """``docs[0] = Document(...)``, slice assignment and ``docs.insert`` failed with a bare ``AttributeError:
    __setitem__`` (found by a review); they work as a list's, and the request sent carries them."""
    request = DataRequest.from_bytes(DataRequest(docs=[Document(id=i) for i in "abcd"]).to_bytes())
    docs = request.docs
    replacement = Document(id="x")
    docs[0] = replacement
    replacement.text = "edited"  # it views the stored copy, as after append
    docs[-1] = docarray_pb2.DocumentProto(id="y")
    docs.insert(1, Document(id="i"))
    docs.insert(-100, Document(id="first"))
    docs.insert(100, Document(id="last"))
    assert docs.ids == ["first", "x", "i", "b", "c", "y", "last"]
    docs[1:4] = [Document(id="s")]  # shorter
    docs[5:] = [Document(id="t"), Document(id="u")]  # longer, past the end
    docs[::2] = [Document(id=i) for i in "0123"]  # extended: one for each position
    back = DataRequest.from_bytes(request.to_bytes()).docs
    assert back.ids == docs.ids == ["0", "s", "1", "y", "2", "t", "3"]
    with pytest.raises(ValueError, match="sequence of size 1 to extended slice of size 4"):
        docs[::2] = [Document()]
    with pytest.raises(IndexError):
        docs[7] = Document()
    with pytest.raises(TypeError, match="shardnet.Document"):
        docs[1:2] = [Document(id="kept"), "not a document"]  # refused before any change
    assert docs.ids == back.ids


def test_swapping_documents_through_views_swaps_them():
    # each view reads its slot: an assignment copying into the slot would leave the second view reading the
    # first's new content, and both slots the same
    docs = DataRequest(docs=[Document(id=i) for i in "abc"]).docs
    docs[0], docs[2] = docs[2], docs[0]
    assert docs.ids == ["c", "b", "a"]
    docs[0:2] = docs[1::-1]  # views into the very slots replaced
    assert docs.ids == ["b", "c", "a"]


def test_a_match_assigned_or_inserted_is_stamped_as_one_appended():
    doc = Document(id="q")
    doc.matches.append(Document(id="m0"))
    doc.matches[0] = Document(id="m1")
    doc.chunks.insert(0, Document(id="c"))
    doc.chunks[:] = [Document(id="c1"), *doc.chunks]
    assert [m.proto.adjacency for m in doc.matches] == [1]
    assert [(c.parent_id, c.granularity) for c in doc.chunks] == [("q", 1), ("q", 1)]


def test_a_document_list_extended_by_itself_doubles_once():
    request = DataRequest(docs=[Document(id="a"), Document(id="b")])
    docs = request.docs
    docs.extend(docs)  # read while it grew, it grew for ever
    assert docs.ids == ["a", "b", "a", "b"]
    docs.extend(doc for doc in docs if doc.id == "a")
    assert docs.ids == ["a", "b", "a", "b", "a", "a"]


def test_appended_document_stays_live():
    request = DataRequest()
    doc = Document(text="before")
    request.docs.append(doc)
    doc.text = "after"  # the Document now views the stored copy
    assert request.docs[0].text == "after"
    assert DataRequest.from_bytes(request.to_bytes()).docs[0].text == "after"


def test_matches_chunks_and_scores():
    doc = Document(text="q")
    doc.matches.append(Document(text="m"))
    doc.chunks.extend([Document(text="c1"), Document(text="c2")])
    doc.set_score("cosine", 0.25, op_name="cos")
    back = Document(proto=docarray_pb2.DocumentProto.FromString(doc.proto.SerializeToString()))
    assert back.matches.texts == ["m"] and back.chunks.texts == ["c1", "c2"]
    assert back.scores == {"cosine": 0.25}
    assert back == doc


def test_set_score_keeps_what_it_is_not_given_and_refuses_text_utf8_cannot_carry_leaving_the_score():
    """An interop review's find: ``set_score`` wrote op_name "" and ref_id the document's own id over what a score
    arrived with, where docarray's ``doc.scores[name].value = v`` keeps them; and a lone surrogate in op_name raised
    protobuf's bare UnicodeEncodeError after the value was written (a regression review's)."""
    doc = Document(id="m1")
    doc.set_score("cos", 0.875, op_name="cosine", ref_id="query-7")
    doc.set_score("cos", 0.75)  # a float32: values a binary fraction writes exactly
    [score] = doc.proto.scores.values()
    assert (score.value, score.op_name, score.ref_id) == (0.75, "cosine", "query-7")
    for bad in ({"op_name": "\udcff"}, {"ref_id": "\udcff"}):
        with pytest.raises(TypeError, match="lone surrogate"):
            doc.set_score("cos", 0.5, **bad)
    with pytest.raises(TypeError, match="lone surrogate"):
        doc.set_score("\udcff", 0.5)
    assert doc.scores == {"cos": 0.75} and doc.proto.scores["cos"].op_name == "cosine"
    fresh = Document(id="m2")
    fresh.set_score("new", 1.0)
    assert (fresh.proto.scores["new"].op_name, fresh.proto.scores["new"].ref_id) == ("", "")


_DTYPES = st.one_of(st.sampled_from(["<f8", "<f4", "<i8", "|u1", "|b1", "<c16", "e", ">i4", "O", "V4", "U3", "i3", ""]),
                    st.text(max_size=6))
_SHAPES = st.lists(st.integers(0, 5) | st.integers(0, 2**32 - 1), max_size=4)
_DENSE = st.builds(
    lambda dtype, shape, buffer: _with_shape(docarray_pb2.DenseNdArrayProto(dtype=dtype, buffer=buffer), shape),
    _DTYPES, _SHAPES, st.binary(max_size=64),
)


def _with_shape(message, shape):
    message.shape.extend(shape)
    return message


@settings(max_examples=400, deadline=None)
@given(dense=_DENSE, indices=_DENSE, values=_DENSE, shape=_SHAPES, sparse=st.booleans())
def test_any_ndarray_from_the_network_decodes_or_raises_protocol_error(dense, indices, values, shape, sparse):
    target = _sparse(indices, values, shape) if sparse else docarray_pb2.NdArrayProto(dense=dense)
    try:
        array = ndarray.from_proto(target)
    except ProtocolError:
        return
    assert array.nbytes <= budget.MAX_DENSE_BYTES


WRONG_VALUES = {
    "text-number": (lambda: Document(text=5), "Document.text takes text, got int"),
    "id-number": (lambda: Document(id=5), "Document.id takes text, got int"),
    "tags-list": (lambda: Document(tags=[1]), "tags take a mapping of text keys"),
    "tags-number-key": (lambda: Document(tags={1: 2}), "tags keys are text, got 1"),
    "tags-object": (lambda: Document(tags={"a": object()}), "tags['a'] must be JSON-like"),
    "tags-huge-int": (lambda: Document(tags={"x": 10**400}), "tags['x'] must be JSON-like"),
    "parameters-huge-int": (lambda: DataRequest(parameters={"x": 10**400}), "parameters['x'] must be JSON-like"),
    "docs-number": (lambda: DataRequest(docs=[1]), "documents are shardnet.Document (or DocumentProto) objects, got int"),
    "parameters-list": (lambda: DataRequest(parameters=[1]), "parameters take a mapping of text keys"),
    "endpoint-number": (lambda: DataRequest(endpoint=5), "an endpoint is text like '/index', got int"),
}


@pytest.mark.parametrize("make, message", WRONG_VALUES.values(), ids=WRONG_VALUES.keys())
def test_wrong_values_are_type_errors_that_say_what_was_expected(make, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        make()


@pytest.mark.parametrize(
    "tags, message", [({"ok": 1, "bad": object()}, "tags['bad'] must be JSON-like"), ({1: "x"}, "tags keys are text")]
)
def test_assigning_bad_tags_is_refused_naming_the_key_and_keeps_the_old_tags(tags, message):
    doc = Document(tags={"keep": 1})
    with pytest.raises(TypeError, match=re.escape(message)):
        doc.tags = tags
    assert dict(doc.tags) == {"keep": 1.0}
    [sent] = DataRequest.from_bytes(DataRequest([doc]).to_bytes()).docs  # and no empty entry goes on the wire
    assert dict(sent.tags) == {"keep": 1.0}
    doc.tags = {"new": "v"}  # a good assignment replaces them whole
    assert dict(doc.tags) == {"new": "v"}


def test_a_refused_value_changes_nothing():
    request = DataRequest(docs=[Document(text="a")], parameters={"k": "v"})
    with pytest.raises(TypeError):
        request.docs.append(5)
    with pytest.raises(TypeError):
        request.parameters = {"k": "new", "bad": object()}
    with pytest.raises(TypeError):
        request.docs[0].tags["bad"] = object()
    assert request.docs.texts == ["a"] and request.parameters == {"k": "v"} and dict(request.docs[0].tags) == {}


def test_a_document_list_answers_in_by_id_and_is_not_built_from_a_list():
    request = DataRequest([Document(id="a"), Document(id="b")])
    assert "a" in request.docs and Document(id="b") in request.docs
    assert "z" not in request.docs and 42 not in request.docs
    with pytest.raises(TypeError, match="make a plain list of Document"):
        DocumentList([Document()])


def test_tags_and_parameters_nested_deeper_than_protobuf_carries_are_refused_and_all_it_carries_taken():
    """Past about 50 lists protobuf itself failed with a SystemError (no shardnet error); a list holding itself
    recursed. What a request can carry (32 dicts, 48 lists in its parameters) is taken: a worker writes back
    the parameters it received."""

    def nested(kind: str, levels: int):
        value: object = {} if kind == "dict" else []
        for _ in range(levels - 1):
            value = {"k": value} if kind == "dict" else [value]
        return value

    for kind, most in (("dict", 32), ("list", 48)):
        request = DataRequest(parameters={"a": nested(kind, most)})
        assert DataRequest.from_bytes(request.to_bytes()).parameters["a"] == nested(kind, most)
        with pytest.raises(TypeError, match=r"parameters\['a'\] nests lists and dicts deeper than protobuf can carry"):
            DataRequest(parameters={"a": nested(kind, most + 1)})
    looped: list = []
    looped.append(looped)
    doc = Document(tags={"kept": 1})
    with pytest.raises(TypeError, match=r"tags\['x'\] nests lists and dicts deeper"):
        doc.tags["x"] = looped
    assert dict(doc.tags) == {"kept": 1}


def test_the_deepest_tags_a_document_takes_travel_on_a_match_of_a_chunk_and_one_level_more_is_refused():
    """A tag value took as many levels as a parameter's, 3 too many where a document sits: an Executor setting
    33 nested dicts on a document ran, and its caller got "malformed DataRequest" (a review's find)."""

    def nested(dicts: int) -> dict:
        value: dict = {}
        for _ in range(dicts - 1):
            value = {"k": value}
        return value

    deepest = next(dicts for dicts in range(40, 0, -1) if not _refused_as_tags(nested(dicts)))
    top = Document(id="top", tags={"t": nested(deepest)})
    top.chunks.append(Document(id="chunk"))
    top.chunks[0].matches.append(Document(id="match", tags={"t": nested(deepest)}))
    request = DataRequest([top])
    back = DataRequest.from_bytes(request.to_bytes())
    assert back.docs[0].chunks[0].matches[0].tags["t"] == nested(deepest) == back.docs[0].tags["t"]
    with pytest.raises(TypeError, match=r"tags\['t'\] nests lists and dicts deeper than protobuf can carry"):
        Document(tags={"t": nested(deepest + 1)})


def test_tags_as_deep_as_they_go_travel_on_a_match_and_a_document_too_deep_to_send_is_refused_leaving_the_list():
    """Regression reviews' finds: tags in lists 94 levels deep were taken on any document and made an answer no
    reader could parse when set on a match or a chunk (the handler ran, the caller got "malformed DataRequest");
    a document nesting chunks too deep raised protobuf's bare DecodeError from ``request.docs = [...]``, the list
    emptied."""

    def in_lists(levels: int) -> object:
        value: object = "leaf"
        for _ in range(levels // 2):
            value = [value]
        return value

    top = Document(id="top", tags={"t": in_lists(TAG_LEVELS)})
    top.matches.append(Document(id="match", tags={"t": in_lists(TAG_LEVELS)}))
    top.chunks.append(Document(id="chunk"))
    top.chunks[0].matches.append(Document(id="match-of-chunk", tags={"t": in_lists(TAG_LEVELS)}))
    received = DataRequest.from_bytes(DataRequest([top]).to_bytes())
    assert received.docs[0].chunks[0].matches[0].tags["t"] == received.docs[0].matches[0].tags["t"] == in_lists(
        TAG_LEVELS)
    received.docs[0].tags = received.docs[0].tags  # what a request brought is taken back
    with pytest.raises(TypeError, match="nests lists and dicts deeper than protobuf can carry"):
        Document(tags={"t": in_lists(TAG_LEVELS + 2)})
    deep = Document(id="deep")
    nested = deep
    for level in range(10):
        nested.chunks.append(Document(id=f"chunk-{level}"))
        nested = nested.chunks[0]
    nested.tags = {"t": in_lists(TAG_LEVELS)}
    for put in (lambda: setattr(received, "docs", [deep]), lambda: received.docs.insert(0, deep),
                lambda: received.docs.__setitem__(0, deep)):  # the last two raised a bare SystemError, the list changed
        with pytest.raises(ProtocolError, match="deeper than protobuf's limit of 100 levels"):
            put()
        assert [doc.id for doc in received.docs] == ["top"]


def test_a_slice_or_a_replacement_refused_for_a_document_too_deep_leaves_the_list_and_its_views_as_they_were():
    """A regression review's finds: ``docs[0:2] = [new, deep]`` took the slice out before finding ``deep`` could not
    go in (two documents lost), ``docs[::2] = ...`` replaced the first; a refused ``request.docs = [...]`` put the
    documents back as copies, so a view taken before (``docs[0]``, a Document appended) edited nothing any more."""
    deep = Document(id="deep")
    nested = deep
    for level in range(105):
        nested.chunks.append(Document(id=f"chunk-{level}"))
        nested = nested.chunks[0]
    for assign in (slice(0, 2), slice(None, None, 2)):
        request = DataRequest([Document(id="a"), Document(id="b"), Document(id="c")])
        request.docs[0].matches.append(Document(id="m"))
        with pytest.raises(ProtocolError, match="deeper than protobuf's limit of 100 levels"):
            request.docs[assign] = [Document(id="new"), deep]
        assert request.docs.ids == ["a", "b", "c"] and request.docs[0].matches.ids == ["m"]
    request = DataRequest([Document(id="a", text="before")])
    view, appended = request.docs[0], Document(id="b", text="before")
    request.docs.append(appended)
    with pytest.raises(ProtocolError, match="deeper than protobuf's limit of 100 levels"):
        request.docs = [Document(id="ok"), deep]
    view.text, appended.text = "through the view", "through the appended one"
    assert request.docs.texts == ["through the view", "through the appended one"]


def _refused_as_tags(value: object) -> bool:
    try:
        Document(tags={"t": value})
    except TypeError:
        return True
    return False


def test_a_refused_dtype_neither_stays_in_memory_nor_carries_numpy_s_quote_of_it():
    """The dtype cache keeps only names numpy could spell (a client's megabyte names stayed, 8 MB each), and an
    unknown name's error is not chained to numpy's, which quotes the whole name into an error answer's stacks."""
    before = ndarray._parsed_dtype.cache_info().currsize
    target = docarray_pb2.NdArrayProto()
    ndarray.to_proto(np.zeros(1, dtype=np.int32), target)
    target.dense.dtype = "<i" + "0" * 1000 + "4"
    with pytest.raises(ProtocolError, match="at most 32 are taken"):
        ndarray.from_proto(target)
    assert ndarray._parsed_dtype.cache_info().currsize == before
    target.dense.dtype = "x" * 32
    with pytest.raises(ProtocolError, match="unknown dtype") as refused:
        ndarray.from_proto(target)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_none_clears_text_blob_uri_and_mime_type_as_docarray_does():
    """An Executor drops raw content once it encoded it (``doc.blob = None``, ``doc.text = None``); that failed
    the request with a TypeError (protobuf's own, naming no field, for the blob), where docarray clears the field
    (found by a review)."""
    doc = Document(text="x", uri="a.png")
    doc.embedding = np.ones(2, dtype=np.float32)
    doc.text, doc.uri, doc.mime_type = None, None, None
    assert (doc.text, doc.uri, doc.mime_type) == ("", "", "")
    assert doc.embedding.tolist() == [1.0, 1.0]  # what was set beside it stays
    doc.blob = b"raw"
    doc.blob = None
    assert doc.blob == b""
    with pytest.raises(TypeError, match="Document.blob takes bytes"):
        doc.blob = "text"


def test_documents_are_found_by_id_and_other_lookups_are_refused_saying_what_to_write():
    docs = DataRequest([Document(id="a"), Document(id="b"), Document(id="b", text="second")]).docs
    assert docs["b"].text == "" and docs["a"].id == "a"  # the first with that id, as docarray's
    with pytest.raises(KeyError, match="no document with id 'c' among these 3"):
        docs["c"]
    for index in ([0, 1], [True, False, True]):
        with pytest.raises(TypeError, match="shardnet has no DocumentArray; write"):
            docs[index]


@pytest.mark.parametrize("build, said", [
    (lambda: Document(text="\ud800"), "Document.text takes text UTF-8 can carry: '\\ud800' at position 0"),
    (lambda: Document(id="a\udcff"), "Document.id takes text UTF-8 can carry: '\\udcff' at position 1"),
    (lambda: Document(tags={"s": "x\ud800"}), "tags['s'] takes text UTF-8 can carry"),
    (lambda: Document(id="x", tensor=[[1, 2], [3]]), "tensor of document 'x': cannot send this as an array"),
    (lambda: Document(id="x", tensor=np.ma.masked_array([1, 2], [0, 1])), "its mask does not travel"),
    # a regression review's: in a list, the mask went (a masked element arrived as NaN)
    (lambda: Document(id="x", embedding=[1.0, np.ma.masked, 3.0]), "its mask does not travel"),
    (lambda: Document(id="x", tensor=([np.ma.masked_array([1, 2], [0, 1])],)), "its mask does not travel"),
], ids=["lone-surrogate-text", "lone-surrogate-id", "lone-surrogate-tag", "ragged-tensor", "masked-tensor",
        "masked-element-in-a-list", "masked-array-in-nested-lists"])
def test_values_a_document_cannot_carry_are_refused_naming_the_field(build, said):
    """A review's finds: a lone surrogate raised protobuf's bare UnicodeEncodeError (or, in a tag, "must be
    JSON-like", though it is text), a ragged list numpy's ValueError, and a masked array lost its mask."""
    with pytest.raises((TypeError, ProtocolError)) as refused:
        build()
    assert said in str(refused.value)


def test_scores_are_written_through_and_read_with_docarrays_value_as_a_ported_ranker_does():
    """An Executor API review's find: ``doc.scores`` was a copy, so ``match.scores["cosine"] = 0.5`` was lost
    without a word, docarray's ``match.scores["cosine"].value`` raised AttributeError ('float' object has no
    attribute 'value') and ``.value = 0.5`` a bare KeyError."""
    match = Document(id="m1")
    match.scores["cosine"] = 0.75
    assert match.proto.scores["cosine"].value == 0.75
    assert match.scores["cosine"].value == 0.75 and match.scores["cosine"] == 0.75  # a float too
    match.scores["cosine"].value = 0.5
    match.scores["cosine"].op_name = "cos"
    assert (match.proto.scores["cosine"].value, match.proto.scores["cosine"].op_name) == (0.5, "cos")
    match.scores["cosine"] = 0.25  # keeps the op_name, as set_score does
    assert match.proto.scores["cosine"].op_name == "cos"
    match.scores["bm25"] = {"value": 2.0, "op_name": "bm25"}
    assert match.scores == {"cosine": 0.25, "bm25": 2.0}
    other = Document(id="m2")
    other.scores["cosine"] = match.scores["cosine"]  # another document's score, its fields along
    assert (other.proto.scores["cosine"].value, other.proto.scores["cosine"].op_name) == (0.25, "cos")
    with pytest.raises(KeyError, match=r"no such score on document 'm1'.*doc.scores\['dot'\] = value"):
        match.scores["dot"].value = 1.0
    del match.scores["bm25"]
    assert list(match.scores) == ["cosine"]
    request = DataRequest([match])
    assert DataRequest.from_bytes(request.to_bytes()).docs[0].scores["cosine"].value == 0.25


def test_a_named_score_read_after_its_value_is_set_reads_the_new_value():
    """docarray: ``s = doc.scores['c']; s.value = 0.25; s.value == 0.25``; here it read the old value."""
    doc = Document(id="d")
    doc.set_score("c", 0.5, op_name="cos")
    score = doc.scores["c"]
    score.value = 0.25
    score.op_name = "dot"
    assert (score.value, score.op_name) == (0.25, "dot")
    assert (doc.scores["c"].value, doc.scores["c"].op_name) == (0.25, "dot")


def test_a_document_assigned_in_a_list_of_matches_or_chunks_is_then_edited_through_as_after_append():
    # ``doc.matches = ms`` stored copies and left ``ms`` viewing nothing: a score or text set through them after
    # was lost without a word (under docarray it sticks), while append, extend and item assignment rebind them
    query = Document(id="q")
    ms = [Document(id="a"), Document(id="b")]
    query.matches = ms
    ms[0].scores["cosine"] = 0.5
    ms[1].text = "edited"
    assert query.matches[0].scores["cosine"].value == 0.5 and query.matches.texts == ["", "edited"]
    cs = [Document(id="c")]
    query.chunks = cs
    cs[0].embedding = np.ones(2, dtype=np.float32)
    assert query.chunks[0].embedding.tolist() == [1.0, 1.0] and query.chunks[0].parent_id == "q"
    a, b = query.matches[0], query.matches[1]
    query.matches = [b, a]  # views into the very list: swapped, and live still
    assert query.matches.ids == ["b", "a"]
    a.text = "again"
    assert query.matches.texts == ["edited", "again"]


def test_documents_are_indexed_by_numpys_integers_and_deleted_by_id_as_a_lists_and_docarrays():
    # ``docs[np.argmax(scores)]`` was refused as "not by int64 ... write [docs[i] for i in positions]"
    docs = DocumentList(docarray_pb2.DocumentArrayProto().docs)
    docs.extend(Document(id=f"d{i}") for i in range(4))
    assert docs[np.int64(1)].id == "d1" and docs[np.argmax([0.1, 0.9, 0.2, 0.0])].id == "d1"
    docs[np.int32(2)] = Document(id="x")
    assert docs.ids == ["d0", "d1", "x", "d3"]
    del docs["d1"]
    assert docs.ids == ["d0", "x", "d3"]
    with pytest.raises(KeyError, match="no document with id 'nope'"):
        del docs["nope"]
    with pytest.raises(TypeError, match="not by float"):
        docs[1.0]


def test_a_score_copied_from_another_document_keeps_its_description():
    """docarray's NamedScore has four fields (value, op_name, description, ref_id): copying a match's score to
    another document (``b.scores["cos"] = a.scores["cos"]``, or from its proto) dropped ``description``."""
    a = Document(id="a")
    a.proto.scores["cos"].value, a.proto.scores["cos"].op_name = 0.5, "cosine"
    a.proto.scores["cos"].description, a.proto.scores["cos"].ref_id = "why it matched", "q"
    for source in (a.scores["cos"], a.proto.scores["cos"], {"value": 0.5, "op_name": "cosine",
                                                            "description": "why it matched", "ref_id": "q"}):
        b = Document(id="b")
        b.scores["cos"] = source
        assert b.proto.scores["cos"] == a.proto.scores["cos"], source
    assert a.scores["cos"].description == "why it matched"
    a.scores["cos"].description = "changed"
    assert a.proto.scores["cos"].description == "changed" and a.proto.scores["cos"].op_name == "cosine"
