"""Drafter configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from aerie_common.settings import DraftTreeSettings, ModelSettings, ServiceSettings


class DrafterSettings(ServiceSettings, ModelSettings, DraftTreeSettings):
    drafter_host: str = "127.0.0.1"
    drafter_port: int = 50052
    # A trained EAGLE-3 / 3.1 head directory (config.json + safetensors). Empty: the head
    # shipped for a built-in target, else an untrained head (exact output, no speed-up);
    # "untrained" asks for the untrained head outright (benchmarks).
    drafter_head: str = ""
    drafter_eagle_version: str = "3.1"  # architecture of the untrained fallback head
    # Concurrent DraftSession streams; each holds a small KV cache for its request.
    drafter_max_sessions: int = 64
    # Prometheus metrics on http://AERIE_DRAFTER_HOST:PORT/metrics; 0 turns them off.
    drafter_metrics_port: int = 0
