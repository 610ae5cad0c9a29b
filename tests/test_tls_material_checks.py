"""TLS material checks from a review: relative paths kept across a working-directory change, a renewed key open
to others warned of, expired intermediates, chains out of order, key usages and curves gRPC cannot handshake with."""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shardnet import ClientTls, ServerTls
from shardnet.errors import ConfigurationError


@pytest.fixture
def material(tmp_path: Path, monkeypatch) -> trustme.CA:
    ca = trustme.CA()
    leaf = ca.issue_cert("server.example")
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (tmp_path / "tls" / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "tls" / "tls.key").chmod(0o600)
    (tmp_path / "tls" / "ca.crt").write_bytes(ca.cert_pem.bytes())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    return ca


def test_a_server_given_relative_paths_binds_and_renews_after_the_working_directory_changed(material, tmp_path):
    tls = ServerTls(certificate_chain="tls/tls.crt", private_key="tls/tls.key", client_ca="tls/ca.crt")
    os.chdir(tmp_path / "elsewhere")  # as an Executor's __init__ may, before the server binds
    tls.checked_material()  # what the bind and every renewal read
    tls.credentials()
    assert os.path.isabs(tls.certificate_chain) and "tls.crt" in repr(tls)


def test_a_client_given_relative_paths_dials_after_the_working_directory_changed(material, tmp_path):
    tls = ClientTls(root_certificates="tls/ca.crt", certificate_chain="tls/tls.crt", private_key="tls/tls.key")
    os.chdir(tmp_path / "elsewhere")
    tls.credentials()  # what an unstarted pool, and a worker's ACTIVATE, read at each new channel
    assert tls.in_memory().root_certificates == material.cert_pem.bytes()


def test_a_server_key_renewed_into_a_file_others_may_read_is_warned_of(material, tmp_path, caplog):
    from shardnet.networking.tls import FollowedServerMaterial

    follower = FollowedServerMaterial(ServerTls(certificate_chain="tls/tls.crt", private_key="tls/tls.key"))
    leaf = material.issue_cert("renewed.example")
    (tmp_path / "tls" / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (tmp_path / "tls" / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "tls" / "tls.key").chmod(0o644)
    assert follower() is not None
    assert "is open to other users of this machine (mode 0644)" in caplog.text


def _chain_under_an_expired_intermediate(ca: trustme.CA) -> tuple[bytes, bytes]:
    """A leaf valid now, issued by an intermediate of ``ca`` that has expired, as one PEM chain and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    middle_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def issue(subject, issuer, public, signer, begins, ends, authority):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(begins).not_valid_after(ends)
                   .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True))
        if not authority:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("server.example")]), False)
        return builder.sign(signer, hashes.SHA256())

    day = datetime.timedelta(days=1)
    middle = issue("lapsed intermediate", root.subject, middle_key.public_key(), root_key, now - 30 * day, now - day, True)
    leaf = issue("server.example", middle.subject, leaf_key.public_key(), middle_key, now - day, now + 10 * day, False)
    pem = serialization.Encoding.PEM
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf.public_bytes(pem) + middle.public_bytes(pem), key


def test_a_chain_whose_intermediate_expired_is_refused_at_start_and_at_a_renewal(material, tmp_path):
    from shardnet import ConfigurationError
    from shardnet.networking.tls import FollowedServerMaterial

    chain, key = _chain_under_an_expired_intermediate(material)
    with pytest.raises(ConfigurationError, match="expired"):  # every handshake would fail on it
        ServerTls(certificate_chain=chain, private_key=key)
    follower = FollowedServerMaterial(ServerTls(certificate_chain="tls/tls.crt", private_key="tls/tls.key"))
    (tmp_path / "tls" / "tls.crt").write_bytes(chain)
    (tmp_path / "tls" / "tls.key").write_bytes(key)
    assert follower() is None  # the renewal is not served: the last good material stays


def test_a_chain_out_of_order_is_said_to_be_so_not_to_have_the_wrong_key(material):
    from shardnet import ConfigurationError

    leaf = material.create_child_ca().issue_cert("server.example")
    [first, *issuers] = [blob.bytes() for blob in leaf.cert_chain_pems]
    with pytest.raises(ConfigurationError, match="it is the key of certificate 2 of the chain"):
        ServerTls(certificate_chain=b"".join(issuers) + first, private_key=leaf.private_key_pem.bytes())


def test_a_certificate_whose_usages_leave_out_its_role_is_refused_naming_it(material):
    from shardnet import ConfigurationError

    server_only = material.issue_cert("server.example")  # trustme: server and client auth; make one of each
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    root_key = serialization.load_pem_private_key(material.private_key_pem.bytes(), None)
    leaf = x509.load_pem_x509_certificate(server_only.cert_chain_pems[0].bytes())
    key = server_only.private_key_pem.bytes()

    def with_usage(usage):
        builder = x509.CertificateBuilder(
            issuer_name=leaf.issuer, subject_name=leaf.subject, public_key=leaf.public_key(),
            serial_number=x509.random_serial_number(), not_valid_before=leaf.not_valid_before_utc,
            not_valid_after=leaf.not_valid_after_utc,
        ).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(root_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    with pytest.raises(ConfigurationError, match="does not allow server auth"):
        ServerTls(certificate_chain=with_usage(ExtendedKeyUsageOID.CLIENT_AUTH), private_key=key)
    with pytest.raises(ConfigurationError, match="does not allow client auth"):
        ClientTls(certificate_chain=with_usage(ExtendedKeyUsageOID.SERVER_AUTH), private_key=key)
    ServerTls(certificate_chain=with_usage(ExtendedKeyUsageOID.SERVER_AUTH), private_key=key)  # its role: taken


@pytest.mark.parametrize("curve, taken", [("SECP256R1", True), ("SECP384R1", True), ("SECP521R1", False), ("SECP256K1", False)])
def test_an_ecdsa_key_on_a_curve_grpc_cannot_handshake_with_is_refused(material, curve, taken):
    """gRPC's TLS handshakes ECDSA on P-256 and P-384 only: a P-521 server was 'ready' and closed every gRPC
    handshake, a secp256k1 one failed its bind as 'port in use'."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from shardnet import ConfigurationError

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = serialization.load_pem_private_key(material.private_key_pem.bytes(), None)
    root = x509.load_pem_x509_certificate(material.cert_pem.bytes())
    key = ec.generate_private_key(getattr(ec, curve)())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s")]))
            .issuer_name(root.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(root_key, hashes.SHA256()))
    chain = leaf.public_bytes(serialization.Encoding.PEM)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if taken:
        ServerTls(certificate_chain=chain, private_key=pem)
    else:
        with pytest.raises(ConfigurationError, match="gRPC's TLS cannot handshake with"):
            ServerTls(certificate_chain=chain, private_key=pem)


def test_the_pair_checked_is_the_bytes_read_not_the_files_as_they_are_by_then(material, tmp_path):
    """A renewal written between the read and the check (a new certificate read, the old key read, then the new
    key renamed in): the check passed on the files and gRPC was handed a pair that does not match."""
    from shardnet import ConfigurationError
    from shardnet.networking.tls import check_key_pair

    renewed = material.issue_cert("server.example")
    chain, key = tmp_path / "tls" / "tls.crt", tmp_path / "tls" / "tls.key"
    old_key = key.read_bytes()
    chain.write_bytes(b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
    key.write_bytes(renewed.private_key_pem.bytes())  # on disk: a pair; as read: new certificate, old key
    with pytest.raises(ConfigurationError, match="does not match"):
        check_key_pair(str(chain), chain.read_bytes(), str(key), old_key, "server")


# -- a regression review of those checks: material gRPC serves that they refused, or the reverse ---------------

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _cert(subject, issuer, public, signer, begins=NOW - DAY, ends=NOW + 30 * DAY, ca=False, eku=None):
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer)).public_key(public)
               .serial_number(x509.random_serial_number()).not_valid_before(begins).not_valid_after(ends)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_a_chain_carrying_an_expired_cross_signature_of_its_root_is_served_with_a_warning(caplog):
    """Let's Encrypt's long chain: ISRG Root X1 cross-signed by DST Root CA X3, expired. gRPC clients that trust
    ISRG Root X1 take it (a handshake checked in repro/cross_signed.py); it was refused, the server not starting."""
    old, new, middle, leaf = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    cross = _cert("New Root", "Old Root", new.public_key(), old, begins=NOW - 400 * DAY, ends=NOW - DAY, ca=True)
    chain = (_cert("leaf", "Int", leaf.public_key(), middle) + _cert("Int", "New Root", middle.public_key(), new, ca=True)
             + cross)
    ServerTls(certificate_chain=chain, private_key=_key_pem(leaf))
    assert "CN=New Root, issued by CN=Old Root" in caplog.text


def test_an_expired_intermediate_under_the_top_is_still_refused():
    old, new, middle, leaf = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    chain = (_cert("leaf", "Int", leaf.public_key(), middle)
             + _cert("Int", "New Root", middle.public_key(), new, begins=NOW - 9 * DAY, ends=NOW - DAY, ca=True)
             + _cert("New Root", "Old Root", new.public_key(), old, ca=True))
    with pytest.raises(ConfigurationError, match=r"issuing certificate it carries \(CN=Int\) expired"):
        ServerTls(certificate_chain=chain, private_key=_key_pem(leaf))


def test_a_server_certificate_whose_only_usage_is_any_is_refused():
    """gRPC's TLS (BoringSSL) does not take anyExtendedKeyUsage for a server's role: every handshake failed."""
    authority, leaf = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    chain = _cert("leaf", "CA", leaf.public_key(), authority, eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    with pytest.raises(ConfigurationError, match="does not allow server auth"):
        ServerTls(certificate_chain=chain, private_key=_key_pem(leaf))


def test_a_chain_out_of_order_is_named_when_leaf_and_issuer_keys_differ_in_type():
    """An ECDSA leaf under an RSA intermediate (Let's Encrypt's E-series under ISRG Root X1 is so, a cross-type
    chain common): sent issuer first, the key was said not to load (NO_CERTIFICATE_ASSIGNED), not out of order."""
    authority = rsa.generate_private_key(65537, 2048)
    leaf = ec.generate_private_key(ec.SECP256R1())
    chain = _cert("CA", "CA", authority.public_key(), authority, ca=True) + _cert("leaf", "CA", leaf.public_key(), authority)
    with pytest.raises(ConfigurationError, match="it is the key of certificate 2 of the chain"):
        ServerTls(certificate_chain=chain, private_key=_key_pem(leaf))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux only")
def test_a_server_with_material_in_files_starts_without_a_writable_temporary_folder(tmp_path, monkeypatch):
    """A pod with a read-only root filesystem: the key pair check wrote the material to a temporary folder,
    and ServerTls raised FileNotFoundError (before 24da9bf, material in files needed none)."""
    leaf = trustme.CA().issue_cert("localhost")
    (tmp_path / "tls.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (tmp_path / "tls.key").write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "tls.key").chmod(0o600)
    monkeypatch.setattr(tempfile, "tempdir", "/proc/self")  # no folder can be made there, root included
    ServerTls(certificate_chain=str(tmp_path / "tls.crt"), private_key=str(tmp_path / "tls.key"))


def test_an_rsa_pss_key_gRPC_cannot_load_is_refused():
    """`openssl req -x509` with an RSA-PSS key: ServerTls took it, and the bind failed as if the port were taken."""
    import subprocess

    folder = tempfile.mkdtemp(prefix="regress7-pss-")
    try:
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048", "-out",
                        f"{folder}/k.pem"], check=True, capture_output=True)
        subprocess.run(["openssl", "req", "-x509", "-key", f"{folder}/k.pem", "-out", f"{folder}/c.pem", "-days", "3",
                        "-subj", "/CN=localhost"], check=True, capture_output=True)
        os.chmod(f"{folder}/k.pem", 0o600)
        with pytest.raises(ConfigurationError, match="RSA-PSS"):
            ServerTls(certificate_chain=f"{folder}/c.pem", private_key=f"{folder}/k.pem")
    finally:
        for name in ("k.pem", "c.pem"):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux only")
@pytest.mark.parametrize("refusal", [38, 1])  # ENOSYS (an old kernel, a sandbox), EPERM (a seccomp profile)
def test_material_in_memory_is_checked_where_memfd_create_is_refused(monkeypatch, refusal):
    """memfd_create refused: ServerTls raised the OSError (a raw 'Function not implemented') where a temporary
    folder served before 19a4d19; it falls back to one."""
    leaf = trustme.CA().issue_cert("localhost")

    def refused(*args):
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "memfd_create", refused)
    ServerTls(certificate_chain=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
              private_key=leaf.private_key_pem.bytes())
