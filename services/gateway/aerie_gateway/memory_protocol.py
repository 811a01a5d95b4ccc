"""MEMO's query protocol: the target model (the executive) questions the MEMORY model in
three stages, then the findings are composed into the chat prompt. Plain async code over
two callables, so it is tested without servers.

1. grounding: the executive breaks the user's question into atomic sub-questions; each
   is asked of the memory;
2. entity identification: the executive asks one question whose answer names the entity
   the user's question is about; the entity is the name the memory's answers bring in that
   the question does not name (the bridge of a two-hop question: "the person who governs
   Naxpry" -> "Lumfen Uskyth"), else the one the question names;
3. answer seeking: the memory is asked for the facts about that entity, plainly and as the
   executive rewrites the user's question to name it.

Every memory answer of "I don't know" is pruned (not used, not built on). ``max_turns``
bounds the memory calls over all stages. The executive's output is parsed strictly: a
line that is not a question is ignored, and when nothing parses the stage falls back to
the user's own question (counted in ``fallbacks``).

Single-pass mode asks the memory the user's question once: one turn, least latency.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aerie_common.entities import FACTS_QUESTION, names_in, new_entities

_QUESTION_LINE = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s*|Q\s*\d*\s*[:.]\s*)?(?P<q>[A-Z][^?]{3,200}\?)\s*$")
_STATEMENT = re.compile(r"^[A-Z][^?]*\s\S+\s\S+\s[^?]*[.!]$")  # a capitalised sentence of 4+ words
# "the person who", "the governor of", "the main export of": a definite description
_DESCRIPTION = re.compile(r"\b[Tt]he\s+(?:[a-z]+\s+){0,2}?(?:who|whom|whose|that|which|of)\b")
_IDK = re.compile(r"\b(i don'?t know|i do not know|unknown|no information)\b", re.I)


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
    findings: list[Finding] = field(default_factory=list)
    turns: int = 0
    pruned: int = 0  # memory answers of "I don't know"
    fallbacks: int = 0  # executive outputs that did not parse
    entity: str | None = None
    stopped: str | None = None  # why the protocol ended early, if it did

    @property
    def sources(self) -> list[str]:
        out: list[str] = []
        for f in self.findings:
            out += [s for s in f.sources if s not in out]
        return out


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
    result = ProtocolResult(mode="single_pass")
    answer = await ask_memory(question)
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
    result = ProtocolResult(mode="three_stage")

    async def ask(stage: str, questions: list[str]) -> list[Finding]:
        questions = questions[: max(0, max_turns - result.turns)]
        answers = await asyncio.gather(*(ask_memory(q) for q in questions))
        result.turns += len(questions)
        found = []
        for q, a in zip(questions, answers, strict=True):
            if known(a):
                found.append(Finding(stage, q, a.answer.strip(), a.sources))
            else:
                result.pruned += 1
        result.findings += found
        return found

    # 1. grounding: the question itself plus the executive's atomic sub-questions, leaving
    # turns for the entity (1) and the answer (2) stages
    subs = parse_questions(await ask_executive(decompose_prompt(question), executive_max_tokens), 3)
    if not subs:
        result.fallbacks += 1
    grounding_questions = [question, *[q for q in subs if q != question]]
    grounding = await ask("grounding", grounding_questions[: max(1, max_turns - 3)])
    if not grounding:
        result.stopped = "the memory knew nothing about the question or its parts"
        return result
    if result.turns >= max_turns:
        result.stopped = "turn budget spent"
        return result

    # 2. entity identification
    lines = parse_questions(await ask_executive(entity_prompt(question, grounding), executive_max_tokens), 1)
    if not lines:
        result.fallbacks += 1
        lines = [f"Who or what is this about: {question}"]
    entity_found = await ask("entity", lines[:1])
    if not entity_found:
        result.stopped = "the memory could not name the entity"
        return result
    result.entity = identify_entity(question, [*entity_found, *grounding])
    if result.turns >= max_turns:
        result.stopped = "turn budget spent"
        return result

    # 3. answer seeking
    lines = parse_questions(
        await ask_executive(answer_prompt(question, result.entity), executive_max_tokens), 1
    )
    if not lines:
        result.fallbacks += 1
    facts = FACTS_QUESTION.format(result.entity)  # the question the memory learned its facts under
    await ask("answer", [facts, *[q for q in lines[:1] if result.entity in q and q != facts]])
    return result


def identify_entity(question: str, findings: list[Finding]) -> str:
    """The entity to seek facts about. A question that describes its entity ("the person who
    governs Naxpry", "the governor of Naxpry") is about the first name an answer brings in
    that the question does not name; a question that names its entity ("Who governs
    Naxpry?", "Mira Kev's craft") is about that name. Else the first answer itself."""
    bridges = [b for f in findings for b in new_entities(f.answer, question)]
    named = names_in(question)
    if bridges and (_DESCRIPTION.search(question) or not named):
        return bridges[0]
    if named:
        return named[0]
    return findings[0].answer.strip().rstrip(".")


def compose_system_message(result: ProtocolResult) -> str | None:
    """The findings as a system message for the executive's final answer (None: nothing).

    An answer that is a sentence of its own is given alone: set after a question it does
    not answer ("the profession of the governor?" "Naxpry is governed by Lumfen Uskyth."),
    a small executive reads it as that question's answer. A bare answer keeps its question.
    The same line is given once."""
    lines: list[str] = []
    for finding in result.findings:
        answer = finding.answer.strip()
        line = answer if _STATEMENT.match(answer) else f"{finding.question} {answer}"
        if line not in lines:
            lines.append(line)
    if not lines:
        return None
    facts = "\n".join(f"- {line}" for line in lines)
    return (
        "Facts recalled from memory about the user's question (they may be incomplete):\n"
        f"{facts}\nUse these facts to answer."
    )


def compose_messages(messages: list[dict[str, str]], result: ProtocolResult) -> list[dict[str, str]]:
    system = compose_system_message(result)
    if system is None:
        return messages
    return [*messages[:-1], {"role": "system", "content": system}, messages[-1]]
