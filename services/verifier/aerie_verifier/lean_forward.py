"""The target's decoding steps on the CPU without transformers' per-layer machinery.

Around the arithmetic of a forward, transformers spends time on module calls, decorators,
mask building and cache bookkeeping: on a 2-core Intel Xeon a one-off gpt-fast-style
forward of SmolLM2-135M on the same weights took 25.5 ms for one new token against
transformers' 33.0, with the same logits. The engine's hot forwards are few-token steps
over a request's GrowingCache: the plain step and the tree verification. For those,
``LeanForward`` replaces the inner model's forward with one loop over the decoder layers
that runs the same pieces (transformers' RMSNorm arithmetic, the projections as the
engine tuned them, q/k/v and gate/up in one call each where their weights are packed,
transformers' rotary embedding, in one call where the C++ kernels build, the SDPA call
its attention makes) in the same order, so the logits are the same bit for bit
(tests/unit/test_lean_forward.py). Where every projection is packed (the default target;
q/k/v may carry biases, as Qwen2's do), the loop itself runs in C++
(aerie_common/csrc/lean_layers.cpp), calling the same operations without the Python
between them.
Anything else (a prefill, a batch, another cache, another attention implementation or
architecture) goes to transformers' forward as before.

``HiddenCapture`` hooks the decoder layers, which this loop does not call: it observes
each layer's input through ``observers`` instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from aerie_common import cpu_extension
from aerie_common.packed_weights import FusedProjection, PackedLinear, fused_projection, native_projection
from transformers.activations import SiLUActivation
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from aerie_verifier.attention_mask import sliding_window
from aerie_verifier.kv_cache import GrowingCache

# Architectures whose decoder layer computes exactly as Llama's: pre-norm RMSNorm, attention
# with rotary embeddings, residual, RMSNorm, gated MLP, residual. Qwen2's q/k/v carry
# biases, added after their products as each layer adds its own; Mistral's and Qwen2's
# layers qualify only where each attends to the whole context (no ``sliding_window``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The CPU's serving trees and plain steps, the sizes measured; a larger tree asked for on a
# CPU (AERIE_DRAFT_TREE_*) goes to transformers.
MAX_NEW_TOKENS = 16
# The KV cache's name in a model output: transformers 5.2x renamed `past_key_values` to
# `cache` (in the forwards' arguments too); the GPU machines' 5.17 knows only the old name.
OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"
)


class LeanForward:
    def __init__(self, inner_model):
        from aerie_verifier.cpu_kernels import GROUPED_SDPA  # here: cpu_kernels imports this module

        self.model = inner_model
        self.original = inner_model.forward
        # the name transformers' own forward takes the KV cache by (OUTPUT_CACHE_FIELD)
        takes = inspect.signature(self.original).parameters
        self._cache_argument = "cache" if "cache" in takes else "past_key_values"
        # the attention implementations whose computation the loop reproduces
        self.attention_implementations = ("sdpa", GROUPED_SDPA)
        # Called with (layer index, the layer's input hidden states) on every lean forward.
        self.observers: list[Callable[[int, torch.Tensor], None]] = []
        self._pieces: list[_Layer] | None = None
        # transformers' rotary embedding in one call, where the C++ kernels build
        self._extension = cpu_extension.load()
        self._rotate = self._extension.rotary if self._extension is not None else None
        self._native = None  # the loop in C++, where it applies (built with the pieces)

    def handles(self, input_ids, attention_mask, cache, inputs_embeds, kwargs) -> bool:
        return (
            input_ids is not None
            and inputs_embeds is None
            and isinstance(cache, GrowingCache)
            and input_ids.shape[0] == 1
            and input_ids.shape[1] <= MAX_NEW_TOKENS
            and cache.get_seq_length() > 0
            # one new token needs no mask; more need the caller's (a tree's) 4-D mask
            and (attention_mask is None if input_ids.shape[1] == 1 else attention_mask is not None)
            and (attention_mask is None or attention_mask.dim() == 4)
            and self.model.config._attn_implementation in self.attention_implementations
            and not kwargs.get("output_attentions")
            and not kwargs.get("output_hidden_states")
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if not self.handles(input_ids, attention_mask, cache, inputs_embeds, kwargs):
            return self.original(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{self._cache_argument: cache},
                **kwargs,
            )
        hidden = self.ragged(input_ids, position_ids, [cache], [attention_mask])
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{OUTPUT_CACHE_FIELD: cache})

    def supports_ragged(self) -> bool:
        """Whether ``ragged`` runs this target: its attention is one the loop reproduces."""
        return self.model.config._attn_implementation in self.attention_implementations

    def ragged(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        caches: list[GrowingCache],
        masks: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """The final hidden states [1, T, H] of the new tokens ``input_ids`` [1, T] of one
        request, or of several one after another (a ragged batch, as vLLM flattens one):
        request r owns the next ``masks[r].shape[-2]`` rows (one where its mask is None, a
        plain step) and appends them to ``caches[r]``. The projections take every row at
        once, which costs little more than one row on a CPU; only the attention goes
        request by request. ``position_ids`` None: one request's rows follow its cache."""
        model = self.model
        hidden = model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = (
                torch.arange(input_ids.shape[1], device=hidden.device)[None] + caches[0].get_seq_length()
            )
        cos, sin = model.rotary_emb(hidden, position_ids=position_ids)
        layers = self._layers()
        rows = [1 if mask is None else mask.shape[-2] for mask in masks]
        if self._native is not None and all(len(cache.layers) == len(layers) for cache in caches):
            pasts = [cache.get_seq_length() for cache in caches]
            buffers = [cache.buffers_for(count) for cache, count in zip(caches, rows, strict=True)]
            hidden, layer_inputs, keys, values = self._native.forward(
                hidden,
                cos,
                sin,
                rows,
                masks,
                [keys for keys, _ in buffers],
                [values for _, values in buffers],
                pasts,
                bool(self.observers),
            )
            for cache, cache_keys, cache_values in zip(caches, keys, values, strict=True):
                cache.filled(cache_keys, cache_values)
            for index, layer_input in enumerate(layer_inputs):
                for observe in self.observers:
                    observe(index, layer_input)
            return _rms_norm(hidden, model.norm.weight, model.norm.variance_epsilon)
        rotate = self._rotate
        new_shape = (*hidden.shape[:-1], -1)
        starts = [sum(rows[:r]) for r in range(len(rows) + 1)]
        for index, layer in enumerate(layers):
            for observe in self.observers:
                observe(index, hidden)
            head_shape = (*hidden.shape[:-1], -1, layer.head_dim)
            normed = _rms_norm(hidden, layer.input_norm, layer.eps)
            query, key, value = (p.view(head_shape) for p in layer.qkv_proj(normed))
            # the same values in one call (aerie_common/csrc/rotary.cpp), which takes float32
            if rotate is not None and query.dtype == torch.float32:
                query, key = rotate(query, cos, sin).transpose(1, 2), rotate(key, cos, sin).transpose(1, 2)
            else:
                query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
            value = value.transpose(1, 2)
            attended = []
            for r, (cache, mask) in enumerate(zip(caches, masks, strict=True)):
                own = slice(starts[r], starts[r + 1])  # request r's rows (all of them, for one)
                cached_keys, cached_values = cache.layers[index].update(key[:, :, own], value[:, :, own])
                # What transformers' SDPA attention runs here: one query (no mask) or a tree
                # (its mask), never causal, grouped key/value heads taken as they are.
                attended.append(
                    F.scaled_dot_product_attention(
                        query[:, :, own],
                        cached_keys,
                        cached_values,
                        attn_mask=mask,
                        scale=layer.scaling,
                        enable_gqa=True,
                    )
                )
            attended = attended[0] if len(attended) == 1 else torch.cat(attended, dim=2)
            hidden = hidden + layer.o_proj(attended.transpose(1, 2).reshape(new_shape).contiguous())
            normed = _rms_norm(hidden, layer.post_norm, layer.eps)
            gate, up = layer.gate_up_proj(normed)
            hidden = hidden + layer.down_proj(layer.act(gate) * up)
        return _rms_norm(hidden, model.norm.weight, model.norm.variance_epsilon)

    def _layers(self) -> list[_Layer]:
        """Each decoder layer's pieces, looked up once: attribute lookups through nn.Module
        cost more than the small operations between the products. Built on first use, after
        the engine has tuned the projections (so their ``forward`` is the tuned one)."""
        if self._pieces is None:
            self._pieces = [
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    eps=layer.input_layernorm.variance_epsilon,
                    qkv_proj=_projections(
                        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
                    ),
                    o_proj=layer.self_attn.o_proj.forward,
                    head_dim=layer.self_attn.head_dim,
                    scaling=layer.self_attn.scaling,
                    gate_up_proj=_projections(layer.mlp.gate_proj, layer.mlp.up_proj),
                    down_proj=layer.mlp.down_proj.forward,
                    act=layer.mlp.act_fn,
                )
                for layer in self.model.layers[: self.model.config.num_hidden_layers]
            ]
            self._native = self._native_loop(self._pieces)
        return self._pieces

    def _native_loop(self, pieces: list[_Layer]):
        """The loop in C++ (lean_layers.cpp) over these pieces, where every projection is
        packed (q/k/v and gate/up fused) and the MLP's activation is SiLU; else None."""
        if self._extension is None:
            return None
        native = self._extension.LeanLayers()
        for piece, layer in zip(pieces, self.model.layers, strict=False):
            qkv, gate_up = piece.qkv_proj, piece.gate_up_proj
            o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
            if not (
                isinstance(qkv, FusedProjection)
                and isinstance(gate_up, FusedProjection)
                and all(type(p) is PackedLinear and p.bias is None for p in (o_proj, down_proj))
                and type(piece.act) is SiLUActivation
            ):
                return None
            native.add_layer(
                piece.input_norm,
                piece.post_norm,
                piece.eps,
                native_projection(qkv),
                native_projection(o_proj),
                native_projection(gate_up),
                native_projection(down_proj),
                piece.head_dim,
                piece.scaling,
            )
        return native


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv_proj: Callable  # x -> (q, k, v)
    o_proj: Callable
    head_dim: int
    scaling: float
    gate_up_proj: Callable  # x -> (gate, up)
    down_proj: Callable
    act: Callable


def _projections(*layers) -> Callable:
    """The layers' outputs for one input: one packed kernel call for all of them where they
    fuse (packed_weights.fused_projection; the same values), else one call each."""
    fused = fused_projection(list(layers))
    if fused is not None:
        return fused
    forwards = [layer.forward for layer in layers]
    return lambda x: tuple(forward(x) for forward in forwards)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, operation for operation."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def install_lean_forward(model) -> LeanForward | None:
    """Give a supported target's inner model a LeanForward (in place; once); returns it,
    or None where the architecture is not supported."""
    inner = getattr(model, "model", None)
    config = model.config
    if (
        config.model_type not in SUPPORTED_MODEL_TYPES
        # the loop masks nothing for one token and takes a tree's mask as it comes, as
        # full-attention layers do
        or sliding_window(config) is not None
        or inner is None
    ):
        return None
    lean = getattr(inner, "_aerie_lean_forward", None)
    if lean is None:
        lean = LeanForward(inner)
        inner.forward = lean
        inner._aerie_lean_forward = lean
    return lean
