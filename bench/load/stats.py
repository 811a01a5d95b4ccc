"""Summaries of a load level: latency percentiles, throughput, and failures by kind."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bench.load.client import RequestRecord


@dataclass
class Percentiles:
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        if not values:
            return cls(math.nan, math.nan, math.nan)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99))


@dataclass
class LevelSummary:
    name: str  # what the level was: "c=16", "rate=2/s", "leak c=16"
    concurrency: int | None  # closed loop
    rate_per_s: float | None  # open loop
    requests: int
    completed: int  # ended with [DONE] and no error
    errors: dict[str, int]  # by kind (bench.chat_stream.ChatStream.error)
    rate_limited_responses: int  # 429s, each retried after its Retry-After (deliberate)
    rate_limited_requests: int  # still refused after the allowed retries
    wall_s: float
    ttft_s: Percentiles
    itl_s: Percentiles  # gaps between streamed chunks, pooled over requests
    e2e_s: Percentiles
    completion_tokens: int
    tokens_per_s: float  # completion tokens of completed requests / wall time
    requests_per_s: float  # completed requests / wall time


def summarise(
    name: str,
    records: list[RequestRecord],
    wall_s: float,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
) -> LevelSummary:
    completed = [r for r in records if r.outcome == "ok"]
    tokens = sum(r.completion_tokens for r in completed)
    return LevelSummary(
        name=name,
        concurrency=concurrency,
        rate_per_s=rate_per_s,
        requests=len(records),
        completed=len(completed),
        errors=dict(Counter(r.error for r in records if r.outcome == "error")),
        rate_limited_responses=sum(r.rate_limited_responses for r in records),
        rate_limited_requests=sum(r.outcome == "rate_limited" for r in records),
        wall_s=wall_s,
        ttft_s=Percentiles.of([r.ttft_s for r in completed if r.ttft_s is not None]),
        itl_s=Percentiles.of([gap for r in completed for gap in r.itl_s]),
        e2e_s=Percentiles.of([r.e2e_s for r in completed]),
        completion_tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else math.nan,
        requests_per_s=len(completed) / wall_s if wall_s > 0 else math.nan,
    )


def _ms(p: Percentiles) -> str:
    return f"{p.p50 * 1e3:.0f} / {p.p90 * 1e3:.0f} / {p.p99 * 1e3:.0f}"


def _s(p: Percentiles) -> str:
    return f"{p.p50:.2f} / {p.p90:.2f} / {p.p99:.2f}"


def format_table(levels: list[LevelSummary]) -> str:
    """A Markdown table, one row per level; latencies as p50 / p90 / p99."""
    lines = [
        "| level | requests | completed | errors | 429s | TTFT p50/p90/p99 (ms) | ITL p50/p90/p99 (ms) "
        "| E2E p50/p90/p99 (s) | tokens/s | req/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        errors = ", ".join(f"{kind}: {n}" for kind, n in sorted(lv.errors.items())) or "0"
        refused = f"{lv.rate_limited_responses}" + (
            f" ({lv.rate_limited_requests} gave up)" if lv.rate_limited_requests else ""
        )
        lines.append(
            f"| {lv.name} | {lv.requests} | {lv.completed} | {errors} | {refused} | {_ms(lv.ttft_s)} "
            f"| {_ms(lv.itl_s)} | {_s(lv.e2e_s)} | {lv.tokens_per_s:.1f} | {lv.requests_per_s:.2f} |"
        )
    return "\n".join(lines)
