"""Arguments several subcommands share: where to listen, TLS, the control token, limits."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import math
import os
import select
import stat
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterable, Optional

from shardnet.errors import ConfigurationError
from shardnet.networking.addresses import Address, parse_address
from shardnet.networking.balancing import BALANCERS
from shardnet.networking.channels import DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_MB, TOKEN_VARIABLE, check_control_token
from shardnet.networking.policies import MAX_TIMEOUT
from shardnet.networking.tls import ClientTls, ServerTls, warn_if_others_may_read
from shardnet.runtimes.executor import DRY_RUN_ENDPOINT, metas_name
from shardnet.runtimes.lifecycle import check_ready_fd
from shardnet.runtimes.server import ServerConfig

logger = logging.getLogger(__name__)

LOOPS = ("asyncio", "uvloop", "auto")
# --polling's help, for every command that takes it: as a Jina head, /search goes to every shard and /index to one
# whatever the default, which a reader of "ANY (one shard answers)" would not guess
POLLING_HELP = (
    'the default for endpoints a JSON map does not name: ANY (one shard answers) or ALL (every shard does), or '
    'a JSON map such as \'{"/search": "ALL", "*": "ANY"}\'; as in Jina, /search goes to ALL and /index to ANY '
    "unless the map names them (default: %(default)s)"
)
INT32_MAX = 2**31 - 1  # shard and replica ids travel as protobuf int32 fields


# what ends a line in a log viewer (C0/C1 controls, Unicode's line and paragraph separators), and the bidirectional
# overrides and isolates, which show a line's text in another order than it was written
_CONTROLS = frozenset({"Cc", "Zl", "Zp"})
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_visible_name(name: str, flag: str) -> None:
    """Refuse a name that is no text (bytes the terminal's encoding could not decode), is empty or holds a control
    character: it is in every log line of its process, its errors, route entries and metric labels, where a
    newline would begin a line that reads as another process's."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(f"{flag} {name!r:.120} is not text (bytes not in the locale's encoding)") from None
    if not name:
        raise ConfigurationError(f"{flag} is empty: give a name")
    if any(unicodedata.category(character) in _CONTROLS or character in _BIDI_CONTROLS for character in name):
        raise ConfigurationError(f"{flag} {name!r:.120}: give a name without control characters")


def listed_endpoints(endpoints: Iterable[str]) -> list[str]:
    """Endpoints a server discovered, without Jina's readiness check (``_jina_dry_run_``), which every worker
    serves and lists and nobody posts to."""
    return [endpoint for endpoint in endpoints if endpoint != DRY_RUN_ENDPOINT]


def shown_endpoints(endpoints: Iterable[str]) -> str:
    """``listed_endpoints`` as a person is shown them."""
    return ", ".join(listed_endpoints(endpoints))


def _finite(text: str, what: str, unit: str) -> float:
    """``text`` as a finite number, or an argparse error naming ``what`` and its ``unit``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what} must be a finite number of {unit}, got {text!r}")
    return value


def message_megabytes(text: str) -> float:
    """Parse ``--max-message-mb``: a finite number of megabytes, at least one byte and at most ``MAX_MESSAGE_MB``
    (the rule ``channels.check_max_message_mb`` applies to the Python API, in argparse's words)."""
    value = _finite(text, "max message size", "megabytes")
    if int(value * 2**20) < 1:
        raise argparse.ArgumentTypeError(f"max message size must be positive (at least one byte), got {text!r}")
    if value > MAX_MESSAGE_MB:
        raise argparse.ArgumentTypeError(
            f"max message size must be at most {MAX_MESSAGE_MB} MB (gRPC counts message bytes in a 32-bit int), "
            f"got {text!r}"
        )
    return value


def drain_seconds(text: str) -> float:
    """Parse ``--drain-seconds``: a finite number of seconds, 0 or more (NaN would crash the drain at shutdown)."""
    value = _finite(text, "drain grace", "seconds")
    if not 0 <= value <= MAX_TIMEOUT:  # as every duration shardnet takes (deploy's Deployment refused more)
        raise argparse.ArgumentTypeError(f"drain grace must be 0 to {MAX_TIMEOUT:g} seconds, got {text!r}")
    return value


def positive_seconds(
    what: str, zero: bool = False, most: float = MAX_TIMEOUT, why: str = ""
) -> Callable[[str], float]:
    """An argparse ``type`` for a flag taking seconds (a timeout, a lease, an interval): a finite number above 0
    (or 0 too, with ``zero``), at most ``most`` (``why`` says why; by default the longest deadline the pool
    takes, some 31 years), refused in the flag's words rather than the Python API's (0 would expire at once,
    NaN compares false everywhere, 3e9 came back as the API's refusal of half of it).

    >>> positive_seconds("timeout")("2.5")
    2.5
    """

    def parse(text: str) -> float:
        value = _finite(text, what, "seconds")
        if value < 0 or (value == 0 and not zero):
            least = "0 or more" if zero else "positive"
            raise argparse.ArgumentTypeError(f"{what} must be {least} seconds, got {text!r}")
        if value > most:
            raise argparse.ArgumentTypeError(f"{what} must be at most {most:g} seconds{why}, got {text!r}")
        return value

    return parse


def _integers(least: int, most: Optional[int]) -> str:
    """The integers from ``least`` (to ``most``), in words: "an integer >= 1", "an integer from 0 to 9"."""
    return f"an integer >= {least}" if most is None else f"an integer from {least} to {most}"


def whole_number(what: str, least: int, most: Optional[int] = None, why: str = "") -> Callable[[str], int]:
    """An argparse ``type`` for a count or an id: an integer from ``least`` (to ``most``; ``why`` says why),
    refused at once, in argparse's words naming the flag, rather than deep inside later (a shard id past
    protobuf's int32 is a traceback, a pid of 0 a parent watch that never fires).

    >>> whole_number("shard id", 0, INT32_MAX)("3")
    3
    """

    def parse(text: str) -> int:
        try:
            value: Optional[int] = int(text)
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{what} must be {_integers(least, most)}{why}, got {text!r}")
        return value

    return parse


def _ready_fd(text: str) -> int:
    """``--ready-fd``: checked as the arguments are parsed, before gRPC or the event loop open a descriptor."""
    fd = whole_number("ready fd", 3, why=" (0 to 2 are the standard streams)")(text)
    try:
        check_ready_fd(fd)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--ready-fd ", "file descriptor ", 1)) from None
    return fd


def check_whole_number(value: int, flag: str, least: int, most: Optional[int] = None, why: str = "") -> None:
    """``whole_number``'s rule for a flag checked after parsing (where its error must be a ``ConfigurationError``,
    as ``k8s render`` reports its spec's), naming the flag."""
    if value < least or (most is not None and value > most):
        raise ConfigurationError(f"{flag} must be {_integers(least, most)}{why}, got {value}")


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
    group.add_argument("--tls-key", metavar="FILE", help="file holding the PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", help="PEM CA: require client certificates signed by it (mutual TLS)")
    group.add_argument(
        "--health-port",
        type=int,
        metavar="PORT",
        help="also answer the gRPC health check, plaintext, on this port (on --host), for Kubernetes probes, "
        "which cannot speak TLS; 0 picks a free one",
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics over HTTP at /metrics on this port (on --host); 0 picks a free one. Needs "
        "the optional extra: pip install 'shardnet[metrics]' ('.[metrics]' from a checkout)",
    )
    group.add_argument(
        "--max-message-mb",
        type=message_megabytes,
        default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
        help=f"largest message sent or received, in MiB (more than 0, at most {MAX_MESSAGE_MB})",
    )
    group.add_argument(
        "--drain-seconds", type=drain_seconds, default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM (default: %(default)g)",
    )
    group.add_argument(
        "--parent-pid",
        type=whole_number("parent pid", 1, why=" (0 or -1 would name a group of processes, always there: the watch "
                                               "would never fire)"),
        metavar="PID",
        help="stop (as on SIGTERM) when process PID exits; shardnet deploy and Deployment set it on their children",
    )
    group.add_argument(
        "--ready-fd",
        type=_ready_fd,
        metavar="FD",
        help="once serving, write the address, then the metrics address (an empty line without --metrics-port), a "
        "line each, to file descriptor FD and close it: how shardnet deploy and Deployment learn them (a line an "
        "Executor prints cannot be taken for them)",
    )
    group.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: asyncio, uvloop (pip install 'shardnet[fast]', or '.[fast]' from a checkout), or auto, "
        "the default: uvloop when installed",
    )
    add_token_argument(parser)


def check_loop(loop: str) -> str:
    """The loop ``loop`` (one of ``LOOPS``) stands for, "asyncio" or "uvloop"; ConfigurationError when it is
    uvloop and uvloop cannot be imported. A worker calls it before it loads its Executor: a missing uvloop should
    not wait for a model to load."""
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "--loop uvloop needs uvloop: pip install 'shardnet[fast]' (from a checkout: pip install '.[fast]')"
            ) from None
    return loop


def run_in_loop(coroutine: Coroutine[Any, Any, Any], loop: str = "auto") -> Any:
    """Run ``coroutine`` to completion in a new event loop of kind ``loop`` (one of ``LOOPS``).

    uvloop takes about a tenth off a head's CPU per request (``benchmarks/head_overhead.py``);
    Jina's runtimes use it too whenever it is installed.
    """
    try:
        loop = check_loop(loop)
    except ConfigurationError:
        coroutine.close()
        raise
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def add_head_traffic_arguments(parser: argparse.ArgumentParser) -> None:
    """How a head treats its traffic: admission (--max-in-flight) and request streams to its workers."""
    parser.add_argument(
        "--max-in-flight", type=whole_number("requests in flight", 1), default=None, metavar="N",
        help="the head refuses a request (RESOURCE_EXHAUSTED) while N are in flight, instead of queueing without "
        "bound (default: no limit)",
    )
    parser.add_argument(
        "--request-streams", action=argparse.BooleanOptionalAction, default=True,
        help="the head sends single requests to shardnet workers as messages on a few shared streams per worker "
        "instead of a call each; other servers are called unary either way (default: on)",
    )


def add_uses_metas_argument(parser: argparse.ArgumentParser) -> None:
    """``--uses-metas``, as ``worker``, ``deploy`` and ``k8s render`` take it (read with ``uses_metas_name``)."""
    parser.add_argument(
        "--uses-metas", default=None,
        help='JSON {"name": "NAME"} of Jina\'s metas: the name executor-specific parameters address and the '
             "workspace folder is called by (default: the Executor's class name, as in Jina)",
    )


def uses_metas_name(text: Optional[str]) -> Optional[str]:
    """The name ``--uses-metas`` gives the Executor, checked; None when the flag was not given."""
    return None if text is None else metas_name(json_object(text, "--uses-metas"), "--uses-metas")


def add_head_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """How a head picks a replica and how long it waits for one: the same flags on ``head`` and ``deploy``."""
    parser.add_argument(
        "--balancer", choices=sorted(BALANCERS), default="p2c_ewma",
        help="how a shard's replica is picked: p2c_ewma steers clear of slow and hung ones (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=positive_seconds("timeout"), metavar="SECONDS", default=None,
        help="the longest the head waits for each hop of a request (uses-before, the shards, uses-after), seconds; "
             "a caller's shorter deadline wins (default: none)",
    )
    parser.add_argument(
        "--attempt-timeout", type=positive_seconds("attempt timeout"), metavar="SECONDS", default=None,
        help="give up on one replica after this many seconds and try another (default: none)",
    )
    parser.add_argument(
        "--at-most-once", action="store_true",
        help="fail over only requests no replica took: one a replica may have run (it died or hung under it) "
             "fails, answered ERROR, instead of running again on another (default: at least once)",
    )


def add_token_argument(
    parser: argparse.ArgumentParser, default: str = f"the secret itself in ${TOKEN_VARIABLE}"
) -> None:
    """--control-token-file and --control-token; ``default`` says what serves without either."""
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--control-token-file",
        metavar="PATH",
        help=f"file holding the shared secret for ACTIVATE/DEACTIVATE (without it: {default})",
    )
    given.add_argument(
        "--control-token",
        default=None,
        help="the secret itself; every user of the machine reads it in the process list: prefer the file or "
             f"${TOKEN_VARIABLE}",
    )


MAX_TOKEN_FILE_BYTES = 4096
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024  # a --uses-with @FILE: arguments, not a model
# seconds a pipe read as a file (@<(...), @/dev/stdin) has to reach its end: a FIFO nobody opens for writing, or
# a standard input held open and silent, blocked the start for ever
PIPE_WAIT = 30.0
_PIPE_CHUNK = 1024 * 1024


def read_small_file(path: str, limit: int, flag: str, pipes: bool = False, pipe_wait: float = PIPE_WAIT) -> bytes:
    """The bytes of the regular file ``path`` (or, with ``pipes``, of a pipe: ``@<(...)``, read to its end within
    ``pipe_wait`` seconds), at most ``limit`` of them, else a ConfigurationError naming ``flag`` (a FIFO nobody
    writes to would block the start, /dev/zero fill the memory)."""
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or (pipes and stat.S_ISFIFO(mode))):
            raise ConfigurationError(f"{flag} {path!r} is not a regular file" + (" or a pipe" if pipes else ""))
        if stat.S_ISFIFO(mode):
            data = _read_pipe(path, limit, flag, pipe_wait)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigurationError(f"{flag}: cannot read {path!r}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigurationError(f"{flag} {path!r} holds more than {limit} bytes")
    return data


def _read_pipe(path: str, limit: int, flag: str, wait: float) -> bytes:
    """Up to ``limit`` + 1 bytes of the pipe ``path``, read to its end (its writers gone) within ``wait`` seconds.
    Opened without blocking, as a FIFO's open waits for a writer, and read only once poll() says so: a FIFO no
    writer has opened yet reads as ended, though poll() waits for one."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready = select.poll()
        ready.register(fd, select.POLLIN)
        deadline = time.monotonic() + wait
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            left = deadline - time.monotonic()
            if left <= 0 or not ready.poll(math.ceil(left * 1000)):
                raise ConfigurationError(
                    f"{flag} {path!r}: the pipe did not end within {wait:g}s (is anything writing to it, and "
                    "closing it? a pipe is read to its end before the start)"
                )
            try:
                chunk = os.read(fd, min(_PIPE_CHUNK, limit + 1 - size))
            except BlockingIOError:  # taken by another reader of the same pipe meanwhile
                continue
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _token_from_file(path: str) -> str:
    """The first non-blank line of a regular file of at most MAX_TOKEN_FILE_BYTES; a UTF-8 byte order mark is
    dropped."""
    data = read_small_file(path, MAX_TOKEN_FILE_BYTES, "--control-token-file")
    # as a private key file is: a token any user of the machine reads lets any of them take the workers' place
    warn_if_others_may_read(path, "--control-token-file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:  # its own words would show a byte of the token and where it sits
        raise ConfigurationError(f"the control token file {path!r} is not UTF-8 text; the value is not shown") from None
    token = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not token:
        raise ConfigurationError(f"the control token file {path!r} holds no token (only blank lines)")
    try:
        check_control_token(token)
    except ConfigurationError:
        raise ConfigurationError(
            f"the token in {path!r} must be printable ASCII text (it travels as gRPC metadata); the value is not shown"
        ) from None
    return token


def control_token(args: argparse.Namespace) -> Optional[str]:
    """``--control-token-file``'s first line, ``--control-token`` (with a warning: ps shows it), else
    ``SHARDNET_CONTROL_TOKEN``; refused (unquoted) when gRPC could not carry it."""
    if args.control_token_file is not None:
        return _token_from_file(args.control_token_file)  # checked there, naming the file
    if args.control_token is not None:
        given, token = "--control-token", args.control_token
        if token:
            logger.warning(
                "--control-token shows the secret to every user of this machine (ps): give it in a file "
                "(--control-token-file) or in $%s instead", TOKEN_VARIABLE,
            )
    else:
        given, token = f"${TOKEN_VARIABLE}", os.environ.get(TOKEN_VARIABLE)
    if token == "":  # a variable unset where it was expanded, say: taken for "no token", the head was open to all
        raise ConfigurationError(
            f"{given} is empty: give the token, or leave {given} out to run without one"
        )
    check_control_token(token)
    return token


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` the serving flags describe; a half-given TLS setup is refused naming the flags."""
    cert, key, client_ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if client_ca is not None and (cert is None or key is None):
        raise ConfigurationError(
            "--tls-client-ca needs --tls-cert and --tls-key: the server must serve TLS with its own certificate "
            "and key to ask clients for theirs (without them it would serve plaintext and check no one)"
        )
    tls = None
    if cert is not None or key is not None:
        _refuse_half_pair("--tls-cert", cert, "--tls-key", key, "a TLS server needs its certificate and private key")
        _refuse_key_text("--tls-key", key)
        tls = ServerTls(certificate_chain=cert, private_key=key, client_ca=client_ca)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        tls=tls,
        control_token=control_token(args),
        max_message_bytes=int(args.max_message_mb * 2**20),
        drain_grace=args.drain_seconds,
        unix_socket=args.unix_socket,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
    )
    if config.metrics_port is not None:  # refused now, in words naming the extra, not once an Executor has loaded
        importlib.import_module("shardnet.runtimes.metrics")
    if config.unix_socket is not None:  # checked (absolute, short enough) by ServerConfig
        _check_socket_folder(config.unix_socket)
    return config


def _check_socket_folder(path: str) -> None:
    """Refuse a ``--unix-socket`` whose folder is missing (or no folder) now: binding finds it only once the
    Executor has loaded, which may take minutes."""
    folder = os.path.dirname(path) or "/"
    if not os.path.isdir(folder):
        missing = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ConfigurationError(
            f"--unix-socket {path!r}: its folder {folder!r} {missing} (create it first, e.g. mkdir -p {folder})"
        )


def add_client_tls_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}root-ca", help="PEM CA that signed the server's certificate (enables TLS)")
    parser.add_argument(f"--{prefix}client-cert", help="PEM client certificate for mutual TLS")
    parser.add_argument(
        f"--{prefix}client-key", metavar="FILE", help="file holding the PEM private key of the client certificate"
    )
    parser.add_argument(
        f"--{prefix}server-name", metavar="NAME",
        help="the name the server's certificate must carry, when it is dialled by an address the certificate "
             f"cannot name (a pod IP); needs --{prefix}root-ca",
    )


def client_tls(args: argparse.Namespace, prefix: str = "") -> Optional[ClientTls]:
    attr = prefix.replace("-", "_")
    root = getattr(args, f"{attr}root_ca")
    cert = getattr(args, f"{attr}client_cert")
    key = getattr(args, f"{attr}client_key")
    server_name = getattr(args, f"{attr}server_name")
    if server_name is not None and root is None:
        raise ConfigurationError(
            f"--{prefix}server-name needs --{prefix}root-ca: the name is checked in the server's TLS certificate, "
            f"and --{prefix}root-ca (the CA that signed it) is what turns TLS on"
        )
    if root is None and cert is None and key is None:
        return None
    _refuse_half_pair(
        f"--{prefix}client-cert", cert, f"--{prefix}client-key", key, "mutual TLS needs the client certificate and key"
    )
    _refuse_key_text(f"--{prefix}client-key", key)
    return ClientTls(root_certificates=root, certificate_chain=cert, private_key=key, server_name=server_name)


def _refuse_key_text(flag: str, key: Optional[str]) -> None:
    """Refuse a private key given as its PEM text rather than a file's path: every user of the machine reads a
    command line in the process list (``ps``), and the key with it."""
    if key is not None and "-----BEGIN" in key:
        raise ConfigurationError(
            f"{flag} takes the path of a file holding the private key, not the key itself: every user of this "
            "machine reads a command line in the process list (ps)"
        )


def _refuse_half_pair(cert_flag: str, cert: Optional[str], key_flag: str, key: Optional[str], why: str) -> None:
    """Refuse a certificate flag given without its key flag, or the reverse, naming both flags."""
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise ConfigurationError(f"{given} needs {missing}: {why}")


def flag_address(flag: str, address: str, tls: bool = False) -> Address:
    """``address`` as ``parse_address`` reads it, a malformed one refused naming ``flag`` too ("bad address 'foo':
    expected host:port" alone left the user to guess which of several flags held it)."""
    try:
        return parse_address(address, tls=tls)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{flag}: {exc}") from None


def make_folder(path: str, flag: str, writable: bool = False) -> None:
    """Create the folder a flag names (and its parents), or a ConfigurationError naming the flag: before anything
    starts, rather than as the Python API words it, or once an Executor has loaded. ``writable``: one that is
    there but read-only is refused too (a workspace: every request saving to it would fail, as a Deployment
    refuses it)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"{flag} {path!r}: cannot create it: {exc.strerror or exc}") from None
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{flag} {path!r}: not writable by this process")


def json_object(text: str, flag: str, pipe_wait: float = PIPE_WAIT) -> dict:
    """Parse a JSON object given on the command line, or in a file given as ``@FILE`` (one too long for a
    command line, whose every argument Linux caps at 128 KiB; a pipe has ``pipe_wait`` seconds to end); a clear
    error names the flag."""
    if text.startswith("@"):  # no JSON text starts so
        try:
            text = read_small_file(
                text[1:], MAX_JSON_FILE_BYTES, f"{flag} @FILE", pipes=True, pipe_wait=pipe_wait
            ).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{flag} {text}: the file is not UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{flag} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigurationError(f"{flag} nests lists and objects deeper than JSON here can read") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value
