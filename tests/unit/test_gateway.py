"""The gateway against a fake verifier (a real gRPC server with canned replies) and a real
Redis: OpenAI wire format, error envelopes, auth, admission, readiness, metrics and
cancellation on client disconnect."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager

import grpc
import httpx
import openai
import pytest
import uvicorn
from aerie_gateway.app import create_app
from aerie_gateway.settings import GatewaySettings
from aerie_proto.v1 import memory_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.local_servers import free_port, start_redis, stop_redis

MODEL = "fake-model"
REPLY_WORDS = "Hello from the fake verifier , glad to meet you .".split()
SLOW_REPLY_WORDS = [f"w{i}" for i in range(300)]
SLOW_WORD_DELAY_S = 0.1  # 30 s in all: far longer than a loaded machine takes to notice a hang-up
SPEC_STATS = verifier_pb2.SpeculativeStats(
    drafts=4, draft_tokens=16, accepted_tokens=7, mean_acceptance_length=2.75, accepted_per_position=[4, 2, 1]
)

# Prompts that make the fake verifier misbehave.
BUSY = "TRIGGER_BUSY"
TOO_LONG = "TRIGGER_TOO_LONG"
SLOW = "TRIGGER_SLOW"
THINK = "TRIGGER_THINKING"  # the fake thinks first, as Qwen3 does
THINKING_REPLY = "<think>I should greet. </think>Hello there."
CALL_A_TOOL = "TRIGGER_TOOL_CALL"  # the fake replies with a Hermes tool call
TOOL_CALL_REPLY = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
FAIL_MIDWAY = "TRIGGER_FAIL_MIDWAY"
BUSY_MESSAGE = "verifier queue is full"
TOO_LONG_MESSAGE = "prompt has 9000 tokens; the context holds 8192"
CONTEXT_LENGTH = 8192  # the fake's, in words: a longer prompt is refused like the real verifier's


def fake_logprob(index: int, text: str, top_n: int) -> verifier_pb2.TokenLogprob:
    """The fake's token ``index`` spelling ``text``: log probability -index/4, and top_n
    alternatives of which the first is the token itself and the last half a character."""
    top = [verifier_pb2.TokenLogprob(token_id=index, token_bytes=text.encode(), logprob=-index / 4)]
    top += [verifier_pb2.TokenLogprob(token_id=100, token_bytes="é".encode()[:1], logprob=-float("inf"))]
    return verifier_pb2.TokenLogprob(
        token_id=index, token_bytes=text.encode(), logprob=-index / 4, top=top[:top_n]
    )


class FakeVerifier(verifier_pb2_grpc.VerifierServicer):
    """Streams a canned reply word by word (one token per word), honouring max_tokens."""

    def __init__(self) -> None:
        self.requests: dict[str, verifier_pb2.GenerateRequest] = {}
        self.tokenize_requests: list[verifier_pb2.TokenizeRequest] = []
        self.cancelled: set[str] = set()

    def Generate(self, request, context):
        self.requests[request.request_id] = request
        # chat messages, a text prompt or token ids (one word each)
        prompt = request.messages[-1].content if request.messages else request.prompt
        prompt = prompt or " ".join(map(str, request.prompt_token_ids))
        if BUSY in prompt:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_MESSAGE)
        if TOO_LONG in prompt:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, TOO_LONG_MESSAGE)
        words = SLOW_REPLY_WORDS if SLOW in prompt else REPLY_WORDS
        if CALL_A_TOOL in prompt:
            words = TOOL_CALL_REPLY.split(" ")
        if THINK in prompt:
            words = THINKING_REPLY.split(" ")
        delay_s = SLOW_WORD_DELAY_S if SLOW in prompt else 0.0
        limit = min(request.sampling.max_tokens or len(words), len(words))
        prompt_tokens = sum(len(message.content.split()) for message in request.messages) or len(
            prompt.split()
        )
        if prompt_tokens >= CONTEXT_LENGTH:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the prompt is {prompt_tokens} tokens, {prompt_tokens - CONTEXT_LENGTH + 1} too many",
            )
        for index, word in enumerate(words[:limit]):
            if FAIL_MIDWAY in prompt and index == 2:
                context.abort(grpc.StatusCode.INTERNAL, "verifier fell over")
            time.sleep(delay_s)
            if not context.is_active():
                self.cancelled.add(request.request_id)
                return
            text = word if index == 0 else f" {word}"
            response = verifier_pb2.GenerateResponse(
                token_ids=[index],
                text=text,
                prompt_tokens=prompt_tokens,
                completion_tokens=index + 1,
                cached_prompt_tokens=prompt_tokens - 1,  # as if asked before
            )
            if request.sampling.logprobs:
                response.logprobs.append(fake_logprob(index, text, request.sampling.top_logprobs))
            if request.sampling.prompt_logprobs and index == 0:  # each prompt word scores -1
                for position, prompt_word in enumerate(prompt.split()):
                    spelled = prompt_word if position == 0 else f" {prompt_word}"
                    entry = verifier_pb2.TokenLogprob(token_id=position, token_bytes=spelled.encode())
                    if position > 0:
                        entry.logprob = -1.0
                    response.prompt_logprobs.append(entry)
            if index == limit - 1:
                response.finish_reason = (
                    verifier_pb2.FINISH_REASON_LENGTH
                    if limit < len(words)
                    else verifier_pb2.FINISH_REASON_STOP
                )
                if request.speculative:
                    response.speculative.CopyFrom(SPEC_STATS)
            yield response

    def GetModelInfo(self, request, context):
        return verifier_pb2.ModelInfo(model_id=MODEL, context_length=CONTEXT_LENGTH)

    def Tokenize(self, request, context):
        """One token per word, its id the word's length (a BOS, 1, first if asked); messages
        as "role: content" lines."""
        self.tokenize_requests.append(request)
        text = "\n".join(f"{m.role}: {m.content}" for m in request.messages) or request.text
        if request.tools_json:  # the tools' names first, as a template might list them
            text = " ".join(tool["function"]["name"] for tool in json.loads(request.tools_json)) + " " + text
        words = (["<s>"] if request.add_special_tokens and not request.messages else []) + text.split()
        ids = [1 if word == "<s>" else len(word) for word in words]
        return verifier_pb2.TokenizeResponse(token_ids=ids, token_strs=words)

    def Detokenize(self, request, context):
        if any(token >= 1000 for token in request.token_ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token ids must be in [0, 1000)")
        return verifier_pb2.DetokenizeResponse(text=" ".join(map(str, request.token_ids)))


@contextmanager
def fake_backends(verifier: FakeVerifier, memory=None) -> Iterator[str]:
    """``verifier`` (and ``memory``) plus a SERVING health service, on one loopback port
    that stands in for the verifier, drafter and memory services alike; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    verifier_pb2_grpc.add_VerifierServicer_to_server(verifier, server)
    if memory is not None:
        memory_pb2_grpc.add_MemoryServicer_to_server(memory, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="session")
def gateway_fake_verifier() -> Iterator[tuple[FakeVerifier, str]]:
    fake = FakeVerifier()
    with fake_backends(fake) as addr:
        yield fake, addr


@pytest.fixture(scope="session")
def gateway_redis_url() -> Iterator[str]:
    port = free_port()
    process = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(process)


@pytest.fixture
def gateway_app(gateway_fake_verifier, gateway_redis_url) -> Callable[..., FastAPI]:
    """Builds a gateway whose backends are all the fakes; keyword arguments override settings."""
    _, addr = gateway_fake_verifier

    def make(**overrides) -> FastAPI:
        fields = dict(
            verifier_addr=addr,
            drafter_addr=addr,
            memory_addr=addr,
            redis_url=gateway_redis_url,
            api_keys="",
            served_model_name="",
            max_concurrent_requests=64,
            grpc_timeout_s=30.0,
            health_timeout_s=2.0,
        )
        return create_app(GatewaySettings(**{**fields, **overrides}))

    return make


@asynccontextmanager
async def asgi_client(app: FastAPI, raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client. ASGITransport sends no lifespan events, so run the lifespan here."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@contextmanager
def served_over_http(app: FastAPI) -> Iterator[str]:
    """The gateway under uvicorn in a background thread, for real sockets: the openai
    client, and disconnects that only a real connection can make. Yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def chat_body(prompt: str = "Say hello.", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


def sse_payloads(text: str) -> list[str]:
    return [event.removeprefix("data: ") for event in text.split("\n\n") if event.startswith("data: ")]


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["param"] == param
    assert error["message"]
    return error


async def assert_generation_cancelled(fake: FakeVerifier, app: FastAPI, request_id: str) -> None:
    """The fake verifier saw the call cancelled, and the gateway let go of the request: the
    slow reply would take 30 s, and a loaded 2-core machine has taken over 8 s to notice."""
    deadline = time.monotonic() + 20
    while request_id not in fake.cancelled or app.state.admission.in_flight:
        assert time.monotonic() < deadline, "the verifier call was not cancelled"
        await asyncio.sleep(0.02)
    samples = metric_samples(app.state.metrics.exposition().decode())
    assert samples[("aerie:num_requests_running", ())] == samples[("aerie:num_requests_waiting", ())] == 0
    assert samples[("aerie:request_success_total", (("finished_reason", "stop"),))] == 0


def metric_samples(exposition: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


async def test_non_streaming_reply_with_usage(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == MODEL
    [choice] = completion["choices"]
    assert choice["message"] == {"role": "assistant", "content": " ".join(REPLY_WORDS)}
    assert choice["finish_reason"] == "stop"
    assert completion["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": len(REPLY_WORDS),
        "total_tokens": 2 + len(REPLY_WORDS),
        "prompt_tokens_details": {"cached_tokens": 1},
        "speculative": {
            "drafts": 4,
            "draft_tokens": 16,
            "accepted_tokens": 7,
            "mean_acceptance_length": 2.75,
        },
    }


async def test_max_tokens_stops_with_length_and_no_speculative_usage(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=3, speculative=False))
    completion = response.json()
    assert completion["choices"][0]["message"]["content"] == " ".join(REPLY_WORDS[:3])
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


async def test_request_maps_onto_generate_request(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
            },
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": 7,
        "stop": "\n\n",
        "max_tokens": 50,
        "max_completion_tokens": 20,
        "speculative": False,
        "memory": {"namespace": "docs"},
        "user": "someone",  # OpenAI fields Aerie does not use are ignored
        "presence_penalty": 0.5,
        "frequency_penalty": -1.25,
        "repetition_penalty": 1.2,
        "logit_bias": {"17": -100, "3": 2.5},
        "ignore_eos": True,
        "min_tokens": 3,
        "stop_token_ids": [7, 9],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": {"type": "integer"}},
        },
        "logprobs": True,
        "top_logprobs": 2,
    }
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = fake.requests[response.json()["id"]]
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be brief."),
        ("user", "first\nsecond"),
    ]
    assert sent.sampling.temperature == pytest.approx(0.5)
    assert sent.sampling.top_p == pytest.approx(0.9)
    assert sent.sampling.top_k == 40
    assert sent.sampling.min_p == pytest.approx(0.05)
    assert sent.sampling.HasField("seed") and sent.sampling.seed == 7
    assert list(sent.sampling.stop) == ["\n\n"]
    assert sent.sampling.max_tokens == 20  # max_completion_tokens wins over max_tokens
    assert (sent.sampling.presence_penalty, sent.sampling.frequency_penalty) == (0.5, -1.25)
    assert sent.sampling.repetition_penalty == pytest.approx(1.2)
    assert sent.sampling.logprobs and sent.sampling.top_logprobs == 2
    assert dict(sent.sampling.logit_bias) == {17: -100.0, 3: 2.5}
    assert sent.sampling.ignore_eos and sent.sampling.min_tokens == 3
    assert list(sent.sampling.stop_token_ids) == [7, 9]
    assert json.loads(sent.sampling.structured.json_schema) == {"type": "integer"}
    assert sent.speculative is False


class RecommendingVerifier(FakeVerifier):
    """A verifier whose model recommends sampling defaults (its generation_config.json)."""

    def GetModelInfo(self, request, context):
        info = super().GetModelInfo(request, context)
        info.sampling_defaults.CopyFrom(verifier_pb2.SamplingDefaults(temperature=0.25, top_k=20))
        return info


async def test_sampling_fields_left_out_take_the_models_recommended_defaults(gateway_app):
    fake = RecommendingVerifier()
    with fake_backends(fake) as addr:
        async with asgi_client(gateway_app(verifier_addr=addr)) as client:
            sent = []
            for extra in ({}, {"temperature": None}, {"temperature": 1.0, "top_k": 0, "top_p": 0.5}):
                response = await client.post("/v1/chat/completions", json=chat_body(**extra))
                assert response.status_code == 200, response.text
                sent.append(fake.requests[response.json()["id"]].sampling)
            response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Say hello."})
            assert response.status_code == 200, response.text
            sent.append(fake.requests[response.json()["id"]].sampling)
    # left out or null: the model's; sent (1 and 0 too): the request's; not recommended: OpenAI's
    assert [(s.temperature, s.top_k, s.top_p, s.repetition_penalty) for s in sent] == [
        (0.25, 20, 1.0, 1.0),
        (0.25, 20, 1.0, 1.0),
        (1.0, 0, 0.5, 1.0),
        (0.25, 20, 1.0, 1.0),
    ]


class RestartingVerifier(FakeVerifier):
    """A verifier that can be restarted on another model, or be down for GetModelInfo."""

    def __init__(self) -> None:
        super().__init__()
        self.model_id, self.temperature, self.down = MODEL, None, False

    def GetModelInfo(self, request, context):
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        info = verifier_pb2.ModelInfo(model_id=self.model_id, context_length=CONTEXT_LENGTH)
        if self.temperature is not None:
            info.sampling_defaults.temperature = self.temperature
        return info


async def test_a_verifier_restarted_on_another_model_is_heard_once_the_remembered_model_is_old(
    gateway_app, monkeypatch
):
    fake = RestartingVerifier()
    with fake_backends(fake) as addr:
        async with asgi_client(gateway_app(verifier_addr=addr)) as client:

            async def model_ids() -> list[str]:
                response = await client.get("/v1/models")
                assert response.status_code == 200, response.text
                return [card["id"] for card in response.json()["data"]]

            assert await model_ids() == [MODEL]
            fake.model_id, fake.temperature = "other-model", 0.0
            assert await model_ids() == [MODEL]  # remembered: not asked on every request
            monkeypatch.setattr("aerie_gateway.backends.MODEL_INFO_TTL_S", 0.0)
            assert await model_ids() == ["other-model"]
            stale = await client.post("/v1/chat/completions", json=chat_body())
            assert_error(stale, 404, "invalid_request_error", "model")
            response = await client.post("/v1/chat/completions", json={**chat_body(), "model": "other-model"})
            assert response.status_code == 200, response.text
            assert fake.requests[response.json()["id"]].sampling.temperature == 0.0  # the new defaults
            fake.down = True  # what it said last stands while it does not answer
            assert await model_ids() == ["other-model"]


async def test_defaults_map_onto_generate_request(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
    sent = fake.requests[response.json()["id"]]
    assert sent.sampling.temperature == pytest.approx(1.0)
    assert sent.sampling.top_p == pytest.approx(1.0)
    assert sent.sampling.top_k == 0
    assert sent.sampling.min_p == 0
    assert not sent.sampling.HasField("seed")
    assert sent.sampling.max_tokens == 0
    assert (
        sent.sampling.presence_penalty,
        sent.sampling.frequency_penalty,
        sent.sampling.repetition_penalty,
    ) == (
        0,
        0,
        1,
    )
    assert not sent.sampling.logprobs and sent.sampling.top_logprobs == 0
    assert sent.sampling.structured.WhichOneof("constraint") is None
    assert sent.speculative is True


@pytest.mark.parametrize(
    ("fields", "constraint", "value"),
    [
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, "json_object", True),
        ({"structured_outputs": {"json": {"type": "object"}}}, "json_schema", '{"type": "object"}'),
        ({"structured_outputs": {"json": '{"type": "string"}'}}, "json_schema", '{"type": "string"}'),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", 'root ::= "a"'),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
    ],
)
async def test_structured_outputs_map_onto_the_verifiers_constraint(
    gateway_app, gateway_fake_verifier, fields, constraint, value
):
    fake, _ = gateway_fake_verifier
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(**fields))
    assert response.status_code == 200, response.text
    structured = fake.requests[response.json()["id"]].sampling.structured
    assert structured.WhichOneof("constraint") == constraint
    if constraint == "choice":
        assert list(structured.choice.options) == value
    elif constraint is not None:
        assert getattr(structured, constraint) == value


async def test_logprobs_one_entry_per_token_with_exact_bytes(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2))
        plain = await client.post("/v1/chat/completions", json=chat_body())
    assert plain.json()["choices"][0]["logprobs"] is None
    completion = response.json()
    content = completion["choices"][0]["logprobs"]["content"]
    assert len(content) == completion["usage"]["completion_tokens"]
    assert "".join(entry["token"] for entry in content) == completion["choices"][0]["message"]["content"]
    for index, entry in enumerate(content):
        assert entry["logprob"] == -index / 4
        assert bytes(entry["bytes"]) == entry["token"].encode()
        first, half_character = entry["top_logprobs"]
        assert first == {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"]}
        # part of a character: the token spells it as an escape, the bytes exactly; no chance
        # at all is OpenAI's -9999 (JSON has no -inf)
        assert half_character == {"token": "\\xc3", "logprob": -9999.0, "bytes": [0xC3]}


async def test_streamed_logprobs_come_with_their_tokens(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(stream=True, logprobs=True, max_tokens=3)
        )
    chunks = [json.loads(payload) for payload in sse_payloads(response.text)[:-1]]
    content_chunks = [chunk["choices"][0] for chunk in chunks[1:-1]]
    assert len(content_chunks) == 3
    for choice in content_chunks:
        [entry] = choice["logprobs"]["content"]
        assert entry["token"] == choice["delta"]["content"] and entry["top_logprobs"] == []
    assert (
        chunks[-1]["choices"][0]["logprobs"] is None and chunks[-1]["choices"][0]["finish_reason"] == "length"
    )


async def test_n_choices_each_decoded_on_its_own(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    async with asgi_client(gateway_app()) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(n=3, seed=2**63 - 2, max_tokens=4)
        )
    completion = response.json()
    assert [choice["index"] for choice in completion["choices"]] == [0, 1, 2]
    assert all(choice["message"]["content"] == " ".join(REPLY_WORDS[:4]) for choice in completion["choices"])
    sent = [fake.requests[f"{completion['id']}-{index}"] for index in range(3)]
    # each choice its own seed (wrapping around within int64), so sampled choices differ
    assert [request.sampling.seed for request in sent] == [2**63 - 2, 2**63 - 1, -(2**63)]
    assert completion["usage"]["prompt_tokens"] == 2 and completion["usage"]["completion_tokens"] == 12
    assert completion["usage"]["speculative"]["drafts"] == 3 * SPEC_STATS.drafts


async def test_n_choices_stream_interleaved_by_index(gateway_app):
    body = chat_body(n=2, stream=True, stream_options={"include_usage": True})
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    chunks = [json.loads(payload) for payload in sse_payloads(response.text)[:-1]]
    for index in (0, 1):
        mine = [
            chunk["choices"][0]
            for chunk in chunks
            if chunk["choices"] and chunk["choices"][0]["index"] == index
        ]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(choice["delta"].get("content", "") for choice in mine) == " ".join(REPLY_WORDS)
        assert [choice["finish_reason"] for choice in mine if choice["finish_reason"]] == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * len(REPLY_WORDS)


async def test_streaming_chunks_then_usage_then_done(gateway_app):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[1:-2])
    assert content == " ".join(REPLY_WORDS)
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(REPLY_WORDS)
    assert chunks[-1]["usage"]["speculative"]["accepted_tokens"] == 7
    assert all("usage" not in chunk for chunk in chunks[:-1])


async def test_streaming_without_include_usage_has_no_usage_chunk(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=2))
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    last_chunk = json.loads(payloads[-2])
    assert last_chunk["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last_chunk


async def test_error_after_stream_started_is_an_error_event_then_done(gateway_app):
    app = gateway_app()
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(FAIL_MIDWAY, stream=True))
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error"
    assert "verifier fell over" in error["message"]
    assert app.state.admission.in_flight == 0


async def test_openai_client_streaming_and_not(gateway_app):
    with served_over_http(gateway_app(api_keys="sk-test")) as base_url:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0)
        messages = [{"role": "user", "content": "Say hello."}]

        completion = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert completion.choices[0].message.content == " ".join(REPLY_WORDS[:4])
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.total_tokens == 2 + 4
        assert completion.usage.model_extra["speculative"]["drafts"] == 4
        assert completion.choices[0].logprobs is None

        completion = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=2, logprobs=True, top_logprobs=1, presence_penalty=1.0
        )
        assert [entry.token for entry in completion.choices[0].logprobs.content] == REPLY_WORDS[:1] + [
            f" {REPLY_WORDS[1]}"
        ]
        assert completion.choices[0].logprobs.content[1].top_logprobs[0].logprob == -0.25

        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " ".join(REPLY_WORDS)
        assert chunks[-1].usage.completion_tokens == len(REPLY_WORDS)

        models = await client.models.list()
        assert [model.id for model in models.data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.models.retrieve("gpt-4o")

        with pytest.raises(openai.RateLimitError, match=BUSY_MESSAGE):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": BUSY}])
        await client.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        (chat_body(temperature=5), "temperature"),
        (chat_body(n=17), "n"),
        (chat_body(top_p=0), "top_p"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat_body(memory=True), "memory"),
        (chat_body(frequency_penalty=2.5), "frequency_penalty"),
        (chat_body(presence_penalty=-3), "presence_penalty"),
        (chat_body(repetition_penalty=0), "repetition_penalty"),
        (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat_body(top_logprobs=2), "top_logprobs"),
        (chat_body(logit_bias={"x": 1}), "logit_bias"),
        (chat_body(response_format={"type": "json_schema"}), "response_format"),
        (chat_body(response_format={"type": "xml"}), "response_format.type"),
        (
            chat_body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            "response_format.json_schema.name",
        ),
        (chat_body(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
        (chat_body(structured_outputs={"choice": []}), "structured_outputs.choice"),
        (
            chat_body(structured_outputs={"regex": "a"}, response_format={"type": "json_object"}),
            "response_format",
        ),
        (chat_body(logit_bias={"5": 101}), "logit_bias.5"),
        (chat_body(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
        ({"model": MODEL, "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": MODEL, "messages": [{"role": "assistant"}]}, "messages[0]"),  # no content, no calls
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
async def test_invalid_request_is_400_envelope(gateway_app, body, param):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, "invalid_request_error", param)


async def test_malformed_json_is_400(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post(
            "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
        )
    assert_error(response, 400, "invalid_request_error")


async def test_unknown_model_is_404(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-4o"})
    error = assert_error(response, 404, "invalid_request_error", "model")
    assert error["code"] == "model_not_found"


async def test_served_model_name_overrides_the_verifiers(gateway_app):
    async with asgi_client(gateway_app(served_model_name="aerie-chat")) as client:
        models = (await client.get("/v1/models")).json()
        rejected = await client.post("/v1/chat/completions", json=chat_body())
        accepted = await client.post("/v1/chat/completions", json={**chat_body(), "model": "aerie-chat"})
    assert [(m["id"], m["object"], m["owned_by"], m["root"], m["max_model_len"]) for m in models["data"]] == [
        ("aerie-chat", "model", "aerie", MODEL, CONTEXT_LENGTH)
    ]
    assert rejected.status_code == 404
    assert accepted.status_code == 200
    assert accepted.json()["model"] == "aerie-chat"


async def test_a_model_is_retrieved_by_its_served_name_slashes_and_all(gateway_app):
    async with asgi_client(gateway_app(served_model_name="acme/chat-1")) as client:
        card = await client.get("/v1/models/acme/chat-1")
        listed = (await client.get("/v1/models")).json()["data"]
        slashed = await client.get("/v1/models/")
        unknown = await client.get(f"/v1/models/{MODEL}")
        nested = await client.get("/v1/models/acme/chat-1/extra")
    assert card.status_code == 200, card.text
    assert card.json() == listed[0]
    assert card.json()["id"] == "acme/chat-1"
    assert slashed.status_code == 200 and slashed.json()["data"] == listed
    assert assert_error(unknown, 404, "invalid_request_error", "model")["code"] == "model_not_found"
    assert_error(nested, 404, "invalid_request_error", "model")


async def test_unknown_route_and_wrong_method_use_the_envelope(gateway_app):
    async with asgi_client(gateway_app()) as client:
        missing = await client.get("/v1/nothing-here")
        wrong_method = await client.get("/v1/chat/completions")
    assert_error(missing, 404, "invalid_request_error")
    assert_error(wrong_method, 405, "invalid_request_error")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong-key"}, 401),
        ({"Authorization": "Basic key-two"}, 401),
        ({"Authorization": "Bearer key-two"}, 200),
    ],
)
async def test_api_keys(gateway_app, headers, status):
    async with asgi_client(gateway_app(api_keys="key-one, key-two")) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        models = await client.get("/v1/models", headers=headers)
        card = await client.get(f"/v1/models/{MODEL}", headers=headers)
        open_routes = [await client.get(path) for path in ("/health", "/ready", "/metrics")]
    assert response.status_code == status
    assert models.status_code == card.status_code == status
    if status == 401:
        assert_error(response, 401, "authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
    assert [r.status_code for r in open_routes] == [200, 200, 200]  # probes and scrapers need no key


@pytest.mark.parametrize("stream", [False, True])
async def test_verifier_busy_is_429_with_retry_after(gateway_app, stream):
    app = gateway_app()
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(BUSY, stream=stream))
    error = assert_error(response, 429, "rate_limit_error")
    assert error["message"] == BUSY_MESSAGE
    assert response.headers["retry-after"] == "1"
    assert app.state.admission.in_flight == 0


async def test_over_max_concurrent_requests_is_429(gateway_app):
    app = gateway_app(max_concurrent_requests=1)
    admission = app.state.admission
    async with asgi_client(app) as client:
        slow = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(SLOW)))
        while admission.in_flight == 0:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/chat/completions", json=chat_body())
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        assert admission.in_flight == 0
    assert_error(refused, 429, "rate_limit_error")
    assert refused.headers["retry-after"] == "1"


async def test_invalid_argument_is_400_with_the_verifiers_message(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(TOO_LONG))
    error = assert_error(response, 400, "invalid_request_error")
    assert error["message"] == TOO_LONG_MESSAGE


@pytest.mark.parametrize("served_model_name", ["", MODEL])
async def test_verifier_down_is_503(gateway_app, served_model_name):
    app = gateway_app(verifier_addr=f"127.0.0.1:{free_port()}", served_model_name=served_model_name)
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
    assert_error(response, 503, "service_unavailable_error")


async def test_unexpected_error_is_500_envelope_and_frees_the_slot(gateway_app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("aerie_gateway.app.to_generate_requests", broken)
    app = gateway_app()
    async with asgi_client(app, raise_app_exceptions=False) as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
    assert_error(response, 500, "server_error")
    assert app.state.admission.in_flight == 0


async def test_ready_when_every_backend_answers(gateway_app):
    async with asgi_client(gateway_app()) as client:
        response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "backends": {"verifier": True, "drafter": True, "memory": True, "redis": True},
    }


async def test_not_ready_names_the_missing_backends(gateway_app):
    closed = free_port()
    app = gateway_app(redis_url=f"redis://127.0.0.1:{closed}/0", memory_addr=f"127.0.0.1:{closed}")
    async with asgi_client(app) as client:
        response = await client.get("/ready")
        health_response = await client.get("/health")
    error = assert_error(response, 503, "service_unavailable_error")
    assert "redis" in error["message"] and "memory" in error["message"]
    assert "verifier" not in error["message"]
    assert response.json()["backends"] == {"verifier": True, "drafter": True, "memory": False, "redis": False}
    assert health_response.json() == {"status": "ok"}


async def test_metrics_move_after_a_request(gateway_app):
    async with asgi_client(gateway_app()) as client:
        before_text = (await client.get("/metrics")).text
        await client.post("/v1/chat/completions", json=chat_body(stream=True))
        await client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        after_response = await client.get("/metrics")
    assert after_response.headers["content-type"].startswith("text/plain")
    before, after = metric_samples(before_text), metric_samples(after_response.text)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert "aerie:time_to_first_token_seconds" in before_text
    assert moved("aerie:time_to_first_token_seconds_count") == 2
    assert moved("aerie:e2e_request_latency_seconds_count") == 2
    # One gap per token after the first of each reply.
    assert moved("aerie:inter_token_latency_seconds_count") == (len(REPLY_WORDS) - 1) + 2
    assert moved("aerie:prompt_tokens_total") == 4
    assert moved("aerie:generation_tokens_total") == len(REPLY_WORDS) + 3
    assert moved("aerie:request_success_total", finished_reason="stop") == 1
    assert moved("aerie:request_success_total", finished_reason="length") == 1
    assert moved("aerie:spec_decode_num_drafts_total") == 2 * SPEC_STATS.drafts
    assert moved("aerie:spec_decode_num_accepted_tokens_total") == 2 * SPEC_STATS.accepted_tokens
    for position, accepted in enumerate(SPEC_STATS.accepted_per_position):
        assert (
            moved("aerie:spec_decode_num_accepted_tokens_per_pos_total", position=str(position))
            == 2 * accepted
        )
    assert after[("aerie:num_requests_running", ())] == 0
    assert after[("aerie:num_requests_waiting", ())] == 0


async def test_client_disconnect_mid_stream_cancels_generation(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    app = gateway_app()
    with served_over_http(app) as base_url:
        async with httpx.AsyncClient(base_url=base_url) as client:
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat_body(SLOW, stream=True)
            ) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                first_chunk = json.loads((await anext(lines)).removeprefix("data: "))
            # Leaving the block closed the connection with the reply a few words in.
        request_id = first_chunk["id"]
        await assert_generation_cancelled(fake, app, request_id)


async def test_client_disconnect_while_waiting_for_a_full_reply_cancels_generation(
    gateway_app, gateway_fake_verifier
):
    fake, _ = gateway_fake_verifier
    prompt = f"{SLOW} {uuid.uuid4().hex}"  # finds this request among the fake's
    app = gateway_app()
    with served_over_http(app) as base_url:
        # 2 s: time for the request to reach the verifier on a busy machine (it must, to be
        # cancelled there), and still long before the 30 s reply is complete
        async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as client:
            with pytest.raises(httpx.ReadTimeout):
                # The client gives up, and hangs up, before the reply is complete.
                await client.post("/v1/chat/completions", json=chat_body(prompt))
        [request_id] = [rid for rid, sent in fake.requests.items() if sent.messages[-1].content == prompt]
        await assert_generation_cancelled(fake, app, request_id)
