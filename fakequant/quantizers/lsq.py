"""LSQ: quantization-aware training with learned step sizes (Esser et al., ICLR 2020), as NNI 2.x's LsqQuantizer.

Every quantized tensor's scale is an ``nn.Parameter`` trained by the optimizer with the straight-through
gradient of LSQ, computed by the fused ``fakequant::fake_quant_learnable`` op (one pass forward, one pass
backward that also sums the scale's gradient). Affine tensors (``quant_scheme='per_tensor_affine'``, the
default for inputs and outputs) learn their zero point too (LSQ+, Bhalgat et al., 2020).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from fakequant.ops.learnable import fake_quant_learnable, lsq_grad_factor
from fakequant.qdq import OnnxQDQ, onnx_qdq_range
from fakequant.quantizers.base import QuantizedLayer, Quantizer
from fakequant.quantizers.qat import QAT_Quantizer

__all__ = ["LsqQuantizer"]

# The smallest scale an optimizer step may leave: the ops need a finite positive scale (docs/numerics.md,
# Argument checks).
_MIN_SCALE = torch.finfo(torch.float32).eps


class LsqQuantizer(Quantizer):
    """Learned step size quantization of weights, inputs and outputs, with NNI 2.x's constructor.

    * Scales: one ``nn.Parameter`` per quantized tensor (per output channel for weights with
      ``quant_scheme='per_channel_*'``), named ``fakequant_<type>_scale`` on the module, initialised as LSQ
      does, ``2 * mean(|x|) / sqrt(quant_max)`` (per group of input channels with ``granularity=PerGroup(n)``,
      scales ``[out, in / n]``): weights when :meth:`compress` runs, activations on their first
      training batch (or on ``dummy_input``). Their gradient is scaled by ``1 / sqrt(n * quant_max)``, ``n``
      the elements one scale covers (:func:`fakequant.lsq_grad_factor`).
    * Zero points: fixed by the scheme when symmetric (0 for signed, the middle of the range for unsigned);
      a learned ``nn.Parameter`` (rounded and clamped in the forward) when affine, initialised from the first
      batch's minimum.
    * ``compress()`` adds the new parameters to the optimizer passed in (one extra param group, with the
      optimizer's defaults), as NNI does; without one, add ``quantizer.learned_parameters()`` yourself.
      After each optimizer step the scales are kept at least ``finfo(float32).eps``.
    * Defaults: 8 bits; weights signed, symmetric, per tensor; inputs and outputs unsigned, affine.

    Args:
        model: the model (modified in place by :meth:`compress`).
        config_list: NNI config dicts; keys ``quant_types``, ``quant_bits`` (2 to 16), ``op_types``,
            ``op_names``, ``exclude``, ``quant_start_step``, ``quant_scheme``, ``quant_dtype``.
        optimizer: the model's optimizer; its ``step()`` advances the step counter and it trains the scales.
        dummy_input: example inputs; when given, :meth:`compress` runs one forward pass on them (no gradient,
            BatchNorm statistics untouched) to initialise the activation scales.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> config_list = [{'quant_types': ['weight', 'input'], 'quant_bits': 4, 'op_types': ['Conv2d', 'Linear']}]
        >>> model = LsqQuantizer(model, config_list, optimizer, dummy_input=torch.randn(2, 1, 8, 8)).compress()
        >>> len(optimizer.param_groups)  # the learned scales and zero points train too
        2
    """

    # QAT_Quantizer's keys, widths and defaults: signed symmetric per-tensor weights, unsigned affine activations.
    rules = dataclasses.replace(QAT_Quantizer.rules, name="LsqQuantizer")
    exports_onnx_qdq = True

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        dummy_input: Any = None,
    ) -> None:
        super().__init__(model, config_list, optimizer)
        self.dummy_input = dummy_input
        self._initializing = False

    # -- lifecycle --------------------------------------------------------------------------------
    def compress(self, *nni3_training_args: Any) -> nn.Module:
        model = super().compress(*nni3_training_args)
        if self.dummy_input is not None:
            self._initialize_from(self.dummy_input)
        if self.optimizer is not None:
            self.optimizer.add_param_group({"params": self.learned_parameters()})
        return model

    def learned_parameters(self) -> list[nn.Parameter]:
        """The scales and learned zero points of every quantized tensor (what :meth:`compress` gives the
        optimizer)."""
        return [parameter for layer in self.layers.values() for parameter in layer.learned_parameters()]

    def _initialize_from(self, dummy_input: Any) -> None:
        """One forward pass that initialises every activation scale, in eval mode (BatchNorm statistics and
        anything else a training forward updates stay as they are), without gradients."""
        model = self.bound_model
        modes = {module: module.training for module in model.modules()}
        model.eval()
        self._initializing = True
        try:
            with torch.no_grad():
                model(*dummy_input) if isinstance(dummy_input, tuple) else model(dummy_input)
        finally:
            self._initializing = False
            for module, training in modes.items():
                module.train(training)

    # -- state ------------------------------------------------------------------------------------
    @staticmethod
    def _view(layer: QuantizedLayer, quant_type: str, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """``x`` as the learnable op sees it, and the axis of its scales: per-group weights as the
        ``[out * in / group_size, group_size]`` view with one scale per row."""
        granularity = layer.config.specs[quant_type].granularity
        if granularity.group_size is not None:
            return x.reshape(-1, granularity.group_size), 0
        return x, granularity.axis

    def init_layer_state(self, layer: QuantizedLayer) -> None:
        for quant_type in layer.config.quant_types:
            spec = layer.config.specs[quant_type]
            # inputs and outputs are per tensor; a per-tensor scale has one element, the learnable op takes it 1-D
            shape = spec.granularity.scale_shape(layer.module.weight.shape) if quant_type == "weight" else ()
            shape = shape or (1,)
            layer.add_parameter(quant_type + "_scale", torch.ones(shape))
            if spec.symmetric:
                # the symmetric zero point of docs/numerics.md, Choosing scale and zero point: 0 for a signed
                # range, the middle of an unsigned one
                zero_point = (spec.quant_min + spec.quant_max + 1) // 2 if spec.quant_min >= 0 else 0
                layer.add_buffer(quant_type + "_zero_point", torch.full(shape, zero_point, dtype=torch.int32))
            else:
                layer.add_parameter(quant_type + "_zero_point", torch.zeros(shape))
            layer.add_buffer(quant_type + "_observed", torch.zeros((), dtype=torch.int64))
            layer.observed[quant_type] = False
        if "weight" in layer.config.quant_types:
            with torch.no_grad():
                self._initialize(layer, "weight", layer.module.weight.detach())

    def _zero_point(self, layer: QuantizedLayer, quant_type: str) -> torch.Tensor:
        name = "fakequant_" + quant_type + "_zero_point"
        return layer.module._parameters.get(name, layer.module._buffers.get(name))

    def _initialize(self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor) -> None:
        """LSQ's initial scale ``2 * mean|x| / sqrt(quant_max)`` (per channel along the axis), and an affine
        zero point that puts the minimum of ``x`` (or 0) on ``quant_min``."""
        spec = layer.config.specs[quant_type]
        xf, axis = self._view(layer, quant_type, x.detach().float())
        dims = [d for d in range(xf.dim()) if d != axis] if axis is not None else list(range(xf.dim()))
        mean_abs = xf.abs().mean(dim=dims) if dims else xf.abs()
        scale = (2.0 * mean_abs / math.sqrt(max(spec.quant_max, 1))).clamp_min(_MIN_SCALE).reshape(-1)
        parameter = layer.parameter(quant_type + "_scale")
        parameter.copy_(scale.reshape(parameter.shape))
        if not spec.symmetric:
            low = (xf.amin(dim=dims) if dims else xf).clamp_max(0.0).reshape(-1)
            zero_point = (spec.quant_min - torch.round(low / scale)).clamp(spec.quant_min, spec.quant_max)
            parameter = layer.parameter(quant_type + "_zero_point")
            parameter.copy_(zero_point.reshape(parameter.shape))
        layer.buffer(quant_type + "_observed").fill_(1)
        layer.observed[quant_type] = True

    # -- the forward ------------------------------------------------------------------------------
    def _fake_quant(self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor) -> torch.Tensor:
        if not layer.observed[quant_type]:
            if not (layer.module.training or self._initializing):
                return x  # an eval pass before any training batch runs in float
            with torch.no_grad():
                self._initialize(layer, quant_type, x)
        if not layer.active():
            return x
        spec = layer.config.specs[quant_type]
        view, axis = self._view(layer, quant_type, x)
        # .float(): model.half() casts parameters too, and the op takes an fp32 scale
        scale = layer.parameter(quant_type + "_scale").float().reshape(-1)
        zero_point = self._zero_point(layer, quant_type).reshape(-1)
        out = fake_quant_learnable(
            view, scale, zero_point.float() if zero_point.is_floating_point() else zero_point, spec.quant_min,
            spec.quant_max, lsq_grad_factor(view, spec.quant_max, axis), axis,
        )
        return out.reshape(x.shape)

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(layer, "weight", weight)

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(layer, "input", x)

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(layer, "output", y)

    def update_layer_on_step(self, layer: QuantizedLayer, step: int) -> None:
        for quant_type in layer.config.quant_types:
            layer.parameter(quant_type + "_scale").clamp_(min=_MIN_SCALE)

    # -- export -----------------------------------------------------------------------------------
    def _integer_zero_point(self, layer: QuantizedLayer, quant_type: str) -> torch.Tensor:
        spec = layer.config.specs[quant_type]
        zero_point = self._zero_point(layer, quant_type).detach()
        return torch.round(zero_point.float()).clamp(spec.quant_min, spec.quant_max).to(torch.int32)

    def layer_calibration(self, layer: QuantizedLayer) -> dict:
        record = {}
        for quant_type in layer.config.quant_types:
            record.update(layer.config.specs[quant_type].calibration_record(quant_type))
            record[f"{quant_type}_scale"] = layer.parameter(quant_type + "_scale").detach().cpu().clone()
            record[f"{quant_type}_zero_point"] = self._integer_zero_point(layer, quant_type).cpu()
        return record

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        spec = layer.config.specs[quant_type]
        constant = quant_type == "weight"
        quant_min, quant_max = onnx_qdq_range(layer.name, quant_type, spec.quant_min, spec.quant_max,
                                              constant=constant)  # fmt: skip
        if spec.granularity.group_size is not None:
            raise ValueError(
                f"layer {layer.name!r} {quant_type}: per-group scales have no ONNX QuantizeLinear/DequantizeLinear "
                "form in this exporter (that needs opset 21's block_size); allowed: PerTensor() or PerChannel(0)"
            )
        if not (layer.active() and layer.observed[quant_type]):
            return None
        axis = spec.granularity.axis
        scale = layer.parameter(quant_type + "_scale").detach().float().clone()
        zero_point = self._integer_zero_point(layer, quant_type)
        qdq = OnnxQDQ(
            scale=scale if axis is not None else scale.reshape(()),
            zero_point=zero_point if axis is not None else zero_point.reshape(()),
            quant_min=quant_min,
            quant_max=quant_max,
            axis=axis,
        )
        if constant:
            with torch.no_grad():
                qdq.tensor = self._fake_quant(layer, "weight", layer.module.parametrizations.weight.original).detach()
        return qdq
