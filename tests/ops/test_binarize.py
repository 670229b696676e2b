"""fakequant::binarize on every (device, backend) pair, against the reference (docs/numerics.md, Binarization)."""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from tests import autograd_reference
from tests.ops._helpers import (
    FLOATS,
    NONFINITE,
    SPECIAL,
    any_layouts,
    assert_bits_equal,
    assert_identical,
    assert_layout_of,
    assert_outputs_like_reference,
    assert_same_error,
    grads,
    kernel_layouts,
    large,
    layouts,
    special_values,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.binarize


def test_values(device):
    x = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, float("nan"), float("inf"), -float("inf")],
                     device=device)  # fmt: skip
    out, mask = OP(x)
    assert out[:8].tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    assert torch.isnan(out[8]) and out[9] == 1 and out[10] == -1
    assert mask.tolist() == [False, True, True, True, True, True, True, False, False, False, False]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_layout_bit_for_bit(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 11, generator=gen) * 2
    x.view(-1)[: len(NONFINITE) + 4] = torch.tensor(NONFINITE + [1.0, -1.0, 1.0000001, -0.9999999])
    for name, xl in any_layouts(x.to(dtype=dtype, device=device)).items():
        for clipped_ste in (True, False):
            for compute_mask in (True, False):
                out, mask = OP(xl, clipped_ste, compute_mask)
                ref_out, ref_mask = reference.binarize_forward(xl, clipped_ste, compute_mask)
                assert_bits_equal(out, ref_out)
                assert_bits_equal(mask, ref_mask)
                assert_layout_of(out, xl), name


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), "large", (3, 5, 7), (4, 3, 5, 7)], ids=str)
def test_shapes_and_layouts(device, dtype, shape):
    shape = (large(device),) if shape == "large" else shape
    for name, x in kernel_layouts(special_values(shape, 0.5, dtype, device)):
        for clipped_ste in (True, False):
            for compute_mask in (True, False):
                out, mask = OP(x, clipped_ste, compute_mask)
                expected = fakequant.ops.kernels("reference")["binarize"](x, clipped_ste, compute_mask)
                assert out.stride() == torch.empty_like(x).stride(), name
                assert_bits_equal(out, expected[0])
                assert_bits_equal(mask, expected[1])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("compute_mask", [True, False])
def test_layouts_and_strides_of_the_outputs(device, dtype, compute_mask):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 3, 5, 6, generator=g) * 3
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    for name, x in layouts(base.to(dtype=dtype, device=device)).items():
        out, mask = OP(x, True, compute_mask)
        ref_out, ref_mask = fakequant.ops.kernels("reference")["binarize"](x, True, compute_mask)
        assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), (1,), (1, 1, 1, 1), (2, 3, 5, 7), (1023,)])
def test_odd_and_empty_shapes(device, shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = (torch.randn(shape, generator=g) * 2).to(device)
    out, mask = OP(x)
    assert_identical(out, reference.binarize_forward(x)[0])
    assert out.shape == x.shape and mask.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clipped_ste", [True, False])
def test_backward_matches_autograd_reference(device, dtype, clipped_ste):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 4, 3, 5, generator=g) * 4).to(dtype=dtype, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    out, (grad,) = grads(lambda a: fakequant.binarize(a, clipped_ste=clipped_ste), [x])
    ref_out, (ref_grad,) = grads(lambda a: autograd_reference.binarize(a, clipped_ste=clipped_ste), [x])
    assert_identical(out, ref_out)
    assert_identical(grad, ref_grad)


@pytest.mark.parametrize("dtype", FLOATS)
def test_backward_every_layout_bit_for_bit(device, dtype):
    torch.manual_seed(3)
    for _name, x in kernel_layouts(special_values((4, 3, 5, 7), 0.0371, dtype, device).nan_to_num(0.0)):
        x = x.detach().requires_grad_()
        grad_out = torch.randn(x.shape, device=device).to(dtype)
        for clipped_ste in (True, False):
            (got,) = torch.autograd.grad(fakequant.binarize(x, clipped_ste=clipped_ste), x, grad_out)
            (want,) = torch.autograd.grad(autograd_reference.binarize(x, clipped_ste), x, grad_out)
            assert_bits_equal(got, want)


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    for args in [(x,), (x, False)]:
        torch.library.opcheck(OP.default, (args[0].clone().requires_grad_(), *args[1:]))
    x = special_values((4, 3, 5, 7), 0.05, device=device).nan_to_num(0.0, 1.0, -1.0)
    torch.library.opcheck(OP, (x.clone().requires_grad_(), True, True))
    torch.library.opcheck(OP, (x.contiguous(memory_format=torch.channels_last), True, True))


def test_bad_arguments(device):
    with pytest.raises(ValueError, match=r"x has dtype torch.int64; allowed: float32, float16, bfloat16"):
        OP(torch.arange(3, device=device))


@pytest.mark.parametrize("args", [(torch.arange(3),), (torch.ones(3, dtype=torch.float64), False, False)],
                         ids=["int64", "float64"])  # fmt: skip
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernels("reference")["binarize"], args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py (each kernel path once, under compute-sanitizer on a GPU)."""
    for clipped in (True, False):
        yield f"clipped={clipped}", "binarize", (inp.x, clipped, True)
