"""The EAGLE-3 / EAGLE 3.1 draft head.

Data flow for one draft position t (H = hidden size):

    target features at t: low, mid, high layer inputs   3 x [Ht]
      3.1 only: RMSNorm each (fc_norm.0/1/2)             (fixes attention drift)
      fc: concat -> [3Ht] -> [H]                          = g_t
    or, at later draft steps, the head's own output for t-1
    midlayer: [input_layernorm(embed(x_{t+1})) , hidden_norm(g_t)] -> attention (2H in)
              -> o_proj -> +residual -> post_attention_layernorm -> MLP -> +residual = h_t
    logits over the draft vocabulary = lm_head(norm(h_t)), predicting x_{t+2}
    fed to the next step: h_t (3.0) or norm(h_t) (3.1, "norm_output")

The token embedding is the target's own table, frozen. Draft-vocabulary ids map to target
ids by ``target = draft + d2t[draft]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

EAGLE_VERSIONS = ("3.0", "3.1")


def default_capture_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's convention: the residual stream entering layers 2, N//2 and N-3."""
    n = num_target_layers
    return (2, n // 2, n - 3)


@dataclass
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    target_hidden_size: int | None = None  # defaults to hidden_size
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    # 3.1: RMSNorm each captured state before the fc, and feed the normed output onward.
    fc_norm: bool = False
    norm_output: bool = False
    # speculators' variant: hidden_norm applied before the residual is taken.
    norm_before_residual: bool = False
    capture_layer_ids: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)  # unknown config.json fields, kept on save

    def __post_init__(self) -> None:
        self.target_hidden_size = self.target_hidden_size or self.hidden_size
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.capture_layer_ids is not None:
            self.capture_layer_ids = tuple(int(i) for i in self.capture_layer_ids)
            if len(self.capture_layer_ids) != 3:
                raise ValueError(f"EAGLE-3 captures exactly 3 layers, got {self.capture_layer_ids}")

    @property
    def eagle_version(self) -> str:
        if self.fc_norm and self.norm_output:
            return "3.1"
        if not self.fc_norm and not self.norm_output:
            return "3.0"
        return f"custom(fc_norm={self.fc_norm}, norm_output={self.norm_output})"

    @classmethod
    def for_target(
        cls, target_config, draft_vocab_size: int, eagle_version: str = "3.1", **overrides
    ) -> EagleConfig:
        """A head shaped like one layer of the target, as EAGLE-3 heads are (a Llama layer:
        for a target without grouped KV heads, RMSNorm or a named MLP width, such as GPT-2,
        as many KV heads as heads, a 4x MLP and the usual epsilon)."""
        if eagle_version not in EAGLE_VERSIONS:
            raise ValueError(f"eagle_version must be one of {EAGLE_VERSIONS}, got {eagle_version!r}")
        is_31 = eagle_version == "3.1"
        rope = getattr(target_config, "rope_parameters", None) or {}
        values = dict(
            hidden_size=target_config.hidden_size,
            intermediate_size=getattr(target_config, "intermediate_size", None)
            or 4 * target_config.hidden_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", None)
            or target_config.num_attention_heads,
            vocab_size=target_config.vocab_size,
            draft_vocab_size=draft_vocab_size,
            head_dim=getattr(target_config, "head_dim", None),
            rms_norm_eps=getattr(target_config, "rms_norm_eps", None) or 1e-6,
            rope_theta=rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)),
            max_position_embeddings=getattr(target_config, "max_position_embeddings", None) or 2048,
            fc_norm=is_31,
            norm_output=is_31,
            capture_layer_ids=default_capture_layers(target_config.num_hidden_layers),
        )
        values.update(overrides)
        return cls(**values)

    def llama_config(self) -> LlamaConfig:
        """The equivalent LlamaConfig, for the transformers building blocks reused here."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope.setdefault("rope_type", rope.get("type", "default"))
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            vocab_size=self.vocab_size,
            rope_parameters=rope,
        )


def causal_mask(new: int, past: int, device, dtype) -> torch.Tensor:
    """Additive [1, 1, new, past+new] mask: each new position sees the whole past, itself
    and the new positions before it (aligned bottom-right, unlike SDPA's is_causal)."""
    allowed = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))[
        None, None
    ]


class EagleAttention(nn.Module):
    """Llama attention whose q/k/v read the 2H concatenation [embedding, hidden]."""

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        in_features = 2 * config.hidden_size
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past_kv):
        """x: [B, T, 2H]; mask: additive [B, 1, T, S+T], or None for causal; past_kv: (k, v) of shape [B, KVH, S, D] or None.
        Returns the output and this call's new (k, v)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if mask is None and t > 1:
            mask = causal_mask(t, k.shape[2] - t, x.device, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), new_kv


class EagleDecoderLayer(nn.Module):
    def __init__(self, config: EagleConfig):
        super().__init__()
        llama = config.llama_config()
        self.self_attn = EagleAttention(config)
        self.mlp = LlamaMLP(llama)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_before_residual = config.norm_before_residual

    def forward(self, embeds, hidden, cos, sin, mask, past_kv):
        if self.norm_before_residual:
            hidden = self.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = self.hidden_norm(hidden)
        x = torch.cat([self.input_layernorm(embeds), hidden], dim=-1)
        attn, new_kv = self.self_attn(x, cos, sin, mask, past_kv)
        hidden = residual + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, new_kv


class EagleHead(nn.Module):
    def __init__(self, config: EagleConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.embed_tokens.weight.requires_grad_(False)
        th = config.target_hidden_size
        self.fc_norm = (
            nn.ModuleList(LlamaRMSNorm(th, eps=config.rms_norm_eps) for _ in range(3))
            if config.fc_norm
            else None
        )
        self.fc = nn.Linear(3 * th, config.hidden_size, bias=False)
        self.midlayer = EagleDecoderLayer(config)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config.llama_config())
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    def for_drafting(self, device: str | torch.device, dtype: torch.dtype) -> EagleHead:
        """The head on ``device`` in ``dtype``, in eval mode. The rotary frequencies stay
        fp32, as they are in training (under autocast): cast to bf16 they would turn a
        position's angles by about 0.1 rad at position 300, and more further on."""
        frequencies = {name: buf.detach().clone() for name, buf in self.rotary_emb.named_buffers()}
        self.to(device=device, dtype=dtype)
        for name, buf in frequencies.items():
            setattr(self.rotary_emb, name, buf.to(device))
        return self.eval()

    def set_vocab_map(self, draft_to_target: torch.Tensor) -> None:
        """Set d2t/t2d from the target ids of the draft vocabulary, in draft-id order."""
        ids = draft_to_target.to(torch.long)
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def fuse(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[.., 3*Ht] captured low|mid|high states -> [.., H]."""
        if self.fc_norm is not None:
            parts = target_hidden.chunk(3, dim=-1)
            target_hidden = torch.cat([norm(p) for norm, p in zip(self.fc_norm, parts, strict=True)], dim=-1)
        return self.fc(target_hidden)

    def forward(self, hidden, token_ids, position_ids, mask=None, past_kv=None):
        """One draft step over T positions.

        hidden: [B, T, H] fused target features or the head's own previous outputs;
        token_ids: [B, T] target ids of the *next* tokens; position_ids: [B, T].
        Returns (next_hidden, normed, new_kv): next_hidden feeds the following step,
        normed feeds ``logits``, new_kv holds this call's keys and values.
        """
        embeds = self.embed_tokens(token_ids).to(hidden.dtype)
        cos, sin = self.rotary_emb(hidden, position_ids)
        out, new_kv = self.midlayer(embeds, hidden, cos, sin, mask, past_kv)
        normed = self.norm(out)
        return (normed if self.config.norm_output else out), normed, new_kv

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary."""
        return self.lm_head(normed)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def draft_target_ids(self) -> torch.Tensor:
        """The target ids of the whole draft vocabulary, in draft-id order (what
        ``set_vocab_map`` takes)."""
        return self.to_target_ids(torch.arange(len(self.d2t), device=self.d2t.device))
