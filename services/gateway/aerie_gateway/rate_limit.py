"""Per-caller rate limits: a token bucket per caller in Redis, shared by every gateway replica.

One Lua script refills and takes a token atomically, timed by Redis' own clock, so replicas
with skewed clocks still agree. A bucket's Redis key is named by a SHA-256 digest (of the
API key, or of the client address when authentication is off), never by the key itself,
and expires once it would be full again.

When Redis cannot be reached the limiter fails open: requests go through unlimited, one
warning is logged when Redis goes away and one line when it is back. Rate limiting protects
capacity; refusing every request because Redis is down would turn a Redis outage into a
full outage. For a second after a failure Redis is not asked again, so an unreachable
Redis host costs requests no connect timeouts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from redis.exceptions import RedisError

from .auth import ApiKey, AuthenticatedKey
from .errors import rate_limited

log = logging.getLogger(__name__)

KEY_PREFIX = "aerie:ratelimit:"
# Redis is asked again this long after a failure; until then requests go through.
REDIS_RETRY_S = 1.0
REDIS_TIMEOUT_S = 1.0

# KEYS[1]: the bucket. ARGV[1]: tokens per second; ARGV[2]: bucket size.
# Returns 0 when a token was taken, else the milliseconds until one will be there.
_TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait_ms
"""


def bucket_name(kind: str, identity: bytes | str) -> str:
    """The Redis key of a caller's bucket: ``kind`` ("key" or "addr") and a digest."""
    raw = identity if isinstance(identity, bytes) else identity.encode()
    return f"{KEY_PREFIX}{kind}:{hashlib.sha256(raw).hexdigest()}"


def bucket_shape(
    default_rps: float, default_burst: int, rps: float | None = None, burst: int | None = None
) -> tuple[float, int]:
    """(tokens per second, bucket size): a key's own values over the defaults; a size of 0
    means one second's worth, at least 1."""
    rps = default_rps if rps is None else rps
    return rps, burst or default_burst or max(1, math.ceil(rps))


class RateLimiter:
    def __init__(self, redis_url: str, timeout_s: float = REDIS_TIMEOUT_S):
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        self._take_token = self._redis.register_script(_TAKE_TOKEN)
        self._redis_down_since: float | None = None
        self._ask_redis_after = 0.0

    async def close(self) -> None:
        await self._redis.aclose()

    async def wait_s(self, bucket: str, rps: float, burst: int) -> float:
        """Take a token from ``bucket``: 0 when one was taken, else the seconds until one
        will be there. A limit of 0 tokens per second means no limit."""
        if rps <= 0 or time.monotonic() < self._ask_redis_after:
            return 0.0
        try:
            wait_ms = await self._take_token(keys=[bucket], args=[rps, burst])
        except (RedisError, OSError, TimeoutError) as err:
            self._ask_redis_after = time.monotonic() + REDIS_RETRY_S
            if self._redis_down_since is None:
                self._redis_down_since = time.monotonic()
                log.warning("rate limits are off until Redis answers again: %r", err)
            return 0.0
        if self._redis_down_since is not None:
            log.info(
                "Redis answers again after %.0fs; rate limits are back",
                time.monotonic() - self._redis_down_since,
            )
            self._redis_down_since = None
        return int(wait_ms) / 1000


async def admitted_key(request: Request, key: AuthenticatedKey) -> ApiKey:
    """FastAPI dependency: the caller's key (ANYONE without authentication), once it is
    within its rate limit (``app.state.rate_limiter``, None: no limits). FastAPI runs it
    once per request however many times a route depends on it."""
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is None:
        return key
    settings = request.app.state.settings
    rps, burst = bucket_shape(
        settings.rate_limit_rps, settings.rate_limit_burst, key.rate_limit_rps, key.rate_limit_burst
    )
    if request.app.state.keys.enabled:
        bucket = bucket_name("key", key.digest)
    else:
        bucket = bucket_name("addr", request.client.host if request.client else "")
    wait_s = await limiter.wait_s(bucket, rps, burst)
    if wait_s:
        retry_after_s = math.ceil(wait_s)
        raise rate_limited(
            f"Rate limit of {rps:g} requests per second reached; retry in {retry_after_s}s.",
            retry_after_s=retry_after_s,
        )
    return key


AdmittedKey = Annotated[ApiKey, Depends(admitted_key)]
