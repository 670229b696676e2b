"""MXFP8 fake quant (``fake_quant_mx`` with e4m3 elements, blocks of 32 along the last dimension, the "floor"
scale): fakequant vs the reference composition, torch.compile, torchao's ``to_mx`` + ``to_dtype`` round trip
with a straight-through backward, copy.

Sizes: the 2^16..2^24 sweep as ``(1024, n / 1024)`` tensors. Target (issue 20): forward within 1.25x the copy,
forward+backward within 2.5x, fp32 and bf16; at least 5x faster than torchao forward+backward.

    python bench/run.py --ops mxfp8
"""

from __future__ import annotations

import torch

from bench import common, float_formats

SPEC = float_formats.mx_spec("mxfp8", "e4m3", torch.float8_e4m3fn)

test_fake_quant_mxfp8 = common.make_test(SPEC)
