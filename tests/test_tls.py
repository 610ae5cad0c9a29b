"""TLS end to end with certificates made in the test (trustme): replica lists, the pool, the helpers, mTLS."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import grpc
from cryptography import x509
import pytest
import trustme

from shardnet import (
    ClientTls,
    ConfigurationError,
    DataRequest,
    GrpcConnectionPool,
    ReplicaError,
    ReplicaList,
    ServerTls,
)
from shardnet.networking import oneshot
from shardnet.networking import tls as tls_module
from shardnet.networking.tls import load_pem
from shardnet.protocol import services


@dataclass
class Material:
    ca_pem: bytes
    server: ServerTls
    server_mutual: ServerTls
    client: ClientTls  # trusts the CA, presents a client certificate


@pytest.fixture(scope="module")
def tls() -> Material:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("client.example")
    ca_pem = ca.cert_pem.bytes()
    chain = b"".join(blob.bytes() for blob in server_cert.cert_chain_pems)
    key = server_cert.private_key_pem.bytes()
    return Material(
        ca_pem=ca_pem,
        server=ServerTls(certificate_chain=chain, private_key=key),
        server_mutual=ServerTls(certificate_chain=chain, private_key=key, client_ca=ca_pem),
        client=ClientTls(
            root_certificates=ca_pem,
            private_key=client_cert.private_key_pem.bytes(),
            certificate_chain=b"".join(blob.bytes() for blob in client_cert.cert_chain_pems),
        ),
    )


@pytest.fixture(params=["path", "str", "bytes"])
def root_certificates(request, tls, tmp_path):
    """The CA certificate in each form the helpers accept."""
    if request.param == "path":
        path = tmp_path / "ca.pem"
        path.write_bytes(tls.ca_pem)
        return str(path)
    return tls.ca_pem.decode() if request.param == "str" else tls.ca_pem


async def test_replica_list_over_tls(echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    replicas = ReplicaList(tls=ClientTls(root_certificates=tls.ca_pem))
    try:
        connection = replicas.add_connection(f"https://{server.address}")
        assert replicas.has_connection(f"https://{server.address}")
        request = DataRequest(endpoint="/secure")
        response, trailing = await replicas.call(connection, "single_data", request, None, 5.0)
        assert response.request_id == request.request_id and trailing["served-by"] == "echo-0"
    finally:
        await replicas.close()


async def test_pool_over_tls(pool_factory, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    pool = pool_factory(tls=ClientTls(root_certificates=tls.ca_pem))
    pool.add_connection("dep", f"https://{server.address}")
    response, _ = await pool.send_request(DataRequest(endpoint="/i"), "dep", timeout=5.0)[0]
    assert response.endpoint == "/i" and server.received_metadata[0]["endpoint"] == "/i"


async def test_a_pool_given_tls_material_dials_bare_addresses_over_tls_too(pool_factory, echo_servers, tls):
    """As the one-off helpers given it do: a bare host:port went out in plaintext, silently."""
    [secure] = await echo_servers(1, credentials=tls.server.credentials())
    [plain] = await echo_servers(1)
    pool = pool_factory(tls=ClientTls(root_certificates=tls.ca_pem))
    pool.add_connection("dep", secure.address)
    response, _ = await pool.send_request(DataRequest(endpoint="/i"), "dep", timeout=5.0)[0]
    assert response.endpoint == "/i" and secure.calls == 1
    pool.add_connection("plain", plain.address)
    with pytest.raises(ReplicaError):  # a plaintext server does not answer a TLS client
        await pool.send_request(DataRequest(), "plain", timeout=5.0)[0]
    assert plain.calls == 0
    with pytest.raises(ConfigurationError, match="a Unix socket is local and plaintext, it takes no TLS"):
        pool.add_connection("local", "unix:/tmp/never.sock")
    assert "local" not in pool.deployments  # refused before anything was made for it


async def test_pool_refuses_an_untrusted_server(pool, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    pool.add_connection("dep", f"https://{server.address}")  # system roots do not know the test CA
    with pytest.raises(ReplicaError) as caught:
        await pool.send_request(DataRequest(), "dep", timeout=5.0)[0]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and server.calls == 0


async def test_plaintext_client_cannot_talk_to_a_tls_server(pool, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    pool.add_connection("dep", server.address)
    with pytest.raises(ReplicaError):
        await pool.send_request(DataRequest(), "dep", timeout=5.0)[0]


async def test_a_pools_tls_mismatch_is_pointed_at_as_the_one_off_helpers_point_at_it(pool_factory, echo_servers, tls):
    """The pool's (and so a head's) errors said "Socket closed" or "WRONG_VERSION_NUMBER" alone (a review's find)."""
    [secure] = await echo_servers(1, credentials=tls.server.credentials())
    [plain] = await echo_servers(1)
    plaintext_pool, tls_pool = pool_factory(), pool_factory(tls=ClientTls(root_certificates=tls.ca_pem))
    for pool, server, said in (
        (plaintext_pool, secure, "if it serves TLS, it was dialled in plaintext: give the pool a ClientTls"),
        (tls_pool, plain, "the replica appears to serve plaintext, and it was dialled over TLS"),
    ):
        pool.add_connection("dep", server.address)
        with pytest.raises(ReplicaError) as refused:
            await pool.send_request(DataRequest(), "dep", timeout=5.0)[0]
        assert said in str(refused.value) and refused.value.deployment == "dep"
    assert plain.calls == 0


async def test_send_request_async_with_root_certificates(echo_servers, tls, root_certificates):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    request = DataRequest(endpoint="/a")
    response = await GrpcConnectionPool.send_request_async(
        request, server.address, timeout=5.0, https=True, root_certificates=root_certificates
    )
    assert response.request_id == request.request_id
    response = await GrpcConnectionPool.send_request_async(
        request, f"https://{server.address}", timeout=5.0, root_certificates=root_certificates
    )
    assert response.request_id == request.request_id


def test_send_request_sync_with_root_certificates(threaded_echo, tls, root_certificates):
    server = threaded_echo.start(credentials=tls.server.credentials())
    request = DataRequest(endpoint="/s")
    response = GrpcConnectionPool.send_request_sync(
        request, server.address, timeout=5.0, https=True, root_certificates=root_certificates
    )
    assert response.request_id == request.request_id
    response = GrpcConnectionPool.send_requests_sync(
        [request, DataRequest()], server.address, timeout=5.0, https=True, root_certificates=root_certificates
    )
    assert response.request_id == request.request_id


async def test_create_async_channel_stub_with_root_certificates(echo_servers, tls, root_certificates):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    stubs, channel = GrpcConnectionPool.create_async_channel_stub(
        server.address, https=True, root_certificates=root_certificates
    )
    try:
        request = DataRequest()
        assert (await stubs.single_data(request, timeout=5.0)).request_id == request.request_id
    finally:
        await channel.close()


async def test_mutual_tls(pool_factory, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server_mutual.credentials())
    pool = pool_factory(tls=tls.client)
    pool.add_connection("dep", f"https://{server.address}")
    response, _ = await pool.send_request(DataRequest(endpoint="/m"), "dep", timeout=5.0)[0]
    assert response.endpoint == "/m"


async def test_mutual_tls_refuses_a_client_without_certificate(echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server_mutual.credentials())
    with pytest.raises(ReplicaError):
        await GrpcConnectionPool.send_request_async(
            DataRequest(), server.address, timeout=5.0, https=True, root_certificates=tls.ca_pem
        )
    assert server.calls == 0
    response = await GrpcConnectionPool.send_request_async(
        DataRequest(endpoint="/ok"), f"https://{server.address}", timeout=5.0, tls=tls.client
    )
    assert response.endpoint == "/ok"


def test_load_pem_forms(tls, tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(tls.ca_pem)
    assert load_pem(str(path)) == load_pem(path) == load_pem(tls.ca_pem.decode()) == load_pem(tls.ca_pem) == tls.ca_pem
    assert load_pem(None) is None


def test_load_pem_refuses_what_is_not_pem(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_pem(str(tmp_path / "missing.pem"))
    not_pem = tmp_path / "not.pem"
    not_pem.write_bytes(b"hello")
    with pytest.raises(ConfigurationError, match="not PEM"):
        load_pem(not_pem)
    with pytest.raises(ConfigurationError, match="not PEM"):
        load_pem(b"hello")


def test_client_certificate_needs_its_key(tls):
    with pytest.raises(ConfigurationError, match="both"):
        ClientTls(root_certificates=tls.ca_pem, certificate_chain=tls.ca_pem).credentials()


def test_blocking_channel_with_root_certificates(threaded_echo, tls, root_certificates):
    from shardnet.protocol import services

    server = threaded_echo.start(credentials=tls.server.credentials())
    channel = GrpcConnectionPool.get_grpc_channel(server.address, https=True, root_certificates=root_certificates)
    try:
        request = DataRequest()
        reply = channel.unary_unary(services.PROCESS_SINGLE_DATA)(request.to_bytes(), timeout=5.0)
        assert reply == request.to_bytes()
    finally:
        channel.close()


async def test_a_plaintext_worker_at_a_tls_head_is_told_to_look_at_tls(runtimes, tls, caplog):
    import executors

    from shardnet.runtimes.head import Head
    from shardnet.runtimes.server import ServerConfig
    from shardnet.runtimes.worker import Worker

    head = await runtimes(Head("secure", ServerConfig(tls=tls.server)))
    worker = await runtimes(Worker(executors.Tagger.create(), head=head.server.address, register_interval=60))
    with caplog.at_level("WARNING", logger="shardnet.runtimes.worker"):
        await worker.register()  # the head is up, but speaks TLS: refused, retried later, and the log says why
    assert f"head {head.server.address} is not reachable yet" in caplog.text
    assert "if the head serves TLS, give --head-root-ca" in caplog.text
    assert head.pool.get_replicas("secure", shard_id=0) is None  # nothing registered in plaintext
    await worker.stop(0)  # stops renewing too: no registration task outlives the worker
    assert not [task for task in asyncio.all_tasks() if "_refresh_registration" in repr(task.get_coro())]


@pytest.mark.parametrize("head_serves, said", [
    ("plaintext", "this worker dials its head over TLS, as --head-root-ca or a client certificate was given"),
    ("mutual TLS", "give --head-client-cert and --head-client-key, signed by its --tls-client-ca"),
])
async def test_a_worker_dialling_its_head_over_tls_is_told_about_the_flags_it_gave(
    runtimes, tls, caplog, head_serves, said
):
    """It was told to give --head-root-ca, which it had given (a review's find)."""
    import executors

    from shardnet.runtimes.head import Head
    from shardnet.runtimes.server import ServerConfig
    from shardnet.runtimes.worker import Worker

    head = await runtimes(Head("dep", ServerConfig(tls=tls.server_mutual if head_serves == "mutual TLS" else None)))
    worker = await runtimes(Worker(
        executors.Tagger.create(), head=head.server.address, head_tls=ClientTls(root_certificates=tls.ca_pem),
        register_interval=60,
    ))
    with caplog.at_level("WARNING", logger="shardnet.runtimes.worker"):
        await worker.register()
    assert f"head {head.server.address} is not reachable yet" in caplog.text
    assert said in caplog.text and "give --head-root-ca" not in caplog.text, caplog.text
    await worker.stop(0)


async def test_jinas_tls_flag_is_taken_and_anything_else_refused(echo_servers, tls, root_certificates):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    request = DataRequest()
    response = await oneshot.send_request_async(
        request, server.address, timeout=5.0, tls=True, root_certificates=root_certificates
    )
    assert response.request_id == request.request_id
    with pytest.raises(ConfigurationError, match="tls takes a ClientTls"):
        await oneshot.send_request_async(request, server.address, timeout=5.0, tls="yes")


def channels_given_only_a_ca(server, root_certificates, request: DataRequest):
    """(channel, a call of ``request`` on it) from get_grpc_channel and create_async_channel_stub, given a CA and
    no TLS flag."""
    channel = GrpcConnectionPool.get_grpc_channel(server.address, asyncio=True, root_certificates=root_certificates)
    yield channel, lambda: channel.unary_unary(services.PROCESS_SINGLE_DATA)(request.to_bytes(), timeout=5.0)
    stubs, channel = GrpcConnectionPool.create_async_channel_stub(server.address, root_certificates=root_certificates)
    yield channel, lambda: stubs.single_data(request, timeout=5.0)


async def test_root_certificates_given_without_the_tls_flag_mean_tls(echo_servers, tls, root_certificates):
    """Jina ignores a CA given without its flag: the call went to a plaintext server in cleartext (a review's find)."""
    [secure] = await echo_servers(1, credentials=tls.server.credentials())
    [plain] = await echo_servers(1)
    request = DataRequest(endpoint="/a")
    response = await oneshot.send_request_async(request, secure.address, 5.0, root_certificates=root_certificates)
    assert response.request_id == request.request_id
    with pytest.raises(ReplicaError, match="seems to serve plaintext and this call was TLS"):
        await oneshot.send_request_async(request, plain.address, 5.0, root_certificates=root_certificates)
    for server, answered in ((secure, True), (plain, False)):
        for channel, call in channels_given_only_a_ca(server, root_certificates, request):
            try:
                if answered:
                    assert await call() is not None
                else:
                    with pytest.raises(grpc.aio.AioRpcError, match="WRONG_VERSION_NUMBER"):
                        await call()
            finally:
                await channel.close()
    assert plain.calls == 0, "a call given a CA reached a plaintext server"


async def test_root_certificates_given_both_beside_and_in_a_client_tls_are_refused(echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    trusting = ClientTls(root_certificates=tls.ca_pem)
    said = r"root certificates given twice, as root_certificates= and as tls=ClientTls"
    with pytest.raises(ConfigurationError, match=said):
        GrpcConnectionPool.get_grpc_channel(server.address, asyncio=True, root_certificates=tls.ca_pem, tls=trusting)
    with pytest.raises(ConfigurationError, match=said):
        GrpcConnectionPool.create_async_channel_stub(server.address, root_certificates=tls.ca_pem, tls=trusting)
    with pytest.raises(ConfigurationError, match=said):
        await oneshot.send_request_async(DataRequest(), server.address, 5.0, root_certificates=tls.ca_pem, tls=trusting)
    assert server.calls == 0


async def test_a_one_off_call_in_plaintext_to_a_tls_server_points_at_tls(echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    with pytest.raises(ReplicaError, match="if it serves TLS, this call was plaintext") as refused:
        await oneshot.send_request_async(DataRequest(), server.address, timeout=5.0)
    assert f"dial https://{server.address} with its CA" in str(refused.value)  # the address, not a placeholder


async def test_a_one_off_call_without_a_client_certificate_to_a_mutual_tls_server_points_at_it(echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server_mutual.credentials())
    trusting = ClientTls(root_certificates=tls.ca_pem)
    with pytest.raises(ReplicaError, match=r"if it requires client certificates \(mutual TLS\), this call presented none"):
        await oneshot.send_request_async(DataRequest(), server.address, timeout=5.0, tls=trusting)


async def test_a_client_certificate_a_mutual_tls_server_does_not_trust_is_pointed_at(echo_servers, tls):
    """A certificate from another CA got a bare "Socket closed" (found by a review)."""
    [server] = await echo_servers(1, credentials=tls.server_mutual.credentials())
    stranger = trustme.CA().issue_cert("client.example")
    presenting = ClientTls(
        root_certificates=tls.ca_pem,
        private_key=stranger.private_key_pem.bytes(),
        certificate_chain=b"".join(blob.bytes() for blob in stranger.cert_chain_pems),
    )
    with pytest.raises(ReplicaError, match="it does not trust the one this call presented"):
        await oneshot.send_request_async(DataRequest(), server.address, timeout=5.0, tls=presenting)


async def test_a_server_closing_every_connection_is_not_said_to_serve_tls_only_that_it_might():
    """A TCP server that accepts and closes was reported as serving TLS (found by a review)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stopping = threading.Event()

    def close_everything() -> None:
        listener.settimeout(0.1)
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connection.close()

    closer = threading.Thread(target=close_everything)
    closer.start()
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ReplicaError) as refused:
            await oneshot.send_request_async(DataRequest(), address, timeout=5.0)
        message = str(refused.value)
        assert "seems to serve TLS" not in message, message
        if "Socket closed" in message:  # (a close with the client's bytes unread may reach it as a reset instead)
            assert "the server closed the connection at once: if it serves TLS, this call was plaintext" in message
    finally:
        stopping.set()
        closer.join()
        listener.close()


async def test_a_tls_failure_a_head_relays_from_its_worker_gets_no_hint_about_the_callers_own_dial(runtimes, tls):
    """A plaintext head in front of a TLS worker: the caller's plaintext dial of the head was right, so it must not
    be told to dial the head over https (it was: the worker's 'socket closed' was read as the head's)."""
    import executors

    from shardnet.runtimes.head import Head
    from shardnet.runtimes.server import ServerConfig
    from shardnet.runtimes.worker import Worker

    head = await runtimes(Head("mixed"))
    worker = await runtimes(Worker(executors.Tagger.create(), ServerConfig(tls=tls.server)))
    host, port = worker.server.address.rsplit(":", 1)
    await oneshot.activate_worker(host, int(port), head.server.address, 0)
    with pytest.raises(ReplicaError) as refused:
        await oneshot.send_request_async(DataRequest(endpoint="/x"), head.server.address, timeout=5.0)
    assert worker.server.address in str(refused.value) and "socket closed" in str(refused.value).lower()
    assert "seems to" not in str(refused.value) and "https://" not in str(refused.value)
    assert "it was dialled in plaintext: give the pool a ClientTls trusting its CA, a head --root-ca" in str(
        refused.value
    )  # the head's own dial of its worker is pointed at


async def test_status_names_the_tls_mismatch_of_a_worker_the_head_dials_in_plaintext(runtimes, tls, capsys):
    """``shardnet status`` said a TLS worker dialled in plaintext was "down: unreachable: Socket closed" alone,
    where the head's own ejection warning points at TLS (a logs review)."""
    import executors

    from shardnet.cli.main import main as cli_main
    from shardnet.runtimes.head import Head
    from shardnet.runtimes.server import ServerConfig
    from shardnet.runtimes.worker import Worker

    plain = await runtimes(Worker(executors.Tagger.create()))
    secure = await runtimes(Worker(executors.Tagger.create(), ServerConfig(tls=tls.server)))
    head = await runtimes(Head("mixed", connections={0: [plain.server.address, secure.server.address]}))
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", head.server.address])
    printed = capsys.readouterr().out
    assert code == 3, printed
    assert f"  shard 0: {secure.server.address} (down: unreachable: Socket closed (the replica closed the " \
        "connection at once: if it serves TLS, it was dialled in plaintext: give the pool a ClientTls trusting " \
        "its CA, a head --root-ca))" in printed, printed
    assert f"  shard 0: {plain.server.address}\n" in printed


def test_a_server_tls_repr_shows_files_by_path_and_pem_in_memory_by_size_only(tls, tmp_path):
    """A combined PEM (certificate and key in one blob, taken as both) printed the key in ServerTls's and
    ServerConfig's reprs (a review's find)."""
    from shardnet.runtimes.server import ServerConfig

    chain, key = load_pem(tls.server.certificate_chain), load_pem(tls.server.private_key)
    combined = ServerTls(certificate_chain=chain + key, private_key=chain + key, client_ca=tls.ca_pem)
    for shown in (repr(combined), repr(ServerConfig(tls=combined))):
        assert b"PRIVATE KEY" not in shown.encode() and b"CERTIFICATE" not in shown.encode()
        assert f"certificate_chain=<{len(chain + key)} bytes of PEM>" in shown
        assert f"client_ca=<{len(tls.ca_pem)} bytes of PEM>" in shown
    (tmp_path / "tls.crt").write_bytes(chain)
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.key").chmod(0o600)
    in_files = ServerTls(certificate_chain=str(tmp_path / "tls.crt"), private_key=str(tmp_path / "tls.key"))
    assert repr(in_files) == (
        f"ServerTls(certificate_chain={str(tmp_path / 'tls.crt')!r}, private_key={str(tmp_path / 'tls.key')!r})"
    )


def test_private_keys_stay_out_of_reprs_and_errors_and_open_key_files_are_warned_of(tls, tmp_path, caplog):
    key = load_pem(tls.server.private_key)
    for material in (tls.server, tls.server_mutual, tls.client):
        assert key not in repr(material).encode() and b"PRIVATE KEY" not in repr(material).encode()
    for slip in (lambda: GrpcConnectionPool(tls=tls.server), lambda: oneshot.send_request_sync(
            DataRequest(), "127.0.0.1:1", tls=tls.server)):
        with pytest.raises(ConfigurationError) as refused:  # a ServerTls where a ClientTls belongs
            slip()
        assert "PRIVATE KEY" not in str(refused.value) and "ServerTls" in str(refused.value)

    chain = tmp_path / "chain.pem"
    chain.write_bytes(load_pem(tls.server.certificate_chain))
    # 0440 in this process's own group is how Kubernetes mounts a Secret for the pod's fsGroup: not warned of,
    # unless another user of this machine is in that group too
    shared_group = not tls_module.only_this_user_in(os.getgid())
    for mode, warned in ((0o644, True), (0o600, False), (0o440, shared_group), (0o660, True)):
        path = tmp_path / f"key-{mode:o}.pem"
        path.write_bytes(key)
        path.chmod(mode)
        assert path.stat().st_gid == os.getgid()  # a file made here is in this process's group
        caplog.clear()
        ServerTls(certificate_chain=str(chain), private_key=str(path))
        warning = f"server private key '{path}' is open to other users of this machine (mode {mode:04o})"
        assert (warning in caplog.text) is warned, caplog.text


def test_a_group_with_another_user_in_it_is_not_private(monkeypatch):
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.struct_group(("shared", "x", 4242, [me, "someone-else"]))
    monkeypatch.setattr(grp, "getgrgid", lambda gid: group)
    assert not tls_module.only_this_user_in(4242)
    group = grp.struct_group(("mine", "x", 4242, [me]))
    assert all(entry.pw_gid != 4242 or entry.pw_uid == os.getuid() for entry in pwd.getpwall())
    monkeypatch.setattr(grp, "getgrgid", lambda gid: group)
    assert tls_module.only_this_user_in(4242)


def _self_signed_ed25519() -> tuple[bytes, bytes]:
    """A certificate and key as cert-manager issues with ``privateKey.algorithm: Ed25519``."""
    import datetime

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, None)
    )  # signed with no digest: EdDSA hashes inside
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def test_an_ed25519_certificate_is_refused_where_it_is_configured(tls, tmp_path):
    # OpenSSL loads the pair and a server with it says it is ready, but no gRPC client completes a handshake
    chain, key = _self_signed_ed25519()
    (tmp_path / "ed.crt").write_bytes(chain)
    (tmp_path / "ed.key").write_bytes(key)
    (tmp_path / "ed.key").chmod(0o600)
    with pytest.raises(ConfigurationError, match=r"server certificate chain '.*ed\.crt' holds an Ed25519 key.*ECDSA"):
        ServerTls(certificate_chain=str(tmp_path / "ed.crt"), private_key=str(tmp_path / "ed.key"))
    with pytest.raises(ConfigurationError, match="client certificate chain .* holds an Ed25519 key"):
        ClientTls(root_certificates=tls.ca_pem, certificate_chain=chain, private_key=key)


def test_tls_material_that_is_not_a_regular_file_is_refused_naming_it(tmp_path, monkeypatch):
    # a pipe (``<(...)``) cannot be read again at a renewal, a FIFO would block the start, a device never ends
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    for source in (str(fifo), "/dev/zero"):
        with pytest.raises(ConfigurationError, match=f"root certificates '{source}' is not a regular file"):
            load_pem(source, "root certificates")
    big = tmp_path / "big.pem"
    big.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * 100)
    monkeypatch.setattr(tls_module, "MAX_PEM_FILE_BYTES", 64)
    with pytest.raises(ConfigurationError, match=r"root certificates '.*big\.pem' holds more than 64 bytes"):
        load_pem(str(big), "root certificates")


def test_a_client_key_open_to_others_is_warned_of_once_not_again_when_read_for_the_pool(tls, tmp_path, caplog):
    key_path = tmp_path / "client.key"
    key_path.write_bytes(load_pem(tls.client.private_key))
    key_path.chmod(0o644)
    material = ClientTls(root_certificates=tls.ca_pem, certificate_chain=tls.client.certificate_chain,
                         private_key=str(key_path))
    renewal = tls_module.FollowedClientMaterial(material).renewal()  # a pool's first look, at its start()
    assert renewal is not None and renewal[1].private_key == key_path.read_bytes()
    assert caplog.text.count("is open to other users of this machine") == 1, caplog.text


@pytest.mark.parametrize("empty", ["", b""])
async def test_empty_root_certificates_with_the_flag_off_are_none_as_in_jina(echo_servers, empty):
    """Jina code passes an empty CA with TLS off; it is no CA, not a file named '' to read (a regression review)."""
    [plain] = await echo_servers(1)
    request = DataRequest(endpoint="/a")
    response = await oneshot.send_request_async(request, plain.address, 5.0, root_certificates=empty)
    assert response.request_id == request.request_id and plain.calls == 1
