"""Prometheus metrics with vLLM-style names (``aerie:`` instead of ``vllm:``), so dashboards
built for vLLM need little more than a prefix change.

Each app owns its registry: tests build several apps in one process, and the process-wide
default registry would refuse the second set of names.
"""

from __future__ import annotations

import time

from aerie_proto.v1 import verifier_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latencies of a CPU-speed LLM range from milliseconds per token to minutes per request.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 320)
INTER_TOKEN_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1,
    2.5,
    5,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 240, 480, 960)

FINISH_REASONS = {
    verifier_pb2.FINISH_REASON_STOP: "stop",
    verifier_pb2.FINISH_REASON_LENGTH: "length",
}


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.time_to_first_token = Histogram(
            "aerie:time_to_first_token_seconds",
            "Seconds from admission to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "aerie:inter_token_latency_seconds",
            "Seconds between generated tokens (tokens arriving together share the gap).",
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "aerie:e2e_request_latency_seconds",
            "Seconds from admission to the last token of requests that finished.",
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.memory_stage_seconds = Histogram(
            "aerie:memory_stage_seconds",
            "Seconds each stage of the memory protocol took before a chat with memory was generated.",
            ["stage"],
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.memory_questions = Counter(
            "aerie:memory_questions",
            "Questions chats with memory asked the memory model; cached: answered from its latest answers.",
            ["cached"],
            registry=registry,
        )
        self.prompt_tokens = Counter("aerie:prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.generation_tokens = Counter("aerie:generation_tokens", "Tokens generated.", registry=registry)
        self.request_success = Counter(
            "aerie:request_success",
            "Requests that finished, by finish reason.",
            ["finished_reason"],
            registry=registry,
        )
        for reason in FINISH_REASONS.values():
            # Export zeros from the start, so rate() works before the first request of each kind.
            self.request_success.labels(finished_reason=reason)
        self.num_requests_running = Gauge(
            "aerie:num_requests_running", "Requests producing tokens.", registry=registry
        )
        self.num_requests_waiting = Gauge(
            "aerie:num_requests_waiting",
            "Requests admitted that have no first token yet.",
            registry=registry,
        )
        self.spec_decode_num_drafts = Counter(
            "aerie:spec_decode_num_drafts", "Verification steps that checked a draft.", registry=registry
        )
        self.spec_decode_num_draft_tokens = Counter(
            "aerie:spec_decode_num_draft_tokens", "Draft tokens proposed.", registry=registry
        )
        self.spec_decode_num_accepted_tokens = Counter(
            "aerie:spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=registry
        )
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            "aerie:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0 = the first drafted token).",
            ["position"],
            registry=registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def track_request(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Follows one Generate call: feed it every response, and close it however the call ends."""

    def __init__(self, metrics: GatewayMetrics):
        self._metrics = metrics
        self._started_at = time.perf_counter()
        self._last_token_at: float | None = None
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._closed = False
        metrics.num_requests_waiting.inc()

    def observe(self, response: verifier_pb2.GenerateResponse) -> None:
        metrics = self._metrics
        now = time.perf_counter()
        new_tokens = max(response.completion_tokens - self._completion_tokens, 0)
        if new_tokens:
            if self._last_token_at is None:
                metrics.time_to_first_token.observe(now - self._started_at)
                metrics.num_requests_waiting.dec()
                metrics.num_requests_running.inc()
            else:
                # A speculative step delivers several tokens at once; each gets an equal share.
                per_token = (now - self._last_token_at) / new_tokens
                for _ in range(new_tokens):
                    metrics.inter_token_latency.observe(per_token)
            self._last_token_at = now
            self._completion_tokens = response.completion_tokens
        self._prompt_tokens = response.prompt_tokens or self._prompt_tokens

        finish_reason = FINISH_REASONS.get(response.finish_reason)
        if finish_reason is None:
            return
        metrics.e2e_request_latency.observe(now - self._started_at)
        metrics.request_success.labels(finished_reason=finish_reason).inc()
        if response.HasField("speculative"):
            stats = response.speculative
            metrics.spec_decode_num_drafts.inc(stats.drafts)
            metrics.spec_decode_num_draft_tokens.inc(stats.draft_tokens)
            metrics.spec_decode_num_accepted_tokens.inc(stats.accepted_tokens)
            for position, accepted in enumerate(stats.accepted_per_position):
                metrics.spec_decode_num_accepted_tokens_per_pos.labels(position=str(position)).inc(accepted)

    def close(self) -> None:
        """Count the tokens processed (finished or not) and leave the gauges. Idempotent."""
        if self._closed:
            return
        self._closed = True
        metrics = self._metrics
        if self._last_token_at is None:
            metrics.num_requests_waiting.dec()
        else:
            metrics.num_requests_running.dec()
        metrics.prompt_tokens.inc(self._prompt_tokens)
        metrics.generation_tokens.inc(self._completion_tokens)
