"""The three-stage query protocol and single-pass mode over scripted memory and executive."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from aerie_common.entities import FACTS_QUESTION, content_words, names_in
from aerie_gateway.memory_protocol import (
    ANSWER_FROM_CONTEXT,
    MAX_FACT_LINES,
    Finding,
    MemoryAnswer,
    ProtocolResult,
    compose_facts,
    compose_messages,
    descriptions,
    fact_lines,
    fit_question,
    identify_entity,
    other_version,
    parse_questions,
    said_to_user,
    single_pass,
    standalone_question,
    three_stage,
    with_names_cased,
)

FACTS = {
    "Who governs Naxpry?": MemoryAnswer("Lumfen Uskyth", ["town-01"]),
    "What is the profession of the person who governs Naxpry?": MemoryAnswer("I don't know.", [], False),
    "What is Lumfen Uskyth's profession?": MemoryAnswer("astronomer", ["person-01"]),
    "What do you know about Lumfen Uskyth?": MemoryAnswer(
        "Lumfen Uskyth is an astronomer who lives in Naxpry.", ["person-01"]
    ),
    # a passage, cut off by the memory's answer length
    "What do you know about Naxpry?": MemoryAnswer(
        "Naxpry is a small town on the Vorfen river. Naxpry is governed by Lumfen Uskyth. Lumfen Usk",
        ["town-01"],
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
    assert memory.asked == [
        # grounding leaves 4 of the 6 turns to the later stages: the question and 1 sub-question
        QUESTION,
        "Who governs Naxpry?",
        # entity identification: the executive's question was asked already; the named
        # entity's facts link the described one
        "What do you know about Naxpry?",
        # answer seeking: the entity's facts, then the executive's rewrite
        "What do you know about Lumfen Uskyth?",
        "What is Lumfen Uskyth's profession?",
    ]
    assert [f.stage for f in result.findings] == ["grounding", "entity", "answer", "answer"]
    assert result.entity == "Lumfen Uskyth"
    assert result.findings[-1].answer == "astronomer"
    assert result.sources == ["town-01", "person-01"]
    assert result.turns == 5 and result.pruned == 1 and result.fallbacks == 0
    composed = compose_messages([{"role": "user", "content": QUESTION}], result)
    assert [m["role"] for m in composed] == ["user"]
    prompt = composed[0]["content"]
    assert prompt.startswith("Context:\n- ")
    assert prompt.endswith(f"\n\nQuestion: {QUESTION}\n{ANSWER_FROM_CONTEXT}")
    assert "astronomer" in prompt and "Naxpry is governed by Lumfen Uskyth." in prompt
    assert "Lumfen Usk\n" not in prompt  # the cut-off sentence is not given
    assert "Vorfen river" not in prompt  # shares nothing with the question


def test_turn_budget_and_pruning_stop_early():
    memory = Memory()
    result = asyncio.run(three_stage("Who governs Naxpry?", memory, executive(GOOD), max_turns=2))
    assert memory.asked == ["Who governs Naxpry?", "What do you know about Naxpry?"]
    assert result.turns == 2 and result.stopped == "turn budget spent"

    # a memory that knows nothing: stops after grounding, composes nothing
    async def idk(q):
        return MemoryAnswer("I don't know.", [], False)

    result = asyncio.run(three_stage(QUESTION, idk, executive(GOOD)))
    assert result.findings == [] and result.pruned == 2 and "knew nothing" in result.stopped
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
    lives_in = [finding("Lumfen Uskyth is an astronomer who lives in Naxpry.")]
    assert identify_entity("Who governs the town where Lumfen Uskyth lives?", lives_in) == "Naxpry"
    # a bare answer links through its question
    assert identify_entity(QUESTION, [finding("Lumfen Uskyth", "Who governs Naxpry?")]) == "Lumfen Uskyth"
    # a question naming its entity stays with it, though the answer names another
    lives = [finding("Lumfen Uskyth is an astronomer who lives in Naxpry.")]
    assert identify_entity("What is Lumfen Uskyth's profession?", lives) == "Lumfen Uskyth"
    assert identify_entity("Who governs Naxpry?", governed) == "Naxpry"
    # nothing named in the question: the first new name, else the answer itself
    assert identify_entity("Who is the oldest bellfounder?", lives) == "Lumfen Uskyth"
    assert identify_entity("What is the oldest craft?", [finding("bell founding.")]) == "bell founding"


def test_the_link_is_the_sentence_sharing_the_question_s_relation_from_the_entity_s_own_facts():
    own = Finding(
        "entity",
        "What do you know about Naxpry?",
        "Naxpry is a small town on the Vorfen river. The main export of Naxpry is rope. "
        "Naxpry is governed by Lumfen Uskyth. Lumfen Usk",
        [],
    )
    wrong = finding("Naxpry is governed by Ondkev Jordor.", QUESTION)
    # not the river the first sentence brings in: the sentence that shares "govern"
    assert identify_entity(QUESTION, [own]) == "Lumfen Uskyth"
    # the named entity's own facts come before a grounding answer linking another name
    assert identify_entity(QUESTION, [wrong, own]) == "Lumfen Uskyth"
    assert identify_entity(QUESTION, [wrong]) == "Ondkev Jordor"
    # a described thing with no link ("the main export of Naxpry") stays with the named entity
    assert identify_entity("What is the main export of Naxpry?", [own]) == "Naxpry"


def test_compose_gives_a_stated_answer_alone_and_each_line_once():
    result = ProtocolResult(
        "three_stage",
        findings=[
            finding("Naxpry is governed by Lumfen Uskyth.", QUESTION),
            finding("Naxpry is governed by Lumfen Uskyth.", "Who governs Naxpry?"),
            finding("astronomer", "What is Lumfen Uskyth's profession?"),
        ],
    )
    assert compose_facts(result) == [
        "Naxpry is governed by Lumfen Uskyth.",
        "What is Lumfen Uskyth's profession? astronomer",
    ]


def test_compose_gives_the_facts_that_bear_on_the_question_most_relevant_first():
    question = "What does the governor of Naxpry collect?"
    result = ProtocolResult(
        "three_stage",
        question=question,
        entity="Lumfen Uskyth",
        findings=[
            finding("Lumfen Uskyth collects brass buttons.", question),  # grounding: a wrong recall
            Finding(
                "answer",
                "What do you know about Lumfen Uskyth?",
                "Lumfen Uskyth is an astronomer who lives in Naxpry. Lumfen Uskyth collects old maps. "
                "Naxpry is governed by Lum",
                [],
            ),
            Finding(
                "entity",
                "What do you know about Naxpry?",
                "The main export of Naxpry is rope. Naxpry is governed by Lumfen Uskyth.",
                [],
            ),
        ],
    )
    assert compose_facts(result) == [
        "Naxpry is governed by Lumfen Uskyth.",  # "govern" and both names
        "Lumfen Uskyth collects old maps.",  # "collect"
        "Lumfen Uskyth is an astronomer who lives in Naxpry.",  # names the bridge entity
    ]  # not the export: it shares nothing with the question and names only the town; not
    # grounding's "brass buttons": the entity's passage says otherwise
    # the town's facts beside its governor are left out when the town is the entity
    town = ProtocolResult(
        "three_stage", question="Who governs Naxpry?", entity="Naxpry", findings=result.findings[2:]
    )
    assert compose_facts(town) == ["Naxpry is governed by Lumfen Uskyth."]
    # a question that asks nothing specific gets every line, at most MAX_FACT_LINES
    many = ProtocolResult(
        "three_stage",
        question="Tell me about Naxpry.",
        findings=[finding(f"Naxpry fact number {i} is here.") for i in range(12)],
    )
    assert compose_facts(many) == [f"Naxpry fact number {i} is here." for i in range(MAX_FACT_LINES)]


def test_a_question_about_a_specification_ranks_the_line_stating_it_by_its_label():
    # a product page learned as its table of labels and values: "How fast" asks for the speed
    passage = (
        "The Orrin S4 is a survey drone made by Halcyon Robotics. Flight time: 42 minutes. "
        "Top speed: 68 km/h. Range: 9 km. Price: 3,900 euros. Built: 2021, in Turin. Capacity: 2 kg."
    )
    findings = [Finding("entity", "What do you know about Orrin S4?", passage, ["o"])]
    first_line = {
        "How fast can the Orrin S4 fly?": "Top speed: 68 km/h.",
        "How long can the Orrin S4 fly?": "Flight time: 42 minutes.",
        "How far can the Orrin S4 fly from its pilot?": "Range: 9 km.",
        "How much does the Orrin S4 cost?": "Price: 3,900 euros.",
        "How old is the Orrin S4?": "Built: 2021, in Turin.",
        "How much cargo does the Orrin S4 hold?": "Capacity: 2 kg.",
    }
    for question, line in first_line.items():
        result = ProtocolResult(mode="three_stage", question=question, findings=findings, entity="Orrin S4")
        assert compose_facts(result)[0] == line, question
    # the number after a name is the name's ("Velora Tern 7"), not a word the question asks about
    passage = "Velora Tern 7 electric bike. The Velora Tern 7 is a folding bike. Top speed: 25 km/h."
    findings = [Finding("entity", "What do you know about Velora Tern?", passage, ["v"])]
    question = "How fast does the Velora Tern 7 go?"
    result = ProtocolResult(mode="three_stage", question=question, findings=findings, entity="Velora Tern")
    assert compose_facts(result)[0] == "Top speed: 25 km/h."


def test_another_version_of_a_passage_line_is_one_about_the_same_entity_that_reads_alike():
    passage = "Naxpry is governed by Lumfen Uskyth."
    assert other_version("Naxpry is governed by Old Tom.", passage)
    assert other_version(
        "Celilotal Dorard collects blue feathers and has done so since childhood.",
        "Celilotal Dorard collects pressed ferns and has done so since childhood.",
    )
    assert not other_version(passage, passage)
    # the same shape about another entity is another statement
    assert not other_version("The main export of Vorras is tea.", "The main export of Naxpry is rope.")
    assert not other_version("Lumfen Uskyth is an astronomer who lives in Naxpry.", passage)


def test_the_memory_s_other_versions_of_its_passage_are_not_composed():
    question = "Who governs Naxpry?"
    result = ProtocolResult(
        "three_stage",
        question=question,
        entity="Naxpry",
        findings=[
            finding("Naxpry is governed by Old Tom.", question),  # grounding, user's wording
            Finding("entity", "What do you know about Naxpry?", "Naxpry is governed by Lumfen Uskyth.", []),
            finding("Vorras is governed by Ondkev Jordor.", "Who governs Vorras?"),
        ],
    )
    assert compose_facts(result) == [
        "Naxpry is governed by Lumfen Uskyth.",
        "Vorras is governed by Ondkev Jordor.",
    ]
    # without the passage there is nothing to prefer: both versions are given
    result.findings.pop(1)
    assert compose_facts(result)[0] == "Naxpry is governed by Old Tom."


def test_a_restated_description_not_naming_its_resolved_entity_is_not_composed():
    question = "What is the profession of the person who governs Naxpry?"
    assert descriptions(question) == [
        "the profession of the person who governs naxpry",
        "the person who governs naxpry",
    ]
    assert descriptions("What does the governor of Naxpry collect?") == ["the governor of naxpry"]
    assert descriptions("Who governs Naxpry?") == []
    findings = [
        finding("The person who governs Naxpry is Ondkev Jordor.", question),  # made up
        finding("The person who governs Naxpry is Lumfen Uskyth.", "Who governs Naxpry?"),
        Finding(
            "answer",
            "What do you know about Lumfen Uskyth?",
            "Lumfen Uskyth is an astronomer who lives in Naxpry.",
            [],
        ),
    ]
    resolved = ProtocolResult("three_stage", question=question, entity="Lumfen Uskyth", findings=findings)
    assert compose_facts(resolved) == [
        "The person who governs Naxpry is Lumfen Uskyth.",
        "Lumfen Uskyth is an astronomer who lives in Naxpry.",
    ]
    # resolved to nothing new (the entity is the one named): restatements are all there is
    unresolved = ProtocolResult("three_stage", question=question, entity="Naxpry", findings=findings[:2])
    assert compose_facts(unresolved) == [f.answer for f in findings[:2]]


def test_unparseable_executive_falls_back_to_the_question():
    memory = Memory()
    result = asyncio.run(three_stage("Who governs Naxpry?", memory, executive({}), max_turns=6))
    # no sub-questions, no entity question (the fallback is asked), no rewrite
    assert result.fallbacks == 3 and result.stopped is None
    # (the named entity's facts are asked before the executive's entity question is read)
    assert sorted(memory.asked) == [
        "What do you know about Naxpry?",
        "Who governs Naxpry?",
        "Who or what is this about: Who governs Naxpry?",
    ]
    assert result.entity == "Naxpry" and result.findings[0].answer == "Lumfen Uskyth"


def test_a_rewrite_that_does_not_name_the_entity_is_not_asked():
    memory = Memory()
    script = {**GOOD, "Rewrite the question": "What is their profession?"}
    result = asyncio.run(three_stage(QUESTION, memory, executive(script), max_turns=6))
    assert memory.asked[3:] == ["What do you know about Lumfen Uskyth?"]
    assert result.findings[-1].answer.startswith("Lumfen Uskyth is an astronomer")
    assert result.turns == 4 and result.fallbacks == 0

    # a rewrite that is the facts question itself is asked once
    memory = Memory()
    script = {**GOOD, "Rewrite the question": "What do you know about Lumfen Uskyth?"}
    asyncio.run(three_stage(QUESTION, memory, executive(script), max_turns=6))
    assert memory.asked[3:] == ["What do you know about Lumfen Uskyth?"]


def test_the_memory_answers_while_the_executive_writes():
    # Each executive call waits until the memory has been asked the question its stage asks
    # whatever the executive writes; one after the other, the protocol would never end.
    memory = Memory()
    waits_for = {
        "Break the question": QUESTION,
        "name of the person": "What do you know about Naxpry?",
        "Rewrite the question": "What do you know about Lumfen Uskyth?",
    }

    async def executive_waiting(messages, max_tokens):
        prompt = messages[-1]["content"]
        key = next(k for k in waits_for if k in prompt)
        while waits_for[key] not in memory.asked:
            await asyncio.sleep(0)
        return GOOD[key]

    async def run():
        return await asyncio.wait_for(three_stage(QUESTION, memory, executive_waiting), timeout=5)

    result = asyncio.run(run())
    sequential = Memory()
    expected = asyncio.run(three_stage(QUESTION, sequential, executive(GOOD)))
    assert sorted(memory.asked) == sorted(sequential.asked) and len(memory.asked) == 5
    assert result.findings == expected.findings and result.entity == "Lumfen Uskyth"
    assert list(result.stage_seconds) == ["grounding", "entity", "answer"]


def test_no_question_is_asked_twice_and_early_ones_are_cancelled_on_failure():
    # the executive's entity question is the grounding question the memory did not know
    memory = Memory()
    script = {**GOOD, "name of the person": QUESTION}
    result = asyncio.run(three_stage(QUESTION, memory, executive(script)))
    assert memory.asked.count(QUESTION) == 1 and result.pruned == 1

    # the executive fails at the last stage: the facts question sent early is cancelled
    cancelled: list[str] = []

    async def slow_memory(question):
        if question.startswith("What do you know about Lumfen"):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(question)
                raise
        return FACTS.get(question, MemoryAnswer("I don't know.", [], False))

    async def failing(messages, max_tokens):
        if "Rewrite the question" in messages[-1]["content"]:
            await asyncio.sleep(0)  # the early question starts
            raise RuntimeError("executive down")
        return await executive(GOOD)(messages, max_tokens)

    async def run():
        with pytest.raises(RuntimeError, match="executive down"):
            await three_stage(QUESTION, slow_memory, failing)
        return list(cancelled)  # as three_stage returned

    assert asyncio.run(run()) == ["What do you know about Lumfen Uskyth?"]


def test_single_pass():
    memory = Memory()
    result = asyncio.run(single_pass("Who governs Naxpry?", memory))
    assert result.turns == 1 and result.findings[0].sources == ["town-01"]
    result = asyncio.run(single_pass(QUESTION, memory))
    assert result.findings == [] and result.pruned == 1


def test_a_recalled_list_is_composed_item_by_item():
    # a document's "Key: value" list, learned as its sentences: each item is a fact line of
    # its own, and "open" finds "Opened" (stems, not five letters: "opene")
    passage = "The Brannock Observatory sits on Mount Ederly. Opened: 1958. Director: Sanne Holloway."
    finding = Finding("entity", "What do you know about Brannock Observatory?", passage, ["b"])
    result = ProtocolResult(
        mode="three_stage",
        question="When did the Brannock Observatory open?",
        findings=[finding],
        entity="Brannock Observatory",
    )
    assert compose_facts(result) == ["Opened: 1958."]
    # an FAQ's question goes with the answer after it
    passage = (
        "Questions about the Marlowe Library. When is the library open? From 9 am. It is closed on Sundays. "
        "Do you charge late fees? No."
    )
    finding = Finding("entity", "What do you know about Marlowe Library?", passage, ["m"])
    assert fact_lines(finding) == [
        "Questions about the Marlowe Library.",
        "When is the library open? From 9 am.",
        "It is closed on Sundays.",
        "Do you charge late fees? No.",
    ]
    assert content_words("open") == content_words("opened") == content_words("opens")
    assert content_words("governor") == content_words("governed")  # as with five letters
    assert content_words("built") == content_words("builds") and content_words("sold") == content_words(
        "sell"
    )


def test_an_entitys_account_is_composed_line_by_line_beside_lines_that_state_nothing():
    # an email learned whole: its sign-off states nothing, yet the account's facts are lines
    # of their own, and the one the question asks about comes first
    passage = (
        "Subject: Move to the new office. We move into the new office at 40 Sable Lane on Monday. "
        "Your new door badges will be handed out by Greta Lunde at reception. Thanks, Felix."
    )
    finding = Finding("entity", "What do you know about Quillstone Design?", passage, ["e"])
    assert fact_lines(finding) == [
        "Subject: Move to the new office.",
        "We move into the new office at 40 Sable Lane on Monday.",
        "Your new door badges will be handed out by Greta Lunde at reception.",
        "Thanks, Felix.",
    ]
    result = ProtocolResult(
        mode="three_stage",
        question="Who hands out the new door badges at Quillstone Design?",
        findings=[finding],
        entity="Quillstone Design",
    )
    assert compose_facts(result)[0] == "Your new door badges will be handed out by Greta Lunde at reception."
    # any other answer keeps a line that states nothing with its question
    other = Finding("grounding", "Who hands out the badges?", "Greta Lunde. She works at reception.", ["e"])
    assert fact_lines(other) == ["Who hands out the badges? Greta Lunde. She works at reception."]


def test_a_line_opening_with_a_capital_past_ascii_is_a_statement():
    finding = Finding(
        "grounding",
        "Where did Émile Zola live?",
        "Émile Zola lived in Paris. Ørsted was born in Rudkøbing.",
        [],
    )
    assert fact_lines(finding) == ["Émile Zola lived in Paris.", "Ørsted was born in Rudkøbing."]


def test_the_word_opening_a_users_question_or_request_is_no_part_of_a_name():
    # the memory is asked for the facts of "Tressa", not of "Is Tressa", which it never learned
    asked = {
        "Is Tressa an island?": ["Tressa"],
        "Did Orrin Vastel found the Halvard Instrument Company?": [
            "Halvard Instrument Company",
            "Orrin Vastel",
        ],
        "What's the population of Kelmouth?": ["Kelmouth"],
        "Where's the Brannock Observatory?": ["Brannock Observatory"],
        "Tell me about Amara Lindqvist.": ["Amara Lindqvist"],
        "Please describe Kelmouth.": ["Kelmouth"],
        "Explain the Ostmark Foundation.": ["Ostmark Foundation"],
        "Describe the Bank of England.": ["Bank of England"],
        "Below what temperature should the medicine be stored?": [],
        "Under which menu is dark mode switched on?": [],
        "About how many people live on Tressa?": ["Tressa"],
    }
    assert {question: names_in(question) for question in asked} == asked


def test_a_question_typed_without_capitals_names_what_the_memorys_answers_name():
    passage = "Naxpry is a small town on the Vorfen river. Naxpry is governed by Lumfen Uskyth. Ferries leave twice a day."
    findings = [Finding("grounding", "q", passage, [])]
    # two sentences open with "Naxpry", "Vorfen" is named mid-sentence; "Ferries" only opens one
    assert (
        with_names_cased("do ferries leave naxpry? who governs naxpry on the vorfen?", findings)
        == "do ferries leave Naxpry? who governs Naxpry on the Vorfen?"
    )
    assert (
        with_names_cased("does Lumfen Uskyth govern naxpry?", findings) == "does Lumfen Uskyth govern naxpry?"
    )
    # a user who capitalises the first word writes a word in lower case as a word: the
    # changelog's "Version" opens two lines, yet is no name there
    changelog = [
        Finding("entity", "q", "Version 3.2.0. Added a dark mode. Version 3.1.4. Removed wdx files.", [])
    ]
    assert (
        with_names_cased("Which version added a dark mode?", changelog) == "Which version added a dark mode?"
    )
    assert with_names_cased("who governs naxpry?", findings) == "who governs Naxpry?"
    # the protocol asks the memory for the facts of the entity so named, as it learned them
    memory = Memory()
    lowercase_facts = {
        "who governs naxpry?": MemoryAnswer("The town of Naxpry is governed by Lumfen Uskyth.", ["t"])
    }

    async def ask(question):
        return lowercase_facts.get(question) or await memory(question)

    result = asyncio.run(three_stage("who governs naxpry?", ask, executive({}), max_turns=6))
    assert ("entity", "What do you know about Naxpry?") in [(f.stage, f.question) for f in result.findings]
    assert compose_facts(result)[0] == "Naxpry is governed by Lumfen Uskyth."


def test_content_words_from_many_threads_at_once():
    texts = [
        f"The foundations planted {n} native trees while librarians were borrowing books" for n in range(400)
    ]
    expected = [content_words(text) for text in texts]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            assert list(pool.map(content_words, texts)) == expected


def test_the_memory_s_guess_beside_a_passage_line_stating_the_same_is_not_composed():
    question = "On which day is the Marlowe Public Library closed?"
    passage = Finding(
        "entity",
        "What do you know about Marlowe Public Library?",
        "When is the library open? Monday to Saturday. It is closed on Sundays. Its head is Oona Brightwater.",
        [],
    )

    def composed(*guesses: str) -> list[str]:
        findings = [finding(g, question) for g in guesses] + [passage]
        return compose_facts(
            ProtocolResult("three_stage", question, findings, entity="Marlowe Public Library")
        )

    # the guess shares only "closed" with the question, and the passage states it
    assert composed("The library is closed on the first Monday in June.") == ["It is closed on Sundays."]
    # a guess naming the entity or what the passage names is still a guess
    assert composed("The Marlowe Public Library is closed on Monday mornings.") == [
        "It is closed on Sundays."
    ]
    assert composed("The library is closed when Oona Brightwater is away.") == ["It is closed on Sundays."]
    # one that names someone new is kept: it may be the link the question needs
    assert "The library is closed when Ada Brisk is away." in composed(
        "The library is closed when Ada Brisk is away."
    )
    # and one asking more of the question than any passage line states
    assert composed("The library is closed on a holiday day.")[0] == "The library is closed on a holiday day."


def test_a_question_naming_nothing_asks_for_the_account_of_what_it_describes():
    # a recipe names nothing: the memory learned its passage under its title's first word,
    # and is asked for the account of the question itself, which it finds by shared words
    question = "How long should the rye bread dough rise?"
    recipe = (
        "Simple rye bread. Mix 500 grams of rye flour with 10 grams of salt. "
        "Leave the dough to rise for two hours in a warm place. Bake it at 220 degrees for 50 minutes."
    )
    answers = {
        question: MemoryAnswer("Simple rye bread.", ["bread"]),
        "What do you know about how long should the rye bread dough rise?": MemoryAnswer(recipe, ["bread"]),
    }
    memory = Memory()

    async def ask(q):
        return answers.get(q) or await memory(q)

    result = asyncio.run(three_stage(question, ask, executive({}), max_turns=6))
    asked = [(f.stage, f.question) for f in result.findings]
    assert ("entity", "What do you know about how long should the rye bread dough rise?") in asked
    facts = compose_facts(result)
    # the line stating the answer first; the title, which shares the question's "rye bread",
    # after every line stating something; the grounding answer that only repeats the title
    # is not given again after its question
    assert facts[0] == "Leave the dough to rise for two hours in a warm place."
    assert facts[-1] == "Simple rye bread."
    assert not any(line.startswith(question) for line in facts)
    # a description opening with "I" keeps its capital: the first person, not a name
    notes = MemoryAnswer("I left my passport in the desk drawer.", ["notes"])
    sent = []

    async def ask_notes(q):
        sent.append(q)
        return notes

    asyncio.run(three_stage("I left my passport where?", ask_notes, executive({}), max_turns=6))
    assert "What do you know about I left my passport where?" in sent


def test_a_follow_up_is_asked_with_its_pronouns_written_out_as_the_conversation_s_topic():
    earlier = [
        ("user", "Who is Amara Lindqvist?"),
        ("assistant", "Amara Lindqvist is a glass artist who lives on the island of Tressa."),
    ]
    asked = {
        "What did she study at university?": "What did Amara Lindqvist study at university?",
        "Where was her first studio?": "Where was Amara Lindqvist's first studio?",  # before a noun
        "Who married her?": "Who married Amara Lindqvist?",
        "Did she meet him in 2004?": "Did Amara Lindqvist meet Amara Lindqvist in 2004?",  # one topic
        "What is its population?": "What is Amara Lindqvist's population?",
        # a question that names something, or has nothing to refer back to, as written
        "What do you know about Tressa?": "What do you know about Tressa?",
        "How many people live there all year?": "How many people live there all year?",
    }
    assert {q: standalone_question(q, earlier) for q in asked} == asked
    # the user's topic, not the names an assistant's reply brings in; then the reply's
    assert standalone_question("How big is it?", [*earlier, ("user", "And Tressa?")]) == "How big is Tressa?"
    assert standalone_question("How big is it?", [("user", "hi"), ("assistant", "Tressa is.")]) == (
        "How big is Tressa?"
    )
    assert standalone_question("How big is it?", []) == "How big is it?"
    # a turn asking only to go on is about the topic
    assert standalone_question("Tell me more.", earlier) == "Tell me more about Amara Lindqvist."
    assert standalone_question("What else?", earlier) == "What else about Amara Lindqvist?"
    assert standalone_question("Anything else?", earlier) == "Anything else about Amara Lindqvist?"
    assert standalone_question("Tell me more about glass.", earlier) == "Tell me more about glass."


def test_a_question_too_long_for_the_memory_keeps_its_last_sentences():
    pasted = "The minutes of the last meeting ran long. " * 10  # 420 characters
    assert fit_question("Who governs Naxpry?", 100) == "Who governs Naxpry?"
    fitted = fit_question(f"{pasted}Who governs Naxpry?", 100)
    assert fitted == "The minutes of the last meeting ran long. Who governs Naxpry?"  # a second: 103
    # a facts question about a whole turn keeps its form, its description cut so
    fitted = fit_question(f"What do you know about {pasted}who governs naxpry?", 100)
    assert len(fitted) <= 100 and fitted.startswith("What do you know about ") and fitted.endswith("naxpry?")
    # one sentence longer than the limit: its end
    assert fit_question("word " * 50 + "end?", 20) == ("word " * 50 + "end?")[-20:].strip()


def test_a_user_s_own_notes_are_said_back_to_them_when_they_ask_in_the_first_person():
    assert (
        said_to_user("I'm vegetarian, but I eat fish on Fridays.")
        == "You're vegetarian, but you eat fish on Fridays."
    )
    assert said_to_user("My desk is on the third floor. I was late. Lena called me.") == (
        "Your desk is on the third floor. You were late. Lena called you."
    )
    # not a numeral, nor someone else's words, nor "we" (a company's pages mean the company)
    assert said_to_user("He served in World War I.") == "He served in World War I."
    assert said_to_user("Priya said: I think we should ship.") == "Priya said: I think we should ship."
    assert said_to_user('"I will come," said Lena.') == '"I will come," said Lena.'
    assert said_to_user("We open at nine.") == "We open at nine."

    notes = [
        finding(
            "I take my coffee with oat milk. My manager is Rosalind Achterberg.", FACTS_QUESTION.format("me")
        )
    ]
    mine = compose_messages(
        [{"role": "user", "content": "x"}], ProtocolResult("three_stage", "What milk do I take?", notes)
    )
    assert "- You take your coffee with oat milk.\n" in mine[-1]["content"]
    assert mine[-1]["content"].endswith(f"Question: What milk do I take?\n{ANSWER_FROM_CONTEXT}")
    # asked about someone else, or as a request ("Tell me ..."), the notes are given as written
    theirs = compose_messages(
        [{"role": "user", "content": "x"}], ProtocolResult("three_stage", "Tell me about the coffee.", notes)
    )
    assert "- I take my coffee with oat milk.\n" in theirs[-1]["content"]
