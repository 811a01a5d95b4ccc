"""The verifier beside a busy memory service: chat while the memory learns a corpus, and
MEMO's three-stage protocol for many chats at once, each under two settings of the stack.

For each setting (the stack as configured, then with ``--compare``'s variables), a stack
starts on a fresh data directory and

1. ingests the corpus; while the memory learns it (generating reflections through the
   verifier, then training its adapter), plain chats (MT-bench first turns,
   one at a time, temperature 0) measure the verifier's tokens/s; as many chats after it
   learned measure them with the memory idle;
2. runs the protocol (``memory_protocol.three_stage``, the gateway's own code, against the
   live verifier and memory over gRPC) for every question of the corpus, ``--concurrency``
   at once, timing each executive and memory call.

    python -m bench.memory_qa.beside_the_memory --corpus bench/memory_qa/handwritten_b.json \\
        --compare AERIE_ADAPTIVE_THREADS=false --json /tmp/beside.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
from aerie_gateway.memory_compose import MemoryComposer, executive_text
from aerie_gateway.memory_protocol import three_stage
from aerie_gateway.metrics import GatewayMetrics
from aerie_gateway.settings import GatewaySettings
from aerie_proto.v1 import memory_pb2_grpc, verifier_pb2_grpc

from bench.memory_qa.__main__ import ingest_and_wait
from bench.memory_qa.corpus import Corpus
from bench.prompts import mtbench_questions, round_robin_by_category
from bench.results_json import write_results
from bench.stack import free_port, start_stack

MODEL = "smollm2-135m-instruct"


def chat_tokens_per_s(client: httpx.Client, prompts: list[str], max_tokens: int, until=None) -> dict:
    """Plain greedy chats one after another, through ``prompts`` (again and again while
    ``until`` is given and not set)."""
    tokens, seconds, chats = 0, 0.0, 0
    while True:
        for prompt in prompts:
            started = time.perf_counter()
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0,
                    "max_tokens": max_tokens,
                    "speculative": False,
                },
            )
            response.raise_for_status()
            seconds += time.perf_counter() - started
            tokens += response.json()["usage"]["completion_tokens"]
            chats += 1
            if until is not None and until.is_set():
                break
        if until is None or until.is_set():
            break
    return {"chats": chats, "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else None}


async def protocol_at_concurrency(
    ports: dict, namespace: str, questions: list[str], concurrency: int
) -> dict:
    settings = GatewaySettings()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['verifier']}") as verifier,
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['memory']}") as memory,
    ):
        composer = MemoryComposer(
            memory_pb2_grpc.MemoryStub(memory),
            verifier_pb2_grpc.VerifierStub(verifier),
            settings,
            GatewayMetrics(),
        )
        calls: dict[str, list[float]] = {"executive": [], "memory": []}

        async def ask_memory(question):
            started = time.perf_counter()
            answer = await composer._ask_memory(namespace, question)
            calls["memory"].append(time.perf_counter() - started)
            return answer

        async def ask_executive(messages, max_tokens):
            started = time.perf_counter()
            text = await executive_text(
                composer.verifier, messages, max_tokens, settings.memory_timeout_s, False
            )
            calls["executive"].append(time.perf_counter() - started)
            return text

        gate = asyncio.Semaphore(concurrency)

        async def one(question):
            async with gate:
                started = time.perf_counter()
                await three_stage(question, ask_memory, ask_executive, max_turns=settings.memory_max_turns)
                return time.perf_counter() - started

        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(q) for q in questions))
        wall = time.perf_counter() - started
    return {
        "questions": len(questions),
        "wall_s": round(wall, 2),
        "p50_s": round(statistics.median(latencies), 2),
        **{
            f"{kind}_calls": {
                "count": len(seconds),
                "sum_s": round(sum(seconds), 1),
                "p50_s": round(statistics.median(seconds), 2),
            }
            for kind, seconds in calls.items()
        },
    }


def run_setting(label: str, env: dict[str, str], corpus: Corpus, args) -> dict:
    ports = {"verifier": free_port(), "memory": free_port()}
    env = {"AERIE_VERIFIER_PORT": str(ports["verifier"]), "AERIE_MEMORY_PORT": str(ports["memory"]), **env}
    data_dir = Path(tempfile.mkdtemp(prefix=f"aerie-beside-{label}-"))
    stack = start_stack(data_dir, args.json.with_suffix(f".{label}.log"), env)
    prompts = [q["turns"][0] for q in round_robin_by_category(mtbench_questions())[: args.prompts]]
    namespace = f"beside-{label}-{int(time.time())}"
    try:
        client = httpx.Client(base_url=stack.url, timeout=600)
        learned = threading.Event()
        during: dict = {}
        chatting = threading.Thread(
            target=lambda: during.update(chat_tokens_per_s(client, prompts, args.max_tokens, learned))
        )
        chatting.start()
        try:
            ingest = ingest_and_wait(client, namespace, corpus.documents, args.ingest_timeout)
        finally:
            learned.set()
            chatting.join()
        if not ingest["succeeded"]:
            raise SystemExit(f"{label}: learning failed: {ingest['jobs']}")
        idle = chat_tokens_per_s(client, prompts, args.max_tokens)
        questions = [q.question for q in corpus.questions]
        protocol = asyncio.run(protocol_at_concurrency(ports, namespace, questions, args.concurrency))
    finally:
        stack.stop()
    result = {
        "setting": label,
        "env": env,
        "learned_s": ingest["learned_s"],
        "chat_while_learning": during,
        "chat_after": idle,
        "protocol": protocol,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--compare", nargs="*", default=[], help="VAR=VALUE settings of the second stack")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="MT-bench first turns, in turn")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ingest-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    corpus = Corpus.from_json(json.loads(args.corpus.read_text()))
    compare = dict(item.split("=", 1) for item in args.compare)
    settings = {"as_configured": {}, **({"compared": compare} if compare else {})}
    results = [run_setting(label, env, corpus, args) for label, env in settings.items()]
    summary = {}
    if len(results) == 2:
        first, second = results
        summary = {
            "chat_while_learning_ratio": _ratio(first, second, "chat_while_learning", "tokens_per_s"),
            "chat_after_ratio": _ratio(first, second, "chat_after", "tokens_per_s"),
            "protocol_wall_ratio": round(second["protocol"]["wall_s"] / first["protocol"]["wall_s"], 3),
        }
    write_results(
        args.json,
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "summary": summary},
    )
    print(json.dumps(summary))


def _ratio(first: dict, second: dict, phase: str, key: str) -> float | None:
    a, b = first[phase].get(key), second[phase].get(key)
    return round(a / b, 3) if a and b else None


if __name__ == "__main__":
    main()
