"""bench.load against a fake gateway (httpx.MockTransport): SSE parsing, failure kinds,
429 with Retry-After, the closed and open loops, statistics, and the RSS leak check on
real child processes."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from bench.chat_stream import stream_chat
from bench.load.client import ChatLoad, RequestRecord, closed_loop, open_loop
from bench.load.rss import RssSample, compare_rss, sample_rss, stack_name
from bench.load.stats import Percentiles, format_table, summarise

URL = "http://gateway.test"


def chunk(content: str | None = None, usage: int | None = None) -> str:
    body = {"id": "c", "object": "chat.completion.chunk", "choices": []}
    if content is not None:
        body["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    if usage is not None:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}
    return f"data: {json.dumps(body)}\n\n"


async def sse(*events: str, gap_s: float = 0.0, cut: bool = False):
    for event in events:
        yield event.encode()
        await asyncio.sleep(gap_s)
    if cut:
        raise httpx.ReadError("connection reset mid-stream")


def reply(*events: str, gap_s: float = 0.0, cut: bool = False) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=sse(*events, gap_s=gap_s, cut=cut)
    )


GOOD = (chunk(""), chunk("Hel"), chunk("lo"), chunk("!"), chunk(usage=3), "data: [DONE]\n\n")


async def chat_with(handler) -> object:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await stream_chat(client, f"{URL}/v1/chat/completions", {"stream": True})


async def test_a_complete_stream_is_timed_chunk_by_chunk():
    chat = await chat_with(lambda request: reply(*GOOD, gap_s=0.02))
    assert chat.ok and chat.done and chat.status == 200
    assert chat.completion_tokens == 3
    # The role-only first chunk carries no content: three content chunks, two gaps.
    assert len(chat.content_times_s) == 3
    assert chat.ttft_s == chat.content_times_s[0]
    assert len(chat.itl_s) == 2 and all(gap >= 0.015 for gap in chat.itl_s)
    assert chat.e2e_s >= chat.content_times_s[-1]


@pytest.mark.parametrize(
    ("events", "cut", "kind"),
    [
        (GOOD[:-1], False, "incomplete"),  # the stream ends before [DONE]
        (GOOD[:3], True, "transport_ReadError"),  # the connection drops mid-stream
        (
            (GOOD[1], 'data: {"error": {"message": "backend failed"}}\n\n', "data: [DONE]\n\n"),
            False,
            "stream_error",
        ),
        ((GOOD[1], "data: {not json\n\n", "data: [DONE]\n\n"), False, "bad_chunk"),
    ],
)
async def test_broken_streams_are_errors_of_their_kind(events, cut, kind):
    chat = await chat_with(lambda request: reply(*events, cut=cut))
    assert not chat.ok
    assert chat.error == kind


async def test_an_http_error_keeps_its_status_and_body():
    chat = await chat_with(lambda request: httpx.Response(503, json={"error": {"message": "down"}}))
    assert chat.error == "http_503" and chat.status == 503
    assert "down" in chat.error_detail


def fake_gateway(refusals: int, retry_after: str = "0.2"):
    """A handler that answers 429 to the first ``refusals`` requests, then streams GOOD;
    it records when each request arrived and what it asked."""
    seen: list[tuple[float, dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.perf_counter(), json.loads(request.content)))
        if len(seen) <= refusals:
            return httpx.Response(429, headers={"Retry-After": retry_after}, json={"error": {}})
        return reply(*GOOD)

    return handler, seen


def chat_load(client: httpx.AsyncClient, **kwargs) -> ChatLoad:
    return ChatLoad(client, URL, "m", ["p0", "p1", "p2"], max_tokens=8, **kwargs)


async def test_429_waits_for_retry_after_then_sends_the_same_request_again():
    handler, seen = fake_gateway(refusals=2)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        record = await chat_load(client).send(4)
    assert record.outcome == "ok" and record.rate_limited_responses == 2
    assert len(seen) == 3
    assert [body["messages"][0]["content"] for _, body in seen] == ["p1"] * 3
    assert seen[1][0] - seen[0][0] >= 0.2 and seen[2][0] - seen[1][0] >= 0.2
    assert seen[0][1] == {
        "model": "m",
        "messages": [{"role": "user", "content": "p1"}],
        "temperature": 0,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_a_request_refused_past_the_retry_limit_is_rate_limited_not_an_error():
    handler, seen = fake_gateway(refusals=100, retry_after="0")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        record = await chat_load(client, max_rate_limited_retries=2, speculative=False).send(0)
    assert record.outcome == "rate_limited" and record.rate_limited_responses == 3
    assert len(seen) == 3 and seen[0][1]["speculative"] is False
    level = summarise("c=1", [record], 1.0, concurrency=1)
    assert level.errors == {} and level.rate_limited_requests == 1 and level.rate_limited_responses == 3


async def test_closed_loop_keeps_n_clients_busy_and_sends_exactly_the_requests():
    in_flight = peak = 0
    sent: list[int] = []

    async def send(index: int) -> RequestRecord:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        sent.append(index)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return RequestRecord("ok", completion_tokens=2, e2e_s=0.01)

    records, wall = await closed_loop(send, concurrency=4, requests=10)
    assert len(records) == 10 and sorted(sent) == list(range(10))
    assert peak == 4
    assert wall >= 0.03  # three rounds of 10 ms at most four at a time


async def test_open_loop_sends_at_the_rate_without_waiting_for_replies():
    async def send(index: int) -> RequestRecord:
        await asyncio.sleep(0.3)  # replies slower than arrivals: they must overlap
        return RequestRecord("ok", completion_tokens=1, e2e_s=0.3)

    started = time.perf_counter()
    records, wall = await open_loop(send, rate_per_s=200.0, requests=20, seed=1)
    assert len(records) == 20
    assert wall < 0.3 + 20 * 0.3 / 2  # far less than sending them one after another
    assert time.perf_counter() - started >= 0.3


async def test_a_mixed_run_counts_429s_apart_from_errors():
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {}})
        if calls == 3:
            return reply(*GOOD[:-1])  # cut before [DONE]
        return reply(*GOOD)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        records, wall = await closed_loop(chat_load(client).send, concurrency=1, requests=4)
    level = summarise("c=1", records, wall, concurrency=1)
    assert level.requests == 4 and level.completed == 3
    assert level.errors == {"incomplete": 1}
    assert level.rate_limited_responses == 1 and level.rate_limited_requests == 0
    assert level.completion_tokens == 9
    assert "incomplete: 1" in format_table([level])


def test_percentiles_and_level_summary():
    p = Percentiles.of([float(v) for v in range(1, 101)])
    assert p.p50 == pytest.approx(50.5) and p.p90 == pytest.approx(90.1) and p.p99 == pytest.approx(99.01)
    assert all(math.isnan(v) for v in vars(Percentiles.of([])).values())
    records = [
        RequestRecord("ok", ttft_s=0.1, itl_s=[0.01, 0.03], e2e_s=1.0, completion_tokens=10),
        RequestRecord("ok", ttft_s=0.3, itl_s=[0.02], e2e_s=2.0, completion_tokens=20),
        RequestRecord("error", error="http_500", ttft_s=0.0, e2e_s=0.0, completion_tokens=99),
    ]
    level = summarise("c=2", records, wall_s=2.0, concurrency=2)
    assert level.completed == 2 and level.errors == {"http_500": 1}
    assert level.tokens_per_s == pytest.approx(15.0)  # failed requests' tokens do not count
    assert level.requests_per_s == pytest.approx(1.0)
    assert level.ttft_s.p50 == pytest.approx(0.2)
    assert level.itl_s.p50 == pytest.approx(0.02)  # pooled over requests
    assert level.e2e_s.p90 == pytest.approx(1.9)


def test_stack_names():
    assert stack_name("redis-server", ["redis-server 127.0.0.1:6379", "", ""]) == "redis"
    assert stack_name("python", ["/v/bin/python", "-m", "aerie_verifier"]) == "verifier"
    assert stack_name("python", ["/v/bin/python", "-m", "aerie_memory.worker"]) == "memory.worker"
    assert stack_name("python", ["/v/bin/python", "-m", "pytest"]) is None
    assert stack_name("bash", ["bash", "-m"]) is None


def test_growth_restart_and_disappearance_are_reported():
    before = {"a": RssSample(1, 100 * 2**20), "b": RssSample(2, 100 * 2**20), "c": RssSample(3, 10)}
    after = {"a": RssSample(1, 104 * 2**20), "b": RssSample(9, 100 * 2**20)}
    rows = {row.process: row for row in compare_rss(before, after)}
    assert rows["a"].growth == pytest.approx(0.04) and rows["a"].problem(0.05) is None
    assert "grew +4.0%" in rows["a"].problem(0.03)
    assert "restarted" in rows["b"].problem(0.05)
    assert "gone" in rows["c"].problem(0.05)


def test_rss_is_sampled_from_the_launchers_descendants():
    # A stand-in launcher whose child is named like a stack service: `-m aerie_gateway`
    # after `-c` only lands in that child's argv, the command line sample_rss reads.
    child = "import time; time.sleep(60)"
    launcher = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}, '-m', 'aerie_gateway']); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 20
        samples = {}
        while "gateway" not in samples and time.monotonic() < deadline:
            samples = sample_rss(proc.pid)
            time.sleep(0.1)
        assert set(samples) == {"gateway"}
        assert samples["gateway"].pid != proc.pid and samples["gateway"].rss_bytes > 1 << 20
    finally:
        for descendant in psutil.Process(proc.pid).children(recursive=True):
            descendant.kill()
        proc.kill()
        proc.wait()
