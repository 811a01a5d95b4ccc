"""What CUDA graph capture does when a capture fails, with torch.cuda's stream and graph
calls stood in for (no GPU needed): the thread gets its stream back, and the cache turns
graphs off so that its callers run eagerly."""

import contextlib

import pytest
import torch
from aerie_common.cuda_graphs import GraphCache, capture


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def failing_capture(monkeypatch):
    """torch.cuda as capture() sees it, where ending the capture fails; returns the calls
    that set the current stream and the stream the thread had."""
    previous, set_streams = FakeStream(), []

    class FailsToEnd:  # torch.cuda.graph's context: the capture stream is current inside
        def __init__(self, graph, pool):
            pass

        def __enter__(self):
            pass

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: previous)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", FailsToEnd)
    monkeypatch.setattr(torch.cuda, "set_stream", set_streams.append)
    return set_streams, previous


def test_a_failed_capture_gives_the_thread_its_stream_back(failing_capture):
    set_streams, previous = failing_capture
    with pytest.raises(RuntimeError, match="capturing"):
        capture(lambda: None, pool=None)
    assert set_streams == [previous]


def test_after_a_failed_capture_the_cache_runs_eagerly_and_says_so(failing_capture):
    cache = GraphCache(enabled=True, pool="a pool")
    assert cache.get("key", lambda: lambda: None) is None
    assert cache.failed and not cache.enabled
    assert cache.get("other", lambda: pytest.fail("no capture is tried again")) is None
    assert cache.capture_seconds > 0
