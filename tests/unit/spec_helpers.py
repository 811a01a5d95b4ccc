"""Drafters with known behaviour, for testing the verifier's speculation machinery."""

from __future__ import annotations

import threading
import time

import torch
from aerie_common.draft_tree import DraftTree
from transformers import DynamicCache


class _TokenTracker:
    """Follows the sequence the way a drafter does: start gets prompt + first token,
    extend gets accepted tokens + bonus."""

    hop_seconds = 0.0
    in_process = True

    def __init__(self):
        self.tokens: list[int] = []

    def start(self, token_ids, hidden):
        self.tokens = list(token_ids)
        return self.propose()

    def extend(self, token_ids, hidden):
        self.tokens.extend(token_ids)
        return self.propose()

    def close(self):
        pass


class OracleDrafter(_TokenTracker):
    """Proposes the target's own greedy continuation as a chain of ``depth`` nodes."""

    def __init__(self, model, depth: int):
        super().__init__()
        self.model, self.depth = model, depth

    @torch.inference_mode()
    def propose(self) -> DraftTree:
        # a greedy loop over a cache of its own: generate()'s setup costs more than these forwards
        cache = DynamicCache()
        logits = self.model(torch.tensor([self.tokens]), past_key_values=cache).logits
        chain: list[int] = []
        while True:
            chain.append(int(logits[0, -1].argmax()))
            if len(chain) == self.depth:
                return DraftTree(chain, list(range(-1, len(chain) - 1)), [0.0] * len(chain))
            logits = self.model(torch.tensor([chain[-1:]]), past_key_values=cache).logits


class ReplayDrafter(_TokenTracker):
    """Proposes the next ``depth`` tokens of a known output (always right) at no cost, or,
    with ``wrong``, one token that never is, after ``delay_s``."""

    def __init__(self, reference: list[int], depth: int, wrong: bool = False, delay_s: float = 0.0):
        super().__init__()
        self.reference, self.depth, self.wrong, self.delay_s = reference, depth, wrong, delay_s

    def propose(self) -> DraftTree:
        time.sleep(self.delay_s)
        n = len(self.tokens)
        chain = self.reference[n : n + self.depth]
        if self.wrong:
            chain = [t - 1 if t > 0 else t + 1 for t in chain[:1]]
        return DraftTree(chain, list(range(-1, len(chain) - 1)), [0.0] * len(chain))


class TargetTopKDrafter(_TokenTracker):
    """A deterministic tree of the target's own top-k children for one or two levels:
    drafts that are often accepted, and branch, so verification follows one branch and
    leaves the others."""

    def __init__(self, model, top_k: int = 3, levels: int = 2):
        super().__init__()
        self.model, self.top_k, self.levels = model, top_k, levels

    @torch.inference_mode()
    def propose(self) -> DraftTree:
        logits = self.model(torch.tensor([self.tokens])).logits[0, -1]
        first = logits.topk(self.top_k)
        tokens, parents, scores = [], [], []
        for rank, token in enumerate(first.indices.tolist()):
            tokens.append(token)
            parents.append(-1)
            scores.append(-float(rank))
        if self.levels == 1:
            return DraftTree(tokens, parents, scores)
        # every first-level token's children from one batched forward
        children = self.model(torch.tensor([[*self.tokens, token] for token in tokens])).logits[:, -1]
        for parent, child_logits in enumerate(children):
            for rank, child in enumerate(child_logits.topk(self.top_k).indices.tolist()):
                tokens.append(child)
                parents.append(parent)
                scores.append(scores[parent] - rank - 1)
        return DraftTree(tokens, parents, scores)


class Factory:
    def __init__(self, make, capture_layer_ids=(2, 4, 5)):
        self.make = make
        self.layer_ids = capture_layer_ids
        self.opened = 0

    def capture_layer_ids(self):
        return self.layer_ids

    def open(self, request_id):
        self.opened += 1
        return self.make()

    def forget(self):
        pass


def request_events(engine, prompt, params, speculative) -> list:
    """Every event of one request to ``engine``, up to its last."""
    done = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    engine.submit("r", prompt, params, on_event, speculative=speculative)
    assert done.wait(120)
    return events
