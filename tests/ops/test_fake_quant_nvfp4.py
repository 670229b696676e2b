"""fakequant::fake_quant_nvfp4 on every (device, backend) pair, against the reference and torchao's NVFP4Tensor
(docs/numerics.md, Float formats)."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
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
from tests.ops.test_fake_quant_mx import mx_values

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_nvfp4


def finite_scale(x: torch.Tensor) -> torch.Tensor:
    return reference.nvfp4_per_tensor_scale(x.float().nan_to_num(0.0, 0.0, 0.0)).to(x.device)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("two_level", [True, False], ids=["per-tensor-scale", "block-scales-only"])
def test_every_layout_bit_for_bit(device, dtype, two_level):
    base = mx_values((4, 3, 5, 32), dtype, device, seed=1)
    scale = finite_scale(base) if two_level else None
    for name, x in kernel_layouts(base):
        for compute_mask in (True, False):
            out, mask = OP(x, scale, 16, compute_mask)
            ref_out, ref_mask = fakequant.ops.kernel("fake_quant_nvfp4", "reference")(x, scale, 16, compute_mask)
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert out.stride() == torch.empty_like(x).stride(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("two_level", [True, False], ids=["per-tensor-scale", "block-scales-only"])
def test_matches_torchao(device, dtype, two_level):
    """torchao's ``NVFP4Tensor.to_nvfp4(x, per_tensor_scale=...).dequantize()``, special blocks included (a
    per-tensor scale from the finite values' amax, as a calibrated one would be)."""
    torchao_mx_formats()
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    x = mx_values((16, 256), dtype, seed=5)
    x[4] = x[4] * 1e-3  # block scales below the per-tensor one's range: the E4M3 floor
    scale = per_tensor_amax_to_scale(x.float().nan_to_num(0.0, 0.0, 0.0).abs().amax()) if two_level else None
    want = NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=scale).dequantize(dtype)
    out, _ = OP(x.to(device), None if scale is None else scale.reshape(1).to(device), 16)
    assert_bits_equal(out.cpu(), want)


def test_computed_per_tensor_scale(device):
    """``two_level`` without a scale takes amax / (6 * 448) of x, floored at 2^-120: an all-zero tensor gives zeros."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 64, generator=g) * 3).to(device)
    scale = reference.nvfp4_per_tensor_scale(x)
    assert scale.item() == x.abs().amax().item() / 2688 or abs(scale.item() * 2688 / x.abs().amax().item() - 1) < 1e-6
    assert_bits_equal(fakequant.fake_quant_nvfp4(x), OP(x, scale, 16)[0])
    zeros = torch.zeros(2, 16, device=device)
    assert (fakequant.fake_quant_nvfp4(zeros) == 0).all()
    with pytest.raises(ValueError, match="pass one or the other"):
        fakequant.fake_quant_nvfp4(x, scale, two_level=False)


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 32), (1, 16), (2, 3, 5, 48), (1, 4096)], ids=str)
def test_odd_and_empty_shapes(device, shape):
    x = mx_values(shape, device=device, seed=sum(shape))
    for scale in (None, torch.tensor([0.01], device=device)):
        out, mask = OP(x, scale, 16)
        ref_out, ref_mask = reference.fake_quant_nvfp4_forward(x, scale, 16)
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_layouts_and_strides_of_the_outputs(device, dtype):
    base = mx_values((4, 3, 5, 16), dtype, device, seed=9)
    for name, x in kernel_layouts(base):
        for compute_mask in (True, False):
            out, mask = OP(x, None, 16, compute_mask)
            ref_out, ref_mask = fakequant.ops.kernel("fake_quant_nvfp4", "reference")(x, None, 16, compute_mask)
            assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("mask_saturated", [True, False])
@pytest.mark.parametrize("two_level", [True, False], ids=["per-tensor-scale", "block-scales-only"])
def test_backward_matches_autograd_reference(device, dtype, mask_saturated, two_level):
    x = mx_values((8, 2, 64), device=device, seed=2).nan_to_num(0.0, 0.0, 0.0).clamp(-1e-3, 1e-3)
    x.view(-1)[::7] *= 1e6  # blocks whose E4M3 scale saturates at 448 (below the per-tensor one's): values clip
    x = x.to(dtype)
    out, (grad,) = grads(lambda a: fakequant.fake_quant_nvfp4(a, None, two_level, 16, mask_saturated), [x])
    ref_out, (ref_grad,) = grads(
        lambda a: autograd_reference.fake_quant_nvfp4(a, None, two_level, 16, mask_saturated), [x])
    assert_bits_equal(out, ref_out)
    assert_bits_equal(grad, ref_grad)


def test_opcheck(device):
    x = mx_values((3, 4, 32), device=device, seed=6).nan_to_num(0.0, 0.0, 0.0)
    for args in [(None, 16, True), (torch.tensor([0.02], device=device), 16, True), (None, 32, False)]:
        torch.library.opcheck(OP.default, (x.clone().requires_grad_(), *args))
    torch.library.opcheck(OP.default, (x.transpose(0, 1), None, 16, True))


def test_bad_arguments(device):
    x = torch.randn(4, 24, device=device)
    with pytest.raises(ValueError, match=r"NVFP4 blocks run along the last dimension, whose size must be a multiple "
                                         r"of block_size 16; x has shape \(4, 24\)"):  # fmt: skip
        OP(x, None, 16)
    with pytest.raises(ValueError, match=r"per_tensor_scale must have 1 elements \(one per block\), got shape \(2,\)"):
        OP(x, torch.ones(2, device=device), 8)
    if device == "cpu":
        message = r"per_tensor_scale must be finite and >= 2\^-120 \(\(1 / per_tensor_scale\) / block_scale overflows"
        with pytest.raises(ValueError, match=message):
            OP(x, torch.tensor([1e-37]), 8)


@pytest.mark.parametrize(
    "args",
    [(torch.randn(4, 24), None, 16), (torch.randn(4, 32), torch.ones(2), 16), (torch.randn(4, 32), None, -16),
     (torch.randn(4, 32), torch.tensor([float("inf")]), 16), (torch.randn(4, 32), torch.ones(1, dtype=torch.half), 16),
     (torch.randn(4, 32), torch.tensor([2.0**-121]), 16)],
    ids=["block", "scale-shape", "negative-block", "inf-scale", "half-scale", "tiny-scale"],
)  # fmt: skip
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernel("fake_quant_nvfp4", "reference"), args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py: with and without a per-tensor scale, on rows of 32."""
    x = inp.x.flatten()
    x = x[: x.numel() // 32 * 32].reshape(-1, 32)
    yield "block scales only", "fake_quant_nvfp4", (x, None, 16, True)
    yield "per-tensor scale", "fake_quant_nvfp4", (x, inp.on(torch.tensor([0.003])), 16, True)
    yield "per-tensor scale no mask", "fake_quant_nvfp4", (x, inp.on(torch.tensor([0.003])), 16, False)
