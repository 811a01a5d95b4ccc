"""Which threads may run torch work in a service process: one.

On Linux torch parallelises its CPU kernels with libgomp, which keeps an OpenMP team
for every thread that has run a parallel region, for as long as that thread lives. Once
a process holds more OpenMP threads than cores, every team sleeps between regions
instead of spinning, and a forward pays a wake-up in each of its hundreds of regions. On
the 2-core development machine a SmolLM2-135M decoding step took 30 ms on the only
thread doing torch work and 51 ms on a second one, after the first had run one forward
(while the first lived; a thread that ended left no trace).

So a service does its torch work on one long-lived thread (the verifier's engine thread,
the drafter's and the memory service's compute threads), and work that must happen before that thread exists,
such as loading the model, runs on a thread that ends with it.

Between processes the trade-off is the spin itself: the verifier and the drafter take
turns on the same cores, and a team that spins long after its last region (libgomp's
default, 300000 spins) takes the cores from the other process (an earlier version measured a
draft step 10x slower beside a verifier), while one that sleeps at once (OMP_WAIT_POLICY=PASSIVE, this
project's setting until 2026-12) pays the wake-ups in every forward (51 against 30 ms).
GOMP_SPINCOUNT=30000 spins about a millisecond: enough to bridge the gaps inside a
forward, short enough to leave the cores free between them. The service images, the
Makefile, scripts/launch.py and the benchmarks set it (tests/unit/test_compose.py
checks that they agree).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

OPENMP_SPIN_COUNT = "30000"


def set_openmp_spin_count() -> None:
    """Set GOMP_SPINCOUNT for this process (unless set) and the processes it starts.
    libgomp reads it when it loads, so call this before torch is imported."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def compute_thread(name: str) -> ThreadPoolExecutor:
    """The executor a service runs all its torch work on: one thread, so one OpenMP team."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


def in_passing_thread(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a new thread that ends when it returns, so the OpenMP
    team its work creates ends with it. Blocks the caller; re-raises fn's exception."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="passing") as passing:
        return passing.submit(fn, *args, **kwargs).result()  # leaving the block joins the thread
