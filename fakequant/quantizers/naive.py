"""NaiveQuantizer: 8-bit symmetric weights, no configuration needed."""

from __future__ import annotations

from fakequant.qparams import QuantSpec
from fakequant.quantizers.config import AlgorithmRules
from fakequant.quantizers.qat import QAT_Quantizer

__all__ = ["NaiveQuantizer"]


class NaiveQuantizer(QAT_Quantizer):
    """Fake-quantizes the weights of the weighted layers to 8-bit symmetric integers.

    ``scale = max|w| / 127`` on the narrow range ``[-127, 127]``, taken from the current weight on every
    forward, rounding half to even (NNI's NaiveQuantizer truncated toward zero and kept the largest scale
    ever seen; this one rounds correctly and follows the weight).

    Args:
        model: the model (modified in place by :meth:`compress`).
        config_list: optional; by default ``[{'quant_types': ['weight'], 'quant_bits': 8, 'op_types':
            ['default']}]`` (Conv1d/2d/3d and Linear). Only 'weight' is accepted.
        optimizer: optional; its ``step()`` advances the step counter.

    Example:
        >>> import torch
        >>> import torch.nn as nn
        >>> model = NaiveQuantizer(nn.Sequential(nn.Linear(4, 2))).compress()
        >>> model(torch.ones(1, 4)).shape
        torch.Size([1, 2])
    """

    rules = AlgorithmRules(
        name="NaiveQuantizer",
        keys=(),
        quant_types=("weight",),
        min_bits=2,
        max_bits=16,
        default_bits=8,
        default_specs={"weight": QuantSpec(signed=True, symmetric=True, narrow_range=True)},
    )
    default_config_list = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}]
