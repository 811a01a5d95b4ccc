"""Chat messages and tool definitions as the target's chat template takes them.

A template that knows tools (Qwen's, Llama 3.1's, Hermes') gets them as transformers passes
them: ``tools`` beside the messages, an assistant's ``tool_calls`` and a tool message's
``tool_call_id`` on the messages. A template that does not (SmolLM2's ChatML one prints
role and content only) would drop them silently, so for it the tools are described in the
system message in the Hermes convention, which the gateway's parser reads back: a call is
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` and a result comes back in
``<tool_response>`` tags in a user turn.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_PREAMBLE = (
    "You can call the functions below. To call one, reply with "
    '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>, '
    "one such block per call.\n<tools>\n{tools}\n</tools>"
)


def template_knows_tools(tokenizer) -> bool:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the default one renders chats
        template = template.get("default") or template.get("tool_use") or ""
    return "tools" in (template or "")


def _arguments(text: str) -> Any:
    """A tool call's arguments: templates expect a JSON object; text that is not one stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_inputs(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``messages`` (role, content, and tool_calls / tool_call_id where given, as OpenAI's)
    and ``tools`` as apply_chat_template should get them: natively when the template knows
    tools, else spelled into the messages."""
    if native:
        rendered = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {
                        **call,
                        "function": {
                            **call["function"],
                            "arguments": _arguments(call["function"]["arguments"]),
                        },
                    }
                    for call in message["tool_calls"]
                ]
            rendered.append(message)
        return rendered, tools or None
    rendered = []
    for message in messages:
        if message["role"] == "tool":
            rendered.append(
                {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
            )
            continue
        content = message["content"]
        for call in message.get("tool_calls") or ():
            spelled = {
                "name": call["function"]["name"],
                "arguments": _arguments(call["function"]["arguments"]),
            }
            content += f"<tool_call>{json.dumps(spelled)}</tool_call>"
        rendered.append({"role": message["role"], "content": content})
    if tools:
        preamble = TOOLS_PREAMBLE.replace("{tools}", "\n".join(json.dumps(tool) for tool in tools))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{preamble}"}
        else:
            rendered.insert(0, {"role": "system", "content": preamble})
    return rendered, None
