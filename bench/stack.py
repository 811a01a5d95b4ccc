"""The whole stack for benchmarks: scripts/launch.py (what `make up` runs) on free
loopback ports, stopped with SIGTERM (gateway first, Redis last) when the bench ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "verifier", "drafter", "memory")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    proc: subprocess.Popen  # the launcher; the services are its children
    url: str  # the gateway

    def stop(self, timeout_s: float = 60) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM end the bench as Ctrl-C does, through its ``finally`` blocks, which stop
    the stack: Python's default for SIGTERM exits at once and leaves the services running."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def start_stack(
    data_dir: Path | None = None,
    log_path: Path | None = None,
    env_overrides: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> Stack:
    """Start the launcher and wait until the gateway's /ready answers 200.

    data_dir: AERIE_DATA_DIR (default: the environment's, else data/bench); log_path:
    where the launcher's output goes (default: discarded)."""
    exit_on_sigterm()
    # The services' Prometheus ports too: other stacks may hold the defaults.
    ports = {
        name: free_port()
        for name in (*SERVICES, "verifier_metrics", "drafter_metrics", "memory_metrics", "redis")
    }
    env = dict(os.environ)
    env.update({f"AERIE_{name.upper()}_PORT": str(port) for name, port in ports.items() if name != "redis"})
    env["AERIE_REDIS_URL"] = f"redis://127.0.0.1:{ports['redis']}/0"
    if data_dir is not None:
        env["AERIE_DATA_DIR"] = str(data_dir)
    env.setdefault("AERIE_DATA_DIR", str(ROOT / "data" / "bench"))
    env.update(env_overrides or {})
    log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "launch.py")], env=env, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    if log is not subprocess.DEVNULL:
        log.close()  # the launcher holds its own descriptor
    stack = Stack(proc, f"http://127.0.0.1:{ports['gateway']}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the launcher exited with code {proc.returncode} (log: {log_path})")
        try:
            if httpx.get(f"{stack.url}/ready", timeout=2).status_code == 200:
                return stack
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stack.stop()
    raise SystemExit(f"stack did not become ready in {timeout_s:.0f} s (log: {log_path})")
