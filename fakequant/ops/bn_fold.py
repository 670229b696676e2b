"""BatchNorm-folded conv weights, fake-quantized per output channel in one pass: docs/numerics.md, BN-folded
weights.
"""

from __future__ import annotations

import torch

from fakequant import checks, reference
from fakequant.ops._common import fake_outputs, like, with_layout
from fakequant.ops._library import define, reference_kernel, register_autograd, register_fake

__all__ = ["bn_fold_fake_quant_weight", "fold_bias"]

# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight: fake_quant_per_channel(weight * gamma / sqrt(var + eps)) along axis 0; gamma, var,
# scale and zero_point 1-D with weight.size(0) elements. Gradients flow to weight, gamma and var (a running
# variance buffer or a batch variance). divide_by_fold=True returns q(w f) / f instead (f taken as 1 where it is
# 0): the weight of a BN-folded conv in training, whose output BN then normalizes with batch statistics.
# ---------------------------------------------------------------------------------------------

define(
    "bn_fold_fake_quant_weight",
    "(Tensor weight, Tensor gamma, Tensor var, float eps, Tensor scale, Tensor zero_point, "
    "int quant_min, int quant_max, bool compute_mask=True, bool divide_by_fold=False) -> (Tensor out, Tensor mask)",
)


@reference_kernel("bn_fold_fake_quant_weight")
def bn_fold_fake_quant_weight_reference(
    weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask=True, divide_by_fold=False
):
    return with_layout(
        weight,
        *reference.bn_fold_fake_quant_weight_forward(
            weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask, divide_by_fold
        ),
    )


@register_fake("bn_fold_fake_quant_weight")
def _(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask=True, divide_by_fold=False):
    checks.check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=False)
    return fake_outputs(weight, compute_mask)


def _bn_fold_setup(ctx, inputs, output):
    weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, _, divide_by_fold = inputs
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.quant_min, ctx.quant_max, ctx.divide_by_fold = eps, quant_min, quant_max, divide_by_fold
    # The backward recomputes the forward, which needs these qparams; copies, because a quantizer updates its
    # scale/zero-point buffers in place on the next forward, which may come before this backward.
    ctx.save_for_backward(weight, gamma, var, scale.clone(), zero_point.clone())


def _bn_fold_backward(ctx, grad_out, _grad_mask):
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None, None
    weight, gamma, var, scale, zero_point = ctx.saved_tensors
    grad_weight, grad_gamma, grad_var = torch.ops.fakequant.bn_fold_fake_quant_weight_backward(
        grad_out, weight, gamma, var, ctx.eps, scale, zero_point, ctx.quant_min, ctx.quant_max, ctx.divide_by_fold
    )
    return grad_weight, grad_gamma, grad_var, None, None, None, None, None, None, None


register_autograd("bn_fold_fake_quant_weight", _bn_fold_backward, _bn_fold_setup)


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


# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight_backward: takes the forward's arguments and recomputes its mask (and divided output)
# element by element instead of reading them, so the forward stores no mask for the weight.
# ---------------------------------------------------------------------------------------------

define(
    "bn_fold_fake_quant_weight_backward",
    "(Tensor grad, Tensor weight, Tensor gamma, Tensor var, float eps, Tensor scale, Tensor zero_point, "
    "int quant_min, int quant_max, bool divide_by_fold=False) -> (Tensor grad_weight, Tensor grad_gamma, "
    "Tensor grad_var)",
)


@reference_kernel("bn_fold_fake_quant_weight_backward")
def bn_fold_fake_quant_weight_backward_reference(
    grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold=False
):
    grad_weight, grad_gamma, grad_var = reference.bn_fold_fake_quant_weight_backward(
        grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold
    )
    return like(grad_weight, weight), grad_gamma, grad_var


@register_fake("bn_fold_fake_quant_weight_backward")
def _(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold=False):
    checks.check_bn_fold_backward_args(
        grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=False
    )
    return torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(var)


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
