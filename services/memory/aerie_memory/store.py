"""Everything the memory keeps in Redis (AOF on): documents, chunks, reflections, jobs,
model versions, and the job stream the workers consume.

Keys (all under ``aerie:mem:``):

- ``namespaces``                      set of namespace names (removed by ``remove_namespace``)
- ``ns:{ns}:docs``                    hash doc id -> content hash (documents known now)
- ``ns:{ns}:hashes``                  hash content hash -> doc id (dedup)
- ``ns:{ns}:forgotten``               set of content hashes deleted (no rollback serves them again)
- ``ns:{ns}:erased``                  set of adapter ids whose weights were erased by forgetting
- ``doc:{ns}:{id}``                   hash characters, metadata (json), hash, job_id, chunks (how
                                      many); before session 42 also its text and the chunks' json list
- ``text:{ns}:{hash}``                a document's text, which jobs learn, until deleted or replaced
- ``ns:{ns}:jobs``                    list of job ids, oldest first
- ``job:{id}``                        hash: the job's state (see ``Job`` in memory.proto)
- ``job:{id}:reflections``            json list of the job's reflections (with provenance), less
                                      those of documents deleted since
- ``ns:{ns}:versions``                list of model versions (json), oldest first
- ``ns:{ns}:current``                 the served version's id
- ``ns:{ns}:version_seq``             counter for version ids
- ``jobs``                            the job stream; consumer group ``workers``

Ingest, delete and version swaps are MULTI/EXEC transactions guarded by WATCH, so a job is
queued in the same transaction that accepts its documents: nothing accepted is lost.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import ResponseError, WatchError

from aerie_memory.text import IncomingDocument, chunk_text, shown

P = "aerie:mem:"
STREAM = P + "jobs"
GROUP = "workers"
# Finished jobs, for the service's metrics (aerie_memory.metrics): "{kind}:{status}:count"
# and "{kind}:{status}:seconds" (from queueing to the end)
JOB_METRICS = P + "metrics:jobs"
_JSON_FIELDS = ("errors", "document_ids", "documents", "forget", "step_yields")


def _k(*parts: str) -> str:
    return P + ":".join(parts)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunk_count(raw: str | bytes | None) -> int:
    """A document's stored "chunks": their count, or (stored before session 42) their list."""
    raw = _s(raw) if raw is not None else "0"
    return len(json.loads(raw)) if raw.startswith("[") else int(raw or 0)


class DocumentStatus(NamedTuple):
    id: str
    status: str  # "accepted" | "duplicate"
    duplicate_of: str = ""  # a duplicate's: the document holding its text (itself, if unchanged)


@dataclass
class IngestOutcome:
    job_id: str
    statuses: list[DocumentStatus]


def sort_ingest(
    hashed: list[tuple[IncomingDocument, str]], known_docs: dict[str, str], known_hashes: dict[str, str]
) -> tuple[list[DocumentStatus], list[tuple[IncomingDocument, str]], list[dict[str, str]]]:
    """A request's documents, each with its content hash, sorted against the namespace's
    documents (id -> hash) and texts (hash -> id): the status of each, the documents
    accepted, and the (id, old hash) texts they replace. A text the namespace holds is a
    duplicate of the document holding it, unless that document is given another text in the
    same request (two ids swapping texts). Every document given a new text is first taken to
    free its old one, and those found duplicates free nothing, until that settles. A text
    sent twice in the request is learned once, under the first id."""
    holder = {h: owner for h, owner in known_hashes.items() if known_docs.get(owner) == h}
    # ids taken to be accepted with a new text, so that their old one is free
    replaced = {doc.id for doc, h in hashed if known_docs.get(doc.id, h) != h}
    while True:
        statuses, accepted, first_sent = [], [], {}
        for doc, h in hashed:
            if h in holder and holder[h] not in replaced:
                statuses.append(DocumentStatus(doc.id, "duplicate", holder[h]))
            elif h in first_sent:
                statuses.append(DocumentStatus(doc.id, "duplicate", first_sent[h]))
            else:
                first_sent[h] = doc.id
                statuses.append(DocumentStatus(doc.id, "accepted"))
                accepted.append((doc, h))
        updated = {doc.id for doc, _ in accepted if doc.id in known_docs}
        if updated == replaced:
            forget = [
                {"doc_id": doc.id, "hash": known_docs[doc.id]} for doc, _ in accepted if doc.id in updated
            ]
            return statuses, accepted, forget
        replaced = updated


def _job_fields(**fields: Any) -> dict[str, str]:
    """A job's fields as its Redis hash holds them."""
    return {k: (json.dumps(v) if k in _JSON_FIELDS else str(v)) for k, v in fields.items()}


def held(adapter: dict) -> set[tuple[str, str]]:
    """The (doc id, content hash) of every document an adapter learned or rehearsed."""
    return {(doc_id, h) for doc_id, h in (*adapter["docs"], *adapter.get("replayed_docs", []))}


def forgetting(adapter: dict, gone: set[tuple[str, str]]) -> str:
    """What forgetting the documents ``gone`` ((id, hash)) does to an adapter of a version:
    "keep" (it holds none of them), "drop" (every document it learned is gone; what it
    rehearsed lives on in the adapters that learned it) or "retrain" (on its reflections
    minus those citing them)."""
    own = {tuple(d) for d in adapter["docs"]}
    if not held(adapter) & gone:
        return "keep"
    return "drop" if own <= gone else "retrain"


@dataclass
class Version:
    version: str
    created_at: float
    # {"id", "docs": [[doc_id, hash], ...], "reflections": n, "replayed_docs": [...], "replayed": n,
    # "supersedes": [adapter id, ...]}: the documents the adapter learned (its own job's, and
    # those of the adapters it superseded), those whose reflections it rehearsed (replay), and
    # the adapters it replaced.
    adapters: list[dict]
    ties_density: float
    reason: str
    ties_lambda: float = 1.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Version:
        return cls(**json.loads(raw))


@dataclass
class JobState:
    job_id: str
    namespace: str
    kind: str = "ingest"
    status: str = "queued"
    stage: str = "queued"
    done: int = 0
    total: int = 0
    errors: list[str] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    documents: list[dict] = field(default_factory=list)  # [{"id", "hash"}] to learn
    forget: list[dict] = field(default_factory=list)  # [{"doc_id", "hash"}] to unlearn
    step_yields: list[dict] = field(default_factory=list)
    model_version: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    attempts: int = 0
    training_examples: int = 0
    train_loss: float = 0.0
    replayed_examples: int = 0
    superseded_adapters: int = 0  # served adapters the new one rehearsed in full, merged no more

    def forgotten(self) -> set[tuple[str, str]]:
        """The (doc id, content hash) this job unlearns."""
        return {(f["doc_id"], f["hash"]) for f in self.forget}

    def to_redis(self) -> dict[str, str]:
        out = {}
        for key, value in self.__dict__.items():
            out[key] = json.dumps(value) if key in _JSON_FIELDS else str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict) -> JobState:
        data = {_s(k): _s(v) for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in data:
                continue
            value = data[name]
            if name in _JSON_FIELDS:
                kwargs[name] = json.loads(value)
            elif f.type == "int":
                kwargs[name] = int(float(value))
            elif f.type == "float":
                kwargs[name] = float(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)


class MemoryStore:
    def __init__(self, client: aioredis.Redis):
        self.r = client

    # --- the stream ----------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- ingest ----------------------------------------------------------------------------

    async def ingest(
        self, namespace: str, documents: list[IncomingDocument], chunk_chars: int
    ) -> IngestOutcome:
        docs_key, hashes_key = _k("ns", namespace, "docs"), _k("ns", namespace, "hashes")
        hashed = [(doc, doc.hash) for doc in documents]
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(docs_key, hashes_key)
                    known_docs = {_s(k): _s(v) for k, v in (await pipe.hgetall(docs_key)).items()}
                    known_hashes = {_s(k): _s(v) for k, v in (await pipe.hgetall(hashes_key)).items()}
                    # same id, new text: an update, whose job unlearns the old text
                    statuses, accepted, forget = sort_ingest(hashed, known_docs, known_hashes)
                    if not accepted:
                        await pipe.reset()
                        return IngestOutcome("", statuses)
                    job = JobState(
                        job_id=f"job-{uuid.uuid4().hex[:16]}",
                        namespace=namespace,
                        document_ids=[d.id for d, _ in accepted],
                        documents=[{"id": d.id, "hash": h} for d, h in accepted],
                        forget=forget,
                        created_at=time.time(),
                    )
                    pipe.multi()
                    pipe.sadd(_k("namespaces"), namespace)
                    for item in forget:
                        pipe.hdel(hashes_key, item["hash"])
                        pipe.delete(_k("text", namespace, item["hash"]))
                    for doc, h in accepted:
                        pipe.hset(docs_key, doc.id, h)
                        pipe.hset(hashes_key, h, doc.id)
                        pipe.delete(_k("doc", namespace, doc.id))
                        pipe.hset(
                            _k("doc", namespace, doc.id),
                            mapping={
                                "characters": len(doc.text),
                                "metadata": json.dumps(doc.metadata),
                                "hash": h,
                                "job_id": job.job_id,
                                "chunks": len(chunk_text(doc.text, chunk_chars)),
                            },
                        )
                        # The document's text, under its hash: a job still queued learns the
                        # text it was given (or none, once replaced or deleted).
                        pipe.set(_k("text", namespace, h), doc.text)
                    pipe.hset(_k("job", job.job_id), mapping=job.to_redis())
                    pipe.rpush(_k("ns", namespace, "jobs"), job.job_id)
                    pipe.xadd(STREAM, {"job_id": job.job_id})
                    await pipe.execute()
                    return IngestOutcome(job.job_id, statuses)
                except WatchError:
                    continue

    async def delete_document(self, namespace: str, doc_id: str) -> tuple[str, str] | None:
        """Forget a document: returns (forget job id, its content hash), or None if unknown."""
        forgotten = await self.delete_documents(namespace, [doc_id])
        return None if forgotten is None else (forgotten[0], forgotten[1][0][1])

    async def delete_documents(
        self, namespace: str, doc_ids: list[str] | None = None
    ) -> tuple[str, list[tuple[str, str]]] | None:
        """Forget the documents ``doc_ids`` (None: every one, and every text the served
        version learned, an updated document's old text included) in one forget job: their
        texts are erased now, their knowledge by the job, and no rollback serves it again.
        Returns (the job's id, [(doc id, content hash)] of the documents removed), or None if
        there was nothing to forget."""
        docs_key, hashes_key = _k("ns", namespace, "docs"), _k("ns", namespace, "hashes")
        served = await self.current_version(namespace) if doc_ids is None else None
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(docs_key, hashes_key)
                    known = {_s(k): _s(v) for k, v in (await pipe.hgetall(docs_key)).items()}
                    removed = [
                        (i, known[i]) for i in (sorted(known) if doc_ids is None else doc_ids) if i in known
                    ]
                    learned = set().union(*map(held, served.adapters if served else []))
                    gone = removed + sorted(learned - set(removed))
                    if not gone:
                        await pipe.reset()
                        return None
                    job = JobState(
                        job_id=f"job-{uuid.uuid4().hex[:16]}",
                        namespace=namespace,
                        kind="forget" if doc_ids is not None else "delete_namespace",
                        document_ids=[i for i, _ in removed],
                        forget=[{"doc_id": i, "hash": h} for i, h in gone],
                        created_at=time.time(),
                    )
                    pipe.multi()
                    for doc_id, h in gone:
                        if known.get(doc_id) == h:
                            pipe.hdel(docs_key, doc_id)
                            pipe.hdel(hashes_key, h)
                            pipe.delete(_k("doc", namespace, doc_id))
                        pipe.delete(_k("text", namespace, h))
                        pipe.sadd(_k("ns", namespace, "forgotten"), h)
                    pipe.hset(_k("job", job.job_id), mapping=job.to_redis())
                    pipe.rpush(_k("ns", namespace, "jobs"), job.job_id)
                    pipe.xadd(STREAM, {"job_id": job.job_id})
                    await pipe.execute()
                    return job.job_id, removed
                except WatchError:
                    continue

    async def remove_namespace(self, namespace: str) -> bool:
        """Remove a namespace that holds no document and serves no adapter (a namespace
        delete's job has forgotten everything): its versions, job list and bookkeeping go;
        its jobs stay readable by id. False if it holds something (sent since) or is unknown."""
        docs_key, current_key = _k("ns", namespace, "docs"), _k("ns", namespace, "current")
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(docs_key, current_key)
                    served = await self.current_version(namespace)  # a swap since fails the transaction
                    if (
                        await pipe.hlen(docs_key)
                        or (served and served.adapters)
                        or not await pipe.sismember(_k("namespaces"), namespace)
                    ):
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.srem(_k("namespaces"), namespace)
                    pipe.delete(
                        *(
                            _k("ns", namespace, key)
                            for key in (
                                "docs",
                                "hashes",
                                "forgotten",
                                "erased",
                                "jobs",
                                "versions",
                                "current",
                                "version_seq",
                            )
                        )
                    )
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    # --- documents -------------------------------------------------------------------------

    async def active_hash(self, namespace: str, doc_id: str) -> str | None:
        h = await self.r.hget(_k("ns", namespace, "docs"), doc_id)
        return None if h is None else _s(h)

    async def text_of(self, namespace: str, h: str) -> str | None:
        text = await self.r.get(_k("text", namespace, h))
        return None if text is None else _s(text)

    async def has_namespace(self, namespace: str) -> bool:
        return bool(await self.r.sismember(_k("namespaces"), namespace))

    async def namespaces(self) -> list[dict[str, Any]]:
        """Every namespace by name: {"namespace", "documents", "current_version"}."""
        names = sorted(_s(n) for n in await self.r.smembers(_k("namespaces")))
        async with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hlen(_k("ns", name, "docs"))
                pipe.get(_k("ns", name, "current"))
            counts_and_versions = await pipe.execute()
        return [
            {"namespace": name, "documents": count, "current_version": "" if current is None else _s(current)}
            for name, count, current in zip(
                names, counts_and_versions[::2], counts_and_versions[1::2], strict=True
            )
        ]

    async def documents(
        self, namespace: str, after: str = "", limit: int = 100
    ) -> tuple[list[dict[str, Any]], str]:
        """A page of the namespace's documents by id, those after ``after``, and the id the
        next page starts after ("" when this is the last). Each is a dict: id, metadata,
        content_hash, characters, chunks, job_id and learned (the served version learned
        this text)."""
        ids = sorted(i for i in (_s(d) for d in await self.r.hkeys(_k("ns", namespace, "docs"))) if i > after)
        page = ids[:limit]
        return await self._described(namespace, page, with_text=False), (page[-1] if len(ids) > limit else "")

    async def document(self, namespace: str, doc_id: str) -> dict[str, Any] | None:
        """The document with its text (see ``documents``), or None if the namespace has none by that id."""
        if not await self.r.hexists(_k("ns", namespace, "docs"), doc_id):
            return None
        found = await self._described(namespace, [doc_id], with_text=True)
        return found[0] if found else None

    async def _described(self, namespace: str, doc_ids: list[str], with_text: bool) -> list[dict[str, Any]]:
        current = await self.current_version(namespace)
        learned = {tuple(d) for a in (current.adapters if current else []) for d in a["docs"]}
        fields = ("hash", "characters", "metadata", "job_id", "chunks")
        async with self.r.pipeline(transaction=False) as pipe:
            for doc_id in doc_ids:
                pipe.hmget(_k("doc", namespace, doc_id), fields)
            rows = await pipe.execute()
        described = []
        for doc_id, row in zip(doc_ids, rows, strict=True):
            if row[0] is None:  # deleted between the listing and this read
                continue
            h, characters, metadata, job_id, chunks = (_s(v) if v is not None else "" for v in row)
            text = (await self.text_of(namespace, h) or "") if with_text or not characters else None
            if not characters:  # stored before it was kept: counted from the text (a listing reads none)
                characters = len(text)
            described.append(
                {
                    "id": doc_id,
                    "metadata": json.loads(metadata or "{}"),
                    "content_hash": h,
                    "characters": int(characters),
                    "chunks": _chunk_count(chunks),
                    "job_id": job_id,
                    "learned": (doc_id, h) in learned,
                    **({"text": text} if with_text else {}),
                }
            )
        return described

    # --- jobs ------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobState | None:
        raw = await self.r.hgetall(_k("job", job_id))
        return JobState.from_redis(raw) if raw else None

    async def update_job(self, job_id: str, **fields: Any) -> None:
        await self.r.hset(_k("job", job_id), mapping=_job_fields(**fields))

    async def finish_job(self, job: JobState, status: str, **fields: Any) -> None:
        """End ``job`` with ``status`` (succeeded, failed) and ``fields``, counted once in
        the service's metrics."""
        finished_at = time.time()
        metric = f"{job.kind}:{status}"
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(
                _k("job", job.job_id), mapping=_job_fields(status=status, finished_at=finished_at, **fields)
            )
            pipe.hincrby(JOB_METRICS, f"{metric}:count", 1)
            pipe.hincrbyfloat(JOB_METRICS, f"{metric}:seconds", finished_at - job.created_at)
            await pipe.execute()

    async def save_reflections(self, job_id: str, reflections: list[dict], step_yields: list[dict]) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(_k("job", job_id, "reflections"), json.dumps(reflections))
            pipe.hset(_k("job", job_id), "step_yields", json.dumps(step_yields))
            await pipe.execute()

    async def load_reflections(self, job_id: str) -> list[dict] | None:
        raw = await self.r.get(_k("job", job_id, "reflections"))
        return None if raw is None else json.loads(raw)

    async def erase_reflections(self, namespace: str, gone: set[tuple[str, str]]) -> int:
        """Remove from every job's stored reflections those citing a forgotten (doc id,
        hash): what was distilled from a deleted text goes with it. Returns how many."""
        job_ids = [_s(j) for j in await self.r.lrange(_k("ns", namespace, "jobs"), 0, -1)]
        async with self.r.pipeline(transaction=False) as pipe:  # one round trip for them all
            for job_id in job_ids:
                pipe.hget(_k("job", job_id), "documents")
                pipe.get(_k("job", job_id, "reflections"))
            read = await pipe.execute()
        erased = 0
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id, documents, stored in zip(job_ids, read[::2], read[1::2], strict=True):
                if documents is None or stored is None:
                    continue
                hash_of = {d["id"]: d["hash"] for d in json.loads(documents)}
                reflections = json.loads(stored)
                kept = [r for r in reflections if not any((s, hash_of.get(s)) in gone for s in r["sources"])]
                if len(kept) < len(reflections):
                    pipe.set(_k("job", job_id, "reflections"), json.dumps(kept))
                    erased += len(reflections) - len(kept)
            await pipe.execute()
        return erased

    async def mark_erased(self, namespace: str, adapter_ids: list[str]) -> None:
        if adapter_ids:
            await self.r.sadd(_k("ns", namespace, "erased"), *adapter_ids)

    # --- versions --------------------------------------------------------------------------

    async def versions(self, namespace: str) -> list[Version]:
        return [Version.from_json(v) for v in await self.r.lrange(_k("ns", namespace, "versions"), 0, -1)]

    async def current_version(self, namespace: str) -> Version | None:
        current = await self.r.get(_k("ns", namespace, "current"))
        if current is None:
            return None
        for version in await self.versions(namespace):
            if version.version == _s(current):
                return version
        return None

    async def current_version_id(self, namespace: str) -> str:
        current = await self.r.get(_k("ns", namespace, "current"))
        return "" if current is None else _s(current)

    async def next_version_id(self, namespace: str) -> str:
        return f"v{await self.r.incr(_k('ns', namespace, 'version_seq')):04d}"

    async def swap_version(self, namespace: str, version: Version, expected_current: str) -> bool:
        """Append ``version`` and make it current, if the current one is still
        ``expected_current`` (else False: someone else swapped first; recompute)."""
        current_key = _k("ns", namespace, "current")
        async with self.r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(current_key)
                current = await pipe.get(current_key)
                if ("" if current is None else _s(current)) != expected_current:
                    await pipe.reset()
                    return False
                pipe.multi()
                pipe.rpush(_k("ns", namespace, "versions"), version.to_json())
                pipe.set(current_key, version.version)
                await pipe.execute()
                return True
            except WatchError:
                return False

    async def rollback(self, namespace: str, version_id: str) -> Version:
        """Serve an earlier version again (recorded as a new version with its adapters, so
        history only grows and later jobs build on what is served)."""
        while True:
            versions = await self.versions(namespace)
            current = await self.current_version_id(namespace)
            if not versions or not current:
                raise LookupError(f"namespace {namespace!r} has no model versions")
            if not version_id:
                ids = [v.version for v in versions]
                index = ids.index(current) if current in ids else len(ids)
                if index == 0:
                    raise LookupError("the current version is the first one; there is nothing before it")
                target = versions[index - 1]
            else:
                matches = [v for v in versions if v.version == version_id]
                if not matches:
                    raise LookupError(f"no version {shown(version_id)} in namespace {namespace!r}")
                target = matches[0]
            forgotten = sorted(
                {doc_id for doc_id, _ in await self.forgotten_pairs(namespace, target.adapters)}
            )
            if forgotten:
                raise LookupError(
                    f"version {target.version} learned documents deleted since ({', '.join(map(shown, forgotten))}); "
                    "serving it again would bring back what was forgotten"
                )
            new = Version(
                await self.next_version_id(namespace),
                time.time(),
                target.adapters,
                target.ties_density,
                f"rollback to {target.version}",
                target.ties_lambda,
            )
            if await self.swap_version(namespace, new, current):
                return new

    async def forgotten_pairs(self, namespace: str, adapters: list[dict]) -> set[tuple[str, str]]:
        """The (doc id, content hash) pairs ``adapters`` learned or rehearsed whose text was
        deleted since: not sent again, or held by an adapter erased when it was forgotten."""
        if not adapters:
            return set()
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.smembers(_k("ns", namespace, "forgotten"))
            pipe.hkeys(_k("ns", namespace, "hashes"))
            pipe.smembers(_k("ns", namespace, "erased"))
            forgotten, live, erased = ({_s(v) for v in values} for values in await pipe.execute())
        return {
            (doc_id, h)
            for a in adapters
            for doc_id, h in held(a)
            if h in forgotten and (h not in live or a["id"] in erased)
        }

    # --- stats -----------------------------------------------------------------------------

    async def namespace_stats(self, namespace: str) -> dict[str, Any]:
        exists = await self.has_namespace(namespace)
        doc_ids = [_s(d) for d in await self.r.hkeys(_k("ns", namespace, "docs"))]
        async with self.r.pipeline(transaction=False) as pipe:
            for doc_id in doc_ids:
                pipe.hget(_k("doc", namespace, doc_id), "chunks")
            chunks = sum(_chunk_count(raw) for raw in await pipe.execute())
        current = await self.current_version(namespace)
        reflections = sum(a.get("reflections", 0) for a in current.adapters) if current else 0
        return {
            "exists": exists,
            "documents": len(doc_ids),
            "chunks": chunks,
            "reflections": reflections,
            "jobs": await self.r.llen(_k("ns", namespace, "jobs")),
            "current_version": current.version if current else "",
            "versions": await self.versions(namespace),
        }
