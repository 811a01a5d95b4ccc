"""The verifier's Prometheus metrics (served by aerie_common.metrics).

Names follow the gateway's vLLM-style ``aerie:`` names, with a ``verifier_`` prefix: the
gateway counts what clients asked for, these count what the engine did (a cancelled
request shows up here once the engine has let go of it). The values are read from the
engine's own counts when Prometheus scrapes, so GetLoad and /metrics never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator

from aerie_common.metrics import counter_by
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aerie_verifier.engine import Engine


class EngineCollector(Collector):
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine, totals = self.engine, self.engine.totals
        yield GaugeMetricFamily(
            "aerie:verifier_requests_running", "Requests being decoded.", value=engine.num_running
        )
        yield GaugeMetricFamily(
            "aerie:verifier_requests_waiting",
            "Requests queued for a decoding slot.",
            value=engine.num_waiting,
        )
        if engine.thread_governor is not None:
            yield GaugeMetricFamily(
                "aerie:verifier_torch_threads",
                "Torch threads the engine decodes on: fewer while other processes keep a core busy.",
                value=engine.thread_governor.threads,
            )
        yield counter_by(
            "aerie:verifier_requests_finished",
            "Requests the engine let go of, by reason: stop, length, error, or cancelled "
            "(the caller went away or passed its deadline).",
            "reason",
            totals.ended,
        )
        yield CounterMetricFamily(
            "aerie:verifier_prompt_tokens",
            "Prompt tokens of the requests prefilled, those the prefix cache held included.",
            value=totals.prompt_tokens,
        )
        if engine.prefix_cache is not None:
            prefix_cache = engine.prefix_cache
            yield CounterMetricFamily(
                "aerie:verifier_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries).",
                value=prefix_cache.queried_tokens,
            )
            yield CounterMetricFamily(
                "aerie:verifier_prefix_cache_hits",
                "Prompt tokens the prefix cache held, and that were not prefilled again.",
                value=prefix_cache.hit_tokens,
            )
            yield GaugeMetricFamily(
                "aerie:verifier_prefix_cache_bytes",
                "Bytes of keys, values and drafter features the prefix cache holds "
                "(at most AERIE_PREFIX_CACHE_MB).",
                value=prefix_cache.nbytes,
            )
        yield CounterMetricFamily(
            "aerie:verifier_generation_tokens", "Tokens generated.", value=totals.generation_tokens
        )
        yield from _pace_guard_metrics(engine)
        yield CounterMetricFamily(
            "aerie:verifier_drafter_failures",
            "Drafter failures (unreachable, too slow, bad tree); each pauses speculation "
            "for AERIE_DRAFTER_RETRY_AFTER_S.",
            value=engine.breaker.failures,
        )
        yield CounterMetricFamily(
            "aerie:verifier_drafter_fallbacks",
            "Speculative requests that decoded some or all of their tokens without the drafter.",
            value=totals.drafter_fallbacks,
        )
        yield CounterMetricFamily(
            "aerie:verifier_speculation_dropped",
            "Speculative requests that decoded the rest plainly because speculation measured "
            "slower than plain decoding (AERIE_DROP_SLOW_SPECULATION).",
            value=totals.speculation_dropped,
        )
        yield CounterMetricFamily(
            "aerie:verifier_speculation_skipped",
            "Speculative requests that decoded plainly from the start because recent requests' "
            "speculation measured slower than plain decoding (AERIE_DROP_SLOW_SPECULATION).",
            value=totals.speculation_skipped,
        )
        yield CounterMetricFamily(
            "aerie:verifier_speculation_paused_steps",
            "Plain steps that speculative requests took beside others, their speculation paused "
            "because the batched plain step measured faster (AERIE_DROP_SLOW_SPECULATION).",
            value=totals.speculation_paused_steps,
        )
        spec = totals.speculative
        yield CounterMetricFamily(
            "aerie:verifier_spec_decode_num_drafts",
            "Verification steps that checked a draft tree.",
            value=spec.drafts,
        )
        yield CounterMetricFamily(
            "aerie:verifier_spec_decode_num_draft_tokens", "Draft tokens verified.", value=spec.draft_tokens
        )
        yield CounterMetricFamily(
            "aerie:verifier_spec_decode_num_accepted_tokens",
            "Draft tokens accepted.",
            value=spec.accepted_tokens,
        )
        for name, value, what in (
            ("draft", spec.draft_seconds, "the drafter's own work on the draft trees"),
            ("hop", spec.hop_seconds, "getting features to the drafter and trees back (gRPC, serialisation)"),
            ("verify", spec.verify_seconds, "the target's tree forwards, acceptance and cache trims"),
        ):
            yield CounterMetricFamily(
                f"aerie:verifier_spec_decode_{name}_seconds",
                f"Seconds of speculative steps spent on {what}.",
                value=value,
            )
        per_position = counter_by(
            "aerie:verifier_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0 = the first drafted token).",
            "position",
            {str(position): count for position, count in enumerate(list(spec.accepted_per_position))},
        )
        yield per_position
        # A drafter in this process (AERIE_DRAFTER_MODE=inprocess): what its context branch
        # adds, as the drafter service exports it.
        context = getattr(engine.drafter_factory, "context_counts", None)
        if context is not None:
            yield CounterMetricFamily(
                "aerie:verifier_drafter_context_draft_tokens",
                "Tree nodes only the in-process drafter's context branch proposed "
                "(AERIE_DRAFT_TREE_CONTEXT_NGRAM).",
                value=context.drafted,
            )
            yield CounterMetricFamily(
                "aerie:verifier_drafter_context_accepted_tokens",
                "Of those, accepted by verification.",
                value=context.accepted,
            )


def _pace_guard_metrics(engine: Engine) -> Iterator[Metric]:
    """What the pace guard measured and judges speculation by (speculative.PaceGuard)."""
    guard = engine.pace_guard
    if guard is None:
        return
    plain = GaugeMetricFamily(
        "aerie:verifier_pace_plain_step_seconds",
        "A plain decoding step, by the requests batched in it, as the pace guard measured it "
        "(an exponential average).",
        labels=["requests"],
    )
    for requests, seconds in sorted(dict(guard.plain_batch_s).items()):  # a copy: the engine writes it
        plain.add_metric([str(requests)], seconds)
    yield plain
    if guard.speculative_step_s is not None:
        yield GaugeMetricFamily(
            "aerie:verifier_pace_speculative_step_seconds",
            "A verification step with its drafting, as the pace guard measured it (an exponential average).",
            value=guard.speculative_step_s,
        )
        yield GaugeMetricFamily(
            "aerie:verifier_pace_speculative_step_tokens",
            "The tokens a verification step yields, as the pace guard measured it (an exponential average).",
            value=guard.speculative_step_tokens,
        )
