"""What a request's sampling features cost, and whether speculation keeps its output: the
engine plain and with the shipped EAGLE head in-process, side by side on the same
MT-bench prompts, for greedy decoding, logprobs, repetition penalties, seeded sampling and
a structured output. Each row reports both engines' tokens/s, their ratio, the head's
mean acceptance length, and whether every output was the same token for token.

    python -m bench.request_features                      # 8 prompts (one per category), 48 tokens
    python -m bench.request_features --prompts 16 --max-tokens 96

Exits 1 if any row's speculative outputs differ from plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from aerie_common.model_store import load_target
from aerie_common.settings import ModelSettings
from aerie_drafter.loading import load_drafter_head
from aerie_drafter.settings import DrafterSettings
from aerie_verifier.drafter_client import InProcessDrafterFactory
from aerie_verifier.engine import Engine
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.structured_output import StructuredOutput
from aerie_verifier.tree_cost import serving_tree

from bench.eagle_eval import generate
from bench.prompts import mtbench_questions, select_questions
from bench.results_json import write_results

# Any JSON object with a "summary" string and a list of "points": free enough for any
# MT-bench question, constrained enough to change what the model writes.
SUMMARY_SCHEMA = {
    "type": "object",
    "properties": {"summary": {"type": "string"}, "points": {"type": "array", "items": {"type": "string"}}},
    "required": ["summary", "points"],
    "additionalProperties": False,
}
ROWS = {
    "greedy": {},
    "logprobs, top 5": {"logprobs": True, "top_logprobs": 5},
    "presence 0.5, repetition 1.1": {"presence_penalty": 0.5, "repetition_penalty": 1.1},
    "sampling T=0.8, top_p=0.95, seed 1": {"temperature": 0.8, "top_p": 0.95, "seed": 1},
    "JSON schema": {"structured": StructuredOutput("json_schema", json.dumps(SUMMARY_SCHEMA))},
}


def serving_head(model):
    """The head the stack drafts for ``model`` with (AERIE_DRAFTER_*: the shipped one by
    default), loaded in-process, its origin, and the serving tree: (head, origin, shape)."""
    settings, drafter = ModelSettings(), DrafterSettings()
    head, origin = load_drafter_head(
        settings.target_model, settings.model_cache, drafter.drafter_head, dtype=drafter.drafter_dtype
    )
    return head, origin, serving_tree(model, context_ngram=drafter.draft_tree_context_ngram)


def measure(engines: dict[str, Engine], prompts: list[list[int]], params: SamplingParams) -> dict:
    """Both engines on every prompt, twice (the first pass warms up; the second is timed)."""
    result: dict = {}
    for name, engine in engines.items():
        speculative = name == "head"
        tokens, seconds, drafts, accepted, outputs = 0, 0.0, 0, 0, []
        for timed in (False, True):
            for prompt in prompts:
                started = time.perf_counter()
                output, last = generate(engine, prompt, params, speculative)
                if timed:
                    tokens, seconds = tokens + len(output), seconds + time.perf_counter() - started
                    outputs.append(output)
                    if last.speculative is not None:
                        drafts += last.speculative.drafts
                        accepted += last.speculative.accepted_tokens
        result[name] = {"tokens_per_s": tokens / seconds, "outputs": outputs}
        if speculative:
            result[name]["mean_acceptance_length"] = 1 + accepted / drafts if drafts else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8, help="MT-bench questions, one per category first")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("bench/results/request_features.json"))
    args = parser.parse_args()

    model, tokenizer, _ = load_target(ModelSettings())
    head, origin, shape = serving_head(model)
    engines = {
        "plain": Engine(model, tokenizer, max_running=1),
        "head": Engine(model, tokenizer, max_running=1, drafter_factory=InProcessDrafterFactory(head, shape)),
    }
    for engine in engines.values():
        engine.start()
    questions = select_questions(mtbench_questions(), args.prompts, 1)
    prompts = [engines["plain"].encode_chat([{"role": "user", "content": q["turns"][0]}]) for q in questions]
    rows = []
    try:
        print(f"{'request':<38}{'plain tok/s':>12}{'head tok/s':>12}{'ratio':>8}{'MAL':>7}  same output")
        for label, fields in ROWS.items():
            measured = measure(engines, prompts, SamplingParams(max_tokens=args.max_tokens, **fields))
            plain, spec = measured["plain"], measured["head"]
            row = {
                "request": label,
                "plain_tokens_per_s": plain["tokens_per_s"],
                "head_tokens_per_s": spec["tokens_per_s"],
                "ratio": spec["tokens_per_s"] / plain["tokens_per_s"],
                "mean_acceptance_length": spec["mean_acceptance_length"],
                "identical_outputs": plain["outputs"] == spec["outputs"],
            }
            rows.append(row)
            print(
                f"{label:<38}{row['plain_tokens_per_s']:>12.2f}{row['head_tokens_per_s']:>12.2f}"
                f"{row['ratio']:>8.3f}{row['mean_acceptance_length']:>7.3f}  {row['identical_outputs']}",
                flush=True,
            )
    finally:
        for engine in engines.values():
            engine.stop()
    write_results(
        args.out,
        {
            "head": origin,
            "prompts": len(prompts),
            "max_tokens": args.max_tokens,
            "tree": str(shape),
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    if not all(row["identical_outputs"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
