"""Arguments several subcommands share: where to listen, TLS, the control token, limits."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
from typing import Any, Coroutine, Optional

from shardnet.errors import ConfigurationError
from shardnet.networking.channels import DEFAULT_MAX_MESSAGE_BYTES
from shardnet.networking.tls import ClientTls, ServerTls
from shardnet.runtimes.server import ServerConfig

TOKEN_VARIABLE = "SHARDNET_CONTROL_TOKEN"
LOOPS = ("asyncio", "uvloop", "auto")


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    group = parser.add_argument_group("serving")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    group.add_argument("--port", type=int, default=default_port, help="port to bind; 0 picks a free one")
    group.add_argument(
        "--unix-socket",
        metavar="PATH",
        help="also listen on this Unix socket (absolute path, plaintext); a worker with --head registers it, "
        "so its head must run on the same machine",
    )
    group.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", help="PEM CA: require client certificates signed by it (mutual TLS)")
    group.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20)
    group.add_argument("--drain-seconds", type=float, default=10.0, help="grace for in-flight requests on SIGTERM")
    group.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: asyncio, uvloop (pip install 'shardnet[fast]'), or auto, the default: uvloop when installed",
    )
    add_token_argument(parser)


def run_in_loop(coroutine: Coroutine[Any, Any, Any], loop: str = "auto") -> Any:
    """Run ``coroutine`` to completion in a new event loop of kind ``loop`` (one of ``LOOPS``).

    uvloop takes about a tenth off a head's CPU per request (``benchmarks/head_overhead.py``);
    Jina's runtimes use it too whenever it is installed.
    """
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            coroutine.close()
            raise ConfigurationError("--loop uvloop needs uvloop: pip install 'shardnet[fast]'") from None
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-token",
        default=None,
        help=f"shared secret for ACTIVATE/DEACTIVATE (default: ${TOKEN_VARIABLE})",
    )


def control_token(args: argparse.Namespace) -> Optional[str]:
    return args.control_token or os.environ.get(TOKEN_VARIABLE) or None


def server_config(args: argparse.Namespace) -> ServerConfig:
    tls = None
    if args.tls_cert or args.tls_key:
        tls = ServerTls(certificate_chain=args.tls_cert, private_key=args.tls_key, client_ca=args.tls_client_ca)
    return ServerConfig(
        host=args.host,
        port=args.port,
        tls=tls,
        control_token=control_token(args),
        max_message_bytes=int(args.max_message_mb * 2**20),
        drain_grace=args.drain_seconds,
        unix_socket=args.unix_socket,
    )


def add_client_tls_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}root-ca", help="PEM CA that signed the server's certificate (enables TLS)")
    parser.add_argument(f"--{prefix}client-cert", help="PEM client certificate for mutual TLS")
    parser.add_argument(f"--{prefix}client-key", help="PEM private key of the client certificate")


def client_tls(args: argparse.Namespace, prefix: str = "") -> Optional[ClientTls]:
    attr = prefix.replace("-", "_")
    root = getattr(args, f"{attr}root_ca")
    cert = getattr(args, f"{attr}client_cert")
    key = getattr(args, f"{attr}client_key")
    if not (root or cert or key):
        return None
    return ClientTls(root_certificates=root, certificate_chain=cert, private_key=key)


def json_object(text: str, flag: str) -> dict:
    """Parse a JSON object given on the command line; a clear error names the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value
