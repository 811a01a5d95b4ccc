"""The verifier's choice of CPU draft tree follows what its forwards cost on the machine."""

from __future__ import annotations

from dataclasses import replace

from aerie_drafter.proposer import CPU_TREE, CPU_WIDE_TREE, TreeShape
from aerie_verifier import tree_cost
from aerie_verifier.cpu_kernels import GROUPED_SDPA
from aerie_verifier.tree_cost import forward_seconds, pick_cpu_tree, serving_tree

from tests.conftest import build_tiny_llama

VOCAB = 259


def test_forwards_are_timed_per_size():
    model = build_tiny_llama(VOCAB, seed=1)
    seconds = forward_seconds(model, [3, 5], context=12, repeats=2)
    assert set(seconds) == {3, 5} and all(s > 0 for s in seconds.values())


def test_two_more_nodes_only_where_their_forward_costs_about_the_same(monkeypatch):
    model = build_tiny_llama(VOCAB, seed=1)
    costs = {3: 0.100, 5: 0.102}
    monkeypatch.setattr(tree_cost, "forward_seconds", lambda _model, sizes: {n: costs[n] for n in sizes})
    assert pick_cpu_tree(model) == (CPU_WIDE_TREE, costs)
    costs[5] = 0.115  # 15% dearer: still worth the head's 16% more tokens a step
    assert pick_cpu_tree(model)[0] == CPU_WIDE_TREE
    costs[5] = 0.125  # 25% dearer: the default tree
    assert pick_cpu_tree(model)[0] == CPU_TREE
    assert CPU_WIDE_TREE.total_tokens > CPU_TREE.total_tokens


def test_the_serving_tree_is_timed_on_the_tuned_model_unless_set(monkeypatch):
    picked = []

    def pick(model):
        picked.append(model.config._attn_implementation)
        return CPU_WIDE_TREE, {}

    monkeypatch.setattr(tree_cost, "pick_cpu_tree", pick)
    model = build_tiny_llama(VOCAB, seed=1)
    assert serving_tree(model) == CPU_WIDE_TREE
    assert picked == [GROUPED_SDPA]  # timed as the engine will run it
    assert serving_tree(model, depth=4) == TreeShape(4, CPU_TREE.top_k, CPU_TREE.total_tokens)
    assert serving_tree(model, total_tokens=3).total_tokens == 3
    assert len(picked) == 1  # a tree set by AERIE_DRAFT_TREE_* is not second-guessed
    # the context branch rides along either way
    assert serving_tree(model, context_ngram=True) == replace(CPU_WIDE_TREE, context_ngram=True)
    assert serving_tree(model, depth=4, context_ngram=True).context_ngram
