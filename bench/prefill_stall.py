"""What a long prompt does to a stream that is already decoding: the verifier's engine with
chunked prefill (AERIE_PREFILL_CHUNK_TOKENS; --chunk, 512 by default) and without (0),
side by side on one model, taking turns. A stream answers an MT-bench question; once it has 20 tokens, a
request with a long prompt (MT-bench questions run together) arrives. Reported per engine:
the stream's longest gap between two tokens after that arrival, the long request's time to
first token, and the stream's whole time.

    python -m bench.prefill_stall                      # 1800-token prompt, chunks of 512, 3 trials
    python -m bench.prefill_stall --prompt-tokens 900 --trials 2
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from aerie_common.model_store import load_target
from aerie_common.settings import ModelSettings
from aerie_verifier.engine import Engine
from aerie_verifier.sampling import SamplingParams

from bench.prompts import mtbench_questions
from bench.results_json import write_results

STREAM_TOKENS = 160
ARRIVES_AFTER = 20  # stream tokens


def trial(engine: Engine, stream_prompt: list[int], long_prompt: list[int]) -> dict:
    stamps: list[float] = []  # when each stream event came
    stream_done, long_done = threading.Event(), threading.Event()
    long_first: list[float] = []

    def on_stream(event):
        stamps.append(time.perf_counter())
        if event.finish_reason is not None:
            stream_done.set()

    def on_long(event):
        if not long_first:
            long_first.append(time.perf_counter())
        if event.finish_reason is not None:
            long_done.set()

    started = time.perf_counter()
    engine.submit(
        "stream", stream_prompt, SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True), on_stream
    )
    while len(stamps) < ARRIVES_AFTER:
        time.sleep(0.001)
    arrived = time.perf_counter()
    engine.submit("long", long_prompt, SamplingParams(max_tokens=8, ignore_eos=True), on_long)
    stream_done.wait()
    long_done.wait()
    after = [t for t in stamps if t > arrived]
    gaps = [b - a for a, b in zip([arrived, *after], after, strict=False)]
    return {
        "stream_longest_gap_ms": 1000 * max(gaps),
        "long_first_token_ms": 1000 * (long_first[0] - arrived),
        "stream_seconds": stamps[-1] - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=1800, help="the long prompt's length")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=512, help="prompt tokens a round, beside the stream")
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefill_stall.json"))
    args = parser.parse_args()

    model, tokenizer, _ = load_target(ModelSettings())
    chunk = args.chunk
    engines = {
        f"chunks of {chunk}": Engine(model, tokenizer, max_running=2, prefill_chunk_tokens=chunk),
        "whole": Engine(model, tokenizer, max_running=2, prefill_chunk_tokens=0),
    }
    for engine in engines.values():
        engine.start()
    questions = mtbench_questions()
    stream_prompt = next(iter(engines.values())).encode_chat(
        [{"role": "user", "content": questions[0]["turns"][0]}]
    )
    run_together = " ".join(turn for q in questions for turn in q["turns"])
    long_prompt = tokenizer(run_together)["input_ids"][: args.prompt_tokens]
    results: dict[str, list[dict]] = {name: [] for name in engines}
    try:
        for engine in engines.values():  # warm-up, untimed
            trial(engine, stream_prompt, long_prompt[:64])
        for i in range(args.trials):
            for name in list(engines)[:: 1 if i % 2 == 0 else -1]:
                results[name].append(trial(engines[name], stream_prompt, long_prompt))
                print(f"trial {i + 1} {name:<16} {results[name][-1]}", flush=True)
    finally:
        for engine in engines.values():
            engine.stop()

    rows = []
    for name, trials in results.items():
        row = {"engine": name, **{key: statistics.fmean(t[key] for t in trials) for key in trials[0]}}
        rows.append(row)
    print(f"\n{'engine':<18}{'stream longest gap ms':>23}{'long first token ms':>21}{'stream s':>10}")
    for row in rows:
        print(
            f"{row['engine']:<18}{row['stream_longest_gap_ms']:>23.0f}{row['long_first_token_ms']:>21.0f}"
            f"{row['stream_seconds']:>10.2f}"
        )
    write_results(
        args.out,
        {
            "prompt_tokens": len(long_prompt),
            "trials": args.trials,
            "stream_tokens": STREAM_TOKENS,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
