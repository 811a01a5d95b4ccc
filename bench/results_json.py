"""Benchmark results as strict JSON. A figure that does not apply is NaN in the benches
(the TTFT of `generate()`, the acceptance of a category with no steps); JSON has no NaN
and strict parsers refuse Python's, so it is written as null. A results object also
records the machine it was measured on (``machine``)."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

# Environment variables that change which kernels run, or how fast.
KERNEL_ENVIRONMENT = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "AERIE_CPU_KERNEL_CFLAGS",
    "OMP_NUM_THREADS",
    "GOMP_SPINCOUNT",
)


def machine() -> dict:
    """The CPU, its logical cores, the GPU if any, torch's version, and any of
    KERNEL_ENVIRONMENT that is set."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "environment": {name: os.environ[name] for name in KERNEL_ENVIRONMENT if name in os.environ},
    }


def strict(value):
    """``value`` with every non-finite float replaced by None, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def write_results(path: Path, value, indent: int = 2) -> None:
    if isinstance(value, dict):
        value = {**value, "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(value), indent=indent, allow_nan=False) + "\n")
