"""Which draft tree pays on this CPU: the verifier times its own target's forwards.

A tree of N nodes costs one target forward of N+1 new tokens. How that cost grows with N
depends on the machine more than on anything else: on one 2-core machine 3 new tokens
cost 1.05 untuned plain steps and 5 cost 1.50, on another both about 0.67 (cpu_kernels;
measured before the 1-token step was tuned too, which made it as cheap as these). Two
more nodes raise the mean acceptance length of the shipped head by about 16% (1.73 ->
2.00 on MT-bench, docs/benchmarks.md) and cost one more draft step, so they pay only where
the larger forward costs not much more. The verifier measures that at start and picks.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace

import torch
from aerie_common.draft_tree import DraftTree
from aerie_drafter.proposer import CPU_TREE, CPU_WIDE_TREE, TreeShape, tree_shape

from aerie_verifier.cpu_kernels import speed_up_tree_verification
from aerie_verifier.kv_cache import GrowingCache
from aerie_verifier.tree_verify import tree_inputs

log = logging.getLogger(__name__)

# The wide tree is taken when its forward, timed here at start, costs at most this much
# more than the default's. With the shipped head and the context branch the wide tree
# yields 16% more tokens a step (2.004 against 1.726 on MT-bench) for a longer draft.
# Measured in-process on 2-core Intel Xeons (docs/benchmarks.md): where the 5-token forward
# timed 1.12-1.15 of the 3-token one (2026-12-05, packed weights) the wide tree decoded
# 8.6% faster; where it timed 1.31 (the same day, before them), 11% slower. Between them,
# the break-even is near 1.22.
WIDE_TREE_TOLERANCE = 1.20


def bushy_tree(nodes: int) -> DraftTree:
    """Three children of the root, then each node's child or sibling: the tree's shape
    does not change a forward's cost, only its size does."""
    parents = [-1 if i < 3 else i - 3 for i in range(nodes)]
    return DraftTree(token_ids=[100 + i for i in range(nodes)], parents=parents, scores=[0.0] * nodes)


def forward_seconds(model, new_tokens: list[int], context: int = 200, repeats: int = 5) -> dict[int, float]:
    """Median seconds of a tree-verification forward of each number of new tokens over a
    ``context``-token KV cache kept as the engine keeps a request's (so on the CPU through
    the lean forward), the sizes interleaved so that noise falls on each alike."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prefix = torch.randint(
        100, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)
    )
    seconds: dict[int, list[float]] = {n: [] for n in new_tokens}
    with torch.inference_mode():
        cache = GrowingCache()
        model(prefix.to(device), past_key_values=cache)
        for _ in range(repeats + 1):  # the first round warms up
            for n in new_tokens:
                inputs = tree_inputs(7, bushy_tree(n - 1), context, model.config, device, dtype)
                started = time.perf_counter()
                model(**inputs.model_kwargs(), past_key_values=cache)
                seconds[n].append(time.perf_counter() - started)
                cache.crop(-n)
    return {n: statistics.median(times[1:]) for n, times in seconds.items()}


def pick_cpu_tree(model, tolerance: float = WIDE_TREE_TOLERANCE) -> tuple[TreeShape, dict[int, float]]:
    """CPU_WIDE_TREE where its forward costs at most ``tolerance`` times CPU_TREE's on this
    machine, else CPU_TREE; also returns the seconds measured, by new tokens."""
    default, wide = CPU_TREE.total_tokens + 1, CPU_WIDE_TREE.total_tokens + 1
    seconds = forward_seconds(model, [default, wide])
    return (CPU_WIDE_TREE if seconds[wide] <= tolerance * seconds[default] else CPU_TREE), seconds


def serving_tree(
    model, depth: int = 0, top_k: int = 0, total_tokens: int = 0, context_ngram: bool = False
) -> TreeShape:
    """The tree the verifier asks for: the device's default with any non-zero field
    overridden (AERIE_DRAFT_TREE_*), or, on a CPU with none set, the one this machine
    verifies best (the model is tuned for tree verification first, as the engine runs it);
    with the context branch or not (AERIE_DRAFT_TREE_CONTEXT_NGRAM)."""
    device = str(next(model.parameters()).device)
    if not device.startswith("cpu") or depth or top_k or total_tokens:
        return tree_shape(device, depth, top_k, total_tokens, context_ngram)
    speed_up_tree_verification(model)
    shape, seconds = pick_cpu_tree(model)
    shape = replace(shape, context_ngram=context_ngram)
    log.info(
        "draft tree %s: a forward of %s new tokens took %s ms here",
        shape,
        " and ".join(map(str, seconds)),
        " and ".join(f"{1000 * s:.1f}" for s in seconds.values()),
    )
    return shape
