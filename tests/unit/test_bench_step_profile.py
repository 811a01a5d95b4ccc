"""bench.step_profile: what it reads from the profiler, on a stand-in generation."""

import threading

import torch
from aerie_verifier.speculative import SpeculativeStats

from bench.step_profile import profile_generation


def generation_on_another_thread(steps: int, stats: SpeculativeStats | None):
    """A generation as the engine runs one: its ops on a thread of their own, a product and
    a read of a scalar (the host waiting for the result) per step."""
    x = torch.randn(32, 32)

    def decode():
        for _ in range(steps):
            torch.mm(x, x).sum().item()

    def generate():
        thread = threading.Thread(target=decode)
        thread.start()
        thread.join()
        return list(range(steps)), 0.5, stats

    return generate


def test_profile_counts_the_engine_threads_ops_per_forward():
    result = profile_generation(generation_on_another_thread(4, None), on_device=False)
    assert (result["tokens"], result["forwards"], result["ms_per_forward"]) == (4, 4, 125.0)
    ops = {op["op"]: op for op in result["top_ops"]}
    assert ops["aten::mm"]["calls_per_forward"] == 1.0
    assert ops["aten::mm"]["self_ms_per_forward"] > 0
    assert result["host_waits_per_forward"] == {"aten::_local_scalar_dense": 1.0}
    assert result["mean_acceptance_length"] is None


def test_a_speculative_generation_has_a_forward_per_tree_and_the_prefill():
    stats = SpeculativeStats()
    stats.record(tree_size=2, accepted=1, seconds=0.01)
    stats.record(tree_size=2, accepted=2, seconds=0.01)
    result = profile_generation(generation_on_another_thread(6, stats), on_device=False)
    assert result["forwards"] == 3  # the prefill, then two trees verified
    assert result["mean_acceptance_length"] == 2.5


def test_a_trace_is_written_where_asked(tmp_path):
    profile_generation(generation_on_another_thread(1, None), on_device=False, trace=tmp_path / "t.json")
    assert "aten::mm" in (tmp_path / "t.json").read_text()
