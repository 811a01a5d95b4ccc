"""Memory QA benchmark: with the same executive (the target, through the gateway's chat
endpoint), answer questions about a fictional corpus (bench/memory_qa/corpus.py)

  (a) ``no_memory``: the question alone;
  (b) ``bm25``: BM25 retrieval-augmented prompting (bm25s: the top documents in the prompt);
  (c) ``memo``: the corpus ingested into a memory namespace, chat with ``memory`` on
      (``--mode``: MEMO's three-stage protocol, or single pass);

plus ``memory_direct``, the memory model's own answer (POST /memory/query), which shows
how much the memory knows apart from the executive's composing.

Phases, on one namespace:

1. ``clean``: the corpus is ingested; the time from the ingest request to the job's
   success is the learning time. The same documents are then ingested again: every one
   must come back ``duplicate`` and no job be queued (nothing is retrained).
2. ``distractors``: as many distractor documents (other invented entities, asked about by
   no question) are ingested into the same namespace, an incremental job whose adapter is
   TIES-merged with the first; BM25's index holds both sets; the questions are asked again.
   The distractor cost is the accuracy lost.

Accuracy is reported by question type, with the learning time and latencies (chat p50 per
system; memory query p50). Results: bench/results/memory_qa.json and the "## Memory QA"
section of docs/benchmarks.md, both rewritten after each phase; a run on a corpus of one's
own (``--corpus``) writes bench/results/memory_qa_<its name>.json and no section unless
``--docs`` names a file.

    python -m bench.memory_qa                         # starts its own stack (scripts/launch.py)
    python -m bench.memory_qa --url http://127.0.0.1:8000 --documents 20 --questions 24
    python -m bench.memory_qa --no-distractors --mode single_pass
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.memory_qa.corpus import STYLES, Corpus, Question, generate, is_correct
from bench.results_json import write_results
from bench.stack import start_stack

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
SECTION = "## Memory QA"
SYSTEMS = ("no_memory", "bm25", "memory_direct", "memo")
KINDS = ("single_hop", "cross_document")
# Chat requests' speculative flag (--speculative): greedy text is the same either way, so
# it only changes latency; off by default so the figures do not depend on the draft head.
SPECULATIVE = False


@dataclass
class Outcome:
    system: str
    question: str
    kind: str
    gold: str
    response: str
    correct: bool
    seconds: float
    memory: dict | None = None
    history: list[dict] = field(default_factory=list)  # the conversation before the question


@dataclass
class Run:
    label: str  # "clean" | "distractors"
    ingest: dict = field(default_factory=dict)
    reingest: dict | None = None
    outcomes: list[Outcome] = field(default_factory=list)


def chat(
    client: httpx.Client,
    question: str,
    system: str | None = None,
    memory: dict | None = None,
    history: list[dict] | None = None,
):
    messages = [
        *([{"role": "system", "content": system}] if system else []),
        *(history or []),
        {"role": "user", "content": question},
    ]
    body = {
        "model": MODEL,
        "messages": messages,
        "temperature": 0,
        "max_tokens": 32,
        "speculative": SPECULATIVE,
    }
    if memory:
        body["memory"] = memory
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json=body, timeout=1800)
    response.raise_for_status()
    data = response.json()
    return data["choices"][0]["message"]["content"], time.monotonic() - started, data.get("memory")


def ask_memory(client: httpx.Client, namespace: str, question: str):
    started = time.monotonic()
    response = client.post("/memory/query", json={"namespace": namespace, "question": question}, timeout=1800)
    response.raise_for_status()
    data = response.json()
    return data["answer"], time.monotonic() - started, data


def bm25_prompt(retriever, docs: list[dict], question: str, k: int) -> str:
    import bm25s

    tokens = bm25s.tokenize([question], stopwords="en", show_progress=False)
    results, _ = retriever.retrieve(tokens, k=min(k, len(docs)), show_progress=False)
    passages = "\n".join(f"- {docs[i]['text']}" for i in results[0])
    return f"Answer the question using these documents:\n{passages}"


def bm25_index(docs: list[dict]):
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([d["text"] for d in docs], stopwords="en", show_progress=False), show_progress=False
    )
    return retriever


def post_ingest(client: httpx.Client, namespace: str, docs: list[dict]) -> tuple[list[str], list[dict]]:
    """(job ids, document statuses) of ingesting ``docs`` in requests of up to 32."""
    jobs, statuses = [], []
    for i in range(0, len(docs), 32):
        response = client.post("/memory/ingest", json={"namespace": namespace, "documents": docs[i : i + 32]})
        response.raise_for_status()
        if response.json()["job_id"]:
            jobs.append(response.json()["job_id"])
        statuses += response.json()["documents"]
    return jobs, statuses


def ingest_and_wait(
    client: httpx.Client, namespace: str, docs: list[dict], timeout_s: float, resume: list[str] | None = None
) -> dict:
    """Ingest ``docs`` and wait for their jobs; with ``resume``, wait for those jobs instead
    (a run whose stack went down mid-job: the job resumes when the stack is back)."""
    started = time.monotonic()
    jobs = resume or post_ingest(client, namespace, docs)[0]
    finished = []
    for job_id in jobs:
        bar = tqdm(desc=f"{namespace} {job_id}", unit="step")
        stage = None
        while True:
            job = client.get(f"/memory/jobs/{job_id}").json()
            if job["stage"] != stage:
                stage = job["stage"]
                bar.reset(total=job["total"] or None)
                bar.set_postfix_str(stage)
            bar.total = job["total"] or bar.total
            bar.n = job["done"]
            bar.refresh()
            if job["status"] in ("succeeded", "failed"):
                break
            if time.monotonic() - started > timeout_s:
                job["status"] = "timed_out"
                break
            time.sleep(5)
        bar.close()
        finished.append(job)
    return {
        "namespace": namespace,
        "documents": len(docs),
        "jobs": finished,
        "learned_s": round(time.monotonic() - started, 1),
        # server side, from the job records: queued -> succeeded
        "job_s": [round(j["finished_at"] - j["created_at"], 1) for j in finished if j.get("finished_at")],
        "resumed": bool(resume),
        "succeeded": bool(finished) and all(j["status"] == "succeeded" for j in finished),
    }


def reingest(client: httpx.Client, namespace: str, docs: list[dict]) -> dict:
    """The same documents again: all must be duplicates, and no job queued."""
    jobs, statuses = post_ingest(client, namespace, docs)
    return {
        "documents": len(docs),
        "duplicates": sum(s["status"] == "duplicate" for s in statuses),
        "jobs_queued": len(jobs),
    }


def evaluate(
    client: httpx.Client,
    docs: list[dict],
    namespace: str,
    questions: list[Question],
    systems: list[str],
    mode: str,
    k: int,
    label: str,
    concurrency: int,
) -> list[Outcome]:
    retriever = bm25_index(docs)

    def one(item: tuple[Question, str]) -> Outcome:
        q, system = item
        info = None
        if system == "no_memory":
            text, seconds, info = chat(client, q.question, history=q.history)
        elif system == "bm25":
            # a follow-up is retrieved for with the user's earlier turns, as a chat would
            query = " ".join([*(m["content"] for m in q.history if m["role"] == "user"), q.question])
            prompt = bm25_prompt(retriever, docs, query, k)
            text, seconds, info = chat(client, q.question, system=prompt, history=q.history)
        elif system == "memory_direct":  # the memory alone: no conversation
            text, seconds, info = ask_memory(client, namespace, q.question)
        else:
            memory = {"namespace": namespace, "mode": mode}
            text, seconds, info = chat(client, q.question, memory=memory, history=q.history)
        correct = is_correct(text, q.answer)
        return Outcome(system, q.question, q.kind, q.answer, text, correct, seconds, info, q.history)

    # Question by question, every system, so a cut-short run still compares like with like.
    work = [(q, s) for q in questions for s in systems]
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(tqdm(pool.map(one, work), total=len(work), desc=f"questions ({label})", unit="answer"))


def _pct(rows: list[Outcome]) -> float | None:
    return round(100 * sum(o.correct for o in rows) / len(rows), 1) if rows else None


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarise(runs: list[Run]) -> dict:
    out = {}
    for run in runs:
        table = {}
        for system in SYSTEMS:
            rows = [o for o in run.outcomes if o.system == system]
            if not rows:
                continue
            entry = {kind: _pct([o for o in rows if o.kind == kind]) for kind in KINDS}
            entry["questions"] = len(rows)
            entry["latency_p50_s"] = _p50([o.seconds for o in rows])
            if system == "memo":
                entry["memory_used"] = sum(1 for o in rows if o.memory and o.memory.get("used"))
                entry["memory_skipped"] = sorted(
                    {o.memory["skipped"] for o in rows if o.memory and o.memory.get("skipped")}
                )
                entry["memory_turns_mean"] = round(
                    statistics.fmean(o.memory.get("turns", 0) for o in rows if o.memory), 2
                )
            if system == "memory_direct":
                entry["memory_seconds_p50"] = _p50([o.memory["seconds"] for o in rows if o.memory])
            table[system] = entry
        summary = {"accuracy": table, "ingest": {k: v for k, v in run.ingest.items() if k != "jobs"}}
        if run.reingest is not None:
            summary["reingest"] = run.reingest
        summary["jobs"] = [
            {
                k: j.get(k)
                for k in (
                    "job_id",
                    "status",
                    "attempts",
                    "training_examples",
                    "replayed_examples",
                    "superseded_adapters",
                    "train_loss",
                    "step_yields",
                    "created_at",
                    "started_at",
                    "finished_at",
                )  # fmt: skip
            }
            for j in run.ingest.get("jobs", [])
        ]
        out[run.label] = summary
    if "clean" in out and "distractors" in out:
        cost = {}
        for system, row in out["clean"]["accuracy"].items():
            noisy = out["distractors"]["accuracy"].get(system)
            if noisy:
                cost[system] = {
                    kind: None
                    if row[kind] is None or noisy[kind] is None
                    else round(row[kind] - noisy[kind], 1)
                    for kind in KINDS
                }
        out["distractor_cost_points"] = cost
    return out


def markdown(summary: dict, args, started: str) -> str:
    style = getattr(args, "style", "named")  # runs recorded before --style were all named
    corpus = getattr(args, "corpus", None)
    if corpus in (None, "None"):  # recorded args are strings
        corpus = f"--documents {args.documents} --seed {args.seed} --style {style}"
    else:
        corpus = f"--corpus {corpus}"
    if getattr(args, "lowercase", "False") not in (False, "False"):  # recorded args are strings
        corpus += " --lowercase"
    lines = [
        SECTION,
        "",
        f"`python -m bench.memory_qa {corpus} --mode {args.mode} --questions {args.questions} "
        f"--concurrency {args.concurrency}` ({started}; {os.cpu_count()} CPU "
        "cores; default models: SmolLM2-135M-Instruct as executive, reflection generator and memory "
        "base). Accuracy: the gold answer appears in the reply.",
        "",
        "| corpus | system | single-hop % | cross-document % | questions | latency p50 (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("clean", "distractors"):
        entry = summary.get(label)
        if not entry:
            continue
        for system, row in entry["accuracy"].items():
            lines.append(
                f"| {label} | {system} | {row['single_hop']} | {row['cross_document']} | "
                f"{row['questions']} | {row['latency_p50_s']} |"
            )
    lines.append("")
    if summary.get("distractor_cost_points"):
        costs = ", ".join(
            f"{system} {row['single_hop']} / {row['cross_document']}"
            for system, row in summary["distractor_cost_points"].items()
        )
        lines.append(f"- Distractor cost (points lost, single-hop / cross-document): {costs}.")
    for label in ("clean", "distractors"):
        entry = summary.get(label)
        if not entry:
            continue
        ingest = entry["ingest"]
        if ingest:
            lines.append(
                f"- {label}: {ingest['documents']} documents ingested -> learned (job succeeded: "
                f"{ingest['succeeded']}) in {ingest['learned_s']} s as the client waited; job records "
                f"(queued -> succeeded): {ingest.get('job_s')} s"
                + (" (resumed after the stack was stopped mid-job)" if ingest.get("resumed") else "")
                + "."
            )
        if entry.get("reingest"):
            r = entry["reingest"]
            lines.append(
                f"- Re-ingesting the same {r['documents']} documents: {r['duplicates']} reported "
                f"`duplicate`, {r['jobs_queued']} jobs queued."
            )
        memo = entry["accuracy"].get("memo")
        if memo:
            lines.append(
                f"- {label}: memory used in {memo['memory_used']}/{memo['questions']} memo chats, "
                f"{memo['memory_turns_mean']} memory turns on average"
                + (f"; skipped: {'; '.join(memo['memory_skipped'])}" if memo["memory_skipped"] else "")
                + "."
            )
        direct = entry["accuracy"].get("memory_direct")
        if direct:
            lines.append(f"- {label}: memory query p50 {direct['memory_seconds_p50']} s (service side).")
        for job in entry.get("jobs", []):
            if job.get("step_yields"):
                per_step = ", ".join(f"{s['step']} {s['kept']}/{s['candidates']}" for s in job["step_yields"])
                lines.append(
                    f"  - {label} job: {job['training_examples']} training examples "
                    f"({job.get('replayed_examples') or 0} rehearsed, "
                    f"{job.get('superseded_adapters') or 0} served adapters replaced), last-epoch loss "
                    f"{job['train_loss']}; reflection yields (kept/candidates): {per_step}"
                )
    return "\n".join(lines) + "\n"


def output_paths(corpus: Path | None, json_path: Path | None, docs: Path | None) -> tuple[Path, Path | None]:
    """Where a run writes its results and which markdown file's "Memory QA" section it
    rewrites (None: none). The published section is the generated corpus's: a run on a
    corpus of one's own (``--corpus``) writes ``memory_qa_<corpus name>.json`` and leaves
    docs/benchmarks.md alone unless told otherwise."""
    results = ROOT / "bench" / "results"
    if corpus is None:
        return json_path or results / "memory_qa.json", docs or ROOT / "docs" / "benchmarks.md"
    return json_path or results / f"memory_qa_{corpus.stem}.json", docs


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the "## Memory QA" section; other sections are left alone."""
    existing = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = existing.find(SECTION)
    if start == -1:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        end = existing.find("\n## ", start + len(SECTION))
        updated = existing[:start] + text + ("" if end == -1 else "\n" + existing[end + 1 :])
    path.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running gateway; default: start a stack")
    parser.add_argument("--documents", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--style", choices=STYLES, default="named", help="the corpus's prose (bench/memory_qa/corpus.py)"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        help="a corpus JSON instead of the generated one (bench/memory_qa/handwritten.json)",
    )
    parser.add_argument("--mode", choices=["three_stage", "single_pass"], default="three_stage")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {SYSTEMS}")
    parser.add_argument("--namespace", default="", help="default: bench-<seed>-<documents>-<time>")
    parser.add_argument("--no-distractors", action="store_true")
    parser.add_argument("--questions", type=int, default=0, help="ask at most this many questions (0: all)")
    parser.add_argument(
        "--lowercase", action="store_true", help="ask every question in lower case, as users who type so do"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="answers asked for at once")
    parser.add_argument("--bm25-k", type=int, default=2)
    parser.add_argument("--speculative", action="store_true", help="chat with speculative decoding")
    parser.add_argument("--ingest-timeout", type=float, default=3600)
    parser.add_argument(
        "--resume-job", default="", help="wait for this clean-corpus job instead of ingesting"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default: bench/results/memory_qa.json; with --corpus, memory_qa_<its name>.json)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="markdown file whose 'Memory QA' section is rewritten (default: docs/benchmarks.md; "
        "with --corpus, none)",
    )
    args = parser.parse_args()
    args.json, args.docs = output_paths(args.corpus, args.json, args.docs)
    global SPECULATIVE
    SPECULATIVE = args.speculative
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}")

    if args.corpus is not None:
        corpus = Corpus.from_json(json.loads(args.corpus.read_text()))
    else:
        corpus = generate(args.seed, args.documents, args.style)
    questions = corpus.questions[: args.questions] if args.questions else corpus.questions
    if args.lowercase:
        questions = [replace(q, question=q.question.lower()) for q in questions]
    namespace = args.namespace or f"bench-{args.seed}-{args.documents}-{int(time.time())}"
    proc = None
    url = args.url
    if url is None:
        stack = start_stack()
        proc, url = stack.proc, stack.url
    started = time.strftime("%Y-%m-%d")
    runs: list[Run] = []

    def report() -> None:
        summary = summarise(runs)
        write_results(
            args.json,
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "runs": [asdict(r) for r in runs],
            },
            indent=1,
        )
        text = markdown(summary, args, started)
        if args.docs is not None:
            write_section(args.docs, text)
        print(text)

    try:
        client = httpx.Client(base_url=url, timeout=120)
        resume = [args.resume_job] if args.resume_job else None
        clean = Run(
            "clean", ingest_and_wait(client, namespace, corpus.documents, args.ingest_timeout, resume)
        )
        print(f"clean: learned in {clean.ingest['learned_s']} s", file=sys.stderr)
        clean.reingest = reingest(client, namespace, corpus.documents)
        runs.append(clean)
        clean.outcomes = evaluate(
            client, corpus.documents, namespace, questions, systems, args.mode, args.bm25_k, "clean",
            args.concurrency,
        )  # fmt: skip
        report()
        if not args.no_distractors:
            noisy = Run(
                "distractors", ingest_and_wait(client, namespace, corpus.distractors, args.ingest_timeout)
            )
            print(f"distractors: learned in {noisy.ingest['learned_s']} s", file=sys.stderr)
            runs.append(noisy)
            # The executive alone does not see the corpus: no_memory's answers stay the same.
            noisy.outcomes = [o for o in clean.outcomes if o.system == "no_memory"] + evaluate(
                client, corpus.documents + corpus.distractors, namespace, questions,
                [s for s in systems if s != "no_memory"], args.mode, args.bm25_k, "distractors",
                args.concurrency,
            )  # fmt: skip
            report()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)


if __name__ == "__main__":
    main()
