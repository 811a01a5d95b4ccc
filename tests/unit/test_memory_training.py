"""LoRA SFT on reflections with a tiny random-weight Llama: the adapter learns the answers,
survives saving, and TIES-merged onto a fresh base gives the same answers."""

from __future__ import annotations

import pytest
import torch
from aerie_memory.recall_decoding import answer
from aerie_memory.reflection import Reflection
from aerie_memory.ties import apply_deltas, merge_adapters
from aerie_memory.training import (
    IDK,
    TrainConfig,
    build_examples,
    fits_training,
    load_adapter,
    replay_sample,
    save_adapter,
    train_lora,
    training_pairs,
    unrecalled,
)

from tests.conftest import build_tiny_llama

PAIRS = [("Where does Mira live?", "Tarnow"), ("What does Mira collect?", "keys")]


def memorising_tiny_llama(vocab_size: int, seed: int = 3):
    """The tiny random Llama with larger (tied) embeddings: at the default init its logits
    are too flat (final RMSNorm times 0.02-scale embeddings) for any adapter to peak them."""
    model = build_tiny_llama(vocab_size, seed=seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    return model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_examples_mask_the_prompt(tiny_tokenizer):
    examples = build_examples(tiny_tokenizer, PAIRS, max_seq_tokens=200)
    assert len(examples) == 2
    for ex, (_, ans) in zip(examples, PAIRS, strict=True):
        labelled = [t for t in ex.labels if t != -100]
        assert tiny_tokenizer.decode(labelled[:-1]) == ans
        assert labelled[-1] == tiny_tokenizer.eos_token_id
        assert ex.labels[: len(ex.labels) - len(labelled)] == [-100] * (len(ex.labels) - len(labelled))
    assert build_examples(tiny_tokenizer, PAIRS, max_seq_tokens=10) == []  # answer cut off entirely


def test_a_pair_fits_the_training_length_when_its_example_is_not_cut(tiny_tokenizer):
    question, answer = PAIRS[0]
    length = len(build_examples(tiny_tokenizer, [(question, answer)], max_seq_tokens=200)[0].input_ids)
    assert fits_training(tiny_tokenizer, question, answer, length)
    assert not fits_training(tiny_tokenizer, question, answer, length - 1)


def test_the_worker_s_passages_hold_what_its_training_keeps_whole(tiny_tokenizer):
    from aerie_memory.reflection import ReflectionConfig
    from aerie_memory.settings import MemorySettings
    from aerie_memory.worker import reflection_config

    question, answer = "What do you know about Mira?", "Mira lives in Tarnow and collects keys. " * 12
    length = len(build_examples(tiny_tokenizer, [(question, answer)], max_seq_tokens=2000)[0].input_ids)
    assert len(answer) > 390 and not ReflectionConfig().passage_fits(question, answer)  # the default
    fits = reflection_config(MemorySettings(memory_max_seq_tokens=length), tiny_tokenizer).passage_fits
    assert fits(question, answer)
    assert not reflection_config(
        MemorySettings(memory_max_seq_tokens=length - 1), tiny_tokenizer
    ).passage_fits(question, answer)


def test_training_pairs_add_idk_examples():
    refl = [Reflection(q, a, "facts_direct", ("d",)) for q, a in PAIRS * 10]
    pairs = training_pairs(refl, idk_share=0.1)
    assert len(pairs) == 22 and sum(a == IDK for _, a in pairs) == 2
    assert training_pairs([]) == []
    assert training_pairs(refl) == [(r.question, r.answer) for r in refl]  # none by default


def test_replay_sample_is_seeded_bounded_and_lets_new_answers_win():
    known = [Reflection(f"Q{i}?", f"old {i}", "facts_direct", (f"d{i % 3}",)) for i in range(20)]
    known += [Reflection("Q0?", "another answer", "passages", ("d0",))]  # asked twice: one kept
    new = [Reflection("Q1?", "new 1", "facts_direct", ("e",)), Reflection("N?", "n", "facts_direct", ("e",))]
    sample = replay_sample(known, new, ratio=2.0, seed=7)
    assert len(sample) == 4
    assert "Q1?" not in {r.question for r in sample}  # the new answer to Q1 is the one learned
    assert replay_sample(list(reversed(known)), new, ratio=2.0, seed=7) == sample  # order-free
    assert replay_sample(known, new, ratio=2.0, seed=8) != sample
    everything = replay_sample(known, new, ratio=100.0, seed=7)
    assert len(everything) == 19 and len({r.question for r in everything}) == 19
    assert replay_sample(known, new, ratio=0.0, seed=7) == []
    assert len(replay_sample(known, new, ratio=0.5, seed=7, all_up_to=19)) == 19  # small: all of it
    assert len(replay_sample(known, new, ratio=0.5, seed=7, all_up_to=18)) == 1
    assert replay_sample([], new, ratio=1.0, seed=7) == []


def test_a_small_job_trains_more_epochs_up_to_the_minimum_steps(tiny_tokenizer):
    config = TrainConfig(epochs=8, batch_size=8, min_steps=32)
    assert config.schedule(13) == (16, 32)  # 2 batches an epoch
    assert config.schedule(5) == (32, 32)
    assert config.schedule(25) == (8, 32)  # 4 batches: 8 epochs make the minimum
    assert config.schedule(100) == (8, 104)
    assert TrainConfig(epochs=8, batch_size=8).schedule(13) == (8, 16)
    model = memorising_tiny_llama(len(tiny_tokenizer))
    examples = build_examples(tiny_tokenizer, PAIRS, max_seq_tokens=200)
    small = TrainConfig(rank=4, alpha=8, epochs=2, batch_size=2, min_steps=6)
    seen = []
    result = train_lora(
        model, tiny_tokenizer, examples, small, progress=lambda *heard: seen.append(heard[:3])
    )
    per_epoch = -(-len(examples) // 2)
    assert seen[-1] == ("training", result.steps, result.steps)
    assert result.steps == small.schedule(len(examples))[1] >= 6
    assert len(result.epoch_losses) == small.schedule(len(examples))[0] == -(-6 // per_epoch)


def test_unrecalled_finds_the_answers_greedy_decoding_would_not_give_back(tiny_tokenizer):
    from aerie_memory.training import Example, prompt_ids

    model = memorising_tiny_llama(len(tiny_tokenizer)).eval()
    prompt = prompt_ids(tiny_tokenizer, PAIRS[0][0])
    ids = torch.tensor([prompt])
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)[0]
    own = greedy[len(prompt) :].tolist()  # what the model says: recalled by construction
    other = [*own[:3], (own[3] + 1) % len(tiny_tokenizer), *own[4:]]  # one token it would not say
    # its last token (an answer's end of turn) is another: given back whole, it runs on
    runs_on = [*own[:-1], (own[-1] + 1) % len(tiny_tokenizer)]
    examples = [
        Example(prompt + answer_ids, [-100] * len(prompt) + answer_ids)
        for answer_ids in (own, other, runs_on, own)
    ]
    assert unrecalled(model, examples, batch_size=2, pad=0) == [1]
    assert unrecalled(model, examples[::-1], batch_size=3, pad=0) == [2]


def test_recall_epochs_train_on_until_every_answer_comes_back(tiny_tokenizer):
    examples = build_examples(tiny_tokenizer, PAIRS, max_seq_tokens=200)
    scheduled = TrainConfig(rank=8, alpha=16, epochs=2, learning_rate=3e-3, batch_size=2)
    model = memorising_tiny_llama(len(tiny_tokenizer))
    short = train_lora(model, tiny_tokenizer, examples, scheduled)
    assert short.unrecalled == [] and short.steps == 2  # no check without recall epochs
    apply_deltas(model, merge_adapters([short.adapter], density=1.0))
    assert [answer(model, tiny_tokenizer, q, 8) for q, _ in PAIRS] != [a for _, a in PAIRS]

    config = TrainConfig(rank=8, alpha=16, epochs=2, learning_rate=3e-3, batch_size=2, recall_epochs=200)
    model = memorising_tiny_llama(len(tiny_tokenizer))
    seen = []
    result = train_lora(
        model, tiny_tokenizer, examples, config, progress=lambda *heard: seen.append(heard[:3])
    )
    # checked after the scheduled epochs, then after each recall epoch the answers missed,
    # and all once those come back; a recall epoch trains the answers missed and a sample
    # of the others (one batch here)
    assert result.unrecalled[0] > 0 and result.unrecalled[-2:] == [0, 0]
    assert 2 < result.steps < 2 + 200
    # progress: the scheduled steps, then the recall epochs (of at most 200), never past the total
    recalling = [s for s in seen if s[0] == "recalling"]
    assert [s for s in seen if s[0] == "training"][-1] == ("training", 2, 2)
    assert recalling == [("recalling", e, 200) for e in range(len(recalling))] and len(recalling) > 1
    apply_deltas(model, merge_adapters([result.adapter], density=1.0))
    assert [answer(model, tiny_tokenizer, q, 8) for q, _ in PAIRS] == [a for _, a in PAIRS]


@pytest.mark.parametrize("rehearsal", [0, 3])
def test_a_recall_epoch_trains_the_missed_answers_beside_recalled_ones(
    tiny_tokenizer, monkeypatch, rehearsal
):
    from aerie_memory import training

    pairs = [(f"Where does Mira {i} live?", f"Town {i}") for i in range(8)]
    examples = build_examples(tiny_tokenizer, pairs, max_seq_tokens=200)
    checks = []

    def unrecalled(model, checked, batch_size, pad):
        checks.append(len(checked))
        return [5] if len(checks) == 1 else []  # the sixth answer missed after the schedule

    trained = []

    def batch(examples, rows, pad, device):
        if torch.is_grad_enabled():  # a training step's batch, not a check's
            trained.append(sorted(rows))
        return original_batch(examples, rows, pad, device)

    original_batch = training._batch
    monkeypatch.setattr(training, "unrecalled", unrecalled)
    monkeypatch.setattr(training, "_batch", batch)

    class Rounds:  # a thread governor, told of each step and each check
        started = ended = 0

        def start_round(self):
            self.started += 1

        def end_round(self):
            self.ended += 1

    rounds = Rounds()
    config = TrainConfig(rank=4, alpha=8, epochs=1, batch_size=8, recall_epochs=4, recall_rehearsal=rehearsal)
    model = memorising_tiny_llama(len(tiny_tokenizer))
    result = train_lora(model, tiny_tokenizer, examples, config, thread_governor=rounds)
    assert checks == [8, 1, 8] and result.unrecalled == [1, 0, 0]
    assert rounds.started == rounds.ended == result.steps + len(checks)
    assert trained[0] == list(range(8)) and len(trained) == 2 == result.steps
    assert 5 in trained[1] and len(trained[1]) == 1 + rehearsal


def test_lora_learns_and_merged_memory_answers(tiny_tokenizer, tmp_path):
    model = memorising_tiny_llama(len(tiny_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = build_examples(tiny_tokenizer, PAIRS, max_seq_tokens=200)
    config = TrainConfig(rank=8, alpha=16, epochs=100, learning_rate=3e-3, batch_size=2)
    seen = []
    result = train_lora(
        model, tiny_tokenizer, examples, config, progress=lambda *heard: seen.append(heard[:3])
    )
    assert seen[-1] == ("training", 100, 100) and result.steps == 100
    assert result.epoch_losses[-1] < result.epoch_losses[0] / 10
    # the base model is untouched
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert any(name.endswith("self_attn.q_proj") for name in result.adapter)
    assert any(name.endswith("mlp.down_proj") for name in result.adapter)

    save_adapter(result.adapter, tmp_path / "a1", {"examples": 2})
    loaded = load_adapter(tmp_path / "a1")
    assert set(loaded) == set(result.adapter)
    fresh = memorising_tiny_llama(len(tiny_tokenizer))
    assert answer(fresh, tiny_tokenizer, PAIRS[0][0], 8) != "Tarnow"
    apply_deltas(fresh, merge_adapters([loaded], density=1.0))
    for question, expected in PAIRS:
        assert answer(fresh, tiny_tokenizer, question, 8) == expected
