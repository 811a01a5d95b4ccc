"""Fixtures shared by the whole suite: a tiny tokenizer and a tiny random-weight Llama,
built in the test process so unit tests need no model files, and the launcher
(scripts/launch.py) as a module."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is a token, so multi-byte characters
    span several tokens (which the streaming detokeniser must handle)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4, ctx: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ctx,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def quantize_like_gguf(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Round the model's weights (in place) as llama.cpp quantises them and transformers
    unpacks them again into fp32: the linear layers to Q4_1 blocks (32 weights, an fp16
    scale and minimum from the block's range, 4-bit levels), the tied embedding and output
    projection to Q8_0 (an fp16 scale from the block's largest magnitude, 8-bit levels), as
    in the default target's GGUF."""

    def blocks_of(weight):
        return weight.reshape(weight.shape[0], -1, 32)

    def q4_1(weight):
        blocks = blocks_of(weight)
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        scale, minimum = ((high - low) / 15).half().float(), low.half().float()
        levels = torch.where(scale == 0, 0.0, torch.round((blocks - minimum) / scale)).clamp(0, 15)
        return ((scale * levels) + minimum).reshape(weight.shape)

    def q8_0(weight):
        blocks = blocks_of(weight)
        scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        levels = torch.where(scale == 0, 0.0, torch.round(blocks / scale)).clamp(-127, 127)
        return (scale * levels).reshape(weight.shape)

    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight is not embeddings:
                module.weight.copy_(q4_1(module.weight))
        embeddings.copy_(q8_0(embeddings))
    return model


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread than on two that fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer) -> LlamaForCausalLM:
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def launch(monkeypatch):
    """scripts/launch.py, what `make up` runs, imported (nothing started)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "launch.py"
    spec = importlib.util.spec_from_file_location("aerie_launch", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Shortly before pytest-timeout ends a hung test (its stack dump shows threads, not what
    each asyncio task awaits), print every pending task's stack."""
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or 0)
    watchdog = threading.Timer(max(1.0, limit - 20), _print_pending_tasks, args=(item.nodeid,))
    watchdog.daemon = True
    if limit:
        watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def _print_pending_tasks(nodeid: str) -> None:
    print(f"\n+++ {nodeid} still running; pending asyncio tasks:", file=sys.stderr)
    for task in list(asyncio.tasks._all_tasks):  # every loop's tasks; read-only from this thread
        if not task.done():
            task.print_stack(file=sys.stderr)
