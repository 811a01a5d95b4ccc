"""TIES merging: trim, sign election, disjoint mean; applied to a model."""

from __future__ import annotations

import pytest
import torch
from aerie_memory.ties import apply_deltas, merge_adapters, task_vector, ties_merge, trim


def test_trim_keeps_the_largest_fraction():
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05, 0.4, 3.0])
    kept = trim(delta, 0.3)
    assert torch.equal(kept, torch.tensor([0, -5.0, 0, 2.0, 0, 0, 0, 0, 0, 3.0]))
    assert torch.equal(trim(delta, 1.0), delta)


def test_sign_election_and_disjoint_mean():
    a = torch.tensor([1.0, 2.0, -1.0, 0.0])
    b = torch.tensor([3.0, -1.0, -3.0, 0.0])
    c = torch.tensor([-1.0, -0.5, 0.0, 2.0])
    merged = ties_merge([a, b, c], density=1.0)
    # entry 0: signs sum +3 -> mean of 1 and 3 = 2; entry 1: 2-1-0.5 = +0.5 -> only a agrees: 2
    # entry 2: negative -> mean of -1, -3 = -2; entry 3: only c: 2
    assert torch.allclose(merged, torch.tensor([2.0, 2.0, -2.0, 2.0]))
    assert torch.allclose(ties_merge([a, b, c], density=1.0, lam=0.5), merged * 0.5)
    # one task vector merges to itself, untrimmed: it has nothing to interfere with
    assert torch.allclose(ties_merge([a], 0.3), a)
    assert torch.allclose(ties_merge([a], 0.3, lam=2.0), 2 * a)
    with pytest.raises(ValueError):
        ties_merge([], 0.3)


def test_merge_adapters_and_apply():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False))
    before = lin[0].weight.detach().clone()
    a1, b1 = torch.randn(2, 4), torch.randn(3, 2)
    a2, b2 = torch.randn(2, 4), torch.randn(3, 2)
    adapters = [{"0": (a1, b1, 2.0)}, {"0": (a2, b2, 2.0)}]
    vectors = [task_vector(x)["0"] for x in adapters]
    assert torch.allclose(vectors[0], b1 @ a1 * 2.0)
    merged = merge_adapters(adapters, density=0.5)
    assert set(merged) == {"0"}
    assert (merged["0"] != 0).sum() <= 12  # at most the union of two halves
    assert torch.allclose(merged["0"], ties_merge(vectors, 0.5))
    apply_deltas(lin, merged)
    assert torch.allclose(lin[0].weight, before + merged["0"])


def test_sources_are_attributed_from_reflections():
    from aerie_memory.models import attribute_sources
    from aerie_memory.reflection import Reflection

    refl = [
        Reflection("Who governs Naxpry?", "Lumfen Uskyth", "facts_direct", ("town-01",)),
        Reflection("What does Lumfen Uskyth collect?", "brass buttons", "facts_direct", ("person-01",)),
        Reflection("What is the export of Ondhul?", "slate", "facts_direct", ("town-04",)),
    ]
    assert attribute_sources("What does Lumfen Uskyth collect?", "brass buttons", refl, top=1) == [
        "person-01"
    ]
    assert attribute_sources("Who governs Naxpry?", "Lumfen Uskyth", refl, top=2) == ["town-01"]
    assert attribute_sources("Weather?", "sunny", refl) == []
