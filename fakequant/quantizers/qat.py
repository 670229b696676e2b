"""QAT_Quantizer: quantization-aware training after Jacob et al. (CVPR 2018), on the fakequant ops."""

from __future__ import annotations

import torch

from fakequant.qparams import PerTensor, QuantSpec
from fakequant.quantizers.base import EmaRangeQuantizer, QuantizedLayer
from fakequant.quantizers.config import AlgorithmRules

__all__ = ["QAT_Quantizer", "QATQuantizer"]


class QAT_Quantizer(EmaRangeQuantizer):  # noqa: N801  (NNI's name)
    """Quantization-aware training: fake-quantized weights and activations, trained in float.

    * Weights: the range of the current float weight on every forward (per tensor, or per output channel
      with ``quant_scheme='per_channel_*'``), default signed int, symmetric, per tensor.
    * Inputs/outputs: ranges tracked by an exponential moving average (decay 0.99, the first observation
      initialises it) in training mode, all-reduced across ranks under ``torch.distributed``; default
      unsigned int, affine, per tensor.
    * ``quant_start_step``: ranges are tracked from step 0, fake quantization starts once that many steps
      were taken (steps advance with the optimizer passed in, or :meth:`step`).

    Args:
        model: the model (modified in place by :meth:`compress`).
        config_list: NNI config dicts; keys ``quant_types``, ``quant_bits`` (2 to 16), ``op_types``,
            ``op_names``, ``exclude``, ``quant_start_step``, ``quant_scheme``, ``quant_dtype``.
        optimizer: optional; its ``step()`` advances the step counter.
        sync_ranges: all-reduce activation ranges across ranks (on by default).

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> config_list = [{'quant_types': ['weight'], 'quant_bits': {'weight': 8}, 'op_types': ['Conv2d', 'Linear']},
        ...                {'quant_types': ['output'], 'quant_bits': 8, 'quant_start_step': 10, 'op_types': ['ReLU6']}]
        >>> model = QAT_Quantizer(model, config_list).compress()
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    rules = AlgorithmRules(
        name="QAT_Quantizer",
        keys=("quant_scheme", "quant_dtype"),
        quant_types=("weight", "input", "output"),
        min_bits=2,
        max_bits=16,
        default_bits=8,
        default_specs={
            "weight": QuantSpec(signed=True, symmetric=True, granularity=PerTensor()),
            "input": QuantSpec(signed=False, symmetric=False),
            "output": QuantSpec(signed=False, symmetric=False),
        },
    )

    def _init_layer_state(self, layer: QuantizedLayer) -> None:
        for quant_type in layer.config.quant_types:
            if quant_type == "weight":
                self._add_qparam_buffers(layer, "weight", self._weight_channels(layer))
            else:
                self._add_activation_state(layer, quant_type)

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        return self._minmax_fake_quant_weight(layer, weight)

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant_activation(layer, "input", x)

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        return self._fake_quant_activation(layer, "output", y)

    def _layer_calibration(self, layer: QuantizedLayer) -> dict:
        record = {"op_type": layer.config.op_type}
        for quant_type in layer.config.quant_types:
            if quant_type == "weight":
                record.update(self._weight_record(layer))
            else:
                record.update(self._activation_record(layer, quant_type))
        return record

    def _weight_record(self, layer: QuantizedLayer) -> dict:
        # Recomputed from the current float weight: the exported weights are those after the last step.
        with torch.no_grad():
            scale, zero_point = self._weight_minmax_qparams(layer, layer.module.parametrizations.weight.original)
        record = self._spec_record("weight", layer.config.specs["weight"])
        record.update({"weight_scale": scale.cpu(), "weight_zero_point": zero_point.cpu()})
        return record


QATQuantizer = QAT_Quantizer
