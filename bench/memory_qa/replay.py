"""Replay recorded memory recalls through the chat composition, offline.

A ``bench.memory_qa`` run records, for every memo answer, what the memory recalled (the
``memory`` extension field: the findings and the identified entity). This command rebuilds
each protocol result from them, composes the prompt with the gateway's current
``compose_messages``, and has the target answer it in-process (greedy, the bench's 32
tokens, the bench's scoring). The memory and the protocol's questions are held fixed, so a
change to composition is measured in minutes, not in a 30-minute benchmark run, and side
by side with the recorded live answers:

    python -m bench.memory_qa.replay bench/results/memory_qa.json bench/results/memory_qa_seed1_memo.json

It prints, per file and run (clean, distractors), the live and replayed accuracy by
question type and the questions whose outcome changed.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from bench.memory_qa.__main__ import KINDS, MODEL
from bench.memory_qa.corpus import is_correct

MAX_TOKENS = 32  # as bench.memory_qa's chats


def protocol_result(question: str, memory: dict):
    from aerie_gateway.memory_protocol import Finding, ProtocolResult

    findings = [Finding(f["stage"], f["question"], f["answer"], f["sources"]) for f in memory["findings"]]
    return ProtocolResult(
        mode=memory["mode"], question=question, findings=findings, entity=memory.get("entity")
    )


def recorded_cases(path: Path) -> list[dict]:
    """Every memo outcome of the file whose recall was recorded, with its run's label."""
    data = json.loads(path.read_text())
    return [
        {**outcome, "file": path.name, "run": run["label"]}
        for run in data["runs"]
        for outcome in run["outcomes"]
        if outcome["system"] == "memo"
        and outcome.get("memory")
        and outcome["memory"].get("findings") is not None
    ]


class Executive:
    """The target answering chats in-process, as the verifier does behind the gateway."""

    def __init__(self, threads: int, max_running: int):
        from aerie_common.model_store import load_target
        from aerie_common.settings import ModelSettings
        from aerie_verifier.engine import Engine

        target, self.tokenizer, _ = load_target(ModelSettings(torch_threads=threads))
        self.engine = Engine(target, self.tokenizer, max_running=max_running)
        self.engine.start()

    def answer(self, messages: list[dict[str, str]]) -> str:
        from aerie_verifier.sampling import SamplingParams

        done, tokens, errors = threading.Event(), [], []

        def on_event(event):
            tokens.extend(event.token_ids)
            if event.finish_reason is not None:
                errors.append(event.error)
                done.set()

        prompt = self.engine.encode_chat(messages)
        self.engine.submit(f"replay-{id(done)}", prompt, SamplingParams(max_tokens=MAX_TOKENS), on_event)
        done.wait()
        if errors[0]:
            raise RuntimeError(errors[0])
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def replay(cases: list[dict], executive: Executive, concurrency: int) -> list[dict]:
    from aerie_gateway.memory_protocol import compose_messages

    def one(case: dict) -> dict:
        # a follow-up: the question the memory was asked, after its conversation
        result = protocol_result(case["memory"].get("question") or case["question"], case["memory"])
        messages = [*case.get("history", []), {"role": "user", "content": case["question"]}]
        response = executive.answer(compose_messages(messages, result))
        return {**case, "replayed": response, "replayed_correct": is_correct(response, case["gold"])}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(one, cases), total=len(cases), desc="replay", unit="answer"))


def report(rows: list[dict]) -> None:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["file"], row["run"]), []).append(row)
    totals = Counter()
    for (file, run), group in groups.items():
        cells = []
        for kind in KINDS:
            of_kind = [r for r in group if r["kind"] == kind]
            live = sum(r["correct"] for r in of_kind)
            again = sum(r["replayed_correct"] for r in of_kind)
            totals[f"{kind} live"] += live
            totals[f"{kind} replayed"] += again
            totals[f"{kind} n"] += len(of_kind)
            cells.append(f"{kind} live {live}/{len(of_kind)} replayed {again}/{len(of_kind)}")
        print(f"{file} {run}: " + "; ".join(cells))
        for r in group:
            if r["correct"] != r["replayed_correct"]:
                mark = "gained" if r["replayed_correct"] else "lost"
                print(f"  {mark}: {r['question']} (gold {r['gold']!r}) -> {r['replayed'][:100]!r}")
    print(
        "total: "
        + "; ".join(
            f"{k} live {totals[f'{k} live']} replayed {totals[f'{k} replayed']} of {totals[f'{k} n']}"
            for k in KINDS
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="bench.memory_qa JSON result files")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    parser.add_argument("--concurrency", type=int, default=8, help="chats decoded as one batch")
    parser.add_argument("--out", type=Path, default=None, help="write every replayed answer as JSON here")
    args = parser.parse_args(argv)

    cases = [case for path in args.results for case in recorded_cases(path)]
    print(f"{len(cases)} recorded memo answers; executive {MODEL}, greedy, {MAX_TOKENS} tokens")
    rows = replay(cases, Executive(args.threads, args.concurrency), args.concurrency)
    report(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
