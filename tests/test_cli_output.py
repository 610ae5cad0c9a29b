"""What `shardnet send` and `shardnet status` say: a server's words shown without letting them drive the terminal,
output that cannot be written said in one line with an exit code of its own, and which time ran out (a review of
send and status as an operator's tools)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys

import executors
import grpc
import pytest

from shardnet.cli.main import main as cli_main
from shardnet.protocol.proto import jina_pb2
from shardnet.runtimes.worker import Worker

HOSTILE = "/x\x1b]0;PWNED\x07\x1b[2J\nforged line"


async def _hostile_server(discovery) -> tuple[grpc.aio.Server, str]:
    """A gRPC server answering endpoint discovery with ``discovery`` and echoing every data request."""

    async def echo(request: bytes, context) -> bytes:
        return request

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method.endswith("endpoint_discovery"):
                return grpc.unary_unary_rpc_method_handler(discovery)
            if details.method.endswith("process_single_data"):
                return grpc.unary_unary_rpc_method_handler(echo)
            return None

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _listing(request: bytes, context) -> bytes:
    return jina_pb2.EndpointsProto(endpoints=[HOSTILE, "/y"]).SerializeToString()


async def _failing(request: bytes, context) -> bytes:
    await context.abort(grpc.StatusCode.INTERNAL, "boom" + HOSTILE)


@pytest.mark.parametrize("discovery", [_listing, _failing], ids=["endpoints-listed", "discovery-error"])
async def test_send_warnings_escape_what_the_server_said(discovery, caplog):
    server, address = await _hostile_server(discovery)
    try:
        with caplog.at_level(logging.WARNING, logger="shardnet.send"):
            code = await asyncio.to_thread(cli_main, ["send", address, "--endpoint", "/z", "--timeout", "5"])
    finally:
        await server.stop(None)
    [warned] = [record.getMessage() for record in caplog.records if record.name == "shardnet.send"]
    assert code == 0, warned
    assert "PWNED" in warned and "\x1b" not in warned and "\x07" not in warned and "\n" not in warned, repr(warned)


@pytest.mark.parametrize("command", [["status"], ["send", "--endpoint", "/tag", "--text", "x"]])
async def test_output_that_cannot_be_written_is_one_line_and_not_an_answer_code(runtimes, command):
    worker = await runtimes(Worker(executors.Tagger.create({})))
    with open("/dev/full", "w") as full:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "shardnet", command[0], worker.server.address, *command[1:]],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=30,
        )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 74 and "cannot write its output: No space left on device" in done.stderr, done.stderr


async def test_a_silent_server_is_named_with_the_timeout_that_ran_out(capsys):
    """A server that accepts and never answers: `status` said only "DEADLINE_EXCEEDED: Deadline Exceeded"."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        code = await asyncio.to_thread(cli_main, ["status", address, "--timeout", "0.5"])
    finally:
        silent.close()
    said = capsys.readouterr().err
    assert code == 2 and "within --timeout 0.5s" in said, said


async def test_a_request_the_server_did_not_answer_in_time_says_which_time_and_that_it_may_run(runtimes, capsys):
    worker = await runtimes(Worker(executors.Sleepy.create({})))
    code = await asyncio.to_thread(
        cli_main, ["send", worker.server.address, "--endpoint", "/sleep", "--parameters", '{"seconds": 5}',
                   "--timeout", "1"],
    )
    said = capsys.readouterr().err
    assert code == 2 and "no answer within --timeout 1s" in said and "may still run" in said, said


async def test_a_timeout_spent_in_discovery_names_the_server_as_a_server(monkeypatch, capsys):
    """Discovery answered, but only once --timeout had run out: said of the "replica" the target is not."""
    import shardnet.cli.send as send

    async def slow_discovery(target, tls, timeout):
        await asyncio.sleep(0.3)
        return ["/tag"]

    monkeypatch.setattr(send, "_discovered_endpoints", slow_discovery)
    code = await asyncio.to_thread(cli_main, ["send", "127.0.0.1:9", "--endpoint", "/tag", "--timeout", "0.2"])
    said = capsys.readouterr().err
    assert code == 2 and "ran out during endpoint discovery" in said, said
    assert "server 127.0.0.1:9" in said and "replica" not in said, said


async def test_a_status_started_with_its_output_closed_still_answers_by_its_code(runtimes):
    worker = await runtimes(Worker(executors.Tagger.create({})))
    done = await asyncio.to_thread(
        subprocess.run, f"{sys.executable} -m shardnet status {worker.server.address} >&-", shell=True,
        stderr=subprocess.PIPE, text=True, timeout=30,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
