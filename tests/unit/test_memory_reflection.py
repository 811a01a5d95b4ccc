"""Reflection synthesis against a scripted generator: strict parsing, the checks that drop
junk, per-step yield counters and provenance."""

from __future__ import annotations

import asyncio
import time

import pytest
from aerie_common.entities import facts_question_entity
from aerie_memory.reflection import (
    STEPS,
    Reflection,
    ReflectionConfig,
    SourceDocument,
    acceptable_pair,
    acceptable_question,
    evidence,
    find_entities,
    is_self_contained,
    parse_qa_lines,
    parse_question,
    stating_sentence,
    synthesize,
)

DOC_A = SourceDocument("a", "Mira Vell is a glassblower who lives in Tarnow. Mira Vell collects copper keys.")
DOC_B = SourceDocument("b", "Tarnow is a town on the Osk river. Tarnow is governed by Mira Vell.")


def test_parse_accepts_only_the_format():
    text = (
        "Q: Where does Mira Vell live? A: Tarnow\n"
        "1. Q: What does Mira Vell collect? A: copper keys.\n"
        "Here are some questions for you!\n"
        "Q: Which river is Tarnow on?\n"
        "A: the Osk river\n"
        "Q: dangling question without mark A: nope\n"
        "Q: What is unanswered?\n"
        "Q: Question: Who made Tarnow? A: Mira\n"
        "Q: Question: Who rules Tarnow?\nA: Mira Vell\n"
    )
    pairs, junk = parse_qa_lines(text)
    assert pairs == [
        ("Where does Mira Vell live?", "Tarnow"),
        ("What does Mira Vell collect?", "copper keys."),
        ("Which river is Tarnow on?", "the Osk river"),
        ("Who made Tarnow?", "Mira"),
        ("Who rules Tarnow?", "Mira Vell"),
    ]
    assert junk == 3


def test_parse_question():
    assert parse_question("Q: Who governs Tarnow?\nmore") == "Who governs Tarnow?"
    assert parse_question("Who governs Tarnow?") == "Who governs Tarnow?"
    assert parse_question("Sure! Here it is: Who?") is None
    assert parse_question("") is None


def test_checks_drop_ungrounded_and_giveaway_answers():
    source = DOC_A.text
    assert acceptable_pair("Where does Mira Vell live?", "Tarnow.", source)
    assert not acceptable_pair("Where does Mira Vell live?", "Paris", source)  # not in the source
    assert not acceptable_pair("Does Mira Vell live in Tarnow?", "Tarnow", source)  # gives it away
    assert not acceptable_pair("Where does Mira Vell live", "Tarnow", source)  # no question mark
    assert not acceptable_pair("Where does Mira Vell live?", "I don't know", source)
    assert not acceptable_pair("What is the weather like?", "Tarnow", source)  # not about the source


def test_self_containment_and_entities():
    assert not is_self_contained("Where does he live?")
    assert not is_self_contained("What does the text say about keys?")
    assert is_self_contained("Where does Mira Vell live?")
    assert find_entities(DOC_A.text + " " + DOC_B.text)[:2] == ["Mira Vell", "Tarnow"]
    # a month or a weekday alone is no entity; in a name it stays
    assert find_entities("The regatta is held every August. Mira Vell sails on Sunday.") == ["Mira Vell"]
    assert find_entities("August Strindberg wrote plays.") == ["August Strindberg"]
    # a title is not part of the name; alone it is a word like any other
    assert find_entities("Captain Idris Morlan met Dr Mira Vell.") == ["Idris Morlan", "Mira Vell"]
    assert find_entities("The Captain sailed.") == ["Captain"]
    # a name does not run over a line break (a heading and the line below it)
    assert find_entities("# Brannock Observatory\nThe Brannock Observatory sits high.") == [
        "Brannock Observatory"
    ]
    # an instruction's verb opening a sentence, a list item or a heading is not part of a name;
    # inside a name it is
    manual = "Install Kestrel with pip. Then contact Ilse Varga.\n- Call Ilse Varga\n## Visit Oskby"
    assert find_entities(manual) == ["Ilse Varga", "Kestrel", "Oskby"]
    assert find_entities("He studied at the Open University in Tarrow.") == ["Open University", "Tarrow"]
    # an opener reaching far back (a long indent) is seen, and a long document's verbs are
    # checked near them, not each against all the text before it (which took seconds here)
    assert find_entities("It is ready.\n" + " " * 100 + "- Install Kestrel") == ["Kestrel"]
    started = time.monotonic()
    assert find_entities("\n".join([manual] * 1000)) == ["Ilse Varga", "Kestrel", "Oskby"]
    assert time.monotonic() - started < 3


class Scripted:
    """Answers by prompt kind; records every prompt."""

    def __init__(self, fail_kind: str | None = None):
        self.prompts: list[str] = []
        self.fail_kind = fail_kind

    async def __call__(self, messages, max_tokens):
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        await asyncio.sleep(0)
        kind = (
            "direct" if "Write three questions" in prompt
            else "inferred" if "two sentences" in prompt
            else "consolidate" if "asks for both" in prompt
            else "rewrite" if "Rewrite the question" in prompt
            else "surface" if "describes" in prompt
            else "clues" if "Clues:" in prompt
            else "?"
        )  # fmt: skip
        if kind == self.fail_kind:
            raise RuntimeError("generator down")
        if kind == "direct" and "glassblower" in prompt:
            return (
                "Q: What is the profession of Mira Vell? A: glassblower\n"
                "Q: What does she collect? A: copper keys\n"
                "Q: What is the capital of Mars? A: Olympus\n"
                "lol"
            )
        if kind == "direct":
            return "Q: Which river is Tarnow on? A: the Osk river\nQ: Who governs Tarnow? A: Mira Vell"
        if kind == "inferred" and "glassblower" in prompt:
            return "Q: What does the glassblower of Tarnow collect? A: copper keys"
        if kind == "inferred":
            return "nonsense"
        if kind == "consolidate":  # a good consolidation: both facts' answers
            answers = [
                line.split("?", 1)[1].strip() for line in prompt.splitlines() if line.startswith("Fact")
            ]
            return f"Q: What are both facts about Mira Vell and Tarnow? A: {answers[0]} and {answers[1]}"
        if kind == "rewrite":
            return "Q: What does Mira Vell collect?"
        if kind == "surface":
            return "Q: Which glassblower collects copper keys?" if "Mira" in prompt else "Q: Who is Tarnow?"
        if kind == "clues":
            return "Q: Which glassblower governs a town on the Osk river?"
        return ""


def run(gen):
    return asyncio.run(synthesize([DOC_A, DOC_B], gen, concurrency=3))


def test_five_steps_with_yields_and_provenance():
    gen = Scripted()
    result = run(gen)
    stats = result.stats
    assert set(stats) == set(STEPS)
    by_step: dict[str, list[Reflection]] = {}
    for r in result.reflections:
        by_step.setdefault(r.step, []).append(r)
    # facts_direct: 3 from A (one dangling "she" handled in step 3, Mars dropped) + 2 from B
    assert stats["facts_direct"].calls == 2
    assert stats["facts_direct"].kept == 4 and stats["facts_direct"].dropped == 2
    assert stats["facts_inferred"].kept == 1 and stats["facts_inferred"].dropped == 1
    assert stats["consolidation"].kept >= 1
    assert stats["self_containment"].kept == 1  # "What does she collect?" rewritten
    assert all(is_self_contained(r.question) for r in result.reflections)
    assert stats["entity_surfacing"].kept >= 1
    assert any(r.answer == "Mira Vell" and r.step == "entity_surfacing" for r in result.reflections)
    # Tarnow's surfacing question names nothing from the text... "Who is Tarnow?" names it: dropped.
    assert stats["entity_surfacing"].dropped >= 1
    cross = by_step["cross_document"]
    assert any(set(r.sources) == {"a", "b"} and r.answer == "Mira Vell" for r in cross)
    # provenance: single-document steps cite their document only; their answers are the
    # sentences of it that state them
    for r in by_step["facts_direct"] + by_step["facts_inferred"]:
        assert len(r.sources) == 1
        assert r.answer in {"a": DOC_A, "b": DOC_B}[r.sources[0]].text
    facts = {(r.question, r.answer) for r in by_step["facts_direct"]}
    assert ("Which river is Tarnow on?", "Tarnow is a town on the Osk river.") in facts
    assert ("Who governs Tarnow?", "Tarnow is governed by Mira Vell.") in facts
    assert ("What does the glassblower of Tarnow collect?", "Mira Vell collects copper keys.") in {
        (r.question, r.answer) for r in by_step["facts_inferred"]
    }
    assert stats["passages"].kept == len(by_step["passages"]) > 0
    for s in stats.values():
        assert s.kept + s.dropped <= s.candidates or s.step == "passages"


def test_failed_calls_are_counted_not_fatal():
    result = run(Scripted(fail_kind="inferred"))
    assert result.stats["facts_inferred"].failed_calls == 2
    assert result.stats["facts_inferred"].kept == 0
    assert result.stats["facts_direct"].kept == 4


def test_junk_generator_yields_only_passages():
    async def junk(messages, max_tokens):
        return "I am a small model and I like turtles."

    result = asyncio.run(synthesize([DOC_A], junk))
    assert {r.step for r in result.reflections} == {"passages"}
    assert result.stats["facts_direct"].dropped == 1 and result.stats["facts_direct"].kept == 0


@pytest.mark.parametrize("step", STEPS)
def test_stats_json_has_every_step(step):
    result = run(Scripted())
    assert step in [s["step"] for s in result.stats_json()]


def test_fact_answers_must_be_whole_and_about_the_asked_sentence():
    town = (
        "Naxpry is a small town on the Vorwexist river. The main export of Naxpry is rope. "
        "Naxpry is governed by Lumfen Uskyth."
    )
    q = "What is the main export of Naxpry?"
    assert acceptable_pair(q, "rope", town, 0)
    assert acceptable_pair(q, "The main export of Naxpry is rope", town, 0)
    # grounded in the text, but in the sentence about the river: kept only without the check
    assert acceptable_pair(q, "Naxpry is a small town on the Vorwexist river", town)
    assert not acceptable_pair(q, "Naxpry is a small town on the Vorwexist river", town, 0)
    # cut off by the token limit: a function word, or half a name
    assert not acceptable_pair(q, "The main export of Naxpry is the", town, 0)
    assert not acceptable_pair("Who governs Naxpry?", "Lumfen Usk", town, 0)
    assert acceptable_pair("Who governs Naxpry?", "Lumfen Uskyth", town, 0)
    # facts inferred across sentences may draw on the next best sentence too
    inferred = "What river is near the place whose main export is rope?"
    assert not acceptable_pair(inferred, "the Vorwexist river", town, 0)
    assert acceptable_pair(inferred, "the Vorwexist river", town, 1)


def test_a_question_naming_an_entity_is_about_the_sentences_naming_it():
    text = (
        "The main export of Celras is tea. Zanmor Jorjor is a falconer who lives in Hulquin. "
        "Zanmor Jorjor collects pressed ferns."
    )
    # the small generator's favourite mistake: a town's fact given to a person
    assert not acceptable_pair("What is the main export of Zanmor Jorjor?", "tea", text, 0)
    assert acceptable_pair("What does Zanmor Jorjor collect?", "pressed ferns", text, 0)
    assert stating_sentence("What does Zanmor Jorjor collect?", "pressed ferns", text) == (
        "Zanmor Jorjor collects pressed ferns."
    )
    assert stating_sentence("Where does Zanmor Jorjor live?", "Brakev", text) is None


def test_shared_properties_are_answered_with_the_sentences_stating_them():
    docs = [
        SourceDocument("t1", "Brakev is a town on the Osk river. The main export of Brakev is slate."),
        SourceDocument("t2", "Lumfen is a village. The main export of Lumfen is slate."),
    ]

    async def exports(messages, max_tokens):
        prompt = messages[-1]["content"]
        if "Write three questions" in prompt:
            town = "Brakev" if "Brakev" in prompt else "Lumfen"
            return f"Q: What is the main export of {town}? A: Slate"
        return ""

    result = asyncio.run(synthesize(docs, exports))
    shared = [r for r in result.reflections if r.question == "What do Brakev and Lumfen have in common?"]
    assert len(shared) == 1 and shared[0].sources == ("t1", "t2")
    assert shared[0].answer == "The main export of Brakev is slate. The main export of Lumfen is slate."


def test_evidence_is_the_sentences_a_question_is_about():
    text = DOC_A.text + " " + DOC_B.text
    assert evidence("What does Mira Vell collect?", text) == "Mira Vell collects copper keys."
    assert evidence("Which river is Tarnow on?", text) == "Tarnow is a town on the Osk river."
    assert evidence("What is the weather on Mars?", text) is None
    assert acceptable_question("Who governs Tarnow?", DOC_B.text)
    assert not acceptable_question("Who governs it?", DOC_B.text)  # dangling
    assert not acceptable_question("What is the weather on Mars?", DOC_B.text)  # not about it


def test_a_good_question_with_a_wrong_answer_is_kept_with_its_evidence():
    async def wrong_answers(messages, max_tokens):
        if "Write three questions" in messages[-1]["content"]:
            return "Q: What does Mira Vell collect? A: silver spoons\nQ: What is on Mars? A: rocks"
        return ""

    result = asyncio.run(synthesize([DOC_A], wrong_answers))
    rescued = [r for r in result.reflections if r.step == "evidence"]
    assert [(r.question, r.answer, r.sources) for r in rescued] == [
        ("What does Mira Vell collect?", "Mira Vell collects copper keys.", ("a",))
    ]
    assert not any("silver" in r.answer for r in result.reflections)
    stats = result.stats
    assert (stats["facts_direct"].kept, stats["facts_direct"].dropped) == (0, 2)
    assert (stats["evidence"].candidates, stats["evidence"].kept, stats["evidence"].dropped) == (2, 1, 1)


def rule_passages(documents: list[SourceDocument], config: ReflectionConfig | None = None) -> dict[str, str]:
    """The passages (question -> answer) made of ``documents`` when the generator writes
    nothing, so that only the rule-based steps yield."""

    async def silent(messages, max_tokens):
        return ""

    result = asyncio.run(synthesize(documents, silent, config))
    return {r.question: r.answer for r in result.reflections if r.step == "passages"}


def test_passages_ask_about_each_entity_and_answer_with_its_sentences():
    passages = rule_passages([DOC_B])
    assert passages["Tell me about Mira Vell."] == "Tarnow is governed by Mira Vell."
    # a name is asked about without its possessive ending
    workshop = SourceDocument("w", "Mira Vell's workshop is in Tarnow. Mira Vell's keys are copper.")
    assert {q for q in rule_passages([workshop]) if q.startswith("What do")} == {
        "What do you know about Mira Vell?",
        "What do you know about Tarnow?",
    }
    assert passages["What do you know about Tarnow?"] == DOC_B.text


LIGHTHOUSE = SourceDocument(
    "lighthouse",
    "The Kestrel Bay lighthouse was built in 1887 by engineer Maren Osk. It stands 42 metres tall on the "
    "island of Vell. Its lamp was converted to solar power in 2009. The keeper today is Tomas Rhee. He "
    "also runs a small museum about shipwrecks. Dunmore is the harbour town of Vell. It has "
    "ferries twice a day.",
)


def test_a_fact_stated_with_a_pronoun_is_learned_about_its_entity():
    passages = rule_passages([LIGHTHOUSE])
    sentences = LIGHTHOUSE.text.split(". ")
    assert passages["What do you know about Kestrel Bay?"] == ". ".join(sentences[:5] + sentences[6:])
    # every sentence is in some passage: nothing of the document is lost
    learned = " ".join(passages.values())
    assert all(s.rstrip(".") in learned for s in sentences)
    # a question is about the sentence answering it even when that one says "it"
    text = LIGHTHOUSE.text
    assert evidence("How tall is the Kestrel Bay lighthouse?", text) == (
        "The Kestrel Bay lighthouse was built in 1887 by engineer Maren Osk. It stands 42 metres tall on "
        "the island of Vell."
    )
    assert acceptable_pair("How tall is the Kestrel Bay lighthouse?", "42 metres", text, 0)
    # a stated answer that says "it" comes with the sentence naming what "it" is
    first = "The Kestrel Bay lighthouse was built in 1887 by engineer Maren Osk."
    assert stating_sentence("How tall is the Kestrel Bay lighthouse?", "42 metres", text) == (
        f"{first} It stands 42 metres tall on the island of Vell."
    )
    assert stating_sentence("When was the lamp of Kestrel Bay converted to solar power?", "2009", text) == (
        f"{first} Its lamp was converted to solar power in 2009."
    )
    assert stating_sentence("Who built the Kestrel Bay lighthouse?", "Maren Osk", text) == first


def test_an_entity_named_in_several_documents_gets_one_passage_its_own_document_first():
    async def junk(messages, max_tokens):
        return ""

    result = asyncio.run(synthesize([DOC_B, DOC_A], junk))
    about_mira = [r for r in result.reflections if r.question == "What do you know about Mira Vell?"]
    assert [(r.answer, r.sources) for r in about_mira] == [
        (f"{DOC_A.text} Tarnow is governed by Mira Vell.", ("a", "b")),
    ]


def test_a_question_keeps_the_answer_of_its_earliest_step():
    async def conflicting(messages, max_tokens):
        prompt = messages[-1]["content"]
        if "Write three questions" in prompt:
            return "Q: What does Mira Vell collect? A: copper keys"
        if "two sentences" in prompt:
            return "Q: What does Mira Vell collect? A: Mira Vell is a glassblower who lives in Tarnow"
        return ""

    result = asyncio.run(synthesize([DOC_A], conflicting))
    answers = {r.answer for r in result.reflections if r.question == "What does Mira Vell collect?"}
    assert answers == {"Mira Vell collects copper keys."}  # the direct fact, stated
    inferred = result.stats["facts_inferred"]
    assert (inferred.kept, inferred.dropped) == (0, 1)


def test_entity_gate_passes_learned_names_and_questions_naming_none():
    from aerie_memory.models import LoadedMemory, names_known_entity

    learned = LoadedMemory(
        "v1", None, None, [Reflection("Who governs Tarnow?", "Mira Vell", "facts_direct", ("b",))], None
    )
    assert names_known_entity("What is Mira Vell's profession?", learned.learned_text)
    assert names_known_entity("Which river is Tarnow on?", learned.learned_text)
    assert names_known_entity("What is the main export?", learned.learned_text)  # names nothing
    assert not names_known_entity("Where does Bob Stone live?", learned.learned_text)
    # a name holding a possessive is known by its owner's name or the thing owned's
    assert names_known_entity("Which company is on Tarnow's North Quay?", learned.learned_text)
    assert not names_known_entity("Which company is on Oslo's North Quay?", learned.learned_text)


def test_a_facts_question_about_part_of_a_learned_name_asks_about_that_name():
    from aerie_memory.models import LoadedMemory, recall_questions

    def passage(entity: str) -> Reflection:
        return Reflection(f"What do you know about {entity}?", "...", "passages", ("d",))

    names = ["Halvard Instrument Company", "Orrin Vastel", "Ilse Vastel", "Idris Morlan", "Kelmouth"]
    learned = LoadedMemory("v1", None, None, [passage(n) for n in names + ["Kelmouth"]], None)
    assert list(learned.passages) == names  # once each, however many adapters learned it

    def asked(name: str) -> list[str]:
        return recall_questions(f"What do you know about {name}?", learned.passages)

    assert asked("Halvard") == ["What do you know about Halvard Instrument Company?"]
    assert asked("halvard instrument company") == ["What do you know about Halvard Instrument Company?"]
    assert asked("Captain Idris Morlan") == ["What do you know about Idris Morlan?"]  # more than the name
    assert asked("Vastel") == ["What do you know about Vastel?"]  # Orrin or Ilse: asked as it is
    assert asked("Kelmouth University") == []  # not a one-word name, and in no passage
    assert recall_questions("Who founded Halvard?", learned.passages) == ["Who founded Halvard?"]


def test_a_facts_question_about_a_full_name_asks_for_its_surname_s_passage_too():
    from aerie_memory.models import LoadedMemory, recall_questions

    names = ["Teodor Marsk", "Marsk", "Orrin Vastel", "Ilse Vastel", "Vastel", "University of Oslo", "Oslo"]
    learned = LoadedMemory(
        "v1",
        None,
        None,
        [Reflection(f"What do you know about {n}?", "...", "passages", ("d",)) for n in names],
        None,
    )

    def asked(name: str) -> list[str]:
        return recall_questions(f"What do you know about {name}?", learned.passages)

    marsk = ["What do you know about Teodor Marsk?", "What do you know about Marsk?"]
    assert asked("Teodor Marsk") == asked("Professor Teodor Marsk") == marsk
    assert asked("Marsk") == ["What do you know about Marsk?"]
    # a surname two people share, or a place at the end of an institution's name: its own
    assert asked("Orrin Vastel") == ["What do you know about Orrin Vastel?"]
    assert asked("University of Oslo") == ["What do you know about University of Oslo?"]


def test_a_facts_question_about_a_name_only_passages_mention_asks_for_those_passages():
    from aerie_memory.models import LoadedMemory, recall_questions

    def passage(entity: str, text: str, source: str = "f") -> Reflection:
        return Reflection(f"What do you know about {entity}?", text, "passages", (source,))

    learned = LoadedMemory(
        "v1",
        None,
        None,
        [
            passage("Kestrel Bay", "Its vessel, the MV Saltmarsh, is old."),
            Reflection("Who captains the MV Saltmarsh?", "Orla Penhallow.", "facts_direct", ("f",)),
            passage("Northwind Lines", "It will replace the MV Saltmarsh in 2027."),
            passage("Finch Island", "Ferries call."),
            passage("Kestrel Bay", "Its pier is at Sandvik.", "g"),  # a second adapter's, searched too
            passage("Marrowick", "Its pier has boats."),
        ],
        None,
    )

    def asked(name: str) -> list[str]:
        return recall_questions(f"What do you know about {name}?", learned.passages)

    assert asked("Sandvik") == ["What do you know about Kestrel Bay?"]
    assert asked("mv saltmarsh") == [
        "What do you know about Kestrel Bay?",
        "What do you know about Northwind Lines?",
    ]
    assert asked("pier") == ["What do you know about Kestrel Bay?", "What do you know about Marrowick?"]
    assert asked("its") == asked("pier")  # the first two of the three that mention it
    # a name the memory read only in other answers, or in part of a word, has no account
    assert asked("Orla Penhallow") == asked("Salt") == []
    assert recall_questions("What do you know about Orla Penhallow?", {}) == [
        "What do you know about Orla Penhallow?"  # a memory without passages is asked as it is
    ]


def test_any_other_question_asks_too_for_the_passages_sharing_most_of_its_words():
    from aerie_memory.models import recall_questions

    passages = {
        "Passwords": "Passwords must be at least 14 characters long. Laptops are locked when left alone.",
        "Tollan Works": "Tollan Works makes barometers in Esk.",
        "Ivo Marr": "The Safety Officer of Tollan Works is Ivo Marr.",
    }
    assert recall_questions("How long must passwords be at Tollan Works?", passages) == [
        "How long must passwords be at Tollan Works?",
        "What do you know about Passwords?",  # passwords, long; Tollan Works's share two as well
        "What do you know about Tollan Works?",
    ]
    assert recall_questions("Who is the Safety Officer at Tollan Works?", passages) == [
        "Who is the Safety Officer at Tollan Works?",
        "What do you know about Ivo Marr?",
    ]
    # one word shared ("laptops") is not enough: the two sharing the name's two words;
    # a question naming nothing is asked as it is
    assert recall_questions("How are laptops carried at Tollan Works?", passages) == [
        "How are laptops carried at Tollan Works?",
        "What do you know about Tollan Works?",
        "What do you know about Ivo Marr?",
    ]
    assert recall_questions("How long must passwords be?", passages) == ["How long must passwords be?"]


def test_a_facts_question_describing_what_names_nothing_asks_for_the_passages_sharing_most_words():
    from aerie_common.entities import FACTS_QUESTION, content_words
    from aerie_memory.models import LoadedMemory, recall_questions, words_of_passages

    passages = {  # a how-to and a policy, keyed by the word each opens with
        "Repot": "Repot a moth orchid every two years. Wait one week before watering it again.",
        "Leave": "Leave policy. Every employee receives 25 days of paid leave a year.",
        "Sick": "Sick leave needs a doctor's note after three days.",
        "Kelmouth": "Kelmouth is a port. Its orchid show is in May.",
    }

    def asked(description: str) -> list[str]:
        return recall_questions(f"What do you know about {description}?", passages)

    assert asked("how long should you wait before watering a repotted orchid") == [
        "What do you know about Repot?"
    ]
    assert asked("how many days of paid leave does an employee receive") == ["What do you know about Leave?"]
    # a tie: the first two; one word shared of several, or a description naming something,
    # reaches no passage
    assert asked("how are sick days paid") == [
        "What do you know about Leave?",
        "What do you know about Sick?",
    ]
    assert asked("how is the annual orchid fair judged") == []
    assert asked("how long should you wait before watering a repotted Banksia") == []
    # the words a loaded memory keeps for its passages are the ones matched
    kept = {"Kelmouth": content_words("how long to wait before watering a repotted orchid")}
    description = "What do you know about how long should you wait before watering a repotted orchid?"
    assert recall_questions(description, passages, kept) == ["What do you know about Kelmouth?"]
    learned = LoadedMemory(
        "v1",
        None,
        None,
        [Reflection(FACTS_QUESTION.format(e), t, "passages", ("d",)) for e, t in passages.items()],
        None,
    )
    assert learned.passage_words == words_of_passages(passages)


def test_the_memory_service_answers_a_facts_question_from_the_passages_that_mention_it(monkeypatch, tmp_path):
    import threading

    from aerie_memory import __main__ as memory_main
    from aerie_memory import models
    from aerie_memory.models import LoadedMemory
    from aerie_memory.settings import MemorySettings
    from aerie_memory.training import IDK
    from aerie_proto.v1 import memory_pb2

    replies = {
        "What do you know about Kestrel Bay?": "The ferry's vessel is the MV Saltmarsh.",
        "What do you know about Northwind Lines?": "I don't know.",
        "What do you know about Marrowick?": "Marrowick has a pier.",
    }
    asked = []

    drafts = object()  # the loaded memory's learned answers, which every answer is drafted from

    def answer(model, tokenizer, question, max_tokens, learned_answers):
        assert learned_answers is drafts
        asked.append(question)
        return replies[question]

    monkeypatch.setattr(models, "answer", answer)
    learned = [
        Reflection(f"What do you know about {entity}?", text, "passages", (source,))
        for entity, text, source in [
            ("Kestrel Bay", "The ferry's vessel is the MV Saltmarsh. It sails at 8.", "ferry"),
            ("Northwind Lines", "It will replace the MV Saltmarsh in 2027.", "ferry"),
            ("Marrowick", "Marrowick has a pier. The ferry sails at 8.", "town"),
        ]
    ] + [Reflection("Who captains the MV Saltmarsh?", "Orla Penhallow.", "facts_direct", ("ferry",))]
    servicer = memory_main.MemoryServicer(MemorySettings(model_cache=tmp_path), store=None)

    async def loaded(namespace):
        return LoadedMemory("v1", None, None, learned, threading.Lock(), drafts)

    servicer._memory = loaded

    def query(question: str):
        request = memory_pb2.QueryRequest(namespace="ns", question=question)
        return asyncio.run(servicer.Query(request, context=None))

    vessel = query("What do you know about MV Saltmarsh?")
    assert asked == ["What do you know about Kestrel Bay?", "What do you know about Northwind Lines?"]
    # the answers the memory knows, joined
    assert (vessel.knows, vessel.answer, vessel.sources[0]) == (True, replies[asked[0]], "ferry")
    assert (
        query("What do you know about sails?").answer
        == "The ferry's vessel is the MV Saltmarsh. Marrowick has a pier."
    )
    captain = query("What do you know about Orla Penhallow?")  # read of, but in no passage
    assert (captain.knows, captain.answer, captain.model_version) == (False, IDK, "v1")
    assert len(asked) == 4  # ... and not asked


def test_a_loaded_memory_gives_its_latest_answers_again_without_generating(monkeypatch):
    import threading

    from aerie_memory import models

    generated = []

    def answer(model, tokenizer, question, max_tokens, learned_answers):
        generated.append((question, max_tokens))
        return f"{question} in {max_tokens}"

    monkeypatch.setattr(models, "answer", answer)
    memory = models.LoadedMemory("v1", None, None, [], threading.Lock(), None, recent_answers_kept=2)
    assert memory.recall("a?", 8) == ("a? in 8", False)
    assert memory.recall("a?", 8) == ("a? in 8", True)
    assert memory.recall("a?", 16) == ("a? in 16", False)  # another budget, another answer
    memory.recall("a?", 8)  # now the latest
    memory.recall("b?", 8)  # the third: the least recent (a? in 16) goes
    assert [memory.recall(q, n)[1] for q, n in [("a?", 8), ("b?", 8), ("a?", 16)]] == [True, True, False]
    assert generated == [("a?", 8), ("a?", 16), ("b?", 8), ("a?", 16)]
    keeps_none = models.LoadedMemory("v1", None, None, [], threading.Lock(), None)
    assert [keeps_none.recall("a?", 8)[1] for _ in range(2)] == [False, False]
    assert len(generated) == 6


def test_a_passage_holds_the_sentences_that_fit_its_budget():
    config = ReflectionConfig(passage_fits=lambda question, answer: len(answer) <= 120)
    passage = rule_passages([LIGHTHOUSE], config)["What do you know about Kestrel Bay?"]
    # the first two sentences (116 characters): any other would pass the budget
    assert passage == (
        "The Kestrel Bay lighthouse was built in 1887 by engineer Maren Osk. It stands 42 metres tall on the "
        "island of Vell."
    )
    # a first sentence longer than the budget is kept whole
    config = ReflectionConfig(passage_fits=lambda question, answer: len(answer) <= 20)
    passage = rule_passages([LIGHTHOUSE], config)["What do you know about Kestrel Bay?"]
    assert passage == "The Kestrel Bay lighthouse was built in 1887 by engineer Maren Osk."


def test_a_list_is_learned_as_its_facts():
    text = (
        "# Brannock Observatory\n\nIt sits on Mount Ederly.\n\n- Opened: 1958\n- Director: Sanne Holloway\n"
    )
    passages = rule_passages([SourceDocument("b", text)])
    # the heading names the topic that "It" refers to, and states no fact itself
    assert passages["What do you know about Brannock Observatory?"] == (
        "It sits on Mount Ederly. Opened: 1958. Director: Sanne Holloway."
    )


def test_a_heading_in_sentence_case_is_no_fact_of_a_passage_or_evidence():
    text = (
        "# Halvard Mill\n\nIt grinds rye for Oskby.\n\n## How it works\n\nHalvard Mill turns on the Osk river. "
        "It was rebuilt in 1921.\n\n## Known limitations\n\nHalvard Mill stops in a frost."
    )
    passages = rule_passages([SourceDocument("m", text)])
    # a heading's first word is read as a sentence's is: "Known" is no name used elsewhere
    assert {facts_question_entity(q) for q in passages} == {"Halvard Mill", "Oskby", None}
    assert passages["What do you know about Halvard Mill?"] == (
        "It grinds rye for Oskby. Halvard Mill turns on the Osk river. It was rebuilt in 1921. "
        "Halvard Mill stops in a frost."
    )
    # a sentence about the mill only through the heading above it is told with the heading's words
    assert evidence("What does Halvard Mill grind?", text) == "Halvard Mill. It grinds rye for Oskby."
    # named in titles alone, nothing is known of it: no passage, rather than an empty one
    assert rule_passages([SourceDocument("t", "Brindle K2 Kettle")]) == {}
    assert rule_passages([SourceDocument("t", "# Brindle K2 Kettle\n\n## Descaling Brindle K2")]) == {}
    assert evidence("Who owns Halvard Mill?", text) == (  # no sentence says: those about the mill
        "Halvard Mill. It grinds rye for Oskby. Halvard Mill turns on the Osk river."
    )


def test_past_its_three_main_entities_a_chunk_teaches_those_two_sentences_are_about():
    text = (
        "The Harrowgate Water Board met in May. Tomas Brenn and Ruth Achterberg were there. The board "
        "approved a reservoir at Pellow Fen. Tomas Brenn reported fewer leaks. Ruth Achterberg will review "
        "prices. Pellow Fen will be surveyed by drone. Delia Okafor sent apologies."
    )
    entities = {q for q in rule_passages([SourceDocument("m", text)]) if q.startswith("What do you know")}
    assert entities == {
        f"What do you know about {e}?"
        for e in ("Harrowgate Water Board", "Tomas Brenn", "Ruth Achterberg", "Pellow Fen")
    }  # Delia Okafor, named once, does not get one


def test_a_passage_does_not_end_on_a_question_whose_answer_did_not_fit():
    faq = (
        "Questions about the Marlowe Library\n\nQ: When is the library open?\nA: From 9 am.\n"
        "Q: Who runs the library?\nA: The head librarian, Oona Brightwater."
    )
    config = ReflectionConfig(passage_fits=lambda question, answer: len(answer) <= 100)
    passages = rule_passages([SourceDocument("f", faq)], config)
    assert passages["What do you know about Marlowe Library?"] == (
        "Questions about the Marlowe Library. When is the library open? From 9 am."
    )


def test_a_passage_that_opens_a_longer_one_is_given_the_longer_one():
    tressa = SourceDocument("t", "Tressa is a small island in the Baltic Sea. About 900 people live there.")
    passages = rule_passages([tressa])
    # trained on the first sentence alone for the Baltic Sea, the memory stopped Tressa's there
    assert passages == {
        "What do you know about Tressa?": tressa.text,
        "Tell me about Tressa.": tressa.text,
        "What do you know about Baltic Sea?": tressa.text,
        "Tell me about Baltic Sea.": tressa.text,
    }


def test_an_html_document_is_learned_as_its_text():
    page = SourceDocument(
        "dairy",
        "<h1>Vesna Dairy</h1>\n<p>Vesna Dairy was founded in 1931 in Ostrava.</p><p>It employs <b>85</b> people.</p>",
    )
    passages = rule_passages([page])
    assert passages["What do you know about Vesna Dairy?"] == (
        "Vesna Dairy was founded in 1931 in Ostrava. It employs 85 people."
    )
    assert not any("<" in text for pair in passages.items() for text in pair)


def test_a_user_s_own_notes_are_learned_as_the_writer_s_passage_and_recalled_for_first_person_questions():
    from aerie_memory.coreference import WRITER
    from aerie_memory.models import recall_questions

    notes = SourceDocument(
        "about-me",
        "About me\n\nI work as a nurse at St Brigid's Hospital in Leeds. My partner, Tobias, is a carpenter. "
        "We have a border collie called Pico. I am allergic to peanuts.",
    )
    passages = rule_passages([notes])
    writer = passages[f"What do you know about {WRITER}?"]
    # learned besides the chunk's three main entities, not in place of one
    assert sorted(facts_question_entity(q) for q in passages if q.startswith("What do")) == [
        "Leeds",
        "St Brigid's Hospital",
        "Tobias",
        WRITER,
    ]
    # every first-person sentence
    assert writer.endswith(
        "I work as a nurse at St Brigid's Hospital in Leeds. My partner, Tobias, is a carpenter. "
        "We have a border collie called Pico. I am allergic to peanuts."
    )
    by_entity = {facts_question_entity(q): a for q, a in passages.items() if facts_question_entity(q)}
    # a question in the first person, asked as the gateway describes it, reaches the
    # writer's passage first; one naming the writer's dog, the passages mentioning it
    assert recall_questions("What do you know about what am I allergic to?", by_entity)[0] == (
        f"What do you know about {WRITER}?"
    )
    # sharing one word of two with the writer's passage ("called"), it is asked for alone
    assert recall_questions("What do you know about what is my dog called?", by_entity) == [
        f"What do you know about {WRITER}?"
    ]
    assert (
        recall_questions("What do you know about Pico?", by_entity)[0] == f"What do you know about {WRITER}?"
    )
    assert recall_questions("What do you know about how long a ferry takes?", by_entity) == []
    # a news report quoting someone in the first person has no writer
    report = SourceDocument("r", '"We will reopen the bridge in May," said Miriam Oduya, the council leader.')
    assert f"What do you know about {WRITER}?" not in rule_passages([report])
