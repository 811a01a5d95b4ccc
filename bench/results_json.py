"""Benchmark results as strict JSON. A figure that does not apply is NaN in the benches
(the TTFT of `generate()`, the acceptance of a category with no steps); JSON has no NaN
and strict parsers refuse Python's, so it is written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path


def strict(value):
    """``value`` with every non-finite float replaced by None, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def write_results(path: Path, value, indent: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(value), indent=indent, allow_nan=False) + "\n")
