"""Prometheus metrics of a gRPC service, served on their own HTTP port (gRPC has no
/metrics). Each service writes a collector that reads its own counts when Prometheus
scrapes; each registry is built for one collector, so tests can run several services in
one process."""

from __future__ import annotations

from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def start_metrics_server(collector: Collector, host: str, port: int) -> WSGIServer | None:
    """Serve ``collector`` on http://host:port/metrics from a daemon thread
    (prometheus_client's own server); port 0: none. Returns the server, for shutdown()."""
    if not port:
        return None
    server, _ = start_http_server(port, host, registry=registry_for(collector))
    return server


def counter_by(name: str, documentation: str, label: str, counts: Mapping[str, float]) -> CounterMetricFamily:
    """A counter with one series per value of ``label``: ``counts`` maps each to its count."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family
