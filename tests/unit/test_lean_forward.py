"""The lean CPU forward (aerie_verifier.lean_forward) gives the target's own logits and
captured features bit for bit on the steps it takes over, and leaves the rest to
transformers."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from aerie_common import cpu_extension
from aerie_common.draft_tree import DraftTree
from aerie_common.packed_weights import PackedLinear
from aerie_verifier.cpu_kernels import speed_up_tree_verification
from aerie_verifier.kv_cache import GrowingCache
from aerie_verifier.lean_forward import LeanForward, install_lean_forward
from aerie_verifier.speculative import HiddenCapture
from aerie_verifier.tree_verify import tree_inputs
from transformers import (
    DynamicCache,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.conftest import build_tiny_llama, quantize_like_gguf

VOCAB = 259
TREE = DraftTree(token_ids=[40, 41, 42, 43, 44], parents=[-1, -1, 0, 0, 2], scores=[0.0] * 5)


def lean_target(gguf_like: bool = False):
    """A tiny target with the engine's CPU fixes, the lean forward among them; GGUF-like:
    its weights packed, q/k/v and gate/up each one kernel call (packed_weights.py)."""
    model = build_tiny_llama(VOCAB, seed=5)
    if gguf_like:
        quantize_like_gguf(model)
    speed_up_tree_verification(model)
    return model


@contextlib.contextmanager
def transformers_forward(model):
    """The same model (weights, tuned kernels) on transformers' own forward for a while."""
    lean = model.model._aerie_lean_forward
    model.model.forward = lean.original
    try:
        yield
    finally:
        model.model.forward = lean


@pytest.mark.parametrize("gguf_like", [False, True], ids=["fp32-weights", "packed-weights"])
def test_plain_steps_and_tree_verifications_match_transformers_bit_for_bit(gguf_like):
    model = lean_target(gguf_like)
    # packed where the kernel is vectorised (AVX-512 or AVX2, as on the project's machines)
    packed = gguf_like and cpu_extension.load().vectorised()
    assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear) == packed
    # packed, the loop runs in C++ (lean_layers.cpp); else in Python
    assert_lean_forward_matches_transformers(model, native_loop=packed)


def test_a_bfloat16_target_matches_transformers_bit_for_bit():
    # AERIE_DTYPE=bfloat16 on a CPU: the Python loop, with transformers' rotary embedding
    # (the C++ one takes float32)
    model = build_tiny_llama(VOCAB, seed=5).to(torch.bfloat16)
    speed_up_tree_verification(model)
    assert_lean_forward_matches_transformers(model, native_loop=False)


def tiny_model(architecture: str, bf16_weights: bool, **config):
    """A tiny Mistral or Qwen2 (q/k/v with biases) target with the engine's CPU fixes;
    bf16 weights: every weight a bf16 value, as in most Hugging Face checkpoints, so the
    linear layers pack as bf16."""
    config_class, model_class = {
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[architecture]
    torch.manual_seed(3)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    model = model_class(config_class(vocab_size=VOCAB, num_key_value_heads=2, **dims, **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):  # transformers initialises them to 0, which would hide them
                param.normal_(0, 0.5)
            if bf16_weights:
                param.copy_(param.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("bf16_weights", [False, True], ids=["fp32-weights", "bf16-weights"])
@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_mistral_and_qwen2_targets_match_transformers_bit_for_bit(architecture, bf16_weights):
    model = tiny_model(architecture, bf16_weights, sliding_window=None)
    speed_up_tree_verification(model)
    packed = bf16_weights and cpu_extension.load().vectorised()
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear) == packed
    # packed, the loop runs in C++, Qwen2's q/k/v biases added there as each layer adds its own
    assert_lean_forward_matches_transformers(model, native_loop=packed)


def assert_lean_forward_matches_transformers(model, native_loop: bool) -> None:
    """Plain steps and tree verifications on the lean forward and on transformers' own,
    over two caches: the same logits, captured features and cache, bit for bit."""
    ran = []
    model.model._aerie_lean_forward.observers.append(lambda layer, hidden: ran.append(layer))
    capture = HiddenCapture(model)
    prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    caches = {"stock": GrowingCache(), "lean": GrowingCache()}

    def forward(name, **kwargs):
        with transformers_forward(model) if name == "stock" else contextlib.nullcontext():
            with capture.layers((0, 2)):
                return model(past_key_values=caches[name], **kwargs).logits, capture.features((0, 2))

    with torch.inference_mode():
        for name in caches:
            model(prompt, past_key_values=caches[name])
        assert ran == []  # a prefill is transformers'
        for step in range(3):
            results = {}
            for name, cache in caches.items():
                if step % 2 == 0:  # a plain step
                    results[name] = forward(name, input_ids=torch.tensor([[7 + step]]), logits_to_keep=1)
                else:  # a tree verification
                    inputs = tree_inputs(7, TREE, cache.get_seq_length(), model.config, "cpu", model.dtype)
                    results[name] = forward(name, **inputs.model_kwargs())
            (stock_logits, stock_features), (lean_logits, lean_features) = results["stock"], results["lean"]
            assert torch.equal(stock_logits, lean_logits)
            assert torch.equal(stock_features, lean_features)
            assert torch.equal(caches["stock"].layers[1].keys, caches["lean"].layers[1].keys)
    assert len(ran) == 3 * len(model.model.layers)
    assert (model.model._aerie_lean_forward._native is not None) == native_loop


@pytest.mark.parametrize("gguf_like", [False, True], ids=["python-loop", "native-loop"])
def test_a_ragged_batch_gives_each_request_what_it_gets_alone(gguf_like):
    """Three requests in one ragged forward (a plain step, a tree, a plain step, on caches
    of different lengths) get the logits, captured features and cache entries each gets
    from a forward of its own."""
    model = lean_target(gguf_like)
    lean = model.model._aerie_lean_forward
    capture = HiddenCapture(model)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=gen) for n in (5, 17, 30)]
    batched, alone = [GrowingCache() for _ in prompts], [GrowingCache() for _ in prompts]
    with torch.inference_mode():
        for prompt, *caches in zip(prompts, batched, alone, strict=True):
            for cache in caches:
                model(prompt, past_key_values=cache)
        tree = tree_inputs(7, TREE, alone[1].get_seq_length(), model.config, "cpu", model.dtype)
        steps = [  # each request's (input ids, positions, mask)
            (torch.tensor([[11]]), torch.tensor([[5]]), None),
            (tree.input_ids, tree.position_ids, tree.attention_mask),
            (torch.tensor([[12]]), torch.tensor([[30]]), None),
        ]
        expected = []
        for (ids, positions, mask), cache in zip(steps, alone, strict=True):
            with capture.layers((0, 2)):
                hidden = lean.ragged(ids, positions, [cache], [mask])
                expected.append((model.lm_head(hidden[0]), capture.features((0, 2))))
        with capture.layers((0, 2)):
            hidden = lean.ragged(
                torch.cat([ids for ids, _, _ in steps], dim=1),
                torch.cat([positions for _, positions, _ in steps], dim=1),
                batched,
                [mask for _, _, mask in steps],
            )
            logits, features = model.lm_head(hidden[0]), capture.features((0, 2))
    assert hidden.shape[1] == 1 + (1 + len(TREE)) + 1  # a plain row, the tree's root and nodes, a plain row
    start = 0
    for (want_logits, want_features), cache, own in zip(expected, batched, alone, strict=True):
        rows = len(want_logits)
        torch.testing.assert_close(logits[start : start + rows], want_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(features[start : start + rows], want_features, rtol=0, atol=1e-5)
        assert cache.get_seq_length() == own.get_seq_length()
        torch.testing.assert_close(cache.layers[1].keys, own.layers[1].keys, rtol=0, atol=1e-5)
        start += rows
    capture.close()
    assert (lean._native is not None) == (gguf_like and cpu_extension.load().vectorised())


def test_a_capture_made_before_the_lean_forward_still_records_its_steps():
    model = build_tiny_llama(VOCAB, seed=5)
    capture = HiddenCapture(model)  # before the engine's CPU fixes install the lean forward
    speed_up_tree_verification(model)
    cache = GrowingCache()
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), past_key_values=cache)
        with capture.layers((1,)):
            model(input_ids=torch.tensor([[8]]), past_key_values=cache, logits_to_keep=1)
            assert capture.features((1,)).shape == (1, model.config.hidden_size)
    capture.close()
    assert model.model._aerie_lean_forward.observers == []


def test_other_caches_and_batches_go_to_transformers():
    lean = lean_target()
    ran = []
    lean.model._aerie_lean_forward.observers.append(lambda layer, hidden: ran.append(layer))
    with torch.inference_mode():
        cache = DynamicCache()
        lean(torch.tensor([[5, 6, 7]]), past_key_values=cache)
        lean(input_ids=torch.tensor([[8]]), past_key_values=cache)  # not a GrowingCache
        growing = GrowingCache()
        lean(torch.tensor([[5, 6, 7], [5, 6, 8]]), past_key_values=growing)  # a batch
    assert ran == []


def test_llama_mistral_and_qwen2_layers_get_the_lean_forward_where_they_attend_to_everything():
    llama = build_tiny_llama(VOCAB)
    assert install_lean_forward(llama) is install_lean_forward(llama) is not None  # once
    assert install_lean_forward(tiny_model("qwen2", False)) is not None  # layer types: full attention
    assert (
        install_lean_forward(
            tiny_model("qwen2", False, use_sliding_window=True, sliding_window=16, max_window_layers=1)
        )
        is None
    )
    assert install_lean_forward(tiny_model("mistral", False, sliding_window=None)) is not None
    assert install_lean_forward(tiny_model("mistral", False, sliding_window=16)) is None
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    assert install_lean_forward(qwen3) is None  # its q/k norms are not in the loop


def test_the_rotary_kernel_matches_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    query, key = torch.randn(1, 5, 9, 64, generator=g), torch.randn(1, 5, 3, 64, generator=g)
    angles = torch.rand(1, 5, 64, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    rotate = cpu_extension.load().rotary
    expected_query, expected_key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    assert torch.equal(rotate(query, cos, sin).transpose(1, 2), expected_query)
    assert torch.equal(rotate(key, cos, sin).transpose(1, 2), expected_key)


def forward_of_transformers_5_2x(input_ids=None, cache=None, inputs_embeds=None, use_cache=None, **kwargs):
    return "cache", cache, kwargs


def forward_of_transformers_5_17(
    input_ids=None, past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs
):
    return "past_key_values", past_key_values, kwargs


@pytest.mark.parametrize("forward", [forward_of_transformers_5_2x, forward_of_transformers_5_17])
def test_what_the_loop_does_not_run_gets_the_cache_by_the_name_transformers_takes(forward):
    cache = DynamicCache()  # not a GrowingCache: transformers' own forward runs
    lean = LeanForward(SimpleNamespace(forward=forward))
    name, given, rest = lean(input_ids=torch.tensor([[1, 2]]), past_key_values=cache)
    assert given is cache and name not in rest
