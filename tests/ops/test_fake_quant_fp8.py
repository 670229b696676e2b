"""fakequant::fake_quant_fp8 on every (device, backend) pair, against the reference and torch's float8 casts
(docs/numerics.md, Float formats)."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from fakequant.formats import ELEMENT_FORMATS
from tests import autograd_reference
from tests.ops._helpers import (
    FLOATS,
    SCALE_MESSAGE,
    assert_bits_equal,
    assert_outputs_like_reference,
    assert_same_error,
    grads,
    kernel_layouts,
    layouts,
    special_values,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_fp8
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FORMATS = tuple(TORCH_FP8)


def torch_cast(x: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    """The issue's definition: ``clamp(x / s, -max, max).to(float8).float() * s``."""
    top = torch.finfo(TORCH_FP8[fmt]).max
    return torch.clamp(x / s, -top, top).to(TORCH_FP8[fmt]).float() * s


def block_scales(x: torch.Tensor, block_size: int, seed: int = 0) -> torch.Tensor:
    blocks = 1 if block_size == 0 else x.numel() // block_size
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(blocks, generator=g) * 0.05 + 2.0**-20).to(x.device)


@pytest.mark.parametrize("fmt", FORMATS)
def test_values(device, fmt):
    top = ELEMENT_FORMATS[fmt].max
    x = torch.tensor([0.3, -0.3, 1000.0, float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e6], device=device)
    out, mask = OP(x, torch.ones(1, device=device), fmt)
    assert out[2].item() == min(top, 1024.0) and out[3].item() == top and out[4].item() == -top
    assert torch.isnan(out[5]) and torch.signbit(out[7]) and not torch.signbit(out[6])
    assert mask.tolist() == [True, True, fmt == "e5m2", False, False, False, True, True, False]
    assert out[0].item() == {"e4m3": 0.3125, "e5m2": 0.3125}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block_size", [0, 7, 35, 105], ids=lambda b: f"block{b}")
def test_matches_torch_float8_cast(device, fmt, block_size):
    """Bit for bit the issue's formula with a given scale, per tensor (0), per block (7 divides the last dim) and
    per channel (35, 105: whole rows), on values that include ties of the FP8 grid, subnormals and overflow."""
    x = special_values((4, 3, 5, 7), 0.01, device=device)
    grid = torch.tensor([0.5 + 2**-4, 1 + 2**-4, 3 * 2**-10, 5 * 2**-10, 2**-12, 449, 465, 61440])  # ties, tiny
    x.view(-1)[: grid.numel()] = (grid * 0.01).to(device)
    s = block_scales(x, block_size)
    out, _ = OP(x, s, fmt, block_size)
    want = torch_cast(x.reshape(s.numel(), -1), s.reshape(-1, 1), fmt).reshape(x.shape)
    assert_bits_equal(out, want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("block_size", [0, 7, 105], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("given", [True, False], ids=["scale", "amax"])
def test_every_layout_bit_for_bit(device, fmt, dtype, block_size, given):
    base = special_values((4, 3, 5, 7), 0.3, dtype, device)
    for name, x in kernel_layouts(base):
        scale = block_scales(x, block_size) if given else None
        for compute_mask in (True, False):
            out, mask = OP(x, scale, fmt, block_size, compute_mask)
            ref_out, ref_mask = fakequant.ops.kernel("fake_quant_fp8", "reference")(
                x, scale, fmt, block_size, compute_mask)
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert out.stride() == torch.empty_like(x).stride(), name


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_layouts_and_strides_of_the_outputs(device, dtype):
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(4, 3, 5, 6, generator=g) * 3).to(dtype=dtype, device=device)
    for name, x in layouts(base).items():
        for compute_mask in (True, False):
            for scale in (None, torch.tensor([0.01], device=device)):
                out, mask = OP(x, scale, "e4m3", 0, compute_mask)
                ref_out, ref_mask = fakequant.ops.kernel("fake_quant_fp8", "reference")(
                    x, scale, "e4m3", 0, compute_mask)
                assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_computed_scales(device, fmt):
    """Each block's scale is amax / max: the block's largest element comes back exactly; an all-zero block gives
    zeros (the 2^-126 floor), a block with inf saturates it to a finite value, a NaN block stays NaN."""
    top = ELEMENT_FORMATS[fmt].max
    x = torch.tensor([[0.0, 0.0, -0.0, 0.0], [1.0, -3.0, 0.5, 2.0], [1.0, float("inf"), -2.0, 0.0],
                      [1.0, float("nan"), 2.0, 3.0]], device=device)  # fmt: skip
    out, mask = OP(x, None, fmt, 4)
    assert out[0].tolist() == [0.0, 0.0, 0.0, 0.0] and torch.signbit(out[0, 2])
    assert out[1, 1].item() == -3.0
    assert torch.isfinite(out[2]).all() and out[2, 1].item() == top * reference.fp8_scale_from_amax(
        torch.tensor(float("inf")), ELEMENT_FORMATS[fmt]).item()
    assert torch.isnan(out[3]).all()
    assert mask[1].all() and not mask[2, 1] and not mask[3].any()


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), (1,), (1, 1, 1, 1), (2, 3, 5, 7), (1023,)], ids=str)
@pytest.mark.parametrize("given", [True, False], ids=["scale", "amax"])
def test_odd_and_empty_shapes(device, shape, given):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = (torch.randn(shape, generator=g) * 2).to(device)
    for block_size in (0, shape[-1]) if shape[-1] else (0,):
        scale = block_scales(x, block_size) if given else None
        out, mask = OP(x, scale, "e4m3", block_size)
        ref_out, ref_mask = reference.fake_quant_fp8_forward(x, scale, "e4m3", block_size)
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)


def test_large_whole_tensor_scale(device):
    """One computed scale for a tensor past many kernel blocks (a two-pass reduction)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(100003, generator=g) * 5).to(device)
    x[77777] = 1e4
    out, _ = OP(x, None, "e4m3", 0)
    assert_bits_equal(out, reference.fake_quant_fp8_forward(x, None, "e4m3", 0)[0])
    assert out[77777].item() == 1e4


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("mask_saturated", [True, False])
@pytest.mark.parametrize("given", [True, False], ids=["scale", "amax"])
def test_backward_matches_autograd_reference(device, dtype, mask_saturated, given):
    x = special_values((6, 4, 3, 5), 0.05, dtype, device).nan_to_num(0.0)
    x = x.contiguous(memory_format=torch.channels_last)
    scale = block_scales(x, 5) if given else None
    out, (grad,) = grads(lambda a: fakequant.fake_quant_fp8(a, scale, "e5m2", 5, mask_saturated), [x])
    ref_out, (ref_grad,) = grads(
        lambda a: autograd_reference.fake_quant_fp8(a, scale, "e5m2", 5, mask_saturated), [x])
    assert_bits_equal(out, ref_out)
    assert_bits_equal(grad, ref_grad)
    if given:
        assert bool((grad == 0).any()) == mask_saturated


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 8, generator=g) * 2).to(device)
    for args in [(None, "e4m3", 0, True), (None, "e5m2", 8, True), (block_scales(x, 4), "e4m3", 4, True),
                 (torch.tensor([0.01], device=device), "e4m3", 0, False)]:  # fmt: skip
        torch.library.opcheck(OP.default, (x.clone().requires_grad_(), *args))
    torch.library.opcheck(OP.default, (x.transpose(0, 2), None, "e4m3", 3, True))


def test_bad_arguments(device):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"fmt 'e4m4' is not a supported format; allowed: e4m3, e5m2"):
        OP(x, None, "e4m4")
    with pytest.raises(ValueError, match=r"block_size 4 must divide the last dimension of x \(shape \(4, 6\)\)"):
        OP(x, None, "e4m3", 4)
    with pytest.raises(ValueError, match=r"scale must have 4 elements \(one per block\), got shape \(1,\)"):
        OP(x, torch.ones(1, device=device), "e4m3", 6)
    with pytest.raises(ValueError, match=r"scale has dtype torch.float64; allowed: float32"):
        OP(x, torch.ones(1, dtype=torch.float64, device=device), "e4m3")
    with pytest.raises(ValueError, match=r"x has dtype torch.int64; allowed: float32, float16, bfloat16"):
        OP(torch.arange(3, device=device), None, "e4m3")
    if device == "cpu":
        with pytest.raises(ValueError, match=SCALE_MESSAGE):
            OP(x, torch.tensor([1e-40], device=device), "e4m3")


@pytest.mark.parametrize(
    "args",
    [(torch.randn(4, 6), None, "e4m4", 0), (torch.randn(4, 6), None, "e4m3", 4), (torch.randn(4, 6), None, "e4m3", -1),
     (torch.randn(4, 6), torch.ones(2), "e4m3", 6), (torch.randn(4, 6), torch.tensor([float("nan")]), "e5m2", 0),
     (torch.randn(4, 6), torch.tensor([1e-40]), "e4m3", 0)],
    ids=["fmt", "block", "negative-block", "scale-shape", "nan-scale", "subnormal-scale"],
)  # fmt: skip
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernel("fake_quant_fp8", "reference"), args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py: given and computed scales, per tensor and per row."""
    x = inp.x
    row = x.size(-1) if x.dim() else 0
    for fmt in FORMATS:
        yield f"{fmt} amax per tensor", "fake_quant_fp8", (x, None, fmt, 0, True)
        yield f"{fmt} scale per tensor", "fake_quant_fp8", (x, inp.on(torch.tensor([0.01])), fmt, 0, True)
        if row:
            yield f"{fmt} amax per row", "fake_quant_fp8", (x, None, fmt, row, True)
            # Drawn from no generator: the run's one generator then gives the other ops the inputs it always gave.
            scales = inp.on(torch.linspace(0.001, 0.051, x.numel() // row))
            yield f"{fmt} scale per row", "fake_quant_fp8", (x, scales, fmt, row, False)
