"""Load and save EAGLE heads in the published checkpoint layouts.

Official EAGLE-3 (e.g. the heads published with EAGLE-3 for Llama-3.1-8B-Instruct):
    config.json: a Llama config with "architectures": ["LlamaForCausalLMEagle3"],
                 "num_hidden_layers": 1, "draft_vocab_size" and optionally
                 "target_hidden_size"
    weights:     fc.weight, midlayer.{hidden_norm,input_layernorm,
                 post_attention_layernorm}.weight, midlayer.self_attn.{q,k,v,o}_proj.weight,
                 midlayer.mlp.{gate,up,down}_proj.weight, norm.weight, lm_head.weight,
                 d2t (int64), t2d (bool); no embeddings (they come from the target)
    files:       model.safetensors, sharded safetensors with an index, or pytorch_model.bin

speculators: config.json has "speculators_model_type": "eagle3" and the layer's Llama
config under "transformer_layer_config"; weights say "layers.0." for "midlayer.", and
3.1 heads add fc_norm.{0,1,2}.weight with the flags "fc_norm" and "norm_output".

Both flags default to false, so every existing EAGLE-3 checkpoint loads as "3.0". Aerie
saves in the official layout and adds the two flags (and fc_norm weights) for 3.1 heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from torch import nn

from aerie_drafter.eagle import EagleConfig, EagleHead

OFFICIAL_ARCHITECTURE = "LlamaForCausalLMEagle3"
_CONFIG_FIELDS = {
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "draft_vocab_size", "target_hidden_size", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "max_position_embeddings", "hidden_act", "fc_norm", "norm_output", "norm_before_residual",
}  # fmt: skip


def _config_from_dict(raw: dict) -> EagleConfig:
    if "transformer_layer_config" in raw or "speculators_model_type" in raw:  # speculators layout
        flat = dict(raw.get("transformer_layer_config", {}))
        for key in (
            "draft_vocab_size",
            "target_hidden_size",
            "fc_norm",
            "norm_output",
            "norm_before_residual",
        ):
            if key in raw:
                flat[key] = raw[key]
        layer_ids = raw.get("eagle_aux_hidden_state_layer_ids")
    else:
        flat = dict(raw)
        layer_ids = raw.get("eagle_aux_hidden_state_layer_ids")
    rope = flat.get("rope_parameters") or {}
    if "rope_theta" not in flat and "rope_theta" in rope:
        flat["rope_theta"] = rope["rope_theta"]
    values = {k: v for k, v in flat.items() if k in _CONFIG_FIELDS}
    if values.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        values["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    values.setdefault("draft_vocab_size", values.get("vocab_size"))
    extra = {k: v for k, v in raw.items() if k not in _CONFIG_FIELDS}
    return EagleConfig(**values, capture_layer_ids=layer_ids, extra=extra)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(path / name))
        return state
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, sharded safetensors or pytorch_model.bin in {path}")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("layers.0."):
            key = "midlayer." + key[len("layers.0.") :]
        out[key] = value
    return out


def load_head(
    path: str | Path, embed_tokens: nn.Embedding, num_target_layers: int | None = None
) -> EagleHead:
    """Load an EAGLE-3 / 3.1 head; ``embed_tokens`` is the target's embedding table."""
    path = Path(path)
    config = _config_from_dict(json.loads((path / "config.json").read_text()))
    if config.capture_layer_ids is None and num_target_layers is not None:
        from aerie_drafter.eagle import default_capture_layers

        config.capture_layer_ids = default_capture_layers(num_target_layers)
    if embed_tokens.weight.shape != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"target embeddings are {tuple(embed_tokens.weight.shape)}, the head expects "
            f"({config.vocab_size}, {config.hidden_size}): is this head for this target?"
        )
    head = EagleHead(config, embed_tokens)
    state = _normalise_keys(_read_state_dict(path))
    state.pop("embed_tokens.weight", None)  # always the target's own
    expected = {k for k in head.state_dict() if not k.startswith(("embed_tokens.", "rotary_emb."))}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the head: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    head.load_state_dict(state, strict=False)
    return head


def save_head(head: EagleHead, path: str | Path, max_shard_size: str = "15MB") -> None:
    """Save in the official EAGLE-3 layout, safetensors sharded under ``max_shard_size``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = head.config
    config = {
        **{k: v for k, v in cfg.extra.items() if k not in ("architectures",)},
        "architectures": [OFFICIAL_ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "tie_word_embeddings": False,
        "torch_dtype": str(head.lm_head.weight.dtype).removeprefix("torch."),
        "fc_norm": cfg.fc_norm,
        "norm_output": cfg.norm_output,
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": list(cfg.capture_layer_ids) if cfg.capture_layer_ids else None,
    }
    state = {
        k: v.contiguous()
        for k, v in head.state_dict().items()
        if not k.startswith(("embed_tokens.", "rotary_emb."))
    }
    save_torch_state_dict(state, path, max_shard_size=max_shard_size)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
