"""Integer fake quantization: per tensor, per channel, per group, and the straight-through backward.

What each op computes: docs/numerics.md (Per-tensor, Per-channel and Per-group fake quantization,
Straight-through gradients). Every ``compute_mask=False`` call returns an empty bool mask and cannot be
differentiated; the public functions ask for the mask only when a gradient can flow.
"""

from __future__ import annotations

import torch

from fakequant import checks, reference
from fakequant.ops._common import fake_outputs, like, needs_grad, save_mask, saved_mask, with_layout
from fakequant.ops._library import (
    composite_kernel,
    define,
    reference_kernel,
    register_autograd,
    register_fake,
)

__all__ = ["fake_quant_per_channel", "fake_quant_per_group", "fake_quant_per_tensor"]

# ---------------------------------------------------------------------------------------------
# masked_grad: the straight-through backward, grad where mask, 0 elsewhere.
# ---------------------------------------------------------------------------------------------

define("masked_grad", "(Tensor grad, Tensor mask) -> Tensor")


@reference_kernel("masked_grad")
def masked_grad_reference(grad, mask):
    return like(reference.masked_grad(grad, mask), grad)


@register_fake("masked_grad")
def _(grad, mask):
    return torch.empty_like(grad)


# ---------------------------------------------------------------------------------------------
# fake_quant_per_tensor
# ---------------------------------------------------------------------------------------------

# scale: one fp32 element; zero_point: one int32/int64 element. relu=True fake-quantizes relu(x) and puts ReLU's
# gradient (x > 0) into the mask, so a quantized ReLU's backward is one masked_grad.
define(
    "fake_quant_per_tensor",
    "(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
    "bool compute_mask=True, bool relu=False) -> (Tensor out, Tensor mask)",
)


@reference_kernel("fake_quant_per_tensor")
def fake_quant_per_tensor_reference(x, scale, zero_point, quant_min, quant_max, compute_mask=True, relu=False):
    return with_layout(
        x, *reference.fake_quant_per_tensor_forward(x, scale, zero_point, quant_min, quant_max, compute_mask, relu)
    )


@register_fake("fake_quant_per_tensor")
def _(x, scale, zero_point, quant_min, quant_max, compute_mask=True, relu=False):
    checks.check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, check_values=False)
    return fake_outputs(x, compute_mask)


def _fake_quant_per_tensor_setup(ctx, inputs, output):
    save_mask(ctx, inputs[5], output)


def _straight_through_backward(ctx, grad_out, _grad_mask):
    """The backward of the per-tensor and per-channel ops (seven inputs each): ``masked_grad`` to ``x`` only."""
    if grad_out is None:
        return None, None, None, None, None, None, None
    return torch.ops.fakequant.masked_grad(grad_out, saved_mask(ctx)), None, None, None, None, None, None


register_autograd("fake_quant_per_tensor", _straight_through_backward, _fake_quant_per_tensor_setup)


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
        scale: fp32 tensor with one element, finite and >= 2^-126.
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
        x, scale, zero_point, quant_min, quant_max, needs_grad(x), relu
    )
    return out


# ---------------------------------------------------------------------------------------------
# fake_quant_per_channel
# ---------------------------------------------------------------------------------------------

# scale / zero_point: 1-D with x.size(axis) elements.
define(
    "fake_quant_per_channel",
    "(Tensor x, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max, "
    "bool compute_mask=True) -> (Tensor out, Tensor mask)",
)


@reference_kernel("fake_quant_per_channel")
def fake_quant_per_channel_reference(x, scale, zero_point, axis, quant_min, quant_max, compute_mask=True):
    return with_layout(
        x,
        *reference.fake_quant_per_channel_forward(x, scale, zero_point, axis, quant_min, quant_max, compute_mask),
    )


@register_fake("fake_quant_per_channel")
def _(x, scale, zero_point, axis, quant_min, quant_max, compute_mask=True):
    checks.check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis, check_values=False)
    return fake_outputs(x, compute_mask)


def _fake_quant_per_channel_setup(ctx, inputs, output):
    save_mask(ctx, inputs[6], output)


register_autograd("fake_quant_per_channel", _straight_through_backward, _fake_quant_per_channel_setup)


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
        scale: 1-D fp32 tensor of ``x.size(axis)`` elements, each finite and >= 2^-126.
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
        x, scale, zero_point, axis, quant_min, quant_max, needs_grad(x)
    )
    return out


# ---------------------------------------------------------------------------------------------
# fake_quant_per_group: the per-channel op of the [out * in / group_size, group_size] view of a Linear [out, in]
# or 1x1 Conv [out, in, 1, 1] weight, scales [out, in / group_size]. A CompositeImplicitAutograd op, so every
# backend's per-channel kernel serves it and autograd and compile see the per-channel op.
# ---------------------------------------------------------------------------------------------

define(
    "fake_quant_per_group",
    "(Tensor x, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max, "
    "bool compute_mask=True) -> (Tensor out, Tensor mask)",
    composite=True,
)


@composite_kernel("fake_quant_per_group")
def fake_quant_per_group_composite(x, scale, zero_point, group_size, quant_min, quant_max, compute_mask=True):
    checks.check_per_group_args(x, scale, zero_point, group_size)
    out, mask = torch.ops.fakequant.fake_quant_per_channel(
        reference.per_group_view(x, group_size), scale.reshape(-1), zero_point.reshape(-1), 0, quant_min, quant_max,
        compute_mask,
    )
    return out.reshape(x.shape), mask.reshape(x.shape) if compute_mask else mask


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
        scale: fp32, shape ``[out, in / group_size]``, finite and >= 2^-126.
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
        x, scale, zero_point, group_size, quant_min, quant_max, needs_grad(x)
    )
    return out
