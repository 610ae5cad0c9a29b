"""A process that forks while its Deployment runs (os.fork, a gunicorn worker of a --preload app): the child may
post to it, and neither its exit nor a stop() in it touches the parent's run."""

from __future__ import annotations

import os
import sys

import pytest

from shardnet import Document
from shardnet.errors import ProcessError
from shardnet.runtimes.deployment import Deployment

import executors


def _in_a_child(body) -> int:
    """Run ``body`` in a forked child, which then leaves as a gunicorn worker does (sys.exit: atexit and
    finalizers run); its exit code: 0 when ``body`` returned."""
    pid = os.fork()
    if pid == 0:
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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_posts_to_the_parents_deployment_and_its_exit_leaves_the_run_as_it_was():
    with Deployment(uses=executors.Tagger, name="forked") as dep:
        assert dep.post("/tag", [Document(text="x")])[0].tags["by"] == "tagger"
        socket = dep.head_dials(dep.workers[0, 0]).removeprefix("unix:")
        folders = [dep.log_dir, dep.control_token_file.parent, os.path.dirname(socket)]

        def child() -> None:
            assert dep.post("/tag", [Document(text="y")], timeout=10)[0].tags["by"] == "tagger"
            with pytest.raises(ProcessError, match="a fork of process"):
                dep.restart_worker(0, 0)
            dep.stop()  # a with block left in the child: the parent's run is not stopped

        assert _in_a_child(child) == 0
        # before: the child's exit removed them, and the head could not dial its workers again
        assert all(os.path.isdir(folder) for folder in folders) and os.path.exists(socket), folders
        assert all(process.alive for process in dep.processes)
        assert dep.post("/tag", [Document(text="z")], timeout=10)[0].tags["by"] == "tagger"
    assert not any(os.path.exists(folder) for folder in folders)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forks_stop_of_a_deployment_its_parent_has_not_started_leaves_the_parents_folders():
    dep = Deployment(uses=executors.Tagger, name="unstarted-fork")
    folders = [dep.log_dir, dep.control_token_file.parent]
    try:
        assert _in_a_child(dep.stop) == 0
        # before: the child's stop() removed them, and the parent's start failed (its workers' socket folder gone)
        assert all(os.path.isdir(folder) for folder in folders), folders
    finally:
        dep.stop()
    assert not any(os.path.exists(folder) for folder in folders)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_fork_may_start_a_deployment_its_parent_stopped_in_a_run_of_its_own():
    dep = Deployment(uses=executors.Tagger, name="stopped-fork")
    dep.start()
    dep.stop()

    def child() -> None:
        with dep:  # before: ProcessError "a fork of process ... that started it: only that process may"
            assert dep.post("/tag", [Document(text="y")], timeout=10)[0].tags["by"] == "tagger"

    assert _in_a_child(child) == 0
