import asyncio
import math
from types import SimpleNamespace

import pytest
import torch
from aerie_common.sampling_limits import check_sampling_defaults
from aerie_verifier.sampling import (
    LogitAdjuster,
    SamplingParams,
    next_token,
    penalize,
    sampling_defaults,
    target_probs,
    token_logprobs,
)
from aerie_verifier.server import VerifierServicer
from aerie_verifier.settings import VerifierSettings
from pydantic import ValidationError
from transformers import (
    GenerationConfig,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def test_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    probs = target_probs(logits, SamplingParams(temperature=0))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert next_token(logits, SamplingParams(), seed=0, position=0) == 1


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


def test_min_p_drops_tokens_less_likely_than_min_p_times_the_top_one():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    for min_p, kept in ((0.0, 4), (0.2, 3), (0.31, 2), (0.7, 1), (1.0, 1)):
        probs = target_probs(logits, SamplingParams(temperature=1.0, min_p=min_p))
        assert (probs > 0).tolist() == [True] * kept + [False] * (4 - kept), min_p
    # as Hugging Face's warpers give it, after temperature, top-k and top-p
    torch.manual_seed(0)
    scores = torch.randn(3, 50) * 3
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.95, min_p=0.05)
    warped = scores / 0.7
    for warper in (TopKLogitsWarper(20), TopPLogitsWarper(0.95), MinPLogitsWarper(0.05)):
        warped = warper(None, warped)
    assert torch.allclose(target_probs(scores, params), warped.softmax(-1), atol=1e-6)


def test_draws_follow_the_sampling_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, top_p=0.9)
    runs = 20000
    counts = torch.bincount(
        torch.tensor([next_token(logits, params, seed, 0) for seed in range(runs)]), minlength=4
    )
    assert (counts / runs - target_probs(logits, params)).abs().max() < 0.015
    assert counts[3] == 0  # outside the nucleus


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"min_p": math.nan},
        {"max_tokens": -2},
        {"stop": ("",)},
    ],
)
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frequency_penalty": 2.5},
        {"presence_penalty": -2.01},
        {"frequency_penalty": float("nan")},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"logprobs": True, "top_logprobs": 21},
        {"top_logprobs": 2},  # without logprobs
        {"logit_bias": ((5, 100.5),)},
        {"logit_bias": ((-1, 1.0),)},
        {"logit_bias": tuple((i, 1.0) for i in range(301))},
    ],
)
def test_invalid_penalties_and_logprobs_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    scored = penalize(logits, params, counts, torch.zeros(4, dtype=torch.bool))
    # OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty
    assert scored.tolist() == [[1.0, 2.0 - 0.5 - 0.25, 3.0 - 1.5 - 0.25, 4.0]]


def test_repetition_penalty_matches_hugging_face_over_prompt_and_output():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    prompt, output = [3, 7, 7], [7, 12, 40]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    counts = torch.zeros(1, 50).index_add_(1, torch.tensor(output), torch.ones(1, len(output)))
    seen = torch.zeros(50, dtype=torch.bool)
    seen[prompt] = True
    scored = penalize(logits, SamplingParams(repetition_penalty=1.3), counts, seen)
    assert torch.equal(scored, expected)
    assert not torch.equal(scored, logits)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[0.0, 5.0, 4.5]])
    counts = torch.tensor([[0.0, 1.0, 0.0]])
    params = SamplingParams(presence_penalty=1.0)
    assert params.penalized and not SamplingParams().penalized
    assert (
        next_token(penalize(logits, params, counts, torch.zeros(3, dtype=torch.bool))[0], params, 0, 0) == 2
    )


def test_logit_bias_is_added_then_penalties_follow_each_rows_counts():
    params = SamplingParams(logit_bias=((1, -100.0), (3, 2.5)), presence_penalty=1.0)
    adjuster = LogitAdjuster(params, prompt_ids=[0], vocab_size=4, device=torch.device("cpu"))
    logits = torch.zeros(2, 4)
    assert adjuster(logits).tolist() == [[0.0, -100.0, 0.0, 2.5]] * 2
    adjuster.observe([3, 3])
    path_counts = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert adjuster(logits, path_counts).tolist() == [[0.0, -100.0, 0.0, 1.5], [0.0, -100.0, -1.0, 1.5]]
    with pytest.raises(ValueError, match="logit_bias token ids"):
        LogitAdjuster(SamplingParams(logit_bias=((4, 1.0),)), [0], vocab_size=4, device=torch.device("cpu"))


def test_token_logprobs_are_log_softmax_with_the_top_tokens_best_first():
    torch.manual_seed(1)
    logits = torch.randn(3, 30)
    entries = token_logprobs(logits, [4, 9, 0], top_n=5)
    expected = logits.log_softmax(-1)
    for row, (entry, token) in enumerate(zip(entries, [4, 9, 0], strict=True)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(expected[row, token].item(), abs=1e-6)
        assert [token_id for token_id, _ in entry.top] == expected[row].topk(5).indices.tolist()
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in expected[row].tolist()) == pytest.approx(1.0, abs=1e-5)
    # fewer tokens than rows (a stop cut the step short): the first rows
    assert [e.token_id for e in token_logprobs(logits, [4], top_n=0)] == [4]
    assert token_logprobs(logits, [4], top_n=0)[0].top == []


@pytest.mark.parametrize("scale", [0.3, 3.0, 10.0], ids=["flat (beyond the candidates)", "peaked", "sharp"])
def test_the_nucleus_is_the_full_sorts(scale):
    torch.manual_seed(0)
    logits = torch.randn(2, 5000) * scale
    params = SamplingParams(temperature=0.8, top_p=0.9)
    scaled = logits / 0.8
    ranked, order = scaled.softmax(-1).sort(dim=-1, descending=True)
    drop_ranked = (ranked.cumsum(-1) - ranked) >= 0.9
    expected = scaled.masked_fill(drop_ranked.scatter(-1, order, drop_ranked), float("-inf")).softmax(-1)
    assert torch.equal(target_probs(logits, params) > 0, expected > 0)
    assert torch.allclose(target_probs(logits, params), expected)


def test_sampling_defaults_are_those_the_models_generation_config_sets_then_the_overrides():
    # Qwen2.5 Instruct's generation_config.json, and a min_p (typical_p is not one Aerie samples with)
    recommended = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
        min_p=0.05,
        typical_p=0.9,
    )
    assert sampling_defaults(recommended, True, {}) == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
    }
    assert sampling_defaults(recommended, True, {"temperature": 0.2}) == {
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
    }
    assert sampling_defaults(recommended, False, {"top_p": 0.9}) == {"top_p": 0.9}  # "none"
    assert sampling_defaults(GenerationConfig(bos_token_id=1, eos_token_id=2), True, {}) == {}  # SmolLM2's
    assert sampling_defaults(None, True, {}) == {}
    # a recommendation no request could hold is left out, the rest kept
    odd = SimpleNamespace(to_diff_dict=lambda: {"top_p": 0.0, "temperature": 0.6, "top_k": 2.5})
    assert sampling_defaults(odd, True, {}) == {"temperature": 0.6}


def test_sampling_defaults_set_by_the_operator_are_checked(monkeypatch):
    assert check_sampling_defaults({"top_k": 40.0, "temperature": 0}) == {"top_k": 40, "temperature": 0}
    for field in ("temperature", "top_k"):
        for value in (math.inf, math.nan):
            with pytest.raises(ValueError, match=field):
                check_sampling_defaults({field: value})
    monkeypatch.setenv("AERIE_SAMPLING_DEFAULTS", '{"temperature": 0.2, "top_k": 40}')
    assert VerifierSettings().sampling_defaults == {"temperature": 0.2, "top_k": 40}
    for wrong, says in (
        ('{"typical_p": 0.1}', "temperature"),  # the fields it may set are named
        ('{"min_p": 1.5}', "min_p"),
        ('{"top_p": 0}', "top_p"),
        ('{"top_k": 2.5}', "top_k"),
        ('{"repetition_penalty": -1}', "repetition_penalty"),
    ):
        monkeypatch.setenv("AERIE_SAMPLING_DEFAULTS", wrong)
        with pytest.raises(ValidationError, match=says):
            VerifierSettings()
    monkeypatch.setenv("AERIE_GENERATION_CONFIG", "vllm")
    with pytest.raises(ValidationError, match="generation_config"):
        VerifierSettings()


def test_the_model_info_carries_the_sampling_defaults():
    config = SimpleNamespace(vocab_size=10, hidden_size=8, num_hidden_layers=2)
    engine = SimpleNamespace(
        tokenizer=SimpleNamespace(get_vocab=lambda: {"a": 0}),
        context_length=64,
        model=SimpleNamespace(config=config),
    )
    servicer = VerifierServicer(engine, "m", "cpu", "float32", {"temperature": 0.5, "top_k": 20})
    defaults = asyncio.run(servicer.GetModelInfo(None, None)).sampling_defaults
    assert (defaults.temperature, defaults.top_k) == (0.5, 20)
    assert not defaults.HasField("top_p") and not defaults.HasField("repetition_penalty")
    plain = asyncio.run(VerifierServicer(engine, "m", "cpu", "float32").GetModelInfo(None, None))
    assert not plain.sampling_defaults.ListFields()  # none: OpenAI's
