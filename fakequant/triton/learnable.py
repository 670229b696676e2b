"""Triton kernel of ``fake_quant_learnable_backward`` (``fakequant/ops/learnable.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fakequant import checks, reference
from fakequant.triton._common import (
    BLOCK_SIZE,
    as_float32,
    channel_geometry,
    check_device,
    dense,
    dense_like,
    has_values,
    launch,
    mul_rn,
    round_half_even,
    triton_kernel,
)

# ---------------------------------------------------------------------------------------------
# fake_quant_learnable_backward (LSQ)
# ---------------------------------------------------------------------------------------------

# Elements per program of the learnable backward: LEARNABLE_STEPS loop steps of BLOCK_SIZE. Each program writes
# one partial sum per output (the host adds the partials of a channel in float64, in a fixed order). Not tuned on
# a GPU yet: 16 steps of 1024 keep the partial buffers at 1/16384 of the tensor.
LEARNABLE_STEPS = 16


@triton.jit
def _fake_quant_learnable_backward_kernel(
    grad_ptr,
    x_ptr,
    grad_x_ptr,
    scale_ptr,
    zero_point_ptr,
    partial_scale_ptr,
    partial_zero_point_ptr,
    run,
    channels,
    chunks,
    quant_min,
    quant_max,
    grad_factor,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    # Storage holds rows of `run` elements, row r in channel r % channels; program p takes chunk p % chunks of
    # row p // chunks. The per-element terms are fakequant_math.h's learnable_grad_terms, in its order.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    channel = row % channels
    scale = tl.load(scale_ptr + channel)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel)
    qmin = quant_min.to(tl.float32)
    qmax = quant_max.to(tl.float32)
    start = (pid % chunks) * (BLOCK * STEPS)
    scale_acc = tl.zeros([BLOCK], dtype=tl.float32)
    zero_point_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        index = start + step * BLOCK + tl.arange(0, BLOCK)
        in_row = index < run
        offsets = row * run + index
        raw_grad = tl.load(grad_ptr + offsets, mask=in_row, other=0.0)
        grad = as_float32(raw_grad)
        x = as_float32(tl.load(x_ptr + offsets, mask=in_row, other=0.0))
        q = round_half_even(x * inv_scale) + zero_point
        inside = (q >= qmin) & (q <= qmax)
        below = q < qmin
        above = q > qmax
        x_fq = mul_rn(q - zero_point, scale)  # rounded on its own: x_fq - x would be contracted into an FMA
        in_term = (((x_fq - x) * inv_scale) * grad) * grad_factor
        out_term = (grad * tl.where(below, qmin - zero_point, qmax - zero_point)) * grad_factor
        term = tl.where(inside, in_term, tl.where(below | above, out_term, 0.0))
        scale_acc += tl.where(in_row, term, 0.0)
        zero_point_acc += tl.where(in_row & (below | above), ((-grad) * scale) * grad_factor, 0.0)
        tl.store(grad_x_ptr + offsets, tl.where(inside, raw_grad, tl.zeros_like(raw_grad)), mask=in_row)
    tl.store(partial_scale_ptr + pid, tl.sum(scale_acc, axis=0))
    tl.store(partial_zero_point_ptr + pid, tl.sum(zero_point_acc, axis=0))


@triton_kernel("fake_quant_learnable_backward")
def fake_quant_learnable_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_learnable_backward``: ``(grad_x, grad_scale, grad_zero_point)``
    (reference.fake_quant_learnable_backward), one pass over ``grad`` and ``x``."""
    axis = checks.check_learnable_backward_args(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=has_values(scale)
    )
    check_device(x)
    xd = dense(x)
    grad_x = torch.empty_like(xd)
    channels = 1 if axis is None else x.size(axis)
    grad_scale = torch.zeros(channels, dtype=torch.float32, device=x.device)
    grad_zero_point = torch.zeros(channels, dtype=torch.float32, device=x.device)
    if xd.numel() > 0:
        run, channels = (xd.numel(), 1) if axis is None else channel_geometry(xd, axis)
        rows = xd.numel() // run
        # Short rows (a channel axis that is innermost in memory) get a block and step count to their length.
        block = max(16, min(BLOCK_SIZE, triton.next_power_of_2(run)))
        steps = min(LEARNABLE_STEPS, triton.cdiv(run, block))
        chunks = triton.cdiv(run, block * steps)
        partial_scale = torch.empty(rows * chunks, dtype=torch.float32, device=x.device)
        partial_zero_point = torch.empty_like(partial_scale)
        zero_point_f = reference.learnable_zero_point(zero_point, quant_min, quant_max).to(torch.float32)
        launch(
            _fake_quant_learnable_backward_kernel, (rows * chunks,), x,
            dense_like(grad, xd), xd, grad_x, scale.reshape(-1).contiguous(),
            zero_point_f.reshape(-1).contiguous(), partial_scale, partial_zero_point, run, channels, chunks,
            quant_min, quant_max, grad_factor, BLOCK=block, STEPS=steps,
        )  # fmt: skip
        # Row r is channel r % channels: sum over the rows of each channel and their chunks, in a fixed order.
        grad_scale = partial_scale.double().view(-1, channels, chunks).sum(dim=(0, 2)).float()
        grad_zero_point = partial_zero_point.double().view(-1, channels, chunks).sum(dim=(0, 2)).float()
    return grad_x, grad_scale.reshape(scale.shape), grad_zero_point.reshape(zero_point.shape)
