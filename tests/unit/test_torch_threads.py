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
