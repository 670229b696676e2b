"""Fake quantization with a learned step size (LSQ): docs/numerics.md, Learned step size (LSQ)."""

from __future__ import annotations

import math

import torch

from fakequant import checks, reference
from fakequant.ops._library import (
    composite_kernel,
    define,
    reference_kernel,
    register_autograd,
    register_fake,
)

__all__ = ["fake_quant_learnable", "lsq_grad_factor"]

# ---------------------------------------------------------------------------------------------
# fake_quant_learnable: per-tensor (axis None) or per-channel fake quantization whose gradient also reaches scale
# and, when it is float32 (a learned zero point, rounded and clamped in the forward), zero_point. A composite op:
# its forward is the per-tensor/per-channel op of the chosen backend, and its backward,
# fake_quant_learnable_backward, recomputes the mask from x instead of storing one.
# ---------------------------------------------------------------------------------------------

define(
    "fake_quant_learnable",
    "(Tensor x, Tensor scale, Tensor zero_point, int? axis, int quant_min, int quant_max, float grad_factor) "
    "-> Tensor",
    composite=True,
)


@composite_kernel("fake_quant_learnable", own_autograd=True)
def fake_quant_learnable_composite(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    # The values of the scale and of an integer zero point are checked by the op it calls (a learned one is
    # clamped into the range first).
    checks.check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=False)
    zero_point = reference.learnable_zero_point(zero_point, quant_min, quant_max)
    if axis is None:
        return torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max, False)[0]
    return torch.ops.fakequant.fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max, False)[0]


@register_fake("fake_quant_learnable")
def _(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    checks.check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=False)
    return torch.empty_like(x)


def _learnable_setup(ctx, inputs, output):
    x, scale, zero_point, axis, quant_min, quant_max, grad_factor = inputs
    ctx.set_materialize_grads(False)
    ctx.arguments = (axis, quant_min, quant_max, grad_factor)
    ctx.zero_point_learned = zero_point.is_floating_point()
    # Copies of the parameters: an optimizer step may update them in place before this backward runs.
    ctx.save_for_backward(x, scale.detach().clone(), zero_point.detach().clone())


def _learnable_backward(ctx, grad_out):
    if grad_out is None:
        return None, None, None, None, None, None, None
    x, scale, zero_point = ctx.saved_tensors
    grad_x, grad_scale, grad_zero_point = torch.ops.fakequant.fake_quant_learnable_backward(
        grad_out, x, scale, zero_point, *ctx.arguments
    )
    return grad_x, grad_scale, grad_zero_point if ctx.zero_point_learned else None, None, None, None, None


register_autograd("fake_quant_learnable", _learnable_backward, _learnable_setup)


def lsq_grad_factor(x: torch.Tensor, quant_max: int, axis: int | None = None) -> float:
    """LSQ's gradient scale for a step size: ``1 / sqrt(n * quant_max)``, ``n`` the elements one scale covers.

    Args:
        x: the tensor the scale quantizes.
        quant_max: the highest integer level (LSQ's ``Q_P``).
        axis: the channel axis of a per-channel scale (each covers ``x.numel() / x.size(axis)`` elements).

    Example:
        >>> round(lsq_grad_factor(torch.zeros(64, 32), 127), 6)
        0.001961
    """
    count = x.numel() // max(x.size(axis), 1) if axis is not None else x.numel()
    return 1.0 / math.sqrt(max(count, 1) * max(quant_max, 1))


def fake_quant_learnable(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    grad_factor: float | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake quantization with a learned step size (LSQ, Esser et al., ICLR 2020): gradients reach ``scale``.

    The forward is :func:`fake_quant_per_tensor` (``axis`` None) or :func:`fake_quant_per_channel`. The backward
    gives ``x`` the straight-through gradient, ``scale`` the sum of ``round(x / s) - x / s`` inside the range
    and ``quant_min - zero_point`` / ``quant_max - zero_point`` outside it (times the output gradient and
    ``grad_factor``), and a float32 ``zero_point`` (learned, rounded and clamped in the forward) the sum of
    ``-scale`` outside the range. One fused pass each way; the sums are deterministic.

    Args:
        x: float32, float16 or bfloat16 tensor.
        scale: fp32, one element (per tensor) or ``x.size(axis)`` elements, finite and >= 2^-126.
        zero_point: int32/int64 (fixed) or float32 (learned), the shape of ``scale``.
        quant_min: lowest integer level.
        quant_max: highest integer level.
        grad_factor: multiplies the scale's and zero point's gradients; default :func:`lsq_grad_factor`.
        axis: the channel axis for a per-channel scale, or None.

    Returns:
        A tensor of ``x``'s shape, dtype and layout.

    Example:
        >>> x = torch.tensor([0.04, 0.26, 2.0])
        >>> scale = torch.tensor([0.1], requires_grad=True)
        >>> fake_quant_learnable(x, scale, torch.tensor([0]), -8, 7, grad_factor=1.0).sum().backward()
        >>> scale.grad
        tensor([7.])
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, quant_max, axis)
    return torch.ops.fakequant.fake_quant_learnable(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)


# ---------------------------------------------------------------------------------------------
# fake_quant_learnable_backward: one pass over grad and x giving grad_x and the per-tensor/per-channel sums of
# LSQ's terms (reference.fake_quant_learnable_backward), summed in a fixed order (the same bits run to run).
# ---------------------------------------------------------------------------------------------

define(
    "fake_quant_learnable_backward",
    "(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int? axis, int quant_min, int quant_max, "
    "float grad_factor) -> (Tensor grad_x, Tensor grad_scale, Tensor grad_zero_point)",
)


@reference_kernel("fake_quant_learnable_backward")
def fake_quant_learnable_backward_reference(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    return reference.fake_quant_learnable_backward(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor)


@register_fake("fake_quant_learnable_backward")
def _(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    checks.check_learnable_backward_args(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=False
    )
    return (torch.empty_like(x), torch.empty_like(scale, dtype=torch.float32),
            torch.empty_like(zero_point, dtype=torch.float32))  # fmt: skip
