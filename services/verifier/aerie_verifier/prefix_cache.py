"""Reuse of the KV caches of earlier requests that began with the same tokens.

A chat's second turn resends the first turn's prompt and the reply it got; the choices of
one request (``n``) and requests with one long system prompt share their beginning too.
Prefilling that beginning again costs about a millisecond a token on a 2-core CPU, so the
engine keeps the keys and values of recent requests here and starts a new request from
the longest beginning it shares with one of them, prefilling only the rest (vLLM's
automatic prefix caching and SGLang's radix cache do the same with blocks and a tree).

An entry is one token sequence, its keys and values per layer, and, for speculative
requests, the drafter's features of its first tokens (the target's hidden states at the
capture layers): a draft session starts from the features of the whole prompt, so a
speculative request reuses only the rows whose features are held. Entries are copies,
since a request's cache is written in place; an entry that another one extends is
dropped, and the least recently used go when the entries' bytes pass ``max_bytes``.

Reused rows were computed in other forwards than a whole-prompt prefill would use, so
logits may differ from a cold start's in the last float bits, as with vLLM's and
SGLang's caches. Verification is unchanged: speculative output still equals the target's
own decoding from the same cache.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

# Per layer: keys and values, [1, kv_heads, tokens, head_dim] (as a DynamicLayer holds them).
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class _Entry:
    token_ids: torch.Tensor  # [tokens], int64, on the CPU
    layers: list[LayerKV]
    features: torch.Tensor | None  # [feature_rows, width]: the first tokens' drafter features
    feature_layers: tuple[int, ...]  # the capture layers those features come from

    @property
    def feature_rows(self) -> int:
        return 0 if self.features is None else self.features.shape[0]

    @property
    def nbytes(self) -> int:
        held = sum(keys.nbytes + values.nbytes for keys, values in self.layers)
        return held + (0 if self.features is None else self.features.nbytes)

    def features_cover(self, other: _Entry) -> bool:
        """Whether this entry holds features for at least the rows ``other`` holds them for."""
        if other.features is None:
            return True
        return self.feature_layers == other.feature_layers and self.feature_rows >= other.feature_rows


@dataclass
class CachedPrefix:
    """The first ``length`` tokens of a prompt, as an earlier request computed them: views of
    a cache entry, to be copied into the new request's own cache."""

    length: int
    layers: list[LayerKV]  # each [1, kv_heads, length, head_dim]
    features: torch.Tensor | None  # [length, width] when the match asked for features


def common_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens two id sequences share from their start."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # oldest use first
        self.nbytes = 0
        # Prompt tokens looked up, and those found (vLLM's prefix_cache_queries and _hits).
        self.queried_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt_ids: list[int], feature_layers: tuple[int, ...] = ()) -> CachedPrefix | None:
        """The longest beginning of ``prompt_ids`` held, short of its last token (whose
        logits the prefill must compute). With ``feature_layers``, only rows whose features
        from those layers are held count."""
        self.queried_tokens += len(prompt_ids)
        prompt = torch.tensor(prompt_ids[:-1], dtype=torch.long)
        best, best_length = None, 0
        for entry in self._entries.values():
            length = common_length(entry.token_ids, prompt)
            if feature_layers:
                length = min(length, entry.feature_rows if entry.feature_layers == feature_layers else 0)
            if length > best_length:
                best, best_length = entry, length
        if best is None:
            return None
        self._entries.move_to_end(id(best))
        self.hit_tokens += best_length
        return CachedPrefix(
            length=best_length,
            layers=[
                (keys[..., :best_length, :], values[..., :best_length, :]) for keys, values in best.layers
            ],
            features=best.features[:best_length] if feature_layers else None,
        )

    def store(
        self,
        token_ids: list[int],
        layers: list[LayerKV],
        features: torch.Tensor | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> None:
        """Keep a copy of the cache of ``token_ids``: ``layers`` hold at least that many
        rows, and ``features`` (when given) those of the first tokens."""
        n = len(token_ids)
        if n == 0:
            return
        ids = torch.tensor(token_ids, dtype=torch.long)
        candidate = _Entry(
            ids,
            [],
            None if features is None else features[:n],
            feature_layers if features is not None else (),
        )
        for key, entry in list(self._entries.items()):
            shared = common_length(entry.token_ids, ids)
            if shared == n and entry.features_cover(candidate):  # held already, as well or better
                self._entries.move_to_end(key)
                return
            if shared == len(entry.token_ids) and candidate.features_cover(entry):  # this one extends it
                self._drop(key)
        candidate.layers = [(keys[..., :n, :].clone(), values[..., :n, :].clone()) for keys, values in layers]
        if candidate.features is not None:
            candidate.features = candidate.features.clone()
        if candidate.nbytes > self.max_bytes:
            return
        self._entries[id(candidate)] = candidate
        self.nbytes += candidate.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
