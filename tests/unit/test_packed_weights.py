"""Linear layers read from exact packed copies of their weights (aerie_common.packed_weights).

The weights here are made as a GGUF's unpack: random levels and fp16 scales, unpacked the
way gguf-py does (``(scale * q) + minimum`` in fp32). As llama.cpp quantises, every block
has its extreme levels (a block's scale comes from its range). The kernel is built on
first use."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from aerie_common import cpu_extension
from aerie_common.packed_weights import (
    BF16,
    MAX_PACKED_ROWS,
    Q4_1,
    Q8_0,
    PackedLinear,
    fused_projection,
    pack_linear_layers,
    pack_weight,
    round_to_q8_0,
)
from aerie_verifier.cpu_kernels import speed_up_tree_verification
from torch import nn
from transformers import LlamaForCausalLM

from tests.conftest import build_tiny_llama, quantize_like_gguf

BLOCK = 32


def q4_1_weight(rows: int, cols: int, seed: int = 0, step: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blocks = cols // BLOCK
    levels = torch.randint(0, 16, (rows, blocks, BLOCK), generator=g).float()
    levels[..., 3], levels[..., 20] = 0, 15
    scale = (torch.rand(rows, blocks, 1, generator=g) * step).half().float()
    minimum = (-torch.rand(rows, blocks, 1, generator=g) * 8 * step).half().float()
    return ((scale * levels) + minimum).reshape(rows, cols)


def q8_0_weight(rows: int, cols: int, seed: int = 0, step: float = 0.001) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(-127, 128, (rows, cols // BLOCK, BLOCK), generator=g).float()
    levels[..., 9] = 127
    scale = (torch.rand(rows, cols // BLOCK, 1, generator=g) * step).half().float()
    return (scale * levels).reshape(rows, cols)


def bf16_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 0.02).bfloat16().float()


MAKERS = {Q4_1: q4_1_weight, Q8_0: q8_0_weight, BF16: bf16_weight}


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        return {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":")[1].split()}


def without_avx512():
    """The kernel built without AVX-512: its AVX2 path on an AVX-512 CPU. Elsewhere the flag
    changes nothing, and a second build of the same code would only cost minutes."""
    if "avx512f" in cpu_flags():
        return cpu_extension.build(("-mno-avx512f",))
    return cpu_extension.load()


# The kernel as the engine builds it for this CPU, and built without AVX-512 (the portable
# path on a CPU with neither).
BUILDS = {"native": cpu_extension.load, "without_avx512": without_avx512}


def test_the_kernel_is_built_here_with_a_vectorised_path_where_the_cpu_has_one():
    # The project's machines have a C++ compiler (make setup installs g++); the tests below
    # run its portable path where the CPU has neither AVX-512 nor AVX2, and the engine then
    # leaves it out.
    flags = cpu_flags()
    assert BUILDS["native"]().vectorised() == bool(flags & {"avx512f", "avx2"})
    assert BUILDS["without_avx512"]().vectorised() == ({"avx2", "fma"} <= flags)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt", [Q4_1, Q8_0, BF16])
def test_each_format_packs_exactly_and_multiplies_as_fp32(fmt, build):
    weight = MAKERS[fmt](96, 160)
    packed = pack_weight(weight)
    assert packed is not None and packed.format == fmt
    assert torch.equal(packed.unpack(), weight)  # bit for bit
    multiply = getattr(BUILDS[build](), f"{fmt}_linear")
    for rows in (1, 2, 3, 4, 5, 9, 16):
        x = torch.randn(rows, 160)
        torch.testing.assert_close(multiply(x, *packed.tensors), F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt", [Q4_1, Q8_0, BF16])
def test_the_kernel_unpacks_the_very_fp32_weights(fmt, build):
    # x = a row of the identity picks out one column of W: w * 1 plus zeros, exact in any
    # order of summation, so this checks the kernel's unpacking bit for bit.
    weight = MAKERS[fmt](40, 128, seed=3)
    packed = pack_weight(weight)
    multiply = getattr(BUILDS[build](), f"{fmt}_linear")
    columns = torch.cat([multiply(rows, *packed.tensors) for rows in torch.eye(128).split(MAX_PACKED_ROWS)])
    assert torch.equal(columns.T, weight)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("fmt", [Q4_1, Q8_0, BF16])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(fmt, build):
    packed = pack_weight(MAKERS[fmt](64, 256))
    multiply = getattr(BUILDS[build](), f"{fmt}_linear")
    x = torch.randn(11, 256)
    together = multiply(x, *packed.tensors)
    alone = torch.cat([multiply(x[i : i + 1], *packed.tensors) for i in range(11)])
    assert torch.equal(together, alone)


def test_rounding_to_q8_0_keeps_exact_q8_0_weights_and_rounds_others_to_half_a_level():
    exact = q8_0_weight(48, 96, seed=6)
    assert torch.equal(round_to_q8_0(exact).unpack(), exact)
    weight = torch.randn(48, 96)
    rounded = round_to_q8_0(weight)
    assert rounded.format == Q8_0 and rounded.tensors[0].dtype == torch.int8
    scale = rounded.tensors[1].repeat_interleave(BLOCK, dim=1)
    # half a level from each weight, a block's largest one level at most (its fp16 scale
    # may round down, and the level is clamped to 127)
    assert ((rounded.unpack() - weight).abs() <= scale * 0.5 + 1e-7).float().mean() > 0.99
    assert ((rounded.unpack() - weight).abs() <= scale * 1.01).all()
    assert round_to_q8_0(torch.randn(8, 40)) is None  # rows not made of 32-weight blocks


def test_weights_that_are_not_exactly_packable_stay_unpacked():
    assert pack_weight(torch.randn(32, 64)) is None  # arbitrary fp32 values
    assert pack_weight(q4_1_weight(32, 64)[:, :48].contiguous()) is None  # rows not made of 32-weight blocks
    assert pack_weight(q4_1_weight(8, 64).half()) is None  # not fp32
    nudged = q4_1_weight(32, 64)
    nudged[5, 7] = torch.nextafter(nudged[5, 7], torch.tensor(1.0))
    packed = pack_weight(nudged)
    # one weight off the Q4_1 grid: not Q4_1; it may still be bf16 or Q8_0, but exact
    assert packed is None or torch.equal(packed.unpack(), nudged)
    assert packed is None or packed.format != Q4_1


def test_a_packed_layer_hands_larger_products_and_training_to_the_fp32_weights():
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(q4_1_weight(48, 64))
    layer = PackedLinear(linear, pack_weight(linear.weight))
    prefill = torch.randn(1, MAX_PACKED_ROWS + 1, 64)
    assert torch.equal(layer(prefill), F.linear(prefill, linear.weight, linear.bias))
    step = torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(step), linear(step), rtol=1e-5, atol=1e-5)
    trained = torch.randn(2, 64, requires_grad=True)
    layer(trained).sum().backward()  # the kernel has no backward: the fp32 path takes it
    assert trained.grad is not None


def gguf_like_llama(seed: int = 0) -> LlamaForCausalLM:
    return quantize_like_gguf(build_tiny_llama(256, seed=seed, layers=2))


def test_a_gguf_like_model_packs_every_projection_and_decodes_the_same():
    reference = gguf_like_llama()
    model = gguf_like_llama()
    assert pack_linear_layers(model, only_where_vectorised=False) == {
        Q4_1: 14,
        Q8_0: 1,
    }  # 7 projections a layer, and the output
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference.generate(prompt, max_new_tokens=24, do_sample=False)
        got = model.generate(prompt, max_new_tokens=24, do_sample=False)
        assert torch.equal(got, expected)
        step = model(got[:, :-1]).logits[:, -1:]  # prefill rows: fp32 weights
        assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
        torch.testing.assert_close(step, reference(got[:, :-1]).logits[:, -1:], rtol=1e-4, atol=1e-4)


def test_the_engine_packs_its_target_unless_told_not_to():
    packed, unpacked = gguf_like_llama(), gguf_like_llama()
    speed_up_tree_verification(packed)
    speed_up_tree_verification(unpacked, packed_weights=False)
    # only where the kernel is vectorised (AVX-512 or AVX2, as on the project's machines)
    assert (
        isinstance(packed.model.layers[1].self_attn.o_proj, PackedLinear) == cpu_extension.load().vectorised()
    )
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())


def test_all_or_none_packs_nothing_when_one_layer_does_not_pack():
    model = gguf_like_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # off the Q4_1 grid
    assert pack_linear_layers(model, only_where_vectorised=False, only_if_all_pack=True) == {}
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert pack_linear_layers(model, only_where_vectorised=False)["unpacked"] == 1


@pytest.mark.parametrize("biased", [False, True], ids=["without-bias", "with-bias"])
def test_fused_projections_give_each_layers_own_output(biased):
    """q/k/v or gate/up as one product: each output is its layer's own, bit for bit, biases
    (Qwen2's q/k/v) included; a layer with a bias beside one without does not fuse."""
    layers = []
    for seed, rows in enumerate((64, 32, 32)):
        linear = nn.Linear(64, rows, bias=biased)
        with torch.no_grad():
            linear.weight.copy_(bf16_weight(rows, 64, seed=seed))
        layers.append(PackedLinear(linear, pack_weight(linear.weight)))
    fused = fused_projection(layers)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for got, layer in zip(fused(x), layers, strict=True):
            assert torch.equal(got, layer(x))
    assert (fused.bias is not None) == biased
    unbiased = PackedLinear(nn.Linear(64, 32, bias=not biased), pack_weight(bf16_weight(32, 64, seed=9)))
    assert fused_projection([layers[0], unbiased]) is None


def test_a_changed_header_changes_the_build_flags_so_the_kernels_rebuild(monkeypatch, tmp_path):
    """torch rebuilds an extension when a source file or a flag changes, not a header."""
    import shutil

    from torch.utils import cpp_extension

    package = tmp_path / "aerie_common"
    shutil.copytree(Path(cpu_extension.__file__).with_name("csrc"), package / "csrc")
    monkeypatch.setattr(cpu_extension, "__file__", str(package / "cpu_extension.py"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    flags = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: flags.append(kwargs["extra_cflags"]))
    cpu_extension.build()
    cpu_extension.build()
    with (package / "csrc" / "kernels.h").open("a") as header:
        header.write("\n// changed\n")
    cpu_extension.build()
    assert flags[0] == flags[1] != flags[2]
