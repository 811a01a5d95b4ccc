"""Capturing a function's GPU work once as a CUDA graph, to replay it.

A small model's eager step on a GPU is bound by launching its kernels (tens of
microseconds of Python and driver work each), not by running them; a graph replays all
of them in one launch. The verifier's KV cache slots and the drafter's tree growth use
this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

Outputs = TypeVar("Outputs")


def capture(fn: Callable[[], Outputs], pool) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """Run ``fn`` once on a side stream, so that lazy initialisation (cuBLAS workspaces,
    the caching allocator's first blocks) happens outside the graph, then capture it into
    ``pool`` (a ``torch.cuda.graph_pool_handle()``; graphs that never run at the same time
    may share one). ``fn`` must read its inputs from tensors whose addresses do not change,
    and must not read a value back to the host: ``graph.replay()`` reruns its kernels on
    whatever those tensors hold then, and leaves the results in the returned outputs.
    Those live in the pool: a replay of any graph of the same pool may overwrite them, so
    read them before the next replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    previous = torch.cuda.current_stream()
    previous.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
    except BaseException:
        # torch.cuda.graph ends the capture before it restores the stream, and does not
        # restore it when ending fails: the thread would go on on the capture stream,
        # no longer ordered with work on the one it had.
        torch.cuda.set_stream(previous)
        raise
    return graph, outputs


class GraphCache:
    """Graphs captured on first use, one per key, at most ``max_graphs``. Once a capture
    fails, none is tried again: ``get`` returns None and the caller runs eagerly, the
    same computation, only slower. ``capture_seconds`` sums the time captures took, so
    that callers can leave it out of what they time."""

    def __init__(self, enabled: bool, pool=None, max_graphs: int = 64):
        self.enabled = enabled
        self.failed = False  # a capture failed, and turned graphs off
        self.pool = pool if pool is not None or not enabled else torch.cuda.graph_pool_handle()
        self.max_graphs = max_graphs
        self.capture_seconds = 0.0
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def get(self, key: Hashable, prepare: Callable[[], Callable[[], Any]]):
        """The (graph, outputs) captured for ``key``, capturing ``prepare()``'s function
        first if there is none yet; None where graphs are off, failed or full."""
        if not self.enabled:
            return None
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                return None
            started = time.perf_counter()
            try:
                self._graphs[key] = capture(prepare(), self.pool)
            except Exception:
                log.warning("capturing a CUDA graph failed; running eagerly from now on", exc_info=True)
                self.enabled, self.failed = False, True
                return None
            finally:
                self.capture_seconds += time.perf_counter() - started
        return self._graphs[key]
