"""The cross-backend suite: every ``fakequant::`` op, on every backend present, against the reference.

The ``backend`` fixture (tests/conftest.py) runs each test once per backend available for CPU tensors:
the C++ kernels ("auto", "cuda"), the Triton kernels under the interpreter ("triton") and the reference.

The reference itself is checked against ``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine`` on finite inputs; every backend is then checked bit for bit
against the reference in fp32, and against the reference's computation in fp32 for fp16/bf16.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fakequant
from fakequant import _backend, reference
from fakequant.qparams import quant_range

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact equality: same dtype, shape, values, NaN positions."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def qparams_per_tensor(scale: float, zero_point: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.int32)


def qparams_per_channel(channels: int, quant_min: int, quant_max: int, generator: torch.Generator):
    scale = torch.rand(channels, generator=generator) * 0.2 + 0.01
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator, dtype=torch.int32)
    return scale, zero_point


def ties(scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """Inputs (k + 0.5) * scale around and beyond the range, plus their fp32 neighbours."""
    k = torch.arange(quant_min - zero_point - 3, quant_max - zero_point + 3, dtype=torch.float32)
    x = (k + 0.5) * scale
    return torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1), k * scale])


RANGES = [quant_range(b) for b in (1, 2, 4, 8, 16)]
RANGES += [quant_range(b, signed=False) for b in (1, 3, 8, 16)]
RANGES += [quant_range(b, narrow_range=True) for b in (2, 8)]


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values (x is 4-D) as contiguous, channels_last, transposed and sliced (non-dense)."""
    wide = torch.cat([x, x], dim=3)
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(0, 2).contiguous().transpose(0, 2),
        "sliced": wide[..., ::2],
    }


SPECIAL = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-40])


# ---------------------------------------------------------------------------------------------
# The reference against PyTorch's own fake quantization (finite inputs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_min,quant_max", RANGES)
def test_reference_per_tensor_matches_torch(quant_min, quant_max):
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


@pytest.mark.parametrize("quant_min,quant_max", RANGES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reference_per_channel_matches_torch(quant_min, quant_max, axis):
    g = torch.Generator().manual_seed(quant_max + axis)
    x = torch.randn(5, 6, 7, generator=g) * (quant_max - quant_min) * 0.05
    scale, zp = qparams_per_channel(x.size(axis), quant_min, quant_max, g)
    out, mask = reference.fake_quant_per_channel_forward(x, scale, zp, axis, quant_min, quant_max)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % 3, quant_min, quant_max)
    assert_identical(out, expected)


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
# Every backend against the reference
# ---------------------------------------------------------------------------------------------


def _per_tensor_case(x, quant_min, quant_max, scale_value=0.1, zero_point=None):
    zero_point = (quant_min + quant_max) // 2 if zero_point is None else zero_point
    scale, zp = qparams_per_tensor(scale_value, zero_point)
    return (x, scale, zp, quant_min, quant_max)


@pytest.mark.parametrize("quant_min,quant_max", RANGES)
def test_per_tensor_matches_reference(backend, quant_min, quant_max):
    g = torch.Generator().manual_seed(1)
    for scale_value in (0.1, 1 / 3, 0.125):
        zero_point = (quant_min + quant_max + 1) // 2
        x = torch.cat([torch.randn(1031, generator=g) * scale_value * (quant_max - quant_min),
                       ties(scale_value, zero_point, quant_min, quant_max), SPECIAL])
        args = _per_tensor_case(x, quant_min, quant_max, scale_value, zero_point)
        out, mask = torch.ops.fakequant.fake_quant_per_tensor(*args)
        ref_out, ref_mask = reference.fake_quant_per_tensor_forward(*args)
        assert_identical(out, ref_out)
        assert_identical(mask, ref_mask)
        finite = torch.isfinite(x)
        expected = torch.fake_quantize_per_tensor_affine(x[finite], *args[1:])
        assert_identical(out[finite], expected)


@pytest.mark.parametrize("quant_min,quant_max", [(0, 255), (-128, 127), (0, 15), (-8, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_relu_per_tensor_is_relu_then_fake_quant(backend, quant_min, quant_max, dtype):
    # relu=True: the values of fake_quant(relu(x)), the mask of fake_quant's and ReLU's gradients (x > 0).
    g = torch.Generator().manual_seed(2)
    for scale_value, zero_point in ((0.1, quant_min), (1 / 3, (quant_min + quant_max) // 2), (0.125, quant_max)):
        x = torch.cat([torch.randn(1031, generator=g) * scale_value * (quant_max - quant_min),
                       ties(scale_value, zero_point, quant_min, quant_max), SPECIAL]).to(dtype)
        for layout in layouts(x[:1020].reshape(3, 5, 4, 17)).values():
            for sample in (x, layout):
                args = _per_tensor_case(sample, quant_min, quant_max, scale_value, zero_point)
                out, mask = torch.ops.fakequant.fake_quant_per_tensor(*args, True, True)
                ref_out, ref_mask = reference.fake_quant_per_tensor_forward(torch.relu(sample), *args[1:])
                assert_identical(out, ref_out)
                assert_identical(mask, ref_mask & (sample > 0))
                assert_identical(torch.ops.fakequant.fake_quant_per_tensor(*args, False, True)[0], ref_out)
                assert_identical(
                    mask, reference.fake_quant_per_tensor_forward(*args, True, True)[1]
                )


@pytest.mark.parametrize("quant_min,quant_max", [(-128, 127), (0, 255), (-1, 0), (0, 65535)])
@pytest.mark.parametrize("axis", [0, 1, 3])
def test_per_channel_matches_reference(backend, quant_min, quant_max, axis):
    g = torch.Generator().manual_seed(axis)
    base = torch.randn(3, 5, 7, 9, generator=g) * (quant_max - quant_min) * 0.03
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    scale, zp = qparams_per_channel(base.size(axis), quant_min, quant_max, g)
    for name, x in layouts(base).items():
        out, mask = torch.ops.fakequant.fake_quant_per_channel(x, scale, zp, axis, quant_min, quant_max)
        ref_out, ref_mask = reference.fake_quant_per_channel_forward(x, scale, zp, axis, quant_min, quant_max)
        assert_identical(out, ref_out)
        assert_identical(mask, ref_mask)
        # PyTorch's per-channel CPU kernel converts levels to int64, so |x / scale| >= 2^63 lands on
        # quant_min there; SPEC §1 sends it to the range end it overflows, as +-inf.
        finite = torch.isfinite(x) & (x.abs() < 1e18)
        expected = torch.fake_quantize_per_channel_affine(
            torch.where(finite, x, 0), scale, zp, axis, quant_min, quant_max
        )
        assert torch.equal(out[finite], expected[finite]), name


def test_per_channel_ties(backend):
    channels = 4
    scale = torch.tensor([0.1, 0.25, 1 / 3, 2.0])
    zp = torch.tensor([0, -3, 5, 127], dtype=torch.int32)
    columns = [ties(scale[c].item(), int(zp[c]), -128, 127) for c in range(channels)]
    x = torch.stack(columns, dim=1)  # channels on axis 1
    out, mask = torch.ops.fakequant.fake_quant_per_channel(x, scale, zp, 1, -128, 127)
    assert_identical(out, reference.fake_quant_per_channel_forward(x, scale, zp, 1, -128, 127)[0])
    assert_identical(out, torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compute_mask", [True, False])
def test_all_forward_ops_layouts_dtypes(backend, dtype, compute_mask):
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(4, 3, 5, 6, generator=g) * 3)
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    base = base.to(dtype)
    scale_t, zp_t = qparams_per_tensor(0.05, -3)
    scale_c, zp_c = qparams_per_channel(4, -128, 127, g)
    gamma = torch.randn(4, generator=g)
    var = torch.rand(4, generator=g) + 0.1
    for name, x in layouts(base).items():
        cases = {
            "fake_quant_per_tensor": (x, scale_t, zp_t, -128, 127, compute_mask),
            "fake_quant_per_channel": (x, scale_c, zp_c, 0, -128, 127, compute_mask),
            "binarize": (x, True, compute_mask),
            "bn_fold_fake_quant_weight": (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, compute_mask),
        }
        for op_name, args in cases.items():
            out, mask = getattr(torch.ops.fakequant, op_name)(*args)
            ref_out, ref_mask = fakequant._ops.DEFAULT_KERNELS[op_name](*args)
            assert_identical(out, ref_out)
            assert_identical(mask, ref_mask)
            assert out.stride() == ref_out.stride(), (op_name, name)
            if compute_mask:
                assert mask.stride() == out.stride(), (op_name, name)
            else:
                assert mask.numel() == 0


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0, 2), (1,), (1, 1, 1, 1), (2, 3, 5, 7), (1023,)])
def test_odd_and_empty_shapes(backend, shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = torch.randn(shape, generator=g) * 2
    scale, zp = qparams_per_tensor(0.02, 0)
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zp, -128, 127)
    assert_identical(out, reference.fake_quant_per_tensor_forward(x, scale, zp, -128, 127)[0])
    out, mask = torch.ops.fakequant.binarize(x)
    assert_identical(out, reference.binarize_forward(x)[0])
    if x.dim() >= 1:
        channels = x.size(0)
        scale_c = torch.full((channels,), 0.03)
        zp_c = torch.zeros(channels, dtype=torch.int32)
        out, _ = torch.ops.fakequant.fake_quant_per_channel(x, scale_c, zp_c, 0, -8, 7)
        assert_identical(out, reference.fake_quant_per_channel_forward(x, scale_c, zp_c, 0, -8, 7)[0])


def test_binarize_values(backend):
    x = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 2.0, float("nan"), float("inf"), -float("inf")])
    out, mask = torch.ops.fakequant.binarize(x)
    assert out[:8].tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    assert torch.isnan(out[8]) and out[9] == 1 and out[10] == -1
    assert mask.tolist() == [False, True, True, True, True, True, True, False, False, False, False]


def test_non_finite_values(backend):
    scale, zp = qparams_per_tensor(0.5, 2)
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zp, 0, 15)
    assert torch.isnan(out[0]) and out[1] == (15 - 2) * 0.5 and out[2] == (0 - 2) * 0.5
    assert not mask.any()


# ---------------------------------------------------------------------------------------------
# Backward against the reference's autograd
# ---------------------------------------------------------------------------------------------


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    (out.float() * weights.float()).sum().backward()
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_autograd(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 4, 3, 5, generator=g) * 4).to(dtype).contiguous(memory_format=torch.channels_last)
    scale_t, zp_t = qparams_per_tensor(0.05, 1)
    scale_c, zp_c = qparams_per_channel(6, -8, 7, g)

    cases = [
        (lambda a: fakequant.fake_quant_per_tensor(a, scale_t, zp_t, -16, 15),
         lambda a: reference.fake_quant_per_tensor(a, scale_t, zp_t, -16, 15), [x]),
        (lambda a: fakequant.fake_quant_per_tensor(a, scale_t, zp_t, -16, 15, relu=True),
         lambda a: reference.fake_quant_per_tensor(a, scale_t, zp_t, -16, 15, relu=True), [x]),
        (lambda a: fakequant.fake_quant_per_channel(a, scale_c, zp_c, 0, -8, 7),
         lambda a: reference.fake_quant_per_channel(a, scale_c, zp_c, 0, -8, 7), [x]),
        (lambda a: fakequant.binarize(a, clipped_ste=True),
         lambda a: reference.binarize(a, clipped_ste=True), [x]),
        (lambda a: fakequant.binarize(a, clipped_ste=False),
         lambda a: reference.binarize(a, clipped_ste=False), [x]),
    ]
    for fused, ref, inputs in cases:
        out, grads = _grads(fused, inputs)
        ref_out, ref_grads = _grads(ref, inputs)
        assert_identical(out, ref_out)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            assert_identical(grad, ref_grad)


@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_bn_fold_backward_matches_reference_autograd(backend, divide_by_fold):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 3, 3, 3, generator=g)
    gamma = torch.randn(8, generator=g)  # negative factors included
    if divide_by_fold:
        gamma[3] = 0  # f taken as 1
    var = torch.rand(8, generator=g) + 0.5
    scale, zp = qparams_per_channel(8, -8, 7, g)  # a narrow range, so some weights are clipped
    args = (1e-5, scale, zp, -8, 7, divide_by_fold)
    fused = lambda w, ga, v: fakequant.bn_fold_fake_quant_weight(w, ga, v, *args)
    ref = lambda w, ga, v: reference.bn_fold_fake_quant_weight(w, ga, v, *args)
    out, (gw, gg, gv) = _grads(fused, [weight, gamma, var])
    ref_out, (rgw, rgg, rgv) = _grads(ref, [weight, gamma, var])
    assert_identical(out, ref_out)
    assert (gw == 0).any() and (gw != 0).any(), "the case should clip some weights and pass others"
    if not divide_by_fold:
        assert_identical(gw, rgw)
        torch.testing.assert_close(gg, rgg, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv, rgv, rtol=1e-5, atol=1e-6)
        return
    # Autograd's weight gradient is (grad / f) * f, and its gamma/var gradients subtract two nearly
    # cancelling sums that the fused kernels sum as differences: rounding apart (tests/test_autograd.py).
    torch.testing.assert_close(gw, rgw, rtol=1e-6, atol=0)
    for fused_grad, ref_grad in ((gg, rgg), (gv, rgv)):
        assert (fused_grad - ref_grad).abs().max() <= 5e-5 * ref_grad.abs().max()
        assert fused_grad[3] == 0


def test_masked_grad_mixed_layouts(backend):
    g = torch.Generator().manual_seed(5)
    mask = (torch.randn(2, 3, 4, 5, generator=g) > 0).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 4, 5, generator=g)
    out = torch.ops.fakequant.masked_grad(grad, mask)
    assert_identical(out, torch.where(mask, grad, 0.0))


def test_backward_without_mask_is_an_error(backend):
    x = torch.randn(4, requires_grad=True)
    scale, zp = qparams_per_tensor(0.1, 0)
    out, _ = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zp, -8, 7, False)
    with pytest.raises(RuntimeError, match="compute_mask=False"):
        out.sum().backward()


def test_functional_skips_mask_only_without_grad(backend):
    x = torch.randn(16)
    scale, zp = qparams_per_tensor(0.1, 0)
    with torch.no_grad():
        inference = fakequant.fake_quant_per_tensor(x.requires_grad_(), scale, zp, -8, 7)
    training = fakequant.fake_quant_per_tensor(x, scale, zp, -8, 7)
    assert_identical(inference, training.detach())
    assert training.requires_grad and not inference.requires_grad


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


def _op_samples():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 5, generator=g) * 2
    scale_t, zp_t = qparams_per_tensor(0.05, 2)
    scale_c, zp_c = qparams_per_channel(3, -128, 127, g)
    gamma, var = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.1
    mask = torch.randn(3, 4, 5, generator=g) > 0
    return {
        "fake_quant_per_tensor": [
            (x, scale_t, zp_t, -128, 127), (x, scale_t, zp_t, 0, 255, False), (x, scale_t, zp_t, 0, 255, True, True)
        ],
        "fake_quant_per_channel": [(x, scale_c, zp_c, 0, -128, 127), (x.transpose(0, 2), scale_c, zp_c, 2, -128, 127)],
        "binarize": [(x,), (x, False)],
        "bn_fold_fake_quant_weight": [
            (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127),
            (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, True, True),
            (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, False, True),  # differentiable without a mask
        ],
        "masked_grad": [(x, mask)],
        "bn_fold_fake_quant_weight_backward": [
            (x * 0.5, x, gamma, var, 1e-5, scale_c, zp_c, -128, 127),
            (x * 0.5, x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, True),
        ],
        "observe_range": [
            (x, torch.zeros(2), torch.ones(()), torch.zeros((), dtype=torch.int32), None, 1.0, 0, 255, False),
            (x, torch.randn(2, 4, generator=g), torch.ones(4), torch.zeros(4, dtype=torch.int64), 1, 0.01, -128, 127,
             True),
            (x, torch.zeros(2), torch.ones(1), torch.zeros(1, dtype=torch.int32), None, 1.0, -8, 7, True, gamma),
        ],
        "fake_quant_per_group": [
            (torch.randn(6, 8, generator=g), torch.rand(6, 2, generator=g) + 0.05, torch.zeros(6, 2, dtype=torch.int32),
             4, -8, 7),
            (torch.randn(6, 8, 1, 1, generator=g), torch.rand(6, 4, generator=g) + 0.05,
             torch.randint(-2, 3, (6, 4), generator=g, dtype=torch.int32), 2, -8, 7, False),
        ],
        "fake_quant_learnable": [
            (x, scale_t, zp_t, None, -128, 127, 0.1),
            (x, scale_c, zp_c.float(), 0, -128, 127, 0.05),  # a learned (float) zero point
        ],
        "fake_quant_learnable_backward": [
            (x * 0.5, x, scale_t, zp_t, None, -128, 127, 0.1),
            ((x * 0.5).transpose(0, 2), x.transpose(0, 2), scale_c, zp_c.float(), 2, -8, 7, 0.05),
        ],
    }


@pytest.mark.parametrize("op_name", fakequant._ops.OP_NAMES)
def test_opcheck(backend, op_name):
    op = getattr(torch.ops.fakequant, op_name).default
    for args in _op_samples()[op_name]:
        compute_mask = args[8] if op_name == "bn_fold_fake_quant_weight" and len(args) > 8 else (
            args[-1] if isinstance(args[-1], bool) and op_name != "binarize" else True
        )
        # The BN fold's backward recomputes the mask instead of reading it.
        differentiable = op_name == "bn_fold_fake_quant_weight" or compute_mask and op_name not in (
            "masked_grad", "bn_fold_fake_quant_weight_backward", "observe_range", "fake_quant_learnable_backward"
        )
        if differentiable:
            args = (args[0].clone().requires_grad_(),) + args[1:]
        if op_name == "fake_quant_learnable":  # gradients to the scale and a float zero point too
            args = (args[0], args[1].clone().requires_grad_(), args[2].clone().requires_grad_(
                args[2].is_floating_point()), *args[3:])  # fmt: skip
        torch.library.opcheck(op, args)


def _compile_cases() -> list:
    """(device, backend) pairs for the compile test: every backend that runs on each device present. Triton on
    CPU tensors is the interpreter, which torch.compile's generated code cannot call into as a kernel would."""
    cases = []
    for device in ("cpu", "cuda"):
        for name in _backend.available_backends(device):
            if not (device == "cpu" and name == "triton"):
                cases.append(pytest.param(device, name, id=f"{device}-{name}"))
    return cases


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("device, backend_name", _compile_cases())
def test_torch_compile_fullgraph(dynamic, device, backend_name):
    """A training step that calls every op (the backward calls masked_grad and the BN fold's backward; the
    range observer updates its state in place) compiles with fullgraph=True and matches eager mode."""
    if _backend.get_backend() != "auto":
        pytest.fail("the backend should be auto outside the backend fixture")

    def step(x, w, gamma, var, scale, zp, scale_c, zp_c, tracked, observed_scale, observed_zp):
        torch.ops.fakequant.observe_range(x.detach(), tracked, observed_scale, observed_zp, None, 0.01, -128, 127,
                                          False)  # fmt: skip
        a = fakequant.fake_quant_per_tensor(x, scale, zp, -128, 127)
        b = fakequant.binarize(a)
        c = fakequant.fake_quant_per_channel(w, scale_c, zp_c, 0, -8, 7)
        d = fakequant.bn_fold_fake_quant_weight(w, gamma, var, 1e-5, scale_c, zp_c, -8, 7)
        e = fakequant.bn_fold_fake_quant_weight(w, gamma, var, 1e-5, scale_c, zp_c, -8, 7, divide_by_fold=True)
        return (a * b).sum() + (c * d * e).sum()

    def state():
        return [torch.tensor([-1.0, 1.0], device=device), torch.ones((), device=device),
                torch.zeros((), dtype=torch.int32, device=device)]  # fmt: skip

    g = torch.Generator().manual_seed(8)
    inputs = [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g),
              torch.rand(5, generator=g) + 0.1, *qparams_per_tensor(0.05, 0), *qparams_per_channel(5, -8, 7, g)]
    inputs = [t.to(device) for t in inputs]
    for t in inputs[:3]:
        t.requires_grad_()
    fakequant.set_backend(backend_name)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
        eager_state, compiled_state = state(), state()
        eager_loss = step(*inputs, *eager_state)
        eager_grads = torch.autograd.grad(eager_loss, inputs[:3])
        compiled_loss = compiled(*inputs, *compiled_state)
        compiled_grads = torch.autograd.grad(compiled_loss, inputs[:3])
    finally:
        fakequant.set_backend("auto")
    assert_identical(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_state, eager_state, strict=True):
        assert_identical(a, b)
    assert float(eager_state[0][0]) < -1.0 or float(eager_state[1]) != 1.0  # the observer did update the state


# ---------------------------------------------------------------------------------------------
# Bad arguments: a clear ValueError on every backend
# ---------------------------------------------------------------------------------------------

X = torch.randn(2, 3)
S1, Z1 = qparams_per_tensor(0.1, 0)
BAD_PER_TENSOR = [
    ((X, S1, Z1, 5, 4), r"quant_min \(5\) must be <= quant_max \(4\)"),
    ((X, S1, Z1, -(1 << 25), 0), r"within \[-2\^24, 2\^24\]"),
    ((X, torch.tensor(0.0), Z1, -8, 7), r"scale must be finite and > 0, got 0"),
    ((X, torch.tensor(-1.0), Z1, -8, 7), r"scale must be finite and > 0, got -1"),
    ((X, torch.tensor(float("inf")), Z1, -8, 7), r"scale must be finite and > 0, got inf"),
    ((X, torch.tensor(float("nan")), Z1, -8, 7), r"scale must be finite and > 0, got nan"),
    ((X, S1, torch.tensor(9, dtype=torch.int32), -8, 7), r"zero_point 9 is outside \[quant_min, quant_max\]"),
    ((X, S1.double(), Z1, -8, 7), r"scale has dtype torch.float64; allowed: float32"),
    ((X, S1, Z1.float(), -8, 7), r"zero_point has dtype torch.float32; allowed: int32, int64"),
    ((X.double(), S1, Z1, -8, 7), r"x has dtype torch.float64; allowed: float32, float16, bfloat16"),
    ((X.int(), S1, Z1, -8, 7), r"x has dtype torch.int32"),
    ((X, torch.ones(2), Z1, -8, 7), r"per-tensor scale must have exactly one element, got shape \(2,\)"),
    ((X, S1, torch.zeros(2, dtype=torch.int32), -8, 7), r"per-tensor zero_point must have exactly one element"),
    ((X, S1.to("meta"), Z1, -8, 7), r"scale is on meta but x is on cpu"),
]


@pytest.mark.parametrize("args,message", BAD_PER_TENSOR, ids=[m for _, m in BAD_PER_TENSOR])
def test_per_tensor_bad_arguments(backend, args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fakequant.fake_quant_per_tensor(*args)


SC = torch.full((3,), 0.1)
ZC = torch.zeros(3, dtype=torch.int32)
BAD_PER_CHANNEL = [
    ((X, SC, ZC, 2, -8, 7), r"axis 2 is out of range for a tensor with 2 dimensions \(allowed: -2 to 1\)"),
    ((X, SC, ZC, -3, -8, 7), r"axis -3 is out of range"),
    ((X, SC, ZC, 0, -8, 7), r"per-channel scale must be 1-D with 2 elements"),
    ((X, SC[:2], ZC, 0, -8, 7), r"per-channel zero_point must be 1-D with 2 elements"),
    ((X, SC.reshape(3, 1), ZC, 1, -8, 7), r"per-channel scale must be 1-D with 3 elements"),
    ((X, torch.tensor([0.1, -0.1, 0.1]), ZC, 1, -8, 7), r"scale must be finite and > 0, got -0.1"),
    ((X, SC, torch.tensor([0, 0, -9], dtype=torch.int32), 1, -8, 7), r"zero_point -9 is outside"),
    ((X, SC, ZC, 1, 7, -8), r"quant_min \(7\) must be <= quant_max \(-8\)"),
]


@pytest.mark.parametrize("args,message", BAD_PER_CHANNEL, ids=[m for _, m in BAD_PER_CHANNEL])
def test_per_channel_bad_arguments(backend, args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fakequant.fake_quant_per_channel(*args)


W = torch.randn(3, 2, 1, 1)
G3, V3 = torch.ones(3), torch.ones(3)
BAD_BN_FOLD = [
    ((W, torch.ones(2), V3, 1e-5, SC, ZC, -8, 7), r"gamma must be 1-D with 3 elements \(weight.size\(0\)\)"),
    ((W, G3, torch.ones(4), 1e-5, SC, ZC, -8, 7), r"var must be 1-D with 3 elements"),
    ((W, G3, V3, -1.0, SC, ZC, -8, 7), r"eps must be finite and >= 0, got -1.0"),
    ((W, G3, V3, 1e-5, SC[:2], ZC, -8, 7), r"per-channel scale must be 1-D with 3 elements"),
    ((W, G3.int(), V3, 1e-5, SC, ZC, -8, 7), r"gamma has dtype torch.int32"),
    ((W.double(), G3, V3, 1e-5, SC, ZC, -8, 7), r"weight has dtype torch.float64"),
]


@pytest.mark.parametrize("args,message", BAD_BN_FOLD, ids=[m for _, m in BAD_BN_FOLD])
def test_bn_fold_bad_arguments(backend, args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fakequant.bn_fold_fake_quant_weight(*args)


def test_binarize_and_masked_grad_bad_arguments(backend):
    with pytest.raises(ValueError, match=r"x has dtype torch.int64; allowed: float32, float16, bfloat16"):
        torch.ops.fakequant.binarize(torch.arange(3))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the gradient's shape \(3,\)"):
        torch.ops.fakequant.masked_grad(torch.randn(3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        torch.ops.fakequant.masked_grad(torch.randn(3), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Quantization parameters (SPEC §2) against torch.ao's observers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric,signed", list(itertools.product([True, False], [True, False])))
def test_choose_qparams_matches_observers(symmetric, signed):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    quant_min, quant_max = quant_range(8, signed=signed)
    dtype = torch.qint8 if signed else torch.quint8
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    g = torch.Generator().manual_seed(9)
    for shift in (-3.0, 0.0, 2.0):
        x = torch.randn(1000, generator=g) + shift
        # The default 8-bit ranges: with a custom range torch.ao puts the unsigned symmetric zero point
        # at (qmin + qmax) // 2 = 127, without one at 128 = (qmin + qmax + 1) // 2, which SPEC §2 follows.
        observer = MinMaxObserver(dtype=dtype, qscheme=qscheme)
        observer(x)
        expected_scale, expected_zp = observer.calculate_qparams()
        scale, zp = fakequant.choose_qparams(x.min(), x.max(), quant_min, quant_max, symmetric)
        torch.testing.assert_close(scale, expected_scale.reshape(()), rtol=1e-6, atol=0)
        assert int(zp) == int(expected_zp)

    channel_scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    w = torch.randn(6, 10, generator=g) + torch.linspace(-2, 2, 6)[:, None]
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=channel_scheme)
    observer(w)
    expected_scale, expected_zp = observer.calculate_qparams()
    scale, zp = fakequant.choose_qparams(w.amin(1), w.amax(1), quant_min, quant_max, symmetric)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    assert torch.equal(zp.long(), expected_zp.long())


def test_choose_qparams_all_zero_is_finite():
    for symmetric in (True, False):
        scale, zp = fakequant.choose_qparams(torch.zeros(3), torch.zeros(3), -128, 127, symmetric)
        assert torch.all(scale == torch.finfo(torch.float32).eps)
        out = fakequant.fake_quant_per_channel(torch.zeros(3, 2), scale, zp, 0, -128, 127)
        assert torch.equal(out, torch.zeros(3, 2))


def test_quant_range_and_spec_validation():
    assert quant_range(1) == (-1, 0)
    assert quant_range(16, signed=False) == (0, 65535)
    assert quant_range(4, narrow_range=True) == (-7, 7)
    for bad in (0, 17, 8.0, True):
        with pytest.raises(ValueError, match="bits must be an int from 1 to 16"):
            quant_range(bad)
    with pytest.raises(ValueError, match="granularity must be PerTensor"):
        fakequant.QuantSpec(granularity="per_channel")
    with pytest.raises(ValueError, match="axis must be an int"):
        fakequant.PerChannel(axis="0")


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid backends: auto"):
        fakequant.set_backend("gpu")
