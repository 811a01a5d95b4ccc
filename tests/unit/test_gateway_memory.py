"""The gateway's memory routes and memory in chat, against a fake memory service and the
fake verifier (real gRPC servers with canned replies) and a real Redis."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from aerie_common.grpc_utils import PARAM_METADATA_KEY
from aerie_common.memory_limits import MAX_ANSWER_TOKENS, MAX_QUESTION_CHARS
from aerie_gateway.app import create_app
from aerie_gateway.memory_protocol import ANSWER_FROM_CONTEXT
from aerie_gateway.settings import GatewaySettings
from aerie_proto.v1 import memory_pb2, memory_pb2_grpc

from tests.unit.test_gateway import (  # noqa: F401  (fixtures)
    MODEL,
    FakeVerifier,
    asgi_client,
    assert_error,
    chat_body,
    fake_backends,
    free_port,
    gateway_redis_url,
    metric_samples,
    sse_payloads,
)


class FakeMemory(memory_pb2_grpc.MemoryServicer):
    def __init__(self):
        self.queries: list[str] = []
        self.max_tokens: dict[str, int] = {}  # per question, the last asked
        self.slow_s = 0.0

    def Ingest(self, request, context):
        self.ingested = list(request.documents)
        if len(request.documents) > 2:
            # as the memory service refuses it (aerie_common.grpc_utils.abort_invalid)
            context.set_trailing_metadata(((PARAM_METADATA_KEY, "documents"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "3 documents in one request; the limit is 2")
        statuses = [
            memory_pb2.DocumentStatus(id=d.id, status="duplicate", duplicate_of="k")
            if d.text == "known"
            else memory_pb2.DocumentStatus(id=d.id, status="accepted")
            for d in request.documents
        ]
        job_id = "job-1" if any(s.status == "accepted" for s in statuses) else ""
        return memory_pb2.IngestResponse(job_id=job_id, documents=statuses)

    def GetJob(self, request, context):
        if request.job_id != "job-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}")
        return memory_pb2.Job(
            job_id="job-1",
            namespace="ns",
            status="running",
            stage="training",
            done=3,
            total=10,
            step_yields=[memory_pb2.StepYield(step="facts_direct", calls=2, candidates=6, kept=4, dropped=2)],
        )

    def GetNamespace(self, request, context):
        if request.namespace == "empty":
            return memory_pb2.NamespaceStats(namespace="empty", exists=True)
        return memory_pb2.NamespaceStats(
            namespace=request.namespace,
            exists=request.namespace != "missing",
            documents=2,
            current_version="v0001",
            versions=[memory_pb2.ModelVersion(version="v0001", adapters=["job-1"], ties_density=0.3)],
        )

    def DeleteDocument(self, request, context):
        if request.document_id != "a/b":
            return memory_pb2.DeleteDocumentResponse(deleted=False, detail="no document")
        return memory_pb2.DeleteDocumentResponse(
            deleted=True, job_id="job-2", method="drop_adapter", affected_jobs=["job-1"], detail="dropped"
        )

    def Rollback(self, request, context):
        if request.version == "v9":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no version 'v9'")
        return memory_pb2.NamespaceStats(namespace=request.namespace, exists=True, current_version="v0003")

    def DeleteNamespace(self, request, context):
        if request.namespace == "missing":
            return memory_pb2.DeleteNamespaceResponse(exists=False, detail="no namespace 'missing'")
        if request.namespace == "empty":
            return memory_pb2.DeleteNamespaceResponse(exists=True, detail="The namespace holds no document.")
        return memory_pb2.DeleteNamespaceResponse(
            exists=True, documents=2, job_id="job-3", detail="forgotten"
        )

    def ListNamespaces(self, request, context):
        names = ("ns", "other", "team-b")
        return memory_pb2.ListNamespacesResponse(
            namespaces=[
                memory_pb2.NamespaceSummary(namespace=n, documents=2, current_version="v0001") for n in names
            ]
        )

    # Stored documents of any namespace but "missing": "a/b" (learned) and "c" (not yet).
    def _documents(self) -> list[memory_pb2.StoredDocument]:
        return [
            memory_pb2.StoredDocument(
                id="a/b",
                metadata_json='{"zip": "02139", "pages": 12, "public": true}',
                content_hash="ab" * 32,
                characters=5,
                chunks=1,
                job_id="job-1",
                learned=True,
                text="12345",
            ),
            memory_pb2.StoredDocument(
                id="c", content_hash="cd" * 32, characters=3, chunks=1, job_id="job-2", text="new"
            ),
        ]

    def ListDocuments(self, request, context):
        if request.namespace == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no namespace 'missing'")
        after = [d for d in self._documents() if d.id > request.after]
        for document in after:
            document.ClearField("text")
        page = after[: request.limit]
        return memory_pb2.ListDocumentsResponse(
            documents=page, next_after=page[-1].id if len(after) > len(page) else ""
        )

    def GetDocument(self, request, context):
        for document in self._documents():
            if document.id == request.document_id:
                return document
        context.abort(grpc.StatusCode.NOT_FOUND, f"no document {request.document_id!r}")

    def Query(self, request, context):
        asked_before = request.question in self.queries  # as the memory keeps its latest answers
        self.queries.append(request.question)
        self.max_tokens[request.question] = request.max_tokens
        time.sleep(self.slow_s)
        if request.namespace == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no namespace 'missing'")
        if "Naxpry" in request.question:
            return memory_pb2.QueryResponse(
                answer="Lumfen Uskyth",
                sources=["town-01"],
                model_version="v0001",
                knows=True,
                cached=asked_before,
            )
        return memory_pb2.QueryResponse(answer="I don't know.", model_version="v0001", knows=False)


@pytest.fixture(scope="module")
def fakes():
    verifier, memory = FakeVerifier(), FakeMemory()
    with fake_backends(verifier, memory) as addr:
        yield verifier, memory, addr


@pytest.fixture
def app(fakes, gateway_redis_url):  # noqa: F811
    _, _, addr = fakes

    def make(**overrides):
        fields = dict(
            verifier_addr=addr,
            drafter_addr=addr,
            memory_addr=addr,
            redis_url=gateway_redis_url,
            api_keys="",
            served_model_name="",
            grpc_timeout_s=30.0,
            memory_timeout_s=5.0,
            memory_chat_budget_s=5.0,
        )
        return create_app(GatewaySettings(**{**fields, **overrides}))

    return make


async def test_ingest_job_namespace_delete_query(app, fakes):
    async with asgi_client(app()) as client:
        docs = [{"id": "a", "text": "new", "metadata": {"n": 1, "ok": True}}, {"id": "b", "text": "known"}]
        response = await client.post("/memory/ingest", json={"namespace": "ns", "documents": docs})
        assert response.status_code == 202
        sent = [(d.id, d.metadata_json) for d in fakes[1].ingested]  # the metadata as JSON, typed
        assert sent == [("a", '{"n": 1, "ok": true}'), ("b", "")]
        assert response.json() == {
            "job_id": "job-1",
            "documents": [
                {"id": "a", "status": "accepted", "duplicate_of": None},
                {"id": "b", "status": "duplicate", "duplicate_of": "k"},
            ],
        }
        response = await client.post("/memory/ingest", json={"namespace": "ns", "documents": docs[1:]})
        assert response.status_code == 202 and response.json()["job_id"] is None

        job = (await client.get("/memory/jobs/job-1")).json()
        assert (job["status"], job["stage"], job["progress"]) == (
            "running",
            "training",
            {"done": 3, "total": 10},
        )
        assert job["step_yields"][0]["kept"] == "4" or job["step_yields"][0]["kept"] == 4
        assert_error(await client.get("/memory/jobs/nope"), 404, "invalid_request_error")

        stats = (await client.get("/memory/namespaces/ns")).json()
        assert stats["current_version"] == "v0001" and stats["versions"][0]["ties_density"] == pytest.approx(
            0.3
        )
        assert_error(await client.get("/memory/namespaces/missing"), 404, "invalid_request_error")
        assert_error(await client.get("/memory/namespaces/bad.ns"), 400, "invalid_request_error", "namespace")

        gone = await client.delete("/memory/documents/a/b", params={"namespace": "ns"})
        assert gone.status_code == 200 and gone.json()["method"] == "drop_adapter"
        assert_error(
            await client.delete("/memory/documents/zz", params={"namespace": "ns"}),
            404,
            "invalid_request_error",
        )
        missing_ns = await client.delete("/memory/documents/zz")
        assert_error(missing_ns, 400, "invalid_request_error", "query.namespace")

        rolled = await client.post("/memory/namespaces/ns/rollback", json={})
        assert rolled.json()["current_version"] == "v0003"
        assert_error(
            await client.post("/memory/namespaces/ns/rollback", json={"version": "v9"}),
            409,
            "invalid_request_error",
        )

        answer = (
            await client.post("/memory/query", json={"namespace": "ns", "question": "Who governs Naxpry?"})
        ).json()
        assert answer["answer"] == "Lumfen Uskyth" and answer["sources"] == ["town-01"] and answer["knows"]
        nowhere = await client.post("/memory/query", json={"namespace": "missing", "question": "Who is it?"})
        assert_error(nowhere, 404, "invalid_request_error")


async def test_documents_and_namespaces_are_read_back_and_forgotten(app, fakes):
    _, memory, _ = fakes
    async with asgi_client(app()) as client:
        names = (await client.get("/memory/namespaces")).json()
        assert names["namespaces"][0] == {"namespace": "ns", "documents": 2, "current_version": "v0001"}

        first = await client.get("/memory/namespaces/ns/documents", params={"limit": 1})
        assert first.status_code == 200
        assert first.json() == {
            "documents": [
                {
                    "id": "a/b",
                    # as sent: a string of digits stays a string, a number a number
                    "metadata": {"zip": "02139", "pages": 12, "public": True},
                    "content_hash": "ab" * 32,
                    "characters": 5,
                    "chunks": 1,
                    "job_id": "job-1",
                    "learned": True,
                }
            ],
            "next_after": "a/b",
        }
        rest = (await client.get("/memory/namespaces/ns/documents", params={"after": "a/b"})).json()
        assert [(d["id"], d["learned"]) for d in rest["documents"]] == [("c", False)]
        assert rest["next_after"] is None
        # the same pages where the document routes are, the namespace in the query
        by_query = await client.get("/memory/documents", params={"namespace": "ns", "limit": 1})
        assert (by_query.status_code, by_query.json()) == (200, first.json())
        slashed = await client.get("/memory/documents/", params={"namespace": "ns", "limit": 1})
        assert (slashed.status_code, slashed.json()) == (200, first.json())

        document = (await client.get("/memory/documents/a/b", params={"namespace": "ns"})).json()
        assert (document["text"], document["characters"], document["learned"]) == ("12345", 5, True)

        for response, status, param in (
            (await client.get("/memory/namespaces/missing/documents"), 404, None),
            (await client.get("/memory/namespaces/bad.ns/documents"), 400, "namespace"),
            (await client.get("/memory/namespaces/ns/documents", params={"limit": 0}), 400, "query.limit"),
            (await client.get("/memory/namespaces/ns/documents", params={"limit": 1001}), 400, "query.limit"),
            (await client.get("/memory/documents/zz", params={"namespace": "ns"}), 404, None),
            (await client.get("/memory/documents/a/b"), 400, "query.namespace"),
            (await client.get("/memory/documents"), 400, "query.namespace"),
            (await client.delete("/memory/documents/", params={"namespace": "ns"}), 400, "document_id"),
            (
                await client.get("/memory/documents", params={"namespace": "ns", "limit": 0}),
                400,
                "query.limit",
            ),
        ):
            assert_error(response, status, "invalid_request_error", param)

        forgotten = await client.delete("/memory/namespaces/ns")
        assert forgotten.status_code == 200
        assert forgotten.json() == {"documents": 2, "job_id": "job-3", "detail": "forgotten"}
        assert (await client.delete("/memory/namespaces/empty")).json()["job_id"] is None
        assert_error(await client.delete("/memory/namespaces/missing"), 404, "invalid_request_error")
        assert_error(
            await client.delete("/memory/namespaces/bad.ns"), 400, "invalid_request_error", "namespace"
        )

        # a document sent without an id is named by the memory
        sent = await client.post("/memory/ingest", json={"namespace": "ns", "documents": [{"text": "new"}]})
        assert sent.status_code == 202 and [d.id for d in memory.ingested] == [""]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"namespace": "no spaces", "documents": [{"id": "a", "text": "t"}]}, "namespace"),
        ({"namespace": "x" * 65, "documents": [{"id": "a", "text": "t"}]}, "namespace"),
        ({"namespace": "ns", "documents": []}, "documents"),
        ({"namespace": "ns"}, "documents"),
        ({"namespace": "ns", "documents": [{"id": "a"}]}, "documents[0].text"),
        ({"namespace": "ns", "documents": [{"id": "", "text": "t"}]}, "documents[0].id"),
    ],
)
async def test_bad_ingest_is_400_with_envelope(app, body, param):
    async with asgi_client(app()) as client:
        assert_error(await client.post("/memory/ingest", json=body), 400, "invalid_request_error", param)


async def test_service_side_limit_is_400(app):
    docs = [{"id": str(i), "text": "t"} for i in range(3)]
    async with asgi_client(app()) as client:
        error = assert_error(
            await client.post("/memory/ingest", json={"namespace": "ns", "documents": docs}),
            400,
            "invalid_request_error",
            "documents",
        )
    assert "limit is 2" in error["message"]


async def test_memory_routes_need_the_api_key(app):
    async with asgi_client(app(api_keys="k1")) as client:
        assert (await client.get("/memory/jobs/job-1")).status_code == 401
        ok = await client.get("/memory/jobs/job-1", headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200


async def test_chat_single_pass_composes_memory_and_reports_it(app, fakes):
    verifier, memory, _ = fakes
    body = chat_body("Who governs Naxpry?", memory={"namespace": "ns", "mode": "single_pass"})
    async with asgi_client(app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
        metrics = metric_samples((await client.get("/metrics")).text)
    assert response.status_code == 200, response.text
    info = response.json()["memory"]
    assert info["used"] and info["skipped"] is None and info["mode"] == "single_pass"
    assert list(info["stage_seconds"]) == ["single_pass"] and 0 <= info["stage_seconds"]["single_pass"]
    assert metrics[("aerie:memory_stage_seconds_count", (("stage", "single_pass"),))] == 1
    assert info["sources"] == ["town-01"] and info["turns"] == 1 and info["model_version"] == "v0001"
    sent = verifier.requests[response.json()["id"]]
    assert [m.role for m in sent.messages] == ["user"]
    assert "Lumfen Uskyth" in sent.messages[0].content
    assert sent.messages[0].content.endswith(f"Question: Who governs Naxpry?\n{ANSWER_FROM_CONTEXT}")


async def test_a_follow_up_is_asked_of_the_memory_as_the_conversation_means_it(app, fakes):
    verifier, memory, _ = fakes
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "Tell me about Naxpry."},
            {"role": "assistant", "content": "It is a small town."},
            {"role": "user", "content": "Who governs it today?"},
        ],
        "memory": {"namespace": "ns", "mode": "single_pass"},
    }
    async with asgi_client(app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert memory.queries[-1] == "Who governs Naxpry today?"
    info = response.json()["memory"]
    assert info["used"] and info["question"] == "Who governs Naxpry today?"
    sent = verifier.requests[response.json()["id"]]
    assert [m.role for m in sent.messages] == ["user", "assistant", "user"]  # the conversation kept
    assert sent.messages[-1].content.endswith(f"Question: Who governs Naxpry today?\n{ANSWER_FROM_CONTEXT}")


async def test_a_turn_pasting_a_long_text_asks_the_memory_its_last_sentences(app, fakes):
    verifier, memory, _ = fakes
    pasted = "The minutes of the last meeting ran long. " * 80  # 3,360 characters
    body = chat_body(f"{pasted}Who governs Naxpry?", memory={"namespace": "ns", "mode": "three_stage"})
    asked_before = len(memory.queries)
    async with asgi_client(app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    info = response.json()["memory"]
    assert info["used"] and info["skipped"] is None  # not "memory unavailable (INVALID_ARGUMENT ...)"
    asked = memory.queries[asked_before:]
    assert asked and all(len(q) <= MAX_QUESTION_CHARS for q in asked)
    assert any(q.endswith("Who governs Naxpry?") for q in asked)
    sent = verifier.requests[response.json()["id"]]
    assert pasted.strip() in sent.messages[-1].content  # the executive reads the whole turn


def test_a_passage_length_the_memory_would_refuse_is_refused_at_start(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("AERIE_MEMORY_PASSAGE_MAX_TOKENS", str(MAX_ANSWER_TOKENS + 1))
    with pytest.raises(ValidationError, match="memory_passage_max_tokens"):
        GatewaySettings()
    monkeypatch.setenv("AERIE_MEMORY_PASSAGE_MAX_TOKENS", str(MAX_ANSWER_TOKENS))
    assert GatewaySettings().memory_passage_max_tokens == MAX_ANSWER_TOKENS


async def test_chat_counts_the_memory_questions_answered_from_its_kept_answers(app, fakes):
    body = chat_body("Who governs Naxpry now?", memory={"namespace": "ns", "mode": "single_pass"})
    async with asgi_client(app()) as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        metrics = metric_samples((await client.get("/metrics")).text)
    assert metrics[("aerie:memory_questions_total", (("cached", "false"),))] == 1
    assert metrics[("aerie:memory_questions_total", (("cached", "true"),))] == 1


async def test_chat_three_stage_streaming_reports_memory_in_first_chunk(app, fakes):
    verifier, memory, _ = fakes
    body = chat_body("Who governs Naxpry?", memory={"namespace": "ns", "max_turns": 3}, stream=True)
    async with asgi_client(app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    payloads = sse_payloads(response.text)
    first = json.loads(payloads[0])
    info = first["memory"]
    assert info["mode"] == "three_stage" and info["used"] and info["turns"] <= 3
    assert list(info["stage_seconds"]) == ["grounding", "entity"]  # the turns ran out before "answer"
    # the fake executive answers no question: stages fall back to the user's question
    assert info["fallbacks"] >= 1 and info["findings"][0]["answer"] == "Lumfen Uskyth"
    assert payloads[-1] == "[DONE]" and all("memory" not in json.loads(p) for p in payloads[1:-1])


async def test_passage_questions_let_the_memory_answer_longer(app, fakes):
    _, memory, _ = fakes
    body = chat_body("Who governs Naxpry?", memory={"namespace": "ns"})
    async with asgi_client(app(memory_passage_max_tokens=96)) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert memory.max_tokens["What do you know about Naxpry?"] == 96  # a passage: longer than other answers
    assert memory.max_tokens["Who governs Naxpry?"] == 0  # the memory service's default


async def test_chat_without_knowledge_or_memory_still_answers(app, fakes):
    _, memory, _ = fakes
    async with asgi_client(app()) as client:
        unknown = await client.post(
            "/v1/chat/completions", json=chat_body("Hi?", memory={"namespace": "ns", "mode": "single_pass"})
        )
        assert unknown.json()["memory"]["skipped"] == "the memory did not know anything about the question"
        empty = await client.post(
            "/v1/chat/completions", json=chat_body("Hi?", memory={"namespace": "empty"})
        )
        assert "no learned memory" in empty.json()["memory"]["skipped"]
    # memory slow: past the budget, answered without it
    memory.slow_s = 1.0
    try:
        async with asgi_client(app(memory_chat_budget_s=0.3)) as client:
            slow = await client.post(
                "/v1/chat/completions",
                json=chat_body("Naxpry?", memory={"namespace": "ns", "mode": "single_pass"}),
            )
    finally:
        memory.slow_s = 0.0
    assert slow.status_code == 200 and "longer than" in slow.json()["memory"]["skipped"]
    # memory down: answered without it
    closed = free_port()
    async with asgi_client(app(memory_addr=f"127.0.0.1:{closed}")) as client:
        down = await client.post(
            "/v1/chat/completions", json=chat_body("Naxpry?", memory={"namespace": "ns"})
        )
    assert down.status_code == 200 and down.json()["choices"][0]["message"]["content"]
    assert "memory unavailable" in down.json()["memory"]["skipped"] and not down.json()["memory"]["used"]


async def test_chat_memory_option_validation(app):
    async with asgi_client(app()) as client:
        bad = await client.post("/v1/chat/completions", json=chat_body(memory={"namespace": "a b"}))
        assert_error(bad, 400, "invalid_request_error", "memory.namespace")
        bad = await client.post(
            "/v1/chat/completions", json=chat_body(memory={"namespace": "a", "mode": "x"})
        )
        assert_error(bad, 400, "invalid_request_error", "memory.mode")


@pytest.mark.parametrize("speculative", [True, False])
async def test_executive_turns_follow_the_chats_speculative_flag(app, fakes, speculative):
    verifier, _, _ = fakes
    before = set(verifier.requests)
    body = chat_body("Who governs Naxpry?", memory={"namespace": "ns"}, speculative=speculative)
    async with asgi_client(app()) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    executive = [r for i, r in verifier.requests.items() if i not in before and i.startswith("memory-exec-")]
    assert executive and all(r.speculative == speculative for r in executive)
