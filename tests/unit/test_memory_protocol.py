"""The three-stage query protocol and single-pass mode over scripted memory and executive."""

from __future__ import annotations

import asyncio

from aerie_gateway.memory_protocol import (
    MemoryAnswer,
    compose_messages,
    parse_questions,
    single_pass,
    three_stage,
)

FACTS = {
    "Who governs Naxpry?": MemoryAnswer("Lumfen Uskyth", ["town-01"]),
    "What is the profession of the person who governs Naxpry?": MemoryAnswer("I don't know.", [], False),
    "What is Lumfen Uskyth's profession?": MemoryAnswer("astronomer", ["person-01"]),
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
    assert [f.stage for f in result.findings] == ["grounding", "entity", "answer"]
    assert result.entity == "Lumfen Uskyth"
    assert result.findings[-1].answer == "astronomer"
    assert result.sources == ["town-01", "person-01"]
    # asked: the question, 2 sub-questions, entity, answer; 2 "I don't know" pruned
    assert result.turns == 5 and result.pruned == 2 and result.fallbacks == 0
    system = compose_messages([{"role": "user", "content": QUESTION}], result)
    assert system[0]["role"] == "system" and "astronomer" in system[0]["content"]
    assert system[-1] == {"role": "user", "content": QUESTION}


def test_turn_budget_and_pruning_stop_early():
    memory = Memory()
    result = asyncio.run(three_stage(QUESTION, memory, executive(GOOD), max_turns=2))
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


def test_unparseable_executive_falls_back_to_the_question():
    memory = Memory()
    result = asyncio.run(three_stage("Who governs Naxpry?", memory, executive({}), max_turns=6))
    assert result.fallbacks == 2 and result.stopped == "the memory could not name the entity"
    assert memory.asked[0] == "Who governs Naxpry?"
    assert result.findings[0].answer == "Lumfen Uskyth"


def test_single_pass():
    memory = Memory()
    result = asyncio.run(single_pass("Who governs Naxpry?", memory))
    assert result.turns == 1 and result.findings[0].sources == ["town-01"]
    result = asyncio.run(single_pass(QUESTION, memory))
    assert result.findings == [] and result.pruned == 1
