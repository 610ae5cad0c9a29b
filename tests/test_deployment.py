"""``Deployment``: a head and shards x replicas as real local processes, stopped without leftovers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from shardnet import DataRequest, Document, ReplicaError
from shardnet.errors import ConfigurationError, DeadlineExceeded, ExecutorError, ProcessError
from shardnet.networking import oneshot
from shardnet.networking.addresses import parse_address
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.log_lines import step_cut_short
from shardnet.runtimes.processes import ShardnetProcess, stop_all
from shardnet.runtimes.worker import AFTER_DRAIN_SECONDS, CLOSE_GRACE, THREAD_EXIT_GRACE

import executors


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (a recycled pid): not ours any more
        return False
    return True


def assert_all_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Poll until none of ``pids`` exists; fail naming the survivors past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"processes still running after the deployment stopped: {alive}")
        time.sleep(0.02)


def test_sharded_deployment_with_uses_before_and_after_counts_every_send_and_leaves_nothing_behind():
    polling = {"/search": "ALL", "*": "ANY"}
    with Deployment(
        executors.ShardSearch,
        shards=2,
        polling=polling,
        name="search",
        uses_before=executors.CountingBefore,
        uses_after=executors.CountingAfter,
    ) as deployment:
        pids = [process.pid for process in deployment.processes]
        assert len(pids) == 5 and all(pid_alive(pid) for pid in pids)
        members = deployment.members()
        assert len(members) == 2 and all(member.startswith("unix:/") for member in members)  # the default hop
        sockets = [member.removeprefix("unix:") for member in members]
        assert all(os.path.exists(path) for path in sockets)
        for sent in range(1, 6):
            [merged] = deployment.post("/search", [Document(id="q")])
            assert merged.tags["before_calls"] == sent and merged.tags["after_calls"] == sent
            assert merged.tags["matrix"] == [2, 2]
            assert merged.text == "q,only-shard-0,q,only-shard-1"
        routed = deployment.post("/search", [Document(id="q")], return_responses=True).routes
        # uses_before, a shard, uses_after: each entry names the deployment, as a Jina worker's does
        assert [route.executor for route in routed] == ["search"] * 3
        log_dir = deployment.log_dir
    assert_all_gone(pids)
    assert not log_dir.exists()  # its temporary folders are cleaned up too
    assert not any(os.path.exists(os.path.dirname(path)) for path in sockets)


def test_a_deployment_started_again_after_stop_runs_and_cleans_up_like_a_fresh_one():
    deployment = Deployment(executors.Tagger, name="again")
    try:
        for _ in range(2):
            deployment.start()
            pids = [process.pid for process in deployment.processes]
            log_dir = deployment.log_dir
            assert all(member.startswith("unix:/") for member in deployment.members())  # the transport is kept
            assert deployment.post("/tag", [Document(text="a")])[0].tags["by"] == "tagger"
            deployment.stop()
            assert_all_gone(pids)
            assert not log_dir.exists()
    finally:
        deployment.stop()


def test_deployment_stops_every_process_when_the_body_raises():
    with (
        pytest.raises(RuntimeError, match="body failed"),
        Deployment(executors.Pid, shards=1, replicas=2, name="pids", unix_sockets=False) as deployment,
    ):
        assert sorted(deployment.members()) == sorted(process.address for process in deployment.workers.values())
        pids = {process.pid for process in deployment.processes}
        served_by = {int(doc.tags["pid"]) for _ in range(4) for doc in deployment.post("/who", [Document()])}
        assert served_by and served_by <= pids  # the answers came from the processes we are watching
        raise RuntimeError("body failed")
    assert_all_gone(sorted(pids))


async def test_async_deployment_with_control_token():
    async with Deployment(
        executors.Tagger, shards=1, replicas=1, name="guarded", control_token="tok-123"
    ) as deployment:
        # the workers registered with the token (given to them in a file only this user reads)
        assert "SHARDNET_CONTROL_TOKEN" not in os.environ or os.environ["SHARDNET_CONTROL_TOKEN"] != "tok-123"
        docs = await deployment.post_async("/tag", [Document(text="a")])
        assert docs[0].tags["by"] == "tagger"

        with pytest.raises(ExecutorError) as failed:
            await deployment.post_async("/fail", [Document()])
        assert failed.value.name == "ValueError" and "bad input" in str(failed.value)
        assert 'raise ValueError("bad input", 42)' in failed.value.traceback  # the remote traceback, as Jina shows
        assert "remote traceback:" in str(failed.value)

        with pytest.raises(ReplicaError) as refused:
            await oneshot.activate_worker("127.0.0.1", 1, deployment.address, shard_id=0)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        pids = [process.pid for process in deployment.processes]
    assert_all_gone(pids)


def test_a_deployment_given_no_token_makes_one_its_restarts_and_revivals_keep(caplog):
    """A Deployment given no token ran an open head: any local process could DEACTIVATE its workers and ACTIVATE
    its own server (a security review's find). It makes a token now, in a file only its user reads, given to its
    processes by path (ps shows neither the token nor, with ps e, an environment holding it), removed at stop."""
    with Deployment(executors.Pid, shards=1, replicas=2, name="own-token", balancer="round_robin",
                    drain_seconds=1, startup_timeout=20) as deployment:
        token_file = deployment.control_token_file
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        token = token_file.read_text().strip()
        assert len(token) >= 40  # secrets.token_urlsafe(32)
        for process in deployment.processes:
            shown = Path(f"/proc/{process.pid}/cmdline").read_bytes() + Path(f"/proc/{process.pid}/environ").read_bytes()
            assert token.encode() not in shown
        members = sorted(deployment.members())
        worker_host, worker_port = parse_address(members[0]).entity()
        for hijack in (oneshot.deactivate_worker(worker_host, worker_port, deployment.address, 0),
                       oneshot.activate_worker("127.0.0.1", 1, deployment.address, 0)):
            with pytest.raises(ReplicaError) as refused:
                oneshot.run_sync(hijack)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert sorted(deployment.members()) == members

        restarted = deployment.restart_worker(0, 0)  # DEACTIVATE as it stops, ACTIVATE as it starts: with the token
        assert sorted(deployment.members()) == members
        revived = deployment.workers[(0, 1)]
        revived.kill()
        with caplog.at_level("INFO", logger="shardnet.runtimes.deployment"):
            assert deployment.revive() == ["worker-0-1"]  # forgotten at the head (DEACTIVATE, the token) first
        assert "did not forget" not in caplog.text
        deadline = time.monotonic() + 15
        while sorted(deployment.members()) != members:
            assert time.monotonic() < deadline, deployment.members()
            time.sleep(0.02)
        served_by = {int(doc.tags["pid"]) for _ in range(6) for doc in deployment.post("/who", [Document()])}
        assert served_by == {restarted.pid, revived.pid}
    assert not token_file.exists() and not token_file.parent.exists()


async def test_an_async_deployment_cancelled_while_it_starts_stops_what_it_launched_and_its_folders(tmp_path):
    """Ctrl-C under asyncio.run cancels ``async with Deployment``'s start, which runs in a thread: the start
    must end, and every process it launched go, not only the ones it had got to record."""
    workspace = tmp_path / "ws"
    deployment = Deployment(executors.SlowStart, shards=1, replicas=2, name="slow", workspace=str(workspace),
                            unix_sockets=False, startup_timeout=120)

    async def enter() -> None:
        async with deployment:
            pytest.fail("the start of workers that take a minute to load finished")

    entering = asyncio.ensure_future(enter())
    try:
        deadline = time.monotonic() + 20
        while len(list(workspace.glob("loading-*"))) < 2:  # the head is up and both workers are loading
            assert time.monotonic() < deadline and not entering.done(), "the workers never started loading"
            await asyncio.sleep(0.02)
        pids = [process.pid for process in deployment.processes]
        log_dir = deployment.log_dir
        began = time.monotonic()
        entering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await entering
        assert time.monotonic() - began < 20  # not the minute the workers' loading takes, nor the startup timeout
    finally:
        entering.cancel()
        await asyncio.gather(entering, return_exceptions=True)
        deployment.stop()
    assert len(pids) == 3
    assert_all_gone(pids)
    assert not log_dir.exists()
    with pytest.raises(ProcessError, match="not running"):
        deployment.address


def test_a_start_whose_thread_begins_only_after_its_cancellation_stopped_the_deployment_starts_nothing():
    """A cancelled ``async with`` may stop() before its start's thread even ran (the default executor was busy):
    that start must not make a fresh run and start it all, with nobody left to stop it."""
    deployment = Deployment(executors.Tagger, name="late", unix_sockets=False)
    abandoned = threading.Event()
    abandoned.set()  # as __aenter__ sets it on cancellation, before its stop()
    deployment.stop()
    with pytest.raises(ProcessError, match="stopped before it started"):
        deployment._start(abandoned)
    assert deployment.processes == [] and not deployment.log_dir.exists()
    with deployment:  # a later start is a fresh one, as after any stop
        assert deployment.post("/tag", [Document(text="a")])[0].tags["by"] == "tagger"


def test_a_stop_from_another_thread_during_start_says_the_start_was_stopped_not_killed_by_sigterm(tmp_path):
    """A program's own stop() (a SIGTERM handler's, another thread's) during start() made the start fail with
    "head was killed by SIGTERM before it was ready": a signal it sent itself, blamed on someone outside (a
    regression review's find). It says the deployment was stopped while it started."""
    workspace = tmp_path / "ws"
    deployment = Deployment(executors.SlowStart, name="cut", workspace=str(workspace), startup_timeout=120)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(deployment.start)
        try:
            deadline = time.monotonic() + 20
            while not list(workspace.glob("loading-*")):  # the head serves, the worker is loading
                assert time.monotonic() < deadline and not starting.done(), "the worker never started loading"
                time.sleep(0.02)
            pids, folders = [process.pid for process in deployment.processes], [deployment.log_dir]
            folders += [Path(deployment._sockets.name)] if deployment._sockets else []
            deployment.stop()
            with pytest.raises(ProcessError) as stopped:
                starting.result(timeout=20)
        finally:
            deployment.stop()
    assert "deployment 'cut' was stopped while it started (stop() called during start())" in str(stopped.value)
    assert "SIGTERM" not in str(stopped.value) and "killed" not in str(stopped.value), stopped.value
    assert_all_gone(pids)
    assert not any(folder.exists() for folder in folders), folders



def test_a_script_that_starts_a_deployment_unguarded_is_refused_not_recursed(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from shardnet import Deployment, Executor, requests\n"
        "class Noop(Executor):\n"
        "    @requests\n"
        "    def any(self, docs, parameters, **kwargs):\n"
        "        return None\n"
        "with Deployment(uses=Noop, startup_timeout=20) as dep:\n"
        "    print('unreachable')\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert 'if __name__ == "__main__"' in result.stderr and "unreachable" not in result.stdout


def test_workers_are_named_as_jina_names_replicas_so_every_shards_dict_result_arrives():
    with Deployment(executors.Tagger, shards=2, replicas=1, polling="ALL", name="counter") as deployment:
        request = DataRequest([Document(text="a")], endpoint="/count")
        response = oneshot.send_request_sync(request, deployment.address, timeout=30)
        assert not response.is_error
        assert response.parameters["__results__"] == {
            "counter/shard-0/rep-0": {"docs": 1.0, "shard": 0.0},
            "counter/shard-1/rep-0": {"docs": 1.0, "shard": 1.0},
        }
    single = Deployment(executors.Tagger, shards=1, replicas=1, name="single")
    with pytest.raises(ProcessError, match="'single' is not running"):
        single.restart_worker(0, 0)
    with pytest.raises(ProcessError, match="'single' is not running"):
        single.restart_head()
    with pytest.raises(ProcessError, match="'single' is not running"):  # it returned [] as if all were up
        single.revive()
    with single as deployment:
        [doc] = deployment.post("/tag", [Document(text="a")])
        response = deployment.post("/count", [doc], return_responses=True)  # the whole response, as in Jina
        assert response.parameters["__results__"] == {"single/rep-0": {"docs": 1.0, "shard": 0.0}}
        assert response.docs.ids == [doc.id]
        with pytest.raises(ConfigurationError, match="no worker for shard 1, replica 0 .shards 0..0, replicas 0..0"):
            deployment.restart_worker(1, 0)
    with pytest.raises(ProcessError, match="'single' is not running"):  # not a raw "connection refused"
        single.post("/tag", [Document(text="a")])


def test_a_worker_that_died_is_restarted_on_its_socket_and_served_at_once():
    with Deployment(executors.Pid, shards=1, replicas=2, name="phoenix", balancer="round_robin") as deployment:
        members = sorted(deployment.members())
        assert all(member.startswith("unix:/") for member in members)
        worker = deployment.workers[(0, 1)]
        old_pid = worker.pid
        worker.kill()  # SIGKILL: no DEACTIVATE, the socket file stays behind
        for _ in range(10):  # the head fails over, and ejects the dead replica
            deployment.post("/who", [Document()], timeout=10)
        time.sleep(3.5)  # dead for a while: the head's health probes of it back off to 4 s apart
        deployment.restart_worker(0, 1)
        assert sorted(deployment.members()) == members
        served_by = {int(doc.tags["pid"]) for _ in range(6) for doc in deployment.post("/who", [Document()])}
        assert worker.pid in served_by and old_pid not in served_by  # a fresh connection, not an ejected one


def test_restart_worker_waits_for_its_own_worker_only_while_another_lies_dead():
    """restart_worker(0, 0) restarted its worker, then raised about worker-1-0, killed before, as "exited with code
    -9": it waited for every worker's registration. It now waits for its own; wait_registered(), which does wait
    for all, names the dead one's end as deploy does."""
    with Deployment(executors.Pid, shards=2, replicas=1, name="bystander", drain_seconds=1) as deployment:
        deployment.workers[(1, 0)].kill()
        restarted = deployment.restart_worker(0, 0)
        assert restarted.alive and deployment._member_address((0, 0), restarted) in deployment.members()
        with pytest.raises(ProcessError, match=r"^worker-1-0 was killed by SIGKILL:"):
            deployment.wait_registered()


def test_revive_starts_again_a_killed_worker_and_a_killed_head_where_they_served(caplog):
    """What ``shardnet deploy`` does every second: a process that exited is launched again, at its old address."""
    with Deployment(executors.Pid, shards=1, replicas=2, name="revived", balancer="round_robin") as deployment:
        assert deployment.revive() == []  # nothing exited: nothing to do
        members, address = sorted(deployment.members()), deployment.address
        worker = deployment.workers[(0, 0)]
        old_pid = worker.pid
        worker.kill()
        with caplog.at_level("INFO", logger="shardnet.runtimes.deployment"):
            assert deployment.revive() == ["worker-0-0"]
        assert "worker-0-0 (pid %d) was killed by SIGKILL; starting it again" % old_pid in caplog.text
        assert worker.alive and worker.pid != old_pid

        def served_by() -> set[int]:
            return {int(doc.tags["pid"]) for _ in range(6) for doc in deployment.post("/who", [Document()], timeout=10)}

        assert sorted(deployment.members()) == members and worker.pid in served_by()

        deployment.head.kill()
        assert deployment.revive() == ["head"]
        assert deployment.address == address  # where clients and workers look for it
        deadline = time.monotonic() + 15  # the workers still running register again on their own
        while sorted(deployment.members()) != members:
            assert time.monotonic() < deadline, deployment.members()
            time.sleep(0.05)
        assert worker.pid in served_by()


def test_a_head_killed_while_a_worker_hangs_in_its_restart_comes_back_at_once_and_the_hung_start_is_stopped(caplog):
    """revive(wait=False), what `shardnet deploy` runs every second, never waits for a start under way. (6 s to
    start: with 3 s, the deployment's own first start failed once under the suite's four workers.)"""
    with Deployment(executors.Restartable, replicas=2, name="hung", startup_timeout=6.0) as deployment, \
            caplog.at_level("INFO", logger="shardnet.runtimes.deployment"):
        (deployment.workspace / "later-starts").write_text("hang")
        deployment.workers[(0, 0)].kill()
        assert deployment.revive(wait=False) == []  # launched again; it hangs in __init__
        deployment.head.kill()
        started = time.monotonic()
        back: list[str] = []
        while "head" not in back:
            assert time.monotonic() - started < 10, caplog.text
            back += deployment.revive(wait=False)
            time.sleep(0.05)
        assert time.monotonic() - started < 2.5  # not held up by the worker, which has 6 s to come up
        live = deployment._member_address((0, 1), deployment.workers[(0, 1)])
        while live not in deployment.members():  # the running worker registers with the new head on its own
            assert time.monotonic() - started < 10
            time.sleep(0.05)
        while "did not come up within 6s; stopped it" not in caplog.text:
            assert time.monotonic() - started < 20, caplog.text
            deployment.revive(wait=False)
            time.sleep(0.05)


def test_a_stop_during_a_revive_that_waits_ends_it_without_telling_of_exits_it_made(caplog):
    """A stop() from another thread (a cancelled demo) ends the processes a waiting revive() launched: revive
    returns at once and does not log them as starts that failed."""
    deployment = Deployment(executors.Restartable, replicas=2, name="cut", startup_timeout=30.0)
    deployment.start()
    try:
        with caplog.at_level("INFO", logger="shardnet.runtimes.deployment"):
            (deployment.workspace / "later-starts").write_text("hang")
            deployment.workers[(0, 0)].kill()
            reviving = concurrent.futures.ThreadPoolExecutor(1).submit(deployment.revive, True)
            deadline = time.monotonic() + 10
            while not deployment._starting:  # launched again, hanging in __init__, revive waiting for it
                assert time.monotonic() < deadline and not reviving.done(), caplog.text
                time.sleep(0.02)
            deployment.stop()
            assert reviving.result(timeout=10) == []
        assert "before it was ready" not in caplog.text and "starting it again in" not in caplog.text, caplog.text
    finally:
        deployment.stop()


def test_a_restart_that_fails_is_logged_once_with_its_own_output_and_backs_off(caplog):
    with Deployment(executors.Restartable, replicas=2, name="failing") as deployment:
        (deployment.workspace / "later-starts").write_text("raise")
        worker = deployment.workers[(0, 0)]
        worker.kill()
        with caplog.at_level("INFO", logger="shardnet.runtimes.deployment"):
            assert deployment.revive() == []  # launched, and it failed to start
            assert deployment.revive() == []  # the failure is counted now, and the next start waits
        records = [record for record in caplog.records if "worker-0-0" in record.getMessage()]
        assert [record.levelname for record in records] == ["WARNING", "ERROR"], [r.getMessage() for r in records]
        assert "was killed by SIGKILL; starting it again" in records[0].getMessage()
        failed = records[1].getMessage()
        assert "exited with code" in failed and "before it was ready; starting it again in 0.5s" in failed
        assert "this restart fails on purpose" in failed and failed.count("ready on") == 0  # this start's output only
        assert worker.restart_at > time.monotonic()
        while time.monotonic() < worker.restart_at:  # its backoff: the next look launches it again
            time.sleep(0.02)
        caplog.clear()
        with caplog.at_level("INFO", logger="shardnet.runtimes.deployment"):
            deployment.revive()  # fails as before: said in a line, not the same traceback again
        [again] = [record.getMessage() for record in caplog.records if "worker-0-0" in record.getMessage()]
        assert again.endswith(f"Its output:\nthe same as at its last failed start (its log: {worker.log_path})"), again


def test_revive_starts_a_worker_again_after_its_log_folder_was_removed():
    with Deployment(executors.Pid, replicas=2, name="cleaned") as deployment:
        worker = deployment.workers[(0, 1)]
        worker.kill()
        shutil.rmtree(deployment.log_dir)  # what a /tmp cleaner does to a long-running deployment
        assert deployment.revive() == ["worker-0-1"] and worker.alive


def test_a_worker_that_cannot_be_launched_is_tried_again_later_and_the_others_keep_serving(caplog):
    with Deployment(executors.Pid, replicas=2, name="blocked") as deployment:
        worker, other = deployment.workers[(0, 1)], deployment.workers[(0, 0)]
        worker.kill()
        shutil.rmtree(deployment.log_dir)
        deployment.log_dir.write_text("a file where the log folder was")  # the OS refuses every launch
        try:
            with caplog.at_level("ERROR", logger="shardnet.runtimes.deployment"):
                assert deployment.revive() == [] and deployment.revive() == []
            # the kill was the first quick exit (at once), the failed start the second: the next try waits 0.5 s
            assert caplog.text.count("worker-0-1 could not be started") == 1, caplog.text
            assert "trying again in 0.5s" in caplog.text and worker.restart_at > time.monotonic()
            assert deployment.head.alive and other.alive
        finally:
            deployment.log_dir.unlink()
        deadline = time.monotonic() + 10
        while not worker.alive:
            assert time.monotonic() < deadline
            deployment.revive()
            time.sleep(0.05)


def test_stop_leaves_nothing_running_while_another_thread_keeps_reviving(caplog):
    """A library user's own supervisor thread must not launch again what stop() is stopping, nor make again the
    temporary folder it removed, nor report the exits it caused (a review found both, in 3 of 10 runs)."""
    deployment = Deployment(executors.Pid, replicas=2, name="raced").start()
    stopped, looking = threading.Event(), threading.Event()

    def supervise() -> None:
        while not stopped.is_set():
            with contextlib.suppress(ProcessError):  # "not running", once stop() is through
                deployment.revive(wait=False)
            looking.set()
            time.sleep(0.01)

    supervisor = threading.Thread(target=supervise)
    supervisor.start()
    try:
        assert looking.wait(10)  # the supervisor is in its loop before stop() begins
        with caplog.at_level(logging.INFO, logger="shardnet.runtimes.deployment"):
            deployment.stop()
            time.sleep(0.5)  # looks the supervisor takes after stop(): none may launch anything
        assert not [process.role for process in deployment._spawned if process.alive]
        assert not deployment.log_dir.exists()
        assert "starting it again" not in caplog.text, caplog.text
    finally:
        stopped.set()
        supervisor.join()
        stop_all(deployment._spawned)


def test_a_head_that_does_not_answer_holds_up_a_look_half_a_second_at_most():
    with Deployment(executors.Pid, replicas=3, name="mute") as deployment:
        for replica in range(3):
            deployment.workers[(0, replica)].kill()
        deployment.head.signal(signal.SIGSTOP)  # alive, silent
        try:
            started = time.monotonic()
            deployment.revive(wait=False)
            assert time.monotonic() - started < 1.5  # one brief question, not one per worker
            assert all(worker.alive for worker in deployment.workers.values())  # launched anyway
        finally:
            deployment.head.signal(signal.SIGCONT)


def test_a_process_that_keeps_exiting_soon_after_its_launch_waits_longer_each_time(tmp_path):
    process = ShardnetProcess("worker-0-0", ["worker"], tmp_path / "w.log")
    delays = []
    for launched in range(8):  # each run serves 1 s: a crash loop
        process.ready_at = 100.0 * launched
        delays.append(process.note_exit(100.0 * launched + 1))
    assert delays == [0, 0.5, 1, 2, 4, 8, 16, 30]
    assert process.restart_at == 701 + 30
    process.ready_at = 1000.0
    assert process.note_exit(1000.0 + 61) == 0  # a long run: again at once, and the count starts over
    process.ready_at = None  # then a start that never got ready (hung, or crashed while loading) is a quick exit
    assert [process.note_exit(2000.0 + 100 * n) for n in range(3)] == [0.5, 1, 2]


def test_an_executor_printing_ready_on_something_is_not_taken_for_the_process_address(tmp_path):
    """The address came from the last "ready on X" in a process's log, an Executor's own line included
    ("ready on cuda:0"): the head was started with --connection cuda:0, or a hung restart counted as served."""
    with Deployment(executors.SaysReadyWhileLoading, name="loud", replicas=2, log_dir=str(tmp_path)) as deployment:
        assert "ready on cuda:0" in (tmp_path / "loud-worker-0-0.log").read_text()  # said, and not believed
        assert all(worker.address != "cuda:0" for worker in deployment.workers.values())
        [doc] = deployment.post("/tag", [Document()])
        assert doc.tags["by"] == "tagger"


def test_deployments_sharing_a_log_folder_each_serve_their_own_executor(tmp_path):
    """Logs were named by role only: two deployments in one --log-dir read each other's ready lines, and both
    announced one head, answering with the other's Executor."""
    shared = str(tmp_path / "logs")
    first = Deployment(executors.Tagger, name="first", uses_with={"label": "first"}, log_dir=shared)
    second = Deployment(executors.Tagger, name="second", uses_with={"label": "second"}, log_dir=shared)
    starts = [threading.Thread(target=deployment.start) for deployment in (first, second)]
    try:
        for start in starts:
            start.start()
        for start in starts:
            start.join(60)
        assert first.address != second.address
        for deployment in (first, second):
            [doc] = deployment.post("/tag", [Document()])
            assert doc.tags["by"] == deployment.name
        assert {"first-head.log", "second-head.log"} <= {path.name for path in (tmp_path / "logs").iterdir()}
    finally:
        first.stop()
        second.stop()


def test_max_message_mb_sets_every_process_and_post_at_once():
    with Deployment(executors.Tagger, name="sized", max_message_mb=1) as deployment:
        with pytest.raises(ReplicaError, match="max message size") as caught:  # the worker's own, named
            deployment.post("/grow", [Document()], parameters={"bytes": 2 * 2**20})
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(deployment.post("/grow", [Document()], parameters={"bytes": 1000})[0].text) == 1000
        [one] = deployment.post("/grow", Document(), parameters={"bytes": 10})  # a lone Document, as Jina takes it
        assert one.text == "x" * 10


@pytest.mark.parametrize("size", [0, -1, float("nan"), 5000, "64", True])
def test_a_bad_max_message_mb_is_refused_where_it_is_given(size):
    with pytest.raises(ConfigurationError, match="max_message_mb"):
        Deployment(executors.Tagger, max_message_mb=size)


@pytest.mark.parametrize("option", ["timeout", "attempt_timeout"])
# past 1e9 s (the pool's MAX_TIMEOUT) the head process refused it at start: a ProcessError around its usage text
@pytest.mark.parametrize("seconds", [0, -1.5, float("nan"), float("inf"), "5", 1e10, 1e9 + 1])
def test_a_bad_timeout_is_refused_where_it_is_given_not_by_the_head_process(option, seconds):
    with pytest.raises(ConfigurationError, match=rf"^{option} must be positive seconds up to 1e\+09"):
        Deployment(executors.Tagger, **{option: seconds})
    assert Deployment(executors.Tagger, **{option: 1e9})  # the longest the head takes


@pytest.mark.parametrize(
    "options, message",
    # each was taken, and refused by the head process once started (a ProcessError around its usage text); an
    # empty control token was worse: taken for none, the head accepted an ACTIVATE with no token at all
    [
        ({"port": 70000}, "port must be a whole number from 0 (a free one) to 65535, got 70000"),
        ({"port": -1}, "port must be a whole number from 0 (a free one) to 65535, got -1"),
        ({"port": "8080"}, "port must be a whole number from 0 (a free one) to 65535, got '8080'"),
        ({"host": ""}, "host must be a name or an IP address, got ''"),
        ({"host": "unix:/tmp/x.sock"}, "host 'unix:/tmp/x.sock' is no name or IP address"),
        ({"control_token": ""}, "control_token must be None (one is made) or non-empty printable ASCII text"),
        ({"control_token": "s3cret\nmore"}, "control_token must be None (one is made) or non-empty printable ASCII"),
        ({"control_token": "sécret"}, "control_token must be None (one is made) or non-empty printable ASCII"),
        ({"control_token": "s3cret "}, "control_token must be None (one is made) or non-empty printable ASCII"),
        ({"shards": 101, "replicas": 100}, "shards=101 x replicas=100 = 10100 workers, more than the 10000 a head"),
        ({"metrics_port": 70000}, "metrics_port must be a whole number from 0 (a free one) to 65535, got 70000"),
        ({"metrics_port": True}, "metrics_port must be a whole number from 0 (a free one) to 65535, got True"),
        ({"metrics_port": "9100"}, "metrics_port must be a whole number from 0 (a free one) to 65535, got '9100'"),
        ({"port": 9100, "metrics_port": 9100}, "metrics_port (9100) must differ from the head's port"),
    ],
)
def test_a_host_port_token_or_size_its_head_would_refuse_is_refused_where_it_is_given(options, message):
    with pytest.raises(ConfigurationError) as refused:
        Deployment(executors.Tagger, **options)
    assert message in str(refused.value) and "cret" not in str(refused.value)  # a token is not shown


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        return answer.read().decode()


def test_metrics_port_has_the_head_serve_there_every_other_process_on_a_port_of_its_own_kept_by_a_restarted_head():
    """A deployment ran with no metrics at all: only a head and workers started by hand could be scraped."""
    with Deployment(executors.Pid, replicas=2, name="counted", metrics_port=0, drain_seconds=1) as deployment:
        deployment.post("/who", [Document()], timeout=10)
        where = {process.role: process.metrics_address for process in deployment.processes}
        assert set(where) == {"head", "worker-0-0", "worker-0-1"} and len(set(where.values())) == 3, where
        # counted once the head has asked its workers what endpoints they serve: Pid's default handler lists none
        counted = 'shardnet_head_requests_total{deployment="counted",endpoint="(other)",outcome="ok"} 1.0'
        deadline = time.monotonic() + 10
        while counted not in scrape(where["head"]):
            assert time.monotonic() < deadline, scrape(where["head"])
            time.sleep(0.05)
        handled = re.compile(r'^shardnet_worker_requests_total\{deployment="counted",endpoint="/default",'
                             r'outcome="ok",shard="0"\} (\S+)$', re.M)
        counts = [handled.search(scrape(where[role])) for role in ("worker-0-0", "worker-0-1")]
        assert sum(float(found.group(1)) for found in counts if found) == 1.0  # the replica that served it
        header, *rows = deployment.table().splitlines()
        assert header.split()[-1] == "METRICS" and {row.split()[0]: row.split()[-1] for row in rows} == where

        deployment.restart_head()  # where a scraper looks for it
        assert deployment.head.metrics_address == where["head"] and "shardnet_head_requests_total" in scrape(
            where["head"])
        restarted = deployment.restart_worker(0, 1)  # a free port again, said where
        assert restarted.metrics_address and "shardnet_worker_requests_total" in scrape(restarted.metrics_address)
    with Deployment(executors.Pid, name="uncounted") as deployment:  # without it: no listener, no column
        assert deployment.head.metrics_address is None and "METRICS" not in deployment.table()


def test_a_numpy_port_is_a_port_and_an_inherited_empty_token_is_refused_before_anything_starts(monkeypatch):
    """A numpy integer was refused as a port (a regression review's find); an empty SHARDNET_CONTROL_TOKEN, which
    the processes inherit and refuse, was found only once the head had started."""
    import numpy

    assert Deployment(executors.Tagger, port=numpy.int64(8080))
    monkeypatch.setenv("SHARDNET_CONTROL_TOKEN", "")
    with pytest.raises(ConfigurationError, match=r"\$SHARDNET_CONTROL_TOKEN is empty, and the deployment takes it"):
        Deployment(executors.Tagger)
    monkeypatch.setenv("SHARDNET_CONTROL_TOKEN", "s3cret ")  # its processes would read it stripped from their file
    with pytest.raises(ConfigurationError, match="no space at either end") as refused:
        Deployment(executors.Tagger)
    assert "s3cret" not in str(refused.value)


def test_an_executors_own_replica_lost_is_no_heads_word_of_a_lost_replica():
    """post() took any ERROR named ReplicaLost for its head's (a regression review's find): an Executor's exception
    of that name is raised as the Executor's."""
    from shardnet.runtimes.deployment import _lost_with_a_replica

    def _lost_with_a_replica_by(status, deployment: str) -> bool:
        return _lost_with_a_replica(status, deployment, "head:1") is not None

    heads, executors_own = DataRequest(), DataRequest()
    heads.set_error("UNAVAILABLE: deployment 'idx', shard 0, replica x: gone", name="ReplicaLost", executor="idx")
    executors_own.set_error("my own", name="ReplicaLost", executor="MyIndexer")
    assert _lost_with_a_replica_by(heads.status, "idx")
    assert not _lost_with_a_replica_by(executors_own.status, "idx")
    assert not _lost_with_a_replica_by(executors_own.status, "MyIndexer")  # no status name leads its description


def test_at_most_once_reaches_the_head_and_a_non_flag_is_refused():
    assert "--at-most-once" in Deployment(executors.Tagger, at_most_once=True)._head_options
    assert "--at-most-once" not in Deployment(executors.Tagger)._head_options
    with pytest.raises(ConfigurationError, match="at_most_once"):
        Deployment(executors.Tagger, at_most_once="yes")


def test_log_level_reaches_the_head_workers_uses_before_and_a_restarted_worker():
    """Every child logged at INFO whatever was asked: ``shardnet deploy --log-level DEBUG`` set deploy's own
    logging only, and Deployment had no way to pass a level on (a knobs review's find)."""
    with Deployment(executors.Tagger, name="chatty", log_level="DEBUG", uses_before=executors.Tagger) as deployment:
        worker = deployment.workers[(0, 0)]
        worker.kill()
        assert deployment.revive() == ["worker-0-0"]
        for process in deployment.processes:  # the restarted worker's own launch, not its first one's
            assert process.arguments[:2] == ["--log-level", "DEBUG"], process.arguments
            assert " DEBUG " in process._output(), (process.role, process.tail())


@pytest.mark.parametrize("level", ["debug", "VERBOSE", 10, None])
def test_a_log_level_no_child_would_take_is_refused_where_it_is_given(level):
    with pytest.raises(ConfigurationError, match=r"^log_level must be one of DEBUG, INFO, WARNING, ERROR \("):
        Deployment(executors.Tagger, log_level=level)


@pytest.mark.parametrize("seconds", [-1, float("nan"), float("inf"), "5", True])
def test_a_bad_drain_seconds_is_refused_where_it_is_given(seconds):
    with pytest.raises(ConfigurationError, match="drain_seconds"):
        Deployment(executors.Tagger, drain_seconds=seconds)


def test_drain_seconds_bounds_how_long_a_stop_waits_for_a_request_in_flight(tmp_path):
    """Deployment could not set its processes' drain (a lifecycle review's find): a request running past it is
    cut when the stop comes, and the caller is told, instead of the stop waiting for it."""
    workspace = tmp_path / "ws"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deployment = Deployment(executors.SlowUntilReleased, name="brief", drain_seconds=0.3, workspace=str(workspace))
        deployment.start()
        try:
            answer = pool.submit(deployment.post, "/slow", [Document()])  # runs until released: never, here
            _poll_for(lambda: next(workspace.glob("**/started"), None), answer)
            started = time.monotonic()
            deployment.stop()
            took = time.monotonic() - started
        finally:
            deployment.stop()
        with pytest.raises(ReplicaError):
            answer.result(timeout=10)
    assert took < 5.0, took  # two drains of 0.3 s and the exits, not the handler's 20 s
    assert deployment.killed_at_stop == []


def test_a_stop_whose_head_cuts_a_request_at_its_drains_end_names_the_head_in_failed_at_stop(tmp_path):
    """stop() drains the head first: an async handler sleeping past the drain had its call cut at the head's
    drain's end, and the worker's handler cancelled before the worker began draining; both exited 0 without a
    word, and failed_at_stop was empty (a review's find). The head says so and exits 4: it is named there (its
    worker, its handler cancelled while it still served, cut nothing at its own drain)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deployment = Deployment(executors.Sleepy, name="sleeper", drain_seconds=0.3)
        deployment.start()
        try:
            answer = pool.submit(deployment.post, "/sleep", [Document()], {"seconds": 30, "mark": str(tmp_path)})
            _poll_for(lambda: any(tmp_path.iterdir()), answer)  # the worker's handler has it
            deployment.stop()
            failed = deployment.failed_at_stop
        finally:
            deployment.stop()
        with pytest.raises(ReplicaError) as cut:
            answer.result(timeout=10)
    assert cut.value.code == grpc.StatusCode.UNAVAILABLE, cut.value
    assert failed == ["head (exit code 4)"], failed
    assert deployment.killed_at_stop == []


def test_a_start_that_fails_says_its_root_cause_and_its_deployment(tmp_path):
    """The error quoted the output's last 20 lines, the chained cause cut off, and the temporary log with the
    rest was then removed; nor did it name the deployment (a lifecycle review's find)."""
    with pytest.raises(ProcessError) as caught:
        Deployment(executors.ModelMissing, name="encoder", startup_timeout=60).start()
    said = str(caught.value)
    assert said.startswith("deployment 'encoder' did not start (its temporary logs are removed"), said
    assert "/nonexistent/models/encoder.bin" in said and "the encoder could not be loaded" in said, said


def test_a_deployment_given_no_workspace_keeps_its_executors_state_in_the_cache_folder():
    """As a worker's and as Jina's: it was a temporary folder, and an index written in a with block was gone at
    its end (a README review's find). The tests' cache folder is their own (conftest)."""
    with Deployment(executors.StampsWorkspace, name="cached") as deployment:
        [doc] = deployment.post("/stamp", [Document()])
    expected = Path(os.environ["XDG_CACHE_HOME"]) / "shardnet" / "StampsWorkspace" / "0"
    assert deployment.workspace == expected.parent.parent and doc.tags["before"] == str(expected)
    assert expected.is_dir()  # kept after the stop


def test_a_deployment_given_no_workspace_serves_where_the_cache_folder_cannot_be_made(monkeypatch, caplog):
    """An unwritable cache folder (HOME=/ in a container, a system user's /nonexistent) failed the start even for
    an Executor that never uses its workspace (a regression review's find): a temporary one serves, said."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")
    with Deployment(executors.StampsWorkspace, name="homeless") as deployment:
        [doc] = deployment.post("/stamp", [Document()])
        assert doc.tags["before"] == str(deployment.log_dir / "workspace" / "StampsWorkspace" / "0")
    assert "the cache folder /dev/null/cache/shardnet cannot be used" in caplog.text and "removed at stop" in caplog.text


ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import executors
from shardnet import Deployment

if __name__ == "__main__":
    with Deployment(executors.LeavesAHelper, name="orphans", replicas=2, workspace=sys.argv[2]) as deployment:
        print(" ".join(str(process.pid) for process in deployment.processes), flush=True)
        time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def still_running(pids: list[int], timeout: float) -> list[int]:
    """The processes of ``pids`` still running once ``timeout`` seconds have passed, or fewer if all end first."""
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _running(pid)]


def kill_all(pids: list[int]) -> None:
    """SIGKILL whichever of ``pids`` still run: a test that failed leaves none behind."""
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_processes_of_a_deployment_killed_with_sigkill_stop_on_their_own(tmp_path):
    """The workers stop through their parent watch, and stop what their Executors started and left running
    (a model server, say) as the Deployment would have: those were left behind."""
    script = tmp_path / "orphans.py"
    script.write_text(ORPHAN_SCRIPT)
    workspace = tmp_path / "ws"
    parent = subprocess.Popen(
        [sys.executable, str(script), str(Path(executors.__file__).parent), str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # a killed parent removes no folder: they go with tmp_path
    )
    children: list[int] = []
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 3 and all(_running(pid) for pid in children)
        helpers = [int(path.name.split("-")[1]) for path in workspace.glob("helper-*")]
        assert len(helpers) == 2 and all(_running(pid) for pid in helpers)
        children += helpers  # killed in the end whatever happens
        parent.kill()  # no finalizer, no signal handler runs: the children must notice by themselves
        parent.wait(10)
        assert not still_running(children, 15), "a child, or a helper of its, outlived its Deployment"
    finally:
        parent.kill()
        kill_all(children)


LAUNCHER_SCRIPT = """
import subprocess, sys, time
worker = subprocess.Popen(
    [sys.executable, "-m", "shardnet", "worker", "--uses", sys.argv[1] + ":" + sys.argv[3], "--port", "0",
     "--workspace", sys.argv[2], "--parent-pid", str(__import__("os").getpid()), *sys.argv[5:]],
    start_new_session=True, stdout=open(sys.argv[4], "ab"), stderr=subprocess.STDOUT,
)
print(worker.pid, flush=True)
time.sleep(120)
"""


def test_a_worker_whose_launcher_dies_while_its_executor_loads_stops_what_the_executor_started(tmp_path):
    """It found its --parent-pid gone once loaded, and exited, leaving the helper its Executor had started
    (found by a review): a session of its own is its to clean up, as the launcher would have."""
    script, workspace = tmp_path / "launcher.py", tmp_path / "ws"
    script.write_text(LAUNCHER_SCRIPT)
    launcher = subprocess.Popen(
        [sys.executable, str(script), executors.__file__, str(workspace), "HelperThenSlowLoad", tmp_path / "worker.log"],
        stdout=subprocess.PIPE, text=True,
    )
    left: list[int] = []
    try:
        worker = int(launcher.stdout.readline())
        left.append(worker)
        deadline = time.monotonic() + 30
        while not list(workspace.glob("helper-*")):
            assert time.monotonic() < deadline, "the Executor never started its helper"
            time.sleep(0.05)
        [helper] = [int(path.name.split("-")[1]) for path in workspace.glob("helper-*")]
        left.append(helper)
        launcher.kill()  # while the Executor still loads
        launcher.wait(10)
        assert not still_running(left, 20), "the worker, or its Executor's helper, outlived the launcher"
    finally:
        launcher.kill()
        kill_all(left)


def test_a_worker_whose_launcher_dies_during_a_load_that_hangs_stops_at_once(tmp_path):
    """The parent watch began once the Executor had loaded: a load that hung (a download, a GPU wait) left its
    worker running for good after its Deployment was killed (found by a review)."""
    script, workspace, log = tmp_path / "launcher.py", tmp_path / "ws", tmp_path / "worker.log"
    script.write_text(LAUNCHER_SCRIPT)
    launcher = subprocess.Popen([sys.executable, str(script), executors.__file__, str(workspace), "EndlessLoad", log],
                                stdout=subprocess.PIPE, text=True)
    left: list[int] = []
    try:
        left.append(int(launcher.stdout.readline()))
        deadline = time.monotonic() + 30
        while not (workspace / "loading").exists():
            assert time.monotonic() < deadline, "the Executor never began to load"
            time.sleep(0.05)
        launcher.kill()
        launcher.wait(10)
        assert not still_running(left, 5), "the worker loaded on after its launcher was killed"
        assert "its launcher (--parent-pid" in log.read_text() and "exited while loading the Executor" in log.read_text()
    finally:
        launcher.kill()
        kill_all(left)


def test_a_worker_whose_launcher_dies_while_its_close_hangs_still_exits(tmp_path):
    """Once stopping, the worker no longer watched its launcher: a close() that hung kept it running for ever
    after its Deployment's kill -9 (a review's find). The stop goes on, its close() bounded, and it exits (the
    launcher's exit does not cut it at once: a supervisor stopping a group ends the launcher first)."""
    launcher, workspace, log = _launch_under_a_launcher(tmp_path, "HangsInClose")
    left: list[int] = []
    try:
        worker = int(launcher.stdout.readline())
        left.append(worker)
        deadline = time.monotonic() + 30
        _wait_in_log(log, r"ready on (\S+)", deadline)
        os.kill(worker, signal.SIGTERM)  # a drain of 1 s, then a close() that hangs
        while not (workspace / "closing").exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        launcher.kill()
        launcher.wait(10)
        assert not still_running(left, 15), log.read_text()  # close() gets what is left of the drain and 5 s
        assert "the Executor's close() did not return within" in log.read_text(), log.read_text()
    finally:
        launcher.kill()
        kill_all(left)


def test_a_worker_whose_launcher_dies_while_a_handler_blocks_its_event_loop_exits(tmp_path):
    """The parent watch was a task of the event loop: a blocking call in an async handler kept the worker
    serving on as an orphan for as long (a review's find). The watch is a thread, and the stop it asks for must
    begin within the drain's grace."""
    launcher, workspace, log = _launch_under_a_launcher(tmp_path, "BlocksItsLoop")
    left: list[int] = []
    try:
        left.append(int(launcher.stdout.readline()))
        deadline = time.monotonic() + 30
        address = _wait_in_log(log, r"ready on (\S+)", deadline)
        blocked = threading.Thread(target=_call_quietly, args=(address[1], "/block"), daemon=True)
        blocked.start()
        while not (workspace / "blocking").exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        launcher.kill()
        launcher.wait(10)
        assert not still_running(left, 8), log.read_text()  # its 60 s block cut after the 1 s grace
        assert "the event loop did not begin the stop within 1s" in log.read_text(), log.read_text()
    finally:
        launcher.kill()
        kill_all(left)


def _launch_under_a_launcher(tmp_path: Path, executor: str) -> tuple[subprocess.Popen, Path, Path]:
    """(launcher, workspace, log) of a script that starts a worker of ``executor`` watching it (--parent-pid, a
    drain of 1 s) and prints the worker's pid."""
    script, workspace, log = tmp_path / "launcher.py", tmp_path / "ws", tmp_path / "worker.log"
    script.write_text(LAUNCHER_SCRIPT)
    launcher = subprocess.Popen(
        [sys.executable, str(script), executors.__file__, str(workspace), executor, log, "--drain-seconds", "1"],
        stdout=subprocess.PIPE, text=True,
    )
    return launcher, workspace, log


def _wait_in_log(log: Path, pattern: str, deadline: float) -> re.Match:
    """The first match of ``pattern`` in ``log``, once it is written (AssertionError at ``deadline``)."""
    while not (found := re.search(pattern, log.read_text() if log.exists() else "")):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.05)
    return found


def _call_quietly(address: str, endpoint: str) -> None:
    """Send ``endpoint`` one request, whatever its answer (the worker may be gone before it)."""
    with contextlib.suppress(ReplicaError):
        oneshot.send_request_sync(DataRequest([Document()], endpoint=endpoint), address, timeout=60)


def _stopped_worker_log(tmp_path: Path, executor: str, *flags: str) -> tuple[float, str]:
    """Start a worker of ``executor`` (and ``flags``), SIGTERM it once it serves; how long its exit took, and its
    log."""
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "shardnet", "worker", "--uses", f"{executors.__file__}:{executor}", "--port", "0",
             *flags],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "ready on" not in log_path.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        started = time.monotonic()
        worker.terminate()
        assert worker.wait(20) == 0, log_path.read_text()
        return time.monotonic() - started, log_path.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)


def test_a_worker_whose_executor_leaves_a_thread_running_exits_after_its_drain_naming_it(tmp_path):
    """Python's exit joined the thread for ever: the worker hung after its drain until a Deployment's stop killed
    it (a lifecycle review's find). It gives such threads a few seconds, names them, and exits."""
    _, said = _stopped_worker_log(tmp_path, "LeavesAThread")
    assert "exiting with 1 thread(s) still running 5s after the program ended" in said, said
    assert "forgotten-flusher" in said, said


def test_an_executors_slow_atexit_save_runs_once_and_to_its_end(tmp_path):
    """The exit watch ran the atexit functions a second time, from its own thread, while the first run still
    wrote: the saved file was truncated mid-write (a regression review's find). It stands down once they began."""
    _, said = _stopped_worker_log(tmp_path, "SavesAtExit", "--workspace", str(tmp_path / "ws"))
    [saved] = (tmp_path / "ws").glob("**/saved.txt")
    assert saved.read_text() == "".join(f"chunk {n}\n" for n in range(11)) + "COMPLETE\n"
    assert "still running" not in said, said


def test_main_called_in_a_program_of_ones_own_returns_and_leaves_that_program_alone(tmp_path):
    """main() armed the exit watch, which ended its caller's program 5 s later, exit code 0 (a regression
    review's find): only the shardnet program itself arms it."""
    script = (
        "import time\n"
        "from shardnet.cli.main import main\n"
        "code = main(['status', '127.0.0.1:9', '--timeout', '1'])\n"
        "time.sleep(6)\n"
        "print('still here', code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "still here" in result.stdout, result


def test_a_worker_whose_executor_keeps_an_idle_thread_pool_exits_at_once_without_a_warning(tmp_path):
    """The fix above joined the pool's idle thread, which ends only in Python's own exit, for its whole grace,
    then warned of it (a regression review's find)."""
    took, said = _stopped_worker_log(tmp_path, "UsesAThreadPool")
    assert took < 3.0 and "still running" not in said, (took, said)


def test_a_worker_follows_a_parent_pid_that_is_not_its_own_parent(tmp_path):
    """--parent-pid names a process to outlive not: here a sibling (a supervisor, say), watched by its pid."""
    sibling = subprocess.Popen(["sleep", "120"])
    worker = None
    try:
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "shardnet", "worker", "--uses", f"{executors.__file__}:Tagger", "--port", "0",
                 "--parent-pid", str(sibling.pid)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while "ready on" not in (tmp_path / "worker.log").read_text():
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        time.sleep(1.5)  # three of its checks: it must stay up while the process it follows lives
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        sibling.kill()
        sibling.wait(5)
        assert worker.wait(15) == 0  # drained and exited on its own
        assert "(--parent-pid) exited: stopping" in (tmp_path / "worker.log").read_text()
    finally:
        sibling.kill()
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(5)


def test_jina_habits_per_shard_workspaces_close_and_executor_specific_parameters(tmp_path):
    workspace = tmp_path / "ws"
    with Deployment(executors.Ledger, name="ledger", shards=2, workspace=str(workspace)) as deployment:
        for shard_text in ("a", "b", "c", "d"):
            # as in Jina 3.34, executor-specific parameters address the class's name (metas.name), not the deployment's
            [doc] = deployment.post("/note", [Document(text=shard_text)],
                                    parameters={"prefix": "all", "ledger": {"prefix": "dep"}, "Ledger": {"prefix": "mine"}})
            assert doc.tags["prefix"] == "mine" and doc.tags["in"] is True
        folders = {doc.tags["workspace"] for doc in deployment.post("/note", [Document(text="e")])}
    # one folder per shard, WORKSPACE/CLASS/SHARD as Jina lays it out, and close() ran in each when the deployment
    # stopped
    shards = sorted(path.parent.name for path in workspace.glob("Ledger/*/ledger.txt"))
    assert shards == ["0", "1"], sorted(str(p) for p in workspace.rglob("*"))
    written = "\n".join((workspace / "Ledger" / shard / "ledger.txt").read_text() for shard in shards)
    assert sorted(written.split()) == ["a", "b", "c", "d", "e"]  # each text noted once, by one shard
    assert folders <= {str(workspace / "Ledger" / "0"), str(workspace / "Ledger" / "1")}


def test_jina_habits_runtime_args_docs_map_and_the_workspaces_of_uses_before_and_after(tmp_path):
    """A hash-partitioning indexer reads runtime_args.shards, a reducer reads docs_map (each shard's column by the
    worker that answered it), and uses_before and uses_after find their workspace folders, as under Jina."""
    workspace = tmp_path / "ws"
    ids = [f"{number:032x}" for number in range(6)]
    with Deployment(executors.Partitioner, name="part", shards=2, replicas=2, polling="ALL", workspace=str(workspace),
                    uses_before=executors.StampsWorkspace, uses_after=executors.MapReducer) as deployment:
        response = deployment.post("/partition", [Document(id=i) for i in ids], return_responses=True)  # ALL
    results = response.parameters["__results__"]
    kept = {name: entry for name, entry in results.items() if name.startswith("part/shard-")}
    assert len(kept) == 2 and sum(entry["kept"] for entry in kept.values()) == len(ids), results
    assert all(entry["shards"] == 2 and entry["replicas"] == 2 for entry in kept.values()), results
    assert results["part/uses_before-0"] == {"stamped": len(ids)}, results  # named as Jina names it (a review)
    senders = {doc.id: doc for doc in response.docs}
    # docs_map as Jina gives it: by the deployment that handled each column last, so the shards share one key
    assert set(senders) == {"part"}, list(senders)
    for doc in senders.values():
        assert doc.text == ",".join(ids)  # each shard's whole column
        assert doc.tags["workspace"] == str(workspace / "MapReducer" / "0")
        assert doc.tags["before"] == [str(workspace / "StampsWorkspace" / "0")] * len(ids)


@pytest.mark.parametrize("uses", ["config.yml", "jinahub://Encoder", "no_class_here"])
def test_uses_that_no_worker_could_load_is_refused_at_construction(uses):
    with pytest.raises(ConfigurationError, match="must look like MODULE:CLASS or FILE.py:CLASS"):
        Deployment(uses)


def test_the_deployments_timeout_bounds_a_post_as_jinas_timeout_send_does():
    """Deployment(timeout=1) with a handler taking 20 s: post() (no deadline of its own, as Jina's) fails after
    about a second naming the deployment; the handler's answer within the timeout still comes."""
    with Deployment(executors.Sleepy, name="slow", timeout=1.0) as deployment:
        [doc] = deployment.post("/sleep", [Document()], parameters={"seconds": 0.1})
        assert doc.tags["slept"] == 0.1
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="deployment 'slow'"):
            deployment.post("/sleep", [Document()], parameters={"seconds": 20})
        assert time.monotonic() - started < 10


def test_uses_metas_names_the_executor_for_its_parameters_and_workspace_as_in_jina(tmp_path):
    """Two deployments of one class in one workspace share its folders by default, as in Jina; uses_metas
    gives each a name of its own, which its executor-specific parameters then address."""
    workspace = tmp_path / "ws"
    with Deployment(executors.Ledger, name="ledger", workspace=str(workspace),
                    uses_metas={"name": "orders"}) as deployment:
        [doc] = deployment.post("/note", [Document(text="a")],
                                parameters={"prefix": "all", "Ledger": {"prefix": "class"}, "orders": {"prefix": "mine"}})
    assert doc.tags["prefix"] == "mine"
    assert doc.tags["workspace"] == str(workspace / "orders" / "0")
    assert (workspace / "orders" / "0" / "ledger.txt").read_text() == "a"


@pytest.mark.parametrize(
    "uses_metas, said",
    [({"workspace": "/x"}, "takes only 'name'"), ({"name": "../up"}, "names a folder"), ("orders", "is a mapping")],
)
def test_a_bad_uses_metas_is_refused_where_it_is_given(uses_metas, said):
    with pytest.raises(ConfigurationError, match=re.escape(said)):
        Deployment(executors.Ledger, uses_metas=uses_metas)


def test_a_stop_answers_a_request_the_head_accepted_before_its_next_hops_go(tmp_path):
    """stop() sent every SIGTERM at once: a request in uses_before when it came found the shards draining or
    gone (UNAVAILABLE, after uses_before had run). The head drains first now, its hops still serving."""
    workspace = tmp_path / "ws"
    deployment = Deployment(executors.Pid, name="held", uses_before=executors.SlowUntilReleased,
                            log_dir=str(tmp_path), workspace=str(workspace))
    deployment.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answer = pool.submit(deployment.post, "/slow", [Document(id="a")])
            started = _poll_for(lambda: next(workspace.glob("**/started"), None), answer)
            stopping = pool.submit(deployment.stop)
            _poll_for(lambda: "draining" in (tmp_path / "held-head.log").read_text(), answer)
            (started.parent / "release").touch()  # uses_before answers; the head passes it on to its shard
            [doc] = answer.result(timeout=20)
            stopping.result(timeout=30)
    finally:
        deployment.stop()
    assert doc.id == "a" and doc.text == "finished" and doc.tags["shard"] == 0  # through uses_before and the shard
    assert deployment.killed_at_stop == []


def _poll_for(found, answer: concurrent.futures.Future, seconds: float = 20.0):
    """What ``found()`` gives once it gives something, while ``answer`` is still awaited."""
    deadline = time.monotonic() + seconds
    while not (result := found()):
        assert time.monotonic() < deadline and not answer.done(), answer.done() and answer.exception()
        time.sleep(0.02)
    return result


def test_a_stop_kills_what_does_not_stop_within_one_timeout_for_all_and_says_so(tmp_path, caplog):
    """Each process was given the whole timeout in turn: three that hung took three times as long, and were
    killed without a word (found by a review)."""
    processes = [
        ShardnetProcess(f"worker-0-{replica}", ["worker", "--uses", f"{executors.__file__}:ClosesSlowly", "--port", "0"],
                        tmp_path / f"w{replica}.log").launch()
        for replica in range(3)
    ]
    try:
        for process in processes:
            process.wait_ready(30)
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="shardnet.runtimes.processes"):
            killed = stop_all(processes, timeout=1.0)
        took = time.monotonic() - started
    finally:
        stop_all(processes, timeout=0.1)
    assert killed == processes and all(process.popen.returncode == -signal.SIGKILL for process in processes)
    assert took < 1.0 + 2.0 + 2.0, took  # one timeout (the workers' floor of 2 s), not one each
    said = [record.getMessage() for record in caplog.records]
    assert all(any(f"worker-0-{replica} (pid" in line and "killed (SIGKILL)" in line for line in said) for replica in range(3)), said


def test_an_executors_own_workspace_wins_in_a_deployment_given_none_as_in_jina(tmp_path):
    """uses_with={"workspace": ...} placed the Executor's folder there under Jina's Deployment; shardnet's gave
    every worker the cache folder as --workspace, which won (a review's find). Given one, the Deployment's wins."""
    own = tmp_path / "own"
    with Deployment(executors.StampsWorkspace, name="own", uses_with={"workspace": str(own)}) as deployment:
        [doc] = deployment.post("/stamp", [Document()])
    assert doc.tags["before"] == str(own / "StampsWorkspace" / "0")
    given = tmp_path / "given"
    with Deployment(executors.StampsWorkspace, name="given", uses_with={"workspace": str(own)},
                    workspace=str(given)) as deployment:
        [doc] = deployment.post("/stamp", [Document()])
    assert doc.tags["before"] == str(given / "StampsWorkspace" / "0")


def test_a_worker_whose_stop_fails_is_named_after_the_stop_not_reported_drained(tmp_path):
    """A worker exiting by itself with a code other than 0 at a stop (its close() cut at its bound, or a crash
    in it) was not counted: deploy said every process had drained (a regression review's find). It is in
    failed_at_stop."""
    with Deployment(executors.DiesInClose, name="dies", workspace=str(tmp_path)) as deployment:
        deployment.post("/tag", [Document()])
    assert deployment.killed_at_stop == [], deployment.killed_at_stop
    assert deployment.failed_at_stop == ["worker-0-0 (exit code 3)"], deployment.failed_at_stop


def test_a_stop_that_kills_a_worker_quotes_its_temporary_log_not_a_path_removed_with_it(tmp_path, caplog):
    """A worker killed at a stop was warned about with "Its log: PATH", a file of the temporary log folder that
    the same stop removes (a regression review's find). Without a log_dir its last lines are quoted instead."""
    deployment = Deployment(executors.FreezesInClose, name="frozen", workspace=str(tmp_path), drain_seconds=0)
    deployment._stop_timeout = 5.0  # killed after 5 s, not after the 12 s a close() is given: the head is out by then
    try:
        deployment.start()
        deployment.post("/tag", [Document()])
        log_path = deployment.workers[(0, 0)].log_path
        with caplog.at_level("WARNING", logger="shardnet.runtimes.processes"):
            deployment.stop()
    finally:
        deployment.stop()
    assert deployment.killed_at_stop == ["worker-0-0"], deployment.killed_at_stop
    [warning] = [record.getMessage() for record in caplog.records if "worker-0-0 (pid" in record.getMessage()]
    assert "killed (SIGKILL)" in warning and "FreezesInClose: freezing in close()" in warning, warning
    assert str(log_path) not in warning and not log_path.exists(), warning


def test_a_stop_waits_for_an_executors_close_and_the_threads_it_left_not_only_close(tmp_path):
    """A stop gave a process 5 s beyond its drains, for its Executor's close() only: a worker also gives the threads
    its Executor left THREAD_EXIT_GRACE, and was SIGKILLed while a flusher wrote (its write lost, the kill blamed
    on "its drain or its Executor's close()"; a regression review's find). It gets AFTER_DRAIN_SECONDS, as a pod's
    grace under k8s render does: here 3 s of close() and 2.5 s of a flusher, past the 5 s it had."""
    with Deployment(executors.FlushesAfterClose, name="flushes", workspace=str(tmp_path), drain_seconds=0,
                    uses_with={"close_seconds": 3.0, "flush_seconds": 2.5}) as deployment:
        deployment.post("/tag", [Document()])
    assert deployment.killed_at_stop == [] and deployment.failed_at_stop == [], (
        deployment.killed_at_stop, deployment.failed_at_stop)
    assert [path.read_text() for path in tmp_path.rglob("flushed")] == ["flushed"]
    assert deployment._stop_timeout == AFTER_DRAIN_SECONDS >= CLOSE_GRACE + THREAD_EXIT_GRACE + 1


def test_a_stop_that_kills_a_worker_says_what_the_kill_cut_short_as_its_log_said(tmp_path, caplog):
    """The kill's warning said "its drain or its Executor's close() cut short" whatever the worker was doing:
    one killed while the threads its Executor left still ran was blamed on close() (a regression review's
    find). It says the step the worker's log said it was in."""
    processes = [
        ShardnetProcess(f"worker-0-{replica}", [
            "worker", "--uses", f"{executors.__file__}:FlushesAfterClose", "--port", "0", "--drain-seconds", "0",
            "--workspace", str(tmp_path / str(replica)), "--uses-with", json.dumps(seconds),
        ], tmp_path / f"w{replica}.log").launch()
        for replica, seconds in enumerate(({"close_seconds": 30}, {"flush_seconds": 30}))
    ]
    try:
        for process in processes:
            process.wait_ready(30)
        with caplog.at_level("WARNING", logger="shardnet.runtimes.processes"):
            assert stop_all(processes, timeout=0.0) == processes  # the workers' floor: 2 s
    finally:
        stop_all(processes, timeout=0.1)
    said = [record.getMessage() for record in caplog.records]
    assert any("worker-0-0 (pid" in line and "killed (SIGKILL), its Executor's close() cut short" in line
               for line in said), said
    assert any("worker-0-1 (pid" in line and "killed (SIGKILL), its Executor's threads cut short" in line
               for line in said), said
    assert step_cut_short("draining 127.0.0.1:1 (an Executor's print)\n") is None  # then: "its way out cut short"


def test_the_kill_reads_the_end_of_a_long_log_for_the_step_it_cut(tmp_path):
    """The kill read the whole of the process's log first (a regression review: 0.5 s per 50 MB before each
    SIGKILL, one worker after another); it reads its last STEP_LOOKBACK_BYTES."""
    from shardnet.runtimes.processes import STEP_LOOKBACK_BYTES

    process = ShardnetProcess("worker-0-0", [], tmp_path / "w.log")
    line = "2026-11-28 12:00:00,000 INFO [worker w pid 1] shardnet.runtimes.worker: {}\n"
    with open(process.log_path, "w") as log:
        log.write(line.format("closing the Executor (E): its close() gets 5.0s at most"))  # an old step, far back
        log.write("an Executor's print\n" * (3 * STEP_LOOKBACK_BYTES // 20))
        log.write(line.format("waiting for the Executor's threads (5s at most): flusher"))
    read = process._output(last_bytes=STEP_LOOKBACK_BYTES)
    assert len(read) <= STEP_LOOKBACK_BYTES and step_cut_short(read) == "its Executor's threads"
    assert len(process._output()) > 3 * STEP_LOOKBACK_BYTES  # the whole of it, for the log's quotes


def test_a_second_stop_of_a_stopped_deployment_keeps_what_the_first_one_found(tmp_path):
    """An explicit stop() then the ``with``'s exit (or a try/finally) emptied failed_at_stop and killed_at_stop:
    read after it, they told of a clean stop (a README review's find)."""
    with Deployment(executors.DiesInClose, name="twice", workspace=str(tmp_path)) as deployment:
        deployment.post("/tag", [Document()])
        deployment.stop()
        assert deployment.failed_at_stop == ["worker-0-0 (exit code 3)"], deployment.failed_at_stop
    assert deployment.failed_at_stop == ["worker-0-0 (exit code 3)"], deployment.failed_at_stop
    assert deployment.killed_at_stop == [], deployment.killed_at_stop
    assert not deployment.log_dir.exists() and all(not process.alive for process in deployment.processes)


REENTERED_STOP_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import executors
from shardnet import Deployment

if __name__ == "__main__":
    workspace = Path(sys.argv[2])
    deployment = Deployment(executors.ClosesWhenReleased, name="reentered", workspace=str(workspace), drain_seconds=0)

    def on_term(signum, frame):  # runs in the main thread, inside the with block's stop()
        deployment.stop()
        print("the handler's stop() returned", flush=True)
        (workspace / "release").touch()  # the worker's close() ends: the stop under way goes on

    def sigterm_once_closing():
        while not (workspace / "closing").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    with deployment:
        signal.signal(signal.SIGTERM, on_term)
        threading.Thread(target=sigterm_once_closing, daemon=True).start()
    print("stopped:", deployment.killed_at_stop, deployment.failed_at_stop, deployment.log_dir.exists(),
          any(process.alive for process in deployment.processes), flush=True)
"""


def test_a_stop_called_by_a_signal_handler_during_a_stop_returns_and_the_stop_under_way_ends(tmp_path):
    """A script's SIGTERM handler calling stop() while its main thread was already in stop() (leaving a ``with``
    block) waited for ever on the lock its own thread held (a regression review's find). It returns at once,
    and the stop under way ends as it would have: every process stopped, the temporary folders removed."""
    script, workspace, tmp = tmp_path / "reentered.py", tmp_path / "ws", tmp_path / "t"
    script.write_text(REENTERED_STOP_SCRIPT)
    tmp.mkdir()
    parent = subprocess.Popen(
        [sys.executable, str(script), str(Path(executors.__file__).parent), str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(tmp)},
        start_new_session=True,  # a hung one is killed with its children below
    )
    try:
        out, _ = parent.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(parent.pid, signal.SIGKILL)
        out, _ = parent.communicate()
        pytest.fail(f"the stop in the signal handler hung:\n{out}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    assert parent.returncode == 0, out
    assert "the handler's stop() returned\nstopped: [] [] False False\n" in out, out
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())


def test_the_demo_indexer_under_a_deployment_given_no_workspace_writes_nothing_in_the_current_folder(
    tmp_path, monkeypatch
):
    """Its index went to runtime_args.workspace or the current folder; with no workspace passed to the workers
    (an Executor's own may win, as in Jina) that was the user's current folder. It is the shard's folder."""
    from shardnet.examples.text_index import TextIndexer

    monkeypatch.chdir(tmp_path)
    with Deployment(TextIndexer, name="indexer") as deployment:
        deployment.post("/index", [Document(text="hello world")])
        [found] = deployment.post("/search", [Document(text="hello")])
    assert list(tmp_path.iterdir()) == []
    assert list((deployment.workspace / "TextIndexer" / "0").glob("text-index-shard-0.jsonl"))
    assert found.matches


def test_an_executors_own_workspace_wins_where_the_cache_folder_cannot_be_used(tmp_path, monkeypatch):
    """The fallback for an unusable cache folder was passed over the Executor's own workspace, and its state went
    to a temporary folder removed at stop (a regression review's find)."""
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")
    own = tmp_path / "own"
    with Deployment(executors.StampsWorkspace, name="homeless-own", uses_with={"workspace": str(own)}) as deployment:
        [doc] = deployment.post("/stamp", [Document()])
    assert doc.tags["before"] == str(own / "StampsWorkspace" / "0")


def test_a_link_in_place_of_the_token_folder_is_refused_naming_it_and_the_stop_removes_the_rest(tmp_path, caplog):
    """A /tmp cleaner removed the token's folder and another process put a link there: a dangling one gave a raw
    FileExistsError at the next launch, and one to a folder made stop() raise OSError, leaving the socket folder
    behind; a log folder the system would not let go (a file made immutable) raised PermissionError out of stop(),
    leaving the token's folder (regression reviews)."""
    import shutil

    deployment = Deployment(executors.Tagger, name="linked", unix_sockets=True, drain_seconds=1, startup_timeout=20)
    deployment.start()
    try:
        folder = deployment.control_token_file.parent
        sockets, logs = Path(deployment._sockets.name), deployment._tmp

        def refused_by_the_system() -> None:
            raise PermissionError(1, "Operation not permitted", str(logs.name))

        logs.cleanup = refused_by_the_system
        shutil.rmtree(folder)
        folder.symlink_to(tmp_path / "elsewhere")  # dangling
        with pytest.raises(ProcessError, match="no longer a folder only this user reads") as refused:
            deployment.restart_worker(0, 0)
        assert "'linked'" in str(refused.value) and str(folder) in str(refused.value)
        (tmp_path / "elsewhere").mkdir(mode=0o700)  # the link now leads to a folder: not removed through it
        (tmp_path / "elsewhere" / "kept").write_text("another's")
    finally:
        try:
            with caplog.at_level("WARNING", logger="shardnet.runtimes.deployment"):
                deployment.stop()
        finally:  # the link and the log folder are the test's to remove, whatever stop() did
            if folder.is_symlink():
                folder.unlink()
            shutil.rmtree(logs.name, ignore_errors=True)
    assert f"deployment 'linked': its folder {logs.name} could not be removed, and stays" in caplog.text
    assert (tmp_path / "elsewhere" / "kept").read_text() == "another's"
    assert not sockets.exists()


# -- a lifecycle review: a stop racing a start, a stop asked during the last launch, restarts that return early --


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    folder = tmp_path / "t"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_stop_racing_a_start_neither_breaks_it_nor_leaves_its_folders(own_tmp):
    """A stop() from another thread as start() begins: the start either serves or ends with 'stopped while it
    started', and no temporary folder (the control token's included) is left."""
    for _ in range(4):
        deployment = Deployment(executors.Pid, drain_seconds=1)
        stopper = threading.Thread(target=deployment.stop)
        stopper.start()
        try:
            deployment.start()
        except ProcessError as exc:
            assert "stopped while it started" in str(exc) or "stopped before it started" in str(exc), str(exc)
        finally:
            stopper.join()
            deployment.stop()
        assert sorted(os.listdir(own_tmp)) == []


def test_revive_of_the_head_returns_once_it_routes_again():
    """revive() of a killed head: once it returns, a request is answered (the live workers listed again)."""
    with Deployment(executors.Pid, replicas=2, drain_seconds=1) as deployment:
        deployment.head.kill()
        assert deployment.revive() == ["head"]
        assert len(deployment.members()) == 2
        assert deployment.post("/x", [Document(text="a")])[0].tags["pid"]


def test_restart_head_with_a_worker_lying_dead_restarts_and_waits_for_the_others():
    """As restart_worker: another worker lying dead (revive's to restart) does not fail restart_head, which
    returns once the live workers are listed again."""
    with Deployment(executors.Pid, replicas=2, drain_seconds=1) as deployment:
        deployment.workers[(0, 1)].kill()
        deployment.restart_head()
        assert deployment.members() == [deployment.head_dials(deployment.workers[(0, 0)])]
        assert deployment.post("/x", [Document(text="a")])[0].tags["pid"] == deployment.workers[(0, 0)].pid


def test_a_signal_handlers_stop_during_the_last_launch_of_a_start_is_not_lost(monkeypatch):
    """A handler's stop() landing while start() launches its last worker (the launch lock held: it can only mark
    the stop) fails the start and stops everything, rather than the start returning and the deployment serving on,
    no longer revived."""
    deployment = Deployment(executors.Pid, replicas=2, drain_seconds=1)
    previous = signal.signal(signal.SIGUSR1, lambda *_: deployment.stop())
    launch = ShardnetProcess.launch

    def launch_then_signal(self):
        launched = launch(self)
        if self.role == "worker-0-1":
            os.kill(os.getpid(), signal.SIGUSR1)  # its handler runs here, in this thread, the launch lock held
        return launched

    monkeypatch.setattr(ShardnetProcess, "launch", launch_then_signal)
    try:
        with pytest.raises(ProcessError, match="stopped"):
            deployment.start()
        assert not any(process.alive for process in deployment.processes)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        deployment.stop()


def test_revive_does_not_wait_for_routing_by_a_head_that_died(monkeypatch):
    """revive(wait=True) waited out the startup timeout (180 s by default) for a dead head to list the worker it
    started again (a regression review)."""
    with Deployment(executors.Pid, replicas=2, drain_seconds=1, startup_timeout=20) as deployment:
        deployment.workers[(0, 1)].kill()
        deployment.workers[(0, 1)].popen.wait()
        look = Deployment._look

        def look_then_head_dies(self, wait):
            revived = look(self, wait)
            self.head.kill()  # the head dies (OOM, kill -9) once the worker is up again: the next look's
            self.head.popen.wait()
            return revived

        monkeypatch.setattr(Deployment, "_look", look_then_head_dies)
        started = time.monotonic()
        assert deployment.revive() == ["worker-0-1"]
        took = time.monotonic() - started
        assert took < 5, f"revive() waited {took:.1f}s for a dead head to list the worker"
