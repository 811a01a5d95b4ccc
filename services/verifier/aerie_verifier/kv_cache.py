"""A request's KV cache that appends in place.

transformers' DynamicCache appends with ``torch.cat``, so every decoding step copies the
whole cache of every layer; after a tree verification the engine used to copy it once
more to drop the rejected nodes. On the CPU these copies cost about a tenth of a
SmolLM2-135M step at a few hundred tokens of context, and grow with the context.

``GrowingCache`` keeps each layer's keys and values in a buffer with spare room: a step
writes its new entries after the last one and the attention reads a view of the filled
part, so nothing is copied until the buffer doubles. Dropping rejected tree nodes moves
only the accepted ones (``keep_cache_entries`` in tree_verify.py) and shortens the view.
The attention sees the same values either way, so the logits are bitwise those of a
DynamicCache (tests/unit/test_kv_cache.py).
"""

from __future__ import annotations

import torch
from aerie_common import cpu_extension
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from aerie_verifier.attention_mask import FULL, SLIDING

MIN_CAPACITY = 256  # entries a layer's buffer starts with, at least
ATTENTION_LAYER_TYPES = {FULL, SLIDING}


def check_attention_only(config) -> None:
    """Refuse a target with layers other than attention (Mamba, linear attention or
    convolution layers, as in Qwen3-Next or LFM2): these caches hold keys and values only,
    and a draft tree cannot branch a recurrent state."""
    other = set(getattr(config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if other:
        raise ValueError(
            f"the target has {', '.join(sorted(other))} layers; Aerie's verifier serves targets "
            "whose layers are all attention layers"
        )


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose ``keys``/``values`` are views of the first ``length`` entries
    of larger buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = key_states.new_empty(*key_states.shape[:-2], 0, key_states.shape[-1])
        self._value_buffer = value_states.new_empty(*value_states.shape[:-2], 0, value_states.shape[-1])
        self._set_length(0)
        self.is_initialized = True

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def _reserve(self, length: int) -> None:
        capacity = self._key_buffer.shape[-2]
        if length <= capacity:
            return
        capacity = max(length, 2 * capacity, MIN_CAPACITY)
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:-2], capacity, old.shape[-1])
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(end)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` entries (negative, as DynamicLayer takes it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of entries to drop, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self._set_length(max(0, self.length + tokens_to_remove))

    def reset(self) -> None:
        if self.is_initialized:
            self._set_length(0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GrowingCache holds one request; batch with a DynamicCache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("GrowingCache holds one request; batch with a DynamicCache")


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers, lazily one per model layer."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    def copy(self) -> GrowingCache:
        """A cache of its own holding the same entries."""
        copied = GrowingCache()
        for layer_idx, layer in enumerate(self.layers):
            copied.update(layer.keys, layer.values, layer_idx)  # into the copy's own buffers
        return copied

    def buffers_for(self, new_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's key and value buffers, with room for ``new_tokens`` more entries, for
        a forward that writes them itself (lean_layers.cpp; then ``filled``)."""
        for layer in self.layers:
            layer._reserve(layer.length + new_tokens)
        return [layer._key_buffer for layer in self.layers], [layer._value_buffer for layer in self.layers]

    def keep_entries(self, past_len: int, accepted: list[int]) -> bool:
        """tree_verify.keep_cache_entries in one C++ call (lean_layers.cpp) for a cache on the
        CPU, where the kernels are built; whether it ran."""
        layers = self.layers
        if not layers or not all(layer.is_initialized and layer.device.type == "cpu" for layer in layers):
            return False
        extension = cpu_extension.load()
        if extension is None:
            return False
        keys, values = extension.keep_entries(
            [layer._key_buffer for layer in layers],
            [layer._value_buffer for layer in layers],
            past_len,
            accepted,
        )
        self.filled(keys, values)
        return True

    def filled(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Take each layer's filled keys and values (views of its buffers) after such a forward."""
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            layer.keys, layer.values, layer.length = layer_keys, layer_values, layer_keys.shape[-2]
