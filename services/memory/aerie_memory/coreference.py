"""Crude coreference: which of a document's entities each of its sentences is about.

Most writing names a thing once and then says "it", "she", "the island" or "Lindqvist":
read literally, "Mira Vell is a weaver. She collects keys." teaches the memory nothing of
her keys. Without a parser the rules below guess, and they guess wide, because a sentence
in one passage too many costs less than one missing from the right one:

- A sentence is about the entities it names, in full or by the last word of a name
  ("Lindqvist is married ..." after "Amara Lindqvist").
- "the <noun>" anywhere means the entity that noun stands for: the one whose name ends
  with it ("the foundation": the Ostmark Foundation), or the one a definition gave it to
  ("Tressa is a small island" makes "the island" Tressa).
- A sentence in the first person ("My sister Lena lives in Oslo.", "We booked the Casa
  Azul.") is also about the writer (``WRITER``, "me"): a user's own notes are about the
  user, who asks "Where does my sister live?". Not a question (an FAQ's "How do I reset
  it?" is its reader's), nor where someone else speaks: a chunk quoting one or giving
  chat turns ("Priya said: I think ...") in the first person has no writer's sentences.
- A sentence is also about the topics (the entity the document's first sentence naming
  anything is about, and the latest one a sentence opened with) when it refers back (a
  third-person pronoun, an opening "The <noun>" that means no entity) or does not open
  with a name it is sure of: a lone capitalised word opening a sentence is as often a
  common noun ("Ferries leave twice a day.") as a name, so it counts as one only when the
  text uses it elsewhere or defines it ("Tressa is an island"), or nothing else can be
  the document's topic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from aerie_common.entities import TITLES, in_first_person, in_others_words, name_spans

from aerie_memory.layout import TERMINAL, unmarked

THIRD_PERSON = "he|she|him|her|his|hers|they|them|their|it|its"
_PRONOUN = re.compile(rf"\b(?:{THIRD_PERSON})\b", re.IGNORECASE)
WRITER = "me"  # the entity a first-person document is about: "What do you know about me?"
_THE_NOUN = re.compile(r"\b(?:[Tt]he|[Tt]his|[Tt]hat|[Tt]hese|[Tt]hose)\s+([a-z]+)\b")
# "<entity> is a small island in ...": the noun before what follows it (a preposition, a
# relative pronoun, a participle, punctuation) is the kind of thing the entity is.
_DEFINITION = re.compile(
    r"^(?:'s)?\s+(?:is|was)\s+(?:a|an|the)\s+(?:[a-z-]+\s+){0,3}?([a-z]+)"
    r"(?=\s+(?:in|on|of|at|for|from|near|by|with|and|who|which|that|whose|where|[a-z]+ed|[a-z]+ing)\b|\s*[,.;:]|$)"
)


@dataclass
class Coreference:
    """What a document has established so far, carried from one of its chunks to the next."""

    document_topic: str | None = None  # what its first sentence naming anything is about
    latest_topic: str | None = None  # that of the latest such sentence, or "The company" meant
    kinds: dict[str, str] = field(default_factory=dict)  # "island" -> "Tressa"

    def topics(self) -> list[str]:
        return [t for t in dict.fromkeys((self.document_topic, self.latest_topic)) if t]


def _by_last_word(spans: set[str], entity: str) -> bool:
    """A sentence whose name spans are ``spans`` names a name of two or more capitalised
    words by its last word alone: "Lindqvist is married ..." for Amara Lindqvist (but
    "Ilse Vastel" does not name Orrin Vastel)."""
    words = entity.split()
    return len(words) > 1 and all(w[0].isupper() for w in words) and words[-1] in spans


def _opening(sentence: str, named: Sequence[str]) -> str | None:
    first, _, rest = sentence.partition(" ")
    if first.removesuffix(".") in TITLES:  # "Captain Idris Morlan commanded ...", "Dr. Eliska Marovic"
        sentence = rest
    for entity in named:
        if sentence.startswith((entity, f"The {entity}")):
            return entity
    for entity in named:  # by its last word: one the sentence does not name in full
        last = entity.split()[-1]
        if len(entity.split()) > 1 and entity not in sentence and re.match(rf"{re.escape(last)}\b", sentence):
            return entity
    return None


def _definition(sentence: str, entity: str) -> re.Match | None:
    """The match of "<entity> is a small island ..." (group 1: "island"), if the sentence
    opening with the entity defines it."""
    last = entity.split()[-1]
    return _DEFINITION.match(sentence[sentence.index(last) + len(last) :])


def _sure_of(entity: str, sentence: str, sentences: Sequence[str]) -> bool:
    """A name of several words, or a lone word that another sentence uses too, or that this
    one defines."""
    if len(entity.split()) > 1:
        return True
    used_elsewhere = any(s is not sentence and re.search(rf"\b{re.escape(entity)}\b", s) for s in sentences)
    return used_elsewhere or _definition(sentence, entity) is not None


def sentence_entities(
    sentences: Sequence[str], entities: Sequence[str], state: Coreference | None = None
) -> tuple[list[list[str]], Coreference]:
    """For each sentence, which of ``entities`` it is about (the module's rules). Returns
    the lists and the state after the last sentence, to pass with the document's next
    chunk."""
    state = state or Coreference()
    about = []
    sentences = [unmarked(s) for s in sentences]  # a heading opens with its first word, as a sentence does
    # a quote or a chat turn in the first person: the chunk's first person may be anyone's
    writer_speaks = not any(in_others_words(s) for s in sentences)
    for sentence in sentences:
        spans = {span.removesuffix("'s") for span in name_spans(sentence)}
        named = [e for e in entities if e in sentence or _by_last_word(spans, e)]
        opening = _opening(sentence, named)
        sure = opening is not None and _sure_of(opening, sentence, sentences)
        topic = opening if sure else None
        if state.document_topic is None and topic is None:
            # The first sentence naming anything says what the document is about: a title
            # line's surest name ("Minutes of the Harrowgate Water Board meeting", not
            # "Minutes"), else the word it opens with ("Tressa lies in the Baltic Sea.").
            if sentence.endswith(TERMINAL):
                topic = opening
            else:
                topic = next((e for e in named if _sure_of(e, sentence, sentences)), opening)
        if topic is not None:
            state.document_topic = state.document_topic or topic
            state.latest_topic = topic
            if topic == opening and (definition := _definition(sentence, opening)):
                state.kinds[definition[1]] = opening
        if opening is not None and topic != opening and not sure:
            named.remove(opening)  # "Roughly 900 people live there.": read as a common word
        opens_with_noun, opening_meant = False, None  # "The company ...", and whom it means
        for match in _THE_NOUN.finditer(sentence):
            meant = state.kinds.get(match[1]) or next(
                (e for e in entities if len(e.split()) > 1 and e.split()[-1].lower() == match[1]), None
            )
            if match.start() == 0:
                opens_with_noun, opening_meant = True, meant
            if meant and meant not in named:
                named.append(meant)
        if opening_meant:
            state.latest_topic = opening_meant
        refers_back = bool(_PRONOUN.search(sentence)) or (opens_with_noun and not opening_meant)
        if refers_back or not (sure or opening_meant):
            named += [t for t in state.topics() if t not in named]
        if writer_speaks and in_first_person(sentence) and not sentence.endswith("?"):
            named.append(WRITER)
        about.append(named)
    return about, state
