"""GrowingCache gives the logits of a DynamicCache bitwise, through prefill, plain steps,
tree verifications with their pruning, and buffer growth, without copying the cache."""

from __future__ import annotations

import pytest
import torch
from aerie_common import cpu_extension
from aerie_common.draft_tree import DraftTree
from aerie_verifier import kv_cache
from aerie_verifier.cpu_kernels import speed_up_tree_verification
from aerie_verifier.kv_cache import GrowingCache, GrowingLayer
from aerie_verifier.tree_verify import keep_cache_entries, tree_inputs
from transformers import DynamicCache

from tests.conftest import build_tiny_llama

VOCAB = 259
TREE = DraftTree(
    token_ids=[11, 12, 13, 14, 15, 16], parents=[-1, -1, 0, 2, 1, 4], scores=[0, -1, -1, -2, -2, -3]
)


def select_entries(cache, past_len, accepted):
    """The reference pruning: rebuild every layer from the entries kept."""
    keep = torch.tensor([*range(past_len + 1), *(past_len + 1 + i for i in accepted)])
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(2, keep), layer.values.index_select(2, keep)


def decode(model, cache, prompt, prune):
    """Prefill, two plain steps, then trees accepting a moved path, a first-child chain and
    nothing, each pruned by ``prune`` and followed by a plain step; every logit row."""
    rows = [model(prompt, past_key_values=cache).logits[0, -1]]
    for token in (7, 8):
        rows.append(model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1])
    for accepted in ([1, 4, 5], [0, 2, 3], []):
        past = cache.get_seq_length()
        inputs = tree_inputs(40, TREE, past, model.config, "cpu", torch.float32)
        rows.extend(model(**inputs.model_kwargs(), past_key_values=cache).logits[0])
        prune(cache, past, accepted)
        assert cache.get_seq_length() == past + 1 + len(accepted)
        rows.append(model(torch.tensor([[9]]), past_key_values=cache).logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("keep", ["native", "python"])  # keep_cache_entries in C++ or not
@pytest.mark.parametrize("tuned", [False, True])
@pytest.mark.parametrize("capacity", [4, 256])  # 4: the buffers grow on most steps
def test_growing_cache_gives_dynamic_cache_logits_bitwise(monkeypatch, tuned, capacity, keep):
    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", capacity)
    native_keeps = []  # what each C++ keep returned
    native_keep = GrowingCache.keep_entries

    def keep_entries(cache, past_len, accepted):
        if keep == "python":
            return False
        native_keeps.append(native_keep(cache, past_len, accepted))
        return native_keeps[-1]

    monkeypatch.setattr(GrowingCache, "keep_entries", keep_entries)
    model = build_tiny_llama(VOCAB, seed=5)
    if tuned:
        speed_up_tree_verification(model)
    prompt = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = decode(model, DynamicCache(), prompt, select_entries)
        growing = GrowingCache()
        got = decode(model, growing, prompt, keep_cache_entries)
    assert torch.equal(got, expected)
    assert all(isinstance(layer, GrowingLayer) for layer in growing.layers)
    assert native_keeps == ([True] * 3 if keep == "native" and cpu_extension.load() else [])


def test_appending_writes_in_place_until_the_buffer_doubles():
    layer = GrowingLayer()
    keys = torch.arange(2 * 3 * 300 * 4, dtype=torch.float32).reshape(2, 3, 300, 4)
    k, v = layer.update(keys[:, :, :200], -keys[:, :, :200])
    buffer = layer._key_buffer
    assert buffer.shape[2] == 256
    k, v = layer.update(keys[:, :, 200:256], -keys[:, :, 200:256])
    assert layer._key_buffer is buffer and k.data_ptr() == buffer.data_ptr()
    k, v = layer.update(keys[:, :, 256:], -keys[:, :, 256:])
    assert layer._key_buffer.shape[2] == 512
    assert torch.equal(k, keys) and torch.equal(v, -keys)
    assert layer.get_seq_length() == 300


def test_crop_shortens_and_rejects_a_positive_count():
    layer = GrowingLayer()
    keys = torch.randn(1, 2, 10, 4)
    layer.update(keys, keys)
    layer.crop(-3)
    assert layer.get_seq_length() == 7 and torch.equal(layer.keys, keys[:, :, :7])
    layer.crop(0)
    assert layer.get_seq_length() == 7
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)
    k, _ = layer.update(keys[:, :, :1], keys[:, :, :1])
    assert torch.equal(k[:, :, 7], keys[:, :, 0])
