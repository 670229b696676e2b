"""Per-channel fake quant (int8 affine): fakequant vs the reference composition, torch, torch.compile, NNI, copy.

Sizes: the 2^16..2^24 sweep as (256, n / 256) along axis 0, ResNet-50 weights along axis 0 (output channels)
and ResNet-50 activations (batch 8, NCHW) along axis 1. Run with ``python bench/run.py --ops per_channel``
or ``pytest bench/bench_fake_quant_per_channel.py --benchmark-only``.
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference

QUANT_MIN, QUANT_MAX = -128, 127
# Output channels of the flat sweep: 256 is a typical conv width, and leaves 256 elements per row at 2^16.
FLAT_CHANNELS = 256


def make_inputs(case: common.Case) -> common.Inputs:
    x = common.random_input(case)
    scale, zero_point = common.qparams_like(x, case.axis, QUANT_MIN, QUANT_MAX)
    return common.Inputs(x=x, scale=scale, zero_point=zero_point, axis=case.axis)


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.fake_quant_per_channel(
        i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX, compute_mask
    )


def fused_differentiable(i):
    return fakequant.fake_quant_per_channel(i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX)


def reference_forward(i, compute_mask):
    return reference.fake_quant_per_channel_forward(
        i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX, compute_mask
    )


def reference_differentiable(i):
    return autograd_reference.fake_quant_per_channel(i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX)


def composition_forward(i, compute_mask):
    ndim = i.x.dim()
    return reference.fake_quant_values(
        i.x.float(),
        reference.channel_view(i.scale, i.axis, ndim),
        reference.channel_view(i.zero_point, i.axis, ndim),
        QUANT_MIN,
        QUANT_MAX,
        compute_mask,
        i.x.dtype,
    )


def composition_differentiable(i):
    out, mask = composition_forward(common.Inputs(**{**vars(i), "x": i.x.detach()}), True)
    return common.straight_through(out, mask, i.x)


def torch_differentiable(i):
    return torch.fake_quantize_per_channel_affine(i.x, i.scale, i.zero_point, i.axis, QUANT_MIN, QUANT_MAX)


def nni_differentiable(i):
    from nni.compression.base.apply_method import QATClampRound

    ndim = i.x.dim()
    scale = reference.channel_view(i.scale, i.axis, ndim)
    zero_point = reference.channel_view(i.zero_point.float(), i.axis, ndim)
    return QATClampRound.apply(i.x, common.nni_target_space(scale, zero_point, QUANT_MIN, QUANT_MAX, output=False))


SPEC = common.OpBench(
    op="per_channel",
    cases=(
        common.flat_cases(FLAT_CHANNELS)
        + common.resnet50_weight_cases()
        + common.resnet50_activation_cases(in_quick=False)  # per-channel is for weights; act. only in full runs
    ),
    make_inputs=make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=composition_forward,
    composition_differentiable=composition_differentiable,
    torch_differentiable=torch_differentiable,
    nni_differentiable=nni_differentiable,
)

test_fake_quant_per_channel = common.make_test(SPEC)
