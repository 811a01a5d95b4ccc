"""The real stack's verifier and drafter serve Prometheus metrics on their own ports
(scripts/launch.py turns them on), and the metrics show what happens when a client hangs
up mid-stream: generation stops in the verifier and the drafter frees the session."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

WAIT_S = 60.0
MAX_TOKENS = 1000  # minutes of CPU decoding: far longer than the test waits


def scrape(stack, service: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"http://127.0.0.1:{stack.ports[f'{service}_metrics']}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def cancelled(samples) -> float:
    return samples[("aerie:verifier_requests_finished_total", (("reason", "cancelled"),))]


def freed(samples) -> float:
    return sum(
        samples[("aerie:drafter_sessions_closed_total", (("reason", reason),))]
        for reason in ("ended", "cancelled")
    )


def wait_until_speculating(stack) -> None:
    """Earlier tests kill the drafter; the verifier's circuit breaker then decodes plainly
    for a while. Wait until a short speculative chat drafts again."""
    deadline = time.monotonic() + WAIT_S
    while True:
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "speculative": True,
        }
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
        if response.status_code == 200 and (response.json()["usage"].get("speculative") or {}).get("drafts"):
            return
        assert time.monotonic() < deadline, f"no speculation within {WAIT_S}s: {response.text}"
        time.sleep(1)


def test_client_disconnect_mid_stream_stops_generation_and_frees_the_draft_session(stack):
    wait_until_speculating(stack)
    verifier_before, drafter_before = scrape(stack, "verifier"), scrape(stack, "drafter")
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "speculative": True,
    }
    chunks = 0
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                chunks += 1
            if chunks == 3:
                assert scrape(stack, "drafter")[("aerie:drafter_sessions_live", ())] == 1
                break  # leaving the block hangs up
    assert chunks == 3

    deadline = time.monotonic() + WAIT_S
    while True:
        verifier, drafter = scrape(stack, "verifier"), scrape(stack, "drafter")
        stopped = cancelled(verifier) == cancelled(verifier_before) + 1
        # one scrape reads the running gauge before the counters: wait for both
        running = verifier[("aerie:verifier_requests_running", ())]
        if stopped and running == 0 and drafter[("aerie:drafter_sessions_live", ())] == 0:
            break
        assert time.monotonic() < deadline, f"not stopped within {WAIT_S}s: {verifier}, {drafter}"
        time.sleep(0.2)
    generated = (
        verifier[("aerie:verifier_generation_tokens_total", ())]
        - verifier_before[("aerie:verifier_generation_tokens_total", ())]
    )
    assert 0 < generated < MAX_TOKENS
    opened = (
        drafter[("aerie:drafter_sessions_total", ())] - drafter_before[("aerie:drafter_sessions_total", ())]
    )
    assert opened == 1 and freed(drafter) - freed(drafter_before) == 1
