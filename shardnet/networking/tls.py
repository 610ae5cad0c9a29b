"""TLS material: load PEM from a path, text or bytes, and build gRPC credentials from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import grpc

from shardnet.errors import ConfigurationError

PemSource = Union[str, bytes, os.PathLike, None]


def load_pem(source: PemSource, what: str = "certificate") -> Optional[bytes]:
    """Return PEM bytes from a file path, PEM text or PEM bytes (None stays None)."""
    if source is None:
        return None
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and "-----BEGIN" in source:
        data = source.encode()
    else:
        try:
            with open(os.fspath(source), "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {what} from {os.fspath(source)!r}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigurationError(f"{what} is not PEM (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ClientTls:
    """What a client presents and trusts: root certificates, and a client certificate for mTLS."""

    root_certificates: PemSource = None
    private_key: PemSource = None
    certificate_chain: PemSource = None

    def __post_init__(self) -> None:
        self.credentials()  # a missing or non-PEM file fails where it is configured, not at the first call

    def credentials(self) -> grpc.ChannelCredentials:
        key = load_pem(self.private_key, "client private key")
        chain = load_pem(self.certificate_chain, "client certificate chain")
        if (key is None) != (chain is None):
            raise ConfigurationError("mutual TLS needs both a client private key and its certificate chain")
        return grpc.ssl_channel_credentials(
            root_certificates=load_pem(self.root_certificates, "root certificates"),
            private_key=key,
            certificate_chain=chain,
        )


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key; with ``client_ca`` set, clients must present a certificate it signed."""

    certificate_chain: PemSource
    private_key: PemSource
    client_ca: PemSource = None

    def __post_init__(self) -> None:
        self.credentials()  # a missing or non-PEM file fails where it is configured, not when the server starts

    def credentials(self) -> grpc.ServerCredentials:
        chain = load_pem(self.certificate_chain, "server certificate chain")
        key = load_pem(self.private_key, "server private key")
        client_ca = load_pem(self.client_ca, "client CA")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
