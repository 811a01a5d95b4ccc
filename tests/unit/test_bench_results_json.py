"""bench.results_json: results files are strict JSON, a figure that does not apply null."""

from __future__ import annotations

import json
import math
import os

import torch

from bench.results_json import write_results


def test_nan_and_infinity_are_written_as_null_everywhere(tmp_path):
    path = tmp_path / "deep" / "result.json"
    value = {"ttft": math.nan, "rows": [{"itl": math.inf, "tokens": 3}, (1.5, -math.inf)], "ok": "nan"}
    write_results(path, value)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads(path.read_text(), parse_constant=refuse)
    assert written.pop("machine")["logical_cpus"] == os.cpu_count()
    assert written == {
        "ttft": None,
        "rows": [{"itl": None, "tokens": 3}, [1.5, None]],
        "ok": "nan",
    }


def test_a_results_object_records_the_machine_and_the_kernel_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    write_results(tmp_path / "r.json", {"rows": []})
    recorded = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert recorded["environment"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "ONEDNN_MAX_CPU_ISA" not in recorded["environment"]
    assert recorded["cpu"] and recorded["torch"] == torch.__version__
    write_results(tmp_path / "list.json", [1, 2])  # bench.serving's levels: a list, kept as it is
    assert json.loads((tmp_path / "list.json").read_text()) == [1, 2]
