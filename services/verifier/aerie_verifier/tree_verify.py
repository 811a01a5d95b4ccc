"""Verifying a draft tree in one target forward, and deciding what to accept.

The forward runs over [root, node_0 .. node_{N-1}] on top of the KV cache: the root is
the last decided token (not yet in the cache), each node sees the cached prefix, the root
and its own ancestors, and sits at position prefix + depth. Row 0 of the logits scores
the root's children; row i+1 scores node i's children.

Acceptance walks down from the root, following the child whose token is the one the
target chooses at that row: its argmax, or, sampling, the draw sampling.next_token makes
there, which depends on the request's noise at that output position alone. So a node is
accepted exactly when plain decoding would have chosen its token after the same path, and
the output is plain decoding's, token for token. (A child x is accepted with probability
p(x), and a tree's children together with the sum of theirs: what multi-candidate
rejection sampling, SpecInfer's and EAGLE's, reaches with a deterministic draft.) One
more token, the bonus, is the target's choice below the last accepted node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from aerie_common.draft_tree import DraftTree

from aerie_verifier.attention_mask import target_attention_mask
from aerie_verifier.kv_cache import GrowingCache


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


def path_counts(tree: DraftTree, vocab_size: int, device) -> torch.Tensor:
    """[1+N, vocab] in the forward's numbering: how often each token occurs on the path
    from the root to each row's node, the node included (none for the root's row): what a
    row's repetition penalties count beyond the output so far."""
    on_path = tree.ancestor_mask().to(device, torch.float32)  # node j on node i's path
    counts = torch.zeros(len(tree) + 1, vocab_size, device=device)
    counts[1:].index_add_(1, torch.tensor(tree.token_ids, device=device), on_path)
    return counts


def accept(tree: DraftTree, choose: Callable[[int, int], int]) -> tuple[list[int], int]:
    """Walk down from the root, following the child whose token is the one the target
    chooses at each row (``choose(row, depth)``, depth 0 at the root); returns the accepted
    nodes (tree indices, root to leaf) and the bonus token, the target's choice below them.
    Only the rows on the accepted path are chosen at."""
    kids = tree.children()
    accepted: list[int] = []
    row, current = 0, -1  # the logits row of the current node (the root), and its index
    while True:
        token = choose(row, len(accepted))
        match = next((child for child in kids[current] if tree.token_ids[child] == token), None)
        if match is None:
            return accepted, token
        accepted.append(match)
        current, row = match, match + 1


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
