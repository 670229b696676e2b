"""BN fold + per-channel fake quant of a conv weight (int8 symmetric): fakequant vs the reference composition,
torch.compile of it, copy. PyTorch and NNI have no fused fold; the composition is what they run.

Sizes: the 2^16..2^24 sweep as (256, n / 256) weights and the ResNet-50 conv weights. forward+backward
differentiates the weight and gamma (the running variance is a buffer); it moves 20 B/element for fp32:
the forward writes no mask, and the backward reads the weight (for gamma's gradient) and recomputes the mask
from it. Target: 256x256x3x3 forward+backward at most 0.5 ms.

    python bench/run.py --ops bn_fold
    python -m pytest bench/bench_bn_fold.py --benchmark-only
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference

QUANT_MIN, QUANT_MAX = -127, 127
EPS = 1e-5
FLAT_CHANNELS = 256


def make_inputs(case: common.Case) -> common.Inputs:
    weight = common.random_input(case) * 0.05
    channels = case.shape[0]
    generator = torch.Generator().manual_seed(1)
    gamma = (0.5 + torch.rand(channels, generator=generator)).to(weight.device)
    var = (0.5 + torch.rand(channels, generator=generator)).to(weight.device)
    folded = weight * (gamma / torch.sqrt(var + EPS)).reshape(-1, *([1] * (weight.dim() - 1)))
    scale = (folded.abs().amax(dim=tuple(range(1, weight.dim()))) / QUANT_MAX).clamp_min(1e-8).float()
    zero_point = torch.zeros(channels, dtype=torch.int32, device=weight.device)
    return common.Inputs(x=weight, gamma=gamma, var=var, scale=scale, zero_point=zero_point)


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.bn_fold_fake_quant_weight(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, compute_mask
    )


def fused_differentiable(i):
    return fakequant.bn_fold_fake_quant_weight(i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX)


def reference_forward(i, compute_mask):
    return reference.bn_fold_fake_quant_weight_forward(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, compute_mask
    )


def reference_differentiable(i):
    return autograd_reference.bn_fold_fake_quant_weight(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX
    )


def _folded(weight, gamma, var):
    return weight.float() * reference.channel_view(reference.bn_fold_factor(gamma, var, EPS), 0, weight.dim())


def composition_forward(i, compute_mask):
    # The reference's value checks read tensor values (a graph break); torch.compile gets the arithmetic only.
    ndim = i.x.dim()
    return reference.fake_quant_values(
        _folded(i.x, i.gamma, i.var),
        reference.channel_view(i.scale, 0, ndim),
        reference.channel_view(i.zero_point, 0, ndim),
        QUANT_MIN,
        QUANT_MAX,
        compute_mask,
        i.x.dtype,
    )


def composition_differentiable(i):
    detached = common.Inputs(**{**vars(i), "x": i.x.detach(), "gamma": i.gamma.detach()})
    out, mask = composition_forward(detached, True)
    return common.straight_through(out, mask, _folded(i.x, i.gamma, i.var))


# (256, n / 256) weights for the sweep, and ResNet-50's conv weights.
CASES = common.flat_cases(FLAT_CHANNELS) + [c for c in common.resnet50_weight_cases() if len(c.shape) == 4]

SPEC = common.OpBench(
    op="bn_fold",
    cases=CASES,
    make_inputs=make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=composition_forward,
    composition_differentiable=composition_differentiable,
    differentiable_inputs=("x", "gamma"),
    mask_recomputed=True,
)

test_bn_fold = common.make_test(SPEC)
