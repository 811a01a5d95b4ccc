"""Each row count of a linear layer multiplied the way that measured fastest on this CPU.

BLAS picks its kernel by the shape of a product, and for a few rows against a model's
weights some row counts take slow paths: which ones depends on the CPU and the library.
On an Intel machine MKL's sgemm took 14.6 ms for 13 rows of SmolLM2's 49152 x 576 output
projection and 7.4 ms for 16; on an AMD EPYC, 3 rows of it took 36 ms with MKL and 5.2 ms
with oneDNN on a reordered copy of the weights. So ``tune_linear_layers`` times every
weight shape of a model for a range of row counts, with MKL (``F.linear``) and, where
torch has it, oneDNN, each row count also padded with zero rows to larger counts, and
wraps each linear layer so that it multiplies a row count the way that measured clearly
faster than MKL unpadded (``PaddedRowsLinear``). A shape that uses oneDNN keeps a copy of
its weights in oneDNN's layout.

The verifier tunes its target from 1 row (its plain step, tree verification and batched
plain steps), the drafter its head from 1 row.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MAX_PADDED_ROWS = 16  # a tree of up to 15 nodes, or 16 requests decoded in one batch
# Switch only to a way that measured at most this fraction of plain MKL's time: the
# timings are noisy, and a wrong switch costs more than a missed one.
PAD_MARGIN = 0.85
MKL, ONEDNN = "mkl", "onednn"
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


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
    Other row counts go to the layer as they are."""

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
    linears: list[nn.Linear], min_rows: int, max_rows: int, repeats: int, onednn: list | None = None
) -> dict[tuple[str, int], float]:
    """Median seconds to multiply min_rows..max_rows rows by every one of ``linears`` in
    turn, as a forward reads them (so weights too big for the caches come from memory),
    with MKL and, given the layers' weights in oneDNN's layout (``onednn``, in the same
    order), with oneDNN: (kernel, rows) -> seconds."""
    weight = linears[0].weight
    inputs = {
        rows: torch.randn(rows, weight.shape[1], dtype=weight.dtype) for rows in range(min_rows, max_rows + 1)
    }
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
    seconds: dict[tuple[str, int], float], margin: float = PAD_MARGIN, min_rows: int = 1
) -> dict[int, tuple[str, int]]:
    """rows -> (kernel, padded rows), for each row count from ``min_rows`` where some
    kernel at that count or a larger one beat MKL at the count itself by more than
    ``margin``: of those, the smallest count within 10% of the fastest (timings taken
    apart from a forward flatter padding further), and at it the faster kernel."""
    plan = {}
    for rows in sorted({r for _, r in seconds}):
        if rows < min_rows:
            continue
        baseline = seconds[(MKL, rows)]
        faster = {key: t for key, t in seconds.items() if key[1] >= rows and t < margin * baseline}
        if faster:
            best = min(faster.values())
            padded = min(r for (_, r), t in faster.items() if t <= 1.1 * best)
            kernel = min((k for k, r in faster if r == padded), key=lambda k: faster[(k, padded)])
            plan[rows] = (kernel, padded)
    return plan


def tune_linear_layers(
    model, min_rows: int, max_rows: int = MAX_PADDED_ROWS, repeats: int = 3
) -> dict[tuple[int, int], dict[int, tuple[str, int]]]:
    """Time each weight shape of the model's linear layers for min_rows..max_rows rows and
    wrap the layers whose shape has row counts better multiplied another way in
    PaddedRowsLinear (in place). Returns the plan per (out_features, in_features)."""
    by_shape: dict[tuple[int, int], list[tuple[nn.Module, str, nn.Linear]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                by_shape.setdefault(tuple(child.weight.shape), []).append((parent, name, child))
    plans = {}
    for shape, layers in by_shape.items():
        linears = [linear for _, _, linear in layers]
        onednn = None
        if onednn_available() and linears[0].weight.dtype in ONEDNN_DTYPES:
            try:
                onednn = [onednn_weights(linear) for linear in linears]
            except RuntimeError as error:  # e.g. bf16 where oneDNN lacks the instructions
                log.info(
                    "oneDNN not timed for %s weights of shape %s: %s", linears[0].weight.dtype, shape, error
                )
        seconds = time_row_counts(linears, min_rows, max_rows, repeats, onednn)
        plans[shape] = padding_plan(seconds, min_rows=min_rows)
        if plans[shape]:
            for i, (parent, name, linear) in enumerate(layers):
                setattr(parent, name, PaddedRowsLinear(linear, plans[shape], onednn[i] if onednn else None))
    return plans


def changed_plans(
    plans: dict[tuple[int, int], dict[int, tuple[str, int]]],
) -> dict[str, dict[int, tuple[str, int]]]:
    """The plans of ``tune_linear_layers`` that change something, by shape as "OUTxIN", for
    a log line."""
    return {f"{out}x{inp}": plan for (out, inp), plan in plans.items() if plan}
