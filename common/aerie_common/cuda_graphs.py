"""Capturing a function's GPU work once as a CUDA graph, to replay it.

A small model's eager step on a GPU is bound by launching its kernels (tens of
microseconds of Python and driver work each), not by running them; a graph replays all
of them in one launch. The verifier's KV cache slots and the drafter's tree growth use
this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Outputs = TypeVar("Outputs")


def capture(fn: Callable[[], Outputs], pool) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """Run ``fn`` once on a side stream, so that lazy initialisation (cuBLAS workspaces,
    the caching allocator's first blocks) happens outside the graph, then capture it into
    ``pool`` (a ``torch.cuda.graph_pool_handle()``; graphs that never run at the same time
    may share one). ``fn`` must read its inputs from tensors whose addresses do not change,
    and must not read a value back to the host: ``graph.replay()`` reruns its kernels on
    whatever those tensors hold then, and leaves the results in the returned outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs
