"""Reflection synthesis: MEMO's five steps, driven by a generator LLM.

Documents become question/answer pairs (reflections) that the MEMORY model is trained on:

1. facts, in two passes: ``facts_direct`` (one chunk, stated facts) and ``facts_inferred``
   (facts that need two sentences of the chunk combined);
2. ``consolidation``: two facts of one document sharing an entity become one multi-fact
   question;
3. ``self_containment``: questions with dangling references ("he", "the text", ...) are
   rewritten by the generator to name what they are about; those it cannot fix are dropped;
4. ``entity_surfacing``: reverse questions that describe an entity and expect its name;
5. ``cross_document``: clues from several documents converging on one entity, and facts
   of different documents that share a property.

Every generation is parsed strictly (``parse_qa_lines``); anything that does not parse or
fails a check (answer not grounded in the source, question naming its own answer, ...) is
dropped and counted. ``StepStats`` holds, per step, the calls made and the candidates kept
and dropped, so what a small generator can and cannot do is measured, not hidden.

Two rule-based steps (no generator) back the five up, each reported as its own step:

- ``evidence``: a generated question that is about its chunk but whose answer failed the
  checks (a small generator asks better than it answers) is kept with the chunk's
  sentences it is about as the answer, so the memory learns that phrasing of the question
  with an answer that is true by construction;
- ``passages``: each chunk's main entities get "What do you know about <entity>?" and
  "Tell me about <entity>." with the sentences about them (naming them or referring back
  to them: ``sentence_entities``), across documents, as the answer, so the memory also
  learns the source text itself.

Every reflection keeps the ids of its source documents (provenance).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

from aerie_common.entities import FACTS_QUESTION, STOPWORDS, WORD, content_words, find_entities, names_in

from aerie_memory.coreference import THIRD_PERSON, WRITER, Coreference, sentence_entities
from aerie_memory.layout import is_heading, markup_to_text, unmarked
from aerie_memory.text import chunk_text, join_sentences, split_sentences

log = logging.getLogger(__name__)

# (messages, max_tokens) -> generated text
Generator = Callable[[list[dict[str, str]], int], Awaitable[str]]
Progress = Callable[[int, int], Awaitable[None] | None]

STEPS = (
    "facts_direct",
    "facts_inferred",
    "consolidation",
    "self_containment",
    "entity_surfacing",
    "cross_document",
    "evidence",
    "passages",
)

# A question holding one of these dangles.
_DANGLING = re.compile(
    rf"\b({THIRD_PERSON}|this|that|these|those)\b|"
    r"\bthe (above|text|passage|document|article|story|author|person|man|woman|place|city|town)\b",
    re.IGNORECASE,
)
_IDK = re.compile(
    r"\b(i don'?t know|unknown|not (stated|mentioned|given|specified)|no information|n/?a)\b", re.I
)


@dataclass(frozen=True)
class Reflection:
    question: str
    answer: str
    step: str
    sources: tuple[str, ...]

    def to_json(self) -> dict:
        return {**asdict(self), "sources": list(self.sources)}

    @classmethod
    def from_json(cls, data: dict) -> Reflection:
        return cls(data["question"], data["answer"], data["step"], tuple(data["sources"]))


@dataclass
class StepStats:
    step: str
    calls: int = 0
    failed_calls: int = 0
    candidates: int = 0
    kept: int = 0
    dropped: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SourceDocument:
    id: str
    text: str


@dataclass
class ReflectionConfig:
    chunk_chars: int = 600
    direct_max_tokens: int = 96
    other_max_tokens: int = 56
    consolidations_per_document: int = 1
    entities_per_document: int = 2
    rewrites_per_document: int = 2
    cross_document_items: int = 4
    passages: bool = True
    # Whether an entity passage (question, answer) is learned whole at the memory's training
    # length; the worker counts with the memory's tokenizer (training.fits_training). The
    # default guesses 3 characters a token (invented names tokenise that densely).
    passage_fits: Callable[[str, str], bool] = lambda question, answer: len(answer) <= 390


@dataclass
class ReflectionResult:
    reflections: list[Reflection]
    stats: dict[str, StepStats] = field(default_factory=dict)

    def stats_json(self) -> list[dict]:
        return [self.stats[s].to_json() for s in STEPS if s in self.stats]


# --- strict parsing ------------------------------------------------------------------------

_QA_ONE_LINE = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s*)?Q\s*[:.]\s*(?P<q>.+?\?)\s*A\s*[:.]\s*(?P<a>.+?)\s*$")
_LABEL = re.compile(r"^\s*question\s*\d*\s*[:.]\s*", re.I)
_QUESTION_START = re.compile(
    r"^(what|who|whom|whose|which|where|when|how|why|in|on|at|name|is|are|was|were|does|do|did|can)\b", re.I
)
_Q_LINE = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s*)?Q(?:uestion)?\s*\d*\s*[:.]\s*(?P<q>.+?\?)\s*$", re.I)
_A_LINE = re.compile(r"^\s*(?:[-*]\s*)?A(?:nswer)?\s*\d*\s*[:.]\s*(?P<a>.+?)\s*$", re.I)


def parse_qa_lines(text: str) -> tuple[list[tuple[str, str]], int]:
    """``Q: ...? A: ...`` pairs, on one line or on two consecutive lines; returns (pairs,
    number of candidate lines that did not parse). Nothing else is accepted."""
    pairs: list[tuple[str, str]] = []
    junk = 0
    pending_q: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if m := _QA_ONE_LINE.match(line):
            if pending_q is not None:
                junk += 1
            pairs.append((_LABEL.sub("", m["q"]).strip(), m["a"].strip()))
            pending_q = None
        elif m := _Q_LINE.match(line):
            if pending_q is not None:
                junk += 1
            pending_q = _LABEL.sub("", m["q"]).strip()
        elif (m := _A_LINE.match(line)) and pending_q is not None:
            pairs.append((pending_q, m["a"].strip()))
            pending_q = None
        else:
            junk += 1
    if pending_q is not None:
        junk += 1
    return pairs, junk


def parse_question(text: str) -> str | None:
    """The first line, which must be ``Q: ...?`` or a bare question ending in '?'."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if m := _Q_LINE.match(line):
            return m["q"].strip()
        if line.endswith("?") and _QUESTION_START.match(line):
            return line
        return None
    return None


# --- checks --------------------------------------------------------------------------------


def grounded(answer: str, source: str, threshold: float = 0.6) -> bool:
    """Most of the answer's content words occur in the source (drops hallucinated answers)."""
    words = content_words(answer)
    if not words:
        return False
    source_words = content_words(source)
    return len(words & source_words) / len(words) >= threshold


def truncated(answer: str, source: str) -> bool:
    """The generation was cut off mid-answer: it ends on a function word ("... is the") or
    on a word the source does not hold whole ("Ythwe" for "Ythwexzan")."""
    words = WORD.findall(answer)
    if not words:
        return True
    last = words[-1].lower()
    whole = {w.lower() for w in WORD.findall(source)}
    return last in STOPWORDS or last not in whole


def _sentences_about(question: str, source: str) -> list[tuple[tuple[bool, int], str, str]]:
    """The sentences of ``source`` that are about an entity the question names
    (``sentence_entities``) or share content words with it, best first, ranked by (about
    the question's entity, content words shared besides the entity's name); ties in source
    order. A sentence about the question's entity comes first: "What is the main export
    of <a person>?" is not about the sentence giving a town's export. The name's own words
    do not count, or "How tall is the Kestrel Bay lighthouse?" would be about the sentence
    naming the lighthouse rather than "It stands 42 metres tall.".

    Items are (score, sentence, antecedent): the antecedent is the latest sentence before
    it naming the entity, when the sentence is about the entity only by referring back to
    it (else ""); a heading naming it, without its mark. A heading is never an item: it
    states no fact."""
    names = [name for name in find_entities(question) if name in source]
    q_words = content_words(question) - content_words(" ".join(names))
    sentences = split_sentences(source)
    about, _ = sentence_entities(sentences, find_entities(source))
    scored = []
    for i, (sentence, entities) in enumerate(zip(sentences, about, strict=True)):
        if is_heading(sentence):
            continue
        names_it = any(name in sentence for name in names)
        refers = not names_it and any(name in e for name in names for e in entities)
        antecedent = ""
        if refers:
            naming = (s for s in reversed(sentences[:i]) if any(name in s for name in names))
            antecedent = unmarked(next(naming, ""))
        scored.append(((names_it or refers, len(q_words & content_words(sentence))), sentence, antecedent))
    return sorted((item for item in scored if any(item[0])), key=lambda item: item[0], reverse=True)


def _with_antecedents(items: Sequence[tuple[tuple[bool, int], str, str]]) -> str:
    """The items' sentences, each one that refers back preceded by the sentence naming
    what it refers to (once): "Its main export is slate." alone would teach the memory an
    answer that names no town, which it then gives about any town."""
    out: list[str] = []
    for _, sentence, antecedent in items:
        for s in (antecedent, sentence):
            if s and s not in out:
                out.append(s)
    return join_sentences(out)


def supported(question: str, answer: str, source: str, extra_sentences: int = 0) -> bool:
    """The answer is grounded in the sentences the question is about (the best ranked by
    ``_sentences_about``, plus ``extra_sentences`` more for facts inferred across
    sentences), not just anywhere in the source: "What is the main export of Naxpry?" must
    not be answered with the sentence about Naxpry's river."""
    ranked = _sentences_about(question, source)
    if not ranked:
        return False
    best = ranked[0][0]
    top = [s for score, s, _ in ranked if score == best]
    rest = [s for score, s, _ in ranked if score < best][:extra_sentences]
    return grounded(answer, " ".join(top + rest))


def evidence(question: str, source: str, limit: int = 2) -> str | None:
    """The sentences of ``source`` the question is about: the best ranked by
    ``_sentences_about`` (ties included, at most ``limit``, in source order, with their
    antecedents); None when none is."""
    ranked = _sentences_about(question, source)
    if not ranked:
        return None
    return _with_antecedents([item for item in ranked if item[0] == ranked[0][0]][:limit])


def stating_sentence(question: str, answer: str, source: str) -> str | None:
    """The source sentence that states the pair's fact: the first of the sentences the
    question is about that holds the answer, preceded by its antecedent when it refers
    back ("Ondhul is a town on the Voryth river. Its main export is slate."); None when
    the answer spans sentences."""
    for item in _sentences_about(question, source):
        if grounded(answer, item[1]):
            return _with_antecedents([item])
    return None


def clean_answer(answer: str) -> str:
    return answer.strip().strip('"').rstrip(".").strip()


def acceptable_pair(question: str, answer: str, source: str, extra_sentences: int | None = None) -> bool:
    """The checks every generated pair passes. With ``extra_sentences`` (the fact steps),
    the answer must also be whole (not cut off) and ``supported`` by the sentences the
    question is about."""
    question, answer = question.strip(), clean_answer(answer)
    if not question.endswith("?") or len(question) < 8 or len(question) > 240:
        return False
    if not answer or len(answer.split()) > 16 or _IDK.search(answer):
        return False
    if answer.lower() in question.lower():
        return False  # the question gives its own answer away
    if not content_words(question) & content_words(source):
        return False  # not about this source
    if extra_sentences is not None and (
        truncated(answer, source) or not supported(question, answer, source, extra_sentences)
    ):
        return False
    return grounded(answer, source)


def acceptable_question(question: str, source: str) -> bool:
    """A question worth learning for ``source`` whatever its generated answer: well formed,
    self-contained and about the source."""
    question = question.strip()
    return (
        question.endswith("?")
        and 8 <= len(question) <= 240
        and is_self_contained(question)
        and bool(content_words(question) & content_words(source))
    )


def is_self_contained(question: str) -> bool:
    return _DANGLING.search(question) is None


# --- prompts -------------------------------------------------------------------------------

SYSTEM = "You write quiz questions from a text. Follow the format exactly."


def _messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def prompt_direct(chunk: str) -> list[dict[str, str]]:
    return _messages(
        f"{chunk}\n\nWrite three questions about the text with their answers. Use this format:\n"
        "Q: question? A: answer"
    )


def prompt_inferred(chunk: str) -> list[dict[str, str]]:
    return _messages(
        f"{chunk}\n\nWrite two questions that need two sentences of the text together to answer, "
        "with their answers. Use this format:\nQ: question? A: answer"
    )


def prompt_consolidate(a: Reflection, b: Reflection) -> list[dict[str, str]]:
    return _messages(
        f"Fact 1: {a.question} {a.answer}\nFact 2: {b.question} {b.answer}\n\n"
        "Write one question that asks for both facts, with an answer that gives both. "
        "Use this format:\nQ: question? A: answer"
    )


def prompt_rewrite(question: str, text: str) -> list[dict[str, str]]:
    return _messages(
        f"{text}\n\nQuestion: {question}\n\nRewrite the question so that it names the person or thing "
        "it is about instead of saying he, she, it or the text. Use this format:\nQ: question?"
    )


def prompt_surface(entity: str, facts: Sequence[Reflection]) -> list[dict[str, str]]:
    listed = "\n".join(f"- {f.question} {f.answer}" for f in facts)
    return _messages(
        f"Facts about {entity}:\n{listed}\n\nWrite one question that describes {entity} with these facts "
        f"but does not say the name, so that the answer is {entity}. Use this format:\nQ: question?"
    )


def prompt_clues(entity: str, facts: Sequence[Reflection]) -> list[dict[str, str]]:
    listed = "\n".join(f"- {f.question} {f.answer}" for f in facts)
    return _messages(
        f"Clues:\n{listed}\n\nWrite one question that combines these clues but does not say the name "
        f"{entity}, so that the answer is {entity}. Use this format:\nQ: question?"
    )


# --- the pipeline --------------------------------------------------------------------------


class _Runner:
    def __init__(self, generate: Generator, concurrency: int, stats: dict[str, StepStats]):
        self.generate = generate
        self.semaphore = asyncio.Semaphore(concurrency)
        self.stats = stats

    async def call(self, step: str, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        stats = self.stats[step]
        stats.calls += 1
        async with self.semaphore:
            try:
                return await self.generate(messages, max_tokens)
            except Exception as exc:  # a failed call costs its yield, not the job
                stats.failed_calls += 1
                log.warning("generator call for %s failed: %r", step, exc)
                return None


def read_documents(
    documents: Sequence[SourceDocument], chunk_chars: int
) -> tuple[list[SourceDocument], dict[str, list[str]]]:
    """The documents as the steps read them (HTML as its text), and each one's chunks."""
    read = [SourceDocument(doc.id, markup_to_text(doc.text)) for doc in documents]
    return read, {doc.id: chunk_text(doc.text, chunk_chars) for doc in read}


async def synthesize(
    documents: Sequence[SourceDocument],
    generate: Generator,
    config: ReflectionConfig | None = None,
    concurrency: int = 8,
    progress: Progress | None = None,
) -> ReflectionResult:
    """Run the five steps (plus rule-based passages) over ``documents`` (HTML ones read as
    their text)."""
    config = config or ReflectionConfig()
    documents, chunks = read_documents(documents, config.chunk_chars)
    stats = {step: StepStats(step) for step in STEPS}
    runner = _Runner(generate, concurrency, stats)
    done_calls = 0
    planned = 2 * sum(len(c) for c in chunks.values())

    async def tick(n: int = 1, more: int = 0) -> None:
        nonlocal done_calls, planned
        done_calls += n
        planned += more
        if progress is not None:
            result = progress(done_calls, max(planned, done_calls))
            if asyncio.iscoroutine(result):
                await result

    # Step 1: facts, direct and inferred, from every chunk, all calls at once.
    async def facts(step: str, doc_id: str, chunk: str) -> list[Reflection]:
        prompt = prompt_direct(chunk) if step == "facts_direct" else prompt_inferred(chunk)
        max_tokens = config.direct_max_tokens if step == "facts_direct" else config.other_max_tokens
        out = await _ask(runner, stats[step], prompt, max_tokens, tick)
        return _keep_pairs(stats, out, chunk, step, (doc_id,))

    jobs = [
        facts(step, doc_id, chunk)
        for doc_id, doc_chunks in chunks.items()
        for chunk in doc_chunks
        for step in ("facts_direct", "facts_inferred")
    ]
    facts_by_doc: dict[str, list[Reflection]] = {doc.id: [] for doc in documents}
    rescued: list[Reflection] = []  # evidence answers are sentences: kept out of steps 2-5
    for found in await asyncio.gather(*jobs):
        for r in found:
            (rescued if r.step == "evidence" else facts_by_doc[r.sources[0]]).append(r)

    # Step 2 (consolidation), step 3 (self-containment) and step 4 (entity surfacing) per
    # document, concurrently across documents.
    async def per_document(doc: SourceDocument) -> list[Reflection]:
        doc_facts = facts_by_doc[doc.id]
        consolidated = await _consolidate(runner, stats, doc, doc_facts, config, tick)
        contained = await _self_contain(runner, stats, doc, doc_facts + consolidated, config, tick)
        surfaced = await _surface(runner, stats, doc, contained, config, tick)
        return contained + surfaced

    per_doc = await asyncio.gather(*(per_document(doc) for doc in documents))
    reflections = [r for found in per_doc for r in found]

    # Step 5: cross-document synthesis.
    reflections += await _cross_document(runner, stats, documents, reflections, config, tick)

    reflections = _state_answers(reflections, chunks) + rescued
    if config.passages:
        reflections += _passages(stats["passages"], chunks, config.passage_fits)

    return ReflectionResult(_one_answer_per_question(reflections, stats), stats)


def _state_answers(reflections: list[Reflection], chunks: dict[str, list[str]]) -> list[Reflection]:
    """Single-document facts are learned with the source sentence that states them as the
    answer ("The main export of Brakev is slate.", not "Slate"). A bare answer does not
    name its entity, so many of them teach the memory a few entity-free replies it then
    gives to questions about anything (measured: "Slate" to every question about a person
    once a second corpus was learned); a stating sentence binds the fact to its entity.
    The short answers serve steps 2-5 first (same answers make shared properties)."""
    out = []
    for r in reflections:
        if r.step in _STATED_STEPS and len(r.sources) == 1:
            sentence = stating_sentence(r.question, r.answer, "\n\n".join(chunks.get(r.sources[0], [])))
            if sentence is not None:
                r = Reflection(r.question, sentence, r.step, r.sources)
        out.append(r)
    return out


_STATED_STEPS = ("facts_direct", "facts_inferred", "self_containment")


def _one_answer_per_question(reflections: list[Reflection], stats: dict[str, StepStats]) -> list[Reflection]:
    """Duplicates go; a question answered differently by several steps keeps the answer of
    the earliest step in STEPS (a direct fact over an inferred one over a surfaced entity),
    and the others count as dropped: trained on both, the memory would learn neither."""
    first_step: dict[str, int] = {}
    for r in reflections:
        key = r.question.lower()
        first_step[key] = min(first_step.get(key, len(STEPS)), STEPS.index(r.step))
    kept: dict[tuple[str, str], Reflection] = {}
    for r in reflections:
        key = (r.question.lower(), r.answer.lower())
        if STEPS.index(r.step) != first_step[key[0]]:
            stats[r.step].kept -= 1
            stats[r.step].dropped += 1
        else:
            kept.setdefault(key, r)
    return list(kept.values())


def _keep_pairs(
    stats: dict[str, StepStats], out: str | None, source: str, step: str, sources: tuple[str, ...]
) -> list[Reflection]:
    """The generated pairs that pass the checks, and (step ``evidence``) the questions of
    those that do not, answered with the source's sentences they are about."""
    if out is None:
        return []
    pairs, junk = parse_qa_lines(out)
    facts, rescue = stats[step], stats["evidence"]
    facts.candidates += len(pairs) + junk
    facts.dropped += junk
    kept = []
    extra = 1 if step == "facts_inferred" else 0
    for q, a in pairs:
        if acceptable_pair(q, a, source, extra):
            kept.append(Reflection(q.strip(), clean_answer(a), step, sources))
            facts.kept += 1
            continue
        facts.dropped += 1
        rescue.candidates += 1
        sentences = evidence(q, source) if acceptable_question(q, source) else None
        if sentences is None:
            rescue.dropped += 1
        else:
            kept.append(Reflection(q.strip(), sentences, "evidence", sources))
            rescue.kept += 1
    return kept


async def _ask(runner, step: StepStats, prompt: str, max_tokens: int, tick) -> str | None:
    """One generator call of a step (None if it failed): its time goes to the step's
    stats, and the progress bar ticks."""
    started = time.monotonic()
    out = await runner.call(step.step, prompt, max_tokens)
    step.seconds += time.monotonic() - started
    await tick()
    return out


async def _consolidate(runner, stats, doc, doc_facts, config, tick) -> list[Reflection]:
    step = stats["consolidation"]
    pairs = []
    for a, b in itertools.combinations(doc_facts, 2):
        shared = set(find_entities(a.question + " " + a.answer)) & set(
            find_entities(b.question + " " + b.answer)
        )
        if shared and a.answer.lower() != b.answer.lower():
            pairs.append((a, b))
    pairs = pairs[: config.consolidations_per_document]
    await tick(0, len(pairs))

    async def one(a: Reflection, b: Reflection) -> Reflection | None:
        out = await _ask(runner, step, prompt_consolidate(a, b), config.other_max_tokens, tick)
        if out is None:
            return None
        parsed, junk = parse_qa_lines(out)
        step.candidates += len(parsed[:1]) + (junk if not parsed else 0)
        if not parsed:
            step.dropped += junk or 1
            return None
        q, ans = parsed[0]
        ans = clean_answer(ans)
        # Both facts' answers must be in the consolidated answer.
        ok = all(grounded(x.answer, ans, 0.5) for x in (a, b)) and acceptable_pair(
            q, ans, doc.text + " " + ans
        )
        if not ok or len(ans.split()) > 16:
            step.dropped += 1
            return None
        step.kept += 1
        return Reflection(q, ans, "consolidation", (doc.id,))

    results = await asyncio.gather(*(one(a, b) for a, b in pairs))
    return [r for r in results if r is not None]


async def _self_contain(runner, stats, doc, candidates, config, tick) -> list[Reflection]:
    """Keep self-contained questions, rewrite up to ``rewrites_per_document`` dangling ones
    with the generator, drop the rest (counted as dropped)."""
    step = stats["self_containment"]
    ok = [r for r in candidates if is_self_contained(r.question)]
    dangling = [r for r in candidates if not is_self_contained(r.question)]
    step.candidates += len(dangling)
    to_rewrite = dangling[: config.rewrites_per_document]
    step.dropped += len(dangling) - len(to_rewrite)
    await tick(0, len(to_rewrite))

    async def one(r: Reflection) -> Reflection | None:
        out = await _ask(runner, step, prompt_rewrite(r.question, doc.text), config.other_max_tokens, tick)
        q = parse_question(out or "")
        if q is None or not is_self_contained(q) or r.answer.lower() in q.lower():
            step.dropped += 1
            return None
        if not content_words(q) & content_words(doc.text):
            step.dropped += 1
            return None
        step.kept += 1
        return Reflection(q, r.answer, r.step, r.sources)

    rewritten = [r for r in await asyncio.gather(*(one(r) for r in to_rewrite)) if r is not None]
    return ok + rewritten


async def _surface(runner, stats, doc, facts, config, tick) -> list[Reflection]:
    step = stats["entity_surfacing"]
    entities = [e for e in find_entities(doc.text) if any(e in f.question or e in f.answer for f in facts)]
    entities = entities[: config.entities_per_document]
    asked = {f.question.lower() for f in facts}
    await tick(0, len(entities))

    async def one(entity: str) -> Reflection | None:
        about = [f for f in facts if entity in f.question or entity in f.answer and f.answer != entity][:3]
        out = await _ask(runner, step, prompt_surface(entity, about), config.other_max_tokens, tick)
        if out is None:
            return None
        step.candidates += 1
        q = parse_question(out)
        if (
            q is None
            or _gives_away(q, entity)
            or not content_words(q) & content_words(doc.text)
            or q.lower() in asked  # a fact's own question, now with the wrong answer
        ):
            step.dropped += 1
            return None
        step.kept += 1
        return Reflection(q, entity, "entity_surfacing", (doc.id,))

    return [r for r in await asyncio.gather(*(one(e) for e in entities)) if r is not None]


def _gives_away(question: str, entity: str) -> bool:
    """A question asking for ``entity`` by description names part of it (a word of 3+ letters)."""
    q = question.lower()
    return any(part.lower() in q for part in entity.split() if len(part) > 2)


async def _cross_document(runner, stats, documents, reflections, config, tick) -> list[Reflection]:
    """Entities named in two or more documents get a clue question (generator) from facts
    of different documents; facts of different documents with the same answer give a
    shared-property question (the answer is the property, the sources are both)."""
    step = stats["cross_document"]
    by_entity: dict[str, dict[str, list[Reflection]]] = {}
    for doc in documents:
        for entity in find_entities(doc.text):
            by_entity.setdefault(entity, {})[doc.id] = [
                r for r in reflections if doc.id in r.sources and (entity in r.question or entity in r.answer)
            ]
    converging = [(e, docs) for e, docs in by_entity.items() if sum(1 for f in docs.values() if f) >= 2]
    converging = converging[: config.cross_document_items]
    await tick(0, len(converging))

    async def one(entity: str, docs: dict[str, list[Reflection]]) -> Reflection | None:
        clues = [facts[0] for facts in docs.values() if facts][:3]
        out = await _ask(runner, step, prompt_clues(entity, clues), config.other_max_tokens, tick)
        if out is None:
            return None
        step.candidates += 1
        q = parse_question(out)
        clue_text = " ".join(c.question + " " + c.answer for c in clues)
        if q is None or _gives_away(q, entity) or not content_words(q) & content_words(clue_text):
            step.dropped += 1
            return None
        step.kept += 1
        return Reflection(q, entity, "cross_document", tuple(sorted({s for c in clues for s in c.sources})))

    found = [r for r in await asyncio.gather(*(one(e, d) for e, d in converging)) if r is not None]

    # Shared properties: the same answer to facts of different documents, with an entity each.
    by_answer: dict[str, list[Reflection]] = {}
    for r in reflections:
        if r.step in ("facts_direct", "facts_inferred") and len(r.answer.split()) <= 4:
            by_answer.setdefault(r.answer.lower(), []).append(r)
    for rs in by_answer.values():
        docs = {}
        for r in rs:
            ents = find_entities(r.question)
            if ents:
                docs.setdefault(r.sources[0], ents[0])
        if len(docs) >= 2:
            names = sorted(set(docs.values()))
            if len(names) < 2:
                continue
            step.candidates += 1
            step.kept += 1
            found.append(
                Reflection(
                    f"What do {' and '.join(names[:3])} have in common?",
                    _shared_answer(rs, names[:3], documents),
                    "cross_document",
                    tuple(sorted(docs)),
                )
            )
    return found


def _shared_answer(facts: list[Reflection], names: list[str], documents) -> str:
    """The sentences stating the shared property for each entity, one per entity; the bare
    property when the sources do not state it sentence by sentence."""
    texts = {doc.id: doc.text for doc in documents}
    stated = []
    for name in names:
        for r in facts:
            if name in r.question:
                sentence = stating_sentence(r.question, r.answer, texts.get(r.sources[0], ""))
                if sentence is not None:
                    stated.append(sentence)
                break
    return " ".join(stated) if len(stated) == len(names) else facts[0].answer


PASSAGE_QUESTIONS = (FACTS_QUESTION, "Tell me about {}.")


def _passages(
    stats: StepStats, chunks: dict[str, list[str]], fits: Callable[[str, str], bool]
) -> list[Reflection]:
    """One answer per entity, from every chunk that is about it among its three main
    entities or in two sentences or more (the writer, ``coreference.WRITER``, in one): the
    sentences about it (``sentence_entities``: naming it, or referring back to it), those
    of the chunks most about it first (its own document before one that mentions it in
    passing), as many as ``fits`` the training length (the first one whole however long):
    an answer cut there is learned without its end. One answer, not one per document:
    trained on several answers to one question, the memory learns none, and the facts
    about a person must come back whole when a question reaches them through another
    document ("the person who governs Tarnow"). A passage that is the start of another is
    given the longer one."""
    mentions: dict[str, list[tuple[int, str, list[str]]]] = {}
    for doc_id, doc_chunks in chunks.items():
        state = Coreference()
        for chunk in doc_chunks:
            sentences = split_sentences(chunk)
            named = list(dict.fromkeys(names_in(chunk)))  # "Granny Ostrow" for "Granny Ostrow's"
            about, state = sentence_entities(sentences, named, state)
            counts = Counter(e for entities in about for e in entities)
            rank = {e: i for i, e in enumerate(named)}  # ties: find_entities's order, kept by names_in
            ranked = sorted(counts, key=lambda e: (-counts[e], rank.get(e, len(rank))))
            # the writer's sentences are learned besides the three main entities', not in
            # place of one (a user's notes about their manager, their gym, their team)
            main = [e for e in ranked if e != WRITER][:3]
            for entity in main + [e for e in ranked if e not in main and (counts[e] > 1 or e == WRITER)]:
                naming = [
                    s
                    for s, entities in zip(sentences, about, strict=True)
                    if entity in entities and not is_heading(s)
                ]
                mentions.setdefault(entity, []).append((counts[entity], doc_id, naming))
    passages: dict[str, tuple[list[str], list[str]]] = {}  # entity -> (sentences, sources)
    for entity, found in mentions.items():
        found.sort(key=lambda item: -item[0])  # stable: ties keep document order
        sentences: list[str] = []
        sources: list[str] = []
        for _, doc_id, naming in found:
            for sentence in naming:
                longer = join_sentences([*sentences, sentence])
                if sentence not in sentences and (
                    not sentences or fits(FACTS_QUESTION.format(entity), longer)
                ):
                    sentences.append(sentence)
                    if doc_id not in sources:
                        sources.append(doc_id)
        while len(sentences) > 1 and sentences[-1].endswith("?"):
            sentences.pop()  # an FAQ's question whose answer did not fit
        if sentences:  # not named in headings alone: an empty answer would teach the memory to say nothing
            passages[entity] = (sentences, sources)
    out = []
    for entity, (sentences, sources) in passages.items():
        # A passage that opens another and stops sooner teaches the memory to stop there:
        # "What do you know about Baltic Sea?" answered with the first sentence of Tressa's
        # passage made the memory end Tressa's after that sentence. It takes the longest
        # passage it opens instead, which holds it. (Dropping it instead cut the training
        # steps of a small job, and its memory mixed up its people's facts. Giving every
        # passage that lies inside another the longer one changed no answer measured.)
        for other, other_sources in passages.values():
            if len(other) > len(sentences) and other[: len(sentences)] == sentences:
                sentences, sources = other, other_sources
        stats.candidates += len(PASSAGE_QUESTIONS)
        stats.kept += len(PASSAGE_QUESTIONS)
        out += [
            Reflection(template.format(entity), join_sentences(sentences), "passages", tuple(sources))
            for template in PASSAGE_QUESTIONS
        ]
    return out
