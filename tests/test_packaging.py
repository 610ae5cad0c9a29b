"""The built wheel carries what an installed shardnet needs beside its modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_type_marker_and_the_protocol_files(tmp_path):
    """``py.typed`` (PEP 561: without it a user's mypy ignores every annotation of shardnet's public API and
    calls its names Any), the .proto files and the generated stubs. Built from a copy: a build writes into the
    tree it builds."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("shardnet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"shardnet/py.typed", "shardnet/protocol/proto/jina.proto", "shardnet/protocol/proto/docarray.proto",
            "shardnet/protocol/proto/jina_pb2.pyi", "shardnet/protocol/proto/docarray_pb2.pyi"} <= names
