"""MXFP8 fake quant (``fake_quant_mx`` with e4m3 elements, blocks of 32 along the last dimension, the "floor"
scale): fakequant vs the reference composition, torch.compile, torchao's ``to_mx`` + ``to_dtype`` round trip
with a straight-through backward, copy.

Sizes: the 2^16..2^24 sweep as ``(1024, n / 1024)`` tensors. Target (issue 20): forward within 1.25x the copy,
forward+backward within 2.5x, fp32 and bf16; at least 5x faster than torchao forward+backward.

    python bench/run.py --ops mxfp8
"""

from __future__ import annotations

import torch

import fakequant
from bench import common, float_formats
from fakequant import reference
from tests import autograd_reference

ELEM, BLOCK = "e4m3", 32


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.fake_quant_mx(i.x, ELEM, BLOCK, "floor", compute_mask)


def fused_differentiable(i):
    return fakequant.fake_quant_mx(i.x, ELEM, BLOCK)


def reference_forward(i, compute_mask):
    return reference.fake_quant_mx_forward(i.x, ELEM, BLOCK, "floor", compute_mask)


def reference_differentiable(i):
    return autograd_reference.fake_quant_mx(i.x, ELEM, BLOCK)


def composition_differentiable(i):
    out, mask = reference_forward(common.Inputs(x=i.x.detach()), True)
    return common.straight_through(out, mask, i.x)


def _torchao_round_trip(x):
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    scale, data = to_mx(x, torch.float8_e4m3fn, BLOCK)
    return to_dtype(data, scale, torch.float8_e4m3fn, BLOCK, x.dtype)


def torchao_differentiable(i):
    return float_formats.StraightThrough.apply(i.x, _torchao_round_trip)


SPEC = common.OpBench(
    op="mxfp8",
    cases=float_formats.cases(BLOCK),
    make_inputs=float_formats.make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=reference_forward,
    composition_differentiable=composition_differentiable,
    torchao_differentiable=torchao_differentiable,
)

test_fake_quant_mxfp8 = common.make_test(SPEC)
