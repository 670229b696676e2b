"""Public functional API: each wrapper calls one ``fakequant::`` op and returns its output with autograd.

The mask that the backward pass needs is written only when a gradient can flow (grad mode on and an
input that requires grad); inference skips that byte per element.
"""

from __future__ import annotations

import math

import torch

from fakequant import reference

__all__ = [
    "fake_quant_per_tensor",
    "fake_quant_per_channel",
    "binarize",
    "bn_fold_fake_quant_weight",
    "fold_bias",
    "fake_quant_learnable",
    "fake_quant_per_group",
    "lsq_grad_factor",
]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fake_quant_per_tensor(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    relu: bool = False,
) -> torch.Tensor:
    """Fake-quantizes ``x`` with one scale and zero point: quantize, clamp, dequantize.

    ``q = round_half_even(x * (1 / scale)) + zero_point``, ``out = (clamp(q, quant_min, quant_max)
    - zero_point) * scale``. The gradient is the straight-through estimator: ``grad`` where ``q`` lies
    in ``[quant_min, quant_max]``, 0 elsewhere.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape and layout.
        scale: fp32 tensor with one element, finite and > 0.
        zero_point: int32/int64 tensor with one element in ``[quant_min, quant_max]``.
        quant_min: lowest integer level.
        quant_max: highest integer level.
        relu: fake-quantize ``relu(x)`` instead, with ReLU's gradient (``x > 0``) folded into the mask: a
            quantized ReLU output in one op whose backward is one masked pass.

    Returns:
        A tensor of ``x``'s shape, dtype and layout.

    Example:
        >>> x = torch.tensor([0.04, 0.06, 1.0])
        >>> fake_quant_per_tensor(x, torch.tensor(0.1), torch.tensor(0), -8, 7)
        tensor([0.0000, 0.1000, 0.7000])
    """
    out, _ = torch.ops.fakequant.fake_quant_per_tensor(
        x, scale, zero_point, quant_min, quant_max, _needs_grad(x), relu
    )
    return out


def fake_quant_per_channel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
) -> torch.Tensor:
    """Fake-quantizes ``x`` with one scale and zero point per slice along ``axis``.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape and layout.
        scale: 1-D fp32 tensor of ``x.size(axis)`` elements, each finite and > 0.
        zero_point: 1-D int32/int64 tensor of ``x.size(axis)`` elements in ``[quant_min, quant_max]``.
        axis: the channel dimension (negative values count from the end).
        quant_min: lowest integer level.
        quant_max: highest integer level.

    Returns:
        A tensor of ``x``'s shape, dtype and layout.

    Example:
        >>> w = torch.tensor([[0.3, -0.3], [0.3, -0.3]])
        >>> fake_quant_per_channel(w, torch.tensor([0.1, 0.2]), torch.zeros(2, dtype=torch.int32), 0, -8, 7)
        tensor([[ 0.3000, -0.3000],
                [ 0.4000, -0.4000]])
    """
    out, _ = torch.ops.fakequant.fake_quant_per_channel(
        x, scale, zero_point, axis, quant_min, quant_max, _needs_grad(x)
    )
    return out


def binarize(x: torch.Tensor, clipped_ste: bool = True) -> torch.Tensor:
    """Binarizes ``x`` to ``+1`` (``x >= 0``) or ``-1``; NaN stays NaN.

    Args:
        x: float32, float16 or bfloat16 tensor.
        clipped_ste: gradient ``grad * (|x| <= 1)`` (activations in BNN) if True, else the identity
            straight-through estimator (weights in BNN).

    Returns:
        A tensor of ``x``'s shape, dtype and layout holding -1 and +1.

    Example:
        >>> binarize(torch.tensor([-0.5, 0.0, 2.0]))
        tensor([-1.,  1.,  1.])
    """
    out, _ = torch.ops.fakequant.binarize(x, clipped_ste, clipped_ste and _needs_grad(x))
    return out


def bn_fold_fake_quant_weight(
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    divide_by_fold: bool = False,
) -> torch.Tensor:
    """Folds BatchNorm's scale into a conv weight and fake-quantizes it per output channel, in one pass.

    ``out = fake_quant_per_channel(weight * f, scale, zero_point, axis=0)`` with ``f = gamma / sqrt(var + eps)``.
    Gradients reach ``weight``, ``gamma`` and (when it requires grad) ``var``.

    Args:
        weight: conv or linear weight, output channels on axis 0.
        gamma: BatchNorm weight, 1-D of ``weight.size(0)`` elements.
        var: running or batch variance, 1-D of ``weight.size(0)`` elements.
        eps: BatchNorm's epsilon.
        scale: 1-D fp32 per-channel scale of the folded weight.
        zero_point: 1-D int32/int64 per-channel zero point.
        quant_min: lowest integer level.
        quant_max: highest integer level.
        divide_by_fold: return ``out / f`` (``f`` taken as 1 where it is 0): the weight a Conv+BN pair trains
            with while BN uses batch statistics, ``bn(conv(x, q(w f) / f))`` (see :class:`fakequant.ConvBnQAT`).
            ``scale`` and ``zero_point`` still quantize ``w * f``.

    Returns:
        The folded, fake-quantized weight, shaped like ``weight``.

    Example:
        >>> w = torch.ones(2, 1, 1, 1)
        >>> out = bn_fold_fake_quant_weight(w, torch.tensor([1.0, 2.0]), torch.ones(2), 0.0,
        ...                                 torch.tensor([0.5, 0.5]), torch.zeros(2, dtype=torch.int32), -8, 7)
        >>> out.flatten()
        tensor([1., 2.])
    """
    # No mask: the op's backward recomputes it from the weight.
    out, _ = torch.ops.fakequant.bn_fold_fake_quant_weight(
        weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, False, divide_by_fold
    )
    return out


def fold_bias(
    bias: torch.Tensor | None,
    beta: torch.Tensor,
    mean: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The bias of a conv with BatchNorm folded in: ``beta + (bias - mean) * gamma / sqrt(var + eps)``.

    Args:
        bias: the conv's bias, or None.
        beta: BatchNorm bias.
        mean: running or batch mean.
        gamma: BatchNorm weight.
        var: running or batch variance.
        eps: BatchNorm's epsilon.

    Returns:
        The folded bias, 1-D fp32, differentiable in every input.

    Example:
        >>> fold_bias(None, torch.zeros(1), torch.ones(1), torch.ones(1), torch.ones(1), 0.0)
        tensor([-1.])
    """
    centred = -mean.float() if bias is None else bias.float() - mean.float()
    return beta.float() + centred * reference.bn_fold_factor(gamma, var, eps)


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
        scale: fp32, one element (per tensor) or ``x.size(axis)`` elements, finite and > 0.
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


def fake_quant_per_group(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    quant_min: int,
    quant_max: int,
) -> torch.Tensor:
    """Fake-quantizes a Linear or 1x1 Conv weight per group of ``group_size`` input channels.

    Each output channel's ``in`` input channels are split into ``in / group_size`` groups of consecutive
    channels, each with its own scale and zero point (``scale[o, g]``): the per-channel op on the
    ``[out * in / group_size, group_size]`` view, one fused pass, with the straight-through gradient.

    Args:
        x: a ``[out, in]`` or ``[out, in, 1, 1]`` weight.
        scale: fp32, shape ``[out, in / group_size]``, finite and > 0.
        zero_point: int32/int64, the shape of ``scale``.
        group_size: input channels per group; must divide ``in``.
        quant_min: lowest integer level.
        quant_max: highest integer level.

    Example:
        >>> w = torch.tensor([[0.1, 0.2, 1.0, 2.0]])
        >>> fake_quant_per_group(w, torch.tensor([[0.1, 1.0]]), torch.zeros(1, 2, dtype=torch.int32), 2, -8, 7)
        tensor([[0.1000, 0.2000, 1.0000, 2.0000]])
    """
    out, _ = torch.ops.fakequant.fake_quant_per_group(
        x, scale, zero_point, group_size, quant_min, quant_max, _needs_grad(x)
    )
    return out
