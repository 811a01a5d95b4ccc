"""One request's forwards over a fixed-size KV cache, in shapes fixed enough that on a GPU
each is captured once as a CUDA graph and then replayed.

On a GPU a small target's eager step is bound by launching kernels, not by running them:
every forward of SmolLM2-135M costs about the same 20-30 ms whether it feeds 1 new token
or 128, and a CUDA graph replays the same launches in a few ms. A graph fixes every shape
and every address, so a slot keeps them fixed:

- the KV cache is one buffer, ``capacity`` slots per layer plus scratch room for one
  forward's padding, and attention reads all of it under a mask that hides what is not
  filled yet (stale entries are finite, and a masked score is exactly 0 after softmax);
- a forward reads static input tensors that each step copies its values into: the new
  rows' token ids and depths, which new rows each row sees, and how many entries are
  cached. The mask, the positions and the cache slots the new keys and values go to are
  computed from those inside the forward;
- a draft tree is padded to a power-of-two row count with rows that see only themselves.

The captured target features (``HiddenCapture``) and the logits are outputs of the graph:
they stay valid until the next replay of any graph in the slot's pool (an engine's slots
share one), so the engine reads them before its next forward. On a CPU the same code runs
uncaptured (the unit tests); there the engine's growing cache is faster, so slots are a
GPU default.
"""

from __future__ import annotations

import torch
from aerie_common.cuda_graphs import GraphCache
from aerie_common.draft_tree import MAX_TREE_NODES, DraftTree
from transformers.cache_utils import Cache, DynamicLayer

from aerie_verifier.attention_mask import target_attention_mask
from aerie_verifier.prefix_cache import CachedPrefix
from aerie_verifier.speculative import HiddenCapture
from aerie_verifier.tree_verify import tree_visibility


def row_bucket(rows: int) -> int:
    """The row count a forward of ``rows`` new tokens is padded to (a power of two)."""
    return 1 << (rows - 1).bit_length()


# The most rows one forward of a slot takes: the root and the largest tree, padded.
MAX_ROWS = row_bucket(MAX_TREE_NODES + 1)


class SlotLayer(DynamicLayer):
    """One layer's keys and values: views of the slot's buffer, written where the
    slot's current forward puts its new rows (``SlotCache.write_at``)."""

    def __init__(self, cache: SlotCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self._cache = cache
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self._cache.write_at, key_states)
        self.values.index_copy_(2, self._cache.write_at, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # A value read here would be baked into a graph; a model that needs it (instead of
        # the positions and 4D mask it is given) must not be captured.
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the model reads the cache length while a CUDA graph is captured")
        return self._cache.length

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a slot's length is kept by StaticSlot")


class SlotCache(Cache):
    """A transformers Cache over a [layers, 2, 1, kv_heads, slots, head_dim] buffer."""

    def __init__(self, kv: torch.Tensor):
        self.length = 0  # entries filled (the model reads it only when not given positions)
        self.write_at = torch.zeros(0, dtype=torch.long, device=kv.device)
        super().__init__(layers=[SlotLayer(self, kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])])


class StaticSlot:
    """A KV cache slot for one request at a time, and the forwards that use it.

    ``prefill`` runs eagerly (its length varies); ``decode`` (1 row) and ``verify`` (a
    padded tree) replay CUDA graphs when ``cuda_graphs``, captured on first use for each
    row count and set of capture layers. ``capacity`` bounds the prefix plus the rows of
    one forward; the caller checks ``fits`` first."""

    def __init__(self, model, capacity: int, capture: HiddenCapture | None, cuda_graphs: bool, pool=None):
        config = model.config
        self.model = model
        self.capture = capture
        self.capacity = capacity
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Scratch past ``capacity``: a padded forward at the limit writes its padding there,
        # and graphs are captured with their writes aimed there.
        slots = capacity + MAX_ROWS
        shape = (config.num_hidden_layers, 2, 1, config.num_key_value_heads, slots, head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache = SlotCache(self.kv)
        self._slot_ids = torch.arange(slots, device=self.device)
        # The static inputs.
        self._past = torch.zeros((), dtype=torch.long, device=self.device)
        self._ids = torch.zeros((1, MAX_ROWS), dtype=torch.long, device=self.device)
        self._depths = torch.zeros(MAX_ROWS, dtype=torch.long, device=self.device)
        self._sees = torch.zeros((MAX_ROWS, MAX_ROWS), dtype=torch.bool, device=self.device)
        # Per (rows, capture layers); ``pool`` may be shared with the engine's other slots.
        self.graphs = GraphCache(cuda_graphs and self.device.type == "cuda", pool)
        self.verified = 0  # trees verified here (tests check that slots are used)

    @property
    def length(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        """Free the slot for the next request (stale entries are masked, never read)."""
        self.cache.length = 0

    def fits(self, rows: int) -> bool:
        return self.length + rows <= self.capacity

    # -- the forward -------------------------------------------------------------

    def _forward(self, ids, depths, sees, layer_ids, last_logits_only=False):
        """The target over ``ids`` [1, rows] on top of the cached prefix: row i sits at
        position prefix + depths[i], sees the prefix and the rows ``sees[i]`` marks, and
        its keys and values go to slot prefix + i. Only tensor ops, so it can be captured.
        Returns the logits of every row (or of the last), and the captured features."""
        rows = ids.shape[1]
        new_slots = self._past + self._slot_ids[:rows]
        visible = (self._slot_ids < self._past).expand(rows, -1).clone()
        visible.index_copy_(1, new_slots, sees)  # column past + j of every row is sees[:, j]
        positions = self._past + depths
        # the prefix's slots hold their own positions; the new rows' go where they are written
        key_positions = self._slot_ids.index_copy(0, new_slots, positions)
        self.cache.write_at = new_slots
        kwargs = {
            "input_ids": ids,
            "position_ids": positions[None],
            "attention_mask": target_attention_mask(
                self.model.config, visible, positions, key_positions, self.dtype
            ),
            "past_key_values": self.cache,
            "logits_to_keep": 1 if last_logits_only else 0,
        }
        if not layer_ids:
            return self.model(**kwargs).logits[0], None
        with self.capture.layers(layer_ids):
            logits = self.model(**kwargs).logits[0]
            return logits, self.capture.features(layer_ids)

    def _run(self, rows: int, ids: list[int], depths: list[int], sees: torch.Tensor, layer_ids):
        """One forward of ``len(ids)`` real rows padded to ``rows``; returns the real
        rows' logits and features."""
        real = len(ids)
        pad = rows - real
        host_ids = torch.tensor([ids + [0] * pad])
        host_depths = torch.tensor(depths + [0] * pad)
        host_sees = torch.eye(rows, dtype=torch.bool)  # padding rows see only themselves
        host_sees[:real, :real] = sees
        captured = self.graphs.get((rows, layer_ids), lambda: self._capturable(rows, layer_ids))
        self._past.fill_(self.length)  # after any capture, which aims it elsewhere
        if captured is None:
            logits, features = self._forward(
                host_ids.to(self.device), host_depths.to(self.device), host_sees.to(self.device), layer_ids
            )
        else:
            graph, (logits, features) = captured
            self._ids[:, :rows].copy_(host_ids, non_blocking=True)
            self._depths[:rows].copy_(host_depths, non_blocking=True)
            self._sees[:rows, :rows].copy_(host_sees, non_blocking=True)
            graph.replay()
        return logits[:real], None if features is None else features[:real]

    def _capturable(self, rows: int, layer_ids: tuple[int, ...]):
        """The forward over the static inputs, to capture. Its writes are aimed at the
        scratch slots, and every row sees itself, so that neither the warm-up nor the
        capture touches the prefix."""
        self._past.fill_(self.capacity)
        self._sees[:rows, :rows] = torch.eye(rows, dtype=torch.bool, device=self.device)
        args = (self._ids[:, :rows], self._depths[:rows], self._sees[:rows, :rows], layer_ids)
        return lambda: self._forward(*args)

    # -- what the engine calls ---------------------------------------------------

    def warm(self, tree_nodes: int = 0, layer_ids: tuple[int, ...] = ()) -> None:
        """Capture now the graphs of the plain step and, with ``tree_nodes``, of verifying
        trees of up to that many nodes (capturing ``layer_ids``' features): every row bucket
        up to the largest. Graphs captured already are kept; with graphs off there is
        nothing to prepare. A capture aims its writes at the scratch slots, so warming
        leaves whatever the slot holds as it was."""
        keys = [(1, ())]
        rows = 2  # the root and one node
        while tree_nodes and rows <= row_bucket(tree_nodes + 1):
            keys.append((rows, layer_ids))
            rows *= 2
        for rows, layers in keys:
            if not self.graphs.enabled:
                return
            self.graphs.get((rows, layers), lambda rows=rows, layers=layers: self._capturable(rows, layers))

    def prefill(
        self, prompt_ids: list[int], layer_ids: tuple[int, ...] = (), prefix: CachedPrefix | None = None
    ):
        """Cache the prompt, starting from ``prefix`` (its first tokens, computed before)
        when given; returns the last row's logits and every row's features."""
        self.reset()
        held = 0
        if prefix is not None:
            held = prefix.length
            for layer, (keys, values) in enumerate(prefix.layers):
                self.kv[layer, 0, ..., :held, :] = keys
                self.kv[layer, 1, ..., :held, :] = values
        self._past.fill_(held)
        rows = len(prompt_ids) - held
        ids = torch.tensor([prompt_ids[held:]], device=self.device)
        causal = torch.ones(rows, rows, dtype=torch.bool, device=self.device).tril()
        depths = torch.arange(rows, device=self.device)
        logits, features = self._forward(ids, depths, causal, layer_ids, last_logits_only=True)
        self.cache.length = len(prompt_ids)
        if layer_ids and held:
            features = torch.cat([prefix.features, features])
        return logits[-1], features

    def layer_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cached keys and values: views, valid until the slot is written again."""
        return [
            (self.kv[i, 0, ..., : self.length, :], self.kv[i, 1, ..., : self.length, :])
            for i in range(len(self.kv))
        ]

    def decode(self, token: int) -> torch.Tensor:
        """One plain step: feeds ``token`` (the last decided) and caches it; returns its logits."""
        logits, _ = self._run(1, [token], [0], torch.ones(1, 1, dtype=torch.bool), ())
        self.cache.length += 1
        return logits[0]

    def verify(self, root: int, tree: DraftTree, layer_ids: tuple[int, ...]):
        """The root and the tree in one forward (see tree_verify.py for the layout);
        returns logits and features per row. Follow with ``keep``."""
        self.verified += 1
        return self._run(
            row_bucket(len(tree) + 1),
            [root, *tree.token_ids],
            [0, *tree.depths()],
            tree_visibility(tree),
            layer_ids,
        )

    def keep(self, accepted: list[int]) -> None:
        """After ``verify``: keep the root and the accepted nodes (tree indices, root to
        leaf), moved to follow the prefix, and forget the rest."""
        start = self.length + 1
        if accepted != list(range(len(accepted))):  # a first-child chain is already in place
            source = torch.tensor([start + i for i in accepted], device=self.device)
            self.kv[..., start : start + len(accepted), :] = self.kv.index_select(-2, source)
        self.cache.length = start + len(accepted)
