"""Serving benchmark: the gateway (HTTP → gRPC → engine) against the same engine called
in-process, on the same MT-bench prompts, in one run, interleaved batch by batch.

Reports time to first token (TTFT), inter-token latency (ITL), end-to-end latency and
tokens/s at each concurrency, and the overhead of the gateway and gRPC hop as a ratio
of the in-process figures.

    python -m bench.serving                      # starts its own stack (scripts/launch.py)
    python -m bench.serving --url http://127.0.0.1:8000   # against a running stack
    python -m bench.serving --speculative --concurrency 1  # the gateway's requests speculate

With ``--speculative`` the gateway's requests speculate (the verifier drafting with the
drafter service over gRPC, as `make up` runs it) while the in-process engine decodes
plainly, so the tokens/s ratio is the speedup of the whole stack over plain decoding; a
``gateway-plain`` mode then sends the same requests through the gateway without
speculation, so that what speculation adds through the stack is measured apart from what
the gateway costs.
``--hf-baseline`` adds Hugging Face ``generate()`` (greedy, on a stock copy of the target)
at concurrency 1, interleaved with the other two, so the whole stack is also measured
against the peer a user starts from (no streaming there: its TTFT and ITL are blank).

    python -m bench.serving --speculative --hf-baseline --concurrency 1 --min-requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import httpx

from bench.chat_stream import stream_chat
from bench.prompts import mtbench_questions, round_robin_by_category
from bench.results_json import write_results
from bench.stack import ROOT, start_stack


@dataclass
class RequestResult:
    ttft_s: float
    e2e_s: float
    completion_tokens: int

    @property
    def itl_s(self) -> float | None:
        """Mean time between tokens after the first."""
        if self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    ttft_p50_s: float
    itl_mean_s: float
    e2e_p50_s: float
    tokens_per_s: float  # all completion tokens / wall time of the level


def summarise(mode: str, concurrency: int, results: list[RequestResult], wall_s: float) -> LevelResult:
    itls = [r.itl_s for r in results if r.itl_s is not None]
    return LevelResult(
        mode=mode,
        concurrency=concurrency,
        requests=len(results),
        ttft_p50_s=statistics.median(r.ttft_s for r in results),
        itl_mean_s=statistics.fmean(itls) if itls else float("nan"),
        e2e_p50_s=statistics.median(r.e2e_s for r in results),
        tokens_per_s=sum(r.completion_tokens for r in results) / wall_s,
    )


async def run_level(one_request, prompts: list[str], concurrency: int) -> tuple[list[RequestResult], float]:
    queue = list(prompts)
    results: list[RequestResult] = []

    async def worker():
        while queue:
            results.append(await one_request(queue.pop(0)))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


def gateway_client(base_url: str, model: str, max_tokens: int, speculative: bool):
    client = httpx.AsyncClient(timeout=600)

    async def one_request(prompt: str) -> RequestResult:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            # Plain by default: then this measures the gateway and the gRPC hop only.
            "speculative": speculative,
        }
        chat = await stream_chat(client, f"{base_url}/v1/chat/completions", body)
        if not chat.ok:
            raise RuntimeError(f"request failed: {chat.error} {chat.error_detail}")
        ttft = chat.ttft_s if chat.ttft_s is not None else float("nan")
        return RequestResult(ttft, chat.e2e_s, chat.completion_tokens or 0)

    return client, one_request


def inprocess_client(engine, max_tokens: int):
    from aerie_verifier.sampling import SamplingParams

    async def one_request(prompt: str) -> RequestResult:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        state = {"first": None, "tokens": 0}
        started = time.perf_counter()

        def on_event(event):  # engine thread
            now = time.perf_counter() - started
            if state["first"] is None and event.text:
                state["first"] = now
            state["tokens"] = event.completion_tokens
            if event.finish_reason is not None:
                state["end"] = now
                loop.call_soon_threadsafe(done.set)

        ids = engine.encode_chat([{"role": "user", "content": prompt}])
        engine.submit("bench", ids, SamplingParams(max_tokens=max_tokens), on_event)
        await done.wait()
        first = state["first"] if state["first"] is not None else float("nan")
        return RequestResult(first, state["end"], state["tokens"])

    return one_request


def inprocess_batches(model, tokenizer, max_tokens: int, max_running: int):
    """Batches of requests to the engine in this process, each on an engine started for it
    and stopped after. A live engine thread keeps its OpenMP team, and while it does, the
    team of the thread running Hugging Face's generate() sleeps between parallel regions
    instead of spinning (aerie_common.torch_threads): on a 2-core Intel Xeon HF ran at
    18.8 tokens/s beside an idle engine thread and 32.4 without one."""
    from aerie_verifier.engine import Engine

    async def run_batch(prompts: list[str], concurrency: int) -> tuple[list[RequestResult], float]:
        engine = Engine(model, tokenizer, max_running=max_running, max_waiting=1024)
        engine.start()
        try:
            return await run_level(inprocess_client(engine, max_tokens), prompts, concurrency)
        finally:
            engine.stop()

    return run_batch


def hf_generate_client(engine, max_tokens: int):
    """Hugging Face generate() on the prompts the engine would get, on a stock copy of its
    target: the engine tunes its own copy for tree verification. Each generation runs on a
    thread that ends with it (bench.speculative.run_hf)."""
    from aerie_common.model_store import load_target
    from aerie_common.settings import ModelSettings
    from aerie_common.torch_threads import in_passing_thread

    from bench.speculative import run_hf

    hf_model, _, _ = in_passing_thread(load_target, ModelSettings())

    async def one_request(prompt: str) -> RequestResult:
        ids = engine.encode_chat([{"role": "user", "content": prompt}])
        tokens, seconds = await asyncio.to_thread(run_hf, hf_model, ids, max_tokens, engine.eos_ids, None)
        return RequestResult(float("nan"), seconds, len(tokens))

    return one_request


def format_table(levels: list[LevelResult]) -> str:
    by_key = {(lv.mode, lv.concurrency): lv for lv in levels}
    lines = [
        "| concurrency | mode | requests | TTFT p50 (ms) | ITL mean (ms) | e2e p50 (s) | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        lines.append(
            f"| {lv.concurrency} | {lv.mode} | {lv.requests} | {lv.ttft_p50_s * 1e3:.0f} | "
            f"{lv.itl_mean_s * 1e3:.1f} | {lv.e2e_p50_s:.2f} | {lv.tokens_per_s:.1f} |"
        )
    lines += [
        "",
        "| concurrency | ITL overhead (gateway/in-process − 1) | TTFT overhead | tokens/s ratio |",
        "|---:|---:|---:|---:|",
    ]
    for c in sorted({lv.concurrency for lv in levels}):
        gw, ip = by_key.get(("gateway", c)), by_key.get(("in-process", c))
        if gw and ip:
            lines.append(
                f"| {c} | {gw.itl_mean_s / ip.itl_mean_s - 1:+.1%} | {gw.ttft_p50_s / ip.ttft_p50_s - 1:+.1%} | "
                f"{gw.tokens_per_s / ip.tokens_per_s:.2f}× |"
            )
    hf = by_key.get(("hf-generate", 1))
    if hf:
        lines += ["", "| concurrency | mode | tokens/s over HF generate() |", "|---:|---|---:|"]
        for mode in ("in-process", "gateway", "gateway-plain"):
            if (mode, 1) in by_key:
                lines.append(f"| 1 | {mode} | {by_key[(mode, 1)].tokens_per_s / hf.tokens_per_s:.2f}× |")
    speculative = [
        (c, by_key[("gateway", c)], by_key[("gateway-plain", c)])
        for c in sorted({lv.concurrency for lv in levels})
        if ("gateway", c) in by_key and ("gateway-plain", c) in by_key
    ]
    if speculative:
        lines += [
            "",
            "| concurrency | through the gateway, speculative over plain (tokens/s) |",
            "|---:|---:|",
        ]
        for c, spec, plain in speculative:
            lines.append(f"| {c} | {spec.tokens_per_s / plain.tokens_per_s:.2f}× |")
    return "\n".join(lines)


async def main_async(args) -> list[LevelResult]:
    from aerie_common.model_store import load_target
    from aerie_common.settings import ModelSettings
    from aerie_common.torch_threads import in_passing_thread
    from aerie_verifier.engine import Engine

    # Every category in turn: MT-bench lists them in blocks, and the first block (writing)
    # is the one the shipped head drafts worst.
    questions = [q["turns"][0] for q in round_robin_by_category(mtbench_questions())]
    # No torch work on this thread: its OpenMP team would outlive the load.
    model, tokenizer, _ = in_passing_thread(load_target, ModelSettings())
    encoder = Engine(model, tokenizer)  # never started: encodes prompts, names EOS
    stack = None
    url = args.url
    if url is None:
        print("starting the stack ...", file=sys.stderr)
        # Without the prefix cache: the in-process engine has none, and every level sends the
        # same prompts again (bench.multi_turn measures the cache).
        stack = start_stack(env_overrides={"AERIE_PREFIX_CACHE_MB": "0"})
        url = stack.url
    client, via_gateway = gateway_client(url, args.model, args.max_tokens, args.speculative)
    clients = [client]
    batches = {
        "in-process": inprocess_batches(model, tokenizer, args.max_tokens, max(args.concurrency)),
        "gateway": partial(run_level, via_gateway),
    }
    if args.speculative:
        plain_client, via_gateway_plainly = gateway_client(url, args.model, args.max_tokens, False)
        clients.append(plain_client)
        batches["gateway-plain"] = partial(run_level, via_gateway_plainly)
    if args.hf_baseline:
        batches["hf-generate"] = partial(run_level, hf_generate_client(encoder, args.max_tokens))
    levels: list[LevelResult] = []
    try:
        # Warm every path once so none pays first-call costs in the measurement.
        for run_batch in batches.values():
            await run_batch(questions[:1], 1)
        for concurrency in args.concurrency:
            n = max(args.min_requests, 2 * concurrency)
            prompts = [questions[i % len(questions)] for i in range(n)]
            modes = {m: b for m, b in batches.items() if m != "hf-generate" or concurrency == 1}
            results = {mode: [] for mode in modes}
            walls = dict.fromkeys(modes, 0.0)
            # Interleave: one batch of `concurrency` requests per mode in turn, rotating
            # which goes first, so that machine noise falls on every mode alike.
            names = list(modes)
            for r, start in enumerate(range(0, n, concurrency)):
                batch = prompts[start : start + concurrency]
                first = r % len(names)
                for mode in names[first:] + names[:first]:
                    batch_results, wall = await modes[mode](batch, concurrency)
                    results[mode] += batch_results
                    walls[mode] += wall
            for mode in modes:
                level = summarise(mode, concurrency, results[mode], walls[mode])
                levels.append(level)
                print(
                    f"{mode:>10} c={concurrency:<3} {level.tokens_per_s:6.1f} tok/s  ITL {level.itl_mean_s * 1e3:6.1f} ms",
                    file=sys.stderr,
                )
    finally:
        for each in clients:
            await each.aclose()
        if stack is not None:
            stack.stop()
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running gateway; default: start a stack")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="the gateway's requests speculate; the in-process engine stays plain",
    )
    parser.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also Hugging Face generate() at concurrency 1, on a stock copy of the target",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    levels = asyncio.run(main_async(args))
    write_results(args.json, {"levels": [asdict(lv) for lv in levels]})  # with the machine
    print(format_table(levels))


if __name__ == "__main__":
    main()
