"""The CPU fixes for tree verification give the forward's results unchanged (to float
rounding) and take their faster paths."""

from __future__ import annotations

import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from aerie_common import cpu_linear
from aerie_common.cpu_linear import MKL, ONEDNN, PaddedRowsLinear
from aerie_common.draft_tree import DraftTree
from aerie_verifier.cpu_kernels import GROUPED_SDPA, speed_up_tree_verification
from aerie_verifier.tree_verify import tree_inputs
from torch import nn
from transformers import DynamicCache

from tests.conftest import build_tiny_llama

VOCAB = 259


def linears(model) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def verify_tree(model, prompt, tree, root=40):
    cache = DynamicCache()
    model(prompt, past_key_values=cache)
    inputs = tree_inputs(root, tree, prompt.shape[1], model.config, "cpu", torch.float32)
    logits = model(**inputs.model_kwargs(), past_key_values=cache).logits[0]
    step = model(torch.tensor([[root]]), past_key_values=cache).logits[0, -1]
    return logits, step


def test_tuned_target_verifies_a_tree_as_the_stock_one_without_repeating_kv_heads(monkeypatch):
    # As if every weight shape were slow at 1 (the plain step), 3 and 13 rows on this machine.
    timed_shapes = []

    def time_row_counts(linears, min_rows, max_rows, repeats, onednn):
        assert min_rows == 1  # the plain 1-token step is timed too
        timed_shapes.append(tuple(linears[0].weight.shape))
        mkl = {(MKL, rows): 2.0 if rows in (1, 3, 13) else 1.0 for rows in range(1, max_rows + 1)}
        return {**mkl, (ONEDNN, 13): 1.0}

    monkeypatch.setattr(cpu_linear, "time_row_counts", time_row_counts)
    stock, tuned = build_tiny_llama(VOCAB, seed=5), build_tiny_llama(VOCAB, seed=5)
    speed_up_tree_verification(tuned)
    speed_up_tree_verification(tuned)  # idempotent: timed once
    assert len(timed_shapes) == len(set(timed_shapes)) == len({m.weight.shape for m in linears(stock)})
    assert tuned.config._attn_implementation == GROUPED_SDPA
    wrapped = [m for m in tuned.modules() if isinstance(m, PaddedRowsLinear)]
    assert len(wrapped) == len(linears(stock))  # every linear layer, the output projection too
    assert isinstance(tuned.get_output_embeddings(), PaddedRowsLinear)
    assert tuned.get_output_embeddings().plan == {1: (MKL, 2), 3: (MKL, 4), 13: (ONEDNN, 13)}

    repeats = []
    real_repeat_kv = hf_sdpa.repeat_kv
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda h, n: repeats.append(n) or real_repeat_kv(h, n))
    torch.manual_seed(2)
    prompt = torch.randint(3, VOCAB, (1, 11))
    # 12 nodes: root + 12 = 13 rows, which every linear layer multiplies with oneDNN
    tree = DraftTree(
        token_ids=list(range(50, 62)),
        parents=[-1, -1, -1, 0, 0, 1, 3, 3, 4, 6, 6, 9],
        scores=[-0.1 * i for i in range(12)],
    )
    with torch.no_grad():
        stock_logits, stock_step = verify_tree(stock, prompt, tree)
        assert repeats  # the stock target repeats the KV heads under the tree's mask
        repeats.clear()
        tuned_logits, tuned_step = verify_tree(tuned, prompt, tree)
    assert not repeats
    assert torch.allclose(tuned_logits, stock_logits, atol=1e-5)
    assert torch.equal(tuned_logits.argmax(-1), stock_logits.argmax(-1))
    # the plain 1-token step, padded to 2 rows: the same logits to rounding
    assert torch.allclose(tuned_step, stock_step, atol=1e-5)
    assert torch.equal(tuned_step.argmax(-1), stock_step.argmax(-1))


def test_verify_cost_bench_times_both_copies_and_compares_their_picks():
    from bench.verify_cost import bushy_tree, measure

    bushy_tree(12).validate(VOCAB)
    stock, tuned = build_tiny_llama(VOCAB, seed=6), build_tiny_llama(VOCAB, seed=6)
    speed_up_tree_verification(tuned)
    rows = measure(stock, tuned, context=20, sizes=[1, 13], repeats=2)
    assert [r["new_tokens"] for r in rows] == [1, 13]
    assert rows[0]["tuned_in_plain_steps"] == 1.0
    assert all(r["stock_ms"] > 0 and r["tuned_ms"] > 0 and not r["argmax_differs"] for r in rows)

    other = build_tiny_llama(VOCAB, seed=6)
    with torch.no_grad():
        other.model.norm.weight.neg_()  # negated logits: argmax becomes argmin, which the check must notice
    assert any(r["argmax_differs"] for r in measure(stock, other, context=20, sizes=[1, 13], repeats=1))
