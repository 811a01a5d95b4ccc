"""Build the drafter's EAGLE head for a target: the target's config and (frozen) token
embeddings, read straight from its checkpoint without loading the whole model, plus the
head's own weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from aerie_common.cpu_linear import changed_plans, tune_linear_layers
from aerie_common.model_store import pick_device, pick_dtype, resolve_model_dir
from aerie_common.packed_weights import pack_linear_layers, packing_pays, round_to_q8_0
from aerie_common.torch_threads import in_passing_thread
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from aerie_drafter import native_draft
from aerie_drafter.checkpoint import load_head
from aerie_drafter.eagle import EagleConfig, EagleHead

log = logging.getLogger(__name__)

EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight")
# Where other layouts keep them: under a prefix (a multimodal checkpoint's language model),
# or named as GPT-2 ("wte"), GPT-NeoX ("embed_in") and Falcon ("word_embeddings") name them.
EMBEDDING_KEY_ENDINGS = (".embed_tokens.weight", ".wte.weight", ".embed_in.weight", ".word_embeddings.weight")
# Heads shipped with Aerie, by built-in target name (see aerie_common.model_store).
UNTRAINED = "untrained"
SHIPPED_HEADS_DIR = Path(__file__).resolve().parent / "heads"


def load_target_embeddings(model_dir: Path) -> nn.Embedding:
    """The target's token embedding table, from its safetensors files (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = {key: model_dir / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    else:
        path = model_dir / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        with safe_open(str(path), framework="pt") as f:
            files = dict.fromkeys(f.keys(), path)
    keys = [k for k in EMBEDDING_KEYS if k in files] or sorted(
        k for k in files if k.endswith(EMBEDDING_KEY_ENDINGS)
    )
    if not keys:
        raise FileNotFoundError(f"no token embeddings ({' or '.join(EMBEDDING_KEYS)}, ...) in {model_dir}")
    with safe_open(str(files[keys[0]]), framework="pt") as f:
        return nn.Embedding.from_pretrained(f.get_tensor(keys[0]), freeze=True)


def shipped_head(target_model: str) -> Path | None:
    """The head shipped for a built-in target name; None for anything else, including a
    local model directory (``SHIPPED_HEADS_DIR / "/abs/dir"`` would be that directory)."""
    if not target_model or Path(target_model).name != target_model or target_model in (".", ".."):
        return None
    path = SHIPPED_HEADS_DIR / target_model
    return path if (path / "config.json").is_file() else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so that bf16 matmuls
    run at least as fast as fp32 ones instead of being emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_head_dtype(dtype: str, device: str) -> torch.dtype:
    """The head's dtype; "auto" is bf16 on a GPU and on a CPU with native bf16, else fp32
    (head_for_drafting first takes fp32 over int8 copies where the packed kernel runs).
    The head only proposes and the target verifies, so its precision never changes the
    output. On the CPU its matrix-vector products are bound by reading the weights, and
    bf16 halves that: a 2-node draft over 200 tokens took 8.9 ms against 16.4 in fp32 (one
    thread, a 2-core AMD EPYC with AVX512-BF16)."""
    if dtype == "auto" and device.startswith("cpu") and cpu_has_native_bf16():
        return torch.bfloat16
    return pick_dtype(dtype, device)  # the target's rule: bf16 on a GPU, fp32 on a CPU


# An untrained head drafts over the first ids of the target vocabulary only: its drafts
# are noise either way, and a small lm_head keeps each draft step cheap.
UNTRAINED_DRAFT_VOCAB = 8192


def untrained_head(target_config, embed_tokens: nn.Embedding, eagle_version: str, seed: int = 0) -> EagleHead:
    """A randomly initialised head. It drafts poorly, so speculation costs more than it
    saves, but the output stays exactly the target's: the machinery runs end to end."""
    torch.manual_seed(seed)
    draft_vocab = min(UNTRAINED_DRAFT_VOCAB, target_config.vocab_size)
    config = EagleConfig.for_target(target_config, draft_vocab_size=draft_vocab, eagle_version=eagle_version)
    head = EagleHead(config, embed_tokens)
    head.set_vocab_map(torch.arange(draft_vocab))
    return head


def load_drafter_head(
    target_model: str,
    model_cache: Path,
    head_path: str = "",
    device: str = "auto",
    dtype: str = "auto",
    eagle_version: str = "3.1",
) -> tuple[EagleHead, str]:
    """The head for ``target_model``: ``head_path`` if given ("untrained" asks for a random
    one), else the head shipped for a built-in target, else an untrained one. Returns
    (head on its device, where it came from)."""
    model_dir = resolve_model_dir(target_model, model_cache)
    target_config = AutoConfig.from_pretrained(model_dir)
    embed_tokens = load_target_embeddings(model_dir)
    if head_path == UNTRAINED:
        source = None
    else:
        source = Path(head_path).expanduser() if head_path else shipped_head(target_model)
    if source is not None:
        head = load_head(source, embed_tokens, num_target_layers=target_config.num_hidden_layers)
        origin = str(source)
    else:
        log.log(
            logging.INFO if head_path == UNTRAINED else logging.WARNING,
            "no EAGLE head for %s: using an untrained %s head (output stays exact, speculation "
            "will be slower than plain decoding). Set AERIE_DRAFTER_HEAD to a trained head.",
            target_model,
            eagle_version,
        )
        head = untrained_head(target_config, embed_tokens, eagle_version)
        origin = "untrained"
    return head_for_drafting(head, pick_device(device), dtype), origin


def head_for_drafting(head: EagleHead, device: str, dtype: str = "auto") -> EagleHead:
    """The head on ``device``, in eval mode, its weights as AERIE_DRAFTER_DTYPE asks:

    - on a CPU where the packed kernel runs (aerie_common.packed_weights), "auto" and "int8"
      draft in fp32 over copies of the weights rounded to 8-bit blocks (Q8_0, as llama.cpp
      rounds them): a quarter of fp32's bytes, where a step's products are bound by reading
      the weights, the lm_head's 12288 x 576 above all. On 2 cores a tree took 4.8 ms against
      5.9 over exact bf16 copies, and on the 80 MT-bench questions the shipped head accepted
      as much (2.100 against 2.102 tokens a step; docs/benchmarks.md). Its draft steps and
      tree growth then run in C++ (native_draft);
    - else pick_head_dtype's rule."""
    packed = {}
    if device == "cpu" and dtype in ("auto", "int8") and packing_pays():
        head = head.for_drafting(device, torch.float32)
        packed = in_passing_thread(pack_linear_layers, head, only_if_all_pack=True, pack=round_to_q8_0)
    if packed:
        log.info("head's linear layers read from packed weights (format: layers): %s", packed)
        if native_draft.attach(head):
            log.info("head's draft steps and tree growth run in C++")
    else:
        head_dtype = pick_head_dtype("auto" if dtype == "int8" else dtype, device)
        if dtype == "int8":
            log.warning("int8 drafts need the packed kernel on a CPU: drafting in %s", head_dtype)
        head = head.for_drafting(device, head_dtype)
    if device == "cpu":
        tune_for_cpu(head)  # the layers left
    return head


def tune_for_cpu(head: EagleHead) -> None:
    """Multiply each row count of the head's linear layers the way that measures fastest on
    this CPU (aerie_common.cpu_linear), from one row: a draft step runs a handful of rows,
    and the draft's rounding never reaches the output. On a thread of its own, as the
    verifier tunes its target (an idle OpenMP team would slow the caller's later forwards)."""
    plans = in_passing_thread(tune_linear_layers, head, 1)
    log.info(
        "head's linear layers: row counts multiplied another way (rows: kernel, rows): %s",
        changed_plans(plans) or "none",
    )
