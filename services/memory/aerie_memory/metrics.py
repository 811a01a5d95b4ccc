"""The memory service's Prometheus metrics (served by aerie_common.metrics).

Queries and ingests are this process's counts. Jobs are run by the worker (a child process,
restarted when it dies, or several), so what they did is counted in Redis, where every
replica reads the same figures: take one replica's (or the max over them), not their sum. vLLM-style
``aerie:`` names with a ``memory_`` prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from aerie_common.metrics import counter_by
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from aerie_memory.store import GROUP, JOB_METRICS, STREAM

if TYPE_CHECKING:
    from aerie_memory.__main__ import MemoryServicer

log = logging.getLogger(__name__)


class MemoryCollector(Collector):
    def __init__(self, servicer: MemoryServicer, client: redis.Redis):
        self.servicer = servicer
        self.client = client  # a plain client: Prometheus scrapes from a thread of its own

    def collect(self) -> Iterator[Metric]:
        servicer = self.servicer
        yield counter_by(
            "aerie:memory_queries",
            "Questions the memory model was asked (POST /memory/query, chats with memory), by "
            "whether it knew the answer.",
            "knows",
            {str(knows).lower(): count for knows, count in servicer.queries.items()},
        )
        yield SummaryMetricFamily(
            "aerie:memory_query_seconds",
            "Seconds a question took, loading its namespace's memory model included.",
            count_value=sum(servicer.queries.values()),
            sum_value=servicer.query_seconds,
        )
        yield counter_by(
            "aerie:memory_documents_ingested",
            "Documents sent to be learned, by status: accepted (a job learns them) or duplicate.",
            "status",
            servicer.documents_ingested,
        )
        yield GaugeMetricFamily(
            "aerie:memory_models_loaded",
            "Namespaces' memory models held loaded (at most AERIE_MEMORY_LOADED_MODELS).",
            value=len(servicer.cache),
        )
        try:
            yield from self._jobs()
        except redis.RedisError as error:  # the other metrics still tell something
            log.warning("job metrics left out: Redis did not answer (%s)", error)

    def _jobs(self) -> Iterator[Metric]:
        group = next((g for g in self.client.xinfo_groups(STREAM) if g["name"] == GROUP.encode()), None)
        queued = GaugeMetricFamily(
            "aerie:memory_jobs_waiting",
            "Jobs no worker has taken yet (queued), and jobs a worker has taken and not finished "
            "(running, or left by a worker that died until another reclaims them).",
            labels=["state"],
        )
        queued.add_metric(["queued"], (group or {}).get("lag") or 0)
        queued.add_metric(["running"], (group or {}).get("pending") or 0)
        yield queued
        finished = CounterMetricFamily(
            "aerie:memory_jobs_finished",
            "Jobs finished, by kind (ingest, forget, delete_namespace) and status (succeeded, failed).",
            labels=["kind", "status"],
        )
        seconds = SummaryMetricFamily(
            "aerie:memory_job_seconds",
            "Seconds from a job's queueing to its end, by kind and status.",
            labels=["kind", "status"],
        )
        counts = {k.decode(): float(v) for k, v in self.client.hgetall(JOB_METRICS).items()}
        for field, count in sorted(counts.items()):
            kind, status, measure = field.split(":")
            if measure == "count":
                finished.add_metric([kind, status], count)
                seconds.add_metric([kind, status], count, counts.get(f"{kind}:{status}:seconds", 0.0))
        yield finished
        yield seconds
