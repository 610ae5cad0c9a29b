"""TLS material: load PEM from a path, text or bytes, check it, and build gRPC credentials from it.

``ServerTls`` and ``ClientTls`` refuse inconsistent material when they are built
(half a key pair, a key that does not belong to its certificate, a file holding
the wrong kind of PEM), naming the file and the cause: gRPC would only report it
later, as a failed bind or a failed handshake that says neither.
"""

from __future__ import annotations

import contextlib
import datetime
import grp
import ipaddress
import logging
import os
import pwd
import re
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional, Union

import grpc

from shardnet.errors import ConfigurationError

logger = logging.getLogger(__name__)

# the gRPC channel option that checks the server certificate against a name instead of the dialled address
SERVER_NAME_OPTION = "grpc.ssl_target_name_override"

PemSource = Union[str, bytes, os.PathLike, None]

# seconds a certificate may become valid after now and still be taken where it is configured (with a warning):
# the issuer's clock a little ahead must not stop a process whose material has nothing to fall back on
CLOCK_SKEW = 300.0
MAX_PEM_FILE_BYTES = 16 * 1024 * 1024  # a bundle of every public root is about 0.3 MB
MAX_SHOWN_KEY_PATH = 160  # characters of what was given as a private key's path that a message may show
_CERTIFICATE_LINE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY_LINE = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
# a DNS name as a certificate carries it: dot-separated labels of letters, digits and inner hyphens
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_DNS_LABEL}(?:\.{_DNS_LABEL})*\Z")


def _is_path(source: PemSource) -> bool:
    """Whether ``source`` names a file (rather than holding PEM text or bytes itself)."""
    if source is None or isinstance(source, bytes):
        return False
    return not (isinstance(source, str) and "-----BEGIN" in source)


def _describe(source: PemSource, what: str) -> str:
    """Name TLS material in a message: ``what`` and its file, or that it was given in memory."""
    return f"{what} {_path_shown(source, what)}" if _is_path(source) else f"{what} (given in memory)"


def _shown(source: PemSource, what: str) -> str:
    """TLS material as a repr may show it: a file by its path, PEM in memory by its size only."""
    if _is_path(source):
        return _path_shown(source, what)
    return f"<{len(source)} bytes of PEM>"


def _path_shown(source: PemSource, what: str) -> str:
    """A path as a message shows it. What was given as a private key is shown only when it is a file, or has a
    file's extension (base64 has no dot): else it may be a key given without its PEM lines (the base64 of a
    Secret's tls.key, say)."""
    path = os.fspath(source)
    looks_like_a_file = os.path.exists(path) or "." in os.path.basename(path)
    if "private key" in what and not (looks_like_a_file and len(path) <= MAX_SHOWN_KEY_PATH):
        return f"<{len(path)} characters, not shown: no file of that name, and a key given as text must be PEM>"
    return repr(path)


def _anchor_paths(material: object, names: Sequence[str]) -> None:
    """Make the files of a frozen ``ClientTls``/``ServerTls`` absolute, as the working directory is now: they are
    read again long after they are given (at the bind, at each renewal, at every channel an unstarted pool opens),
    and an Executor that changes the working directory (into its workspace, say) must not turn a relative path
    given on the command line into another file, or none. A path naming no file is left as given (its check
    refuses it, in the words it was given in)."""
    for name in names:
        source = getattr(material, name)
        if _is_path(source) and os.path.exists(os.fspath(source)):
            object.__setattr__(material, name, os.path.abspath(os.fspath(source)))


def warn_if_others_may_read(source: PemSource, what: str) -> None:
    """Log a warning for a private key (or control token) file other users of the machine may read or write (as ssh
    refuses one)."""
    if not _is_path(source):
        return
    try:
        status = os.stat(os.fspath(source))
    except OSError:
        return  # reading it says why
    mode = status.st_mode
    # group read is how Kubernetes mounts a Secret for a pod's fsGroup: fine in a group only this user is in
    group_may_read = status.st_gid == os.getgid() and only_this_user_in(status.st_gid) and not mode & 0o020
    if mode & (0o007 if group_may_read else 0o077):
        logger.warning(
            "%s is open to other users of this machine (mode %04o): chmod 600 it", _describe(source, what), mode & 0o777
        )


def only_this_user_in(gid: int) -> bool:
    """Whether no other user of this machine has ``gid`` as a group (a gid without a name, as a pod's fsGroup
    usually is, has no members)."""
    uid = os.getuid()
    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        members = set()
    accounts = pwd.getpwall()
    members -= {entry.pw_name for entry in accounts if entry.pw_uid == uid}
    return not members and all(entry.pw_uid == uid for entry in accounts if entry.pw_gid == gid)


def files_signature(sources: Sequence[PemSource]) -> tuple:
    """A stat of each file, no read: what tells a changed file apart. A Secret volume swaps a symlink (a new
    inode), an editor rewrites (mtime, size), a chmod or chown fixes access (ctime, mode, owner)."""
    signature = []
    for source in sources:
        try:
            status = os.stat(os.fspath(source))
        except OSError:
            signature.append(None)
        else:
            signature.append(
                (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size, status.st_mode,
                 status.st_uid, status.st_gid)
            )
    return tuple(signature)


def load_pem(source: PemSource, what: str = "certificate") -> Optional[bytes]:
    """Return PEM bytes from a file path, PEM text or PEM bytes (None stays None)."""
    if source is None:
        return None
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and "-----BEGIN" in source:
        data = source.encode()
    else:
        data = _read_pem_file(source, what)
    if b"-----BEGIN" not in data:
        raise ConfigurationError(f"{_describe(source, what)} is not PEM (no '-----BEGIN' line)")
    return data


def _read_pem_file(source: PemSource, what: str) -> bytes:
    """A regular file's bytes, up to MAX_PEM_FILE_BYTES. Material is read again at every renewal look and every
    new channel, which a pipe (``<(...)``) cannot give twice; a FIFO would block the start, a device never end."""
    path = os.fspath(source)
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder: open() says "Is a directory"
            raise ConfigurationError(
                f"{_describe(source, what)} is not a regular file (a pipe, FIFO or device?): TLS material is read "
                "again at every renewal, so give a file"
            )
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEM_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} from {_path_shown(source, what)}: {exc.strerror}") from None
    if len(data) > MAX_PEM_FILE_BYTES:
        raise ConfigurationError(f"{_describe(source, what)} holds more than {MAX_PEM_FILE_BYTES} bytes: not PEM material")
    return data


def check_certificates(source: PemSource, data: bytes, what: str) -> None:
    """Refuse trust material (root certificates, a client CA) holding no certificate the TLS library can load."""
    name = _describe(source, what)
    if _CERTIFICATE_LINE not in data:
        raise ConfigurationError(f"no PEM certificate in {name} (no '-----BEGIN CERTIFICATE-----' line)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"no readable PEM certificate in {name} ({_reason(exc)})") from None


def check_validity(chain: bytes, name: str, skew: float = 0.0) -> None:
    """Refuse a certificate chain whose first certificate, the one presented, is outside its validity period:
    every handshake would fail on it (an expired renewal, or one issued ahead of a clock that is behind). One
    valid within ``skew`` seconds is taken with a warning: at start there is no other to serve meanwhile."""
    from cryptography import x509  # loaded with the first certificate: a process without TLS never needs it

    try:
        [presented, *rest] = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise ConfigurationError(f"{name} cannot be read as X.509 ({exc})") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    begins, ends = presented.not_valid_before_utc, presented.not_valid_after_utc
    if now < begins <= now + datetime.timedelta(seconds=skew):
        logger.warning("%s is valid from %s UTC, %.0fs from now: clients refuse it until then (clocks apart?)",
                       name, f"{begins:%Y-%m-%d %H:%M:%S}", (begins - now).total_seconds())
    elif now < begins:
        raise ConfigurationError(
            f"{name} is not valid before {begins:%Y-%m-%d %H:%M:%S} UTC (now {now:%Y-%m-%d %H:%M:%S}): issued ahead "
            "of this machine's clock, or the clock is behind"
        )
    if now > ends:
        raise ConfigurationError(f"{name} expired on {ends:%Y-%m-%d %H:%M:%S} UTC")
    path = list(_issuers_given(presented, rest))
    for position, issuer in enumerate(path):
        # an intermediate sent with the leaf: a client finds it expired (or not valid yet) and every handshake fails
        begins, ends = issuer.not_valid_before_utc, issuer.not_valid_after_utc
        if now > ends or begins > now + datetime.timedelta(seconds=skew):
            said = f"expired on {ends:%Y-%m-%d %H:%M:%S}" if now > ends else f"is not valid before {begins:%Y-%m-%d %H:%M:%S}"
            if 0 < position == len(path) - 1 and issuer.issuer != issuer.subject:
                # the top of the chain given above the leaf's issuer, signed by a root not in it: a cross-signature (Let's Encrypt's ISRG
                # Root X1 by DST Root CA X3). A client trusting its subject's own root stops there (gRPC's TLS
                # looks in its trust store first) and never checks it; only one anchored at its issuer refuses
                logger.warning("%s: the issuing certificate it carries (%s, issued by %s) %s UTC: clients trusting "
                               "only %s refuse the chain", name, issuer.subject.rfc4514_string(),
                               issuer.issuer.rfc4514_string(), said, issuer.issuer.rfc4514_string())
                continue
            raise ConfigurationError(
                f"{name}: the issuing certificate it carries ({issuer.subject.rfc4514_string()}) {said} UTC: every "
                "client would refuse the chain"
            )


def _issuers_given(presented, rest: list) -> Iterator:
    """The certificates of ``rest`` that issued ``presented``, its issuer's issuer and so on, in turn: the path a
    client checks (a certificate of the chain on no such path, a spare cross-signature, is not in it)."""
    current, left = presented, list(rest)
    while True:
        issuer = next((c for c in left if c.subject == current.issuer and c.subject != current.subject), None)
        if issuer is None:
            return
        left.remove(issuer)
        yield issuer
        current = issuer


def check_key_type(chain: bytes, name: str) -> None:
    """Refuse a certificate with an EdDSA key (cert-manager offers Ed25519): OpenSSL loads the pair and the server
    says it is ready, but gRPC's peers offer no EdDSA signature, so every handshake fails, logged nowhere."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

    [presented, *_] = x509.load_pem_x509_certificates(chain)
    key = presented.public_key()
    for kind, label in ((ed25519.Ed25519PublicKey, "Ed25519"), (ed448.Ed448PublicKey, "Ed448")):
        if isinstance(key, kind):
            raise ConfigurationError(
                f"{name} holds an {label} key, which gRPC's TLS cannot sign a handshake with: issue it with an "
                "ECDSA (P-256) or RSA key"
            )
    # an RSA key restricted to PSS (id-RSASSA-PSS, as `openssl genpkey -algorithm RSA-PSS` makes it): gRPC's TLS
    # cannot load it, and its bind fails as if the port were taken
    if presented.public_key_algorithm_oid == x509.oid.PublicKeyAlgorithmOID.RSASSA_PSS:
        raise ConfigurationError(
            f"{name} holds an RSA-PSS (id-RSASSA-PSS) key, which gRPC's TLS cannot load: issue it with a plain RSA "
            "(rsaEncryption) or an ECDSA P-256 key"
        )
    # gRPC's TLS (BoringSSL) verifies ECDSA handshake signatures on P-256 and P-384 only: a P-521 key (which
    # cert-manager offers) serves OpenSSL clients but every gRPC peer closes the handshake; other curves
    # (secp256k1) gRPC cannot load at all, and its bind then fails as if the port were taken
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in ("secp256r1", "secp384r1"):
        raise ConfigurationError(
            f"{name} holds an ECDSA key on curve {key.curve.name}, which gRPC's TLS cannot handshake with: issue "
            "it with an ECDSA P-256 or P-384 (cert-manager: size 256 or 384) or an RSA key"
        )


def check_extended_key_usage(chain: bytes, name: str, role: str) -> None:
    """Refuse a certificate whose extended key usage leaves out its role (``server`` or ``client``): the peer
    refuses it at every handshake ("unsupported certificate purpose"), a server's client saying only that it does
    not trust it. No such extension: any use."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    [presented, *_] = x509.load_pem_x509_certificates(chain)
    try:
        usages = presented.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted not in usages:  # anyExtendedKeyUsage alone is not enough: gRPC's TLS (BoringSSL) refuses it
        usage = f"{role} auth"
        raise ConfigurationError(
            f"{name} does not allow {usage} (its extended key usage lists "
            f"{', '.join(u.dotted_string if u._name == 'Unknown OID' else u._name for u in usages)}): "
            f"every handshake would fail on it; issue it with '{usage}' among its usages"
        )


def check_key_pair(
    chain_source: PemSource, chain: bytes, key_source: PemSource, key: bytes, role: str, skew: float = 0.0
) -> None:
    """Refuse a certificate chain and private key that are the wrong kind of PEM, encrypted, or not a pair.

    The pair check is OpenSSL's own, through ``ssl.SSLContext.load_cert_chain``.
    """
    chain_name = _describe(chain_source, f"{role} certificate chain")
    key_name = _describe(key_source, f"{role} private key")
    check_certificates(chain_source, chain, f"{role} certificate chain")
    check_validity(chain, chain_name, skew)
    check_key_type(chain, chain_name)
    check_extended_key_usage(chain, chain_name, role)
    if not _PRIVATE_KEY_LINE.search(key):
        raise ConfigurationError(f"{key_name} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # the bytes read, not the files as they are now: a renewal written between the read and this check passed it
    # while gRPC was given the half read (a new certificate with the old key), and refused it
    with _as_file(None, chain) as chain_path, _as_file(None, key) as key_path:
        try:
            context.load_cert_chain(chain_path, key_path, password=_refuse_passphrase(key_name))
        except ssl.SSLError as exc:
            # a key of another type than the certificate's (an ECDSA key, an RSA certificate) is not compared:
            # OpenSSL says no certificate went with it
            if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
                raise ConfigurationError(f"{key_name} does not match {chain_name}{_out_of_order(chain, key)}") from None
            raise ConfigurationError(
                f"{key_name} cannot be loaded as the key of {chain_name} ({_reason(exc)})"
            ) from None


def _out_of_order(chain: bytes, key: bytes) -> str:
    """Words for a key that matches a certificate of its chain other than the first: the chain is out of order
    (the presented certificate must come first, then its issuers), not the wrong key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        mine = serialization.load_pem_private_key(key, None).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        certificates = x509.load_pem_x509_certificates(chain)
    except (ValueError, TypeError):
        return ""
    for position, certificate in enumerate(certificates[1:], start=2):
        theirs = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if theirs == mine:
            return (f": it is the key of certificate {position} of the chain ({certificate.subject.rfc4514_string()}); "
                    "the chain must start with that certificate, its issuers after it")
    return ""


def check_server_name(name: object) -> str:
    """Refuse a ``server_name`` that is not a bare DNS name, saying what is wrong with it.

    gRPC would take anything and every handshake would then fail on a name no certificate carries.
    """
    if not isinstance(name, str):
        raise ConfigurationError(f"server_name takes a DNS name as text, got a {type(name).__name__}")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)  # a certificate may name an IP address (its SAN), IPv6 too
        return name
    if "://" in name:
        why = "give the name alone, without a scheme"
    elif "/" in name:
        why = "give the name alone, without a path"
    elif ":" in name:
        why = "give the name alone, without a port (the address dialled carries the port)"
    elif not name.strip():
        why = "it is empty"
    elif any(character.isspace() for character in name):
        why = "it holds a space"
    elif not _DNS_NAME.match(name):
        why = "expected dot-separated labels of letters, digits and inner hyphens, e.g. shardnet-worker.internal"
    else:
        return name
    raise ConfigurationError(f"server_name {name!r} is not a DNS name a server certificate can carry: {why}")


def _reason(exc: Exception) -> str:
    """The short cause of an ``ssl`` error (its reason code when it has one)."""
    return getattr(exc, "reason", None) or str(exc)


def _refuse_passphrase(key_name: str) -> Callable[[], bytes]:
    """A password callback for ``load_cert_chain`` that refuses instead of OpenSSL prompting on the terminal."""

    def ask() -> bytes:
        raise ConfigurationError(f"{key_name} is encrypted: gRPC takes no passphrase, give it the decrypted key")

    return ask


@contextlib.contextmanager
def _as_file(source: PemSource, data: bytes) -> Iterator[str]:
    """Yield a path holding ``data``: the regular file it came from, else a private temporary copy.

    ``load_cert_chain`` reads only files; in-memory PEM goes to a file readable by this user only, in a folder
    removed on exit.
    """
    if _is_path(source) and os.path.isfile(os.fspath(source)):
        yield os.fspath(source)
        return
    descriptor = None
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        # a file in memory: no temporary folder needed (a pod with a read-only root filesystem has none), the key
        # never on a disk
        with contextlib.suppress(OSError):  # refused (a seccomp profile, gVisor, an old kernel): a folder, then
            descriptor = os.memfd_create("shardnet-tls", os.MFD_CLOEXEC)
    if descriptor is not None:
        try:
            with os.fdopen(os.dup(descriptor), "wb") as handle:
                handle.write(data)
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    with tempfile.TemporaryDirectory(prefix="shardnet-tls-") as folder:  # created mode 0700
        path = os.path.join(folder, "material.pem")
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(data)
        yield path


@dataclass(frozen=True)
class ClientTls:
    """What a client presents and trusts: root certificates, a client certificate for mTLS, and the name the
    server's certificate must carry when the dialled address cannot be it."""

    root_certificates: PemSource = None
    private_key: PemSource = field(default=None, repr=False)  # PEM text may be the key itself: never printed
    certificate_chain: PemSource = None
    # the name the server's certificate must carry (its SAN), when it is dialled by an address the certificate
    # cannot name, such as a pod IP
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        """Refuse missing, unreadable or mismatched material where it is configured, not at the first call."""
        _anchor_paths(self, ("root_certificates", "certificate_chain", "private_key"))
        if self.server_name is not None:
            check_server_name(self.server_name)
        if (self.private_key is None) != (self.certificate_chain is None):
            missing = "private key" if self.private_key is None else "certificate chain"
            raise ConfigurationError(
                f"mutual TLS needs both a client private key and its certificate chain: no client {missing} given"
            )
        self._check()
        warn_if_others_may_read(self.private_key, "client private key")

    def _check(self) -> None:
        roots = load_pem(self.root_certificates, "root certificates")
        chain = load_pem(self.certificate_chain, "client certificate chain")
        key = load_pem(self.private_key, "client private key")
        if roots is not None:
            check_certificates(self.root_certificates, roots, "root certificates")
        if chain is not None and key is not None:
            check_key_pair(self.certificate_chain, chain, self.private_key, key, "client", CLOCK_SKEW)

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the material, read afresh (its consistency was checked when built)."""
        key = load_pem(self.private_key, "client private key")
        chain = load_pem(self.certificate_chain, "client certificate chain")
        return grpc.ssl_channel_credentials(
            root_certificates=load_pem(self.root_certificates, "root certificates"),
            private_key=key,
            certificate_chain=chain,
        )

    def channel_options(self) -> tuple[tuple[str, str], ...]:
        """The channel options a secure channel with this material needs besides its credentials: the server
        name its certificate is checked against, when one is set."""
        if self.server_name is None:
            return ()
        return ((SERVER_NAME_OPTION, self.server_name),)

    def __repr__(self) -> str:
        # files by their path; PEM held in memory (given so, or read at a renewal) by its size, never its text
        shown = [
            f"{name}={_shown(getattr(self, name), name.replace('_', ' '))}"
            for name in ("root_certificates", "certificate_chain", "private_key")
            if getattr(self, name) is not None
        ]
        if self.server_name is not None:
            shown.append(f"server_name={self.server_name!r}")
        return f"ClientTls({', '.join(shown)})"

    def files(self) -> list[PemSource]:
        """The material given as file paths: what a renewal can change under a running client."""
        sources = (self.root_certificates, self.certificate_chain, self.private_key)
        return [source for source in sources if _is_path(source)]

    def in_memory(self, warn: bool = True) -> "ClientTls":
        """This material with its files read now, and checked as one: what later changes to them cannot alter.
        ``warn``: log a key file open to other users (False where this material's making just did)."""
        self._check()  # first as files, so that a refusal names them
        if warn:
            warn_if_others_may_read(self.private_key, "client private key")
        return replace(
            self,
            root_certificates=load_pem(self.root_certificates, "root certificates"),
            certificate_chain=load_pem(self.certificate_chain, "client certificate chain"),
            private_key=load_pem(self.private_key, "client private key"),
        )


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key; with ``client_ca`` set, clients must present a certificate it signed."""

    certificate_chain: PemSource
    private_key: PemSource = field(repr=False)  # PEM text may be the key itself: never printed
    client_ca: PemSource = None

    def __post_init__(self) -> None:
        """Refuse missing, unreadable or mismatched material where it is configured, not when the server starts."""
        _anchor_paths(self, ("certificate_chain", "private_key", "client_ca"))
        missing = [
            name
            for name, value in (("certificate chain", self.certificate_chain), ("private key", self.private_key))
            if value is None
        ]
        if missing:
            needs = (
                "requiring client certificates (client_ca) needs the server's own certificate chain and private key"
                if self.client_ca is not None
                else "a TLS server needs both its certificate chain and the matching private key"
            )
            raise ConfigurationError(f"{needs}: no server {' and no '.join(missing)} given")
        self.checked_material(skew=CLOCK_SKEW)
        warn_if_others_may_read(self.private_key, "server private key")

    def checked_material(self, skew: float = 0.0) -> tuple[bytes, bytes, Optional[bytes]]:
        """(chain, key, client CA) read afresh, or a ConfigurationError saying what is wrong with them (``skew``:
        as ``check_validity`` takes it; a renewal takes none, as the material it would replace still serves)."""
        chain = load_pem(self.certificate_chain, "server certificate chain")
        key = load_pem(self.private_key, "server private key")
        client_ca = load_pem(self.client_ca, "client CA")
        check_key_pair(self.certificate_chain, chain, self.private_key, key, "server", skew)
        if client_ca is not None:
            check_certificates(self.client_ca, client_ca, "client CA")
        return chain, key, client_ca

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials from the material. Material in files is followed: renewed files (a Secret
        cert-manager renewed, say) serve every connection made after the change, without a restart."""
        require_client_auth = self.client_ca is not None
        if not any(_is_path(source) for source in (self.certificate_chain, self.private_key, self.client_ca)):
            chain, key, client_ca = self.checked_material(skew=CLOCK_SKEW)
            return grpc.ssl_server_credentials(
                [(key, chain)], root_certificates=client_ca, require_client_auth=require_client_auth
            )
        follower = FollowedServerMaterial(self)
        return grpc.dynamic_ssl_server_credentials(
            follower.configuration(skew=CLOCK_SKEW), follower, require_client_authentication=require_client_auth
        )

    def __repr__(self) -> str:
        # as ClientTls's: files by their path, PEM held in memory by its size, never its text (a combined PEM
        # given as the chain holds the private key too)
        shown = [
            f"{name}={_shown(getattr(self, name), name.replace('_', ' '))}"
            for name in ("certificate_chain", "private_key", "client_ca")
            if getattr(self, name) is not None
        ]
        return f"ServerTls({', '.join(shown)})"


class FollowedServerMaterial:
    """What gRPC asks for at each TLS handshake of a server whose material is in files: None while the files
    are unchanged, else the new material once it passes ServerTls's checks. A change that fails them (a key
    not yet matching its new certificate, say) keeps the last good material; it is tried and logged again
    every ``retry_refused_after`` seconds while it lasts, so that a broken renewal is not a single log line."""

    def __init__(self, tls: ServerTls, retry_refused_after: float = 60.0):
        self._tls = tls
        self._sources = [
            source for source in (tls.certificate_chain, tls.private_key, tls.client_ca) if _is_path(source)
        ]
        self._retry_refused_after = retry_refused_after
        self._served = files_signature(self._sources)
        self._refused: Optional[tuple] = None
        self._refused_at = 0.0
        self._lock = threading.Lock()  # gRPC 1.78 runs one fetch at a time already; other versions need not

    def configuration(self, skew: float = 0.0) -> grpc.ServerCertificateConfiguration:
        """The material as gRPC serves it, read and checked now (``skew``: at start only, see check_validity)."""
        chain, key, client_ca = self._tls.checked_material(skew)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)

    def __call__(self) -> Optional[grpc.ServerCertificateConfiguration]:
        # called on one of gRPC's threads at each handshake: cheap when nothing changed, and nothing may raise
        with self._lock:
            signature = files_signature(self._sources)
            if signature == self._served:
                return None
            if signature == self._refused and time.monotonic() - self._refused_at < self._retry_refused_after:
                return None
            try:
                configuration = self.configuration()
            except Exception as exc:  # noqa: BLE001 - on gRPC's thread: any failure keeps the last good material
                self._refused, self._refused_at = signature, time.monotonic()
                logger.warning("TLS material changed but cannot be served; the previous material stays: %s", exc)
                return None
            self._served, self._refused = signature, None
        warn_if_others_may_read(self._tls.private_key, "server private key")  # as at start: a renewal may loosen it
        # gRPC's TLS library parses it after this returns, and logs it if it refuses it (a key type it lacks)
        logger.info(
            "TLS material changed: new connections are offered %s",
            _describe(self._tls.certificate_chain, "certificate chain"),
        )
        return configuration


class FollowedClientMaterial:
    """A client's TLS files, looked at now and then by a pool: its open channels keep the certificate they were
    made with, including for every reconnection, so a renewed one reaches a replica only through a new channel.
    A renewal is read once and checked as a whole; a change that fails ClientTls's checks (half a renewal) is
    not taken, and said so each time it is looked at while it lasts."""

    def __init__(self, tls: ClientTls):
        self._tls = tls
        self._sources = tls.files()
        self._taken: Optional[tuple] = None  # nothing taken yet: the first look reads them

    @property
    def follows_files(self) -> bool:
        return bool(self._sources)

    def renewal(self) -> Optional[tuple[tuple, ClientTls]]:
        """(the files' signature, their material read and checked) at the first look and when they changed since
        the renewal taken last; None while they are unchanged, change under the read, or do not check out."""
        if not self._sources:
            return None
        signature = files_signature(self._sources)
        if signature == self._taken:
            return None
        try:
            material = self._tls.in_memory(warn=self._taken is not None)  # at the first look, its making said it
            if self._taken is not None and material.certificate_chain is not None:  # a renewal: no skew taken,
                # as the certificate it would replace still serves
                check_validity(material.certificate_chain, "the renewed client certificate chain")
        except ConfigurationError as exc:
            if self._taken is None:  # at start: nothing checked to fall back on
                logger.warning(
                    "client TLS files do not check out; channels read them as they open until they do: %s", exc
                )
            else:
                logger.warning("client TLS material changed but is not taken; channels keep the previous one: %s", exc)
            return None
        if files_signature(self._sources) != signature:
            return None  # written while read: looked at again next time, whole
        return signature, material

    def take(self, signature: tuple) -> None:
        """Record that the renewal of ``signature`` reached every channel."""
        self._taken = signature
