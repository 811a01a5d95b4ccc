"""Fewer torch threads while another process takes a core: the verifier's, the drafter's
and the memory worker's guard against a noisy neighbour on a CPU.

A forward on N OpenMP threads runs hundreds of parallel regions, and each ends at a
barrier that waits for the slowest thread. When another process (the memory service
answering a question or training its adapter, a second model server) keeps one core
busy, one of the N threads is always the one waiting for a time slice, and every region
waits with it: on the 2-core development machine a 1-thread neighbour took the verifier's
plain decoding from 109 to 13 tokens/s on 2 threads. On 1 thread, beside the same
neighbour, it decoded 50 tokens/s (against 65 alone).

The governor watches the engine's (or the drafter's) busy time in windows. A window is
contended when the process got well under its threads' share of the CPU (process CPU time
below ``CONTENDED_SHARE`` of threads x busy wall time) while other processes used the
machine (at least ``NEIGHBOUR_CORES`` of a core, from /proc/stat). Low CPU with nobody
else busy is not contention, only work that does not fill the threads (short forwards,
Python). A contended window drops a thread. With fewer threads than it started with, it tries one
more as soon as a window shows nobody else busy, else after a while (1 s, doubling after
each failed try up to 16 s), and keeps it if that window is not contended.

Time the engine spends waiting (for the drafter's tree) is left out of the busy time: the
engine's threads sleep then, while the drafter works.

The memory worker's governor makes no timed tries (``timed_retries=False``): it takes a core
back only when a window shows it free. A training step lasts seconds, and a try at two threads
beside a busy verifier stalls that whole step and the verifier's decoding with it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

WINDOW_S = 0.25  # busy seconds judged at once: /proc/stat counts in 10 ms ticks
CONTENDED_SHARE = 0.75  # alone, the verifier's decoding keeps its threads 99% busy; beside a neighbour, 51%
NEIGHBOUR_CORES = 0.5
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 16.0
_PROC_STAT = "/proc/stat"


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (Linux), or None where unknown."""
    try:
        with open(_PROC_STAT) as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Told of every round of work (on the thread that runs it), sets the torch threads
    for the next ones through ``set_threads``."""

    def __init__(
        self,
        max_threads: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        machine_busy: Callable[[], float | None] = machine_busy_seconds,
        timed_retries: bool = True,
    ):
        self.max_threads = max_threads
        self.timed_retries = timed_retries
        self.threads = max_threads
        self._set_threads = set_threads
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._machine_busy = machine_busy
        self._retry_after = FIRST_RETRY_S
        self._retry_at: float | None = None
        self._trying = False
        self._start_window()
        self._round_started = self._round_cpu = 0.0
        self._round_machine: float | None = None
        self.contended_windows = 0

    @staticmethod
    def available(max_threads: int) -> bool:
        """Whether governing can help and be measured here."""
        return max_threads > 1 and machine_busy_seconds() is not None

    def _start_window(self) -> None:
        self._busy_s = self._cpu_s = 0.0
        self._others_s = self._others_wall_s = 0.0

    def start_round(self) -> None:
        self._round_started = self._clock()
        self._round_cpu = self._cpu_clock()
        self._round_machine = self._machine_busy()

    def end_round(self, waited_s: float = 0.0) -> None:
        """A round of the engine ended; ``waited_s`` of it was spent waiting for the drafter."""
        now = self._clock()
        cpu = self._cpu_clock() - self._round_cpu
        wall = now - self._round_started
        self._busy_s += max(wall - waited_s, 0.0)
        self._cpu_s += cpu
        # Who else used the machine is counted in rounds without a wait: during one, the
        # drafter works, and taking turns with it is not contention.
        machine = self._machine_busy()
        if not waited_s and machine is not None and self._round_machine is not None:
            self._others_s += machine - self._round_machine - cpu
            self._others_wall_s += wall
        if self._busy_s >= WINDOW_S:
            self._judge_window(now)

    def _judge_window(self, now: float) -> None:
        share = self._cpu_s / (self.threads * self._busy_s)
        # with no round to tell (every one waited for the drafter), the share alone decides
        neighbours = self._others_s / self._others_wall_s if self._others_wall_s >= WINDOW_S / 4 else None
        contended = share < CONTENDED_SHARE and (neighbours is None or neighbours >= NEIGHBOUR_CORES)
        trying, self._trying = self._trying, False
        if contended:
            self.contended_windows += 1
        if contended and self.threads > 1:
            self._retry_after = min(self._retry_after * 2, MAX_RETRY_S) if trying else FIRST_RETRY_S
            self._retry_at = now + self._retry_after
            if not trying:
                log.info(
                    "beside other processes, %d threads got %.0f%% of their CPU time: running on %d",
                    self.threads,
                    100 * share,
                    self.threads - 1,
                )
            self._use(self.threads - 1)
        elif trying:
            self._retry_after = FIRST_RETRY_S
            self._retry_at = now + self._retry_after
            log.info("running on %d of %d threads again", self.threads, self.max_threads)
        # Back up at once when the rounds show nobody else busy, else when the retry is due.
        quiet = not contended and neighbours is not None and neighbours < NEIGHBOUR_CORES
        due = self.timed_retries and self._retry_at is not None and now >= self._retry_at
        if (quiet or due) and self.threads < self.max_threads:
            self._trying = True
            self._use(self.threads + 1)
        self._start_window()

    def _use(self, threads: int) -> None:
        self.threads = threads
        self._set_threads(threads)


def process_governor(adaptive: bool, on_cpu: bool, timed_retries: bool = True) -> ThreadGovernor | None:
    """The governor of this process's torch threads, up to their number now, or None where
    it has nothing to do: adaptive threads off, work off the CPU, one thread, no /proc/stat."""
    import torch

    threads = torch.get_num_threads()
    if not (adaptive and on_cpu and ThreadGovernor.available(threads)):
        return None
    return ThreadGovernor(threads, torch.set_num_threads, timed_retries=timed_retries)


@contextmanager
def governed_round(governor: ThreadGovernor | None) -> Iterator[None]:
    """A round of work told to ``governor`` (nothing when None)."""
    if governor is None:
        yield
        return
    governor.start_round()
    try:
        yield
    finally:
        governor.end_round()
