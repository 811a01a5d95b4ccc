"""Tensors over gRPC: raw little-endian bytes with shape and dtype, split into parts
small enough for one message (see TensorChunk in drafter.proto)."""

from __future__ import annotations

import math

import numpy as np
import torch
from aerie_proto.v1 import drafter_pb2

# Parts stay well under the 64 MiB message limit set in grpc_utils.
CHUNK_BYTES = 8 * 1024 * 1024

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in _DTYPES.items()}


class MalformedTensorError(ValueError):
    pass


def to_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> list[drafter_pb2.TensorChunk]:
    if tensor.dtype not in _NAMES:
        raise MalformedTensorError(f"unsupported dtype {tensor.dtype}")
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    parts = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    chunks = [drafter_pb2.TensorChunk(data=p, more=True) for p in parts]
    chunks[0].shape.extend(tensor.shape)
    chunks[0].dtype = _NAMES[tensor.dtype]
    chunks[-1].more = False
    return chunks


def from_chunks(chunks: list[drafter_pb2.TensorChunk], max_bytes: int = 1 << 31) -> torch.Tensor:
    """Reassemble a tensor, refusing anything whose bytes do not match shape and dtype."""
    if not chunks:
        raise MalformedTensorError("no tensor data")
    head = chunks[0]
    if head.dtype not in _DTYPES:
        raise MalformedTensorError(f"unsupported dtype {head.dtype!r}; expected one of {sorted(_DTYPES)}")
    shape = list(head.shape)
    if any(d < 0 for d in shape):
        raise MalformedTensorError(f"negative dimension in shape {shape}")
    dtype = _DTYPES[head.dtype]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if expected > max_bytes:
        raise MalformedTensorError(f"tensor of {expected} bytes exceeds the {max_bytes}-byte limit")
    data = b"".join(c.data for c in chunks)
    if len(data) != expected:
        raise MalformedTensorError(f"shape {shape} of {head.dtype} needs {expected} bytes, got {len(data)}")
    flat = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.uint8))
    return flat.view(dtype).reshape(shape)
