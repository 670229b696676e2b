"""Differentiable references: the reference's forward values with gradients that autograd derives on its own.

Each function wraps :mod:`fakequant.reference`'s values in a straight-through estimator built from ordinary
autograd, so the tests compare every op's registered backward (Python, C++, CUDA, Triton) against gradients no
kernel of ours computed. Only the tests use them.
"""

from __future__ import annotations

import torch

from fakequant import reference


class _StraightThrough(torch.autograd.Function):
    """Returns ``value`` in the forward pass and hands its gradient to ``source`` unchanged."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        ctx.source_dtype = source.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad.to(ctx.source_dtype)


def _masked_source(source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where routes the gradient to `source` only where mask holds, and its value is `source`.
    return torch.where(mask, source, source.detach())


def fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max, relu=False):
    if relu:  # ReLU's own autograd, then the straight-through estimator of the quantization
        x = torch.relu(x)
    out, mask = reference.fake_quant_per_tensor_forward(x.detach(), scale, zero_point, quant_min, quant_max)
    return _StraightThrough.apply(out, _masked_source(x, mask))


def fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max):
    out, mask = reference.fake_quant_per_channel_forward(x.detach(), scale, zero_point, axis, quant_min, quant_max)
    return _StraightThrough.apply(out, _masked_source(x, mask))


def binarize(x, clipped_ste=True):
    out, mask = reference.binarize_forward(x.detach(), clipped_ste)
    source = _masked_source(x, mask) if clipped_ste else x
    return _StraightThrough.apply(out, source)


def bn_fold_fake_quant_weight(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold=False):
    out, mask = reference.bn_fold_fake_quant_weight_forward(
        weight.detach(), gamma.detach(), var.detach(), eps, scale, zero_point, quant_min, quant_max,
        divide_by_fold=divide_by_fold,
    )
    ndim = weight.dim()
    if not divide_by_fold:
        folded = weight.float() * reference.channel_view(reference.bn_fold_factor(gamma, var, eps), 0, ndim)
        return _StraightThrough.apply(out, _masked_source(folded, mask))
    # q(w f) / f with q's straight-through estimator: autograd differentiates both appearances of f.
    factor = reference.channel_view(reference.bn_fold_training_factor(gamma, var, eps), 0, ndim)
    folded = weight.float() * factor
    quantized, _ = reference.fake_quant_values(
        folded.detach(), reference.channel_view(scale, 0, ndim), reference.channel_view(zero_point, 0, ndim),
        quant_min, quant_max, False, torch.float32,
    )
    return (_StraightThrough.apply(quantized, _masked_source(folded, mask)) / factor).to(weight.dtype)


class _LearnableFakeQuant(torch.autograd.Function):
    """The reference's autograd of the learnable op: :func:`fake_quant_learnable_backward`."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.arguments = (axis, quant_min, quant_max, grad_factor)
        return reference.fake_quant_learnable_forward(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        grad_x, grad_scale, grad_zero_point = reference.fake_quant_learnable_backward(
            grad, x, scale, zero_point, *ctx.arguments
        )
        return grad_x, grad_scale, grad_zero_point if zero_point.is_floating_point() else None, None, None, None, None


def fake_quant_learnable(x, scale, zero_point, quant_min, quant_max, grad_factor, axis=None):
    return _LearnableFakeQuant.apply(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)


def _straight_through(x, out, mask, mask_saturated):
    return _StraightThrough.apply(out, _masked_source(x, mask) if mask_saturated else x)


def fake_quant_fp8(x, scale=None, fmt="e4m3", block_size=0, mask_saturated=True):
    out, mask = reference.fake_quant_fp8_forward(x.detach(), scale, fmt, block_size)
    return _straight_through(x, out, mask, mask_saturated)


def fake_quant_mx(x, elem="e4m3", block_size=32, scale_mode="floor", axis=-1, mask_saturated=True):
    moved = x.movedim(axis, -1)
    out, mask = reference.fake_quant_mx_forward(moved.detach(), elem, block_size, scale_mode)
    return _straight_through(moved, out, mask, mask_saturated).movedim(-1, axis)


def fake_quant_nvfp4(x, per_tensor_scale=None, two_level=True, block_size=16, mask_saturated=True):
    if two_level and per_tensor_scale is None:
        per_tensor_scale = reference.nvfp4_per_tensor_scale(x.detach())
    out, mask = reference.fake_quant_nvfp4_forward(x.detach(), per_tensor_scale, block_size)
    return _straight_through(x, out, mask, mask_saturated)
