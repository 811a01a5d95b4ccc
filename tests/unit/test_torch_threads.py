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
            passage_words={},
        )

    servicer._memory = loaded

    async def ask_all():
        requests = [memory_pb2.QueryRequest(namespace=f"ns{i % 3}", question="Where?") for i in range(6)]
        return await asyncio.gather(*(servicer.Query(r, context=None) for r in requests))

    answers = asyncio.run(ask_all())
    assert [a.answer for a in answers] == ["Paris."] * 6
    assert len(threads) == 6 and len(set(threads)) == 1
    assert threads[0].name.startswith("memory-compute")


def test_the_cpu_quota_is_read_from_cgroup_v2_then_v1(tmp_path, monkeypatch):
    from aerie_common import torch_threads

    v2, v1 = tmp_path / "cpu.max", tmp_path / "cpu"
    monkeypatch.setattr(torch_threads, "CGROUP_V2_CPU_MAX", str(v2))
    monkeypatch.setattr(torch_threads, "CGROUP_V1_CPU", str(v1))
    assert torch_threads.cpu_quota_cores() is None  # no cgroup files
    for text, cores in [
        ("max 100000\n", None),
        ("400000 100000\n", 4),
        ("150000 100000\n", 2),
        ("5000 100000", 1),
    ]:
        v2.write_text(text)
        assert torch_threads.cpu_quota_cores() == cores, text
    v2.unlink()
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    for quota, cores in [("-1\n", None), ("200000\n", 2)]:
        (v1 / "cpu.cfs_quota_us").write_text(quota)
        assert torch_threads.cpu_quota_cores() == cores, quota


def test_torch_threads_are_the_configured_number_or_the_default_within_the_quota(monkeypatch):
    import torch
    from aerie_common import torch_threads

    threads = [64]  # torch's default: every core of the node
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch_threads, "cpu_quota_cores", lambda: None)
    assert torch_threads.set_torch_threads(0) == 64 and threads == [64]  # no quota: torch's count
    monkeypatch.setattr(torch_threads, "cpu_quota_cores", lambda: 4)
    assert torch_threads.set_torch_threads(0) == 4  # the pod's limit
    assert torch_threads.set_torch_threads(8) == 8  # as configured, quota or not
    assert torch_threads.set_torch_threads(0) == 4 and threads == [64, 4, 8, 4]
