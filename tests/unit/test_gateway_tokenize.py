# ruff: noqa: F811  (the fixtures imported from test_gateway)
"""vLLM's /tokenize and /detokenize against the fake verifier: the request forms, the
response shape, the model check and the refusals."""

from __future__ import annotations

import pytest

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    CONTEXT_LENGTH,
    MODEL,
    asgi_client,
    assert_error,
    gateway_app,
    gateway_fake_verifier,
    gateway_redis_url,
)
from tests.unit.test_tools import WEATHER


async def post(gateway_app, path: str, body: dict, headers: dict | None = None):
    async with asgi_client(gateway_app()) as client:
        return await client.post(path, json=body, headers=headers or {})


async def test_a_prompt_is_tokenized_as_completions_read_it(gateway_app):
    response = await post(gateway_app, "/tokenize", {"model": MODEL, "prompt": "The quick fox"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "count": 4,
        "max_model_len": CONTEXT_LENGTH,
        "tokens": [1, 3, 5, 3],
        "token_strs": None,
    }
    bare = await post(
        gateway_app,
        "/tokenize",
        {"prompt": "The quick fox", "add_special_tokens": False, "return_token_strs": True},
    )
    assert bare.json()["tokens"] == [3, 5, 3] and bare.json()["token_strs"] == ["The", "quick", "fox"]


async def test_messages_are_tokenized_as_chats_render_them(gateway_app):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    response = await post(gateway_app, "/tokenize", {"messages": messages, "return_token_strs": True})
    assert response.status_code == 200, response.text
    assert response.json()["token_strs"] == ["system:", "Be", "brief.", "user:", "Hi", "there"]


async def test_tools_count_as_chats_render_them(gateway_app):
    messages = [{"role": "user", "content": "Hi"}]
    response = await post(
        gateway_app, "/tokenize", {"messages": messages, "tools": [WEATHER], "return_token_strs": True}
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_strs"] == ["get_weather", "user:", "Hi"]
    bare = await post(gateway_app, "/tokenize", {"prompt": "x", "tools": [WEATHER]})
    assert_error(bare, 400, "invalid_request_error", None)


async def test_tokens_are_detokenized(gateway_app):
    response = await post(gateway_app, "/detokenize", {"model": MODEL, "tokens": [3, 5, 3]})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": "3 5 3"}


@pytest.mark.parametrize(
    ("path", "body", "status", "error_type", "param"),
    [
        ("/tokenize", {}, 400, "invalid_request_error", None),
        (
            "/tokenize",
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            400,
            "invalid_request_error",
            None,
        ),
        ("/tokenize", {"messages": []}, 400, "invalid_request_error", "messages"),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404, "invalid_request_error", "model"),
        ("/detokenize", {"tokens": [-1]}, 400, "invalid_request_error", "tokens[0]"),
        ("/detokenize", {"tokens": [5000]}, 400, "invalid_request_error", None),  # the verifier's refusal
        ("/detokenize", {"tokens": "3 5"}, 400, "invalid_request_error", "tokens"),
    ],
)
async def test_bad_requests_are_refused_with_the_reason(gateway_app, path, body, status, error_type, param):
    response = await post(gateway_app, path, body)
    assert_error(response, status, error_type, param)
