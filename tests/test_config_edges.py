"""Folders and numbers of a Deployment (and of deploy) given empty or of the wrong type: refused in one line
naming the parameter or the flag, not an AttributeError or TypeError from deep inside."""

from __future__ import annotations

from pathlib import Path

import executors
import pytest
from test_cli import shardnet

from shardnet.cli.head import parse_connections, skipped_shards
from shardnet.errors import ConfigurationError
from shardnet.runtimes.deployment import Deployment
from shardnet.runtimes.server import ServerConfig

EXECUTORS = Path(executors.__file__).resolve()


@pytest.mark.parametrize("what", ["log_dir", "workspace"])
def test_deployment_refuses_an_empty_folder_naming_it(what):
    with pytest.raises(ConfigurationError, match=f"{what} is empty"):
        Deployment(f"{EXECUTORS}:Tagger", **{what: ""})


@pytest.mark.parametrize("what", ["log_dir", "workspace"])
def test_deployment_refuses_a_folder_that_is_no_path_naming_it(what):
    with pytest.raises(ConfigurationError, match=f"{what} must be a folder's path"):
        Deployment(f"{EXECUTORS}:Tagger", **{what: 123})


@pytest.mark.parametrize("what", ["register_interval", "startup_timeout"])
def test_deployment_refuses_seconds_given_as_text_naming_them(what):
    with pytest.raises(ConfigurationError, match=f"{what} must be a number of seconds"):
        Deployment(f"{EXECUTORS}:Tagger", **{what: "5"})


@pytest.mark.parametrize("flag", ["--log-dir", "--workspace"])
def test_deploy_refuses_an_empty_folder_flag_in_one_line(flag):
    done = shardnet("deploy", "--uses", f"{EXECUTORS}:Tagger", flag, "")
    assert done.returncode == 2, done.stderr
    assert f"shardnet deploy: {flag} is empty" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("code, said, expected_exit", [
    ("import sys\nsys.exit(3)\n", "importing its module raised SystemExit(3): not served", 3),
    ("raise KeyboardInterrupt\n", "interrupted while importing its module (Ctrl-C, or the module raised", 130),
])
def test_worker_whose_uses_module_exits_as_it_is_imported_says_so(tmp_path, code, said, expected_exit):
    (tmp_path / "exits_at_import.py").write_text(code)
    done = shardnet("worker", "--uses", "exits_at_import:X", "--port", "0", cwd=tmp_path)
    assert done.returncode == expected_exit, done.stderr
    assert f"--uses 'exits_at_import:X': {said}" in done.stderr, done.stderr


def test_head_warns_of_static_connections_skipping_a_shard_without_shards():
    """`--connection 0=... --connection 2=...` without --shards: ALL left shard 1 out silently, and
    `shardnet status` listed every replica serving."""
    assert "no worker for 1 shard(s) below shard 2 (1)" in skipped_shards(parse_connections(["0=127.0.0.1:1",
                                                                                             "2=127.0.0.1:2"]))
    assert skipped_shards(parse_connections(["0=127.0.0.1:1", "1=127.0.0.1:2"])) is None
    assert "no worker for 2147483647 shard(s) below shard 2147483647 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...)" in (
        skipped_shards(parse_connections(["2147483647=127.0.0.1:2"]))
    )


@pytest.mark.parametrize("host", ["127.0.0.1:5", "localhost:50051", "[::1]:5"])
def test_a_host_given_with_a_port_is_refused_naming_it(host):
    with pytest.raises(ConfigurationError, match="holds a port: give the host alone"):
        Deployment(f"{EXECUTORS}:Tagger", host=host)
    with pytest.raises(ConfigurationError, match="holds a port"):
        ServerConfig(host=host, port=0)


@pytest.mark.parametrize("host", ["::1", "[::1]", "::", "0.0.0.0", "localhost", "fe80::1%lo"])
def test_hosts_without_a_port_are_still_taken(host):
    ServerConfig(host=host, port=0)
