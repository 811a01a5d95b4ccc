"""The memory end to end through the running stack: HTTP ingest -> Redis stream -> worker
(reflections from the real verifier, LoRA training of the real SmolLM2, TIES merge) ->
served version -> query and chat. The worker is killed with SIGKILL mid-job and the job
still succeeds, with nothing lost; the service keeps answering while the worker trains."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.test_stack_metrics import scrape

pytestmark = pytest.mark.integration

NS = "itest"
DOC = {
    "id": "quell",
    "text": "Zorvath Quell is a glassblower who lives in Myrrin. Zorvath Quell collects copper keys.",
    "metadata": {"source": "test", "pages": 3, "public": True},  # read back as sent
}
JOB_TIMEOUT_S = 420


def worker_pid(stack) -> int:
    memory = stack.child_pid("aerie_memory")
    for pid in Path(f"/proc/{memory}/task/{memory}/children").read_text().split():
        if b"aerie_memory.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise LookupError("no memory worker running")


def get_job(stack, job_id):
    response = httpx.get(f"{stack.base_url}/memory/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_memory_learns_survives_kill_and_answers(stack):
    url = stack.base_url
    bad = httpx.post(f"{url}/memory/ingest", json={"namespace": "no way", "documents": [DOC]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "namespace"

    started = time.monotonic()
    response = httpx.post(f"{url}/memory/ingest", json={"namespace": NS, "documents": [DOC]}, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["documents"] == [{"id": "quell", "status": "accepted", "duplicate_of": None}]

    # Kill the worker (SIGKILL) as soon as the job is running; the service answers meanwhile.
    killed_at_stage = None
    slowest_answer_s = 0.0
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, f"job did not finish: {get_job(stack, job_id)}"
        asked = time.monotonic()
        job = get_job(stack, job_id)
        slowest_answer_s = max(slowest_answer_s, time.monotonic() - asked)
        if (
            killed_at_stage is None
            and job["status"] == "running"
            and job["stage"] in ("reflecting", "training")
        ):
            os.kill(worker_pid(stack), signal.SIGKILL)
            killed_at_stage = job["stage"]
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(1)
    learned_s = time.monotonic() - started
    assert job["status"] == "succeeded", job
    assert killed_at_stage is not None and job["attempts"] >= 2, job
    assert job["model_version"] and job["training_examples"] > 0
    assert {s["step"] for s in job["step_yields"]} >= {"facts_direct", "facts_inferred", "passages"}
    assert slowest_answer_s < 5, "the service stopped answering while the worker trained"
    print(f"\nlearned 1 document in {learned_s:.0f}s (worker killed during {killed_at_stage}); yields:")
    for s in job["step_yields"]:
        print(
            f"  {s['step']}: {s['kept']}/{s['candidates']} kept, {s['calls']} calls, {s['failed_calls']} failed"
        )

    # Re-ingesting the same document trains nothing.
    again = httpx.post(f"{url}/memory/ingest", json={"namespace": NS, "documents": [DOC]}, timeout=30)
    assert again.status_code == 202 and again.json() == {
        "job_id": None,
        "documents": [{"id": "quell", "status": "duplicate", "duplicate_of": "quell"}],
    }

    stats = httpx.get(f"{url}/memory/namespaces/{NS}", timeout=30).json()
    assert stats["documents"] == 1
    assert stats["current_version"] == job["model_version"]
    # What the memory holds reads back: the document, its text, learned by the served version.
    listed = httpx.get(f"{url}/memory/namespaces/{NS}/documents", timeout=30).json()
    assert [(d["id"], d["job_id"], d["learned"]) for d in listed["documents"]] == [("quell", job_id, True)]
    stored = httpx.get(f"{url}/memory/documents/quell", params={"namespace": NS}, timeout=30).json()
    assert (stored["text"], stored["metadata"]) == (DOC["text"], DOC["metadata"])
    namespaces = httpx.get(f"{url}/memory/namespaces", timeout=30).json()["namespaces"]
    assert {"namespace": NS, "documents": 1, "current_version": job["model_version"]} in namespaces

    answer = httpx.post(
        f"{url}/memory/query",
        json={"namespace": NS, "question": "What does Zorvath Quell collect?"},
        timeout=120,
    ).json()
    assert answer["model_version"] == job["model_version"] and answer["answer"]
    print(f"memory: {answer['answer']!r} sources={answer['sources']} in {answer['seconds']:.1f}s")

    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "What does Zorvath Quell collect?"}],
            "max_tokens": 24,
            "temperature": 0,
            "memory": {"namespace": NS, "mode": "single_pass"},
        },
        timeout=180,
    )
    assert chat.status_code == 200, chat.text
    info = chat.json()["memory"]
    assert info["model_version"] == job["model_version"] and info["turns"] == 1
    assert info["used"] == bool(info["findings"])

    # Forgetting: the adapter held only this document, so it is dropped and re-merged.
    gone = httpx.delete(f"{url}/memory/documents/quell", params={"namespace": NS}, timeout=30)
    assert gone.status_code == 200 and gone.json()["method"] == "drop_adapter", gone.text
    forget = gone.json()["job_id"]
    deadline = time.monotonic() + 120
    while (job := get_job(stack, forget))["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(1)
    assert job["status"] == "succeeded", job
    # The memory's own metrics count both jobs (and the worker killed mid-job lost none).
    samples = scrape(stack, "memory")
    for kind in ("ingest", "forget"):
        assert samples[("aerie:memory_jobs_finished_total", (("kind", kind), ("status", "succeeded")))] >= 1
    assert samples[("aerie:memory_documents_ingested_total", (("status", "accepted"),))] >= 1
    stats = httpx.get(f"{url}/memory/namespaces/{NS}", timeout=30).json()
    assert (
        stats["current_version"] == job["model_version"] and stats["versions"][-1].get("adapters", []) == []
    )
    # The version that learned it is not served again (its text was deleted).
    rollback = httpx.post(f"{url}/memory/namespaces/{NS}/rollback", json={}, timeout=30)
    assert rollback.status_code == 409 and "'quell'" in rollback.json()["error"]["message"], rollback.text
    emptied = httpx.delete(f"{url}/memory/namespaces/{NS}", timeout=30)
    assert emptied.status_code == 200 and emptied.json()["documents"] == 0, emptied.text
    # Nothing left to forget: the namespace is removed at once.
    assert httpx.get(f"{url}/memory/namespaces/{NS}", timeout=30).status_code == 404
    assert NS not in [
        n["namespace"] for n in httpx.get(f"{url}/memory/namespaces", timeout=30).json()["namespaces"]
    ]
