"""The learnable (LSQ) fake quantization: fakequant::fake_quant_learnable and its backward, on every backend.

The reference is checked against ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine``
on finite fp32 inputs; every backend is then checked against the reference: the forward and ``grad_x`` bit for
bit, the scale's and zero point's gradients (sums, added in another order by each kernel) to within
``SUM_RTOL`` of a bound on the sum of the terms' magnitudes (``magnitude_bound``), and bit for bit from one call
to the next (the sums are deterministic).
"""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference

# The scale/zero-point gradients are sums of up to ~10^5 terms here, each kernel adding them in its own order in
# fp32 (combined in fp64): measured differences from the reference's fp64 sum stay below 1e-7 of the bound below.
SUM_RTOL = 1e-6
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# The interpreter's numpy warns about inf - inf and NaN arithmetic, which the special-value cases are about.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def magnitude_bound(grad: torch.Tensor, quant_min: int, quant_max: int, grad_factor: float) -> float:
    """An upper bound on the sum of the terms' magnitudes: each term is at most ``grad_factor * |grad| *
    (quant_max - quant_min)`` (``|round(v) - v| <= 1/2``, and the zero point lies in the range)."""
    return grad_factor * float(grad.float().abs().nan_to_num(0.0, 0.0, 0.0).sum()) * max(1, quant_max - quant_min)


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan())
    difference = (actual - expected).nan_to_num(0.0).abs().max().item() if actual.numel() else 0.0
    assert difference <= SUM_RTOL * bound + 1e-12, (difference, bound)


def qparams(channels: int | None, generator: torch.Generator, learned: bool, quant_min=-128, quant_max=127):
    count = 1 if channels is None else channels
    scale = torch.rand(count, generator=generator) * 0.05 + 0.01
    zero_point = torch.randint(quant_min, quant_max + 1, (count,), generator=generator, dtype=torch.int32)
    zero_point = zero_point.clamp(-10, 10) if quant_min < 0 else zero_point
    if learned:
        zero_point = zero_point.float() + 0.3  # rounds to the integer below
    return scale, zero_point


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


# ---------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------


def check_against_reference(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    got = torch.ops.fakequant.fake_quant_learnable_backward(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor
    )
    want = reference.fake_quant_learnable_backward(grad, x, scale, zero_point, axis, quant_min, quant_max,
                                                   grad_factor)  # fmt: skip
    assert torch.equal(got[0].isnan(), want[0].isnan())
    assert torch.equal(got[0].nan_to_num(0.0), want[0].nan_to_num(0.0)) and got[0].dtype == x.dtype
    assert got[0].stride() == torch.empty_like(x).stride()
    bound = magnitude_bound(grad, quant_min, quant_max, grad_factor)
    assert_sums_close(got[1], want[1], bound)
    assert_sums_close(got[2], want[2], bound)
    again = torch.ops.fakequant.fake_quant_learnable_backward(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor
    )
    for first, second in zip(got, again, strict=True):
        assert torch.equal(first.view(torch.int8 if first.element_size() == 1 else first.dtype), second) or (
            torch.equal(first.isnan(), second.isnan()) and torch.equal(first.nan_to_num(0.0), second.nan_to_num(0.0))
        )
    forward = torch.ops.fakequant.fake_quant_learnable(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    expected = reference.fake_quant_learnable_forward(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    assert torch.equal(forward.isnan(), expected.isnan())
    assert torch.equal(forward.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_backward_matches_reference(backend, dtype, axis, layout):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 5, 3, 7, generator=g) * 2  # small: the Triton interpreter runs one program per row
    x = layouts(base.to(dtype))[layout]
    scale, zero_point = qparams(None if axis is None else x.size(axis), g, learned=axis == 1)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    check_against_reference(grad, x, scale, zero_point, axis, -128, 127, 0.01)


@pytest.mark.parametrize("axis", [None, 0])
def test_long_tensor_spans_several_chunks(backend, axis):
    if backend == "triton":
        pytest.skip("a million elements take minutes in the Triton interpreter; test_triton_spans_several_programs "
                    "covers rows of several programs")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 350001, generator=g) * 3  # odd, and several of every kernel's fixed chunks per channel
    scale, zero_point = qparams(None if axis is None else 3, g, learned=False)
    check_against_reference(torch.randn(x.shape, generator=g), x, scale, zero_point, axis, -128, 127, 1e-3)


def test_triton_spans_several_programs(backend):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 40003, generator=g) * 3  # each row more than one program's 16384 elements
    scale, zero_point = qparams(2, g, learned=False)
    check_against_reference(torch.randn(x.shape, generator=g), x, scale, zero_point, 0, -128, 127, 1e-3)


def test_ties_and_special_values(backend):
    scale, zero_point = torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32)
    k = torch.arange(-140, 135, dtype=torch.float32)
    ties = (k + 0.5) * 0.05
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-40])
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1), k * 0.05, specials])
    grad = torch.linspace(-1, 1, x.numel())
    check_against_reference(grad, x, scale, zero_point, None, -128, 127, 0.1)
    # A NaN input contributes nothing; its gradient is 0.
    nan_only = torch.full((5,), float("nan"))
    grad_x, grad_scale, grad_zero_point = torch.ops.fakequant.fake_quant_learnable_backward(
        torch.ones(5), nan_only, scale, zero_point, None, -128, 127, 1.0
    )
    assert torch.equal(grad_x, torch.zeros(5)) and float(grad_scale) == 0.0 and float(grad_zero_point) == 0.0


@pytest.mark.parametrize("shape, axis", [((0,), None), ((3, 0, 2), 1), ((3, 0, 2), 0), ((0, 4), 1)])
def test_empty(backend, shape, axis):
    x = torch.empty(shape)
    scale, zero_point = qparams(None if axis is None else x.size(axis), torch.Generator().manual_seed(0), True)
    grad_x, grad_scale, grad_zero_point = torch.ops.fakequant.fake_quant_learnable_backward(
        torch.empty(shape), x, scale, zero_point, axis, -128, 127, 0.5
    )
    assert grad_x.shape == x.shape
    assert torch.equal(grad_scale, torch.zeros_like(scale)) and torch.equal(grad_zero_point, torch.zeros(scale.shape))


# ---------------------------------------------------------------------------------------------
# Autograd, the public function, compile, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("learned_zero_point", [False, True])
def test_autograd_matches_the_references(backend, axis, learned_zero_point):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, 5, generator=g) * 2
    scale, zero_point = qparams(None if axis is None else 6, g, learned_zero_point)
    grad = torch.randn(x.shape, generator=g)
    results = []
    for fn in (fakequant.fake_quant_learnable, reference.fake_quant_learnable):
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


def test_backward_sees_the_scale_of_its_forward(backend):
    # An optimizer step updates the scale in place before the backward of a later graph runs.
    x = torch.randn(100)
    scale = torch.tensor([0.05], requires_grad=True)
    out = fakequant.fake_quant_learnable(x, scale, torch.tensor([0]), -8, 7, 1.0)
    with torch.no_grad():
        scale.mul_(3)
    out.sum().backward()
    expected = reference.fake_quant_learnable_backward(torch.ones(100), x, torch.tensor([0.05]), torch.tensor([0]),
                                                       None, -8, 7, 1.0)[1]  # fmt: skip
    assert_sums_close(scale.grad, expected, magnitude_bound(torch.ones(100), -8, 7, 1.0))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(backend, dynamic):
    if backend == "triton":
        pytest.skip("Triton on CPU tensors is the interpreter, which compiled graphs do not call into")
    x = torch.randn(8, 6, requires_grad=True)
    scale = torch.tensor([0.1, 0.05, 0.2, 0.1, 0.03, 0.07], requires_grad=True)
    zero_point = torch.zeros(6, requires_grad=True)

    def step(x, scale, zero_point):
        return (fakequant.fake_quant_learnable(x, scale, zero_point, -8, 7, 0.1, axis=1) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    eager = torch.autograd.grad(step(x, scale, zero_point), (x, scale, zero_point))
    graph = torch.autograd.grad(compiled(x, scale, zero_point), (x, scale, zero_point))
    for a, b in zip(graph, eager, strict=True):
        assert torch.equal(a, b)


X = torch.randn(4, 3)
BAD = [
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([0]), 5, -8, 7, 1.0),
     r"axis 5 is out of range for a tensor with 2 dimensions"),
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([0.0], dtype=torch.float64), None, -8, 7, 1.0),
     r"zero_point has dtype torch.float64; allowed: int32, int64, float32"),
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([0]), None, -8, 7, float("inf")),
     r"grad_factor must be finite, got inf"),
    ((torch.ones(4, 3), X, torch.tensor([-0.1]), torch.tensor([0]), None, -8, 7, 1.0),
     r"scale must be finite and > 0, got -0.1"),
    ((torch.ones(4, 3), X, torch.tensor([0.1]), torch.tensor([9]), None, -8, 7, 1.0),
     r"zero_point 9 is outside \[quant_min, quant_max\] = \[-8, 7\]"),
    ((torch.ones(4, 3), X, torch.ones(4), torch.zeros(4, dtype=torch.int32), 1, -8, 7, 1.0),
     r"per-channel scale must be 1-D with 3 elements"),
    ((torch.ones(3, 4), X, torch.tensor([0.1]), torch.tensor([0]), None, -8, 7, 1.0),
     r"grad must match x \(shape \(4, 3\), dtype torch.float32, device cpu\); got shape \(3, 4\)"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD)
def test_bad_arguments(backend, args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fakequant.fake_quant_learnable_backward(*args)
    with pytest.raises(ValueError, match=message):
        reference.fake_quant_learnable_backward(*args)


def test_learned_zero_point_is_clamped_not_refused(backend):
    x = torch.randn(50)
    out = torch.ops.fakequant.fake_quant_learnable(x, torch.tensor([0.1]), torch.tensor([30.0]), None, -8, 7, 1.0)
    assert torch.equal(out, fakequant.fake_quant_per_tensor(x, torch.tensor([0.1]), torch.tensor([7]), -8, 7))


def test_learned_zero_point_rounds_in_forward_and_backward(backend):
    x = torch.linspace(-3, 3, 101)
    scale = torch.tensor([0.02])
    for learned, fixed in ((-9.7, -10), (2.5, 2), (3.5, 4), (-0.4, 0)):
        got = torch.ops.fakequant.fake_quant_learnable_backward(
            torch.ones(101), x, scale, torch.tensor([learned]), None, -128, 127, 1.0
        )
        want = torch.ops.fakequant.fake_quant_learnable_backward(
            torch.ones(101), x, scale, torch.tensor([fixed], dtype=torch.int32), None, -128, 127, 1.0
        )
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
