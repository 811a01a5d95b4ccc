"""Throwaway local servers for tests: a free loopback port, and a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, timeout_s: float = 20) -> subprocess.Popen:
    """redis-server on ``port`` without persistence, answering PING when this returns."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (`make setup` installs it)")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    client.close()
    return process


def stop_redis(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)
