"""Each row count of a linear layer multiplied the way that measured fastest gives the
layer's results (to float rounding), and the plan picks clearly faster ways only."""

from __future__ import annotations

import pytest
import torch
from aerie_common.cpu_linear import (
    MKL,
    ONEDNN,
    PaddedRowsLinear,
    changed_plans,
    onednn_available,
    onednn_weights,
    padding_plan,
    tune_linear_layers,
)
from torch import nn


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 3), (1, 8), (1, 13), (1, 16), (3, 4), (2, 5)])
def test_padded_rows_linear_matches_the_linear_multiplying_the_planned_rows_its_way(shape):
    torch.manual_seed(0)
    linear = nn.Linear(32, 300)
    plan = {2: (ONEDNN, 2), 3: (MKL, 4), 10: (MKL, 16), 13: (ONEDNN, 16)}
    padded = PaddedRowsLinear(linear, plan)
    seen_rows = []
    linear.register_forward_hook(lambda _m, args, _out: seen_rows.append(args[0].shape[:-1].numel()))
    x = torch.randn(*shape, 32)
    with torch.no_grad():
        out = padded(x)
        expected = linear(x)
    assert out.shape == (*shape, 300)
    assert torch.allclose(out, expected, atol=1e-5)
    rows = shape[0] * shape[1]
    kernel, padded_rows = plan.get(rows, (MKL, rows))
    if kernel == MKL:  # the layer itself ran, on the padded rows
        assert seen_rows[0] == padded_rows
    else:  # oneDNN ran on its own copy of the weights
        assert len(seen_rows) == 1  # the reference call only


def test_the_plan_takes_a_clearly_faster_way_the_least_padded_near_the_fastest():
    mkl = {1: 5.0, 2: 2.0, 3: 3.0, 4: 1.5, 5: 1.6, 6: 3.2, 7: 1.45, 8: 1.5}
    seconds = {(MKL, r): t for r, t in mkl.items()}
    # 4 -> 7 and 5 -> 7 would save 3% and 9%: under the margin. Counts under min_rows stay.
    # 4 is within 10% of the fastest (7), so 2, 3 and 6 pad to the smallest such count.
    assert padding_plan(seconds, margin=0.85, min_rows=2) == {2: (MKL, 4), 3: (MKL, 4), 6: (MKL, 7)}
    assert padding_plan(seconds, margin=0.85)[1] == (MKL, 4)  # from one row by default
    assert padding_plan(seconds, margin=1.0, min_rows=2) == {
        r: (MKL, 4 if r < 4 else 7) for r in (2, 3, 4, 5, 6)
    }
    # oneDNN fast at every count: each count unpadded, with oneDNN
    seconds.update({(ONEDNN, r): 0.5 for r in mkl})
    assert padding_plan(seconds, min_rows=2) == {r: (ONEDNN, r) for r in range(2, 9)}
    assert padding_plan(seconds) == {r: (ONEDNN, r) for r in range(1, 9)}
    assert padding_plan({(MKL, 1): 1.0, (MKL, 2): 1.2, (MKL, 3): 1.3}) == {}  # nothing slow


def onednn_reorders(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN takes weights of ``dtype``."""
    try:
        onednn_weights(nn.Linear(16, 24).to(dtype))
    except RuntimeError:
        return False
    return onednn_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tuning_times_from_min_rows_and_wraps_every_layer_of_a_shape_with_a_plan(monkeypatch, dtype):
    from aerie_common import cpu_linear

    timed = []

    def time_row_counts(linears, min_rows, max_rows, repeats, onednn):
        """MKL slow for one row of the first shape; oneDNN, where it has the weights, never."""
        timed.append((tuple(linears[0].weight.shape), min_rows, onednn is not None))
        slow_at_one = linears[0].weight.shape == (24, 16)
        counts = range(min_rows, max_rows + 1)
        mkl = {(MKL, r): 2.0 if r == 1 and slow_at_one else 1.0 for r in counts}
        return mkl | ({(ONEDNN, r): 1.0 for r in counts} if onednn is not None else {})

    monkeypatch.setattr(cpu_linear, "time_row_counts", time_row_counts)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.Linear(16, 24)).to(dtype)
    x = torch.randn(1, 16, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        plans = tune_linear_layers(model, min_rows=1)
        out = model(x)
    # one row of the first shape goes to oneDNN, or, on a CPU whose oneDNN lacks the
    # instructions for these weights (bf16 without AVX-512), to MKL padded to two rows
    one_row = (ONEDNN, 1) if onednn_reorders(dtype) else (MKL, 2)
    assert plans == {(24, 16): {1: one_row}, (16, 24): {}}
    assert changed_plans(plans) == {"24x16": {1: one_row}}  # what the services log
    assert {shape for shape, _, _ in timed} == {(24, 16), (16, 24)}
    assert all(min_rows == 1 for _, min_rows, _ in timed)
    assert isinstance(model[0], PaddedRowsLinear) and isinstance(model[3], PaddedRowsLinear)
    assert type(model[2]) is nn.Linear
    assert torch.allclose(out.float(), expected.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_tuning_leaves_onednn_out_where_it_cannot_reorder_the_weights(monkeypatch):
    # oneDNN refuses bf16 weights on a CPU without the instructions its bf16 path needs
    # (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU showed it): MKL is timed alone.
    from aerie_common import cpu_linear

    def refuse(linear):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    timed_with_onednn = []

    def time_row_counts(linears, min_rows, max_rows, repeats, onednn):
        timed_with_onednn.append(onednn is not None)
        return {(MKL, r): 1.0 for r in range(min_rows, max_rows + 1)}

    monkeypatch.setattr(cpu_linear, "onednn_weights", refuse)
    monkeypatch.setattr(cpu_linear, "time_row_counts", time_row_counts)
    model = nn.Sequential(nn.Linear(16, 24))
    assert tune_linear_layers(model, min_rows=1) == {(24, 16): {}}
    assert timed_with_onednn == [False] and type(model[0]) is nn.Linear
