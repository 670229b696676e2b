"""Helpers the op modules share: output layouts of the reference kernels, fake outputs, and the mask autograd."""

from __future__ import annotations

import torch


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when a gradient can flow to one of ``tensors``: only then do the public functions ask for a mask."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def like(values: torch.Tensor, template: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` in ``template``'s layout (``empty_like`` keeps its strides), as the other backends return it."""
    if values.shape != template.shape:
        return values  # the empty mask of compute_mask=False (also when x itself is empty)
    out = torch.empty_like(template, dtype=dtype or values.dtype)
    return out.copy_(values)


def with_layout(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return like(out, x), like(mask, x, torch.bool)


def fake_outputs(x: torch.Tensor, compute_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake ``(out, mask)`` of an element-wise op: ``x``'s layout, and an empty mask unless asked for."""
    out = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if compute_mask else x.new_empty(0, dtype=torch.bool)
    return out, mask


def save_mask(ctx, compute_mask: bool, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Saves the forward's mask for :func:`saved_mask`."""
    # The bool mask output never has a gradient: don't let autograd fill zeros for it on every step.
    ctx.set_materialize_grads(False)
    ctx.compute_mask = compute_mask
    ctx.save_for_backward(output[1])


def saved_mask(ctx) -> torch.Tensor:
    if not ctx.compute_mask:
        raise RuntimeError(
            "fakequant: this op ran with compute_mask=False, so it has no mask to differentiate with; "
            "call it with compute_mask=True (the functional wrappers do so whenever a gradient is needed)"
        )
    return ctx.saved_tensors[0]
