"""Prometheus metrics of the verifier and the drafter, and the fault stories they tell,
through the real pieces: a tiny random-weight target in the verifier engine, the Verifier
and Drafter gRPC services over loopback, the gateway app in front, and each service's
/metrics scraped over HTTP from prometheus_client's server.

- A client that hangs up mid-stream stops generation in the verifier and frees the
  drafter session (the verifier's cancelled counter, the drafter's live sessions).
- With the drafter down, chat answers with the target's own output and no speculation;
  when the drafter is back, speculation resumes by itself after AERIE_DRAFTER_RETRY_AFTER_S.
- The deployments (launch.py, compose, Kubernetes) serve the metrics on the ports the
  settings name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from aerie_common.metrics import registry_for, start_metrics_server
from aerie_drafter.metrics import SessionCollector
from aerie_drafter.proposer import DraftSession, TreeShape
from aerie_drafter.server import SERVICE_NAME as DRAFTER_SERVICE
from aerie_drafter.server import DrafterServicer
from aerie_drafter.settings import DrafterSettings
from aerie_gateway.app import create_app
from aerie_gateway.settings import GatewaySettings
from aerie_memory.settings import MemorySettings
from aerie_proto.v1 import drafter_pb2_grpc, verifier_pb2_grpc
from aerie_verifier.drafter_client import GrpcDrafterFactory, InProcessDrafterFactory
from aerie_verifier.engine import Engine
from aerie_verifier.metrics import EngineCollector
from aerie_verifier.prefix_cache import PrefixCache
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.server import SERVICE_NAME as VERIFIER_SERVICE
from aerie_verifier.server import VerifierServicer
from aerie_verifier.settings import VerifierSettings
from aerie_verifier.speculative import PaceGuard
from prometheus_client import generate_latest

from tests.conftest import build_tiny_llama
from tests.unit.k8s_render import render
from tests.unit.test_drafter_service import ServerThread
from tests.unit.test_gateway import asgi_client, free_port, metric_samples, served_over_http
from tests.unit.test_k8s import K8S, aerie_containers, container_env, container_ports, setting
from tests.unit.test_speculative import VOCAB, generate, random_head

ROOT = Path(__file__).resolve().parents[2]
SHAPE = TreeShape(depth=3, top_k=3, total_tokens=8)
MODEL = "tiny"
PROMPT = "Tell me a story about the sea."
WAIT_S = 30.0  # event-based waits; generous for a loaded machine


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(VOCAB, seed=3, layers=8)


@pytest.fixture(scope="module")
def head(target):
    return random_head(target)


class SlowDraftSession(DraftSession):
    """The EAGLE proposer, slowed down so a long generation is still running when the
    client hangs up."""

    def propose(self, shape):
        time.sleep(0.1)
        return super().propose(shape)


class Drafter:
    """The Drafter service on loopback with its metrics endpoint; stop() and start() again
    on the same port stand for a drafter that goes down and comes back."""

    def __init__(self, head, port: int = 0, slow: bool = False):
        new_session = (lambda counts: SlowDraftSession(head, context_counts=counts)) if slow else None
        self.servicer = DrafterServicer(head, SHAPE, 8, "test", new_session=new_session)
        self.server = ServerThread(
            lambda s: drafter_pb2_grpc.add_DrafterServicer_to_server(self.servicer, s), DRAFTER_SERVICE, port
        ).start()
        self.metrics = start_metrics_server(SessionCollector(self.servicer), "127.0.0.1", free_port())
        self.running = True

    @property
    def addr(self) -> str:
        return self.server.addr

    def scrape(self) -> dict:
        return scrape(self.metrics)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.stop()
            self.metrics.shutdown()
            self.metrics.server_close()


class Verifier:
    """The engine over the tiny target, drafting from ``drafter_addr`` over gRPC, served as
    the Verifier gRPC service with its metrics endpoint."""

    def __init__(
        self, target, tokenizer, drafter_addr: str, retry_after_s: float = 10.0, step_timeout_s=30.0
    ):
        factory = GrpcDrafterFactory(drafter_addr, SHAPE, step_timeout_s=step_timeout_s)
        self.engine = Engine(
            target,
            tokenizer,
            max_running=4,
            drafter_factory=factory,
            breaker_cooldown_s=retry_after_s,
            prefix_cache=PrefixCache(2**26),
        )
        self.engine.start()
        servicer = VerifierServicer(self.engine, MODEL, "cpu", "float32")
        self.server = ServerThread(
            lambda s: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, s), VERIFIER_SERVICE
        ).start()
        self.metrics = start_metrics_server(EngineCollector(self.engine), "127.0.0.1", free_port())

    def scrape(self) -> dict:
        return scrape(self.metrics)

    def stop(self) -> None:
        self.metrics.shutdown()
        self.metrics.server_close()
        self.server.stop()
        self.engine.stop()


def scrape(server) -> dict:
    response = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
    assert response.status_code == 200
    return metric_samples(response.text)


def finished(samples: dict, reason: str) -> float:
    return samples[("aerie:verifier_requests_finished_total", (("reason", reason),))]


def closed(samples: dict, reason: str) -> float:
    return samples[("aerie:drafter_sessions_closed_total", (("reason", reason),))]


def gateway(verifier_addr: str, drafter_addr: str):
    return create_app(
        GatewaySettings(
            verifier_addr=verifier_addr,
            drafter_addr=drafter_addr,
            memory_addr=drafter_addr,
            redis_url=f"redis://127.0.0.1:{free_port()}/0",  # chat never touches Redis
            api_keys="",
            served_model_name="",
            grpc_timeout_s=120.0,
        )
    )


def chat_body(**extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.0,
        **extra,
    }


def wait_until(predicate, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout_s}s: {what}"
        time.sleep(0.05)


def test_metrics_count_what_the_verifier_and_drafter_did(target, head, tiny_tokenizer):
    drafter = Drafter(head)
    verifier = Verifier(target, tiny_tokenizer, drafter.addr)
    try:
        before = verifier.scrape()
        assert before[("aerie:verifier_requests_running", ())] == 0
        assert finished(before, "stop") == finished(before, "length") == finished(before, "cancelled") == 0
        with served_over_http(gateway(verifier.server.addr, drafter.addr)) as base_url:
            response = httpx.post(
                f"{base_url}/v1/chat/completions", json=chat_body(max_tokens=16), timeout=WAIT_S
            )
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        reason = response.json()["choices"][0]["finish_reason"]

        after = verifier.scrape()
        assert finished(after, reason) == 1
        assert (
            after[("aerie:verifier_requests_running", ())]
            == after[("aerie:verifier_requests_waiting", ())]
            == 0
        )
        assert after[("aerie:verifier_prompt_tokens_total", ())] == usage["prompt_tokens"]
        assert after[("aerie:verifier_generation_tokens_total", ())] == usage["completion_tokens"]
        assert (
            after[("aerie:verifier_spec_decode_num_drafts_total", ())] == usage["speculative"]["drafts"] > 0
        )
        assert after[("aerie:verifier_drafter_fallbacks_total", ())] == 0
        for part in ("draft", "hop", "verify"):  # where the steps' time went, the gRPC hop apart
            assert after[(f"aerie:verifier_spec_decode_{part}_seconds_total", ())] > 0

        wait_until(lambda: drafter.servicer.live_sessions == 0, "the verifier closed its draft session")
        sessions = drafter.scrape()
        assert sessions[("aerie:drafter_sessions_total", ())] == 1
        assert sessions[("aerie:drafter_sessions_live", ())] == 0
        assert sessions[("aerie:drafter_sessions_max", ())] == 8
        assert closed(sessions, "ended") + closed(sessions, "cancelled") == 1
        assert closed(sessions, "invalid") == closed(sessions, "error") == 0
        assert sessions[("aerie:drafter_trees_total", ())] >= usage["speculative"]["drafts"]
        servicer = drafter.servicer
        assert sessions[("aerie:drafter_context_draft_tokens_total", ())] == servicer.context_counts.drafted
        assert (
            sessions[("aerie:drafter_context_accepted_tokens_total", ())] == servicer.context_counts.accepted
        )

        # The same chat again: all of its prompt but the last token comes from the prefix cache.
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
        assert after[("aerie:verifier_prefix_cache_hits_total", ())] == 0
        with served_over_http(gateway(verifier.server.addr, drafter.addr)) as base_url:
            again = httpx.post(
                f"{base_url}/v1/chat/completions", json=chat_body(max_tokens=16), timeout=WAIT_S
            )
        cached = usage["prompt_tokens"] - 1
        assert again.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": cached}
        last = verifier.scrape()
        assert last[("aerie:verifier_prefix_cache_hits_total", ())] == cached
        assert last[("aerie:verifier_prefix_cache_queries_total", ())] == 2 * usage["prompt_tokens"]
        assert last[("aerie:verifier_prefix_cache_bytes", ())] == verifier.engine.prefix_cache.nbytes > 0
    finally:
        verifier.stop()
        drafter.stop()


def test_client_disconnect_mid_stream_stops_generation_and_frees_the_draft_session(
    target, head, tiny_tokenizer
):
    drafter = Drafter(head, slow=True)  # 0.1 s a tree: 400 tokens would take many seconds
    verifier = Verifier(target, tiny_tokenizer, drafter.addr)
    max_tokens = 400
    try:
        app = gateway(verifier.server.addr, drafter.addr)
        with served_over_http(app) as base_url:
            with httpx.Client(base_url=base_url, timeout=WAIT_S) as client:
                with client.stream(
                    "POST", "/v1/chat/completions", json=chat_body(max_tokens=max_tokens, stream=True)
                ) as response:
                    assert response.status_code == 200
                    lines = response.iter_lines()
                    first = json.loads(next(lines).removeprefix("data: "))
                    assert first["object"] == "chat.completion.chunk"
                    # Generation is under way, with a draft session open.
                    wait_until(lambda: drafter.servicer.live_sessions == 1, "a draft session opened")
                # Leaving the block hung up on the stream.

            wait_until(lambda: finished(verifier.scrape(), "cancelled") == 1, "the verifier cancelled it")
            stopped = verifier.scrape()
            assert stopped[("aerie:verifier_requests_running", ())] == 0
            assert stopped[("aerie:verifier_requests_waiting", ())] == 0
            assert finished(stopped, "stop") == finished(stopped, "length") == 0
            assert 0 < stopped[("aerie:verifier_generation_tokens_total", ())] < max_tokens

            wait_until(lambda: drafter.scrape()[("aerie:drafter_sessions_live", ())] == 0, "session freed")
            sessions = drafter.scrape()
            assert sessions[("aerie:drafter_sessions_total", ())] == 1
            assert closed(sessions, "ended") + closed(sessions, "cancelled") == 1
            assert closed(sessions, "error") == closed(sessions, "invalid") == 0

            gateway_samples = metric_samples(app.state.metrics.exposition().decode())
            assert gateway_samples[("aerie:num_requests_running", ())] == 0
    finally:
        verifier.stop()
        drafter.stop()


async def test_drafter_down_chat_answers_plainly_then_speculation_resumes(target, head, tiny_tokenizer):
    retry_after_s = VerifierSettings(drafter_retry_after_s=3.0).drafter_retry_after_s
    drafter = Drafter(head)
    port = drafter.server.port
    verifier = Verifier(target, tiny_tokenizer, drafter.addr, retry_after_s=retry_after_s)
    app = gateway(verifier.server.addr, drafter.addr)
    try:
        async with asgi_client(app) as client:

            async def chat(**extra) -> dict:
                response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=24, **extra))
                assert response.status_code == 200, response.text
                return response.json()

            def text(completion: dict) -> str:
                return completion["choices"][0]["message"]["content"]

            plain = await chat(speculative=False)
            assert "speculative" not in plain["usage"]
            speculative = await chat()
            assert text(speculative) == text(plain) and speculative["usage"]["speculative"]["drafts"] > 0

            drafter.stop()
            down = await chat()
            assert text(down) == text(plain), "the target's own output"
            assert "speculative" not in down["usage"], "no speculation without a drafter"
            samples = verifier.scrape()
            assert samples[("aerie:verifier_drafter_failures_total", ())] == 1
            assert samples[("aerie:verifier_drafter_fallbacks_total", ())] == 1

            # Back on the same address: within the retry delay nobody asks it yet...
            drafter = Drafter(head, port=port)
            waiting = await chat()
            assert not verifier.engine.breaker.allow(), "this request ran within the retry delay"
            assert text(waiting) == text(plain) and "speculative" not in waiting["usage"]
            assert drafter.servicer.sessions_total == 0
            assert verifier.scrape()[("aerie:verifier_drafter_fallbacks_total", ())] == 2

            # ...and after it, speculation comes back by itself.
            deadline = time.monotonic() + WAIT_S
            while "speculative" not in (resumed := await chat())["usage"]:
                assert text(resumed) == text(plain)
                assert time.monotonic() < deadline, "speculation did not resume"
            assert text(resumed) == text(plain) and resumed["usage"]["speculative"]["drafts"] > 0
            assert drafter.servicer.sessions_total >= 1
        samples = verifier.scrape()
        assert samples[("aerie:verifier_drafter_fallbacks_total", ())] >= 2
        assert finished(samples, "error") == 0
    finally:
        verifier.stop()
        drafter.stop()


def test_metrics_registries_are_per_instance_and_port_zero_serves_none(target, head, tiny_tokenizer):
    servicers = [DrafterServicer(head, SHAPE, 4, "a"), DrafterServicer(head, SHAPE, 4, "b")]
    servicers[1].live_sessions = 3
    live = [
        metric_samples(generate_latest(registry_for(SessionCollector(s))).decode())[
            ("aerie:drafter_sessions_live", ())
        ]
        for s in servicers
    ]
    assert live == [0, 3]
    engines = [Engine(target, tiny_tokenizer), Engine(target, tiny_tokenizer)]
    for engine in engines:
        assert (
            metric_samples(generate_latest(registry_for(EngineCollector(engine))).decode())[
                ("aerie:verifier_requests_running", ())
            ]
            == 0
        )
    assert start_metrics_server(EngineCollector(engines[0]), "127.0.0.1", 0) is None
    assert start_metrics_server(SessionCollector(servicers[0]), "127.0.0.1", 0) is None


def test_the_pace_guards_measures_are_exported(target, head, tiny_tokenizer):
    guard = PaceGuard()
    factory = InProcessDrafterFactory(head, SHAPE)
    engine = Engine(target, tiny_tokenizer, max_running=3, drafter_factory=factory, pace_guard=guard)
    engine.start()
    try:
        generate(engine, [5, 6, 7, 8], SamplingParams(max_tokens=12), speculative=True)
    finally:
        engine.stop()
    samples = metric_samples(generate_latest(registry_for(EngineCollector(engine))).decode())
    # calibrated at start: a step alone and batched steps of 2 and 3 requests
    plain = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "aerie:verifier_pace_plain_step_seconds"
    }
    assert plain == {(("requests", str(n)),): guard.plain_batch_s[n] for n in (1, 2, 3)}
    assert samples[("aerie:verifier_pace_speculative_step_seconds", ())] == guard.speculative_step_s > 0
    assert samples[("aerie:verifier_pace_speculative_step_tokens", ())] == guard.speculative_step_tokens >= 1
    plain_engine = Engine(target, tiny_tokenizer)  # no guard: nothing to export
    names = {
        name
        for name, _ in metric_samples(generate_latest(registry_for(EngineCollector(plain_engine))).decode())
    }
    assert not any(name.startswith("aerie:verifier_pace") for name in names)


def test_an_in_process_drafter_exports_what_its_context_branch_added(target, head, tiny_tokenizer):
    factory = InProcessDrafterFactory(head, TreeShape(depth=3, top_k=3, total_tokens=8, context_ngram=True))
    engine = Engine(target, tiny_tokenizer, max_running=1, drafter_factory=factory)
    engine.start()
    try:  # a prompt that repeats itself, so that the context has continuations to offer
        generate(engine, [5, 6, 7, 8, 9] * 6, SamplingParams(max_tokens=24), speculative=True)
    finally:
        engine.stop()
    samples = metric_samples(generate_latest(registry_for(EngineCollector(engine))).decode())
    counts = factory.context_counts
    assert samples[("aerie:verifier_drafter_context_draft_tokens_total", ())] == counts.drafted > 0
    assert samples[("aerie:verifier_drafter_context_accepted_tokens_total", ())] == counts.accepted
    # Over gRPC the drafter service exports them, and the verifier has none of its own.
    remote = Engine(target, tiny_tokenizer, drafter_factory=GrpcDrafterFactory("127.0.0.1:1", SHAPE))
    names = {
        name for name, _ in metric_samples(generate_latest(registry_for(EngineCollector(remote))).decode())
    }
    assert "aerie:verifier_spec_decode_num_drafts_total" in names
    assert not any(name.startswith("aerie:verifier_drafter_context") for name in names)


# --- the deployments serve the metrics where the settings say --------------------------------

METRICS_SETTINGS = {
    "verifier": ("AERIE_VERIFIER_METRICS_PORT", "verifier_metrics_port", VerifierSettings),
    "drafter": ("AERIE_DRAFTER_METRICS_PORT", "drafter_metrics_port", DrafterSettings),
    "memory": ("AERIE_MEMORY_METRICS_PORT", "memory_metrics_port", MemorySettings),
}


def test_settings_default_to_no_metrics_server():
    for _, field_name, cls in METRICS_SETTINGS.values():
        assert cls.model_fields[field_name].default == 0


def test_launcher_turns_metrics_on_unless_told_otherwise(launch, tmp_path, monkeypatch):
    monkeypatch.setenv("AERIE_DATA_DIR", str(tmp_path))
    for env_name, _, _ in METRICS_SETTINGS.values():
        monkeypatch.delenv(env_name, raising=False)
    procs, _ = launch.plan()
    defaults = {name: procs[0].env[name] for name, _, _ in METRICS_SETTINGS.values()}
    assert all(int(port) > 0 for port in defaults.values()) and len(set(defaults.values())) == len(defaults)
    # Stacks started beside another (tests, benchmarks) pick their own; 0 turns them off.
    monkeypatch.setenv("AERIE_VERIFIER_METRICS_PORT", "0")
    procs, _ = launch.plan()
    assert {p.env["AERIE_VERIFIER_METRICS_PORT"] for p in procs} == {"0"}


def test_compose_sets_the_metrics_ports():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, (env_name, _, _) in METRICS_SETTINGS.items():
        port = services[name]["environment"][env_name]
        assert int(port) > 0
        assert str(port) in [str(p) for p in services[name].get("expose", [])], name


def test_kubernetes_containers_expose_and_annotate_the_metrics_ports():
    resources = render(K8S / "base")
    containers = aerie_containers(resources)
    for name, (env_name, _, _) in METRICS_SETTINGS.items():
        _, container = containers[name]
        port = int(setting(container_env(resources, container), env_name))
        metrics_ports = [p for n, p in container_ports(container).items() if n.endswith("metrics")]
        assert metrics_ports == [port], name
    # one annotated port per pod: the verifier's (its drafter sidecar's is found by name)
    for name in ("verifier", "memory"):
        workload, container = containers[name]
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == int(
            setting(container_env(resources, container), METRICS_SETTINGS[name][0])
        )
