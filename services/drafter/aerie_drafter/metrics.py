"""The drafter's Prometheus metrics, served on their own HTTP port (gRPC has no /metrics).

Read from the servicer's own counts when Prometheus scrapes, so GetInfo and /metrics never
disagree; vLLM-style ``aerie:`` names with a ``drafter_`` prefix. Each registry is built
for one servicer, so tests can run several in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
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
        yield GaugeMetricFamily(
            "aerie:drafter_sessions_max",
            "Sessions allowed at once (AERIE_DRAFTER_MAX_SESSIONS).",
            value=servicer.max_sessions,
        )
        yield CounterMetricFamily(
            "aerie:drafter_sessions", "DraftSession streams opened.", value=servicer.sessions_total
        )
        closed = CounterMetricFamily(
            "aerie:drafter_sessions_closed",
            "Sessions freed, by reason: ended (the request stream ended: the verifier closed it "
            "or hung up), cancelled (the call was cancelled mid-draft: a hang-up, a passed "
            "deadline, the drafter stopping), invalid (a protocol error) or error.",
            labels=["reason"],
        )
        for reason, count in servicer.sessions_closed.items():
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily(
            "aerie:drafter_sessions_rejected",
            "Sessions refused with RESOURCE_EXHAUSTED because the drafter was at its limit.",
            value=servicer.sessions_rejected,
        )
        yield CounterMetricFamily("aerie:drafter_trees", "Draft trees proposed.", value=servicer.trees_total)


def drafter_registry(servicer: DrafterServicer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SessionCollector(servicer))
    return registry


def start_metrics_server(servicer: DrafterServicer, host: str, port: int) -> WSGIServer | None:
    """Serve the drafter's metrics on http://host:port/metrics from a daemon thread
    (prometheus_client's own server); port 0: none. Returns the server, for shutdown()."""
    if not port:
        return None
    server, _ = start_http_server(port, host, registry=drafter_registry(servicer))
    return server
