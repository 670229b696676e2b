"""What the float-format benchmarks (``bench_fake_quant_{fp8,mxfp8,mxfp4,nvfp4}.py``) share: their inputs and the
torchao provider's straight-through wrapper."""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference

ROWS = 1024  # the sweep's tensors as (1024, n / 1024): Linear weights or token-by-feature activations


class StraightThrough(torch.autograd.Function):
    """``fn(x)`` forward, the gradient unchanged backward: how torchao's MX and NVFP4 QAT differentiate its
    quantize-dequantize round trip (``prototype/qat``)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def cases(block: int) -> list[common.Case]:
    return [c for c in common.flat_cases(ROWS) if c.shape[1] % block == 0]


def make_inputs(case: common.Case) -> common.Inputs:
    return common.Inputs(x=common.random_input(case))


def straight_through_composition(reference_forward):
    """The reference forward with the straight-through estimator, for torch.compile's forward+backward."""

    def composition_differentiable(i):
        out, mask = reference_forward(common.Inputs(x=i.x.detach()), True)
        return common.straight_through(out, mask, i.x)

    return composition_differentiable


def mx_spec(op: str, elem: str, torchao_dtype, block: int = 32) -> common.OpBench:
    """The benchmark of ``fake_quant_mx`` with ``elem`` elements, blocks of ``block`` along the last dimension and
    the floor scale; torchao's ``to_mx`` + ``to_dtype`` with ``torchao_dtype`` beside it."""

    def reference_forward(i, compute_mask):
        return reference.fake_quant_mx_forward(i.x, elem, block, "floor", compute_mask)

    def torchao_round_trip(x):
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

        scale, data = to_mx(x, torchao_dtype, block)
        return to_dtype(data, scale, torchao_dtype, block, x.dtype)

    return common.OpBench(
        op=op,
        cases=cases(block),
        make_inputs=make_inputs,
        fused_forward=lambda i, compute_mask: torch.ops.fakequant.fake_quant_mx(i.x, elem, block, "floor",
                                                                                compute_mask),
        fused_differentiable=lambda i: fakequant.fake_quant_mx(i.x, elem, block),
        reference_forward=reference_forward,
        reference_differentiable=lambda i: autograd_reference.fake_quant_mx(i.x, elem, block),
        composition_forward=reference_forward,
        composition_differentiable=straight_through_composition(reference_forward),
        torchao_differentiable=lambda i: StraightThrough.apply(i.x, torchao_round_trip),
    )
