"""Faults: Redis killed with SIGKILL loses nothing accepted and its jobs resume; the
launcher (`make up`) restarts any service that crashes.

The Redis test runs the memory service (with its worker) and the gateway as processes on
a real redis-server with AOF, a tiny random-weight base model, and a fake reflection
generator the test holds, so a job is mid-flight when Redis dies. The launcher tests use
the session's real stack and leave it ready."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.unit.test_drain import (  # noqa: F401 (tiny_model_dir is a fixture)
    START_TIMEOUT_S,
    RedisServer,
    Spawner,
    free_port,
    tiny_model_dir,
    wait_until,
)

pytestmark = pytest.mark.integration

JOB_TIMEOUT_S = 300
NAMESPACE = "faults"
DOC_A = {"id": "veth", "text": "Ilo Veth paints lighthouses in Sarn. Ilo Veth keeps a grey cat named Pell."}
DOC_B = {"id": "quorr", "text": "Dessa Quorr repairs clocks in Talmet. Dessa Quorr sails on Lake Ume."}


class HeldGenerator(ThreadingHTTPServer):
    """An OpenAI-compatible /v1/chat/completions that answers "I don't know." (the job
    still learns: passages need no generator), each call held until ``release`` is set."""

    def __init__(self):
        self.asked = threading.Event()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _HeldGeneratorHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _HeldGeneratorHandler(BaseHTTPRequestHandler):
    server: HeldGenerator

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.asked.set()
        self.server.release.wait(JOB_TIMEOUT_S)
        body = json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": "I don't know."}}],
                "usage": {"completion_tokens": 4},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serving_stand_in():
    """A SERVING health service standing in for the verifier and the drafter, which the
    gateway's /ready asks about but this test does not need."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def ready(url: str) -> int:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def job(url: str, job_id: str) -> dict:
    response = httpx.get(f"{url}/memory/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_redis_kill9_loses_nothing_and_jobs_resume(tmp_path, tiny_model_dir, serving_stand_in):  # noqa: F811
    (tmp_path / "redis").mkdir()
    redis_server = RedisServer(tmp_path / "redis")
    generator = HeldGenerator()
    spawn = Spawner(tmp_path)
    try:
        redis_server.start()
        memory_port, gateway_port = free_port(), free_port()
        memory = spawn(
            "aerie_memory",
            memory_port=memory_port,
            redis_url=redis_server.url,
            memory_generator_url=generator.url,
            memory_generator_model="fake",
            memory_base_model=tiny_model_dir,
            memory_train_epochs=1,
            memory_min_train_steps=0,
        )
        gateway = spawn(
            "aerie_gateway",
            gateway_port=gateway_port,
            verifier_addr=serving_stand_in,
            drafter_addr=serving_stand_in,
            memory_addr=f"127.0.0.1:{memory_port}",
            redis_url=redis_server.url,
            served_model_name="tiny",
            api_keys="",
        )
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: ready(url) == 200, START_TIMEOUT_S, "the gateway to be ready")

        def ingest(document: dict) -> str:
            body = {"namespace": NAMESPACE, "documents": [document]}
            response = httpx.post(f"{url}/memory/ingest", json=body, timeout=30)
            assert response.status_code == 202, response.text
            assert response.json()["documents"] == [
                {"id": document["id"], "status": "accepted", "duplicate_of": None}
            ]
            return response.json()["job_id"]

        # Job A is running (its first generator call held); job B waits in the stream.
        job_a = ingest(DOC_A)
        assert generator.asked.wait(START_TIMEOUT_S), memory.log()
        job_b = ingest(DOC_B)

        redis_server.kill9()
        wait_until(lambda: ready(url) == 503, 30, "/ready to report Redis down")
        # Job A carries on, finds Redis gone, and its worker waits for it.
        generator.release.set()
        wait_until(lambda: "worker retrying" in memory.log(), 60, "the worker to find Redis gone")

        redis_server.start()  # same port, same AOF directory
        # The gateway and the memory service reconnect by themselves.
        wait_until(lambda: ready(url) == 200, 60, "/ready once Redis is back")
        stats = httpx.get(f"{url}/memory/namespaces/{NAMESPACE}", timeout=30).json()
        assert int(stats["documents"]) == 2 and int(stats["jobs"]) == 2, stats
        assert {job(url, job_a)["status"], job(url, job_b)["status"]} <= {"queued", "running", "succeeded"}

        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (a := job(url, job_a))["status"] not in ("succeeded", "failed") or job(url, job_b)[
            "status"
        ] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, f"jobs did not finish:\n{memory.log()}"
            time.sleep(1)
        b = job(url, job_b)
        assert a["status"] == "succeeded" and a["attempts"] == 2, (a, memory.log())  # resumed once
        assert b["status"] == "succeeded" and b["attempts"] == 1, (b, memory.log())
        assert a["model_version"] and b["model_version"] and a["training_examples"] > 0
        assert memory.alive() and gateway.alive()
        # Both documents' texts were kept, not just their ids.
        for doc_id, doc in (("veth", DOC_A), ("quorr", DOC_B)):
            stored = httpx.get(
                f"{url}/memory/documents/{doc_id}", params={"namespace": NAMESPACE}, timeout=30
            )
            assert stored.status_code == 200 and stored.json()["text"] == doc["text"], stored.text
    finally:
        generator.release.set()
        spawn.stop_all()
        redis_server.stop()
        generator.shutdown()


# --- the launcher restarts crashed services (the session's real stack) -----------------


def launcher_child(stack, argv_item: bytes) -> int:
    """pid of the launcher's child whose command line mentions ``argv_item`` (redis-server
    rewrites its own into one "redis-server 127.0.0.1:port")."""
    for pid in Path(f"/proc/{stack.proc.pid}/task/{stack.proc.pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if any(argv_item in part for part in cmdline):
            return int(pid)
    raise LookupError(f"no launcher child runs {argv_item!r}")


def restarted(stack, argv_item: bytes, old_pid: int) -> int:
    """Waits for the launcher to run ``argv_item`` again, in a new process; its pid."""
    deadline = time.monotonic() + 60
    while True:
        try:
            pid = launcher_child(stack, argv_item)
            if pid != old_pid:
                return pid
        except LookupError:
            pass
        assert time.monotonic() < deadline, f"{argv_item!r} was not restarted:\n" + "\n".join(stack.log[-40:])
        time.sleep(0.2)


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def memory_workers(memory_pid: int) -> list[int]:
    children = Path(f"/proc/{memory_pid}/task/{memory_pid}/children").read_text().split()
    return [int(c) for c in children if b"aerie_memory.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.parametrize("service", ["gateway", "verifier", "memory"])
def test_launcher_restarts_a_killed_service(stack, service):
    module = f"aerie_{service}".encode()
    old_pid = launcher_child(stack, module)
    old_workers = memory_workers(old_pid) if service == "memory" else []
    os.kill(old_pid, signal.SIGKILL)
    new_pid = restarted(stack, module, old_pid)
    stack.wait_ready(240)
    assert httpx.get(f"{stack.base_url}/ready", timeout=10).status_code == 200
    assert any(line.startswith(service) and "exited with code -9; restarting" in line for line in stack.log)
    if service == "memory":
        # The killed service's worker went with it: one worker, the new service's.
        assert old_workers
        wait_until(lambda: all(gone(pid) for pid in old_workers), 30, "the old worker to go")
        wait_until(lambda: len(memory_workers(new_pid)) == 1, 60, "the new memory worker")


def test_launcher_restarts_redis_killed_and_its_aof_keeps_the_data(stack):
    client = redis.Redis(port=stack.ports["redis"])
    client.set("aerie:test:faults", "kept")
    old_pid = launcher_child(stack, b"redis-server")
    os.kill(old_pid, signal.SIGKILL)
    restarted(stack, b"redis-server", old_pid)
    # The gateway and the memory service reconnect by themselves.
    stack.wait_ready(60)
    # The memory service answers from Redis (no such namespace), not with a 500 or 503.
    namespace = httpx.get(f"{stack.base_url}/memory/namespaces/faults-none", timeout=30)
    assert namespace.status_code == 404 and namespace.json()["error"]["code"] == "not_found", namespace.text
    assert client.get("aerie:test:faults") == b"kept"
    client.delete("aerie:test:faults")
    client.close()
