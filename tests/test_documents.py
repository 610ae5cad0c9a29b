"""Document and DocumentList views, tensors through NdArray, and malformed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from shardnet import DataRequest, Document, ProtocolError
from shardnet.protocol import ndarray
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


def test_sparse_array_is_densified():
    target = docarray_pb2.NdArrayProto()
    ndarray.write_sparse(np.array([[0, 1], [2, 0]]), np.array([5.0, 7.0]), (3, 2), target)
    dense = ndarray.from_proto(target)
    np.testing.assert_array_equal(dense, np.array([[0, 5.0], [0, 0], [7.0, 0]]))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda dense: setattr(dense, "buffer", b"\x00" * 3), "buffer holds 3 bytes"),
        (lambda dense: setattr(dense, "dtype", "O"), "not numeric"),
        (lambda dense: setattr(dense, "dtype", "no-such-dtype"), "unknown dtype"),
    ],
)
def test_malformed_ndarray_raises_protocol_error(mutate, message):
    target = docarray_pb2.NdArrayProto()
    ndarray.to_proto(np.zeros((2, 2), dtype=np.float32), target)
    mutate(target.dense)
    with pytest.raises(ProtocolError, match=message):
        ndarray.from_proto(target)


def test_object_arrays_do_not_travel():
    with pytest.raises(ProtocolError, match="only numeric dtypes"):
        Document(tensor=np.array([object()]))


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
