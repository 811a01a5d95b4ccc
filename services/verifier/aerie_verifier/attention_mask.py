"""The attention masks the engine hands the target for a draft tree or a KV cache slot,
sliding-window layers included.

Given a prepared 4D mask, transformers uses it as it is in every layer: it applies a
sliding window only to masks it builds itself. A target with sliding-window layers
(Mistral, Phi-3, Gemma 2 and 3, Cohere 2, Qwen2 with ``use_sliding_window``) would then let
each tree node see further back than the same token sees when decoded alone, and the
output would no longer be the target's. So those layers get a mask of their own that also
hides every key a window or more positions behind its query, by position, as transformers'
``sliding_window_overlay`` does: a query at position q sees keys at positions above
q - window. Targets that mix both kinds of layer take the two masks as a mapping from
layer type, which their forward accepts in place of one mask.
"""

from __future__ import annotations

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def sliding_window(config) -> int | None:
    """The window of the target's sliding-window layers; None where every layer attends
    to the whole context."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and SLIDING not in layer_types):
        return None
    return int(window)


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, rows, keys]: 0 where ``visible``, the dtype's lowest value elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]


def target_attention_mask(
    config,
    visible: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The target forward's ``attention_mask`` for rows (queries at ``query_positions``)
    that see the keys ``visible`` [rows, keys] marks (keys at ``key_positions``): one
    additive mask, or one per layer type where only some layers slide."""
    window = sliding_window(config)
    if window is None:
        return additive(visible, dtype)
    in_window = key_positions[None, :] > query_positions[:, None] - window
    windowed = additive(visible & in_window, dtype)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None or FULL not in layer_types:
        return windowed
    return {FULL: additive(visible, dtype), SLIDING: windowed}
