"""Per-tensor fake quant (int8 affine): fakequant vs the reference composition, torch, torch.compile, NNI, copy.

Sizes: the 2^16..2^24 sweep (1-D), ResNet-50 activations (batch 8, NCHW: per-tensor is how activations are
quantized) and, in full runs, ResNet-50 weights. GB/s counts the bytes each mode must move at least (forward
8 B/element without the mask, 9 with it, forward+backward 18; see bench/common.py). Targets (2^22,
same run): forward within 1.1x of the copy without the mask and 1.25x with it, forward+backward within 3x.

    python bench/run.py --ops per_tensor
    python -m pytest bench/bench_fake_quant_per_tensor.py --benchmark-only
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference

QUANT_MIN, QUANT_MAX = -128, 127


def make_inputs(case: common.Case) -> common.Inputs:
    x = common.random_input(case)
    scale, zero_point = common.qparams_like(x, None, QUANT_MIN, QUANT_MAX)
    return common.Inputs(x=x, scale=scale, zero_point=zero_point)


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.fake_quant_per_tensor(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, compute_mask)


def fused_differentiable(i):
    return fakequant.fake_quant_per_tensor(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX)


def reference_forward(i, compute_mask):
    return reference.fake_quant_per_tensor_forward(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, compute_mask)


def reference_differentiable(i):
    return autograd_reference.fake_quant_per_tensor(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX)


def composition_forward(i, compute_mask):
    # The reference's value checks read tensor values (a graph break); torch.compile gets the arithmetic only.
    return reference.fake_quant_values(
        i.x.float(), i.scale.reshape(()), i.zero_point.reshape(()), QUANT_MIN, QUANT_MAX, compute_mask, i.x.dtype
    )


def composition_differentiable(i):
    out, mask = composition_forward(common.Inputs(**{**vars(i), "x": i.x.detach()}), True)
    return common.straight_through(out, mask, i.x)


def torch_differentiable(i):
    return torch.fake_quantize_per_tensor_affine(i.x, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX)


def nni_differentiable(i):
    from nni.compression.base.apply_method import QATClampRound

    space = common.nni_target_space(i.scale, i.zero_point.float(), QUANT_MIN, QUANT_MAX, output=True)
    return QATClampRound.apply(i.x, space)


SPEC = common.OpBench(
    op="per_tensor",
    cases=common.flat_cases() + common.resnet50_activation_cases() + common.resnet50_weight_cases(in_quick=False),
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

test_fake_quant_per_tensor = common.make_test(SPEC)
