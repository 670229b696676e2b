"""Binarize with the clipped straight-through estimator (BNN activations): fakequant vs the reference
composition, torch.compile, NNI, copy. PyTorch has no binarize op of its own.

Sizes: the 2^16..2^24 sweep (1-D), ResNet-50 weights and ResNet-50 activations (batch 8). Run with
``python bench/run.py --ops binarize`` or ``pytest bench/bench_binarize.py --benchmark-only``.
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from fakequant import reference
from tests import autograd_reference


def make_inputs(case: common.Case) -> common.Inputs:
    return common.Inputs(x=common.random_input(case))


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.binarize(i.x, True, compute_mask)


def fused_differentiable(i):
    return fakequant.binarize(i.x, clipped_ste=True)


def reference_forward(i, compute_mask):
    return reference.binarize_forward(i.x, True, compute_mask)


def reference_differentiable(i):
    return autograd_reference.binarize(i.x, clipped_ste=True)


def nni_differentiable(i):
    from nni.compression.base.apply_method import BNNClampRound

    # An OUTPUT target space gets NNI's clipped STE, as fakequant's clipped_ste=True.
    space = common.nni_target_space(None, None, -1, 1, output=True)
    return BNNClampRound.apply(i.x, space)


SPEC = common.OpBench(
    op="binarize",
    cases=common.flat_cases() + common.resnet50_weight_cases(in_quick=False) + common.resnet50_activation_cases(),
    make_inputs=make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    # binarize_forward's only check is a dtype comparison, which torch.compile traces without a graph break.
    composition_forward=reference_forward,
    composition_differentiable=reference_differentiable,
    nni_differentiable=nni_differentiable,
)

test_binarize = common.make_test(SPEC)
