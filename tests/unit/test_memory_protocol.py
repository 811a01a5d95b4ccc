"""The three-stage query protocol and single-pass mode over scripted memory and executive."""

from __future__ import annotations

import asyncio

from aerie_gateway.memory_protocol import (
    Finding,
    MemoryAnswer,
    ProtocolResult,
    compose_messages,
    compose_system_message,
    identify_entity,
    parse_questions,
    single_pass,
    three_stage,
)

FACTS = {
    "Who governs Naxpry?": MemoryAnswer("Lumfen Uskyth", ["town-01"]),
    "What is the profession of the person who governs Naxpry?": MemoryAnswer("I don't know.", [], False),
    "What is Lumfen Uskyth's profession?": MemoryAnswer("astronomer", ["person-01"]),
    "What do you know about Lumfen Uskyth?": MemoryAnswer(
        "Lumfen Uskyth is an astronomer who lives in Naxpry.", ["person-01"]
    ),
}


class Memory:
    def __init__(self):
        self.asked: list[str] = []

    async def __call__(self, question):
        self.asked.append(question)
        await asyncio.sleep(0)
        return FACTS.get(question, MemoryAnswer("I don't know.", [], False))


def executive(script):
    async def run(messages, max_tokens):
        prompt = messages[-1]["content"]
        for key, reply in script.items():
            if key in prompt:
                return reply
        return "???"

    return run


QUESTION = "What is the profession of the person who governs Naxpry?"
GOOD = {
    "Break the question": "1. Who governs Naxpry?\n2. What is their profession?\nSure thing",
    "name of the person": "Who governs Naxpry?",
    "Rewrite the question": "What is Lumfen Uskyth's profession?",
}


def test_parse_questions():
    text = "1. Who governs Naxpry?\n- What is it?\nnot a question\nQ: Where is it?\nwho lowercase?"
    assert parse_questions(text, 5) == ["Who governs Naxpry?", "What is it?", "Where is it?"]
    assert parse_questions(text, 1) == ["Who governs Naxpry?"]


def test_three_stages_find_the_cross_document_answer():
    memory = Memory()
    result = asyncio.run(three_stage(QUESTION, memory, executive(GOOD), max_turns=6))
    # grounding leaves 3 of the 6 turns to the later stages: the question and 2 sub-questions
    assert memory.asked[:3] == [QUESTION, "Who governs Naxpry?", "What is their profession?"]
    assert [f.stage for f in result.findings] == ["grounding", "entity", "answer", "answer"]
    assert result.entity == "Lumfen Uskyth"
    # answer seeking asks for the entity's facts, then the executive's rewrite
    assert memory.asked[4:] == [
        "What do you know about Lumfen Uskyth?",
        "What is Lumfen Uskyth's profession?",
    ]
    assert result.findings[-1].answer == "astronomer"
    assert result.sources == ["town-01", "person-01"]
    assert result.turns == 6 and result.pruned == 2 and result.fallbacks == 0
    system = compose_messages([{"role": "user", "content": QUESTION}], result)
    assert system[0]["role"] == "system" and "astronomer" in system[0]["content"]
    assert system[-1] == {"role": "user", "content": QUESTION}


def test_turn_budget_and_pruning_stop_early():
    memory = Memory()
    result = asyncio.run(three_stage("Who governs Naxpry?", memory, executive(GOOD), max_turns=2))
    assert result.turns == 2 and len(memory.asked) == 2
    assert result.stopped == "turn budget spent"

    # a memory that knows nothing: stops after grounding, composes nothing
    async def idk(q):
        return MemoryAnswer("I don't know.", [], False)

    result = asyncio.run(three_stage(QUESTION, idk, executive(GOOD)))
    assert result.findings == [] and result.pruned == 3 and "knew nothing" in result.stopped
    assert compose_messages([{"role": "user", "content": QUESTION}], result) == [
        {"role": "user", "content": QUESTION}
    ]


def finding(answer: str, question: str = "Q?") -> Finding:
    return Finding("grounding", question, answer, [])


def test_identify_entity_follows_a_description_to_the_name_an_answer_brings_in():
    governed = [finding("Naxpry is governed by Lumfen Uskyth.")]
    # a description of the entity: the bridge to the name the question does not give
    assert identify_entity(QUESTION, governed) == "Lumfen Uskyth"
    assert identify_entity("What does the governor of Naxpry collect?", governed) == "Lumfen Uskyth"
    assert identify_entity("The governor of Naxpry collects what?", governed) == "Lumfen Uskyth"
    # a question naming its entity stays with it, though the answer names another
    lives = [finding("Lumfen Uskyth is an astronomer who lives in Naxpry.")]
    assert identify_entity("What is Lumfen Uskyth's profession?", lives) == "Lumfen Uskyth"
    assert identify_entity("Who governs Naxpry?", governed) == "Naxpry"
    # nothing named in the question: the first new name, else the answer itself
    assert identify_entity("Who is the oldest bellfounder?", lives) == "Lumfen Uskyth"
    assert identify_entity("What is the oldest craft?", [finding("bell founding.")]) == "bell founding"


def test_compose_gives_a_stated_answer_alone_and_each_line_once():
    result = ProtocolResult(
        "three_stage",
        findings=[
            finding("Naxpry is governed by Lumfen Uskyth.", QUESTION),
            finding("Naxpry is governed by Lumfen Uskyth.", "Who governs Naxpry?"),
            finding("astronomer", "What is Lumfen Uskyth's profession?"),
        ],
    )
    lines = compose_system_message(result).splitlines()
    assert lines[1:3] == [
        "- Naxpry is governed by Lumfen Uskyth.",
        "- What is Lumfen Uskyth's profession? astronomer",
    ]
    assert not any(QUESTION in line for line in lines)


def test_unparseable_executive_falls_back_to_the_question():
    memory = Memory()
    result = asyncio.run(three_stage("Who governs Naxpry?", memory, executive({}), max_turns=6))
    assert result.fallbacks == 2 and result.stopped == "the memory could not name the entity"
    assert memory.asked[0] == "Who governs Naxpry?"
    assert result.findings[0].answer == "Lumfen Uskyth"


def test_a_rewrite_that_does_not_name_the_entity_is_not_asked():
    memory = Memory()
    script = {**GOOD, "Rewrite the question": "What is their profession?"}
    result = asyncio.run(three_stage(QUESTION, memory, executive(script), max_turns=6))
    assert memory.asked[4:] == ["What do you know about Lumfen Uskyth?"]
    assert result.findings[-1].answer.startswith("Lumfen Uskyth is an astronomer")
    assert result.turns == 5 and result.fallbacks == 0

    # a rewrite that is the facts question itself is asked once
    memory = Memory()
    script = {**GOOD, "Rewrite the question": "What do you know about Lumfen Uskyth?"}
    asyncio.run(three_stage(QUESTION, memory, executive(script), max_turns=6))
    assert memory.asked[4:] == ["What do you know about Lumfen Uskyth?"]


def test_single_pass():
    memory = Memory()
    result = asyncio.run(single_pass("Who governs Naxpry?", memory))
    assert result.turns == 1 and result.findings[0].sources == ["town-01"]
    result = asyncio.run(single_pass(QUESTION, memory))
    assert result.findings == [] and result.pruned == 1
