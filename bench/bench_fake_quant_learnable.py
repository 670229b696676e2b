"""Learnable (LSQ) fake quant, per tensor and per channel (int8 affine, a learned step size): fakequant vs the
reference composition, ``torch._fake_quantize_learnable_*``, torch.compile of the forward, copy.

forward+backward differentiates ``x`` and the scale; fakequant's backward recomputes the mask from ``x`` and sums
the scale's gradient in the same pass, so it moves 20 B/element for fp32 (the forward reads x and writes out;
the backward reads grad and x and writes grad_x). Targets at 2^22 fp32, 2 threads: forward+backward
within 3.5x of the copy, and at least 5x faster than torch's learnable op.

    python bench/run.py --ops learnable
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference

QUANT_MIN, QUANT_MAX = -128, 127
FLAT_CHANNELS = 256


def make_inputs(case: common.Case) -> common.Inputs:
    x = common.random_input(case)
    axis = None if case.kind == "per_tensor" else case.axis
    scale, zero_point = common.qparams_like(x, axis, QUANT_MIN, QUANT_MAX)
    grad_factor = fakequant.lsq_grad_factor(x, QUANT_MAX, axis)
    return common.Inputs(x=x, scale=scale, zero_point=zero_point.float(), axis=axis, grad_factor=grad_factor)


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.fake_quant_learnable(
        i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX, i.grad_factor
    )


def fused_differentiable(i):
    return fakequant.fake_quant_learnable(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, i.grad_factor, i.axis)


def reference_forward(i, compute_mask):
    return reference.fake_quant_learnable_forward(i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX,
                                                  i.grad_factor)  # fmt: skip


def reference_differentiable(i):
    return autograd_reference.fake_quant_learnable(
        i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, i.grad_factor, i.axis
    )


def torch_differentiable(i):
    if i.axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX,
                                                                i.grad_factor)  # fmt: skip
    return torch._fake_quantize_learnable_per_channel_affine(i.x, i.scale, i.zero_point, i.axis, QUANT_MIN,
                                                             QUANT_MAX, i.grad_factor)  # fmt: skip


def composition_forward(i, compute_mask):
    # The reference's value checks read tensor values (a graph break); torch.compile gets the arithmetic only.
    if i.axis is None:
        scale, zero_point = i.scale.reshape(()), torch.round(i.zero_point).reshape(())
    else:
        ndim = i.x.dim()
        scale = reference.channel_view(i.scale, i.axis, ndim)
        zero_point = reference.channel_view(torch.round(i.zero_point), i.axis, ndim)
    return reference.fake_quant_values(i.x.float(), scale, zero_point, QUANT_MIN, QUANT_MAX, False, i.x.dtype)


def per_tensor_cases() -> list[common.Case]:
    return [common.Case(c.label + " tensor", c.shape, 0, "per_tensor") for c in common.flat_cases()]


SPEC = common.OpBench(
    op="learnable",
    cases=per_tensor_cases() + common.flat_cases(FLAT_CHANNELS),
    make_inputs=make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=composition_forward,
    torch_differentiable=torch_differentiable,
    differentiable_inputs=("x", "scale"),
    mask_recomputed=True,
    modes=("fwd", "fwd+bwd"),
)

test_fake_quant_learnable = common.make_test(SPEC)
