"""Two CPU fixes that make a draft tree's verification forward cheaper.

They change forwards of several new tokens, and the padding also takes the output
projection of 8 to 15 requests decoded in one batch; a single request's 1-token step and
the prefill run as before. Measured on the 2-core CPU, SmolLM2-135M, fp32, a 13-token
tree over 200 tokens of context: 120 ms before, 100 ms after (the 1-token step: 66 ms
either way; `python -m bench.verify_cost` measures it).

- **Logit rows padded to 16.** MKL's sgemm takes a slow path for 8 to 15 rows of a wide
  matrix: the 49152 x 576 output projection costs 14.6 ms for 13 rows and 7.4 ms for 16.
  Padding the rows to 16 takes the fast path; the extra rows are sliced off.
- **Grouped KV heads kept packed under a mask.** transformers' SDPA attention repeats the
  key/value heads to match the query heads whenever a mask is given (a CUDA limitation),
  copying the whole KV cache of every layer at every tree verification. torch's CPU kernel
  takes the grouped heads as they are (``enable_gqa``), with the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GROUPED_SDPA = "aerie_grouped_sdpa"
_SLOW_ROWS = range(8, 16)  # row counts MKL multiplies slowly against a wide matrix
_FAST_ROWS = 16


class PaddedRowsLinear(nn.Module):
    """A linear layer that pads 8-15 input rows to 16 before multiplying."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows not in _SLOW_ROWS:
            return self.linear(x)
        padded = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, _FAST_ROWS - rows))
        return self.linear(padded)[:rows].reshape(*x.shape[:-1], -1)


def grouped_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, except that a masked multi-token query attends to
    grouped key/value heads without repeating them."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain_case = (
        groups == 1
        or attention_mask is None
        or query.shape[2] == 1  # transformers already packs the groups of a single query
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions", False)
    )
    if plain_case:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=kwargs.get("dropout", 0.0),
        scale=kwargs.get("scaling"),
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)


def speed_up_tree_verification(model) -> None:
    """Apply both fixes to a target on the CPU; a no-op elsewhere, or when already applied.
    The model is changed in place, so a Hugging Face baseline must load its own copy."""
    if next(model.parameters()).device.type != "cpu":
        return
    output = model.get_output_embeddings()
    if isinstance(output, nn.Linear):
        model.set_output_embeddings(PaddedRowsLinear(output))
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
