"""The memory QA benchmark's corpus generator, scoring and report section."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from aerie_gateway.memory_protocol import ANSWER_FROM_CONTEXT

from bench.memory_qa.__main__ import ROOT, markdown, output_paths, write_section
from bench.memory_qa.corpus import Corpus, generate, is_correct


def test_corpus_is_seeded_fictional_and_answerable():
    a, b = generate(7, 20), generate(7, 20)
    assert a.to_json() == b.to_json()
    assert generate(8, 20).to_json() != a.to_json()
    assert len(a.documents) == len(a.distractors) == 20
    texts = {d["id"]: d["text"] for d in a.documents}
    kinds = {q.kind for q in a.questions}
    assert kinds == {"single_hop", "cross_document"}
    for q in a.questions:
        assert set(q.sources) <= set(texts)
        if q.kind == "single_hop":
            assert len(q.sources) == 1 and q.answer in texts[q.sources[0]]
        else:
            # the question names the town, the answer is only in the governor's document
            town, person = q.sources
            assert q.answer in texts[person] and q.answer not in texts[town]
    # distractors are about other entities: no question's answer-bearing name appears in them
    names = {q.question.split(" of ")[-1].rstrip("?") for q in a.questions if q.kind == "cross_document"}
    assert not any(n in d["text"] for n in names for d in a.distractors)


def test_pronoun_prose_states_the_same_facts_naming_each_entity_once():
    named, pronouns = generate(7, 20), generate(7, 20, "pronouns")
    assert [q.question for q in pronouns.questions] == [q.question for q in named.questions]
    for plain, referring in zip(named.documents, pronouns.documents, strict=True):
        assert plain["id"] == referring["id"] and plain["text"] != referring["text"]
        name = plain["text"].split(" is a ")[0]
        assert plain["text"].count(name) > 1 and referring["text"].count(name) == 1
        assert referring["text"].split(". ")[1].startswith(("He ", "She ", "Its ", "The town "))
    for q in pronouns.questions:  # the answers are still in the documents
        text = " ".join(d["text"] for d in pronouns.documents if d["id"] in q.sources)
        assert q.answer in text


@pytest.mark.parametrize(
    "name",
    [
        "handwritten.json",
        "handwritten_b.json",
        "handwritten_layout.json",
        "handwritten_b_followups.json",
        "handwritten_nameless.json",
        "handwritten_news.json",
        "handwritten_technical.json",
        "handwritten_technical_followups.json",
        "handwritten_sections.json",
    ],
)
def test_a_corpus_written_by_hand_loads_and_is_answerable(name):
    path = Path(__file__).parents[2] / "bench/memory_qa" / name
    corpus = Corpus.from_json(json.loads(path.read_text()))
    texts = {d["id"]: d["text"] for d in corpus.documents}
    assert corpus.questions and "single_hop" in {q.kind for q in corpus.questions}
    for q in corpus.questions:
        assert is_correct(" ".join(texts[s] for s in q.sources), q.answer)
    bad = {"documents": [{"id": "a", "text": "A."}], "questions": []}
    for question in (
        {"question": "Q?", "answer": "A", "kind": "single_hop", "sources": ["b"]},  # no such document
        {"question": "Q?", "answer": "A", "kind": "multi_hop", "sources": ["a"]},
    ):
        with pytest.raises(ValueError):
            Corpus.from_json({**bad, "questions": [question]})


def test_scoring():
    assert is_correct("She is a Glassblower in town.", "glassblower")
    assert is_correct("Governed by Lumfen Uskyth.", "Lumfen Uskyth")
    assert not is_correct("Governed by Lumfen.", "Lumfen Uskyth")


def test_scoring_reads_numbers_written_either_way():
    assert is_correct("The answer is: 16 weeks.", "sixteen")
    assert is_correct("It rises for 2 hours.", "two hours")
    assert is_correct("Twenty-five days a year.", "25")
    assert not is_correct("Every employee receives 25 days.", "five")  # not part of another number
    assert not is_correct("It was founded in 1925.", "25")


def test_only_the_generated_corpus_run_rewrites_the_published_section_by_default(tmp_path):
    results, docs = ROOT / "bench" / "results", ROOT / "docs" / "benchmarks.md"
    assert output_paths(None, None, None) == (results / "memory_qa.json", docs)
    corpus = Path("bench/memory_qa/handwritten_specs.json")
    assert output_paths(corpus, None, None) == (results / "memory_qa_handwritten_specs.json", None)
    assert output_paths(corpus, tmp_path / "r.json", tmp_path / "d.md") == (
        tmp_path / "r.json",
        tmp_path / "d.md",
    )


def test_section_replaced_others_kept(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_section(path, "## Memory QA\n\nfirst\n")
    path.write_text(path.read_text() + "\n## Serving\n\nlead's table\n")
    write_section(path, "## Memory QA\n\nsecond\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "## Serving\n\nlead's table" in text
    assert text.startswith("# Benchmarks")


def test_replay_composes_recorded_recalls_and_scores_the_executive_s_answer(tmp_path):
    from bench.memory_qa.replay import recorded_cases, replay

    memory = {
        "mode": "three_stage",
        "entity": "Naxpry",
        "findings": [
            {"stage": "grounding", "question": "Who governs Naxpry?", "answer": "Naxpry is governed by Old Tom.",
             "sources": ["town-01"]},
            {"stage": "entity", "question": "What do you know about Naxpry?",
             "answer": "Naxpry is governed by Lumfen Uskyth.", "sources": ["town-01"]},
        ],
    }  # fmt: skip
    outcome = {
        "question": "Who governs Naxpry?",
        "kind": "single_hop",
        "gold": "Lumfen Uskyth",
        "seconds": 1.0,
    }
    runs = [
        {
            "label": "clean",
            "outcomes": [
                {**outcome, "system": "memo", "response": "Old Tom.", "correct": False, "memory": memory},
                {**outcome, "system": "bm25", "response": "Lumfen Uskyth", "correct": True, "memory": None},
            ],
        }
    ]
    path = tmp_path / "memory_qa.json"
    path.write_text(json.dumps({"runs": runs}))
    cases = recorded_cases(path)
    assert [(c["system"], c["run"], c["file"]) for c in cases] == [("memo", "clean", "memory_qa.json")]

    class FirstFactExecutive:  # copies the first context line, as the 135M executive does
        def __init__(self):
            self.prompts = []

        def answer(self, messages):
            self.prompts.append(messages[-1]["content"])
            return messages[-1]["content"].split("\n")[1]

    executive = FirstFactExecutive()
    [row] = replay(cases, executive, concurrency=2)
    assert executive.prompts[0].startswith("Context:\n- Naxpry is governed by Lumfen Uskyth.")
    assert row["replayed"] == "- Naxpry is governed by Lumfen Uskyth." and row["replayed_correct"]
    assert row["correct"] is False  # the live outcome is kept beside it

    # a follow-up is replayed after its conversation, with the question the memory was asked
    history = [
        {"role": "user", "content": "Tell me about Naxpry."},
        {"role": "assistant", "content": "A town."},
    ]
    follow_up = {**cases[0], "question": "Who governs it?", "history": history}
    follow_up["memory"] = {**memory, "question": "Who governs Naxpry?"}

    class RecordingExecutive(FirstFactExecutive):
        def answer(self, messages):
            self.messages = messages
            return super().answer(messages)

    executive = RecordingExecutive()
    replay([follow_up], executive, concurrency=1)
    assert executive.messages[:2] == history
    assert executive.messages[2]["content"].endswith(f"Question: Who governs Naxpry?\n{ANSWER_FROM_CONTEXT}")


def test_report_renders_a_recorded_run():
    recorded = json.loads((Path(__file__).parents[2] / "bench/results/memory_qa_seed1_memo.json").read_text())
    text = markdown(recorded["summary"], SimpleNamespace(**recorded["args"]), "2026-11-30")
    assert f"{os.cpu_count()} CPU cores" in text
    assert "| distractors | memo | 97.5 | 100.0 | 60 |" in text
    assert "198 training examples (99 rehearsed, 1 served adapters replaced)" in text


def test_coverage_counts_the_answers_a_passage_holds():
    from bench.memory_qa.coverage import coverage

    corpus = Corpus.from_json(
        {
            "documents": [
                {
                    "id": "t",
                    "text": "Tressa is a small island. Roughly 900 people live there. It has a harbour.",
                }
            ],
            "questions": [
                {
                    "question": "How many people live on Tressa?",
                    "answer": "900",
                    "kind": "single_hop",
                    "sources": ["t"],
                },
                {
                    "question": "What does Tressa have?",
                    "answer": "harbour",
                    "kind": "single_hop",
                    "sources": ["t"],
                },
            ],
        }
    )
    whole = coverage(corpus, lambda question, answer: True)
    assert whole[:2] == (2, [])
    short = coverage(corpus, lambda question, answer: len(answer) < 70)  # the last sentence does not fit
    assert short[:2] == (1, ["What does Tressa have? (gold: harbour)"])
    assert short[2] != whole[2]  # the fingerprint tells the passages apart


def test_a_follow_up_is_asked_after_its_conversation():
    import httpx

    from bench.memory_qa.__main__ import chat

    sent = []

    def reply(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["messages"])
        return httpx.Response(200, json={"choices": [{"message": {"content": "chemistry"}}]})

    client = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(reply))
    history = [
        {"role": "user", "content": "Who is Amara Lindqvist?"},
        {"role": "assistant", "content": "An artist."},
    ]
    assert chat(client, "What did she study?", system="S", history=history)[0] == "chemistry"
    assert sent[0] == [
        {"role": "system", "content": "S"},
        *history,
        {"role": "user", "content": "What did she study?"},
    ]


def test_chats_beside_the_memory_go_on_until_it_has_learned():
    import threading

    import httpx

    from bench.memory_qa.beside_the_memory import chat_tokens_per_s

    learned = threading.Event()
    asked: list[str] = []

    def reply(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content)["messages"][0]["content"])
        if len(asked) == 5:
            learned.set()
        return httpx.Response(200, json={"usage": {"completion_tokens": 8}})

    client = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(reply))
    during = chat_tokens_per_s(client, ["a", "b"], 8, learned)
    # round and round the prompts while the memory learns, stopping once it has
    assert asked == ["a", "b", "a", "b", "a"] and during["chats"] == 5 and during["tokens"] == 40
    after = chat_tokens_per_s(client, ["a", "b"], 8)
    assert after["chats"] == 2 and after["tokens_per_s"] > 0
