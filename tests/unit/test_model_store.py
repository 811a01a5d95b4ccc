"""Loading the target: the KV cache argument's rename in transformers stays quiet."""

import warnings

import pytest
import torch
from aerie_common.model_store import load_target
from aerie_common.settings import ModelSettings
from transformers import DynamicCache

from tests.conftest import build_tiny_llama


@pytest.fixture(autouse=True)
def restore_warning_filters():
    with warnings.catch_warnings():  # load_target's filter must not outlive the test
        warnings.simplefilter("always")  # a warning shown before must show again
        yield


def test_loading_the_target_quiets_the_cache_argument_rename(tmp_path, tiny_tokenizer):
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _, model_dir = load_target(
        ModelSettings(target_model=str(tmp_path), device="cpu", dtype="float32")
    )
    assert model_dir == tmp_path
    with warnings.catch_warnings(record=True) as caught:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=DynamicCache())
    assert not [w for w in caught if "past_key_values" in str(w.message)]
