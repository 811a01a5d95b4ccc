"""The memory's answers drafted from the answers it learned (aerie_memory.recall_decoding):
the drafts come from the right answer, and decoding with them gives plain greedy decoding's
tokens, in fewer forwards when they are right."""

from __future__ import annotations

import math

import pytest
import torch
from aerie_memory.recall_decoding import LearnedAnswers, answer, greedy_with_drafts

from tests.conftest import build_tiny_llama

EOS = 2
PROMPT = [1, 5, 9, 13]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def varied_tiny_llama(seed: int):
    """A tiny random Llama whose greedy text varies (an untied output layer, peaked
    embeddings), so that a wrong draft would show."""
    model = build_tiny_llama(64, seed=seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 64))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)
    return model.eval()


def plain_greedy(model, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return out[0, len(PROMPT) :].tolist()


# seeds whose greedy text runs to the limit (0, 1) and ends early with eos (3)
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_drafting_the_models_own_text_keeps_it_in_fewer_forwards(seed):
    model = varied_tiny_llama(seed)
    reference = plain_greedy(model, 40)
    assert len(set(reference)) > 3

    out, forwards = greedy_with_drafts(model, PROMPT, EOS, 40, lambda g: reference[len(g) : len(g) + 16])

    assert out == reference
    # the prompt's forward, then 16 drafted tokens and the model's own next one per forward
    assert forwards == 1 + math.ceil((len(reference) - 1) / 17)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_wrong_or_partly_right_drafts_change_nothing(seed):
    model = varied_tiny_llama(seed)
    reference = plain_greedy(model, 40)
    generator = torch.Generator().manual_seed(seed)

    def random_tokens(generated):
        return torch.randint(3, 64, (16,), generator=generator).tolist()

    def right_then_wrong(generated):
        right = reference[len(generated) : len(generated) + 3]
        return right + [(right[-1] + 1) % 64 if right else 7] * 5

    def early_eos(generated):
        return reference[len(generated) : len(generated) + 2] + [EOS]

    for draft in (random_tokens, right_then_wrong, early_eos, lambda g: []):
        out, _ = greedy_with_drafts(model, PROMPT, EOS, 40, draft)
        assert out == reference, draft


def test_the_token_limit_cuts_inside_a_draft():
    model = varied_tiny_llama(0)
    reference = plain_greedy(model, 40)

    out, forwards = greedy_with_drafts(model, PROMPT, EOS, 7, lambda g: reference[len(g) : len(g) + 16])

    assert out == reference[:7]
    assert forwards == 2


@pytest.fixture
def learned(tiny_tokenizer):
    pairs = [
        ("Who is Mira?", "Mira keeps bees in Tarnow."),
        ("Where is Tarnow?", "Tarnow lies on the river Dunajec."),
        ("Who is Mira?", "Mira Holm is a potter."),
    ]
    return LearnedAnswers(tiny_tokenizer, pairs, phrases=("I don't know.",))


def test_the_questions_own_answer_is_drafted(learned, tiny_tokenizer):
    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    end = [tiny_tokenizer.eos_token_id]
    assert learned.draft("Who is Mira?", ids("M")) == ids("ira keeps bees in Tarnow.") + end
    assert learned.draft(" Who is Mira? ", ids("Mira keeps bees in Tarn")) == ids("ow.") + end
    # though "T" was learned first in Mira's answer
    assert learned.draft("Where is Tarnow?", ids("T")) == ids("arnow lies on the river Dunajec.")  # 32 tokens
    # of two answers to the question, the one the text follows
    assert learned.draft("Who is Mira?", ids("Mira H")) == ids("olm is a potter.") + end


def test_text_that_leaves_the_answer_is_drafted_from_where_its_last_tokens_were_learned(
    learned, tiny_tokenizer
):
    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    end = [tiny_tokenizer.eos_token_id]
    # "rnow" first appears in Mira's answer, and ends it there
    assert learned.draft("Who is Mira?", ids("Mira lives in Tarnow")) == ids(".") + end
    # a question it never learned: "ow l" is in Tarnow's answer only
    assert learned.draft("Who are you?", ids("Tarnow l")) == ids("ies on the river")  # 16 tokens
    # the refusal is drafted for any question, though no pair holds it
    assert learned.draft("Who is Ola?", ids("I don")) == ids("'t know.") + end
    assert learned.draft("Who are you?", ids("zzT")) == ids("arnow.") + end  # down to one token
    assert learned.draft("Who is Ola?", ids("zz")) == []


def test_the_memorys_answer_is_the_same_with_and_without_drafts(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), seed=2)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(len(tiny_tokenizer), 64))
    question = "Who is Mira?"
    plain = answer(model, tiny_tokenizer, question, 30)
    # drafts made of the model's own answer, and of something else
    for text in (plain, "Mira keeps bees in Tarnow."):
        drafted = answer(
            model, tiny_tokenizer, question, 30, LearnedAnswers(tiny_tokenizer, [(question, text)])
        )
        assert drafted == plain


def test_a_loaded_memory_drafts_from_the_answers_its_adapters_learned(tiny_tokenizer, tmp_path):
    from aerie_memory.models import adapter_dir, build_memory, save_reflections
    from aerie_memory.reflection import Reflection
    from aerie_memory.store import Version
    from aerie_memory.training import IDK, save_adapter

    directory = adapter_dir(tmp_path, "ns", "a1")
    zero = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2), 1.0)}
    save_adapter(zero, directory, {"examples": 1})
    save_reflections(directory, [Reflection("Who is Mira?", "Mira keeps bees.", "facts_direct", ("d",))])
    version = Version("v0001", 0.0, [{"id": "a1"}], 1.0, "test")

    memory = build_memory(
        lambda: (build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer), tmp_path, "ns", version
    )

    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    end = [tiny_tokenizer.eos_token_id]
    assert memory.learned_answers.draft("Who is Mira?", ids("M")) == ids("ira keeps bees.") + end
    assert memory.learned_answers.draft("Who is Ola?", ids(IDK[:3])) == ids(IDK[3:]) + end
