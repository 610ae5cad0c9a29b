"""A pickle hidden beside a docs field (every encoding the header read's fast path looks at) never passes a head."""
from __future__ import annotations

import executors
import grpc
import grpc.aio
import pytest
from test_head import shard_workers  # noqa: F401
from test_wire import _varint
from shardnet import Document
from shardnet.protocol import services
from shardnet.protocol.messages import DataRequest
from shardnet.protocol.proto import jina_pb2
from shardnet.runtimes.head import Head

PICKLE = b"\x12\x05\x80\x04N.."  # DataContent field 2 (docs_bytes)



def _crafted(docs_size: int, padded: bool, where: str) -> bytes:
    docs = DataRequest([Document(text="x" * docs_size)]).proto.data.docs.SerializeToString()
    length = _varint(len(docs))
    if padded:
        length = bytes(b | 0x80 for b in length) + b"\x00"
    field = b"\x0a" + length + docs
    content = field + PICKLE if where == "after" else PICKLE + field
    header = jina_pb2.DataRequestProto(header=jina_pb2.HeaderProto(request_id="r", exec_endpoint="/tag"))
    return header.SerializeToString() + b"\x22" + _varint(len(content)) + content


@pytest.mark.parametrize("docs_size", [0, 120, 16400])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("where", ["after", "before"])
async def test_a_pickle_beside_docs_never_reaches_a_worker_through_a_head(runtimes, docs_size, padded, where):
    [worker] = await shard_workers(runtimes, executors.Tagger, 1)
    head = await runtimes(Head("guarded", connections={0: [worker.server.address]}))
    crafted = _crafted(docs_size, padded, where)
    listed = jina_pb2.DataRequestListEnvelope(requests=[DataRequest([Document()]).to_bytes(), crafted])
    async with grpc.aio.insecure_channel(head.server.address) as channel:
        for method, payload in ((services.PROCESS_SINGLE_DATA, crafted),
                                (services.PROCESS_DATA, listed.SerializeToString())):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(method)(payload, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, refused.value)
            assert "docs_bytes" in refused.value.details()
        stream = channel.stream_stream(services.STREAM_CALL)(timeout=10)
        await stream.write(crafted)
        await stream.done_writing()
        answers = [jina_pb2.DataRequestProto.FromString(answer) async for answer in stream]
        # a stream answers a refused request ERROR and goes on (server.one_by_one)
        assert len(answers) == 1 and answers[0].header.status.code == jina_pb2.StatusProto.ERROR
        assert "docs_bytes" in str(answers[0].header.status)
        assert not answers[0].data.docs_bytes  # the pickle is not echoed back either
    assert worker.executor.calls == 0
