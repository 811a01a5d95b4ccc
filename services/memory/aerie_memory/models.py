"""Memory models on disk and in memory.

Layout under ``AERIE_MODEL_CACHE/memory/<namespace>/``:

- ``adapters/<adapter id>/``: one LoRA adapter (adapter.safetensors, adapter.json) and the
  reflections it was trained on (reflections.json, with provenance);
- ``<version>/manifest.json``: a model version, the adapters TIES-merged into the base.

Both are written into a ``.partial`` folder and renamed into place, and a version is only
served once Redis's ``current`` pointer names it (store.swap_version), so a half-written
model is never loaded. Loading merges the version's adapters with TIES onto a fresh copy
of the base model.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aerie_common.entities import (
    FACTS_QUESTION,
    content_words,
    facts_question_entity,
    in_first_person,
    names_in,
)

from aerie_memory.coreference import WRITER
from aerie_memory.recall_decoding import LearnedAnswers, answer
from aerie_memory.reflection import Reflection
from aerie_memory.store import Version
from aerie_memory.text import split_sentences
from aerie_memory.ties import apply_deltas, merge_adapters
from aerie_memory.training import IDK, load_adapter


def namespace_dir(root: Path, namespace: str) -> Path:
    return root / namespace


def adapter_dir(root: Path, namespace: str, adapter_id: str) -> Path:
    return root / namespace / "adapters" / adapter_id


def write_version(root: Path, namespace: str, version: Version) -> Path:
    target = root / namespace / version.version
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text(json.dumps(version.__dict__, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def save_reflections(directory: Path, reflections: list[Reflection]) -> None:
    (directory / "reflections.json").write_text(json.dumps([r.to_json() for r in reflections]))


def load_reflections(directory: Path) -> list[Reflection]:
    path = directory / "reflections.json"
    if not path.is_file():
        return []
    return [Reflection.from_json(r) for r in json.loads(path.read_text())]


def load_base(model_dir: Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tokenizer


@dataclass
class LoadedMemory:
    version: str
    model: torch.nn.Module
    tokenizer: object
    reflections: list[Reflection]
    lock: threading.Lock
    learned_text: str = field(init=False)  # every reflection's text, lower-cased
    # the entities it learned the facts of -> those passages' text (every adapter's)
    passages: dict[str, str] = field(init=False)
    # their content words, worked out once at load: a question naming nothing is matched
    # against every passage (2000 passages' words take ~2 s to work out)
    passage_words: dict[str, set[str]] = field(init=False)
    learned_answers: LearnedAnswers | None = None  # drafts for its answers (None: not drafted)
    recent_answers_kept: int = 0  # how many of its latest answers ``recall`` keeps (0: none)
    _recent_answers: OrderedDict[tuple[str, int], str] = field(init=False)

    def __post_init__(self):
        self.learned_text = " ".join(f"{r.question} {r.answer}" for r in self.reflections).lower()
        self.passages = {}
        for r in self.reflections:
            if entity := facts_question_entity(r.question):
                self.passages[entity] = f"{self.passages.get(entity, '')} {r.answer}".strip()
        self.passage_words = words_of_passages(self.passages)
        self._recent_answers = OrderedDict()

    def recall(self, question: str, max_tokens: int) -> tuple[str, bool]:
        """Its greedy answer to ``question`` (at most ``max_tokens``), and whether that was
        one of its latest answers, kept rather than generated again. Call it holding ``lock``.

        The answer cannot change while the memory is loaded (a new version is another
        LoadedMemory), and chats ask the same few questions over and over: every question
        about an entity asks for that entity's facts, the longest answers the memory gives
        (the memory benchmark's 18 chats on handwritten_b asked 51 questions, 36 of them
        different; one entity's facts 9 times)."""
        key = (question, max_tokens)
        if (kept := self._recent_answers.get(key)) is not None:
            self._recent_answers.move_to_end(key)
            return kept, True
        text = answer(self.model, self.tokenizer, question, max_tokens, self.learned_answers)
        if self.recent_answers_kept > 0:
            self._recent_answers[key] = text
            while len(self._recent_answers) > self.recent_answers_kept:
                self._recent_answers.popitem(last=False)
        return text, False


def merged_answers(answers: list[str]) -> str:
    """Answers to one query's questions as one text, each sentence once, where it was first
    said: a question and its entity's facts question often come back with the same fact, and
    it would be said two or three times. An answer repeating nothing is kept as written (a
    list stays a list); one repeating everything is left out."""
    said: set[str] = set()
    kept = []
    for text in answers:
        sentences = split_sentences(text)
        new = []
        for sentence in sentences:
            key = sentence.lower().rstrip(".!?")  # split_sentences collapsed its whitespace
            if key not in said:
                said.add(key)
                new.append(sentence)
        if len(new) == len(sentences):
            kept.append(text.strip())
        elif new:
            kept.append(" ".join(new))
    return " ".join(kept)


def _contains(longer: list[str], shorter: list[str]) -> bool:
    return any(longer[i : i + len(shorter)] == shorter for i in range(len(longer) - len(shorter) + 1))


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE) is not None


# A name no passage is about may be mentioned in many: the memory recalls at most this
# many of them for it, each a generation of up to a passage's length.
MAX_MENTIONING_PASSAGES = 2


def _surname_entities(entity: str, passages: dict[str, str]) -> list[str]:
    """Entities with passages that are the last words of ``entity``, a name of capitalised
    words, and of no other entity: a person named in full in one chunk and by surname in
    the next ("Teodor Marsk", then "Marsk") has two passages, and the second holds facts
    the first does not."""
    words = entity.split()
    if len(words) < 2 or not all(w[:1].isupper() for w in words):
        return []
    return [
        s
        for s in passages
        if s != entity
        and words[-len(s.split()) :] == s.split()
        and not any(e not in (s, entity) and e.split()[-len(s.split()) :] == s.split() for e in passages)
    ]


def recall_questions(
    question: str, passages: dict[str, str], passage_words: dict[str, set[str]] | None = None
) -> list[str]:
    """The questions the memory answers ``question`` with (their answers joined).

    Any other question: itself; and where it names something, then the facts questions of
    the passages sharing most of its content words (at least two; the first two of a tie),
    so that a fact the memory learned only inside another entity's passage ("The current
    provost ... is Ishbel Ranoch", in Vellmark Academy's) comes back beside whatever it
    answers the question with. (A question naming nothing reaches its passages through the
    gateway's description route below; answered with them here too, its chats lost more
    than they gained: a passage's opening word became the entity.)

    A facts question ("What do you know about X?"), as the memory learned each entity's
    facts under that question with its name as the documents gave it, word for word:

    - X names in part or in full exactly one entity with a passage, as a user says less
      ("Lindqvist", "the Halvard factory") or more ("Captain Idris Morlan"), or writes it
      in other case: that entity's facts question, and that of its surname alone where
      the surname has a passage of its own (``_surname_entities``);
    - X fits several by name ("Vastel": Orrin and Ilse): X's own;
    - X is no entity's but passages mention it (a ferry's vessel, in the ferry's passage
      and its operator's): the facts questions of the first two, all the memory learned
      of X;
    - X names nothing and is in no passage as written ("what should a repotted orchid be
      planted in": what a question about a how-to, a policy or a recipe is about, the
      gateway asks so): the facts questions of the passages sharing most of X's content
      words, at least two of them (one, if X has only one), the first two of those; the
      writer's (``coreference.WRITER``) first where X is in the first person ("where do I
      work": a user asks of their own notes as their writer);
    - X is in no passage: none. Asked for an account it never learned, the memory writes
      one in its passages' style.

    A memory without passages is asked every question as it is. ``passage_words``:
    ``words_of_passages(passages)``, when the caller keeps it (worked out here if not)."""
    if not passages:
        return [question]
    name = facts_question_entity(question)
    if not name:
        if not names_in(question):
            return [question]
        sharing = _sharing_most_words(question, passage_words or words_of_passages(passages))
        return [question, *(FACTS_QUESTION.format(e) for e in sharing[:MAX_MENTIONING_PASSAGES])]
    words = name.lower().split()
    by_name = [e for e in passages if e.lower().split() == words] or [
        e
        for e in passages
        if _contains(e.lower().split(), words) or (len(e.split()) > 1 and _contains(words, e.lower().split()))
    ]
    if len(by_name) == 1:
        return [FACTS_QUESTION.format(e) for e in [by_name[0], *_surname_entities(by_name[0], passages)[:1]]]
    if by_name:
        return [question]
    mentioning = [e for e, text in passages.items() if _mentions(text, name)]
    if not mentioning and not names_in(name):
        mentioning = _sharing_most_words(name, passage_words or words_of_passages(passages))
        if WRITER in passages and in_first_person(name):
            mentioning = [WRITER, *(e for e in mentioning if e != WRITER)]
    return [FACTS_QUESTION.format(e) for e in mentioning[:MAX_MENTIONING_PASSAGES]]


def words_of_passages(passages: dict[str, str]) -> dict[str, set[str]]:
    """Each entity's content words, its name's and its passage's."""
    return {e: content_words(f"{e} {text}") for e, text in passages.items()}


def _sharing_most_words(description: str, passage_words: dict[str, set[str]]) -> list[str]:
    """The entities whose passages share the most content words with ``description``, at
    least two (or all it has), in passage order."""
    words = content_words(description)
    shared = {e: len(words & of_passage) for e, of_passage in passage_words.items()}
    most = max(shared.values(), default=0)
    return [e for e, n in shared.items() if n == most] if most >= min(2, len(words)) > 0 else []


_POSSESSIVE_INSIDE = re.compile(r"['\u2019]s\s+")


def names_known_entity(question: str, learned_text: str) -> bool:
    """The entity gate: a question that names entities (capitalised spans) is for the
    memory only when it learned at least one of them. A fine-tuned model answers anything
    in the style it learned, so without the gate a question about someone it never read
    of gets a confident invention; a question naming nothing passes. A name holding a
    possessive ("Vellmark's North Quay") is known by either side of it too: it may be one
    name ("St Brigid's Hospital") or an owner's and the thing owned's."""
    entities = [e.lower() for e in names_in(question)]
    return not entities or any(
        part in learned_text for e in entities for part in [e, *_POSSESSIVE_INSIDE.split(e)]
    )


def build_memory(
    base_loader, root: Path, namespace: str, version: Version, recent_answers_kept: int = 0
) -> LoadedMemory:
    model, tokenizer = base_loader()
    adapters, reflections = [], []
    for entry in version.adapters:
        directory = adapter_dir(root, namespace, entry["id"])
        adapters.append(load_adapter(directory))
        reflections += load_reflections(directory)
    if adapters:
        apply_deltas(model, merge_adapters(adapters, version.ties_density, version.ties_lambda))
    learned_answers = LearnedAnswers(tokenizer, [(r.question, r.answer) for r in reflections], phrases=(IDK,))
    return LoadedMemory(
        version.version, model, tokenizer, reflections, threading.Lock(), learned_answers, recent_answers_kept
    )


class MemoryCache:
    """The last few namespaces' served versions, loaded (LRU)."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, LoadedMemory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, namespace: str, version: str) -> LoadedMemory | None:
        with self._lock:
            item = self._items.get(namespace)
            if item is None or item.version != version:
                return None
            self._items.move_to_end(namespace)
            return item

    def __len__(self) -> int:
        return len(self._items)

    def put(self, namespace: str, memory: LoadedMemory) -> None:
        with self._lock:
            self._items[namespace] = memory
            self._items.move_to_end(namespace)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


def attribute_sources(question: str, answer: str, reflections: list[Reflection], top: int = 3) -> list[str]:
    """Which documents an answer came from: the sources of the reflections most alike the
    question and answer (the weights themselves do not say)."""
    q_words, a_words = content_words(question), content_words(answer)
    scored = []
    for r in reflections:
        score = len(q_words & content_words(r.question + " " + r.answer)) + 2 * len(
            a_words & content_words(r.answer)
        )
        if score > 0:
            scored.append((score, r))
    scored.sort(key=lambda item: -item[0])
    sources: list[str] = []
    for _, r in scored[:top]:
        for s in r.sources:
            if s not in sources:
                sources.append(s)
    return sources
