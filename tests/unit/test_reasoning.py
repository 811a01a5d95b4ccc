# ruff: noqa: F811  (the fixtures imported from test_gateway)
"""Reasoning models' thinking apart from their answer (aerie_gateway.reasoning): the two
conventions, streams that add up to the whole reply, and the gateway's replies."""

from __future__ import annotations

import json

import pytest
from aerie_gateway.reasoning import StreamedReasoning, split
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    THINK,
    asgi_client,
    chat_body,
    gateway_app,
    gateway_fake_verifier,
    gateway_redis_url,
    sse_payloads,
)
from tests.unit.test_tools import WEATHER

CASES = [
    # (parser, output, reasoning, answer)
    ("qwen3", "<think>Two and two.</think>\n\nFour.", "Two and two.", "\n\nFour."),
    ("qwen3", "\n<think>x</think>y", "x", "y"),
    ("qwen3", "Four.", None, "Four."),  # asked not to think
    ("qwen3", "<think>cut short", "cut short", ""),
    ("qwen3", "<b>bold</b>", None, "<b>bold</b>"),
    ("qwen3", "", None, ""),
    ("deepseek_r1", "Two and two.</think>Four.", "Two and two.", "Four."),
    ("deepseek_r1", "<think>Two and two.</think>Four.", "Two and two.", "Four."),
    ("deepseek_r1", "never closed", "never closed", ""),
]


@pytest.mark.parametrize(("parser", "output", "reasoning", "answer"), CASES)
def test_an_output_splits_into_reasoning_and_answer(parser, output, reasoning, answer):
    assert split(parser, output) == (reasoning, answer)


def streamed(parser: str, pieces: list[str]) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    reader = StreamedReasoning(parser)
    return [reader.feed(piece) for piece in pieces], reader.finish()


@given(
    case=st.sampled_from(CASES),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
)
def test_a_stream_adds_up_to_the_whole_reply(case, cuts):
    parser, output, reasoning, answer = case
    bounds = sorted({0, len(output), *(cut for cut in cuts if cut < len(output))})
    pieces = [output[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    sent, rest = streamed(parser, pieces)
    assert "".join(r for r, _ in [*sent, rest]) == (reasoning or "")
    assert "".join(a for _, a in [*sent, rest]) == answer


def test_a_partial_tag_is_held_until_it_is_known():
    sent, rest = streamed("qwen3", ["<th", "ink>Hmm</th", "ink>Yes"])
    assert sent == [("", ""), ("Hmm", ""), ("", "Yes")] and rest == ("", "")
    sent, rest = streamed("qwen3", ["<th", "at>"])  # not the tag after all: all answer
    assert sent == [("", ""), ("", "<that>")]
    sent, rest = streamed("deepseek_r1", ["a </", "b"])  # "</" might have begun "</think>"
    assert sent == [("a ", ""), ("</b", "")] and rest == ("", "")


def test_an_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        StreamedReasoning("o1")


async def chat(app, body: dict):
    async with asgi_client(app) as client:
        return await client.post("/v1/chat/completions", json=body)


async def test_the_gateway_gives_the_thinking_apart(gateway_app):
    app = gateway_app(reasoning_parser="qwen3")
    message = (await chat(app, chat_body(THINK))).json()["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "Hello there.",
        "reasoning_content": "I should greet. ",
    }
    stream = await chat(app, chat_body(THINK, stream=True))
    deltas = [json.loads(p)["choices"][0]["delta"] for p in sse_payloads(stream.text) if p != "[DONE]"]
    deltas = [d for d in deltas if d]  # the last chunk's is empty
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "I should greet. "
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there."
    # without a parser the thinking is content, as the model wrote it
    plain = (await chat(gateway_app(), chat_body(THINK))).json()["choices"][0]["message"]
    assert plain == {"role": "assistant", "content": "<think>I should greet. </think>Hello there."}


async def test_tools_are_read_from_the_answer(gateway_app):
    app = gateway_app(reasoning_parser="qwen3")
    reply = (await chat(app, chat_body(THINK, tools=[WEATHER]))).json()["choices"][0]
    assert reply["message"]["reasoning_content"] == "I should greet. "
    assert reply["message"]["content"] == "Hello there." and "tool_calls" not in reply["message"]
