"""Sliding-window targets (aerie_verifier.attention_mask): a tree node sees only the keys
its token would see decoded alone, so speculation stays lossless on Mistral, Phi-3,
Gemma 2 and Qwen2 with sliding windows, on growing caches and on KV cache slots."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from aerie_common.draft_tree import DraftTree
from aerie_verifier.attention_mask import SLIDING, sliding_window, target_attention_mask
from aerie_verifier.engine import Engine, make_slots
from aerie_verifier.sampling import SamplingParams
from aerie_verifier.tree_verify import tree_inputs

from .spec_helpers import Factory, OracleDrafter

VOCAB = 259
WINDOW = 6
DIMS = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)
SLIDING_TARGETS = {
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=WINDOW)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(sliding_window=WINDOW)),
    # every other layer slides: the layers take a mask per layer type
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(head_dim=16, sliding_window=WINDOW),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
    ),
}


def build(architecture: str):
    config_class, model_class, extra = SLIDING_TARGETS[architecture]
    torch.manual_seed(4)
    return model_class(config_class(**DIMS, **extra)).eval()


def test_the_window_is_read_from_the_config():
    assert sliding_window(transformers.LlamaConfig()) is None
    assert sliding_window(transformers.Qwen2Config()) is None  # use_sliding_window is off
    assert sliding_window(transformers.Qwen3Config()) is None
    assert sliding_window(transformers.MistralConfig(sliding_window=None)) is None
    for architecture in SLIDING_TARGETS:
        assert sliding_window(build(architecture).config) == WINDOW


def test_sliding_layers_see_keys_within_the_window_by_position():
    # root + a chain of two and a sibling, over a 7-token prefix: positions 7, 8, 9, 8
    tree = DraftTree(token_ids=[20, 21, 22], parents=[-1, 0, -1], scores=[0.0] * 3)
    config = SLIDING_TARGETS["gemma2"][0](**DIMS, head_dim=16, sliding_window=3)
    masks = tree_inputs(5, tree, 7, config, "cpu", torch.float32).attention_mask
    assert set(masks) == {"full_attention", SLIDING}
    sees = {kind: (mask[0, 0] == 0) for kind, mask in masks.items()}
    # the node at depth 2 (row 2, position 9): all of the prefix under full attention,
    # positions 7 and 8 (the root and its parent) and itself under the window of 3
    assert sees["full_attention"][2].tolist() == [True] * 7 + [True, True, True, False]
    assert sees[SLIDING][2].tolist() == [False] * 7 + [True, True, True, False]
    # the sibling at depth 1 (position 8) sees positions 6 and 7 and itself, not the chain
    assert sees[SLIDING][3].tolist() == [False] * 6 + [True, True, False, False, True]
    # one kind of layer: one mask
    mistral = transformers.MistralConfig(**DIMS, sliding_window=3)
    assert torch.equal(tree_inputs(5, tree, 7, mistral, "cpu", torch.float32).attention_mask, masks[SLIDING])
    whole = target_attention_mask(
        transformers.LlamaConfig(), torch.ones(2, 4, dtype=torch.bool), *([None] * 2), torch.float32
    )
    assert whole.shape == (1, 1, 2, 4) and not whole.any()


def generate(engine, prompt, max_tokens):
    done, tokens = threading.Event(), []

    def on_event(event):
        tokens.extend(event.token_ids)
        if event.finish_reason is not None:
            assert event.error is None
            done.set()

    engine.submit("r", prompt, SamplingParams(max_tokens=max_tokens), on_event, speculative=True)
    assert done.wait(120)
    return tokens


@pytest.mark.parametrize("slots", [False, True], ids=["growing-cache", "slots"])
@pytest.mark.parametrize("architecture", list(SLIDING_TARGETS))
def test_speculation_on_a_sliding_window_target_decodes_what_the_target_decodes(
    architecture, slots, tiny_tokenizer
):
    model = build(architecture)
    # an oracle drafter: its chains are always accepted, so every step verifies a tree
    # that reaches back past the window
    factory = Factory(lambda: OracleDrafter(model, 4), capture_layer_ids=(1, 2, 3))
    slot_list = make_slots(model, 1, 96) if slots else []
    engine = Engine(model, tiny_tokenizer, max_running=1, drafter_factory=factory, slots=slot_list)
    engine.start()
    try:
        for prompt in ([5, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48], list(range(60, 80))):
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                expected = model.generate(
                    ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
                )
            expected = expected[0, len(prompt) :].tolist()
            end = next((i for i, token in enumerate(expected) if token in engine.eos_ids), len(expected))
            assert generate(engine, prompt, 30) == expected[:end]
    finally:
        engine.stop()
    assert all(slot.verified > 0 for slot in slot_list)  # the trees were verified on the slot
