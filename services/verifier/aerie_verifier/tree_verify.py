"""Verifying a draft tree in one target forward, and deciding what to accept.

The forward runs over [root, node_0 .. node_{N-1}] on top of the KV cache: the root is
the last decided token (not yet in the cache), each node sees the cached prefix, the root
and its own ancestors, and sits at position prefix + depth. Row 0 of the logits scores
the root's children; row i+1 scores node i's children.

Acceptance walks down from the root:
- greedy: follow the child whose token is the target's argmax;
- sampling (SpecInfer / EAGLE multi-candidate rejection): try the children in draft-
  score order, accepting child x with probability p(x) under the target distribution p;
  on rejection set p(x) = 0 and renormalise. The draft is a deterministic top-k, so this
  gives exactly p. When every child is rejected, the bonus token is drawn from what is
  left of p.
Either way one more token (the bonus) comes from the target at the last accepted node.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from aerie_common.draft_tree import DraftTree

from aerie_verifier.attention_mask import target_attention_mask
from aerie_verifier.kv_cache import GrowingCache
from aerie_verifier.sampling import SamplingParams, target_probs


@dataclass(frozen=True)
class TreeInputs:
    input_ids: torch.Tensor  # [1, 1+N]
    position_ids: torch.Tensor  # [1, 1+N]
    # additive [1, 1, 1+N, past+1+N], or one per layer type (aerie_verifier.attention_mask)
    attention_mask: torch.Tensor | dict[str, torch.Tensor]
    cache_position: torch.Tensor  # [1+N]: where the new keys/values are written

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The target forward's arguments for this tree, all but the KV cache."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def tree_visibility(tree: DraftTree) -> torch.Tensor:
    """[1+N, 1+N] bool in the forward's numbering (root = 0): which of the root and the
    nodes each row sees, namely the root, its own ancestors and itself."""
    visible = torch.zeros(len(tree) + 1, len(tree) + 1, dtype=torch.bool)
    visible[:, 0] = True
    visible[1:, 1:] = tree.ancestor_mask()
    return visible


def tree_inputs(root_token: int, tree: DraftTree, past_len: int, config, device, dtype) -> TreeInputs:
    """The forward's inputs for ``tree`` below ``root_token`` on a cache of ``past_len``
    entries, for a target of ``config`` (its sliding-window layers, if any)."""
    n = len(tree) + 1
    visible = tree_visibility(tree)
    full = torch.cat([torch.ones(n, past_len, dtype=torch.bool), visible], dim=1).to(device)
    positions = torch.tensor([past_len + d for d in [0, *tree.depths()]], device=device)
    key_positions = torch.cat([torch.arange(past_len, device=device), positions])
    return TreeInputs(
        input_ids=torch.tensor([[root_token, *tree.token_ids]], device=device),
        position_ids=positions[None],
        attention_mask=target_attention_mask(config, full, positions, key_positions, dtype),
        cache_position=torch.arange(past_len, past_len + n, device=device),
    )


def _children_by_score(tree: DraftTree) -> list[list[int]]:
    kids = tree.children()
    return [sorted(c, key=lambda i: -tree.scores[i]) for c in kids]


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Returns the accepted nodes (tree indices, root to leaf) and the bonus token."""
    argmax = logits.argmax(-1).tolist()
    kids = tree.children()
    accepted: list[int] = []
    row = 0  # logits row of the current node (root)
    current = -1
    while True:
        match = next((c for c in kids[current] if tree.token_ids[c] == argmax[row]), None)
        if match is None:
            return accepted, argmax[row]
        accepted.append(match)
        current, row = match, match + 1


def accept_sampling(
    tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Lossless multi-candidate rejection sampling; returns accepted nodes and the bonus."""
    kids = _children_by_score(tree)
    accepted: list[int] = []
    row, current = 0, -1
    while True:
        p = target_probs(logits[row], params)
        chosen = None
        for child in kids[current]:
            token = tree.token_ids[child]
            if torch.rand((), generator=generator, device=p.device) < p[token]:
                chosen = child
                break
            p[token] = 0.0
            total = p.sum()
            if total <= 0:  # float rounding: x held all the mass, so it is the target's choice
                chosen = child
                break
            p /= total
        if chosen is None:
            return accepted, int(torch.multinomial(p, 1, generator=generator).item())
        accepted.append(chosen)
        current, row = chosen, chosen + 1


def keep_cache_entries(cache, past_len: int, accepted: list[int]) -> None:
    """Drop the rejected nodes' keys and values: keep the prefix, the root and the
    accepted path, in order, so the cache reads as if only those tokens had been fed.
    Only the accepted entries move (each to a slot at or before its own, so in place);
    the prefix is never copied."""
    if isinstance(cache, GrowingCache) and cache.keep_entries(past_len, accepted):
        return
    kept = past_len + 1 + len(accepted)
    moves = accepted != list(range(len(accepted)))  # a first-child chain is already in place
    for layer in cache.layers:
        if moves:
            source = torch.tensor([past_len + 1 + i for i in accepted], device=layer.keys.device)
            layer.keys[..., past_len + 1 : kept, :] = layer.keys.index_select(2, source)
            layer.values[..., past_len + 1 : kept, :] = layer.values.index_select(2, source)
        layer.crop(kept - layer.get_seq_length())
