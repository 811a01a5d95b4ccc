"""A seeded corpus of fictional documents (invented people and towns, so no model knows
them) with single-hop and cross-document questions, plus as many distractor documents
about other invented entities, which no question asks about.

A person document says what the person does, where they live and what they collect; a
town document says which river it lies on, what it exports and who governs it. Single-hop
questions ask one fact of one document; cross-document questions need a town document
(who governs it) and that governor's person document (their craft, or their home).

Two prose styles state the same facts: ``named`` repeats the entity's name in every
sentence; ``pronouns`` names it once and then refers back to it ("She collects ...", "Its
main export is ...", "The town is governed by ..."), as most writing does.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

_SYLLABLES = [
    "bra", "cel", "dor", "fen", "gal", "hul", "ist", "jor", "kev", "lum", "mor", "nax", "oth", "pry",
    "quin", "ras", "sev", "tal", "ulv", "vor", "wex", "yth", "zan", "ard", "eph", "ilo", "ond", "usk",
]  # fmt: skip
PROFESSIONS = [
    "glassblower", "cartographer", "beekeeper", "clockmaker", "ferryman", "astronomer", "weaver",
    "lighthouse keeper", "perfumer", "bookbinder", "falconer", "salt miner", "bellfounder", "herbalist",
]  # fmt: skip
COLLECTIONS = [
    "copper keys", "river stones", "old maps", "blue feathers", "tin soldiers", "seashells", "pressed ferns",
    "brass buttons", "owl figurines", "glass marbles", "iron nails", "wax seals",
]  # fmt: skip
EXPORTS = [
    "amber", "wool", "saffron", "violins", "slate", "honey", "paper", "cheese", "rope", "glass beads",
    "dried plums", "tea",
]  # fmt: skip


@dataclass
class Question:
    question: str
    answer: str
    kind: str  # "single_hop" | "cross_document"
    sources: list[str]
    # the conversation before the question, as chat messages ({"role": "user" or
    # "assistant", "content": ...}): a follow-up ("What did she study?") is asked after it
    history: list[dict] = field(default_factory=list)


@dataclass
class Corpus:
    documents: list[dict]
    distractors: list[dict]
    questions: list[Question] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "documents": self.documents,
            "distractors": self.distractors,
            "questions": [asdict(q) for q in self.questions],
        }

    @classmethod
    def from_json(cls, data: dict) -> Corpus:
        """A corpus written by hand (``--corpus``): documents, optional distractors, and
        questions whose sources name documents and whose kind is single_hop or
        cross_document."""
        corpus = cls(
            data["documents"], data.get("distractors", []), [Question(**q) for q in data["questions"]]
        )
        ids = {d["id"] for d in corpus.documents}
        for q in corpus.questions:
            if q.kind not in ("single_hop", "cross_document") or not set(q.sources) <= ids:
                raise ValueError(
                    f"question {q.question!r}: kind {q.kind!r}, sources {q.sources} (documents {sorted(ids)})"
                )
        return corpus


def _name(rng: random.Random, used: set[str], parts: int) -> str:
    while True:
        words = []
        for _ in range(parts):
            word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
            words.append(word.capitalize())
        name = " ".join(words)
        if name not in used:
            used.add(name)
            return name


def _people_and_towns(rng: random.Random, used: set[str], pairs: int, prefix: str):
    people, towns = [], []
    for i in range(pairs):
        person = {
            "name": _name(rng, used, 2),
            "profession": rng.choice(PROFESSIONS),
            "collection": rng.choice(COLLECTIONS),
        }
        town = {"name": _name(rng, used, 1), "river": _name(rng, used, 1), "export": rng.choice(EXPORTS)}
        person["home"] = town["name"] if rng.random() < 0.5 else _name(rng, used, 1)
        town["governor"] = person["name"]
        # From the name, not the generator, so that a seed gives the same corpus as before.
        person["pronoun"] = ("He", "She")[sum(map(ord, person["name"])) % 2]
        people.append((f"{prefix}person-{i:02d}", person))
        towns.append((f"{prefix}town-{i:02d}", town))
    return people, towns


STYLES = ("named", "pronouns")


def _person_text(p: dict, style: str) -> str:
    subject = p["name"] if style == "named" else p["pronoun"]
    return (
        f"{p['name']} is a {p['profession']} who lives in {p['home']}. "
        f"{subject} collects {p['collection']} and has done so since childhood."
    )


def _town_text(t: dict, style: str) -> str:
    if style == "named":
        return (
            f"{t['name']} is a small town on the {t['river']} river. "
            f"The main export of {t['name']} is {t['export']}. "
            f"{t['name']} is governed by {t['governor']}."
        )
    return (
        f"{t['name']} is a small town on the {t['river']} river. "
        f"Its main export is {t['export']}. "
        f"The town is governed by {t['governor']}."
    )


def generate(seed: int = 0, documents: int = 20, style: str = "named") -> Corpus:
    """``documents`` (even) documents: half people, half towns; as many distractors. The
    style changes the prose, not the facts or the questions."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = random.Random(seed)
    used: set[str] = set()
    pairs = documents // 2
    people, towns = _people_and_towns(rng, used, pairs, "")
    d_people, d_towns = _people_and_towns(rng, used, pairs, "distractor-")
    docs = [{"id": i, "text": _person_text(p, style)} for i, p in people] + [
        {"id": i, "text": _town_text(t, style)} for i, t in towns
    ]
    distractors = [{"id": i, "text": _person_text(p, style)} for i, p in d_people] + [
        {"id": i, "text": _town_text(t, style)} for i, t in d_towns
    ]
    questions = []
    for (pid, p), (tid, t) in zip(people, towns, strict=True):
        questions.append(Question(f"What is {p['name']}'s profession?", p["profession"], "single_hop", [pid]))
        questions.append(Question(f"What does {p['name']} collect?", p["collection"], "single_hop", [pid]))
        questions.append(
            Question(f"What is the main export of {t['name']}?", t["export"], "single_hop", [tid])
        )
        questions.append(Question(f"Who governs {t['name']}?", t["governor"], "single_hop", [tid]))
        questions.append(
            Question(
                f"What is the profession of the person who governs {t['name']}?",
                p["profession"],
                "cross_document",
                [tid, pid],
            )
        )
        questions.append(
            Question(
                f"What does the governor of {t['name']} collect?",
                p["collection"],
                "cross_document",
                [tid, pid],
            )
        )
    rng.shuffle(docs)
    rng.shuffle(distractors)
    return Corpus(docs, distractors, questions)


_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = {
    w: 10 * i
    for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())
    if w != "_"
}
_NUMBER_WORD = re.compile(
    rf"\b(?:({'|'.join(_TENS)})(?:[- ]({'|'.join(_UNITS[1:10])}))?|({'|'.join(_UNITS)}))\b"
)


def _digits(text: str) -> str:
    """``text`` with its number words written in digits ("sixteen" -> "16", "twenty-five" -> "25")."""

    def value(match: re.Match) -> str:
        if match[3]:
            return str(_UNITS.index(match[3]))
        return str(_TENS[match[1]] + (_UNITS.index(match[2]) if match[2] else 0))

    return _NUMBER_WORD.sub(value, text)


def is_correct(response: str, answer: str) -> bool:
    """The gold answer appears in the response (case-insensitive); for a name, every part. A
    number counts written either way ("sixteen" and "16"), and only as a whole number: gold
    "five" is not in "25"."""
    text = _digits(response.lower())
    return all(
        re.search(rf"(?<!\d){part}(?!\d)", text) if part.isdigit() else part in text
        for part in _digits(answer.lower()).split()
    )
