"""Memory service configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from aerie_common.settings import ServiceSettings


class MemorySettings(ServiceSettings):
    memory_host: str = "127.0.0.1"
    memory_port: int = 50053
