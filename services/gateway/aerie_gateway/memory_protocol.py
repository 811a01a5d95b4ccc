"""MEMO's query protocol: the target model (the executive) questions the MEMORY model in
three stages, then the findings are composed into the chat prompt. Plain async code over
two callables, so it is tested without servers.

1. grounding: the executive breaks the user's question into atomic sub-questions; each
   is asked of the memory;
2. entity identification: the executive asks one question whose answer names the entity
   the user's question is about, and the memory is asked for the facts of the entity the
   question names, or, for a question naming nothing, of the question itself as a
   description (the memory takes the passage sharing most of its words). A question that
   describes its entity ("the person who governs Naxpry") is about the name those answers
   link to it: the new name in the sentence that shares most words with the question
   ("Naxpry is governed by Lumfen Uskyth."), looked for first in the named entity's own
   facts, which the memory learned as one passage;
   a question that names its entity is about that name;
3. answer seeking: the memory is asked for the facts about that entity, plainly and as the
   executive rewrites the user's question to name it (a question already asked is not
   asked again).

Every memory answer of "I don't know" is pruned (not used, not built on). ``max_turns``
bounds the memory calls over all stages, and no question is asked twice. A question a stage
asks whatever the executive writes (the user's question, the named entity's facts, the
identified entity's facts) is sent to the memory before the executive's call, so the two
work at once; the memory sees the same questions as when asked one after the other, and
gives the same answers (it decodes greedily). The executive's output is parsed strictly: a
line that is not a question is ignored, and when nothing parses the stage falls back to
the user's own question (counted in ``fallbacks``).

Composition puts the recalled sentences that bear on the question before it, in the user's
turn, as context, most relevant first: a small executive copies whichever fact it reads,
so the facts that share the question's relation words (or name the bridge entity) are
given, not every sentence the memory said, and not the versions the memory made up for the
user's wording where its account of the entity says otherwise.

Single-pass mode asks the memory the user's question once: one turn, least latency.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from aerie_common.entities import (
    CAPITAL,
    FACTS_QUESTION,
    STOPWORDS,
    WORD,
    content_words,
    facts_question_entity,
    in_first_person,
    in_others_words,
    names_in,
    new_entities,
    prose_sentences,
)

_QUESTION_LINE = re.compile(
    rf"^\s*(?:\d+[.)]\s*|[-*]\s*|Q\s*\d*\s*[:.]\s*)?(?P<q>[{CAPITAL}][^?]{{3,200}}\?)\s*$"
)
# A capitalised sentence of 4+ words, or a labelled value ("Opened: 1958.", a list item of
# a document the memory learned as its sentences).
_STATEMENT = re.compile(
    rf"^[{CAPITAL}][^?]*\s\S+\s\S+\s[^?]*[.!]$|^[{CAPITAL}][\w '-]{{0,40}}:\s+[^?\s][^?]*[.!]$"
)
# An FAQ's question and its answer: "Do you charge late fees? No."
_ANSWERED_QUESTION = re.compile(rf"^[{CAPITAL}][^?]*\?\s+[^?]*[.!]$")
# "the person who", "the governor of", "the main export of", "the island where": a
# definite description
_DESCRIPTION = re.compile(r"\b[Tt]he\s+(?:[a-z]+\s+){0,2}?(?:who|whom|whose|that|which|where|of)\b")
_IDK = re.compile(r"\b(i don'?t know|i do not know|unknown|no information)\b", re.I)
# A third-person pronoun, with the word after it: "her" before a noun is a possessive
# ("her first studio"), before anything else ("married her?", "meet her in") an object.
_BACK_REFERENCE = re.compile(
    r"\b(?:(?P<possessive>its|his|their|hers)|(?P<her>her)|it|he|him|she|they|them)\b(?P<after>\s+[\w'-]+)?",
    re.IGNORECASE,
)
# The words of a turn asking to go on about the conversation's topic: "Tell me more.",
# "What else?", "Anything else?", "Go on."
_GO_ON = {"tell", "say", "else", "anything", "go", "continue", "elaborate", "explain", "expand", "details"}
# What a question asks for, as a document says it: "How fast can it fly?" is answered by
# "Top speed: 68 km/h.", "How much does it cost?" by "Price: 49 pounds." (a product page's
# table of labels and values), "How long can it fly?" by "Flight time: 42 minutes.".
# (Not "fly" for "flight": "How fast can it fly?" would rank the flight time as the speed.)
_STATED_AS = [
    (re.compile(rf"\b(?:{asked})\b"), words)
    for asked, words in {
        "how fast": "speed",
        "how far": "distance range",
        "how heavy": "weight",
        "how (?:tall|high)": "height",
        "how (?:big|large)": "size",
        "how old": "age built founded established opened launched born",  # "Built: 1998."
        "how long": "time length duration",
        "how often": "frequency",
        "cost|costs|pay": "price",  # not "charge": a battery's, on a product page
        "hold|holds": "capacity",  # "How much water does it hold?": "Capacity: 1.7 litres."
    }.items()
]
# Findings of the later stages are about the identified entity and come from the memory's
# passages; grounding answers the user's wording and is the most often wrong.
_STAGE_RANK = {"answer": 0, "single_pass": 0, "entity": 1, "grounding": 2}
MAX_FACT_LINES = 8
# Word-sequence similarity (difflib ratio) from which two lines about one entity are two
# versions of one statement: "X collects A and has done so since childhood." against the
# same with B is 0.8; "Naxpry is governed by Old Tom." against "... by Lumfen Uskyth." 0.67.
_SAME_STATEMENT_SIMILARITY = 0.5
ANSWER_FROM_CONTEXT = "Answer with the fact from the context."
# A user's own notes said back to them, for a question in the first person: "I take my
# coffee with oat milk." is given as "You take your coffee with oat milk." In the first
# person, the 135M executive answered "What milk do I take in my coffee?" from its own
# guesses with that line first in the context (docs/memory.md, session 48). Not "we": in a
# company's pages it is the company, not the user asking.
_TO_USER = {
    "i am": "you are",
    "i'm": "you're",
    "i was": "you were",
    "i wasn't": "you weren't",
    "i": "you",
    "me": "you",
    "my": "your",
    "mine": "yours",
    "myself": "yourself",
}
# "I" that is no pronoun: a numeral ("World War I", "Part I.")
_USER_SAYS = re.compile(
    r"\b(?:I am|I'm|I wasn't|I was|(?<!War )(?<!Part )(?<!Act )(?<!Type )(?<!Class )I(?!\s*(?:[.,;:)]|$))"
    r"|[Mm]e|[Mm]y|[Mm]ine|[Mm]yself)\b"
)


@dataclass
class MemoryAnswer:
    answer: str
    sources: list[str] = field(default_factory=list)
    knows: bool = True


AskMemory = Callable[[str], Awaitable[MemoryAnswer]]
AskExecutive = Callable[[list[dict[str, str]], int], Awaitable[str]]


@dataclass
class Finding:
    stage: str  # "grounding" | "entity" | "answer" | "single_pass"
    question: str
    answer: str
    sources: list[str]


@dataclass
class ProtocolResult:
    mode: str
    question: str = ""
    findings: list[Finding] = field(default_factory=list)
    turns: int = 0
    pruned: int = 0  # memory answers of "I don't know"
    fallbacks: int = 0  # executive outputs that did not parse
    entity: str | None = None
    stopped: str | None = None  # why the protocol ended early, if it did
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage run

    @property
    def sources(self) -> list[str]:
        out: list[str] = []
        for f in self.findings:
            out += [s for s in f.sources if s not in out]
        return out


def standalone_question(question: str, earlier: list[tuple[str, str]]) -> str:
    """A follow-up question with its pronouns written out as the name the conversation is
    about: "What did she study?" after "Who is Amara Lindqvist?" is asked of the memory as
    "What did Amara Lindqvist study?", and "Where was her first studio?" as "Where was
    Amara Lindqvist's first studio?". The name is the first the latest user turn naming
    anything gives (the user's topic), else the latest assistant turn's. A question that
    names something is taken as written; one asking only to go on ("Tell me more.", "What
    else?") is asked about the topic. ``earlier``: the conversation before it, as (role,
    text), oldest first."""
    if names_in(question):
        return question
    latest_first = [*reversed(earlier)]
    named = (
        names_in(text)
        for wanted in ("user", "assistant")
        for role, text in latest_first
        if role == wanted  # looked through lazily: a long conversation's latest turns decide
    )
    topic = next((names[0] for names in named if names), None)
    if topic is None:
        return question

    def written_out(match: re.Match) -> str:
        after = match["after"] or ""
        before_noun = bool(after) and after.strip().lower() not in STOPWORDS
        possessive = match["possessive"] or (match["her"] and before_noun)
        return f"{topic}'s{after}" if possessive else f"{topic}{after}"

    written, replaced = _BACK_REFERENCE.subn(written_out, question)
    if replaced:
        return written
    if {w.lower() for w in WORD.findall(question)} - STOPWORDS <= _GO_ON:
        asked = question.strip()
        return f"{asked.rstrip('?.!')} about {topic}{asked[-1] if asked[-1] in '?.!' else '.'}"
    return question


def fit_question(question: str, limit: int) -> str:
    """``question`` as the memory can be asked it, in at most ``limit`` characters: a chat's
    last turn may paste a text before what it asks, so its last sentences that fit (the
    description in a facts question about a whole turn, "What do you know about ...?")."""
    if len(question) <= limit:
        return question
    if (about := facts_question_entity(question)) is not None:
        return FACTS_QUESTION.format(_last_sentences(about, limit - len(FACTS_QUESTION.format(""))))
    return _last_sentences(question, limit)


def _last_sentences(text: str, limit: int) -> str:
    kept: list[str] = []
    for sentence in reversed(prose_sentences(" ".join(text.split()))):
        if len(" ".join([sentence, *kept])) > limit:
            break
        kept.insert(0, sentence)
    return " ".join(kept) or text[-limit:].strip()


def parse_questions(text: str, limit: int) -> list[str]:
    out = []
    for line in text.splitlines():
        if m := _QUESTION_LINE.match(line):
            q = m["q"].strip()
            if q not in out:
                out.append(q)
        if len(out) >= limit:
            break
    return out


def known(answer: MemoryAnswer) -> bool:
    return answer.knows and bool(answer.answer.strip()) and not _IDK.search(answer.answer)


def _msgs(user: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}]


def decompose_prompt(question: str) -> list[dict[str, str]]:
    return _msgs(
        f"Question: {question}\n\nBreak the question into at most three short, simple questions, "
        "one per line, each ending with a question mark."
    )


def entity_prompt(question: str, findings: list[Finding]) -> list[dict[str, str]]:
    known_facts = "\n".join(f"- {f.question} {f.answer}" for f in findings) or "- nothing yet"
    return _msgs(
        f"Question: {question}\nKnown facts:\n{known_facts}\n\nWrite one short question whose answer is the "
        "name of the person, place or thing the question is about. Reply with the question only."
    )


def answer_prompt(question: str, entity: str) -> list[dict[str, str]]:
    return _msgs(
        f"Question: {question}\nIt is about: {entity}\n\nRewrite the question as one short question about "
        f"{entity}, naming {entity}. Reply with the question only."
    )


async def single_pass(question: str, ask_memory: AskMemory) -> ProtocolResult:
    result = ProtocolResult(mode="single_pass", question=question)
    started = time.monotonic()
    answer = await ask_memory(question)
    result.stage_seconds["single_pass"] = round(time.monotonic() - started, 3)
    result.turns = 1
    if known(answer):
        result.findings.append(Finding("single_pass", question, answer.answer, answer.sources))
    else:
        result.pruned = 1
    return result


async def three_stage(
    question: str,
    ask_memory: AskMemory,
    ask_executive: AskExecutive,
    max_turns: int = 6,
    executive_max_tokens: int = 48,
) -> ProtocolResult:
    result = ProtocolResult(mode="three_stage", question=question)
    asked: set[str] = set()
    early: dict[str, asyncio.Task[MemoryAnswer]] = {}
    stage_started = time.monotonic()

    def stage_done(stage: str) -> None:
        nonlocal stage_started
        now = time.monotonic()
        result.stage_seconds[stage] = round(now - stage_started, 3)
        stage_started = now

    def ask_early(question: str) -> None:
        """Start asking a question the stage will ask, so the memory answers as the executive writes."""
        if question not in asked and question not in early:
            early[question] = asyncio.ensure_future(ask_memory(question))

    async def ask(stage: str, questions: list[str]) -> list[Finding]:
        questions = [q for q in dict.fromkeys(questions) if q not in asked]
        questions = questions[: max(0, max_turns - result.turns)]
        asked.update(questions)
        answers = await asyncio.gather(*(early.pop(q, None) or ask_memory(q) for q in questions))
        result.turns += len(questions)
        found = []
        for q, a in zip(questions, answers, strict=True):
            if known(a):
                found.append(Finding(stage, q, a.answer.strip(), a.sources))
            else:
                result.pruned += 1
        result.findings += found
        return found

    try:
        # 1. grounding: the question itself plus the executive's atomic sub-questions, leaving
        # turns for the entity (2) and the answer (2) stages
        ask_early(question)
        subs = parse_questions(await ask_executive(decompose_prompt(question), executive_max_tokens), 3)
        if not subs:
            result.fallbacks += 1
        grounding = await ask("grounding", [question, *subs][: max(1, max_turns - 4)])
        stage_done("grounding")
        if not grounding:
            result.stopped = "the memory knew nothing about the question or its parts"
            return result
        if result.turns >= max_turns:
            result.stopped = "turn budget spent"
            return result

        # 2. entity identification: the executive's question, and the facts of the entity the
        # question names (a described entity is linked from them), or of what a question
        # naming nothing is about; with two turns left the facts are asked whatever the
        # executive's question is
        subject_facts = FACTS_QUESTION.format(_about(with_names_cased(question, grounding)))
        if max_turns - result.turns >= 2:
            ask_early(subject_facts)
        lines = parse_questions(
            await ask_executive(entity_prompt(question, grounding), executive_max_tokens), 1
        )
        if not lines:
            result.fallbacks += 1
            lines = [f"Who or what is this about: {question}"]
        await ask("entity", [*lines[:1], subject_facts])
        result.entity = identify_entity(question, result.findings)
        stage_done("entity")
        if result.turns >= max_turns:
            result.stopped = "turn budget spent"
            return result

        # 3. answer seeking
        facts = FACTS_QUESTION.format(result.entity)  # the question the memory learned its facts under
        ask_early(facts)
        lines = parse_questions(
            await ask_executive(answer_prompt(question, result.entity), executive_max_tokens), 1
        )
        if not lines:
            result.fallbacks += 1
        await ask("answer", [facts, *[q for q in lines[:1] if result.entity in q]])
        stage_done("answer")
        return result
    finally:
        await _cancel(early.values())


async def _cancel(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel early questions no stage asked (the protocol stopped, or failed, first)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    # wait for them and take their errors, so none is logged as never retrieved
    await asyncio.gather(*tasks, return_exceptions=True)


def sentences(answer: str) -> list[str]:
    """The sentences of a memory answer, less a final one the answer's length limit cut off
    ("... Naxpry is governed by Lum")."""
    parts = prose_sentences(answer)
    if len(parts) > 1 and not parts[-1].endswith((".", "!", "?")):
        parts.pop()
    return parts


def fact_lines(finding: Finding) -> list[str]:
    """What a finding tells, line by line: a stated answer as its sentences, each alone (set
    after a question it does not answer, "the profession of the governor?" "Naxpry is
    governed by Lumfen Uskyth.", a small executive reads it as that question's answer), an
    FAQ's question with the answer after it ("Do you charge late fees? No."); a bare answer
    after its question ("Who governs Naxpry? Lumfen Uskyth"). An entity's account (the answer
    to "What do you know about X?", the passage the memory learned from the text) is given
    line by line as soon as one line is a statement: its other lines are the text's too (an
    email's "Thanks, Felix.", a title), and joined into one they would hide its facts in a
    long line that the ranking cannot pick apart."""
    answer = finding.answer.strip()
    lines: list[str] = []
    for line in sentences(answer):
        if lines and lines[-1].endswith("?") and not line.endswith("?"):
            lines[-1] += f" {line}"
        else:
            lines.append(line)
    stated = [bool(_STATEMENT.match(line) or _ANSWERED_QUESTION.match(line)) for line in lines]
    if all(stated) or (any(stated) and is_facts_question(finding.question)):
        return lines
    return [f"{finding.question} {answer}"]


def with_names_cased(question: str, findings: Iterable[Finding]) -> str:
    """A question written without capitals, with each name the memory's answers give
    written as they write it: a user who types "what did amara lindqvist study?" names
    Amara Lindqvist, and names are found by their capitals. A lone capitalised word opening
    an answer's sentence is as often a common noun ("Ferries leave twice a day.") and
    counts only where a sentence names it further on, or, for a question with no capital at
    all, two different sentences open with it: a user who capitalises the question's first
    word and writes "version" in lower case means the word, not the heading "Version 3.2.0"
    that opens two lines of a changelog. A question that gives a name in capitals is taken
    as written."""
    if names_in(question):
        return question
    sentences = {s for f in findings for s in prose_sentences(f.answer)}
    openings = Counter(s.split()[0] for s in sentences)
    typed_lowercase = question == question.lower()
    names = {
        name
        for sentence in sentences
        for name in names_in(sentence)
        if len(name.split()) > 1 or not sentence.startswith(name) or (typed_lowercase and openings[name] > 1)
    }
    for name in sorted(names, key=len, reverse=True):  # "Ostmark Foundation" before "Ostmark"
        question = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", name, question, flags=re.IGNORECASE)
    return question


def _states_nothing(line: str) -> bool:
    """Too short to state a fact: a title ("Simple rye bread."), a greeting or a sign-off
    ("Thanks, Felix."); a labelled value ("Opened: 1958.") states one."""
    return len(line.split()) < 4 and ":" not in line


def _about(question: str) -> str:
    """What to ask the memory the facts of for ``question``: the first name it gives, else
    the question itself as a description ("what should a repotted orchid be planted in"):
    the memory finds the passage sharing most of its words (a policy's, a recipe's, a
    how-to's, where no name says what they are about)."""
    if named := names_in(question):
        return named[0]
    described = question.strip().rstrip("?").strip()
    if re.match(r"I\b", described):  # the first person, which the memory reads as its notes' writer
        return described
    return described[:1].lower() + described[1:]  # no capital the memory could take for a name


def relation_words(question: str) -> set[str]:
    """The question's content words other than the names it gives: what it asks about them,
    with the words a document states that with (``_STATED_AS``)."""
    lowered = question.lower()
    stated_as = " ".join(words for asked, words in _STATED_AS if asked.search(lowered))
    # a name with the number after it ("Velora Tern 7"): the number is the name's, not asked
    named = [
        m[0] for n in names_in(question) if (m := re.search(rf"{re.escape(n)}(?:\s+\d[\w.-]*)?", question))
    ]
    return content_words(f"{question} {stated_as}") - content_words(" ".join(named))


def _overlap(text: str, words: set[str]) -> int:
    return len(content_words(text) & words)


def identify_entity(question: str, findings: list[Finding]) -> str:
    """The entity to seek facts about. A question that describes its entity ("the person who
    governs Naxpry", "the governor of Naxpry") or names none is about the name the answers
    link to it: the first new name in the fact line sharing most relation words with the
    question ("Naxpry is governed by Lumfen Uskyth."), taken from the named entity's own
    facts when they link one. A question that names its entity ("Who governs Naxpry?",
    "Mira Kev's craft") or links nothing is about the name it gives. Else the first new
    name, else the first answer. Names the question gives in other case count as given
    (``with_names_cased``)."""
    question = with_names_cased(question, findings)
    named = names_in(question)
    own_facts = {FACTS_QUESTION.format(n) for n in named}
    ordered = sorted(findings, key=lambda f: f.question not in own_facts)  # stable: own facts first
    if _DESCRIPTION.search(question) or not named:
        relation = relation_words(question)
        for f in ordered:
            linked = [(_overlap(line, relation), line) for line in fact_lines(f)]
            linked = [(n, line) for n, line in linked if n > 0 and new_entities(line, question)]
            if linked:
                return new_entities(max(linked, key=lambda item: item[0])[1], question)[0]
    if named:
        return named[0]
    bridges = [b for f in ordered for b in new_entities(f.answer, question)]
    return bridges[0] if bridges else findings[0].answer.strip().rstrip(".")


def is_facts_question(question: str) -> bool:
    """Whether ``question`` asks for an entity's passage ("What do you know about X?")."""
    return facts_question_entity(question) is not None


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def other_version(line: str, passage_line: str) -> bool:
    """``line`` is another version of what ``passage_line`` states: they share a name and
    read alike, word by word, yet differ ("Naxpry is governed by Old Tom." against "Naxpry
    is governed by Lumfen Uskyth."). Whether it contradicts or repeats, the passage's own
    wording is the one to keep."""
    if line == passage_line:
        return False
    if not {n.lower() for n in names_in(line)} & {n.lower() for n in names_in(passage_line)}:
        return False
    return SequenceMatcher(None, _words(line), _words(passage_line)).ratio() >= _SAME_STATEMENT_SIMILARITY


def _beside_the_passage(line: str, relation: set[str], passage_words: list[set[str]], known: str) -> bool:
    """``line`` is the memory's guess at a question it never learned, beside a passage line
    that states what it states: every relation word of the question it holds, a passage
    line holds too, and it names nothing the question, the entity and the passage do not
    ("The library is closed on the first Monday in June." beside the library's "It is
    closed on Sundays."; a small executive copied the guess). A line naming someone new
    may be the link a question needs, and stays. ``passage_words``: each passage line's
    content words; ``known``: the question, the entity and the passage, lower-cased."""
    asks = content_words(line) & relation
    if not asks or not any(asks <= words for words in passage_words):
        return False
    return all(name.lower() in known for name in names_in(line))


def descriptions(question: str) -> list[str]:
    """The definite descriptions of the question, each up to the name it ends on, lower-cased:
    "the person who governs naxpry" and "the profession of the person who governs naxpry" in
    "What is the profession of the person who governs Naxpry?"."""
    found = []
    for match in _DESCRIPTION.finditer(question):
        rest = question[match.start() :]
        for name in names_in(rest)[:1]:
            if (end := rest.find(name)) >= 0:
                found.append(rest[: end + len(name)].lower())
    return found


def compose_facts(result: ProtocolResult) -> list[str]:
    """The fact lines to give the executive, in order (empty: nothing to give).

    Each line once, ranked by the relation words it shares with the user's question
    ("collect" for "What does the governor of Naxpry collect?"), then by its names and the
    identified entity, then the later stages' before grounding's. Three kinds of line are
    dropped, all what the memory makes up for the user's wording when it does not know:
    another version of a line of the memory's own account of an entity (its answer to "What do
    you know about X?", the passage it learned whole: "Naxpry is governed by Old Tom."
    against the passage's "Naxpry is governed by Lumfen Uskyth."), a line asking nothing of
    the question that a passage line does not state too (``_beside_the_passage``), and, for a question
    that describes its entity, a restatement of the description that does not name the
    entity it was resolved to ("The governor of Vorras collects iron nails." when the
    governor is Celilotal Dorard). A small executive copies whichever fact it reads first.
    So a passage line stating nothing (a title, "Simple rye bread.", which shares the
    words a question names its topic by) comes after every line stating something, and an
    answer that only repeats a passage line is not given again after its question ("How
    long should the dough rise? Simple rye bread.").

    Kept are the lines that share a relation word or name the bridge entity (one the
    question does not name), so the town's main export beside its governor does not
    answer "Who governs Naxpry?". When no line qualifies (a question asking nothing
    specific, "Tell me about Naxpry."), all are kept."""
    question = with_names_cased(result.question, result.findings)
    relation = relation_words(question)
    named = names_in(question)
    names = content_words(" ".join([*named, result.entity or ""]))
    bridge = (result.entity or "").lower()
    if any(bridge == n.lower() for n in named):
        bridge = ""
    ranked: dict[str, tuple[bool, int, int, int, int]] = {}
    said = [(finding, fact_lines(finding)) for finding in result.findings]
    passage = {line for finding, lines in said if is_facts_question(finding.question) for line in lines}
    for finding, lines in said:
        for line in lines:
            # an answer only repeating a passage line, after its question, adds nothing
            if (
                line.startswith(f"{finding.question} ")
                and line.removeprefix(f"{finding.question} ") in passage
            ):
                continue
            key = (
                line in passage and _states_nothing(line),
                -_overlap(line, relation),
                -_overlap(line, names),
                _STAGE_RANK.get(finding.stage, 2),
                len(ranked),
            )
            if line not in ranked or key < ranked[line]:
                ranked[line] = key
    trusted = [line for line in ranked if line in passage or not any(other_version(line, p) for p in passage)]
    passage_words = [content_words(p) for p in passage]
    known = " ".join([result.question, result.entity or "", *passage]).lower()
    trusted = [
        line
        for line in trusted
        if line in passage or not _beside_the_passage(line, relation, passage_words, known)
    ]
    if bridge:
        described = descriptions(question)
        kept = [
            line
            for line in trusted
            if bridge in line.lower() or not any(d in line.lower() for d in described)
        ]
        trusted = kept or trusted
    lines = sorted(trusted, key=ranked.__getitem__)
    # ranked[line][1] is minus the relation words the line shares, counted once above
    focused = [line for line in lines if ranked[line][1] or (bridge and bridge in line.lower())]
    return (focused or lines)[:MAX_FACT_LINES]


def said_to_user(line: str) -> str:
    """A line of the user's own notes as said back to them: "I take my coffee with oat
    milk." -> "You take your coffee with oat milk."; one in someone else's words (a quote,
    a chat turn) as it is."""
    if in_others_words(line):
        return line

    def to_user(match: re.Match) -> str:
        said = _TO_USER[match[0].lower()]
        before = line[: match.start()].rstrip()
        opens_a_sentence = not before or before.endswith((".", "!", "?"))
        return said[:1].upper() + said[1:] if opens_a_sentence else said

    return _USER_SAYS.sub(to_user, line)


def compose_messages(messages: list[dict[str, str]], result: ProtocolResult) -> list[dict[str, str]]:
    """The chat with the recalled facts put before the user's last question, in that turn (a
    system turn mid-conversation is not something every chat template accepts), as context
    with an instruction to answer from it after the question: the 135M executive read a
    bare "Facts:" list and then answered from its own guesses (bench.memory_qa.replay
    measures such choices on recorded recalls; docs/memory.md has the figures). The
    question is the one the memory was asked: a follow-up as the conversation means it
    ("Who is Ostmark Foundation's director?" for "Who is its director?"), which the 135M
    executive answered where it did not resolve "its" itself. Asked in the first person
    ("What milk do I take?"), the facts are said to the user (``said_to_user``)."""
    facts = compose_facts(result)
    if not facts:
        return messages
    last = messages[-1]
    question = result.question or last["content"]
    if in_first_person(question):
        facts = [said_to_user(line) for line in facts]
    listed = "\n".join(f"- {line}" for line in facts)
    content = f"Context:\n{listed}\n\nQuestion: {question}\n{ANSWER_FROM_CONTEXT}"
    return [*messages[:-1], {**last, "content": content}]
