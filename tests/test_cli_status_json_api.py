"""`shardnet status --json` as an API: stopped by SIGTERM (`timeout 5 shardnet status --json`, a probe's deadline)
or Ctrl-C while a server accepts and never answers, it still prints one valid JSON object saying so, and exits
128 + the signal's number."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest


@pytest.mark.parametrize("stop, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_status_json_stopped_by_a_signal_prints_valid_json(stop, code):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        target = "127.0.0.1:%d" % listening.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "shardnet", "status", target, "--json", "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            listening.settimeout(30)
            connection, _ = listening.accept()  # asking: its signal handlers are in place
            with connection:
                process.send_signal(stop)
                out, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == code, (process.returncode, out, err)
    facts = json.loads(out)
    assert facts["state"] == "interrupted" and facts["exit_code"] == code, facts


async def test_json_has_the_same_keys_on_every_path_null_where_unknown(runtimes, capsys):
    """README: replica_health is "null when the head does not check"; at a health port (as at a Jina server or a
    draining head) the key, and hops, discovery, retries, were absent: a script's facts["hops"] raised KeyError."""
    import asyncio

    import executors
    from shardnet.cli.main import main as cli_main
    from shardnet.runtimes.server import ServerConfig
    from shardnet.runtimes.worker import Worker

    worker = await runtimes(Worker(executors.Tagger.create({}), ServerConfig(health_port=0)))
    keys = []
    for target in (worker.server.address, worker.server.health_address):
        capsys.readouterr()
        await asyncio.to_thread(cli_main, ["status", target, "--json", "--timeout", "3"])
        facts = json.loads(capsys.readouterr().out)
        keys.append(set(facts) - {key for key in facts if key.endswith("error")})
    assert keys[0] == keys[1], keys[0] ^ keys[1]


async def test_a_hop_replica_down_beside_a_live_one_is_degraded_and_said_of_the_hops_too(runtimes, capsys,
                                                                                         dead_address):
    """One of a uses_before's two replicas (discovery lists several) down: degraded (exit 3), and the summary says
    every shard *and hop* still has a serving one; it said "every shard has a serving one", of a hop's replica."""
    import asyncio
    import re

    import executors
    from shardnet.cli.main import main as cli_main
    from shardnet.cli.status import DEGRADED
    from shardnet.runtimes.head import Head
    from shardnet.runtimes.worker import Worker

    before, worker = await runtimes(Worker(executors.Tagger.create({}))), await runtimes(Worker(executors.Tagger.create({})))
    head = await runtimes(Head("hop-half", connections={0: [worker.server.address]}, uses_before=before.server.address))
    head.pool.add_connection("hop-half/uses_before", dead_address)
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, ["status", head.server.address, "--timeout", "4"])
    printed = capsys.readouterr().out
    assert code == DEGRADED, printed
    assert re.search(rf"  uses_before: {dead_address} \(down: unreachable: ", printed), printed
    assert "replica health: 1 of 3 replicas down, every shard and hop has a serving one (degraded)" in printed, printed


def test_main_status_in_a_program_of_ones_own_leaves_its_sigterm_handler():
    """status's SIGTERM handler was installed over a calling program's own, and the loop's close set SIGTERM back
    to SIG_DFL: that program's next SIGTERM killed it without its graceful stop."""
    import subprocess
    import sys

    script = (
        "import signal\n"
        "from shardnet.cli.main import main\n"
        "def graceful(signum, frame): pass\n"
        "signal.signal(signal.SIGTERM, graceful)\n"
        "main(['status', '127.0.0.1:9', '--timeout', '1', '--json'])\n"
        "print('handler kept', signal.getsignal(signal.SIGTERM) is graceful)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "handler kept True" in result.stdout, result


def test_json_status_with_a_tls_file_refused_prints_no_object_with_a_null_state(tmp_path, capsys):
    """A --root-ca that cannot be read is refused before the server is asked, as a flag argparse refuses (exit
    2): the object printed said state null and exit_code null beside an exit code of 2."""
    from shardnet.cli.main import main as cli_main

    code = cli_main(["status", "127.0.0.1:9", "--json", "--timeout", "1", "--root-ca", str(tmp_path / "none.pem")])
    out, err = capsys.readouterr()
    assert code == 2 and "cannot read root certificates" in err
    assert '"state": null' not in out and '"exit_code": null' not in out, out
