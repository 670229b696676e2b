"""fakequant::fake_quant_per_channel on every (device, backend) pair, against the reference.

The reference itself is checked against ``torch.fake_quantize_per_channel_affine`` on finite inputs; every pair is
then checked bit for bit against the reference (docs/numerics.md, Per-channel fake quantization).
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
    qparams_per_channel,
    seeded_qparams,
    special_values,
    symmetric_ties,
    ties,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_per_channel


@pytest.mark.parametrize("quant_min,quant_max", RANGES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reference_matches_torch(quant_min, quant_max, axis):
    g = torch.Generator().manual_seed(quant_max + axis)
    x = torch.randn(5, 6, 7, generator=g) * (quant_max - quant_min) * 0.05
    scale, zp = qparams_per_channel(x.size(axis), quant_min, quant_max, g)
    out, mask = reference.fake_quant_per_channel_forward(x, scale, zp, axis, quant_min, quant_max)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % 3, quant_min, quant_max)
    assert_identical(out, expected)


# ---------------------------------------------------------------------------------------------
# Every pair against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_min,quant_max", [(-128, 127), (0, 255), (-1, 0), (0, 65535)])
@pytest.mark.parametrize("axis", [0, 1, 3])
def test_matches_reference_and_torch(device, quant_min, quant_max, axis):
    g = torch.Generator().manual_seed(axis)
    base = torch.randn(3, 5, 7, 9, generator=g) * (quant_max - quant_min) * 0.03
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    scale, zp = qparams_per_channel(base.size(axis), quant_min, quant_max, g, device)
    for name, x in layouts(base.to(device)).items():
        out, mask = OP(x, scale, zp, axis, quant_min, quant_max)
        ref_out, ref_mask = reference.fake_quant_per_channel_forward(x, scale, zp, axis, quant_min, quant_max)
        assert_identical(out, ref_out)
        assert_identical(mask, ref_mask)
        # PyTorch's per-channel CPU kernel converts levels to int64, so |x / scale| >= 2^63 lands on
        # quant_min there; docs/numerics.md sends it to the range end it overflows, as +-inf.
        finite = torch.isfinite(x) & (x.abs() < 1e18)
        expected = torch.fake_quantize_per_channel_affine(
            torch.where(finite, x, 0), scale, zp, axis, quant_min, quant_max
        )
        assert torch.equal(out[finite], expected[finite]), name


def test_ties(device):
    channels = 4
    scale = torch.tensor([0.1, 0.25, 1 / 3, 2.0])
    zp = torch.tensor([0, -3, 5, 127], dtype=torch.int32)
    columns = [ties(scale[c].item(), int(zp[c]), -128, 127) for c in range(channels)]
    x, scale, zp = on(device, torch.stack(columns, dim=1), scale, zp)  # channels on axis 1
    out, mask = OP(x, scale, zp, 1, -128, 127)
    assert_identical(out, reference.fake_quant_per_channel_forward(x, scale, zp, 1, -128, 127)[0])
    assert_identical(out, torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127))


def per_channel_case(shape, axis, gen):
    channels = shape[axis]
    scale = torch.rand(channels, generator=gen) * 0.2 + 0.01
    zero_point = torch.randint(-3, 4, (channels,), generator=gen, dtype=torch.int32)
    view = [1] * len(shape)
    view[axis] = channels
    x = torch.randn(shape, generator=gen) * scale.reshape(view) * 12
    # Every eighth element an exact tie of its own channel's scale.
    k = torch.randint(-20, 20, shape, generator=gen).float() + 0.5
    tie = (torch.arange(x.numel()) % 8 == 0).reshape(shape)
    x = torch.where(tie, k * scale.reshape(view), x)
    return x, scale, zero_point


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "shape,axis",
    [((4, 3, 5, 7), 0), ((4, 3, 5, 7), 1), ((4, 3, 5, 7), -1), ((2, 1, 33), 1), ((37,), 0), ((6, 130), 0)],
    ids=["nchw-0", "nchw-1", "nchw-last", "size1-axis", "1d", "tail"],
)
def test_cases_every_layout_bit_for_bit(device, shape, axis, dtype):
    gen = torch.Generator().manual_seed(3)
    x, scale, zero_point = per_channel_case(shape, axis, gen)
    x.view(-1)[:: max(1, x.numel() // 5)] = torch.tensor(NONFINITE[: len(x.view(-1)[:: max(1, x.numel() // 5)])])
    scale, zero_point = scale.to(device), zero_point.to(device)
    for name, xl in any_layouts(x.to(dtype=dtype, device=device)).items():
        for compute_mask in (True, False):
            out, mask = OP(xl, scale, zero_point, axis, -16, 15, compute_mask)
            ref_out, ref_mask = reference.fake_quant_per_channel_forward(
                xl, scale, zero_point, axis, -16, 15, compute_mask
            )
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert_layout_of(out, xl), name


SHAPES = [(3, 5, 7), (4, 3, 5, 7), (8, 16, 3, 3), (2, 0, 3), (5,), "large"]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_layouts_and_every_axis(device, dtype, shape):
    shape = (large(device),) if shape == "large" else shape
    for axis in range(-len(shape), len(shape)):
        scale, zero_point = seeded_qparams(shape[axis], torch.int64 if axis % 2 else torch.int32, device=device)
        for name, x in kernel_layouts(special_values(shape, 0.05, dtype, device)):
            out, mask = OP(x, scale, zero_point, axis, -128, 127)
            expected = reference.fake_quant_per_channel_forward(x, scale, zero_point, axis, -128, 127)
            assert out.stride() == torch.empty_like(x).stride(), name
            assert_bits_equal(out, expected[0])
            assert_bits_equal(mask, expected[1])


def test_expanded_input_and_strided_qparams(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 9, generator=gen).to(device).expand(5, 4, 9)  # stride 0: not dense, copied
    scale = (torch.rand(8, generator=gen) * 0.2 + 0.05).to(device)[::2]  # a strided 1-D scale
    zero_point = torch.zeros(4, dtype=torch.int64, device=device)
    out, mask = OP(x, scale, zero_point, 1, -8, 7)
    ref_out, ref_mask = reference.fake_quant_per_channel_forward(x, scale, zero_point, 1, -8, 7)
    assert_bits_equal(out, ref_out)
    assert_bits_equal(mask, ref_mask)
    assert out.is_contiguous()
    x = special_values((6, 10), 0.05, torch.float32, device)
    scale = (torch.rand(12, generator=gen)[::2] * 0.1 + 0.01).to(device)  # non-contiguous 1-D parameters
    zero_point = torch.randint(-5, 5, (12,), generator=gen).to(device)[::2]
    out, mask = OP(x, scale, zero_point, 0, -128, 127)
    expected = reference.fake_quant_per_channel_forward(x, scale, zero_point, 0, -128, 127)
    assert_bits_equal(out, expected[0])
    assert_bits_equal(mask, expected[1])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("compute_mask", [True, False])
def test_layouts_and_strides_of_the_outputs(device, dtype, compute_mask):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 3, 5, 6, generator=g) * 3
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    base = base.to(dtype=dtype, device=device)
    scale, zp = qparams_per_channel(4, -128, 127, g, device)
    for name, x in layouts(base).items():
        out, mask = OP(x, scale, zp, 0, -128, 127, compute_mask)
        ref_out, ref_mask = fakequant.ops.kernels("reference")["fake_quant_per_channel"](
            x, scale, zp, 0, -128, 127, compute_mask
        )
        assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), (1,), (1, 1, 1, 1), (2, 3, 5, 7), (1023,)])
def test_odd_and_empty_shapes(device, shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = (torch.randn(shape, generator=g) * 2).to(device)
    channels = x.size(0)
    scale_c = torch.full((channels,), 0.03, device=device)
    zp_c = torch.zeros(channels, dtype=torch.int32, device=device)
    out, _ = OP(x, scale_c, zp_c, 0, -8, 7)
    assert_identical(out, reference.fake_quant_per_channel_forward(x, scale_c, zp_c, 0, -8, 7)[0])
    x = torch.empty(3, 0, 2, device=device)
    out, _ = OP(x, *qparams([0.1, 0.2, 0.3], [0, 0, 0], device), 0, -8, 7)
    assert out.shape == x.shape


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
        channel_scale = torch.tensor([scale, scale * 0.75], device=device)
        channel_zp = torch.tensor([zero_point, quant_max], dtype=torch.int64, device=device)
        xc = x[:220].reshape(2, 110)
        out, mask = OP(xc, channel_scale, channel_zp, 0, quant_min, quant_max)
        ref_out, ref_mask = reference.fake_quant_per_channel_forward(
            xc, channel_scale, channel_zp, 0, quant_min, quant_max
        )
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)


def test_matches_torch_fake_quantize_on_finite_fp32(device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, large(device) // 251, generator=g) * 5).to(device)
    scales = (torch.rand(256, generator=g) * 0.1 + 0.01).to(device)
    zps = torch.randint(-10, 10, (256,), generator=g).int().to(device)
    out, _ = OP(x, scales, zps, 0, -128, 127)
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(x, scales, zps, 0, -128, 127))


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_autograd_reference(device, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 4, 3, 5, generator=g) * 4).to(dtype=dtype, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    scale_c, zp_c = qparams_per_channel(6, -8, 7, g, device)
    out, (grad,) = grads(lambda a: fakequant.fake_quant_per_channel(a, scale_c, zp_c, 0, -8, 7), [x])
    ref_out, (ref_grad,) = grads(lambda a: autograd_reference.fake_quant_per_channel(a, scale_c, zp_c, 0, -8, 7), [x])
    assert_identical(out, ref_out)
    assert_identical(grad, ref_grad)


@pytest.mark.parametrize("dtype", FLOATS)
def test_backward_every_layout_bit_for_bit(device, dtype):
    torch.manual_seed(3)
    for _name, x in kernel_layouts(special_values((4, 3, 5, 7), 0.0371, dtype, device).nan_to_num(0.0)):
        x = x.detach().requires_grad_()
        grad_out = torch.randn(x.shape, device=device).to(dtype)
        scales, zps = seeded_qparams(x.shape[1], device=device)
        (got,) = torch.autograd.grad(fakequant.fake_quant_per_channel(x, scales, zps, 1, -128, 127), x, grad_out)
        (want,) = torch.autograd.grad(autograd_reference.fake_quant_per_channel(x, scales, zps, 1, -128, 127), x,
                                      grad_out)  # fmt: skip
        assert_bits_equal(got, want)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    scale_c, zp_c = qparams_per_channel(3, -128, 127, g, device)
    for args in [(x, scale_c, zp_c, 0, -128, 127), (x.transpose(0, 2), scale_c, zp_c, 2, -128, 127)]:
        torch.library.opcheck(OP.default, (args[0].clone().requires_grad_(), *args[1:]))
    x = special_values((4, 3, 5, 7), 0.05, device=device).nan_to_num(0.0, 1.0, -1.0)
    scales, zps = seeded_qparams(3, device=device)
    torch.library.opcheck(OP, (x.clone().requires_grad_(), scales, zps, 1, -128, 127, True))
    torch.library.opcheck(OP, (x.contiguous(memory_format=torch.channels_last), scales, zps, 1, -128, 127, True))


# ---------------------------------------------------------------------------------------------
# Bad arguments: the reference's ValueError on every pair
# ---------------------------------------------------------------------------------------------

X = torch.randn(2, 3)
SC = torch.full((3,), 0.1)
ZC = torch.zeros(3, dtype=torch.int32)
BAD = [
    ((X, SC, ZC, 2, -8, 7), r"axis 2 is out of range for a tensor with 2 dimensions \(allowed: -2 to 1\)"),
    ((X, SC, ZC, -3, -8, 7), r"axis -3 is out of range"),
    ((X, SC, ZC, 0, -8, 7), r"per-channel scale must be 1-D with 2 elements"),
    ((X, SC[:2], ZC, 0, -8, 7), r"per-channel zero_point must be 1-D with 2 elements"),
    ((X, SC.reshape(3, 1), ZC, 1, -8, 7), r"per-channel scale must be 1-D with 3 elements"),
    ((X, SC, ZC, 1, 7, -8), r"quant_min \(7\) must be <= quant_max \(-8\)"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments(device, args, message):
    with pytest.raises(ValueError, match=message):
        OP(*on(device, *args))


BAD_VALUES = [
    ((X, torch.tensor([0.1, -0.1, 0.1]), ZC, 1, -8, 7), SCALE_MESSAGE + r", got -0.1"),
    ((X, torch.tensor([0.1, 0.1, 1e-40]), ZC, 1, -8, 7), SCALE_MESSAGE + r", got 9.99"),
    ((X, SC, torch.tensor([0, 0, -9], dtype=torch.int32), 1, -8, 7), r"zero_point -9 is outside"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_values(device, args, message):
    args = on(device, *args)
    if device != "cpu":
        OP(*args)  # no value checks on a GPU: they would cost a device-to-host sync per call
        return
    with pytest.raises(ValueError, match=message):
        OP(*args)


BAD_WORD_FOR_WORD = [
    (X, SC, ZC, 2, -8, 7),
    (X, SC, ZC, -3, -8, 7),
    (torch.tensor(1.0), SC, ZC, 0, -8, 7),
    (X, SC, ZC, 0, -8, 7),
    (X, SC[:2], ZC, 0, -8, 7),
    (X, SC.reshape(3, 1), ZC, 1, -8, 7),
    (X, torch.tensor([0.1, -0.1, 0.1]), ZC, 1, -8, 7),
    (X, torch.tensor([0.1, 0.2, 0.0]), ZC, 1, -8, 7),
    (X, SC, torch.tensor([0, 0, -9], dtype=torch.int32), 1, -8, 7),
    (X, SC, ZC, 1, 7, -8),
    (X.half(), SC, ZC.double(), 1, -8, 7),
]


@pytest.mark.parametrize("args", BAD_WORD_FOR_WORD, ids=range(len(BAD_WORD_FOR_WORD)))
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernels("reference")["fake_quant_per_channel"], args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py (each kernel path once, under compute-sanitizer on a GPU)."""
    for axis in range(inp.x.dim()):
        scale, zero_point = inp.qparams(inp.x.size(axis))
        yield f"axis={axis}", "fake_quant_per_channel", (inp.x, scale, zero_point, axis, -8, 7, True)
