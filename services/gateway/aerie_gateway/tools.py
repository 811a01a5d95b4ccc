"""OpenAI's function calling over the verifier: what a chat with ``tools`` asks the verifier
for, and how its output becomes ``tool_calls``.

- ``tool_choice`` "none": the tools are not shown to the model, and the output is text.
- "auto" (the default with tools): the model sees the tools (through its chat template, or
  described in the Hermes convention where the template has no place for them; see
  aerie_verifier/chat_format.py) and may call them. A call is read back from a
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block (Hermes, Qwen, SmolLM3),
  or from an output that is nothing but such a JSON object (Llama 3.1 writes
  ``{"name": ..., "parameters": {...}}``) or a list of them (Mistral's, after its
  ``[TOOL_CALLS]``), or a Python list of calls (Llama 3.2's and 4's "pythonic" format,
  ``[get_weather(city="Paris")]``, literal arguments only); anything else is content.
- "required", or one function named: decoding is held by xgrammar to JSON that is a call,
  as vLLM does: a list of ``{"name", "arguments"}`` objects (one at most without
  ``parallel_tool_calls``), or the named function's arguments themselves.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from aerie_proto.v1 import verifier_pb2

from .schemas import ChatCompletionRequest, FunctionCall, NamedToolChoice, Tool, ToolCall

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or ANY_OBJECT


def tools_json(tools: list[Tool]) -> str:
    """OpenAI's tools as the verifier takes them (JSON text)."""
    return json.dumps([tool.model_dump(exclude_none=True) for tool in tools])


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolUse:
    """A chat's tools and how the model may use them; ``of`` gives None when it may not."""

    tools: list[Tool]
    named: str | None  # the function tool_choice forces, if any
    required: bool
    parallel: bool

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolUse | None:
        if not body.tools or body.tool_choice == "none":
            return None
        named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        return cls(body.tools, named, body.tool_choice == "required", body.parallel_tool_calls)

    @property
    def forced(self) -> bool:
        return self.named is not None or self.required

    def constraint(self) -> verifier_pb2.StructuredOutput | None:
        """What decoding is held to: a call, when one is forced."""
        if self.named is not None:
            [tool] = [tool for tool in self.tools if tool.function.name == self.named]
            return verifier_pb2.StructuredOutput(json_schema=json.dumps(_arguments_schema(tool)))
        if not self.required:
            return None
        one_call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": tool.function.name},
                        "arguments": _arguments_schema(tool),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for tool in self.tools
            ]
        }
        calls = {
            "type": "array",
            "items": one_call,
            "minItems": 1,
            **({} if self.parallel else {"maxItems": 1}),
        }
        return verifier_pb2.StructuredOutput(json_schema=json.dumps(calls))

    def finish_reason(self, calls: list[ToolCall], finish_reason: str) -> str:
        """A choice's finish reason: "tool_calls" when it made calls, but OpenAI says "stop"
        for a function the request named."""
        return "tool_calls" if calls and self.named is None else finish_reason

    def reply(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content and the tool calls of a choice's whole output."""
        if self.named is not None:
            return None, [self._call(self.named, text.strip())]
        if self.required:
            try:
                calls = [self._call(item["name"], json.dumps(item["arguments"])) for item in json.loads(text)]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens
                return text, []
            return None, calls
        return self._read_auto(text)

    def _read_auto(self, text: str) -> tuple[str | None, list[ToolCall]]:
        names = {tool.function.name for tool in self.tools}
        calls = []
        for block in TOOL_CALL_BLOCK.findall(text):
            call = self._parse_call(block, names)
            if call is None:  # not a call after all: leave the output as it is
                return text, []
            calls.append(call)
        if calls:
            content = TOOL_CALL_BLOCK.sub("", text).strip()
            return content or None, calls[: None if self.parallel else 1]
        # an output that is nothing but calls: one object, or a list (Mistral's, after its
        # marker), as JSON; or a Python list of calls (Llama's, in its markers where they show)
        bare = text.strip()
        for marker in ("[TOOL_CALLS]", "<|python_tag|>", "<|python_start|>"):
            bare = bare.removeprefix(marker)
        bare = bare.removesuffix("<|python_end|>").strip()
        if bare[:1] in ("{", "["):
            try:
                value = json.loads(bare)
            except ValueError:
                made = self._pythonic_calls(bare, names)
            else:
                made = [
                    self._call_of(item, names) for item in (value if isinstance(value, list) else [value])
                ]
            if made and all(made):
                return None, made[: None if self.parallel else 1]
        return text, []

    def _pythonic_calls(self, spelled: str, names: set[str]) -> list[ToolCall | None]:
        """``[f(a=1), g(b="x")]`` as calls (None for one that is not a call of a known
        function with literal keyword arguments); [] where it is no Python list."""
        try:
            tree = ast.parse(spelled, mode="eval").body
        except (SyntaxError, ValueError):
            return []
        if not isinstance(tree, ast.List):
            return []
        made: list[ToolCall | None] = []
        for item in tree.elts:
            if not (
                isinstance(item, ast.Call)
                and isinstance(item.func, ast.Name)
                and item.func.id in names
                and not item.args
                and all(keyword.arg is not None for keyword in item.keywords)
            ):
                return [None]
            try:
                arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in item.keywords}
                made.append(self._call(item.func.id, json.dumps(arguments)))
            except (ValueError, TypeError, SyntaxError):  # not literals, or not JSON's kinds
                return [None]
        return made

    def _parse_call(self, spelled: str, names: set[str]) -> ToolCall | None:
        try:
            return self._call_of(json.loads(spelled), names)
        except ValueError:
            return None

    def _call_of(self, call: Any, names: set[str]) -> ToolCall | None:
        """A call from its JSON: {"name", "arguments"} (or Llama's "parameters"); None if it is not one."""
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):  # some models spell the arguments as JSON text
            return self._call(call["name"], arguments)
        if not isinstance(arguments, dict):
            return None
        return self._call(call["name"], json.dumps(arguments))

    @staticmethod
    def _call(name: str, arguments: str) -> ToolCall:
        return ToolCall(id=call_id(), function=FunctionCall(name=name, arguments=arguments))


class StreamedReply:
    """One choice's output streamed under tools. Content goes out as it comes, but for
    what may be the start of a call: text from a ``<tool_call>`` tag on (or a partial tag
    at the end), an output that so far is blank or opens with "{" or "[" (bare JSON calls), and,
    under a forced tool_choice, everything. ``finish`` gives what was held: the calls and the
    text around them not sent yet, or the held text as content when it made none, so that
    the content streamed adds up to the whole reply's."""

    OPEN = "<tool_call>"

    def __init__(self, tools: ToolUse):
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content
        self.holding = tools.forced  # a call began: the rest waits for the end

    def feed(self, delta: str) -> str:
        """The content to send now, after ``delta``."""
        self.text += delta
        if not self.holding:
            tag = self.text.find(self.OPEN, self.sent)
            if tag >= 0:
                self.holding = True
                return self._send_up_to(tag)
            if not self.text[: self.sent].strip() and self.text.lstrip()[:1] in ("", "{", "["):
                return ""
            return self._send_up_to(len(self.text) - partial_tag(self.text, self.OPEN))
        return ""

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """The held content and the calls, once the output is whole."""
        content, calls = self.tools.reply(self.text)
        if not calls:
            return self.text[self.sent :] or None, []
        if content is None:  # nothing but calls
            return None, calls
        # the whole reply's content is the text without its call blocks, stripped
        rest = TOOL_CALL_BLOCK.sub("", self.text[self.sent :]).rstrip()
        return (rest if self.text[: self.sent].strip() else rest.lstrip()) or None, calls

    def _send_up_to(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out


def partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
