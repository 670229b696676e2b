"""The Triton kernels against the reference, bit for bit, and the backend choice.

Without a GPU (here and in CI) every kernel runs under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by conftest.py), which executes the kernels' arithmetic with numpy float32;
with a GPU the same tests run the compiled kernels on CUDA tensors. What the interpreter cannot show (that
the GPU build keeps the rounding and the IEEE division) is checked by compiling the kernels for sm_80
without a GPU and reading their PTX and SASS (test_gpu_build_keeps_exact_arithmetic).

Tensors are small on purpose: the interpreter costs milliseconds per program of 1024 elements.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fakequant
from fakequant import _backend, reference
from fakequant.qparams import quant_range

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

triton_kernels = _backend.load_triton_kernels()
assert triton_kernels is not None, f"triton is installed but the Triton kernels do not import: {_backend._triton_error}"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fakequant.triton_kernels import _round_half_even, _to_dtype  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not triton_kernels.INTERPRETED:
    pytest.skip(
        "no GPU and TRITON_INTERPRET is not 1 (it was set to something else before triton was imported)",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# numpy warns about the overflow to inf and the NaN arithmetic that the NaN/inf cases are about.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, NaN positions and bits everywhere else (so -0.0 differs from +0.0)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.dtype == torch.bool:
        assert torch.equal(actual, expected)
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    a, e = actual[~nan], expected[~nan]
    mismatch = a.view(_INT_VIEW[a.dtype]) != e.view(_INT_VIEW[e.dtype])
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} values differ, e.g. {a[mismatch][:4]} vs {e[mismatch][:4]}"


def assert_layout_of(output: torch.Tensor, x: torch.Tensor) -> None:
    """``output`` has the layout the fake impls give: that of ``torch.empty_like(x)``."""
    template = torch.empty_like(x)
    for size, got, want in zip(output.shape, output.stride(), template.stride(), strict=True):
        if size != 1:
            assert got == want, (output.stride(), template.stride())


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x`` (values unchanged) in several memory layouts."""
    out = {"contiguous": x.contiguous()}
    if x.dim() == 0:
        return out
    padded = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    padded[..., ::2] = x
    out["strided"] = padded[..., ::2]
    if x.dim() >= 2:
        out["transposed"] = x.transpose(0, -1).contiguous().transpose(0, -1)
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    return out


def ties(scale: float, count: int = 40) -> torch.Tensor:
    """``(k + 0.5) * scale`` for k in [-count, count)."""
    return (torch.arange(-count, count, dtype=torch.float32) + 0.5) * scale


NONFINITE = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, 3.4e38]


def qparams(scale, zero_point, device=DEVICE):
    return (
        torch.as_tensor(scale, dtype=torch.float32, device=device),
        torch.as_tensor(zero_point, dtype=torch.int32, device=device),
    )


# ---------------------------------------------------------------------------------------------
# The rounding
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_test_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    tl.store(out_ptr + offsets, _round_half_even(tl.load(x_ptr + offsets, mask=in_bounds)), mask=in_bounds)


def test_round_half_even_matches_torch_round():
    """The kernels' rounding against torch.round on 2^20 values (numpy float32 under the interpreter)."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 18
    any_bits = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    magnitudes = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 30, (n,), generator=gen).float())
    halves = torch.randint(-(2**23), 2**23, (n,), generator=gen).float() + 0.5  # exact ties up to 2^23
    near_2_23 = torch.randint(-(2**25), 2**25, (n,), generator=gen).float() * 0.5 + 2.0**23 * torch.sign(
        torch.randn(n, generator=gen)
    )
    special = torch.tensor(
        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 2.0**23 - 0.5, 2.0**23 - 1.5, -(2.0**23) + 0.5]
        + [2.0**23, 2.0**23 + 1, 2.0**24 + 2, 1e-45, -1e-45, 1.17e-38]
        + NONFINITE
    )
    x = torch.cat([any_bits.view(torch.float32), magnitudes, halves, near_2_23, special]).to(DEVICE)
    assert x.numel() >= 1 << 20
    out = torch.empty_like(x)
    block = 1 << 14  # big blocks: the interpreter's cost is per program
    _round_test_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    assert_bits_equal(out, torch.round(x))


@triton.jit
def _to_dtype_test_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_bounds)
    tl.store(out_ptr + offsets, _to_dtype(x, out_ptr.dtype.element_ty), mask=in_bounds)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_output_rounding_matches_tensor_to(dtype):
    """fp32 -> fp16/bf16 as the kernels store it, against Tensor.to, on 2^18 values."""
    gen = torch.Generator().manual_seed(11)
    n = 1 << 17
    any_bits = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    magnitudes = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    x = torch.cat([any_bits.view(torch.float32), magnitudes, torch.tensor(NONFINITE + [65520.0, 3.3961e38])])
    x = x.to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    block = 1 << 14
    _to_dtype_test_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    assert_bits_equal(out, x.to(dtype))


# ---------------------------------------------------------------------------------------------
# fake_quant_per_tensor
# ---------------------------------------------------------------------------------------------


def per_tensor_cases():
    gen = torch.Generator().manual_seed(1)
    return {
        # scale 0.25: (k + 0.5) * 0.25 * 4 is an exact tie.
        "exact_ties": (ties(0.25).reshape(8, 10), 0.25, 0, -128, 127),
        "near_ties_zp": (ties(0.1).reshape(4, 20), 0.1, 3, -8, 7),
        "random_tail": (torch.randn(3, 5, 67, generator=gen) * 3, 0.05, -2, -128, 127),
        "saturating": (torch.randn(2, 3, 4, 5, generator=gen) * 100, 0.7, 1, -4, 3),
        "nonfinite": (torch.tensor(NONFINITE).reshape(2, 5), 0.1, 0, -128, 127),
        "scalar": (torch.tensor(0.35), 0.1, 0, 0, 255),
    }


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", list(per_tensor_cases()))
def test_fake_quant_per_tensor(case, dtype):
    x, scale, zero_point, quant_min, quant_max = per_tensor_cases()[case]
    scale, zero_point = qparams(scale, zero_point)
    for name, xl in layouts(x.to(dtype=dtype, device=DEVICE)).items():
        for compute_mask in (True, False):
            out, mask = triton_kernels.fake_quant_per_tensor(xl, scale, zero_point, quant_min, quant_max, compute_mask)
            ref_out, ref_mask = reference.fake_quant_per_tensor_forward(
                xl, scale, zero_point, quant_min, quant_max, compute_mask
            )
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert_layout_of(out, xl), name
            if compute_mask:
                assert_layout_of(mask, xl)


@pytest.mark.parametrize(
    "signed,narrow", [(True, False), (False, False), (True, True)], ids=["signed", "unsigned", "narrow"]
)
def test_fake_quant_bit_widths(signed, narrow):
    gen = torch.Generator().manual_seed(2)
    for bits in range(1, 17):
        if narrow and bits == 1:
            continue  # a narrow 1-bit range would be [0, 0]
        quant_min, quant_max = quant_range(bits, signed, narrow)
        scale = 1.0 / (1 << max(bits - 2, 0))
        zero_point = (quant_min + quant_max + 1) // 2 if not signed else 0
        span = (quant_max - quant_min + 1) * scale * 1.5  # a quarter beyond each end
        x = torch.cat([(torch.rand(200, generator=gen) - 0.5) * span, ties(scale, 20)]).to(DEVICE)
        s, z = qparams(scale, zero_point)
        out, mask = triton_kernels.fake_quant_per_tensor(x, s, z, quant_min, quant_max)
        ref_out, ref_mask = reference.fake_quant_per_tensor_forward(x, s, z, quant_min, quant_max)
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)
        assert 0 < int(mask.sum()) < x.numel(), f"bits={bits}: the cases should hit both sides of the range"
        channel_scale = torch.tensor([scale, scale * 0.75], device=DEVICE)
        channel_zp = torch.tensor([zero_point, quant_max], dtype=torch.int64, device=DEVICE)
        xc = x[:220].reshape(2, 110)
        out, mask = triton_kernels.fake_quant_per_channel(xc, channel_scale, channel_zp, 0, quant_min, quant_max)
        ref_out, ref_mask = reference.fake_quant_per_channel_forward(
            xc, channel_scale, channel_zp, 0, quant_min, quant_max
        )
        assert_bits_equal(out, ref_out)
        assert_bits_equal(mask, ref_mask)


def test_fake_quant_nan_and_inf_semantics():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.25], device=DEVICE)
    out, mask = triton_kernels.fake_quant_per_tensor(x, *qparams(0.5, 1), -4, 3)
    assert torch.isnan(out[0])
    assert out[1:].tolist() == [(3 - 1) * 0.5, (-4 - 1) * 0.5, 0.0]
    assert mask.tolist() == [False, False, False, True]


def test_empty_inputs():
    for x in (torch.empty(0, device=DEVICE), torch.empty(3, 0, 2, device=DEVICE)):
        out, mask = triton_kernels.fake_quant_per_tensor(x, *qparams(0.1, 0), -8, 7)
        assert out.shape == x.shape and mask.shape == x.shape and mask.dtype == torch.bool
        out, mask = triton_kernels.binarize(x)
        assert out.shape == x.shape and mask.shape == x.shape
        assert triton_kernels.masked_grad(x, torch.ones_like(x, dtype=torch.bool)).shape == x.shape
    x = torch.empty(3, 0, 2, device=DEVICE)
    out, _ = triton_kernels.fake_quant_per_channel(x, *qparams([0.1, 0.2, 0.3], [0, 0, 0]), 0, -8, 7)
    assert out.shape == x.shape
    gamma, var = torch.ones(3, device=DEVICE), torch.ones(3, device=DEVICE)
    for divide_by_fold in (False, True):
        out, _ = triton_kernels.bn_fold_fake_quant_weight(
            x, gamma, var, 1e-5, *qparams([0.1] * 3, [0] * 3), -8, 7, True, divide_by_fold
        )
        assert out.shape == x.shape
    # Negative and zero gammas: the signs of the zero gradients are the reference's.
    gamma = torch.tensor([1.0, -2.0, 0.0], device=DEVICE)
    for divide_by_fold in (False, True):
        args = (x, x, gamma, var, 1e-5, *qparams([0.1] * 3, [0] * 3), -8, 7, divide_by_fold)
        grads = triton_kernels.bn_fold_fake_quant_weight_backward(*args)
        expected = reference.bn_fold_fake_quant_weight_backward(*args)
        for got, want in zip(grads, expected, strict=True):
            assert_bits_equal(got, want)


def test_bad_arguments_raise_the_reference_errors():
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"quant_min \(5\) must be <= quant_max \(4\)"):
        triton_kernels.fake_quant_per_tensor(x, *qparams(0.1, 0), 5, 4)
    with pytest.raises(ValueError, match="per-channel scale must be 1-D with 3 elements"):
        triton_kernels.fake_quant_per_channel(x, *qparams([0.1] * 4, [0] * 4), 1, -8, 7)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        triton_kernels.fake_quant_per_channel(x, *qparams([0.1] * 3, [0] * 3), 2, -8, 7)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        triton_kernels.masked_grad(x, torch.ones(4, device=DEVICE, dtype=torch.bool))
    # The backward takes the forward's arguments and checks them as the forward does, then grad.
    gamma, var = torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE)
    bn_qparams = qparams([0.1] * 4, [0] * 4)
    backward = triton_kernels.bn_fold_fake_quant_weight_backward
    with pytest.raises(ValueError, match=r"grad must have the weight's shape \(4, 3\), got shape \(3, 4\)"):
        backward(x.t(), x, gamma, var, 1e-5, *bn_qparams, -8, 7, True)
    with pytest.raises(ValueError, match="grad has dtype torch.int32"):
        backward(x.int(), x, gamma, var, 1e-5, *bn_qparams, -8, 7)
    with pytest.raises(ValueError, match="grad is on meta but weight is on"):
        backward(x.to("meta"), x, gamma, var, 1e-5, *bn_qparams, -8, 7)
    with pytest.raises(ValueError, match="per-channel scale must be 1-D with 4 elements"):
        backward(x, x, gamma, var, 1e-5, *qparams([0.1] * 3, [0] * 3), -8, 7, True)
    with pytest.raises(ValueError, match=r"quant_min \(5\) must be <= quant_max \(4\)"):
        backward(x, x, gamma, var, 1e-5, *bn_qparams, 5, 4)
    with pytest.raises(ValueError, match=r"gamma must be 1-D with 4 elements \(weight.size\(0\)\)"):
        backward(x, x, gamma[:3], var, 1e-5, *bn_qparams, -8, 7)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            triton_kernels.fake_quant_per_tensor(x, *qparams(-1.0, 0), -8, 7)
        with pytest.raises(ValueError, match=r"zero_point 9 is outside \[quant_min, quant_max\] = \[-8, 7\]"):
            backward(x, x, gamma, var, 1e-5, *qparams([0.1] * 4, [0, 9, 0, 0]), -8, 7)


# ---------------------------------------------------------------------------------------------
# fake_quant_per_channel
# ---------------------------------------------------------------------------------------------


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
def test_fake_quant_per_channel(shape, axis, dtype):
    gen = torch.Generator().manual_seed(3)
    x, scale, zero_point = per_channel_case(shape, axis, gen)
    x.view(-1)[:: max(1, x.numel() // 5)] = torch.tensor(NONFINITE[: len(x.view(-1)[:: max(1, x.numel() // 5)])])
    scale, zero_point = scale.to(DEVICE), zero_point.to(DEVICE)
    for name, xl in layouts(x.to(dtype=dtype, device=DEVICE)).items():
        for compute_mask in (True, False):
            out, mask = triton_kernels.fake_quant_per_channel(xl, scale, zero_point, axis, -16, 15, compute_mask)
            ref_out, ref_mask = reference.fake_quant_per_channel_forward(
                xl, scale, zero_point, axis, -16, 15, compute_mask
            )
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert_layout_of(out, xl), name


def test_fake_quant_per_channel_expanded_and_strided_qparams():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 9, generator=gen).to(DEVICE).expand(5, 4, 9)  # stride 0: not dense, copied
    scale = (torch.rand(8, generator=gen) * 0.2 + 0.05).to(DEVICE)[::2]  # a strided 1-D scale
    zero_point = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    out, mask = triton_kernels.fake_quant_per_channel(x, scale, zero_point, 1, -8, 7)
    ref_out, ref_mask = reference.fake_quant_per_channel_forward(x, scale, zero_point, 1, -8, 7)
    assert_bits_equal(out, ref_out)
    assert_bits_equal(mask, ref_mask)
    assert out.is_contiguous()


# ---------------------------------------------------------------------------------------------
# binarize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_binarize(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 11, generator=gen) * 2
    x.view(-1)[: len(NONFINITE) + 4] = torch.tensor(NONFINITE + [1.0, -1.0, 1.0000001, -0.9999999])
    for name, xl in layouts(x.to(dtype=dtype, device=DEVICE)).items():
        for clipped_ste in (True, False):
            for compute_mask in (True, False):
                out, mask = triton_kernels.binarize(xl, clipped_ste, compute_mask)
                ref_out, ref_mask = reference.binarize_forward(xl, clipped_ste, compute_mask)
                assert_bits_equal(out, ref_out)
                assert_bits_equal(mask, ref_mask)
                assert_layout_of(out, xl), name


# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight (forward)
# ---------------------------------------------------------------------------------------------


def bn_case(shape, gen, dtype=torch.float32, stat_dtype=torch.float32):
    channels = shape[0]
    weight = torch.randn(shape, generator=gen) * 0.3
    gamma = torch.rand(channels, generator=gen) + 0.5
    var = torch.rand(channels, generator=gen) * 2
    var[0] = 0.0  # eps alone keeps it finite
    eps = 1e-5
    folded_max = (weight.abs().reshape(channels, -1).amax(dim=1) * gamma / torch.sqrt(var + eps)).clamp_min(1e-3)
    scale = folded_max / 100  # saturates a few of the [-128, 127] levels' neighbours
    zero_point = torch.randint(-2, 3, (channels,), generator=gen, dtype=torch.int32)
    return (
        weight.to(dtype=dtype, device=DEVICE),
        gamma.to(dtype=stat_dtype, device=DEVICE),
        var.to(dtype=stat_dtype, device=DEVICE),
        eps,
        scale.to(DEVICE),
        zero_point.to(DEVICE),
    )


BN_SHAPES = {"conv": (6, 3, 3, 3), "linear": (5, 7), "linear-tail": (3, 1100), "vector": (9,), "odd": (7, 1, 5, 3)}


@pytest.mark.parametrize("divide_by_fold", [False, True], ids=["folded", "divided"])
@pytest.mark.parametrize(
    "dtype,stat_dtype", [(torch.float32,) * 2, (torch.float16, torch.float32), (torch.bfloat16,) * 2]
)
@pytest.mark.parametrize("shape", list(BN_SHAPES))
def test_bn_fold_fake_quant_weight(shape, dtype, stat_dtype, divide_by_fold):
    gen = torch.Generator().manual_seed(6)
    weight, gamma, var, eps, scale, zero_point = bn_case(BN_SHAPES[shape], gen, dtype, stat_dtype)
    weight.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -1e30])
    gamma[1] = 0.0  # f == 0: divide_by_fold quantizes that channel unfolded (f taken as 1)
    for name, wl in layouts(weight).items():
        for compute_mask in (True, False):
            out, mask = triton_kernels.bn_fold_fake_quant_weight(
                wl, gamma, var, eps, scale, zero_point, -128, 127, compute_mask, divide_by_fold
            )
            ref_out, ref_mask = reference.bn_fold_fake_quant_weight_forward(
                wl, gamma, var, eps, scale, zero_point, -128, 127, compute_mask, divide_by_fold
            )
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            assert_layout_of(out, wl), name


def special_fold_case(dtype=torch.float32, divide_by_fold=True):
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
    return weight.to(dtype=dtype, device=DEVICE), gamma.to(DEVICE), var.to(DEVICE), eps, scale.to(DEVICE), (
        zero_point.to(DEVICE)
    )


# numpy's reduction warns when a channel's inf terms of both signs sum to NaN (the reference's NaN too).
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("divide_by_fold", [False, True], ids=["folded", "divided"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_bn_fold_special_channels(dtype, divide_by_fold):
    """Forward and backward: the backward recomputes the forward's mask (and divided output) bit for bit.

    Every row holds NaN and inf weights, which make the gamma/var gradients NaN but where divide_by_fold's f == 0
    gives exactly 0; the same weights with those replaced by a finite value compare the other channels' values.
    """
    special, gamma, var, eps, scale, zero_point = special_fold_case(dtype, divide_by_fold)
    finite_weights = torch.where(torch.isfinite(special), special, torch.full_like(special, 0.25))
    factor = reference.bn_fold_factor(gamma, var, eps)[:, None]
    gen = torch.Generator().manual_seed(14)
    grad = torch.randn(special.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    for weight in (special, finite_weights):
        for quant_min, quant_max in ((-128, 127), (-8, 7)):
            args = (gamma, var, eps, scale, zero_point, quant_min, quant_max)
            out, mask = triton_kernels.bn_fold_fake_quant_weight(weight, *args, True, divide_by_fold)
            ref_out, ref_mask = reference.bn_fold_fake_quant_weight_forward(weight, *args, True, divide_by_fold)
            assert_bits_equal(out, ref_out)
            assert_bits_equal(mask, ref_mask)
            got = triton_kernels.bn_fold_fake_quant_weight_backward(grad, weight, *args, divide_by_fold)
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


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_masked_grad(dtype):
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(2, 3, 5, 9, generator=gen)
    grad.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, float("nan")])
    keep = torch.rand(2, 3, 5, 9, generator=gen) > 0.4
    keep.view(-1)[:4] = torch.tensor([True, True, True, False])
    grad_layouts = layouts(grad.to(dtype=dtype, device=DEVICE))
    mask_layouts = layouts(keep.to(DEVICE))
    for grad_name, gl in grad_layouts.items():
        for mask_name in ("contiguous", "channels_last", "strided"):
            ml = mask_layouts[mask_name]
            out = triton_kernels.masked_grad(gl, ml)
            assert_bits_equal(out, reference.masked_grad(gl, ml))
            assert_layout_of(out, gl), (grad_name, mask_name)


def assert_statistic_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Per-channel sums: the kernel sums in another order than torch, so close, not equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("divide_by_fold", [False, True], ids=["folded", "divided"])
@pytest.mark.parametrize(
    "dtype,stat_dtype", [(torch.float32,) * 2, (torch.float16, torch.float32), (torch.bfloat16,) * 2]
)
@pytest.mark.parametrize("shape", list(BN_SHAPES))
def test_bn_fold_fake_quant_weight_backward(shape, dtype, stat_dtype, divide_by_fold):
    gen = torch.Generator().manual_seed(8)
    weight, gamma, var, eps, scale, zero_point = bn_case(BN_SHAPES[shape], gen, dtype, stat_dtype)
    grad = torch.randn(weight.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    # Folded: masked out or not, as the recomputed mask says. Divided, the last channel's sum is NaN either way
    # (a clamped element's out = c / f still depends on f).
    grad.view(-1)[-1] = float("nan")
    # f == 0: divided, grad_gamma and grad_var exactly 0; folded, grad_weight 0 and grad_var 0.
    gamma[1] = 0.0
    # The forward's arguments. bn_case's scales spread each channel over about +-100 levels; 1 to 16 times
    # those and [-8, 7] clamp most elements of the first channels and few of the last, so that 22-78% of the
    # recomputed mask is set in every case (a "vector" channel holds one element, at the end of its range).
    scale = scale * torch.linspace(1.0, 16.0, scale.numel(), device=DEVICE)
    args = (gamma, var, eps, scale, zero_point, -8, 7, divide_by_fold)
    _, mask = reference.bn_fold_fake_quant_weight_forward(weight, *args[:-1], True, divide_by_fold)
    assert 0.2 < float(mask.float().mean()) < 0.8
    for name, wl in layouts(weight).items():
        for grad_name in ("contiguous", name):
            gl = layouts(grad)[grad_name]
            got = triton_kernels.bn_fold_fake_quant_weight_backward(gl, wl, *args)
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


# ---------------------------------------------------------------------------------------------
# observe_range
# ---------------------------------------------------------------------------------------------


def observe_state(x, axis, tracked=None, state_dtype=torch.float32, zp_dtype=torch.int32):
    """Fresh ``(tracked_range, scale, zero_point)`` for ``x`` on ``x``'s device; ``tracked`` the previous range."""
    channels = None if axis is None else x.size(axis)
    shape = (2,) if channels is None else (2, channels)
    tracked = torch.zeros(shape) if tracked is None else tracked
    scale = torch.ones(() if channels is None else (channels,))
    zero_point = torch.zeros(() if channels is None else (channels,), dtype=zp_dtype)
    return tuple(t.to(device=x.device) for t in (tracked.to(state_dtype), scale.to(state_dtype), zero_point))


def assert_same_state(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        if a.is_floating_point():
            assert_bits_equal(a, e)
        else:
            assert a.dtype == e.dtype and torch.equal(a, e), (a, e)


def check_observe(x, axis, constant, qrange, fold=None, tracked=None, state_dtype=torch.float32,
                  zp_dtype=torch.int32, relu=False):
    """The Triton kernel and the reference on copies of the same state, bit for bit; returns the kernel's."""
    got = observe_state(x, axis, tracked, state_dtype, zp_dtype)
    want = tuple(t.clone() for t in got)
    triton_kernels.observe_range(x, *got, axis, constant, *qrange, fold, relu)
    reference.observe_range(x, *want, axis, constant, *qrange, fold, relu)
    assert_same_state(got, want)
    return got


@pytest.fixture
def small_observe_blocks(monkeypatch):
    """Blocks of 16 elements, up to 8 partial programs, one loop step minimum: small tensors then take the
    paths that only large ones take with the real sizes (several splits per channel combined in several
    finalize steps, several channel tiles and finalize programs, loops over channel blocks)."""
    monkeypatch.setattr(triton_kernels, "OBSERVE_BLOCK_SIZE", 16)
    monkeypatch.setattr(triton_kernels, "OBSERVE_PROGRAMS", 8)
    monkeypatch.setattr(triton_kernels, "OBSERVE_MIN_STEPS", 1)


OBSERVE_MODES = [(1.0, (-128, 127, True)), (0.01, (0, 255, False)), (0.25, (-8, 7, False))]


def check_observe_every_layout_and_axis(x, gen, relu=False):
    """check_observe for every layout of x, per tensor and along every axis, cycling through OBSERVE_MODES with a
    random tracked range; returns (axis, averaging constant, the kernel's state) of each call."""
    results = []
    for i, xl in enumerate(layouts(x).values()):
        for j, axis in enumerate((None, *range(x.dim()))):
            constant, qrange = OBSERVE_MODES[(i + j) % len(OBSERVE_MODES)]
            tracked = torch.randn((2,) if axis is None else (2, x.size(axis)), generator=gen)
            results.append((axis, constant, check_observe(xl, axis, constant, qrange, tracked=tracked, relu=relu)))
    return results


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_observe_range_layouts(dtype, special, small_observe_blocks):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 6, 5, 7, generator=gen) * 3 + 0.5
    if special:
        # One channel of each axis gets a NaN, others inf and -inf: per-channel ranges keep them apart.
        x[1, 2, 3, 4], x[2, 0, 0, 0], x[3, 5, 4, 6] = float("nan"), float("inf"), float("-inf")
    x = x.to(dtype=dtype, device=DEVICE)
    check_observe_every_layout_and_axis(x, gen)


def test_observe_range_several_default_blocks():
    """The real block sizes: 15000 elements per tensor (4 splits), 5000 per row, 5000 channels of 3."""
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(3, 5000, generator=gen) * 2).to(DEVICE)
    x[2, 4321] = float("nan")
    for xl in (x, x.t().contiguous().t()):
        for axis in (None, 0, 1):
            tracked = torch.randn((2,) if axis is None else (2, x.size(axis)), generator=gen)
            check_observe(xl, axis, 0.01, (-128, 127, False), tracked=tracked)


def fold_weight_cases(gen, adjust=None):
    """A 40x3x3 weight and fold factors with the special ends of a folded range: a 0 minimum (channel 5) or
    maximum (9) times an infinite factor, inf times a 0 factor (11), and +-0 factors (3, 4). ``adjust(weight,
    fold)`` may change more channels before the variants are made. Returns the weight and the factors
    ``(plain, fold, only_low_nan, only_high_nan)`` on DEVICE: no NaN, NaN from inf * 0, and NaN at only one end."""
    weight = torch.randn(40, 3, 3, generator=gen)
    weight[5] = weight[5].abs()
    weight[5, 1, 1] = 0.0  # min 0: times an infinite fold factor, a NaN minimum and an infinite maximum
    weight[9] = -weight[9].abs()
    weight[9, 2, 0] = 0.0  # max 0: the same for the maximum
    weight[11, 0, 2] = float("inf")
    fold = torch.randn(40, generator=gen)
    fold[3], fold[4], fold[11] = 0.0, -0.0, 0.0  # inf * 0: NaN
    if adjust is not None:
        adjust(weight, fold)
    weight, fold = weight.to(DEVICE), fold.to(DEVICE)
    plain = fold.clone()
    plain[11] = 2.0
    only_low_nan, only_high_nan = plain.clone(), plain.clone()
    only_low_nan[5] = float("inf")
    only_high_nan[9] = float("inf")
    return weight, (plain, fold, only_low_nan, only_high_nan)


def fold_observe_cases(weight, folds, gen):
    """(weight layout, axis, constant, qrange, fold, tracked) over every layout of ``weight``, every factor of
    ``folds``, per tensor and per channel, cycling through OBSERVE_MODES."""
    for i, wl in enumerate(layouts(weight).values()):
        for j, f in enumerate(folds):
            for axis in (None, 0):
                constant, qrange = OBSERVE_MODES[(i + j) % len(OBSERVE_MODES)]
                tracked = torch.randn((2,) if axis is None else (2, weight.size(0)), generator=gen)
                yield wl, axis, constant, qrange, f, tracked


def test_observe_range_fold(small_observe_blocks):
    gen = torch.Generator().manual_seed(15)
    weight, folds = fold_weight_cases(gen)
    _, _, only_low_nan, only_high_nan = folds
    for case in fold_observe_cases(weight, folds, gen):
        check_observe(*case)
    # Per tensor, NaN in one end of one channel's folded range makes only that end NaN.
    low, high = check_observe(weight, None, 1.0, (0, 255, False), only_low_nan)[0].tolist()
    assert low != low and high == float("inf")
    low, high = check_observe(weight, None, 1.0, (0, 255, False), only_high_nan)[0].tolist()
    assert low == float("-inf") and high != high


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_observe_range_relu(dtype, small_observe_blocks):
    """relu=True: the range of relu(x), per tensor and per channel of every axis, in every layout, with NaN,
    +-inf, all-negative channels (range [0, 0]) and channels whose minimum only is negative."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(4, 6, 5, 7, generator=gen) * 3 + 0.5
    x[2] = -x[2].abs() - 0.25  # all negative along axis 0: [0, 0]
    x[:, :, 3] = -x[:, :, 3].abs() - 0.25  # and along axis 2
    x[0, 1, 1, 1], x[3, 4, 0, 2], x[1, 5, 4, 6] = float("nan"), float("inf"), float("-inf")
    x = x.to(dtype=dtype, device=DEVICE)
    for axis, constant, state in check_observe_every_layout_and_axis(x, gen, relu=True):
        if constant == 1.0 and axis in (0, 2):
            assert state[0][:, 2 if axis == 0 else 3].tolist() == [0.0, 0.0], state[0]
    # All negative (-inf included): [0, 0], replaced or moved towards; without relu the range is negative.
    negative = -(torch.rand(3, 5, generator=gen) + 0.5)
    negative[1, 2] = float("-inf")
    negative = negative.to(dtype=dtype, device=DEVICE)
    for axis in (None, 0, 1):
        for constant, qrange in OBSERVE_MODES:
            tracked = torch.randn((2,) if axis is None else (2, negative.size(axis)), generator=gen)
            state = check_observe(negative, axis, constant, qrange, tracked=tracked, relu=True)
            if constant == 1.0:
                assert not bool(state[0].any()) and not bool(state[0].signbit().any()), state[0]
        assert bool((check_observe(negative, axis, 1.0, (0, 255, False))[0] < 0).all())
    # NaN per tensor: both ends NaN (relu keeps NaN), the zero point INT32_MIN, as without relu.
    state = check_observe(x, None, 0.01, (0, 255, False), relu=True)
    assert bool(state[0].isnan().all()) and state[2].item() == -(2**31)


def test_observe_range_relu_signed_zeros(small_observe_blocks):
    """-0.0 ends: torch.relu (the reference) keeps -0.0, and so must the kernel, bit for bit."""
    x = torch.tensor([[-0.0, -0.0, -0.0], [-1.0, -0.0, -2.0], [-0.0, 0.0, 3.0]], device=DEVICE)
    for axis in (None, 0, 1):
        for constant, qrange in OBSERVE_MODES:
            check_observe(x, axis, constant, qrange, relu=True)
    state = check_observe(x, 0, 1.0, (0, 255, False), relu=True)
    assert state[0][:, 0].signbit().tolist() == [True, True] and state[0][1, 1].signbit()


def test_observe_range_relu_fold(small_observe_blocks):
    """relu=True with a fold factor, per channel and per tensor: ReLU after the fold (a negative factor turns a
    positive channel negative, so to [0, 0]) and after the per-tensor range is combined over channels; inf * 0
    NaN stays NaN at either end."""
    gen = torch.Generator().manual_seed(18)

    def sign_flips(weight, fold):
        weight[20] = weight[20].abs() + 0.5  # positive: [0, 0] after a negative factor
        weight[21] = -weight[21].abs() - 0.5  # negative: positive after a negative factor, [0, 0] after a positive
        fold[20], fold[21] = -1.5, 0.75

    weight, folds = fold_weight_cases(gen, sign_flips)
    _, fold, only_low_nan, only_high_nan = folds
    all_negative = -(fold.abs() + 0.5)  # with a positive weight: every folded value negative
    for wl, axis, constant, qrange, f, tracked in fold_observe_cases(weight, folds, gen):
        state = check_observe(wl, axis, constant, qrange, f, tracked, relu=True)
        if constant == 1.0 and axis == 0:
            assert state[0][:, 20].tolist() == [0.0, 0.0] and state[0][:, 21].tolist() == [0.0, 0.0]
    # Per tensor: relu(NaN) is NaN at the end that has it, the other end as relu's.
    low, high = check_observe(weight, None, 1.0, (0, 255, False), only_low_nan, relu=True)[0].tolist()
    assert low != low and high == float("inf")
    low, high = check_observe(weight, None, 1.0, (0, 255, False), only_high_nan, relu=True)[0].tolist()
    assert low == 0.0 and high != high
    # A positive weight times negative factors: every folded value negative, [0, 0] per tensor and per channel.
    positive = weight.abs() + 0.25
    for axis in (None, 0):
        for constant, qrange in OBSERVE_MODES:
            tracked = torch.randn((2,) if axis is None else (2, 40), generator=gen)
            state = check_observe(positive, axis, constant, qrange, all_negative, tracked, relu=True)
            if constant == 1.0:
                assert not bool(state[0].any()), state[0]


def test_observe_range_state_dtypes_and_strides(small_observe_blocks):
    """State after model.half() (fp16/bf16 range and scale, int64 zero point) in strided views: only the
    viewed elements change."""
    gen = torch.Generator().manual_seed(16)
    x = (torch.randn(5, 9, generator=gen) * 4).to(DEVICE)
    for state_dtype, zp_dtype in ((torch.float16, torch.int64), (torch.bfloat16, torch.int32)):
        for axis in (None, 1):
            channels = 1 if axis is None else 9
            tracked_base = torch.full((channels, 3), 7.0, dtype=state_dtype, device=DEVICE)
            tracked_base[:, 0] = torch.randn(channels, generator=gen).to(state_dtype)
            tracked_base[:, 2] = torch.randn(channels, generator=gen).to(state_dtype)
            tracked = tracked_base[:, ::2].t()  # (2, channels), strides (1, 3)
            scale_base = torch.full((2 * channels,), 7.0, dtype=state_dtype, device=DEVICE)
            zp_base = torch.full((channels, 2), 7, dtype=zp_dtype, device=DEVICE)
            scale, zero_point = scale_base[::2], zp_base[:, 1]
            if axis is None:
                tracked, scale, zero_point = tracked.reshape(2), scale.reshape(()), zero_point.reshape(())
            want = (tracked.clone(), scale.clone(), zero_point.clone())
            triton_kernels.observe_range(x, tracked, scale, zero_point, axis, 0.01, 0, 255, False)
            reference.observe_range(x, *want, axis, 0.01, 0, 255, False)
            assert_same_state((tracked, scale, zero_point), want)
            assert bool((tracked_base[:, 1] == 7).all() and (scale_base[1::2] == 7).all())
            assert bool((zp_base[:, 0] == 7).all())
    # A NaN range: INT32_MIN in an int64 zero point too (sign-extended, as the reference's int32 copy).
    x[3, 4] = float("nan")
    state = check_observe(x, None, 0.01, (0, 255, False), state_dtype=torch.float16, zp_dtype=torch.int64)
    assert state[2].item() == -(2**31) and bool(state[1].isnan())


# ---------------------------------------------------------------------------------------------
# The public ops with the "triton" backend
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def triton_backend(monkeypatch):
    """Chooses the "triton" backend and records which kernels the host wrappers launch."""
    launched = []
    real_wrap_triton = triton_kernels.wrap_triton

    def recording_wrap_triton(kernel):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return real_wrap_triton(kernel)

    monkeypatch.setattr(triton_kernels, "wrap_triton", recording_wrap_triton)
    previous = fakequant.get_backend()
    fakequant.set_backend("triton")
    yield launched
    fakequant.set_backend(previous)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_public_ops_run_triton_forward_and_backward(triton_backend, dtype):
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 3, 4, 5, generator=gen) * 2).to(dtype=dtype, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    scale, zero_point = qparams(0.125, 1)
    channel_scale, channel_zp = qparams([0.1, 0.2, 0.05], [0, 1, -1])

    calls = {
        "per_tensor": (fakequant.fake_quant_per_tensor, reference.fake_quant_per_tensor, (scale, zero_point, -8, 7)),
        "per_channel": (
            fakequant.fake_quant_per_channel,
            reference.fake_quant_per_channel,
            (channel_scale, channel_zp, 1, -8, 7),
        ),
        "binarize_clipped": (fakequant.binarize, reference.binarize, (True,)),
        "binarize_identity": (fakequant.binarize, reference.binarize, (False,)),
    }
    for name, (public, oracle, args) in calls.items():
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = public(xa, *args)
        ref = oracle(xb, *args)
        assert_bits_equal(out, ref.detach())
        out.backward(grad)
        ref.backward(grad)
        assert_bits_equal(xa.grad, xb.grad)
        assert_layout_of(out, x), name

    weight, gamma, var, eps, scale, zero_point = bn_case((6, 3, 3, 3), gen, dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    leaves_a = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    leaves_b = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    out = fakequant.bn_fold_fake_quant_weight(*leaves_a[:2], leaves_a[2], eps, scale, zero_point, -16, 15)
    ref = reference.bn_fold_fake_quant_weight(*leaves_b[:2], leaves_b[2], eps, scale, zero_point, -16, 15)
    assert_bits_equal(out, ref.detach())
    grad_w = torch.randn(weight.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    out.backward(grad_w)
    ref.backward(grad_w)
    assert_bits_equal(leaves_a[0].grad, leaves_b[0].grad)
    assert_statistic_close(leaves_a[1].grad, leaves_b[1].grad)
    assert_statistic_close(leaves_a[2].grad, leaves_b[2].grad)

    # divide_by_fold=True: the op's backward recomputes its mask and output from the saved arguments. The
    # reference's autograd differentiates through both appearances of f, so its weight gradient is (grad / f) * f,
    # which is not always grad bit for bit: close, and the op's own is exactly the masked grad. Its gamma and var
    # gradients use q(w f) / f unrounded, the op's the output rounded to the weight's dtype, and w - out is
    # quantization noise, so in fp16/bf16 they differ by far more than summation order (about 3e-3 and 1e-1
    # of the largest): there the op's own backward, reference.bn_fold_fake_quant_weight_backward, is the oracle.
    gamma = gamma.clone()
    gamma[1] = 0.0
    leaves_a = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    leaves_b = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    out = fakequant.bn_fold_fake_quant_weight(*leaves_a, eps, scale, zero_point, -16, 15, divide_by_fold=True)
    ref = reference.bn_fold_fake_quant_weight(*leaves_b, eps, scale, zero_point, -16, 15, divide_by_fold=True)
    assert_bits_equal(out, ref.detach())
    assert_layout_of(out, weight)
    out.backward(grad_w)
    ref.backward(grad_w)
    _, mask = reference.bn_fold_fake_quant_weight_forward(
        weight, gamma, var, eps, scale, zero_point, -16, 15, True, True
    )
    assert_bits_equal(leaves_a[0].grad, reference.masked_grad(grad_w, mask))
    torch.testing.assert_close(leaves_a[0].grad, leaves_b[0].grad)
    want = reference.bn_fold_fake_quant_weight_backward(
        grad_w, weight, gamma, var, eps, scale, zero_point, -16, 15, True
    )
    assert_statistic_close(leaves_a[1].grad, want[1])
    assert_statistic_close(leaves_a[2].grad, want[2])
    if dtype == torch.float32:
        assert_statistic_close(leaves_a[1].grad, leaves_b[1].grad)
        assert_statistic_close(leaves_a[2].grad, leaves_b[2].grad)
    assert leaves_a[1].grad[1] == 0 and leaves_a[2].grad[1] == 0

    assert set(triton_backend) == {
        "_fake_quant_per_tensor_kernel",
        "_fake_quant_per_channel_kernel",
        "_binarize_kernel",
        "_masked_grad_kernel",
        "_bn_fold_fake_quant_weight_kernel",
        "_bn_fold_fake_quant_weight_backward_kernel",
    }


def test_observe_range_runs_triton(triton_backend):
    x = torch.randn(3, 70, device=DEVICE)
    state = observe_state(x, None)
    torch.ops.fakequant.observe_range(x, *state, None, 1.0, -128, 127, True)
    assert state[0].tolist() == [x.min().item(), x.max().item()]
    torch.ops.fakequant.observe_range(x, *state, None, 1.0, -128, 127, True, relu=True)
    assert state[0].tolist() == [0.0, x.max().item()]
    assert triton_backend == ["_observe_range_partial_kernel", "_observe_range_finalize_kernel"] * 2


def test_torch_ops_run_triton(triton_backend):
    x = torch.randn(3, 70, device=DEVICE)
    scale, zero_point = qparams(0.1, 0)
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -8, 7, False)
    assert mask.numel() == 0
    assert_bits_equal(out, reference.fake_quant_per_tensor_forward(x, scale, zero_point, -8, 7)[0])
    keep = x > 0
    assert_bits_equal(torch.ops.fakequant.masked_grad(x, keep), reference.masked_grad(x, keep))
    assert triton_backend == ["_fake_quant_per_tensor_kernel", "_masked_grad_kernel"]


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def auto_backend():
    previous = fakequant.get_backend()
    fakequant.set_backend("auto")
    yield
    fakequant.set_backend(previous)


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; valid backends: auto, cuda, triton, reference"):
        fakequant.set_backend("cudnn")


def test_cuda_backend_without_cuda_kernels_says_why(monkeypatch, auto_backend):
    # As this machine's build when _C was built without CUDA; forced either way so that CI with a CUDA
    # build checks the message too.
    monkeypatch.setattr(_backend, "_extension_has_cuda", False)
    if _backend.extension_loaded():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*built without CUDA kernels"):
            fakequant.set_backend("cuda")
    monkeypatch.setattr(_backend, "_extension", None)
    monkeypatch.setattr(_backend, "_extension_error", "libc10.so: cannot open shared object file")
    with pytest.raises(
        RuntimeError, match=r"'cuda' is not available: .*fakequant._C is not loaded \(libc10.so: cannot open"
    ):
        fakequant.set_backend("cuda")
    assert fakequant.get_backend() == "auto"
    assert "cuda" not in _backend.available_backends("cpu")


def test_unimportable_triton_says_why(monkeypatch, auto_backend):
    monkeypatch.setattr(_backend, "_triton_kernels", None)
    monkeypatch.setattr(_backend, "_triton_error", "ImportError: no module named 'triton'")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available: triton cannot be imported \(ImportError"
    ):
        fakequant.set_backend("triton")
    assert "triton" not in _backend.available_backends("cpu")


def _dispatch_tables() -> dict[str, str]:
    return {name: torch._C._dispatch_dump(f"fakequant::{name}") for name in fakequant._ops.KERNEL_OPS}


def test_auto_after_triton_restores_the_previous_kernels(auto_backend):
    before = _dispatch_tables()
    fakequant.set_backend("triton")
    during = _dispatch_tables()
    assert all(during[name] != before[name] for name in before)
    fakequant.set_backend("reference")
    fakequant.set_backend("auto")
    assert _dispatch_tables() == before
    if _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fakequant::fake_quant_per_tensor", "CPU"
    ):
        # The C++ CPU kernel is registered from C++, not from a Python file.
        assert "CPU: registered at" in before["fake_quant_per_tensor"]
        cpu_line = next(line for line in before["fake_quant_per_tensor"].splitlines() if line.startswith("CPU:"))
        assert ".py" not in cpu_line


def test_auto_serves_cuda_tensors_with_triton_when_c_has_no_cuda_kernels(monkeypatch, auto_backend):
    """The kernel "auto" puts on the CUDA key (run here on CPU tensors, which it does not mind)."""
    cuda_line = next(
        line for line in torch._C._dispatch_dump("fakequant::binarize").splitlines() if line.startswith("CUDA:")
    )
    if _backend.extension_has_cuda():
        assert "_backend.py" not in cuda_line  # _C's own CUDA kernel
        return
    assert "_backend.py" in cuda_line
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0], device=DEVICE)
    launched = []
    real_wrap_triton = triton_kernels.wrap_triton
    monkeypatch.setattr(triton_kernels, "wrap_triton", lambda k: launched.append(k) or real_wrap_triton(k))
    out, mask = _backend._auto_cuda_kernel("binarize")(x, True, True)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0] and mask.tolist() == [False, True, True, False]
    assert len(launched) == 1
    # Without triton: the reference, with a warning that says why.
    monkeypatch.setattr(_backend, "_triton_kernels", None)
    monkeypatch.setattr(_backend, "_triton_error", "ImportError: no triton here")
    with pytest.warns(RuntimeWarning, match=r"triton cannot be imported \(ImportError: no triton here\)"):
        out, mask = _backend._auto_cuda_kernel("binarize")(x, True, True)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0] and len(launched) == 1


def test_available_backends():
    cpu = _backend.available_backends("cpu")
    assert cpu[0] == "auto" and "reference" in cpu
    assert ("triton" in cpu) == triton_kernels.INTERPRETED
    assert ("cuda" in cpu) == _backend.extension_has_cuda()
    if not CUDA:
        assert _backend.available_backends("cuda") == []
    else:
        assert "triton" in _backend.available_backends("cuda")


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch, triton_backend):
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
    message = "CPU tensors only under the Triton interpreter; set TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=message):
        triton_kernels.binarize(torch.ones(3))
    with pytest.raises(RuntimeError, match=message):
        fakequant.binarize(torch.ones(3))
    assert "triton" not in _backend.available_backends("cpu")


def test_environment_variable_selects_the_backend():
    script = textwrap.dedent(
        """
        import torch, fakequant
        out, _ = torch.ops.fakequant.binarize(torch.tensor([-2.0, 0.0]), True, False)
        print(fakequant.get_backend(), out.tolist())
        """
    )
    env = {**os.environ, "FAKEQUANT_BACKEND": "triton", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "triton [-1.0, 1.0]"
    env["FAKEQUANT_BACKEND"] = "fast"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown backend 'fast'; valid backends: auto, cuda, triton, reference" in result.stderr


# ---------------------------------------------------------------------------------------------
# The GPU build, checked without a GPU: compile for sm_80 and read the PTX and SASS.
# ---------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from fakequant import triton_kernels as tk

COMMON = {"out_ptr": "*fp32", "mask_ptr": "*i1", "scale_ptr": "*fp32", "zero_point_ptr": "*i32",
          "n_elements": "i32", "quant_min": "i32", "quant_max": "i32", "WRITE_MASK": "constexpr", "BLOCK": "constexpr",
          "RELU": "constexpr", "DIVIDE_BY_FOLD": "constexpr"}
KERNELS = {
    "per_tensor": (tk._fake_quant_per_tensor_kernel, {"x_ptr": "*fp32", **COMMON}, {"RELU": False}),
    "per_tensor_relu": (tk._fake_quant_per_tensor_kernel, {"x_ptr": "*fp32", **COMMON}, {"RELU": True}),
    "per_channel": (tk._fake_quant_per_channel_kernel,
                    {"x_ptr": "*fp32", **COMMON, "channel_stride": "i64", "channels": "i64"}, {}),
    "bn_fold": (tk._bn_fold_fake_quant_weight_kernel,
                {"weight_ptr": "*fp32", "factor_ptr": "*fp32", **COMMON, "channel_stride": "i64", "channels": "i64"},
                {"DIVIDE_BY_FOLD": False}),
    # q(w f) / f: the division by f must be div.rn too (Triton's `/` on fp32 is div.full, not IEEE).
    "bn_fold_divided": (tk._bn_fold_fake_quant_weight_kernel,
                        {"weight_ptr": "*fp32", "factor_ptr": "*fp32", **COMMON, "channel_stride": "i64",
                         "channels": "i64"},
                        {"DIVIDE_BY_FOLD": True}),
}
# The backward recomputes the forward's mask (and divided output) with the same rounding and divisions.
BACKWARD_TYPES = {**COMMON, **{p: "*fp32" for p in ("grad_ptr", "weight_ptr", "factor_ptr", "std_ptr", "gamma_ptr",
                                                    "grad_weight_ptr", "grad_gamma_ptr", "grad_var_ptr")},
                  "channel_size": "i32"}
for mode, divide in (("bn_fold_backward", False), ("bn_fold_backward_divided", True)):
    KERNELS[mode] = (tk._bn_fold_fake_quant_weight_backward_kernel, BACKWARD_TYPES, {"DIVIDE_BY_FOLD": divide})
# The learnable (LSQ) backward: x_fq = (q - zp) * scale as mul.rn, so that x_fq - x is not contracted into an FMA.
LEARNABLE_TYPES = {**{p: "*fp32" for p in ("grad_ptr", "x_ptr", "grad_x_ptr", "scale_ptr", "zero_point_ptr",
                                           "partial_scale_ptr", "partial_zero_point_ptr")},
                   "run": "i64", "channels": "i64", "chunks": "i64", "quant_min": "i32", "quant_max": "i32",
                   "grad_factor": "fp32", "BLOCK": "constexpr", "STEPS": "constexpr"}
KERNELS["learnable_backward"] = (tk._fake_quant_learnable_backward_kernel, LEARNABLE_TYPES, {"STEPS": 2})
nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
report = {}
for name, (kernel, types, extra_constexprs) in KERNELS.items():
    signature = {p: types[p] for p in kernel.arg_names}
    constexprs = {"WRITE_MASK": True, "BLOCK": 1024, **extra_constexprs}
    constexprs = {p: v for p, v in constexprs.items() if p in kernel.arg_names}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32))
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"]); f.flush()
        sass = subprocess.run([nvdisasm, f.name], capture_output=True, text=True, check=True).stdout
    report[name] = {
        "ptx_add_2_23": len(re.findall(r"add\\.f32\\s+%r\\d+, %r\\d+, 0f4B000000", ptx)),
        "ptx_sub_2_23": len(re.findall(r"add\\.f32\\s+%r\\d+, %r\\d+, 0fCB000000", ptx)),
        "ptx_div_rn": ptx.count("div.rn.f32"),
        "ptx_mul_rn": len(re.findall(r"mul\\.rn\\.f32", ptx)),
        "learnable": "grad_factor" in kernel.arg_names,
        "divide_by_fold": extra_constexprs.get("DIVIDE_BY_FOLD", False),
        "per_channel_sum": "channel_size" in kernel.arg_names,
        "ptx_approx": len(re.findall(r"(div|rcp|sqrt)\\.(approx|full)", ptx)),
        "ptx_min_max": len(re.findall(r"(min|max)(\\.\\w+)*\\.f32", ptx)),
        "ptx_fma": len(re.findall(r"fma\\.\\w+\\.f32", ptx)),
        "ptx_offsets_64": len(re.findall(r"setp\\.lt\\.s64", ptx)),
        "sass_add_abs_2_23": len(re.findall(r"FADD R\\d+, \\|R\\d+\\|(\\.reuse)?, 8388608", sass)),
        "sass_sub_2_23": len(re.findall(r"FADD R\\d+, R\\d+(\\.reuse)?, -8388608", sass)),
    }

# observe_range's finalize kernel in several modes: the moving average as sub.rn/mul.rn/add.rn (no FMA, no
# flush to zero), the divisions IEEE. Its partial kernel: 64-bit channel offsets with 32-bit sizes.
OBSERVE_TYPES = {"partial_ptr": "*fp32", "fold_ptr": "*fp32", "tracked_ptr": "*fp32", "scale_ptr": "*fp32",
                 "zero_point_ptr": "*i32", "entries": "i32", "channels": "i32", "splits": "i32",
                 "tracked_row_stride": "i32", "tracked_entry_stride": "i32", "scale_stride": "i32",
                 "zero_point_stride": "i32", "averaging_constant": "fp32", "divisor": "fp32",
                 "quant_min": "fp32", "quant_max": "fp32", "symmetric_zero_point": "fp32", "x_ptr": "*fp32",
                 "per_channel": "i32", "run": "i32", "split_size": "i32"}
OBSERVE_MODES = {  # (REPLACE, SYMMETRIC, HAS_FOLD, REDUCE_CHANNELS, RELU)
    "average_affine_fold_per_tensor": (False, False, True, True, False),
    "average_symmetric_fold": (False, True, True, False, False),
    "replace_affine": (True, False, False, False, False),
    "average_affine": (False, False, False, False, False),
    "average_affine_relu": (False, False, False, False, True),
    "average_affine_fold_per_tensor_relu": (False, False, True, True, True),
}
def observe_constexprs(kernel, modes=(False, False, False, False, False)):
    values = dict(zip(("REPLACE", "SYMMETRIC", "HAS_FOLD", "REDUCE_CHANNELS", "RELU"), modes),
                  BLOCK_E=256, BLOCK_S=4, BLOCK_C=4, BLOCK_K=256)
    return {p: v for p, v in values.items() if p in kernel.arg_names}
def observe_source(kernel, types, modes=(False, False, False, False, False)):
    signature = {p: types.get(p, "constexpr") for p in kernel.arg_names}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=observe_constexprs(kernel, modes))
observe = {}
for mode, flags in OBSERVE_MODES.items():
    ptx = triton.compile(observe_source(tk._observe_range_finalize_kernel, OBSERVE_TYPES, flags),
                         target=GPUTarget("cuda", 80, 32)).asm["ptx"]
    observe[mode] = {
        "replace": flags[0],
        "ptx_sub_rn": len(re.findall(r"sub\\.rn\\.f32", ptx)),
        "ptx_mul_rn": len(re.findall(r"mul\\.rn\\.f32", ptx)),
        "ptx_add_rn": len(re.findall(r"add\\.rn\\.f32", ptx)),
        "ptx_div_rn": ptx.count("div.rn.f32"),
        "ptx_approx": len(re.findall(r"(div|rcp|sqrt)\\.(approx|full)", ptx)),
        "ptx_fma": len(re.findall(r"fma\\.\\w+\\.f32", ptx)),
        "ptx_ftz": ptx.count(".ftz"),
    }
ptx = triton.compile(observe_source(tk._observe_range_partial_kernel, OBSERVE_TYPES),
                     target=GPUTarget("cuda", 80, 32)).asm["ptx"]
observe["partial"] = {"ptx_offsets_64": len(re.findall(r"setp\\.lt\\.s64", ptx))}
report["observe_range"] = observe

# Every kernel, in every dtype, must also build (the interpreter accepts code the compiler rejects).
def build_all():
    built = []
    for dtype in ("fp32", "fp16", "bf16"):
        float_args = {"x_ptr": dtype, "out_ptr": dtype, "weight_ptr": dtype, "grad_ptr": dtype,
                      "grad_weight_ptr": dtype, "grad_gamma_ptr": dtype, "grad_var_ptr": dtype}
        types = {**COMMON, "channel_stride": "i64", "channels": "i64", "factor_ptr": "*fp32", "std_ptr": "*fp32",
                 "gamma_ptr": "*fp32", "channel_size": "i64", **{k: "*" + v for k, v in float_args.items()}}
        for kernel in (tk._fake_quant_per_tensor_kernel, tk._fake_quant_per_channel_kernel, tk._binarize_kernel,
                       tk._bn_fold_fake_quant_weight_kernel, tk._masked_grad_kernel,
                       tk._bn_fold_fake_quant_weight_backward_kernel):
            signature = {p: types[p] for p in kernel.arg_names}
            # The BN-fold kernels in both modes (divide_by_fold or not).
            for divide in (False, True) if "DIVIDE_BY_FOLD" in kernel.arg_names else (False,):
                constexprs = {
                    p: v
                    for p, v in (("WRITE_MASK", True), ("BLOCK", 1024), ("RELU", False), ("DIVIDE_BY_FOLD", divide))
                    if p in kernel.arg_names
                }
                source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                triton.compile(source, target=GPUTarget("cuda", 90, 32))
                built.append(f"{kernel.fn.__name__}:{dtype}" + (":divided" if divide else ""))
        # observe_range: x, the range and the scale in this dtype (model.half()), an int64 zero point.
        types = {**OBSERVE_TYPES, "x_ptr": "*" + dtype, "tracked_ptr": "*" + dtype, "scale_ptr": "*" + dtype,
                 "zero_point_ptr": "*i64"}
        for kernel in (tk._observe_range_partial_kernel, tk._observe_range_finalize_kernel):
            triton.compile(observe_source(kernel, types), target=GPUTarget("cuda", 90, 32))
            built.append(f"{kernel.fn.__name__}:{dtype}")
        types = {**LEARNABLE_TYPES, **{p: "*" + dtype for p in ("grad_ptr", "x_ptr", "grad_x_ptr")}}
        kernel = tk._fake_quant_learnable_backward_kernel
        source = triton.compiler.ASTSource(fn=kernel, signature={p: types[p] for p in kernel.arg_names},
                                           constexprs={"BLOCK": 1024, "STEPS": 16})
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        built.append(f"{kernel.fn.__name__}:{dtype}")
    return built


report["built_for_sm_90"] = build_all()
print(json.dumps(report))
"""


def test_gpu_build_keeps_exact_arithmetic():
    """Compiled for sm_80: the 2^23 rounding survives as two FADDs, 1/scale is div.rn, the clamp keeps NaN.

    The interpreter runs the kernels' Python with numpy; this checks that the GPU compiler neither folds
    ``(|v| + 2^23) - 2^23`` nor fuses it into an FMA, divides with IEEE rounding and clamps with
    comparisons (no min/max.f32, which would map NaN to a range end).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), FAKEQUANT_DISABLE_EXTENSION="1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    # 6 element-wise/backward kernels, the two BN-fold ones in both modes, observe_range's two and the learnable
    # backward; 3 dtypes.
    assert len(report.pop("built_for_sm_90")) == 11 * 3
    observe = report.pop("observe_range")
    assert observe.pop("partial")["ptx_offsets_64"] > 0, observe
    for mode, counts in observe.items():
        # The moving average exactly as the CUDA kernel's __fsub_rn/__fmul_rn/__fadd_rn, for min and max.
        for op in ("ptx_sub_rn", "ptx_mul_rn", "ptx_add_rn"):
            assert (counts[op] == 0) if counts["replace"] else (counts[op] >= 2), (mode, counts)
        assert counts["ptx_fma"] == 0 and counts["ptx_ftz"] == 0 and counts["ptx_approx"] == 0, (mode, counts)
        # IEEE divisions: the scale and the affine zero point.
        assert counts["ptx_div_rn"] > 0, (mode, counts)
    for name, counts in report.items():
        assert counts["ptx_add_2_23"] > 0 and counts["ptx_add_2_23"] == counts["ptx_sub_2_23"], (name, counts)
        assert counts["sass_add_abs_2_23"] == counts["ptx_add_2_23"], (name, counts)
        assert counts["sass_sub_2_23"] == counts["ptx_sub_2_23"], (name, counts)
        assert counts["ptx_div_rn"] > 0 and counts["ptx_approx"] == 0, (name, counts)
        if counts["learnable"]:  # x_fq explicitly rounded before x_fq - x
            assert counts["ptx_mul_rn"] > 0, (name, counts)
        if counts["divide_by_fold"]:  # 1 / scale and out / f
            assert counts["ptx_div_rn"] >= 2, (name, counts)
        assert counts["ptx_min_max"] == 0, (name, counts)
        if counts["per_channel_sum"]:
            # The backward. Its folded sum acc += g * w may contract into FMAs (8 in sm_80's PTX, one per element
            # of a thread): a sum, compared with a tolerance; the recomputed mask has no a * b + c shape, and the
            # FADD counts above show its rounding intact. The divided sum's terms go through a select first, so
            # there any FMA would be in the recomputed output. Its bounds compare channel-relative 32-bit
            # indices: no 64-bit compare to look for.
            assert not counts["divide_by_fold"] or counts["ptx_fma"] == 0, (name, counts)
        else:
            assert counts["ptx_fma"] == 0, (name, counts)
            # n_elements is i32 here, so a 64-bit compare shows the offsets themselves are 64-bit (pid cast first).
            assert counts["ptx_offsets_64"] > 0, (name, counts)


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------


@needs_cuda
def test_compile_fullgraph_traces_the_triton_ops():
    x = torch.randn(4, 3, 17, 9, device="cuda")
    scale, zero_point = qparams(0.05, 2, "cuda")
    channel_scale, channel_zp = qparams([0.1, 0.05, 0.2], [0, 1, -1], "cuda")

    def fn(x):
        out, mask = torch.ops.fakequant._triton_fake_quant_per_tensor(x, scale, zero_point, -128, 127, True)
        out2, _ = torch.ops.fakequant._triton_fake_quant_per_channel(out, channel_scale, channel_zp, 1, -8, 7, False)
        return torch.ops.fakequant._triton_masked_grad(out2, mask)

    compiled = torch.compile(fn, fullgraph=True)
    assert_bits_equal(compiled(x), fn(x))

    def public(x):
        return fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127) * 2

    fakequant.set_backend("triton")
    try:
        assert_bits_equal(torch.compile(public, fullgraph=True)(x), public(x))
    finally:
        fakequant.set_backend("auto")


@needs_cuda
def test_opcheck_triton_ops_on_cuda():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 3, 5, 5, generator=gen).cuda()
    scale, zero_point = qparams(0.05, 2, "cuda")
    channel_scale, channel_zp = qparams([0.1, 0.05, 0.2, 0.3], [0, 1, -1, 0], "cuda")
    gamma, var = torch.rand(4, generator=gen).cuda() + 0.5, torch.rand(4, generator=gen).cuda()
    mask = x > 0
    cases = {
        "fake_quant_per_tensor": (x, scale, zero_point, -128, 127, True),
        "fake_quant_per_channel": (x, channel_scale, channel_zp, 0, -8, 7, True),
        "binarize": (x, True, True),
        "bn_fold_fake_quant_weight": (x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7, True),
        "masked_grad": (x, mask),
        "bn_fold_fake_quant_weight_backward": (x, x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7),
        "observe_range": (x, torch.randn(2, 4, device="cuda"), channel_scale.clone(), channel_zp.clone(), 0, 0.01,
                          -8, 7, False, gamma.clone()),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.fakequant, f"_triton_{name}").default, args)
    torch.library.opcheck(torch.ops.fakequant._triton_observe_range.default, (*cases["observe_range"], True))
    # divide_by_fold=True and its backward.
    torch.library.opcheck(
        torch.ops.fakequant._triton_bn_fold_fake_quant_weight.default,
        (x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7, True, True),
    )
    torch.library.opcheck(
        torch.ops.fakequant._triton_bn_fold_fake_quant_weight_backward.default,
        (x, x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7, True),
    )


@needs_cuda
@pytest.mark.skipif(not _backend.extension_has_cuda(), reason="fakequant._C was built without CUDA kernels")
def test_triton_matches_the_cuda_kernels_on_cuda():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(8, 16, 13, 11, generator=gen) * 3
    x.view(-1)[: len(NONFINITE)] = torch.tensor(NONFINITE)
    x = x.cuda().contiguous(memory_format=torch.channels_last)
    scale, zero_point = qparams(0.05, 3, "cuda")
    channel_scale = (torch.rand(16, generator=gen) * 0.1 + 0.01).cuda()
    channel_zp = torch.randint(-4, 4, (16,), generator=gen, dtype=torch.int32).cuda()
    weight, gamma, var, eps, w_scale, w_zp = bn_case((6, 3, 3, 3), gen)
    keep = x > 0
    for dtype in FLOATS:
        xd, wd = x.to(dtype), weight.to(dtype)
        calls = {
            "fake_quant_per_tensor": (xd, scale, zero_point, -128, 127, True),
            "fake_quant_per_channel": (xd, channel_scale, channel_zp, 1, -8, 7, True),
            "binarize": (xd, True, True),
            "bn_fold_fake_quant_weight": (wd, gamma, var, eps, w_scale, w_zp, -128, 127, True),
            "masked_grad": (xd, keep),
        }
        for name, args in calls.items():
            results = {}
            for backend in ("cuda", "triton"):
                fakequant.set_backend(backend)
                try:
                    out = getattr(torch.ops.fakequant, name)(*args)
                finally:
                    fakequant.set_backend("auto")
                results[backend] = out if isinstance(out, tuple) else (out,)
            for a, b in zip(results["cuda"], results["triton"], strict=True):
                assert_bits_equal(a, b)
