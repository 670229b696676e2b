"""Triton kernels of the integer fake-quantization ops: per tensor, per channel, binarize and the straight-through
backward (``masked_grad``); the Triton side of ``fakequant/ops/fake_quant.py`` and ``fakequant/ops/binary.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fakequant import checks
from fakequant.triton._common import (
    BLOCK_SIZE,
    NUM_WARPS,
    as_float32,
    channel_geometry,
    check_device,
    dense,
    dense_like,
    elementwise_grid,
    elementwise_outputs,
    fake_quant_values,
    has_values,
    launch,
    same_layout,
    to_dtype,
    triton_kernel,
)

# ---------------------------------------------------------------------------------------------
# fake_quant_per_tensor
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_per_tensor_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    zero_point_ptr,
    n_elements,
    quant_min,
    quant_max,
    WRITE_MASK: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    scale = tl.load(scale_ptr)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr).to(tl.float32)
    x = as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    if RELU:
        # relu(x) with NaN kept (x != x); the sign of a zero does not matter, both quantize to +0
        positive = x > 0.0
        x = tl.where(positive | (x != x), x, 0.0)
    out, inside = fake_quant_values(
        x, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32)
    )
    if RELU:
        inside = inside & positive
    tl.store(out_ptr + offsets, to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


@triton_kernel("fake_quant_per_tensor")
def fake_quant_per_tensor_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_per_tensor``: ``(out, mask)`` in ``x``'s layout."""
    checks.check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, check_values=has_values(scale))
    x_dense, out, mask = elementwise_outputs(x, compute_mask)
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    launch(
        _fake_quant_per_tensor_kernel, elementwise_grid(n_elements), x,
        x_dense,
        out,
        mask if compute_mask else out,
        scale,
        zero_point,
        n_elements,
        quant_min,
        quant_max,
        WRITE_MASK=compute_mask,
        RELU=relu,
        BLOCK=BLOCK_SIZE,
    )
    return out, mask


# ---------------------------------------------------------------------------------------------
# fake_quant_per_channel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_per_channel_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    zero_point_ptr,
    n_elements,
    channel_stride,
    channels,
    quant_min,
    quant_max,
    WRITE_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    channel = (offsets // channel_stride) % channels
    scale = tl.load(scale_ptr + channel, mask=in_bounds, other=1.0)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel, mask=in_bounds, other=0).to(tl.float32)
    x = as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    out, inside = fake_quant_values(
        x, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32)
    )
    tl.store(out_ptr + offsets, to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


@triton_kernel("fake_quant_per_channel")
def fake_quant_per_channel_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_per_channel``: ``(out, mask)`` in ``x``'s layout."""
    axis = checks.check_fake_quant_args(
        x, scale, zero_point, quant_min, quant_max, axis, check_values=has_values(scale)
    )
    x_dense, out, mask = elementwise_outputs(x, compute_mask)
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    channel_stride, channels = channel_geometry(x_dense, axis)
    launch(
        _fake_quant_per_channel_kernel, elementwise_grid(n_elements), x,
        x_dense,
        out,
        mask if compute_mask else out,
        scale.contiguous(),
        zero_point.contiguous(),
        n_elements,
        channel_stride,
        channels,
        quant_min,
        quant_max,
        WRITE_MASK=compute_mask,
        BLOCK=BLOCK_SIZE,
    )
    return out, mask



# ---------------------------------------------------------------------------------------------
# binarize
# ---------------------------------------------------------------------------------------------


@triton.jit
def _binarize_kernel(x_ptr, out_ptr, mask_ptr, n_elements, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    x = as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    out = tl.where(x >= 0.0, 1.0, -1.0)
    out = tl.where(x != x, x, out)  # NaN stays NaN
    tl.store(out_ptr + offsets, to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, tl.abs(x) <= 1.0, mask=in_bounds)


@triton_kernel("binarize")
def binarize_triton(
    x: torch.Tensor, clipped_ste: bool = True, compute_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::binarize``: ``(out, mask)`` in ``x``'s layout; a mask only for the clipped STE."""
    checks.check_binarize_args(x)
    write_mask = clipped_ste and compute_mask
    x_dense, out, mask = elementwise_outputs(x, write_mask)
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    launch(
        _binarize_kernel, elementwise_grid(n_elements), x,
        x_dense,
        out,
        mask if write_mask else out,
        n_elements,
        WRITE_MASK=write_mask,
        BLOCK=BLOCK_SIZE,
    )
    return out, mask



# ---------------------------------------------------------------------------------------------
# masked_grad
# ---------------------------------------------------------------------------------------------


@triton.jit
def _masked_grad_kernel(grad_ptr, mask_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
    keep = tl.load(mask_ptr + offsets, mask=in_bounds, other=0).to(tl.int1)
    tl.store(out_ptr + offsets, tl.where(keep, grad, tl.zeros_like(grad)), mask=in_bounds)


@triton_kernel("masked_grad")
def masked_grad_triton(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Triton ``fakequant::masked_grad``: ``grad`` where ``mask``, exactly 0 elsewhere, in ``grad``'s layout."""
    checks.check_mask(grad, mask)
    check_device(grad)
    grad_dense = dense(grad)
    out = torch.empty_like(grad)
    assert same_layout(out, grad_dense), "empty_like must give the layout of the dense input"
    n_elements = grad.numel()
    if n_elements == 0:
        return out
    mask_dense = dense_like(mask, grad_dense)
    launch(
        _masked_grad_kernel, elementwise_grid(n_elements), grad,
        grad_dense, mask_dense, out, n_elements, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS
    )
    return out
