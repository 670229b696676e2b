"""fakequant::masked_grad (the straight-through backward) on every (device, backend) pair, against the reference."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from tests.ops._helpers import (
    FLOATS,
    any_layouts,
    assert_bits_equal,
    assert_identical,
    assert_layout_of,
    assert_same_error,
    kernel_layouts,
    special_values,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.masked_grad


def test_mixed_layouts(device):
    g = torch.Generator().manual_seed(5)
    mask = (torch.randn(2, 3, 4, 5, generator=g) > 0).contiguous(memory_format=torch.channels_last).to(device)
    grad = torch.randn(2, 3, 4, 5, generator=g).to(device)
    out = OP(grad, mask)
    assert_identical(out, torch.where(mask, grad, 0.0))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_layout_pair_bit_for_bit(device, dtype):
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(2, 3, 5, 9, generator=gen)
    grad.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, float("nan")])
    keep = torch.rand(2, 3, 5, 9, generator=gen) > 0.4
    keep.view(-1)[:4] = torch.tensor([True, True, True, False])
    grad_layouts = any_layouts(grad.to(dtype=dtype, device=device))
    mask_layouts = any_layouts(keep.to(device))
    for grad_name, gl in grad_layouts.items():
        for mask_name in ("contiguous", "channels_last", "strided"):
            ml = mask_layouts[mask_name]
            out = OP(gl, ml)
            assert_bits_equal(out, reference.masked_grad(gl, ml))
            assert_layout_of(out, gl), (grad_name, mask_name)


@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_layouts(device, dtype):
    x = special_values((4, 3, 5, 7), 0.05, dtype, device)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.5).to(device)
    for grad_name, grad in kernel_layouts(x):
        for mask_name, m in kernel_layouts(mask):
            out = OP(grad, m)
            assert out.stride() == torch.empty_like(grad).stride(), (grad_name, mask_name)
            assert_bits_equal(out, reference.masked_grad(grad, m))


def test_empty(device):
    for x in (torch.empty(0, device=device), torch.empty(3, 0, 2, device=device)):
        assert OP(x, torch.ones_like(x, dtype=torch.bool)).shape == x.shape


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    mask = (torch.randn(3, 4, 5, generator=g) > 0).to(device)
    torch.library.opcheck(OP.default, (x, mask))
    x = special_values((4, 3, 5, 7), 0.05, device=device).nan_to_num(0.0, 1.0, -1.0)
    mask = (torch.rand(x.shape, generator=g) < 0.5).to(device)
    torch.library.opcheck(OP, (x, mask))
    torch.library.opcheck(OP, (x.contiguous(memory_format=torch.channels_last), mask))


def test_bad_arguments(device):
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the gradient's shape \(3,\)"):
        OP(torch.randn(3, device=device), torch.ones(4, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        OP(torch.randn(3, device=device), torch.ones(3, device=device))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        OP(torch.randn(4, 3, device=device), torch.ones(4, device=device, dtype=torch.bool))


BAD_WORD_FOR_WORD = [
    (torch.randn(3), torch.ones(4, dtype=torch.bool)),
    (torch.randn(3), torch.ones(3)),
    (torch.randn(2, 3), torch.ones(3, 2, dtype=torch.bool)),
]


@pytest.mark.parametrize("args", BAD_WORD_FOR_WORD, ids=range(len(BAD_WORD_FOR_WORD)))
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernels("reference")["masked_grad"], args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py (each kernel path once, under compute-sanitizer on a GPU)."""
    mask = inp.on(torch.rand(inp.base.shape, generator=inp.generator) < 0.5)
    yield "", "masked_grad", (inp.x, mask if inp.layout == "contiguous" else mask.expand_as(inp.x))
