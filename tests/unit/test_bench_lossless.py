"""The losslessness check of the speculative bench (bench.lossless): where two greedy
outputs part, and how far apart the target holds the two tokens chosen there."""

from __future__ import annotations

import torch

from bench.lossless import divergence_gap, first_divergence, incremental_noise


def test_first_divergence_is_the_first_differing_or_missing_token():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [4]) == 0
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # the output ended where the reference went on
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], [7]) == 0


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_gap_is_the_logit_difference_of_the_two_choices_after_the_shared_prefix(tiny_model):
    prompt, reference = [5, 9, 11], [20, 21, 22, 23]
    output = [20, 21, 40, 41]  # parts at position 2
    logits = _logits(tiny_model, prompt + reference[:2])
    expected = abs(logits[22] - logits[40]).item()
    gap = divergence_gap(tiny_model, prompt, reference, output, eos_ids={2})
    assert abs(gap - expected) < 1e-5 and gap > 0
    assert divergence_gap(tiny_model, prompt, reference, reference, eos_ids={2}) == 0.0


def test_an_output_that_ended_early_chose_its_likeliest_end_token(tiny_model):
    prompt, reference = [5, 9, 11], [20, 21, 22]
    logits = _logits(tiny_model, prompt + reference[:1])
    likelier_eos = 2 if logits[2] > logits[3] else 3
    expected = abs(logits[21] - logits[likelier_eos]).item()
    assert abs(divergence_gap(tiny_model, prompt, reference, [20], eos_ids={2, 3}) - expected) < 1e-5
    # and the other way round: the reference ended, the output went on
    assert abs(divergence_gap(tiny_model, prompt, [20], reference, eos_ids={2, 3}) - expected) < 1e-5


def test_float32_incremental_decoding_matches_a_full_forward(tiny_model):
    largest, differing = incremental_noise(tiny_model, [5, 9, 11, 30], new_tokens=12)
    assert largest < 1e-4
    assert differing == 0.0


def test_bfloat16_incremental_decoding_is_noisier_than_float32(tiny_model):
    fp32, _ = incremental_noise(tiny_model, [5, 9, 11, 30], new_tokens=12)
    half = type(tiny_model)(tiny_model.config).to(torch.bfloat16).eval()
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()})
    bf16, _ = incremental_noise(half, [5, 9, 11, 30], new_tokens=12)
    assert bf16 > 10 * fp32
