"""scripts/offline_gpu/bundle_prompts.py: the conversations it writes give a GPU machine
the same later-turn prompts, in the same order, as the package gives here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aerie_drafter.training.data import conversation_key, later_turn_prompts, load_conversations

ROOT = Path(__file__).resolve().parents[2]


def bundle_module():
    spec = importlib.util.spec_from_file_location(
        "bundle_prompts", ROOT / "scripts" / "offline_gpu" / "bundle_prompts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat(first: str, *later: str) -> list[dict]:
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": "a"}]
    for text in later:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "b"}]
    return messages


def test_the_bundle_holds_just_the_conversations_of_the_fresh_prompts_wanted(tmp_path):
    bundle = bundle_module()
    words = "with enough words to count as a prompt"
    conversations = [
        chat("first turns are never prompts", f"one {words}", f"two {words}"),
        chat("only a short later turn", "go on"),  # no prompt: left out
        chat("again", f"one {words}", f"three {words}"),  # "one" met before
        chat("more", f"four {words}"),
        chat("beyond what is wanted", f"five {words}"),
    ]
    trained = frozenset({conversation_key([{"role": "user", "content": f"two {words}"}])})
    kept = bundle.conversations_for_prompts(conversations, trained, count=3)
    assert kept == [conversations[0], conversations[2], conversations[3]]

    path = tmp_path / "prompts.jsonl.gz"
    bundle.write_conversations(path, kept)
    there = [
        p
        for p in later_turn_prompts(load_conversations(path=str(path)))
        if conversation_key(p) not in trained
    ]
    here = [p for p in later_turn_prompts(conversations) if conversation_key(p) not in trained]
    assert [p[-1]["content"] for p in there] == [f"one {words}", f"three {words}", f"four {words}"]
    assert there == here[:3]
