"""Drafter configuration (AERIE_-prefixed environment variables)."""

from __future__ import annotations

from aerie_common.settings import ServiceSettings


class DrafterSettings(ServiceSettings):
    drafter_host: str = "127.0.0.1"
    drafter_port: int = 50052
