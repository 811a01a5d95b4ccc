"""bench.results_json: results files are strict JSON, a figure that does not apply null."""

from __future__ import annotations

import json
import math

from bench.results_json import write_results


def test_nan_and_infinity_are_written_as_null_everywhere(tmp_path):
    path = tmp_path / "deep" / "result.json"
    value = {"ttft": math.nan, "rows": [{"itl": math.inf, "tokens": 3}, (1.5, -math.inf)], "ok": "nan"}
    write_results(path, value)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "ttft": None,
        "rows": [{"itl": None, "tokens": 3}, [1.5, None]],
        "ok": "nan",
    }
