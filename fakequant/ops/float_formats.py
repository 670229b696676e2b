"""Float-format fake quantization: FP8 (E4M3, E5M2), MX (MXFP8, MXFP6, MXFP4, MXINT8) and NVFP4.

What each op computes: docs/numerics.md (Float formats). Each returns ``(out, mask)``: the mask is where the
scaled value was inside the format's range, where the straight-through gradient passes. ``compute_mask=False``
returns an empty mask, and a backward through such a call passes the gradient unmasked (Model Optimizer's
default for these formats); the public functions ask for the mask only when a gradient can flow and
``mask_saturated`` is True.
"""

from __future__ import annotations

import torch

from fakequant import checks, reference
from fakequant.ops._common import fake_outputs, needs_grad, with_layout
from fakequant.ops._library import define, reference_kernel, register_autograd, register_fake

__all__ = ["fake_quant_fp8", "fake_quant_mx", "fake_quant_nvfp4"]


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.compute_mask = inputs[-1]
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(output[1] if ctx.compute_mask else None)


def _straight_through_backward(ctx, grad_out, _grad_mask):
    """``grad`` where the mask is set (0 where the value saturated), or ``grad`` unchanged without a mask."""
    rest = (None,) * (ctx.num_inputs - 1)
    if grad_out is None:
        return (None, *rest)
    if not ctx.compute_mask:
        return (grad_out, *rest)
    return (torch.ops.fakequant.masked_grad(grad_out, ctx.saved_tensors[0]), *rest)


# ---------------------------------------------------------------------------------------------
# fake_quant_fp8
# ---------------------------------------------------------------------------------------------

# scale: fp32, one element per block of block_size consecutive elements (0: the whole tensor), or None to take
# each block's amax / fmt_max in the kernel.
define(
    "fake_quant_fp8",
    "(Tensor x, Tensor? scale, str fmt, int block_size=0, bool compute_mask=True) -> (Tensor out, Tensor mask)",
)


@reference_kernel("fake_quant_fp8")
def fake_quant_fp8_reference(x, scale, fmt, block_size=0, compute_mask=True):
    return with_layout(x, *reference.fake_quant_fp8_forward(x, scale, fmt, block_size, compute_mask))


@register_fake("fake_quant_fp8")
def _(x, scale, fmt, block_size=0, compute_mask=True):
    checks.check_fp8_args(x, scale, fmt, block_size, check_values=False)
    return fake_outputs(x, compute_mask)


register_autograd("fake_quant_fp8", _straight_through_backward, _setup)


def fake_quant_fp8(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    fmt: str = "e4m3",
    block_size: int = 0,
    mask_saturated: bool = True,
) -> torch.Tensor:
    """Fake-quantizes ``x`` to FP8: ``clamp(x / s, -max, max)`` rounded to the nearest FP8 value (ties to even),
    times ``s`` (max 448 for ``"e4m3"``, 57344 for ``"e5m2"``; ±inf saturates to ±max, NaN stays NaN).

    Equal bit for bit to ``torch.clamp(x / s, -max, max).to(torch.float8_e4m3fn).float() * s`` on fp32 input;
    fp16/bf16 inputs are computed in fp32 and rounded once.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape and layout.
        scale: fp32 scales, one per block (finite, >= 2^-126), e.g. from an observer; None computes each block's
            scale in the kernel as ``amax / max`` (at least 2^-126, so an all-zero block gives zeros).
        fmt: ``"e4m3"`` or ``"e5m2"``.
        block_size: how many consecutive elements (row-major) share a scale: 0 for one scale per tensor,
            ``w[0].numel()`` for one per output channel of a weight, a divisor of the last dimension for blocks.
        mask_saturated: the gradient is 0 where ``|x / s| > max`` (the straight-through estimator masked where the
            value saturated); False passes it unmasked.

    Example:
        >>> fake_quant_fp8(torch.tensor([0.3, 1000.0]), torch.tensor([1.0]))
        tensor([3.1250e-01, 4.4800e+02])
    """
    out, _ = torch.ops.fakequant.fake_quant_fp8(x, scale, fmt, block_size, mask_saturated and needs_grad(x))
    return out


# ---------------------------------------------------------------------------------------------
# fake_quant_mx
# ---------------------------------------------------------------------------------------------

# Blocks of block_size along the last dimension; the E8M0 shared scale of each block computed in the kernel.
define(
    "fake_quant_mx",
    "(Tensor x, str elem, int block_size=32, str scale_mode='floor', bool compute_mask=True) "
    "-> (Tensor out, Tensor mask)",
)


@reference_kernel("fake_quant_mx")
def fake_quant_mx_reference(x, elem, block_size=32, scale_mode="floor", compute_mask=True):
    return with_layout(x, *reference.fake_quant_mx_forward(x, elem, block_size, scale_mode, compute_mask))


@register_fake("fake_quant_mx")
def _(x, elem, block_size=32, scale_mode="floor", compute_mask=True):
    checks.check_mx_args(x, elem, block_size, scale_mode)
    return fake_outputs(x, compute_mask)


register_autograd("fake_quant_mx", _straight_through_backward, _setup)


def fake_quant_mx(
    x: torch.Tensor,
    elem: str = "e4m3",
    block_size: int = 32,
    scale_mode: str = "floor",
    axis: int = -1,
    mask_saturated: bool = True,
) -> torch.Tensor:
    """Fake-quantizes ``x`` to an OCP Microscaling (MX) format: blocks of ``block_size`` along ``axis`` share a
    power-of-two (E8M0) scale; the elements are rounded to ``elem`` (ties to even, saturating).

    Bit-identical to torchao's ``to_mx`` + ``to_dtype`` (``torchao.prototype.mx_formats``) for the float
    elements; MXINT8 follows the OCP spec (torchao has none).

    Args:
        x: float32, float16 or bfloat16 tensor; ``x.size(axis)`` a multiple of ``block_size``.
        elem: ``"e4m3"``, ``"e5m2"`` (MXFP8), ``"e3m2"``, ``"e2m3"`` (MXFP6), ``"e2m1"`` (MXFP4) or ``"int8"``.
        block_size: elements per shared scale (32 in the spec).
        scale_mode: ``"floor"`` (the spec's ``2^(floor(log2(amax)) - emax)``) or ``"rceil"``
            (``2^ceil(log2(amax / max))``, NVIDIA's MXFP8 rule).
        axis: the dimension the blocks run along; another than the last costs a transposed copy.
        mask_saturated: the gradient is 0 where the scaled value exceeded the element maximum; False passes it
            unmasked.

    Example:
        >>> fake_quant_mx(torch.tensor([[0.1, 1.0, 3.0, 5.9]]), "e2m1", block_size=4)
        tensor([[0., 1., 3., 6.]])
    """
    axis = checks.normalize_axis(axis, x.dim()) if x.dim() else axis
    moved = x.dim() > 0 and axis != x.dim() - 1
    xm = x.movedim(axis, -1) if moved else x
    out, _ = torch.ops.fakequant.fake_quant_mx(xm, elem, block_size, scale_mode, mask_saturated and needs_grad(x))
    return out.movedim(-1, axis) if moved else out


# ---------------------------------------------------------------------------------------------
# fake_quant_nvfp4
# ---------------------------------------------------------------------------------------------

# Blocks of block_size (16) along the last dimension; per_tensor_scale: fp32, one element, or None for single-level
# scaling (block scales in E4M3 alone).
define(
    "fake_quant_nvfp4",
    "(Tensor x, Tensor? per_tensor_scale, int block_size=16, bool compute_mask=True) -> (Tensor out, Tensor mask)",
)


@reference_kernel("fake_quant_nvfp4")
def fake_quant_nvfp4_reference(x, per_tensor_scale, block_size=16, compute_mask=True):
    return with_layout(x, *reference.fake_quant_nvfp4_forward(x, per_tensor_scale, block_size, compute_mask))


@register_fake("fake_quant_nvfp4")
def _(x, per_tensor_scale, block_size=16, compute_mask=True):
    checks.check_nvfp4_args(x, per_tensor_scale, block_size, check_values=False)
    return fake_outputs(x, compute_mask)


register_autograd("fake_quant_nvfp4", _straight_through_backward, _setup)


def fake_quant_nvfp4(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | None = None,
    two_level: bool = True,
    block_size: int = 16,
    mask_saturated: bool = True,
) -> torch.Tensor:
    """Fake-quantizes ``x`` to NVFP4: FP4 E2M1 elements in blocks of 16 along the last dimension, each block's
    scale ``amax / 6`` (divided by the per-tensor scale) rounded to FP8 E4M3.

    Bit-identical to torchao's ``NVFP4Tensor.to_nvfp4(...).dequantize()``, with and without a per-tensor scale.

    Args:
        x: float32, float16 or bfloat16 tensor; the last dimension a multiple of ``block_size``.
        per_tensor_scale: fp32, one element (finite, >= 2^-120), e.g. ``amax / (6 * 448)`` from an observer.
            None with ``two_level`` computes it from ``x`` (a second pass); ``two_level=False`` scales by the
            E4M3 block scales alone.
        two_level: use a per-tensor scale (given or computed).
        block_size: elements per block scale (16 in NVFP4).
        mask_saturated: the gradient is 0 where the scaled value exceeded 6; False passes it unmasked.

    Example:
        >>> fake_quant_nvfp4(torch.linspace(-1, 1, 16)).shape
        torch.Size([16])
    """
    if two_level and per_tensor_scale is None:
        with torch.no_grad():
            per_tensor_scale = reference.nvfp4_per_tensor_scale(x.detach())
    elif not two_level and per_tensor_scale is not None:
        raise ValueError("fakequant: fake_quant_nvfp4 was given a per_tensor_scale with two_level=False; "
                         "pass one or the other")
    out, _ = torch.ops.fakequant.fake_quant_nvfp4(x, per_tensor_scale, block_size, mask_saturated and needs_grad(x))
    return out
