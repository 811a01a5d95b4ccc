"""Load generation: streaming chat requests sent closed-loop (N clients back to back) or
open-loop (Poisson arrivals), each timed chunk by chunk. A 429 is the gateway or the
verifier refusing work on purpose: the client waits its Retry-After and sends the same
request again, and the 429 is counted apart from errors."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from bench.chat_stream import ChatStream, stream_chat

DEFAULT_RETRY_AFTER_S = 1.0  # when a 429 carries no usable Retry-After


@dataclass
class RequestRecord:
    # "ok": completed with [DONE]; "error": see `error`; "rate_limited": still refused
    # with 429 after the allowed retries (deliberate, not an error).
    outcome: str
    error: str | None = None
    error_detail: str = ""
    rate_limited_responses: int = 0  # 429s answered before the outcome
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None  # of the attempt that was accepted
    completion_tokens: int = 0

    @classmethod
    def of(cls, chat: ChatStream, rate_limited_responses: int) -> RequestRecord:
        return cls(
            outcome="ok" if chat.ok else "error",
            error=chat.error,
            error_detail=chat.error_detail,
            rate_limited_responses=rate_limited_responses,
            ttft_s=chat.ttft_s,
            itl_s=chat.itl_s,
            e2e_s=chat.e2e_s,
            completion_tokens=chat.completion_tokens or 0,
        )


@dataclass
class ChatLoad:
    """What every request of a run sends: request i asks prompts[i % len(prompts)]."""

    client: httpx.AsyncClient
    url: str  # the gateway's base URL
    model: str
    prompts: list[str]
    max_tokens: int
    speculative: bool | None = None  # None: the gateway's default
    max_rate_limited_retries: int = 10

    def body(self, index: int) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompts[index % len(self.prompts)]}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.speculative is not None:
            body["speculative"] = self.speculative
        return body

    async def send(self, index: int) -> RequestRecord:
        body = self.body(index)
        refused = 0
        while True:
            chat = await stream_chat(self.client, f"{self.url}/v1/chat/completions", body)
            if chat.status != 429:
                return RequestRecord.of(chat, refused)
            refused += 1
            if refused > self.max_rate_limited_retries:
                return RequestRecord("rate_limited", rate_limited_responses=refused)
            await asyncio.sleep(
                chat.retry_after_s if chat.retry_after_s is not None else DEFAULT_RETRY_AFTER_S
            )


Send = Callable[[int], Awaitable[RequestRecord]]


async def closed_loop(
    send: Send, concurrency: int, requests: int | None, duration_s: float | None = None
) -> tuple[list[RequestRecord], float]:
    """``concurrency`` clients, each sending its next request when the last one ends,
    until ``requests`` were sent or ``duration_s`` passed. Returns records and wall time."""
    if requests is None and duration_s is None:
        raise ValueError("closed_loop needs a request count or a duration")
    indices = itertools.count()
    records: list[RequestRecord] = []
    started = time.perf_counter()

    async def client() -> None:
        while duration_s is None or time.perf_counter() - started < duration_s:
            index = next(indices)
            if requests is not None and index >= requests:
                return
            records.append(await send(index))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - started


async def open_loop(
    send: Send,
    rate_per_s: float,
    requests: int | None,
    duration_s: float | None = None,
    seed: int = 0,
) -> tuple[list[RequestRecord], float]:
    """Poisson arrivals at ``rate_per_s``, each sent whatever is still in flight, until
    ``requests`` were sent or ``duration_s`` passed; then waits for all of them."""
    if requests is None and duration_s is None:
        raise ValueError("open_loop needs a request count or a duration")
    gaps = random.Random(seed)
    in_flight: list[asyncio.Task[RequestRecord]] = []
    started = time.perf_counter()
    for index in itertools.count():
        if requests is not None and index >= requests:
            break
        if index > 0:
            await asyncio.sleep(gaps.expovariate(rate_per_s))
        if duration_s is not None and time.perf_counter() - started >= duration_s:
            break
        in_flight.append(asyncio.create_task(send(index)))
    records = list(await asyncio.gather(*in_flight))
    return records, time.perf_counter() - started
