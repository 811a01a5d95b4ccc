"""A reasoning model's thinking apart from its answer, as vLLM's reasoning parsers give it:
``message.reasoning_content`` beside ``content``, and ``delta.reasoning_content`` in a
stream. ``AERIE_REASONING_PARSER`` names the model's convention (off by default: SmolLM2 does
not think):

- "qwen3": a thinking block may open the output, ``<think>`` ... ``</think>`` (Qwen3, QwQ);
  an output that does not open with one is all answer (Qwen3 asked not to think).
- "deepseek_r1": the chat template opened the block in the prompt, so the output starts
  inside it (a ``<think>`` there is dropped) and thinks up to ``</think>``; an output that
  never closes it is all thinking, as vLLM reads it.

One reader serves whole outputs and streams (``split`` feeds it the whole output), so the
pieces a stream sends add up to the whole reply's. Tool calls are read from the answer.
"""

from __future__ import annotations

from typing import Literal

from .tools import partial_tag

START, END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")
Parser = Literal["", "qwen3", "deepseek_r1"]


class StreamedReasoning:
    """One choice's output as it streams: ``feed`` gives the (reasoning, answer) text to send
    after each delta, holding back what may be the start of a tag; ``finish``, the rest."""

    def __init__(self, parser: Parser):
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}: one of {', '.join(PARSERS)}")
        self.starts_thinking = parser == "deepseek_r1"
        self.text = ""
        self.sent = 0  # characters of ``text`` sent (or dropped: the tags)
        self.state: Literal["opening", "thinking", "answering"] = "opening"

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        reasoning = answer = ""
        if self.state == "opening":
            opening = self.text.lstrip()
            if START.startswith(opening):  # blank so far, or what may become the tag
                return "", ""
            if opening.startswith(START):
                self.sent = len(self.text) - len(opening) + len(START)
                self.state = "thinking"
            else:
                self.state = "thinking" if self.starts_thinking else "answering"
        if self.state == "thinking":
            end = self.text.find(END, self.sent)
            if end < 0:
                held = partial_tag(self.text, END)
                reasoning, self.sent = self.text[self.sent : len(self.text) - held], len(self.text) - held
                return reasoning, ""
            reasoning, self.sent, self.state = self.text[self.sent : end], end + len(END), "answering"
        answer, self.sent = self.text[self.sent :], len(self.text)
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What is left once the output is whole: thinking cut short stays thinking."""
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if self.state == "opening":
            return (rest, "") if self.starts_thinking else ("", rest)
        return (rest, "") if self.state == "thinking" else ("", rest)


def split(parser: Parser, text: str) -> tuple[str | None, str]:
    """The reasoning (None where the model did not think) and the answer of a whole output."""
    reader = StreamedReasoning(parser)
    reasoning, answer = reader.feed(text)
    more_reasoning, more_answer = reader.finish()
    return (reasoning + more_reasoning) or None, answer + more_answer
