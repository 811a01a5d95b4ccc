"""Drafter configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from typing import Literal

from aerie_common.settings import DraftTreeSettings, ModelSettings, ServiceSettings


class DrafterSettings(ServiceSettings, ModelSettings, DraftTreeSettings):
    drafter_host: str = "127.0.0.1"
    drafter_port: int = 50052
    # A trained EAGLE-3 / 3.1 head directory (config.json + safetensors). Empty: the head
    # shipped for a built-in target, else an untrained head (exact output, no speed-up);
    # "untrained" asks for the untrained head outright (benchmarks).
    drafter_head: str = ""
    drafter_eagle_version: str = "3.1"  # architecture of the untrained fallback head
    # The head's dtype, apart from the target's (AERIE_DTYPE): "auto" is bf16 on a GPU; on
    # a CPU where the packed kernel runs (aerie_common.packed_weights), fp32 over copies of
    # its weights rounded to 8-bit blocks (Q8_0; "int8" asks for it by name), else bf16
    # with native bf16 (AVX512-BF16, AMX), else fp32. Drafts only propose, so this never
    # changes the output (loading.head_for_drafting).
    drafter_dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    # Concurrent DraftSession streams; each holds a small KV cache for its request.
    drafter_max_sessions: int = 64
    # Prometheus metrics on http://AERIE_DRAFTER_HOST:PORT/metrics; 0 turns them off.
    drafter_metrics_port: int = 0
