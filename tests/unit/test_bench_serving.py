"""The serving bench's table reports the gateway against in-process decoding and, with a
Hugging Face generate() baseline, both against it; its in-process engine lives only
for its own batches."""

from __future__ import annotations

import asyncio
import threading

from bench.serving import LevelResult, format_table, inprocess_batches


def level(mode: str, tokens_per_s: float, concurrency: int = 1) -> LevelResult:
    nan = float("nan")
    return LevelResult(mode, concurrency, 4, 0.1 if mode != "hf-generate" else nan, 0.05, 2.0, tokens_per_s)


def test_the_table_gives_each_mode_over_hf_generate_only_when_it_ran():
    levels = [level("in-process", 15.0), level("gateway", 24.0)]
    assert "over HF generate()" not in format_table(levels)
    table = format_table([*levels, level("hf-generate", 12.0)])
    assert "| 1 | in-process | 1.25× |" in table
    assert "| 1 | gateway | 2.00× |" in table
    assert "1.60×" in table  # gateway over in-process, as before
    assert "speculative over plain" not in table


def test_with_a_plain_gateway_mode_the_table_gives_speculation_over_it():
    table = format_table([level("in-process", 15.0), level("gateway", 24.0), level("gateway-plain", 16.0)])
    assert "| 1 | 1.50× |" in table.split("speculative over plain")[1]


def test_an_in_process_batch_leaves_no_engine_thread_behind(tiny_model, tiny_tokenizer):
    # An idle engine thread's OpenMP team slowed the HF baseline's generate() in the same
    # process by 42% on an Intel Xeon, so each in-process batch gets an engine of its own.
    def engine_threads():
        return {t for t in threading.enumerate() if t.name == "engine" and t.is_alive()}

    before = engine_threads()
    run_batch = inprocess_batches(tiny_model, tiny_tokenizer, max_tokens=3, max_running=2)
    results, wall = asyncio.run(run_batch(["hi", "hello there"], 2))
    assert len(results) == 2 and wall > 0
    assert engine_threads() <= before
