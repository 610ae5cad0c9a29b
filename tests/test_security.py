"""Security: TLS and mutual TLS on every server and client path (control plane included), loopback by
default, membership changes only for callers holding the token (or, where none is set, a client certificate),
no secret in a log.

Certificates come from ``trustme``; servers run in the test's loop, except where the command line or a
process's log is what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from shardnet import ClientTls, ControlRequest, DataRequest, Document, Executor, GrpcConnectionPool, ServerTls, requests
from shardnet.cli.main import build_parser
from shardnet.errors import ConfigurationError, ReplicaError
from shardnet.networking import oneshot
from shardnet.protocol import services
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.head import Head
from shardnet.runtimes.log_lines import quoted
from shardnet.runtimes.processes import ShardnetProcess, stop_all
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes import worker as worker_module
from shardnet.runtimes.worker import Worker

pytestmark = pytest.mark.timeout(60)
FAULT_EXECUTOR = f"{Path(__file__).resolve().parent.parent / 'benchmarks' / '_fault_executor.py'}:FaultExecutor"


class Stamp(Executor):
    @requests
    def stamp(self, docs, parameters, **kwargs):
        for doc in docs:
            doc.text = "stamped"


@dataclass
class Pki:
    ca: bytes
    server: ServerTls  # server certificate only
    server_mutual: ServerTls  # requires a client certificate signed by the CA
    client: ClientTls  # trusts the CA and presents a client certificate
    trusting: ClientTls  # trusts the CA, no client certificate
    files: dict  # the same material as PEM files, for the command line
    authority: trustme.CA  # what issued it all: issues more


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("worker.shardnet.test")
    pem = lambda blobs: b"".join(blob.bytes() for blob in blobs)  # noqa: E731
    chain, key = pem(server.cert_chain_pems), server.private_key_pem.bytes()
    client_chain, client_key = pem(client.cert_chain_pems), client.private_key_pem.bytes()
    folder = tmp_path_factory.mktemp("pki")
    files = {}
    for name, data in {"ca": ca.cert_pem.bytes(), "cert": chain, "key": key, "client-cert": client_chain,
                       "client-key": client_key}.items():
        (folder / f"{name}.pem").write_bytes(data)
        files[name] = str(folder / f"{name}.pem")
    return Pki(
        ca=ca.cert_pem.bytes(),
        server=ServerTls(chain, key),
        server_mutual=ServerTls(chain, key, client_ca=ca.cert_pem.bytes()),
        client=ClientTls(root_certificates=ca.cert_pem.bytes(), private_key=client_key, certificate_chain=client_chain),
        trusting=ClientTls(root_certificates=ca.cert_pem.bytes()),
        files=files,
        authority=ca,
    )


async def members(head_address: str, tls=None) -> list[str]:
    reply = await oneshot.send_control("STATUS", head_address, tls=tls, timeout=5.0)
    return sorted(f"{entity.address}:{entity.port}" for entity in reply.related_entities)


async def post(head_address: str, tls=None) -> str:
    request = DataRequest(docs=[Document(text="x")], endpoint="/any")
    response = await oneshot.send_request_async(request, head_address, timeout=5.0, tls=tls)
    return response.docs[0].text


# -- TLS and mutual TLS, in process ---------------------------------------------------------------


async def test_mutual_tls_head_and_tls_worker_register_and_serve_over_tls(pki, runtimes):
    """The worker joins over mTLS (with no token set, its certificate is its credential), the head dials it over TLS."""
    head = await runtimes(Head("secure", ServerConfig(tls=pki.server_mutual), pool=GrpcConnectionPool(tls=pki.client)))
    worker = await runtimes(
        Worker(Stamp.create(), ServerConfig(tls=pki.server_mutual), head=head.server.address, head_tls=pki.client)
    )
    await worker.register()
    assert await members(head.server.address, pki.client) == [worker.server.address]
    assert await post(head.server.address, pki.client) == "stamped"
    await worker.deregister()
    assert await members(head.server.address, pki.client) == []


async def test_a_worker_keeps_renewing_its_registration_through_a_tls_file_gone_or_half_renewed(
    pki, runtimes, tmp_path, monkeypatch, caplog, eventually
):
    """The worker registers with the last client material it read whole and checked: its renewals (it had died
    for good on a key file missing a moment) go on through a missing file and through half a renewal (a new
    certificate whose key is not written yet, which failed every handshake), and it takes the whole renewal."""
    first, renewed = pki.authority.issue_cert("worker-first.shardnet.test"), pki.authority.issue_cert("worker-renewed.shardnet.test")
    chain, key = tmp_path / "client.crt", tmp_path / "client.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in first.cert_chain_pems))
    key.write_bytes(first.private_key_pem.bytes())
    key.chmod(0o600)
    monkeypatch.setattr(worker_module, "HEAD_TLS_CHECK_INTERVAL", 0.0)  # the files looked at with every renewal
    head = await runtimes(Head("secure", ServerConfig(tls=pki.server_mutual), pool=GrpcConnectionPool(tls=pki.client)))
    material = ClientTls(root_certificates=pki.ca, certificate_chain=str(chain), private_key=str(key))
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(tls=pki.server_mutual), head=head.server.address,
                                   head_tls=material, register_interval=0.1))
    caplog.set_level(logging.DEBUG, logger="shardnet.runtimes.worker")
    await worker.register()

    async def renewals_go_on() -> None:
        taken = lambda: sum("registered" in r.getMessage() for r in caplog.records)  # noqa: E731
        before = taken()
        await eventually(lambda: taken() >= before + 3, timeout=5.0)

    key.unlink()  # a copy on its way, say
    await renewals_go_on()
    key.write_bytes(first.private_key_pem.bytes())
    key.chmod(0o600)
    chain.write_bytes(b"".join(blob.bytes() for blob in renewed.cert_chain_pems))  # its key comes later
    await renewals_go_on()
    assert "is not taken" in caplog.text and str(chain) in caplog.text
    key.write_bytes(renewed.private_key_pem.bytes())
    await eventually(lambda: worker._head_tls.certificate_chain == chain.read_bytes())
    await renewals_go_on()
    assert not worker._keep_registered.done()
    assert await members(head.server.address, pki.client) == [worker.server.address]



def write_client_material(chain: Path, key: Path, issued) -> bytes:
    """Put ``issued``'s chain and key in place, each by a rename, as a renewal does; the chain's bytes."""
    for path, data in ((chain, b"".join(blob.bytes() for blob in issued.cert_chain_pems)),
                       (key, issued.private_key_pem.bytes())):
        fresh = path.with_suffix(".new")
        fresh.write_bytes(data)
        fresh.chmod(0o600)
        os.replace(fresh, path)
    return chain.read_bytes()


async def registered_with_files(pki, runtimes, tmp_path, monkeypatch):
    """A mutual-TLS head, and a worker registered with it with a client certificate in files it looks at on every
    ACTIVATE: (head, worker, chain file, key file)."""
    chain, key = tmp_path / "client.crt", tmp_path / "client.key"
    write_client_material(chain, key, pki.authority.issue_cert("worker-first.shardnet.test"))
    monkeypatch.setattr(worker_module, "HEAD_TLS_CHECK_INTERVAL", 0.0)
    head = await runtimes(Head("secure", ServerConfig(tls=pki.server_mutual), pool=GrpcConnectionPool(tls=pki.client)))
    material = ClientTls(root_certificates=pki.ca, certificate_chain=str(chain), private_key=str(key))
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(tls=pki.server_mutual), head=head.server.address,
                                   head_tls=material, register_interval=0.1))
    await worker.register()
    return head, worker, chain, key


async def test_a_worker_does_not_take_a_client_certificate_renewal_its_head_refuses(
    pki, runtimes, tmp_path, monkeypatch, caplog, eventually
):
    """A renewal of the worker's --head-client-cert the head does not trust (another CA, the head's client CA not
    renewed yet) was taken at once: every ACTIVATE then failed, and the head dropped the worker at the end of its
    lease though the previous certificate still served. It is asked about first, as a pool asks its replicas."""
    caplog.set_level(logging.DEBUG, logger="shardnet.runtimes.worker")
    head, worker, chain, key = await registered_with_files(pki, runtimes, tmp_path, monkeypatch)
    write_client_material(chain, key, trustme.CA().issue_cert("worker-renewed.shardnet.test"))
    await eventually(lambda: "head TLS material changed but is not taken" in caplog.text, timeout=5.0)
    taken = lambda: sum("registered" in r.getMessage() for r in caplog.records)  # noqa: E731
    before = taken()
    await eventually(lambda: taken() >= before + 3, timeout=5.0)  # ACTIVATE goes on with the previous material
    assert caplog.text.count("head TLS material changed but is not taken") == 1  # said once, asked at each look
    assert await members(head.server.address, pki.client) == [worker.server.address]


async def test_a_renewal_is_taken_with_the_head_down_and_its_check_comes_out_of_the_activates_time(
    pki, runtimes, tmp_path, monkeypatch
):
    """A head down decides nothing: the renewal is taken (a worker must not keep material about to expire for a
    head that cannot answer). A head that takes the TCP connection and never answers held an ACTIVATE for its
    timeout plus the renewal's check (2 s for 1 s, a regression review): the check now comes out of it."""
    head, worker, chain, key = await registered_with_files(pki, runtimes, tmp_path, monkeypatch)
    worker._keep_registered.cancel()
    await head.stop(0)
    renewed = write_client_material(chain, key, pki.authority.issue_cert("worker-second.shardnet.test"))
    assert (await worker._head_material()).certificate_chain == renewed
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # takes the connection, never answers the handshake
        worker._head = f"127.0.0.1:{hole.getsockname()[1]}"
        given: list[float] = []
        real_activate = oneshot.activate_worker

        async def activate_worker(*args, timeout, **kwargs):
            given.append(timeout)
            return await real_activate(*args, timeout=timeout, **kwargs)

        monkeypatch.setattr(oneshot, "activate_worker", activate_worker)
        write_client_material(chain, key, pki.authority.issue_cert("worker-third.shardnet.test"))
        with pytest.raises(ReplicaError):
            await worker._activate(timeout=1.0)
    assert given and given[0] < 0.9, given  # the check's second (both sides unanswered) taken off the call's


async def test_clients_without_the_right_credentials_reach_nothing(pki, runtimes):
    head = await runtimes(Head("secure", ServerConfig(tls=pki.server_mutual), pool=GrpcConnectionPool(tls=pki.client)))
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(tls=pki.server_mutual)))
    host, port = worker.server.address.rsplit(":", 1)
    for tls in (None, pki.trusting):  # plaintext; TLS without a client certificate
        for address in (head.server.address, worker.server.address):
            with pytest.raises(ReplicaError) as refused:
                await post(address, tls)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ReplicaError):
            await oneshot.activate_worker(host, int(port), head.server.address, 0, tls=tls)
    assert await members(head.server.address, pki.client) == []  # nobody joined
    await oneshot.activate_worker(host, int(port), head.server.address, 0, tls=pki.client)
    assert await post(head.server.address, pki.client) == "stamped"


async def test_a_mutual_tls_head_with_a_token_wants_it_beside_the_certificate(pki, runtimes, caplog):
    """Every data client of a mutual-TLS head holds a certificate the client CA signed: with a token set, a
    certificate alone must not change membership (it did: the token was ignored)."""
    head = await runtimes(Head("secure", ServerConfig(tls=pki.server_mutual, control_token="s3cret-token"),
                               pool=GrpcConnectionPool(tls=pki.client)))
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(tls=pki.server_mutual)))
    host, port = worker.server.address.rsplit(":", 1)
    for token in [None, "wrong-token"] * 10:
        with pytest.raises(ReplicaError) as refused:
            await oneshot.activate_worker(host, int(port), head.server.address, 0, token=token, tls=pki.client)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert await members(head.server.address, pki.client) == []
    assert "secure: refused ACTIVATE from ipv4:127.0.0.1:" in caplog.text  # refusals are logged, with the caller
    assert caplog.text.count("refused ACTIVATE") < 20  # at most once a second: a guesser cannot flood the log
    await oneshot.activate_worker(host, int(port), head.server.address, 0, token="s3cret-token", tls=pki.client)
    assert await members(head.server.address, pki.client) == [worker.server.address]


async def test_tls_head_without_client_ca_wants_the_token_for_membership(pki, runtimes):
    head = await runtimes(Head("secure", ServerConfig(tls=pki.server, control_token="s3cret-token"),
                               pool=GrpcConnectionPool(tls=pki.trusting)))
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(tls=pki.server)))
    host, port = worker.server.address.rsplit(":", 1)
    for token in (None, "wrong-token", "s3cret-token "):
        with pytest.raises(ReplicaError) as refused:
            await oneshot.activate_worker(host, int(port), head.server.address, 0, token=token, tls=pki.trusting)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "control token" in str(refused.value)
    assert await members(head.server.address, pki.trusting) == []
    await oneshot.activate_worker(host, int(port), head.server.address, 0, token="s3cret-token", tls=pki.trusting)
    assert await post(head.server.address, pki.trusting) == "stamped"
    with pytest.raises(ReplicaError) as refused:
        await oneshot.deactivate_worker(host, int(port), head.server.address, 0, tls=pki.trusting)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert await members(head.server.address, pki.trusting) == [worker.server.address]


# -- the command line: flags, processes -------------------------------------------------------------


async def test_command_line_mutual_tls_head_and_worker(pki, tmp_path):
    files = pki.files
    tls_flags = ["--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-client-ca", files["ca"]]
    head = ShardnetProcess(
        "head",
        ["head", "--deployment", "secure", "--shards", "1", *tls_flags,
         "--root-ca", files["ca"], "--client-cert", files["client-cert"], "--client-key", files["client-key"]],
        tmp_path / "head.log",
    )
    worker = ShardnetProcess(
        "worker",
        ["worker", "--uses", FAULT_EXECUTOR, "--workspace", str(tmp_path), *tls_flags, "--register-interval", "0.2",
         "--head-root-ca", files["ca"], "--head-client-cert", files["client-cert"],
         "--head-client-key", files["client-key"]],
        tmp_path / "worker.log",
    )
    try:
        head.launch()
        head_address = await asyncio.to_thread(head.wait_ready)
        worker.arguments += ["--head", head_address]
        worker.launch()
        worker_address = await asyncio.to_thread(worker.wait_ready)
        for _ in range(250):
            if await members(head_address, pki.client) == [worker_address]:
                break
            await asyncio.sleep(0.02)
        assert await members(head_address, pki.client) == [worker_address]
        request = DataRequest(docs=[Document(id="over-mtls")], endpoint="/any")
        response = await oneshot.send_request_async(request, head_address, timeout=5.0, tls=pki.client)
        assert response.docs[0].tags["shard"] == 0
        with pytest.raises(ReplicaError):
            await post(head_address, pki.trusting)
    finally:
        stop_all([worker])  # the worker first: its DEACTIVATE must not race the head's own shutdown
        stop_all([head])
    codes = {"worker": worker.popen.returncode, "head": head.popen.returncode}
    assert codes == {"worker": 0, "head": 0}, (codes, head.tail(), worker.tail())


def test_a_private_key_given_as_its_text_on_the_command_line_is_refused_naming_the_flag(tmp_path):
    """A TLS review's find: ``--tls-key "$(cat tls.key)"`` was taken, and the key was in every user's ``ps``
    (``--control-token`` says so; the key flags said nothing). A file's path is what they take."""
    from shardnet.cli.options import client_tls, server_config

    key = trustme.CA().issue_cert("x.example").private_key_pem.bytes().decode()
    cert = str(tmp_path / "tls.crt")
    parser = build_parser()
    for arguments, flag, read in (
        (["worker", "--uses", "m:C", "--tls-cert", cert, "--tls-key", key], "--tls-key", server_config),
        (["send", "127.0.0.1:1", "--endpoint", "/x", "--root-ca", cert, "--client-cert", cert, "--client-key", key], "--client-key",
         client_tls),
        (["worker", "--uses", "m:C", "--head", "127.0.0.1:1", "--head-root-ca", cert, "--head-client-cert", cert,
          "--head-client-key", key], "--head-client-key", lambda args: client_tls(args, "head-")),
    ):
        with pytest.raises(ConfigurationError, match=f"{flag} takes the path of a file holding the private key, "
                                                     r"not the key itself: .* process list \(ps\)") as refused:
            read(parser.parse_args(arguments))
        assert "PRIVATE KEY" not in str(refused.value)


def test_servers_listen_on_loopback_unless_told_otherwise():
    parser = build_parser()
    for arguments in (["worker", "--uses", "m:C"], ["head", "--deployment", "d"]):
        assert parser.parse_args(arguments).host == "127.0.0.1"
    assert ServerConfig().host == "127.0.0.1"
    assert Deployment(uses=FAULT_EXECUTOR).host == "127.0.0.1"


async def test_a_connection_that_never_completes_its_http2_handshake_is_closed_and_others_are_served(runtimes):
    """A TCP connection that sent nothing, or the HTTP/2 preface without its SETTINGS, stayed open as long as its
    client liked (gRPC's default: 120 s; a review held 2,000 of them, 2,000 descriptors, past 30 s). The server
    closes one that has not completed its handshake within ``handshake_timeout`` (20 s by default, what a gRPC
    client waits for its connection), on the health port too; a client that completes it is served."""
    assert ServerConfig().handshake_timeout == 20.0
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(handshake_timeout=0.5, health_port=0)))

    async def closed_by_the_server(port: int, sent: bytes) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(sent)
            await asyncio.wait_for(reader.read(), 5)  # to its end (a GOAWAY, once it had the preface)
            return reader.at_eof()
        finally:
            writer.close()

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    ports = (worker.server.port, worker.server.health_port)
    assert all(await asyncio.gather(*(closed_by_the_server(port, sent) for port in ports for sent in (b"", preface))))
    assert await post(worker.server.address) == "stamped"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net/tcp")
async def test_a_default_server_listens_on_loopback_only():
    worker = Worker(Stamp.create(), ServerConfig())
    await worker.start()
    try:
        port = worker.server.port
        assert _listening_hosts(port) == {"127.0.0.1"}
    finally:
        await worker.stop(0)


def _listening_hosts(port: int) -> set[str]:
    """The local addresses a TCP socket listens on ``port`` with, from /proc/net/tcp{,6}."""
    hosts = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host_hex, port_hex = local.split(":")
            if int(port_hex, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host_hex)
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host byte order per 32-bit word
            host = ipaddress.ip_address(socket.inet_ntop(family, words))
            hosts.add(str(getattr(host, "ipv4_mapped", None) or host))  # gRPC's dual-stack socket: ::ffff:127.0.0.1
    return hosts


# -- exposure: said at start, refused where it would bridge ------------------------------------------


@pytest.mark.parametrize(
    "settings, warned",
    [
        ({}, "anyone who reaches 0.0.0.0 (a port picked at start)"),
        ({"control_token": "s3cret-token"}, "the control token crosses the network in cleartext"),
        ({"tls": "server", "control_token": "s3cret-token"}, "dials its workers in plaintext"),
        # mutual TLS without a token: its data clients hold certificates of that CA too (a security review)
        ({"tls": "mutual"}, "every client holding a certificate of its client CA, its data clients too, may add"),
    ],
)
async def test_a_head_reachable_beyond_its_machine_says_what_it_exposes(pki, runtimes, caplog, settings, warned):
    if settings.get("tls") in ("server", "mutual"):
        settings = {**settings, "tls": pki.server if settings["tls"] == "server" else pki.server_mutual}
    pool = GrpcConnectionPool(tls=pki.trusting) if settings.get("tls") is pki.server_mutual else None
    await runtimes(Head("exposed", ServerConfig(host="0.0.0.0", **settings), pool=pool))
    assert warned in caplog.text
    assert caplog.text.count("exposed: ") == 1  # that one thing, nothing else


async def test_a_head_on_loopback_or_fed_by_kubernetes_warns_of_nothing(pki, runtimes, caplog):
    await runtimes(Head("quiet", ServerConfig(host="127.0.0.1")))
    await runtimes(Head("quiet", ServerConfig(host="0.0.0.0", tls=pki.server, control_token="t"),
                        pool=GrpcConnectionPool(tls=pki.trusting)))
    assert "quiet: " not in caplog.text


async def test_a_worker_sending_its_token_in_cleartext_over_a_network_says_so(runtimes, caplog):
    for head in ("192.0.2.9:5", "localhost:5", "https://192.0.2.9:5"):  # nothing listens there
        worker = await runtimes(Worker(Stamp.create(), head=head, control_token="s3cret-token"))
        caplog.clear()
        registering = asyncio.create_task(worker.register())
        await asyncio.sleep(0)  # one step: register() says it before its first call, which is not waited for
        registering.cancel()
        await asyncio.gather(registering, return_exceptions=True)
        cleartext = "sending the control token to head 192.0.2.9:5 in cleartext" in caplog.text
        assert cleartext == (head == "192.0.2.9:5"), (head, caplog.text)
        assert "s3cret-token" not in caplog.text


@pytest.mark.parametrize(
    "peer, local",
    [
        ("ipv4:127.0.0.1:40000", True),
        ("ipv6:[::1]:40000", True),
        ("ipv6:%5B::1%5D:40000", True),
        ("unix:/tmp/head.sock", True),
        ("ipv4:192.0.2.7:40000", False),
        ("ipv6:[2001:db8::7]:40000", False),
        ("ipv4:0.0.0.0:1", False),
    ],
)
def test_who_counts_as_a_caller_on_the_heads_machine(peer, local):
    from shardnet.runtimes.head import _on_this_machine

    assert _on_this_machine(peer) is local


def test_a_caller_from_one_of_the_machines_own_addresses_is_on_it():
    """A worker on the head's machine dialling the head by the machine's own address (not loopback) was taken
    for a remote caller, and its loopback registration refused (found by a README review)."""
    from shardnet.runtimes.head import _on_this_machine

    own = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the address a route out leaves by
        with contextlib.suppress(OSError):
            probe.connect(("198.51.100.1", 9))  # no packet is sent
            own.append(probe.getsockname()[0])
    for address in own:  # none on a machine with no route out: then the other side alone is checked
        assert _on_this_machine(f"ipv4:{address}:40000"), address
        assert _on_this_machine(f"ipv6:[::ffff:{address}]:40000"), address
    assert not _on_this_machine("ipv4:198.51.100.77:40000")  # TEST-NET-2: no machine's own


async def test_activate_of_a_unix_socket_is_taken_from_this_machine_only(runtimes, tmp_path):
    """A remote caller must not make the head a bridge to sockets only its machine reaches (the peer check is
    above, for addresses this machine may not have); a local worker, as Deployment runs them, registers."""
    worker = await runtimes(Worker(Stamp.create(), ServerConfig(unix_socket=str(tmp_path / "w.sock"))))
    head = await runtimes(Head("local"))
    await oneshot.activate_worker(worker.server.unix_address, 0, head.server.address, 0)
    assert await members(head.server.address) == [f"{worker.server.unix_address}:0"]


@pytest.mark.parametrize(
    "host",
    # the last five, as a dial reads them too, were taken (found by a security review)
    ["127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "localhost", "127.1", "0", "2130706433", "0x7f.1", "localhost."],
)
async def test_activate_of_a_loopback_only_port_however_written_is_refused_to_a_remote_caller(
    runtimes, monkeypatch, host
):
    """0.0.0.0, :: and IPv4-mapped loopback reach this machine as 127.0.0.1 does: a remote caller holding the
    token could make the head a bridge to a port listening on loopback only (found by a runtimes review). No
    remote peer can reach a test on loopback, so the head is told its caller is not on its machine."""
    import shardnet.runtimes.head as head_module

    monkeypatch.setattr(head_module, "_on_this_machine", lambda peer: False)
    head = await runtimes(Head("bridged"))
    with pytest.raises(ReplicaError) as refused:
        await oneshot.activate_worker(host, 6379, head.server.address, 0)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, refused.value
    assert "is reached on the head's machine only" in str(refused.value)
    assert await members(head.server.address) == []


async def test_every_refused_control_call_is_logged_with_its_caller_a_burst_counted_when_its_second_ends(
    runtimes, monkeypatch, caplog, eventually
):
    """A burst of wrong tokens was one line, its count said only at the next refusal, however late, under that
    caller's name; a refusal for another cause (a loopback worker from afar) was not logged at all."""
    import re

    import shardnet.runtimes.head as head_module

    head = await runtimes(Head("guarded", ServerConfig(control_token="s3cret-token")))
    caplog.set_level(logging.WARNING, logger="shardnet.runtimes.head")
    for _ in range(40):
        with pytest.raises(ReplicaError):
            await oneshot.activate_worker("127.0.0.1", 6379, head.server.address, 0, token="guess")

    def refusals_said() -> int:
        lines = [r.getMessage() for r in caplog.records if "guarded: refused" in r.getMessage()]
        return sum(int(m.group(1)) if (m := re.search(r"refused (\d+) more", line)) else 1 for line in lines)

    await eventually(lambda: refusals_said() == 40, timeout=5.0)  # with no later refusal to bring them out
    assert "refused ACTIVATE from ipv4:127.0.0.1:" in caplog.text and "control token" in caplog.text
    assert re.search(r"from ipv4:127\.0\.0\.1 x\d+;", caplog.text)  # the burst names its callers, by host
    assert len([r for r in caplog.records if "guarded: refused" in r.getMessage()]) <= 8  # no flood

    monkeypatch.setattr(head_module, "_on_this_machine", lambda peer: False)
    caplog.clear()
    with pytest.raises(ReplicaError):
        await oneshot.activate_worker("127.0.0.1", 6379, head.server.address, 0, token="s3cret-token")
    await eventually(lambda: "is reached on the head's machine only" in caplog.text, timeout=5.0)
    assert "guarded: refused" in caplog.text and "from ipv4:127.0.0.1" in caplog.text

    caplog.clear()  # a caller's megabytes are not copied into the log
    huge = ControlRequest("ACTIVATE")
    huge.add_related_entity("x", "h" * 2_000_000 + " y", 5000, 0)
    for _ in range(3):
        with pytest.raises(ReplicaError):
            await oneshot.call_once("control", huge, head.server.address, timeout=5.0,
                                    metadata=(("authorization", "Bearer s3cret-token"),))
    await eventually(lambda: "bad address" in caplog.text, timeout=5.0)
    assert max(len(r.getMessage()) for r in caplog.records) < 2_000


# -- what callers write into the log -------------------------------------------------------------------

# a line of the head's log, as a caller would forge it after a newline of its own
FORGED = "2026-11-28 11:00:00,000 ERROR [head dep pid 1] shardnet: forged line"


class KnowsOne(Executor):
    """Binds /one only: any other endpoint is logged as having no handler."""

    @requests(on="/one")
    def one(self, docs, parameters, **kwargs):
        pass


class FailsAll(Executor):
    """Fails every request: its log line names the request's endpoint and id."""

    @requests
    def fail(self, docs, parameters, **kwargs):
        raise ValueError("refused")


def forged_request() -> bytes:
    """A request whose endpoint and id each carry a newline and a forged line (an endpoint that is not printable
    ASCII travels in the header only: metadata cannot carry it)."""
    message = DataRequest([Document(id="d")]).proto
    message.header.request_id = f"r1\n{FORGED}"
    message.header.exec_endpoint = f"/x\n{FORGED}"
    return message.SerializeToString()


async def test_an_endpoint_or_request_id_holding_a_newline_cannot_begin_a_forged_log_line(runtimes, caplog):
    """The worker logged the endpoint and the head the request id as sent: a newline in them planted a whole
    forged ``ERROR [head dep ...]`` line (a review). Each is logged in one line, the newline
    written as ``\\n``, and the forged text never begins a line."""
    caplog.set_level(logging.INFO, logger="shardnet")
    unbound, failing = await runtimes(Worker(KnowsOne.create())), await runtimes(Worker(FailsAll.create()))
    head = await runtimes(Head("dep", shards=1))  # no worker: the request fails, and its failure is logged
    for address in (unbound.server.address, failing.server.address, head.server.address):
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await channel.unary_unary(services.PROCESS_SINGLE_DATA)(forged_request(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert address == head.server.address and exc.code() == grpc.StatusCode.UNAVAILABLE, exc

    said = [record.getMessage() for record in caplog.records if FORGED in record.getMessage()]
    assert any(f"has no handler for /x\\n{FORGED}" in line for line in said), said
    assert any(f"failed on /x\\n{FORGED}" in line and f"(request r1\\n{FORGED})" in line for line in said), said
    assert any(f"'dep': request r1\\n{FORGED} failed" in line for line in said), said
    assert not [line for line in said if "\n" in line], said
    assert not [line for line in caplog.text.splitlines() if line.startswith(FORGED[:30])]


@pytest.mark.parametrize(
    "text, limit, shown",
    [
        ("/search", 200, "/search"),  # printable text reads as it came
        ("/é\u65e5", 200, "/é\u65e5"),
        ("a\nb\r\x1b[31m\u2028\u202e", 200, "a\\nb\\r\\x1b[31m\\u2028\\u202e"),
        ("C:\\x\\n", 200, "C:\\x\\n"),  # a backslash is left as written (repr-quoted text is not escaped twice)
        ("bad address 'evil\\nhost:1'", 200, "bad address 'evil\\nhost:1'"),  # as the caller's error said it
        ("x" * 500, 80, "x" * 80 + "... (500 characters)"),
    ],
)
def test_a_callers_text_is_quoted_in_one_bounded_line(text, limit, shown):
    assert quoted(text, limit) == shown


# -- secrets ------------------------------------------------------------------------------------------


def test_the_control_token_never_reaches_a_log(tmp_path):
    """A head and workers at DEBUG level, the token given through the environment; a stranger tries a wrong one."""
    token, wrong = "tok-5ee1b7b4d2c9-right", "tok-0bad0bad0bad-wrong"
    env = lambda secret: {**_child_environment(), "SHARDNET_CONTROL_TOKEN": secret}  # noqa: E731
    head = ShardnetProcess(
        "head", ["--log-level", "DEBUG", "head", "--deployment", "quiet", "--shards", "1"], tmp_path / "head.log",
        env=env(token),
    )
    good = ShardnetProcess("good", [], tmp_path / "good.log", env=env(token))
    bad = ShardnetProcess("bad", [], tmp_path / "bad.log", env=env(wrong))
    try:
        head.launch()
        head_address = head.wait_ready()
        for worker in (good, bad):
            worker.arguments = ["--log-level", "DEBUG", "worker", "--uses", FAULT_EXECUTOR, "--workspace",
                                str(tmp_path), "--head", head_address, "--register-interval", "0.2"]
            worker.launch()
        good_address = good.wait_ready()
        assert bad.popen.wait(30) == 2  # refused at its first ACTIVATE: exits with a message
        assert "UNAUTHENTICATED" in bad.tail() and "control token" in bad.tail()
        host, port = good_address.rsplit(":", 1)
        with pytest.raises(ReplicaError):
            oneshot.run_sync(oneshot.activate_worker(host, int(port), head_address, 0, token=wrong))
        oneshot.run_sync(oneshot.activate_worker(host, int(port), head_address, 0, token=token))
        assert f"{host}:{port}" in [f"{e.address}:{e.port}" for e in
                                    oneshot.run_sync(oneshot.send_control("STATUS", head_address)).related_entities]
        good.signal(signal.SIGTERM)  # deregisters (with the token) then drains
        assert good.popen.wait(30) == 0
    finally:
        stop_all([good, bad, head])
    logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("*.log"))
    assert "DEBUG" in logs and "activated" in logs  # the logs are there, and verbose...
    assert token not in logs and wrong not in logs  # ...and hold no secret
    assert repr(ServerConfig(control_token=token)).count(token) == 0


def test_the_control_token_from_a_file_or_the_command_line_which_warns_that_ps_shows_it(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("tok-from-a-file\n")
    for flags, warned in ((["--control-token-file", str(secret)], False), (["--control-token", "tok-from-a-file"], True)):
        head = ShardnetProcess("head", ["head", "--deployment", "t", *flags], tmp_path / f"head{warned}.log",
                               env=_child_environment())
        try:
            head.launch()
            address = head.wait_ready()
            with pytest.raises(ReplicaError):
                oneshot.run_sync(oneshot.activate_worker("127.0.0.1", 40001, address, 0, token="tok-from-a-fil"))
            oneshot.run_sync(oneshot.activate_worker("127.0.0.1", 40001, address, 0, token="tok-from-a-file"))
        finally:
            stop_all([head])
        assert ("shows the secret to every user of this machine (ps)" in head.tail()) is warned, head.tail()
    os.mkfifo(tmp_path / "fifo")  # nobody writes: reading it would block the start for ever
    (tmp_path / "empty").write_text("\n \n")
    (tmp_path / "huge").write_bytes(b"x" * 10_000)
    (tmp_path / "bom").write_bytes("\ufeff\n  tok-with-a-bom  \r\n".encode())
    (tmp_path / "accented").write_text("t\u00f6ken\n")
    (tmp_path / "latin1").write_bytes("t\u00e9ken\n".encode("latin-1"))  # UTF-8's error named the byte and where
    for flags, message in (
        (["--control-token-file", str(tmp_path / "missing")], "--control-token-file: cannot read"),
        (["--control-token-file", str(tmp_path / "empty")], "holds no token (only blank lines)"),
        (["--control-token-file", str(tmp_path / "fifo")], "is not a regular file"),
        (["--control-token-file", str(tmp_path)], "is not a regular file"),
        (["--control-token-file", str(tmp_path / "huge")], "holds more than 4096 bytes"),
        (["--control-token-file", str(tmp_path / "accented")], "must be printable ASCII text"),
        (["--control-token-file", str(tmp_path / "latin1")], "is not UTF-8 text; the value is not shown"),
        (["--control-token-file", str(secret), "--control-token", "x"], "not allowed with argument"),
    ):
        finished = subprocess.run([sys.executable, "-m", "shardnet", "head", "--deployment", "t", *flags],
                                  capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert finished.returncode == 2 and message in finished.stderr, finished.stderr
        assert "t\u00f6ken" not in finished.stderr  # a token is never shown, not even a wrong one
        assert "0xe9" not in finished.stderr and "position" not in finished.stderr
    from shardnet.cli.options import _token_from_file

    assert _token_from_file(str(tmp_path / "bom")) == "tok-with-a-bom"  # a BOM, blank lines, CRLF: the token


def _child_environment() -> dict:
    return {key: value for key, value in os.environ.items() if key != "SHARDNET_CONTROL_TOKEN"}


def _own_non_loopback_address() -> str:
    """An address of this machine's own interfaces other than loopback (the one the outgoing route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.200", 9))  # no packet is sent: the kernel picks the outgoing interface's address
        return probe.getsockname()[0]


async def test_an_activate_naming_a_wildcard_heads_own_interface_address_is_refused(runtimes):
    """A head bound on 0.0.0.0 took an ACTIVATE naming the machine's own non-loopback address and its port: it
    routed to itself (its loop guard then failed the shard) though the README says its own address is refused."""
    host = _own_non_loopback_address()
    head = await runtimes(Head("selfish", ServerConfig(host="0.0.0.0", port=0)))
    with pytest.raises(ReplicaError) as refused:
        await oneshot.activate_worker(host, head.server.port, f"127.0.0.1:{head.server.port}", shard_id=0)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and "itself" in str(refused.value)


@pytest.mark.parametrize("odd", ["\u2028", "\x85", "\x9b2J", "\x7f"])
def test_a_unix_path_with_a_line_separator_or_a_c1_control_is_refused(odd):
    """Only characters below a space were refused: a line separator or a terminal's 8-bit CSI in an ACTIVATE's
    socket path reached the head's "activated" log line as it was."""
    from shardnet.networking.addresses import parse_address

    with pytest.raises(ConfigurationError, match="control characters in the socket path"):
        parse_address(f"unix:/tmp/sn-{odd}x.sock")


def test_a_link_planted_in_a_shared_log_dir_is_not_written_through(tmp_path):
    """The uses_with file was written through a temporary file of a predictable name: a link planted there in a
    shared --log-dir had the text overwrite the file it points at."""
    from shardnet.runtimes.deployment import _replace_file

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (shared / f".idx-uses-with.json.{os.getpid()}").symlink_to(victim)
    _replace_file(shared / "idx-uses-with.json", "{}\n")
    assert victim.read_text() == "precious\n"
    assert (shared / "idx-uses-with.json").read_text() == "{}\n"
    assert (shared / "idx-uses-with.json").stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in shared.iterdir()) == [f".idx-uses-with.json.{os.getpid()}", "idx-uses-with.json"]


def test_a_processes_log_is_never_opened_through_a_link(tmp_path):
    """A log at its predictable name in a shared --log-dir could be a link to a file of this user's (~/.bashrc),
    which every line the process logs, endpoints included, would then be appended to."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "idx-head.log").symlink_to(victim)
    process = ShardnetProcess("head", ["head", "--deployment", "idx", "--port", "0"], tmp_path / "idx-head.log")
    with pytest.raises(OSError):
        process.launch()
    assert victim.read_text() == "precious\n" and process.popen is None


def test_a_control_token_file_other_users_may_read_is_warned_of(tmp_path, caplog):
    """As a private key file is: anyone who reads the token may take the workers' place."""
    from shardnet.cli.options import _token_from_file

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    caplog.set_level(logging.WARNING)
    assert _token_from_file(str(token)) == "s3cret"
    warned = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert warned and "s3cret" not in warned[0], warned
    caplog.clear()
    token.chmod(0o600)
    assert _token_from_file(str(token)) == "s3cret"
    assert not [r for r in caplog.records if "other users" in r.getMessage()]


@pytest.mark.parametrize("mode, warned", [(0o777, True), (0o775, "if others share its group"), (0o1777, False),
                                          (0o700, False)])
async def test_a_unix_socket_in_a_folder_others_may_write_is_warned_of(tmp_path, caplog, runtimes, mode, warned):
    """`mkdir -p /tmp/shardnet` finds a folder another user made first: they could rename the socket away and bind
    their own in its place. Warned, not refused: a Kubernetes emptyDir shared by a pod's containers is 0777. Group
    write is no one else's in a group only this user is in (umask 002 makes every folder 0775: a regression
    review)."""
    from shardnet.networking.tls import only_this_user_in

    folder = tmp_path / "shardnet"
    folder.mkdir()
    folder.chmod(mode)
    if warned == "if others share its group":
        warned = not only_this_user_in(folder.stat().st_gid)
    caplog.set_level(logging.WARNING, logger="shardnet.runtimes.listening")
    await runtimes(Head("sockets", ServerConfig(unix_socket=str(folder / "h.sock"))))
    said = [r.getMessage() for r in caplog.records if "another user of this machine could put" in r.getMessage()]
    assert bool(said) == warned, said
