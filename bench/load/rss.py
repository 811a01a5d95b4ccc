"""Resident memory of the stack's processes, found under the launcher's pid: redis-server
and each ``python -m aerie_<service>`` (the memory service's worker included, as
"memory.worker"). A leak shows as RSS growth between two samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil


def stack_name(executable: str, cmdline: list[str]) -> str | None:
    """The stack's name for a process (``executable`` is psutil's name()), or None for one
    that is not a stack process. Redis rewrites its command line (its process title)."""
    if executable == "redis-server" or (cmdline and Path(cmdline[0].split()[0]).name == "redis-server"):
        return "redis"
    if "-m" in cmdline[:-1]:
        module = cmdline[cmdline.index("-m") + 1]
        if module.startswith("aerie_"):
            return module.removeprefix("aerie_")
    return None


def stack_processes(launcher_pid: int) -> dict[str, psutil.Process]:
    processes = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            name = stack_name(child.name(), child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if name is not None:
            processes[name] = child
    return processes


@dataclass
class RssSample:
    pid: int
    rss_bytes: int


def sample_rss(launcher_pid: int) -> dict[str, RssSample]:
    samples = {}
    for name, process in stack_processes(launcher_pid).items():
        try:
            samples[name] = RssSample(process.pid, process.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return samples


@dataclass
class RssGrowth:
    process: str
    pid_before: int
    pid_after: int | None  # None: gone
    rss_before_mib: float
    rss_after_mib: float | None
    growth: float | None  # fraction of the first sample; None when the process changed

    def problem(self, max_growth: float) -> str | None:
        """Why this counts as a failure, or None."""
        if self.pid_after is None:
            return f"{self.process} is gone (pid {self.pid_before})"
        if self.pid_after != self.pid_before:
            return f"{self.process} restarted (pid {self.pid_before} -> {self.pid_after})"
        if self.growth > max_growth:
            return f"{self.process} RSS grew {self.growth:+.1%} (limit {max_growth:.0%})"
        return None


def compare_rss(before: dict[str, RssSample], after: dict[str, RssSample]) -> list[RssGrowth]:
    rows = []
    for name, first in sorted(before.items()):
        last = after.get(name)
        same = last is not None and last.pid == first.pid
        rows.append(
            RssGrowth(
                process=name,
                pid_before=first.pid,
                pid_after=last.pid if last is not None else None,
                rss_before_mib=first.rss_bytes / 2**20,
                rss_after_mib=last.rss_bytes / 2**20 if last is not None else None,
                growth=last.rss_bytes / first.rss_bytes - 1 if same else None,
            )
        )
    return rows


def format_rss_table(rows: list[RssGrowth]) -> str:
    lines = ["| process | RSS before (MiB) | RSS after (MiB) | growth |", "|---|---:|---:|---:|"]
    for row in rows:
        after = f"{row.rss_after_mib:.1f}" if row.rss_after_mib is not None else "gone"
        growth = f"{row.growth:+.2%}" if row.growth is not None else "restarted"
        lines.append(f"| {row.process} | {row.rss_before_mib:.1f} | {after} | {growth} |")
    return "\n".join(lines)
