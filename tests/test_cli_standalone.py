"""The README's standalone pieces as a person starts them: the ``shardnet`` console script, a head and its workers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import CONSOLE_SCRIPT, shardnet, wait_for_line

TESTS = Path(__file__).resolve().parent


class Processes:
    """Starts ``shardnet`` commands in the background, each logging to its own file; stops them all at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, *arguments: str, cwd: Path = TESTS) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [*CONSOLE_SCRIPT, *arguments], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.started.append(process)
        return process, log

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGKILL's exit until resumed
                process.kill()
            process.wait()


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def run(*arguments: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the console script to completion from the tests folder; the result and the seconds it took."""
    began = time.monotonic()
    result = shardnet(*arguments, cwd=TESTS, command=CONSOLE_SCRIPT)
    return result, time.monotonic() - began


def start_head_with_workers(
    processes: Processes, shards: int, *worker_flags: str
) -> tuple[str, list[subprocess.Popen]]:
    """A head (``/count`` under ALL) and one ``executors:Tagger`` worker per shard, each named as a module in the
    current folder (given ``worker_flags`` too); return once every worker is registered."""
    head, head_log = processes.start(
        "head", "--log-level", "INFO", "head", "--deployment", "tags", "--port", "0", "--shards", str(shards),
        "--polling", '{"/count": "ALL", "*": "ANY"}',
    )
    address = wait_for_line(head_log, r"ready on (\S+)", head).group(1)
    workers = []
    for shard in range(shards):
        worker, worker_log = processes.start(
            f"worker-{shard}", "worker", "--uses", "executors:Tagger", "--port", "0", "--head", address,
            "--shard-id", str(shard), *worker_flags,
        )
        wait_for_line(worker_log, r"ready on", worker)
        wait_for_line(head_log, rf"activated \S+ in shard {shard}", head)
        workers.append(worker)
    return address, workers


def test_workers_load_a_module_from_the_current_folder_and_file_dict_results_apart(processes):
    address, _ = start_head_with_workers(processes, shards=2)
    result, _ = run("send", address, "--endpoint", "/count", "--text", "a")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    # each shard's dict result under its own name (the default names carry shard and replica)
    assert answer["parameters"]["__results__"] == {
        "Tagger/shard-0/rep-0": {"docs": 1.0, "shard": 0.0},
        "Tagger/shard-1/rep-0": {"docs": 1.0, "shard": 1.0},
    }
    tagged, _ = run("send", address, "--endpoint", "/tag", "--text", "b")
    [doc] = json.loads(tagged.stdout)["docs"]
    assert doc["tags"]["runtime_name"] == f"Tagger/shard-{int(doc['tags']['shard'])}/rep-0"  # the executor sees it too


def test_send_and_status_with_a_hung_worker_stay_within_their_timeout_and_say_what_hangs(processes):
    # a lease of 50 s: on a loaded machine the two commands below took longer than the default 10 s one, and the
    # hung worker, no longer listed, could not be named as not answering
    address, [worker] = start_head_with_workers(processes, 1, "--register-interval", "10")
    # what a send costs here without waiting (the interpreter's start, imports, one call), on this machine's load
    answered, baseline = run("send", address, "--endpoint", "/tag", "--text", "a")
    assert answered.returncode == 0, answered.stderr
    worker.send_signal(signal.SIGSTOP)

    sent, took = run("send", address, "--endpoint", "/tag", "--text", "a", "--timeout", "3")
    assert sent.returncode != 0
    # before the fix discovery and the call each took the full 3 s: 6 s more than an answered send; the bound
    # leaves a loaded machine 1.5 s of slack over the 3 s
    assert took < baseline + 4.5, f"send --timeout 3 took {took:.1f}s, an answered send {baseline:.1f}s"
    assert "could not discover the endpoints" in sent.stderr and "is not among the endpoints" not in sent.stderr
    assert "shard 0" in sent.stderr and "DEADLINE_EXCEEDED" in sent.stderr and "Traceback" not in sent.stderr

    status, _ = run("status", address, "--timeout", "3")
    assert status.returncode == 1
    assert re.search(r"endpoints: unknown \(endpoint discovery: .*shard 0.*DEADLINE_EXCEEDED", status.stdout), status.stdout
    # still says who is there, and that it does not answer
    hung = r"^\s+shard 0: 127\.0\.0\.1:\d+ \(down: not answering within [0-9.]+s\)$"
    assert re.search(hung, status.stdout, re.M), status.stdout
    assert "  shard 0: no serving replica\n" in status.stdout, status.stdout


def test_a_head_whose_attempt_timeout_is_not_under_its_timeout_says_so(processes):
    """--attempt-timeout 2 beside --timeout 1 was taken without a word: the per-attempt limit can never fire, and a
    hung replica's request is never tried on another before the hop's time runs out (a configuration review)."""
    head, head_log = processes.start(
        "head", "head", "--deployment", "tags", "--port", "0", "--timeout", "1", "--attempt-timeout", "2",
    )
    wait_for_line(head_log, r"--attempt-timeout 2s is not under --timeout 1s: a request a hung replica holds", head)
    wait_for_line(head_log, r"ready on", head)
