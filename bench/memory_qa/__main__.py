"""Memory QA benchmark: with the same executive (the target, through the gateway's chat
endpoint), answer questions about a fictional corpus (bench/memory_qa/corpus.py)

  (a) with no memory,
  (b) with BM25 retrieval-augmented prompting (bm25s: the top documents in the prompt),
  (c) with MEMO: the corpus ingested into a memory namespace, chat with ``memory`` on,

then again with as many distractor documents added (BM25's index and a second MEMO
namespace hold both), and report accuracy by question type, the time from ingest to
learned (job succeeded), and query latency.

    python -m bench.memory_qa                         # starts its own stack (scripts/launch.py)
    python -m bench.memory_qa --url http://127.0.0.1:8000 --documents 20
    python -m bench.memory_qa --no-distractors --mode single_pass

Results: bench/results/memory_qa.json, and the table in docs/benchmarks.md ("## Memory QA").
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.memory_qa.corpus import Corpus, Question, generate, is_correct
from bench.serving import start_stack

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
SECTION = "## Memory QA"


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


@dataclass
class Run:
    label: str  # "clean" | "distractors"
    ingest: dict = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)


def chat(client: httpx.Client, question: str, system: str | None = None, memory: dict | None = None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 32}
    if memory:
        body["memory"] = memory
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json=body, timeout=900)
    response.raise_for_status()
    data = response.json()
    return data["choices"][0]["message"]["content"], time.monotonic() - started, data.get("memory")


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


def ingest_and_wait(client: httpx.Client, namespace: str, docs: list[dict], timeout_s: float) -> dict:
    started = time.monotonic()
    jobs = []
    for i in range(0, len(docs), 32):
        response = client.post("/memory/ingest", json={"namespace": namespace, "documents": docs[i : i + 32]})
        response.raise_for_status()
        if response.json()["job_id"]:
            jobs.append(response.json()["job_id"])
    statuses = []
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
        statuses.append(job)
    return {
        "namespace": namespace,
        "documents": len(docs),
        "jobs": statuses,
        "learned_s": round(time.monotonic() - started, 1),
        "succeeded": all(j["status"] == "succeeded" for j in statuses),
    }


def evaluate(
    client, corpus: Corpus, docs, namespace, questions: list[Question], mode: str, k: int, label: str
):
    retriever = bm25_index(docs)
    outcomes = []
    for q in tqdm(questions, desc=f"questions ({label})", unit="q"):
        for system in ("no_memory", "bm25", "memo"):
            if system == "no_memory":
                text, seconds, info = chat(client, q.question)
            elif system == "bm25":
                text, seconds, info = chat(
                    client, q.question, system=bm25_prompt(retriever, docs, q.question, k)
                )
            else:
                text, seconds, info = chat(client, q.question, memory={"namespace": namespace, "mode": mode})
            outcomes.append(
                Outcome(system, q.question, q.kind, q.answer, text, is_correct(text, q.answer), seconds, info)
            )
    return outcomes


def summarise(runs: list[Run]) -> dict:
    out = {}
    for run in runs:
        table = {}
        for system in ("no_memory", "bm25", "memo"):
            rows = [o for o in run.outcomes if o.system == system]
            entry = {}
            for kind in ("single_hop", "cross_document"):
                subset = [o for o in rows if o.kind == kind]
                entry[kind] = round(100 * sum(o.correct for o in subset) / len(subset), 1) if subset else None
            entry["latency_p50_s"] = round(statistics.median(o.seconds for o in rows), 2) if rows else None
            entry["memory_used"] = (
                sum(1 for o in rows if o.memory and o.memory.get("used")) if system == "memo" else None
            )
            table[system] = entry
        out[run.label] = {"accuracy": table, "ingest": {k: v for k, v in run.ingest.items() if k != "jobs"}}
        if run.ingest.get("jobs"):
            out[run.label]["step_yields"] = [j.get("step_yields") for j in run.ingest["jobs"]]
    return out


def markdown(summary: dict, args, started: str) -> str:
    lines = [
        SECTION,
        "",
        f"`python -m bench.memory_qa --documents {args.documents} --seed {args.seed} --mode {args.mode}` "
        f"({started}; CPU, default models: SmolLM2-135M-Instruct as executive, generator and memory base).",
        "",
        "| corpus | system | single-hop % | cross-document % | chat latency p50 (s) |",
        "|---|---|---|---|---|",
    ]
    for label, entry in summary.items():
        for system, row in entry["accuracy"].items():
            lines.append(
                f"| {label} | {system} | {row['single_hop']} | {row['cross_document']} | {row['latency_p50_s']} |"
            )
    lines.append("")
    for label, entry in summary.items():
        ingest = entry["ingest"]
        if ingest:
            lines.append(
                f"- {label}: {ingest['documents']} documents learned in {ingest['learned_s']} s "
                f"(succeeded: {ingest['succeeded']})"
            )
        for yields in entry.get("step_yields", []) or []:
            if yields:
                per_step = ", ".join(f"{s['step']} {s['kept']}/{s['candidates']}" for s in yields)
                lines.append(f"  - reflection yields (kept/candidates): {per_step}")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--mode", choices=["three_stage", "single_pass"], default="three_stage")
    parser.add_argument("--no-distractors", action="store_true")
    parser.add_argument("--questions", type=int, default=0, help="ask at most this many questions (0: all)")
    parser.add_argument("--bm25-k", type=int, default=2)
    parser.add_argument("--ingest-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "memory_qa.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    corpus = generate(args.seed, args.documents)
    questions = corpus.questions[: args.questions] if args.questions else corpus.questions
    proc = None
    url = args.url
    if url is None:
        proc, url = start_stack()
    started = time.strftime("%Y-%m-%d")
    try:
        client = httpx.Client(base_url=url, timeout=120)
        runs = []
        variants = [("clean", corpus.documents)]
        if not args.no_distractors:
            variants.append(("distractors", corpus.documents + corpus.distractors))
        for label, docs in variants:
            namespace = f"bench-{args.seed}-{args.documents}-{label}"
            run = Run(label, ingest_and_wait(client, namespace, docs, args.ingest_timeout))
            print(f"{label}: learned {len(docs)} documents in {run.ingest['learned_s']} s", file=sys.stderr)
            run.outcomes = evaluate(client, corpus, docs, namespace, questions, args.mode, args.bm25_k, label)
            runs.append(run)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    summary = summarise(runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "summary": summary,
                "runs": [asdict(r) for r in runs],
            },
            indent=1,
        )
    )
    text = markdown(summary, args, started)
    write_section(args.docs, text)
    print(text)


if __name__ == "__main__":
    main()
