"""End to end through the running stack: gateway (HTTP) → verifier (gRPC) → SmolLM2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from aerie_proto.v1 import verifier_pb2, verifier_pb2_grpc

from .conftest import ROOT, free_port

pytestmark = pytest.mark.integration

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def chat(stack, **body):
    body.setdefault("model", "smollm2-135m-instruct")
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=120)


def test_ready_names_every_backend(stack):
    response = httpx.get(f"{stack.base_url}/ready", timeout=10)
    assert response.status_code == 200
    assert set(response.json()["backends"]) == {"verifier", "drafter", "memory", "redis"}


def test_capital_of_france_is_paris(stack):
    response = chat(stack, messages=CAPITAL, temperature=0, max_tokens=32)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 10 and body["usage"]["completion_tokens"] > 0


def test_streaming_ends_with_done_and_reports_usage(stack):
    body = {
        "model": "smollm2-135m-instruct",
        "messages": CAPITAL,
        "temperature": 0,
        "max_tokens": 32,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"]["completion_tokens"] > 0


def test_missing_messages_is_400_with_envelope(stack):
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json={"model": "smollm2-135m-instruct"}, timeout=30
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert "messages" in (error["param"] or "") + error["message"]


def test_prompt_over_context_is_400_saying_by_how_much(stack):
    long_text = "hello " * 9000
    response = chat(stack, messages=[{"role": "user", "content": long_text}], max_tokens=8)
    assert response.status_code == 400
    assert "too many" in response.json()["error"]["message"]


def test_openai_client_streaming_and_not(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=CAPITAL, temperature=0, max_tokens=32
    )
    assert "Paris" in completion.choices[0].message.content
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=CAPITAL, temperature=0, max_tokens=32, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == completion.choices[0].message.content


@pytest.mark.parametrize("repetition_penalty", [None, 1.3], ids=["plain", "repetition_penalty"])
def test_verifier_greedy_matches_hf_generate_with_and_without_speculation(stack, repetition_penalty):
    """The engine's KV-cached decoding reproduces transformers' greedy generate() on the
    real model in fp32, and so does tree speculation with the stack's drafter over gRPC;
    with a repetition penalty too (transformers' own, over the prompt and the output). So do
    the same requests sent at once: plain steps in one ragged batch, speculation paused
    beside the others and resumed alone."""
    from aerie_common.model_store import load_target
    from aerie_common.settings import ModelSettings

    model, tokenizer, _ = load_target(ModelSettings())
    prompts = ["Name three primary colours.", "Write a haiku about the sea.", "What is 12 times 7?"]
    penalty = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}

    async def generate(channel, prompt, speculative):
        stub = verifier_pb2_grpc.VerifierStub(channel)
        request = verifier_pb2.GenerateRequest(
            messages=[verifier_pb2.ChatMessage(role="user", content=prompt)],
            sampling=verifier_pb2.SamplingParams(max_tokens=40, **penalty),
            speculative=speculative,
        )
        responses = [r async for r in stub.Generate(request)]
        return [t for r in responses for t in r.token_ids], responses[-1]

    async def all_prompts(speculative):
        async with grpc.aio.insecure_channel(stack.addr("verifier")) as channel:
            return [await generate(channel, p, speculative) for p in prompts]

    async def all_at_once(speculative):
        async with grpc.aio.insecure_channel(stack.addr("verifier")) as channel:
            return await asyncio.gather(*(generate(channel, p, speculative) for p in prompts))

    plain = asyncio.run(all_prompts(False))
    speculative = asyncio.run(all_prompts(True))
    together = asyncio.run(all_at_once(False)) + asyncio.run(all_at_once(True))
    for i, prompt in enumerate(prompts):
        (tokens, last), (spec_tokens, spec_last) = plain[i], speculative[i]
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        reference = model.generate(ids, max_new_tokens=40, do_sample=False, **penalty)[
            0, ids.shape[1] :
        ].tolist()
        eos = tokenizer.eos_token_id
        reference = reference[: reference.index(eos)] if eos in reference else reference
        assert tokens == reference, prompt
        assert spec_tokens == reference, prompt
        assert together[i][0] == reference and together[len(prompts) + i][0] == reference, prompt
        assert len(tokens) > 3
        assert not last.HasField("speculative")
        assert spec_last.speculative.drafts > 0
        assert sum(spec_last.speculative.accepted_per_position[:1]) <= spec_last.speculative.drafts


def test_chat_speculative_on_and_off_give_the_same_text(stack):
    questions = ["Give me two tips for better sleep.", "What is a prime number?"]
    before = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    for question in questions:
        messages = [{"role": "user", "content": question}]
        off = chat(stack, messages=messages, temperature=0, max_tokens=32, speculative=False).json()
        on = chat(stack, messages=messages, temperature=0, max_tokens=32, speculative=True).json()
        assert on["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]
        assert "speculative" not in off["usage"]
        spec = on["usage"]["speculative"]
        assert spec["drafts"] > 0 and spec["draft_tokens"] >= spec["drafts"]
        expected_length = on["usage"]["completion_tokens"] / (spec["drafts"] + 1)
        assert spec["mean_acceptance_length"] >= 1.0 and expected_length > 0
    after = httpx.get(f"{stack.base_url}/metrics", timeout=10).text

    def value(text, name):
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert value(after, "aerie:spec_decode_num_drafts_total") > value(
        before, "aerie:spec_decode_num_drafts_total"
    )


def test_a_chats_next_turn_starts_from_the_first_turns_cache(stack):
    """The second turn resends the first and its reply: the verifier's prefix cache holds
    them, usage says so, and the answer is still the target's own greedy one."""
    from aerie_common.model_store import load_target
    from aerie_common.settings import ModelSettings

    first = [{"role": "user", "content": "Name one large city in Japan."}]
    one = chat(stack, messages=first, temperature=0, max_tokens=24).json()
    second = [
        *first,
        {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
        {"role": "user", "content": "What is that city famous for?"},
    ]
    two = chat(stack, messages=second, temperature=0, max_tokens=24).json()
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= one["usage"]["prompt_tokens"]
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] < two["usage"]["prompt_tokens"]

    model, tokenizer, _ = load_target(ModelSettings())
    ids = tokenizer.apply_chat_template(second, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids.shape[1] == two["usage"]["prompt_tokens"]
    reference = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    expected = tokenizer.decode(reference, skip_special_tokens=True)
    assert two["choices"][0]["message"]["content"] == expected


def test_logprobs_and_penalties_with_and_without_speculation(stack):
    messages = [{"role": "user", "content": "List five fruits, one per line."}]
    asked = {"temperature": 0, "max_tokens": 32, "logprobs": True, "top_logprobs": 3}
    plain = chat(stack, messages=messages, speculative=False, **asked).json()
    penalized = {"presence_penalty": 1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.2}
    replies = [
        chat(stack, messages=messages, speculative=spec, **asked, **penalized).json()
        for spec in (False, True)
    ]
    off, on = replies
    assert on["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]
    assert on["usage"]["speculative"]["accepted_tokens"] > 0
    assert off["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    for reply in (plain, off, on):
        content = reply["choices"][0]["logprobs"]["content"]
        assert len(content) == reply["usage"]["completion_tokens"]
        assert (
            b"".join(bytes(entry["bytes"]) for entry in content).decode()
            == reply["choices"][0]["message"]["content"]
        )
        for entry in content:
            top = [alternative["logprob"] for alternative in entry["top_logprobs"]]
            assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] <= 0
            assert entry["logprob"] <= top[0] + 1e-4
    # greedy without penalties takes the most likely token every time
    assert all(
        entry["token"] == entry["top_logprobs"][0]["token"]
        for entry in plain["choices"][0]["logprobs"]["content"]
    )
    # the same tokens scored by a tree forward and by plain steps: fp32 noise apart, the same
    for spec_entry, plain_entry in zip(
        on["choices"][0]["logprobs"]["content"], off["choices"][0]["logprobs"]["content"], strict=True
    ):
        assert spec_entry["token"] == plain_entry["token"]
        assert abs(spec_entry["logprob"] - plain_entry["logprob"]) < 1e-3


def test_logit_bias_bans_a_token_with_and_without_speculation(stack):
    async def token_ids(text):
        async with grpc.aio.insecure_channel(stack.addr("verifier")) as channel:
            reply = await verifier_pb2_grpc.VerifierStub(channel).Tokenize(
                verifier_pb2.TokenizeRequest(text=text)
            )
            return list(reply.token_ids)

    banned = {str(token): -100 for text in (" Paris", "Paris") for token in asyncio.run(token_ids(text))}
    replies = [
        chat(
            stack, messages=CAPITAL, temperature=0, max_tokens=32, logit_bias=banned, speculative=spec
        ).json()
        for spec in (False, True)
    ]
    texts = [reply["choices"][0]["message"]["content"] for reply in replies]
    assert texts[0] == texts[1]
    assert "Paris" not in texts[0] and len(texts[0]) > 10


COUNTRY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "capital": {"type": "string", "maxLength": 40},
        "continent": {"enum": ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]},
    },
    "required": ["name", "capital", "continent"],
    "additionalProperties": False,
}


def test_structured_outputs_with_and_without_speculation(stack):
    jsonschema = pytest.importorskip("jsonschema")
    messages = [{"role": "user", "content": "Describe France as JSON: its name, capital and continent."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "country", "schema": COUNTRY}}
    replies = [
        chat(
            stack,
            messages=messages,
            temperature=0,
            max_tokens=80,
            response_format=response_format,
            speculative=spec,
        ).json()
        for spec in (False, True)
    ]
    texts = [reply["choices"][0]["message"]["content"] for reply in replies]
    assert texts[0] == texts[1]
    assert replies[1]["usage"]["speculative"]["accepted_tokens"] > 0
    jsonschema.validate(json.loads(texts[0]), COUNTRY)
    assert replies[0]["choices"][0]["finish_reason"] == "stop"

    question = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
    choice = chat(
        stack, messages=question, temperature=0, structured_outputs={"choice": ["yes", "no"]}
    ).json()
    assert choice["choices"][0]["message"]["content"] in ("yes", "no")
    date = chat(
        stack, messages=question, temperature=0, structured_outputs={"regex": r"[0-9]{4}-[0-9]{2}"}
    ).json()
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", date["choices"][0]["message"]["content"])

    bad = chat(stack, messages=question, structured_outputs={"regex": "(unclosed"})
    assert bad.status_code == 400 and "regex does not compile" in bad.json()["error"]["message"]


def test_legacy_completions_continue_a_raw_prompt(stack):
    prompt = "The capital of France is"
    url = f"{stack.base_url}/v1/completions"
    fields = {"model": "smollm2-135m-instruct", "max_tokens": 12, "temperature": 0}
    replies = [
        httpx.post(
            url, json={**fields, "prompt": prompt, "logprobs": 1, "speculative": spec}, timeout=120
        ).json()
        for spec in (False, True)
    ]
    texts = [reply["choices"][0]["text"] for reply in replies]
    assert texts[0] == texts[1] and "Paris" in texts[0]
    assert replies[1]["usage"]["speculative"]["drafts"] > 0
    logprobs = replies[0]["choices"][0]["logprobs"]
    assert (
        "".join(logprobs["tokens"]) == texts[0]
        and len(logprobs["tokens"]) == replies[0]["usage"]["completion_tokens"]
    )

    async def token_ids():
        async with grpc.aio.insecure_channel(stack.addr("verifier")) as channel:
            reply = await verifier_pb2_grpc.VerifierStub(channel).Tokenize(
                verifier_pb2.TokenizeRequest(text=prompt)
            )
            return list(reply.token_ids)

    by_ids = httpx.post(url, json={**fields, "prompt": asyncio.run(token_ids())}, timeout=120).json()
    assert by_ids["choices"][0]["text"] == texts[0]
    assert by_ids["usage"]["prompt_tokens"] == replies[0]["usage"]["prompt_tokens"]

    events = []
    with httpx.stream(
        "POST", url, json={**fields, "prompt": prompt, "stream": True, "echo": True}, timeout=120
    ) as response:
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1]) == prompt + texts[0]

    # a batch: each prompt's choice is what that prompt alone gets
    other = "The largest planet of the solar system is"
    alone = httpx.post(url, json={**fields, "prompt": other}, timeout=120).json()
    batch = httpx.post(url, json={**fields, "prompt": [prompt, other]}, timeout=120).json()
    assert [choice["text"] for choice in batch["choices"]] == [texts[0], alone["choices"][0]["text"]]
    assert (
        batch["usage"]["prompt_tokens"]
        == replies[0]["usage"]["prompt_tokens"] + alone["usage"]["prompt_tokens"]
    )


def test_tokenize_counts_what_each_endpoint_reads_and_detokenize_inverts_it(stack):
    prompt = "The capital of France is"
    tokenized = httpx.post(
        f"{stack.base_url}/tokenize", json={"prompt": prompt, "return_token_strs": True}, timeout=60
    ).json()
    completion = httpx.post(
        f"{stack.base_url}/v1/completions",
        json={"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 1},
        timeout=120,
    ).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == completion["usage"]["prompt_tokens"]
    assert tokenized["token_strs"][-1] == "Ġis" and tokenized["max_model_len"] == 8192
    back = httpx.post(f"{stack.base_url}/detokenize", json={"tokens": tokenized["tokens"]}, timeout=60)
    assert back.json() == {"prompt": prompt}

    of_chat = httpx.post(f"{stack.base_url}/tokenize", json={"messages": CAPITAL}, timeout=60).json()
    reply = chat(stack, messages=CAPITAL, temperature=0, max_tokens=1).json()
    assert of_chat["count"] == reply["usage"]["prompt_tokens"]


def test_a_reply_begun_for_the_model_is_continued(stack):
    """vLLM's continue_final_message: the last message, the assistant's, is left open in the
    prompt and the output goes on with it; /tokenize reads the same prompt."""
    begun = [*CAPITAL, {"role": "assistant", "content": "The capital of France is"}]
    fields = {"add_generation_prompt": False, "continue_final_message": True}
    reply = chat(stack, messages=begun, temperature=0, max_tokens=8, **fields).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert not reply["choices"][0]["message"]["content"].startswith("The capital")  # the rest only
    tokenized = httpx.post(
        f"{stack.base_url}/tokenize", json={"messages": begun, **fields}, timeout=60
    ).json()
    assert tokenized["count"] == reply["usage"]["prompt_tokens"]
    prompt = httpx.post(f"{stack.base_url}/detokenize", json={"tokens": tokenized["tokens"]}, timeout=60)
    assert prompt.json()["prompt"].endswith("<|im_start|>assistant\nThe capital of France is")
    # SmolLM2's template takes no variables, and ignores one it does not know
    other = chat(stack, messages=CAPITAL, temperature=0, max_tokens=8, chat_template_kwargs={"x": 1}).json()
    assert (
        other["choices"][0]["message"]["content"]
        == chat(stack, messages=CAPITAL, temperature=0, max_tokens=8).json()["choices"][0]["message"][
            "content"
        ]
    )


def test_function_calling_on_the_real_model(stack):
    """SmolLM2's template has no place for tools: they are described in a system message.
    A forced call is JSON that matches the function's parameters; a chat that carries a
    call and its result renders and is answered."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    question = [{"role": "user", "content": "What is the weather like in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = chat(
        stack, messages=question, tools=[weather], tool_choice=named, temperature=0, max_tokens=40
    ).json()
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}

    required = chat(
        stack, messages=question, tools=[weather], tool_choice="required", temperature=0, max_tokens=60
    )
    calls = required.json()["choices"][0]["message"]["tool_calls"]
    assert required.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert all(
        c["function"]["name"] == "get_weather" and "city" in json.loads(c["function"]["arguments"])
        for c in calls
    )

    history = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [{**call, "type": "function"}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"},
    ]
    answer = chat(stack, messages=history, tools=[weather], temperature=0, max_tokens=24)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0


def test_loglikelihood_requests_as_lm_eval_sends_them(stack):
    """echo + logprobs + one token: the prompt's own log probabilities, scored by the model."""

    def continuation_logprob(context, continuation):
        body = {
            "model": "smollm2-135m-instruct",
            "prompt": context + continuation,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,
            "echo": True,
        }
        reply = httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=120).json()
        choice = reply["choices"][0]
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(context + continuation)
        assert len(logprobs["tokens"]) == reply["usage"]["prompt_tokens"] + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert logprobs["text_offset"][-1] == len(context + continuation)
        # the continuation's tokens: those starting at or after the context's end
        starts = logprobs["text_offset"][:-1]
        return sum(
            lp for start, lp in zip(starts, logprobs["token_logprobs"], strict=False) if start >= len(context)
        )

    context = "The capital of France is"
    assert continuation_logprob(context, " Paris") > continuation_logprob(context, " Berlin") + 2


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(stack):
    messages = [{"role": "user", "content": "Write a short poem about rain."}]
    for seed in (1, 2):
        fields = {"messages": messages, "temperature": 0.8, "top_p": 0.95, "seed": seed, "max_tokens": 48}
        off = chat(stack, speculative=False, **fields).json()
        on = chat(stack, speculative=True, **fields).json()
        assert on["choices"][0]["message"]["content"] == off["choices"][0]["message"]["content"]
        assert on["usage"]["speculative"]["accepted_tokens"] > 0


def test_n_sampled_choices_differ_and_each_reproduces(stack):
    fields = {"messages": CAPITAL, "n": 3, "temperature": 1.0, "seed": 11, "max_tokens": 24}
    first, again = (chat(stack, **fields).json() for _ in range(2))
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1
    assert texts == [choice["message"]["content"] for choice in again["choices"]]
    assert first["usage"]["completion_tokens"] == sum(
        chat(stack, **{**fields, "n": 1, "seed": 11 + index}).json()["usage"]["completion_tokens"]
        for index in range(3)
    )


def test_cancelled_stream_stops_generation(stack):
    async def scenario():
        async with grpc.aio.insecure_channel(stack.addr("verifier")) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            before = await stub.GetLoad(verifier_pb2.LoadRequest())
            call = stub.Generate(
                verifier_pb2.GenerateRequest(
                    messages=[verifier_pb2.ChatMessage(role="user", content="Tell me a very long story.")],
                    sampling=verifier_pb2.SamplingParams(max_tokens=4000, temperature=0.8, seed=1),
                )
            )
            received = 0
            async for _ in call:
                received += 1
                if received == 3:
                    break
            call.cancel()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                load = await stub.GetLoad(verifier_pb2.LoadRequest())
                if load.cancelled_total > before.cancelled_total and load.running == 0:
                    return load, before
                await asyncio.sleep(0.1)
            raise AssertionError(f"generation still running after cancel: {load}")

    load, before = asyncio.run(scenario())
    assert load.cancelled_total == before.cancelled_total + 1


def test_api_keys_are_enforced(stack):
    port = free_port()
    env = dict(stack.env, AERIE_API_KEYS="k-one,k-two", AERIE_GATEWAY_PORT=str(port))
    env.update(
        AERIE_VERIFIER_ADDR=stack.addr("verifier"),
        AERIE_DRAFTER_ADDR=stack.addr("drafter"),
        AERIE_MEMORY_ADDR=stack.addr("memory"),
    )
    gateway = subprocess.Popen([sys.executable, "-m", "aerie_gateway"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "smollm2-135m-instruct", "messages": CAPITAL, "max_tokens": 4}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.2)
        missing = httpx.post(url, json=body, timeout=30)
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        right = httpx.post(url, json=body, headers={"Authorization": "Bearer k-two"}, timeout=60)
        assert right.status_code == 200, right.text
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)


def test_killing_the_drafter_mid_stream_keeps_the_output_and_it_restarts(stack):
    messages = [{"role": "user", "content": "Describe a walk through a forest in detail."}]
    plain = chat(stack, messages=messages, temperature=0, max_tokens=80, speculative=False).json()
    expected = plain["choices"][0]["message"]["content"]

    old_pid = stack.child_pid("aerie_drafter")
    body = dict(
        model="smollm2-135m-instruct",
        messages=messages,
        temperature=0,
        max_tokens=80,
        stream=True,
        speculative=True,
    )
    text, killed = [], False
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content") or "")
            if not killed and len("".join(text)) > 20:
                os.kill(old_pid, signal.SIGKILL)
                killed = True
    assert killed
    assert "".join(text) == expected

    # The launcher restarts it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            new_pid = stack.child_pid("aerie_drafter")
        except LookupError:
            new_pid = None
        if new_pid and new_pid != old_pid:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("drafter was not restarted")
    stack.wait_ready(60)
    assert any(line.startswith("drafter") and "restarting" in line for line in stack.log)
