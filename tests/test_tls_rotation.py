"""A server whose TLS material is in files follows them: renewed files (as cert-manager renews a Secret) serve
every connection made after the change, without a restart; a change that does not check out is not served."""

from __future__ import annotations

import datetime

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import trustme

from shardnet import ClientTls, ConfigurationError, DataRequest, GrpcConnectionPool, ReplicaError, ServerTls
from shardnet.networking import oneshot
from shardnet.networking.replica_list import ReplicaList
from shardnet.networking import tls as tls_module
from shardnet.testing import EchoServer


class Files:
    """tls.crt / tls.key / ca.crt in a folder, replaced the way a Secret volume is: a whole new file at once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.chain, self.key, self.client_ca = folder / "tls.crt", folder / "tls.key", folder / "ca.crt"

    def write(self, path: Path, data: bytes) -> None:
        fresh = path.with_suffix(".new")
        fresh.write_bytes(data)
        fresh.chmod(0o600)
        os.replace(fresh, path)

    def serve(self, certificate: trustme.LeafCert, client_ca: trustme.CA) -> None:
        self.write(self.chain, b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
        self.write(self.key, certificate.private_key_pem.bytes())
        self.write(self.client_ca, client_ca.cert_pem.bytes())

    def server_tls(self) -> ServerTls:
        return ServerTls(certificate_chain=str(self.chain), private_key=str(self.key), client_ca=str(self.client_ca))


def client_of(ca: trustme.CA, server_name: str, client_ca: trustme.CA) -> ClientTls:
    """Trusts ``ca``, expects a certificate naming ``server_name``, presents one ``client_ca`` signed."""
    own = client_ca.issue_cert("client.example")
    return ClientTls(
        root_certificates=ca.cert_pem.bytes(),
        certificate_chain=b"".join(blob.bytes() for blob in own.cert_chain_pems),
        private_key=own.private_key_pem.bytes(),
        server_name=server_name,
    )


async def answered(address: str, tls: ClientTls) -> bool:
    """Whether a one-off call over a new connection with ``tls`` is answered (a refused handshake is not)."""
    try:
        await oneshot.send_request_async(DataRequest(endpoint="/x"), address, 5.0, tls=tls)
    except ReplicaError as error:
        assert error.code == grpc.StatusCode.UNAVAILABLE, error
        return False
    return True


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


async def test_renewed_files_serve_new_connections_and_the_old_ones_carry_on(files, pool_factory):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("before.example"), clients)
    async with EchoServer("rotating", credentials=files.server_tls().credentials()) as server:
        before = client_of(ca, "before.example", clients)
        after = client_of(ca, "after.example", clients)
        assert await answered(server.address, before) and not await answered(server.address, after)
        pool = pool_factory(tls=before)
        pool.add_connection("dep", server.address)
        await pool.send_request_once(DataRequest(endpoint="/x"), "dep")  # a connection made before the renewal

        files.serve(ca.issue_cert("after.example"), clients)
        assert await answered(server.address, after) and not await answered(server.address, before)
        reply, _ = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")  # its connection carries on
        assert reply is not None


async def test_a_renewed_client_ca_decides_who_may_connect(files):
    ca, old_clients, new_clients = trustme.CA(), trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("server.example"), old_clients)
    async with EchoServer("mutual", credentials=files.server_tls().credentials()) as server:
        assert await answered(server.address, client_of(ca, "server.example", old_clients))
        assert not await answered(server.address, client_of(ca, "server.example", new_clients))
        files.serve(ca.issue_cert("server.example"), new_clients)
        assert await answered(server.address, client_of(ca, "server.example", new_clients))
        assert not await answered(server.address, client_of(ca, "server.example", old_clients))


async def test_a_change_that_does_not_check_out_keeps_the_last_good_material_and_says_so(files, caplog):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("good.example"), clients)
    good = client_of(ca, "good.example", clients)
    async with EchoServer("careful", credentials=files.server_tls().credentials()) as server:
        # half a renewal: the new certificate is there, its key not yet
        files.write(files.chain, b"".join(blob.bytes() for blob in ca.issue_cert("next.example").cert_chain_pems))
        with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
            assert await answered(server.address, good)
            assert await answered(server.address, good)
        refusals = [record for record in caplog.records if "cannot be served" in record.getMessage()]
        assert len(refusals) == 1 and "does not match" in refusals[0].getMessage()

        renewed = ca.issue_cert("next.example")
        files.serve(renewed, clients)  # the rest of it arrives
        assert await answered(server.address, client_of(ca, "next.example", clients))


def days_from_now(start: float, end: float) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"not_before": now + datetime.timedelta(days=start), "not_after": now + datetime.timedelta(days=end)}


OUTSIDE_VALIDITY = [((-30, -1), "expired on"), ((10, 40), "is not valid before")]


@pytest.mark.parametrize("window, said", OUTSIDE_VALIDITY, ids=["expired", "not yet valid"])
async def test_a_renewal_outside_its_validity_period_keeps_the_last_good_material(files, caplog, window, said):
    """Only the key's fit was checked: an expired renewal, or one issued ahead of the clock, replaced a
    working certificate, and every handshake failed, with an INFO line (found by a security review)."""
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("good.example"), clients)
    good = client_of(ca, "good.example", clients)
    async with EchoServer("dated", credentials=files.server_tls().credentials()) as server:
        files.serve(ca.issue_cert("good.example", **days_from_now(*window)), clients)
        with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
            assert await answered(server.address, good)
        refusals = [record.getMessage() for record in caplog.records if "cannot be served" in record.getMessage()]
        assert len(refusals) == 1 and said in refusals[0], refusals


@pytest.mark.parametrize("window, said", OUTSIDE_VALIDITY, ids=["expired", "not yet valid"])
def test_a_certificate_outside_its_validity_period_is_refused_where_it_is_configured(tmp_path, window, said):
    ca = trustme.CA()
    dated = ca.issue_cert("dated.example", **days_from_now(*window))
    chain, key = b"".join(blob.bytes() for blob in dated.cert_chain_pems), dated.private_key_pem.bytes()
    with pytest.raises(ConfigurationError, match=f"server certificate chain .* {said}"):
        ServerTls(certificate_chain=chain, private_key=key)
    with pytest.raises(ConfigurationError, match=f"client certificate chain .* {said}"):
        ClientTls(root_certificates=ca.cert_pem.bytes(), certificate_chain=chain, private_key=key)


async def test_a_certificate_valid_in_a_minute_starts_with_a_warning_but_is_no_renewal_until_then(
    files, caplog
):
    """The issuer's clock a little ahead made a process refuse its only certificate at start (found by a
    review); a renewal, which has a certificate still serving, waits for it to be valid."""
    ca, clients = trustme.CA(), trustme.CA()
    early = ca.issue_cert("early.example", **days_from_now(60 / 86400, 30))
    files.serve(early, clients)
    with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
        tls = files.server_tls()  # taken, and served: from files, and from memory
        tls.credentials()
        ServerTls(certificate_chain=files.chain.read_bytes(), private_key=files.key.read_bytes()).credentials()
    assert "clients refuse it until then" in caplog.text
    files.serve(ca.issue_cert("good.example"), clients)
    async with EchoServer("skewed", credentials=files.server_tls().credentials()) as server:
        files.serve(early, clients)
        with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
            assert await answered(server.address, client_of(ca, "good.example", clients))
        assert any("cannot be served" in r.getMessage() and "is not valid before" in r.getMessage()
                   for r in caplog.records)
    assert tls.certificate_chain == str(files.chain)


async def test_material_given_in_memory_is_served_as_given():
    ca = trustme.CA()
    certificate = ca.issue_cert("memory.example")
    tls = ServerTls(
        certificate_chain=b"".join(blob.bytes() for blob in certificate.cert_chain_pems),
        private_key=certificate.private_key_pem.bytes(),
    )
    async with EchoServer("in-memory", credentials=tls.credentials()) as server:
        client = ClientTls(root_certificates=ca.cert_pem.bytes(), server_name="memory.example")
        assert await answered(server.address, client)


def test_the_handshake_check_reads_nothing_while_nothing_changed(files, monkeypatch):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("a.example"), clients)
    follower = tls_module.FollowedServerMaterial(files.server_tls())
    reads = []
    real_load = tls_module.load_pem
    monkeypatch.setattr(tls_module, "load_pem", lambda *args: reads.append(args) or real_load(*args))
    assert follower() is None and follower() is None and reads == []  # a stat per file, no read
    files.serve(ca.issue_cert("b.example"), clients)
    assert isinstance(follower(), grpc.ServerCertificateConfiguration) and len(reads) == 3
    assert follower() is None and len(reads) == 3  # served now: unchanged again


async def test_a_secret_volume_renewal_as_the_kubelet_makes_it(tmp_path):
    """The kubelet writes a Secret's new files into a fresh folder and swaps the ``..data`` symlink to it at
    once; ``tls.crt`` and its siblings are symlinks through ``..data``."""
    ca, clients = trustme.CA(), trustme.CA()

    def publish(version: str, certificate: trustme.LeafCert) -> None:
        folder = tmp_path / f"..{version}"
        folder.mkdir()
        staged = Files(folder)
        staged.serve(certificate, clients)
        (tmp_path / "..data_tmp").symlink_to(folder.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    publish("2026_11_27_01", ca.issue_cert("first.example"))
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    mounted = Files(tmp_path)
    async with EchoServer("pod", credentials=mounted.server_tls().credentials()) as server:
        assert await answered(server.address, client_of(ca, "first.example", clients))
        publish("2026_11_27_02", ca.issue_cert("second.example"))
        assert await answered(server.address, client_of(ca, "second.example", clients))
        assert not await answered(server.address, client_of(ca, "first.example", clients))


def test_a_refused_renewal_is_tried_and_reported_again_while_it_lasts(files, caplog):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("a.example"), clients)
    eager = tls_module.FollowedServerMaterial(files.server_tls(), retry_refused_after=0.0)
    patient = tls_module.FollowedServerMaterial(files.server_tls(), retry_refused_after=3600.0)
    files.write(files.chain, b"".join(blob.bytes() for blob in ca.issue_cert("b.example").cert_chain_pems))

    def warnings_from(follower) -> int:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
            assert follower() is None and follower() is None  # two handshakes: the last good material stays
        return sum("cannot be served" in record.getMessage() for record in caplog.records)

    assert warnings_from(eager) == 2  # past the interval at each handshake: tried and reported again
    assert warnings_from(patient) == 1  # within it: once


def test_a_chmod_that_fixes_access_is_a_change(files):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("a.example"), clients)
    follower = tls_module.FollowedServerMaterial(files.server_tls())
    assert follower() is None
    files.key.chmod(0o400)  # nothing else changes: not inode, mtime nor size
    assert isinstance(follower(), grpc.ServerCertificateConfiguration)


async def test_a_renewal_that_empties_the_client_ca_keeps_the_old_one_and_still_asks_for_certificates(files):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("server.example"), clients)
    async with EchoServer("strict", credentials=files.server_tls().credentials()) as server:
        files.write(files.client_ca, b"")
        without_certificate = ClientTls(root_certificates=ca.cert_pem.bytes(), server_name="server.example")
        assert not await answered(server.address, without_certificate)
        assert await answered(server.address, client_of(ca, "server.example", clients))


# -- the client side: a pool whose material is in files gives its replicas new channels after a renewal -------


class ClientFiles(Files):
    """A client's ca.crt / tls.crt / tls.key, as a head mounts its Secret."""

    def present(self, certificate: trustme.LeafCert, roots: trustme.CA) -> None:
        self.write(self.chain, b"".join(blob.bytes() for blob in certificate.cert_chain_pems))
        self.write(self.key, certificate.private_key_pem.bytes())
        self.write(self.client_ca, roots.cert_pem.bytes())

    def client_tls(self, server_name: str) -> ClientTls:
        return ClientTls(root_certificates=str(self.client_ca), certificate_chain=str(self.chain),
                         private_key=str(self.key), server_name=server_name)


@pytest.fixture
def client_files(tmp_path: Path) -> ClientFiles:
    folder = tmp_path / "client"
    folder.mkdir()
    return ClientFiles(folder)


@pytest.fixture
def authorities(files, client_files) -> tuple[trustme.CA, trustme.CA]:
    """(server CA, client CA): the worker's files serve worker.example, the head's present head.example."""
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("worker.example"), clients)
    client_files.present(clients.issue_cert("head.example"), ca)
    return ca, clients


async def test_a_renewed_client_certificate_reaches_replicas_on_new_channels_and_loses_no_call(
    files, client_files, pool_factory, eventually
):
    ca, old_clients, new_clients = trustme.CA(), trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("worker.example"), old_clients)
    client_files.present(old_clients.issue_cert("head-before.example"), ca)
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        pool = pool_factory(tls=client_files.client_tls("worker.example"), tls_check_interval=0.02)
        pool.add_connection("dep", server.address)
        await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        [connection] = pool.get_replicas("dep").get_all_connections()
        old_channel = connection.channel

        server.delay = 0.5
        in_flight = pool.send_request_once(DataRequest(endpoint="/slow"), "dep")
        await eventually(lambda: server.calls == 2)
        # the worker now trusts only the new client CA, and the head's Secret holds a certificate it signed
        files.serve(ca.issue_cert("worker.example"), new_clients)
        client_files.present(new_clients.issue_cert("head-after.example"), ca)
        await eventually(lambda: connection.channel is not old_channel)

        reply, _ = await in_flight  # the call on the retired channel was answered there
        assert reply.header.exec_endpoint == "/slow"
        server.delay = 0.0
        reply, _ = await pool.send_request_once(DataRequest(endpoint="/after"), "dep")  # a new connection
        assert reply.header.exec_endpoint == "/after"
        assert server.client_names == [["head-before.example"]] * 2 + [["head-after.example"]]
        assert not await answered(server.address, client_of(ca, "worker.example", old_clients))


async def test_a_client_renewal_that_does_not_check_out_is_not_taken_until_it_does(
    authorities, files, client_files, pool_factory, eventually, caplog
):
    _, clients = authorities
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
            pool = pool_factory(tls=client_files.client_tls("worker.example"), tls_check_interval=0.02)
            pool.add_connection("dep", server.address)
            [connection] = pool.get_replicas("dep").get_all_connections()
            first_channel = connection.channel
            renewed = clients.issue_cert("head.example")
            client_files.write(client_files.chain, b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
            await eventually(lambda: any("is not taken" in record.getMessage() for record in caplog.records))
            assert connection.channel is first_channel  # half a renewal: the key does not match yet
            reply, _ = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
            assert reply.header.exec_endpoint == "/x"

            client_files.write(client_files.key, renewed.private_key_pem.bytes())
            await eventually(lambda: connection.channel is not first_channel)
            reply, _ = await pool.send_request_once(DataRequest(endpoint="/y"), "dep")
            assert reply.header.exec_endpoint == "/y"
        refusals = [record.getMessage() for record in caplog.records if "is not taken" in record.getMessage()]
        assert refusals and "does not match" in refusals[0]


async def test_a_client_renewal_a_replica_refuses_while_it_takes_the_previous_one_is_not_taken(
    authorities, files, client_files, pool_factory, eventually, caplog
):
    """A TLS review's find: a renewed client pair from a CA the workers do not trust (or a CA file that does not
    sign their certificates) was taken, and every replica's working channel replaced by one that could not
    connect: nearly every request failed until the files were good again. Asked first, the replica refuses it."""
    ca, clients = authorities
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        pool = pool_factory(tls=client_files.client_tls("worker.example"), tls_check_interval=0.02)
        pool.add_connection("dep", server.address)
        await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        [connection] = pool.get_replicas("dep").get_all_connections()
        first_channel = connection.channel
        with caplog.at_level(logging.WARNING, logger="shardnet.networking.pool"):
            client_files.present(trustme.CA().issue_cert("head.example"), ca)  # signed by a CA the worker ignores
            await eventually(lambda: "changed but is not taken" in caplog.text)
            reply, _ = await pool.send_request_once(DataRequest(endpoint="/during"), "dep")
            assert reply.header.exec_endpoint == "/during" and connection.channel is first_channel
            assert f"replica {connection.address} serves the previous material and not it" in caplog.text
            client_files.present(clients.issue_cert("head.example"), trustme.CA())  # roots that did not sign it
            await eventually(lambda: caplog.text.count("changed but is not taken") == 2)
            client_files.present(clients.issue_cert("head-renewed.example"), ca)  # one it takes
            await eventually(lambda: connection.channel is not first_channel)
        reply, _ = await pool.send_request_once(DataRequest(endpoint="/after"), "dep")
        assert reply.header.exec_endpoint == "/after" and server.client_names[-1] == ["head-renewed.example"]


def test_only_material_in_files_is_followed(authorities, client_files):
    ca, clients = authorities
    assert tls_module.FollowedClientMaterial(client_files.client_tls("worker.example")).follows_files
    in_memory = ClientTls(root_certificates=ca.cert_pem.bytes())
    assert not tls_module.FollowedClientMaterial(in_memory).follows_files
    assert tls_module.FollowedClientMaterial(in_memory).renewal() is None


@pytest.mark.parametrize("interval", [0, -1, float("nan"), "30", True])
def test_a_bad_tls_check_interval_is_refused(interval):
    with pytest.raises(ConfigurationError, match="tls_check_interval must be positive seconds"):
        GrpcConnectionPool(tls_check_interval=interval)


async def test_channels_made_after_a_renewal_use_the_material_checked_then_not_the_files_as_they_are_later(
    authorities, files, client_files, pool_factory, eventually
):
    ca, clients = authorities
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        pool = pool_factory(tls=client_files.client_tls("worker.example"), tls_check_interval=0.02)
        pool.add_connection("dep", server.address)
        [connection] = pool.get_replicas("dep").get_all_connections()
        first_channel = connection.channel
        client_files.present(clients.issue_cert("head-renewed.example"), ca)
        await eventually(lambda: connection.channel is not first_channel)
        # then half of the next renewal lands: a certificate whose key has not arrived
        stray = clients.issue_cert("head-next.example")
        client_files.write(client_files.chain, b"".join(blob.bytes() for blob in stray.cert_chain_pems))
        connection.rebuild()  # as repeated failures would rebuild it: with what was checked, not these files
        reply, _ = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        assert reply.header.exec_endpoint == "/x"
        assert server.client_names[-1] == ["head-renewed.example"]
        pool.add_connection("dep", f"localhost:{server.port}")  # a replica joining now dials with it too
        replies = [await pool.send_request_once(DataRequest(endpoint="/y"), "dep") for _ in range(2)]
        assert all(reply.header.exec_endpoint == "/y" for reply, _ in replies)
        assert server.client_names[-2:] == [["head-renewed.example"]] * 2


def follower_tasks() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("tls-follower-")]


async def test_the_follower_runs_once_per_started_pool_and_stops_with_it(authorities, client_files):
    pool = GrpcConnectionPool(runtime_name="follow", tls=client_files.client_tls("worker.example"))
    try:
        pool.start()
        pool.start()
        [follower] = follower_tasks()
    finally:
        await pool.close()
    assert follower.cancelled() and follower_tasks() == []
    async with pool:  # started again after a close: following again
        assert len(follower_tasks()) == 1
    assert follower_tasks() == []


def test_a_pool_following_tls_files_must_be_started_in_a_running_loop(authorities, client_files):
    ca, clients = authorities
    pool = GrpcConnectionPool(tls=client_files.client_tls("worker.example"))
    with pytest.raises(ConfigurationError, match="from async code"):
        pool.start()
    GrpcConnectionPool(tls=ClientTls(root_certificates=ca.cert_pem.bytes())).start()  # nothing to follow: fine


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """The address of a server that takes connections and never answers (not even a TLS handshake)."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_a_health_check_cut_by_a_channel_renewal_is_a_failed_check_not_a_cancellation(authorities, client_files):
    async with silent_server() as address:
        replicas = ReplicaList(tls=client_files.client_tls("worker.example"))
        try:
            connection = replicas.add_connection(address)
            check = asyncio.create_task(connection.health(timeout=30))
            await asyncio.sleep(0)
            await replicas.renew_channels(client_files.client_tls("worker.example").in_memory())
            assert await asyncio.wait_for(check, 5) is False  # an ejected replica's probe carries on
        finally:
            await replicas.close()


async def test_a_replica_list_the_renewal_failed_to_reach_is_renewed_at_the_next_look_and_only_it(
    authorities, files, client_files, pool_factory, eventually, monkeypatch
):
    ca, clients = authorities
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        pool = pool_factory(tls=client_files.client_tls("worker.example"), tls_check_interval=0.02)
        pool.add_connection("steady", server.address)
        pool.add_connection("flaky", server.address)
        [steady] = pool.get_replicas("steady").get_all_connections()
        flaky_list = pool.get_replicas("flaky")
        [flaky] = flaky_list.get_all_connections()
        steady_channels, flaky_channels = [steady.channel], [flaky.channel]
        real_renew = flaky_list.renew_channels
        attempts = []

        async def fails_once(tls):
            attempts.append(tls)
            if len(attempts) == 1:
                raise RuntimeError("a list that could not be renewed this time")
            return await real_renew(tls)

        monkeypatch.setattr(flaky_list, "renew_channels", fails_once)
        client_files.present(clients.issue_cert("head-renewed.example"), ca)
        await eventually(lambda: flaky.channel is not flaky_channels[0])
        steady_channels.append(steady.channel)
        await asyncio.sleep(0.2)  # ten looks more: nothing is renewed twice (a negative cannot be polled for)
        assert len(attempts) == 2
        assert steady.channel is steady_channels[1] is not steady_channels[0]  # renewed once, at the first look
        for deployment in ("steady", "flaky"):
            await pool.send_request_once(DataRequest(endpoint="/x"), deployment)
        assert server.client_names[-2:] == [["head-renewed.example"]] * 2


async def test_a_pool_started_again_dials_with_the_files_as_they_are_then(files, client_files, eventually):
    ca, clients = trustme.CA(), trustme.CA()
    files.serve(ca.issue_cert("worker.example"), clients)
    client_files.present(clients.issue_cert("head-first.example"), ca)
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        pool = GrpcConnectionPool(tls=client_files.client_tls("worker.example"), tls_check_interval=3600)
        async with pool:
            pool.add_connection("dep", server.address)
            await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        client_files.present(clients.issue_cert("head-second.example"), ca)  # while it was closed
        async with pool:
            pool.add_connection("dep", server.address)
            await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        assert server.client_names == [["head-first.example"], ["head-second.example"]]


async def test_a_started_pool_dials_with_what_it_checked_at_start_not_with_half_a_renewal(
    authorities, files, client_files, pool_factory
):
    _, clients = authorities
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        pool = pool_factory(tls=client_files.client_tls("worker.example"), tls_check_interval=3600)
        stray = clients.issue_cert("head-next.example")  # half of a renewal lands before the first replica
        client_files.write(client_files.chain, b"".join(blob.bytes() for blob in stray.cert_chain_pems))
        pool.add_connection("dep", server.address)
        reply, _ = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
        assert reply.header.exec_endpoint == "/x" and server.client_names == [["head.example"]]


def test_files_rewritten_while_read_are_read_again_whole_at_the_next_look(authorities, client_files, monkeypatch):
    ca, clients = authorities
    follower = tls_module.FollowedClientMaterial(client_files.client_tls("worker.example"))
    follower.take(follower.renewal()[0])
    client_files.present(clients.issue_cert("head-renewed.example"), ca)
    real_load = tls_module.load_pem
    newer = clients.issue_cert("head-newer.example")

    def load_then_rewrite(source, what="certificate"):
        data = real_load(source, what)
        if what == "client private key" and not rewritten:  # a renewal lands in the middle of the read
            rewritten.append(True)
            client_files.present(newer, ca)
        return data

    rewritten: list[bool] = []
    monkeypatch.setattr(tls_module, "load_pem", load_then_rewrite)
    assert follower.renewal() is None and rewritten
    signature, material = follower.renewal()
    assert material.certificate_chain == client_files.chain.read_bytes()  # the newer files, whole


def test_a_refused_renewal_names_its_files_and_a_key_open_to_others_is_said(authorities, client_files, caplog):
    ca, clients = authorities
    follower = tls_module.FollowedClientMaterial(client_files.client_tls("worker.example"))
    follower.take(follower.renewal()[0])
    stray = clients.issue_cert("head-next.example")
    client_files.write(client_files.chain, b"".join(blob.bytes() for blob in stray.cert_chain_pems))
    with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
        assert follower.renewal() is None
        client_files.present(clients.issue_cert("head-open.example"), ca)
        client_files.key.chmod(0o644)
        assert follower.renewal() is not None
    messages = [record.getMessage() for record in caplog.records]
    assert any("is not taken" in m and str(client_files.chain) in m for m in messages)
    assert any("open to other users" in m and str(client_files.key) in m for m in messages)


async def test_files_that_do_not_check_out_at_start_are_said_and_taken_once_they_do(
    authorities, files, client_files, pool_factory, eventually, caplog
):
    _, clients = authorities
    tls = client_files.client_tls("worker.example")  # checked when built
    renewed = clients.issue_cert("head-renewed.example")  # half of a renewal lands before the pool starts
    client_files.write(client_files.chain, b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
    with caplog.at_level(logging.WARNING, logger="shardnet.networking.tls"):
        pool = pool_factory(tls=tls, tls_check_interval=0.02)
    [warning] = [r.getMessage() for r in caplog.records if "do not check out" in r.getMessage()]
    assert "does not match" in warning and str(client_files.chain) in warning
    async with EchoServer("worker", credentials=files.server_tls().credentials()) as server:
        client_files.write(client_files.key, renewed.private_key_pem.bytes())  # the rest of it arrives
        pool.add_connection("dep", server.address)

        async def presents_the_renewed_certificate() -> bool:
            await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
            return server.client_names[-1] == ["head-renewed.example"]

        await eventually(presents_the_renewed_certificate)


def test_material_read_at_a_renewal_is_shown_by_size_in_a_repr_not_as_pem(authorities, client_files):
    tls = client_files.client_tls("worker.example")
    assert repr(tls) == (
        f"ClientTls(root_certificates={str(client_files.client_ca)!r}, certificate_chain={str(client_files.chain)!r}, "
        f"private_key={str(client_files.key)!r}, server_name='worker.example')"
    )
    shown = repr(tls.in_memory())
    assert "-----BEGIN" not in shown and "bytes of PEM" in shown and "server_name='worker.example'" in shown


# -- a pool not started reads its TLS files at each new channel: a file gone a moment must not lose a request --


async def test_an_unstarted_pool_whose_tls_file_is_gone_a_moment_fails_over_and_keeps_the_failed_channel(
    authorities, files, client_files, caplog
):
    credentials = files.server_tls().credentials
    async with EchoServer("dying", credentials=credentials()) as dying, \
            EchoServer("healthy", credentials=credentials()) as healthy:
        pool = GrpcConnectionPool(tls=client_files.client_tls("worker.example"))  # as Jina-style code uses one
        try:
            for server in (dying, healthy):
                pool.add_connection("dep", server.address)
            for _ in range(2):
                await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
            await dying.stop()
            client_files.client_ca.unlink()  # a rotation that deletes, then writes
            with caplog.at_level(logging.WARNING, logger="shardnet.networking.replica_list"):
                for _ in range(8):  # the dying replica's third failure rebuilds its channel, reading the files
                    _, trailing = await pool.send_request_once(DataRequest(endpoint="/x"), "dep")
                    assert trailing["served-by"] == "healthy"
            assert pool.get_replicas("dep").ejected_addresses == [f"https://{dying.address}"]
            [warning] = [record.getMessage() for record in caplog.records if "current channel" in record.getMessage()]
            assert "dep/shard-0" in warning and dying.address in warning and str(client_files.client_ca) in warning
        finally:
            await pool.close()


async def test_a_readmission_check_whose_rebuild_cannot_read_the_tls_files_probes_on(
    authorities, files, client_files, dead_address, eventually
):
    async with EchoServer("healthy", credentials=files.server_tls().credentials()) as healthy:
        replicas = ReplicaList(tls=client_files.client_tls("worker.example"), name="dep/shard-0")
        try:
            dead = replicas.add_connection(dead_address)
            replicas.add_connection(healthy.address)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError):
                    await replicas.call(dead, "single_data", DataRequest(endpoint="/x"), None, 5.0)
            assert replicas.ejected_addresses == [f"https://{dead_address}"]
            await eventually(lambda: dead.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE)
            client_files.client_ca.unlink()
            assert replicas.readmit_if_healthy(dead_address)
            check = replicas._probes[dead]
            await asyncio.wait_for(asyncio.gather(check, return_exceptions=True), 5)
            assert check.exception() is None
            assert not replicas._probes[dead].done()  # probed on, as after its ejection
        finally:
            await replicas.close()


async def test_a_health_check_on_a_removed_replicas_channel_ends_with_the_close_not_its_deadline(eventually):
    """A review's find: the fast close of a channel with no counted call (no grpc.aio walk) left a health check on
    it (not counted) running to its deadline; a check running makes the close grpc.aio's, which cuts it."""
    async with silent_server() as address:
        replicas = ReplicaList()
        try:
            connection = replicas.add_connection(address)
            check = asyncio.create_task(connection.health(timeout=30))
            await eventually(lambda: connection.running.checks == 1)
            await replicas.remove_connection(address)
            assert await asyncio.wait_for(check, 5) is False
        finally:
            await replicas.close()
