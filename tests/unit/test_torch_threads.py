"""in_passing_thread runs its call on a thread that has ended when it returns."""

from __future__ import annotations

import threading

import pytest
from aerie_common.torch_threads import in_passing_thread


def test_the_call_runs_on_a_thread_that_ends_with_it():
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert in_passing_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_the_call_s_exception_reaches_the_caller():
    def fail():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        in_passing_thread(fail)


def test_memory_queries_of_every_namespace_run_on_one_compute_thread(tmp_path, monkeypatch):
    import asyncio
    import types

    import aerie_memory.__main__ as memory_main
    from aerie_memory.__main__ import MemoryServicer
    from aerie_memory.settings import MemorySettings
    from aerie_proto.v1 import memory_pb2

    threads = []

    def recall(question, max_tokens):
        threads.append(threading.current_thread())
        return "Paris.", False

    monkeypatch.setattr(memory_main, "names_known_entity", lambda question, text: True)
    servicer = MemoryServicer(MemorySettings(model_cache=tmp_path), store=None)

    async def loaded(namespace):
        return types.SimpleNamespace(
            lock=threading.Lock(),
            recall=recall,
            learned_text="",
            reflections=[],
            version="v1",
            passages={},
        )

    servicer._memory = loaded

    async def ask_all():
        requests = [memory_pb2.QueryRequest(namespace=f"ns{i % 3}", question="Where?") for i in range(6)]
        return await asyncio.gather(*(servicer.Query(r, context=None) for r in requests))

    answers = asyncio.run(ask_all())
    assert [a.answer for a in answers] == ["Paris."] * 6
    assert len(threads) == 6 and len(set(threads)) == 1
    assert threads[0].name.startswith("memory-compute")
