"""``python -m aerie_memory.worker``: the memory worker. The memory service runs it as a
child process (restarted if it dies); it can also run on its own.

It consumes the job stream through the ``workers`` consumer group. On start it first
re-reads its own pending entries (a job it was doing when it died), then claims entries
other workers left idle longer than AERIE_MEMORY_RECLAIM_IDLE_S (XAUTOCLAIM), then reads
new ones. While working it renews its claim every AERIE_MEMORY_HEARTBEAT_S (XCLAIM of
its own entry resets the idle time), so a live worker's long job is never stolen. An entry
is acknowledged only when its job has succeeded or failed.

Jobs resume where they stopped: reflections are stored in Redis once synthesised, an
adapter on disk once trained, so a reclaimed job skips what was done.

An ingest job: chunking -> reflecting -> training (a LoRA adapter for this job's
documents, rehearsing what the namespace's memory already knows: all of it when it is
small, and then the adapter replaces the served ones, else a sample) -> forgetting
(adapters that held updated documents) -> merging (TIES of the adapters left into a new
version, swapped in atomically). A forget job: forgetting -> merging. A job that forgot
anything then erases the earlier adapters that held it, and its reflections in Redis; a
namespace's delete job (kind ``delete_namespace``) then removes the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from aerie_common.logs import setup_logging
from aerie_common.model_store import pick_device, resolve_model_dir
from aerie_common.redis_client import connect
from aerie_common.thread_governor import ThreadGovernor, process_governor
from aerie_common.torch_threads import compute_thread, set_torch_threads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aerie_memory.generator import make_generator
from aerie_memory.models import adapter_dir, load_base, load_reflections, save_reflections, write_version
from aerie_memory.reflection import Reflection, ReflectionConfig, SourceDocument, synthesize
from aerie_memory.settings import MemorySettings
from aerie_memory.store import GROUP, STREAM, JobState, MemoryStore, Version, _s, forgetting, held
from aerie_memory.training import (
    TrainConfig,
    adapter_meta,
    build_examples,
    fits_training,
    replay_sample,
    save_adapter,
    train_lora,
    training_pairs,
)

log = logging.getLogger("aerie_memory.worker")

# Redis unreachable (restarting, say): no job's fault. The job's stream entry stays
# pending, and the worker retries every REDIS_RETRY_S and resumes it.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
REDIS_RETRY_S = 1.0


@dataclass
class Rehearsal:
    """What a new adapter learns of the served memory besides its own documents."""

    adopted: list[Reflection] = field(default_factory=list)  # from the adapters it supersedes
    replayed: list[Reflection] = field(default_factory=list)  # from adapters still merged
    adopted_docs: list[list[str]] = field(default_factory=list)  # [doc id, hash]
    replayed_docs: list[list[str]] = field(default_factory=list)
    supersedes: list[str] = field(default_factory=list)  # adapter ids


class JobProcessor:
    """Runs one job to the end. ``generator`` is a reflection.Generator; the base model is
    loaded once, on first need, by ``base_loader``."""

    def __init__(
        self,
        store: MemoryStore,
        settings: MemorySettings,
        generator,
        base_loader,
        memory_root: Path,
        thread_governor: ThreadGovernor | None = None,
    ):
        self.store = store
        self.thread_governor = thread_governor  # on a CPU: training takes a free core
        self.settings = settings
        self.generator = generator
        self._base_loader = base_loader
        self._base = None
        self.root = memory_root
        # Loading, training and saving: one thread, one OpenMP team (aerie_common.torch_threads).
        self.compute = compute_thread("memory-train")

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    def base(self):
        if self._base is None:
            self._base = self._base_loader()
        return self._base

    async def run(self, job_id: str) -> JobState:
        job = await self.store.get_job(job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.status in ("succeeded", "failed"):
            return job
        now = time.time()
        await self.store.update_job(
            job_id, status="running", attempts=job.attempts + 1, started_at=job.started_at or now
        )
        try:
            version = await self._run(job)
        except REDIS_DOWN:
            raise
        except Exception as exc:
            log.exception("%s failed", job_id)
            job = await self.store.get_job(job_id)
            await self.store.finish_job(job, "failed", errors=[*job.errors, f"{type(exc).__name__}: {exc}"])
            return await self.store.get_job(job_id)
        await self.store.finish_job(job, "succeeded", stage="done", model_version=version)
        return await self.store.get_job(job_id)

    async def _stage(self, job_id: str, stage: str, total: int = 0) -> None:
        log.info("%s: %s", job_id, stage)
        await self.store.update_job(job_id, stage=stage, done=0, total=total)

    async def _run(self, job: JobState) -> str:
        ns = job.namespace
        new_adapter = None
        if job.kind == "ingest":
            await self._stage(job.job_id, "chunking", len(job.documents))
            documents = []
            for i, item in enumerate(job.documents):
                # Skip a document deleted or updated since: its newer job learns it instead.
                if await self.store.active_hash(ns, item["id"]) != item["hash"]:
                    continue
                text = await self.store.text_of(ns, item["hash"])
                if text is not None:
                    documents.append((item, text))
                await self.store.update_job(job.job_id, done=i + 1)
            reflections = await self._reflect(job, documents)
            new_adapter = await self._train(job, documents, reflections)
        served = await self._merge(job, new_adapter)
        if job.forget:
            await self._erase(job, served)
        if job.kind == "delete_namespace" and await self.store.remove_namespace(ns):
            shutil.rmtree(self.root / ns, ignore_errors=True)  # its versions' manifests
            log.info("%s: namespace %s removed", job.job_id, ns)
            return ""
        return served.version if served else ""

    async def _merge(self, job: JobState, new_adapter: dict | None) -> Version | None:
        """Serve the current version's adapters, less those the job forgets or its new
        adapter supersedes, plus the new one, as a new version (None: nothing to serve)."""
        ns = job.namespace
        while True:
            current = await self.store.current_version(ns)
            current_id = current.version if current else ""
            if new_adapter is not None:
                new_adapter = await self._without_forgotten(job, new_adapter)
            # Adapters whose every live reflection the new adapter rehearsed leave the merge:
            # it knows all they know, and averaging it with them would only dilute it. So do
            # their retrained successors ("<id>~<forget job>", which hold less).
            superseded = {s.split("~")[0] for s in (new_adapter.get("supersedes", []) if new_adapter else [])}
            adapters = [
                a for a in (current.adapters if current else []) if a["id"].split("~")[0] not in superseded
            ]
            adapters = await self._forget(job, adapters)
            if new_adapter is not None and all(a["id"] != new_adapter["id"] for a in adapters):
                adapters.append(new_adapter)
            await self._stage(job.job_id, "merging", 1)
            if not adapters and current is None:
                return None  # nothing learned and nothing served: no version to make
            version = Version(
                await self.store.next_version_id(ns),
                time.time(),
                adapters,
                self.settings.ties_density,
                f"{job.kind} {job.job_id}",
                self.settings.ties_lambda,
            )
            write_version(self.root, ns, version)
            if await self.store.swap_version(ns, version, current_id):
                await self.store.update_job(job.job_id, done=1)
                log.info("%s: serving %s/%s (%d adapters)", job.job_id, ns, version.version, len(adapters))
                return version
            log.info("%s: version changed while merging; merging again", job.job_id)

    async def _without_forgotten(self, job: JobState, adapter: dict) -> dict | None:
        """The job's new ``adapter``, retrained (or dropped) without what it learned or
        rehearsed of documents deleted while it trained: another worker's forget job may
        have run meanwhile, and merged it would serve them again."""
        stale = await self.store.forgotten_pairs(job.namespace, [adapter])
        if not stale:
            return adapter
        log.info("%s: %d documents were deleted while it trained; unlearning them", job.job_id, len(stale))
        kept = await self._forget(job, [adapter], stale)
        shutil.rmtree(adapter_dir(self.root, job.namespace, adapter["id"]), ignore_errors=True)
        return kept[0] if kept else None

    async def _erase(self, job: JobState, served: Version | None) -> None:
        """What was learned from a forgotten text leaves the disk and Redis too: the earlier
        versions' adapters that learned or rehearsed it lose their weights and reflections
        (marked erased first, so that no rollback reaches for them: store.forgotten_pairs),
        and the jobs' stored reflections those citing it."""
        gone = job.forgotten()
        kept = {a["id"] for a in served.adapters} if served else set()
        holding = sorted(
            {
                a["id"]
                for version in await self.store.versions(job.namespace)
                for a in version.adapters
                if a["id"] not in kept and forgetting(a, gone) != "keep"
            }
        )
        await self.store.mark_erased(job.namespace, holding)
        for adapter_id in holding:
            shutil.rmtree(adapter_dir(self.root, job.namespace, adapter_id), ignore_errors=True)
        reflections = await self.store.erase_reflections(job.namespace, gone)
        log.info("%s: erased %d adapters and %d stored reflections", job.job_id, len(holding), reflections)

    async def _reflect(self, job: JobState, documents) -> list[Reflection]:
        stored = await self.store.load_reflections(job.job_id)
        if stored is not None:
            return [Reflection.from_json(r) for r in stored]
        await self._stage(job.job_id, "reflecting", 1)

        async def progress(done: int, total: int) -> None:
            await self.store.update_job(job.job_id, done=done, total=total)

        _, tokenizer = await self._compute(self.base)
        started = time.monotonic()
        result = await synthesize(
            [SourceDocument(item["id"], text) for item, text in documents],
            self.generator,
            reflection_config(self.settings, tokenizer),
            concurrency=self.settings.memory_generator_concurrency,
            progress=progress,
        )
        log.info(
            "%s: %d reflections from %d documents in %.0fs; per step %s",
            job.job_id,
            len(result.reflections),
            len(documents),
            time.monotonic() - started,
            {s["step"]: f"{s['kept']}/{s['candidates']}" for s in result.stats_json()},
        )
        await self.store.save_reflections(
            job.job_id, [r.to_json() for r in result.reflections], result.stats_json()
        )
        return result.reflections

    def _train_config(self) -> TrainConfig:
        s = self.settings
        return TrainConfig(
            rank=s.memory_lora_rank,
            alpha=s.memory_lora_alpha,
            epochs=s.memory_train_epochs,
            min_steps=s.memory_min_train_steps,
            recall_epochs=s.memory_recall_epochs,
            learning_rate=s.memory_learning_rate,
            batch_size=s.memory_batch_size,
        )

    async def _train_adapter(self, job_id: str, ns: str, record: dict, reflections: list[Reflection]) -> dict:
        """Train and save the adapter ``record["id"]`` on ``reflections`` (the record's own
        documents' first, then the replayed), unless it is on disk already; returns the
        record kept beside it (a resumed job gets the one it trained with)."""
        directory = adapter_dir(self.root, ns, record["id"])
        if (directory / "adapter.safetensors").is_file():
            return adapter_meta(directory).get("record", record)
        pairs = training_pairs(
            reflections, idk_share=self.settings.memory_idk_share, seed=zlib.crc32(record["id"].encode())
        )
        model, tokenizer = await self._compute(self.base)
        examples = build_examples(tokenizer, pairs, self.settings.memory_max_seq_tokens)
        config = self._train_config()
        loop = asyncio.get_running_loop()
        last = [0.0]
        updates = []  # progress writes in flight, all landed before the job moves on

        def progress(stage: str, done: int, total: int, loss: float) -> None:  # training thread
            now = time.monotonic()
            if now - last[0] > 1.0 or done in (0, total) or stage == "recalling":
                last[0] = now
                update = self.store.update_job(
                    job_id, stage=stage, done=done, total=total, train_loss=round(loss, 4)
                )
                updates.append(asyncio.run_coroutine_threadsafe(update, loop))

        _, steps = config.schedule(len(examples))
        await self.store.update_job(job_id, done=0, total=steps, training_examples=len(examples))
        result = await self._compute(
            train_lora, model, tokenizer, examples, config, progress, self.thread_governor
        )
        await asyncio.gather(*map(asyncio.wrap_future, updates), return_exceptions=True)
        meta = {
            "examples": len(examples),
            "epoch_losses": result.epoch_losses,
            "unrecalled": result.unrecalled,
            "seconds": result.seconds,
            "record": record,
        }
        await self._compute(save_adapter, result.adapter, directory, meta)
        save_reflections(directory, reflections)
        await self.store.update_job(
            job_id, train_loss=round(result.epoch_losses[-1], 4) if result.epoch_losses else 0.0
        )
        log.info(
            "%s: adapter %s trained on %d examples in %.0fs, losses %s, not recalled word for word %s",
            job_id,
            record["id"],
            len(examples),
            result.seconds,
            [round(x, 3) for x in result.epoch_losses],
            result.unrecalled,
        )
        return record

    async def _train(self, job: JobState, documents, reflections: list[Reflection]) -> dict | None:
        active = {item["id"] for item, _ in documents}
        usable = [r for r in reflections if set(r.sources) <= active]
        if not usable:
            return None
        await self._stage(job.job_id, "training", 0)
        rehearsal = await self._rehearsal(job, usable, exclude=active)
        record = {
            "id": job.job_id,
            # Its own: this job's documents, and those of the adapters it replaces.
            "docs": [[item["id"], item["hash"]] for item, _ in documents] + rehearsal.adopted_docs,
            "reflections": len(usable) + len(rehearsal.adopted),
            "replayed_docs": rehearsal.replayed_docs,
            "replayed": len(rehearsal.replayed),
            "supersedes": rehearsal.supersedes,
        }
        learned = usable + rehearsal.adopted + rehearsal.replayed  # own reflections first
        record = await self._train_adapter(job.job_id, job.namespace, record, learned)
        examples = adapter_meta(adapter_dir(self.root, job.namespace, job.job_id))["examples"]
        await self.store.update_job(
            job.job_id,
            training_examples=examples,
            replayed_examples=record["reflections"] - len(usable) + record["replayed"],
            superseded_adapters=len(record.get("supersedes", [])),
        )
        return record

    async def _rehearsal(self, job: JobState, new: list[Reflection], exclude: set[str]) -> Rehearsal:
        """What of the served memory the new adapter rehearses (settings.memory_replay_ratio
        and memory_replay_all_up_to). Only reflections whose documents are all still active,
        and not relearned or forgotten by this job, are rehearsed. A served adapter whose
        every such reflection the new adapter learns (rehearsed or answered anew) is
        superseded: it leaves the merge, and the new adapter adopts its reflections and
        documents as its own (so that forgetting treats them as learned, not rehearsed)."""
        current = await self.store.current_version(job.namespace)
        if current is None or self.settings.memory_replay_ratio <= 0:
            return Rehearsal()
        exclude = exclude | {f["doc_id"] for f in job.forget}
        known: list[Reflection] = []
        hashes: dict[str, str] = {}
        questions_of: dict[str, set[str]] = {}
        for adapter in current.adapters:
            live = {}
            for doc_id, h in held(adapter):
                if doc_id not in exclude and await self.store.active_hash(job.namespace, doc_id) == h:
                    live[doc_id] = h
            questions_of[adapter["id"]] = set()
            for r in load_reflections(adapter_dir(self.root, job.namespace, adapter["id"])):
                if r.sources and set(r.sources) <= live.keys():
                    known.append(r)
                    questions_of[adapter["id"]].add(r.question)
            hashes.update(live)
        rehearsed = replay_sample(
            known,
            new,
            self.settings.memory_replay_ratio,
            seed=zlib.crc32(job.job_id.encode()),
            all_up_to=self.settings.memory_replay_all_up_to,
        )
        learned = {r.question for r in new} | {r.question for r in rehearsed}
        supersedes = [adapter_id for adapter_id, questions in questions_of.items() if questions <= learned]
        replaced = set().union(*(questions_of[a] for a in supersedes))
        kept = set().union(*(q for a, q in questions_of.items() if a not in supersedes))

        def adopt(r: Reflection) -> bool:  # one a kept adapter holds too lives on there: rehearsed
            return r.question in replaced and r.question not in kept

        adopted = [r for r in rehearsed if adopt(r)]
        replayed = [r for r in rehearsed if not adopt(r)]

        def docs_of(reflections: list[Reflection]) -> list[list[str]]:
            return [
                [doc_id, hashes[doc_id]] for doc_id in sorted({d for r in reflections for d in r.sources})
            ]

        return Rehearsal(adopted, replayed, docs_of(adopted), docs_of(replayed), supersedes)

    async def _forget(
        self, job: JobState, adapters: list[dict], gone: set[tuple[str, str]] | None = None
    ) -> list[dict]:
        """Adapters holding a forgotten (doc id, hash) (``gone``; default: the job's),
        learned or rehearsed, are retrained without the reflections citing it, or dropped
        when none of their own is left (store.forgetting)."""
        gone = job.forgotten() if gone is None else gone
        if not gone:
            return adapters
        gone_ids = {doc_id for doc_id, _ in gone}
        out = []
        affected = [a for a in adapters if forgetting(a, gone) != "keep"]
        if affected:
            await self._stage(job.job_id, "forgetting", len(affected))
        for adapter in adapters:
            action = forgetting(adapter, gone)
            if action == "keep":
                out.append(adapter)
                continue
            learned = load_reflections(adapter_dir(self.root, job.namespace, adapter["id"]))
            own_count = adapter.get("reflections", len(learned))
            own = [r for r in learned[:own_count] if not set(r.sources) & gone_ids]
            replayed = [r for r in learned[own_count:] if not set(r.sources) & gone_ids]
            if action == "retrain" and own:
                record = {
                    "id": f"{adapter['id'].split('~')[0]}~{job.job_id}",
                    "docs": [d for d in adapter["docs"] if tuple(d) not in gone],
                    "reflections": len(own),
                    "replayed_docs": [d for d in adapter.get("replayed_docs", []) if tuple(d) not in gone],
                    "replayed": len(replayed),
                    "supersedes": adapter.get("supersedes", []),
                }
                out.append(await self._train_adapter(job.job_id, job.namespace, record, own + replayed))
            # (a retrained adapter's progress was its training's)
            await self.store.update_job(
                job.job_id, stage="forgetting", done=affected.index(adapter) + 1, total=len(affected)
            )
        return out


def reflection_config(settings: MemorySettings, tokenizer) -> ReflectionConfig:
    """The settings' reflection step, its passages as long as the memory's ``tokenizer``
    lets a training example keep them whole."""
    max_seq_tokens = settings.memory_max_seq_tokens
    return ReflectionConfig(
        chunk_chars=settings.memory_chunk_chars,
        direct_max_tokens=settings.memory_generator_max_tokens,
        other_max_tokens=max(16, settings.memory_generator_max_tokens * 2 // 3),
        passage_fits=lambda question, answer: fits_training(tokenizer, question, answer, max_seq_tokens),
    )


class Worker:
    def __init__(
        self, settings: MemorySettings, client: aioredis.Redis, processor: JobProcessor, consumer: str
    ):
        self.settings = settings
        self.r = client
        self.store = processor.store
        self.processor = processor
        self.consumer = consumer

    async def _heartbeat(self, entry_id: str, done: asyncio.Event) -> None:
        """Re-claim the entry every ``memory_heartbeat_s`` until ``done``, so no other worker
        takes a live job. Stopped by the event, never cancelled mid-command: a command
        cancelled on the wire costs its connection."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.settings.memory_heartbeat_s)
            if not done.is_set():
                with contextlib.suppress(Exception):
                    await self.r.xclaim(STREAM, GROUP, self.consumer, 0, [entry_id], justid=True)

    async def handle(self, entry_id: str, fields: dict) -> None:
        job_id = _s(fields.get(b"job_id") or fields.get("job_id"))
        done = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(entry_id, done))
        try:
            job = await self.processor.run(job_id)
            log.info("%s: %s", job_id, job.status)
        finally:
            done.set()
            await heartbeat
        await self.r.xack(STREAM, GROUP, entry_id)

    async def next_entry(self, block_ms: int) -> tuple[str, dict] | None:
        # 1. our own pending entries (we died while doing them)
        mine = await self.r.xreadgroup(GROUP, self.consumer, {STREAM: "0"}, count=1)
        if mine and mine[0][1]:
            entry_id, fields = mine[0][1][0]
            if fields:
                return _s(entry_id), fields
            await self.r.xack(STREAM, GROUP, entry_id)  # deleted entry
            return None
        # 2. entries another worker left idle too long
        idle_ms = int(self.settings.memory_reclaim_idle_s * 1000)
        claimed = await self.r.xautoclaim(STREAM, GROUP, self.consumer, idle_ms, "0-0", count=1)
        if claimed and claimed[1]:
            entry_id, fields = claimed[1][0]
            log.info("reclaimed %s from an idle worker", _s(entry_id))
            return _s(entry_id), fields
        # 3. new entries
        new = await self.r.xreadgroup(GROUP, self.consumer, {STREAM: ">"}, count=1, block=block_ms)
        if new and new[0][1]:
            entry_id, fields = new[0][1][0]
            return _s(entry_id), fields
        return None

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        await self.store.ensure_group()
        log.info("worker %s consuming %s (group %s)", self.consumer, STREAM, GROUP)
        block_ms = int(min(self.settings.memory_reclaim_idle_s, 2.0) * 1000)
        while stop is None or not stop.is_set():
            try:
                entry = await self.next_entry(block_ms)
                # One delivered as the worker drains stays pending: the next start resumes it.
                if entry is not None and (stop is None or not stop.is_set()):
                    await self.handle(*entry)
            except REDIS_DOWN as exc:
                log.warning("redis unreachable (%s); worker retrying in %.0fs", exc, REDIS_RETRY_S)
                await asyncio.sleep(REDIS_RETRY_S)


def default_consumer(settings: MemorySettings) -> str:
    return f"{socket.gethostname()}-{settings.memory_port}"


def training_threads(configured: int, adaptive: bool) -> ThreadGovernor | None:
    """Set this process's torch threads for training and return their governor (None:
    fixed). ``configured`` threads (0: every core the container may use when ``adaptive``,
    else one); with ``adaptive`` on a CPU, training runs on one fewer while another process
    keeps a core busy, and takes it back only when it is free (no timed tries): the
    verifier, which a user waits on token by token, comes first."""
    set_torch_threads(configured or (0 if adaptive else 1))
    return process_governor(adaptive, pick_device("auto") == "cpu", timed_retries=False)


def make_base_loader(settings: MemorySettings):
    def load():
        model_dir = resolve_model_dir(settings.memory_base_model, settings.model_cache)
        return load_base(model_dir, pick_device("auto"))

    return load


async def main_async(settings: MemorySettings) -> None:
    client = connect(settings.redis_url)
    store = MemoryStore(client)
    generator = make_generator(settings)
    processor = JobProcessor(
        store,
        settings,
        generator,
        make_base_loader(settings),
        settings.model_cache / "memory",
        training_threads(settings.memory_train_threads, settings.adaptive_threads),
    )
    consumer = os.environ.get("AERIE_MEMORY_WORKER_NAME") or default_consumer(settings)
    # SIGTERM drains: no new job is taken, the one in hand runs on until it ends (or the
    # memory service, which gives it AERIE_DRAIN_TIMEOUT_S, kills the worker).
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await Worker(settings, client, processor, consumer).run_forever(stop)
    finally:
        await generator.close()
        await client.aclose()


def main() -> None:
    settings = MemorySettings()
    setup_logging(settings.log_level)
    asyncio.run(main_async(settings))


if __name__ == "__main__":
    main()
