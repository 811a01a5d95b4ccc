"""The checked-in gRPC stubs must be exactly what protoc generates from protos/ now."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_fresh(tmp_path):
    generated = load_generator().generate(tmp_path)
    checked_in = ROOT / "common"
    assert generated, "protoc generated nothing"
    for path in generated:
        rel = path.relative_to(tmp_path)
        committed = checked_in / rel
        assert committed.is_file(), f"{rel} is not checked in: run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), f"{rel} is stale: run `make protos`"
    expected = {p.relative_to(tmp_path) for p in generated}
    present = {
        p.relative_to(checked_in)
        for p in (checked_in / "aerie_proto").rglob("*.py*")
        if p.suffix in (".py", ".pyi")
    }
    assert present == expected, f"stubs without a proto: {sorted(map(str, present - expected))}"
