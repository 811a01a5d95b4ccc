"""Gateway configuration, read from ``AERIE_``-prefixed environment variables."""

from __future__ import annotations

from typing import Literal

from aerie_common.memory_limits import MAX_ANSWER_TOKENS
from aerie_common.settings import ServiceSettings
from pydantic import Field


class GatewaySettings(ServiceSettings):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    # Comma-separated bearer keys (AERIE_API_KEYS), each allowed every namespace; and a
    # JSON or YAML file of keys scoped to namespaces (see auth.py). No key at all turns
    # authentication off.
    api_keys: str = ""
    api_keys_file: str = ""
    # Whether /metrics needs a key too (any valid key); /health and /ready are always open.
    metrics_require_key: bool = False
    # Per-key token bucket (per client address when authentication is off), in Redis:
    # requests per second (0: no limit) and bucket size (0: one second's worth, at least 1).
    # The keys file can set both per key. With Redis unreachable, requests are let through.
    rate_limit_rps: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=0, ge=0)
    # Request body limits (400 past them). Ingest gets more room: the memory service takes
    # up to 64 documents of 20,000 characters, 5 MB of UTF-8 at most plus JSON.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1)
    max_ingest_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    # The name clients must send as `model`; empty: the verifier's GetModelInfo model_id.
    served_model_name: str = ""
    # A reasoning model's thinking goes to `reasoning_content`, apart from the answer
    # (vLLM's reasoning parsers): "qwen3" (a <think> block may open the output) or
    # "deepseek_r1" (the output starts inside one); empty: all output is content.
    reasoning_parser: Literal["", "qwen3", "deepseek_r1"] = ""
    # Requests in flight beyond this get 429 with Retry-After.
    max_concurrent_requests: int = 64
    # Deadline for a whole Generate call, streaming included.
    grpc_timeout_s: float = 600.0
    # Deadline for each readiness probe and the GetModelInfo lookup.
    health_timeout_s: float = 2.0
    # Memory (MEMO) in chat: the deadline of each memory call (HTTP /memory/* and chat's
    # questions to the memory), and of chat's whole memory protocol; past it, chat answers
    # without memory and says so.
    memory_timeout_s: float = 60.0
    memory_chat_budget_s: float = 120.0
    memory_max_turns: int = 6  # memory questions per chat turn in the three-stage protocol
    # Tokens the memory may answer an entity's passage question with ("What do you know
    # about X?"; its other questions get the memory service's default): a passage holds up
    # to what the memory's training example keeps less its question (AERIE_MEMORY_MAX_SEQ_TOKENS,
    # 160), so that much never cuts one. Cut at 48 tokens a passage lost the facts after its
    # third sentence; at 128, a glaciologist's 131-token passage the end of its last
    # ("... the Halden Medal for"). 0: the memory service's default; above what the memory
    # service answers with, every passage question would be refused.
    memory_passage_max_tokens: int = Field(default=160, ge=0, le=MAX_ANSWER_TOKENS)

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]
