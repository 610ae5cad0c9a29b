"""``shardnet status`` against a head checks every replica the head routes to, and its exit code says how it went.

In-process heads in front of in-process workers on free loopback ports; a replica "down" is a worker stopped after
the head started, or an address nothing listens on (as ``--connection`` to a port of nothing gives).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import executors
from grpc_health.v1 import health_pb2

from shardnet import Executor, requests
from shardnet.cli.main import main as cli_main
from shardnet.cli.status import DEGRADED, _replica_notes
from shardnet.runtimes.head import Head
from shardnet.runtimes.processes import ShardnetProcess, stop_all
from shardnet.runtimes.replica_check import REUSE_SECONDS
from shardnet.runtimes.server import ServerConfig
from shardnet.runtimes.worker import Worker
from shardnet.testing import eventually

EXECUTORS = Path(executors.__file__).resolve()


async def workers(runtimes, count: int) -> list[Worker]:
    return [await runtimes(Worker(executors.Tagger.create({}))) for _ in range(count)]


async def status(capsys, address: str, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", address, *flags])
    return code, capsys.readouterr().out


async def test_every_replica_serving_exits_0_and_says_so(runtimes, capsys):
    a, b, c = await workers(runtimes, 3)
    head = await runtimes(Head("all-up", connections={0: [a.server.address, b.server.address], 1: [c.server.address]}))
    code, printed = await status(capsys, head.server.address)
    assert code == 0, printed
    assert f"  shard 0: {a.server.address}\n" in printed and f"  shard 1: {c.server.address}\n" in printed
    assert "replica health: all 3 listed replicas serving" in printed, printed


async def test_a_replica_down_beside_a_live_one_is_degraded_naming_its_shard_address_and_cause(
    runtimes, capsys, dead_address
):
    """Exited 0: the head routes around it, but the shard is served by one replica out of two."""
    a, b = await workers(runtimes, 2)
    head = await runtimes(Head("half", connections={0: [a.server.address, dead_address], 1: [b.server.address]}))
    code, printed = await status(capsys, head.server.address)
    assert code == DEGRADED, printed
    assert re.search(rf"  shard 0: {dead_address} \(down: unreachable: .*connection refused", printed, re.I), printed
    assert f"  shard 0: {a.server.address}\n" in printed
    assert "replica health: 1 of 3 replicas down, every shard has a serving one (degraded)" in printed, printed


async def test_a_replica_stopped_after_the_head_started_is_named_down(runtimes, capsys):
    """Once the check the head reuses for REUSE_SECONDS (saying how old it is) has aged out."""
    a, b = await workers(runtimes, 2)
    head = await runtimes(Head("stopped", connections={0: [a.server.address, b.server.address]}))
    assert (await status(capsys, head.server.address))[0] == 0
    await b.stop(0)
    answers = []

    async def degraded() -> bool:
        answers.append(await status(capsys, head.server.address))
        return answers[-1][0] != 0

    await eventually(degraded, timeout=REUSE_SECONDS + 3)
    code, printed = answers[-1]
    reused = r"all 2 listed replicas serving \(as checked (0\.[0-9]+|1\.00)s ago\)"  # to REUSE_SECONDS, inclusive
    assert all(re.search(reused, said) for _, said in answers[:-1])
    assert code == DEGRADED, printed
    assert re.search(rf"  shard 0: {b.server.address} \(down: unreachable: ", printed), printed


async def test_a_shard_whose_only_replica_is_down_exits_1_naming_the_shard(runtimes, capsys):
    """The endpoints still list (shard 0 answers them), the head is SERVING and ready: the exit said all is well
    while every request to shard 1 failed."""
    a, b = await workers(runtimes, 2)
    head = await runtimes(Head("one-dead", connections={0: [a.server.address], 1: [b.server.address]}))
    await b.stop(0)
    code, printed = await status(capsys, head.server.address)
    assert code == 1, printed
    assert "endpoints: " in printed and "endpoints: unknown" not in printed, printed
    assert re.search(rf"  shard 1: {b.server.address} \(down: unreachable: ", printed), printed
    assert "  shard 1: no serving replica\n" in printed
    assert "replica health: 1 of 2 replicas down, shard 1 has none serving" in printed, printed


async def test_a_stopped_replica_is_named_as_not_answering_within_the_timeout(runtimes, capsys, tmp_path):
    """A worker under SIGSTOP takes connections (the kernel does) and never answers: the check must not hang on
    it, and --timeout bounds the whole of it (the head's endpoint listing and its check side by side)."""
    [live] = await workers(runtimes, 1)
    stopped = ShardnetProcess("worker", ["worker", "--uses", f"{EXECUTORS}:Tagger", "--port", "0"], tmp_path / "w.log")
    try:
        address = await asyncio.to_thread(stopped.launch().wait_ready, 30.0)
        head = await runtimes(Head("hung", connections={0: [live.server.address], 1: [address]}))
        os.kill(stopped.pid, signal.SIGSTOP)
        began = time.monotonic()
        code, printed = await status(capsys, head.server.address, "--timeout", "2")
        took = time.monotonic() - began
    finally:
        if stopped.alive:
            os.kill(stopped.pid, signal.SIGCONT)  # else it holds its SIGTERM until resumed
        await asyncio.to_thread(stop_all, [stopped])
    assert code == 1, printed
    assert took < 3.2, f"status --timeout 2 took {took:.1f}s"  # one after the other, its calls took 4 s
    assert re.search(rf"  shard 1: {address} \(down: not answering within 1s\)\n", printed), printed
    assert "  shard 1: no serving replica\n" in printed and "endpoints: unknown" not in printed, printed


async def test_status_and_send_leave_jinas_readiness_check_out_of_the_endpoints_they_list(runtimes, capsys, caplog):
    """A worker serves and discovery lists ``_jina_dry_run_`` (as Jina's do, for Client.is_flow_ready()): no
    endpoint anyone posts to, and `status` listed it beside /tag, `send` among the endpoints served."""
    [worker] = await workers(runtimes, 1)
    code, printed = await status(capsys, worker.server.address)
    assert code == 0 and re.search(r"^endpoints: .*/tag", printed, re.M), printed
    assert "_jina_dry_run_" not in printed, printed
    with caplog.at_level(logging.WARNING, logger="shardnet.send"):  # pytest's logging: the CLI leaves it be
        code = await asyncio.to_thread(cli_main, ["send", worker.server.address, "--endpoint", "/nope", "--text", "x"])
    [warned] = [record.getMessage() for record in caplog.records if "is not among the endpoints" in record.getMessage()]
    assert code == 0 and warned.startswith("/nope is not among the endpoints") and "/tag" in warned, warned
    assert "_jina_dry_run_" not in warned, warned


async def hopping_head(runtimes, name: str) -> tuple[Head, Worker, Worker, Worker]:
    """A head of one shard with a uses_before and a uses_after worker: (head, before, shard's worker, after)."""
    before, worker, after = await workers(runtimes, 3)
    head = await runtimes(
        Head(name, connections={0: [worker.server.address]}, uses_before=before.server.address,
             uses_after=after.server.address)
    )
    return head, before, worker, after


async def test_a_heads_uses_before_and_uses_after_workers_are_listed_and_checked(runtimes, capsys):
    head, before, worker, after = await hopping_head(runtimes, "hops-up")
    code, printed = await status(capsys, head.server.address)
    assert code == 0, printed
    assert f"replicas:\n  shard 0: {worker.server.address}\n" in printed, printed
    assert f"  uses_before: {before.server.address}\n  uses_after: {after.server.address}\n" in printed, printed
    assert "replica health: all 3 listed replicas serving" in printed, printed


async def test_a_uses_after_worker_down_is_named_with_its_cause_and_exits_1(runtimes, capsys):
    """Every request through the head fails then: status said "all 1 replicas serving" and named it nowhere."""
    head, _, _, after = await hopping_head(runtimes, "hop-down")
    await after.stop(0)
    code, printed = await status(capsys, head.server.address)
    assert code == 1, printed
    assert re.search(rf"  uses_after: {after.server.address} \(down: unreachable: .*connection refused", printed, re.I)
    assert "  uses_after: no serving replica\n" in printed, printed
    assert "replica health: 1 of 3 replicas down, uses_after has none serving" in printed, printed


async def test_a_uses_before_worker_not_serving_exits_1_though_the_endpoints_list(runtimes, capsys):
    """Its endpoints still list (it answers discovery), so nothing else made the exit 1 (health NOT_SERVING: a
    worker still starting, say)."""
    head, before, _, _ = await hopping_head(runtimes, "hop-not-serving")
    await before.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, printed = await status(capsys, head.server.address)
    assert code == 1, printed
    assert "endpoints: unknown" not in printed, printed
    assert f"  uses_before: {before.server.address} (down: health NOT_SERVING)\n" in printed, printed
    assert "  uses_before: no serving replica\n" in printed, printed


async def test_a_hop_left_with_no_replica_is_named_and_exits_1(runtimes, capsys):
    """As discovery leaves it when the hop's last pod goes: no replica to check, and every request fails."""
    head, _, worker, after = await hopping_head(runtimes, "hop-empty")
    await head.pool.remove_connection("hop-empty/uses_after", after.server.address)
    code, printed = await status(capsys, head.server.address)
    assert code == 1, printed
    assert "  uses_after: no replica\n" in printed and f"  uses_after: {after.server.address}" not in printed, printed
    assert f"  shard 0: {worker.server.address}\n" in printed, printed


async def test_status_at_a_health_port_says_so_and_exits_1(runtimes, capsys):
    """Only the health checks answer on a --health-port: status said "not a shardnet server" (a README walkthrough's
    find), where it is one, asked at the wrong port."""
    worker = await runtimes(Worker(executors.Tagger.create({}), ServerConfig(health_port=0)))
    code, printed = await status(capsys, worker.server.health_address)
    assert code == 1, printed
    assert "only health checks answer here: a --health-port? ask its --port" in printed, printed
    assert "not a shardnet server" not in printed, printed


async def test_json_says_each_replica_its_shard_marks_and_the_verdict_as_the_lines_do(runtimes, capsys, dead_address):
    """``--json`` prints one object a monitor reads without parsing lines: the same facts, the same exit code."""
    a, b = await workers(runtimes, 2)
    head = await runtimes(Head("json", connections={0: [a.server.address, dead_address], 1: [b.server.address]}))
    code, printed = await status(capsys, head.server.address, "--json")
    facts = json.loads(printed)
    assert code == DEGRADED and facts["exit_code"] == DEGRADED and facts["state"] == "degraded", printed
    assert facts["target"] == head.server.address and facts["health"] == "SERVING" and facts["ready"] == "SERVING"
    assert "/tag" in facts["endpoints"] and "_jina_dry_run_" not in facts["endpoints"], printed
    replicas = {(r["shard"], r["address"]): r for r in facts["replicas"]}
    assert set(replicas) == {(0, a.server.address), (0, dead_address), (1, b.server.address)}, printed
    assert replicas[0, a.server.address]["down"] is None and not replicas[0, a.server.address]["ejected"]
    assert re.match(r"unreachable: .*connection refused", replicas[0, dead_address]["down"], re.I), printed
    health = facts["replica_health"]
    assert (health["checked"], health["down"], health["unchecked"], health["shards_down"]) == (3, 1, 0, []), printed
    assert facts["empty_shards"] == [] and facts["hops"] == [] and facts["discovery"] is None, printed
    lines_code, lines = await status(capsys, head.server.address)
    assert lines_code == code and "replica health: 1 of 3 replicas down" in lines, lines


async def test_json_names_a_shard_none_serves_and_a_hop_down(runtimes, capsys):
    head, before, _, after = await hopping_head(runtimes, "json-hops")
    await after.stop(0)
    code, printed = await status(capsys, head.server.address, "--json")
    facts = json.loads(printed)
    assert code == 1 and facts["state"] == "unhealthy", printed
    hops = {hop["role"]: hop for hop in facts["hops"]}
    assert hops["uses_before"]["address"] == before.server.address and hops["uses_before"]["down"] is None, printed
    assert hops["uses_after"]["down"].startswith("unreachable: "), printed
    assert facts["replica_health"]["hops_down"] == ["uses_after"], printed


async def test_json_of_a_server_it_cannot_reach_says_so_and_exits_2(capsys, dead_address):
    """A monitor reading stdout gets an object there too; the one-line error still goes to stderr."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", dead_address, "--json", "--timeout", "3"])
    out, err = capsys.readouterr()
    facts = json.loads(out)
    assert code == 2 and facts["exit_code"] == 2 and facts["state"] == "unreachable", out
    assert dead_address in facts["error"] and dead_address in err, (out, err)


async def test_json_of_a_worker_lists_no_replicas_and_no_check(runtimes, capsys):
    worker = await runtimes(Worker(executors.Tagger.create({})))
    code, printed = await status(capsys, worker.server.address, "--json")
    facts = json.loads(printed)
    assert code == 0 and facts["state"] == "ok", printed
    assert facts["replicas"] == [] and facts["replica_health"] is None and facts["retries"] == {}, printed


def test_json_keeps_what_a_server_said_inert_for_the_terminal():
    """As the lines are shown through ``printable``, a cause a server wrote (an escape sequence, a newline) reaches
    the terminal escaped in the JSON object, never as the control characters themselves."""
    from shardnet.cli.status import _Report

    report = _Report("127.0.0.1:1")
    report.say("health unknown", health_error="\x1b[2Jcleared\nshardnet: all replicas OK\u202e")
    shown = report.shown(as_json=True)
    assert shown.isascii() and "\x1b" not in shown, shown
    said = [line for line in shown.splitlines() if "all replicas OK" in line]  # the server's newline stays escaped
    assert len(said) == 1 and said[0].lstrip().startswith('"health_error"'), shown
    assert json.loads(shown)["health_error"] == "\x1b[2Jcleared\nshardnet: all replicas OK\u202e"


class _CommaEndpoint(Executor):
    @requests(on="/search, fast")  # any string is an endpoint, as under Jina
    def search(self, docs, **kwargs):
        return None


async def test_json_lists_the_servers_own_endpoints_not_the_line_split_at_commas(runtimes, capsys):
    worker = await runtimes(Worker(_CommaEndpoint.create({})))
    code, printed = await status(capsys, worker.server.address, "--json")
    endpoints = json.loads(printed)["endpoints"]
    assert code == 0 and "/search, fast" in endpoints and "_jina_dry_run_" not in endpoints, endpoints


async def test_a_draining_hop_replica_is_listed_unmarked_and_said_draining_apart(runtimes):
    """A mark " draining" on its "hop" line made an earlier version's status drop the line (it reads no mark there
    but " ejected"), and its down cause with it (a regression review): it is named draining under a key of its own."""
    head, _, _, after = await hopping_head(runtimes, "hop-drain")
    [second] = await workers(runtimes, 1)
    head.pool.add_connection("hop-drain/uses_after", second.server.address)
    replicas = head.pool.get_replicas("hop-drain/uses_after")
    connection = next(c for c in replicas.get_all_connections() if str(c.address) == after.server.address)
    assert replicas._set_aside_draining(connection)
    pairs = head._hop_metadata()
    assert all(len(value.split(" ")) == 2 for key, value in pairs if key == "hop"), pairs  # no mark on any
    notes = _replica_notes(pairs)
    assert ("uses_after", after.server.address) in notes["draining"], pairs
    assert ("uses_after", after.server.address) not in notes["ejected"], pairs
    assert {("uses_after", after.server.address), ("uses_after", second.server.address)} <= set(notes["hops"])
