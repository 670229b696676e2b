"""BNNQuantizer: binarized weights and activations (Courbariaux et al., 2016) on ``fakequant::binarize``."""

from __future__ import annotations

import torch

from fakequant.ops.binary import binarize
from fakequant.qparams import QuantSpec
from fakequant.quantizers.base import QuantizedLayer, Quantizer, onnx_qdq_quantizer_names
from fakequant.quantizers.config import AlgorithmRules

__all__ = ["BNNQuantizer"]


class BNNQuantizer(Quantizer):
    """Binarized neural networks: ``+1`` where ``x >= 0``, ``-1`` elsewhere.

    * Weights: binarized with the identity straight-through estimator; the float master weights are
      clamped to ``[-1, 1]`` after every optimizer step (as in the paper).
    * Inputs/outputs: binarized with the clipped straight-through estimator (gradient where ``|x| <= 1``).

    Args:
        model: the model (modified in place by :meth:`compress`).
        config_list: NNI config dicts; ``quant_bits`` must be 1 (the default).
        optimizer: optional; its ``step()`` advances the step counter and triggers the weight clamping
            (without one, call :meth:`step` after each optimizer step).

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Hardtanh())
        >>> config_list = [{'quant_bits': 1, 'quant_types': ['weight'], 'op_types': ['Linear']},
        ...                {'quant_bits': 1, 'quant_types': ['output'], 'op_types': ['Hardtanh']}]
        >>> model = BNNQuantizer(model, config_list).compress()
        >>> model(torch.ones(1, 4)).abs().unique()
        tensor([1.], grad_fn=<...>)
    """

    rules = AlgorithmRules(
        name="BNNQuantizer",
        keys=(),
        quant_types=("weight", "input", "output"),
        min_bits=1,
        max_bits=1,
        default_bits=1,
        default_specs={t: QuantSpec(bits=1) for t in ("weight", "input", "output")},
    )

    def init_layer_state(self, layer: QuantizedLayer) -> None:
        """Binarization has no scale or range: the only state is the step counter."""

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        if not layer.active():
            return weight
        return binarize(weight, clipped_ste=False)

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        return binarize(x, clipped_ste=True) if layer.active() else x

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        return binarize(y, clipped_ste=True) if layer.active() else y

    def update_layer_on_step(self, layer: QuantizedLayer, step: int) -> None:
        if "weight" in layer.config.quant_types:
            layer.module.parametrizations.weight.original.clamp_(-1.0, 1.0)

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> None:
        raise ValueError(
            f"layer {layer.name!r} {quant_type}: BNN's binarization (+1 for x >= 0, else -1) is not an affine "
            "integer quantization, so it has no QuantizeLinear/DequantizeLinear form; allowed: "
            f"{onnx_qdq_quantizer_names()} models"
        )

    def layer_calibration(self, layer: QuantizedLayer) -> dict:
        record = {"op_type": layer.config.op_type}
        for quant_type in layer.config.quant_types:
            record[f"{quant_type}_bits"] = 1
            record[f"{quant_type}_levels"] = (-1.0, 1.0)
            if quant_type != "weight":
                record[f"tracked_min_{quant_type}"] = -1.0
                record[f"tracked_max_{quant_type}"] = 1.0
        return record
