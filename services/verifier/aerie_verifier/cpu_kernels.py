"""Two CPU fixes that make a draft tree's verification forward cheaper.

They change forwards of several new tokens (and a batch of several requests' plain steps);
a single request's 1-token step and the prefill run as before, so plain decoding stays
bit for bit Hugging Face's.

- **Row counts padded to faster ones, measured on this machine.** BLAS picks its kernel
  by the shape of a product, and for a few rows against a model's weights some row counts
  take slow paths: which ones depends on the CPU and the library. On one 2-core machine
  MKL's sgemm took 14.6 ms for 13 rows of the 49152 x 576 output projection and 7.4 ms
  for 16; on another, 3 rows of the 1536 x 576 MLP projections (all 60 of them) took
  44.7 ms and 4 rows 25.9 ms. So the engine times every weight shape of its target for 1
  to 16 rows when it starts (a few seconds), and each linear layer pads a row count to
  a larger one that measured clearly faster; the extra rows are zeros, sliced off.
- **Grouped KV heads kept packed under a mask.** transformers' SDPA attention repeats the
  key/value heads to match the query heads whenever a mask is given (a CUDA limitation),
  copying the whole KV cache of every layer at every tree verification. torch's CPU kernel
  takes the grouped heads as they are (``enable_gqa``), with the same result.

`python -m bench.verify_cost` measures both against the stock target.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F
from aerie_common.torch_threads import in_passing_thread
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

log = logging.getLogger(__name__)

GROUPED_SDPA = "aerie_grouped_sdpa"
MAX_PADDED_ROWS = 16  # a tree of up to 15 nodes, or 16 requests decoded in one batch
# Pad only to a row count that measured at most this fraction of the count's own time:
# the timings are noisy, and a wrong pad costs more than a missed one.
PAD_MARGIN = 0.85


class PaddedRowsLinear(nn.Module):
    """A linear layer that multiplies some row counts padded with zero rows to a larger,
    faster one (``pad_to``: rows -> padded rows)."""

    def __init__(self, linear: nn.Linear, pad_to: dict[int, int]):
        super().__init__()
        self.linear = linear
        self.pad_to = dict(pad_to)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        padded_rows = self.pad_to.get(rows)
        if padded_rows is None:
            return self.linear(x)
        padded = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded_rows - rows))
        return self.linear(padded)[:rows].reshape(*x.shape[:-1], -1)


def time_row_counts(weights: list[torch.Tensor], max_rows: int, repeats: int) -> dict[int, float]:
    """Median seconds to multiply 1..max_rows rows by every one of ``weights`` in turn, as
    a forward reads them (so weights too big for the caches come from memory)."""
    inputs = {
        rows: torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
        for rows in range(1, max_rows + 1)
    }
    seconds: dict[int, list[float]] = {rows: [] for rows in inputs}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for rows, x in inputs.items():  # interleaved, so noise falls on every count alike
                started = time.perf_counter()
                for weight in weights:
                    F.linear(x, weight)
                seconds[rows].append(time.perf_counter() - started)
    return {rows: statistics.median(times[1:]) for rows, times in seconds.items()}


def padding_plan(seconds: dict[int, float], margin: float = PAD_MARGIN) -> dict[int, int]:
    """rows -> the row count to pad to, for each count from 2 that a larger count beat by
    more than ``margin``: the smallest such count within 10% of the fastest, since timings
    taken apart from a forward flatter padding further. One row is never padded: it is
    the plain decoding step, which stays the reference."""
    plan = {}
    for rows in sorted(seconds):
        if rows < 2:
            continue
        faster = [r for r in seconds if r > rows and seconds[r] < margin * seconds[rows]]
        if faster:
            best = min(seconds[r] for r in faster)
            plan[rows] = min(r for r in faster if seconds[r] <= 1.1 * best)
    return plan


def pad_linear_rows(
    model, max_rows: int = MAX_PADDED_ROWS, repeats: int = 3
) -> dict[tuple[int, int], dict[int, int]]:
    """Time each weight shape of the model's linear layers for 1..max_rows rows and wrap
    the layers whose shape has slow row counts in PaddedRowsLinear. Returns the plan per
    (out_features, in_features)."""
    by_shape: dict[tuple[int, int], list[tuple[nn.Module, str, nn.Linear]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                by_shape.setdefault(tuple(child.weight.shape), []).append((parent, name, child))
    plans = {}
    for shape, layers in by_shape.items():
        weights = [linear.weight for _, _, linear in layers]
        plans[shape] = padding_plan(time_row_counts(weights, max_rows, repeats))
        if plans[shape]:
            for parent, name, linear in layers:
                setattr(parent, name, PaddedRowsLinear(linear, plans[shape]))
    return plans


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
    if not getattr(model, "_aerie_rows_timed", False):
        # On a thread of its own: the caller may be a thread that lives on without
        # running forwards, and its OpenMP team would slow the engine's (torch_threads).
        plans = in_passing_thread(pad_linear_rows, model)
        model._aerie_rows_timed = True
        padded = {f"{o}x{i}": plan for (o, i), plan in plans.items() if plan}
        log.info("linear layers padded to faster row counts (rows: padded rows): %s", padded or "none")
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
