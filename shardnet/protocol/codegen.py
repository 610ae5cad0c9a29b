"""Regenerate the protobuf modules from the .proto files with grpcio-tools.

Run ``python shardnet/protocol/codegen.py`` after editing a .proto or changing
the protobuf pin (as a script it does not import the package, whose old
generated modules may not load on the new protobuf); the test
suite regenerates into a temporary folder and fails when the committed modules
differ, so stale generated code never lands.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).parent / "proto"
PROTO_FILES = ("docarray.proto", "jina.proto")
# the folder the .proto imports are relative to: the one holding `shardnet/`
IMPORT_ROOT = Path(__file__).resolve().parents[2]


def generate(out_dir: Path) -> list[Path]:
    """Compile the .proto files into ``out_dir`` and return the written modules."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{IMPORT_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
    ] + [str(PROTO_DIR / name) for name in PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)}")
    generated = out_dir / PROTO_DIR.relative_to(IMPORT_ROOT)
    return sorted(generated.glob("*_pb2.py*"))


def main() -> int:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for module in generate(Path(tmp)):
            shutil.copy(module, PROTO_DIR / module.name)
            print(f"wrote {PROTO_DIR / module.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
