"""Workers on Unix domain sockets: addresses, listeners, a pool and a head dialing them.

A head on the same machine as its workers can reach them over a Unix socket
instead of loopback TCP; these tests run real gRPC servers on real sockets.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import executors
import grpc
import pytest
import trustme

from shardnet import ConfigurationError, DataRequest, Document, GrpcConnectionPool, ServerTls
from shardnet.cli.head import parse_connections
from shardnet.networking import oneshot
from shardnet.networking.addresses import entity_address, parse_address
from shardnet.runtimes.head import Head
from shardnet.runtimes.listening import check_can_listen
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker


def unix_worker(path: str, label: str) -> Worker:
    return Worker(executors.Tagger.create({"shard_id": 0}, label=label), ServerConfig(unix_socket=path))


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["unix:/run/w.sock", "unix:///run/w.sock", "  unix:/run/w.sock  "])
def test_unix_addresses_parse_to_one_key(text):
    address = parse_address(text)
    assert address.unix_path == "/run/w.sock"
    assert address.target == str(address) == "unix:/run/w.sock"
    assert address.entity() == ("unix:/run/w.sock", 0)
    assert entity_address(*address.entity()) == "unix:/run/w.sock"


def test_entity_addresses_of_tcp_hosts_round_trip():
    for text in ("10.0.0.7:5000", "[::1]:5000", "worker-0.svc:8081"):
        assert entity_address(*parse_address(text).entity()) == text


@pytest.mark.parametrize(
    "text, cause",
    [
        ("unix:", "absolute path"),
        ("unix:run/w.sock", "absolute path"),
        ("unix://run/w.sock", "absolute path"),
        ("unix:/" + "x" * 120, "at most 107 bytes"),
        ("unix:/run/w\n.sock", "control characters"),
    ],
)
def test_bad_unix_addresses_are_refused_with_the_cause(text, cause):
    with pytest.raises(ConfigurationError, match=cause):
        parse_address(text)


def test_a_unix_socket_takes_no_tls():
    with pytest.raises(ConfigurationError, match="takes no TLS"):
        parse_address("unix:/run/w.sock", tls=True)
    with pytest.raises(ConfigurationError, match="takes no TLS"):
        parse_connections(["0=unix:/run/w.sock"], tls=True)
    assert parse_connections(["0=unix:///run/w.sock", "0=127.0.0.1:5"]) == {0: ["unix:/run/w.sock", "127.0.0.1:5"]}


def test_server_config_checks_its_unix_socket(socket_dir):
    with pytest.raises(ConfigurationError, match="absolute path"):
        ServerConfig(unix_socket="relative.sock")
    certificate = trustme.CA().issue_cert("localhost")
    tls = ServerTls(
        certificate_chain=certificate.cert_chain_pems[0].bytes(), private_key=certificate.private_key_pem.bytes()
    )
    with pytest.raises(ConfigurationError, match="either TLS or a Unix socket"):
        ServerConfig(tls=tls, unix_socket=f"{socket_dir}/w.sock")


# -- listeners -------------------------------------------------------------------------------


async def test_worker_listens_on_its_socket_and_removes_it_on_stop(socket_dir, runtimes):
    path = f"{socket_dir}/w.sock"
    worker = await runtimes(unix_worker(path, "a"))
    assert worker.server.unix_address == f"unix:{path}"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    response = await oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/tag"), f"unix:{path}")
    assert response.docs[0].tags["by"] == "a"
    await worker.stop(0)
    assert not os.path.lexists(path)


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(socket_dir, runtimes):
    path = f"{socket_dir}/w.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:  # bound, never listening: what a killed server leaves
        dead.bind(path)
    worker = await runtimes(unix_worker(path, "a"))
    response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), f"unix:{path}")
    assert response.docs[0].tags["by"] == "a"

    second = unix_worker(path, "b")
    try:
        with pytest.raises(ConfigurationError, match="another server is listening"):
            await second.start()
    finally:  # stopped also when a regression lets it start
        await second.stop(0)
    response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), f"unix:{path}")
    assert response.docs[0].tags["by"] == "a", "the refused server took the socket over"
    assert worker.server.unix_address == f"unix:{path}"


async def test_a_server_leaving_removes_only_its_own_socket_not_a_newer_servers_on_its_path(socket_dir, runtimes):
    path = f"{socket_dir}/w.sock"
    old = await runtimes(unix_worker(path, "old"))
    os.unlink(path)  # what a newer server's bind does to a socket its check found stale (the old one draining)
    await runtimes(unix_worker(path, "new"))
    await old.stop(0)
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "the old server removed the newer one's socket"
    response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), f"unix:{path}")
    assert response.docs[0].tags["by"] == "new"
    assert os.listdir(socket_dir) == ["w.sock"]  # nothing left beside it (the names gRPC bound before the rename)


def refusal_seen_by_another_user(path: str) -> str:
    """What ``check_can_listen`` says of ``path`` in a child process running as another user (nobody; root may
    connect to any socket), or as this one when it is not root (the socket's write permission then taken away
    by the caller): the refusal's message, or "" when it found the path free."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: only os and socket calls, no gRPC
        status = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                check_can_listen(ServerConfig(unix_socket=path))
            except ConfigurationError as exc:
                os.write(write, str(exc).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as said:
        message = said.read().decode()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


async def test_a_socket_this_user_may_not_connect_to_is_refused_as_another_users(socket_dir, runtimes):
    path = f"{socket_dir}/w.sock"
    await runtimes(unix_worker(path, "theirs"))
    os.chmod(socket_dir, 0o755)
    os.chmod(path, 0o755 if os.geteuid() == 0 else 0o555)  # others (or we) may not write to it: connect refused
    message = refusal_seen_by_another_user(path)
    assert "another user's" in message and "permission denied" in message and path in message
    response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), f"unix:{path}")
    assert response.docs[0].tags["by"] == "theirs"


async def test_a_file_in_the_way_or_a_missing_folder_is_a_clear_error(socket_dir):
    in_the_way = f"{socket_dir}/notes.txt"
    Path(in_the_way).write_text("keep me")
    for path, cause in ((in_the_way, "not a socket"), (f"{socket_dir}/missing/w.sock", "folder missing")):
        worker = unix_worker(path, "a")
        try:
            with pytest.raises(ConfigurationError, match=cause):
                await worker.start()
        finally:
            await worker.stop(0)
    assert Path(in_the_way).read_text() == "keep me"


# -- pool and head ---------------------------------------------------------------------------


async def test_pool_sends_to_a_replica_on_a_unix_socket(socket_dir, runtimes):
    path = f"{socket_dir}/w.sock"
    await runtimes(unix_worker(path, "a"))
    pool = GrpcConnectionPool()
    try:
        pool.add_connection("tagging", f"unix:///{path.lstrip('/')}")
        assert pool.get_replicas("tagging").has_connection(f"unix:{path}")
        response, _ = await pool.send_request_once(DataRequest([Document()]), "tagging", endpoint="/tag")
        assert response.docs[0].tags["by"] == "a"
    finally:
        await pool.close()


async def test_head_routes_over_unix_sockets_and_lists_them(socket_dir, runtimes):
    paths = [f"{socket_dir}/w{index}.sock" for index in range(2)]
    for index, path in enumerate(paths):
        await runtimes(unix_worker(path, f"replica-{index}"))
    head = await runtimes(Head("tagging", connections={0: [f"unix:{path}" for path in paths]}))

    seen = set()
    for _ in range(20):
        response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), head.server.address)
        seen.add(response.docs[0].tags["by"])
    assert seen == {"replica-0", "replica-1"}

    status = await oneshot.send_control("STATUS", head.server.address)
    assert sorted((entity.address, entity.port) for entity in status.related_entities) == [
        (f"unix:{path}", 0) for path in paths
    ]


async def test_head_takes_activate_for_a_unix_socket_and_refuses_a_relative_one(socket_dir, runtimes):
    path = f"{socket_dir}/w.sock"
    await runtimes(unix_worker(path, "a"))
    head = await runtimes(Head("tagging"))
    await oneshot.activate_worker(f"unix:{path}", 0, head.server.address, 0)
    response = await oneshot.send_request_async(DataRequest([Document()], endpoint="/tag"), head.server.address)
    assert response.docs[0].tags["by"] == "a"

    with pytest.raises(Exception) as refused:
        await oneshot.activate_worker("unix:w.sock", 0, head.server.address, 0)
    assert getattr(refused.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
    assert "absolute path" in str(refused.value)
    await oneshot.deactivate_worker(f"unix:{path}", 0, head.server.address, 0)
    assert (await oneshot.send_control("STATUS", head.server.address)).related_entities == []
