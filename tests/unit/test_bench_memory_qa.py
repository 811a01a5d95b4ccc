"""The memory QA benchmark's corpus generator, scoring and report section."""

from __future__ import annotations

from bench.memory_qa.__main__ import write_section
from bench.memory_qa.corpus import generate, is_correct


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


def test_scoring():
    assert is_correct("She is a Glassblower in town.", "glassblower")
    assert is_correct("Governed by Lumfen Uskyth.", "Lumfen Uskyth")
    assert not is_correct("Governed by Lumfen.", "Lumfen Uskyth")


def test_section_replaced_others_kept(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_section(path, "## Memory QA\n\nfirst\n")
    path.write_text(path.read_text() + "\n## Serving\n\nlead's table\n")
    write_section(path, "## Memory QA\n\nsecond\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and "## Serving\n\nlead's table" in text
    assert text.startswith("# Benchmarks")
