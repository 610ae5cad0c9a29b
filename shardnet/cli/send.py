"""``shardnet send``: post one request to a head or worker and print the answer."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from typing import Any

import grpc
from google.protobuf import empty_pb2

from shardnet.cli.options import (
    add_client_tls_arguments,
    client_tls,
    json_object,
    message_megabytes,
    positive_seconds,
    shown_endpoints,
)
from shardnet.errors import ConfigurationError, DeadlineExceeded, ProtocolError, ReplicaError
from shardnet.networking import oneshot
from shardnet.networking.channels import DEFAULT_MAX_MESSAGE_BYTES, NOT_CONNECTED, message_size_options
from shardnet.protocol.documents import Document
from shardnet.protocol.messages import DataRequest
from shardnet.runtimes.executor import DEFAULT_ENDPOINT
from shardnet.runtimes.log_lines import printable

logger = logging.getLogger("shardnet.send")
SHOWN_VALUES = 5  # the first values of an embedding or tensor a terminal is shown


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("send", help="send documents to an endpoint and print the response")
    parser.add_argument("target", help="HOST:PORT (https://HOST:PORT for TLS)")
    parser.add_argument(
        "--endpoint", required=True,
        help="the endpoint to call, e.g. /index (`shardnet status` lists those the server serves)",
    )
    parser.add_argument("--text", action="append", default=[], help="a document's text (repeatable)")
    parser.add_argument("--parameters", default="{}", help="JSON object")
    parser.add_argument(
        "--timeout", type=positive_seconds("timeout"), metavar="SECONDS", default=10.0,
        help="seconds the whole send may take, endpoint discovery included (default: %(default)g)",
    )
    parser.add_argument(
        "--max-message-mb", type=message_megabytes, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
        help="largest request or answer, in MiB",
    )
    add_client_tls_arguments(parser)
    parser.set_defaults(handler=run)


async def _discovered_endpoints(target: str, tls, timeout: float) -> list[str]:
    reply, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), target, timeout=timeout, tls=tls)
    return list(reply.endpoints)


# how gRPC itself says it reached no server at all: a status a server sent (a head relaying a failure of its
# workers, say) starts with that server's own words instead
_NOT_REACHED = (*NOT_CONNECTED, "socket closed", "connection reset")


def _target_unreachable(exc: ReplicaError) -> bool:
    """Whether discovery failed because nothing answered at the target: the request would fail the same way, so
    there is nothing to warn about before that error."""
    return exc.code == grpc.StatusCode.UNAVAILABLE and exc.cause.lower().startswith(_NOT_REACHED)


def _request(args: argparse.Namespace, parameters: dict) -> DataRequest:
    """The request the flags describe, or a ConfigurationError naming the flag a value cannot travel in."""
    if not args.endpoint:  # sent, it ran the default handler, if any: never what was meant
        raise ConfigurationError("--endpoint is empty: name the endpoint to call, e.g. /index")
    for flag, values in (("--endpoint", [args.endpoint]), ("--text", args.text)):
        for value in values:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # bytes the terminal's encoding could not decode, kept as surrogates
                raise ConfigurationError(f"{flag} {value!r:.80} is not UTF-8 text") from None
    try:
        return DataRequest([Document(text=text) for text in args.text], endpoint=args.endpoint, parameters=parameters)
    except (TypeError, ValueError) as exc:  # a value protobuf cannot hold (text that is no Unicode, nesting)
        raise ConfigurationError(f"--parameters: {exc}") from None


async def send(args: argparse.Namespace) -> int:
    parameters = json_object(args.parameters, "--parameters")
    _request(args, parameters)  # refused before anything is sent
    tls = client_tls(args)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    try:  # the check is advisory: it gets half of --timeout, the request what is left
        endpoints = await _discovered_endpoints(args.target, tls, args.timeout / 2)
    except ReplicaError as exc:
        # the target itself kept silent (a head answers its workers' failures before the caller's deadline): said
        # once, with the time it had, which is half of --timeout rather than all of it
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise exc.noted(
                f" (no answer to endpoint discovery within {args.timeout / 2:g}s, half of --timeout)"
            ) from None
        if _target_unreachable(exc):
            raise  # said once, as the request would say it
        # the server's words, shown, never obeyed by the terminal (nor beginning a line of their own)
        logger.warning("could not discover the endpoints of %s: %s", printable(args.target), printable(str(exc)))
        endpoints = None
    # a server naming no endpoint (a head with no replica yet) says nothing about this one: its error follows
    if endpoints and args.endpoint not in endpoints and DEFAULT_ENDPOINT not in endpoints:
        logger.warning(
            "%s is not among the endpoints %s serves (%s): it will come back unchanged unless a default handler takes it",
            printable(args.endpoint),
            printable(args.target),
            printable(shown_endpoints(endpoints)),  # as the server listed them: shown as status shows them
        )
    request = _request(args, parameters)
    left = deadline - loop.time()
    if left <= 0:  # discovery answered, but took it all
        raise DeadlineExceeded(
            f"--timeout {args.timeout:g}s ran out during endpoint discovery, before the request was sent",
            address=args.target, code=grpc.StatusCode.DEADLINE_EXCEEDED, role="server",
        )
    try:
        response = await oneshot.send_request_async(
            request, args.target, timeout=left, tls=tls,
            channel_options=message_size_options(int(args.max_message_mb * 2**20)),
        )
    except ReplicaError as exc:
        if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED or exc.cause != "Deadline Exceeded":
            raise
        # gRPC's own words, the target's silence: which time ran out, and that the request may still run there
        raise exc.noted(
            f" (no answer within --timeout {args.timeout:g}s; the request was sent, and may still run there)"
        ) from None
    print(json.dumps(_strict_json(describe(response)), indent=2, allow_nan=False))
    return 1 if response.is_error else 0


def describe(response: DataRequest) -> dict:
    """A JSON-friendly view of a response for people reading a terminal: an encoder's output is checked by its
    embeddings' shapes and first values."""
    def doc(d: Document) -> dict:
        view: dict = {"id": d.id, "text": d.text}
        if d.proto.uri:
            view["uri"] = d.proto.uri
        if d.proto.HasField("blob"):
            view["blob"] = f"{len(d.proto.blob)} bytes"
        for field in ("tensor", "embedding"):
            if d.proto.HasField(field):
                view[field] = _array(d, field)
        if len(d.tags):
            view["tags"] = dict(d.tags)
        if d.scores:
            view["scores"] = {name: float(score) for name, score in d.scores.items()}
        for nested in ("chunks", "matches"):
            if len(getattr(d, nested)):
                view[nested] = [doc(m) for m in getattr(d, nested)]
        return view

    status = response._header().status
    result = {"request_id": response.request_id, "status": "ERROR" if response.is_error else "SUCCESS"}
    if response.is_error:
        result["error"] = status.description
        if status.exception.name:  # an Executor's exception, or the head's ReplicaLost: a replica died or hung with it
            result["exception"] = status.exception.name
        if status.exception.executor:  # who raised it, as Deployment.post says
            result["executor"] = status.exception.executor
    parameters = response.parameters
    if parameters:  # dict results travel here, under "__results__"
        result["parameters"] = parameters
    result["docs"] = [doc(d) for d in response.docs]
    return result


def _array(document: Document, field: str) -> dict:
    """An array's shape, dtype and first values (a terminal is no place for the rest), or why it cannot be read."""
    try:
        array = getattr(document, field)
    except ProtocolError as exc:
        return {"unreadable": str(exc)}
    first = array.reshape(-1)[:SHOWN_VALUES].tolist()
    # JSON has numbers of float64's range and no complex: others (complex, float128's own type) as text
    values = [value if isinstance(value, (bool, int, float)) else str(value) for value in first]
    return {"shape": list(array.shape), "dtype": str(array.dtype), "first": values}


def _strict_json(value: Any) -> Any:
    """``value`` with every NaN and infinity as the text protobuf's JSON mapping writes ("NaN", "Infinity",
    "-Infinity"): JSON has no such numbers, and a strict parser (a browser's, jq's) refuses Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict_json(item) for item in value]
    return value


def run(args: argparse.Namespace) -> int:
    return asyncio.run(send(args))
