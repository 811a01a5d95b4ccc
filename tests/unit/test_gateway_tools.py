# ruff: noqa: F811  (the fixtures imported from test_gateway)
"""Function calling through the gateway against the fake verifier: what goes to the
verifier, and tool calls in replies, streamed and not, and through OpenAI's client."""

from __future__ import annotations

import json

import openai

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    CALL_A_TOOL,
    MODEL,
    REPLY_WORDS,
    asgi_client,
    chat_body,
    gateway_app,
    gateway_fake_verifier,
    gateway_redis_url,
    served_over_http,
    sse_payloads,
)
from tests.unit.test_tools import HISTORY, TIME, WEATHER


async def chat(gateway_app, body: dict):
    async with asgi_client(gateway_app()) as client:
        return await client.post("/v1/chat/completions", json=body)


async def test_a_tool_call_in_the_output_is_a_tool_call_in_the_reply(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    response = await chat(gateway_app, chat_body(CALL_A_TOOL, tools=[WEATHER, TIME]))
    assert response.status_code == 200, response.text
    completion = response.json()
    [choice] = completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Checking."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    sent = fake.requests[completion["id"]]
    assert [tool["function"]["name"] for tool in json.loads(sent.tools_json)] == ["get_weather", "get_time"]
    assert not sent.sampling.HasField("structured")  # "auto": the model chooses


async def test_a_forced_tool_choice_constrains_decoding(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = await chat(gateway_app, chat_body(tools=[WEATHER, TIME], tool_choice=named))
    sent = fake.requests[response.json()["id"]]
    assert json.loads(sent.sampling.structured.json_schema) == WEATHER["function"]["parameters"]
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # OpenAI's, for a function the request named
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    required = await chat(gateway_app, chat_body(tools=[WEATHER], tool_choice="required"))
    schema = json.loads(fake.requests[required.json()["id"]].sampling.structured.json_schema)
    assert schema["type"] == "array"
    none = await chat(gateway_app, chat_body(CALL_A_TOOL, tools=[WEATHER], tool_choice="none"))
    assert fake.requests[none.json()["id"]].tools_json == ""
    assert "tool_calls" not in none.json()["choices"][0]["message"]  # text, even if it looks like a call


async def test_a_chat_with_tool_results_reaches_the_verifier_whole(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    response = await chat(gateway_app, {"model": MODEL, "messages": HISTORY, "tools": [WEATHER]})
    assert response.status_code == 200, response.text
    sent = fake.requests[response.json()["id"]]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert json.loads(sent.messages[1].tool_calls_json) == HISTORY[1]["tool_calls"]
    assert sent.messages[2].tool_call_id == "c1" and sent.messages[2].content == "12 C, rain"


async def test_streamed_content_goes_out_as_it_comes_and_the_calls_at_the_end(gateway_app):
    response = await chat(gateway_app, chat_body(CALL_A_TOOL, tools=[WEATHER], stream=True))
    chunks = [json.loads(payload) for payload in sse_payloads(response.text)[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [delta.get("content") for delta in deltas[1:3]] == ["Checking.", " "]  # before the tag
    [call] = deltas[-2]["tool_calls"]
    assert "content" not in deltas[-2]
    assert call["index"] == 0 and call["function"]["arguments"] == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
    assert len(chunks) == 5  # nothing of the call went out as content
    plain = await chat(
        gateway_app, chat_body(tools=[WEATHER], stream=True)
    )  # no call: streamed as without tools
    words = [json.loads(p)["choices"][0]["delta"].get("content") for p in sse_payloads(plain.text)[1:-2]]
    assert len(words) == len(REPLY_WORDS)
    assert json.loads(sse_payloads(plain.text)[-2])["choices"][0]["finish_reason"] == "stop"


async def test_openai_client_reads_the_tool_calls(gateway_app):
    with served_over_http(gateway_app()) as base_url:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": CALL_A_TOOL}]
        completion = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
        [call] = completion.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris"
        }
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], stream=True
        )
        streamed = [
            tc
            for chunk in [c async for c in stream]
            if chunk.choices
            for tc in chunk.choices[0].delta.tool_calls or ()
        ]
        assert [tc.function.name for tc in streamed] == ["get_weather"]
        await client.close()
