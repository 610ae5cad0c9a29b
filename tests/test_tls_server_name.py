"""``ClientTls(server_name=...)``: a server whose certificate names only a DNS name, dialled by its IP (as a head
dials its workers by pod IP on Kubernetes), is verified against that name; bad names are refused up front."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from shardnet import ClientTls, ConfigurationError, DataRequest, ReplicaError, ServerTls
from shardnet.cli.main import build_parser
from shardnet.cli.options import client_tls
from shardnet.networking import oneshot
from shardnet.networking.channels import create_async_channel_stub, get_grpc_channel
from shardnet.networking.tls import load_pem
from shardnet.protocol import services

NAME = "shardnet-worker.internal"  # the certificate's only SAN: no IP, no localhost


@dataclass(frozen=True)
class Material:
    ca_pem: bytes
    ca_file: Path
    server: ServerTls
    server_mutual: ServerTls  # asks for a client certificate the CA signed
    client_chain: bytes
    client_key: bytes


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Material:
    ca = trustme.CA()
    server_cert = ca.issue_cert(NAME)
    client_cert = ca.issue_cert("client.example")
    ca_pem = ca.cert_pem.bytes()
    ca_file = tmp_path_factory.mktemp("server-name") / "ca.pem"
    ca_file.write_bytes(ca_pem)
    chain = b"".join(blob.bytes() for blob in server_cert.cert_chain_pems)
    key = server_cert.private_key_pem.bytes()
    return Material(
        ca_pem=ca_pem,
        ca_file=ca_file,
        server=ServerTls(certificate_chain=chain, private_key=key),
        server_mutual=ServerTls(certificate_chain=chain, private_key=key, client_ca=ca_pem),
        client_chain=b"".join(blob.bytes() for blob in client_cert.cert_chain_pems),
        client_key=client_cert.private_key_pem.bytes(),
    )


# -- real servers on loopback, dialled by IP -----------------------------------------------------------------


async def test_a_pool_dialling_by_ip_needs_the_server_name(pool_factory, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    assert server.address.startswith("127.0.0.1:")
    without = pool_factory(tls=ClientTls(root_certificates=tls.ca_pem))
    without.add_connection("dep", server.address)
    with pytest.raises(ReplicaError) as refused:  # the certificate does not name 127.0.0.1
        await without.send_request(DataRequest(), "dep", timeout=5.0)[0]
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and server.calls == 0
    assert "hostname verification" in str(refused.value).lower(), refused.value

    named = pool_factory(tls=ClientTls(root_certificates=tls.ca_pem, server_name=NAME))
    named.add_connection("dep", server.address)
    response, _ = await named.send_request(DataRequest(endpoint="/named"), "dep", timeout=5.0)[0]
    assert response.endpoint == "/named" and server.calls == 1


async def test_mutual_tls_with_a_server_name(pool_factory, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server_mutual.credentials())
    client = ClientTls(
        root_certificates=tls.ca_pem, certificate_chain=tls.client_chain, private_key=tls.client_key, server_name=NAME
    )
    pool = pool_factory(tls=client)
    pool.add_connection("dep", f"https://{server.address}")
    response, _ = await pool.send_request(DataRequest(endpoint="/m"), "dep", timeout=5.0)[0]
    assert response.endpoint == "/m"


async def test_a_wrong_server_name_fails(pool_factory, echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    pool = pool_factory(tls=ClientTls(root_certificates=tls.ca_pem, server_name="other-worker.internal"))
    pool.add_connection("dep", server.address)
    with pytest.raises(ReplicaError) as refused:
        await pool.send_request(DataRequest(), "dep", timeout=5.0)[0]
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and server.calls == 0
    assert "hostname verification" in str(refused.value).lower(), refused.value


async def test_the_one_off_helper_takes_the_server_name(echo_servers, tls):
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    request = DataRequest(endpoint="/once")
    response = await oneshot.send_request_async(
        request, server.address, timeout=5.0, tls=ClientTls(root_certificates=tls.ca_pem, server_name=NAME)
    )
    assert response.request_id == request.request_id
    wrong = ClientTls(root_certificates=tls.ca_pem, server_name="wrong.internal")
    with pytest.raises(ReplicaError, match="Hostname Verification"):
        await oneshot.send_request_async(request, server.address, timeout=5.0, tls=wrong)


async def test_channel_builders_carry_the_server_name(echo_servers, threaded_echo, tls):
    named = ClientTls(root_certificates=tls.ca_pem, server_name=NAME)
    [server] = await echo_servers(1, credentials=tls.server.credentials())
    stubs, channel = create_async_channel_stub(server.address, tls=named)
    try:
        request = DataRequest()
        assert (await stubs.single_data(request, timeout=5.0)).request_id == request.request_id
    finally:
        await channel.close()

    blocking = threaded_echo.start(credentials=tls.server.credentials())
    channel = get_grpc_channel(blocking.address, tls=named)
    try:
        request = DataRequest()
        assert channel.unary_unary(services.PROCESS_SINGLE_DATA)(request.to_bytes(), timeout=5.0) == request.to_bytes()
    finally:
        channel.close()


def test_a_channel_option_contradicting_the_server_name_is_refused(tls):
    named = ClientTls(root_certificates=tls.ca_pem, server_name=NAME)
    with pytest.raises(ConfigurationError, match="contradicts ClientTls.server_name='shardnet-worker.internal'"):
        get_grpc_channel("127.0.0.1:1", options=[("grpc.ssl_target_name_override", "else.internal")], tls=named)
    get_grpc_channel("127.0.0.1:1", options={"grpc.ssl_target_name_override": NAME}, tls=named).close()  # agrees


# -- the value ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cause",
    [
        ("", "it is empty"),
        ("a b", "it holds a space"),
        ("host:443", "without a port"),
        ("https://x", "without a scheme"),
        ("x/y", "without a path"),
        ("-x.internal", "expected dot-separated labels"),
        ("a..b", "expected dot-separated labels"),
    ],
)
def test_a_bad_server_name_is_refused_naming_it(tls, name, cause):
    with pytest.raises(ConfigurationError, match="server_name") as refused:
        ClientTls(root_certificates=tls.ca_pem, server_name=name)
    assert repr(name) in str(refused.value) and cause in str(refused.value)


@pytest.mark.parametrize("address", ["10.1.2.3", "fd00::2"])
def test_an_ip_address_a_certificate_names_may_be_the_server_name(tls, address):
    """An IPv6 one was refused as a name "with a port" (found by a security review)."""
    assert ClientTls(root_certificates=tls.ca_pem, server_name=address).server_name == address


def test_a_private_key_given_as_text_that_is_not_pem_is_never_shown(tls):
    """Base64 of a Secret's tls.key, or a key without its PEM lines, was taken for a path and echoed whole."""
    import base64

    for given in (base64.b64encode(tls.client_key).decode(), b"".join(tls.client_key.splitlines()[1:-1]).decode()):
        with pytest.raises(ConfigurationError) as refused:
            ClientTls(root_certificates=tls.ca_pem, certificate_chain=tls.client_chain, private_key=given)
        assert given[:24] not in str(refused.value) and "not shown" in str(refused.value), str(refused.value)
    with pytest.raises(ConfigurationError, match="'missing-key.pem'"):  # a path is still named
        ClientTls(root_certificates=tls.ca_pem, certificate_chain=tls.client_chain, private_key="missing-key.pem")


def test_channel_options_and_repr(tls):
    assert ClientTls(root_certificates=tls.ca_pem).channel_options() == ()
    material = ClientTls(
        root_certificates=tls.ca_pem, certificate_chain=tls.client_chain, private_key=tls.client_key, server_name=NAME
    )
    assert material.channel_options() == (("grpc.ssl_target_name_override", NAME),)
    assert f"server_name={NAME!r}" in repr(material)
    assert load_pem(tls.client_key) not in repr(material).encode() and b"PRIVATE KEY" not in repr(material).encode()


# -- the command line (parsed only: no process is started) ---------------------------------------------------


@pytest.mark.parametrize(
    "arguments, prefix",
    [
        (["head", "--deployment", "t", "--root-ca", "{ca}", "--server-name", NAME], ""),
        (["worker", "--uses", "m:C", "--head-root-ca", "{ca}", "--head-server-name", NAME], "head-"),
        (["send", "127.0.0.1:1", "--endpoint", "/x", "--root-ca", "{ca}", "--server-name", NAME], ""),
        (["status", "127.0.0.1:1", "--root-ca", "{ca}", "--server-name", NAME], ""),
    ],
    ids=["head", "worker", "send", "status"],
)
def test_the_server_name_flag_reaches_client_tls(tls, arguments, prefix):
    args = build_parser().parse_args([argument.format(ca=tls.ca_file) for argument in arguments])
    material = client_tls(args, prefix=prefix)
    assert material is not None and material.server_name == NAME
    assert material.channel_options() == (("grpc.ssl_target_name_override", NAME),)


def test_without_the_flag_nothing_changes(tls):
    args = build_parser().parse_args(["head", "--deployment", "t", "--root-ca", str(tls.ca_file)])
    assert client_tls(args).server_name is None
    assert client_tls(build_parser().parse_args(["head", "--deployment", "t"])) is None


@pytest.mark.parametrize(
    "arguments, prefix, message",
    [
        (["head", "--deployment", "t", "--server-name", NAME], "", "--server-name needs --root-ca"),
        (
            ["worker", "--uses", "m:C", "--head-server-name", NAME, "--head-client-cert", "c",
             "--head-client-key", "k"],
            "head-",
            "--head-server-name needs --head-root-ca",
        ),
    ],
    ids=["head", "worker-with-client-cert"],
)
def test_a_server_name_without_a_root_ca_is_refused(arguments, prefix, message):
    args = build_parser().parse_args(arguments)
    with pytest.raises(ConfigurationError, match=message):
        client_tls(args, prefix=prefix)


def test_a_bad_server_name_flag_is_refused_naming_it(tls):
    args = build_parser().parse_args(
        ["head", "--deployment", "t", "--root-ca", str(tls.ca_file), "--server-name", "h:1"]
    )
    with pytest.raises(ConfigurationError, match="server_name 'h:1' is not a DNS name"):
        client_tls(args)
