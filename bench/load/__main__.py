"""Load test of the gateway: streaming chats at several concurrencies (closed loop) or
arrival rates (open loop), then a leak check of every service's resident memory.

    python -m bench.load                                   # starts its own stack
    python -m bench.load --concurrency 16 --requests 200   # one level
    python -m bench.load --rate 0.5 1 --requests 60        # open loop, Poisson arrivals
    python -m bench.load --url http://127.0.0.1:8000 --launcher-pid 1234   # a running stack

Each level reports TTFT, inter-chunk latency (ITL) and end-to-end latency (p50/p90/p99),
tokens/s, req/s, errors by kind and 429s (deliberate refusals, retried after their
Retry-After). The leak check warms the stack up, samples the RSS of redis and each
service, runs --leak-requests more requests, lets the stack settle and samples again.
Exit status 1 when any request failed other than by 429, or a process grew more than
--max-rss-growth, restarted or vanished; results go to --json either way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.load.client import ChatLoad, RequestRecord, Send, closed_loop, open_loop
from bench.load.rss import RssGrowth, compare_rss, format_rss_table, sample_rss
from bench.load.stats import LevelSummary, format_table, summarise
from bench.prompts import mtbench_questions
from bench.results_json import write_results
from bench.stack import ROOT, start_stack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="a running gateway; default: start a stack (scripts/launch.py)")
    parser.add_argument("--launcher-pid", type=int, help="with --url: the launcher's pid, for the leak check")
    parser.add_argument("--api-key", default="", help="bearer key, when the gateway wants one")
    parser.add_argument("--model", help="default: the gateway's /v1/models")
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 32])
    levels.add_argument("--rate", type=float, nargs="+", help="open loop: arrivals per second")
    parser.add_argument("--requests", type=int, default=64, help="per level")
    parser.add_argument("--duration-s", type=float, help="per level, instead of --requests")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--speculative", choices=["off", "on", "default"], default="off",
        help="the request's `speculative` field (default: not sent, the gateway's default, which "
        "speculates). Off by default, so that levels measure the batched plain decoding alone",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=16, help="requests before any measurement")
    parser.add_argument("--leak-requests", type=int, default=500, help="0 skips the leak check")
    parser.add_argument("--leak-concurrency", type=int, default=16)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle time before each RSS sample")
    parser.add_argument("--max-429-retries", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    parser.add_argument("--seed", type=int, default=0, help="prompt order and open-loop arrivals")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args(argv)
    if args.url and args.leak_requests and args.launcher_pid is None:
        parser.error("the leak check against --url needs --launcher-pid (or --leak-requests 0)")
    return args


def mtbench_prompts(seed: int) -> list[str]:
    prompts = [q["turns"][0] for q in mtbench_questions()]
    random.Random(seed).shuffle(prompts)
    return prompts


def with_progress(send: Send, name: str, total: int | None) -> Send:
    """``send``, printing a line to stderr every tenth of ``total`` requests."""
    done = 0
    step = max(1, (total or 100) // 10)

    async def send_and_count(index: int) -> RequestRecord:
        nonlocal done
        record = await send(index)
        done += 1
        if done % step == 0:
            print(f"  {name}: {done}/{total or '?'} requests", file=sys.stderr, flush=True)
        return record

    return send_and_count


def error_examples(records: list[RequestRecord], per_kind: int = 3) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = {}
    for record in records:
        if record.outcome == "error" and len(examples.setdefault(record.error, [])) < per_kind:
            examples[record.error].append(record.error_detail)
    return examples


async def run_level(
    load: ChatLoad, args, name: str, concurrency: int | None = None, rate: float | None = None
) -> tuple[LevelSummary, list[RequestRecord]]:
    requests = None if args.duration_s else args.requests
    send = with_progress(load.send, name, requests)
    if rate is not None:
        records, wall = await open_loop(send, rate, requests, args.duration_s, seed=args.seed)
    else:
        records, wall = await closed_loop(send, concurrency, requests, args.duration_s)
    summary = summarise(name, records, wall, concurrency=concurrency, rate_per_s=rate)
    print(
        f"{name}: {summary.completed}/{summary.requests} completed, errors {summary.errors or 0}, "
        f"429s {summary.rate_limited_responses}, {summary.tokens_per_s:.1f} tok/s, "
        f"TTFT p50 {summary.ttft_s.p50 * 1e3:.0f} ms, wall {wall:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return summary, records


@dataclass
class LoadRun:
    model: str
    warmup: LevelSummary | None = None
    levels: list[LevelSummary] = field(default_factory=list)
    rss: list[RssGrowth] = field(default_factory=list)  # empty: no leak check
    error_examples: dict[str, list[str]] = field(default_factory=dict)

    def failures(self, max_rss_growth: float) -> list[str]:
        found = [
            f"{level.name}: errors {level.errors}"
            for level in ([self.warmup] if self.warmup else []) + self.levels
            if level.errors
        ]
        return found + [p for p in (row.problem(max_rss_growth) for row in self.rss) if p]


async def run(args, url: str, launcher_pid: int | None) -> LoadRun:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        model = args.model
        if model is None:
            response = await client.get(f"{url}/v1/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        load = ChatLoad(
            client=client,
            url=url,
            model=model,
            prompts=mtbench_prompts(args.seed),
            max_tokens=args.max_tokens,
            speculative={"default": None, "on": True, "off": False}[args.speculative],
            max_rate_limited_retries=args.max_429_retries,
        )
        result = LoadRun(model)
        all_records: list[RequestRecord] = []
        concurrencies = [] if args.rate else args.concurrency

        if args.warmup:
            # At the highest concurrency, so that every buffer reaches its working size
            # before anything is measured.
            concurrency = max([*concurrencies, args.leak_concurrency])
            records, wall = await closed_loop(load.send, concurrency, args.warmup)
            all_records += records
            result.warmup = summarise(f"warm-up c={concurrency}", records, wall, concurrency)

        for rate in args.rate or []:
            summary, records = await run_level(load, args, f"rate={rate:g}/s", rate=rate)
            result.levels.append(summary)
            all_records += records
        for concurrency in concurrencies:
            summary, records = await run_level(load, args, f"c={concurrency}", concurrency=concurrency)
            result.levels.append(summary)
            all_records += records

        if args.leak_requests:
            name = f"leak check c={args.leak_concurrency}"
            await asyncio.sleep(args.settle_s)
            before = sample_rss(launcher_pid)
            send = with_progress(load.send, name, args.leak_requests)
            records, wall = await closed_loop(send, args.leak_concurrency, args.leak_requests)
            all_records += records
            result.levels.append(summarise(name, records, wall, args.leak_concurrency))
            await asyncio.sleep(args.settle_s)
            result.rss = compare_rss(before, sample_rss(launcher_pid))

        result.error_examples = error_examples(all_records)
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()
    stack = None
    url, launcher_pid = args.url, args.launcher_pid
    with tempfile.TemporaryDirectory(prefix="aerie-load-") as data_dir:
        if url is None:
            log_path = Path(tempfile.gettempdir()) / f"aerie-load-stack-{os.getpid()}.log"
            print(f"starting the stack (log: {log_path}) ...", file=sys.stderr, flush=True)
            stack = start_stack(Path(data_dir), log_path, env_overrides={"AERIE_API_KEYS": ""})
            url, launcher_pid = stack.url, stack.proc.pid
        try:
            result = asyncio.run(run(args, url, launcher_pid))
        finally:
            if stack is not None:
                stack.stop()
    failures = result.failures(args.max_rss_growth)
    report = {
        "started": started,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_before": load_before[0],
            "load_average_1m_after": os.getloadavg()[0],
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **asdict(result),
        "failures": failures,
        "passed": not failures,
    }
    write_results(args.json, report)

    print(format_table(result.levels))
    if result.rss:
        print()
        print(format_rss_table(result.rss))
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print(f"results: {args.json}", file=sys.stderr)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
