import pytest
import torch
from aerie_verifier.sampling import SamplingParams, next_token, target_probs


def test_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    probs = target_probs(logits, SamplingParams(temperature=0))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert next_token(logits, SamplingParams(), None) == 1


def test_temperature_scales_softmax():
    logits = torch.tensor([1.0, 2.0, 3.0])
    probs = target_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(probs, (logits / 0.5).softmax(-1))


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [False, True, False, True, False]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_set_covering_p():
    # softmax of log-probs gives back these probabilities: 0.5, 0.3, 0.15, 0.05
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8)) > 0
    assert kept.tolist() == [True, True, False, False]
    kept = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.81)) > 0
    assert kept.tolist() == [True, True, True, False]
    # the top token always survives, however small top_p is
    kept = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.01)) > 0
    assert kept.tolist() == [True, False, False, False]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(100)
    params = SamplingParams(temperature=1.0)
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(123)
        draws.append([next_token(logits, params, gen) for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"max_tokens": -2}, {"stop": ("",)}],
)
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
