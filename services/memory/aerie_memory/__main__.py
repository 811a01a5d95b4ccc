"""python -m aerie_memory: serve the Memory gRPC service.

The service is a thin adapter: ingestion, jobs, namespaces and deletes are Redis
transactions (store.py); queries run the namespace's served memory model on one compute
thread (loading it too), so the event loop keeps answering and the process keeps a single
OpenMP team (aerie_common.torch_threads). Learning happens in the worker (worker.py), which this
process runs as a child and restarts when it exits. Health is SERVING only while Redis,
where all memory state lives, answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time

import grpc
import redis
import redis.asyncio as aioredis
from aerie_common.entities import facts_question_entity
from aerie_common.grpc_utils import GrpcService, abort_invalid
from aerie_common.logs import setup_logging
from aerie_common.memory_limits import (
    DEFAULT_DOCUMENTS_PAGE,
    MAX_ANSWER_TOKENS,
    MAX_DOCUMENTS_PAGE,
    MAX_QUESTION_CHARS,
)
from aerie_common.metrics import start_metrics_server
from aerie_common.model_store import pick_device, resolve_model_dir
from aerie_common.redis_client import connect
from aerie_common.torch_threads import compute_thread, set_torch_threads
from aerie_proto.v1 import memory_pb2, memory_pb2_grpc

from aerie_memory.metrics import MemoryCollector
from aerie_memory.models import (
    MemoryCache,
    attribute_sources,
    build_memory,
    load_base,
    merged_answers,
    names_known_entity,
    recall_questions,
)
from aerie_memory.settings import MemorySettings
from aerie_memory.store import MemoryStore, forgetting
from aerie_memory.text import (
    IncomingDocument,
    InvalidInput,
    check_documents,
    check_namespace,
    default_document_id,
    parse_metadata,
    shown,
)
from aerie_memory.training import IDK

log = logging.getLogger("aerie_memory")
SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name
# What MemoryStore names jobs. Another id could name another of a job's Redis keys.
JOB_ID_RE = re.compile(r"job-[0-9a-f]{16}")


def job_to_proto(job) -> memory_pb2.Job:
    return memory_pb2.Job(
        job_id=job.job_id,
        namespace=job.namespace,
        status=job.status,
        stage=job.stage,
        done=job.done,
        total=job.total,
        errors=job.errors,
        kind=job.kind,
        document_ids=job.document_ids,
        step_yields=[memory_pb2.StepYield(**s) for s in job.step_yields],
        model_version=job.model_version,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        training_examples=job.training_examples,
        train_loss=job.train_loss,
        replayed_examples=job.replayed_examples,
        superseded_adapters=job.superseded_adapters,
    )


def version_to_proto(v) -> memory_pb2.ModelVersion:
    return memory_pb2.ModelVersion(
        version=v.version,
        created_at=v.created_at,
        adapters=[a["id"] for a in v.adapters],
        ties_density=v.ties_density,
        reason=v.reason,
    )


def _stored(document: dict) -> memory_pb2.StoredDocument:
    """A document as the store describes it (``MemoryStore.documents``)."""
    fields = {k: v for k, v in document.items() if k != "metadata"}
    return memory_pb2.StoredDocument(**fields, metadata_json=json.dumps(document["metadata"]))


def knows(text: str) -> bool:
    lowered = text.strip().lower()
    return bool(lowered) and "don't know" not in lowered and "do not know" not in lowered


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    def __init__(self, settings: MemorySettings, store: MemoryStore):
        self.settings = settings
        self.store = store
        self.root = settings.model_cache / "memory"
        self.cache = MemoryCache(settings.memory_loaded_models)
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self.compute = compute_thread("memory-compute")
        # Counts for /metrics (aerie_memory.metrics)
        self.queries = {True: 0, False: 0}  # by whether the memory knew
        self.query_seconds = 0.0
        self.documents_ingested = {"accepted": 0, "duplicate": 0}

    async def _check(self, context, check, *args):
        """Run an input ``check`` (its result returned): what it refuses is the caller's to
        fix (INVALID_ARGUMENT)."""
        try:
            return check(*args)
        except InvalidInput as exc:
            await abort_invalid(context, str(exc), exc.param)

    async def Ingest(self, request, context):
        docs = [
            IncomingDocument(
                d.id or default_document_id(d.text),
                d.text,
                await self._check(context, parse_metadata, d.metadata_json, f"documents[{i}].metadata"),
            )
            for i, d in enumerate(request.documents)
        ]
        await self._check(context, check_namespace, request.namespace)
        limits = (self.settings.memory_max_documents, self.settings.memory_max_document_chars)
        await self._check(context, check_documents, docs, *limits)
        outcome = await self.store.ingest(request.namespace, docs, self.settings.memory_chunk_chars)
        for status in outcome.statuses:
            self.documents_ingested[status.status] += 1
        log.info(
            "ingest %s: %d documents, job %s",
            request.namespace,
            len(docs),
            outcome.job_id or "none (all duplicates)",
        )
        return memory_pb2.IngestResponse(
            job_id=outcome.job_id,
            documents=[memory_pb2.DocumentStatus(**status._asdict()) for status in outcome.statuses],
        )

    async def GetJob(self, request, context):
        job = await self.store.get_job(request.job_id) if JOB_ID_RE.fullmatch(request.job_id) else None
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {shown(request.job_id)}")
        return job_to_proto(job)

    async def GetNamespace(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        stats = await self.store.namespace_stats(request.namespace)
        return memory_pb2.NamespaceStats(
            namespace=request.namespace,
            documents=stats["documents"],
            chunks=stats["chunks"],
            reflections=stats["reflections"],
            jobs=stats["jobs"],
            current_version=stats["current_version"],
            versions=[version_to_proto(v) for v in stats["versions"]],
            exists=stats["exists"],
        )

    async def DeleteDocument(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        current = await self.store.current_version(request.namespace)
        result = await self.store.delete_document(request.namespace, request.document_id)
        if result is None:
            return memory_pb2.DeleteDocumentResponse(
                deleted=False,
                detail=f"no document {shown(request.document_id)} in namespace {request.namespace!r}",
            )
        job_id, h = result
        actions = {
            a["id"]: forgetting(a, {(request.document_id, h)}) for a in (current.adapters if current else [])
        }
        affected = [a for a in current.adapters if actions[a["id"]] != "keep"] if current else []
        if not affected:
            method = "not_learned"
            detail = (
                "The document was removed; no served memory version has learned it yet, and the job "
                f"{job_id} makes sure a job still learning it does not keep it."
            )
        elif all(actions[a["id"]] == "drop" for a in affected):
            method = "drop_adapter"
            detail = (
                f"The adapter that learned only this document ({', '.join(a['id'] for a in affected)}) is "
                f"removed and the remaining adapters TIES-merged into a new version by job {job_id}, "
                "which then erases every adapter that learned or rehearsed it, weights and reflections; "
                "until it succeeds the current version still holds the document."
            )
        else:
            method = "retrain_adapter"
            detail = (
                f"The adapters that learned or rehearsed it ({', '.join(a['id'] for a in affected)}) are "
                f"retrained by job {job_id} on their reflections minus those from this document (an adapter "
                "left with none of its own is removed), then TIES-merged into a new version, and the "
                "adapters that held it are erased, weights and reflections; until it succeeds the "
                "current version still holds the document."
            )
        return memory_pb2.DeleteDocumentResponse(
            deleted=True,
            job_id=job_id,
            method=method,
            affected_jobs=[a["id"] for a in affected],
            detail=detail,
        )

    async def DeleteNamespace(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        if not await self.store.has_namespace(request.namespace):
            return memory_pb2.DeleteNamespaceResponse(
                exists=False, detail=f"no namespace {request.namespace!r}"
            )
        forgotten = await self.store.delete_documents(request.namespace)
        if forgotten is None:  # nothing to forget
            await self.store.remove_namespace(request.namespace)
            return memory_pb2.DeleteNamespaceResponse(
                exists=True, detail="The namespace held no document and is removed."
            )
        job_id, gone = forgotten
        return memory_pb2.DeleteNamespaceResponse(
            exists=True,
            documents=len(gone),
            job_id=job_id,
            detail=(
                f"{len(gone)} document{'s' if len(gone) != 1 else ''} and {'their' if len(gone) != 1 else 'its'} "
                f"text removed; job {job_id} drops every adapter that learned them, erases the "
                "adapters' weights and reflections, and removes the namespace (until it succeeds the "
                "current version still holds them; documents sent meanwhile keep the namespace)."
            ),
        )

    async def Rollback(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        try:
            await self.store.rollback(request.namespace, request.version)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return await self.GetNamespace(memory_pb2.GetNamespaceRequest(namespace=request.namespace), context)

    async def ListNamespaces(self, request, context):
        return memory_pb2.ListNamespacesResponse(
            namespaces=[memory_pb2.NamespaceSummary(**n) for n in await self.store.namespaces()]
        )

    async def ListDocuments(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        if not 0 <= request.limit <= MAX_DOCUMENTS_PAGE:
            await abort_invalid(
                context, f"limit {request.limit} is out of range: 1 to {MAX_DOCUMENTS_PAGE}", "limit"
            )
        if not await self.store.has_namespace(request.namespace):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no namespace {request.namespace!r}")
        documents, next_after = await self.store.documents(
            request.namespace, request.after, request.limit or DEFAULT_DOCUMENTS_PAGE
        )
        return memory_pb2.ListDocumentsResponse(
            documents=[_stored(d) for d in documents], next_after=next_after
        )

    async def GetDocument(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        document = await self.store.document(request.namespace, request.document_id)
        if document is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no document {shown(request.document_id)} in namespace {request.namespace!r}",
            )
        return _stored(document)

    def _base_loader(self):
        model_dir = resolve_model_dir(self.settings.memory_base_model, self.settings.model_cache)
        return load_base(model_dir, pick_device("auto"))

    async def _memory(self, namespace: str):
        version = await self.store.current_version(namespace)
        if version is None or not version.adapters:
            return None  # nothing learned (or everything forgotten): the memory knows nothing
        loaded = self.cache.get(namespace, version.version)
        if loaded is not None:
            return loaded
        key = (namespace, version.version)
        if key not in self._loading:  # one load per version, however many queries wait
            self._loading[key] = asyncio.get_running_loop().run_in_executor(
                self.compute,
                build_memory,
                self._base_loader,
                self.root,
                namespace,
                version,
                self.settings.memory_recent_answers,
            )
        try:
            loaded = await self._loading[key]
        except FileNotFoundError:
            # A forget job served a newer version and erased this one's adapters meanwhile.
            if await self.store.current_version_id(namespace) == version.version:
                raise
            return await self._memory(namespace)
        finally:
            self._loading.pop(key, None)
        self.cache.put(namespace, loaded)
        return loaded

    def _default_answer_tokens(self, question: str) -> int:
        """The answer's length where a query sets none: an entity's passage question ("What
        do you know about X?") as long as its passage was trained to be
        (AERIE_MEMORY_MAX_SEQ_TOKENS), so that it is not cut; another question
        AERIE_MEMORY_QUERY_MAX_TOKENS."""
        if facts_question_entity(question) is not None:
            return min(self.settings.memory_max_seq_tokens, MAX_ANSWER_TOKENS)
        return self.settings.memory_query_max_tokens

    async def Query(self, request, context):
        reply = await self._query(request, context)
        self.queries[reply.knows] += 1
        self.query_seconds += reply.seconds
        return reply

    async def _query(self, request, context):
        await self._check(context, check_namespace, request.namespace)
        question = request.question.strip()
        if not question or len(question) > MAX_QUESTION_CHARS:
            await abort_invalid(context, f"question must hold 1-{MAX_QUESTION_CHARS} characters", "question")
        if not 0 <= request.max_tokens <= MAX_ANSWER_TOKENS:
            await abort_invalid(
                context,
                f"max_tokens must be 0 (the default) to {MAX_ANSWER_TOKENS}, got {request.max_tokens}",
                "max_tokens",
            )
        started = time.monotonic()
        memory = await self._memory(request.namespace)
        if memory is None:
            if not await self.store.has_namespace(request.namespace):
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no namespace {request.namespace!r}")
            return memory_pb2.QueryResponse(answer=IDK, knows=False, seconds=time.monotonic() - started)
        questions = recall_questions(question, memory.passages, memory.passage_words)
        if not questions or not names_known_entity(questions[0], memory.learned_text):
            return memory_pb2.QueryResponse(
                answer=IDK, knows=False, model_version=memory.version, seconds=time.monotonic() - started
            )
        max_tokens = request.max_tokens or self._default_answer_tokens(question)

        def run() -> tuple[str, bool]:
            with memory.lock:  # one generation at a time per loaded model
                recalled = [memory.recall(q, max_tokens) for q in questions]
            answers = [text for text, _ in recalled]
            return merged_answers([a for a in answers if knows(a)]) or answers[0], all(
                kept for _, kept in recalled
            )

        text, cached = await asyncio.get_running_loop().run_in_executor(self.compute, run)
        known = knows(text)
        sources = attribute_sources(" ".join(questions), text, memory.reflections) if known else []
        return memory_pb2.QueryResponse(
            answer=text,
            sources=sources,
            model_version=memory.version,
            knows=known,
            seconds=time.monotonic() - started,
            cached=cached,
        )


async def watch_redis(service: GrpcService, client: aioredis.Redis, interval_s: float = 2.0) -> None:
    """Keep gRPC health in step with Redis reachability."""
    serving = None
    while True:
        try:
            ok = bool(await asyncio.wait_for(client.ping(), timeout=interval_s))
        except Exception:  # any failure to reach Redis means not serving
            ok = False
        if ok != serving:
            log.info("redis %s", "reachable: SERVING" if ok else "unreachable: NOT_SERVING")
            await service.set_serving(ok)
            serving = ok
        await asyncio.sleep(interval_s)


class WorkerSupervisor:
    """Runs ``python -m aerie_memory.worker`` as a child and restarts it when it exits
    (killed included); its stdout/stderr are this process's."""

    def __init__(self):
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False

    async def run(self) -> None:
        backoff = 1.0
        while not self.stopping:
            started = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aerie_memory.worker", env=dict(os.environ)
            )
            log.info("worker started (pid %d)", self.proc.pid)
            code = await self.proc.wait()
            if self.stopping:
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            log.warning("worker exited with %s; restarting in %.0fs", code, backoff)
            await asyncio.sleep(backoff)

    async def stop(self, timeout_s: float) -> None:
        self.stopping = True
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("worker still busy after %.0fs: killed; its job resumes at the next start", timeout_s)
            self.proc.kill()
            await self.proc.wait()


async def serve(settings: MemorySettings) -> None:
    set_torch_threads(settings.memory_torch_threads)
    client = connect(settings.redis_url)
    store = MemoryStore(client)
    servicer = MemoryServicer(settings, store)
    service = GrpcService(lambda s: memory_pb2_grpc.add_MemoryServicer_to_server(servicer, s), [SERVICE_NAME])
    port = await service.start(settings.memory_host, settings.memory_port)
    metrics_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0)
    start_metrics_server(
        MemoryCollector(servicer, metrics_client), settings.memory_host, settings.memory_metrics_port
    )
    log.info("serving on %s:%d (redis %s)", settings.memory_host, port, settings.redis_url)
    watcher = asyncio.create_task(watch_redis(service, client))
    supervisor = WorkerSupervisor()
    worker_task = asyncio.create_task(supervisor.run()) if settings.memory_worker_enabled else None
    try:
        await service.wait_for_signal()
        # The worker drains alongside the server: it takes no new job and finishes the one
        # it has if it can in time; otherwise that job resumes from its last stage.
        await asyncio.gather(
            service.drain(settings.drain_timeout_s), supervisor.stop(settings.drain_timeout_s)
        )
    finally:
        metrics_client.close()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if worker_task is not None:
            await supervisor.stop(settings.drain_timeout_s)
            worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker_task
        await client.aclose()


def main() -> None:
    settings = MemorySettings()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
