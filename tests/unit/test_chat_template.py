"""How chat messages go through the chat template (vLLM's add_generation_prompt,
continue_final_message and chat_template_kwargs): in the verifier's engine, and from the
gateway's request to the verifier, refusals included."""

# ruff: noqa: F811  (the fixtures imported from test_gateway)
from __future__ import annotations

import copy

import pytest
from aerie_verifier.chat_format import TemplateOptions
from aerie_verifier.engine import Engine

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    MODEL,
    asgi_client,
    assert_error,
    chat_body,
    gateway_app,
    gateway_fake_verifier,
    gateway_redis_url,
)

CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "The colour is"},
]


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # the test template, with a variable of its own
    tokenizer.chat_template = "{% if shout %}LOUD {% endif %}" + tokenizer.chat_template
    return Engine(tiny_model, tokenizer)


def rendered(engine, messages, **options) -> str:
    return engine.tokenizer.decode(engine.encode_chat(messages, None, TemplateOptions(**options)))


def test_an_assistant_turn_is_opened_unless_asked_not_to(engine):
    asked = CHAT[:1]
    assert rendered(engine, asked).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert rendered(engine, asked, add_generation_prompt=False).endswith("Name a colour.<|im_end|>\n")


def test_a_continued_message_is_left_open(engine):
    text = rendered(engine, CHAT, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe colour is")
    with pytest.raises(ValueError, match="set add_generation_prompt to false"):
        rendered(engine, CHAT, continue_final_message=True)


def test_template_variables_reach_the_template_and_may_not_override_its_parameters(engine):
    assert rendered(engine, CHAT[:1], kwargs={"shout": True}).startswith("LOUD ")
    assert not rendered(engine, CHAT[:1], kwargs={"shout": False}).startswith("LOUD ")
    for reserved in ("tokenize", "tools", "messages", "add_generation_prompt"):
        with pytest.raises(ValueError, match=f"may not set {reserved}"):
            rendered(engine, CHAT[:1], kwargs={reserved: True})


async def post(gateway_app, path: str, body: dict):
    async with asgi_client(gateway_app()) as client:
        return await client.post(path, json=body)


async def test_the_gateway_sends_the_fields_to_the_verifier(gateway_app, gateway_fake_verifier):
    fake, _ = gateway_fake_verifier
    body = chat_body(
        messages=CHAT,
        add_generation_prompt=False,
        continue_final_message=True,
        chat_template_kwargs={"enable_thinking": False},
    )
    response = await post(gateway_app, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    sent = fake.requests[response.json()["id"]].chat_template
    assert sent.HasField("add_generation_prompt") and not sent.add_generation_prompt
    assert sent.continue_final_message and sent.kwargs_json == '{"enable_thinking": false}'
    plain = await post(gateway_app, "/v1/chat/completions", chat_body())
    default = fake.requests[plain.json()["id"]].chat_template
    assert default.add_generation_prompt and not default.continue_final_message and not default.kwargs_json
    tokenized = await post(
        gateway_app,
        "/tokenize",
        {"messages": CHAT, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert tokenized.status_code == 200, tokenized.text
    assert fake.tokenize_requests[-1].chat_template.continue_final_message


CONTINUED = {"continue_final_message": True, "add_generation_prompt": False}


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"messages": CHAT, "continue_final_message": True}, None, "set add_generation_prompt to false"),
        ({"messages": CHAT[:1], **CONTINUED}, None, "must be the assistant's"),
        ({"messages": CHAT, "chat_template_kwargs": ["shout"]}, "chat_template_kwargs", "dictionary"),
        (
            {"messages": CHAT, **CONTINUED, "memory": {"namespace": "default"}},
            None,
            "the memory is asked the last message",
        ),
    ],
    ids=["both", "continuing a user's message", "variables not an object", "with memory"],
)
async def test_contradictory_template_fields_are_refused(gateway_app, fields, param, says):
    response = await post(gateway_app, "/v1/chat/completions", chat_body(**fields))
    assert says in assert_error(response, 400, "invalid_request_error", param)["message"]
