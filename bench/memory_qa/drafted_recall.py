"""``python -m bench.memory_qa.drafted_recall NAMESPACE_DIR [--corpus CORPUS.json]``: how much
faster the memory answers when the answers it learned draft its recall, offline, side by
side on one loaded memory.

It asks the memory (the served version, as the memory service builds it, on the service's
one thread) every "What do you know about <entity>?" it learned, and with ``--corpus`` the
corpus's questions as a user would put them (the gateway's grounding question), each
three times in turn: with transformers' generate() (as the service did before drafting),
with its own loop one token per forward, and drafted from the learned answers
(aerie_memory.recall_decoding). It reports the seconds and forwards of each, their ratio,
and whether every answer is the same. NAMESPACE_DIR is ``AERIE_MODEL_CACHE/memory/<namespace>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from aerie_common.entities import facts_question_entity
from aerie_gateway.settings import GatewaySettings
from aerie_memory.models import build_memory
from aerie_memory.recall_decoding import answer_ids
from aerie_memory.settings import MemorySettings
from aerie_memory.training import prompt_ids
from aerie_memory.worker import make_base_loader
from tqdm import tqdm

from bench.memory_qa.passages import saved_version


@torch.no_grad()
def hf_generate_ids(model, tokenizer, question: str, max_new_tokens: int) -> list[int]:
    """The answer as the memory service decoded it before drafting: transformers' generate()."""
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("namespace_dir", type=Path)
    parser.add_argument("--corpus", type=Path, help="a bench.memory_qa corpus: its questions too")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=MemorySettings().memory_query_max_tokens,
        help="per answer to a user's question (default: the memory service's)",
    )
    parser.add_argument(
        "--facts-max-tokens",
        type=int,
        default=GatewaySettings().memory_passage_max_tokens,
        help="per answer to a facts question (default: what the gateway asks for)",
    )
    parser.add_argument("--threads", type=int, default=MemorySettings().memory_torch_threads)
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()

    version = saved_version(args.namespace_dir)
    memory = build_memory(
        make_base_loader(MemorySettings()), args.namespace_dir.parent, args.namespace_dir.name, version
    )
    torch.set_num_threads(args.threads)  # after the loader, which sets the service's count

    questions = list(
        dict.fromkeys(r.question for r in memory.reflections if facts_question_entity(r.question))
    )
    kinds = ["facts"] * len(questions)
    if args.corpus:
        asked = [q["question"] for q in json.loads(args.corpus.read_text())["questions"]]
        questions += asked
        kinds += ["user"] * len(asked)

    totals = {
        kind: {
            "questions": 0,
            "tokens": 0,
            "generate_s": 0.0,
            "plain_s": 0.0,
            "drafted_s": 0.0,
            "drafted_forwards": 0,
        }
        for kind in ("facts", "user")
    }
    differing = []
    model, tokenizer = memory.model, memory.tokenizer
    for question, kind in zip(tqdm(questions, desc="questions", unit="question"), kinds, strict=True):
        max_tokens = args.facts_max_tokens if kind == "facts" else args.max_tokens
        generated, generate_s = timed(hf_generate_ids, model, tokenizer, question, max_tokens)
        (plain, _), plain_s = timed(answer_ids, model, tokenizer, question, max_tokens)
        (drafted, forwards), drafted_s = timed(
            answer_ids, model, tokenizer, question, max_tokens, memory.learned_answers
        )
        total = totals[kind]
        total["questions"] += 1
        total["tokens"] += len(plain)  # and as many forwards, one per token
        total["generate_s"] += generate_s
        total["plain_s"] += plain_s
        total["drafted_s"] += drafted_s
        total["drafted_forwards"] += forwards
        if not drafted == plain == generated:
            differing.append(
                {
                    "question": question,
                    **{
                        k: tokenizer.decode(v)
                        for k, v in (("generate", generated), ("plain", plain), ("drafted", drafted))
                    },
                }
            )
    for total in totals.values():
        if total["questions"]:
            total["drafted_speedup_over_generate"] = round(total["generate_s"] / total["drafted_s"], 2)
            total["drafted_speedup_over_plain"] = round(total["plain_s"] / total["drafted_s"], 2)
            for key in ("generate_s", "plain_s", "drafted_s"):
                total[key] = round(total[key], 1)
    report = {
        "namespace": args.namespace_dir.name,
        "version": version.version,
        "threads": args.threads,
        "max_tokens": {"facts": args.facts_max_tokens, "user": args.max_tokens},
        "answers": {k: v for k, v in totals.items() if v["questions"]},
        "differing": differing,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
