"""LSQ: quantization-aware training with learned step sizes (Esser et al., ICLR 2020), as NNI 2.x's LsqQuantizer.

Every quantized tensor's scale is an ``nn.Parameter`` trained by the optimizer with the straight-through
gradient of LSQ, computed by the fused ``fakequant::fake_quant_learnable`` op (one pass forward, one pass
backward that also sums the scale's gradient). Affine tensors (``quant_scheme='per_tensor_affine'``, the
default for inputs and outputs) learn their zero point too (LSQ+, Bhalgat et al., 2020).

FP8 (``quant_dtype='fp8_e4m3'`` / ``'fp8_e5m2'``) learns its scales too: its forward ``s * fp8(clamp(x / s))``
has the integer one's form with the FP8 grid in place of the integer levels, so LSQ's straight-through gradient
carries over unchanged: ``fp8(x / s) - x / s`` inside the range and ``±max`` outside it. The MX and NVFP4 formats
are refused: their block scales are computed from each block (MX's a power of two), so there is no scale to learn.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from fakequant.ops.learnable import fake_quant_learnable, lsq_grad_factor
from fakequant.qdq import OnnxQDQ, onnx_qdq_range
from fakequant.qparams import FloatSpec, PerBlock
from fakequant.quantizers.base import QuantizedLayer, Quantizer
from fakequant.quantizers.ema_range import float_format_onnx_error
from fakequant.quantizers.qat import QAT_Quantizer

__all__ = ["LsqQuantizer"]

# The smallest scale an optimizer step may leave: the ops need a finite positive scale (docs/numerics.md,
# Argument checks).
_MIN_SCALE = torch.finfo(torch.float32).eps
# The FP8 formats LSQ learns scales for; MX and NVFP4 compute theirs from each block.
_LEARNED_FLOAT_DTYPES = ("fp8_e4m3", "fp8_e5m2")


class _LearnedFp8(torch.autograd.Function):
    """``fake_quant_fp8(x, scale)`` with LSQ's gradient for ``scale``: per scale, the sum over its elements of the
    output gradient times ``fp8(v) - v`` where ``v = x / s`` is inside the range (``(out - x) / s``) and
    ``sign(v) * max`` where it saturated, times ``grad_factor``; ``x`` gets the masked straight-through gradient."""

    @staticmethod
    def forward(ctx, x, scale, spec: FloatSpec, grad_factor: float):
        out, mask = torch.ops.fakequant.fake_quant_fp8(x, scale, spec.element.name, _fp8_block_size(spec, x), True)
        ctx.save_for_backward(x, scale, out, mask)
        ctx.fmt_max, ctx.grad_factor = spec.element.max, grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, out, mask = ctx.saved_tensors
        grad_x = torch.ops.fakequant.masked_grad(grad, mask) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            rows = scale.numel()  # one scale per row of the [scales, elements per scale] view
            s = scale.float().reshape(rows, 1)
            xf = x.float().reshape(rows, -1)
            inside = (out.float().reshape(rows, -1) - xf) / s
            derivative = torch.where(mask.reshape(rows, -1), inside, torch.sign(xf) * ctx.fmt_max)
            grad_scale = (grad.float().reshape(rows, -1) * derivative).sum(1) * ctx.grad_factor
            grad_scale = grad_scale.reshape(scale.shape).to(scale.dtype)
        return grad_x, grad_scale, None, None


def _fp8_block_size(spec: FloatSpec, x: torch.Tensor) -> int:
    """The op's block size of a per-tensor (0) or per-channel (whole rows of the channel-first view) scale."""
    return x[0].numel() if spec.granularity.axis is not None and x.numel() else 0


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
    * FP8 (``quant_dtype='fp8_e4m3'`` or ``'fp8_e5m2'``): learned scales per tensor (or per output channel for
      weights), initialised to ``amax / max`` (the scale nothing saturates with), LSQ's gradient with the FP8 grid
      (module docstring), scaled by ``1 / sqrt(n * max)``; no zero point. Kept within ``[2^-126, 2^(126 - emax)]``
      after each step. Per-block scales, MX and NVFP4 are refused (``ValueError``).

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

    # QAT_Quantizer's keys, widths and defaults: signed symmetric per-tensor weights, unsigned affine activations;
    # of the float formats FP8 only, per tensor or channel (no block_size).
    rules = dataclasses.replace(
        QAT_Quantizer.rules,
        name="LsqQuantizer",
        keys=tuple(key for key in QAT_Quantizer.rules.keys if key != "block_size"),
        float_dtypes=_LEARNED_FLOAT_DTYPES,
        float_dtypes_note="; it learns FP8 scales, while MX and NVFP4 compute their block scales from each block: "
                          "use QAT_Quantizer for them",
    )
    exports_onnx_qdq = True

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        dummy_input: Any = None,
    ) -> None:
        super().__init__(model, config_list, optimizer)
        for name, config in self.layer_configs.items():
            spec = config.specs.get("weight")  # without the block_size key, only a weight's granularity has blocks
            if isinstance(spec, FloatSpec) and isinstance(spec.granularity, PerBlock):
                raise ValueError(
                    f"config_list[{config.entry_index}]: key 'granularity' has value "
                    f"PerBlock({spec.granularity.block_size}) for the weight of {name!r} (quant_dtype "
                    f"{spec.quant_dtype!r}); allowed: PerTensor() or PerChannel(0) (LsqQuantizer learns FP8 scales "
                    "per tensor or per channel, not per block)"
                )
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
            if isinstance(spec, FloatSpec):
                pass  # no zero point
            elif spec.symmetric:
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
        if isinstance(spec, FloatSpec):
            # amax / max: the scale at which nothing saturates
            parameter = layer.parameter(quant_type + "_scale")
            parameter.copy_(spec.tensor_scale(x.detach().float()).reshape(parameter.shape))
            layer.buffer(quant_type + "_observed").fill_(1)
            layer.observed[quant_type] = True
            return
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
        if isinstance(spec, FloatSpec):
            return self._fake_quant_fp8(layer, quant_type, x, spec)
        view, axis = self._view(layer, quant_type, x)
        # .float(): model.half() casts parameters too, and the op takes an fp32 scale
        scale = layer.parameter(quant_type + "_scale").float().reshape(-1)
        zero_point = self._zero_point(layer, quant_type).reshape(-1)
        out = fake_quant_learnable(
            view, scale, zero_point.float() if zero_point.is_floating_point() else zero_point, spec.quant_min,
            spec.quant_max, lsq_grad_factor(view, spec.quant_max, axis), axis,
        )
        return out.reshape(x.shape)

    def _fake_quant_fp8(self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor,
                        spec: FloatSpec) -> torch.Tensor:  # fmt: skip
        axis = spec.granularity.axis_for(x.dim())
        moved = x.movedim(axis, 0) if axis else x  # per channel: whole rows of the channel-first view
        # .float(): model.half() casts parameters too, and the op takes an fp32 scale
        scale = layer.parameter(quant_type + "_scale").float().reshape(-1)
        grad_factor = lsq_grad_factor(moved, spec.element.max, None if axis is None else 0)
        out = _LearnedFp8.apply(moved, scale, spec, grad_factor)
        return out.movedim(0, axis) if axis else out

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(layer, "weight", weight)

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(layer, "input", x)

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(layer, "output", y)

    def update_layer_on_step(self, layer: QuantizedLayer, step: int) -> None:
        for quant_type in layer.config.quant_types:
            spec = layer.config.specs[quant_type]
            if isinstance(spec, FloatSpec):
                # the ops' bounds: 1 / scale finite, max * scale finite (fakequant.reference.fp8_scale_from_amax)
                layer.parameter(quant_type + "_scale").clamp_(min=2.0**-126, max=2.0 ** (126 - spec.element.emax))
            else:
                layer.parameter(quant_type + "_scale").clamp_(min=_MIN_SCALE)

    # -- export -----------------------------------------------------------------------------------
    def _integer_zero_point(self, layer: QuantizedLayer, quant_type: str) -> torch.Tensor:
        spec = layer.config.specs[quant_type]
        zero_point = self._zero_point(layer, quant_type).detach()
        return torch.round(zero_point.float()).clamp(spec.quant_min, spec.quant_max).to(torch.int32)

    def layer_calibration(self, layer: QuantizedLayer) -> dict:
        record = {}
        for quant_type in layer.config.quant_types:
            spec = layer.config.specs[quant_type]
            record.update(spec.calibration_record(quant_type))
            record[f"{quant_type}_scale"] = layer.parameter(quant_type + "_scale").detach().cpu().clone()
            if not isinstance(spec, FloatSpec):
                record[f"{quant_type}_zero_point"] = self._integer_zero_point(layer, quant_type).cpu()
        return record

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        spec = layer.config.specs[quant_type]
        if isinstance(spec, FloatSpec):
            raise float_format_onnx_error(layer, quant_type)
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
