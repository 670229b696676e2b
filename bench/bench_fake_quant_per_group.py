"""Per-group fake quant of a weight (int4 symmetric, groups of 128 input channels): fakequant vs the reference
composition, ``torch.fake_quantize_per_channel_affine`` of the same grouped view, torch.compile, copy.

Sizes: the 2^16..2^24 sweep as ``(1024, n / 1024)`` Linear weights (scales ``(1024, n / 1024 / 128)``).
Target: the per-channel op's factors of the copy (1.1x forward, 1.25x with the mask, 3x
forward+backward at 2^22 fp32, 2 threads).

    python bench/run.py --ops per_group
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference

QUANT_MIN, QUANT_MAX = -8, 7
ROWS, GROUP_SIZE = 1024, 128


def make_inputs(case: common.Case) -> common.Inputs:
    x = common.random_input(case) * 0.05
    groups = x.size(1) // GROUP_SIZE
    scale = (x.abs().reshape(ROWS, groups, GROUP_SIZE).amax(dim=2).float() / QUANT_MAX).clamp_min(1e-8)
    zero_point = torch.zeros(ROWS, groups, dtype=torch.int32, device=x.device)
    return common.Inputs(x=x, scale=scale, zero_point=zero_point)


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.fake_quant_per_group(i.x, i.scale, i.zero_point, GROUP_SIZE, QUANT_MIN, QUANT_MAX,
                                                    compute_mask)  # fmt: skip


def fused_differentiable(i):
    return fakequant.fake_quant_per_group(i.x, i.scale, i.zero_point, GROUP_SIZE, QUANT_MIN, QUANT_MAX)


def reference_forward(i, compute_mask):
    return reference.fake_quant_per_group_forward(i.x, i.scale, i.zero_point, GROUP_SIZE, QUANT_MIN, QUANT_MAX,
                                                  compute_mask)  # fmt: skip


def reference_differentiable(i):
    view = reference.per_group_view(i.x, GROUP_SIZE)
    out = autograd_reference.fake_quant_per_channel(view, i.scale.reshape(-1), i.zero_point.reshape(-1), 0, QUANT_MIN,
                                           QUANT_MAX)  # fmt: skip
    return out.reshape(i.x.shape)


def torch_differentiable(i):
    view = i.x.reshape(-1, GROUP_SIZE)
    out = torch.fake_quantize_per_channel_affine(view, i.scale.reshape(-1), i.zero_point.reshape(-1), 0, QUANT_MIN,
                                                 QUANT_MAX)  # fmt: skip
    return out.reshape(i.x.shape)


def composition_forward(i, compute_mask):
    view = i.x.reshape(-1, GROUP_SIZE).float()
    out, mask = reference.fake_quant_values(view, i.scale.reshape(-1, 1), i.zero_point.reshape(-1, 1), QUANT_MIN,
                                             QUANT_MAX, compute_mask, i.x.dtype)  # fmt: skip
    return out.reshape(i.x.shape), mask


def composition_differentiable(i):
    out, mask = composition_forward(common.Inputs(**{**vars(i), "x": i.x.detach()}), True)
    return common.straight_through(out, mask.reshape(i.x.shape), i.x)


SPEC = common.OpBench(
    op="per_group",
    cases=[c for c in common.flat_cases(ROWS) if c.shape[1] % GROUP_SIZE == 0],
    make_inputs=make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=composition_forward,
    composition_differentiable=composition_differentiable,
    torch_differentiable=torch_differentiable,
)

test_fake_quant_per_group = common.make_test(SPEC)
