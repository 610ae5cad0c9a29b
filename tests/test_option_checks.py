"""Inconsistent TLS material and out-of-range limits are refused where they are configured, naming the cause.

Certificates come from ``trustme`` and are written to real files; the command line runs as a real
``python -m shardnet`` process (killed by ``subprocess.run`` if it overstays its timeout).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from test_cli import shardnet

from shardnet import ClientTls, ConfigurationError, ServerTls
from shardnet.cli.options import MAX_MESSAGE_MB, drain_seconds, message_megabytes


@dataclass(frozen=True)
class Pem:
    """PEM files made for one test module: a CA, a server certificate and key, and a key of another certificate."""

    ca: Path
    cert: Path
    key: Path
    other_key: Path
    intermediate_chain: Path  # leaf + intermediate CA, signed through a child CA
    intermediate_key: Path


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Pem:
    folder = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("someone-else.test")
    child = ca.create_child_ca().issue_cert("localhost")
    files = {
        "ca": ca.cert_pem.bytes(),
        "cert": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "key": server.private_key_pem.bytes(),
        "other_key": other.private_key_pem.bytes(),
        "intermediate_chain": b"".join(blob.bytes() for blob in child.cert_chain_pems),
        "intermediate_key": child.private_key_pem.bytes(),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return Pem(**{name: folder / f"{name}.pem" for name in files})


# -- ServerTls / ClientTls: the Python API --------------------------------------------------------------


def test_valid_material_is_accepted_as_paths_and_bytes(pem):
    for tls in (
        ServerTls(str(pem.cert), str(pem.key), client_ca=str(pem.ca)),
        ServerTls(pem.cert.read_bytes(), pem.key.read_bytes(), client_ca=pem.ca.read_bytes()),
        ServerTls(pem.intermediate_chain, pem.intermediate_key),  # a chain through an intermediate CA
    ):
        assert isinstance(tls.credentials(), grpc.ServerCredentials)
    client = ClientTls(root_certificates=str(pem.ca), certificate_chain=pem.cert.read_text(), private_key=str(pem.key))
    assert isinstance(client.credentials(), grpc.ChannelCredentials)


@pytest.mark.parametrize("missing", ["certificate_chain", "private_key"])
def test_server_tls_refuses_half_a_key_pair(pem, missing):
    given = {"certificate_chain": str(pem.cert), "private_key": str(pem.key), missing: None}
    with pytest.raises(ConfigurationError, match=f"no server {missing.replace('_', ' ')} given"):
        ServerTls(**given)


def test_server_tls_refuses_a_client_ca_without_its_own_certificate(pem):
    with pytest.raises(ConfigurationError, match=r"client certificates \(client_ca\) needs the server's own") as caught:
        ServerTls(None, None, client_ca=str(pem.ca))
    assert "no server certificate chain and no private key given" in str(caught.value)


def test_a_key_of_another_certificate_is_refused_naming_both_files(pem):
    with pytest.raises(ConfigurationError) as caught:
        ServerTls(str(pem.cert), str(pem.other_key))
    assert (
        str(caught.value)
        == f"server private key {str(pem.other_key)!r} does not match server certificate chain {str(pem.cert)!r}"
    )


def test_a_mismatched_pair_in_memory_is_refused_and_its_copy_removed(pem, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the private copy for ssl goes
    with pytest.raises(ConfigurationError, match=r"private key \(given in memory\) does not match"):
        ServerTls(pem.cert.read_bytes(), pem.other_key.read_bytes())
    ServerTls(pem.cert.read_bytes(), pem.key.read_bytes())
    assert list(scratch.iterdir()) == [], "a copy of a private key was left behind"


def test_a_certificate_given_as_the_key_is_refused(pem):
    with pytest.raises(ConfigurationError, match="is not a PEM private key") as caught:
        ServerTls(str(pem.cert), str(pem.cert))
    assert f"server private key {str(pem.cert)!r}" in str(caught.value)


def test_a_key_given_as_the_certificate_is_refused(pem):
    with pytest.raises(ConfigurationError) as caught:
        ServerTls(str(pem.key), str(pem.key))
    assert str(caught.value).startswith(f"no PEM certificate in server certificate chain {str(pem.key)!r}")


def test_a_corrupt_certificate_is_refused(pem, tmp_path):
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text(pem.cert.read_text().replace("MII", "M!I"))
    with pytest.raises(
        ConfigurationError, match=re.escape(f"no readable PEM certificate in server certificate chain '{corrupt}'")
    ):
        ServerTls(str(corrupt), str(pem.key))


@pytest.mark.parametrize("layout", ["PKCS8", "TraditionalOpenSSL"])
def test_an_encrypted_key_is_refused_without_prompting(pem, tmp_path, layout):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            getattr(serialization.PrivateFormat, layout),
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ConfigurationError, match=re.escape(f"server private key '{encrypted}' is encrypted")):
        ServerTls(str(pem.cert), str(encrypted))


def test_missing_and_unreadable_files_are_named(pem, tmp_path):
    with pytest.raises(
        ConfigurationError, match=re.escape(f"cannot read server private key from '{tmp_path}/nope.pem': No such")
    ):
        ServerTls(str(pem.cert), str(tmp_path / "nope.pem"))
    with pytest.raises(
        ConfigurationError, match=re.escape(f"cannot read server certificate chain from '{tmp_path}': Is a dir")
    ):
        ServerTls(str(tmp_path), str(pem.key))
    with pytest.raises(ConfigurationError, match=re.escape(f"cannot read client CA from '{tmp_path}/ca.pem'")):
        ServerTls(str(pem.cert), str(pem.key), client_ca=str(tmp_path / "ca.pem"))


def test_a_client_ca_that_is_a_key_is_refused(pem):
    with pytest.raises(ConfigurationError, match=re.escape(f"no PEM certificate in client CA '{pem.key}'")):
        ServerTls(str(pem.cert), str(pem.key), client_ca=str(pem.key))


def test_client_tls_refuses_a_mismatched_pair_and_a_key_as_root(pem):
    with pytest.raises(ConfigurationError) as caught:
        ClientTls(root_certificates=str(pem.ca), certificate_chain=str(pem.cert), private_key=str(pem.other_key))
    assert (
        str(caught.value)
        == f"client private key {str(pem.other_key)!r} does not match client certificate chain {str(pem.cert)!r}"
    )
    with pytest.raises(ConfigurationError, match=re.escape(f"no PEM certificate in root certificates '{pem.key}'")):
        ClientTls(root_certificates=str(pem.key))
    with pytest.raises(ConfigurationError, match="no client private key given"):
        ClientTls(certificate_chain=str(pem.cert))


# -- --max-message-mb ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("nan", "finite"),
        ("inf", "finite"),
        ("5000", f"at most {MAX_MESSAGE_MB} MB"),
        ("2048", f"at most {MAX_MESSAGE_MB} MB"),
        ("0", "must be positive"),
        ("-3", "must be positive"),
        ("1e-9", "must be positive"),
        ("lots", "expected a number of megabytes"),
    ],
)
def test_message_megabytes_refuses_what_grpc_cannot_take(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        message_megabytes(text)


def test_message_megabytes_accepts_the_whole_int32_range():
    assert MAX_MESSAGE_MB == 2047
    assert message_megabytes("2047") == 2047.0 and int(2047.0 * 2**20) < 2**31
    assert message_megabytes("0.5") == 0.5 and message_megabytes("256") == 256.0


@pytest.mark.parametrize(
    "text, message",
    [("nan", "finite"), ("inf", "finite"), ("-1", r"must be 0 to 1e\+09 seconds"), ("soon", "expected a number of seconds")],
)
def test_drain_seconds_refuses_what_would_crash_the_drain(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        drain_seconds(text)


def test_drain_seconds_accepts_zero_and_fractions():
    assert drain_seconds("0") == 0.0 and drain_seconds("2.5") == 2.5


# -- the command line ---------------------------------------------------------------------------------------------

BAD_TLS_COMMAND_LINES = {
    "head-cert-without-key": (["head", "--deployment", "t", "--tls-cert", "{cert}"], "--tls-cert needs --tls-key"),
    "worker-key-without-cert": (["worker", "--uses", "m:C", "--tls-key", "{key}"], "--tls-key needs --tls-cert"),
    "client-ca-alone": (
        ["head", "--deployment", "t", "--tls-client-ca", "{ca}"],
        "--tls-client-ca needs --tls-cert and --tls-key",
    ),
    "mismatched-key": (
        ["head", "--deployment", "t", "--tls-cert", "{cert}", "--tls-key", "{other_key}"],
        "server private key '{other_key}' does not match server certificate chain '{cert}'",
    ),
    "certificate-as-key": (
        ["worker", "--uses", "m:C", "--tls-cert", "{cert}", "--tls-key", "{cert}"],
        "server private key '{cert}' is not a PEM private key",
    ),
    "missing-key-file": (
        ["head", "--deployment", "t", "--tls-cert", "{cert}", "--tls-key", "{cert}.missing"],
        "cannot read server private key from '{cert}.missing'",
    ),
    "head-client-cert-without-key": (
        ["head", "--deployment", "t", "--client-cert", "{cert}"],
        "--client-cert needs --client-key",
    ),
    "worker-head-client-key-without-cert": (
        ["worker", "--uses", "m:C", "--head-client-key", "{key}"],
        "--head-client-key needs --head-client-cert",
    ),
    "send-mismatched-client-pair": (
        ["send", "127.0.0.1:1", "--endpoint", "/x", "--client-cert", "{cert}", "--client-key", "{other_key}"],
        "client private key '{other_key}' does not match client certificate chain '{cert}'",
    ),
    "max-message-nan": (["head", "--deployment", "t", "--max-message-mb", "nan"], "argument --max-message-mb: "),
    "max-message-too-big": (
        ["worker", "--uses", "m:C", "--max-message-mb", "5000"],
        "argument --max-message-mb: max message size must be at most 2047 MB",
    ),
    "drain-nan": (
        ["head", "--deployment", "t", "--drain-seconds", "nan"],
        "argument --drain-seconds: drain grace must be a finite number of seconds",
    ),
    "drain-seconds-past-any-duration": (  # head took it, deploy refused it in the Python API's words
        ["head", "--deployment", "t", "--drain-seconds", "2e9"],
        "argument --drain-seconds: drain grace must be 0 to 1e+09 seconds, got '2e9'",
    ),
}


@pytest.mark.parametrize("arguments, message", BAD_TLS_COMMAND_LINES.values(), ids=BAD_TLS_COMMAND_LINES.keys())
def test_bad_tls_and_limit_flags_exit_2_with_a_clear_message(pem, tmp_path, arguments, message):
    files = {name: str(getattr(pem, name)) for name in ("ca", "cert", "key", "other_key")}
    result = shardnet("--log-level", "ERROR", *[argument.format(**files) for argument in arguments], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message.format(**files) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "cannot listen" not in result.stderr, result.stderr
    assert "ready on" not in result.stdout


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--register-interval", "3"], "--register-interval says how often to renew a registration: give --head"),
        (["--advertise-host", "10.9.9.9"], "--advertise-host says what a head dials for this worker, which only its "
                                           "registration tells: give --head as well"),
        (["--head-root-ca", "{ca}"], "--head-root-ca says how to dial the head over TLS, to register with it: give "
                                     "--head as well"),
        (["--head-root-ca", "{ca}", "--head-client-cert", "{cert}", "--head-client-key", "{key}",
          "--head-server-name", "svc.example"],
         "--head-root-ca, --head-client-cert, --head-client-key, --head-server-name say how to dial the head over TLS"),
    ],
    ids=["register-interval", "advertise-host", "head-root-ca", "every-head-tls-flag"],
)
def test_a_worker_refuses_flags_about_its_head_without_a_head_naming_them(pem, flags, said):
    """Only --register-interval was refused without --head; --advertise-host and the --head-* TLS flags were taken
    and silently ignored, the worker serving as if they applied (a knobs review's find). Refused before the
    Executor loads: m:C is no module."""
    from shardnet.cli import worker
    from shardnet.cli.main import build_parser

    files = {name: str(getattr(pem, name)) for name in ("ca", "cert", "key")}
    args = build_parser().parse_args(["worker", "--uses", "m:C", *[flag.format(**files) for flag in flags]])
    with pytest.raises(ConfigurationError) as refused:
        worker.run(args)
    assert said in str(refused.value)


@pytest.mark.parametrize("token", ["t\u00f6k\u00e9n", "tok-9f8e7d\n", " tok-9f8e7d"])
@pytest.mark.parametrize("command", [["head", "--deployment", "t"], ["worker", "--uses", "m:C"]])
def test_a_control_token_grpc_cannot_carry_is_refused_at_start_without_showing_it(tmp_path, command, token):
    result = shardnet(*command, "--port", "0", "--control-token", token, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "the control token must be non-empty printable ASCII text" in result.stderr
    assert token.strip() not in result.stderr and "Traceback" not in result.stderr and "ready on" not in result.stdout


@pytest.mark.parametrize("where", ["flag", "variable"])
def test_an_empty_control_token_is_refused_not_taken_for_none(tmp_path, where):
    """``--control-token "$TOKEN"`` with TOKEN unset, or an empty SHARDNET_CONTROL_TOKEN, started a head that let
    anyone ACTIVATE and DEACTIVATE its workers (a bad-input review's find)."""
    import os

    env = {**os.environ, "SHARDNET_CONTROL_TOKEN": ""} if where == "variable" else None
    extra = ["--control-token", ""] if where == "flag" else []
    result = shardnet("head", "--deployment", "t", "--port", "0", *extra, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    named = "--control-token" if where == "flag" else "$SHARDNET_CONTROL_TOKEN"
    assert f"{named} is empty: give the token, or leave {named} out to run without one" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "ready on" not in result.stdout


def test_metadata_errors_never_quote_an_authorization_value():
    from shardnet.errors import ProtocolError
    from shardnet.networking.channels import checked_metadata

    with pytest.raises(ProtocolError) as caught:
        checked_metadata([("authorization", "Bearer t\u00f6k\u00e9n")])
    assert "(not shown: a credential)" in str(caught.value) and "t\u00f6k" not in str(caught.value)

