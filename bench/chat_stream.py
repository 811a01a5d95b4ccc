"""One streaming chat completion through the gateway, timed chunk by chunk: the SSE
client the serving and load benchmarks share. It never raises for a failed request; it
says what went wrong in ``error`` so a load run can count failures by kind."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

DONE = "[DONE]"


@dataclass
class ChatStream:
    status: int | None = None  # HTTP status; None when no response arrived
    # Seconds from sending the request to each chunk that carried content.
    content_times_s: list[float] = field(default_factory=list)
    e2e_s: float = float("nan")
    completion_tokens: int | None = None  # from the usage chunk (stream_options.include_usage)
    done: bool = False  # the stream ended with `data: [DONE]`
    # Why it failed, as a countable kind: http_<status>, stream_error (an error event
    # mid-stream), incomplete (no [DONE]), bad_chunk (not JSON), transport_<exception>.
    error: str | None = None
    error_detail: str = ""
    retry_after_s: float | None = None  # the Retry-After header of a refusal

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.content_times_s[0] if self.content_times_s else None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive content chunks (one chunk can carry several tokens
        when a speculative step accepts them at once)."""
        times = self.content_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]


def retry_after_seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # the HTTP-date form; the gateway sends seconds
        return None


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> ChatStream:
    """POST ``body`` (with "stream": true) to ``url`` and read the SSE reply to the end."""
    result = ChatStream()
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = f"http_{response.status_code}"
                result.error_detail = (await response.aread()).decode(errors="replace")[:500]
                result.retry_after_s = retry_after_seconds(response.headers.get("retry-after"))
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == DONE:
                    result.done = True
                    break
                _read_chunk(result, payload, time.perf_counter() - started)
        if result.error is None and not result.done:
            result.error = "incomplete"
    except httpx.HTTPError as exc:
        result.error = f"transport_{type(exc).__name__}"
        result.error_detail = str(exc)[:500]
    finally:
        result.e2e_s = time.perf_counter() - started
    return result


def _read_chunk(result: ChatStream, payload: str, at_s: float) -> None:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        result.error = result.error or "bad_chunk"
        result.error_detail = payload[:500]
        return
    if "error" in chunk:  # the gateway reports failures after the headers in-band
        result.error = result.error or "stream_error"
        result.error_detail = json.dumps(chunk["error"])[:500]
        return
    choices = chunk.get("choices") or []
    if choices and choices[0].get("delta", {}).get("content"):
        result.content_times_s.append(at_s)
    if chunk.get("usage"):
        result.completion_tokens = chunk["usage"]["completion_tokens"]
