# ruff: noqa: F811  (the fixtures imported from test_gateway)
"""Legacy completions (/v1/completions) against the fake verifier: the prompt's forms, the
legacy response and logprobs shapes, echo, streaming, refusals, and OpenAI's client."""

from __future__ import annotations

import json

import openai
import pytest

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    MODEL,
    REPLY_WORDS,
    asgi_client,
    assert_error,
    gateway_app,
    gateway_fake_verifier,
    gateway_redis_url,
    served_over_http,
    sse_payloads,
)


def body(prompt="Once upon a time", **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, **extra}


async def complete(gateway_app, **fields):
    async with asgi_client(gateway_app()) as client:
        return await client.post("/v1/completions", json=body(**fields))


@pytest.mark.parametrize(
    ("prompt", "text", "token_ids"),
    [
        ("Once upon a time", "Once upon a time", []),
        (["Once upon a time"], "Once upon a time", []),  # a batch of one
        ([7, 8, 9], "", [7, 8, 9]),
        ([[7, 8, 9]], "", [7, 8, 9]),
    ],
    ids=["text", "list of one text", "token ids", "list of one token list"],
)
async def test_a_prompt_goes_to_the_verifier_as_it_is(
    gateway_app, gateway_fake_verifier, prompt, text, token_ids
):
    fake, _ = gateway_fake_verifier
    response = await complete(gateway_app, prompt=prompt)
    assert response.status_code == 200, response.text
    completion = response.json()
    sent = fake.requests[completion["id"]]
    assert (sent.prompt, list(sent.prompt_token_ids), list(sent.messages)) == (text, token_ids, [])
    assert sent.sampling.max_tokens == 16  # the legacy API's default
    assert completion["id"].startswith("cmpl-") and completion["object"] == "text_completion"
    [choice] = completion["choices"]
    assert choice == {"index": 0, "text": " ".join(REPLY_WORDS), "logprobs": None, "finish_reason": "stop"}
    assert completion["usage"]["completion_tokens"] == len(REPLY_WORDS)


async def test_sampling_fields_map_as_chats_do(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    response = await complete(
        gateway_app,
        max_tokens=5,
        temperature=0.25,
        stop=["\n"],
        seed=3,
        ignore_eos=True,
        min_tokens=2,
        structured_outputs={"regex": "[a-z ]+"},
        speculative=False,
    )
    sent = fake.requests[response.json()["id"]]
    assert (sent.sampling.max_tokens, sent.sampling.temperature, list(sent.sampling.stop)) == (
        5,
        0.25,
        ["\n"],
    )
    assert sent.sampling.seed == 3 and sent.sampling.ignore_eos and sent.sampling.min_tokens == 2
    assert sent.sampling.structured.regex == "[a-z ]+" and not sent.speculative
    assert response.json()["choices"][0]["finish_reason"] == "length"


async def test_legacy_logprobs_with_text_offsets(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    response = await complete(gateway_app, logprobs=2, max_tokens=3)
    choice = response.json()["choices"][0]
    sent = fake.requests[response.json()["id"]]
    assert sent.sampling.logprobs and sent.sampling.top_logprobs == 2
    logprobs = choice["logprobs"]
    tokens = [REPLY_WORDS[0], f" {REPLY_WORDS[1]}", f" {REPLY_WORDS[2]}"]
    assert logprobs["tokens"] == tokens and "".join(tokens) == choice["text"]
    assert logprobs["token_logprobs"] == [0.0, -0.25, -0.5]
    assert logprobs["text_offset"] == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    # the alternatives by text (the fake's second is half a character, no chance at all),
    # the chosen token among them
    assert logprobs["top_logprobs"][1] == {tokens[1]: -0.25, "\\xc3": -9999.0}


async def test_echo_puts_the_prompt_first(gateway_app):
    response = await complete(gateway_app, echo=True, max_tokens=2)
    assert response.json()["choices"][0]["text"] == "Once upon a time" + " ".join(REPLY_WORDS[:2])
    streamed = await complete(gateway_app, echo=True, max_tokens=2, stream=True)
    chunks = [json.loads(payload) for payload in sse_payloads(streamed.text)[:-1]]
    assert chunks[0]["choices"][0]["text"] == "Once upon a time"
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == response.json()["choices"][0]["text"]


async def test_echo_with_logprobs_scores_the_prompt_too(gateway_app, gateway_fake_verifier):
    """lm-eval's loglikelihood requests: echo, logprobs and a token of continuation."""
    fake, _ = gateway_fake_verifier
    response = await complete(gateway_app, prompt="Once upon a time", echo=True, logprobs=1, max_tokens=1)
    assert fake.requests[response.json()["id"]].sampling.prompt_logprobs
    choice = response.json()["choices"][0]
    assert choice["text"] == "Once upon a time" + REPLY_WORDS[0]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["Once", " upon", " a", " time", REPLY_WORDS[0]]
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -1.0, 0.0]
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {" upon": -1.0}
    assert logprobs["text_offset"] == [0, 4, 9, 11, 16]

    streamed = await complete(
        gateway_app, prompt="Once upon a time", echo=True, logprobs=1, max_tokens=1, stream=True
    )
    chunks = [json.loads(payload)["choices"][0] for payload in sse_payloads(streamed.text)[:-1]]
    assert chunks[0]["text"] == "Once upon a time" and chunks[0]["logprobs"]["token_logprobs"] == [
        None,
        -1.0,
        -1.0,
        -1.0,
    ]
    assert chunks[1]["logprobs"]["text_offset"] == [16]


async def test_echo_of_token_ids_spells_them(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    response = await complete(gateway_app, prompt=[7, 8, 9], echo=True, max_tokens=1)
    assert fake.requests[response.json()["id"]].sampling.prompt_logprobs
    assert response.json()["choices"][0]["text"] == "7 8 9" + REPLY_WORDS[0]
    plain = await complete(gateway_app, prompt="text", echo=True, max_tokens=1)
    assert not fake.requests[plain.json()["id"]].sampling.prompt_logprobs  # a text echoes as it is


async def test_streaming_chunks_then_usage_then_done(gateway_app):
    response = await complete(gateway_app, stream=True, logprobs=0, stream_options={"include_usage": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    words = chunks[:-2]
    assert "".join(chunk["choices"][0]["text"] for chunk in words) == " ".join(REPLY_WORDS)
    offsets = [chunk["choices"][0]["logprobs"]["text_offset"][0] for chunk in words]
    assert offsets == [len(" ".join(REPLY_WORDS[:i])) for i in range(len(REPLY_WORDS))]
    assert chunks[-2]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(REPLY_WORDS)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["one", ""]}, "prompt"),
        ({"prompt": [[7, 8], []]}, "prompt"),
        ({"prompt": [[7], [-1]]}, "prompt"),
        ({"prompt": ["one"] * 33, "n": 2}, None),  # 66 choices
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"suffix": "and then"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 17}, "n"),
    ],
)
async def test_invalid_completion_requests_are_400(gateway_app, fields, param):
    response = await complete(gateway_app, **fields)
    assert_error(response, 400, "invalid_request_error", param)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"suffix": "and then"}, "suffix (fill-in-the-middle) is not supported"),
        ({"best_of": 3}, "n asks for"),
    ],
)
async def test_what_completions_do_not_support_is_named(gateway_app, fields, says):
    response = await complete(gateway_app, **fields)
    assert says in assert_error(response, 400, "invalid_request_error", next(iter(fields)))["message"]


async def test_n_completions(gateway_app):
    response = await complete(gateway_app, n=2, max_tokens=2, echo=True)
    choices = response.json()["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    assert all(choice["text"] == "Once upon a time" + " ".join(REPLY_WORDS[:2]) for choice in choices)
    streamed = await complete(gateway_app, n=2, max_tokens=2, stream=True)
    chunks = [json.loads(payload)["choices"][0] for payload in sse_payloads(streamed.text)[:-1]]
    for index in (0, 1):
        assert "".join(chunk["text"] for chunk in chunks if chunk["index"] == index) == " ".join(
            REPLY_WORDS[:2]
        )


async def test_a_batch_of_prompts_gets_n_choices_each(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    prompts = ["Once upon a time", "In a galaxy far away"]
    response = await complete(gateway_app, prompt=prompts, n=2, max_tokens=2, echo=True)
    assert response.status_code == 200, response.text
    completion = response.json()
    reply = " ".join(REPLY_WORDS[:2])
    assert [(choice["index"], choice["text"]) for choice in completion["choices"]] == [
        (0, prompts[0] + reply),
        (1, prompts[0] + reply),
        (2, prompts[1] + reply),
        (3, prompts[1] + reply),
    ]
    sent = [fake.requests[f"{completion['id']}-p{p}-{c}"] for p in (0, 1) for c in (0, 1)]
    assert [request.prompt for request in sent] == [prompts[0]] * 2 + [prompts[1]] * 2
    # each prompt counted once (the fake verifier counts words, and caches all but one)
    assert completion["usage"]["prompt_tokens"] == 4 + 5
    assert completion["usage"]["prompt_tokens_details"] == {"cached_tokens": 3 + 4}
    assert completion["usage"]["completion_tokens"] == 4 * 2

    ids = await complete(gateway_app, prompt=[[7, 8, 9], [10, 11]], echo=True, max_tokens=1, stream=True)
    chunks = [json.loads(payload)["choices"][0] for payload in sse_payloads(ids.text)[:-1]]
    for index, echo in enumerate(["7 8 9", "10 11"]):
        assert "".join(chunk["text"] for chunk in chunks if chunk["index"] == index) == echo + REPLY_WORDS[0]


async def test_openai_client_completions(gateway_app):
    with served_over_http(gateway_app()) as base_url:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        completion = await client.completions.create(
            model=MODEL, prompt="Say hello.", max_tokens=4, logprobs=1
        )
        assert completion.choices[0].text == " ".join(REPLY_WORDS[:4])
        assert completion.choices[0].logprobs.tokens[0] == REPLY_WORDS[0]
        stream = await client.completions.create(model=MODEL, prompt="Say hello.", max_tokens=3, stream=True)
        assert "".join([chunk.choices[0].text async for chunk in stream if chunk.choices]) == " ".join(
            REPLY_WORDS[:3]
        )
        await client.close()
