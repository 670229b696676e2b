"""fakequant::fake_quant_per_tensor on every (device, backend) pair, against the reference.

The reference itself is checked against ``torch.fake_quantize_per_tensor_affine`` on finite inputs; every pair is
then checked bit for bit against the reference (docs/numerics.md, Per-tensor fake quantization).
"""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from fakequant.qparams import quant_range
from tests import autograd_reference
from tests.ops._helpers import (
    FLOATS,
    NONFINITE,
    RANGES,
    SCALE_MESSAGE,
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
    on,
    qparams,
    qparams_per_tensor,
    seeded_qparams,
    special_values,
    symmetric_ties,
    ties,
)

# numpy warns about the overflow to inf and the NaN arithmetic that the NaN/inf cases are about.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_per_tensor


# ---------------------------------------------------------------------------------------------
# The reference against PyTorch's own fake quantization (finite inputs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_min,quant_max", RANGES)
def test_reference_matches_torch(quant_min, quant_max):
    g = torch.Generator().manual_seed(quant_max)
    for scale_value in (0.1, 0.25, 1 / 3, 1e-3, 7.5):
        zero_point = (quant_min + quant_max) // 2
        scale, zp = qparams_per_tensor(scale_value, zero_point)
        x = torch.cat([torch.randn(4096, generator=g) * scale_value * (quant_max - quant_min),
                       ties(scale_value, zero_point, quant_min, quant_max)])
        out, mask = reference.fake_quant_per_tensor_forward(x, scale, zp, quant_min, quant_max)
        assert_identical(out, torch.fake_quantize_per_tensor_affine(x, scale, zp, quant_min, quant_max))
        xg = x.clone().requires_grad_()
        torch.fake_quantize_per_tensor_affine(xg, scale, zp, quant_min, quant_max).sum().backward()
        assert torch.equal(mask, xg.grad.bool())


def test_reference_non_finite_follows_spec():
    scale, zp = qparams_per_tensor(0.5, 1)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.25, 0.75])
    out, mask = reference.fake_quant_per_tensor_forward(x, scale, zp, -4, 3)
    assert torch.isnan(out[0])
    assert out[1] == (3 - 1) * 0.5 and out[2] == (-4 - 1) * 0.5
    # 0.25 / 0.5 = 0.5 rounds to 0 and 0.75 / 0.5 = 1.5 rounds to 2: half to even.
    assert out[3] == 0.0 and out[4] == 1.0
    assert mask.tolist() == [False, False, False, True, True]


# ---------------------------------------------------------------------------------------------
# Every pair against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_min,quant_max", RANGES)
def test_matches_reference_and_torch(device, quant_min, quant_max):
    g = torch.Generator().manual_seed(1)
    for scale_value in (0.1, 1 / 3, 0.125):
        zero_point = (quant_min + quant_max + 1) // 2
        x = torch.cat([torch.randn(1031, generator=g) * scale_value * (quant_max - quant_min),
                       ties(scale_value, zero_point, quant_min, quant_max), SPECIAL]).to(device)
        args = (x, *qparams_per_tensor(scale_value, zero_point, device), quant_min, quant_max)
        out, mask = OP(*args)
        ref_out, ref_mask = reference.fake_quant_per_tensor_forward(*args)
        assert_identical(out, ref_out)
        assert_identical(mask, ref_mask)
        finite = torch.isfinite(x)
        expected = torch.fake_quantize_per_tensor_affine(x[finite], *args[1:])
        assert_identical(out[finite], expected)


@pytest.mark.parametrize("quant_min,quant_max", [(0, 255), (-128, 127), (0, 15), (-8, 7)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_is_relu_then_fake_quant(device, quant_min, quant_max, dtype):
    # relu=True: the values of fake_quant(relu(x)), the mask of fake_quant's and ReLU's gradients (x > 0).
    g = torch.Generator().manual_seed(2)
    for scale_value, zero_point in ((0.1, quant_min), (1 / 3, (quant_min + quant_max) // 2), (0.125, quant_max)):
        x = torch.cat([torch.randn(1031, generator=g) * scale_value * (quant_max - quant_min),
                       ties(scale_value, zero_point, quant_min, quant_max), SPECIAL]).to(dtype=dtype, device=device)
        for layout in layouts(x[:1020].reshape(3, 5, 4, 17)).values():
            for sample in (x, layout):
                args = (sample, *qparams_per_tensor(scale_value, zero_point, device), quant_min, quant_max)
                out, mask = OP(*args, True, True)
                ref_out, ref_mask = reference.fake_quant_per_tensor_forward(torch.relu(sample), *args[1:])
                assert_identical(out, ref_out)
                assert_identical(mask, ref_mask & (sample > 0))
                assert_identical(OP(*args, False, True)[0], ref_out)
                assert_identical(mask, reference.fake_quant_per_tensor_forward(*args, True, True)[1])


def per_tensor_cases():
    gen = torch.Generator().manual_seed(1)
    return {
        # scale 0.25: (k + 0.5) * 0.25 * 4 is an exact tie.
        "exact_ties": (symmetric_ties(0.25).reshape(8, 10), 0.25, 0, -128, 127),
        "near_ties_zp": (symmetric_ties(0.1).reshape(4, 20), 0.1, 3, -8, 7),
        "random_tail": (torch.randn(3, 5, 67, generator=gen) * 3, 0.05, -2, -128, 127),
        "saturating": (torch.randn(2, 3, 4, 5, generator=gen) * 100, 0.7, 1, -4, 3),
        "nonfinite": (torch.tensor(NONFINITE).reshape(2, 5), 0.1, 0, -128, 127),
        "scalar": (torch.tensor(0.35), 0.1, 0, 0, 255),
    }


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", list(per_tensor_cases()))
def test_cases_every_layout_bit_for_bit(device, case, dtype):
    x, scale, zero_point, quant_min, quant_max = per_tensor_cases()[case]
    scale, zero_point = qparams(scale, zero_point, device)
    for name, xl in any_layouts(x.to(dtype=dtype, device=device)).items():
        for compute_mask in (True, False):
            out, mask = OP(xl, scale, zero_point, quant_min, quant_max, compute_mask)
            ref_out, ref_mask = reference.fake_quant_per_tensor_forward(
                xl, scale, zero_point, quant_min, quant_max, compute_mask
            )
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert_layout_of(out, xl), name
            if compute_mask:
                assert_layout_of(mask, xl)


SHAPES = [(0,), (1,), (7,), "large", (3, 5, 7), (4, 3, 5, 7), (8, 16, 3, 3), (2, 0, 3)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quant_range", [(-128, 127), (0, 255), (-7, 7)])
def test_shapes_layouts_and_zero_point_dtypes(device, dtype, shape, quant_range):
    quant_min, quant_max = quant_range
    shape = (large(device),) if shape == "large" else shape
    for zp_dtype in (torch.int32, torch.int64):
        scale, zero_point = seeded_qparams(None, zp_dtype, device=device)
        zero_point.fill_((quant_min + quant_max) // 2)
        for name, x in kernel_layouts(special_values(shape, 0.0371, dtype, device)):
            for compute_mask in (True, False):
                out, mask = OP(x, scale, zero_point, quant_min, quant_max, compute_mask)
                expected = reference.fake_quant_per_tensor_forward(x, scale, zero_point, quant_min, quant_max,
                                                                   compute_mask)  # fmt: skip
                assert out.stride() == torch.empty_like(x).stride(), name
                assert_bits_equal(out, expected[0])
                assert_bits_equal(mask, expected[1])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("compute_mask", [True, False])
def test_layouts_and_strides_of_the_outputs(device, dtype, compute_mask):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 3, 5, 6, generator=g) * 3
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    base = base.to(dtype=dtype, device=device)
    scale, zp = qparams_per_tensor(0.05, -3, device)
    for name, x in layouts(base).items():
        out, mask = OP(x, scale, zp, -128, 127, compute_mask)
        ref_out, ref_mask = fakequant.ops.kernels("reference")["fake_quant_per_tensor"](
            x, scale, zp, -128, 127, compute_mask
        )
        assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), (1,), (1, 1, 1, 1), (2, 3, 5, 7), (1023,)])
def test_odd_and_empty_shapes(device, shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = (torch.randn(shape, generator=g) * 2).to(device)
    scale, zp = qparams_per_tensor(0.02, 0, device)
    out, mask = OP(x, scale, zp, -128, 127)
    assert_identical(out, reference.fake_quant_per_tensor_forward(x, scale, zp, -128, 127)[0])
    assert mask.shape == x.shape and mask.dtype == torch.bool


def test_empty_inputs(device):
    for x in (torch.empty(0, device=device), torch.empty(3, 0, 2, device=device)):
        out, mask = OP(x, *qparams(0.1, 0, device), -8, 7)
        assert out.shape == x.shape and mask.shape == x.shape and mask.dtype == torch.bool


@pytest.mark.parametrize(
    "signed,narrow", [(True, False), (False, False), (True, True)], ids=["signed", "unsigned", "narrow"]
)
def test_every_bit_width(device, signed, narrow):
    gen = torch.Generator().manual_seed(2)
    for bits in range(1, 17):
        if narrow and bits == 1:
            continue  # a narrow 1-bit range would be [0, 0]
        quant_min, quant_max = quant_range(bits, signed, narrow)
        scale = 1.0 / (1 << max(bits - 2, 0))
        zero_point = (quant_min + quant_max + 1) // 2 if not signed else 0
        span = (quant_max - quant_min + 1) * scale * 1.5  # a quarter beyond each end
        x = torch.cat([(torch.rand(200, generator=gen) - 0.5) * span, symmetric_ties(scale, 20)]).to(device)
        s, z = qparams(scale, zero_point, device)
        out, mask = OP(x, s, z, quant_min, quant_max)
        ref_out, ref_mask = reference.fake_quant_per_tensor_forward(x, s, z, quant_min, quant_max)
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)
        assert 0 < int(mask.sum()) < x.numel(), f"bits={bits}: the cases should hit both sides of the range"


def test_non_finite_values(device):
    scale, zp = qparams_per_tensor(0.5, 2, device)
    x = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    out, mask = OP(x, scale, zp, 0, 15)
    assert torch.isnan(out[0]) and out[1] == (15 - 2) * 0.5 and out[2] == (0 - 2) * 0.5
    assert not mask.any()
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.25], device=device)
    out, mask = OP(x, *qparams(0.5, 1, device), -4, 3)
    assert torch.isnan(out[0])
    assert out[1:].tolist() == [(3 - 1) * 0.5, (-4 - 1) * 0.5, 0.0]
    assert mask.tolist() == [False, False, False, True]


def test_matches_torch_fake_quantize_on_finite_fp32(device):
    x = (torch.randn(large(device), generator=torch.Generator().manual_seed(0)) * 5).to(device)
    scale, zero_point = torch.tensor(0.0371, device=device), torch.tensor(3, dtype=torch.int32, device=device)
    out, _ = OP(x, scale, zero_point, -128, 127)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_backward_matches_autograd_reference(device, dtype, relu):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 4, 3, 5, generator=g) * 4).to(dtype=dtype, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    scale, zp = qparams_per_tensor(0.05, 1, device)
    out, (grad,) = grads(lambda a: fakequant.fake_quant_per_tensor(a, scale, zp, -16, 15, relu=relu), [x])
    ref_out, (ref_grad,) = grads(lambda a: autograd_reference.fake_quant_per_tensor(a, scale, zp, -16, 15, relu=relu),
                                 [x])  # fmt: skip
    assert_identical(out, ref_out)
    assert_identical(grad, ref_grad)


@pytest.mark.parametrize("dtype", FLOATS)
def test_backward_every_layout_bit_for_bit(device, dtype):
    torch.manual_seed(3)
    scale, zero_point = seeded_qparams(None, device=device)
    for _name, x in kernel_layouts(special_values((4, 3, 5, 7), 0.0371, dtype, device).nan_to_num(0.0)):
        x = x.detach().requires_grad_()
        grad_out = torch.randn(x.shape, device=device).to(dtype)
        (got,) = torch.autograd.grad(fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127), x, grad_out)
        (want,) = torch.autograd.grad(autograd_reference.fake_quant_per_tensor(x, scale, zero_point, -128, 127), x,
                                      grad_out)  # fmt: skip
        assert_bits_equal(got, want)


def test_backward_without_mask_is_an_error(device):
    x = torch.randn(4, device=device, requires_grad=True)
    scale, zp = qparams_per_tensor(0.1, 0, device)
    out, _ = OP(x, scale, zp, -8, 7, False)
    with pytest.raises(RuntimeError, match="compute_mask=False"):
        out.sum().backward()


def test_public_function_skips_the_mask_only_without_grad(device):
    x = torch.randn(16, device=device)
    scale, zp = qparams_per_tensor(0.1, 0, device)
    with torch.no_grad():
        inference = fakequant.fake_quant_per_tensor(x.requires_grad_(), scale, zp, -8, 7)
    training = fakequant.fake_quant_per_tensor(x, scale, zp, -8, 7)
    assert_identical(inference, training.detach())
    assert training.requires_grad and not inference.requires_grad


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    scale, zp = qparams_per_tensor(0.05, 2, device)
    for args in [(x, scale, zp, -128, 127), (x, scale, zp, 0, 255, False), (x, scale, zp, 0, 255, True, True)]:
        differentiable = len(args) == 5 or args[5]
        sample = args[0].clone().requires_grad_() if differentiable else args[0]
        torch.library.opcheck(OP.default, (sample, *args[1:]))


def test_opcheck_special_values_and_channels_last(device):
    x = special_values((4, 3, 5, 7), 0.05, device=device).nan_to_num(0.0, 1.0, -1.0)
    scale, zero_point = seeded_qparams(None, device=device)
    torch.library.opcheck(OP, (x.clone().requires_grad_(), scale, zero_point, -128, 127, True))
    torch.library.opcheck(OP, (x.contiguous(memory_format=torch.channels_last), scale, zero_point, -128, 127, True))


# ---------------------------------------------------------------------------------------------
# Bad arguments: the reference's ValueError on every pair
# ---------------------------------------------------------------------------------------------

X = torch.randn(2, 3)
S1, Z1 = qparams_per_tensor(0.1, 0)
# (args, message, a value check: made on CPU tensors only, docs/numerics.md, Argument checks)
BAD = [
    ((X, S1, Z1, 5, 4), r"quant_min \(5\) must be <= quant_max \(4\)", False),
    ((X, S1, Z1, -(1 << 25), 0), r"within \[-2\^24, 2\^24\]", False),
    ((X, torch.tensor(0.0), Z1, -8, 7), SCALE_MESSAGE + r", got 0", True),
    ((X, torch.tensor(-1.0), Z1, -8, 7), SCALE_MESSAGE + r", got -1", True),
    ((X, torch.tensor(float("inf")), Z1, -8, 7), SCALE_MESSAGE + r", got inf", True),
    ((X, torch.tensor(float("nan")), Z1, -8, 7), SCALE_MESSAGE + r", got nan", True),
    ((X, torch.tensor(1e-40), Z1, -8, 7), SCALE_MESSAGE + r", got 9.99", True),
    ((X, S1, torch.tensor(9, dtype=torch.int32), -8, 7), r"zero_point 9 is outside \[quant_min, quant_max\]", True),
    ((X, S1.double(), Z1, -8, 7), r"scale has dtype torch.float64; allowed: float32", False),
    ((X, S1, Z1.float(), -8, 7), r"zero_point has dtype torch.float32; allowed: int32, int64", False),
    ((X.double(), S1, Z1, -8, 7), r"x has dtype torch.float64; allowed: float32, float16, bfloat16", False),
    ((X.int(), S1, Z1, -8, 7), r"x has dtype torch.int32", False),
    ((X, torch.ones(2), Z1, -8, 7), r"per-tensor scale must have exactly one element, got shape \(2,\)", False),
    ((X, S1, torch.zeros(2, dtype=torch.int32), -8, 7), r"per-tensor zero_point must have exactly one element", False),
    ((X, S1.to("meta"), Z1, -8, 7), r"scale is on meta but x is on DEVICE", False),
]


@pytest.mark.parametrize("args,message,value_check", BAD, ids=[m for _, m, _ in BAD])
def test_bad_arguments(device, args, message, value_check):
    args = on(device, *args)
    message = message.replace("DEVICE", str(args[0].device))
    if value_check and device != "cpu":
        OP(*args)  # no value checks on a GPU: they would cost a device-to-host sync per call
        return
    with pytest.raises(ValueError, match=message):
        OP(*args)


BAD_WORD_FOR_WORD = [
    (X, S1, Z1, 5, 4),
    (X, S1, Z1, -(1 << 25), 0),
    (X, S1, Z1, 0, (1 << 24) + 1),
    (X, torch.tensor(0.0), Z1, -8, 7),
    (X, torch.tensor(-0.0), Z1, -8, 7),
    (X, torch.tensor(-1.5), Z1, -8, 7),
    (X, torch.tensor(float("inf")), Z1, -8, 7),
    (X, torch.tensor(float("-inf")), Z1, -8, 7),
    (X, torch.tensor(float("nan")), Z1, -8, 7),
    (X, torch.tensor(-1e-7), Z1, -8, 7),
    (X, torch.tensor(-3e20), Z1, -8, 7),
    (X, torch.tensor(-0.1), Z1, -8, 7),
    (X, torch.tensor(1e-40), Z1, -8, 7),  # subnormal: positive, but its fp32 reciprocal is inf
    (X, torch.tensor(2.0**-127), Z1, -8, 7),
    (X, torch.tensor(2.0**-149), Z1, -8, 7),
    (X, S1, torch.tensor(9, dtype=torch.int32), -8, 7),
    (X, S1, torch.tensor(-9), -8, 7),
    (X, S1.double(), Z1, -8, 7),
    (X, S1.half(), Z1, -8, 7),
    (X, S1, Z1.float(), -8, 7),
    (X, S1, Z1.to(torch.int16), -8, 7),
    (X.double(), S1, Z1, -8, 7),
    (X.int(), S1, Z1, -8, 7),
    (X.to(torch.complex64), S1, Z1, -8, 7),
    (X, torch.ones(2), Z1, -8, 7),
    (X, torch.ones(1, 2), Z1, -8, 7),
    (X, torch.ones(0), Z1, -8, 7),
    (X, S1, torch.zeros(2, dtype=torch.int32), -8, 7),
]


def test_smallest_normal_scale_is_accepted(device):
    """2^-126, the smallest scale the ops accept: its reciprocal 2^126 is finite, so 0 stays 0 (a subnormal scale's
    reciprocal is inf, and inf * 0 would be NaN) and tiny inputs quantize as the reference does."""
    x = torch.tensor([0.0, -0.0, 2.0**-126, 3 * 2.0**-126, -1.0, float("nan")], device=device)
    scale = torch.tensor(2.0**-126, device=device)
    out, mask = OP(x, scale, torch.tensor(0, dtype=torch.int32, device=device), -8, 7)
    assert out[:4].tolist() == [0.0, 0.0, 2.0**-126, 3 * 2.0**-126] and out[4] == -8 * 2.0**-126
    assert mask.tolist() == [True, True, True, True, False, False] and bool(out[5].isnan())


@pytest.mark.parametrize("args", BAD_WORD_FOR_WORD, ids=range(len(BAD_WORD_FOR_WORD)))
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernels("reference")["fake_quant_per_tensor"], args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py (each kernel path once, under compute-sanitizer on a GPU)."""
    scale, zero_point = inp.qparams(None)
    for relu in (False, True):
        yield f"relu={relu}", "fake_quant_per_tensor", (inp.x, scale, zero_point, -128, 127, True, relu)
    scale, zero_point = inp.qparams(None, 0, 255)
    yield "unsigned", "fake_quant_per_tensor", (inp.x, scale, zero_point, 0, 255, False, False)
