"""Two CPU fixes that make a draft tree's verification forward cheaper.

They change forwards of several new tokens (and a batch of several requests' plain steps);
a single request's 1-token step and the prefill run as before, so plain decoding stays
bit for bit Hugging Face's.

- **Each row count multiplied by the kernel and padding that measured fastest here.**
  BLAS picks its kernel by the shape of a product, and for a few rows against a model's
  weights some row counts take slow paths: which ones depends on the CPU and the library.
  On an Intel machine MKL's sgemm took 14.6 ms for 13 rows of the 49152 x 576 output
  projection and 7.4 ms for 16; on an AMD EPYC, 3 rows of it took 36 ms with MKL and 5.2
  ms with oneDNN on a reordered copy of the weights. So the engine times every weight
  shape of its target for 2 to 16 rows when it starts (several seconds), with MKL
  (``F.linear``) and, where torch has it, oneDNN, each row count also padded with zero
  rows to larger counts, and each linear layer then multiplies a row count the way that
  measured clearly faster than MKL unpadded. A shape that uses oneDNN keeps a copy of its
  weights in oneDNN's layout (for SmolLM2-135M, up to 540 MB more).
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
# Switch only to a way that measured at most this fraction of plain MKL's time: the
# timings are noisy, and a wrong switch costs more than a missed one.
PAD_MARGIN = 0.85
MKL, ONEDNN = "mkl", "onednn"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_weights(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight reordered once into oneDNN's blocked layout, and its bias, for
    ``onednn_linear``. The reorder is a hint for up to MAX_PADDED_ROWS rows; any count works."""
    weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), MAX_PADDED_ROWS)
    bias = None if linear.bias is None else linear.bias.detach()
    return weight, bias


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias with oneDNN, on a reordered weight. Dense rows in and out: the
    op inductor uses, which spares the activations the round trip through oneDNN's own
    tensor type that ``torch._C._nn.mkldnn_linear`` needs (a third of its time for 5 rows)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PaddedRowsLinear(nn.Module):
    """A linear layer that multiplies some row counts another way (``plan``: rows ->
    (kernel, padded rows)): with MKL or oneDNN, padded with zero rows that are sliced off.
    Other row counts, one row always among them, go to the layer as they are."""

    def __init__(
        self,
        linear: nn.Linear,
        plan: dict[int, tuple[str, int]],
        onednn: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ):
        super().__init__()
        self.linear = linear
        self.plan = dict(plan)
        uses_onednn = any(kernel == ONEDNN for kernel, _ in plan.values())
        # the weights in oneDNN's layout (onednn_weights), if the caller has them already
        self._onednn = (onednn or onednn_weights(linear)) if uses_onednn else None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        way = self.plan.get(rows)
        if way is None:
            return self.linear(x)
        kernel, padded_rows = way
        flat = x.reshape(rows, x.shape[-1])
        if padded_rows > rows:  # F.pad copies even when it adds nothing
            flat = F.pad(flat, (0, 0, 0, padded_rows - rows))
        if kernel == ONEDNN:
            out = onednn_linear(flat, *self._onednn)
        else:
            out = self.linear(flat)
        return out[:rows].reshape(*x.shape[:-1], -1)


def time_row_counts(
    linears: list[nn.Linear], max_rows: int, repeats: int, onednn: list | None = None
) -> dict[tuple[str, int], float]:
    """Median seconds to multiply 2..max_rows rows by every one of ``linears`` in turn, as
    a forward reads them (so weights too big for the caches come from memory), with MKL
    and, given the layers' weights in oneDNN's layout (``onednn``, in the same order),
    with oneDNN: (kernel, rows) -> seconds. One row is not timed: no plan changes it."""
    weight = linears[0].weight
    inputs = {rows: torch.randn(rows, weight.shape[1], dtype=weight.dtype) for rows in range(2, max_rows + 1)}
    kernels = {MKL: lambda x, i: F.linear(x, linears[i].weight)}
    if onednn is not None:
        kernels[ONEDNN] = lambda x, i: onednn_linear(x, *onednn[i])
    seconds: dict[tuple[str, int], list[float]] = {(k, r): [] for k in kernels for r in inputs}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for rows, x in inputs.items():  # interleaved, so noise falls on every count alike
                for kernel, multiply in kernels.items():
                    started = time.perf_counter()
                    for i in range(len(linears)):
                        multiply(x, i)
                    seconds[(kernel, rows)].append(time.perf_counter() - started)
    return {key: statistics.median(times[1:]) for key, times in seconds.items()}


def padding_plan(
    seconds: dict[tuple[str, int], float], margin: float = PAD_MARGIN
) -> dict[int, tuple[str, int]]:
    """rows -> (kernel, padded rows), for each row count from 2 where some kernel at that
    count or a larger one beat MKL at the count itself by more than ``margin``: of those,
    the smallest count within 10% of the fastest (timings taken apart from a forward
    flatter padding further), and at it the faster kernel. One row is never changed: it
    is the plain decoding step, which stays bit for bit the reference."""
    plan = {}
    for rows in sorted({r for _, r in seconds}):
        if rows < 2:
            continue
        baseline = seconds[(MKL, rows)]
        faster = {key: t for key, t in seconds.items() if key[1] >= rows and t < margin * baseline}
        if faster:
            best = min(faster.values())
            padded = min(r for (_, r), t in faster.items() if t <= 1.1 * best)
            kernel = min((k for k, r in faster if r == padded), key=lambda k: faster[(k, padded)])
            plan[rows] = (kernel, padded)
    return plan


def pad_linear_rows(
    model, max_rows: int = MAX_PADDED_ROWS, repeats: int = 3
) -> dict[tuple[int, int], dict[int, tuple[str, int]]]:
    """Time each weight shape of the model's linear layers for 2..max_rows rows and wrap
    the layers whose shape has row counts better multiplied another way in
    PaddedRowsLinear. Returns the plan per (out_features, in_features)."""
    by_shape: dict[tuple[int, int], list[tuple[nn.Module, str, nn.Linear]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                by_shape.setdefault(tuple(child.weight.shape), []).append((parent, name, child))
    plans = {}
    for shape, layers in by_shape.items():
        linears = [linear for _, _, linear in layers]
        fp32 = linears[0].weight.dtype == torch.float32
        onednn = [onednn_weights(linear) for linear in linears] if onednn_available() and fp32 else None
        plans[shape] = padding_plan(time_row_counts(linears, max_rows, repeats, onednn))
        if plans[shape]:
            for i, (parent, name, linear) in enumerate(layers):
                setattr(parent, name, PaddedRowsLinear(linear, plans[shape], onednn[i] if onednn else None))
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
        changed = {f"{o}x{i}": plan for (o, i), plan in plans.items() if plan}
        log.info(
            "linear layers' row counts multiplied another way (rows: kernel, rows): %s", changed or "none"
        )
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
