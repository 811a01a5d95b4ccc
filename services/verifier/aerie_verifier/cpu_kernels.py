"""Four CPU fixes that make the target's forwards of a few new tokens cheaper: a draft
tree's verification, a batch of plain steps, and one request's plain 1-token step.

The prefill (more rows than are timed) runs as before. Where a 1-token step changes, its
logits differ from Hugging Face's in the last bits (the greedy outputs of the engine's
plain and speculative decoding still match token for token: the tests and benchmarks
check them against each other).

- **Weights read from exact packed copies** (aerie_common.packed_weights): a layer whose fp32
  weights are all exactly Q4_1, Q8_0 or bf16 values (the default target's GGUF layers)
  multiplies up to 16 rows reading 0.75 to 2 bytes a weight instead of 4.
- **The other layers' row counts multiplied by the kernel and padding that measured fastest here**
  (aerie_common.cpu_linear): the engine times every weight shape of its target for 1 to
  16 rows when it starts (several seconds), with MKL and oneDNN, and each linear layer
  then multiplies a row count the way that measured clearly faster than MKL unpadded. A
  shape that uses oneDNN keeps a copy of its weights in oneDNN's layout (for
  SmolLM2-135M, up to 540 MB more).
- **Grouped KV heads kept packed under a mask.** transformers' SDPA attention repeats the
  key/value heads to match the query heads whenever a mask is given (a CUDA limitation),
  copying the whole KV cache of every layer at every tree verification. torch's CPU kernel
  takes the grouped heads as they are (``enable_gqa``), with the same result.
- **One request's steps without transformers' per-layer machinery** (lean_forward.py):
  the same arithmetic in one loop over the layers, with the same logits; the rotary
  embedding in one C++ call (aerie_common/csrc/rotary.cpp).

`python -m bench.verify_cost` measures them against the stock target.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from aerie_common.cpu_linear import changed_plans, tune_linear_layers
from aerie_common.packed_weights import pack_linear_layers
from aerie_common.torch_threads import in_passing_thread
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from aerie_verifier.lean_forward import install_lean_forward

log = logging.getLogger(__name__)

GROUPED_SDPA = "aerie_grouped_sdpa"
# From one row, the plain decoding step: on a 2-core AMD EPYC MKL takes a slow path for it,
# and oneDNN (padded to 3 or 4 rows) made the step 1.5x faster (63.0 -> 42.4 ms at 200
# tokens of context, 2026-12-04; docs/benchmarks.md).
MIN_TUNED_ROWS = 1


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


def speed_up_tree_verification(model, packed_weights: bool = True) -> None:
    """Apply the fixes to a target on the CPU; a no-op elsewhere, or when already applied
    (the first call decides ``packed_weights``: read the linear layers whose weights pack
    exactly from packed copies, aerie_common.packed_weights). The model is changed in place, so a
    Hugging Face baseline must load its own copy."""
    if next(model.parameters()).device.type != "cpu":
        return
    if not getattr(model, "_aerie_rows_timed", False):
        # On a thread of its own: the caller may be a thread that lives on without
        # running forwards, and its OpenMP team would slow the engine's (torch_threads).
        if packed_weights:
            packed = in_passing_thread(pack_linear_layers, model)
            log.info("linear layers read from packed weights (format: layers): %s", packed or "none")
        plans = in_passing_thread(tune_linear_layers, model, MIN_TUNED_ROWS)  # the layers left
        model._aerie_rows_timed = True
        log.info(
            "linear layers' row counts multiplied another way (rows: kernel, rows): %s",
            changed_plans(plans) or "none",
        )
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
    install_lean_forward(model)
