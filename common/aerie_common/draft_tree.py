"""Draft trees as flat arrays, shared by the drafter (which builds them) and the verifier
(which checks them).

Node i carries token ``token_ids[i]`` and parent ``parents[i]``; -1 marks a child of the
root (the last token already decided, which is not part of the tree). Parents always
come before their children, which also rules out cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The largest tree either side accepts; larger ones are malformed.
MAX_TREE_NODES = 256


class MalformedTreeError(ValueError):
    pass


@dataclass(frozen=True)
class DraftTree:
    token_ids: list[int]
    parents: list[int]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.token_ids)

    def validate(self, vocab_size: int, max_nodes: int = MAX_TREE_NODES) -> None:
        """Raise MalformedTreeError unless this is a well-formed tree over ``vocab_size``."""
        n = len(self.token_ids)
        if len(self.parents) != n or len(self.scores) != n:
            raise MalformedTreeError(
                f"token_ids, parents and scores differ in length ({n}, {len(self.parents)}, {len(self.scores)})"
            )
        if n > max_nodes:
            raise MalformedTreeError(f"tree has {n} nodes, more than the {max_nodes} allowed")
        for i, (token, parent) in enumerate(zip(self.token_ids, self.parents, strict=True)):
            if not 0 <= token < vocab_size:
                raise MalformedTreeError(
                    f"node {i} has token id {token} outside the vocabulary [0, {vocab_size})"
                )
            if not -1 <= parent < i:
                raise MalformedTreeError(
                    f"node {i} has parent {parent}: parents must be -1 or an earlier node"
                )

    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent == -1 else depth[parent] + 1)
        return depth

    def children(self) -> list[list[int]]:
        """Children of each node, and of the root as the last entry (index -1)."""
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, parent in enumerate(self.parents):
            kids[parent].append(i)
        return kids

    def path(self, token_ids: list[int]) -> list[int]:
        """The nodes spelling ``token_ids`` from the root, as far as the tree follows them."""
        kids = self.children()
        nodes, current = [], -1
        for token in token_ids:
            current = next((c for c in kids[current] if self.token_ids[c] == token), None)
            if current is None:
                break
            nodes.append(current)
        return nodes

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            mask[i, i] = True
            if parent >= 0:
                mask[i] |= mask[parent]
        return mask
