"""A Unix socket path with characters a URI reads apart ('?', '#', '%XX') must be dialled as that very file.

gRPC reads a ``unix:`` target as a URI: ``unix:/run/a?b.sock`` dials /run/a, ``unix:/run/w%41.sock`` dials
/run/wA.sock (another worker's socket, maybe). The server binds such a path fine (a hex private name renamed onto
it), so the worker starts and registers, and the head dials something else."""

from __future__ import annotations

import executors
import pytest

from shardnet import DataRequest, Document, GrpcConnectionPool
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker


def unix_worker(path: str, label: str) -> Worker:
    return Worker(executors.Tagger.create({"shard_id": 0}, label=label), ServerConfig(unix_socket=path))


@pytest.mark.parametrize("name", ["w%41.sock", "w?x.sock", "w#x.sock", "w x.sock"])
async def test_a_path_with_uri_characters_is_dialled_as_itself(socket_dir, runtimes, name):
    await runtimes(unix_worker(f"{socket_dir}/{name}", "right"))
    await runtimes(unix_worker(f"{socket_dir}/wA.sock", "wrong"))  # what '%41' decodes to
    await runtimes(unix_worker(f"{socket_dir}/w", "wrong"))  # what '?x.sock' / '#x.sock' cut it to
    pool = GrpcConnectionPool()
    try:
        pool.add_connection("tagging", f"unix:{socket_dir}/{name}")
        response, _ = await pool.send_request_once(DataRequest([Document()]), "tagging", endpoint="/tag")
        assert response.docs[0].tags["by"] == "right"
    finally:
        await pool.close()
