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

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

TOOLS_PREAMBLE = (
    "You can call the functions below. To call one, reply with "
    '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>, '
    "one such block per call.\n<tools>\n{tools}\n</tools>"
)


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat's messages go through the chat template, as vLLM's request fields of the
    same names ask: an assistant turn opened after them (OpenAI's API always opens one), or
    the last message, an assistant's, left open for the model to go on with (a reply
    begun for it); and more variables for the template (Qwen3's ``enable_thinking``, say)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def apply_chat_template_kwargs(self, tokenizer) -> dict[str, Any]:
        """The keyword arguments of ``tokenizer.apply_chat_template`` these options make;
        ValueError for a combination it cannot render, or template variables that would
        override its own parameters."""
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "continue_final_message leaves the last message open: set add_generation_prompt to false"
            )
        reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}
        clashes = sorted(set(self.kwargs) & reserved)
        if clashes:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(clashes)}")
        return {
            **self.kwargs,
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
        }


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
