"""SIGTERM drains every service. Each runs as its own process (`python -m aerie_*`) on a
tiny random-weight model; a fake or a paused Redis holds one call in flight for as long as
the test needs. On SIGTERM, health watchers hear NOT_SERVING (the gateway's /ready turns
503), new calls are refused (gRPC UNAVAILABLE; the gateway's 503 in OpenAI's envelope),
the call in flight still completes, and the process exits 0 as soon as it has: long before
its drain timeout."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
import redis
import torch
from aerie_common.tensors import to_chunks
from aerie_common.torch_threads import OPENMP_SPIN_COUNT
from aerie_proto.v1 import (
    drafter_pb2,
    drafter_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import build_tiny_llama
from tests.local_servers import free_port

ROOT = Path(__file__).resolve().parents[2]
# Importing torch and loading a model takes a while on a loaded machine.
START_TIMEOUT_S = 120
# The services' AERIE_DRAIN_TIMEOUT_S: far longer than their calls in flight take here, so
# an exit within EXIT_WITHIN_S of the last one ending shows the drain ended with it.
DRAIN_TIMEOUT_S = 90
EXIT_WITHIN_S = 30
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Process:
    """A subprocess whose output goes to a file, shown when a check on it fails. It leads
    its own process group, so ``stop`` also ends what it started (the memory worker)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout_s:.0f}s:\n{self.log()}") from None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class Spawner:
    """Starts ``python -m module`` with AERIE_* settings (keyword arguments, lower case);
    ``stop_all`` kills what is left."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[Process] = []

    def __call__(self, module: str, **settings: object) -> Process:
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            GOMP_SPINCOUNT=OPENMP_SPIN_COUNT,
            AERIE_TORCH_THREADS="1",
            AERIE_DEVICE="cpu",
            AERIE_LOG_LEVEL="INFO",
            AERIE_MODEL_CACHE=str(self.directory / "cache"),
            AERIE_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
        )
        env.update({f"AERIE_{name.upper()}": str(value) for name, value in settings.items()})
        log_path = self.directory / f"{module}-{len(self.started)}.log"
        process = Process([sys.executable, "-m", module], env, log_path)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture(scope="module")
def spawn(tmp_path_factory):
    spawner = Spawner(tmp_path_factory.mktemp("services"))
    yield spawner
    spawner.stop_all()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random-weight Llama and its tokenizer, saved as a Hugging Face model dir."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


class RedisServer:
    """redis-server with AOF on, as scripts/launch.py runs it, on a free port."""

    def __init__(self, directory: Path):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (`make setup` installs it)")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Process | None = None

    def start(self) -> RedisServer:
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]  # fmt: skip
        self.process = Process(argv, dict(os.environ), self.directory / "redis.log")
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                # Answers "LOADING" errors until the AOF is read back.
                client.dbsize()
                break
            except redis.exceptions.RedisError:
                assert time.monotonic() < deadline and self.process.alive(), self.process.log()
                time.sleep(0.05)
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def kill9(self) -> None:
        self.process.signal(signal.SIGKILL)
        self.process.wait_exit(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def wait_serving(addr: str, process: Process, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.alive(), f"exited with {process.proc.returncode}:\n{process.log()}"
            assert time.monotonic() < deadline, f"not SERVING after {timeout_s:.0f}s:\n{process.log()}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)


class HealthWatch:
    """A Health/Watch stream read on a background thread."""

    def __init__(self, addr: str):
        self.channel = grpc.insecure_channel(addr)
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest())
        self.statuses: queue.Queue[int] = queue.Queue()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.statuses.put(response.status)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended.set()

    def wait_for(self, status: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while (seen := self.statuses.get(timeout=max(deadline - time.monotonic(), 0.01))) != status:
            assert time.monotonic() < deadline, f"watch said {seen}, never {status}"

    def assert_ended_cleanly(self, timeout_s: float = 30) -> None:
        """The drain ends watch streams itself (they would otherwise hold it)."""
        assert self.ended.wait(timeout_s), "the Watch stream was not ended by the drain"
        assert self.error is None, self.error
        self.channel.close()


def assert_unavailable(call) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value


class InBackground:
    """Runs ``fn`` on a thread; ``result()`` waits for it and re-raises what it raised."""

    def __init__(self, fn):
        self._outcome: futures.Future = futures.Future()
        threading.Thread(target=self._run, args=(fn,), daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self._outcome.set_result(fn())
        except BaseException as exc:  # handed to result()
            self._outcome.set_exception(exc)

    def done(self) -> bool:
        return self._outcome.done()

    def result(self, timeout_s: float):
        return self._outcome.result(timeout=timeout_s)


# --- verifier --------------------------------------------------------------------------


class StallingDrafter(drafter_pb2_grpc.DrafterServicer):
    """A drafter that holds the verifier's first draft request until released, then ends
    the stream without a tree: the verifier's engine waits on it mid-request (the request
    is in flight for as long as the test likes), then decodes on without speculation."""

    def __init__(self):
        self.asked = threading.Event()
        self.release = threading.Event()

    def GetInfo(self, request, context):
        return drafter_pb2.DrafterInfo(capture_layer_ids=[0, 1, 2])

    def DraftSession(self, request_iterator, context):
        next(request_iterator)
        self.asked.set()
        self.release.wait(START_TIMEOUT_S)
        return iter(())


@pytest.fixture(scope="module")
def stalling_drafter():
    drafter = StallingDrafter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    drafter_pb2_grpc.add_DrafterServicer_to_server(drafter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield drafter, f"127.0.0.1:{port}"
    drafter.release.set()
    server.stop(grace=None)


@pytest.fixture(scope="module")
def grpc_services(spawn, tiny_model_dir, stalling_drafter, redis_server) -> dict[str, tuple[Process, str]]:
    """This module's verifier, drafter and memory service processes, all started at once:
    importing torch is most of their start-up, and they overlap it. Name -> (process, addr)."""
    ports = {name: free_port() for name in ("verifier", "drafter", "memory")}
    processes = {
        "verifier": spawn(
            "aerie_verifier",
            target_model=tiny_model_dir,
            verifier_port=ports["verifier"],
            drafter_mode="grpc",
            drafter_addr=stalling_drafter[1],
            drafter_step_timeout_s=START_TIMEOUT_S,
        ),
        "drafter": spawn(
            "aerie_drafter",
            target_model=tiny_model_dir,
            drafter_head="untrained",
            drafter_port=ports["drafter"],
        ),
        "memory": spawn("aerie_memory", memory_port=ports["memory"], redis_url=redis_server.url),
    }
    return {name: (process, f"127.0.0.1:{ports[name]}") for name, process in processes.items()}


def test_verifier_drains_a_generation_in_flight(grpc_services, stalling_drafter):
    drafter, _ = stalling_drafter
    verifier, addr = grpc_services["verifier"]
    wait_serving(addr, verifier)
    watch = HealthWatch(addr)
    watch.wait_for(SERVING)

    channel = grpc.insecure_channel(addr)
    stub = verifier_pb2_grpc.VerifierStub(channel)
    request = verifier_pb2.GenerateRequest(
        request_id="in-flight",
        messages=[verifier_pb2.ChatMessage(role="user", content="Hello there")],
        sampling=verifier_pb2.SamplingParams(temperature=0, max_tokens=12),
        speculative=True,
    )
    generation = InBackground(lambda: list(stub.Generate(request, timeout=300)))
    assert drafter.asked.wait(START_TIMEOUT_S), verifier.log()  # the engine is mid-request

    verifier.signal(signal.SIGTERM)
    watch.wait_for(NOT_SERVING)
    assert_unavailable(lambda: stub.GetModelInfo(verifier_pb2.ModelInfoRequest(), timeout=10))
    assert not generation.done()

    drafter.release.set()
    released_at = time.monotonic()
    responses = generation.result(START_TIMEOUT_S)
    assert responses[-1].finish_reason == verifier_pb2.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == responses[-1].completion_tokens == 12
    assert verifier.wait_exit(EXIT_WITHIN_S) == 0, verifier.log()
    assert time.monotonic() - released_at < EXIT_WITHIN_S
    watch.assert_ended_cleanly()
    channel.close()


# --- drafter ---------------------------------------------------------------------------


def test_drafter_drains_a_draft_session_in_flight(grpc_services):
    drafter, addr = grpc_services["drafter"]
    wait_serving(addr, drafter)
    watch = HealthWatch(addr)
    watch.wait_for(SERVING)

    channel = grpc.insecure_channel(addr)
    stub = drafter_pb2_grpc.DrafterStub(channel)
    info = stub.GetInfo(drafter_pb2.DrafterInfoRequest(), timeout=10)
    width = len(info.capture_layer_ids) * info.target_hidden_size

    def hidden(rows: int) -> list[drafter_pb2.TensorChunk]:
        return to_chunks(torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)))

    requests: queue.Queue = queue.Queue()
    trees = stub.DraftSession(iter(requests.get, None), timeout=300)

    def send(message: drafter_pb2.DraftStart | drafter_pb2.DraftExtend, chunks) -> None:
        message.hidden_states.CopyFrom(chunks[0])
        kind = "start" if isinstance(message, drafter_pb2.DraftStart) else "extend"
        requests.put(drafter_pb2.DraftRequest(**{kind: message}))
        for part in chunks[1:]:
            requests.put(drafter_pb2.DraftRequest(hidden_states_part=part))

    prompt = [5, 6, 7, 8]
    send(drafter_pb2.DraftStart(request_id="in-flight", token_ids=prompt), hidden(len(prompt) - 1))
    assert next(trees).tree.token_ids

    drafter.signal(signal.SIGTERM)
    watch.wait_for(NOT_SERVING)
    assert_unavailable(lambda: stub.GetInfo(drafter_pb2.DrafterInfoRequest(), timeout=10))

    # The session in flight is still served: the next step gets its tree.
    send(drafter_pb2.DraftExtend(accepted_token_ids=[9]), hidden(1))
    assert next(trees).tree.token_ids
    requests.put(None)  # the verifier's request is done: the stream ends
    assert list(trees) == []
    assert trees.code() == grpc.StatusCode.OK
    assert drafter.wait_exit(EXIT_WITHIN_S) == 0, drafter.log()
    watch.assert_ended_cleanly()
    channel.close()


# --- memory ----------------------------------------------------------------------------


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"aerie_memory.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def paused_transactions(client: redis.Redis) -> int:
    """Clients held inside MULTI/EXEC by CLIENT PAUSE (flags x: in MULTI, b: blocked)."""
    return sum(1 for c in client.client_list() if "x" in c["flags"] and "b" in c["flags"])


def worker_consuming(client: redis.Redis) -> bool:
    """The worker has read the job stream (so it is in its loop, signal handlers set)."""
    try:
        return any(g["consumers"] for g in client.xinfo_groups("aerie:mem:jobs"))
    except redis.exceptions.ResponseError:  # no stream yet
        return False


def test_memory_drains_an_ingest_in_flight_and_its_worker(grpc_services, redis_server):
    memory, addr = grpc_services["memory"]
    wait_serving(addr, memory)
    control = redis_server.client()
    wait_until(lambda: worker_consuming(control), START_TIMEOUT_S, "the memory worker to consume")
    [worker] = worker_pids(memory.pid)
    watch = HealthWatch(addr)
    watch.wait_for(SERVING)

    channel = grpc.insecure_channel(addr)
    stub = memory_pb2_grpc.MemoryStub(channel)
    document = memory_pb2.Document(id="d1", text="Ilo Veth paints lighthouses in Sarn.")
    ingest = memory_pb2.IngestRequest(namespace="drain", documents=[document])
    control.client_pause(300_000, all=False)  # writes wait: the ingest's transaction hangs
    try:
        accepted = InBackground(lambda: stub.Ingest(ingest, timeout=300))
        wait_until(lambda: paused_transactions(control) == 1, 30, "the ingest to reach Redis")

        memory.signal(signal.SIGTERM)
        watch.wait_for(NOT_SERVING)
        assert_unavailable(
            lambda: stub.GetNamespace(memory_pb2.GetNamespaceRequest(namespace="drain"), timeout=10)
        )
        assert not accepted.done()
    finally:
        control.client_unpause()
    unpaused_at = time.monotonic()
    response = accepted.result(60)
    assert [(d.id, d.status) for d in response.documents] == [("d1", "accepted")] and response.job_id
    assert memory.wait_exit(EXIT_WITHIN_S) == 0, memory.log()
    # The worker stopped by itself on SIGTERM: the service would have waited the whole
    # drain timeout before killing it.
    assert time.monotonic() - unpaused_at < EXIT_WITHIN_S
    assert not Path(f"/proc/{worker}").exists()
    assert "killed" not in memory.log()
    # What was accepted is in Redis, its job queued for the next start.
    assert control.hget("aerie:mem:ns:drain:docs", "d1")
    assert control.exists(f"aerie:mem:job:{response.job_id}")
    watch.assert_ended_cleanly()
    channel.close()
    control.close()


# --- gateway ---------------------------------------------------------------------------

MODEL = "fake-model"
WORDS = ["one", "two", "three", "four"]


class HeldVerifier(verifier_pb2_grpc.VerifierServicer):
    """Streams WORDS, holding after the first until released (or its caller leaves)."""

    def __init__(self):
        self.release = threading.Event()

    def GetModelInfo(self, request, context):  # the gateway asks for the model's sampling defaults
        return verifier_pb2.ModelInfo(model_id=MODEL, context_length=64)

    def Generate(self, request, context):
        for index, word in enumerate(WORDS):
            while index == 1 and not self.release.wait(0.1):
                if not context.is_active():
                    return
            yield verifier_pb2.GenerateResponse(
                token_ids=[index],
                text=word if index == 0 else f" {word}",
                prompt_tokens=3,
                completion_tokens=index + 1,
                finish_reason=verifier_pb2.FINISH_REASON_STOP if index == len(WORDS) - 1 else 0,
            )


@pytest.fixture
def held_backends():
    """The held verifier plus SERVING health on one port, standing in for the verifier,
    drafter and memory services alike."""
    verifier = HeldVerifier()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    verifier_pb2_grpc.add_VerifierServicer_to_server(verifier, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield verifier, f"127.0.0.1:{port}"
    verifier.release.set()
    server.stop(grace=None)


def start_gateway(spawn, backends_addr: str, redis_url: str, **settings) -> tuple[Process, str]:
    port = free_port()
    gateway = spawn(
        "aerie_gateway",
        gateway_port=port,
        verifier_addr=backends_addr,
        drafter_addr=backends_addr,
        memory_addr=backends_addr,
        redis_url=redis_url,
        served_model_name=MODEL,
        api_keys="",
        **settings,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert gateway.alive(), gateway.log()
        assert time.monotonic() < deadline, f"gateway not ready:\n{gateway.log()}"
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return gateway, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


class StreamReader:
    """A streamed chat completion read on a background thread: its data lines."""

    def __init__(self, url: str):
        self.lines: list[str] = []
        self.first = threading.Event()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        self.outcome = InBackground(lambda: self._read(url, body))

    def _read(self, url: str, body: dict) -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.lines.append(line[len("data: ") :])
                    self.first.set()

    def text(self) -> str:
        chunks = [json.loads(line) for line in self.lines if line != "[DONE]"]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def assert_503_envelope(response: httpx.Response, says: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "service_unavailable_error" and says in error["message"], error


def test_gateway_drains_a_stream_in_flight(spawn, redis_server, held_backends):
    verifier, backends_addr = held_backends
    gateway, url = start_gateway(spawn, backends_addr, redis_server.url)
    stream = StreamReader(url)
    assert stream.first.wait(60), gateway.log()

    gateway.signal(signal.SIGTERM)
    with httpx.Client(base_url=url, timeout=10) as client:
        wait_until(lambda: client.get("/ready").status_code == 503, 30, "/ready to answer 503")
        assert_503_envelope(client.get("/ready"), "shutting down")
        refused = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert_503_envelope(refused, "shutting down")
        assert refused.headers["connection"] == "close" and refused.headers["retry-after"]
        assert client.get("/health").status_code == 200  # alive, only not taking work
    assert not stream.outcome.done()

    verifier.release.set()
    released_at = time.monotonic()
    stream.outcome.result(60)
    assert stream.lines[-1] == "[DONE]" and stream.text() == " ".join(WORDS)
    assert gateway.wait_exit(EXIT_WITHIN_S) == 0, gateway.log()
    assert time.monotonic() - released_at < EXIT_WITHIN_S
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_gateway_drain_timeout_bounds_a_stream_that_never_ends(spawn, redis_server, held_backends):
    _, backends_addr = held_backends
    gateway, url = start_gateway(spawn, backends_addr, redis_server.url, drain_timeout_s=2)
    stream = StreamReader(url)
    assert stream.first.wait(60), gateway.log()

    signalled_at = time.monotonic()
    gateway.signal(signal.SIGTERM)
    assert gateway.wait_exit(EXIT_WITHIN_S) == 0, gateway.log()
    assert time.monotonic() - signalled_at >= 2  # the stream got its drain timeout...
    with pytest.raises(httpx.HTTPError):  # ...and was then cut off, unfinished
        stream.outcome.result(30)
    assert "[DONE]" not in stream.lines
