"""Verifier configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from typing import Literal

from aerie_common.sampling_limits import SamplingDefaultField, check_sampling_defaults
from aerie_common.settings import DraftTreeSettings, ModelSettings, ServiceSettings
from pydantic import Field, field_validator


class VerifierSettings(ServiceSettings, ModelSettings, DraftTreeSettings):
    verifier_host: str = "127.0.0.1"
    verifier_port: int = 50051
    # Requests decoded concurrently (each with its own KV cache); more wait in a bounded
    # queue, and past that the verifier answers RESOURCE_EXHAUSTED (the gateway's 429).
    max_running_requests: int = 8
    max_waiting_requests: int = 64
    # Keys and values of recent requests kept for later ones that begin with the same tokens
    # (a chat's next turn, the other choices of n > 1, a shared system prompt), in MiB of the
    # verifier's device memory; 0 turns the prefix cache off (aerie_verifier/prefix_cache.py).
    prefix_cache_mb: int = 1024
    # Beside other running requests, a prompt is prefilled this many tokens a round, so that
    # their streams do not stall behind it; 0 (the default) prefills every prompt whole. A
    # round runs the chunk and the other requests' steps one after another, not batched, so
    # it costs: on a 2-core CPU, beside a stream, an 1800-token prompt in chunks of 512 cut
    # the stream's longest stall from 2.4 to 0.9 s, and made the prompt's first token 27%
    # later and the stream 10% slower (bench.prefill_stall).
    prefill_chunk_tokens: int = 0
    # Where draft trees come from: "grpc" (the drafter service at AERIE_DRAFTER_ADDR),
    # "inprocess" (the EAGLE head inside this process, configured by the same AERIE_DRAFTER_*
    # variables as the drafter service) or "off".
    drafter_mode: Literal["grpc", "inprocess", "off"] = "grpc"
    # A drafter slower than this for one tree is dropped for that request.
    drafter_step_timeout_s: float = 2.0
    # After a drafter failure, requests decode without speculation for this long.
    drafter_retry_after_s: float = 10.0
    # A request whose speculation measures slower than plain decoding over its first 8
    # verification steps decodes the rest plainly (a weak head, or a CPU where verifying a
    # tree costs about two plain steps); and beside other requests, speculation pauses for
    # the rounds where joining their batched plain step decodes more tokens a second.
    # false: speculate whatever it costs.
    drop_slow_speculation: bool = True
    # With drop_slow_speculation, once the last 3 requests that speculated all measured
    # slower than plain decoding, new requests decode plainly from the start but
    # for one in this many, which speculates as a probe; 1: every request probes.
    speculation_probe_every: int = Field(default=8, ge=1)
    # On the CPU, multiply a few rows by linear layers whose fp32 weights are exactly Q4_1,
    # Q8_0 or bf16 values (a GGUF's, a bf16 checkpoint's) from packed copies of them: the
    # same weights, a fifth to a half of the bytes read (aerie_common/packed_weights.py).
    packed_weights: bool = True
    # Prometheus metrics on http://AERIE_VERIFIER_HOST:PORT/metrics; 0 turns them off.
    verifier_metrics_port: int = 0
    # What a request that leaves temperature, top_p, top_k, min_p or repetition_penalty out is
    # decoded with: "auto", those the model's generation_config.json recommends (as vLLM's
    # --generation-config auto and SGLang do; Llama 3.1 Instruct's: temperature 0.6, top_p
    # 0.9), OpenAI's defaults for the rest; "none", OpenAI's for all.
    generation_config: Literal["auto", "none"] = "auto"
    # Defaults that win over both, as a JSON object: '{"temperature": 0.2, "top_p": 0.9}'.
    sampling_defaults: dict[SamplingDefaultField, float] = {}

    @field_validator("sampling_defaults")
    @classmethod
    def _sampling_defaults_in_range(cls, defaults: dict[str, float]) -> dict[str, float]:
        return check_sampling_defaults(defaults)
