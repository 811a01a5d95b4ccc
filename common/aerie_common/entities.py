"""Names and words in plain text, shared by the memory service and the gateway.

Names are found by their capitals: the memory service writes questions about each entity
a document names, and the gateway follows a memory answer to the entity it introduces
(the bridge of a two-hop question). Content words (crudely stemmed, stopwords dropped)
measure how much a sentence is about a question. Also the question the two share about an
entity: the memory learns each entity's facts under it, and the chat protocol asks it."""

from __future__ import annotations

import re

import snowballstemmer

STOPWORDS = set(
    """a an the and or but if of to in on at by for with from as is are was were be been being
    it its this that these those he she they them his her their him there here what which who whom
    whose when where why how do does did has have had not no yes so than then also into about over
    under after before up down out one two three i you we our your my me us can could would should
    will shall may might must very more most some any each all both few many much such only own same
    just""".split()
)
# Capitalised words that start sentences rather than name things.
_NOT_ENTITY_HEADS = {
    "The", "A", "An", "He", "She", "It", "They", "In", "On", "At", "This", "That", "There", "Its",
    "His", "Her", "Their", "After", "Before", "When", "While", "Each", "Every", "Both", "Most",
    "Some", "Many", "Q", "A:", "Yes", "No", "What", "Who", "Which", "Where", "How", "Why",
}  # fmt: skip
# Capitalised words that name a time, not a thing a question is about ("held every
# August"): alone they are no entity.
_CALENDAR = set(
    """January February March April May June July August September October November December
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday""".split()
)
# Within a line: a heading ("# Brannock Observatory") names nothing with the line below it.
_ENTITY = re.compile(
    r"\b[A-Z][a-zA-Z'-]+(?:[ \t]+(?:of[ \t]+|the[ \t]+|de[ \t]+|van[ \t]+)?[A-Z][a-zA-Z'-]+)*"
)
# Titles before a person's name, not part of it: "Captain Idris Morlan" is asked about as
# "Idris Morlan".
TITLES = set(
    """Mr Mrs Ms Dr Prof Professor Sir Dame Lord Lady Captain Capt Colonel General Admiral
    Lieutenant Sergeant Judge Senator President Governor Mayor King Queen Prince Princess
    Saint Reverend Rev""".split()
)
_POSSESSIVE = re.compile(r"['\u2019]s$")
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
FACTS_QUESTION = "What do you know about {}?"
_FACTS_PREFIX, _FACTS_SUFFIX = FACTS_QUESTION.split("{}")
_STEMMER = snowballstemmer.stemmer("english")


def name_spans(text: str) -> list[str]:
    """Every capitalised span of ``text`` that may name something, in order, repeats
    included: sentence-initial function words stripped ("In Tarnow" -> "Tarnow")."""
    spans = []
    for match in _ENTITY.finditer(text):
        words = match.group(0).split()
        while words and (words[0] in _NOT_ENTITY_HEADS or (words[0] in TITLES and len(words) > 1)):
            words = words[1:]
        name = " ".join(words)
        if words and name.lower() not in STOPWORDS and len(name) >= 3 and name not in _CALENDAR:
            spans.append(name)
    return spans


def find_entities(text: str) -> list[str]:
    """Capitalised spans that are not sentence-initial function words, most frequent first."""
    counts: dict[str, int] = {}
    for name in name_spans(text):
        counts[name] = counts.get(name, 0) + 1
    # Drop spans contained in a longer entity seen as often ("Quell" inside "Zorvath Quell").
    names = sorted(counts, key=lambda n: (-counts[n], -len(n)))
    return [n for n in names if not any(n != m and n in m and counts[m] >= counts[n] for m in names)]


def facts_question_entity(question: str) -> str | None:
    """The X of "What do you know about X?" (stripped), or None for any other question."""
    if question.startswith(_FACTS_PREFIX) and question.endswith(_FACTS_SUFFIX):
        return question[len(_FACTS_PREFIX) : len(question) - len(_FACTS_SUFFIX)].strip()
    return None


def bare_name(entity: str) -> str:
    """``entity`` without a possessive ending: "Mira Kev's" -> "Mira Kev"."""
    return _POSSESSIVE.sub("", entity)


def names_in(text: str) -> list[str]:
    """``find_entities`` without possessive endings."""
    return [bare_name(n) for n in find_entities(text)]


def new_entities(text: str, known: str) -> list[str]:
    """The entities ``text`` names that ``known`` does not (case-insensitive)."""
    seen = known.lower()
    return [e for e in names_in(text) if e.lower() not in seen]


def content_words(text: str) -> set[str]:
    """Lower-cased words that are not stopwords, stemmed (Snowball, English) and cut to
    five letters, so "collects" and "collect", "governor" and "governed", and "open" and
    "opened" match (five letters alone made "opened" "opene")."""
    return {_STEMMER.stemWord(w.lower())[:5] for w in WORD.findall(text) if w.lower() not in STOPWORDS}
