"""Gateway configuration, read from ``AERIE_``-prefixed environment variables."""

from __future__ import annotations

from aerie_common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    # Comma-separated bearer keys (AERIE_API_KEYS); empty turns authentication off.
    api_keys: str = ""
    # The name clients must send as `model`; empty: the verifier's GetModelInfo model_id.
    served_model_name: str = ""
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

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]
