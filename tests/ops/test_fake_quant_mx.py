"""fakequant::fake_quant_mx on every (device, backend) pair, against the reference and torchao's MX conversion
(docs/numerics.md, Float formats)."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from fakequant.formats import ELEMENT_FORMATS, MX_ELEMENTS, MX_SCALE_MODES
from tests import autograd_reference
from tests.ops._helpers import (
    FLOATS,
    assert_bits_equal,
    assert_outputs_like_reference,
    assert_same_error,
    grads,
    kernel_layouts,
    torchao_mx_formats,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_mx
FLOAT_ELEMENTS = tuple(e for e in MX_ELEMENTS if e != "int8")  # torchao has no MXINT8


def mx_values(shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    """Blocks spanning 60 binades, with NaN, +-inf, all-zero and subnormal blocks, exact ties of every element
    grid, and amaxes just above and at powers of two (where the floor and rceil scales part)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    rows = numel // shape[-1]
    x = torch.randn(rows, shape[-1], generator=g) * torch.exp2(torch.randint(-30, 30, (rows, 1), generator=g).float())
    flat = x.view(-1)
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-39, 448.0, 464.0, 2.0**-126]
    k = min(len(specials), numel)
    flat[torch.randperm(numel, generator=g)[:k]] = torch.tensor(specials[:k])
    if rows > 3 and shape[-1] >= 32:
        x[1, :32] = 0.0
        x[2, :32] = torch.randint(-64, 64, (32,), generator=g) / 16 + 1 / 32  # ties on the fp4/fp6 grids
        x[3, :32] = 1.0 + 2.0**-23  # amax just above a power of two
    return x.reshape(shape).to(dtype).to(device)


@pytest.mark.parametrize("elem", MX_ELEMENTS)
@pytest.mark.parametrize("scale_mode", MX_SCALE_MODES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_layout_bit_for_bit(device, elem, scale_mode, dtype):
    base = mx_values((4, 3, 5, 64), dtype, device)
    for name, x in kernel_layouts(base):
        for compute_mask in (True, False):
            out, mask = OP(x, elem, 32, scale_mode, compute_mask)
            ref_out, ref_mask = fakequant.ops.kernel("fake_quant_mx", "reference")(x, elem, 32, scale_mode,
                                                                                    compute_mask)
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert out.stride() == torch.empty_like(x).stride(), name


@pytest.mark.parametrize("elem", FLOAT_ELEMENTS)
@pytest.mark.parametrize("scale_mode", MX_SCALE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torchao(device, elem, scale_mode, dtype):
    """torchao's ``to_mx`` then ``to_dtype`` (fp32 and bf16: the inputs torchao takes), special blocks included."""
    mx_formats = torchao_mx_formats()
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    elem_dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e3m2": mx_formats.constants.DTYPE_FP6_E3M2,
                  "e2m3": mx_formats.constants.DTYPE_FP6_E2M3, "e2m1": torch.float4_e2m1fn_x2}[elem]  # fmt: skip
    mode = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}[scale_mode]
    x = mx_values((16, 256), dtype, seed=3)
    scale, data = to_mx(x, elem_dtype, 32, mode)
    want = to_dtype(data, scale, elem_dtype, 32, dtype)
    out, _ = OP(x.to(device), elem, 32, scale_mode)
    assert_bits_equal(out.cpu(), want)


def test_rceil_takes_the_exact_ceiling():
    """rceil's scale is 2^ceil(log2(amax / max)) with the exact ceiling (the next power of two at or above, as
    NVIDIA's cvt.rp.satfinite.ue8m0 computes). torchao's eager fallback takes ceil(torch.log2(d)) in fp32, where
    log2 of d just above a power of two rounds down to the integer: documented in docs/numerics.md."""
    element = ELEMENT_FORMATS["e4m3"]
    for k in (-130, -127, -126, -20, 0, 5, 20, 100):
        for d in (2.0**k, 2.0**k * (1 + 2.0**-23), 2.0**k * 1.5):
            amax = torch.tensor([d * element.max], dtype=torch.float32)
            descale = amax / element.max
            exact = torch.ceil(torch.log2(descale.double())).clamp(-127, 127) + 127
            if descale.item() == 0:
                exact = torch.zeros_like(exact)
            code, _ = reference.mx_scales(amax, element, "rceil")
            assert code.item() == int(exact.item()), (k, d)


@pytest.mark.parametrize("elem", ["e4m3", "int8"])
def test_special_blocks(device, elem):
    """An all-zero block gives zeros; a NaN makes its whole block NaN; an inf (exponent field 128) gives the scale
    code 128 - emax + 127: for the float elements the inf saturates to max, times 2^(128 - emax) overflows to inf
    again and the block's finite values flush to 0; for INT8 (emax 0) the code is 255 (NaN) and so is the block."""
    x = torch.zeros(3, 32, device=device)
    x[1, 0], x[1, 1] = float("nan"), 1.0
    x[2, 0], x[2, 1] = float("inf"), 1.0
    out, mask = OP(x, elem, 32, "floor")
    assert (out[0] == 0).all() and torch.isnan(out[1]).all()
    if elem == "int8":
        assert torch.isnan(out[2]).all()
    else:
        assert out[2, 0].item() == float("inf") and out[2, 1].item() == 0.0
    assert not mask[1, 0] and not mask[2, 0] and mask[0].all()


def test_mxint8_follows_the_spec(device):
    """MXINT8 (OCP MX 5.3.3): scale 2^floor(log2(amax)), elements two's complement with 6 fraction bits, saturating
    to +-127/64 as the OCP reference implementation does."""
    x = torch.tensor([[1.0, 1.999, -1.999, 0.5 + 1 / 128, 0.5 + 3 / 128, -2.0] + [0.0] * 26], device=device)
    out, _ = OP(x, "int8", 32, "floor")
    assert out[0, :6].tolist() == [1.0, 2.0, -2.0, 0.5, 0.5 + 4 / 128, -2.0]
    y = torch.tensor([[1.999, -1.999, 1.0] + [0.0] * 29], device=device)  # scale 1: 1.999 * 64 rounds to 128
    out, mask = OP(y, "int8", 32, "floor")
    assert out[0, :3].tolist() == [127 / 64, -127 / 64, 1.0] and mask[0, :3].tolist() == [False, False, True]


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("shape", [(0, 64), (3, 0, 64), (1, 64), (2, 3, 5, 64), (1, 1024)], ids=str)
def test_odd_and_empty_shapes(device, shape, block_size):
    x = mx_values(shape, device=device, seed=sum(shape))
    for elem in ("e2m1", "e4m3"):
        out, mask = OP(x, elem, block_size, "rceil")
        ref_out, ref_mask = reference.fake_quant_mx_forward(x, elem, block_size, "rceil")
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_layouts_and_strides_of_the_outputs(device, dtype):
    base = mx_values((4, 3, 5, 32), dtype, device, seed=9)
    for name, x in kernel_layouts(base):
        for compute_mask in (True, False):
            out, mask = OP(x, "e3m2", 32, "floor", compute_mask)
            ref_out, ref_mask = fakequant.ops.kernel("fake_quant_mx", "reference")(x, "e3m2", 32, "floor",
                                                                                    compute_mask)
            assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("mask_saturated", [True, False])
@pytest.mark.parametrize("axis", [-1, 0])
def test_backward_matches_autograd_reference(device, dtype, mask_saturated, axis):
    x = mx_values((32, 2, 64), dtype, device, seed=2).nan_to_num(0.0, 0.0, 0.0)
    out, (grad,) = grads(lambda a: fakequant.fake_quant_mx(a, "e2m1", 32, "floor", axis, mask_saturated), [x])
    ref_out, (ref_grad,) = grads(
        lambda a: autograd_reference.fake_quant_mx(a, "e2m1", 32, "floor", axis, mask_saturated), [x])
    assert_bits_equal(out, ref_out)
    assert_bits_equal(grad, ref_grad)
    assert bool((grad == 0).any()) == mask_saturated  # floor saturates blocks whose amax lies above 6 * 2^scale


def test_opcheck(device):
    x = mx_values((3, 4, 64), device=device, seed=6).nan_to_num(0.0, 0.0, 0.0)
    for args in [("e4m3", 32, "floor", True), ("e2m1", 16, "rceil", True), ("int8", 32, "floor", False)]:
        torch.library.opcheck(OP.default, (x.clone().requires_grad_(), *args))
    torch.library.opcheck(OP.default, (x.transpose(0, 1), "e5m2", 32, "rceil", True))


def test_bad_arguments(device):
    x = torch.randn(4, 48, device=device)
    with pytest.raises(ValueError, match=r"elem 'e4m4' is not a supported format; allowed: e4m3, e5m2, e3m2, e2m3, "
                                         r"e2m1, int8"):  # fmt: skip
        OP(x, "e4m4")
    with pytest.raises(ValueError, match=r"MX blocks run along the last dimension, whose size must be a multiple of "
                                         r"block_size 32; x has shape \(4, 48\)"):  # fmt: skip
        OP(x, "e4m3", 32)
    with pytest.raises(ValueError, match=r"scale_mode 'even' is not supported; allowed: floor, rceil"):
        OP(x, "e4m3", 16, "even")


@pytest.mark.parametrize(
    "args",
    [(torch.randn(4, 64), "e4m4"), (torch.randn(4, 48), "e4m3", 32), (torch.randn(4, 64), "e4m3", 0),
     (torch.randn(4, 64), "e2m1", 32, "ceil"), (torch.randn(()), "e2m1", 32), (torch.arange(64), "e4m3", 32)],
    ids=["elem", "block", "zero-block", "mode", "scalar", "int64"],
)  # fmt: skip
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernel("fake_quant_mx", "reference"), args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py: every element format and scale mode on rows of 64."""
    x = inp.x.flatten()
    x = x[: x.numel() // 64 * 64].reshape(-1, 64)
    for elem in MX_ELEMENTS:
        for scale_mode in MX_SCALE_MODES:
            yield f"{elem} {scale_mode}", "fake_quant_mx", (x, elem, 32, scale_mode, True)
    yield "e4m3 block16 no mask", "fake_quant_mx", (x, "e4m3", 16, "floor", False)
