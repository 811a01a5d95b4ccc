"""Admission limits: the Redis token bucket (rate_limit.RateLimiter against a real
redis-server, then through the gateway: 429 with Retry-After, per key or per client
address), and request body size limits (400), declared or chunked, in process and over a
real socket."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
from aerie_gateway.app import create_app
from aerie_gateway.rate_limit import KEY_PREFIX, RateLimiter, bucket_name, bucket_shape
from aerie_gateway.settings import GatewaySettings
from aerie_memory.settings import MemorySettings

from tests.local_servers import free_port, start_redis, stop_redis
from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    asgi_client,
    assert_error,
    chat_body,
    gateway_fake_verifier,
    gateway_redis_url,
    served_over_http,
)

SLOW_RPS = 0.001  # a bucket that does not refill within a test
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def limiter(gateway_redis_url) -> AsyncIterator[RateLimiter]:  # noqa: F811
    limiter = RateLimiter(gateway_redis_url)
    yield limiter
    await limiter.close()


def fresh_bucket() -> str:
    return bucket_name("key", uuid.uuid4().bytes)


async def test_bucket_lets_a_burst_through_then_says_how_long_to_wait(limiter):
    bucket = fresh_bucket()
    waits = [await limiter.wait_s(bucket, 0.5, 3) for _ in range(4)]
    assert waits[:3] == [0, 0, 0]
    assert 1.9 < waits[3] <= 2.0  # one token per 2 s


async def test_bucket_refills_at_the_rate(limiter):
    bucket = fresh_bucket()
    assert await limiter.wait_s(bucket, 20, 1) == 0
    wait_s = await limiter.wait_s(bucket, 20, 1)
    assert 0 < wait_s <= 0.05
    await asyncio.sleep(wait_s)  # the limiter's own answer, by Redis' clock
    assert await limiter.wait_s(bucket, 20, 1) == 0


@pytest.mark.parametrize(
    ("defaults", "own", "shape"),
    [
        ((2.5, 0), (None, None), (2.5, 3)),  # a size of 0: one second's worth, rounded up
        ((0.2, 0), (None, None), (0.2, 1)),  # at least 1
        ((2.5, 10), (None, None), (2.5, 10)),
        ((2.5, 10), (100.0, None), (100.0, 10)),
        ((2.5, 10), (0.0, None), (0.0, 10)),  # a key's own 0: not limited
        ((0.0, 0), (4.0, 8), (4.0, 8)),
    ],
)
def test_bucket_shape_takes_a_keys_own_limits_over_the_defaults(defaults, own, shape):
    assert bucket_shape(*defaults, *own) == shape


async def test_zero_rate_means_no_limit(limiter):
    bucket = fresh_bucket()
    assert [await limiter.wait_s(bucket, 0, 1) for _ in range(5)] == [0] * 5


async def test_buckets_are_atomic_across_replicas(gateway_redis_url, caplog):  # noqa: F811
    """Two limiters (two gateway replicas) racing for one bucket of 10 tokens."""
    # A generous timeout: a limiter failing open here would let everything through.
    replicas = [RateLimiter(gateway_redis_url, timeout_s=10), RateLimiter(gateway_redis_url, timeout_s=10)]
    bucket = fresh_bucket()
    try:
        with caplog.at_level(logging.WARNING, logger="aerie_gateway.rate_limit"):
            waits = await asyncio.gather(*(replicas[i % 2].wait_s(bucket, SLOW_RPS, 10) for i in range(40)))
    finally:
        await asyncio.gather(*(replica.close() for replica in replicas))
    assert not [r for r in caplog.records if r.name == "aerie_gateway.rate_limit"]
    assert sum(wait == 0 for wait in waits) == 10


async def test_redis_keys_name_a_digest_and_expire(limiter, gateway_redis_url):  # noqa: F811
    api_key = f"sk-{uuid.uuid4().hex}"
    bucket = bucket_name("key", api_key)
    await limiter.wait_s(bucket, 1, 5)
    client = redis.Redis.from_url(gateway_redis_url)
    try:
        names = [name.decode() for name in client.scan_iter(match=f"{KEY_PREFIX}*")]
        ttl_ms = client.pttl(bucket)
    finally:
        client.close()
    assert bucket in names and all(api_key not in name for name in names)
    assert 0 < ttl_ms <= 6000  # full again after 5 s; the key goes then


async def test_redis_down_fails_open_with_one_warning_and_limits_resume(caplog):
    port = free_port()
    limiter = RateLimiter(f"redis://127.0.0.1:{port}/0")
    bucket = fresh_bucket()
    process = None
    try:
        with caplog.at_level(logging.WARNING, logger="aerie_gateway.rate_limit"):
            waits = [await limiter.wait_s(bucket, SLOW_RPS, 1) for _ in range(5)]
        assert waits == [0] * 5
        warnings = [r for r in caplog.records if r.name == "aerie_gateway.rate_limit"]
        assert len(warnings) == 1 and "rate limits are off" in warnings[0].getMessage()

        process = start_redis(port)
        deadline = time.monotonic() + 30
        while await limiter.wait_s(bucket, SLOW_RPS, 1) == 0:
            assert time.monotonic() < deadline, "rate limits did not come back with Redis"
            await asyncio.sleep(0.1)
    finally:
        await limiter.close()
        if process is not None:
            stop_redis(process)


@pytest.fixture
def make_app(gateway_fake_verifier, gateway_redis_url, tmp_path):  # noqa: F811
    _, addr = gateway_fake_verifier

    def make(keys: list[dict] | None = None, **overrides):
        fields = dict(
            verifier_addr=addr,
            drafter_addr=addr,
            memory_addr=addr,
            redis_url=gateway_redis_url,
            grpc_timeout_s=30.0,
        )
        if keys is not None:
            path = tmp_path / "keys.json"
            path.write_text(json.dumps({"keys": keys}))
            fields["api_keys_file"] = str(path)
        return create_app(GatewaySettings(**{**fields, **overrides}))

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_each_key_has_its_own_bucket_and_its_own_limits(make_app):
    # Fresh keys each run: buckets live in the session's shared Redis.
    slow, fast = f"sk-{uuid.uuid4().hex}", f"sk-{uuid.uuid4().hex}"
    keys = [
        {"key": slow, "namespaces": ["*"]},
        {"key": fast, "namespaces": ["*"], "rate_limit_rps": 1000, "rate_limit_burst": 50},
    ]
    app = make_app(keys, rate_limit_rps=SLOW_RPS, rate_limit_burst=2)
    async with asgi_client(app) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=chat_body(), headers=bearer(slow))).status_code
            for _ in range(2)
        ]
        refused = await client.get("/v1/models", headers=bearer(slow))
        others = [(await client.get("/v1/models", headers=bearer(fast))).status_code for _ in range(5)]
        probes = [(await client.get(path)).status_code for path in ("/health", "/ready", "/metrics")]
    # admitted_key is a dependency of both the router and the route: one token per request
    assert statuses == [200, 200]
    error = assert_error(refused, 429, "rate_limit_error")
    assert error["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == str(math.ceil(1 / SLOW_RPS))
    assert others == [200] * 5
    assert probes == [200, 200, 200]  # never rate limited


async def test_memory_routes_are_rate_limited_too(make_app):
    key = f"sk-{uuid.uuid4().hex}"
    app = make_app([{"key": key, "namespaces": ["ns"], "rate_limit_rps": SLOW_RPS, "rate_limit_burst": 1}])
    async with asgi_client(app) as client:
        first = await client.get("/memory/jobs/job-1", headers=bearer(key))
        second = await client.get("/memory/jobs/job-1", headers=bearer(key))
    assert first.status_code == 503  # admitted; the fake verifier serves no memory
    assert_error(second, 429, "rate_limit_error")


async def test_without_auth_each_client_address_has_a_bucket(make_app):
    app = make_app(rate_limit_rps=SLOW_RPS, rate_limit_burst=1)
    addresses = [f"10.{i}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}" for i in range(2)]
    statuses = {}
    async with app.router.lifespan_context(app):
        for address in addresses:
            transport = httpx.ASGITransport(app=app, client=(address, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                statuses[address] = [(await client.get("/v1/models")).status_code for _ in range(2)]
    assert list(statuses.values()) == [[200, 429], [200, 429]]


async def test_with_redis_down_requests_go_through(make_app):
    app = make_app(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_rps=SLOW_RPS, rate_limit_burst=1
    )
    async with asgi_client(app) as client:
        statuses = [(await client.get("/v1/models")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]


def test_ingest_limit_fits_the_memory_services_documents():
    memory = MemorySettings()
    utf8_worst_case = memory.memory_max_documents * memory.memory_max_document_chars * 4
    assert GatewaySettings().max_ingest_request_bytes > utf8_worst_case
    assert GatewaySettings().max_request_bytes >= 1024 * 1024


def padded_chat(size: int) -> bytes:
    """A valid chat body of exactly ``size`` bytes."""
    body = chat_body("")
    empty = len(json.dumps(body).encode())
    body["messages"][0]["content"] = "x" * (size - empty)
    encoded = json.dumps(body).encode()
    assert len(encoded) == size
    return encoded


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_is_400_and_never_reaches_the_backend(
    make_app,
    gateway_fake_verifier,  # noqa: F811
    chunked,
):
    fake, _ = gateway_fake_verifier
    app = make_app(max_request_bytes=5000)
    before = len(fake.requests)
    async with asgi_client(app) as client:
        fits = await client.post("/v1/chat/completions", content=padded_chat(5000), headers=JSON)
        over = padded_chat(5001)
        too_big = await client.post(
            "/v1/chat/completions",
            content=chunks(over) if chunked else over,
            headers=JSON,
        )
    assert fits.status_code == 200, fits.text
    error = assert_error(too_big, 400, "invalid_request_error")
    assert error["code"] == "request_too_large" and "5000 bytes" in error["message"]
    assert len(fake.requests) == before + 1  # only the one that fit


async def test_a_chunked_body_within_the_limit_is_read_whole(make_app):
    async with asgi_client(make_app(max_request_bytes=5000)) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=chunks(padded_chat(4999), size=7),
            headers=JSON,
        )
    assert response.status_code == 200, response.text


async def test_ingest_has_its_own_larger_limit(make_app):
    documents = {"namespace": "ns", "documents": [{"id": "a", "text": "y" * 3000}]}
    async with asgi_client(make_app(max_request_bytes=1000, max_ingest_request_bytes=5000)) as client:
        ingest = await client.post("/memory/ingest", json=documents)
        query = await client.post("/memory/query", json={"namespace": "ns", "question": "q" * 1500})
        documents["documents"][0]["text"] = "y" * 6000
        big_ingest = await client.post("/memory/ingest", json=documents)
    assert ingest.status_code == 503  # past the body limit; the fake verifier serves no memory
    assert_error(query, 400, "invalid_request_error")
    assert_error(big_ingest, 400, "invalid_request_error")
    assert "1000 bytes" in query.text and "5000 bytes" in big_ingest.text


@pytest.fixture
def served_app(make_app) -> Iterator[str]:
    with served_over_http(make_app(max_request_bytes=5000)) as base_url:
        yield base_url


@pytest.mark.parametrize("chunked", [False, True])
def test_limit_over_a_real_socket(served_app, chunked):
    """uvicorn, with Content-Length and chunked: refused as soon as the limit is passed."""

    def body(size: int):
        data = padded_chat(size)
        return iter([data[i : i + 1000] for i in range(0, len(data), 1000)]) if chunked else data

    with httpx.Client(base_url=served_app, timeout=30) as client:
        fits = client.post("/v1/chat/completions", content=body(5000), headers=JSON)
        over = client.post("/v1/chat/completions", content=body(50_000), headers=JSON)
    assert fits.status_code == 200, fits.text
    assert over.status_code == 400 and over.json()["error"]["code"] == "request_too_large"
