"""Function calling: what a chat with tools asks of the verifier (aerie_gateway.tools), how
the output becomes tool calls, and how tools reach a chat template that knows them or one
that does not (aerie_verifier.chat_format)."""

from __future__ import annotations

import json

import pytest
from aerie_gateway.schemas import ChatCompletionRequest
from aerie_gateway.tools import StreamedReply, ToolUse
from aerie_verifier.chat_format import template_inputs, template_knows_tools
from aerie_verifier.engine import Engine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def tool_use(**fields) -> ToolUse | None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], **fields}
    return ToolUse.of(ChatCompletionRequest.model_validate(body))


def calls(reply) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in reply[1]]


def test_no_tools_or_tool_choice_none_is_a_plain_chat():
    assert (
        ToolUse.of(
            ChatCompletionRequest.model_validate(
                {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            )
        )
        is None
    )
    assert tool_use(tool_choice="none") is None
    assert tool_use().constraint() is None and not tool_use().forced  # "auto" by default


def test_a_named_function_holds_the_output_to_its_arguments():
    use = tool_use(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(use.constraint().json_schema) == WEATHER["function"]["parameters"]
    content, [call] = use.reply(' {"city": "Paris"} ')
    assert content is None and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id.startswith("call_")
    no_parameters = tool_use(tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(no_parameters.constraint().json_schema) == {"type": "object"}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_holds_the_output_to_a_list_of_calls(parallel):
    use = tool_use(tool_choice="required", parallel_tool_calls=parallel)
    schema = json.loads(use.constraint().json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1 and ("maxItems" in schema) != parallel
    names = [option["properties"]["name"]["const"] for option in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert schema["items"]["anyOf"][0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    output = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    assert calls(use.reply(output)) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert use.reply('[{"name": "get_weather", "argu') == ('[{"name": "get_weather", "argu', [])  # cut short


def test_auto_reads_hermes_blocks_and_bare_calls_and_leaves_text_as_content():
    use = tool_use()
    both = 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    content, _ = reply = use.reply(both)
    assert content == "Let me check." and calls(reply) == [("get_weather", {"city": "Rome"})]
    unterminated = '<tool_call>\n{"name": "get_time", "arguments": {}}'  # EOS came before the closing tag
    assert calls(use.reply(unterminated)) == [("get_time", {})]
    llama = '{"name": "get_weather", "parameters": {"city": "Lima"}}'  # Llama 3.1's spelling
    assert use.reply(llama)[0] is None and calls(use.reply(llama)) == [("get_weather", {"city": "Lima"})]
    assert calls(use.reply(f"<|python_tag|>{llama}")) == calls(use.reply(llama))  # where specials show
    for text in (
        "It is sunny.",
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # not a tool
        '<tool_call>{"name": "get_time", "arguments": {</tool_call>',  # not JSON
        '{"answer": 42}',
    ):
        assert use.reply(text) == (text, [])
    mistral = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert calls(use.reply(mistral)) == [("get_time", {}), ("get_weather", {"city": "Oslo"})]
    assert calls(use.reply(mistral.removeprefix("[TOOL_CALLS] "))) == calls(use.reply(mistral))
    assert len(tool_use(parallel_tool_calls=False).reply(mistral)[1]) == 1
    for text in (
        '[{"name": "get_time", "arguments": {}}, {"answer": 42}]',
        "[a link](https://example.org)",
        "[]",
    ):
        assert use.reply(text) == (text, [])
    # Llama 3.2's and 4's pythonic calls: literal keyword arguments of known functions
    pythonic = '[get_weather(city="Oslo", days=[1, 2], metric=True), get_time()]'
    assert use.reply(pythonic)[0] is None
    assert calls(use.reply(pythonic)) == [
        ("get_weather", {"city": "Oslo", "days": [1, 2], "metric": True}),
        ("get_time", {}),
    ]
    assert calls(use.reply(f"<|python_start|>{pythonic}<|python_end|>")) == calls(use.reply(pythonic))
    for text in (
        "[launch_rockets(count=3)]",  # not a tool
        '[get_weather("Oslo")]',  # positional
        "[get_weather(city=home)]",  # not a literal
        "[get_weather(**where)]",
        "[get_weather(city={1, 2})]",  # a set: not JSON
        "[1, 2]",
    ):
        assert use.reply(text) == (text, [])
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert len(use.reply(two)[1]) == 2
    assert len(tool_use(parallel_tool_calls=False).reply(two)[1]) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required", "tools": None},
        {"tools": [WEATHER, WEATHER]},
        {"tool_choice": "required", "response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
    ],
)
def test_inconsistent_tool_requests_are_refused(fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], **fields}
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate(body)


HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "content": "12 C, rain", "tool_call_id": "c1"},
]


def test_a_template_without_tools_gets_them_spelled_in_a_system_message():
    messages, tools = template_inputs(HISTORY, [WEATHER], native=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in messages[0]["content"] and "<tools>" in messages[0]["content"]
    assert (
        messages[2]["content"]
        == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    assert messages[3]["content"] == "<tool_response>\n12 C, rain\n</tool_response>"
    with_system, _ = template_inputs(
        [{"role": "system", "content": "Be brief."}, *HISTORY], [WEATHER], native=False
    )
    assert with_system[0]["content"].startswith("Be brief.\n\n") and len(with_system) == 4


def test_a_template_with_tools_gets_them_as_transformers_passes_them():
    messages, tools = template_inputs(HISTORY, [WEATHER], native=True)
    assert tools == [WEATHER]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # an object, not text
    assert messages[2] == HISTORY[2]


TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_the_engine_renders_tools_with_either_kind_of_template(tiny_model, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    plain_template = tokenizer.chat_template
    assert not template_knows_tools(tokenizer)
    engine = Engine(tiny_model, tokenizer)
    spelled = tokenizer.decode(engine.encode_chat(HISTORY, [WEATHER]))
    assert "<tools>" in spelled and "<tool_response>" in spelled
    try:
        tokenizer.chat_template = TOOL_TEMPLATE
        engine = Engine(tiny_model, tokenizer)
        assert engine.template_knows_tools
        native = tokenizer.decode(engine.encode_chat(HISTORY, [WEATHER]))
        assert native.startswith("TOOLS:get_weather;") and "CALL get_weather(Oslo)" in native
        assert "tool: 12 C, rain" in native
    finally:
        tokenizer.chat_template = plain_template


def stream(use: ToolUse, deltas: list[str]) -> tuple[list[str], str | None, list[tuple[str, dict]]]:
    reply = StreamedReply(use)
    sent = [reply.feed(delta) for delta in deltas]
    rest, made = reply.finish()
    return sent, rest, calls((None, made))


def test_streamed_content_stops_where_a_call_may_begin():
    use = tool_use()
    call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    sent, rest, made = stream(use, ["It is ", "late.<tool", call[5:]])
    assert sent == ["It is ", "late.", ""] and rest is None and made == [("get_time", {})]
    # a partial tag that was not one goes out once that is clear
    sent, rest, made = stream(use, ["a <to", "y> b"])
    assert sent == ["a ", "<toy> b"] and rest is None and made == []
    # a bare JSON call is held from its first character; a blank start too
    sent, rest, made = stream(use, ["  ", '{"name": "get_time", ', '"parameters": {}}'])
    assert sent == ["", "", ""] and rest is None and made == [("get_time", {})]
    sent, rest, made = stream(use, [" ", "{not a call}"])
    assert sent == ["", ""] and rest == " {not a call}" and made == []
    sent, rest, made = stream(use, ['[{"name": "get_time", ', '"arguments": {}}]'])
    assert sent == ["", ""] and rest is None and made == [("get_time", {})]
    sent, rest, made = stream(use, ["Sunny", " today."])
    assert sent == ["Sunny", " today."] and rest is None
    # text after a call is content too, as in the whole reply
    after = ["Checking. ", call, " I will ", "tell you. "]
    sent, rest, made = stream(use, after)
    assert "".join(sent) + rest == use.reply("".join(after))[0] == "Checking.  I will tell you."
    assert made == [("get_time", {})]
    sent, rest, made = stream(use, [call, "\nDone."])
    assert sent == ["", ""] and rest == use.reply(call + "\nDone.")[0] == "Done."
    # a forced call holds everything; what did not parse is content at the end
    forced = tool_use(tool_choice="required")
    assert stream(forced, ['[{"name": "get_time", ', '"arguments": {}}]']) == (
        ["", ""],
        None,
        [("get_time", {})],
    )
    assert stream(forced, ['[{"name": "get_ti']) == ([""], '[{"name": "get_ti', [])
