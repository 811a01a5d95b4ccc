"""The Redis client every service uses."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff


def connect(redis_url: str, **options: Any) -> aioredis.Redis:
    """A client that retries a command on a lost connection, briefly: after Redis restarts,
    every pooled connection fails once before it reconnects, and ``from_url`` clients do not
    retry unless told to (plain ``Redis()`` ones do)."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3)
    return aioredis.from_url(redis_url, retry=retry, **options)
