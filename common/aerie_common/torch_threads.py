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

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

OPENMP_SPIN_COUNT = "30000"
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU = "/sys/fs/cgroup/cpu"  # cpu.cfs_quota_us, cpu.cfs_period_us


def set_openmp_spin_count() -> None:
    """Set GOMP_SPINCOUNT for this process (unless set) and the processes it starts.
    libgomp reads it when it loads, so call this before torch is imported."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def cpu_quota_cores() -> int | None:
    """The CPUs this process's cgroup may use (its CPU quota, rounded up), or None without
    a quota (or without cgroups)."""
    try:
        with open(CGROUP_V2_CPU_MAX) as cpu_max:
            quota, period = cpu_max.read().split()[:2]
    except (OSError, ValueError):
        try:
            with (
                open(f"{CGROUP_V1_CPU}/cpu.cfs_quota_us") as q,
                open(f"{CGROUP_V1_CPU}/cpu.cfs_period_us") as p,
            ):
                quota, period = q.read().strip(), p.read().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def set_torch_threads(configured: int) -> int:
    """Set this process's torch threads: ``configured``, or for 0 torch's default (the
    cores it sees) capped at the container's CPU quota, which torch does not read: a pod
    limited to 4 CPUs on a 64-core node would otherwise run 32 or more threads that the
    quota throttles. Returns the count."""
    import torch

    if configured > 0:
        torch.set_num_threads(configured)
    elif (quota := cpu_quota_cores()) is not None and quota < torch.get_num_threads():
        torch.set_num_threads(quota)
    return torch.get_num_threads()


def compute_thread(name: str) -> ThreadPoolExecutor:
    """The executor a service runs all its torch work on: one thread, so one OpenMP team."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


def in_passing_thread(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a new thread that ends when it returns, so the OpenMP
    team its work creates ends with it. Blocks the caller; re-raises fn's exception."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="passing") as passing:
        return passing.submit(fn, *args, **kwargs).result()  # leaving the block joins the thread
