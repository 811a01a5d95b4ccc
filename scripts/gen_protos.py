"""Generate the Python gRPC stubs from protos/ into common/aerie_proto/.

Run by `make protos`. The stubs are checked in; tests/unit/test_protos_fresh.py
regenerates them into a temporary folder and fails if the checked-in copy is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for folder in {p.parent for p in out_dir.rglob("*_pb2.py")} | {out_dir / "aerie_proto"}:
        (folder / "__init__.py").touch()
    return sorted(p for p in out_dir.rglob("*.py*") if p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "common"
    for path in generate(out):
        print(path.relative_to(out))
