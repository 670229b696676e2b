"""What the float-format benchmarks (``bench_fake_quant_{fp8,mxfp8,mxfp4,nvfp4}.py``) share: their inputs and the
torchao provider's straight-through wrapper."""

from __future__ import annotations

import torch

from bench import common

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
