"""A process that forks while its Deployment runs (os.fork, a gunicorn worker of a --preload app): neither the
fork's exit nor a stop(), kill() or restart in it touches the parent's run. (The children here make no gRPC call:
gRPC Python supports a fork after its objects were made only with GRPC_ENABLE_FORK_SUPPORT; in a test process
whose gRPC threads ran, a child's call crashed now and then, under xdist. Each scenario runs in a fresh Python
process of its own, so that no fork is made of a test worker whose gRPC threads ran: one such worker crashed later.)"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shardnet import Document
from shardnet.errors import ProcessError
from shardnet.runtimes.deployment import Deployment

import executors


def _in_a_child(body) -> int:
    """Run ``body`` in a forked child, which then leaves as a gunicorn worker does (sys.exit: atexit and
    finalizers run); its exit code: 0 when ``body`` returned."""
    gc.collect()  # a grpc.aio object left in a cycle by an earlier test keeps gRPC's poller thread running
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)  # a child stuck (in gRPC's core, say) dies before the parent's test times out
        code = 1
        try:
            body()
            code = 0
        except BaseException as error:  # noqa: BLE001 - said, and the exit code tells the parent
            print(f"child: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
        try:
            sys.exit(code)
        finally:
            os._exit(code)  # pytest's own handlers must not go on in the child
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _test_a_forks_stop_kill_restart_and_exit_leave_the_parents_run_as_it_was():
    with Deployment(uses=executors.Tagger, name="forked") as dep:
        assert dep.post("/tag", [Document(text="x")])[0].tags["by"] == "tagger"
        socket = dep.head_dials(dep.workers[0, 0]).removeprefix("unix:")
        folders = [dep.log_dir, dep.control_token_file.parent, os.path.dirname(socket)]

        def child() -> None:
            for refused in (lambda: dep.restart_worker(0, 0), dep.restart_head, dep.revive, dep.start):
                with pytest.raises(ProcessError, match="a fork of process"):
                    refused()
            dep.kill()
            dep.stop()  # a with block left in the child: the parent's run is not stopped

        assert _in_a_child(child) == 0
        # before: the child's exit removed them, and the head could not dial its workers again
        assert all(os.path.isdir(folder) for folder in folders) and os.path.exists(socket), folders
        assert all(process.alive for process in dep.processes)
        assert dep.post("/tag", [Document(text="z")], timeout=10)[0].tags["by"] == "tagger"
    assert not any(os.path.exists(folder) for folder in folders)


def _test_a_forks_stop_of_a_deployment_its_parent_has_not_started_leaves_the_parents_folders():
    dep = Deployment(uses=executors.Tagger, name="unstarted-fork")
    folders = [dep.log_dir, dep.control_token_file.parent]
    try:
        assert _in_a_child(dep.stop) == 0
        # before: the child's stop() removed them, and the parent's start failed (its workers' socket folder gone)
        assert all(os.path.isdir(folder) for folder in folders), folders
    finally:
        dep.stop()
    assert not any(os.path.exists(folder) for folder in folders)


def _test_a_deployment_its_parent_stopped_is_no_longer_the_parents_in_a_fork():
    dep = Deployment(uses=executors.Tagger, name="stopped-fork")
    dep.start()
    dep.stop()

    def child() -> None:
        # before: ProcessError "a fork of process ... that started it: only that process may", for a run over
        with pytest.raises(ProcessError, match="is not running"):
            dep.restart_head()

    assert _in_a_child(child) == 0


def _in_a_process_of_its_own(scenario: str) -> None:
    """Run ``scenario`` of this module in a fresh Python process, failing with its output when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", f"import test_deployment_fork as t; t.{scenario}()"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forks_stop_kill_restart_and_exit_leave_the_parents_run_as_it_was():
    _in_a_process_of_its_own("_test_a_forks_stop_kill_restart_and_exit_leave_the_parents_run_as_it_was")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forks_stop_of_a_deployment_its_parent_has_not_started_leaves_the_parents_folders():
    _in_a_process_of_its_own("_test_a_forks_stop_of_a_deployment_its_parent_has_not_started_leaves_the_parents_folders")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_deployment_its_parent_stopped_is_no_longer_the_parents_in_a_fork():
    _in_a_process_of_its_own("_test_a_deployment_its_parent_stopped_is_no_longer_the_parents_in_a_fork")
