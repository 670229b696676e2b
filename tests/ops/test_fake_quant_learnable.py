"""The learnable (LSQ) fake quantization: fakequant::fake_quant_learnable and its backward op on every (device,
backend) pair (docs/numerics.md, Learned step size).

The reference is checked against ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine``
on finite fp32 inputs; every pair is then checked against the reference: the forward and ``grad_x`` bit for
bit, the scale's and zero point's gradients (sums, added in another order by each kernel) to within
``SUM_RTOL`` of a bound on the sum of the terms' magnitudes (``magnitude_bound``), and bit for bit from one call
to the next (the sums are deterministic).
"""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from tests import autograd_reference
from tests.conftest import device_backend_params
from tests.ops._helpers import FLOATS, SCALE_MESSAGE, assert_bits_equal, on

# The scale/zero-point gradients are sums of up to ~10^5 terms here, each kernel adding them in its own order in
# fp32 (combined in fp64): measured differences from the reference's fp64 sum stay below 1e-7 of the bound below.
SUM_RTOL = 1e-6
# The interpreter's numpy warns about inf - inf and NaN arithmetic, which the special-value cases are about.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.fake_quant_learnable
BACKWARD = torch.ops.fakequant.fake_quant_learnable_backward


def magnitude_bound(grad: torch.Tensor, quant_min: int, quant_max: int, grad_factor: float) -> float:
    """An upper bound on the sum of the terms' magnitudes: each term is at most ``grad_factor * |grad| *
    (quant_max - quant_min)`` (``|round(v) - v| <= 1/2``, and the zero point lies in the range)."""
    return grad_factor * float(grad.float().abs().nan_to_num(0.0, 0.0, 0.0).sum()) * max(1, quant_max - quant_min)


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    actual, expected = actual.cpu(), expected.cpu()
    assert torch.equal(actual.isnan(), expected.isnan())
    difference = (actual - expected).nan_to_num(0.0).abs().max().item() if actual.numel() else 0.0
    assert difference <= SUM_RTOL * bound + 1e-12, (difference, bound)


def qparams(channels: int | None, generator: torch.Generator, learned: bool, quant_min=-128, quant_max=127,
            device="cpu"):  # fmt: skip
    count = 1 if channels is None else channels
    scale = torch.rand(count, generator=generator) * 0.05 + 0.01
    zero_point = torch.randint(quant_min, quant_max + 1, (count,), generator=generator, dtype=torch.int32)
    zero_point = zero_point.clamp(-10, 10) if quant_min < 0 else zero_point
    if learned:
        zero_point = zero_point.float() + 0.3  # rounds to the integer below
    return scale.to(device), zero_point.to(device)


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    wide = torch.cat([x, x], dim=3)
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "sliced": wide[..., ::2],
    }


# ---------------------------------------------------------------------------------------------
# The reference against PyTorch's learnable fake quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("quant_range", [(-128, 127), (0, 255), (-8, 7)])
def test_reference_matches_torch_learnable(axis, quant_range):
    quant_min, quant_max = quant_range
    g = torch.Generator().manual_seed(quant_max + (axis or 0))
    x = torch.randn(16, 12, 5, 3, generator=g) * 2
    scale, zero_point = qparams(None if axis is None else x.size(axis), g, learned=False, quant_min=quant_min,
                                quant_max=quant_max)  # fmt: skip
    # Float (learned) zero points with non-negative integer values: torch's per-tensor backward takes the zero
    # point as static_cast<int64_t>(zp + 0.5), which truncates towards zero, so for a negative zero point (or a
    # fractional one) its backward quantizes with another zero point than its own forward (zp = -10: forward
    # -10, backward -9). fakequant rounds half to even in both (test_learned_zero_point_rounds_in_forward_and_
    # backward); on the zero points where torch is consistent, the two agree.
    zero_point = zero_point.clamp(min=0).float()
    grad = torch.randn(x.shape, generator=g)
    grad_factor = fakequant.lsq_grad_factor(x, quant_max, axis)
    leaves = [t.clone().requires_grad_() for t in (x, scale, zero_point)]
    if axis is None:
        out = torch._fake_quantize_learnable_per_tensor_affine(*leaves, quant_min, quant_max, grad_factor)
    else:
        out = torch._fake_quantize_learnable_per_channel_affine(*leaves, axis, quant_min, quant_max, grad_factor)
    out.backward(grad)
    ours = reference.fake_quant_learnable_forward(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    assert torch.equal(ours, out.detach())
    grad_x, grad_scale, grad_zero_point = reference.fake_quant_learnable_backward(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor
    )
    assert torch.equal(grad_x, leaves[0].grad)
    bound = magnitude_bound(grad, quant_min, quant_max, grad_factor)
    assert_sums_close(grad_scale, leaves[1].grad, bound)
    assert_sums_close(grad_zero_point, leaves[2].grad, bound)
    assert grad_scale.abs().sum() > 0 and grad_zero_point.abs().sum() > 0  # both kinds of term occurred


def test_default_grad_factor_is_lsqs():
    x = torch.randn(64, 32)
    assert fakequant.lsq_grad_factor(x, 127) == pytest.approx(1 / (64 * 32 * 127) ** 0.5)
    assert fakequant.lsq_grad_factor(x, 7, axis=0) == pytest.approx(1 / (32 * 7) ** 0.5)
    scale = torch.tensor([0.05], requires_grad=True)
    fakequant.fake_quant_learnable(x, scale, torch.tensor([0]), -128, 127).sum().backward()
    explicit = torch.tensor([0.05], requires_grad=True)
    lsq_factor = 1 / (64 * 32 * 127) ** 0.5
    fakequant.fake_quant_learnable(x, explicit, torch.tensor([0]), -128, 127, lsq_factor).sum().backward()
    assert torch.equal(scale.grad, explicit.grad)


# ---------------------------------------------------------------------------------------------
# Every pair against the reference
# ---------------------------------------------------------------------------------------------


def check_against_reference(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    """The backward op and the forward op against the reference, run on CPU copies of the same inputs."""
    args = (grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    got = BACKWARD(*args)
    want = reference.fake_quant_learnable_backward(*cpu_args)
    assert got[0].dtype == x.dtype and got[0].device == x.device
    assert torch.equal(got[0].cpu().isnan(), want[0].isnan())
    assert torch.equal(got[0].cpu().nan_to_num(0.0), want[0].nan_to_num(0.0))
    assert got[0].stride() == torch.empty_like(x).stride()
    bound = magnitude_bound(grad, quant_min, quant_max, grad_factor)
    assert_sums_close(got[1], want[1], bound)
    assert_sums_close(got[2], want[2], bound)
    again = BACKWARD(*args)
    for first, second in zip(got, again, strict=True):
        assert_bits_equal(first, second)  # deterministic sums
    forward = OP(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    expected = reference.fake_quant_learnable_forward(*cpu_args[1:])
    assert torch.equal(forward.cpu().isnan(), expected.isnan())
    assert torch.equal(forward.cpu().nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_backward_matches_reference(device, dtype, axis, layout):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 5, 3, 7, generator=g) * 2  # small: the Triton interpreter runs one program per row
    x = layouts(base.to(dtype=dtype, device=device))[layout]
    scale, zero_point = qparams(None if axis is None else x.size(axis), g, learned=axis == 1, device=device)
    grad = torch.randn(x.shape, generator=g).to(dtype=dtype, device=device)
    check_against_reference(grad, x, scale, zero_point, axis, -128, 127, 0.01)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, axis", [("long", None), ((64, 3, 7, 5), 0), ((8, 16, 9, 9), 1),
                                         ("channels-innermost", 2), ((0,), None), ((3, 0, 2), 1)])  # fmt: skip
@pytest.mark.parametrize("learned", [False, True])
def test_backward_shapes_and_axes(device, dtype, shape, axis, learned):
    # The Triton interpreter runs one program per row of a channel's elements (per element with the channels
    # innermost), milliseconds each: on CPU tensors these two shapes are smaller than on a GPU.
    if shape == "long":
        shape = (1000003,) if device.startswith("cuda") else (100003,)
    elif shape == "channels-innermost":
        shape = (5, 7, 300) if device.startswith("cuda") else (2, 3, 40)
    generator = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    channels = 1 if axis is None else shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.05 + 0.01
    zero_point = torch.randint(-10, 10, (channels,), generator=generator, dtype=torch.int32)
    zero_point = zero_point.float() + 0.3 if learned else zero_point
    grad = torch.randn(shape, generator=generator).to(dtype)
    check_against_reference(*on(device, grad, x, scale, zero_point), axis, -128, 127, 0.01)


# A million elements take minutes in the Triton interpreter on CPU tensors: test_spans_several_programs covers
# rows of several of its programs there.
@pytest.mark.parametrize("device_backend", device_backend_params(exclude=(("cpu", "triton"),)), indirect=True)
@pytest.mark.parametrize("axis", [None, 0])
def test_long_tensor_spans_several_chunks(device, axis):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 350001, generator=g) * 3  # odd, and several of every kernel's fixed chunks per channel
    scale, zero_point = qparams(None if axis is None else 3, g, learned=False)
    grad = torch.randn(x.shape, generator=g)
    check_against_reference(*on(device, grad, x, scale, zero_point), axis, -128, 127, 1e-3)


def test_spans_several_programs(device):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 40003, generator=g) * 3  # each row more than one Triton program's 16384 elements
    scale, zero_point = qparams(2, g, learned=False)
    grad = torch.randn(x.shape, generator=g)
    check_against_reference(*on(device, grad, x, scale, zero_point), 0, -128, 127, 1e-3)


def test_ties_and_special_values(device):
    scale, zero_point = torch.tensor([0.05], device=device), torch.tensor([3], dtype=torch.int32, device=device)
    k = torch.arange(-140, 135, dtype=torch.float32)
    ties = (k + 0.5) * 0.05
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-40])
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1), k * 0.05, specials])
    grad = torch.linspace(-1, 1, x.numel())
    check_against_reference(*on(device, grad, x), scale, zero_point, None, -128, 127, 0.1)
    # A NaN input contributes nothing; its gradient is 0.
    nan_only = torch.full((5,), float("nan"), device=device)
    grad_x, grad_scale, grad_zero_point = BACKWARD(torch.ones(5, device=device), nan_only, scale, zero_point, None,
                                                   -128, 127, 1.0)  # fmt: skip
    assert torch.equal(grad_x.cpu(), torch.zeros(5)) and float(grad_scale) == 0.0 and float(grad_zero_point) == 0.0


@pytest.mark.parametrize("shape, axis", [((0,), None), ((3, 0, 2), 1), ((3, 0, 2), 0), ((0, 4), 1)])
def test_empty(device, shape, axis):
    x = torch.empty(shape, device=device)
    scale, zero_point = qparams(None if axis is None else x.size(axis), torch.Generator().manual_seed(0), True,
                                device=device)  # fmt: skip
    grad_x, grad_scale, grad_zero_point = BACKWARD(torch.empty(shape, device=device), x, scale, zero_point, axis,
                                                   -128, 127, 0.5)  # fmt: skip
    assert grad_x.shape == x.shape
    assert torch.equal(grad_scale, torch.zeros_like(scale))
    assert torch.equal(grad_zero_point, torch.zeros(scale.shape, device=device))


# ---------------------------------------------------------------------------------------------
# Autograd, the public function, compile, opcheck, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("learned_zero_point", [False, True])
def test_autograd_matches_the_autograd_reference(device, axis, learned_zero_point):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, 5, generator=g) * 2
    scale, zero_point = qparams(None if axis is None else 6, g, learned_zero_point)
    grad = torch.randn(x.shape, generator=g)
    x, scale, zero_point, grad = on(device, x, scale, zero_point, grad)
    results = []
    for fn in (fakequant.fake_quant_learnable, autograd_reference.fake_quant_learnable):
        leaves = [x.clone().requires_grad_(), scale.clone().requires_grad_(),
                  zero_point.clone().requires_grad_(learned_zero_point)]  # fmt: skip
        fn(*leaves, -128, 127, 0.02, axis=axis).backward(grad)
        results.append([leaf.grad for leaf in leaves])
    (x_grad, scale_grad, zp_grad), (x_want, scale_want, zp_want) = results
    assert torch.equal(x_grad, x_want)
    assert_sums_close(scale_grad, scale_want, magnitude_bound(grad, -128, 127, 0.02))
    if learned_zero_point:
        assert_sums_close(zp_grad, zp_want, magnitude_bound(grad, -128, 127, 0.02))
    else:
        assert zp_grad is None and zp_want is None


def test_backward_sees_the_scale_of_its_forward(device):
    # An optimizer step updates the scale in place before the backward of a later graph runs.
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([0.05], device=device, requires_grad=True)
    out = fakequant.fake_quant_learnable(x.to(device), scale, torch.tensor([0], device=device), -8, 7, 1.0)
    with torch.no_grad():
        scale.mul_(3)
    out.sum().backward()
    expected = reference.fake_quant_learnable_backward(torch.ones(100), x, torch.tensor([0.05]), torch.tensor([0]),
                                                       None, -8, 7, 1.0)[1]  # fmt: skip
    assert_sums_close(scale.grad, expected, magnitude_bound(torch.ones(100), -8, 7, 1.0))


# Triton on CPU tensors is the interpreter, which compiled graphs do not call into.
@pytest.mark.parametrize("device_backend", device_backend_params(exclude=(("cpu", "triton"),)), indirect=True)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    x = torch.randn(8, 6, device=device, requires_grad=True)
    scale = torch.tensor([0.1, 0.05, 0.2, 0.1, 0.03, 0.07], device=device, requires_grad=True)
    zero_point = torch.zeros(6, device=device, requires_grad=True)

    def step(x, scale, zero_point):
        return (fakequant.fake_quant_learnable(x, scale, zero_point, -8, 7, 0.1, axis=1) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    eager = torch.autograd.grad(step(x, scale, zero_point), (x, scale, zero_point))
    graph = torch.autograd.grad(compiled(x, scale, zero_point), (x, scale, zero_point))
    for a, b in zip(graph, eager, strict=True):
        assert torch.equal(a, b)


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    scale_t, zp_t = torch.tensor(0.05, device=device), torch.tensor(2, dtype=torch.int32, device=device)
    scale_c = (torch.rand(3, generator=g) * 0.2 + 0.01).to(device)
    zp_c = torch.randint(-128, 128, (3,), generator=g, dtype=torch.int32).to(device)
    for args in [(x, scale_t, zp_t, None, -128, 127, 0.1),
                 (x, scale_c, zp_c.float(), 0, -128, 127, 0.05)]:  # a learned (float) zero point  # fmt: skip
        # gradients to the scale and a float zero point too
        args = (args[0].clone().requires_grad_(), args[1].clone().requires_grad_(),
                args[2].clone().requires_grad_(args[2].is_floating_point()), *args[3:])  # fmt: skip
        torch.library.opcheck(OP.default, args)
    for args in [(x * 0.5, x, scale_t, zp_t, None, -128, 127, 0.1),
                 ((x * 0.5).transpose(0, 2), x.transpose(0, 2), scale_c, zp_c.float(), 2, -8, 7, 0.05)]:  # fmt: skip
        torch.library.opcheck(BACKWARD.default, args)
    scales = (torch.rand(3, generator=g) * 0.1 + 0.01).to(device)
    zps = torch.randint(-128, 128, (3,), generator=g).to(device)
    y = (torch.randn(4, 3, 5, 7, generator=g) * 3).to(device)
    torch.library.opcheck(BACKWARD, (y * 0.5, y, scales, zps.float(), 1, -128, 127, 0.01))
    y_last = y.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(BACKWARD, (y * 0.5, y_last, scales, zps.float(), 1, -128, 127, 0.01))


X = torch.randn(4, 3)
# (args, message, a value check: made on CPU tensors only, docs/numerics.md, Argument checks)
BAD = [
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([0]), 5, -8, 7, 1.0),
     r"axis 5 is out of range for a tensor with 2 dimensions", False),
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([0.0], dtype=torch.float64), None, -8, 7, 1.0),
     r"zero_point has dtype torch.float64; allowed: int32, int64, float32", False),
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([0]), None, -8, 7, float("inf")),
     r"grad_factor must be finite, got inf", False),
    ((torch.ones(4, 3), X, torch.tensor([-0.1]), torch.tensor([0]), None, -8, 7, 1.0),
     SCALE_MESSAGE + r", got -0.1", True),
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([9]), None, -8, 7, 1.0),
     r"zero_point 9 is outside \[quant_min, quant_max\] = \[-8, 7\]", True),
    ((torch.ones(4, 3), X, torch.ones(4), torch.zeros(4, dtype=torch.int32), 1, -8, 7, 1.0),
     r"per-channel scale must be 1-D with 3 elements", False),
    ((torch.ones(3, 4), X, torch.tensor([0.1]), torch.tensor([0]), None, -8, 7, 1.0),
     r"grad must match x \(shape \(4, 3\), dtype torch.float32, device DEVICE\); got shape \(3, 4\)", False),
]  # fmt: skip


@pytest.mark.parametrize("args, message, value_check", BAD, ids=range(len(BAD)))
def test_bad_arguments(device, args, message, value_check):
    with pytest.raises(ValueError, match=message.replace("DEVICE", "cpu")):
        reference.fake_quant_learnable_backward(*args)
    args = on(device, *args)
    if value_check and device != "cpu":
        BACKWARD(*args)  # no value checks on a GPU: they would cost a device-to-host sync per call
        return
    with pytest.raises(ValueError, match=message.replace("DEVICE", str(args[1].device))):
        BACKWARD(*args)


def test_learned_zero_point_is_clamped_not_refused(device):
    x = torch.randn(50, device=device)
    scale = torch.tensor([0.1], device=device)
    out = OP(x, scale, torch.tensor([30.0], device=device), None, -8, 7, 1.0)
    assert torch.equal(out, fakequant.fake_quant_per_tensor(x, scale, torch.tensor([7], device=device), -8, 7))


def test_learned_zero_point_rounds_in_forward_and_backward(device):
    x = torch.linspace(-3, 3, 101, device=device)
    scale = torch.tensor([0.02], device=device)
    ones = torch.ones(101, device=device)
    for learned, fixed in ((-9.7, -10), (2.5, 2), (3.5, 4), (-0.4, 0)):
        got = BACKWARD(ones, x, scale, torch.tensor([learned], device=device), None, -128, 127, 1.0)
        want = BACKWARD(ones, x, scale, torch.tensor([fixed], dtype=torch.int32, device=device), None, -128, 127, 1.0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases (forward and backward op) for tools/kernel_smoke.py (each kernel path once, under
    compute-sanitizer on a GPU)."""
    x = inp.x
    for axis in (None, *range(x.dim())):
        scale, zero_point = inp.qparams(None if axis is None else x.size(axis))
        learned = zero_point.float() + 0.4  # a learned zero point: rounded (and clamped) by the op
        for zp in (zero_point, learned):
            args = (x, scale, zp, axis, -8, 7, 0.05)
            tag = f"axis={axis} zp={str(zp.dtype).removeprefix('torch.')}"
            yield tag, "fake_quant_learnable", args
            yield tag, "fake_quant_learnable_backward", (inp.randn_like_base(), *args)
