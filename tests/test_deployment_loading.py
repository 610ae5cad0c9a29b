"""How a Deployment's workers find the user's Executor, and what one start may be given: the class from a
package (relative imports), from a ``python -m`` main module, from a script beside its own modules; a
``uses_with`` too long for a command line; a second start of a running Deployment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shardnet import Document
from shardnet.cli.options import json_object
from shardnet.errors import ConfigurationError, ProcessError
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.executor import (
    EXECUTOR_PATH_VARIABLE,
    executor_reference,
    executor_search_path,
    load_executor_class,
)

import executors

SHOUTER = """\
from shardnet import Executor, requests
from {helpers} import shout

MODULE_STATE = []  # one module, in every process: loaded once, not a copy beside the package's


class Shouter(Executor):
    @requests
    def handle(self, docs, **kwargs):
        for doc in docs:
            doc.text = shout(doc.text)
"""


def write_package(root: Path) -> None:
    """``mypkg`` under ``root``: ``execs.Shouter`` imports its helper relatively."""
    package = root / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    (package / "execs.py").write_text(SHOUTER.format(helpers=".helpers"))


@pytest.fixture
def fresh_mypkg():
    """No ``mypkg`` imported before or after the test: each test writes its own."""

    def forget() -> None:
        for name in [name for name in sys.modules if name == "mypkg" or name.startswith("mypkg.")]:
            del sys.modules[name]

    forget()
    yield
    forget()


def run_python(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_class_from_a_package_with_relative_imports_is_sent_by_its_module_name(tmp_path, monkeypatch, fresh_mypkg):
    write_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mypkg.execs import Shouter  # noqa: E402 (the package exists only now)

    assert executor_reference(Shouter) == "mypkg.execs:Shouter"
    assert str(tmp_path) in executor_search_path(Shouter)
    with Deployment(Shouter) as deployment:
        assert [doc.text for doc in deployment.post("/", [Document(text="hi")])] == ["HI!"]


def test_a_class_of_a_main_module_run_with_dash_m_is_sent_by_its_module_name(tmp_path):
    write_package(tmp_path)
    (tmp_path / "mypkg" / "serve.py").write_text(textwrap.dedent("""\
        from shardnet import Executor, requests
        from shardnet.runtimes.executor import executor_reference, executor_search_path
        from .helpers import shout


        class Local(Executor):
            @requests
            def handle(self, docs, **kwargs):
                for doc in docs:
                    doc.text = shout(doc.text)


        if __name__ == "__main__":
            print(executor_reference(Local), executor_search_path(Local)[0])
        """))
    done = run_python(["-m", "mypkg.serve"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["mypkg.serve:Local", str(tmp_path)]  # python -m puts the folder it ran in first
    loaded = run_python(
        ["-c", "from shardnet.runtimes.executor import load_executor_class as load; "
               "print(load('mypkg.serve:Local').__name__)"],
        cwd=tmp_path,
    )
    assert loaded.stdout.strip() == "Local", loaded.stderr


def test_a_script_imports_the_modules_beside_it_whatever_folder_it_is_run_from(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "beside_helpers.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    (app / "serve.py").write_text(SHOUTER.format(helpers="beside_helpers"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    loaded = run_python(
        ["-c", f"from shardnet.runtimes.executor import load_executor_class as load; "
               f"print(load({str(app / 'serve.py') + ':Shouter'!r}).__name__)"],
        cwd=elsewhere,
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() == "Shouter", loaded.stderr


def test_a_class_of_the_test_modules_is_sent_by_module_name_and_loads_from_it():
    reference = executor_reference(executors.Tagger)
    assert reference == "executors:Tagger"
    tests_folder = Path(executors.__file__).resolve().parent
    assert tests_folder in {Path(folder or ".").resolve() for folder in executor_search_path(executors.Tagger)}
    assert load_executor_class(reference) is executors.Tagger  # the module itself, not a second copy


def test_a_shardnet_class_needs_no_import_path():
    from shardnet.examples.text_index import TextIndexer

    assert executor_reference(TextIndexer) == "shardnet.examples.text_index:TextIndexer"


def test_a_uses_with_too_long_for_a_command_line_reaches_the_workers_whole():
    words = [f"word{number:06d}" for number in range(30_000)]  # about 390 KB of JSON: past Linux's 128 KiB
    with Deployment(executors.UsesWithCounter, uses_with={"words": words}) as deployment:
        answered = deployment.post("/", [Document(text="x")])
        assert answered[0].tags["words"] == len(words)
        assert answered[0].tags["last"] == words[-1]
        written = deployment.log_dir / "executor-uses-with.json"
        assert written.is_file()


def test_a_worker_revived_after_a_cleaner_removed_the_uses_with_file_gets_it_again():
    words = [f"word{number:06d}" for number in range(5_000)]  # past the 32 KB the command line takes
    with Deployment(executors.UsesWithCounter, uses_with={"words": words}) as deployment:
        written = deployment.log_dir / "executor-uses-with.json"
        written.unlink()  # a /tmp cleaner, days later
        deployment.workers[(0, 0)].kill()
        assert deployment.revive() == ["worker-0-0"]
        assert deployment.post("/", [Document(text="x")])[0].tags["words"] == len(words)


def test_a_class_found_through_a_folder_appended_to_sys_path_shadows_nothing_in_the_workers(
    tmp_path, monkeypatch, fresh_mypkg
):
    """A vendored folder reached by sys.path.append, holding a module named as a standard one: the workers
    search this process's path in its order, the folder after the standard library, so the head and the
    workers still start."""
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "dataclasses.py").write_text("raise ImportError('a vendored backport for Python 3.6')\n")
    write_package(vendor)
    monkeypatch.setattr(sys, "path", [*sys.path, str(vendor)])
    from mypkg.execs import Shouter  # noqa: E402 (the package exists only now)

    with Deployment(Shouter) as deployment:
        assert [doc.text for doc in deployment.post("/", [Document(text="hi")])] == ["HI!"]


def test_uses_with_at_file_is_read_and_a_bad_file_is_named(tmp_path):
    given = tmp_path / "kwargs.json"
    given.write_text('{"size": 3}')
    assert json_object(f"@{given}", "--uses-with") == {"size": 3}
    with pytest.raises(ConfigurationError, match=r"--uses-with @FILE: cannot read '.*missing.json': No such file"):
        json_object(f"@{tmp_path / 'missing.json'}", "--uses-with")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        json_object(f"@{latin}", "--uses-with")


def test_starting_a_running_deployment_again_is_refused_and_leaves_it_serving():
    with Deployment(executors.Upper) as deployment:
        processes = list(deployment.processes)
        with pytest.raises(ProcessError, match="'executor' is already running: stop\\(\\) it"):
            deployment.start()
        assert deployment.processes == processes and all(process.alive for process in processes)
        assert [doc.text for doc in deployment.post("/", [Document(text="a")])] == ["A"]


def test_two_threads_starting_one_deployment_at_once_start_it_once(monkeypatch):
    # start() checked "already running" under its lock but launched after releasing it: two threads both passed,
    # launched two heads and two workers per socket, and both failed ("cannot listen on unix:...", "stopped while
    # it started (stop() called during start())"), though nobody called stop()
    launch = Deployment._launch

    def paused_launch(self, role, arguments):
        if role == "head":
            time.sleep(0.3)  # the other thread's start() checks meanwhile
        return launch(self, role, arguments)

    monkeypatch.setattr(Deployment, "_launch", paused_launch)
    deployment = Deployment(executors.Upper, replicas=2)
    outcomes: dict[int, str] = {}

    def start(index: int) -> None:
        try:
            deployment.start()
            outcomes[index] = "started"
        except ProcessError as exc:
            outcomes[index] = str(exc)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(outcomes.values())[1] == "started", outcomes
        assert "is being started by another thread" in sorted(outcomes.values())[0]
        assert len(deployment.processes) == 3 and all(process.alive for process in deployment.processes)
        assert [doc.text for doc in deployment.post("/", [Document(text="a")])] == ["A"]
    finally:
        deployment.stop()


@pytest.mark.parametrize("argument", ["uses_before", "uses_after"])
def test_a_bad_uses_before_or_after_is_refused_when_the_deployment_is_made(argument):
    with pytest.raises(ConfigurationError, match=f"{argument} must be an Executor subclass"):
        Deployment(executors.Upper, **{argument: 5})
    with pytest.raises(ConfigurationError, match=f"{argument} .*must look like MODULE:CLASS"):
        Deployment(executors.Upper, **{argument: "config.yml"})


def test_unix_sockets_must_be_a_flag():
    with pytest.raises(ConfigurationError, match="unix_sockets is True or False, got 'no'"):
        Deployment(executors.Upper, unix_sockets="no")


def test_a_worker_finds_a_users_module_named_like_an_installed_one_as_the_naming_process_did(tmp_path):
    """The user's folder came first in the process that named the class (a script's folder does), and an
    installed module of the same name comes before it in a worker's own path: the search path given puts the
    user's first again. Appending it, as a first version did, loaded the installed module."""
    users, installed = tmp_path / "project", tmp_path / "installed"
    for folder in (users, installed):
        folder.mkdir()
    (users / "collide.py").write_text(SHOUTER.format(helpers="beside_helpers"))
    (users / "beside_helpers.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    (installed / "collide.py").write_text("# an installed module of the same name: no Shouter here\n")
    loaded = subprocess.run(
        [sys.executable, "-c", "import os; from shardnet.runtimes.executor import load_executor_class as load; "
         f"print(load('collide:Shouter', os.environ[{EXECUTOR_PATH_VARIABLE!r}].split(os.pathsep)).__module__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(installed), EXECUTOR_PATH_VARIABLE: str(users)},
    )
    assert loaded.returncode == 0 and loaded.stdout.strip() == "collide", loaded.stderr


def test_uses_given_as_text_is_found_along_the_scripts_path_whatever_folder_it_is_run_from(tmp_path):
    """Deployment("shouting:Shouter") in a script beside shouting.py, run from another folder: the workers find the
    module as the script would import it (they looked in the folder it was run from alone)."""
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    for folder in (app, elsewhere):
        folder.mkdir()
    (app / "shouting.py").write_text(SHOUTER.format(helpers="beside_helpers"))
    (app / "beside_helpers.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    (app / "run.py").write_text(textwrap.dedent("""\
        from shardnet import Deployment, Document

        if __name__ == "__main__":
            with Deployment("shouting:Shouter") as deployment:
                print(deployment.post("/", [Document(text="hi")])[0].text)
    """))
    done = run_python([str(app / "run.py")], cwd=elsewhere)
    assert done.returncode == 0 and done.stdout.strip() == "HI!", done.stderr[-2000:]


def test_close_stops_as_jinas_does():
    # Jina's Deployment and Flow are ExitStacks: code written for them calls close(), which was an AttributeError
    deployment = Deployment(executors.Upper)
    deployment.start()
    processes = list(deployment.processes)
    deployment.close()
    deployment.close()  # a second one does nothing, as a second stop()
    assert not any(process.alive for process in processes)
    with pytest.raises(ProcessError, match="is not running"):
        deployment.post("/", [Document(text="a")])


def test_a_start_that_raises_leaves_no_start_under_way(monkeypatch):
    """A start() that fails leaves no start under way behind it: the next one starts."""
    deployment = Deployment(executors.Upper)
    real = Deployment._start_claimed

    def failing(self, abandoned):
        raise ProcessError("boom")

    monkeypatch.setattr(Deployment, "_start_claimed", failing)
    with pytest.raises(ProcessError, match="boom"):
        deployment.start()
    assert deployment._start_under_way is False
    monkeypatch.setattr(Deployment, "_start_claimed", real)
    try:
        deployment.start()
        assert [doc.text for doc in deployment.post("/", [Document(text="a")])] == ["A"]
    finally:
        deployment.close()


def test_two_restarts_of_one_worker_at_once_restart_it_once_and_refuse_the_other_by_name():
    """The second failed with "worker-0-0 (pid N) is still running: stop it before launching it again", which
    said nothing of the restart under way (a Deployment API review)."""
    deployment = Deployment(executors.Upper)
    deployment.start()
    try:
        outcomes: dict[int, str] = {}

        def restart(index: int) -> None:
            try:
                deployment.restart_worker(0, 0)
                outcomes[index] = "restarted"
            except ProcessError as exc:
                outcomes[index] = str(exc)

        threads = [threading.Thread(target=restart, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        said = sorted(outcomes.values())
        assert said[0] == "restarted" and said[1] in (
            "restarted",  # (the first was done before the second began: no overlap to refuse)
            "worker-0-0 is being restarted by another call: wait for it to return",
        ), outcomes
        assert [doc.text for doc in deployment.post("/", [Document(text="a")])] == ["A"]
    finally:
        deployment.stop()


def test_a_revive_beside_a_restart_leaves_the_restarted_worker_to_it(caplog):
    """revive() (``shardnet deploy`` looks every second, a program's own thread may too) took a restart_worker()'s
    stop for an exit: it logged the worker as exited, launched it, and the restart failed with "still running:
    stop it before launching it again" (a Deployment API review's left-alone item)."""
    deployment = Deployment(executors.Upper)
    deployment.start()
    try:
        looking = threading.Event()
        looks: list[list[str]] = []
        failures: list[BaseException] = []

        def look_again_and_again() -> None:
            while not looking.is_set():
                try:
                    looks.append(deployment.revive(wait=False))
                except BaseException as exc:  # noqa: BLE001 - said by the assertion below
                    failures.append(exc)
                    return

        looker = threading.Thread(target=look_again_and_again)
        looker.start()
        try:
            for _ in range(2):
                deployment.restart_worker(0, 0)
        finally:
            looking.set()
            looker.join(30)
        assert not failures and len(looks) > 1, failures
        assert not any(roles for roles in looks), looks  # nothing it revived: the restarts did
        assert "worker-0-0 (pid" not in caplog.text, caplog.text  # no "exited; starting it again"
        assert [doc.text for doc in deployment.post("/", [Document(text="a")])] == ["A"]
    finally:
        deployment.stop()


def test_a_restart_refused_while_revive_starts_the_worker_again_names_revive():
    """It said "being restarted by another call", where the other was revive() (``shardnet deploy``'s loop, or the
    program's own), which the caller may never have made itself (a regression review)."""
    deployment = Deployment(executors.Upper)
    deployment.start()
    try:
        worker = deployment.workers[(0, 0)]
        worker.kill()
        with deployment._revive_claim(worker) as claimed:  # as revive() holds it while it launches the worker
            assert claimed
            with pytest.raises(ProcessError, match=r"worker-0-0 is being restarted by revive\(\), after it exited"):
                deployment.restart_worker(0, 0)
        assert deployment.revive() == ["worker-0-0"]
        assert [doc.text for doc in deployment.post("/", [Document(text="a")])] == ["A"]
    finally:
        deployment.stop()
