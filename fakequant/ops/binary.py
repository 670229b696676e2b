"""Binarization with a straight-through gradient (BNN): docs/numerics.md, Binarization."""

from __future__ import annotations

import torch

from fakequant import checks, reference
from fakequant.ops._common import fake_outputs, needs_grad, saved_mask, with_layout
from fakequant.ops._library import define, reference_kernel, register_autograd, register_fake

__all__ = ["binarize"]

# The mask (|x| <= 1) exists only for the clipped STE; the identity STE passes gradients through.
define("binarize", "(Tensor x, bool clipped_ste=True, bool compute_mask=True) -> (Tensor out, Tensor mask)")


@reference_kernel("binarize")
def binarize_reference(x, clipped_ste=True, compute_mask=True):
    return with_layout(x, *reference.binarize_forward(x, clipped_ste, compute_mask))


@register_fake("binarize")
def _(x, clipped_ste=True, compute_mask=True):
    checks.check_binarize_args(x)
    return fake_outputs(x, clipped_ste and compute_mask)


def _binarize_setup(ctx, inputs, output):
    x, clipped_ste, compute_mask = inputs
    ctx.set_materialize_grads(False)
    ctx.clipped_ste = clipped_ste
    ctx.compute_mask = compute_mask
    ctx.save_for_backward(output[1])


def _binarize_backward(ctx, grad_out, _grad_mask):
    if grad_out is None or not ctx.clipped_ste:
        return grad_out, None, None
    return torch.ops.fakequant.masked_grad(grad_out, saved_mask(ctx)), None, None


register_autograd("binarize", _binarize_backward, _binarize_setup)


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
    out, _ = torch.ops.fakequant.binarize(x, clipped_ste, clipped_ste and needs_grad(x))
    return out
