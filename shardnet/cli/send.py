"""``shardnet send``: post one request to a head or worker and print the answer."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from google.protobuf import empty_pb2

from shardnet.cli.options import add_client_tls_arguments, client_tls, json_object, message_megabytes
from shardnet.errors import ReplicaError
from shardnet.networking import oneshot
from shardnet.runtimes.executor import DEFAULT_ENDPOINT
from shardnet.networking.channels import DEFAULT_MAX_MESSAGE_BYTES, message_size_options
from shardnet.networking.policies import check_timeout
from shardnet.protocol.documents import Document
from shardnet.protocol.messages import DataRequest

logger = logging.getLogger("shardnet.send")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("send", help="send documents to an endpoint and print the response")
    parser.add_argument("target", help="HOST:PORT (https://HOST:PORT for TLS)")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--text", action="append", default=[], help="a document's text (repeatable)")
    parser.add_argument("--parameters", default="{}", help="JSON object")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument(
        "--max-message-mb", type=message_megabytes, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
        help="largest request or answer, in MB",
    )
    add_client_tls_arguments(parser)
    parser.set_defaults(handler=run)


async def _discovered_endpoints(target: str, tls, timeout: float) -> list[str]:
    reply, _ = await oneshot.call_once("discovery", empty_pb2.Empty(), target, timeout=timeout, tls=tls)
    return list(reply.endpoints)


async def send(args: argparse.Namespace) -> int:
    parameters = json_object(args.parameters, "--parameters")
    check_timeout(args.timeout, "--timeout")
    tls = client_tls(args)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    try:  # the check is advisory: it gets half of --timeout, the request what is left
        endpoints = await _discovered_endpoints(args.target, tls, args.timeout / 2)
    except ReplicaError as exc:
        logger.warning("could not discover the endpoints of %s: %s", args.target, exc)
        endpoints = None
    if endpoints is not None and args.endpoint not in endpoints and DEFAULT_ENDPOINT not in endpoints:
        logger.warning(
            "%s is not among the endpoints %s serves (%s): it will come back unchanged unless a default handler takes it",
            args.endpoint,
            args.target,
            ", ".join(endpoints) or "none",
        )
    request = DataRequest([Document(text=text) for text in args.text], endpoint=args.endpoint, parameters=parameters)
    response = await oneshot.send_request_async(
        request, args.target, timeout=deadline - loop.time(), tls=tls,
        channel_options=message_size_options(int(args.max_message_mb * 2**20)),
    )
    print(json.dumps(describe(response), indent=2))
    return 1 if response.is_error else 0


def describe(response: DataRequest) -> dict:
    """A JSON-friendly view of a response for people reading a terminal."""
    def doc(d: Document) -> dict:
        view = {"id": d.id, "text": d.text}
        if len(d.tags):
            view["tags"] = dict(d.tags)
        if d.scores:
            view["scores"] = d.scores
        if len(d.matches):
            view["matches"] = [doc(m) for m in d.matches]
        return view

    status = response.status
    result = {"request_id": response.request_id, "status": "ERROR" if response.is_error else "SUCCESS"}
    if response.is_error:
        result["error"] = status.description
        if status.exception.executor:  # who raised it, as Deployment.post says
            result["executor"] = status.exception.executor
    parameters = response.parameters
    if parameters:  # dict results travel here, under "__results__"
        result["parameters"] = parameters
    result["docs"] = [doc(d) for d in response.docs]
    return result


def run(args: argparse.Namespace) -> int:
    return asyncio.run(send(args))
