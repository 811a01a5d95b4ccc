"""Run the whole Aerie stack on this machine: what `make up` runs.

Starts redis-server (AOF on, data under AERIE_DATA_DIR) and the four services, prefixes
every log line with the service's name, restarts a service that exits (as compose's
`restart: unless-stopped` would) and, on Ctrl-C or SIGTERM, stops the gateway first and
Redis last. Docker compose and Kubernetes are the production runners; this one needs no
container engine.

Ports come from AERIE_{GATEWAY,VERIFIER,DRAFTER,MEMORY}_PORT and the Redis port from
AERIE_REDIS_URL; the launcher sets each service's AERIE_*_ADDR to match.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import redis
from aerie_common.torch_threads import OPENMP_SPIN_COUNT
from aerie_drafter.settings import DrafterSettings
from aerie_gateway.settings import GatewaySettings
from aerie_memory.settings import MemorySettings
from aerie_verifier.settings import VerifierSettings
from redis.backoff import NoBackoff
from redis.retry import Retry

COLORS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m"]
RESET = "\033[0m"
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a service that ran this long restarts without backoff
# Prometheus /metrics of the gRPC services (0 turns one off); the gateway's is on its port.
METRICS_PORTS = {
    "AERIE_VERIFIER_METRICS_PORT": "9101",
    "AERIE_DRAFTER_METRICS_PORT": "9102",
    "AERIE_MEMORY_METRICS_PORT": "9103",
}


@dataclass
class Supervised:
    name: str
    argv: list[str]
    env: dict[str, str]
    color: str
    stop_timeout_s: float
    proc: asyncio.subprocess.Process | None = None
    stopping: bool = False
    restarts: int = field(default=0)

    def say(self, line: str) -> None:
        prefix = f"{self.color}{self.name:<8}|{RESET} " if sys.stdout.isatty() else f"{self.name:<8}| "
        sys.stdout.write(prefix + line.rstrip("\n") + "\n")
        sys.stdout.flush()

    async def run(self) -> None:
        backoff = 1.0
        while not self.stopping:
            started = time.monotonic()
            # A new session keeps the terminal's Ctrl-C away from the children, so the
            # launcher decides the shutdown order.
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                limit=1 << 20,  # long log lines (tracebacks, progress bars) must not break the pump
            )
            self.say(f"started (pid {self.proc.pid})")
            pump = asyncio.create_task(self._pump_log())
            code = await self._exited()
            # What the service left behind (the worker of a killed memory service) goes too:
            # it would hold the log pipe open and compete with the restarted service.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await pump
            await self.proc.wait()
            if self.stopping:
                self.say(f"stopped (exit {code})")
                return
            backoff = 1.0 if time.monotonic() - started > STABLE_AFTER_S else backoff
            self.restarts += 1
            self.say(f"exited with code {code}; restarting in {backoff:.0f}s (restart #{self.restarts})")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)

    async def _pump_log(self) -> None:
        async for raw in self.proc.stdout:
            self.say(raw.decode(errors="replace"))

    async def _exited(self) -> int:
        """The exit status, as soon as the service exits: ``proc.wait()`` also waits for
        its log pipe to close, which a process it left behind may hold open."""
        while self.proc.returncode is None:
            await asyncio.sleep(0.2)
        return self.proc.returncode

    async def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._exited(), self.stop_timeout_s)
        except TimeoutError:
            self.say(f"did not stop within {self.stop_timeout_s:.0f}s; killing")
            self.proc.kill()
            await self._exited()


@dataclass(frozen=True)
class StackSettings:
    """The services' settings, read from the environment once for both checks and the plan."""

    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    verifier: VerifierSettings = field(default_factory=VerifierSettings)
    drafter: DrafterSettings = field(default_factory=DrafterSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)


def plan(settings: StackSettings | None = None) -> tuple[list[Supervised], str]:
    """The processes to run, in start order, and the gateway's readiness URL."""
    settings = settings or StackSettings()
    gateway, verifier = settings.gateway, settings.verifier
    drafter, memory = settings.drafter, settings.memory
    data_dir = Path(os.environ.get("AERIE_DATA_DIR", "data")).resolve()
    redis_port = urlparse(gateway.redis_url).port or 6379
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("redis-server is not installed: `make up` installs it (apt-get install redis-server)")
    (data_dir / "redis").mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.update(
        AERIE_VERIFIER_ADDR=f"127.0.0.1:{verifier.verifier_port}",
        AERIE_DRAFTER_ADDR=f"127.0.0.1:{drafter.drafter_port}",
        AERIE_MEMORY_ADDR=f"127.0.0.1:{memory.memory_port}",
        AERIE_REDIS_URL=gateway.redis_url,
        PYTHONUNBUFFERED="1",
    )
    # The verifier and the drafter take turns on the same cores: OpenMP threads spin only
    # briefly after a parallel region (aerie_common/torch_threads.py).
    env.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
    for name, port in METRICS_PORTS.items():
        env.setdefault(name, port)
    grace = verifier.drain_timeout_s + 5
    # appendfsync always: Redis writes and syncs the AOF before it answers, so what a client
    # was told is stored survives a kill -9. With everysec a slow disk lets Redis answer up
    # to 2 s before writing (a CI run lost an accepted document that way).
    redis_argv = [
        redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(data_dir / "redis"),
        "--appendonly", "yes", "--appendfsync", "always",
    ]  # fmt: skip
    procs = []
    if _free(redis_port):
        procs.append(Supervised("redis", redis_argv, env, COLORS[0], grace))
    elif _answers_redis(redis_port):  # a Redis of the machine's own (apt starts one under systemd)
        print(f"launcher| using the Redis already on 127.0.0.1:{redis_port} (AERIE_REDIS_URL)", flush=True)
    else:
        sys.exit(f"launcher| in use by something other than Redis: AERIE_REDIS_URL ({redis_port})")
    for i, name in enumerate(["verifier", "drafter", "memory", "gateway"], start=1):
        procs.append(Supervised(name, [sys.executable, "-m", f"aerie_{name}"], env, COLORS[i], grace))
    host = "127.0.0.1" if gateway.gateway_host in ("0.0.0.0", "") else gateway.gateway_host
    return procs, f"http://{host}:{gateway.gateway_port}"


def ports_in_use(settings: StackSettings | None = None) -> list[str]:
    """The ports the stack's services would listen on that something else holds
    ("AERIE_GATEWAY_PORT (8000)"): a second `make up`, say. They would fail to start and be
    restarted forever, and the readiness check would find the other stack's gateway. (A Redis
    already on its port is used: ``plan``.)"""
    settings = settings or StackSettings()
    wanted = {
        "AERIE_GATEWAY_PORT": settings.gateway.gateway_port,
        "AERIE_VERIFIER_PORT": settings.verifier.verifier_port,
        "AERIE_DRAFTER_PORT": settings.drafter.drafter_port,
        "AERIE_MEMORY_PORT": settings.memory.memory_port,
        **{name: int(os.environ.get(name, port)) for name, port in METRICS_PORTS.items()},
    }
    return [f"{name} ({port})" for name, port in wanted.items() if port and not _free(port)]


def _answers_redis(port: int) -> bool:
    # once, briefly: a client's default retries wait 25 s on something that never answers
    client = redis.Redis(port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def announce_when_ready(base_url: str) -> None:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/ready", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        await asyncio.sleep(1)
    print(
        f"launcher| Aerie is ready at {base_url} ({time.monotonic() - started:.1f}s); Ctrl-C stops it",
        flush=True,
    )


async def main() -> None:
    settings = StackSettings()
    if busy := ports_in_use(settings):
        sys.exit(
            f"launcher| in use: {', '.join(busy)}. Another Aerie (`make up`) may be running; stop it,"
            " or set these variables to free ports."
        )
    procs, base_url = plan(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(p.run()) for p in procs]
    ready = asyncio.create_task(announce_when_ready(base_url))
    await stop.wait()
    ready.cancel()
    print("launcher| stopping: gateway first, Redis last", flush=True)
    for proc in reversed(procs):
        await proc.stop()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
