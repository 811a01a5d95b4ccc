"""Bad input through the running stack (real gRPC, Redis and SmolLM2): a selection of
malformed, mistyped, out-of-range, oversized and unknown requests each get a 4xx with
OpenAI's error envelope, malformed gRPC straight to the verifier and the memory gets
INVALID_ARGUMENT, and afterwards the stack is still ready and still answers. (The unit
batteries, test_bad_input.py and test_grpc_malformed.py, cover each case in full.)"""

from __future__ import annotations

import json
import math

import grpc
import httpx
import pytest
from aerie_proto.v1 import verifier_pb2, verifier_pb2_grpc

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
JSON = {"content-type": "application/json"}


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}


def raw(body: bytes) -> dict:
    return {"content": body, "headers": JSON}


# (name, method, path, request arguments, status, a piece of the message)
BAD_HTTP = [
    ("malformed JSON", "POST", "/v1/chat/completions", raw(b'{"model": '), 400, "JSON"),
    ("invalid UTF-8", "POST", "/v1/chat/completions", raw(b'{"model": "\xff"}'), 400, ""),
    (
        "lone surrogate",
        "POST",
        "/v1/chat/completions",
        raw(json.dumps(chat_body(messages=[{"role": "user", "content": "a\ud800"}])).encode()),
        400,
        "surrogate",
    ),
    ("temperature a string", "POST", "/v1/chat/completions", {"json": chat_body(temperature="0.5")}, 400, ""),
    (
        "NaN temperature",
        "POST",
        "/v1/chat/completions",
        raw(json.dumps(chat_body(temperature=math.nan)).encode()),
        400,
        "",
    ),
    ("top_k past int32", "POST", "/v1/chat/completions", {"json": chat_body(top_k=2**31)}, 400, ""),
    ("five stop strings", "POST", "/v1/chat/completions", {"json": chat_body(stop=list("abcde"))}, 400, ""),
    ("n=17", "POST", "/v1/chat/completions", {"json": chat_body(n=17)}, 400, "16"),
    (
        "regex that does not compile",
        "POST",
        "/v1/chat/completions",
        {"json": chat_body(structured_outputs={"regex": "(a"})},
        400,
        "regex does not compile",
    ),
    (
        "min_tokens over max_tokens",
        "POST",
        "/v1/completions",
        {"json": {"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2, "min_tokens": 5}},
        400,
        "min_tokens",
    ),
    (
        "role tool",
        "POST",
        "/v1/chat/completions",
        {"json": chat_body(messages=[{"role": "tool", "content": "x"}])},
        400,
        "",
    ),
    ("unknown model", "POST", "/v1/chat/completions", {"json": chat_body(model="gpt-4o")}, 404, "gpt-4o"),
    (
        "chat memory namespace traversal",
        "POST",
        "/v1/chat/completions",
        {"json": chat_body(memory={"namespace": "../x"})},
        400,
        "",
    ),
    # Under the body limit, far over the context: refused by its length in characters,
    # before the verifier spends seconds tokenising it.
    (
        "900 KB message",
        "POST",
        "/v1/chat/completions",
        {"json": chat_body(messages=[{"role": "user", "content": "hello " * 150_000}])},
        400,
        "characters",
    ),
    (
        "2 MB message, over the body limit",
        "POST",
        "/v1/chat/completions",
        {"json": chat_body(messages=[{"role": "user", "content": "x" * (2 << 20)}])},
        400,
        "",
    ),
    ("namespace with a newline", "GET", "/memory/namespaces/ns%0A", {}, 400, "namespace"),
    ("unknown job", "GET", "/memory/jobs/job-0000000000000000", {}, 404, ""),
    ("job id naming another key", "GET", "/memory/jobs/job-0000000000000000:reflections", {}, 404, ""),
    (
        "unknown document",
        "DELETE",
        "/memory/documents/nope",
        {"params": {"namespace": "nothing-here"}},
        404,
        "",
    ),
    (
        "delete namespace traversal",
        "DELETE",
        "/memory/documents/a",
        {"params": {"namespace": "../x"}},
        400,
        "",
    ),
    (
        "query max_tokens out of range",
        "POST",
        "/memory/query",
        {"json": {"namespace": "ns", "question": "q?", "max_tokens": 10_000}},
        400,
        "",
    ),
]


def test_bad_http_requests_get_4xx_envelopes_and_the_stack_stays_ready(stack):
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for name, method, path, arguments, status, says in BAD_HTTP:
            response = client.request(method, path, **arguments)
            assert response.status_code == status, (name, response.text[:500])
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert error["message"] and says in error["message"], (name, error)
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        reply = client.post("/v1/chat/completions", json=chat_body(temperature=0))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]


def test_malformed_grpc_to_the_verifier_and_the_memory_is_invalid_argument(stack):
    def refused(call, *args) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
            call(*args)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        return raised.value

    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    with grpc.insecure_channel(stack.addr("verifier")) as channel:
        garbage = channel.unary_unary("/aerie.v1.Verifier/Tokenize", **identity)
        assert "does not parse" in refused(garbage, b"\xff\xff\xff").details()
        stub = verifier_pb2_grpc.VerifierStub(channel)
        nan = verifier_pb2.GenerateRequest(
            messages=[verifier_pb2.ChatMessage(role="user", content="hi")],
            sampling=verifier_pb2.SamplingParams(temperature=math.nan, max_tokens=4),
        )
        assert "temperature" in refused(lambda: list(stub.Generate(nan, timeout=60))).details()
    with grpc.insecure_channel(stack.addr("memory")) as channel:
        garbage = channel.unary_unary("/aerie.v1.Memory/GetNamespace", **identity)
        assert "does not parse" in refused(garbage, b"\x0a\x02\xff\xfe").details()
    assert httpx.get(f"{stack.base_url}/ready", timeout=10).status_code == 200
