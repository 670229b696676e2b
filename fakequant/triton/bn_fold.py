"""Triton kernels of the BN-folded weight ops (``fakequant/ops/bn_fold.py``): the forward and the backward that
recomputes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fakequant import checks
from fakequant.triton._common import (
    BLOCK_SIZE,
    as_float32,
    channel_geometry,
    check_device,
    dense_like,
    elementwise_grid,
    elementwise_outputs,
    fake_quant_values,
    has_values,
    is_non_overlapping_and_dense,
    launch,
    to_dtype,
    triton_kernel,
)

# Elements per loop step of the per-channel reduction in the BN-fold backward (one program per channel); not tuned
# on a GPU yet.
REDUCE_BLOCK_SIZE = 1024


# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight
# ---------------------------------------------------------------------------------------------


def _bn_statistics(gamma: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(std, factor)`` in fp32, by the reference's own torch expressions.

    These are O(channels) and computed with torch, not in the kernel, on purpose: torch's fp32 ``sqrt`` on
    CPU is not always correctly rounded (it differed from ``sqrt_rn`` by one ulp on 403 of 65536 random
    values), so an in-kernel ``sqrt_rn`` would not reproduce the reference bit for bit.
    """
    std = torch.sqrt(var.float() + eps)
    return std, (gamma.float() / std).contiguous()


@triton.jit
def _bn_fold_values(weight, factor, inv_scale, scale, zero_point, quant_min, quant_max, DIVIDE_BY_FOLD: tl.constexpr):
    """The forward's ``(out, inside)`` of fp32 ``weight``: ``out`` in fp32, not yet rounded to the output's dtype.

    ``factor`` is the plain fold factor ``gamma / std``. ``q(w * f)``, or with ``DIVIDE_BY_FOLD`` ``q(w * f) / f``
    with ``f`` taken as 1 where it is 0 (reference.bn_fold_training_factor; NaN stays NaN), so the division is
    never by 0; divided in fp32 (IEEE, ``div_rn``). The one definition of the forward's values: the forward
    kernel stores them, the backward kernel recomputes them, bit for bit the same.
    """
    if DIVIDE_BY_FOLD:
        factor = tl.where(factor == 0.0, 1.0, factor)
    out, inside = fake_quant_values(weight * factor, inv_scale, scale, zero_point, quant_min, quant_max)
    if DIVIDE_BY_FOLD:
        out = tl.math.div_rn(out, factor)
    return out, inside


@triton.jit
def _bn_fold_fake_quant_weight_kernel(
    weight_ptr,
    out_ptr,
    mask_ptr,
    factor_ptr,
    scale_ptr,
    zero_point_ptr,
    n_elements,
    channel_stride,
    channels,
    quant_min,
    quant_max,
    WRITE_MASK: tl.constexpr,
    DIVIDE_BY_FOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # factor_ptr holds the plain fold factor; _bn_fold_values takes it as 1 where it is 0 for DIVIDE_BY_FOLD.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    channel = (offsets // channel_stride) % channels
    factor = tl.load(factor_ptr + channel, mask=in_bounds, other=1.0)
    scale = tl.load(scale_ptr + channel, mask=in_bounds, other=1.0)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel, mask=in_bounds, other=0).to(tl.float32)
    weight = as_float32(tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0))
    out, inside = _bn_fold_values(
        weight, factor, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32),
        DIVIDE_BY_FOLD,
    )
    tl.store(out_ptr + offsets, to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


@triton_kernel("bn_fold_fake_quant_weight")
def bn_fold_fake_quant_weight_triton(
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
    divide_by_fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::bn_fold_fake_quant_weight``: fold BN into ``weight`` and fake-quantize along axis 0.

    ``divide_by_fold=True`` returns ``q(w * f) / f`` with ``f`` taken as 1 where it is 0; ``scale``,
    ``zero_point`` and the mask are those of ``q(w * f)`` either way.
    """
    checks.check_bn_fold_args(
        weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=has_values(scale)
    )
    weight_dense, out, mask = elementwise_outputs(weight, compute_mask)
    n_elements = weight.numel()
    if n_elements == 0:
        return out, mask
    _, factor = _bn_statistics(gamma, var, eps)
    channel_stride, channels = channel_geometry(weight_dense, 0)
    launch(
        _bn_fold_fake_quant_weight_kernel, elementwise_grid(n_elements), weight,
        weight_dense,
        out,
        mask if compute_mask else out,
        factor,
        scale.contiguous(),
        zero_point.contiguous(),
        n_elements,
        channel_stride,
        channels,
        quant_min,
        quant_max,
        WRITE_MASK=compute_mask,
        DIVIDE_BY_FOLD=divide_by_fold,
        BLOCK=BLOCK_SIZE,
    )
    return out, mask



# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight_backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bn_fold_fake_quant_weight_backward_kernel(
    grad_ptr,
    weight_ptr,
    factor_ptr,
    std_ptr,
    gamma_ptr,
    scale_ptr,
    zero_point_ptr,
    grad_weight_ptr,
    grad_gamma_ptr,
    grad_var_ptr,
    channel_size,
    quant_min,
    quant_max,
    DIVIDE_BY_FOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per output channel, whose channel_size elements are contiguous in memory: the per-channel
    # sum is then a deterministic loop, no atomics. The forward's mask (and, with DIVIDE_BY_FOLD, its output
    # rounded to the weight's dtype) is recomputed from the weight by _bn_fold_values, as the forward kernel
    # computes it; nothing of the forward is read back.
    # Without DIVIDE_BY_FOLD (out = q(w f)): grad_weight = g * f and grad_f = sum(g * w), g the masked grad.
    # With it (out = q(w f) / f): grad_weight = g, and grad_f = sum(grad * ((mask ? w : 0) - out)) / f, 0 where
    # f (factor_ptr's plain factor) is 0. The sum takes the unmasked grad: a clamped element's out = c / f
    # still depends on f.
    channel = tl.program_id(0).to(tl.int64)
    base = channel * channel_size
    factor = tl.load(factor_ptr + channel)
    scale = tl.load(scale_ptr + channel)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, channel_size, BLOCK):
        offsets = base + start + tl.arange(0, BLOCK)
        in_bounds = (start + tl.arange(0, BLOCK)) < channel_size
        raw_grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
        weight = as_float32(tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0))
        out, keep = _bn_fold_values(
            weight, factor, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32),
            DIVIDE_BY_FOLD,
        )
        grad = as_float32(tl.where(keep, raw_grad, tl.zeros_like(raw_grad)))
        if DIVIDE_BY_FOLD:
            tl.store(grad_weight_ptr + offsets, to_dtype(grad, grad_weight_ptr.dtype.element_ty), mask=in_bounds)
            # The forward's output as stored: rounded to the weight's dtype, then widened back.
            out = as_float32(to_dtype(out, weight_ptr.dtype.element_ty))
            # Lanes past the channel's end are left out: their out = q(0 * f) / f is NaN for an inf or NaN f.
            acc += tl.where(in_bounds, as_float32(raw_grad) * (tl.where(keep, weight, 0.0) - out), 0.0)
        else:
            tl.store(
                grad_weight_ptr + offsets, to_dtype(grad * factor, grad_weight_ptr.dtype.element_ty), mask=in_bounds
            )
            acc += grad * weight
    total = tl.sum(acc, axis=0)
    if DIVIDE_BY_FOLD:
        # Divided by 1 where f == 0, whose result the where discards (no division by zero is evaluated).
        total = tl.where(factor == 0.0, 0.0, tl.math.div_rn(total, tl.where(factor == 0.0, 1.0, factor)))
    std = tl.load(std_ptr + channel)
    gamma = tl.load(gamma_ptr + channel)
    grad_gamma = tl.math.div_rn(total, std)
    grad_var = tl.math.div_rn(-0.5 * total * gamma, std * std * std)
    tl.store(grad_gamma_ptr + channel, to_dtype(grad_gamma, grad_gamma_ptr.dtype.element_ty))
    tl.store(grad_var_ptr + channel, to_dtype(grad_var, grad_var_ptr.dtype.element_ty))


def _channel_major(t: torch.Tensor) -> bool:
    """True when ``t`` is dense with axis 0 outermost, so that each output channel is one contiguous run."""
    return is_non_overlapping_and_dense(t) and (t.size(0) <= 1 or t.stride(0) * t.size(0) == t.numel())


@triton_kernel("bn_fold_fake_quant_weight_backward")
def bn_fold_fake_quant_weight_backward_triton(
    grad: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    divide_by_fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::bn_fold_fake_quant_weight_backward``: ``(grad_weight, grad_gamma, grad_var)``.

    Takes :func:`bn_fold_fake_quant_weight`'s arguments and recomputes its mask (and, for
    ``divide_by_fold=True``, its output) element by element, bit for bit the forward kernel's, instead of
    reading them: the gradients of ``q(w * f)``, or of ``q(w * f) / f`` (reference.bn_fold_fake_quant_weight_backward).
    """
    checks.check_bn_fold_backward_args(
        grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=has_values(scale)
    )
    check_device(weight)
    grad_weight = torch.empty_like(weight)
    grad_gamma = torch.empty_like(gamma)
    grad_var = torch.empty_like(var)
    std, factor = _bn_statistics(gamma, var, eps)
    if weight.numel() == 0:
        # No element contributes: the per-channel sums are 0 (and the signs of the zeros the reference's).
        total = torch.zeros_like(std)
        if divide_by_fold:
            total = torch.where(factor == 0, torch.zeros((), device=factor.device), total / factor)
        grad_gamma.copy_(total / std)
        grad_var.copy_(-0.5 * total * gamma.float() / (std * std * std))
        return grad_weight, grad_gamma, grad_var
    # grad_weight is written in weight's layout when each channel is contiguous in it (contiguous or
    # channels_last weights); any other layout goes through a contiguous copy.
    weight_major = weight if _channel_major(weight) else weight.contiguous()
    result = grad_weight if weight_major is weight else torch.empty_like(weight_major)
    launch(
        _bn_fold_fake_quant_weight_backward_kernel, (weight.size(0),), weight,
        dense_like(grad, weight_major),
        weight_major,
        factor,
        std.contiguous(),
        gamma.float().contiguous(),
        scale.contiguous(),
        zero_point.contiguous(),
        result,
        grad_gamma,
        grad_var,
        weight.numel() // weight.size(0),
        quant_min,
        quant_max,
        DIVIDE_BY_FOLD=divide_by_fold,
        BLOCK=REDUCE_BLOCK_SIZE,
    )
    if result is not grad_weight:
        grad_weight.copy_(result)
    return grad_weight, grad_gamma, grad_var
