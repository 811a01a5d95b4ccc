"""``python -m bench.memory_qa.passages NAMESPACE_DIR``: how much of its entity passages a
memory recalls, offline, from the adapters a run left on disk.

For every "What do you know about <entity>?" reflection of the served version's adapters
it asks the memory (greedy, as /memory/query does, but with room for the whole passage)
and counts the passages recalled whole and the sentences recalled, per adapter that
first learned them. ``--merge`` picks the weights: ``served`` (the version as the service
builds it), ``newest`` (the last adapter alone), or ``ties:DENSITY`` (every adapter of the
version, TIES-merged at that density). NAMESPACE_DIR is
``AERIE_MODEL_CACHE/memory/<namespace>``; the version is the newest one there unless
``--version`` names it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from aerie_common.entities import facts_question_entity
from aerie_memory.models import build_memory, load_reflections
from aerie_memory.recall_decoding import LearnedAnswers, answer
from aerie_memory.settings import MemorySettings
from aerie_memory.store import Version
from aerie_memory.text import split_sentences
from aerie_memory.ties import apply_deltas, merge_adapters
from aerie_memory.training import IDK, load_adapter
from aerie_memory.worker import make_base_loader


def saved_version(namespace_dir: Path, name: str = "") -> Version:
    """The model version ``name`` (e.g. v0002) a run left under NAMESPACE_DIR; the newest
    one without a name."""
    versions = sorted(p.name for p in namespace_dir.glob("v*") if (p / "manifest.json").is_file())
    if not versions:
        raise SystemExit(f"no model version under {namespace_dir}")
    return Version.from_json((namespace_dir / (name or versions[-1]) / "manifest.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("namespace_dir", type=Path)
    parser.add_argument("--version", default="", help="e.g. v0002; default: the newest")
    parser.add_argument("--merge", default="served", help="served | newest | ties:DENSITY")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    version = saved_version(args.namespace_dir, args.version)
    base_loader = make_base_loader(MemorySettings())  # the memory service's own
    ids = [a["id"] for a in version.adapters]

    if args.merge == "served":
        memory = build_memory(base_loader, args.namespace_dir.parent, args.namespace_dir.name, version)
        model, tokenizer = memory.model, memory.tokenizer
    else:
        model, tokenizer = base_loader()
        if args.merge == "newest":
            apply_deltas(
                model, merge_adapters([load_adapter(args.namespace_dir / "adapters" / ids[-1])], 1.0)
            )
        elif args.merge.startswith("ties:"):
            adapters = [load_adapter(args.namespace_dir / "adapters" / i) for i in ids]
            apply_deltas(model, merge_adapters(adapters, float(args.merge.split(":", 1)[1])))
        else:
            parser.error(f"--merge: served, newest or ties:DENSITY, got {args.merge!r}")
    torch.set_num_threads(args.threads)  # after the loader, which sets the service's count

    passages: dict[str, tuple[str, str]] = {}  # question -> (adapter that first learned it, answer)
    pairs = []
    for adapter_id in ids:
        for r in load_reflections(args.namespace_dir / "adapters" / adapter_id):
            pairs.append((r.question, r.answer))
            if facts_question_entity(r.question) and r.question not in passages:
                passages[r.question] = (adapter_id, r.answer)
    learned = LearnedAnswers(tokenizer, pairs, phrases=(IDK,))  # drafts: faster, the same answers

    whole = dict.fromkeys(ids, 0)
    total = dict.fromkeys(ids, 0)
    sentences_recalled = sentences = 0
    misses = []
    for question, (adapter_id, gold) in passages.items():
        recalled = answer(model, tokenizer, question, args.max_tokens, learned)
        wanted = split_sentences(gold)
        hits = sum(sentence in recalled for sentence in wanted)
        sentences_recalled += hits
        sentences += len(wanted)
        total[adapter_id] += 1
        whole[adapter_id] += hits == len(wanted)
        if hits < len(wanted):
            misses.append({"question": question, "gold": gold, "recalled": recalled})
    report = {
        "version": version.version,
        "merge": args.merge,
        "passages_whole": {i: f"{whole[i]}/{total[i]}" for i in ids},
        "sentences": f"{sentences_recalled}/{sentences}",
        "misses": misses,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
