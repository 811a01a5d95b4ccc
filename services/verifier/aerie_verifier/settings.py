"""Verifier configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from aerie_common.settings import ModelSettings, ServiceSettings


class VerifierSettings(ServiceSettings, ModelSettings):
    verifier_host: str = "127.0.0.1"
    verifier_port: int = 50051
    # Requests decoded concurrently (each with its own KV cache); more wait in a bounded
    # queue, and past that the verifier answers RESOURCE_EXHAUSTED (the gateway's 429).
    max_running_requests: int = 8
    max_waiting_requests: int = 64
