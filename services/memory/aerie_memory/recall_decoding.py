"""The memory's greedy answers, drafted from the answers it was trained on.

A memory recalls what it learned nearly word for word: asked "What do you know about X?",
it writes X's passage back, up to 160 tokens, one forward per token. Those answers are
known (the reflections), so they make near-perfect drafts: each step feeds the model the
last token and the next tokens of the learned answer that the text so far matches, keeps
the drafted tokens the model itself would have chosen, and adds the model's own next
token. A passage recalled whole then costs a forward per few dozen tokens rather than one
per token. Where the model leaves what it learned, a draft fails and its forward costs up
to about two plain ones; answers to questions it never learned still came 2-3x faster.

Drafts come from, in order: a learned answer to this very question (the text so far must
be a prefix of it), then the first learned answer holding the text's last MAX_MATCH (down
to 1) tokens, continued from there. The output is the model's greedy output, token
for token: every kept token is the model's argmax at its position (up to the rounding of a
many-token forward against a one-token one, as in any speculative decoding).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache

from aerie_memory.training import end_of_turn_ids, prompt_ids

# Draft lengths. On CPU a 17-token forward of the 135M memory costs about two 1-token
# ones, and its answer to a learned question is that answer for long stretches; after
# text found elsewhere less often (measured: bench.memory_qa.drafted_recall, docs/memory.md).
LEARNED_ANSWER_DRAFT = 32
MATCH_DRAFT = 16
MAX_MATCH = 4


class LearnedAnswers:
    """The answers a memory was trained on, tokenized, indexed for drafting its recall."""

    def __init__(self, tokenizer, pairs: Iterable[tuple[str, str]], phrases: Iterable[str] = ()):
        """``pairs``: (question, answer) as trained; ``phrases``: answers it learned for
        questions not kept here (the refusal)."""
        end = end_of_turn_ids(tokenizer)  # as every trained answer ended
        self.answers: list[list[int]] = []
        self._by_question: dict[str, list[int]] = {}  # question -> indices into answers
        # n-gram -> (answer index, position after the n-gram) of its first occurrence
        self._first: dict[tuple[int, ...], tuple[int, int]] = {}
        for question, answer in pairs:
            self._by_question.setdefault(question.strip(), []).append(len(self.answers))
            self._add(tokenizer(answer, add_special_tokens=False)["input_ids"] + end)
        for phrase in phrases:
            self._add(tokenizer(phrase, add_special_tokens=False)["input_ids"] + end)

    def _add(self, ids: list[int]) -> None:
        index = len(self.answers)
        self.answers.append(ids)
        for end_at in range(1, len(ids) + 1):
            for n in range(1, min(MAX_MATCH, end_at) + 1):
                self._first.setdefault(tuple(ids[end_at - n : end_at]), (index, end_at))

    def draft(self, question: str, generated: list[int]) -> list[int]:
        """The tokens likely to follow ``generated`` in the answer to ``question``."""
        for index in self._by_question.get(question.strip(), ()):
            ids = self.answers[index]
            if ids[: len(generated)] == generated and len(ids) > len(generated):
                return ids[len(generated) : len(generated) + LEARNED_ANSWER_DRAFT]
        for n in range(min(MAX_MATCH, len(generated)), 0, -1):
            found = self._first.get(tuple(generated[-n:]))
            if found is not None:
                index, after = found
                return self.answers[index][after : after + MATCH_DRAFT]
        return []


@torch.no_grad()
def greedy_with_drafts(
    model, prompt_ids: list[int], eos_token_id: int | None, max_new_tokens: int, draft
) -> tuple[list[int], int]:
    """The model's greedy continuation of ``prompt_ids`` (eos included if reached), and the
    number of forwards it took. ``draft(generated)`` proposes the tokens to verify next."""
    device = next(model.parameters()).device
    cache = DynamicCache()
    prompt = torch.tensor([prompt_ids], device=device)
    generated = [int(model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())]
    forwards = 1
    while len(generated) < max_new_tokens and generated[-1] != eos_token_id:
        proposal = draft(generated)[: max_new_tokens - len(generated)]
        step = torch.tensor([generated[-1:] + proposal], device=device)
        chosen = model(step, cache=cache, use_cache=True).logits[0].argmax(-1).tolist()
        forwards += 1
        kept = 0
        while kept < len(proposal) and proposal[kept] == chosen[kept] and proposal[kept] != eos_token_id:
            kept += 1
        if kept < len(proposal) and proposal[kept] == chosen[kept]:  # the drafted eos, accepted
            generated += proposal[: kept + 1]
            break
        generated += proposal[:kept] + [chosen[kept]]
        cache.crop(-(len(proposal) - kept))  # the rejected drafts' entries
    return generated[:max_new_tokens], forwards


def answer(
    model, tokenizer, question: str, max_new_tokens: int = 48, learned: LearnedAnswers | None = None
) -> str:
    """The memory's greedy answer; ``learned`` (the answers it was trained on) drafts it,
    which changes how fast it comes, not what it says."""
    ids, _ = answer_ids(model, tokenizer, question, max_new_tokens, learned)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def answer_ids(
    model, tokenizer, question: str, max_new_tokens: int, learned: LearnedAnswers | None = None
) -> tuple[list[int], int]:
    """``answer``'s tokens (eos included if reached) and the forwards they took."""
    draft = (lambda generated: learned.draft(question, generated)) if learned else (lambda generated: [])
    return greedy_with_drafts(
        model, prompt_ids(tokenizer, question), tokenizer.eos_token_id, max_new_tokens, draft
    )
