"""The real stack for integration tests: scripts/launch.py (what `make up` runs) on free
loopback ports with its own data directory, real redis-server and the real SmolLM2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.local_servers import free_port

ROOT = Path(__file__).resolve().parents[2]
STACK_START_TIMEOUT_S = 240
METRICS_SERVICES = ("verifier", "drafter", "memory")  # each serves /metrics on a port of its own


@dataclass
class Stack:
    proc: subprocess.Popen
    ports: dict[str, int]
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def addr(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def child_pid(self, module: str) -> int:
        """pid of the launcher's child running ``python -m module``."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if module.encode() in cmdline:
                return int(pid)
        raise LookupError(f"no child runs {module}")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("launcher exited:\n" + "\n".join(self.log[-50:]))
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("stack not ready:\n" + "\n".join(self.log[-80:]))


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    names = ("gateway", "verifier", "drafter", "memory", "redis", *(f"{s}_metrics" for s in METRICS_SERVICES))
    ports = {name: free_port() for name in names}
    env = dict(os.environ)
    env.update(
        AERIE_GATEWAY_PORT=str(ports["gateway"]),
        AERIE_VERIFIER_PORT=str(ports["verifier"]),
        AERIE_DRAFTER_PORT=str(ports["drafter"]),
        AERIE_MEMORY_PORT=str(ports["memory"]),
        **{f"AERIE_{s.upper()}_METRICS_PORT": str(ports[f"{s}_metrics"]) for s in METRICS_SERVICES},
        AERIE_REDIS_URL=f"redis://127.0.0.1:{ports['redis']}/0",
        AERIE_DATA_DIR=str(tmp_path_factory.mktemp("aerie-data")),
        AERIE_API_KEYS="",
        AERIE_DRAIN_TIMEOUT_S="3",
        AERIE_DRAFTER_HEAD="",  # the shipped head: the stack speculates with a trained one
        # Every request speculates (for 8 steps at least), whether or not speculation pays on
        # this machine: the tests compare its outputs with plain decoding's.
        AERIE_SPECULATION_PROBE_EVERY="1",
        # The memory learns small test documents quickly: short generations, two epochs.
        AERIE_MEMORY_GENERATOR_MAX_TOKENS="32",
        AERIE_MEMORY_TRAIN_EPOCHS="2",
        AERIE_MEMORY_MIN_TRAIN_STEPS="0",
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "launch.py")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack = Stack(proc, ports, env)

    def pump():
        for line in proc.stdout:
            stack.log.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        stack.wait_ready(STACK_START_TIMEOUT_S)
        yield stack
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
