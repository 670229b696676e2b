"""The training-time BN fold, ``bn_fold_fake_quant_weight(..., divide_by_fold=True)`` = ``q(w f) / f``: fakequant
vs the reference composition and torch.compile of it, copy. This is what ``ConvBnQAT`` trains a Conv+BN pair with
while BN uses batch statistics; without the fused mode it is the fold op followed by a division by ``f`` and
that division's backward (a reduction for ``f``'s gradient).

Inputs as ``bench_bn_fold.py``. forward+backward moves 20 B/element for fp32, as the plain fold: the backward
recomputes the forward's mask and output (needed for the gradient of ``f``) from the weight it reads anyway.

    python bench/run.py --ops bn_fold_divided
"""

from __future__ import annotations

import torch

import fakequant
from bench import common
from bench.bench_bn_fold import CASES, EPS, QUANT_MAX, QUANT_MIN, make_inputs
from fakequant import reference
from tests import autograd_reference


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.bn_fold_fake_quant_weight(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, compute_mask, True
    )


def fused_differentiable(i):
    return fakequant.bn_fold_fake_quant_weight(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, divide_by_fold=True
    )


def reference_forward(i, compute_mask):
    return reference.bn_fold_fake_quant_weight_forward(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, compute_mask, True
    )


def reference_differentiable(i):
    return autograd_reference.bn_fold_fake_quant_weight(
        i.x, i.gamma, i.var, EPS, i.scale, i.zero_point, QUANT_MIN, QUANT_MAX, True
    )


def _factor(i):
    return reference.channel_view(reference.bn_fold_training_factor(i.gamma, i.var, EPS), 0, i.x.dim())


def composition_forward(i, compute_mask):
    # The reference's value checks read tensor values (a graph break); torch.compile gets the arithmetic only.
    ndim = i.x.dim()
    factor = _factor(i)
    out, mask = reference.fake_quant_values(
        i.x.float() * factor,
        reference.channel_view(i.scale, 0, ndim),
        reference.channel_view(i.zero_point, 0, ndim),
        QUANT_MIN,
        QUANT_MAX,
        compute_mask,
        torch.float32,
    )
    return (out / factor).to(i.x.dtype), mask


def composition_differentiable(i):
    detached = common.Inputs(**{**vars(i), "x": i.x.detach(), "gamma": i.gamma.detach()})
    _, mask = composition_forward(detached, True)
    factor = _factor(i)
    folded = i.x.float() * factor
    ndim = i.x.dim()
    quantized, _ = reference.fake_quant_values(
        folded.detach(), reference.channel_view(i.scale, 0, ndim), reference.channel_view(i.zero_point, 0, ndim),
        QUANT_MIN, QUANT_MAX, False, torch.float32,
    )
    return (common.straight_through(quantized, mask, folded) / factor).to(i.x.dtype)


SPEC = common.OpBench(
    op="bn_fold_divided",
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

test_bn_fold_divided = common.make_test(SPEC)
