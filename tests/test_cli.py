"""The ``shardnet`` command as a person runs it: real processes, exit codes, what lands on stdout and stderr."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import executors
import grpc.aio
import pytest

from shardnet.cli.deploy import exposure_warning
from shardnet.cli.options import json_object
from shardnet.errors import ConfigurationError, ReplicaError
from shardnet.networking import oneshot
from shardnet.testing import EchoServer

EXECUTORS = Path(executors.__file__).resolve()


PYTHON_M = (sys.executable, "-m", "shardnet")
CONSOLE_SCRIPT = (str(Path(sys.executable).with_name("shardnet")),)  # what `pip install` put beside the interpreter


def shardnet(
    *arguments: str, timeout: float = 30.0, cwd: Optional[Path] = None, command: tuple[str, ...] = PYTHON_M,
    env: Optional[dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m shardnet ARGUMENTS`` (or ``command``) to completion, in ``env`` (default: this process's);
    killed if it outlives ``timeout``."""
    return subprocess.run(
        [*command, *arguments],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def wait_for_line(log: Path, pattern: str, process: subprocess.Popen, timeout: float = 30.0) -> re.Match:
    """Poll ``log`` until a line matches ``pattern``; fail with the log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        if process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode} before printing {pattern!r}:\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern!r} after {timeout}s:\n{text}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_gone(pids: list[int], timeout: float = 5.0, alive: Callable[[int], bool] = pid_alive) -> list[int]:
    """The ``pids`` still ``alive`` after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [pid for pid in pids if alive(pid)]


def stop(process: subprocess.Popen, pids: list[int], timeout: float = 20.0) -> Optional[int]:
    """SIGTERM ``process`` and wait; if it hangs, SIGKILL it and the children (``pids``) it can no longer stop."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return process.returncode


@pytest.fixture
def deployed(tmp_path):
    """``shardnet deploy`` of the Tagger, 2 shards x 1 replica, ALL on /tag, with metrics: (address, deploy
    process, child pids)."""
    log = tmp_path / "deploy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "shardnet", "deploy", "--uses", f"{EXECUTORS}:Tagger", "--shards", "2"]
            + ["--polling", '{"/tag": "ALL", "*": "ANY"}', "--name", "tags", "--metrics-port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    pids: list[int] = []
    try:
        address = wait_for_line(log, r"tags serves on (\S+)", process).group(1)
        table = log.read_text()
        pids += [int(pid) for pid in re.findall(r"^(?:head|worker-\d+-\d+)\s+\S+\s+(\d+)\s+running", table, re.M)]
        assert len(pids) == 3, table
        yield address, process, pids
    finally:
        stop(process, pids, timeout=15)


def test_deploy_stops_at_once_on_sigterm_while_a_restart_hangs(tmp_path):
    """A restart under way never holds up SIGTERM: systemd and Kubernetes kill -9 after their grace."""
    workspace, log = tmp_path / "ws", tmp_path / "deploy.log"
    with open(log, "wb") as out:
        deploy = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:Restartable", "--replicas", "2", "--name", "hung",
             "--workspace", str(workspace)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    pids: list[int] = []
    try:
        wait_for_line(log, r"hung serves on", deploy)
        pids += [int(pid) for pid in re.findall(r"^(?:head|worker-\d+-\d+)\s+\S+\s+(\d+)\s+running", log.read_text(), re.M)]
        (workspace / "later-starts").write_text("hang")
        os.kill(pids[1], signal.SIGKILL)  # worker-0-0: its restart will hang in __init__
        wait_for_line(log, r"worker-0-0 \(pid \d+\) was killed by SIGKILL; starting it again", deploy)
        deadline = time.monotonic() + 10
        while not (restarted := set(_children(deploy.pid)) - set(pids)):  # the restart that hangs
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        pids += restarted
        deploy.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert deploy.wait(15) == 0
        assert time.monotonic() - started < 10, log.read_text()  # the hung start had 30 s to come up
        assert not wait_gone(pids), "deploy left the hung restart (or another) running"
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        for pid in pids:  # whatever deploy could not stop, the test does
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_demo_indexes_searches_survives_a_killed_replica_and_stops_everything():
    """The quick start's main job, end to end: a 2x2 index, searched, a replica killed -9 under load."""
    result = shardnet("demo", "--requests", "300", "--concurrency", "8", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    held = re.search(r"indexed 8 texts: shard 0 holds (\d+), shard 1 holds (\d+)", out)
    assert held and int(held[1]) + int(held[2]) == 8, out  # a fresh index: none of an earlier run's texts
    assert len(re.findall(r"^  \d\.\d\d  shard [01]  \S", out, re.M)) >= 6, out  # every search found matches
    assert "300 searches (ALL over 2 shards)" in out and ", 0 errors" in out
    assert re.search(r"kill -9 of worker-0-1 \(pid \d+\) .*: 300 answered, 0 errors", out), out
    assert re.search(r"started again: worker-0-1 serves on \S+ \(pid \d+\); the same search gives the same matches", out)
    assert out.rstrip().endswith("stopped every process; bye")
    pids = [int(pid) for pid in re.findall(r"^(?:head|worker-\d-\d)\s+\S+\s+(\d+)\s+running", out, re.M)]
    pids += [int(pid) for pid in re.findall(r"serves on \S+ \(pid (\d+)\)", out)]
    assert len(pids) == 6 and not any(pid_alive(pid) for pid in pids)


def test_deploy_starts_again_a_worker_killed_under_it(deployed, tmp_path):
    address, deploy, pids = deployed
    head_pid, worker_pid = pids[0], pids[1]
    os.kill(worker_pid, signal.SIGKILL)
    log = tmp_path / "deploy.log"
    wait_for_line(log, rf"worker-0-0 \(pid {worker_pid}\) was killed by SIGKILL; starting it again", deploy)
    wait_for_line(log, r"worker-0-0 serves again on \S+ \(pid \d+, metrics on 127\.0\.0\.1:\d+\)", deploy)
    status = shardnet("status", address)
    assert len(re.findall(r"^\s+shard [01]: unix:/\S+\.sock$", status.stdout, re.M)) == 2, status.stdout
    sent = shardnet("send", address, "--endpoint", "/tag", "--text", "again")
    assert sent.returncode == 0 and json.loads(sent.stdout)["status"] == "SUCCESS", sent.stderr
    assert pid_alive(head_pid)


def test_deploy_send_and_status_against_a_running_deployment(deployed, tmp_path):
    address, deploy, pids = deployed

    sent = shardnet("send", address, "--endpoint", "/tag", "--text", "hello", "--parameters", '{"suffix": "!"}')
    assert sent.returncode == 0, sent.stderr
    answer = json.loads(sent.stdout)
    assert answer["status"] == "SUCCESS"
    [doc] = answer["docs"]
    assert doc["text"] == "hello!" and doc["tags"]["by"] == "tagger"

    unknown = shardnet("send", address, "--endpoint", "/nowhere", "--text", "same")
    assert unknown.returncode == 0, unknown.stderr
    assert "/nowhere is not among the endpoints" in unknown.stderr and "/tag" in unknown.stderr
    assert json.loads(unknown.stdout)["docs"][0]["text"] == "same"

    failed = shardnet("send", address, "--endpoint", "/fail", "--text", "x")
    assert failed.returncode == 1
    answer = json.loads(failed.stdout)
    assert answer["status"] == "ERROR" and "ValueError" in answer["error"] and answer["exception"] == "ValueError"

    status = shardnet("status", address)
    assert status.returncode == 0, status.stderr
    assert f"{address}: SERVING" in status.stdout
    assert "ready: SERVING" in status.stdout  # a head that ACTIVATE feeds is ready as soon as it listens
    assert re.search(r"endpoints: .*/tag", status.stdout)
    # the deployment's workers run beside their head: it dials them over Unix sockets
    assert len(re.findall(r"^\s+shard [01]: unix:/\S+\.sock$", status.stdout, re.M)) == 2, status.stdout
    assert {int(shard) for shard in re.findall(r"shard (\d):", status.stdout)} == {0, 1}

    # --metrics-port: the table's last column says where each process serves them
    table = (tmp_path / "deploy.log").read_text()
    assert next(line for line in table.splitlines() if line.startswith("ROLE")).split()[-1] == "METRICS", table
    head_metrics = "http://%s/metrics" % re.search(r"^head .* (\S+)$", table, re.M).group(1)
    counted = 'shardnet_head_requests_total{deployment="tags",endpoint="/tag",outcome="ok"} 1.0'
    deadline = time.monotonic() + 10
    while counted not in (scraped := urllib.request.urlopen(head_metrics, timeout=5).read().decode()):
        assert time.monotonic() < deadline, scraped
        time.sleep(0.05)

    deploy.send_signal(signal.SIGTERM)
    assert deploy.wait(20) == 0
    assert "stopping..." in (tmp_path / "deploy.log").read_text()  # SIGTERM says so, as Ctrl-C does
    assert not wait_gone(pids), "shardnet deploy left processes behind"


async def test_deploy_guards_its_workers_with_a_token_of_its_own_which_only_its_user_reads(deployed, tmp_path):
    """Run without a token, deploy's head was open: any local process ACTIVATEd its own server, DEACTIVATEd the
    real workers and took every request (a security review's find). deploy now makes a token, hands it to its
    processes in a file only its user reads (never on a command line or in an environment), and prints where that
    file is, for workers registered by hand; STATUS and data stay open."""
    address, deploy, pids = deployed
    printed = re.search(r"^control token: (/\S+)", (tmp_path / "deploy.log").read_text(), re.M)  # before serves on
    assert printed, (tmp_path / "deploy.log").read_text()
    token_file = Path(printed.group(1))
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    for pid in pids:  # what ps shows of the head and the workers (their environment with ps e)
        shown = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        assert token.encode() not in shown and str(token_file).encode() in shown
    status = await oneshot.send_control("STATUS", address)
    workers = [(entity.address, entity.port, entity.shard_id) for entity in status.related_entities]
    assert len(workers) == 2
    async with EchoServer() as rogue:  # the hijack: a process holding no secret
        host, port = rogue.address.rsplit(":", 1)
        hijacks = [("ACTIVATE", host, int(port), 0)] + [("DEACTIVATE", *worker) for worker in workers]
        for command, worker_host, worker_port, shard in hijacks:
            with pytest.raises(ReplicaError) as refused:
                await oneshot.send_control(command, address, worker_host, worker_port, shard)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED, command
        for _ in range(4):
            sent = await asyncio.to_thread(shardnet, "send", address, "--endpoint", "/tag", "--text", "secret")
            assert sent.returncode == 0 and json.loads(sent.stdout)["docs"][0]["tags"]["by"] == "tagger", sent.stderr
        assert rogue.calls == 0
        assert [(e.address, e.port) for e in (await oneshot.send_control("STATUS", address)).related_entities] == [
            worker[:2] for worker in workers
        ]
        # a worker registered by hand, with the token from the printed file, is taken
        await oneshot.activate_worker(host, int(port), address, shard_id=0, token=token)
        await oneshot.deactivate_worker(host, int(port), address, shard_id=0, token=token)
    assert stop(deploy, pids) == 0
    assert not token_file.exists() and not token_file.parent.exists()  # removed with the deployment


def test_deploy_stops_on_ctrl_c_as_on_sigterm(deployed, tmp_path):
    _, deploy, pids = deployed
    deploy.send_signal(signal.SIGINT)
    assert deploy.wait(20) == 0
    out = (tmp_path / "deploy.log").read_text()
    assert "stopping..." in out and "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "tags: every process drained and stopped; its temporary folders are removed" in out, out
    assert not wait_gone(pids), "shardnet deploy left processes behind"


def test_a_second_ctrl_c_cuts_deploys_drain_short(tmp_path):
    """The first Ctrl-C drains (a worker finishes what it took, up to its grace); a second stops every process
    at once, with the processes they started, and deploy says so in its exit code."""
    workspace, log = tmp_path / "ws", tmp_path / "deploy.log"
    with open(log, "wb") as out:
        deploy = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:SlowWithAHelper", "--workspace", str(workspace),
             "--name", "slow"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    pids: list[int] = []
    sender = None
    try:
        address = wait_for_line(log, r"slow serves on (\S+)", deploy).group(1)
        pids += [int(pid) for pid in re.findall(r"^(?:head|worker-\d+-\d+)\s+\S+\s+(\d+)\s+running", log.read_text(), re.M)]
        sender = subprocess.Popen([*PYTHON_M, "send", address, "--endpoint", "/slow", "--text", "x", "--timeout", "30"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not (workspace / "started").exists():  # the worker holds a call its drain would wait for
            assert time.monotonic() < deadline and sender.poll() is None, log.read_text()
            time.sleep(0.02)
        deploy.send_signal(signal.SIGINT)
        wait_for_line(log, r"stopping\.\.\. \(Ctrl-C again stops them at once\)", deploy)
        began = time.monotonic()
        deploy.send_signal(signal.SIGINT)
        assert deploy.wait(15) == 130, log.read_text()
        assert time.monotonic() - began < 5, log.read_text()  # not the worker's 10 s drain
        # what the user killed is no failure to quote, process by process (it was, log tails and all)
        out = log.read_text()
        assert "at its stop" not in out and "Its log:" not in out, out
        assert "slow: the stop was cut short by the second Ctrl-C: every process killed at once; " in out, out
        helpers = [int(path.name.split("-")[1]) for path in workspace.glob("helper-*")]
        assert len(helpers) == 1
        assert not wait_gone(pids + helpers), "a process, or one a worker started, outlived the second Ctrl-C"
    finally:
        (workspace / "release").touch()
        for helper in workspace.glob("helper-*"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(helper.name.split("-")[1]), signal.SIGKILL)
        stop(deploy, pids)
        if sender is not None:
            sender.kill()
            sender.wait()


def test_deploy_takes_a_uses_after(tmp_path):
    log = tmp_path / "deploy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:Tagger", "--shards", "2", "--polling", "ALL",
             "--uses-after", f"{EXECUTORS}:CountingAfter", "--name", "merged"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        address = wait_for_line(log, r"merged serves on (\S+)", process).group(1)
        assert "uses_after" in log.read_text()
        sent = shardnet("send", address, "--endpoint", "/tag", "--text", "x")
        assert sent.returncode == 0, sent.stderr
    finally:
        stop(process, _children(process.pid) if process.poll() is None else [])
    assert process.returncode == 0, log.read_text()


@pytest.mark.parametrize("executor", ["SlowStart", "SlowStartHoldingAThread"])
def test_a_worker_sigtermed_while_its_executor_loads_ends_at_once(tmp_path, executor):
    """A pod deleted while its model loads: with no handler of its own, a container's PID 1 never receives
    SIGTERM and sat out its grace period. The worker now handles it from before the load and ends at once (exit
    143, its own), a thread the Executor's __init__ started notwithstanding (an orderly exit would wait on it)."""
    workspace = tmp_path / "workspace"
    with open(tmp_path / "worker.log", "wb") as out:
        worker = subprocess.Popen(
            [*PYTHON_M, "worker", "--uses", f"{EXECUTORS}:{executor}", "--workspace", str(workspace)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not list(workspace.glob("loading-*")):
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.02)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 143, (tmp_path / "worker.log").read_text()
        assert "SIGTERM while loading the Executor: stopped" in (tmp_path / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_while_deploy_is_starting_stops_what_it_started(tmp_path, signum, code):
    """A stop while the Executors load ends deploy at once, stopping what it launched, and says so: one line
    naming the signal and that the start did not complete, and the signal's exit code (a systemd stop exited
    130, Ctrl-C's, with no word)."""
    workspace = tmp_path / "workspace"
    with open(tmp_path / "deploy.log", "wb") as out:
        deploy = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:SlowStart", "--workspace", str(workspace)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    worker_pid = None
    try:
        deadline = time.monotonic() + 30
        while not list(workspace.glob("loading-*")):  # the head is up and the worker is loading its Executor
            assert deploy.poll() is None and time.monotonic() < deadline, (tmp_path / "deploy.log").read_text()
            time.sleep(0.02)
        [worker_pid] = [int(path.name.split("-")[1]) for path in workspace.glob("loading-*")]
        deploy.send_signal(signum)
        # interrupted, not a minute later once the worker had loaded
        assert deploy.wait(15) == code, (tmp_path / "deploy.log").read_text()
        assert not wait_gone([worker_pid]), "the loading worker outlived deploy"
        output = (tmp_path / "deploy.log").read_text()
        assert "serves on" not in output
        said = [line for line in output.splitlines() if "while starting" in line]
        assert said == [f"executor: stopped by {signum.name} while starting: it did not start, and every process it "
                        f"had launched is stopped; kept: workspace in {workspace}"], output
    finally:
        children = _children(deploy.pid) if deploy.poll() is None else []  # before a kill re-parents them
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        for pid in [worker_pid, *children]:  # a deploy killed here cannot stop its children: do it for it
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc), e.g. the head a killed deploy left behind."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_send_and_status_against_a_server_answering_garbage_say_so_without_a_traceback(garbage_server):
    address = garbage_server.address
    result = await asyncio.to_thread(shardnet, "send", address, "--endpoint", "/x", "--timeout", "5")
    assert result.returncode == 2, result.stdout  # the garbage server answers on this loop meanwhile
    assert f"server {address}" in result.stderr and "malformed" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # status reached it: exit 1 (not healthy), as 2 says nothing answered at all
    result = await asyncio.to_thread(shardnet, "status", address)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "replicas: unknown (malformed" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr


async def test_status_of_a_grpc_server_without_health_checks_exits_1_as_it_answered():
    foreign = grpc.aio.server()
    port = foreign.add_insecure_port("127.0.0.1:0")
    await foreign.start()
    try:
        result = await asyncio.to_thread(shardnet, "status", f"127.0.0.1:{port}")
    finally:
        await foreign.stop(0)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"127.0.0.1:{port}: health unknown (" in result.stdout and "UNIMPLEMENTED" not in result.stderr


async def test_what_a_server_says_reaches_the_terminal_shown_not_obeyed():
    """A server's words printed raw could clear an operator's screen, retitle their terminal or forge a line
    (ESC sequences and newlines in a health check's details, or in a refusal ``send`` prints)."""
    hostile = "\x1b[2J\x1b]0;pwned\x07\nreplicas: all serving"

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, hostile)

    foreign = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(refuse)
    foreign.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": handler}),
        grpc.method_handlers_generic_handler("jina.JinaSingleDataRequestRPC", {"process_single_data": handler}),
    ])
    port = foreign.add_insecure_port("127.0.0.1:0")
    await foreign.start()
    try:
        status = await asyncio.to_thread(shardnet, "status", f"127.0.0.1:{port}")
        send = await asyncio.to_thread(shardnet, "send", f"127.0.0.1:{port}", "--endpoint", "/x", "--timeout", "5")
    finally:
        await foreign.stop(0)
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\nreplicas: all serving" in status.stdout, status.stdout
    assert "\x1b" not in status.stdout and "\x07" not in status.stdout, status.stdout
    assert send.returncode == 2 and "\\x1b[2J" in send.stderr, send.stderr
    assert "\x1b" not in send.stderr and "\x07" not in send.stderr, send.stderr


def test_output_into_a_closed_pipe_exits_quietly():
    """As under ``shardnet status ... | head -1``: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        writer = subprocess.run(
            [*PYTHON_M, "k8s", "render", "--name", "x", "--image", "i", "--uses", "m:C"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert writer.returncode == 141, writer.stderr
    assert "Traceback" not in writer.stderr and "BrokenPipeError" not in writer.stderr, writer.stderr


def test_send_to_nothing_fails_with_a_message_naming_the_address(dead_address):
    result = shardnet("send", dead_address, "--endpoint", "/x", "--timeout", "2")
    assert result.returncode != 0
    assert f"server {dead_address}" in result.stderr and "Traceback" not in result.stderr  # a head or a worker


BAD_ARGUMENTS = {
    "uses-without-class": (["worker", "--uses", "just_a_module"], "must look like MODULE:CLASS"),
    "uses-missing-module": (["worker", "--uses", "no_such_module_xyz:Thing"], "cannot import 'no_such_module_xyz'"),
    "uses-missing-class": (["worker", "--uses", f"{EXECUTORS}:Missing"], "has no 'Missing'"),
    "uses-not-an-executor": (["worker", "--uses", "os:getcwd"], "not a shardnet.Executor subclass"),
    "connection-without-shard": (
        ["head", "--deployment", "d", "--connection", "127.0.0.1:5000"],
        "expected SHARD=HOST:PORT",
    ),
    "connection-negative-shard": (
        ["head", "--deployment", "d", "--connection=-1=127.0.0.1:5000"],
        "SHARD a whole number from 0",
    ),
    "connection-beyond-shards": (
        ["head", "--deployment", "d", "--shards", "2", "--connection", "5=127.0.0.1:5000"],
        "a connection for shard 5, but the head has shards 0..1",
    ),
    "connection-bad-address": (["head", "--deployment", "d", "--connection", "0=127.0.0.1:99999"], "99999"),
    "polling-bad-json": (["head", "--deployment", "d", "--polling", '{"/search": ALL'], "not valid JSON"),
    "polling-bad-kind": (["head", "--deployment", "d", "--polling", '{"/search": "SOMETIMES"}'], "unknown polling"),
    "port-out-of-range": (["worker", "--uses", f"{EXECUTORS}:Tagger", "--port", "70000"], "70000"),
    "port-not-a-number": (["head", "--deployment", "d", "--port", "http"], "invalid int value"),
    "unix-socket-relative": (["worker", "--uses", f"{EXECUTORS}:Tagger", "--unix-socket", "w.sock"], "absolute path"),
    "unix-socket-and-advertise-host": (
        ["worker", "--uses", f"{EXECUTORS}:Tagger", "--unix-socket", "/tmp/w.sock", "--advertise-host", "10.0.0.7"],
        "give one of --unix-socket and --advertise-host",
    ),
    "connection-relative-unix": (["head", "--deployment", "d", "--connection", "0=unix:w.sock"], "absolute path"),
    "workspace-cannot-be-made": (
        ["worker", "--uses", f"{EXECUTORS}:Tagger", "--workspace", "/proc/no-such-folder"], "cannot create it"
    ),
    "deploy-message-limit": (["deploy", "--uses", f"{EXECUTORS}:Tagger", "--max-message-mb", "5000"], "at most 2047"),
    # found by a review of the command line
    "host-a-unix-socket": (["head", "--deployment", "d", "--host", "unix:/tmp/h.sock"], "--unix-socket PATH"),
    "host-garbage-on-port-0": (
        ["worker", "--uses", f"{EXECUTORS}:Tagger", "--host", "garbage!!", "--port", "0"], "cannot listen on garbage!!"
    ),
    "advertise-host-a-socket": (
        ["worker", "--uses", f"{EXECUTORS}:Tagger", "--advertise-host", "unix:/tmp/nothing.sock"],
        "a Unix socket is served and advertised with --unix-socket",
    ),
    "advertise-host-with-a-port": (
        ["worker", "--uses", f"{EXECUTORS}:Tagger", "--advertise-host", "1.2.3.4:5"],
        "no host name or IP address a head could dial",
    ),
    "uses-with-missing-an-argument": (
        ["worker", "--uses", f"{EXECUTORS}:NeedsDim"], "NeedsDim cannot be made from uses_with (given: none)"
    ),
    "uses-with-a-folder": (["worker", "--uses", f"{EXECUTORS}:Tagger", "--uses-with", "@/tmp"], "not a regular file"),
    "send-an-empty-endpoint": (["send", "127.0.0.1:1", "--endpoint", ""], "--endpoint is empty"),
    "deploy-name-too-long": (["deploy", "--uses", f"{EXECUTORS}:Tagger", "--name", "a" * 300], "up to 100 letters"),
}


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_exit_non_zero_with_a_clear_message(arguments, message):
    result = shardnet(*arguments)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "ready on" not in result.stdout


def test_a_head_refusing_a_flag_says_that_alone_not_its_warnings_first():
    """The "no --shards" warning came before the refusal of a bad port (found by a review)."""
    result = shardnet("head", "--deployment", "d", "--host", "999.1.1.1", "--port", "0")
    assert result.returncode != 0 and "cannot listen on 999.1.1.1" in result.stderr, result.stderr
    assert "--shards" not in result.stderr and "may add or remove" not in result.stderr, result.stderr


def test_deploy_on_a_host_beyond_this_machine_says_its_token_crosses_the_network_in_cleartext():
    """The head logged it to a file of a temporary folder, and the terminal showed nothing (found by a review);
    deploy always has a token now (one of its own when given none)."""
    assert exposure_warning("127.0.0.1") == "" and exposure_warning("localhost") == ""
    assert "the control token crosses the network in cleartext" in exposure_warning("0.0.0.0")


def test_uses_with_reads_a_pipe_as_a_shell_gives_one_and_refuses_a_device(tmp_path):
    """``--uses-with @<(...)`` is a pipe: read, as before (a first fix refused it, a review found); a device such
    as /dev/zero is refused rather than read to the end of memory."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "w") as pipe:
            pipe.write('{"size": 3}')

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert json_object(f"@{fifo}", "--uses-with") == {"size": 3}
    finally:
        writer.join(10)
    with pytest.raises(ConfigurationError, match="is not a regular file or a pipe"):
        json_object("@/dev/zero", "--uses-with")


def test_uses_with_refuses_a_pipe_nobody_writes_to_its_end_rather_than_wait_for_ever(tmp_path):
    """``--uses-with @FIFO`` with no writer, or ``@/dev/stdin`` on a pipe held open and silent, blocked the start
    for ever (a review's find): a pipe is read to its end within its bound, else refused in one line naming the
    flag and the path."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reading, writing = os.pipe()  # a standard input whose writer stays but writes nothing
    try:
        for path in (str(fifo), f"/dev/fd/{reading}"):
            began = time.monotonic()
            with pytest.raises(ConfigurationError) as refused:
                json_object(f"@{path}", "--uses-with", pipe_wait=0.2)
            assert time.monotonic() - began < 5
            [line] = str(refused.value).splitlines()
            assert line.startswith(f"--uses-with @FILE {path!r}: the pipe did not end within 0.2s")
        os.write(writing, b'{"size": 3}')  # written, but never closed: no end either
        with pytest.raises(ConfigurationError, match="the pipe did not end within 0.2s"):
            json_object(f"@/dev/fd/{reading}", "--uses-with", pipe_wait=0.2)
        os.write(writing, b'{"size": 4}')
        os.close(writing)
        writing = -1
        assert json_object(f"@/dev/fd/{reading}", "--uses-with", pipe_wait=5) == {"size": 4}
    finally:
        os.close(reading)
        if writing >= 0:
            os.close(writing)
    with pytest.raises(ConfigurationError) as refused:  # a folder: one line, not a traceback
        json_object(f"@{tmp_path}", "--uses-with")
    assert str(refused.value) == f"--uses-with @FILE {str(tmp_path)!r} is not a regular file or a pipe"


def test_a_port_below_1024_it_cannot_take_says_such_ports_may_be_refused_to_the_user():
    with contextlib.ExitStack() as stack:
        port = None
        for candidate in range(1023, 899, -1):  # held here (as root), or refused to this user: either way taken
            holder = stack.enter_context(socket.socket())
            try:
                holder.bind(("127.0.0.1", candidate))
            except PermissionError:
                port = candidate
                break
            except OSError:
                continue
            holder.listen()
            port = candidate
            break
        assert port is not None
        result = shardnet("worker", "--uses", f"{EXECUTORS}:Tagger", "--port", str(port))
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "below 1024" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_port_already_taken_by_another_worker_is_refused(tmp_path):
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "shardnet", "worker", "--uses", f"{EXECUTORS}:Tagger", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        port = wait_for_line(tmp_path / "first.log", r"ready on 127\.0\.0\.1:(\d+)", first).group(1)
        second = shardnet("worker", "--uses", f"{EXECUTORS}:Tagger", "--port", port)
        assert second.returncode != 0, "a second worker bound a port another one serves on"
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
