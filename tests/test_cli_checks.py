"""What `shardnet` refuses or reports before doing any work: --version, no command, bad counts, bad resources."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os

import pytest
from test_cli import CONSOLE_SCRIPT, PYTHON_M
from test_cli import shardnet as run_cli

from shardnet.cli.demo import measure
from shardnet.errors import ConfigurationError


def test_version_is_the_installed_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"shardnet {importlib.metadata.version('shardnet')}\n"


def test_console_script_reports_the_same_version() -> None:
    result = run_cli("--version", command=CONSOLE_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"shardnet {importlib.metadata.version('shardnet')}\n"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(PYTHON_M, id="python-m"),
        pytest.param(CONSOLE_SCRIPT, id="console-script"),
    ],
)
def test_no_command_prints_usage_and_exits_2(command: tuple[str, ...]) -> None:
    result = run_cli(command=command)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: shardnet")
    assert "the following arguments are required: COMMAND" in result.stderr


def test_a_mistyped_flag_without_a_command_is_named_not_taken_for_a_missing_command() -> None:
    result = run_cli("--verison")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: shardnet")
    assert "shardnet: error: unrecognized arguments: --verison" in result.stderr, result.stderr
    assert "required" not in result.stderr


def test_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in ("worker", "head", "deploy", "send", "status", "demo", "k8s"):
        assert f"    {name} " in result.stdout or f"    {name}\n" in result.stdout, (name, result.stdout)


def test_the_polling_help_of_every_command_says_where_search_and_index_go_and_advertise_host_its_wildcard() -> None:
    """"ANY (one shard answers)" read as if /search went to one shard under the default ANY: it goes to every
    shard, as in Jina, unless a map names it (a README review). And a worker bound to 0.0.0.0 advertises
    127.0.0.1, which the help's "the bound host" did not say."""
    for command in (("head",), ("deploy",), ("k8s", "render")):
        result = run_cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        assert "/search goes to ALL and /index to ANY unless the map names them" in text, (command, text)
    text = " ".join(run_cli("worker", "--help").stdout.split())
    assert "0.0.0.0 advertises 127.0.0.1" in text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--concurrency", "0"], "argument --concurrency: concurrency must be an integer >= 1, got '0'"),
        (["--concurrency", "-3"], "argument --concurrency: concurrency must be an integer >= 1, got '-3'"),
        (["--requests", "-5"], "argument --requests: requests must be an integer >= 1, got '-5'"),
        (["--requests", "0"], "argument --requests: requests must be an integer >= 1, got '0'"),
        (["--requests", "many"], "argument --requests: requests must be an integer >= 1, got 'many'"),
    ],
)
def test_demo_refuses_counts_below_one_before_starting_anything(arguments: list[str], message: str) -> None:
    result = run_cli("demo", *arguments)
    assert result.returncode == 2
    assert result.stdout == ""  # not even "starting a text index": no process was started
    assert "usage: shardnet demo" in result.stderr and message in result.stderr


@pytest.mark.parametrize("total, concurrency, what", [(0, 4, "total"), (10, 0, "concurrency")])
def test_demo_measure_refuses_counts_below_one(total: int, concurrency: int, what: str) -> None:
    # refused before any connection is made, so the address is never dialled
    with pytest.raises(ConfigurationError, match=f"{what} must be an integer >= 1, got 0"):
        asyncio.run(measure("127.0.0.1:1", total, concurrency))


K8S_RENDER = ("k8s", "render", "--name", "index", "--image", "x")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--memory", "2Gi", "--memory-limit", "1Gi"], "memory request '2Gi' exceeds memory_limit '1Gi'"),
        (["--memory", "2Gi"], "memory request '2Gi' exceeds memory_limit '1Gi'"),  # the default limit
        (["--memory", "1.5Gi", "--memory-limit", "1500Mi"], "memory request '1.5Gi' exceeds memory_limit '1500Mi'"),
        (["--memory", "lots"], "memory request 'lots' is not a Kubernetes quantity"),
        (["--memory-limit", "1GB"], "memory_limit '1GB' is not a Kubernetes quantity"),
        # rendered as a --shards-wait the head refuses (a crash loop) and a progressDeadlineSeconds past int32
        (["--startup-seconds", "999999950"], "--startup-seconds must be an integer from 2 to 86400"),
        (["--cpu", "-1"], "cpu request '-1' is not a Kubernetes quantity"),
        (["--cpu", "2", "--cpu-limit", "1"], "cpu request '2' exceeds cpu_limit '1'"),
        (["--head-memory", "1Gi"], "memory request '1Gi' exceeds memory_limit '512Mi'"),  # the head's default limit
    ],
)
def test_k8s_render_refuses_resources_kubernetes_would_reject(arguments: list[str], message: str) -> None:
    result = run_cli(*K8S_RENDER, *arguments)
    assert result.returncode == 2
    assert result.stdout == ""  # no half-written manifest to pipe into kubectl
    assert result.stderr.startswith("shardnet k8s render: ") and message in result.stderr, result.stderr


def test_k8s_render_accepts_a_request_equal_to_its_limit_in_other_units() -> None:
    result = run_cli(*K8S_RENDER, "--memory", "1024Mi", "--memory-limit", "1Gi")
    assert result.returncode == 0, result.stderr
    assert "memory: 1024Mi" in result.stdout and "memory: 1Gi" in result.stdout


def test_head_refuses_a_kubeconfig_without_a_namespace_to_watch(tmp_path) -> None:
    """--kubeconfig only serves discovery: a head given it alone would silently ignore it."""
    result = run_cli("head", "--deployment", "d", "--port", "0", "--kubeconfig", str(tmp_path / "kubeconfig"))
    assert result.returncode == 2, result.stderr
    assert "--kubeconfig is for discovery: give --k8s-namespace as well" in result.stderr


def test_head_refuses_an_empty_namespace_in_one_line() -> None:
    """``--k8s-namespace "$POD_NAMESPACE"`` with the variable unset crashed with a TypeError (a k8s review's find)."""
    result = run_cli("head", "--deployment", "d", "--port", "0", "--k8s-namespace", "")
    assert result.returncode == 2, result.stderr
    assert "--k8s-namespace is empty" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--connection", "0=127.0.0.1:1"], "--connection and --k8s-namespace: a head following Kubernetes takes its "
                                            "workers from discovery alone"),
        (["--lease", "3"], "--lease and --k8s-namespace: a lease drops workers that stop renewing their ACTIVATE, "
                           "and a head following Kubernetes refuses ACTIVATE"),
    ],
    ids=["connection", "lease"],
)
def test_head_refuses_static_membership_beside_kubernetes_discovery(tmp_path, flags, said) -> None:
    """A static --connection was listed and counted for readiness (a dead one made the head ready) and --lease never
    applied, silently, under --k8s-namespace (a knobs review's find): the head served on. Refused at start, before
    the API server (which nothing serves here) is asked anything."""
    from k8s_apiserver import write_kubeconfig

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    result = run_cli("head", "--deployment", "d", "--port", "0", "--k8s-namespace", "default", "--kubeconfig",
                     str(kubeconfig), *flags, timeout=10)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "command, said",
    [
        (["head", "--deployment", "d", "--connection", "0=foo"], "--connection '0=foo': bad address 'foo': expected"),
        (["head", "--deployment", "d", "--uses-before", "nohost"], "--uses-before: bad address 'nohost': expected"),
        (["head", "--deployment", "d", "--uses-after", "h:0"], "--uses-after: bad address 'h:0': port must be"),
        (["worker", "--uses", "m:C", "--head", "nohost"], "--head: bad address 'nohost': expected host:port"),
    ],
    ids=["connection", "uses-before", "uses-after", "worker-head"],
)
def test_a_bad_address_is_refused_naming_the_flag_that_gave_it(command, said) -> None:
    """"bad address 'foo': expected host:port" named no flag (a knobs review's find). Refused before anything
    listens or loads (m:C is no module)."""
    from shardnet.cli.main import build_parser

    args = build_parser().parse_args(["--log-level", "ERROR", *command])
    with pytest.raises(ConfigurationError) as refused:
        args.handler(args)
    assert str(refused.value).startswith(said), refused.value


@pytest.mark.parametrize(
    "content, said",
    [
        (None, "no such file"),
        ("directory", "a directory, not a file"),
        ("clusters: [unclosed", "is not readable YAML"),
        ("- a list", "is not a kubeconfig"),
        ("apiVersion: v1\nkind: Config\ncontexts: []\n", "sets no current-context"),
        ("current-context: gone\ncontexts: [{name: here}]\n", "current-context 'gone' is not among its contexts (here)"),
    ],
)
def test_head_refuses_a_kubeconfig_that_can_never_work(tmp_path, content, said) -> None:
    """It said ready and retried for ever (a YAML error with a traceback each time) instead, as kubectl does not."""
    path = tmp_path / "kubeconfig"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    result = run_cli("head", "--deployment", "d", "--port", "0", "--k8s-namespace", "ns", "--kubeconfig", str(path))
    assert result.returncode == 2, result.stderr
    assert f"kubeconfig {path}" in result.stderr and said in result.stderr, result.stderr
    assert "ready on" not in result.stdout and "Traceback" not in result.stderr


def test_send_shows_what_an_encoder_answers_and_says_what_it_cannot_read() -> None:
    """It printed id, text, tags, scores and matches only: an encoder's embeddings could not be checked."""
    import json

    import numpy as np

    from shardnet import DataRequest, Document
    from shardnet.cli.send import describe

    encoded = Document(id="q", text="hi", embedding=np.arange(8, dtype=np.float32), tensor=np.ones((2, 3)))
    encoded.proto.uri = "s3://bucket/q.txt"
    encoded.chunks.append(Document(id="c", embedding=np.array([1j, 2], dtype=np.complex64)))
    broken = Document(id="b")
    broken.proto.embedding.dense.shape.extend([4])  # four values announced, none sent
    broken.proto.embedding.dense.dtype = "<f4"
    [shown, unreadable] = describe(DataRequest([encoded, broken]))["docs"]
    assert shown["uri"] == "s3://bucket/q.txt"
    assert shown["embedding"] == {"shape": [8], "dtype": "float32", "first": [0.0, 1.0, 2.0, 3.0, 4.0]}
    assert shown["tensor"] == {"shape": [2, 3], "dtype": "float64", "first": [1.0] * 5}
    assert shown["chunks"][0]["embedding"]["first"] == ["1j", "(2+0j)"]
    assert "unreadable" in unreadable["embedding"]
    long_double = describe(DataRequest([Document(embedding=np.array([0.5, 1.5], dtype=np.longdouble))]))["docs"][0]
    assert long_double["embedding"]["first"] in (["0.5", "1.5"], [0.5, 1.5])  # a platform's float128 or float64
    json.dumps([shown, unreadable, long_double])  # all of it printable (float128's own type failed)


def test_a_ready_fd_the_launcher_did_not_pass_is_refused_before_grpc_opens_descriptors(capsys) -> None:
    """A number gRPC or the loop opened later (an eventfd) was written to and closed: an abort, or a worker that
    no longer stopped. Only an open pipe or file is taken."""
    from shardnet.cli.main import build_parser

    def parsed(fd: int) -> int:
        return build_parser().parse_args(["worker", "--uses", "shardnet.examples.echo:Echo", "--ready-fd", str(fd)]).ready_fd

    unopened = next(fd for fd in range(64, 1024) if not _is_open(fd))
    with pytest.raises(SystemExit) as refused:
        parsed(unopened)
    assert refused.value.code == 2
    assert f"file descriptor {unopened} is not open in this process" in capsys.readouterr().err
    device = os.open(os.devnull, os.O_WRONLY)
    reading, writing = os.pipe()
    try:
        with pytest.raises(SystemExit):
            parsed(device)
        assert "neither a pipe nor a file" in capsys.readouterr().err
        assert parsed(writing) == writing
    finally:
        for fd in (device, reading, writing):
            os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
