"""Bad input to the gateway, against the fake verifier and memory services: malformed,
mistyped, out-of-range, oversized and unknown things a client can send each get a 4xx
in OpenAI's error envelope within a deadline (never a 5xx or a hang), and the gateway
is still ready afterwards."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.unit.test_gateway import (  # noqa: F401  (gateway_redis_url is a fixture)
    CONTEXT_LENGTH,
    MODEL,
    asgi_client,
    assert_error,
    chat_body,
    gateway_redis_url,
)
from tests.unit.test_gateway_memory import app, fakes  # noqa: F401  (fixtures)

DEADLINE_S = 20.0  # generous: the machine is shared; a hang is what this catches
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


@dataclass
class Bad:
    """One bad request and the error it must get."""

    status: int
    param: str | None
    method: str = "POST"
    path: str = CHAT
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | str | None = None
    says: str = ""  # a piece of the error message

    def send_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"headers": self.headers, "params": self.params}
        if self.content is not None:
            args["content"] = self.content
        elif self.json is not None:
            args["json"] = self.json
        return args


def raw(body: bytes, **kwargs) -> Bad:
    return Bad(400, None, content=body, headers=JSON, **kwargs)


def chat(param: str | None, says: str = "", **fields) -> Bad:
    return Bad(400, param, json=chat_body(**fields), says=says)


def message(param: str, **fields) -> Bad:
    return Bad(400, param, json={"model": MODEL, "messages": [fields]})


def chat_memory(namespace: str) -> Bad:
    return chat("memory.namespace", memory={"namespace": namespace})


@dataclass(frozen=True)
class At:
    """A bad value whose error names a part of its field (an item of a list, ...)."""

    value: Any
    param: str


# Per sampling field: values of the wrong type, then values out of range.
BAD_FIELD_VALUES: dict[str, list[Any]] = {
    "temperature": ["0.5", True, [], {}, -0.1, 2.1, 1e308],
    "top_p": ["1", False, 0, -0.1, 1.1],
    "top_k": [1.5, "5", True, -1, 2**31],
    "max_tokens": [10.0, "10", True, 0, -1, 2**31, 10**30],
    "max_completion_tokens": ["x", 2.5, 0, 2**31],
    "seed": [1.5, "7", True, 2**63, -(2**63) - 1, 10**40],
    "n": ["1", True, 1.0, 0, 17, -1],
    "frequency_penalty": ["0.5", True, -2.01, 2.5, 1e308],
    "presence_penalty": [[], False, -3, 2.01],
    "repetition_penalty": ["1.2", 0, -1, 1e39],
    "logit_bias": [
        [],
        "x",
        At({"5": "1"}, "logit_bias.5"),
        At({"5": 101}, "logit_bias.5"),
        {"-5": 1},
        {"a": 1},
    ],
    "logprobs": ["true", 1],
    "top_logprobs": ["3", 1.5, -1, 21],
    "min_tokens": ["3", -1, 2**31],
    "ignore_eos": ["yes", 1],
    "stop_token_ids": [7, "7", At([-1], "stop_token_ids[0]"), list(range(65))],
    "response_format": ["json", At({"type": "yaml"}, "response_format.type"), {"type": "json_schema"}],
    "structured_outputs": [
        "regex",
        {},
        {"regex": "a", "choice": ["b"]},
        At({"unknown": 1}, "structured_outputs.unknown"),
    ],
    "stream": ["true", 1],
    "stream_options": ["yes", At({"include_usage": "yes"}, "stream_options.include_usage")],
    "speculative": ["no", 0],
    "stop": [
        5,
        {"a": 1},
        At([1], "stop[0]"),
        At([None], "stop[0]"),
        ["a", "b", "c", "d", "e"],
        At("", "stop[0]"),
        At("x" * 257, "stop[0]"),
        At(["ok", "x" * 10_000], "stop[1]"),
    ],
}


def bad_field_value(name: str, value: Any) -> tuple[str, Bad]:
    param = value.param if isinstance(value, At) else name
    value = value.value if isinstance(value, At) else value
    return f"{name}={value!r:.40}", chat(param, **{name: value})


BAD_NAMESPACES = {
    "path traversal": "../x",
    "space": "a b",
    "unicode": "名前",
    "over-long": "x" * 65,
    "empty": "",
    "final newline": "ns\n",
    "nul": "ns\x00",
}

BAD: dict[str, Bad] = {
    # The body is not a JSON object, or cannot be read as one.
    "malformed JSON": raw(b'{"model": '),
    "trailing garbage": raw(json.dumps(chat_body()).encode() + b" trailing"),
    "empty body": raw(b""),
    "JSON array": raw(b"[]"),
    "JSON string": raw(b'"hello"'),
    "JSON number": raw(b"42"),
    "JSON null": raw(b"null"),
    "deeply nested JSON": raw(b"[" * 100_000 + b"]" * 100_000),
    "integer with 5000 digits": raw(b'{"model": "m", "messages": [], "seed": ' + b"9" * 5000 + b"}"),
    "invalid UTF-8": raw(b'{"model": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3\x28"}]}'),
    "lone surrogate in content": raw(
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        says="messages[0].content",
    ),
    "lone surrogate in model": raw(b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}'),
    # Python's json writes and reads these; they are not JSON, but the gateway must cope.
    "NaN temperature": Bad(
        400, "temperature", content=json.dumps(chat_body(temperature=math.nan)).encode(), headers=JSON
    ),
    "Infinity top_p": Bad(400, "top_p", content=json.dumps(chat_body(top_p=math.inf)).encode(), headers=JSON),
    "text/plain content type": Bad(
        400,
        None,
        content=json.dumps(chat_body()).encode(),
        headers={"content-type": "text/plain"},
        says="JSON",
    ),
    "no content type": Bad(400, None, content=json.dumps(chat_body()).encode(), says="Content-Type"),
    "form encoded": Bad(
        400,
        None,
        content=b"model=x&messages=y",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    # Messages.
    "no messages key": Bad(400, "messages", json={"model": MODEL}),
    "empty messages": chat("messages", messages=[]),
    "message not an object": chat("messages[0]", messages=["hi"]),
    "content None": message("messages[0].content", role="user", content=None),
    "content missing": message("messages[0].content", role="user"),
    "content an empty list": message("messages[0].content", role="user", content=[]),
    "content part without text": message(
        "messages[0].content[0].text", role="user", content=[{"type": "text"}]
    ),
    "content part text a number": message(
        "messages[0].content[0].text", role="user", content=[{"type": "text", "text": 5}]
    ),
    "content part an image": message(
        "messages[0].content[0].type", role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]
    ),
    "role missing": message("messages[0].role", content="hi"),
    **{
        f"role {role!r}": message("messages[0].role", role=role, content="hi")
        for role in ["function", "", "USER", "root", 1]
    },
    "tool message without tool_call_id": message("messages[0].tool_call_id", role="tool", content="42"),
    "assistant message without content or calls": message("messages[0]", role="assistant"),
    "tool call without function": message(
        "messages[0].tool_calls[0].function", role="assistant", tool_calls=[{"id": "c"}]
    ),
    # Wrong types and values out of range, for every chat field.
    **dict(bad_field_value(name, value) for name, values in BAD_FIELD_VALUES.items() for value in values),
    **{
        f"messages={value!r}": chat("messages", messages=value)
        for value in ["hi", {"role": "user", "content": "hi"}, 7]
    },
    **{
        f"model={value!r}": Bad(400, "model", json={**chat_body(), "model": value})
        for value in [123, [], {"id": MODEL}, True]
    },
    "memory='ns'": chat("memory", memory="ns"),
    "memory=1": chat("memory", memory=1),
    "memory=true": chat("memory", memory=True),
    "memory.namespace=5": chat("memory.namespace", memory={"namespace": 5}),
    "memory.max_turns='3'": chat("memory.max_turns", memory={"namespace": "ns", "max_turns": "3"}),
    "memory.max_turns=0": chat("memory.max_turns", memory={"namespace": "ns", "max_turns": 0}),
    "memory.max_turns=13": chat("memory.max_turns", memory={"namespace": "ns", "max_turns": 13}),
    "memory unknown option": chat("memory.speed", memory={"namespace": "ns", "speed": "fast"}),
    **{f"chat memory namespace: {name}": chat_memory(ns) for name, ns in BAD_NAMESPACES.items()},
    # Too big for the model: the verifier's context check refuses it, whatever the gateway's
    # body limit does with the second.
    "prompt over the context": chat(None, says="too many", prompt="word " * (CONTEXT_LENGTH + 10)),
    "many messages over the context": chat(
        None, says="too many", messages=[{"role": "user", "content": "w"}] * (CONTEXT_LENGTH + 10)
    ),
    "2 MB message": chat(None, prompt="word " * 420_000),
    # Unknown model, routes, methods.
    "unknown model": Bad(404, "model", json={**chat_body(), "model": "gpt-4o"}, says="gpt-4o"),
    "empty model": Bad(404, "model", json={**chat_body(), "model": ""}),
    "10 KB model name": Bad(404, "model", json={**chat_body(), "model": "m" * 10_000}),
    "GET chat": Bad(405, None, method="GET"),
    "PUT chat": Bad(405, None, method="PUT", json=chat_body()),
    "unknown route": Bad(404, None, path="/v1/chat/completions/extra", json=chat_body()),
    # Memory routes: bad namespaces in paths, bodies and query strings.
    **{
        f"namespace path {name}": Bad(400, "namespace", method="GET", path=f"/memory/namespaces/{ns}")
        for name, ns in [
            ("space", "a%20b"),
            ("unicode", "%E5%90%8D%E5%89%8D"),
            ("over-long", "x" * 65),
            ("final newline", "ns%0A"),
            ("dot dot", "%2E%2E"),
            ("nul", "ns%00"),
        ]
    },
    "namespace path traversal": Bad(404, None, method="GET", path="/memory/namespaces/..%2Fx"),
    "namespace path empty": Bad(404, None, method="GET", path="/memory/namespaces//documents"),
    "rollback bad namespace": Bad(400, "namespace", path="/memory/namespaces/a%20b/rollback", json={}),
    "rollback version a number": Bad(
        400, "version", path="/memory/namespaces/ns/rollback", json={"version": 5}
    ),
    "rollback body a list": Bad(400, None, path="/memory/namespaces/ns/rollback", json=[]),
    **{
        f"ingest namespace {name}": Bad(
            400,
            "namespace",
            path="/memory/ingest",
            json={"namespace": ns, "documents": [{"id": "a", "text": "t"}]},
        )
        for name, ns in BAD_NAMESPACES.items()
    },
    "ingest documents not a list": Bad(
        400, "documents", path="/memory/ingest", json={"namespace": "ns", "documents": {"id": "a"}}
    ),
    "ingest text a number": Bad(
        400,
        "documents[0].text",
        path="/memory/ingest",
        json={"namespace": "ns", "documents": [{"id": "a", "text": 1}]},
    ),
    "ingest nested metadata": Bad(
        400,
        "documents[0].metadata.k",
        path="/memory/ingest",
        json={"namespace": "ns", "documents": [{"id": "a", "text": "t", "metadata": {"k": {"x": 1}}}]},
    ),
    "ingest lone surrogate": Bad(
        400,
        None,
        path="/memory/ingest",
        content=b'{"namespace": "ns", "documents": [{"id": "a", "text": "\\ud800"}]}',
        headers=JSON,
        says="documents[0].text",
    ),
    **{
        f"query {name}": Bad(
            400, param, path="/memory/query", json={"namespace": "ns", "question": "q?", **body}
        )
        for name, param, body in [
            ("namespace traversal", "namespace", {"namespace": "../x"}),
            ("empty question", "question", {"question": ""}),
            ("blank question", "question", {"question": "   "}),
            ("question too long", "question", {"question": "q" * 2001}),
            ("max_tokens 0", "max_tokens", {"max_tokens": 0}),
            ("max_tokens 513", "max_tokens", {"max_tokens": 513}),
            ("max_tokens a string", "max_tokens", {"max_tokens": "5"}),
            ("unknown field", "extra", {"extra": 1}),
        ]
    },
    # Query-string abuse.
    "delete without namespace": Bad(400, "query.namespace", method="DELETE", path="/memory/documents/a"),
    "delete empty namespace": Bad(
        400, "namespace", method="DELETE", path="/memory/documents/a", params="namespace="
    ),
    "delete namespace traversal": Bad(
        400, "namespace", method="DELETE", path="/memory/documents/a", params={"namespace": "../x"}
    ),
    "delete namespace repeated, last bad": Bad(
        400, "namespace", method="DELETE", path="/memory/documents/a", params="namespace=ns&namespace=..%2Fx"
    ),
    "delete namespace bad percent-encoding": Bad(
        400, "namespace", method="DELETE", path="/memory/documents/a", params="namespace=%ZZ"
    ),
    "delete namespace nul": Bad(
        400, "namespace", method="DELETE", path="/memory/documents/a", params="namespace=%00"
    ),
    "delete namespace as an array": Bad(
        400, "query.namespace", method="DELETE", path="/memory/documents/a", params="namespace[]=ns"
    ),
    "delete 30 KB namespace": Bad(
        400, "namespace", method="DELETE", path="/memory/documents/a", params={"namespace": "n" * 30_000}
    ),
    # Unknown ids.
    "unknown job": Bad(404, None, method="GET", path="/memory/jobs/job-0000000000000000"),
    "job id of another key": Bad(404, None, method="GET", path="/memory/jobs/job-1:reflections"),
    "10 KB job id": Bad(404, None, method="GET", path="/memory/jobs/" + "j" * 10_000),
    "unknown document": Bad(
        404, None, method="DELETE", path="/memory/documents/nope", params={"namespace": "ns"}
    ),
    "unknown namespace": Bad(404, None, method="GET", path="/memory/namespaces/missing"),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
async def test_bad_input_is_a_4xx_envelope_and_the_gateway_stays_ready(app, bad):  # noqa: F811
    gateway = app()
    async with asgi_client(gateway) as client:
        response = await asyncio.wait_for(
            client.request(bad.method, bad.path, **bad.send_args()), timeout=DEADLINE_S
        )
        error = assert_error(response, bad.status, "invalid_request_error", bad.param)
        assert bad.says in error["message"]
        ready = await asyncio.wait_for(client.get("/ready"), timeout=DEADLINE_S)
    assert ready.status_code == 200, ready.text
    assert gateway.state.admission.in_flight == 0


async def test_empty_string_content_is_accepted(app):  # noqa: F811
    """OpenAI accepts "" as content, and Aerie's own replies can be empty: a client that
    sends a conversation back must not be refused for it."""
    body = chat_body(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    async with asgi_client(app()) as client:
        response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
