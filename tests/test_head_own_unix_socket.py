"""An ACTIVATE naming the head's own Unix socket, however the path is written, must be refused as the head itself.

The check compared the parsed (normalized) path with ServerConfig.unix_socket as given: a head on
``/dir//h.sock`` or ``/dir/./h.sock``, or one reached through a symbolic link to its folder, took itself as a
worker and sent requests to itself."""

from __future__ import annotations

import os

import grpc
import pytest

from shardnet import ReplicaError
from shardnet.networking import oneshot
from shardnet.runtimes.head import Head
from shardnet.runtimes.server import ServerConfig


@pytest.mark.parametrize("spelling", ["{d}//h.sock", "{d}/./h.sock", "{link}/h.sock"])
async def test_an_activate_naming_the_heads_own_socket_is_refused_however_written(socket_dir, runtimes, spelling):
    link = f"{socket_dir}-link"
    os.symlink(socket_dir, link)
    try:
        head = await runtimes(Head("selfish", ServerConfig(unix_socket=f"{socket_dir}/h.sock")))
        worker = "unix:" + spelling.format(d=socket_dir, link=link)
        with pytest.raises(ReplicaError) as refused:
            await oneshot.activate_worker(worker, 0, head.server.address, shard_id=0)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "itself" in str(refused.value)
    finally:
        os.unlink(link)


async def test_a_head_on_a_path_written_loosely_refuses_its_own_socket(socket_dir, runtimes):
    head = await runtimes(Head("selfish", ServerConfig(unix_socket=f"{socket_dir}//h.sock")))
    with pytest.raises(ReplicaError) as refused:
        await oneshot.activate_worker(f"unix:{socket_dir}/h.sock", 0, head.server.address, shard_id=0)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
