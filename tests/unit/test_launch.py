"""scripts/launch.py (what `make up` runs), without starting the stack."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.local_servers import free_port, start_redis, stop_redis

SERVICE_PORTS = ("AERIE_GATEWAY_PORT", "AERIE_VERIFIER_PORT", "AERIE_DRAFTER_PORT", "AERIE_MEMORY_PORT")


def test_ports_something_else_holds_are_named_and_nothing_starts(launch, monkeypatch):
    ports = {name: free_port() for name in (*SERVICE_PORTS, *launch.METRICS_PORTS)}
    for name, port in ports.items():
        monkeypatch.setenv(name, str(port))
    monkeypatch.setenv("AERIE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert launch.ports_in_use() == []
    # another stack's drafter on loopback, and a gateway on every address
    with socket.socket() as drafter, socket.socket() as gateway:
        drafter.bind(("127.0.0.1", ports["AERIE_DRAFTER_PORT"]))
        drafter.listen()
        gateway.bind(("0.0.0.0", ports["AERIE_GATEWAY_PORT"]))
        gateway.listen()
        busy = [f"{name} ({ports[name]})" for name in ("AERIE_GATEWAY_PORT", "AERIE_DRAFTER_PORT")]
        assert launch.ports_in_use() == busy
        with pytest.raises(SystemExit) as stopped:
            asyncio.run(launch.main())
        assert all(port in str(stopped.value) for port in busy)
    # a metrics port turned off (0) is not looked at
    monkeypatch.setenv("AERIE_MEMORY_METRICS_PORT", "0")
    assert launch.ports_in_use() == []


def test_a_redis_already_on_its_port_is_used_and_anything_else_there_refused(launch, monkeypatch, tmp_path):
    monkeypatch.setenv("AERIE_DATA_DIR", str(tmp_path))
    port = free_port()
    monkeypatch.setenv("AERIE_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    names = [p.name for p in launch.plan()[0]]
    assert names == ["redis", "verifier", "drafter", "memory", "gateway"]
    # the machine's own Redis (apt's, under systemd) on that port: used, not started again
    machines_redis = start_redis(port)
    try:
        assert [p.name for p in launch.plan()[0]] == names[1:]
    finally:
        stop_redis(machines_redis)
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(SystemExit, match=f"AERIE_REDIS_URL \\({port}\\)"):
            launch.plan()
