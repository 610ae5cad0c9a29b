"""gRPC channels and the per-channel callables for each Jina method.

Callables are built once per channel (never per request); data calls take and
return ``DataRequest`` objects whose bytes pass through untouched (decoded
only when read), and the ``decoded_*`` variants decode each reply on arrival.
A reply that does not decode comes back as a ``MalformedReply``; callers pass
replies through ``checked_reply``, which raises a MalformedReplyError naming
the replica.
"""

from __future__ import annotations

import asyncio as _asyncio
import errno
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import grpc
import grpc.aio
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2

from shardnet.errors import ConfigurationError, MalformedReplyError, ProtocolError
from shardnet.networking.addresses import Address, parse_address
from shardnet.networking.streams import RequestStreams, rpc_error
from shardnet.networking.tls import ClientTls, PemSource
from shardnet.protocol import services
from shardnet.protocol.messages import MAX_ANSWER_FIELDS, ControlRequest, DataRequest
from shardnet.protocol.proto import jina_pb2

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's message size limits are 32-bit signed byte counts
MAX_MESSAGE_MB = MAX_MESSAGE_BYTES // 2**20  # 2047: the largest whole number of MB under it
KEEPALIVE_TIMEOUT = "grpc.keepalive_timeout_ms"
PING_TIMEOUT = "grpc.http2.ping_timeout_ms"
# how long gRPC 1.78 lets one connection attempt last (20 s unless set): closing its channel does not cut it, so one
# to a replica the kernel accepts for but that never answers (stopped, hung) outlives the channel by that long
CONNECT_TIMEOUT = "grpc.min_reconnect_backoff_ms"
ChannelOptions = Union[Sequence[tuple[str, Any]], Mapping[str, Any]]


def default_grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options every shardnet channel and server uses: bounded messages, keepalive, no proxy.

    gRPC's own retries are off because the pool fails over across replicas itself.
    """
    return [
        *message_size_options(max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        (KEEPALIVE_TIMEOUT, 10_000),
        # what gRPC 1.78 actually times an unanswered keepalive ping out by (60 s unless set): a stopped or cut-off
        # peer held untimed calls for 90 s, not the 40 s the two lines above say
        (PING_TIMEOUT, 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
        # a channel of its own connections: rebuilding a failing channel really reconnects
        ("grpc.use_local_subchannel_pool", 1),
    ]


def compression_options(compression: Union[str, grpc.Compression, None]) -> tuple[tuple[str, Any], ...]:
    """The channel option that compresses every call, from a ``grpc.Compression`` or its name (as Jina takes it)."""
    if compression is None:
        return ()
    if isinstance(compression, str):
        try:
            compression = grpc.Compression[compression]
        except KeyError:
            names = ", ".join(member.name for member in grpc.Compression)
            raise ConfigurationError(f"compression {compression!r}: expected one of {names}") from None
    if not isinstance(compression, grpc.Compression):
        raise ConfigurationError(f"compression takes a grpc.Compression or its name, got {compression!r}")
    return (("grpc.default_compression_algorithm", int(compression)),)


def check_max_message_mb(value: Any, what: str = "max_message_mb") -> float:
    """A message size limit in MB as the processes' --max-message-mb takes it: above 0, at most MAX_MESSAGE_MB."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_MESSAGE_MB or int(value * 2**20) < 1:
        raise ConfigurationError(f"{what} must be a number of megabytes above 0 and at most {MAX_MESSAGE_MB}, got {value!r}")
    return float(value)


def message_size_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """The channel options that set both message size limits: a head dials its workers with its own limit."""
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def error_cause(error: grpc.aio.AioRpcError) -> str:
    """An AioRpcError's details, with a word on whose limit it was when this side refused a message as too large.

    The details are the peer's words (up to gRPC's 16 KB of metadata): what is not printable (a newline, an ANSI
    or OSC escape) is written as Python's ``repr`` writes it and the text cut at MAX_DETAILS_CHARS, so that a
    ReplicaError printed on a terminal, or logged by the caller, cannot move the cursor or start a line of its own.
    """
    cause = shown_details(error.details()) or error.code().name
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and cause.startswith("CLIENT:"):
        cause += (
            " (the calling side's own message size limit, not the replica's: raise it with --max-message-mb, "
            "Deployment(max_message_mb=...) or the grpc.max_send/receive_message_length channel options)"
        )
    elif error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and cause.startswith("SERVER: Received message larger"):
        cause += (
            " (the receiving server's message size limit: raise that worker's or head's --max-message-mb, or "
            "Deployment(max_message_mb=...))"
        )
    return cause


MAX_DETAILS_CHARS = 2000  # of a peer's status details in an error's message


def shown_details(details: Optional[str]) -> str:
    """A peer's status details as an error may say them: non-printable characters escaped, cut at a bound."""
    if not details:
        return ""
    cut = details[:MAX_DETAILS_CHARS]
    if not cut.isprintable():
        cut = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in cut)
    if len(details) > MAX_DETAILS_CHARS:
        cut += f"... ({len(details)} characters)"
    return cut


def never_connected_note(channel: grpc.aio.Channel) -> str:
    """For a call that ran out of time: a word when its channel is still setting up its connection, so that an
    unreachable replica, a stopped one, or a port whose server takes TCP but never speaks gRPC, is not taken for
    a slow one."""
    if channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.CONNECTING:
        return ""
    return (
        "its connection is not (re)established: an unreachable host, a stopped or hung server process (its kernel still "
        "takes TCP), or a port whose server does not speak gRPC"
    )


def checked_options(options: Optional[ChannelOptions]) -> tuple[tuple[str, Any], ...]:
    """Channel options as a tuple of (name, value) pairs, or a ConfigurationError naming the one gRPC would trip on.

    A dict of name to value is taken too, as Jina takes it.
    """
    checked = []
    if isinstance(options, Mapping):
        options = list(options.items())
    for option in options or ():
        if not (isinstance(option, (tuple, list)) and len(option) == 2):
            raise ConfigurationError(f"channel options are (name, value) pairs, got {option!r}")
        name, value = option
        if not isinstance(name, str) or not isinstance(value, (int, str, bytes)):
            raise ConfigurationError(f"channel option {option!r}: the name is text and the value a number or text")
        checked.append((name, value))
    return tuple(checked)


def merge_options(options: Optional[ChannelOptions]) -> list[tuple[str, Any]]:
    """The defaults, with any option named in ``options`` replaced by the caller's value."""
    given = dict(options or ())
    if KEEPALIVE_TIMEOUT in given and PING_TIMEOUT not in given:  # a keepalive timeout given is the one that holds
        given[PING_TIMEOUT] = given[KEEPALIVE_TIMEOUT]
    merged = [(key, given.pop(key, value)) for key, value in default_grpc_options()]
    return merged + list(given.items())


def message_limits(options: Optional[ChannelOptions]) -> tuple[int, int]:
    """The (send, receive) message limits a channel with ``options`` has, in bytes (-1: none)."""
    merged = dict(merge_options(options))
    return int(merged["grpc.max_send_message_length"]), int(merged["grpc.max_receive_message_length"])


def tls_settings(
    https: bool, tls: Union[bool, ClientTls, None], root_certificates: PemSource = None
) -> tuple[bool, Optional[ClientTls]]:
    """``(https, tls)`` with Jina's ``tls=True``/``False`` read as ``https``; anything else but a ClientTls refused.

    ``root_certificates`` given means TLS, trusting them, whatever the flag says (as the command line's
    ``--root-ca`` does): Jina ignores a CA given without its flag, so a caller who gave one would talk in
    cleartext without knowing. Given beside a ClientTls, one of the two would be dropped: refused. An empty one
    (``''``, ``b''``) is none, as Jina code passes it with the flag off."""
    if isinstance(tls, bool):
        https, tls = bool(https) or tls, None
    elif tls is not None and not isinstance(tls, ClientTls):
        raise ConfigurationError(f"tls takes a ClientTls (or True/False, as in Jina), got a {type(tls).__name__}")
    if root_certificates is None or (isinstance(root_certificates, (str, bytes)) and not root_certificates):
        return bool(https), tls
    if tls is not None:
        raise ConfigurationError(
            "root certificates given twice, as root_certificates= and as tls=ClientTls(...): one would be "
            "dropped; give them in the ClientTls (ClientTls(root_certificates=...)) alone"
        )
    return True, ClientTls(root_certificates=root_certificates)


def tolerate_grpc_poller_race(loop: _asyncio.AbstractEventLoop, context: dict) -> None:
    """An event loop exception handler that drops the BlockingIOError grpc.aio's poller raises when several
    loops read its wake-up socket (grpc/grpc#25364: spurious, no call is affected); the rest goes on as usual."""
    exception = context.get("exception")
    if isinstance(exception, OSError) and _raised_by_grpc_poller(exception, context.get("handle")):
        # BlockingIOError: another loop read the wake-up byte first; EBADF: the poller that socket belonged to
        # was shut down (the last grpc.aio loop of the process closed) while this loop's reader was due
        if isinstance(exception, BlockingIOError) or exception.errno == errno.EBADF:
            return
    loop.default_exception_handler(context)


def _raised_by_grpc_poller(exception: BaseException, handle: Any) -> bool:
    """Whether grpc.aio's PollerCompletionQueue._handle_events raised ``exception``: its handle names it, unless
    the handle was cancelled meanwhile (its repr is then "<Handle cancelled>"), so its traceback is read too."""
    if "PollerCompletionQueue" in repr(handle):
        return True
    frames = traceback.extract_tb(exception.__traceback__)
    return any(frame.name.endswith("PollerCompletionQueue._handle_events") for frame in frames)


def tolerate_poller_race_here() -> None:
    """Drop grpc.aio's poller race (``tolerate_grpc_poller_race``) on the running event loop, unless the program
    set an exception handler of its own there. A blocking helper (``send_request_sync``, ``Deployment.post``)
    called from another thread runs a grpc.aio loop of its own (``oneshot.run_sync``), and grpc.aio's
    process-wide poller then wakes every grpc.aio loop: a worker's serving loop (its blocking handlers calling
    such helpers) or a program's pool logged an "Exception in callback PollerCompletionQueue._handle_events"
    traceback at ERROR for about one call in four, under asyncio and uvloop alike."""
    loop = _asyncio._get_running_loop()
    if loop is not None and loop.get_exception_handler() is None:
        loop.set_exception_handler(tolerate_grpc_poller_race)


def get_grpc_channel(
    address: Union[str, Address],
    options: Optional[ChannelOptions] = None,
    asyncio: bool = False,
    https: bool = False,
    root_certificates: PemSource = None,
    tls: Union[bool, ClientTls, None] = None,
) -> Union[grpc.Channel, grpc.aio.Channel]:
    """Open a channel to ``address``: TLS when the address says https/grpcs, ``https`` is set, or TLS material
    is given (``root_certificates`` or a ``tls`` ClientTls; both at once are refused).

    The fourth argument is Jina's ``tls`` flag under the name ``https``; ``tls`` also takes that flag. Unlike
    Jina, root certificates given without the flag turn TLS on rather than being ignored (see tls_settings).
    Every shardnet channel is made here, so a secure one always carries its ClientTls's channel options.
    """
    https, tls = tls_settings(https, tls, root_certificates)
    parsed = address if isinstance(address, Address) else parse_address(address, tls=https)
    use_tls = parsed.tls or https or tls is not None
    module = grpc.aio if asyncio else grpc
    if asyncio:
        tolerate_poller_race_here()
    if use_tls:
        tls = tls or ClientTls()
        opts = merge_options(_with_tls_options(options, tls))
        return module.secure_channel(parsed.dial_target, tls.credentials(), options=opts)
    return module.insecure_channel(parsed.dial_target, options=merge_options(options))


def _with_tls_options(options: Optional[ChannelOptions], tls: ClientTls) -> list[tuple[str, Any]]:
    """``options`` and the ClientTls's own (its server name); the same option given both ways with two values is
    refused naming both, rather than one silently winning."""
    given = dict(options or ())
    for name, value in tls.channel_options():
        if given.setdefault(name, value) != value:
            raise ConfigurationError(
                f"channel option {name}={given[name]!r} contradicts ClientTls(server_name={value!r}): give it once"
            )
    return list(given.items())


class MalformedReply:
    """Stands in for a reply whose bytes did not decode; :func:`checked_reply` raises its error.

    grpc.aio swallows an exception raised by a response deserializer and hands
    the caller a bare None, so decoding errors are carried out this way instead.
    """

    __slots__ = ("error",)

    def __init__(self, error: ProtocolError):
        self.error = error

    def __repr__(self) -> str:
        return f"<MalformedReply {self.error}>"


def _decoding(parse: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    """A response deserializer that returns a MalformedReply instead of raising."""

    def decode(data: Optional[bytes]) -> Any:
        if data is None:  # no message at all: checked_reply says what that means
            return None
        try:
            return parse(data)
        except ProtocolError as exc:
            return MalformedReply(exc)
        except Exception as exc:  # protobuf's DecodeError and friends
            return MalformedReply(ProtocolError(f"malformed {what} ({len(data)} bytes): {exc}"))

    return decode


# how gRPC says it reached no server at all (a status a server sent starts with that server's own words)
NOT_CONNECTED = ("failed to connect to all addresses", "dns resolution failed")


def never_reached(error: BaseException) -> bool:
    """An UNAVAILABLE that no handler saw: no connection was made, or a shardnet server refused it as it drains.
    Not "socket closed", a stream that broke, a call cut, nor a head passing on its worker's UNAVAILABLE: the
    work may have been done. Only such a request may be sent again where running twice would matter."""
    # grpc.aio's error, or a blocking channel's (oneshot.call_once_blocking: Deployment.members(), _forget)
    if not isinstance(error, (grpc.aio.AioRpcError, grpc.Call)) or error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (error.details() or "").lower()
    return details.startswith(NOT_CONNECTED) or details in services.NEVER_RAN_DETAILS


def tls_mismatch(error: grpc.aio.AioRpcError, address: Address, tls: Optional[ClientTls]) -> Optional[str]:
    """How gRPC's words for this channel's own failed connection suggest the two ends' TLS disagree, if they do:
    "plaintext" (dialled in plaintext, closed at once), "no client certificate", "client certificate refused"
    (dialled over TLS, closed at once), "tls at plaintext" (a handshake answered in plaintext); else None.

    Not a status a server sent: a head relaying its worker's failure speaks of another hop. Read only once a
    call has failed, never on a call's way."""
    details = (error.details() or "").lower()
    if not details.startswith(NOT_CONNECTED):
        return None
    # a server that closes a connection at once says no more: TLS the likeliest cause, not the only one
    if "socket closed" in details:
        if not address.tls:
            return "plaintext"
        return "no client certificate" if tls is None or tls.certificate_chain is None else "client certificate refused"
    if address.tls and "wrong_version_number" in details:
        return "tls at plaintext"
    return None


# what a one-off call, and what a pool about one of its replicas, append to an error for each ``tls_mismatch``: a
# pool's words reach a head's callers too, so they name the hop (the replica, dialled by the pool) and what the
# pool or head is given, never the caller's own dial
_CALL_TLS_WORDS = {
    "plaintext": " (the server closed the connection at once: if it serves TLS, this call was plaintext: dial "
                 "https://{target} with its CA)",
    "no client certificate": " (the server closed the connection at once: if it requires client certificates "
                             "(mutual TLS), this call presented none)",
    "client certificate refused": " (the server closed the connection at once: if it requires client certificates "
                                  "(mutual TLS), it does not trust the one this call presented)",
    "tls at plaintext": " (the server seems to serve plaintext and this call was TLS)",
}
_REPLICA_TLS_WORDS = {
    "plaintext": " (the replica closed the connection at once: if it serves TLS, it was dialled in plaintext: give "
                 "the pool a ClientTls trusting its CA, a head --root-ca)",
    "no client certificate": " (the replica closed the connection at once: if it requires client certificates "
                             "(mutual TLS), none was presented: give the pool's ClientTls one, a head --client-cert "
                             "and --client-key)",
    "client certificate refused": " (the replica closed the connection at once: if it requires client "
                                  "certificates (mutual TLS), it does not trust the one presented)",
    "tls at plaintext": " (the replica appears to serve plaintext, and it was dialled over TLS)",
}


def tls_diagnosis(error: grpc.aio.AioRpcError, address: Address, tls: Optional[ClientTls]) -> str:
    """A one-off call's words on ``tls_mismatch``, to append to its error ("" when none applies)."""
    words = _CALL_TLS_WORDS.get(tls_mismatch(error, address, tls), "")
    return words.format(target=address.target)


def replica_tls_diagnosis(error: grpc.aio.AioRpcError, address: Address, tls: Optional[ClientTls]) -> str:
    """A pool's words on ``tls_mismatch`` for one of its replicas ("" when none applies)."""
    return _REPLICA_TLS_WORDS.get(tls_mismatch(error, address, tls), "")


def refused_as_draining(error: grpc.aio.AioRpcError) -> bool:
    """A shardnet server's own refusal as it drains (never a head passing on its worker's: that one names the
    worker): the replica that answered so takes no more calls until its next process serves."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and error.details() == services.DRAINING_DETAILS


def checked_reply(response: Any, address: Any, owner: str = "", timed: bool = False, role: str = "replica") -> Any:
    """``response``, or a MalformedReplyError (a ProtocolError) naming the replica (and the ``owner`` list it
    belongs to, "dep/shard-0") when its reply did not decode.

    No response at all (None) is an AioRpcError: grpc.aio ends a call now and then with status OK and no
    message when its deadline expires as the answer is on its way. A ``timed`` call (one with a deadline)
    gets DEADLINE_EXCEEDED, as its peers do; an untimed one UNAVAILABLE, which fails over.
    """
    if isinstance(response, MalformedReply):
        raise MalformedReplyError(str(response.error), address=str(address), owner=owner, role=role) from None
    if response is None:
        code = grpc.StatusCode.DEADLINE_EXCEEDED if timed else grpc.StatusCode.UNAVAILABLE
        raise rpc_error(code, f"{address} ended the call without an answer (status OK, no message)")
    return response


def _lazy_reply(origin: Optional[str]) -> Callable[[Optional[bytes]], Optional[DataRequest]]:
    """The deserializer of forwarded replies: wrapped, not decoded; no message stays None (see checked_reply)."""

    def wrap(data: Optional[bytes]) -> Optional[DataRequest]:
        if data is None:
            return None
        return DataRequest.from_bytes(data, origin=origin, max_documents=None, max_fields=MAX_ANSWER_FIELDS)

    return wrap


_HEADER_KEY = re.compile(r"[0-9a-z_.\-]+\Z")


def checked_metadata(pairs: Union[Sequence[tuple[str, Any]], Mapping[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """``pairs`` (or a dict, as Jina callers write metadata) as a tuple, or a ProtocolError naming the first pair
    gRPC would refuse.

    gRPC refuses such metadata deep in its C core with an error that names
    neither the key nor the rule; here a key must be lowercase ASCII letters,
    digits, ``-``, ``_`` or ``.`` (not ``grpc-`` reserved), a ``-bin`` key takes
    bytes and any other key printable ASCII text.
    """
    if isinstance(pairs, Mapping):
        pairs = tuple(pairs.items())
    checked = []
    for pair in pairs:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise ProtocolError(f"metadata must be (key, value) pairs, got {pair!r}") from None
        if not isinstance(key, str) or not _HEADER_KEY.match(key) or key.startswith("grpc-"):
            raise ProtocolError(
                f"metadata key {key!r} is not a gRPC header name: lowercase ASCII letters, digits, '-', '_' or '.', "
                "not starting with 'grpc-'"
            )
        if key.endswith("-bin"):
            if not isinstance(value, bytes):
                raise ProtocolError(
                    f"metadata key {key!r} ends in -bin: its value must be bytes, got {type(value).__name__}"
                )
        elif not isinstance(value, str) or not (value.isascii() and value.isprintable()):
            shown = "(not shown: a credential)" if key == services.AUTHORIZATION_METADATA else f"got {value!r}"
            raise ProtocolError(f"metadata value for {key!r} must be printable ASCII text, {shown}")
        checked.append((key, value))
    return tuple(checked)


TOKEN_VARIABLE = "SHARDNET_CONTROL_TOKEN"  # the environment variable a head's and a worker's control token is in


def check_control_token(token: Optional[str]) -> None:
    """Refuse a control token gRPC could not carry (it travels as ``authorization: Bearer TOKEN``), unquoted."""
    if token is None:
        return
    # a space at either end: HTTP/2 forbids it in a header's value, and a token file's line is read stripped, so
    # a deployment writing " s3cret" to its processes' file was refused its own DEACTIVATE (a regression review)
    if not isinstance(token, str) or not token or not (token.isascii() and token.isprintable()) or token != token.strip():
        raise ConfigurationError(
            "the control token must be non-empty printable ASCII text (no newline, no accents, no space at either "
            "end): it travels as gRPC metadata; check SHARDNET_CONTROL_TOKEN or --control-token (the value is not "
            "shown)"
        )


class MetadataCache:
    """``grpc.aio.Metadata`` built once per distinct set of pairs, bounded in size.

    Given a tuple, grpc.aio checks it and builds a Metadata on every call
    (about 2.5 us); a Metadata it takes as is. The pool asks for a call's
    metadata by endpoint (``for_endpoint``), so a request costs one dict
    lookup. Endpoints come from clients, so the cache forgets everything
    when it reaches ``limit`` entries.

    >>> cache = MetadataCache()
    >>> cache.get((("endpoint", "/index"),)) is cache.get((("endpoint", "/index"),))
    True
    >>> list(cache.for_endpoint("/index", (("tenant", "a"),)))
    [('endpoint', '/index'), ('tenant', 'a')]
    """

    def __init__(self, fixed: Sequence[tuple[str, str]] = (), limit: int = 1024):
        self._fixed = checked_metadata(fixed)
        self._limit = limit
        self._built: dict[tuple, grpc.aio.Metadata] = {}
        self._by_endpoint: dict[tuple, grpc.aio.Metadata] = {}

    def get(self, pairs: Optional[Sequence[tuple[str, str]]]) -> Any:
        """A Metadata for a tuple of pairs, checked once (a Metadata or nothing passes through as it is)."""
        # the common case first, and cheaply: a Metadata the pool built (isinstance on an ABC and
        # Metadata's own __len__ are the slow ways to ask)
        kind = type(pairs)
        if kind is grpc.aio.Metadata:
            return pairs
        if kind is tuple:  # the head's metadata: neither check below applies to a tuple
            if not pairs:
                return pairs
        elif not pairs or isinstance(pairs, grpc.aio.Metadata):
            return pairs
        elif isinstance(pairs, Mapping):  # a dict, as Jina callers pass it
            pairs = tuple(pairs.items())
        try:
            metadata = self._built.get(pairs)
        except TypeError:  # a list, or unhashable entries: check and build, without caching
            return grpc.aio.Metadata(*checked_metadata(pairs))
        if metadata is None:
            metadata = self._store(self._built, pairs, grpc.aio.Metadata(*checked_metadata(pairs)))
        return metadata

    def for_endpoint(self, endpoint: Optional[str], extra: Sequence[tuple[str, str]] = ()) -> grpc.aio.Metadata:
        """The ``endpoint`` pair (none for an endpoint gRPC cannot send), then the fixed pairs, then ``extra``;
        ProtocolError for an extra pair gRPC cannot send, ConfigurationError for one naming another endpoint."""
        if extra and type(extra) is not tuple and isinstance(extra, Mapping):  # a dict, as Jina callers pass it
            extra = tuple(extra.items())
        key = (endpoint, extra)
        try:
            metadata = self._by_endpoint.get(key)
        except TypeError:  # unhashable extra pairs: build without caching
            return self._build(endpoint, extra)
        if metadata is None:
            metadata = self._store(self._by_endpoint, key, self._build(endpoint, extra))
        return metadata

    def _build(self, endpoint: Optional[str], extra: Sequence[tuple[str, str]]) -> grpc.aio.Metadata:
        # one gRPC cannot send (it would fail the call) travels in the request's header alone
        sent = endpoint and services.endpoint_fits_metadata(endpoint)
        base = ((services.ENDPOINT_METADATA, endpoint),) if sent else ()
        extra = checked_metadata(extra)
        if endpoint:  # another endpoint among the caller's pairs: heads and workers read the last, not the call's
            for key, value in extra:
                if key == services.ENDPOINT_METADATA and value != endpoint:
                    raise ConfigurationError(
                        f"the metadata names endpoint {value!r:.80} and the call endpoint {endpoint!r:.80}: give one"
                    )
            extra = tuple(pair for pair in extra if pair[0] != services.ENDPOINT_METADATA)
        return grpc.aio.Metadata(*base, *self._fixed, *extra)

    def _store(self, built: dict, key: tuple, metadata: grpc.aio.Metadata) -> grpc.aio.Metadata:
        if len(built) >= self._limit:
            built.clear()
        built[key] = metadata
        return metadata


def check_endpoint_travels(request: Any, endpoint: str) -> None:
    """Refuse an endpoint gRPC cannot send as metadata (``/søg``) unless ``request``'s header carries it, where
    workers read it first: given only beside the request, it would reach no worker."""
    if not services.endpoint_fits_metadata(endpoint) and not (
        isinstance(request, DataRequest) and request.endpoint == endpoint
    ):
        raise ProtocolError(
            f"endpoint {endpoint!r:.80} is not printable ASCII, so it cannot travel as gRPC metadata: set it in the "
            "request's header (DataRequest(endpoint=...)), which workers read"
        )


def _to_bytes(request: Union[DataRequest, ControlRequest]) -> bytes:
    return request.to_bytes()


def _decoded_request(data: bytes) -> DataRequest:
    """A reply decoded at once, so a malformed one fails where the replica that sent it is known."""
    # an answer asked for: a merge may hold more documents, and the hops' additions more fields
    request = DataRequest.from_bytes(data, max_documents=None, max_fields=MAX_ANSWER_FIELDS)
    request.proto  # noqa: B018 - decodes, and refuses pickled docs_bytes
    return request


def _requests_to_bytes(requests: Sequence[DataRequest]) -> bytes:
    envelope = jina_pb2.DataRequestListEnvelope()
    envelope.requests.extend(request.to_bytes() for request in requests)
    return envelope.SerializeToString()


# reply decoders, built once: every channel's callables share them
_CONTROL_REPLY = _decoding(ControlRequest.from_bytes, "ControlRequest")
_ENDPOINTS_REPLY = _decoding(jina_pb2.EndpointsProto.FromString, "Endpoints")
_HEALTH_REPLY = _decoding(health_pb2.HealthCheckResponse.FromString, "HealthCheckResponse")
_DECODED_REPLY = _decoding(_decoded_request, "DataRequest")


@dataclass(frozen=True)
class Stubs:
    """One callable per Jina method on one channel."""

    single_data: grpc.aio.UnaryUnaryMultiCallable
    data: grpc.aio.UnaryUnaryMultiCallable
    control: grpc.aio.UnaryUnaryMultiCallable
    discovery: grpc.aio.UnaryUnaryMultiCallable
    health: grpc.aio.UnaryUnaryMultiCallable
    # replies decoded on arrival, for callers that read every reply anyway (the head merging ALL)
    decoded_single_data: grpc.aio.UnaryUnaryMultiCallable
    decoded_data: grpc.aio.UnaryUnaryMultiCallable

    # the request streams behind single_data and decoded_single_data, when the channel has them
    streams: Optional[RequestStreams] = None

    @classmethod
    def for_channel(
        cls,
        channel: grpc.aio.Channel,
        origin: Optional[str] = None,
        *,
        request_streams: bool = False,
        limits: tuple[int, int] = (DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES),
    ) -> "Stubs":
        """The callables on ``channel``; data replies, decoded lazily, name ``origin`` if they prove malformed.

        ``request_streams``: single requests go as messages on a few streams to a shardnet worker
        (networking/streams.py), unary to any other server; ``limits`` are the channel's (send, receive) limits.
        """
        unary = channel.unary_unary
        data_reply = _lazy_reply(origin)
        single_data = unary(services.PROCESS_SINGLE_DATA, _to_bytes, data_reply)
        decoded_single_data = unary(services.PROCESS_SINGLE_DATA, _to_bytes, _DECODED_REPLY)
        streams = None
        if request_streams:
            streams = RequestStreams(
                channel, single_data, decoded_single_data, _DECODED_REPLY, limits, origin or "the server"
            )
            single_data, decoded_single_data = streams.single_data, streams.decoded_single_data
        return cls(
            single_data=single_data,
            data=unary(services.PROCESS_DATA, _requests_to_bytes, data_reply),
            control=unary(services.PROCESS_CONTROL, _to_bytes, _CONTROL_REPLY),
            discovery=unary(services.ENDPOINT_DISCOVERY, empty_pb2.Empty.SerializeToString, _ENDPOINTS_REPLY),
            health=unary(
                "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.SerializeToString, _HEALTH_REPLY
            ),
            decoded_single_data=decoded_single_data,
            decoded_data=unary(services.PROCESS_DATA, _requests_to_bytes, _DECODED_REPLY),
            streams=streams,
        )


def create_async_channel_stub(
    address: str,
    *,
    https: bool = False,
    root_certificates: PemSource = None,
    options: Optional[ChannelOptions] = None,
    tls: Union[bool, ClientTls, None] = None,
) -> tuple[Stubs, grpc.aio.Channel]:
    """An asyncio channel to ``address`` and its method callables; the caller closes the channel.

    Keywords only: Jina's positional ``(address, deployment_name, metrics, histograms)`` would
    otherwise turn TLS on with a deployment name.
    """
    channel = get_grpc_channel(
        address, options=options, asyncio=True, https=https, root_certificates=root_certificates, tls=tls
    )
    return Stubs.for_channel(channel), channel
