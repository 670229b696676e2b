"""fakequant::fake_quant_per_group on every (device, backend) pair: the per-channel op of the per-group view of a
Linear or 1x1 Conv weight (docs/numerics.md, Per-group fake quantization)."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from tests.ops._helpers import FLOATS, SCALE_MESSAGE, on

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_per_group


def group_qparams(out: int, groups: int, generator: torch.Generator, device: str = "cpu"):
    scale = torch.rand(out, groups, generator=generator) * 0.1 + 0.01
    zero_point = torch.randint(-3, 4, (out, groups), generator=generator, dtype=torch.int32)
    return scale.to(device), zero_point.to(device)


@pytest.mark.parametrize("dtype", FLOATS)
# (1500, 64) by 32: 3000 groups, past the CPU op's 1024-parameter limit above which it prepares and checks them with
# vectorized ATen ops instead of an element loop.
@pytest.mark.parametrize("shape, group_size", [((6, 64), 32), ((5, 24, 1, 1), 8), ((3, 7), 7), ((4, 6), 1),
                                               ((1500, 64), 32)])  # fmt: skip
def test_matches_reference_and_the_per_channel_view(device, dtype, shape, group_size):
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g) * 0.3).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]).to(dtype)
    x = x.to(device)
    scale, zero_point = group_qparams(shape[0], shape[1] // group_size, g, device)
    out, mask = OP(x, scale, zero_point, group_size, -8, 7)
    want_out, want_mask = reference.fake_quant_per_group_forward(x, scale, zero_point, group_size, -8, 7)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(out.isnan(), want_out.isnan()) and torch.equal(out.nan_to_num(0.0), want_out.nan_to_num(0.0))
    assert torch.equal(mask, want_mask)
    # group (o, j) of input channels [j * group_size, (j + 1) * group_size) has scale[o, j]
    o, j = shape[0] - 1, shape[1] // group_size - 1
    row = x.reshape(shape[0], shape[1])[o, j * group_size :]
    expected_row = fakequant.fake_quant_per_tensor(row, scale[o, j], zero_point[o, j], -8, 7)
    assert torch.equal(out.reshape(shape[0], shape[1])[o, j * group_size :], expected_row)


def test_bad_values_among_many_groups_are_reported(device):
    scale = torch.full((1500, 2), 0.1)
    scale[1200, 1] = float("nan")
    zero_point = torch.zeros(1500, 2, dtype=torch.int32)
    args = on(device, torch.zeros(1500, 64), scale, zero_point)
    if device != "cpu":
        OP(*args, 32, -8, 7)  # no value checks on a GPU: they would cost a device-to-host sync per call
        return
    with pytest.raises(ValueError, match=SCALE_MESSAGE + r", got nan"):
        OP(*args, 32, -8, 7)
    scale[1200, 1] = 1e-40  # subnormal, in the branch-free pass over more than 1024 scales
    with pytest.raises(ValueError, match=SCALE_MESSAGE + r", got 9.99"):
        OP(torch.zeros(1500, 64), scale, zero_point, 32, -8, 7)
    zero_point[7, 0] = 9
    with pytest.raises(ValueError, match=r"zero_point 9 is outside \[quant_min, quant_max\] = \[-8, 7\]"):
        OP(torch.zeros(1500, 64), torch.full((1500, 2), 0.1), zero_point, 32, -8, 7)


def test_straight_through_gradient(device):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 16, generator=g) * 2).to(device).requires_grad_()
    scale, zero_point = group_qparams(4, 2, g, device)
    fakequant.fake_quant_per_group(x, scale, zero_point, 8, -8, 7).backward(torch.ones(4, 16, device=device))
    _, mask = reference.fake_quant_per_group_forward(x.detach(), scale, zero_point, 8, -8, 7)
    assert torch.equal(x.grad, mask.float()) and 0 < int(mask.sum()) < mask.numel()


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    samples = [
        (torch.randn(6, 8, generator=g), torch.rand(6, 2, generator=g) + 0.05, torch.zeros(6, 2, dtype=torch.int32),
         4, -8, 7),
        (torch.randn(6, 8, 1, 1, generator=g), torch.rand(6, 4, generator=g) + 0.05,
         torch.randint(-2, 3, (6, 4), generator=g, dtype=torch.int32), 2, -8, 7, False),
    ]  # fmt: skip
    for args in samples:
        args = on(device, *args)
        if len(args) == 6:  # differentiable: a mask is computed
            args = (args[0].clone().requires_grad_(), *args[1:])
        torch.library.opcheck(OP.default, args)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(4, 10), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), 4, -8, 7),
     r"group_size 4 does not divide the 10 input channels"),
    ((torch.zeros(4, 8, 3, 3), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), 4, -8, 7),
     r"takes a Linear \[out, in\] or 1x1 Conv \[out, in, 1, 1\] weight, got shape \(4, 8, 3, 3\)"),
    ((torch.zeros(4, 8), torch.ones(4, 4), torch.zeros(4, 2, dtype=torch.int32), 4, -8, 7),
     r"per-group scale must have shape \(4, 2\) \(out, in / group_size\), got \(4, 4\)"),
])  # fmt: skip
def test_bad_arguments(device, args, message):
    with pytest.raises(ValueError, match=message):
        OP(*on(device, *args))


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py (each kernel path once, under compute-sanitizer on a GPU)."""
    x = inp.x
    if inp.layout == "contiguous" and x.dim() >= 2 and x.size(1) > 0 and x.size(1) % 3 == 0:
        # per group of 3 input channels: the [out, in, 1, 1] view of a 1x1 conv weight
        weight = x.reshape(x.size(0), x.size(1), 1, -1)[..., :1].contiguous()
        scale, zero_point = inp.qparams(x.size(0) * x.size(1) // 3)
        shape = (x.size(0), x.size(1) // 3)
        yield "", "fake_quant_per_group", (weight, scale.reshape(shape), zero_point.reshape(shape), 3, -8, 7, True)
