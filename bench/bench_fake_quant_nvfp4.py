"""NVFP4 fake quant (E2M1 elements, an E4M3 scale per block of 16, a per-tensor scale computed from the tensor):
fakequant vs the reference composition, torch.compile, torchao's ``NVFP4Tensor`` round trip with a
straight-through backward, copy.

Sizes: the 2^16..2^24 sweep as ``(1024, n / 1024)`` tensors. Target (issue 20): forward within 1.25x the copy
(one pass more for the per-tensor amax), forward+backward within 2.5x; at least 5x faster than torchao.

    python bench/run.py --ops nvfp4
"""

from __future__ import annotations

import torch

import fakequant
from bench import common, float_formats
from fakequant import reference
from tests import autograd_reference


def fused_forward(i, compute_mask):
    scale = reference.nvfp4_per_tensor_scale(i.x)
    return torch.ops.fakequant.fake_quant_nvfp4(i.x, scale, 16, compute_mask)


def fused_differentiable(i):
    return fakequant.fake_quant_nvfp4(i.x)


def reference_forward(i, compute_mask):
    return reference.fake_quant_nvfp4_forward(i.x, reference.nvfp4_per_tensor_scale(i.x), 16, compute_mask)


def reference_differentiable(i):
    return autograd_reference.fake_quant_nvfp4(i.x)


def _torchao_round_trip(x):
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    scale = per_tensor_amax_to_scale(x.abs().amax())
    return NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=scale).dequantize(x.dtype)


def torchao_differentiable(i):
    return float_formats.StraightThrough.apply(i.x, _torchao_round_trip)


SPEC = common.OpBench(
    op="nvfp4",
    cases=float_formats.cases(16),
    make_inputs=float_formats.make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=reference_forward,
    composition_differentiable=float_formats.straight_through_composition(reference_forward),
    torchao_differentiable=torchao_differentiable,
)

test_fake_quant_nvfp4 = common.make_test(SPEC)
