"""The head's drafting in C++ on a CPU (aerie_common/csrc/eagle_draft.cpp).

A draft on 2 cores spent about half its time in Python: some hundred small tensor
operations a head step (norms, rotary angles, masks, the pool's bookkeeping), each with
its dispatch, around about 1.5 ms of products. The C++ head runs the same ATen operations
in the same order (EagleHead.fuse and forward, proposer.grow_tree), so its trees are the
same bit for bit (tests/unit/test_native_draft.py); DraftSession uses it where it applies
and the Python elsewhere (a GPU, an unpacked head, a step of more than MAX_PACKED_ROWS rows,
which the Python multiplies with the fp32 weights).
"""

from __future__ import annotations

import logging
import weakref

import torch
from aerie_common import cpu_extension
from aerie_common.packed_weights import MAX_PACKED_ROWS, PackedLinear, fused_projection, native_projection
from transformers.activations import SiLUActivation

from aerie_drafter.eagle import EagleHead

log = logging.getLogger(__name__)

# The C++ head of each head that has one (``attach``), looked up by the head's sessions; weak,
# so a head and its C++ twin go together.
_attached: weakref.WeakKeyDictionary[EagleHead, object] = weakref.WeakKeyDictionary()


def attach(head: EagleHead) -> bool:
    """Give ``head``'s draft sessions the C++ drafting head, where it applies
    (``native_draft_head``); whether it does. Call it once ``head`` is where it will draft."""
    native = native_draft_head(head)
    if native is None:
        detach(head)
        return False
    _attached[head] = native
    return True


def detach(head: EagleHead) -> None:
    """Let ``head``'s new draft sessions draft in Python (the benchmarks compare the two)."""
    _attached.pop(head, None)


def attached(head: EagleHead):
    """The C++ drafting head ``attach`` gave ``head``, or None."""
    return _attached.get(head)


def native_draft_head(head: EagleHead):
    """The C++ drafting head over ``head``'s weights, where every linear layer of ``head``
    is a bias-free PackedLinear (as loading.head_for_drafting leaves them on a CPU where the
    packed kernel runs), its norms are fp32, its activation SiLU and its rotary angles do not
    change with the context length; else None. Fuses q/k/v and gate/up in passing (the
    layers then read the fused copy: the same values)."""
    extension = cpu_extension.load()
    layer = head.midlayer
    attention, mlp = layer.self_attn, layer.mlp
    linears = [head.fc, attention.o_proj, mlp.down_proj, head.lm_head]
    rope_type = getattr(head.rotary_emb, "rope_type", "default")
    if (
        extension is None
        or head.fc.weight.device.type != "cpu"
        or not all(type(linear) is PackedLinear and linear.bias is None for linear in linears)
        or head.norm.weight.dtype != torch.float32
        or type(mlp.act_fn) is not SiLUActivation
        or "dynamic" in rope_type
        or "longrope" in rope_type
    ):
        return None
    qkv = fused_projection([attention.q_proj, attention.k_proj, attention.v_proj])
    gate_up = fused_projection([mlp.gate_proj, mlp.up_proj])
    if qkv is None or gate_up is None:
        return None

    config = head.config
    return extension.EagleDraftHead(
        fc_norms=[norm.weight for norm in head.fc_norm] if head.fc_norm is not None else [],
        fc=native_projection(head.fc),
        hidden_norm=layer.hidden_norm.weight,
        input_norm=layer.input_layernorm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        final_norm=head.norm.weight,
        eps=config.rms_norm_eps,
        qkv=native_projection(qkv),
        o=native_projection(attention.o_proj),
        gate_up=native_projection(gate_up),
        down=native_projection(mlp.down_proj),
        lm_head=native_projection(head.lm_head),
        embed_tokens=head.embed_tokens.weight,
        d2t=head.d2t,
        inv_freq=head.rotary_emb.inv_freq,
        attention_scaling=float(head.rotary_emb.attention_scaling),
        num_heads=attention.num_heads,
        num_kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim,
        norm_output=config.norm_output,
        norm_before_residual=config.norm_before_residual,
    )


def handles(rows: int) -> bool:
    """Whether the C++ head takes a step over ``rows`` rows: the Python multiplies more rows
    with the fp32 weights, not the packed ones, and the C++ keeps to the Python's results."""
    return rows <= MAX_PACKED_ROWS
