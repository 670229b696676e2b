"""fakequant::bn_fold_fake_quant_weight and its backward op on every (device, backend) pair, against the reference
(docs/numerics.md, BatchNorm folding).

The backward's weight gradient is compared bit for bit; its gamma and var gradients are per-channel sums, which
each kernel adds in its own order, so they are compared to a tolerance (``assert_statistic_close``).
"""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference
from tests import autograd_reference
from tests.ops._helpers import (
    FLOATS,
    SPECIAL,
    any_layouts,
    assert_bits_equal,
    assert_identical,
    assert_layout_of,
    assert_outputs_like_reference,
    assert_same_error,
    assert_statistic_close,
    bn_case,
    grads,
    kernel_layouts,
    layouts,
    on,
    qparams,
    qparams_per_channel,
    seeded_qparams,
    special_values,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.bn_fold_fake_quant_weight
BACKWARD = torch.ops.fakequant.bn_fold_fake_quant_weight_backward
EPS = 1e-5


BN_SHAPES = {"conv": (6, 3, 3, 3), "linear": (5, 7), "linear-tail": (3, 1100), "vector": (9,), "odd": (7, 1, 5, 3)}


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divide_by_fold", [False, True], ids=["folded", "divided"])
@pytest.mark.parametrize(
    "dtype,stat_dtype", [(torch.float32,) * 2, (torch.float16, torch.float32), (torch.bfloat16,) * 2]
)
@pytest.mark.parametrize("shape", list(BN_SHAPES))
def test_forward_every_layout_bit_for_bit(device, shape, dtype, stat_dtype, divide_by_fold):
    gen = torch.Generator().manual_seed(6)
    weight, gamma, var, eps, scale, zero_point = bn_case(BN_SHAPES[shape], gen, dtype, stat_dtype, device)
    weight.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -1e30])
    gamma[1] = 0.0  # f == 0: divide_by_fold quantizes that channel unfolded (f taken as 1)
    for name, wl in any_layouts(weight).items():
        for compute_mask in (True, False):
            out, mask = OP(wl, gamma, var, eps, scale, zero_point, -128, 127, compute_mask, divide_by_fold)
            ref_out, ref_mask = reference.bn_fold_fake_quant_weight_forward(
                wl, gamma, var, eps, scale, zero_point, -128, 127, compute_mask, divide_by_fold
            )
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert_layout_of(out, wl), name


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bn_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (8,), (8, 16, 3, 3), (5, 3, 7), (1, 4, 3, 3), (16, 0, 3)])
@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_forward_special_values_and_kernel_layouts(device, dtype, bn_dtype, shape, divide_by_fold):
    channels = shape[0]
    generator = torch.Generator().manual_seed(2)
    gamma = torch.rand(channels, generator=generator) + 0.5
    var = torch.rand(channels, generator=generator) * 2
    if divide_by_fold:
        # q(w f) / f divides by f: negative factors, and gamma == 0 (the last channel), where f is taken as 1.
        gamma[::2] *= -1
        if channels > 1:
            gamma[-1] = 0.0
    gamma, var = gamma.to(bn_dtype).to(device), var.to(bn_dtype).to(device)
    scale, zero_point = seeded_qparams(channels, device=device)
    for name, w in kernel_layouts(special_values(shape, 0.05, dtype, device)):
        args = (w, gamma, var, 1e-5, scale, zero_point, -128, 127, True, divide_by_fold)
        out, mask = OP(*args)
        expected = fakequant.ops.kernels("reference")["bn_fold_fake_quant_weight"](*args)
        assert out.stride() == torch.empty_like(w).stride(), name
        assert_bits_equal(out, expected[0])
        assert_bits_equal(mask, expected[1])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("compute_mask", [True, False])
def test_layouts_and_strides_of_the_outputs(device, dtype, compute_mask):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 3, 5, 6, generator=g) * 3
    base.view(-1)[: SPECIAL.numel()] = SPECIAL
    base = base.to(dtype=dtype, device=device)
    scale_c, zp_c = qparams_per_channel(4, -128, 127, g, device)
    gamma = torch.randn(4, generator=g).to(device)
    var = (torch.rand(4, generator=g) + 0.1).to(device)
    for name, x in layouts(base).items():
        args = (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, compute_mask)
        out, mask = OP(*args)
        ref_out, ref_mask = fakequant.ops.kernels("reference")["bn_fold_fake_quant_weight"](*args)
        assert_outputs_like_reference(out, mask, ref_out, ref_mask, compute_mask, name)


def special_fold_case(dtype=torch.float32, divide_by_fold=True, device="cpu"):
    """One channel per kind of fold factor, each row with exact ties of ``w * f``, NaN, inf and saturation.

    Channels: f > 0, f < 0, gamma +0 and -0 (f == 0, taken as 1 with ``divide_by_fold``), var inf (f == 0 with
    gamma != 0), gamma NaN (f NaN), eps 0 with var 0 (f inf), a tiny f (1 / f far from 1 / fl(f)), a large f.
    """
    gamma = torch.tensor([1.3, -0.7, 0.0, -0.0, 2.0, float("nan"), 0.5, 1e-30, 3e5])
    var = torch.tensor([0.4, 1.1, 0.9, 0.2, float("inf"), 0.3, 0.0, 0.7, 1.5])
    eps = 0.0
    channels = gamma.numel()
    fold = reference.bn_fold_training_factor if divide_by_fold else reference.bn_fold_factor
    factor = fold(gamma, var, eps)
    scale = torch.full((channels,), 0.05)
    zero_point = torch.arange(channels, dtype=torch.int32) % 5 - 2
    gen = torch.Generator().manual_seed(13)
    k = torch.randint(-140, 140, (channels, 37), generator=gen).float() + 0.5
    # Exact ties of the folded value where f is finite and nonzero (w = (k + 0.5) * scale / f, up to rounding).
    weight = k * scale[:, None] / torch.where(torch.isfinite(factor) & (factor != 0), factor, 1.0)[:, None]
    weight[:, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])
    weight[:, 4] = -0.0
    weight[:, 5] = 1e30
    return (weight.to(dtype=dtype, device=device), *on(device, gamma, var), eps, *on(device, scale, zero_point))


# numpy's reduction warns when a channel's inf terms of both signs sum to NaN (the reference's NaN too).
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("divide_by_fold", [False, True], ids=["folded", "divided"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_special_fold_factors_forward_and_backward(device, dtype, divide_by_fold):
    """The backward recomputes the forward's mask (and divided output) bit for bit.

    Every row holds NaN and inf weights, which make the gamma/var gradients NaN but where divide_by_fold's f == 0
    gives exactly 0; the same weights with those replaced by a finite value compare the other channels' values.
    """
    special, gamma, var, eps, scale, zero_point = special_fold_case(dtype, divide_by_fold, device)
    finite_weights = torch.where(torch.isfinite(special), special, torch.full_like(special, 0.25))
    factor = reference.bn_fold_factor(gamma, var, eps)[:, None]
    gen = torch.Generator().manual_seed(14)
    grad = torch.randn(special.shape, generator=gen).to(dtype=dtype, device=device)
    for weight in (special, finite_weights):
        for quant_min, quant_max in ((-128, 127), (-8, 7)):
            args = (gamma, var, eps, scale, zero_point, quant_min, quant_max)
            out, mask = OP(weight, *args, True, divide_by_fold)
            ref_out, ref_mask = reference.bn_fold_fake_quant_weight_forward(weight, *args, True, divide_by_fold)
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            got = BACKWARD(grad, weight, *args, divide_by_fold)
            want = reference.bn_fold_fake_quant_weight_backward(grad, weight, *args, divide_by_fold)
            # The weight's gradient is the masked grad (times f when folded): a mask bit recomputed
            # differently from the forward's, at a tie for instance, shows here.
            assert_bits_equal(got[0], want[0])
            masked = reference.masked_grad(grad, mask)
            assert_bits_equal(got[0], masked if divide_by_fold else (masked.float() * factor).to(dtype))
            for g, w in zip(got[1:], want[1:], strict=True):
                assert torch.equal(torch.isnan(g), torch.isnan(w)), (g, w)
                if divide_by_fold:
                    # f == 0 (gamma +-0, var inf): no gradient through f at all, exactly 0.
                    assert bool((g[2:5] == 0).all()), g
                finite = torch.isfinite(w)
                assert torch.equal(torch.isfinite(g), finite), (g, w)
                if bool(finite.any()):
                    assert_statistic_close(g[finite], w[finite])
    assert int(torch.isfinite(want[1]).sum()) > 3  # the finite weights: more than the f == 0 channels


def test_empty(device):
    x = torch.empty(3, 0, 2, device=device)
    gamma, var = torch.ones(3, device=device), torch.ones(3, device=device)
    for divide_by_fold in (False, True):
        out, _ = OP(x, gamma, var, 1e-5, *qparams([0.1] * 3, [0] * 3, device), -8, 7, True, divide_by_fold)
        assert out.shape == x.shape
    # Negative and zero gammas: the signs of the zero gradients are the reference's.
    gamma = torch.tensor([1.0, -2.0, 0.0], device=device)
    for divide_by_fold in (False, True):
        args = (x, x, gamma, var, 1e-5, *qparams([0.1] * 3, [0] * 3, device), -8, 7, divide_by_fold)
        for got, want in zip(BACKWARD(*args), reference.bn_fold_fake_quant_weight_backward(*args), strict=True):
            assert_bits_equal(got, want)


# ---------------------------------------------------------------------------------------------
# The backward op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divide_by_fold", [False, True], ids=["folded", "divided"])
@pytest.mark.parametrize(
    "dtype,stat_dtype", [(torch.float32,) * 2, (torch.float16, torch.float32), (torch.bfloat16,) * 2]
)
@pytest.mark.parametrize("shape", list(BN_SHAPES))
def test_backward_op_every_layout(device, shape, dtype, stat_dtype, divide_by_fold):
    gen = torch.Generator().manual_seed(8)
    weight, gamma, var, eps, scale, zero_point = bn_case(BN_SHAPES[shape], gen, dtype, stat_dtype, device)
    grad = torch.randn(weight.shape, generator=gen).to(dtype=dtype, device=device)
    # Folded: masked out or not, as the recomputed mask says. Divided, the last channel's sum is NaN either way
    # (a clamped element's out = c / f still depends on f).
    grad.view(-1)[-1] = float("nan")
    # f == 0: divided, grad_gamma and grad_var exactly 0; folded, grad_weight 0 and grad_var 0.
    gamma[1] = 0.0
    # The forward's arguments. bn_case's scales spread each channel over about +-100 levels; 1 to 16 times
    # those and [-8, 7] clamp most elements of the first channels and few of the last, so that 22-78% of the
    # recomputed mask is set in every case (a "vector" channel holds one element, at the end of its range).
    scale = scale * torch.linspace(1.0, 16.0, scale.numel(), device=device)
    args = (gamma, var, eps, scale, zero_point, -8, 7, divide_by_fold)
    _, mask = reference.bn_fold_fake_quant_weight_forward(weight, *args[:-1], True, divide_by_fold)
    assert 0.2 < float(mask.float().mean()) < 0.8
    for name, wl in any_layouts(weight).items():
        for grad_name in ("contiguous", name):
            gl = any_layouts(grad)[grad_name]
            got = BACKWARD(gl, wl, *args)
            want = reference.bn_fold_fake_quant_weight_backward(gl, wl, *args)
            if divide_by_fold:
                assert bool((got[1][1] == 0).all() and (got[2][1] == 0).all()), got
            else:
                assert bool((got[0][1] == 0).all() and (got[2][1] == 0).all()), got
            assert_bits_equal(got[0], want[0])
            assert_layout_of(got[0], wl), name
            assert_statistic_close(got[1].float().nan_to_num(), want[1].float().nan_to_num())
            assert torch.equal(torch.isnan(got[1]), torch.isnan(want[1]))
            assert_statistic_close(got[2].float().nan_to_num(), want[2].float().nan_to_num())
            assert got[1].dtype == gamma.dtype and got[2].dtype == var.dtype


@pytest.mark.parametrize("divided", [False, True])
def test_backward_op_mixed_dtypes_and_layouts(device, divided):
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(8, 4, 3, 3, generator=g).to(dtype=torch.float16, device=device)
    weight = weight.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 4, 3, 3, generator=g).to(device)  # fp32 gradient of an fp16 weight, another layout
    gamma = (torch.rand(8, generator=g) + 0.5).to(dtype=torch.bfloat16, device=device)
    if divided:
        gamma[-1] = 0.0  # f == 0: quantized with f = 1, no gradient to gamma or var
    var = torch.rand(16, generator=g).to(device)[::2]
    # Strided per-channel qparams, int64 zero points, and a narrow range: the recomputed mask clips part of each
    # channel. With divided, the kernel runs in fp32 (mixed dtypes) yet must round the recomputed output to fp16,
    # as the forward stored it and the reference uses it.
    scale = (torch.rand(16, generator=g) * 0.2 + 0.1).to(device)[::2]
    zero_point = torch.randint(-4, 4, (8,), generator=g).to(device)
    args = (grad, weight, gamma, var, 1e-3, scale, zero_point, -8, 7, divided)
    got = BACKWARD(*args)
    want = reference.bn_fold_fake_quant_weight_backward(*args)
    assert got[0].stride() == torch.empty_like(weight).stride()
    assert_bits_equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # bf16 / fp32 outputs of a reordered sum


# ---------------------------------------------------------------------------------------------
# Autograd against tests/autograd_reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_autograd_matches_autograd_reference(device, divide_by_fold):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 3, 3, 3, generator=g)
    gamma = torch.randn(8, generator=g)  # negative factors included
    if divide_by_fold:
        gamma[3] = 0  # f taken as 1
    var = torch.rand(8, generator=g) + 0.5
    scale, zp = qparams_per_channel(8, -8, 7, g, device)  # a narrow range, so some weights are clipped
    weight, gamma, var = on(device, weight, gamma, var)
    args = (1e-5, scale, zp, -8, 7, divide_by_fold)
    out, (gw, gg, gv) = grads(lambda w, ga, v: fakequant.bn_fold_fake_quant_weight(w, ga, v, *args),
                              [weight, gamma, var])  # fmt: skip
    ref_out, (rgw, rgg, rgv) = grads(lambda w, ga, v: autograd_reference.bn_fold_fake_quant_weight(w, ga, v, *args),
                                     [weight, gamma, var])  # fmt: skip
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


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (5, 7), (6,), (1, 4, 3, 3), (3, 0, 2)])
@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_autograd_every_layout(device, dtype, shape, divide_by_fold):
    torch.manual_seed(4)
    channels = shape[0]
    scale, zero_point = seeded_qparams(channels, quant_min=-8, quant_max=7, device=device)
    for _name, w in kernel_layouts(special_values(shape, 0.05, dtype, device).nan_to_num(0.0, 1.0, -1.0)):
        w = w.detach().requires_grad_()
        gamma = torch.rand(channels, device=device) + 0.5
        if divide_by_fold and channels > 1:
            gamma[-1] = 0.0  # f == 0: quantized with f = 1, no gradient to gamma or var
        gamma = gamma.requires_grad_()
        var = (torch.rand(channels, device=device) * 2).requires_grad_()
        grad_out = torch.randn(shape, device=device).to(dtype)
        args = (w, gamma, var, 1e-5, scale, zero_point, -8, 7)
        if divide_by_fold:
            out, _ = OP(*args, True, True)
            got = torch.autograd.grad(out, (w, gamma, var), grad_out)
            # Against the reference's backward formula: autograd through the reference's q(w f) / f rounds
            # grad / f * f, and its grad_f is the difference of two large sums, so it matches neither bit for
            # bit nor to a tight tolerance.
            detached = (w.detach(), gamma.detach(), var.detach())
            ref_out, _ = reference.bn_fold_fake_quant_weight_forward(*detached, *args[3:], True, True)
            assert_bits_equal(out.detach(), ref_out)
            want = reference.bn_fold_fake_quant_weight_backward(grad_out, *detached, *args[3:], True)
            if channels > 1:
                assert got[1][-1].item() == 0.0 and got[2][-1].item() == 0.0
        else:
            got = torch.autograd.grad(OP(*args)[0], (w, gamma, var), grad_out)
            want = torch.autograd.grad(autograd_reference.bn_fold_fake_quant_weight(*args), (w, gamma, var), grad_out)
        assert_bits_equal(got[0], want[0])
        # The per-channel sums run in another order than torch.sum's: equal to fp32 rounding.
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_backward_uses_the_forwards_qparams(device, divide_by_fold):
    """The backward recomputes the forward: a quantizer's in-place update of its scale/zero-point buffers
    between forward and backward (the layer called again first) must not change the gradients."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 3, 3, 3, generator=g)
    gamma, var = torch.rand(4, generator=g) + 0.5, torch.rand(4, generator=g) + 0.5
    scale = torch.rand(4, generator=g) * 0.1 + 0.05
    zero_point = torch.randint(-3, 4, (4,), generator=g, dtype=torch.int32)
    weight, gamma, var, scale, zero_point = on(device, weight, gamma, var, scale, zero_point)

    def gradients(update_in_place: bool) -> tuple[torch.Tensor, ...]:
        inputs = [t.clone().requires_grad_() for t in (weight, gamma, var)]
        s, z = scale.clone(), zero_point.clone()
        out, _ = OP(*inputs, EPS, s, z, -8, 7, False, divide_by_fold)
        if update_in_place:
            s.mul_(3.0)
            z.fill_(2)
        incoming = torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)
        return torch.autograd.grad(out, inputs, incoming)

    for actual, want in zip(gradients(True), gradients(False), strict=True):
        assert_identical(actual, want)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    scale_c, zp_c = qparams_per_channel(3, -128, 127, g, device)
    gamma, var = torch.randn(3, generator=g).to(device), (torch.rand(3, generator=g) + 0.1).to(device)
    for args in [
        (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127),
        (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, True, True),
        (x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, False, True),  # differentiable without a mask
    ]:
        # The backward recomputes the mask instead of reading it.
        torch.library.opcheck(OP.default, (args[0].clone().requires_grad_(), *args[1:]))
    for args in [(x * 0.5, x, gamma, var, 1e-5, scale_c, zp_c, -128, 127),
                 (x * 0.5, x, gamma, var, 1e-5, scale_c, zp_c, -128, 127, True)]:  # fmt: skip
        torch.library.opcheck(BACKWARD.default, args)


def test_opcheck_special_values_and_divided(device):
    x = special_values((4, 3, 5, 7), 0.05, device=device).nan_to_num(0.0, 1.0, -1.0)
    scales, zps = seeded_qparams(4, device=device)
    gen = torch.Generator().manual_seed(0)
    gamma, var = (torch.rand(4, generator=gen) + 0.5).to(device), torch.rand(4, generator=gen).to(device)
    args = (x, gamma, var, 1e-5, scales, zps, -128, 127, True)
    torch.library.opcheck(OP, (x.clone().requires_grad_(), *args[1:]))
    torch.library.opcheck(OP, (x.contiguous(memory_format=torch.channels_last), *args[1:]))
    backward_args = (x, x, gamma, var, 1e-5, scales, zps, -128, 127, False)
    torch.library.opcheck(BACKWARD, backward_args)
    torch.library.opcheck(BACKWARD, (x, x.contiguous(memory_format=torch.channels_last), *backward_args[2:]))
    gamma = gamma.clone()
    gamma[1] = 0.0
    torch.library.opcheck(OP, (x.clone().requires_grad_(), gamma, var, 1e-5, scales, zps, -128, 127, True, True))
    torch.library.opcheck(BACKWARD, (torch.randn_like(x), x, gamma, var, 1e-5, scales, zps, -128, 127, True))


# ---------------------------------------------------------------------------------------------
# Bad arguments: the reference's ValueError on every pair
# ---------------------------------------------------------------------------------------------

W = torch.randn(3, 2, 1, 1)
G3, V3 = torch.ones(3), torch.ones(3)
SC, ZC = torch.full((3,), 0.1), torch.zeros(3, dtype=torch.int32)
BAD = [
    ((W, torch.ones(2), V3, 1e-5, SC, ZC, -8, 7), r"gamma must be 1-D with 3 elements \(weight.size\(0\)\)"),
    ((W, G3, torch.ones(4), 1e-5, SC, ZC, -8, 7), r"var must be 1-D with 3 elements"),
    ((W, G3, V3, -1.0, SC, ZC, -8, 7), r"eps must be finite and >= 0, got -1.0"),
    ((W, G3, V3, 1e-5, SC[:2], ZC, -8, 7), r"per-channel scale must be 1-D with 3 elements"),
    ((W, G3.int(), V3, 1e-5, SC, ZC, -8, 7), r"gamma has dtype torch.int32"),
    ((W.double(), G3, V3, 1e-5, SC, ZC, -8, 7), r"weight has dtype torch.float64"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments(device, args, message):
    with pytest.raises(ValueError, match=message):
        OP(*on(device, *args))


def test_backward_bad_arguments(device):
    x = torch.randn(4, 3, device=device)
    # The backward takes the forward's arguments and checks them as the forward does, then grad.
    gamma, var = torch.ones(4, device=device), torch.ones(4, device=device)
    bn_qparams = qparams([0.1] * 4, [0] * 4, device)
    with pytest.raises(ValueError, match=r"grad must have the weight's shape \(4, 3\), got shape \(3, 4\)"):
        BACKWARD(x.t(), x, gamma, var, 1e-5, *bn_qparams, -8, 7, True)
    with pytest.raises(ValueError, match="grad has dtype torch.int32"):
        BACKWARD(x.int(), x, gamma, var, 1e-5, *bn_qparams, -8, 7)
    with pytest.raises(ValueError, match="grad is on meta but weight is on"):
        BACKWARD(x.to("meta"), x, gamma, var, 1e-5, *bn_qparams, -8, 7)
    with pytest.raises(ValueError, match="per-channel scale must be 1-D with 4 elements"):
        BACKWARD(x, x, gamma, var, 1e-5, *qparams([0.1] * 3, [0] * 3, device), -8, 7, True)
    with pytest.raises(ValueError, match=r"quant_min \(5\) must be <= quant_max \(4\)"):
        BACKWARD(x, x, gamma, var, 1e-5, *bn_qparams, 5, 4)
    with pytest.raises(ValueError, match=r"gamma must be 1-D with 4 elements \(weight.size\(0\)\)"):
        BACKWARD(x, x, gamma[:3], var, 1e-5, *bn_qparams, -8, 7)
    bad_zero_point = qparams([0.1] * 4, [0, 9, 0, 0], device)
    if device != "cpu":
        BACKWARD(x, x, gamma, var, 1e-5, *bad_zero_point, -8, 7)  # no value checks on a GPU
        return
    with pytest.raises(ValueError, match=r"zero_point 9 is outside \[quant_min, quant_max\] = \[-8, 7\]"):
        BACKWARD(x, x, gamma, var, 1e-5, *bad_zero_point, -8, 7)


BAD_WORD_FOR_WORD = [
    (W, torch.ones(2), V3, 1e-5, SC, ZC, -8, 7),
    (W, G3, torch.ones(4), 1e-5, SC, ZC, -8, 7),
    (W, G3.reshape(3, 1), V3, 1e-5, SC, ZC, -8, 7),
    (W, G3, V3, -1.0, SC, ZC, -8, 7),
    (W, G3, V3, float("nan"), SC, ZC, -8, 7),
    (W, G3, V3, float("inf"), SC, ZC, -8, 7),
    (W, G3, V3, -1e-300, SC, ZC, -8, 7),
    (W, G3, V3, 1e-5, SC[:2], ZC, -8, 7),
    (W, G3.int(), V3, 1e-5, SC, ZC, -8, 7),
    (W, G3, V3.double(), 1e-5, SC, ZC, -8, 7),
    (W.double(), G3, V3, 1e-5, SC, ZC, -8, 7),
    (torch.tensor(1.0), G3, V3, 1e-5, SC, ZC, -8, 7),
    (W, G3, V3, 1e-5, SC, ZC, 8, 7),
    (W, G3, V3, 1e-5, SC * 0, ZC, -8, 7),
    (W, G3, V3, 1e-5, SC, ZC + 8, -8, 7),
]
BACKWARD_BAD_WORD_FOR_WORD = [
    (W[:2], W, G3, V3, 1e-5, SC, ZC, -8, 7),
    (W.double(), W, G3, V3, 1e-5, SC, ZC, -8, 7),
    (W, W, G3, V3, 1e-5, SC, ZC, -8, 7 - 16),
    (W, W, G3, V3, 1e-5, SC * 0, ZC, -8, 7),
    (W, W, G3, V3, 1e-5, SC, ZC + 8, -8, 7, True),
    (W, W, G3[:2], V3, 1e-5, SC, ZC, -8, 7),
    (W[:2], W, G3, V3, 1e-5, SC * 0, ZC, -8, 7),  # grad before values
]


@pytest.mark.parametrize("args", BAD_WORD_FOR_WORD, ids=range(len(BAD_WORD_FOR_WORD)))
def test_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(OP, fakequant.ops.kernels("reference")["bn_fold_fake_quant_weight"], args, device)


@pytest.mark.parametrize("args", BACKWARD_BAD_WORD_FOR_WORD, ids=range(len(BACKWARD_BAD_WORD_FOR_WORD)))
def test_backward_bad_arguments_raise_the_reference_message(device, args):
    assert_same_error(BACKWARD, fakequant.ops.kernels("reference")["bn_fold_fake_quant_weight_backward"], args, device)


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases (forward and backward op) for tools/kernel_smoke.py (each kernel path once, under
    compute-sanitizer on a GPU)."""
    channels = inp.x.size(0)
    gamma, var = inp.rand(channels) + 0.5, inp.rand(channels)
    if channels:
        gamma[0] = 0.0  # a zero fold factor: the divided fold divides by 1 there
    scale, zero_point = inp.qparams(channels)
    finite = inp.x.nan_to_num(0.0, 1.0, -1.0)
    for divide in (False, True):
        args = (finite, gamma, var, 1e-5, scale, zero_point, -127, 127)
        yield f"divide={divide}", "bn_fold_fake_quant_weight", (*args, True, divide)
        yield f"divide={divide}", "bn_fold_fake_quant_weight_backward", (inp.randn_like_base(), *args, divide)
