"""What a new user meets on the command line: where the logs are, exits reported, signals that clean up, one-line
errors, flags refused in their own words, help that says the defaults. Real processes, as a person runs them."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest
from test_cli import EXECUTORS, PYTHON_M, shardnet, stop, wait_for_line, wait_gone

from shardnet import DataRequest, Document
from shardnet.cli.options import positive_seconds
from shardnet.cli.stopping import StoppedBySignal, run_stoppable
from shardnet.networking import oneshot
from shardnet.runtimes import log_lines

ROW = r"(?m)^{role}\s+\S+\s+(\d+)\s+running"  # ROLE ADDRESS PID STATE ... as Deployment.table() prints it


def start(log: Path, *arguments: str, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """``python -m shardnet ARGUMENTS`` in the background, its stdout and stderr in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*PYTHON_M, *arguments], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def child_env(tmp: Path) -> dict[str, str]:
    """This environment with TMPDIR at ``tmp``: where the child's temporary folders go (ours stays as it is)."""
    return {**os.environ, "TMPDIR": str(tmp)}


# -- 1 and 7: deploy says where the logs are, what the head dials, and what exited ---------------------------


def test_deploy_names_its_logs_which_go_on_exit_and_its_table_shows_what_the_head_dials(tmp_path):
    tmp = tmp_path / "t"
    tmp.mkdir()
    log = tmp_path / "deploy.log"
    deploy = start(log, "deploy", "--uses", f"{EXECUTORS}:Tagger", "--shards", "2", "--name", "logs",
                   env=child_env(tmp))
    pids: list[int] = []
    try:
        address = wait_for_line(log, r"logs serves on (\S+)", deploy).group(1)
        out = log.read_text()
        pids = [int(pid) for pid in re.findall(ROW.format(role=r"(?:head|worker-\d+-\d+)"), out, re.M)]
        assert len(pids) == 3, out
        folder = Path(re.search(r"^logs: (\S+)/logs-ROLE\.log, one per process \(removed on exit; --log-dir DIR "
                                r"keeps them\)$", out, re.M).group(1))
        assert folder.parent == tmp and {"logs-head.log", "logs-worker-0-0.log", "logs-worker-1-0.log"} <= {
            path.name for path in folder.iterdir()}
        assert "ready on" in (folder / "logs-worker-1-0.log").read_text()
        workspace = Path(re.search(r"^workspace of the Executors' state: (\S+) \(removed on exit; --workspace DIR "
                                   r"keeps it\)$", out, re.M).group(1))
        assert workspace.parent == tmp and workspace.is_dir(), out  # its own temporary folder, not the cache's

        header, *rows = out[out.index("ROLE"):].splitlines()[:4]
        assert header.split() == ["ROLE", "ADDRESS", "PID", "STATE", "HEAD-DIALS"], out
        dials = {row.split()[0]: row.split()[4] for row in rows}
        assert dials["head"] == "-", out
        status = shardnet("status", address)
        listed = re.findall(r"^\s+shard (\d): (\S+)$", status.stdout, re.M)
        # the table and `shardnet status` name the same addresses: the workers' Unix sockets, not their TCP ports
        assert sorted(listed) == sorted([("0", dials["worker-0-0"]), ("1", dials["worker-1-0"])]), (out, status.stdout)
        assert all(dial.startswith("unix:/") for _, dial in listed)
    finally:
        assert stop(deploy, pids) == 0, log.read_text()
    assert not wait_gone(pids)
    assert not folder.exists(), "the logs line said they are removed on exit"
    assert not workspace.exists(), "the workspace line said it is removed on exit"


def test_deploy_log_dir_keeps_the_logs_at_the_log_level_and_no_restart_warns_once_per_exited_process(tmp_path):
    logs, log = tmp_path / "logs", tmp_path / "deploy.log"
    # --log-level reaches the head's and workers' logs (only deploy's own followed it: a knobs review's find)
    deploy = start(log, "deploy", "--log-level", "DEBUG", "--uses", f"{EXECUTORS}:Tagger", "--replicas", "2",
                   "--name", "kept", "--no-restart", "--log-dir", str(logs))
    pids: list[int] = []
    try:
        wait_for_line(log, r"kept serves on", deploy)
        out = log.read_text()
        assert f"logs: {logs}/kept-ROLE.log, one per process (kept after exit)" in out, out
        assert f"workspace of the Executors' state: {logs}/workspace (kept after exit)" in out, out
        [first] = re.findall(ROW.format(role="worker-0-0"), out, re.M)
        [second] = re.findall(ROW.format(role="worker-0-1"), out, re.M)
        pids = [int(first), int(second), *map(int, re.findall(ROW.format(role="head"), out, re.M))]
        os.kill(int(first), signal.SIGKILL)
        warning = rf"worker-0-0 \(pid {first}\) was killed by SIGKILL; not restarted \(--no-restart\)"
        wait_for_line(log, warning, deploy, timeout=10)
        os.kill(int(second), signal.SIGTERM)  # by the time this one is reported, the loop looked again at the first
        wait_for_line(log, rf"worker-0-1 \(pid {second}\) exited with code 0; not restarted", deploy, timeout=10)
        assert len(re.findall(warning, log.read_text())) == 1, log.read_text()
        assert "starting it again" not in log.read_text()
    finally:
        assert stop(deploy, pids) == 1, log.read_text()  # what exited on its own is a failure to report
    assert "kept: stopped after 2 process(es) exited on their own (--no-restart" in log.read_text(), log.read_text()
    assert not wait_gone(pids)
    for role in ("head", "worker-0-1"):  # gRPC's loop logs at DEBUG before a process serves
        assert "ready on" in (logs / f"kept-{role}.log").read_text()
        assert " DEBUG " in (logs / f"kept-{role}.log").read_text(), (logs / f"kept-{role}.log").read_text()


def _waitable_zombie(pid: int) -> bool:
    """Whether ``pid`` exited and its parent can reap it now: the leader a zombie, and its last thread."""
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state == "Z" and os.listdir(f"/proc/{pid}/task") == [str(pid)]


def test_deploy_no_restart_counts_an_exit_its_stop_came_before_it_looked(tmp_path):
    """A worker killed just before SIGTERM, between two of deploy's looks, went unsaid, and deploy exited 0 (a
    regression review's find)."""
    log = tmp_path / "deploy.log"
    deploy = start(log, "deploy", "--uses", f"{EXECUTORS}:Tagger", "--name", "late", "--no-restart")
    pids: list[int] = []
    try:
        wait_for_line(log, r"late serves on", deploy)
        [worker] = re.findall(ROW.format(role="worker-0-0"), log.read_text(), re.M)
        pids = [int(worker), *map(int, re.findall(ROW.format(role="head"), log.read_text(), re.M))]
        os.kill(int(worker), signal.SIGKILL)
        deadline = time.monotonic() + 5
        # dead and waitable, not yet reaped: a killed leader shows Z at once, but its parent cannot collect it
        # before its other threads (gRPC's) have exited too, which a zombie's task folder tells
        while not _waitable_zombie(int(worker)):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        deploy.send_signal(signal.SIGTERM)
        assert deploy.wait(20) == 1, log.read_text()
    finally:
        stop(deploy, pids)
    assert f"worker-0-0 (pid {worker}) was killed by SIGKILL; not restarted" in log.read_text(), log.read_text()
    assert "(removed on exit; --log-dir keeps it), ending:" in log.read_text(), log.read_text()


def test_deploy_quotes_the_log_of_a_process_that_failed_at_its_stop_before_removing_it(tmp_path):
    """deploy said a worker "did not stop cleanly (see its log)" in the line that said its temporary folders were
    removed, the log with them (a README review's find). Its last lines are quoted while the log is still there,
    as under --no-restart."""
    log = tmp_path / "deploy.log"
    deploy = start(log, "deploy", "--uses", f"{EXECUTORS}:DiesInClose", "--name", "dies")
    pids: list[int] = []
    try:
        wait_for_line(log, r"dies serves on", deploy)
        [worker] = re.findall(ROW.format(role="worker-0-0"), log.read_text(), re.M)
        pids = [int(worker), *map(int, re.findall(ROW.format(role="head"), log.read_text(), re.M))]
        deploy.send_signal(signal.SIGINT)
        assert deploy.wait(20) == 1, log.read_text()
    finally:
        stop(deploy, pids)
    out = log.read_text()
    quoted = re.search(rf"worker-0-0 \(pid {worker}\) exited with code 3 at its stop\. Its log: \(removed on exit; "
                       r"--log-dir keeps it\), ending:\n(?:.*\n)*?.*ready on", out)
    assert quoted, out
    said = "dies: stopped, but worker-0-0 (exit code 3) did not stop cleanly (see the warnings above)"
    assert said in out and out.index(said) > quoted.end(), out
    assert not wait_gone(pids)


def test_deploy_no_restart_ends_with_code_1_once_its_head_exits(tmp_path):
    """It served on, answering nothing, then said every process drained and exited 0 (a lifecycle review's find):
    a supervisor never saw the failure."""
    log = tmp_path / "deploy.log"
    deploy = start(log, "deploy", "--uses", f"{EXECUTORS}:Tagger", "--name", "headless", "--no-restart")
    pids: list[int] = []
    try:
        wait_for_line(log, r"headless serves on", deploy)
        [head] = re.findall(ROW.format(role="head"), log.read_text(), re.M)
        pids = [int(head), *map(int, re.findall(ROW.format(role="worker-0-0"), log.read_text(), re.M))]
        os.kill(int(head), signal.SIGKILL)
        assert deploy.wait(20) == 1, log.read_text()
    finally:
        stop(deploy, pids)
    assert "nothing answers on" in log.read_text() and "so deploy stops" in log.read_text(), log.read_text()
    assert not wait_gone(pids)


# -- 9: every log line says which process wrote it ------------------------------------------------------------

# TIME LEVEL [ROLE NAME pid PID] LOGGER: message, as every shardnet process writes its log lines
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING|ERROR) \[(?P<said_by>.+) pid (?P<pid>\d+)\] "
    r"[\w.]+: (?P<message>.*)$"
)


def _said_by(text: str) -> set[tuple[str, int]]:
    """The (role and name, pid) of each line of ``text``, every one of which must be a log line saying so."""
    lines = text.splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), text
    return {(match["said_by"], int(match["pid"])) for match in map(LOG_LINE.match, lines)}


def test_every_log_line_of_a_deployment_names_the_process_that_wrote_it_and_the_ready_line_has_a_time(tmp_path):
    """The head's and workers' lines (and a restarted worker's, in the same file as the one it replaced) said
    neither which process wrote them nor its pid, and their ready lines had no time (a review's find): an
    operator reading them together could not tell who said what. Each line now carries the time, the level,
    the process's role and name and its pid."""
    logs, out, err = tmp_path / "logs", tmp_path / "deploy.out", tmp_path / "deploy.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        deploy = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:Tagger", "--replicas", "2", "--name", "said",
             "--log-dir", str(logs)], stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
        )
    pids: list[int] = []
    try:
        wait_for_line(out, r"said serves on", deploy)
        roles = {role: int(pid) for role, pid in re.findall(ROW.format(role=r"(head|worker-0-[01])"), out.read_text())}
        pids = list(roles.values())
        assert len(pids) == 3, out.read_text()
        os.kill(roles["worker-0-1"], signal.SIGKILL)
        # the launcher still learns that the new one is ready
        again = int(wait_for_line(err, r"worker-0-1 serves again on \S+ \(pid (\d+)\)", deploy, timeout=15).group(1))
        pids.append(again)
    finally:
        assert stop(deploy, pids) == 0, out.read_text() + err.read_text()
    assert not wait_gone(pids)
    assert _said_by(err.read_text()) == {("deploy said", deploy.pid)}
    assert _said_by((logs / "said-head.log").read_text()) == {("head said", roles["head"])}
    assert _said_by((logs / "said-worker-0-0.log").read_text()) == {("worker said/rep-0", roles["worker-0-0"])}
    restarted = (logs / "said-worker-0-1.log").read_text()
    assert _said_by(restarted) == {("worker said/rep-1", roles["worker-0-1"]), ("worker said/rep-1", again)}
    for role, pid in (*roles.items(), ("worker-0-1", again)):  # each launch's ready line, timed like the rest
        ready = [match for match in map(LOG_LINE.match, (logs / f"said-{role}.log").read_text().splitlines())
                 if re.fullmatch(r"shardnet (head said|worker said/rep-[01]) ready on \S+( and unix:\S+)?", match["message"])]
        assert [int(match["pid"]) for match in ready].count(pid) == 1, (role, pid, ready)


def test_a_worker_prints_its_ready_line_to_stdout_timed_and_naming_it_at_any_log_level(tmp_path):
    """The ready line a script waits for on stdout had no time, while every log line had one; it stays on stdout,
    in the log lines' format, and --log-level ERROR keeps it (it is no INFO chatter to silence). Named before
    its Executor's class loads: after the class --uses names."""
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        worker = subprocess.Popen(
            [*PYTHON_M, "--log-level", "ERROR", "worker", "--uses", f"{EXECUTORS}:Tagger", "--port", "0"],
            stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
        )
    try:
        address = wait_for_line(out, r"ready on (\S+)", worker).group(1)
        [line] = out.read_text().splitlines()
        assert _said_by(line) == {("worker Tagger/shard-0/rep-0", worker.pid)}, line
        assert LOG_LINE.match(line)["message"] == f"shardnet worker Tagger/shard-0/rep-0 ready on {address}", line
    finally:
        assert stop(worker, []) == 0, err.read_text()
    assert err.read_text() == ""  # nothing at ERROR, and the ready line went to stdout alone


def test_the_log_format_is_left_to_a_program_that_set_up_its_own_logging():
    """``shardnet.cli.main.main()`` called from a program (here pytest, whose handlers root holds) configures
    nothing: neither root's handlers and level nor the ready line's logger change."""
    root, ready = logging.getLogger(), logging.getLogger(log_lines.READY_LOGGER)
    before = (list(root.handlers), root.level, list(ready.handlers), ready.level, ready.propagate)
    assert root.handlers
    log_lines.configure("DEBUG", "worker x")
    assert (list(root.handlers), root.level, list(ready.handlers), ready.level, ready.propagate) == before


# -- 2: SIGTERM stops the demo as Ctrl-C does ----------------------------------------------------------------


def test_sigterm_stops_the_demo_and_leaves_no_temporary_folder(tmp_path):
    tmp = tmp_path / "t"  # short: the demo's worker sockets go under it, at most 107 bytes a path
    tmp.mkdir()
    log = tmp_path / "demo.log"
    # --log-level reaches the demo's processes too (they logged at INFO whatever was asked: a knobs review's find)
    demo = start(log, "--log-level", "DEBUG", "demo", "--requests", "200", "--concurrency", "4", env=child_env(tmp))
    pids: list[int] = []
    try:
        wait_for_line(log, ROW.format(role="worker-1-1"), demo)
        pids = [int(pid) for pid in re.findall(ROW.format(role=r"(?:head|worker-\d-\d)"), log.read_text(), re.M)]
        assert len(pids) == 5 and list(tmp.glob("shardnet-demo-*")) and list(tmp.glob("sn-*"))
        [children_log] = tmp.glob("shardnet-demo-*/demo-worker-1-1.log")
        assert " DEBUG " in children_log.read_text(), children_log.read_text()
        demo.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = demo.wait(15)
        assert time.monotonic() - began < 10, log.read_text()
    finally:
        stop(demo, pids)
    assert code == 143, log.read_text()  # 128 + SIGTERM, as deploy's: a supervisor sees the stop it asked for
    assert not wait_gone(pids)
    assert not list(tmp.glob("shardnet-demo-*")) and not list(tmp.glob("sn-*")), list(tmp.iterdir())
    out = log.read_text()
    assert "Traceback" not in out and "Task was destroyed" not in out and "never awaited" not in out, out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_while_the_demo_starts_stops_what_it_launched_as_cleanly(tmp_path, signum):
    """SIGTERM, a closed terminal (SIGHUP) and Ctrl-C stop it alike, each with its exit code, 128 + its number
    (deploy's: the demo exited 130 whatever the signal)."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    log = tmp_path / "demo.log"
    demo = start(log, "demo", "--requests", "200", "--concurrency", "4", env=child_env(tmp))
    try:
        deadline = time.monotonic() + 20
        while not list(tmp.glob("shardnet-demo-*/demo-head.log")):  # the start is under way: its head was launched
            assert demo.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        demo.send_signal(signum)
        code = demo.wait(20)
    finally:
        stop(demo, [])
    out = log.read_text()
    assert code == 128 + signum, out
    assert "ROLE" not in out, out  # it stopped during the start: the table of a started deployment never came
    assert not list(tmp.glob("shardnet-demo-*")) and not list(tmp.glob("sn-*")), list(tmp.iterdir())
    assert "Traceback" not in out and "never awaited" not in out, out


@pytest.mark.parametrize("before", ["the program's handler", "the default action"])
def test_a_stop_signal_coming_as_run_stoppables_coroutine_ends_is_not_lost(before):
    """A signal whose handler ran just before the coroutine returned was dropped: the loop found the task done,
    and the handler there before (deploy's, which stops it once it serves) never saw it, so deploy served on (a
    regression review's find). It goes to that handler, or, with none of the program's own, ends the run as a
    signal that cancelled it does."""
    heard: list[int] = []
    programs = before.endswith("handler")
    previous = signal.signal(signal.SIGHUP, (lambda signum, _: heard.append(signum)) if programs else signal.SIG_DFL)

    async def ends_as_the_signal_comes() -> str:
        await asyncio.sleep(0)
        signal.raise_signal(signal.SIGHUP)  # its Python handler runs before this returns, the loop's part after
        return "started"

    try:
        if programs:
            assert run_stoppable(ends_as_the_signal_comes()) == "started"
            assert heard == [signal.SIGHUP]
        else:
            with pytest.raises(StoppedBySignal) as stopped:
                run_stoppable(ends_as_the_signal_comes())
            assert stopped.value.code == 129
    finally:
        signal.signal(signal.SIGHUP, previous)


def _ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores ``signum``, as a background job of a script does SIGINT and a job under
    nohup SIGHUP (its SigIgn mask)."""
    [mask] = re.findall(r"(?m)^SigIgn:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text())
    return bool(int(mask, 16) & 1 << (signum - 1))


def test_sigterm_under_load_stops_a_demo_that_ignores_sigint_in_order(tmp_path):
    """A demo started as a background job of a script, under nohup, CI or a supervisor ignores SIGINT; a SIGTERM
    then raised KeyboardInterrupt wherever it landed: in a gRPC callback (likely under load) gRPC swallowed it
    ("Exception ignored in: ...functor_run") and the demo waited for ever, a second SIGTERM doing nothing, or it
    printed a long traceback; and it exited 130 where deploy exits 143 (a README review's find: 2 hangs in 6
    tries). The signal now cancels the demo where it awaits: it stops every process and exits 143."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    log = tmp_path / "demo.log"
    command = shlex.join([*PYTHON_M, "demo", "--requests", "20000", "--concurrency", "256"])
    with open(log, "wb") as out:  # the shell's trap '' sets SIGINT ignored, which exec passes on
        demo = subprocess.Popen(["sh", "-c", f"trap '' INT; exec {command}"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(tmp))
    pids: list[int] = []
    try:
        wait_for_line(log, r"search 'rank texts by token overlap'\n.+\n.+\n", demo)  # the load run begins
        pids = [int(pid) for pid in re.findall(ROW.format(role=r"(?:head|worker-\d-\d)"), log.read_text(), re.M)]
        assert len(pids) == 5 and _ignores(demo.pid, signal.SIGINT), log.read_text()
        time.sleep(0.5)  # well into the run of 20,000 searches, which says nothing until it ends
        assert "throughput:" not in log.read_text(), log.read_text()
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(30)
    finally:
        stop(demo, pids)
    out = log.read_text()
    assert code == 143, out
    assert not wait_gone(pids), out
    assert not list(tmp.glob("shardnet-demo-*")) and not list(tmp.glob("sn-*")), list(tmp.iterdir())
    assert "Traceback" not in out and "Exception ignored" not in out and "KeyboardInterrupt" not in out, out


@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT])  # under nohup; a background job of a script
def test_a_stop_signal_ignored_from_the_start_stays_ignored_by_deploy_starting_and_serving(tmp_path, ignored):
    """deploy put its own handlers in place of an ignored SIGHUP or SIGINT: under nohup a closed terminal stopped
    it (129) while it started, and once it served (a regression review's find). Ignored from the start, a signal
    stays ignored all its life, as by the demo; SIGTERM stops it as ever."""
    log = tmp_path / "deploy.log"
    with open(log, "wb") as out:
        deploy = subprocess.Popen(
            [*PYTHON_M, "deploy", "--uses", f"{EXECUTORS}:Tagger", "--name", "kept"], stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(ignored, signal.SIG_IGN),
        )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while "kept serves on" not in log.read_text():  # the signal, again and again while it starts
            assert deploy.poll() is None and time.monotonic() < deadline, log.read_text()
            deploy.send_signal(ignored)
            time.sleep(0.02)
        pids = [int(pid) for pid in re.findall(ROW.format(role=r"(?:head|worker-\d+-\d+)"), log.read_text(), re.M)]
        assert _ignores(deploy.pid, ignored), log.read_text()  # serving, it still ignores it
        deploy.send_signal(ignored)
        address = re.search(r"kept serves on (\S+)", log.read_text()).group(1)
        answer = oneshot.run_sync(oneshot.send_request_async(DataRequest([Document(text="x")], endpoint="/tag"),
                                                             address, timeout=10))
        assert not answer.is_error and deploy.poll() is None, log.read_text()
        assert "stopping" not in log.read_text(), log.read_text()
        deploy.send_signal(signal.SIGTERM)
        assert deploy.wait(20) == 0, log.read_text()
    finally:
        stop(deploy, pids)
    assert "kept: every process drained and stopped" in log.read_text(), log.read_text()
    # Ctrl-C, ignored in a background job, is not offered as the way to stop it
    said = "(SIGTERM stops it)" if ignored == signal.SIGINT else "(Ctrl-C stops it)"
    assert said in log.read_text() and (ignored != signal.SIGINT or "Ctrl-C" not in log.read_text())
    assert not wait_gone(pids)


# -- 3: a --uses module that raises as it is imported ----------------------------------------------------------

RAISES = '''import os


def fail():
    raise RuntimeError("boom at import")


fail()
'''


@pytest.mark.parametrize("how", ["module-in-cwd", "path"])
def test_a_uses_module_raising_on_import_is_one_line_naming_the_users_file_and_line(tmp_path, how):
    code = tmp_path / "code"
    code.mkdir()
    (code / "raises.py").write_text(RAISES)
    uses, cwd = ("raises:X", code) if how == "module-in-cwd" else ("code/raises.py:X", tmp_path)
    result = shardnet("worker", "--uses", uses, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"shardnet worker: --uses '{uses}': importing '{uses[:-2]}' raised RuntimeError: boom at import "
        f"({code / 'raises.py'}, line 5)"
    )
    assert "ready on" not in result.stdout


# -- 4: send against nothing, and against a head with no replica --------------------------------------------


def test_send_to_nothing_says_so_once(dead_address):
    result = shardnet("send", dead_address, "--endpoint", "/index", "--text", "a", "--timeout", "5")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"shardnet send: server {dead_address}: UNAVAILABLE: "), line


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--endpoint", "/x", "--text", "a\udcffb"], "--text 'a\\udcffb' is not UTF-8 text"),
        (["--endpoint", "/\udcff"], "--endpoint '/\\udcff' is not UTF-8 text"),
        (["--endpoint", "/x", "--parameters", '{"a": "\\udcff"}'], "--parameters: parameters['a'] takes text UTF-8 can carry: '\\udcff'"),
        (["--endpoint", "/x", "--parameters", '{"a": ' + "[" * 60 + "]" * 60 + "}"], "nests lists and dicts deeper than protobuf can carry"),
        (["--endpoint", "/x", "--parameters", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"], "deeper than JSON here can read"),
    ],
    ids=["text-not-utf8", "endpoint-not-utf8", "lone-surrogate", "nested-60", "nested-5000"],
)
def test_send_refuses_what_a_request_cannot_hold_in_one_line_before_sending(dead_address, flags, said):
    """Each was a 23-35 line traceback with exit 1, which send uses for an ERROR answer."""
    result = shardnet("send", dead_address, *flags)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("shardnet send: ") and said in line, line


def test_send_to_a_server_keeping_silent_says_so_once_with_the_time_it_waited():
    """A port that accepts connections but never answers (a SIGSTOPped server, say)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        result = shardnet("send", address, "--endpoint", "/index", "--timeout", "1")
        assert time.monotonic() - began < 5
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "DEADLINE_EXCEEDED" in line and "endpoint discovery within 0.5s, half of --timeout" in line, line


def test_send_to_a_head_with_no_replica_gives_its_error_alone(tmp_path):
    log = tmp_path / "head.log"
    head = start(log, "head", "--deployment", "empty", "--port", "0", "--shards", "1")
    try:
        address = wait_for_line(log, r"ready on (\S+)", head).group(1)
        result = shardnet("send", address, "--endpoint", "/index", "--text", "a")
    finally:
        stop(head, [])
    assert result.returncode == 2
    no_replica = (f"shardnet send: server {address}: UNAVAILABLE: deployment 'empty' has no live replica: shard(s) 0 "
                  "have no replica (none registered yet, or their workers deactivated or their leases lapsed)")
    assert result.stderr.strip() == no_replica  # no warning first about endpoints it could not have named


def test_a_head_that_cannot_tell_a_missing_shard_says_so_at_start(tmp_path):
    """Without --shards (and no static connections) ALL answers with the shards that registered: after a head
    restart, an answer missing a shard came back OK (found by a reliability review)."""
    for flags, warned in (([], True), (["--shards", "2"], False), (["--connection", "0=127.0.0.1:7"], False)):
        log = tmp_path / f"head-{len(flags)}-{warned}.log"
        head = start(log, "head", "--deployment", "d", "--port", "0", *flags)
        try:
            wait_for_line(log, r"ready on (\S+)", head)
        finally:
            stop(head, [])
        assert ("no --shards: under ALL" in log.read_text()) is warned, log.read_text()


def test_a_shards_wait_that_cannot_apply_is_said_at_start(tmp_path):
    """--shards-wait bounds how long a head fed by Kubernetes waits for its shards; a head fed by ACTIVATE is
    ready at once, and a flag it ignores silently would mislead."""
    log = tmp_path / "head.log"
    head = start(log, "head", "--deployment", "d", "--port", "0", "--shards", "2", "--shards-wait", "30")
    try:
        wait_for_line(log, r"ready on (\S+)", head)
    finally:
        stop(head, [])
    assert "--shards-wait has no effect without --k8s-namespace" in log.read_text(), log.read_text()


def test_a_process_dying_of_a_fatal_signal_leaves_its_stacks_in_its_log(tmp_path):
    """Two processes vanished under CI load without a word in their logs; a fault now says where each thread was."""
    log = tmp_path / "head.log"
    head = start(log, "head", "--deployment", "d", "--port", "0", "--shards", "1")
    try:
        wait_for_line(log, r"ready on (\S+)", head)
        head.send_signal(signal.SIGSEGV)
        head.wait(20)
    finally:
        stop(head, [])
    text = log.read_text()
    assert head.returncode == -signal.SIGSEGV, text
    # A signal sent with kill() lands on any thread not blocking it; when gRPC's own C thread takes it,
    # faulthandler lists every Python thread without marking one "Current thread". A stack is what counts.
    assert "Fatal Python error: Segmentation fault" in text and "(most recent call first)" in text, text
    assert "shardnet/cli/head.py" in text, text


async def test_send_to_a_server_without_discovery_still_warns_then_sends(echo_servers):
    [echo] = await echo_servers(1)  # no endpoint discovery: UNIMPLEMENTED, and the request goes anyway
    result = await asyncio.to_thread(shardnet, "send", echo.address, "--endpoint", "/index", "--text", "a")
    assert result.returncode == 0, result.stderr
    assert "could not discover the endpoints" in result.stderr and "UNIMPLEMENTED" in result.stderr
    assert json.loads(result.stdout)["docs"][0]["text"] == "a"


def test_a_worker_refuses_an_address_it_cannot_listen_on_before_its_executor_loads(tmp_path):
    """The bind said so only after the load (20 s of a model, say); a module that does not exist shows the order:
    the address is refused first."""
    in_the_way = tmp_path / "not-a-socket"
    in_the_way.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, said in (
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--port", "0", "--health-port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
            (["--unix-socket", str(in_the_way)], "a file that is not a socket is in the way"),
            # a worker on a socket listens on TCP too
            (["--unix-socket", str(tmp_path / "w.sock"), "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
        ):
            result = shardnet("worker", "--uses", "no_such_module_anywhere:Nothing", *flags)
            assert result.returncode == 2, result.stderr
            [line] = result.stderr.splitlines()
            assert said in line and "no_such_module" not in line, line


async def test_send_prints_json_a_strict_parser_reads_nan_and_infinities_as_protobuf_writes_them(echo_servers):
    """Python's NaN and Infinity are no JSON: a browser's JSON.parse and jq refused what send printed."""
    [echo] = await echo_servers(1)
    result = await asyncio.to_thread(
        shardnet, "send", echo.address, "--endpoint", "/index", "--parameters", '{"a": NaN, "b": [Infinity, -Infinity, 1.5]}'
    )
    assert result.returncode == 0, result.stderr

    def refuse(constant: str):
        raise ValueError(f"{constant} is no JSON")

    printed = json.loads(result.stdout, parse_constant=refuse)
    assert printed["parameters"] == {"a": "NaN", "b": ["Infinity", "-Infinity", 1.5]}


# -- 5: flags taking seconds refuse what is not a positive number of them, in the flag's words ----------------

SECONDS_FLAGS = {
    "send-timeout-zero": (["send", "127.0.0.1:1", "--endpoint", "/x", "--timeout", "0"], "--timeout", "'0'"),
    "send-timeout-nan": (["send", "127.0.0.1:1", "--endpoint", "/x", "--timeout", "nan"], "--timeout", "'nan'"),
    "status-timeout-negative": (["status", "127.0.0.1:1", "--timeout", "-1"], "--timeout", "'-1'"),
    # the Python API's refusal of half the value, naming no flag
    "send-timeout-past-1e9": (["send", "127.0.0.1:1", "--endpoint", "/x", "--timeout", "3e9"], "--timeout", "'3e9'"),
    "deploy-timeout-zero": (["deploy", "--uses", "m:C", "--timeout", "0"], "--timeout", "'0'"),
    "deploy-attempt-timeout-inf": (
        ["deploy", "--uses", "m:C", "--attempt-timeout", "inf"], "--attempt-timeout", "'inf'"
    ),
    "worker-register-interval-zero": (
        ["worker", "--uses", "m:C", "--register-interval", "0"], "--register-interval", "'0'"
    ),
    "head-lease-zero": (["head", "--deployment", "d", "--lease", "0"], "--lease", "'0'"),
    "head-shards-wait-negative": (["head", "--deployment", "d", "--shards-wait", "-1"], "--shards-wait", "'-1'"),
    "head-timeout-text": (["head", "--deployment", "d", "--timeout", "soon"], "--timeout", "'soon'"),
    "head-attempt-timeout-zero": (["head", "--deployment", "d", "--attempt-timeout", "0"], "--attempt-timeout", "'0'"),
}


@pytest.mark.parametrize("arguments, flag, given", SECONDS_FLAGS.values(), ids=SECONDS_FLAGS.keys())
def test_flags_taking_seconds_refuse_non_positive_values_naming_the_flag(arguments, flag, given):
    result = shardnet(*arguments)
    assert result.returncode == 2
    [message] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert re.search(rf"error: argument {flag}( SECONDS)?: .*seconds, got {re.escape(given)}$", message), message
    assert "None" not in message and "0.0" not in message


@pytest.mark.parametrize("text", ["0", "-2", "nan", "inf", "soon"])
def test_positive_seconds_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
        positive_seconds("timeout")(text)


def test_positive_seconds_takes_fractions():
    assert positive_seconds("timeout")("0.25") == 0.25


def test_seconds_that_may_be_zero():
    assert positive_seconds("shards-wait", zero=True)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="shards-wait must be 0 or more seconds"):
        positive_seconds("shards-wait", zero=True)("-0.5")


# -- 6: --help says what the flags mean and their defaults -------------------------------------------------------

HELP = {
    "deploy": ["--name NAME deployment name (default: executor)", "--shards SHARDS number of shards (default: 1)",
               "--replicas REPLICAS replicas of each shard (default: 1)", '{"/search": "ALL", "*": "ANY"}',
               "(default: ANY)", "(default: 127.0.0.1, loopback only)", "slow and hung ones (default: p2c_ewma)",
               "--log-dir DIR"],
    "send": ["--endpoint ENDPOINT the endpoint to call", "(default: 10)"],
    "status": ["--timeout SECONDS", "(default: 5)"],
    "worker": ["--register-interval SECONDS seconds between ACTIVATE refreshes", "(default: 2)",
               "on SIGTERM (default: 10)"],
    "head": ["(default: 0, not fixed: any shard id may register)"],
}


@pytest.mark.parametrize("command", HELP)
def test_help_says_what_flags_mean_and_their_defaults(command):
    result = shardnet(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # as read, whatever argparse's wrapping
    missing = [phrase for phrase in HELP[command] if phrase not in text]
    assert not missing, text


# -- 8: the demo says where a restarted replica is back ---------------------------------------------------------


def test_the_demo_says_a_restarted_replica_is_back_where_the_head_dials_it(tmp_path):
    tmp = tmp_path / "t"
    tmp.mkdir()
    result = subprocess.run([*PYTHON_M, "demo", "--requests", "60", "--concurrency", "4"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL, env=child_env(tmp))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    [dialled] = re.findall(r"^worker-0-1\s+(\S+)\s+\d+\s+running\s+(\S+)$", out, re.M)
    tcp_before, socket = dialled
    back = re.search(r"^started again: worker-0-1 serves on (\S+) \(pid \d+\); .*\n  \(the same socket as before, "
                     r"which the head dials; the new process's TCP port is (\S+)\)$", out, re.M)
    assert back and back.group(1) == socket and socket.startswith("unix:/"), out
    assert back.group(2) != tcp_before  # a new process, a new port: not where it served before


@pytest.mark.parametrize(
    "arguments, command, said",
    [
        (["deploy", "--uses", "x:Y", "--replcias", "2"], "deploy", "unrecognized arguments: --replcias 2"),
        (["worker", "--uses", "x:Y", "--shard", "1"], "worker", "unrecognized arguments: --shard 1"),  # no prefixes
        (["k8s", "render", "--name", "n", "--image", "i", "--uses", "a:B", "--bogus"], "k8s render",
         "unrecognized arguments: --bogus"),
        (["--bogus", "status", "127.0.0.1:1"], "", "unrecognized arguments: --bogus"),  # before the subcommand
    ],
)
def test_a_flag_no_subcommand_takes_is_refused_with_that_subcommands_usage(capsys, arguments, command, said):
    """A typo was refused with the top-level usage (`shardnet: error:`), a prefix taken for the flag it begins."""
    from shardnet.cli.main import main

    assert main(arguments) == 2  # returned, not raised: main() is called from programs of their own too
    err = capsys.readouterr().err
    name = f"shardnet {command}".strip()
    assert f"usage: {name} " in err and f"{name}: error: {said}" in err, err


@pytest.mark.parametrize(
    "arguments, level",
    [(["head", "--log-level", "DEBUG", "--deployment", "x"], "DEBUG"),
     (["--log-level", "ERROR", "head", "--deployment", "x"], "ERROR"),
     (["head", "--deployment", "x"], "INFO")],
)
def test_log_level_is_taken_before_or_after_the_subcommand(arguments, level):
    from shardnet.cli.main import build_parser

    assert build_parser().parse_args(arguments).log_level == level


async def test_status_of_a_head_no_worker_has_joined_exits_1_naming_shard_0(runtimes):
    """A fresh head without --shards knew no shard, so status listed none and exited 0 while every request
    failed; shard 0 is where they go."""
    from shardnet.runtimes.head import Head

    head = await runtimes(Head("fresh"))
    result = await asyncio.to_thread(shardnet, "status", head.server.address)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "shard 0: no replica" in result.stdout, result.stdout


def test_a_head_on_a_port_in_use_says_so_in_one_line_without_grpcs_own(tmp_path):
    """The bind failed inside gRPC, whose C core logged its own 'E... add_port.cc' line above shardnet's."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = shardnet("head", "--deployment", "x", "--port", str(port), "--shards", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"shardnet head: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], result.stderr


def test_a_register_interval_without_a_head_is_refused_not_ignored():
    result = shardnet("worker", "--uses", "m:C", "--register-interval", "5")
    assert result.returncode == 2
    assert "--register-interval says how often to renew a registration: give --head as well" in result.stderr


def test_a_kubernetes_fed_head_with_nowhere_to_find_a_configuration_is_refused_at_start(tmp_path):
    """It started, never ready, and warned at every retry for ever (a k8s review's find)."""
    env = {key: value for key, value in child_env(tmp_path).items() if not key.startswith(("KUBERNETES_", "KUBECONFIG"))}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    result = shardnet("head", "--deployment", "x", "--k8s-namespace", "default", "--port", "0", env=env)
    assert result.returncode == 2, result.stderr
    assert "no Kubernetes configuration: no kubeconfig file at ~/.kube/config" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "given_by, content, said",
    [
        ("KUBECONFIG", b"clusters: [\n", "is not readable YAML"),
        ("KUBECONFIG", b"\xff\xfe not text", "is not readable YAML"),
        ("KUBECONFIG", b"current-context: gone\ncontexts: []\n", "current-context 'gone' is not among its contexts"),
        ("HOME", b"- a list\n", "is not a kubeconfig"),
    ],
)
def test_a_kubeconfig_that_can_never_work_is_refused_at_start_however_it_is_found(tmp_path, given_by, content, said):
    """Given by --kubeconfig it was refused at once; found through KUBECONFIG or ~/.kube/config, the head started
    and retried for ever, never ready, a non-UTF-8 file with a traceback at each retry (a review's find)."""
    env = {key: value for key, value in child_env(tmp_path).items() if not key.startswith(("KUBERNETES_", "KUBECONFIG"))}
    env["HOME"] = str(tmp_path)
    kubeconfig = tmp_path / ".kube" / "config"
    kubeconfig.parent.mkdir()
    kubeconfig.write_bytes(content)
    if given_by == "KUBECONFIG":
        env["KUBECONFIG"] = str(kubeconfig)
    result = shardnet("head", "--deployment", "x", "--k8s-namespace", "default", "--port", "0", env=env)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_kubernetes_fed_head_says_it_listens_not_that_it_is_ready_before_discovery_lists(tmp_path):
    """It printed "ready on" while its readiness said NOT_SERVING (no cluster to list yet)."""
    env = {key: value for key, value in child_env(tmp_path).items() if not key.startswith("KUBERNETES_")}
    env["HOME"] = str(tmp_path)
    env["KUBECONFIG"] = str(tmp_path / "written-later")  # not there yet: discovery keeps trying
    log = tmp_path / "head.log"
    head = start(log, "head", "--deployment", "x", "--k8s-namespace", "default", "--port", "0", "--shards", "1",
                 env=env)
    try:
        address = wait_for_line(log, r"shardnet head x listening on (\S+); ready \(", head).group(1)
        assert "ready on" not in log.read_text()
        result = shardnet("status", address)
        assert result.returncode == 1 and "ready: NOT_SERVING" in result.stdout, result.stdout
    finally:
        stop(head, [])


@pytest.mark.parametrize(
    "flags, said",
    [(["--shards", "2", "--shard-id", "3"], "--shard-id 3 is not among the 2 --shards (0 to 1)"),
     (["--replicas", "2", "--replica-id", "2"], "--replica-id 2 is not among the 2 --replicas (0 to 1)")],
)
def test_a_worker_numbered_beyond_the_shape_it_is_given_is_refused(flags, said):
    result = shardnet("worker", "--uses", "m:C", *flags)
    assert result.returncode == 2 and said in result.stderr, result.stderr


def test_a_worker_given_a_shard_id_but_no_shard_count_tells_its_executor_a_count_that_holds_it(tmp_path):
    """The README's own `worker --shard-id 1` gave the Executor shard_id 1 of shards 1 (a review's find)."""
    log = tmp_path / "worker.log"
    worker = start(log, "worker", "--uses", f"{EXECUTORS}:Tagger", "--port", "0", "--shard-id", "2")
    try:
        address = wait_for_line(log, r"ready on (\S+)", worker).group(1)
        result = shardnet("send", address, "--endpoint", "/tag", "--text", "a")
    finally:
        stop(worker, [])
    assert result.returncode == 0 and '"shards": 3.0' in result.stdout and '"shard": 2.0' in result.stdout, result


@pytest.mark.parametrize("executor", ["Tagger", "LoadsFromItsWorkspace"])
def test_a_worker_warns_of_a_workspace_an_earlier_shardnet_laid_out_by_the_deployments_name(tmp_path, executor):
    """The folder is now named by the Executor's metas name (its class's), as Jina names it: state an earlier
    shardnet kept under WORKSPACE/DEPLOYMENT/SHARD would go unseen without a word. An Executor reading its
    workspace as it loads made its new folder first, and the warning never came (a README review's find)."""
    (tmp_path / "ws" / "index" / "0").mkdir(parents=True)
    log = tmp_path / "worker.log"
    worker = start(log, "worker", "--uses", f"{EXECUTORS}:{executor}", "--port", "0", "--workspace",
                   str(tmp_path / "ws"), "--name", "index/shard-0/rep-0")
    try:
        wait_for_line(log, r"ready on", worker)
        text = log.read_text()
        assert f"its state is kept in {tmp_path / 'ws'}/{executor}/0" in text, text
        assert f"a folder {tmp_path / 'ws' / 'index' / '0'} from an earlier shardnet" in text, text
        assert "--uses-metas '{\"name\": \"index\"}'" in text, text
    finally:
        stop(worker, [])


@pytest.mark.parametrize("name, said", [("d\udcff", "is not text"), ("a\tb", "without control characters")])
def test_a_head_refuses_a_deployment_name_that_is_not_printable_text(name, said):
    """A non-UTF-8 byte in --deployment, which deploy --name refuses, started a head whose errors carried it
    as a surrogate (a review's find)."""
    result = shardnet("head", "--deployment", name, "--port", "0")
    assert result.returncode == 2 and said in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["café", "検索", "a\xa0b", "👩\u200d💻"])
def test_a_head_takes_a_deployment_name_of_any_visible_text(name):
    """A first version refused what str.isprintable() does, a no-break space and joined emoji among them."""
    from shardnet.cli.head import _check_deployment_name

    _check_deployment_name(name)  # no ConfigurationError


@pytest.mark.parametrize("name, said", [("a\nb", "without control characters"), ("", "--name is empty: give a name"),
                                        ("w\udcff", "is not text")])
def test_a_worker_refuses_a_name_that_is_not_printable_text(name, said):
    """--name is in every log line of the worker ("[worker NAME pid N]"), its route entries and metric labels: a
    newline in it began lines that read as another process's, and an empty one was taken as no --name at all,
    where a head refuses such a --deployment (a README walkthrough's find)."""
    result = shardnet("worker", "--uses", "shardnet.examples.echo:Echo", "--port", "0", "--name", name)
    assert result.returncode == 2 and said in result.stderr, result.stderr


def test_a_head_refuses_an_empty_deployment_name_saying_it_is_empty():
    """An empty name was told "give a name without control characters", which it had none of (a review)."""
    from shardnet.cli.head import _check_deployment_name
    from shardnet.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^--deployment is empty: give a name$"):
        _check_deployment_name("")


@pytest.mark.parametrize("name", ["a\u2028b", "a\u2029b", "abc\u202edef", "x\u2066y"])
def test_a_name_holding_a_line_separator_or_a_bidirectional_override_is_refused(name):
    """U+2028 ends a line in some log viewers; U+202E shows the rest of a log line reversed (a regression review)."""
    from shardnet.cli.options import check_visible_name
    from shardnet.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="without control characters"):
        check_visible_name(name, "--name")


def test_a_worker_refuses_a_workspace_it_cannot_write_to_before_it_loads(tmp_path, monkeypatch, capsys):
    """A Deployment refuses a read-only workspace at its start; a standalone worker served on, and every request
    saving to it failed with a PermissionError (a review's find). The tests run as root, who writes anywhere:
    ``os.access`` says the folder is not writable, as it says to any other user."""
    from shardnet.cli.main import main as cli_main

    folder = tmp_path / "read-only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != folder and real_access(path, mode, **kw))
    code = cli_main(["worker", "--uses", f"{EXECUTORS}:Tagger", "--port", "0", "--workspace", str(folder)])
    assert code == 2
    assert f"--workspace {str(folder)!r}: not writable by this process" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, code", [(["send", "127.0.0.1:1"], 2), (["--version"], 0), (["status", "--help"], 0),
                                             (["worker", "--uses", "x:Y", "--register-interval", "0.01"], 2)])
def test_main_returns_argparse_exit_codes_rather_than_raising_system_exit(capsys, arguments, code):
    """The README: `shardnet.cli.main.main()` called from a program of one's own only returns its exit code; a
    flag argparse refused (or --help, --version) raised SystemExit out of it."""
    from shardnet.cli.main import main

    assert main(arguments) == code
