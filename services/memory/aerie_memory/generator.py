"""The generator LLM that writes reflections: Aerie's verifier over gRPC by default, or any
OpenAI-compatible chat completions endpoint (AERIE_MEMORY_GENERATOR_URL).

Both are ``async (messages, max_tokens) -> text`` callables (reflection.Generator), greedy,
and count calls, tokens and seconds so the time reflection takes is measured."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import httpx
from aerie_common.grpc_utils import insecure_channel
from aerie_proto.v1 import verifier_pb2, verifier_pb2_grpc


@dataclass
class GeneratorStats:
    calls: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class VerifierGenerator:
    def __init__(self, addr: str, timeout_s: float = 180.0, speculative: bool = False):
        self.addr = addr
        self.timeout_s = timeout_s
        self.speculative = speculative
        self.stats = GeneratorStats()
        self._channel = None
        self._stub = None

    async def __call__(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        if self._stub is None:
            self._channel = insecure_channel(self.addr)
            self._stub = verifier_pb2_grpc.VerifierStub(self._channel)
        started = time.monotonic()
        request = verifier_pb2.GenerateRequest(
            request_id=f"memory-{uuid.uuid4().hex[:12]}",
            messages=[verifier_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            sampling=verifier_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
            speculative=self.speculative,
        )
        parts, tokens = [], 0
        async for response in self._stub.Generate(request, timeout=self.timeout_s):
            parts.append(response.text)
            tokens = response.completion_tokens
        self.stats.calls += 1
        self.stats.completion_tokens += tokens
        self.stats.seconds += time.monotonic() - started
        return "".join(parts)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


class OpenAIGenerator:
    """POST {base_url}/chat/completions; base_url is e.g. http://host:8000/v1."""

    def __init__(self, base_url: str, model: str = "", api_key: str = "", timeout_s: float = 180.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model = model
        self.stats = GeneratorStats()

    async def __call__(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        started = time.monotonic()
        model = self.model or await self._first_model()
        response = await self.client.post(
            "/chat/completions",
            json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        )
        response.raise_for_status()
        body = response.json()
        self.stats.calls += 1
        self.stats.completion_tokens += int(body.get("usage", {}).get("completion_tokens", 0))
        self.stats.seconds += time.monotonic() - started
        return body["choices"][0]["message"]["content"] or ""

    async def _first_model(self) -> str:
        response = await self.client.get("/models")
        response.raise_for_status()
        self.model = response.json()["data"][0]["id"]
        return self.model

    async def close(self) -> None:
        await self.client.aclose()


def make_generator(settings):
    if settings.memory_generator_url:
        return OpenAIGenerator(
            settings.memory_generator_url,
            settings.memory_generator_model,
            settings.memory_generator_api_key,
            settings.memory_generator_timeout_s,
        )
    return VerifierGenerator(
        settings.verifier_addr, settings.memory_generator_timeout_s, settings.memory_generator_speculative
    )
