"""The thread governor over a scripted machine: the engine's rounds, its process CPU time,
and what the machine's cores did meanwhile."""

from __future__ import annotations

import pytest
from aerie_common import thread_governor
from aerie_common.thread_governor import (
    FIRST_RETRY_S,
    MAX_RETRY_S,
    WINDOW_S,
    ThreadGovernor,
    machine_busy_seconds,
)
from aerie_verifier.engine import Engine
from aerie_verifier.sampling import SamplingParams

from tests.conftest import build_tiny_llama
from tests.unit.spec_helpers import Factory, ReplayDrafter
from tests.unit.test_speculative import VOCAB, generate, plain_output

ROUND_S = 0.01


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=3, layers=8)


class Machine:
    """A machine with ``cores`` cores, where a neighbour keeps ``neighbour_cores`` busy."""

    def __init__(self, cores: int = 2):
        self.cores = cores
        self.now = self.cpu = self.busy = 0.0
        self.neighbour_cores = 0.0
        self.engine_share = 1.0  # of its threads' time, when nobody else is busy
        self.thread_counts: list[int] = []

    def governor(self, threads: int | None = None, timed_retries: bool = True) -> ThreadGovernor:
        self.threads = threads or self.cores
        return ThreadGovernor(
            self.threads,
            self._set_threads,
            lambda: self.now,
            lambda: self.cpu,
            lambda: self.busy,
            timed_retries=timed_retries,
        )

    def _set_threads(self, threads: int) -> None:
        self.threads = threads
        self.thread_counts.append(threads)

    def advance(self, seconds: float, engine_cpu_cores: float) -> None:
        self.now += seconds
        self.cpu += seconds * engine_cpu_cores
        self.busy += seconds * (engine_cpu_cores + self.neighbour_cores)

    def rounds(
        self, governor: ThreadGovernor, seconds: float, wait_s: float = 0.0, drafter_cores: float = 0.0
    ):
        """The engine's rounds for ``seconds``; each waits ``wait_s`` for a drafter on
        ``drafter_cores``."""
        for _ in range(round(seconds / ROUND_S)):
            governor.start_round()
            contended = self.neighbour_cores + self.threads > self.cores
            # beside a neighbour, threads that outnumber the free cores stall each other at
            # every barrier: they got about one core's worth of CPU on the 2-core machine
            engine_cores = 1.0 if contended else self.threads * self.engine_share
            self.advance(ROUND_S, engine_cores)
            if wait_s:
                self.now += wait_s
                self.busy += wait_s * drafter_cores
            governor.end_round(wait_s)


def test_alone_the_engine_keeps_its_threads():
    machine = Machine()
    governor = machine.governor()
    machine.rounds(governor, 5.0)
    assert governor.threads == 2 and machine.thread_counts == [] and governor.contended_windows == 0


def test_a_neighbour_takes_a_thread_until_it_leaves():
    machine = Machine()
    governor = machine.governor()
    machine.neighbour_cores = 1.0
    machine.rounds(governor, WINDOW_S)
    assert governor.threads == 1 and machine.thread_counts == [1]
    # the tries with two threads fail, after 1 s, then 2, 4, 8, 16, 16 s
    machine.rounds(governor, 60.0)
    assert governor.threads == 1
    tries = machine.thread_counts[1::2]
    assert tries == [2] * len(tries) and 5 <= len(tries) <= 8
    assert governor._retry_after == MAX_RETRY_S
    # the neighbour leaves: the next window shows it, the try keeps two threads, and the
    # engine stays there
    machine.neighbour_cores = 0.0
    machine.rounds(governor, 3 * WINDOW_S + ROUND_S)  # well before the 16 s retry
    assert governor.threads == 2
    assert governor._retry_after == FIRST_RETRY_S
    machine.rounds(governor, 10.0)
    assert governor.threads == 2 and machine.thread_counts[-1] == 2


def test_without_timed_tries_a_thread_comes_back_only_when_a_core_is_free():
    # The memory's governors: a try beside a busy verifier would stall a whole training step.
    machine = Machine()
    governor = machine.governor(timed_retries=False)
    machine.neighbour_cores = 1.0
    machine.rounds(governor, 60.0)
    assert governor.threads == 1 and machine.thread_counts == [1]  # and no try
    machine.neighbour_cores = 0.0
    machine.rounds(governor, 2 * WINDOW_S + ROUND_S)
    assert governor.threads == 2 and machine.thread_counts == [1, 2]
    machine.rounds(governor, 10.0)
    machine.neighbour_cores = 1.0  # the verifier decodes again
    machine.rounds(governor, WINDOW_S + ROUND_S)
    assert governor.threads == 1 and machine.thread_counts == [1, 2, 1]


def test_a_share_low_without_neighbours_is_not_contention():
    # Threads that sleep between short forwards get less than their share with nobody else busy.
    machine = Machine()
    machine.engine_share = 0.5
    governor = machine.governor()
    machine.rounds(governor, 5.0)
    assert governor.threads == 2 and governor.contended_windows == 0


def test_waiting_for_the_drafter_is_neither_busy_time_nor_a_neighbour():
    # The drafter works (on both cores) while the engine waits for its tree: not contention.
    machine = Machine()
    governor = machine.governor()
    machine.rounds(governor, 5.0, wait_s=0.02, drafter_cores=2.0)
    assert governor.threads == 2 and governor.contended_windows == 0
    # Counted as busy time, the waits would look like threads starved of the CPU.
    machine = Machine()
    governor = machine.governor()
    for _ in range(100):
        governor.start_round()
        machine.advance(ROUND_S, 2.0)
        machine.now += 0.02
        machine.busy += 0.04
        governor.end_round(0.0)
    assert governor.threads == 1
    # Threads that do not fill their share, and a drafter busy in every other round: the
    # rounds without a wait show that nobody else is busy.
    machine = Machine()
    machine.engine_share = 0.5
    governor = machine.governor()
    for _ in range(50):
        machine.rounds(governor, ROUND_S, wait_s=0.02, drafter_cores=2.0)
        machine.rounds(governor, ROUND_S)
    assert governor.threads == 2 and governor.contended_windows == 0
    # A neighbour during speculation: with every round waiting, the share alone decides.
    machine = Machine()
    governor = machine.governor()
    machine.neighbour_cores = 1.0
    machine.rounds(governor, WINDOW_S, wait_s=0.02, drafter_cores=1.0)
    assert governor.threads == 1 and machine.thread_counts == [1]


def test_more_cores_step_down_one_thread_at_a_time():
    machine = Machine(cores=8)
    governor = machine.governor()
    machine.neighbour_cores = 2.0
    machine.rounds(governor, 2 * WINDOW_S + ROUND_S)
    assert governor.threads == 6 and machine.thread_counts == [7, 6]
    machine.rounds(governor, 10.0)
    assert governor.threads == 6  # each try of 7 fails


def test_machine_busy_seconds_reads_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 20 30 1000 50 5 5 0 7 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
    monkeypatch.setattr(thread_governor, "_PROC_STAT", str(stat))
    monkeypatch.setattr(thread_governor.os, "sysconf", lambda name: 100)
    assert machine_busy_seconds() == pytest.approx(1.6)  # 160 busy ticks
    monkeypatch.setattr(thread_governor, "_PROC_STAT", str(tmp_path / "missing"))
    assert machine_busy_seconds() is None and not ThreadGovernor.available(4)


class RecordingGovernor(ThreadGovernor):
    def __init__(self):
        super().__init__(2, lambda threads: None)
        self.rounds = 0
        self.waits: list[float] = []

    def end_round(self, waited_s: float = 0.0) -> None:
        self.rounds += 1
        self.waits.append(waited_s)


@pytest.mark.parametrize("in_process", [True, False])
def test_the_engine_reports_its_rounds_and_its_waits_for_another_process(target, tiny_tokenizer, in_process):
    prompt, params = [5, 6, 7, 8], SamplingParams(max_tokens=12)
    plain = plain_output(target, tiny_tokenizer, prompt, params)
    drafter = ReplayDrafter(prompt + plain, 4, delay_s=0.01)
    drafter.in_process = in_process
    governor = RecordingGovernor()
    engine = Engine(
        target, tiny_tokenizer, drafter_factory=Factory(lambda: drafter), thread_governor=governor
    )
    engine.start()
    try:
        tokens, final = generate(engine, prompt, params, speculative=True)
    finally:
        engine.stop()
    assert tokens == plain and governor.rounds >= final.speculative.drafts > 0
    waited = sum(governor.waits)
    if in_process:
        assert waited == 0.0  # drafting on the engine's own thread is its own work
    else:
        assert waited >= 0.01 * final.speculative.trees
