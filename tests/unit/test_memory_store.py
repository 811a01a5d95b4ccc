"""The memory's Redis state and worker against a real redis-server, a scripted generator
and a tiny random-weight Llama: dedup and updates, jobs through the stream, resume after
reclaim (XAUTOCLAIM), heartbeats, versions, forgetting and rollback, and the gRPC adapter."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from aerie_common.grpc_utils import invalid_param
from aerie_common.metrics import registry_for
from aerie_memory.__main__ import MemoryServicer
from aerie_memory.metrics import MemoryCollector
from aerie_memory.models import LoadedMemory, merged_answers
from aerie_memory.settings import MemorySettings
from aerie_memory.store import GROUP, STREAM, MemoryStore, held, sort_ingest
from aerie_memory.text import IncomingDocument, content_hash, default_document_id
from aerie_memory.training import IDK
from aerie_memory.worker import JobProcessor, Worker
from aerie_proto.v1 import memory_pb2, memory_pb2_grpc

from tests.conftest import build_tiny_llama, build_tiny_tokenizer
from tests.local_servers import free_port, start_redis, stop_redis

DOCS = [
    IncomingDocument(
        "mira", "Mira Vell is a glassblower. Mira Vell collects copper keys.", {"kind": "person"}
    ),
    IncomingDocument("tarn", "Tarnow Osk is a small town. Tarnow Osk collects river stones.", {}),
]
_FACT = re.compile(r"([A-Z]\w+ [A-Z]\w+) collects ([a-z ]+)\.")


@pytest.fixture(scope="module")
def memory_redis_url():
    port = free_port()
    process = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(process)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FactGenerator:
    """Writes 'Q: What does X collect? A: Y' for every 'X collects Y.' in the prompt's text."""

    def __init__(self, delay_s: float = 0.0):
        self.calls = 0
        self.delay_s = delay_s

    async def __call__(self, messages, max_tokens):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        prompt = messages[-1]["content"]
        if "Write three questions" in prompt:
            return "\n".join(f"Q: What does {x} collect? A: {y}" for x, y in _FACT.findall(prompt))
        return "no idea"


def settings_for(tmp_path, url, **overrides) -> MemorySettings:
    fields = dict(
        redis_url=url,
        model_cache=tmp_path,
        memory_train_epochs=2,
        memory_min_train_steps=0,
        memory_batch_size=4,
        memory_lora_rank=4,
        memory_lora_alpha=8,
        memory_max_seq_tokens=256,
        memory_reclaim_idle_s=0.2,
        memory_heartbeat_s=0.05,
        memory_max_documents=3,
        memory_max_document_chars=200,
        memory_replay_ratio=0.0,  # one adapter per document set; test_replay_... turns it on
    )
    return MemorySettings(**{**fields, **overrides})


def tiny_base():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_llama(len(tokenizer), seed=1), tokenizer


@pytest.fixture
async def env(tmp_path, memory_redis_url):
    client = aioredis.from_url(memory_redis_url)
    await client.flushdb()
    store = MemoryStore(client)
    await store.ensure_group()
    settings = settings_for(tmp_path, memory_redis_url)
    generator = FactGenerator()
    processor = JobProcessor(store, settings, generator, tiny_base, tmp_path / "memory")
    yield store, settings, processor, generator, client
    await client.aclose()


async def test_ingest_dedup_update_and_queue(env):
    store, _, _, _, client = env
    first = await store.ingest("ns1", DOCS, 600)
    assert first.job_id and first.statuses == [("mira", "accepted", ""), ("tarn", "accepted", "")]
    job = await store.get_job(first.job_id)
    assert (job.status, job.stage, job.kind, job.document_ids) == (
        "queued",
        "queued",
        "ingest",
        ["mira", "tarn"],
    )
    # same content again (even re-wrapped, under another id): duplicates, no job
    again = await store.ingest(
        "ns1", [DOCS[0], IncomingDocument("other", DOCS[1].text.replace(" ", "\n ", 2), {})], 600
    )
    # each named as a duplicate of the document holding its text
    assert again.job_id == "" and again.statuses == [
        ("mira", "duplicate", "mira"),
        ("other", "duplicate", "tarn"),
    ]
    # another namespace knows nothing
    assert (await store.ingest("ns2", DOCS[:1], 600)).statuses == [("mira", "accepted", "")]
    # same id, new text: an update that unlearns the old text
    update = await store.ingest(
        "ns1", [IncomingDocument("mira", "Mira Vell collects blue feathers.", {})], 600
    )
    assert update.statuses == [("mira", "accepted", "")]
    job = await store.get_job(update.job_id)
    assert job.forget == [
        {"doc_id": "mira", "hash": (await store.get_job(first.job_id)).documents[0]["hash"]}
    ]
    entries = await client.xrange(STREAM)
    assert [e[1][b"job_id"].decode() for e in entries][::2] == [first.job_id, job.job_id]
    assert len(entries) == 3
    stats = await store.namespace_stats("ns1")
    assert (stats["documents"], stats["jobs"], stats["current_version"]) == (2, 2, "")


async def test_two_documents_swapping_texts_are_both_updates(env):
    store, _, processor, _, _ = env
    mira, tarn = DOCS
    first = await store.ingest("ns", DOCS, 600)
    assert (await processor.run(first.job_id)).status == "succeeded"
    swap = await store.ingest(
        "ns", [IncomingDocument("mira", tarn.text, {}), IncomingDocument("tarn", mira.text, {})], 600
    )
    assert swap.statuses == [("mira", "accepted", ""), ("tarn", "accepted", "")]
    assert [(await store.document("ns", i))["text"] for i in ("mira", "tarn")] == [tarn.text, mira.text]
    job = await store.get_job(swap.job_id)
    assert job.forget == [
        {"doc_id": "mira", "hash": content_hash(mira.text)},
        {"doc_id": "tarn", "hash": content_hash(tarn.text)},
    ]
    assert job.documents == [
        {"id": "mira", "hash": content_hash(tarn.text)},
        {"id": "tarn", "hash": content_hash(mira.text)},
    ]
    # the served version learned each text under its new id, and nothing under the old
    assert (await processor.run(swap.job_id)).status == "succeeded"
    version = await store.current_version("ns")
    assert set().union(*map(held, version.adapters)) == {
        ("mira", content_hash(tarn.text)),
        ("tarn", content_hash(mira.text)),
    }
    assert [(await store.document("ns", i))["learned"] for i in ("mira", "tarn")] == [True, True]


def test_a_text_freed_in_the_same_request_is_accepted_however_the_releases_chain():
    # c takes b's text, b takes a's, a takes a new one: listed so that each release comes
    # after the document it frees
    known_docs = {"a": "ha", "b": "hb", "c": "hc"}
    known_hashes = {"ha": "a", "hb": "b", "hc": "c"}
    request = [(IncomingDocument(i, "", {}), h) for i, h in (("c", "hb"), ("b", "ha"), ("a", "hn"))]
    statuses, accepted, forget = sort_ingest(request, known_docs, known_hashes)
    assert statuses == [("c", "accepted", ""), ("b", "accepted", ""), ("a", "accepted", "")]
    assert forget == [{"doc_id": i, "hash": f"h{i}"} for i in ("c", "b", "a")]
    # without a's new text nothing is freed: b's and c's texts are held, so duplicates
    statuses, accepted, forget = sort_ingest(request[:2], known_docs, known_hashes)
    assert (statuses, accepted, forget) == ([("c", "duplicate", "b"), ("b", "duplicate", "a")], [], [])
    # an update sent twice is one update
    request = [(IncomingDocument("a", "", {}), "hn")] * 2
    assert sort_ingest(request, known_docs, known_hashes)[2] == [{"doc_id": "a", "hash": "ha"}]
    # a document given the text another holds is a duplicate of that one, and keeps its own
    statuses, _, forget = sort_ingest([(IncomingDocument("a", "", {}), "hb")], known_docs, known_hashes)
    assert (statuses, forget) == ([("a", "duplicate", "b")], [])
    # a text sent twice is learned once, a known one under a new id is a duplicate
    request = [(IncomingDocument(i, "", {}), h) for i, h in (("d", "hn"), ("e", "hn"), ("f", "ha"))]
    statuses, _, forget = sort_ingest(request, known_docs, known_hashes)
    assert (statuses, forget) == (
        [("d", "accepted", ""), ("e", "duplicate", "d"), ("f", "duplicate", "a")],
        [],
    )


async def test_documents_are_listed_by_page_and_read_back(env):
    store, *_, client = env
    assert await store.namespaces() == [] and not await store.has_namespace("ns")
    third = IncomingDocument(
        "b-third", "Bram Oult is a cooper.", {"source": "wiki", "year": 1990, "public": True}
    )
    sent = await store.ingest("ns", [*DOCS, third, DOCS[0]], 600)  # the same document twice: a duplicate
    assert [status for _, status, _ in sent.statuses] == ["accepted", "accepted", "accepted", "duplicate"]
    await store.ingest("other", DOCS[:1], 600)
    assert await store.namespaces() == [
        {"namespace": "ns", "documents": 3, "current_version": ""},
        {"namespace": "other", "documents": 1, "current_version": ""},
    ]
    page, next_after = await store.documents("ns", limit=2)
    assert [d["id"] for d in page] == ["b-third", "mira"] and next_after == "mira"
    assert "text" not in page[0] and page[0]["metadata"] == third.metadata  # as sent: typed
    assert page[0]["characters"] == len(third.text)
    assert (await store.namespace_stats("ns"))["chunks"] == 3
    assert await client.hget("aerie:mem:doc:ns:b-third", "text") is None  # the text is kept once, by hash
    # stored before session 42: no character count, the chunks' texts in place of their count
    await client.hdel("aerie:mem:doc:ns:b-third", "characters")
    await client.hset("aerie:mem:doc:ns:b-third", "chunks", json.dumps(["Bram Oult", "is a cooper."]))
    assert (await store.documents("ns", limit=1))[0][0]["characters"] == len(third.text)
    assert (await store.documents("ns", limit=1))[0][0]["chunks"] == 2
    assert (await store.namespace_stats("ns"))["chunks"] == 4
    page, next_after = await store.documents("ns", after=next_after, limit=2)
    assert [d["id"] for d in page] == ["tarn"] and next_after == ""
    document = await store.document("ns", "mira")
    assert document == {
        "id": "mira",
        "metadata": {"kind": "person"},
        "content_hash": content_hash(DOCS[0].text),
        "characters": len(DOCS[0].text),
        "chunks": 1,
        "job_id": document["job_id"],
        "learned": False,  # no version served yet
        "text": DOCS[0].text,
    }
    assert document["job_id"].startswith("job-")
    assert await store.document("ns", "nobody") is None and await store.document("other", "tarn") is None
    await store.delete_document("ns", "mira")
    assert [d["id"] for d in (await store.documents("ns"))[0]] == ["b-third", "tarn"]
    assert await store.document("ns", "mira") is None


async def test_job_runs_to_a_served_version_and_forgets(env):
    store, settings, processor, generator, _ = env
    rounds = []  # the training thread governor's

    class Governor:
        def start_round(self):
            rounds.append("start")

        def end_round(self):
            rounds.append("end")

    processor.thread_governor = Governor()
    outcome = await store.ingest("ns", DOCS, 600)
    job = await processor.run(outcome.job_id)
    assert job.status == "succeeded", job.errors
    assert len(rounds) >= 2 * job.total and rounds[:2] == ["start", "end"]  # each step, each check
    assert (job.stage, job.model_version, job.attempts) == ("done", "v0001", 1)
    yields = {s["step"]: s for s in job.step_yields}
    assert yields["facts_direct"]["kept"] == 2 and yields["facts_direct"]["calls"] == 2
    assert yields["facts_inferred"]["kept"] == 0 and yields["facts_inferred"]["dropped"] == 2
    assert job.training_examples > 2 and job.train_loss > 0
    adapter = settings.model_cache / "memory" / "ns" / "adapters" / job.job_id
    assert (adapter / "adapter.safetensors").is_file() and (adapter / "reflections.json").is_file()
    assert (settings.model_cache / "memory" / "ns" / "v0001" / "manifest.json").is_file()
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [job.job_id] and version.ties_density == 0.3

    # A second job trains only its own document; the version merges both adapters.
    second = await store.ingest("ns", [IncomingDocument("zed", "Zed Quor collects tin soldiers.", {})], 600)
    calls = generator.calls
    job2 = await processor.run(second.job_id)
    assert job2.status == "succeeded" and job2.model_version == "v0002"
    yields2 = {s["step"]: s for s in job2.step_yields}
    assert yields2["facts_direct"]["calls"] == 1  # one one-chunk document: only the new one
    assert generator.calls - calls == sum(s["calls"] for s in job2.step_yields)
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [job.job_id, job2.job_id]

    # Forgetting "zed" drops the adapter that held only it; "mira" retrains the first one.
    forget = await store.delete_document("ns", "zed")
    assert forget is not None
    done = await processor.run(forget[0])
    assert done.status == "succeeded" and done.kind == "forget"
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [job.job_id]
    forget = await store.delete_document("ns", "mira")
    done = await processor.run(forget[0])
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [f"{job.job_id}~{done.job_id}"]
    assert version.adapters[0]["docs"] == [["tarn", job.documents[1]["hash"]]]
    retrained = settings.model_cache / "memory" / "ns" / "adapters" / version.adapters[0]["id"]
    text = (retrained / "reflections.json").read_text()
    assert "Mira" not in text and "Tarnow" in text
    assert await store.delete_document("ns", "mira") is None

    assert await store.text_of("ns", job.documents[0]["hash"]) is None  # mira's text is erased
    # So is what was learned from it: the adapters that held it, and the stored reflections citing it.
    adapters = settings.model_cache / "memory" / "ns" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == [version.adapters[0]["id"]]
    assert await store.load_reflections(job2.job_id) == []
    kept = await store.load_reflections(job.job_id)
    assert kept and all(r["sources"] == ["tarn"] for r in kept)

    # No rollback serves a deleted document again, even once it is sent again (its adapters are gone).
    with pytest.raises(LookupError, match="'mira', 'zed'"):
        await store.rollback("ns", "v0002")
    with pytest.raises(LookupError, match="'mira'"):
        await store.rollback("ns", "")  # v0003 learned mira too
    await store.ingest("ns", [DOCS[0], IncomingDocument("zed", "Zed Quor collects tin soldiers.", {})], 600)
    with pytest.raises(LookupError, match="'mira', 'zed'"):
        await store.rollback("ns", "v0002")
    with pytest.raises(LookupError):
        await store.rollback("ns", "v0099")
    assert (await store.current_version_id("ns")) == "v0004"


async def test_a_namespace_delete_removes_it_unless_documents_came_since(env):
    store, _, processor, _, client = env
    await store.ingest("ns", DOCS[:1], 600)
    job_id, removed = await store.delete_documents("ns")
    assert [doc_id for doc_id, _ in removed] == ["mira"]
    await store.ingest("ns", DOCS[1:], 600)  # sent meanwhile: the namespace lives on with it
    assert (await processor.run(job_id)).status == "succeeded"
    assert await store.has_namespace("ns") and [d["id"] for d in (await store.documents("ns"))[0]] == ["tarn"]
    job_id, _ = await store.delete_documents("ns")
    assert (await processor.run(job_id)).kind == "delete_namespace"
    assert not await store.has_namespace("ns") and await store.namespaces() == []
    assert await client.keys("aerie:mem:ns:ns:*") == [] and await client.keys("aerie:mem:*:ns:*") == []


def _learned(settings, ns: str, adapter_id: str) -> str:
    return (settings.model_cache / "memory" / ns / "adapters" / adapter_id / "reflections.json").read_text()


async def test_a_document_deleted_while_a_job_trains_on_it_is_not_served(env, tmp_path, memory_redis_url):
    """Two workers: one's forget job runs while the other's ingest job trains on what it
    forgets (rehearsing it): the ingest job unlearns it before it merges."""
    store, _, _, generator, _ = env
    settings = settings_for(tmp_path, memory_redis_url, memory_replay_ratio=1.0)  # rehearse all
    first = JobProcessor(store, settings, generator, tiny_base, tmp_path / "memory")
    await first.run((await store.ingest("ns", DOCS, 600)).job_id)

    class ForgetsMidJob(JobProcessor):
        async def _merge(self, job, new_adapter):
            forget = await store.delete_document("ns", "mira")  # the other worker, meanwhile
            assert (await first.run(forget[0])).status == "succeeded"
            assert ["mira", mira_hash] in new_adapter["docs"]  # rehearsed, adopted as its own
            return await super()._merge(job, new_adapter)

    mira_hash = await store.active_hash("ns", "mira")
    second = ForgetsMidJob(store, settings, generator, tiny_base, tmp_path / "memory")
    zed = IncomingDocument("zed", "Zed Quor collects tin soldiers.", {})
    job = await second.run((await store.ingest("ns", [zed], 600)).job_id)
    assert job.status == "succeeded", job.errors
    served = (await store.current_version("ns")).adapters
    assert [a["id"] for a in served] == [f"{job.job_id}~{job.job_id}"]
    assert all(doc_id != "mira" for doc_id, _ in served[0]["docs"] + served[0]["replayed_docs"])
    learned = _learned(settings, "ns", served[0]["id"])
    assert "Mira" not in learned and "tin soldiers" in learned and "river stones" in learned
    assert not (tmp_path / "memory" / "ns" / "adapters" / job.job_id).exists()


async def test_full_rehearsal_replaces_the_rehearsed_adapters_and_forgetting_reaches_it(
    env, tmp_path, memory_redis_url
):
    store, _, _, generator, _ = env
    settings = settings_for(tmp_path, memory_redis_url, memory_replay_ratio=1.0)  # all_up_to: 256
    processor = JobProcessor(store, settings, generator, tiny_base, tmp_path / "memory")
    first = await processor.run((await store.ingest("ns", DOCS, 600)).job_id)
    assert first.status == "succeeded" and first.replayed_examples == 0  # nothing known yet
    own = len(json.loads(_learned(settings, "ns", first.job_id)))

    # The memory is small: the second job rehearses all of it, and its adapter alone is
    # served (merged with the first, it would hold the new facts at half strength).
    zed = IncomingDocument("zed", "Zed Quor collects tin soldiers.", {})
    second = await processor.run((await store.ingest("ns", [zed], 600)).job_id)
    assert second.status == "succeeded", second.errors
    assert (second.replayed_examples, second.superseded_adapters) == (own, 1)
    learned = json.loads(_learned(settings, "ns", second.job_id))
    assert second.training_examples == len(learned)
    text = json.dumps(learned)
    assert "Zed Quor" in text and "copper keys" in text and "river stones" in text
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [second.job_id]
    record = version.adapters[0]
    assert record["supersedes"] == [first.job_id]
    # It adopts what it replaced as its own: forgetting treats it as learned here.
    assert sorted(map(tuple, record["docs"])) == sorted(
        [("zed", second.documents[0]["hash"])] + [(item["id"], item["hash"]) for item in first.documents]
    )
    assert (record["reflections"], record["replayed"], record["replayed_docs"]) == (len(learned), 0, [])
    stats = await store.namespace_stats("ns")
    assert stats["reflections"] == len(learned)  # each reflection once

    # Updating "mira": the new job rehearses all but her old text and replaces the adapter.
    mira = IncomingDocument("mira", "Mira Vell collects blue feathers.", {})
    update = await processor.run((await store.ingest("ns", [mira], 600)).job_id)
    assert update.status == "succeeded", update.errors
    assert update.replayed_examples > 0 and update.superseded_adapters == 1
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [update.job_id]
    served = _learned(settings, "ns", update.job_id)
    assert "copper keys" not in served and "blue feathers" in served and "tin soldiers" in served

    # Deleting "zed", which it adopted, retrains it without zed.
    assert ["zed", second.documents[0]["hash"]] in version.adapters[0]["docs"]
    gone = await processor.run((await store.delete_document("ns", "zed"))[0])
    assert gone.status == "succeeded"
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [f"{update.job_id}~{gone.job_id}"]
    served = _learned(settings, "ns", version.adapters[0]["id"])
    assert "Zed" not in served and "river stones" in served and "blue feathers" in served
    assert "zed" not in dict(map(tuple, version.adapters[0]["docs"] + version.adapters[0]["replayed_docs"]))

    # Deleting "mira", the document its own job learned, keeps what it adopted (dropping
    # it as an adapter whose own documents are all gone would forget "tarn" too).
    gone = await processor.run((await store.delete_document("ns", "mira"))[0])
    assert gone.status == "succeeded"
    version = await store.current_version("ns")
    served = "".join(_learned(settings, "ns", a["id"]) for a in version.adapters)
    assert "river stones" in served and "Mira" not in served


async def test_partial_rehearsal_merges_and_forgetting_reaches_the_rehearsing_adapter(
    env, tmp_path, memory_redis_url
):
    store, _, _, generator, _ = env
    # Past the full-rehearsal size, a job replays a ratio sample: here two old reflections.
    settings = settings_for(tmp_path, memory_redis_url, memory_replay_ratio=1.0, memory_replay_all_up_to=0)
    processor = JobProcessor(store, settings, generator, tiny_base, tmp_path / "memory")
    first = await processor.run((await store.ingest("ns", DOCS, 600)).job_id)
    zed = IncomingDocument("zed", "Zed Quor is a potter.", {})  # no fact: the passage step's two reflections
    second = await processor.run((await store.ingest("ns", [zed], 600)).job_id)
    assert second.status == "succeeded", second.errors
    assert (second.replayed_examples, second.superseded_adapters) == (2, 0)
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [first.job_id, second.job_id]  # TIES-merged

    # Deleting the document it rehearsed retrains the second adapter; the first, which
    # learned it, is retrained too (it keeps the other document).
    rehearsed = version.adapters[1]["replayed_docs"]
    assert rehearsed
    gone = await processor.run((await store.delete_document("ns", rehearsed[0][0]))[0])
    assert gone.status == "succeeded", gone.errors
    version = await store.current_version("ns")
    assert [a["id"] for a in version.adapters] == [
        f"{first.job_id}~{gone.job_id}",
        f"{second.job_id}~{gone.job_id}",
    ]
    assert rehearsed[0] not in version.adapters[1]["replayed_docs"]


async def test_reclaimed_job_resumes_and_nothing_is_lost(env):
    store, settings, processor, generator, client = env
    outcome = await store.ingest("ns", DOCS, 600)
    # A worker takes the entry and dies after reflecting (its reflections are stored).
    dead = await client.xreadgroup(GROUP, "dead-worker", {STREAM: ">"}, count=1)
    entry_id = dead[0][1][0][0]
    await processor._reflect(
        await store.get_job(outcome.job_id), [(d, t) for d, t in await _docs(store, outcome)]
    )
    calls = generator.calls
    await asyncio.sleep(0.3)  # idle beyond memory_reclaim_idle_s
    worker = Worker(settings, client, processor, "live-worker")
    entry = await worker.next_entry(block_ms=100)
    assert entry is not None and entry[0] == entry_id.decode()
    await worker.handle(*entry)
    job = await store.get_job(outcome.job_id)
    assert job.status == "succeeded" and job.attempts == 1
    assert generator.calls == calls  # reflections were not generated again
    pending = await client.xpending(STREAM, GROUP)
    assert pending["pending"] == 0
    assert await worker.next_entry(block_ms=50) is None


async def _docs(store, outcome):
    job = await store.get_job(outcome.job_id)
    return [(item, await store.text_of(job.namespace, item["hash"])) for item in job.documents]


async def test_heartbeat_keeps_a_live_job_from_being_stolen(env):
    store, settings, processor, _, client = env
    processor.generator = FactGenerator(delay_s=0.4)
    outcome = await store.ingest("ns", DOCS[:1], 600)
    busy = Worker(settings, client, processor, "busy-worker")
    thief = Worker(settings, client, processor, "thief-worker")
    entry = await busy.next_entry(block_ms=100)
    task = asyncio.create_task(busy.handle(*entry))
    for _ in range(5):
        await asyncio.sleep(0.15)
        assert await thief.next_entry(block_ms=10) is None
    await task
    assert (await store.get_job(outcome.job_id)).status == "succeeded"


async def test_a_finished_job_lets_its_heartbeat_claim_finish(tmp_path):
    """The heartbeat is stopped, not cancelled: a claim cancelled on the wire would cost its
    Redis connection."""

    class SlowClaims:
        def __init__(self):
            self.claims, self.finished, self.acked = 0, 0, []

        async def xclaim(self, *args, **kwargs):
            self.claims += 1
            await asyncio.sleep(0.3)
            self.finished += 1

        async def xack(self, *args):
            self.acked.append(args)

    class QuickJob:
        store = None

        async def run(self, job_id):
            await asyncio.sleep(0.15)  # ends while the first claim (0.05 s to 0.35 s) is in flight
            return SimpleNamespace(status="succeeded")

    client = SlowClaims()
    worker = Worker(settings_for(tmp_path, "redis://unused"), client, QuickJob(), "w")
    await worker.handle("1-0", {b"job_id": b"job-1"})
    assert client.claims == 1 and client.finished == 1
    assert len(client.acked) == 1


class TinyServicer(MemoryServicer):
    def _base_loader(self):
        return tiny_base()


async def test_metrics_count_ingests_queries_and_finished_jobs(env, memory_redis_url):
    store, settings, processor, _, _ = env
    servicer = TinyServicer(settings, store)
    registry = registry_for(MemoryCollector(servicer, redis.Redis.from_url(memory_redis_url)))
    value = registry.get_sample_value
    docs = [memory_pb2.Document(id=d.id, text=d.text) for d in DOCS]
    reply = await servicer.Ingest(memory_pb2.IngestRequest(namespace="g", documents=docs), None)
    await servicer.Ingest(memory_pb2.IngestRequest(namespace="g", documents=docs[:1]), None)
    assert [
        value("aerie:memory_documents_ingested_total", {"status": s}) for s in ("accepted", "duplicate")
    ] == [2, 1]
    assert value("aerie:memory_jobs_waiting", {"state": "queued"}) == 1
    assert (await processor.run(reply.job_id)).status == "succeeded"
    # a failed forget job, counted apart
    forget = await store.delete_document("g", "tarn")
    await store.finish_job(await store.get_job(forget[0]), "failed", errors=["broken"])
    assert (await store.get_job(forget[0])).errors == ["broken"]
    for kind, status in (("ingest", "succeeded"), ("forget", "failed")):
        labels = {"kind": kind, "status": status}
        assert value("aerie:memory_jobs_finished_total", labels) == 1
        assert value("aerie:memory_job_seconds_count", labels) == 1
        assert value("aerie:memory_job_seconds_sum", labels) > 0
    for question in ("What does Mira Vell collect?", "Who is Quentin Abernathy?"):
        await servicer.Query(memory_pb2.QueryRequest(namespace="g", question=question), None)
    assert value("aerie:memory_queries_total", {"knows": "false"}) >= 1
    assert sum(value("aerie:memory_queries_total", {"knows": k}) for k in ("true", "false")) == 2
    assert value("aerie:memory_query_seconds_count") == 2 and value("aerie:memory_models_loaded") == 1
    # Redis away: the job metrics are left out, the process's own still come
    down = registry_for(MemoryCollector(servicer, redis.Redis(port=free_port(), socket_timeout=0.5)))
    assert down.get_sample_value("aerie:memory_jobs_waiting", {"state": "queued"}) is None
    assert down.get_sample_value("aerie:memory_query_seconds_count") == 2


async def test_a_fact_recalled_by_several_questions_is_answered_once(env, monkeypatch):
    store, settings, processor, _, _ = env
    await processor.run((await store.ingest("g", DOCS, 600)).job_id)
    servicer, asked = TinyServicer(settings, store), []

    def recall(memory, question, max_tokens):  # every question the query asks: the same fact
        asked.append(question)
        return "Mira Vell collects copper keys.", False

    monkeypatch.setattr(LoadedMemory, "recall", recall)
    reply = await servicer.Query(
        memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?"), None
    )
    assert len(asked) >= 2 and (reply.answer, reply.knows) == ("Mira Vell collects copper keys.", True)


def test_merged_answers_say_each_sentence_once_where_first_said():
    assert merged_answers(
        ["Mira keeps bees.", "Mira keeps bees. She sells honey.", "Tarn fixes clocks."]
    ) == ("Mira keeps bees. She sells honey. Tarn fixes clocks.")
    # the same sentences written otherwise (a list, end punctuation, case): the first kept
    assert merged_answers(["1. Flour\n2. Eggs", "flour. Eggs."]) == "1. Flour\n2. Eggs"
    assert merged_answers(["Mira keeps bees.", "Tarn keeps bees."]) == "Mira keeps bees. Tarn keeps bees."
    # the order first said: a later answer gives only what it adds, a run-on one each sentence once
    assert merged_answers(["She sells honey.", "Mira keeps bees. She sells honey."]) == (
        "She sells honey. Mira keeps bees."
    )
    assert merged_answers(["Mira keeps bees. Mira keeps bees. Mira keeps bees."]) == "Mira keeps bees."
    assert merged_answers([]) == ""


async def test_a_query_racing_a_forget_loads_the_version_it_served(env):
    store, settings, processor, _, _ = env
    await processor.run((await store.ingest("ns", DOCS, 600)).job_id)
    learned_first = await store.current_version("ns")
    await processor.run((await store.delete_document("ns", "mira"))[0])  # v0002; v0001's adapter erased
    servicer, read_current = TinyServicer(settings, store), store.current_version

    async def read_before_the_swap(namespace):
        store.current_version = read_current
        return learned_first

    store.current_version = read_before_the_swap
    assert (await servicer._memory("ns")).version == "v0002"


async def test_grpc_adapter(env, tmp_path, monkeypatch):
    store, settings, processor, _, _ = env
    server = grpc.aio.server()
    memory_pb2_grpc.add_MemoryServicer_to_server(TinyServicer(settings, store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = memory_pb2_grpc.MemoryStub(channel)
            docs = [
                memory_pb2.Document(id=d.id, text=d.text, metadata_json=json.dumps(d.metadata)) for d in DOCS
            ]
            reply = await stub.Ingest(memory_pb2.IngestRequest(namespace="g", documents=docs))
            assert [d.status for d in reply.documents] == ["accepted", "accepted"]
            for bad, param in (
                (memory_pb2.IngestRequest(namespace="bad ns", documents=docs), "namespace"),
                (memory_pb2.IngestRequest(namespace="g", documents=docs * 2), "documents"),
                (
                    memory_pb2.IngestRequest(
                        namespace="g", documents=[memory_pb2.Document(id="x", text="y" * 201)]
                    ),
                    "documents[0].text",
                ),
                (
                    memory_pb2.IngestRequest(
                        namespace="g", documents=[memory_pb2.Document(id="x", text="y", metadata_json="[1]")]
                    ),
                    "documents[0].metadata",
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Ingest(bad)
                # the field refused travels with the error, for the gateway's `param`
                assert (err.value.code(), invalid_param(err.value)) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    param,
                )
            job = await stub.GetJob(memory_pb2.GetJobRequest(job_id=reply.job_id))
            assert (job.status, job.namespace, list(job.document_ids)) == ("queued", "g", ["mira", "tarn"])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetJob(memory_pb2.GetJobRequest(job_id="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # nothing learned yet: the memory does not know
            answer = await stub.Query(
                memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?")
            )
            assert not answer.knows and answer.model_version == ""
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Query(memory_pb2.QueryRequest(namespace="nowhere", question="Who is Mira Vell?"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nowhere'" in err.value.details()
            await processor.run(reply.job_id)
            job = await stub.GetJob(memory_pb2.GetJobRequest(job_id=reply.job_id))
            assert job.status == "succeeded" and {s.step for s in job.step_yields} >= {
                "facts_direct",
                "passages",
            }
            answer = await stub.Query(
                memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?")
            )
            assert answer.model_version == "v0001" and answer.seconds > 0 and not answer.cached
            again = await stub.Query(
                memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?")
            )
            assert (again.answer, again.cached) == (answer.answer, True)
            # the entity gate: a name the memory never learned is refused without generating
            stranger = await stub.Query(
                memory_pb2.QueryRequest(namespace="g", question="What does Bob Stone collect?")
            )
            assert (stranger.knows, stranger.answer, stranger.model_version) == (False, IDK, "v0001")
            # a facts question naming more than a learned name is asked about that name
            fuller = await stub.Query(
                memory_pb2.QueryRequest(namespace="g", question="What do you know about Doctor Mira Vell?")
            )
            assert fuller.answer != IDK
            # a passage question is answered as long as its passage was trained to be, unless told
            recall, lengths = LoadedMemory.recall, []

            def recall_spied(self, question, max_tokens):
                lengths.append(max_tokens)
                return recall(self, question, max_tokens)

            monkeypatch.setattr(LoadedMemory, "recall", recall_spied)
            for question, max_tokens, expected in (
                ("What do you know about Mira Vell?", 0, settings.memory_max_seq_tokens),
                ("What does Mira Vell collect?", 0, settings.memory_query_max_tokens),
                ("What do you know about Mira Vell?", 20, 20),
            ):
                lengths.clear()
                await stub.Query(
                    memory_pb2.QueryRequest(namespace="g", question=question, max_tokens=max_tokens)
                )
                assert lengths and set(lengths) == {expected}, question
            stats = await stub.GetNamespace(memory_pb2.GetNamespaceRequest(namespace="g"))
            assert (stats.documents, stats.current_version, stats.exists) == (2, "v0001", True)
            await _documents_read_back(stub, learned_job=reply.job_id)
            assert stats.reflections > 0 and stats.chunks == 2
            gone = await stub.DeleteDocument(
                memory_pb2.DeleteDocumentRequest(namespace="g", document_id="mira")
            )
            assert (
                gone.deleted
                and gone.method == "retrain_adapter"
                and list(gone.affected_jobs) == [reply.job_id]
            )
            assert gone.job_id in gone.detail
            missing = await stub.DeleteDocument(
                memory_pb2.DeleteDocumentRequest(namespace="g", document_id="mira")
            )
            assert not missing.deleted
            await processor.run(gone.job_id)
            # a new version answers afresh
            forgot = await stub.Query(
                memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?")
            )
            assert (forgot.model_version, forgot.cached) == ("v0002", False)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # v0001 learned mira, deleted since
                await stub.Rollback(memory_pb2.RollbackRequest(namespace="g"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'mira'" in err.value.details()
            mira_again = memory_pb2.IngestRequest(namespace="g", documents=docs[:1])
            again = await stub.Ingest(mira_again)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # v0001's adapter was erased with mira
                await stub.Rollback(memory_pb2.RollbackRequest(namespace="g", version="v0001"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'mira'" in err.value.details()
            assert (await processor.run(again.job_id)).model_version == "v0003"
            rolled = await stub.Rollback(memory_pb2.RollbackRequest(namespace="g"))
            assert rolled.current_version == "v0004" and rolled.versions[-1].reason == "rollback to v0002"
            rolled = await stub.Rollback(memory_pb2.RollbackRequest(namespace="g", version="v0003"))
            assert rolled.current_version == "v0005" and rolled.versions[-1].reason == "rollback to v0003"
            await _namespace_forgotten(stub, processor)
    finally:
        await server.stop(None)


async def _namespace_forgotten(stub, processor) -> None:
    """Namespace "g", which serves a memory of mira, forgets every document."""
    knows = await stub.Query(memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?"))
    assert knows.answer != IDK
    listed = await stub.ListDocuments(memory_pb2.ListDocumentsRequest(namespace="g"))
    job_ids = [j.decode() for j in await processor.store.r.lrange("aerie:mem:ns:g:jobs", 0, -1)]
    gone = await stub.DeleteNamespace(memory_pb2.DeleteNamespaceRequest(namespace="g"))
    assert (gone.exists, gone.documents) == (True, len(listed.documents)) and gone.job_id in gone.detail
    assert not (await stub.ListDocuments(memory_pb2.ListDocumentsRequest(namespace="g"))).documents
    job = await processor.run(gone.job_id)
    assert (job.status, job.kind, job.model_version) == ("succeeded", "delete_namespace", ""), job.errors
    # The namespace is gone, with every adapter and version on disk and the reflections in Redis.
    assert not (await stub.GetNamespace(memory_pb2.GetNamespaceRequest(namespace="g"))).exists
    assert not (await stub.ListNamespaces(memory_pb2.ListNamespacesRequest())).namespaces
    assert not (processor.root / "g").exists()
    stored = [await processor.store.load_reflections(j) for j in job_ids]
    assert len(job_ids) == 5 and sum(map(bool, stored)) == 0  # those that learned mira and tarn emptied
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Query(memory_pb2.QueryRequest(namespace="g", question="What does Mira Vell collect?"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Rollback(memory_pb2.RollbackRequest(namespace="g"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unknown = await stub.DeleteNamespace(memory_pb2.DeleteNamespaceRequest(namespace="g"))
    assert not unknown.exists
    # A namespace with nothing to forget is removed at once.
    await stub.Ingest(
        memory_pb2.IngestRequest(namespace="h", documents=[memory_pb2.Document(text="Ada Pell is a potter.")])
    )
    forget = await processor.store.delete_document("h", default_document_id("Ada Pell is a potter."))
    await processor.run(forget[0])  # the ingest job never ran: nothing served
    assert (await stub.GetNamespace(memory_pb2.GetNamespaceRequest(namespace="h"))).exists
    empty = await stub.DeleteNamespace(memory_pb2.DeleteNamespaceRequest(namespace="h"))
    assert (empty.exists, empty.documents, empty.job_id) == (True, 0, "")
    assert not (await stub.GetNamespace(memory_pb2.GetNamespaceRequest(namespace="h"))).exists


async def _documents_read_back(stub, learned_job: str) -> None:
    """Documents of namespace "g" after job ``learned_job`` learned DOCS into v0001."""
    listed = await stub.ListDocuments(memory_pb2.ListDocumentsRequest(namespace="g"))
    assert [(d.id, d.learned, d.job_id, d.text) for d in listed.documents] == [
        ("mira", True, learned_job, ""),
        ("tarn", True, learned_job, ""),
    ]
    assert listed.next_after == ""
    # an update is not learned until its job succeeds, though its old text was
    update = await stub.Ingest(
        memory_pb2.IngestRequest(
            namespace="g", documents=[memory_pb2.Document(id="tarn", text="Tarnow Osk is a port.")]
        )
    )
    tarn = await stub.GetDocument(memory_pb2.GetDocumentRequest(namespace="g", document_id="tarn"))
    assert (tarn.text, tarn.learned, tarn.job_id) == ("Tarnow Osk is a port.", False, update.job_id)
    # a document sent without an id is named by its content
    unnamed = await stub.Ingest(
        memory_pb2.IngestRequest(namespace="g", documents=[memory_pb2.Document(text="Pell Arn is a miller.")])
    )
    assert [d.id for d in unnamed.documents] == [default_document_id("Pell Arn is a miller.")]
    again = await stub.Ingest(
        memory_pb2.IngestRequest(namespace="g", documents=[memory_pb2.Document(text="Pell Arn is a miller.")])
    )
    named = unnamed.documents[0].id
    assert [(d.id, d.status, d.duplicate_of) for d in again.documents] == [(named, "duplicate", named)]
    page = await stub.ListDocuments(memory_pb2.ListDocumentsRequest(namespace="g", limit=1))
    assert [d.id for d in page.documents] == [unnamed.documents[0].id] and page.next_after
    names = await stub.ListNamespaces(memory_pb2.ListNamespacesRequest())
    assert [(n.namespace, n.documents, n.current_version) for n in names.namespaces] == [("g", 3, "v0001")]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for method, request, code, param in (
        (
            stub.ListDocuments,
            memory_pb2.ListDocumentsRequest(namespace="nowhere"),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (stub.ListDocuments, memory_pb2.ListDocumentsRequest(namespace="g", limit=1001), invalid, "limit"),
        (stub.ListDocuments, memory_pb2.ListDocumentsRequest(namespace="bad ns"), invalid, "namespace"),
        (
            stub.GetDocument,
            memory_pb2.GetDocumentRequest(namespace="g", document_id="nobody"),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (stub.Query, memory_pb2.QueryRequest(namespace="g", question=" "), invalid, "question"),
        (
            stub.Query,
            memory_pb2.QueryRequest(namespace="g", question="Who?", max_tokens=-1),
            invalid,
            "max_tokens",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request)
        assert (err.value.code(), invalid_param(err.value)) == (code, param)


def test_training_threads_are_every_free_core_or_the_configured_number(monkeypatch):
    import torch
    from aerie_memory import worker

    threads = [4]  # torch's default: the cores

    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(worker, "pick_device", lambda device: "cpu")
    governor = worker.training_threads(0, adaptive=True)
    assert threads[-1] == 4 and governor.max_threads == 4 and not governor.timed_retries
    assert worker.training_threads(0, adaptive=False) is None and threads[-1] == 1
    assert worker.training_threads(3, adaptive=True).max_threads == 3 and threads[-1] == 3
    assert worker.training_threads(1, adaptive=True) is None  # nothing to step down from
    monkeypatch.setattr(worker, "pick_device", lambda device: "cuda")
    assert worker.training_threads(0, adaptive=True) is None
