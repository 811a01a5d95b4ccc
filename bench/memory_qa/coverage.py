"""``python -m bench.memory_qa.coverage [CORPUS.json ...]``: what the memory is given to
learn, offline, in seconds.

For every single-hop question of a corpus it checks whether the gold answer is in the
entity passage ("What do you know about X?") of an entity the question names (the
writer's, for a question in the first person), as the memory service's reflection step
builds those passages (its coreference, its sentence splitting, its training-length
budget counted with the memory's tokenizer). An answer missing there can still be
learned from a generated fact, but a memory cannot recall what it was never shown, so
this bounds what a change to those rules can gain before a 30-minute ``bench.memory_qa``
run measures it. Without arguments: the generated corpora
(seeds 0-2, both styles, 20 documents with their distractors) and the hand-written ones.
Each line ends with a fingerprint of all the passages, which tells whether a change
altered any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from aerie_common.entities import facts_question_entity

from bench.memory_qa.corpus import STYLES, Corpus, generate, is_correct

HANDWRITTEN = sorted((Path(__file__).parent).glob("handwritten*.json"))


def passages(documents: list[dict], fits: Callable[[str, str], bool]) -> dict[str, str]:
    """Entity -> its passage, as the reflection step makes them."""
    from aerie_memory.reflection import ReflectionConfig, SourceDocument, StepStats, _passages, read_documents

    sources = [SourceDocument(d["id"], d["text"]) for d in documents]
    _, chunks = read_documents(sources, ReflectionConfig().chunk_chars)
    return {
        entity: r.answer
        for r in _passages(StepStats("passages"), chunks, fits)
        if (entity := facts_question_entity(r.question))
    }


def _asks_about(question: str, entity: str) -> bool:
    """Whether ``question`` names ``entity``, or is in the first person, for the writer's."""
    from aerie_common.entities import in_first_person
    from aerie_memory.coreference import WRITER

    return in_first_person(question) if entity == WRITER else entity in question


def coverage(corpus: Corpus, fits: Callable[[str, str], bool]) -> tuple[int, list[str], str]:
    """(single-hop questions covered, the questions missed, the passages' fingerprint)."""
    found = passages(corpus.documents + corpus.distractors, fits)
    covered, missed = 0, []
    for q in corpus.questions:
        if q.kind != "single_hop":
            continue
        if any(
            is_correct(text, q.answer) for entity, text in found.items() if _asks_about(q.question, entity)
        ):
            covered += 1
        else:
            missed.append(f"{q.question} (gold: {q.answer})")
    fingerprint = hashlib.sha256(json.dumps(sorted(found.items())).encode()).hexdigest()[:8]
    return covered, missed, fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpora", nargs="*", type=Path, help="corpus JSON files (default: see above)")
    parser.add_argument("--verbose", "-v", action="store_true", help="list the questions missed")
    args = parser.parse_args()

    from aerie_common.model_store import resolve_model_dir
    from aerie_memory.settings import MemorySettings
    from aerie_memory.training import fits_training
    from transformers import AutoTokenizer

    settings = MemorySettings()
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_dir(settings.memory_base_model, settings.model_cache)
    )

    def fits(question: str, answer: str) -> bool:
        return fits_training(tokenizer, question, answer, settings.memory_max_seq_tokens)

    named: list[tuple[str, Corpus]] = []
    if args.corpora:
        named = [(str(p), Corpus.from_json(json.loads(p.read_text()))) for p in args.corpora]
    else:
        named = [
            (f"{style} seed {seed}", generate(seed, 20, style)) for style in STYLES for seed in (0, 1, 2)
        ]
        named += [(p.name, Corpus.from_json(json.loads(p.read_text()))) for p in HANDWRITTEN]
    for name, corpus in named:
        covered, missed, fingerprint = coverage(corpus, fits)
        total = covered + len(missed)
        print(f"{name:32s} {covered:3d}/{total} single-hop answers in a passage  (passages {fingerprint})")
        for question in missed if args.verbose else []:
            print(f"    missed: {question}")


if __name__ == "__main__":
    main()
