"""Limits of the command line's numbers and what is checked before an Executor loads; how long a Deployment
waits for a start, and what its processes' Executors started that outlives them."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import executors
import pytest
from test_cli import PYTHON_M, shardnet, wait_gone

from shardnet.cli.main import build_parser, main
from shardnet.cli.options import INT32_MAX, whole_number
from shardnet.errors import ConfigurationError, ProcessError
from shardnet.manifests.kubernetes import DRAIN_MARGIN
from shardnet.runtimes.deployment import DEFAULT_STARTUP_TIMEOUT, Deployment
from shardnet.runtimes.head import MAX_RENEWAL_INTERVAL, MAX_WORKERS
from shardnet.runtimes.processes import ShardnetProcess, stop_all
from shardnet.runtimes.worker import Worker

EXECUTORS = Path(executors.__file__).resolve()
RENDER = ["k8s", "render", "--name", "idx", "--image", "i"]

# -- numbers argparse refuses, naming the flag ----------------------------------------------------------------

REFUSED_BY_ARGPARSE = {
    "shard-id-past-int32": (["worker", "--uses", "m:C", "--shard-id", "99999999999"],
                            "argument --shard-id: shard id must be an integer from 0 to 2147483647"),
    "shard-id-text": (["worker", "--uses", "m:C", "--shard-id", "one"], "argument --shard-id: shard id must be"),
    "replica-id-negative": (["worker", "--uses", "m:C", "--replica-id", "-3"],
                            "argument --replica-id: replica id must be an integer from 0 to 2147483647"),
    "threads-zero": (["worker", "--uses", "m:C", "--threads", "0"], "argument --threads: threads must be an integer >= 1"),
    "parent-pid-zero": (["worker", "--uses", "m:C", "--parent-pid", "0"], "argument --parent-pid: parent pid must be"),
    "parent-pid-minus-one": (["head", "--deployment", "d", "--parent-pid", "-1"], "the watch would never fire"),
    "register-interval-past-the-heads-cap": (
        ["worker", "--uses", "m:C", "--register-interval", "301"],
        "argument --register-interval: register interval must be at most 300 seconds",
    ),
    "register-interval-below-the-floor": (
        ["worker", "--uses", "m:C", "--register-interval", "1e-6"],
        "argument --register-interval: register interval must be at least 0.1 seconds",
    ),
    "head-shards-past-max-workers": (["head", "--deployment", "d", "--shards", str(MAX_WORKERS + 1)],
                                     f"argument --shards: shards must be an integer from 0 to {MAX_WORKERS}"),
    "head-shards-negative": (["head", "--deployment", "d", "--shards", "-1"], "argument --shards: shards must be"),
    "head-max-in-flight-zero": (["head", "--deployment", "d", "--max-in-flight", "0"],
                                "argument --max-in-flight: requests in flight must be an integer >= 1, got '0'"),
    "deploy-shards-zero": (["deploy", "--uses", "m:C", "--shards", "0"], "argument --shards: shards must be an integer >= 1"),
    "deploy-replicas-negative": (["deploy", "--uses", "m:C", "--replicas", "-2"], "argument --replicas: replicas must"),
    "deploy-max-in-flight-zero": (["deploy", "--uses", "m:C", "--max-in-flight", "0"], "argument --max-in-flight"),
    "deploy-startup-zero": (["deploy", "--uses", "m:C", "--startup-seconds", "0"],
                            "argument --startup-seconds: startup time must be positive seconds, got '0'"),
    "deploy-startup-nan": (["deploy", "--uses", "m:C", "--startup-seconds", "nan"], "argument --startup-seconds"),
    "render-max-in-flight-zero": ([*RENDER, "--max-in-flight", "0"], "argument --max-in-flight: requests in flight"),
}


@pytest.mark.parametrize("arguments, message", REFUSED_BY_ARGPARSE.values(), ids=REFUSED_BY_ARGPARSE.keys())
def test_numbers_out_of_range_are_refused_naming_the_flag(arguments, message, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(arguments)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "max_in_flight" not in err and "Traceback" not in err


def test_the_edges_of_the_ranges_are_taken():
    parse = build_parser().parse_args
    worker = parse(["worker", "--uses", "m:C", "--shard-id", str(INT32_MAX), "--replica-id", "0",
                    "--register-interval", str(MAX_RENEWAL_INTERVAL), "--parent-pid", "1", "--threads", "1"])
    assert (worker.shard_id, worker.replica_id, worker.register_interval, worker.parent_pid) == (INT32_MAX, 0, 300, 1)
    assert parse(["head", "--deployment", "d", "--shards", str(MAX_WORKERS)]).shards == MAX_WORKERS
    deploy = parse(["deploy", "--uses", "m:C"])
    assert deploy.startup_seconds == DEFAULT_STARTUP_TIMEOUT == 180
    assert parse(["deploy", "--uses", "m:C", "--startup-seconds", "600"]).startup_seconds == 600


@pytest.mark.parametrize("text", ["-1", "3.5", "", "0x10", str(INT32_MAX + 1)])
def test_whole_number_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match=rf"id must be an integer from 0 to {INT32_MAX}, got"):
        whole_number("id", 0, INT32_MAX)(text)


# -- checks after parsing, as ConfigurationErrors naming the flags ----------------------------------------------

RENDER_REFUSED = {
    "replicas-zero": (["--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
    "head-replicas-zero": (["--head-replicas", "0"], "--head-replicas must be an integer >= 1, got 0"),
    "shards-zero": (["--shards", "0"], "--shards must be an integer >= 1, got 0"),
    "too-many-workers": (["--shards", "101", "--replicas", "100"],
                         f"--shards 101 x --replicas 100 = 10100 workers, more than the {MAX_WORKERS} a head holds"),
    "grace-within-the-pre-stop-pause": (["--grace-seconds", "3"],
                                        f"--grace-seconds must be an integer >= {5 + DRAIN_MARGIN + 1} (a stopping pod first pauses 5 s"),
    "startup-below-the-probe-period": (["--startup-seconds", "1"], "--startup-seconds must be an integer from 2 to 86400"),
    "head-memory-limit-under-all": (["--shards", "8", "--polling", "ALL", "--head-memory-limit", "400Mi"],
                                    "(47 copies of it over 64 MiB; under ALL polling it holds and merges the answers "
                                    "of 8 shards)"),
}


@pytest.mark.parametrize("extra, message", RENDER_REFUSED.values(), ids=RENDER_REFUSED.keys())
def test_k8s_render_refuses_counts_and_times_naming_its_flags(extra, message, capsys):
    assert main([*RENDER, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("shardnet k8s render: ") and message in captured.err, captured.err
    assert "pre_stop_seconds" not in captured.err and "termination_grace_seconds" not in captured.err


def test_k8s_render_sizes_the_heads_memory_limit_for_its_shards_answers_unless_told(capsys):
    assert main([*RENDER, "--shards", "2"]) == 0
    assert "limits:\n            memory: 768Mi" in capsys.readouterr().out  # /search polls ALL: 2 answers held
    assert main([*RENDER, "--shards", "2", "--head-memory-limit", "none"]) == 0
    assert "memory: 768Mi" not in capsys.readouterr().out


def test_k8s_render_takes_the_most_workers_a_head_holds(capsys):
    assert main([*RENDER, "--shards", "100", "--replicas", "100", "--grace-seconds", str(5 + DRAIN_MARGIN + 1)]) == 0
    assert "kind: Deployment" in capsys.readouterr().out


def test_deploy_refuses_more_workers_than_one_machine_runs_and_a_log_dir_it_cannot_make_naming_the_flags():
    many = shardnet("deploy", "--uses", "m:C", "--shards", "257")
    assert many.returncode == 2, many.stderr
    assert "--shards 257 x --replicas 1 = 257 workers, more than the 256 deploy runs" in many.stderr, many.stderr
    blocked = shardnet("deploy", "--uses", f"{EXECUTORS}:Tagger", "--log-dir", "/proc/no-such-folder")
    assert blocked.returncode == 2, blocked.stderr
    assert "shardnet deploy: --log-dir '/proc/no-such-folder': cannot create it" in blocked.stderr, blocked.stderr
    assert "log_dir" not in blocked.stderr and "Traceback" not in blocked.stderr


def test_deploy_refuses_a_metrics_port_naming_the_flag_not_the_deployments_parameter():
    outside = shardnet("deploy", "--uses", f"{EXECUTORS}:Tagger", "--metrics-port", "70000")
    assert outside.returncode == 2 and "--metrics-port: metrics port must be an integer from 0 to 65535, got '70000'" \
        in outside.stderr, outside.stderr
    clash = shardnet("deploy", "--uses", f"{EXECUTORS}:Tagger", "--metrics-port", "9100", "--port", "9100")
    assert clash.returncode == 2, clash.stderr
    assert "shardnet deploy: --metrics-port 9100 must differ from --port, the head's" in clash.stderr, clash.stderr
    assert "metrics_port" not in outside.stderr + clash.stderr


def test_deployment_refuses_a_register_interval_its_workers_would_refuse():
    with pytest.raises(ConfigurationError, match="register_interval must be at most 300 seconds"):
        Deployment(executors.Tagger, register_interval=301)
    # 1e-6 s had every worker flood its head with ACTIVATEs (a review's find); a Worker refuses it too
    with pytest.raises(ConfigurationError, match="register_interval must be at least 0.1 seconds"):
        Deployment(executors.Tagger, register_interval=1e-6)
    with pytest.raises(ConfigurationError, match="register_interval must be at least 0.1 seconds"):
        Worker(executors.Tagger.create(), head="127.0.0.1:9", register_interval=0.01)
    assert Deployment(executors.Tagger).startup_timeout == DEFAULT_STARTUP_TIMEOUT


# -- flags checked before the Executor loads ------------------------------------------------------------------


def _worker(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``shardnet worker`` of an Executor that leaves ``started.mark`` in ``tmp_path`` once constructed."""
    return subprocess.run(
        [*PYTHON_M, "worker", "--uses", f"{EXECUTORS}:MarksItsStart", *flags],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, env=env, check=False,
    )


def test_a_missing_uvloop_is_reported_before_the_executor_loads(tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))}
    finished = _worker(tmp_path, "--loop", "uvloop", env=env)
    assert finished.returncode == 2, finished.stderr
    assert "--loop uvloop needs uvloop: pip install 'shardnet[fast]'" in finished.stderr, finished.stderr
    assert not (tmp_path / "started.mark").exists(), "the Executor was loaded before --loop was checked"


@pytest.mark.parametrize("folder, said", [("missing", "does not exist"), ("a-file", "is not a folder")])
def test_a_unix_socket_without_its_folder_is_refused_before_the_executor_loads(tmp_path, folder, said):
    (tmp_path / "a-file").write_text("")
    path = f"{tmp_path}/{folder}/w.sock"
    finished = _worker(tmp_path, "--unix-socket", path)
    assert finished.returncode == 2, finished.stderr
    assert f"--unix-socket '{path}': its folder '{tmp_path}/{folder}' {said}" in finished.stderr, finished.stderr
    assert not (tmp_path / "started.mark").exists(), "the Executor was loaded before --unix-socket was checked"


def test_tls_flags_for_a_head_on_a_unix_socket_are_refused_before_the_executor_loads(tmp_path):
    import trustme

    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    finished = _worker(tmp_path, "--port", "0", "--head", "unix:/run/shardnet/h.sock", "--head-root-ca", "ca.pem")
    assert finished.returncode == 2, finished.stderr
    assert "--head 'unix:/run/shardnet/h.sock' is a Unix socket" in finished.stderr, finished.stderr
    assert "drop --head-root-ca" in finished.stderr, finished.stderr
    assert not (tmp_path / "started.mark").exists(), "the Executor was loaded before --head-root-ca was checked"


# -- startup time, and what Executors started ------------------------------------------------------------------

HELPERS = '''
import subprocess
import time
from pathlib import Path

from shardnet import Executor, requests


class WithAHelper(Executor):
    """Starts a helper process (a model server, say) and leaves its pid as <workspace>/helper-PID; never stops it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        helper = subprocess.Popen(["sleep", "300"])
        (Path(self.runtime_args.workspace) / f"helper-{helper.pid}").touch()

    @requests
    def default(self, docs, **kwargs):
        return None


class LoadsForEverWithAHelper(WithAHelper):
    """Starts its helper, then loads for longer than any test waits."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        time.sleep(300)
'''


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _helpers(workspace: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in workspace.rglob("helper-*"))


@pytest.fixture
def helpers_file(tmp_path):
    """The Executors above as a file a worker loads; every helper they left is killed at teardown."""
    path = tmp_path / "helpers.py"
    path.write_text(HELPERS)
    yield path
    for pid in _helpers(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_start_that_times_out_says_how_to_allow_longer_and_leaves_no_helper_running(tmp_path, helpers_file):
    workspace = tmp_path / "ws"
    deployment = Deployment(f"{helpers_file}:LoadsForEverWithAHelper", workspace=str(workspace), startup_timeout=3,
                            log_dir=str(tmp_path / "logs"))
    with pytest.raises(ProcessError) as failed:
        deployment.start()
    assert re.search(r"worker-0-0 was not ready \d+s after its launch", str(failed.value)), failed.value
    assert "shardnet deploy --startup-seconds, Deployment(startup_timeout=)" in str(failed.value)
    helpers = _helpers(workspace)
    assert len(helpers) == 1, "the Executor never started its helper"
    assert not wait_gone(helpers, alive=_running), "the helper an Executor started outlived the failed start"


def test_a_stop_and_a_restart_leave_no_helper_of_the_processes_they_ended(tmp_path, helpers_file):
    workspace = tmp_path / "ws"
    with Deployment(f"{helpers_file}:WithAHelper", workspace=str(workspace), startup_timeout=30) as deployment:
        [first] = _helpers(workspace)
        worker = deployment.workers[(0, 0)]
        os.kill(worker.pid, signal.SIGKILL)  # a crash: the worker's helper stays, in the worker's process group
        deadline = time.monotonic() + 10
        while worker.alive:
            assert time.monotonic() < deadline, "the killed worker never exited"
            time.sleep(0.02)
        assert deployment.revive() == ["worker-0-0"]
        assert not wait_gone([first], alive=_running), "the helper of a crashed worker outlived its restart"
        [second] = [pid for pid in _helpers(workspace) if pid != first]
        assert _running(second)
    assert not wait_gone([second], alive=_running), "the helper of a stopped worker outlived the stop"


def test_deploy_startup_seconds_reaches_the_deployment_and_its_error_names_the_flag(tmp_path):
    workspace = tmp_path / "ws"
    log = tmp_path / "deploy.log"
    with open(log, "wb") as out:
        deploy = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:SlowStart", "--workspace", str(workspace),
             "--startup-seconds", "4"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        assert deploy.wait(30) == 2, log.read_text()  # not the minute SlowStart loads for
        text = log.read_text()
        assert re.search(r"was not ready \d+s after its launch \(a slow Executor may need longer: shardnet deploy "
                         r"--startup-seconds", text), text
        # the worker's log, quoted, names the class whose __init__ still ran (it was "(no output)": a review)
        assert "loading the Executor (SlowStart): its __init__ runs" in text, text
        loading = [int(path.name.split("-")[1]) for path in workspace.glob("loading-*")]
        assert not wait_gone(loading, alive=_running), "the loading worker outlived deploy"
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        for path in workspace.glob("loading-*"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(path.name.split("-")[1]), signal.SIGKILL)


def _state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``Z``: exited, not reaped yet), or ``-`` when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "-"


def test_a_process_groups_leftovers_are_killed_while_its_leader_still_holds_the_groups_id(
    tmp_path, helpers_file, monkeypatch
):
    """Reaped first, the child's pid (the group's id) is free, and a killpg later could hit a new group leader
    given it (a pid wrap-around; found by a review): the group is killed while the exited child is a zombie."""
    states: list[str] = []
    killpg = os.killpg

    def recording(pgid: int, signum: int) -> None:
        states.append(_state(pgid))
        killpg(pgid, signum)

    monkeypatch.setattr(os, "killpg", recording)
    workspace = tmp_path / "ws"
    process = ShardnetProcess(
        "worker", ["worker", "--uses", f"{helpers_file}:WithAHelper", "--workspace", str(workspace), "--port", "0"],
        tmp_path / "worker.log",
    )
    try:
        process.launch().wait_ready(30)
        os.kill(process.pid, signal.SIGKILL)  # a crash, leaving its helper in its group
        deadline = time.monotonic() + 10
        while process.alive:
            assert time.monotonic() < deadline, "the killed worker never exited"
            time.sleep(0.02)
        assert states == ["Z"], states
        assert not wait_gone(_helpers(workspace), alive=_running), "the crashed worker's helper outlived it"
    finally:
        stop_all([process])
