"""The drafter's Prometheus metrics (served by aerie_common.metrics).

Read from the servicer's own counts when Prometheus scrapes, so GetInfo and /metrics never
disagree; vLLM-style ``aerie:`` names with a ``drafter_`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator

from aerie_common.metrics import counter_by
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aerie_drafter.server import DrafterServicer


class SessionCollector(Collector):
    def __init__(self, servicer: DrafterServicer):
        self.servicer = servicer

    def collect(self) -> Iterator[Metric]:
        servicer = self.servicer
        yield GaugeMetricFamily(
            "aerie:drafter_sessions_live",
            "DraftSession streams open, each holding its request's draft KV cache.",
            value=servicer.live_sessions,
        )
        if servicer.thread_governor is not None:
            yield GaugeMetricFamily(
                "aerie:drafter_torch_threads",
                "Torch threads the drafter drafts on: fewer while other processes keep a core busy.",
                value=servicer.thread_governor.threads,
            )
        yield GaugeMetricFamily(
            "aerie:drafter_sessions_max",
            "Sessions allowed at once (AERIE_DRAFTER_MAX_SESSIONS).",
            value=servicer.max_sessions,
        )
        yield CounterMetricFamily(
            "aerie:drafter_sessions", "DraftSession streams opened.", value=servicer.sessions_total
        )
        yield counter_by(
            "aerie:drafter_sessions_closed",
            "Sessions freed, by reason: ended (the request stream ended: the verifier closed it "
            "or hung up), cancelled (the call was cancelled mid-draft: a hang-up, a passed "
            "deadline, the drafter stopping), invalid (a protocol error) or error.",
            "reason",
            servicer.sessions_closed,
        )
        yield CounterMetricFamily(
            "aerie:drafter_sessions_rejected",
            "Sessions refused with RESOURCE_EXHAUSTED because the drafter was at its limit.",
            value=servicer.sessions_rejected,
        )
        yield CounterMetricFamily("aerie:drafter_trees", "Draft trees proposed.", value=servicer.trees_total)
        yield CounterMetricFamily(
            "aerie:drafter_context_draft_tokens",
            "Tree nodes only the context branch proposed (AERIE_DRAFT_TREE_CONTEXT_NGRAM).",
            value=servicer.context_counts.drafted,
        )
        yield CounterMetricFamily(
            "aerie:drafter_context_accepted_tokens",
            "Of those, the ones the verifier accepted.",
            value=servicer.context_counts.accepted,
        )
