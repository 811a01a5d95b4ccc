"""The target's linear layers read from exact packed copies of their weights, on the CPU.

A decoding step of a few tokens reads every weight of the model once, so on a CPU its
products take about as long as the weights take to come from memory (SmolLM2-135M in
fp32: 540 MB a step). Many checkpoints hold far fewer distinct values than fp32 can:
the default target comes from a GGUF whose layers are Q4_1 blocks (32 weights sharing an
fp16 scale and minimum, 4 bits each) and whose output projection is Q8_0, and most Hugging
Face checkpoints are bf16. transformers unpacks them into fp32 tensors on loading.

``pack_linear_layers`` finds, for each linear layer of the target, a packed form whose
unpacking gives back every fp32 weight bit for bit (it checks all of them; a layer that
does not pack exactly stays as it was), and wraps the layer in ``PackedLinear``: up to
MAX_PACKED_ROWS rows (the plain steps, tree verifications and small batches) are
multiplied by a kernel that unpacks each weight row in registers and multiplies in fp32
(csrc/packed_linear.cpp, built on first use: cpu_extension.py). Larger products (a
prefill) keep MKL on the fp32 weights.

So the model computes the same function with the same weights; only the order in which a
dot product is summed differs from MKL's, as between any two BLAS kernels. Unlike BLAS, the
kernel sums every output element in one order whatever the number of rows, so a token's
logits do not depend on the tree or batch around it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aerie_common import cpu_extension

log = logging.getLogger(__name__)

BLOCK = 32  # weights sharing a scale in GGUF's Q4_1 and Q8_0
# Up to this many rows go to the packed kernel; more (a prefill) to MKL on the fp32 weights,
# which is faster once a product has enough rows to be bound by arithmetic, not memory.
MAX_PACKED_ROWS = 16
Q4_1, Q8_0, BF16 = "q4_1", "q8_0", "bf16"


@dataclass(frozen=True)
class PackedWeight:
    """A weight in one of the packed formats: ``tensors`` are the kernel's arguments."""

    format: str
    tensors: tuple[torch.Tensor, ...]

    def unpack(self) -> torch.Tensor:
        """The fp32 weight, computed as the kernel computes it (and as gguf-py did)."""
        if self.format == BF16:
            return self.tensors[0].float()
        if self.format == Q8_0:
            qs, scale = self.tensors
            return (scale[..., None] * qs.view(*scale.shape, BLOCK).float()).flatten(1)
        qs, scale, minimum = self.tensors
        # a block's weight j is in the low half of its byte j, weight j + 16 in the high half
        qs = qs.view(*scale.shape, BLOCK // 2)
        levels = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        return ((scale[..., None] * levels) + minimum[..., None]).flatten(1)


def pack_q4_1(weight: torch.Tensor) -> PackedWeight | None:
    """The weight as Q4_1 blocks (w = scale * q + minimum, q in 0..15, scale and minimum
    fp16 values), if every weight is exactly such a value; else None."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    minimum = blocks.amin(-1)  # the block's smallest weight has q = 0 and is the minimum itself
    spread = blocks.amax(-1) - minimum  # its largest has q = 15
    scale = _fp16_scale(spread / 15)
    levels = _q4_1_levels(blocks, scale, minimum)
    if not torch.equal((scale[..., None] * levels) + minimum[..., None], blocks):
        return None
    nibbles = levels.to(torch.uint8).view(*scale.shape, 2, BLOCK // 2)
    qs = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).flatten(1).contiguous()
    return PackedWeight(Q4_1, (qs, scale.contiguous(), minimum.contiguous()))


def pack_q8_0(weight: torch.Tensor) -> PackedWeight | None:
    """The weight as Q8_0 blocks (w = scale * q, q in -128..127, scale an fp16 value), if
    every weight is exactly such a value; else None."""
    rounded = round_to_q8_0(weight)
    return rounded if rounded is not None and torch.equal(rounded.unpack(), weight) else None


def round_to_q8_0(weight: torch.Tensor) -> PackedWeight | None:
    """The weight rounded to Q8_0 blocks as llama.cpp rounds them (each block's scale its
    largest magnitude over 127, in fp16): exact for a weight made of such blocks
    (pack_q8_0), else for a model whose rounding never reaches the output (the drafter's
    head). None where the rows are not 32-weight blocks."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    with torch.no_grad():
        largest = blocks.abs().amax(-1)  # the block's largest magnitude has |q| = 127
        scale = _fp16_scale(largest / 127)
        levels = _q8_0_levels(blocks, scale)
    return PackedWeight(Q8_0, (levels.to(torch.int8).flatten(1).contiguous(), scale.contiguous()))


def pack_bf16(weight: torch.Tensor) -> PackedWeight | None:
    """The weight in bf16, if every weight is a bf16 value; else None."""
    if _blocks(weight) is None:
        return None
    packed = weight.detach().to(torch.bfloat16)
    return PackedWeight(BF16, (packed,)) if torch.equal(packed.float(), weight) else None


def pack_weight(weight: torch.Tensor) -> PackedWeight | None:
    """The smallest exact packed form of an fp32 weight, or None."""
    with torch.no_grad():
        for pack in (pack_q4_1, pack_q8_0, pack_bf16):
            packed = pack(weight.detach())
            if packed is not None:
                return packed
    return None


def _blocks(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK:
        return None
    return weight.detach().reshape(weight.shape[0], -1, BLOCK)


def _fp16_scale(estimate: torch.Tensor) -> torch.Tensor:
    """Each block's scale as the fp16 value it was stored as: the estimate (from the
    block's extreme weights) is within an fp32 rounding of it."""
    return estimate.half().float()


def _q4_1_levels(blocks, scale, minimum):
    levels = torch.round((blocks - minimum[..., None]) / scale[..., None])
    # a block of equal weights has scale 0: every q is 0
    return torch.where(scale[..., None] == 0, 0.0, levels).clamp(0, 15)


def _q8_0_levels(blocks, scale):
    levels = torch.round(blocks / scale[..., None])
    return torch.where(scale[..., None] == 0, 0.0, levels).clamp(-128, 127)


class PackedLinear(nn.Module):
    """A linear layer that multiplies up to MAX_PACKED_ROWS rows with its packed weight, and
    more with its fp32 weight (kept, and shared: a tied output projection stays tied)."""

    def __init__(self, linear: nn.Linear, packed: PackedWeight):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = packed
        self._multiply = getattr(cpu_extension.load(), f"{packed.format}_linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() > MAX_PACKED_ROWS or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        out = self._multiply(x, *self.packed.tensors)
        return out if self.bias is None else out + self.bias


def pack_linear_layers(
    model, only_where_vectorised: bool = True, only_if_all_pack: bool = False, pack=pack_weight
) -> dict[str, int]:
    """Wrap each fp32 linear layer of a CPU model whose weight packs exactly in PackedLinear
    (in place; ``pack``: round_to_q8_0 packs them inexactly). Returns how many layers took
    each format (``unpacked``: the others), or {} where the kernel is not available, or not
    vectorised on this CPU and ``only_where_vectorised`` (its portable path is correct but
    slower than MKL; it logs why), or some layer does not pack and ``only_if_all_pack``
    (then none is wrapped)."""
    module = cpu_extension.load()
    if module is None:
        return {}
    if only_where_vectorised and not packing_pays():
        log.warning("packed-weight kernel has no vectorised path for this CPU (AVX-512 or AVX2); not used")
        return {}
    layers = [
        (parent, name, child, pack(child.weight))
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if type(child) is nn.Linear
    ]
    if only_if_all_pack and (not layers or any(packed is None for *_, packed in layers)):
        return {}
    counts: dict[str, int] = {}
    for parent, name, child, packed in layers:
        if packed is None:
            counts["unpacked"] = counts.get("unpacked", 0) + 1
            continue
        setattr(parent, name, PackedLinear(child, packed))
        counts[packed.format] = counts.get(packed.format, 0) + 1
    return counts


def packing_pays() -> bool:
    """Whether the packed kernel is built and vectorised here (AVX-512 or AVX2): elsewhere its
    portable path is correct but slower than MKL."""
    module = cpu_extension.load()
    return module is not None and module.vectorised()


@dataclass(frozen=True)
class FusedProjection:
    """Several projections of one input (q, k and v; gate and up) as one kernel call: the
    outputs, split apart, are each layer's own bit for bit (rows of W are summed alone)."""

    format: str
    tensors: tuple[torch.Tensor, ...]  # the layers' packed tensors, concatenated
    sizes: tuple[int, ...]  # each layer's output features
    layers: tuple[nn.Module, ...]
    bias: torch.Tensor | None = None  # the layers' biases, concatenated (Qwen2's q/k/v)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[:-1].numel() > MAX_PACKED_ROWS:
            return tuple(layer(x) for layer in self.layers)
        out = self.layers[0]._multiply(x, *self.tensors)
        if self.bias is not None:  # added as PackedLinear adds each layer's own
            out = out + self.bias
        return out.split(self.sizes, dim=-1)


def fused_projection(layers: list[nn.Module]) -> FusedProjection | None:
    """The layers as one FusedProjection, when all are PackedLinear of one format, with a
    bias each or none; they then read their weights from the fused copy, so memory is not
    doubled. None when they cannot be fused."""
    if not layers or not all(type(layer) is PackedLinear for layer in layers):
        return None
    formats = {layer.packed.format for layer in layers}
    biased = {layer.bias is not None for layer in layers}
    if len(formats) != 1 or len(biased) != 1:
        return None
    fused = tuple(torch.cat(parts) for parts in zip(*(layer.packed.tensors for layer in layers), strict=True))
    sizes = tuple(layer.weight.shape[0] for layer in layers)
    start = 0
    for layer, size in zip(layers, sizes, strict=True):
        layer.packed = PackedWeight(layer.packed.format, tuple(t[start : start + size] for t in fused))
        start += size
    bias = torch.cat([layer.bias.detach() for layer in layers]) if biased.pop() else None
    return FusedProjection(formats.pop(), fused, sizes, tuple(layers), bias)


def native_projection(part: PackedLinear | FusedProjection):
    """A packed layer, or several fused, as the C++ kernels' Projection (csrc/kernels.h),
    for the loops that run in C++ (lean_layers.cpp, eagle_draft.cpp). Needs the kernels."""
    projection = cpu_extension.load().Projection
    if isinstance(part, FusedProjection):
        return projection(part.format, list(part.tensors), list(part.sizes), part.bias)
    return projection(part.packed.format, list(part.packed.tensors), [], part.bias)
