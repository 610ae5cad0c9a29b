"""The committed generated protobuf modules are what the .proto files compile to, and the CLI starts."""

from __future__ import annotations

import subprocess
import sys

from shardnet.protocol import codegen


def test_generated_modules_are_not_stale(tmp_path):
    generated = {path.name: path.read_bytes() for path in codegen.generate(tmp_path)}
    assert set(generated) == {"docarray_pb2.py", "docarray_pb2.pyi", "jina_pb2.py", "jina_pb2.pyi"}
    stale = [name for name, data in generated.items() if (codegen.PROTO_DIR / name).read_bytes() != data]
    assert not stale, f"stale generated modules {stale}: run `python shardnet/protocol/codegen.py`"


def test_python_m_shardnet_help():
    result = subprocess.run([sys.executable, "-m", "shardnet", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "usage: shardnet" in result.stdout
