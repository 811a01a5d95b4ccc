"""Structured outputs: decoding held to a JSON schema, any JSON object, a regular
expression, a choice of strings or an EBNF grammar, with xgrammar (vLLM's and SGLang's
grammar engine).

A request's constraint is compiled (and cached by xgrammar) into a grammar over the
target's vocabulary; a matcher then follows the request's output token by token. Each
step masks the tokens the grammar forbids before the target chooses, on every row the step
scores. With speculation, a draft node's row is masked as the grammar stands after that
node's own path (a walk of the tree that accepts each node's token and rolls it back), so
the output is exactly what plain constrained decoding gives.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Literal

import torch
import xgrammar
from aerie_common.draft_tree import DraftTree

StructuredKind = Literal["json_schema", "json_object", "regex", "grammar"]
STRUCTURED_KINDS: tuple[StructuredKind, ...] = ("json_schema", "json_object", "regex", "grammar")
# Whitespace characters JSON may hold between two elements: pretty-printed JSON fits (a
# newline and indentation 7 levels of 4 deep), and a model cannot stall in whitespace (small
# ones do, unbounded, until max_tokens).
MAX_JSON_WHITESPACE = 32


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: ``spec`` is a JSON schema (as JSON text), a regular
    expression or an EBNF grammar (GBNF's dialect, rule ``root`` first); empty for any JSON
    object."""

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        if (self.kind == "json_object") != (not self.spec):
            raise ValueError(f"a {self.kind} structured output {'takes no' if self.spec else 'needs a'} spec")

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutput:
        """Exactly one of ``options``."""
        if not options or not all(options):
            raise ValueError("a choice needs at least one option, and no empty ones")
        # EBNF string literals take JSON's escapes.
        return cls("grammar", "root ::= " + " | ".join(json.dumps(option) for option in options))


class GrammarCompiler:
    """Compiles constraints for one target's tokenizer; safe to call from several threads.
    The vocabulary's index is built at the first compilation (about 0.1 s)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _ready(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                try:
                    info = xgrammar.TokenizerInfo.from_huggingface(
                        self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
                    )
                except Exception as exc:  # a tokenizer xgrammar cannot index
                    raise ValueError(
                        f"structured outputs are not available for this model's tokenizer: {exc}"
                    ) from exc
                self._compiler = xgrammar.GrammarCompiler(info)
            return self._compiler

    def compile(self, structured: StructuredOutput) -> xgrammar.CompiledGrammar:
        """Raises ValueError, saying why, for a schema, expression or grammar that does not compile."""
        compiler = self._ready()
        try:
            if structured.kind == "json_object":  # any object: its properties are not limited
                return compiler.compile_json_schema(
                    '{"type": "object"}', strict_mode=False, max_whitespace_cnt=MAX_JSON_WHITESPACE
                )
            if structured.kind == "json_schema":
                return compiler.compile_json_schema(structured.spec, max_whitespace_cnt=MAX_JSON_WHITESPACE)
            if structured.kind == "regex":
                return compiler.compile_regex(structured.spec)
            return compiler.compile_grammar(structured.spec)
        except RuntimeError as exc:  # xgrammar's parse errors: "[time] file.cc:line: message"
            reason = str(exc).strip().splitlines()[0].split(": ", 1)[-1]
            raise ValueError(f"the {structured.kind.replace('_', ' ')} does not compile: {reason}") from None


class GrammarConstraint:
    """One request's place in its grammar."""

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int):
        self.matcher = xgrammar.GrammarMatcher(compiled)
        self.vocab_size = vocab_size

    def accept(self, token_ids: list[int]) -> None:
        """Follow tokens that joined the output (each was allowed: ``mask`` saw to it)."""
        for token_id in token_ids:
            if not self.matcher.accept_token(token_id):
                raise RuntimeError(f"token {token_id} breaks the grammar it was chosen under")

    def mask(self, scores: torch.Tensor, tree: DraftTree | None = None) -> None:
        """Set to -inf, in place, what the grammar forbids in ``scores`` [rows, vocab]: row 0
        follows the output so far, and with a ``tree`` row i+1 follows node i's path too. A
        node the grammar forbids keeps its row unmasked: it is never accepted, its parent's
        row having masked it."""
        bitmask = xgrammar.allocate_token_bitmask(len(scores), self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        if tree is not None and len(tree):
            children = tree.children()

            def visit(node: int, parent_row: int) -> None:
                token = tree.token_ids[node]
                if not int(bitmask[parent_row, token // 32]) >> (token % 32) & 1:
                    return
                self.matcher.accept_token(token)
                if not self.matcher.is_terminated():
                    self.matcher.fill_next_token_bitmask(bitmask, node + 1)
                    for child in children[node]:
                        visit(child, node + 1)
                self.matcher.rollback(1)

            for child in children[-1]:
                visit(child, 0)
        # On a GPU in plain torch: xgrammar's own GPU kernels compile at first use, with
        # Triton or NVCC, which a serving image need not hold.
        backend = "cpu" if scores.device.type == "cpu" else "torch_native"
        xgrammar.apply_token_bitmask_inplace(
            scores, bitmask.to(scores.device), vocab_size=self.vocab_size, backend=backend
        )
