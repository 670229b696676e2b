"""FP8 E4M3 fake quant with a scale per row computed in the kernel (amax / 448; torchao's ``PerRow`` float8 QAT):
fakequant vs the reference composition, torch.compile, torchao's ``Float8FakeQuantizer``, copy.

Sizes: the 2^16..2^24 sweep as ``(1024, n / 1024)`` tensors. Target (issue 20): forward within 1.25x the copy,
forward+backward within 2.5x, fp32 and bf16.

    python bench/run.py --ops fp8
"""

from __future__ import annotations

import torch

import fakequant
from bench import common, float_formats
from fakequant import reference
from tests import autograd_reference


def fused_forward(i, compute_mask):
    return torch.ops.fakequant.fake_quant_fp8(i.x, None, "e4m3", i.x.size(1), compute_mask)


def fused_differentiable(i):
    return fakequant.fake_quant_fp8(i.x, None, "e4m3", i.x.size(1))


def reference_forward(i, compute_mask):
    return reference.fake_quant_fp8_forward(i.x, None, "e4m3", i.x.size(1), compute_mask)


def reference_differentiable(i):
    return autograd_reference.fake_quant_fp8(i.x, None, "e4m3", i.x.size(1))


_TORCHAO = {}


def torchao_differentiable(i):
    if "quantizer" not in _TORCHAO:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.qat.fake_quantize_config import Float8FakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import Float8FakeQuantizer

        _TORCHAO["quantizer"] = Float8FakeQuantizer(Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))
    return _TORCHAO["quantizer"](i.x)


SPEC = common.OpBench(
    op="fp8",
    cases=float_formats.cases(1),
    make_inputs=float_formats.make_inputs,
    fused_forward=fused_forward,
    fused_differentiable=fused_differentiable,
    reference_forward=reference_forward,
    reference_differentiable=reference_differentiable,
    composition_forward=reference_forward,
    composition_differentiable=float_formats.straight_through_composition(reference_forward),
    torchao_differentiable=torchao_differentiable,
)

test_fake_quant_fp8 = common.make_test(SPEC)
