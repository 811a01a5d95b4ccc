"""HTTP routes of the memory (MEMO) over the memory service's gRPC API:

    POST   /memory/ingest                      -> 202 {job_id, documents: [{id, status}]}
    GET    /memory/jobs/{job_id}               -> status, stage, progress, errors, per-step yields
    GET    /memory/namespaces                  -> [{namespace, documents, current_version}] the key may use
    GET    /memory/namespaces/{ns}             -> stats and model versions
    GET    /memory/namespaces/{ns}/documents   -> a page of its documents by id (?limit=&after=)
    DELETE /memory/namespaces/{ns}             -> forget all of it, then remove it; says how
    POST   /memory/namespaces/{ns}/rollback    -> serve an earlier version again
    GET    /memory/documents/{id}?namespace=   -> the document, its text and whether it is learned
    DELETE /memory/documents/{id}?namespace=   -> forget a document; says how
    POST   /memory/query                       -> {answer, sources, model_version, knows}

Errors use the gateway's OpenAI-style envelope; the memory service's INVALID_ARGUMENT
(limits, charset) is a 400.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any

import grpc
from aerie_common.grpc_utils import invalid_param
from aerie_common.memory_limits import (
    DEFAULT_DOCUMENTS_PAGE,
    MAX_ANSWER_TOKENS,
    MAX_DOCUMENTS_PAGE,
    MAX_QUESTION_CHARS,
)
from aerie_proto.v1 import memory_pb2
from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict
from pydantic import ConfigDict, Field, field_validator

from .auth import NAMESPACE_PATTERN, ApiKey
from .backends import Backends
from .errors import APIError, invalid_request, service_unavailable
from .rate_limit import AdmittedKey, admitted_key
from .schemas import RequestBody, Scalar, StrictModel
from .settings import GatewaySettings

log = logging.getLogger(__name__)

PREFIX = "/memory"
INGEST_PATH = f"{PREFIX}/ingest"  # the body size limit gives it more room than other routes
# Job ids are "job-" and hex; nothing else may reach the memory's Redis key of a job.
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_TEXT_FIELDS = {
    "job_id",
    "namespace",
    "answer",
    "sources",
    "document_ids",
    "errors",
    "model_version",
    "current_version",
    "detail",
    "affected_jobs",
    "version",
    "stage",
    "status",
    "kind",
    "method",
    "id",
    "content_hash",
    "next_after",
    "text",
    "metadata_json",
}


class IngestDocument(StrictModel):
    model_config = ConfigDict(extra="forbid")

    # None: the memory names it by its content ("doc-" and 16 hex digits of its hash)
    id: str | None = Field(default=None, min_length=1, max_length=128)
    text: str
    metadata: dict[str, Scalar] = Field(default_factory=dict)


class IngestBody(RequestBody):
    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    documents: list[IngestDocument] = Field(min_length=1)


class QueryBody(RequestBody):
    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_ANSWER_TOKENS)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question must not be blank")
        return value


class RollbackBody(RequestBody):
    model_config = ConfigDict(extra="forbid")

    version: str = ""


def memory_error(err: grpc.aio.AioRpcError) -> APIError:
    code, details = err.code(), err.details() or err.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid_request(details, param=invalid_param(err))
    if code == grpc.StatusCode.NOT_FOUND:
        return APIError(404, details, "invalid_request_error", code="not_found")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return APIError(409, details, "invalid_request_error", code="conflict")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
        return service_unavailable(f"The memory service is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, "The memory service did not answer in time.", "timeout_error", code="timeout")
    log.error("memory call failed: %s %r", code.name, details)
    return APIError(500, f"The memory service failed: {details}", "server_error", code="internal_error")


def _ints(value: Any) -> Any:
    """MessageToDict writes int64 as JSON strings (proto3 JSON mapping); counts are numbers here."""
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    return value


def _dict(message) -> dict[str, Any]:
    raw = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    # Only numeric fields are converted: ids and texts stay strings even when all digits.
    numeric = _ints({k: v for k, v in raw.items() if k not in _TEXT_FIELDS})
    return {**raw, **numeric} if isinstance(numeric, dict) else raw


def _document(message: memory_pb2.StoredDocument) -> dict[str, Any]:
    """A stored document with its metadata as sent (the proto carries it as JSON)."""
    document = _dict(message)
    document["metadata"] = json.loads(document.pop("metadata_json") or "{}")
    return document


# A page of a namespace's documents: how many, and the id it starts after
PageLimit = Annotated[int, Query(ge=1, le=MAX_DOCUMENTS_PAGE)]
PageAfter = Annotated[str, Query(max_length=128)]


def build_router(backends: Backends, settings: GatewaySettings) -> APIRouter:
    """Every route is authenticated and rate-limited (admitted_key), and checks that the
    caller's key may use the namespace the request names."""
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(admitted_key)], tags=["memory"])
    timeout = settings.memory_timeout_s

    async def call(method, request):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise memory_error(err) from err

    def check_namespace(namespace: str, key: ApiKey) -> None:
        """A namespace named in the path or query: valid (400, before any permission check),
        and one ``key`` may use (403)."""
        if not re.fullmatch(NAMESPACE_PATTERN, namespace):  # re.match's $ would allow a final newline
            raise invalid_request(
                f"namespace {namespace!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ -",
                param="namespace",
            )
        key.check_namespace(namespace)

    def no_namespace(namespace: str) -> APIError:
        return APIError(404, f"No namespace {namespace!r}.", "invalid_request_error", code="not_found")

    @router.post(INGEST_PATH.removeprefix(PREFIX), status_code=202)
    async def ingest(body: IngestBody, key: AdmittedKey) -> JSONResponse:
        key.check_namespace(body.namespace)
        request = memory_pb2.IngestRequest(
            namespace=body.namespace,
            documents=[
                memory_pb2.Document(
                    id=d.id or "", text=d.text, metadata_json=json.dumps(d.metadata) if d.metadata else ""
                )
                for d in body.documents
            ],
        )
        reply = await call(backends.memory.Ingest, request)
        return JSONResponse(
            {
                "job_id": reply.job_id or None,
                "documents": [
                    {"id": d.id, "status": d.status, "duplicate_of": d.duplicate_of or None}
                    for d in reply.documents
                ],
            },
            status_code=202,
        )

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str, key: AdmittedKey) -> JSONResponse:
        if not re.fullmatch(JOB_ID_PATTERN, job_id):
            # Not a job id, so no job (as the memory service answers too); shown shortened.
            shown = job_id if len(job_id) <= 80 else f"{job_id[:80]}..."
            raise APIError(404, f"No job {shown!r}.", "invalid_request_error", code="not_found")
        job = await call(backends.memory.GetJob, memory_pb2.GetJobRequest(job_id=job_id))
        key.check_namespace(job.namespace)
        body = _dict(job)
        body["progress"] = {"done": job.done, "total": job.total}
        return JSONResponse(body)

    @router.get("/namespaces/{namespace}")
    async def get_namespace(namespace: str, key: AdmittedKey) -> JSONResponse:
        check_namespace(namespace, key)
        stats = await call(backends.memory.GetNamespace, memory_pb2.GetNamespaceRequest(namespace=namespace))
        if not stats.exists:
            raise no_namespace(namespace)
        return JSONResponse(_dict(stats))

    @router.get("/namespaces")
    async def list_namespaces(key: AdmittedKey) -> JSONResponse:
        reply = await call(backends.memory.ListNamespaces, memory_pb2.ListNamespacesRequest())
        return JSONResponse({"namespaces": [_dict(n) for n in reply.namespaces if key.may_use(n.namespace)]})

    @router.delete("/namespaces/{namespace}")
    async def delete_namespace(namespace: str, key: AdmittedKey) -> JSONResponse:
        check_namespace(namespace, key)
        request = memory_pb2.DeleteNamespaceRequest(namespace=namespace)
        reply = await call(backends.memory.DeleteNamespace, request)
        if not reply.exists:
            raise no_namespace(namespace)
        return JSONResponse(
            {"documents": reply.documents, "job_id": reply.job_id or None, "detail": reply.detail}
        )

    @router.get("/namespaces/{namespace}/documents")
    async def list_documents(
        namespace: str, key: AdmittedKey, limit: PageLimit = DEFAULT_DOCUMENTS_PAGE, after: PageAfter = ""
    ) -> JSONResponse:
        return await documents_page(namespace, key, limit, after)

    # The same page where the document routes are: /memory/documents?namespace=... (a
    # trailing slash too, which the document route below would read as a document named "")
    @router.get("/documents")
    @router.get("/documents/", include_in_schema=False)
    async def list_documents_by_query(
        namespace: Annotated[str, Query()],
        key: AdmittedKey,
        limit: PageLimit = DEFAULT_DOCUMENTS_PAGE,
        after: PageAfter = "",
    ) -> JSONResponse:
        return await documents_page(namespace, key, limit, after)

    async def documents_page(namespace: str, key: ApiKey, limit: int, after: str) -> JSONResponse:
        check_namespace(namespace, key)
        request = memory_pb2.ListDocumentsRequest(namespace=namespace, limit=limit, after=after)
        reply = await call(backends.memory.ListDocuments, request)
        documents = []
        for document in reply.documents:
            listed = _document(document)
            del listed["text"]  # a listing carries no texts; GET /memory/documents/{id} does
            documents.append(listed)
        return JSONResponse({"documents": documents, "next_after": reply.next_after or None})

    @router.post("/namespaces/{namespace}/rollback")
    async def rollback(namespace: str, key: AdmittedKey, body: RollbackBody | None = None) -> JSONResponse:
        check_namespace(namespace, key)
        request = memory_pb2.RollbackRequest(namespace=namespace, version=body.version if body else "")
        return JSONResponse(_dict(await call(backends.memory.Rollback, request)))

    @router.get("/documents/{document_id:path}")
    async def get_document(
        document_id: str, namespace: Annotated[str, Query()], key: AdmittedKey
    ) -> JSONResponse:
        check_namespace(namespace, key)
        request = memory_pb2.GetDocumentRequest(namespace=namespace, document_id=document_id)
        return JSONResponse(_document(await call(backends.memory.GetDocument, request)))

    @router.delete("/documents/{document_id:path}")
    async def delete_document(
        document_id: str, namespace: Annotated[str, Query()], key: AdmittedKey
    ) -> JSONResponse:
        check_namespace(namespace, key)
        if not document_id:
            raise APIError(
                400,
                "Name the document: DELETE /memory/documents/{id}?namespace=...; "
                "DELETE /memory/namespaces/{namespace} forgets every document.",
                "invalid_request_error",
                param="document_id",
            )
        reply = await call(
            backends.memory.DeleteDocument,
            memory_pb2.DeleteDocumentRequest(namespace=namespace, document_id=document_id),
        )
        if not reply.deleted:
            raise APIError(404, reply.detail, "invalid_request_error", code="not_found")
        return JSONResponse(_dict(reply))

    @router.post("/query")
    async def query(body: QueryBody, key: AdmittedKey) -> JSONResponse:
        key.check_namespace(body.namespace)
        request = memory_pb2.QueryRequest(
            namespace=body.namespace, question=body.question, max_tokens=body.max_tokens or 0
        )
        return JSONResponse(_dict(await call(backends.memory.Query, request)))

    return router
