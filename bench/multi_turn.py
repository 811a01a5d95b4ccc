"""What the verifier's prefix cache saves a chat: MT-bench's two-turn questions, each asked
as a chat (the first turn, then the second with the first turn's reply in the history),
on two engines side by side: one without the prefix cache and one with it, both
speculating with the shipped EAGLE head in-process as the stack does. The second turn's
prompt resends the first turn and its reply, which the cached engine holds.

Reports the second turn's time to first token and whole latency on both engines, and
their ratios; the prompt tokens the cache held; and whether both engines wrote the same
answers.

    python -m bench.multi_turn                         # all 80 questions, 64 tokens a turn
    python -m bench.multi_turn --questions 8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aerie_common.model_store import load_target
from aerie_common.settings import ModelSettings
from aerie_verifier.drafter_client import InProcessDrafterFactory
from aerie_verifier.engine import Engine
from aerie_verifier.prefix_cache import PrefixCache
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.settings import VerifierSettings

from bench.prompts import by_category_in_turn, mtbench_questions
from bench.request_features import serving_head
from bench.results_json import write_results


@dataclass
class Turn:
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    first_token_s: float  # from submitting to the first event (the prefill's token)
    seconds: float


def ask(engine: Engine, prompt: list[int], params: SamplingParams) -> Turn:
    done = threading.Event()
    events, first_at = [], []

    def on_event(event):
        if not events:
            first_at.append(time.perf_counter())
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    started = time.perf_counter()
    engine.submit(f"turn-{time.monotonic_ns()}", prompt, params, on_event, speculative=True)
    done.wait()
    if events[-1].error:
        raise RuntimeError(events[-1].error)
    return Turn(
        tokens=[t for e in events for t in e.token_ids],
        prompt_tokens=len(prompt),
        cached_tokens=events[0].cached_prompt_tokens,
        first_token_s=first_at[0] - started,
        seconds=time.perf_counter() - started,
    )


def chat(engine: Engine, question: dict, params: SamplingParams) -> tuple[Turn, Turn]:
    """The question's two turns, the second after the first's reply."""
    first_message = {"role": "user", "content": question["turns"][0]}
    first = ask(engine, engine.encode_chat([first_message]), params)
    reply = engine.tokenizer.decode(first.tokens, skip_special_tokens=True)
    history = [first_message, {"role": "assistant", "content": reply}]
    second = ask(
        engine, engine.encode_chat([*history, {"role": "user", "content": question["turns"][1]}]), params
    )
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--questions", type=int, default=80, help="MT-bench questions, one per category first"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="a turn's longest answer")
    parser.add_argument("--out", type=Path, default=Path("bench/results/multi_turn.json"))
    args = parser.parse_args()

    model, tokenizer, _ = load_target(ModelSettings())
    head, origin, shape = serving_head(model)
    cache_mb = VerifierSettings().prefix_cache_mb
    engines = {
        name: Engine(
            model,
            tokenizer,
            max_running=1,
            drafter_factory=InProcessDrafterFactory(head, shape),
            prefix_cache=PrefixCache(cache_mb * 2**20) if name == "cached" else None,
        )
        for name in ("cold", "cached")
    }
    for engine in engines.values():
        engine.start()
    params = SamplingParams(max_tokens=args.max_tokens)
    questions = by_category_in_turn(mtbench_questions())[: args.questions]
    turns: dict[str, list[tuple[Turn, Turn]]] = {name: [] for name in engines}
    try:
        for engine in engines.values():  # warm-up, untimed, on a chat that is not MT-bench's
            chat(engine, {"turns": ["Hello!", "What can you do?"]}, SamplingParams(max_tokens=8))
        for i, question in enumerate(questions):
            # alternate which engine goes first, so that neither always follows the other
            for name in list(engines)[:: 1 if i % 2 == 0 else -1]:
                turns[name].append(chat(engines[name], question, params))
            cold, cached = turns["cold"][-1][1], turns["cached"][-1][1]
            print(
                f"{i + 1:>3}/{len(questions)} {question['category']:<11} second turn of {cold.prompt_tokens} "
                f"tokens ({cached.cached_tokens} cached): first token {1000 * cold.first_token_s:.0f} -> "
                f"{1000 * cached.first_token_s:.0f} ms, whole {cold.seconds:.2f} -> {cached.seconds:.2f} s",
                flush=True,
            )
    finally:
        for engine in engines.values():
            engine.stop()

    def summary(name: str, which: int) -> dict:
        asked = [pair[which] for pair in turns[name]]
        return {
            "mean_first_token_ms": 1000 * statistics.fmean(t.first_token_s for t in asked),
            "median_first_token_ms": 1000 * statistics.median(t.first_token_s for t in asked),
            "mean_seconds": statistics.fmean(t.seconds for t in asked),
            "prompt_tokens": sum(t.prompt_tokens for t in asked),
            "cached_tokens": sum(t.cached_tokens for t in asked),
        }

    rows = []
    for which, label in ((0, "first turn"), (1, "second turn")):
        cold, cached = summary("cold", which), summary("cached", which)
        same = sum(
            a[which].tokens == b[which].tokens for a, b in zip(turns["cold"], turns["cached"], strict=True)
        )
        rows.append(
            {
                "turn": label,
                "cold": cold,
                "cached": cached,
                "first_token_ratio": cold["mean_first_token_ms"] / cached["mean_first_token_ms"],
                "latency_ratio": cold["mean_seconds"] / cached["mean_seconds"],
                "same_answers": same,
            }
        )
    print(
        f"\n{'':<12}{'mean first token ms':>24}{'ratio':>7}{'mean latency s':>18}{'ratio':>7}"
        f"{'cached/prompt tokens':>24}  same answers"
    )
    for row in rows:
        cold, cached = row["cold"], row["cached"]
        print(
            f"{row['turn']:<12}{cold['mean_first_token_ms']:>11.0f} -> {cached['mean_first_token_ms']:<9.0f}"
            f"{row['first_token_ratio']:>7.2f}{cold['mean_seconds']:>8.2f} -> {cached['mean_seconds']:<6.2f}"
            f"{row['latency_ratio']:>7.2f}{cached['cached_tokens']:>12}/{cached['prompt_tokens']:<11}"
            f"  {row['same_answers']}/{len(questions)}"
        )
    write_results(
        args.out,
        {
            "head": origin,
            "questions": len(questions),
            "max_tokens": args.max_tokens,
            "prefix_cache_mb": cache_mb,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
