"""The serving bench's table reports the gateway against in-process decoding and, with a
Hugging Face generate() baseline, both against it."""

from __future__ import annotations

from bench.serving import LevelResult, format_table


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
