"""DoReFaQuantizer: DoReFa-Net (Zhou et al., 2016) weights, activations and, optionally, gradients."""

from __future__ import annotations

import torch

from fakequant.ops.fake_quant import fake_quant_per_tensor
from fakequant.qparams import QuantSpec, choose_qparams, quant_range
from fakequant.quantizers.base import QuantizedLayer, Quantizer, onnx_qdq_quantizer_names
from fakequant.quantizers.config import AlgorithmRules

__all__ = ["DoReFaQuantizer"]


def _unit_scale(bits: int) -> torch.Tensor:
    """quant_k's grid on [0, 1]: the levels 0 .. 2^k - 1 of an unsigned k-bit range, one step 1 / (2^k - 1)."""
    quant_min, quant_max = quant_range(bits, signed=False)
    scale, _ = choose_qparams(torch.tensor(0.0), torch.tensor(1.0), quant_min, quant_max, symmetric=False)
    return scale


class DoReFaQuantizer(Quantizer):
    """DoReFa-Net quantization of weights, activations and (optionally) gradients.

    With ``quant_k(v) = round((2^k - 1) v) / (2^k - 1)`` on ``v`` in ``[0, 1]`` (one fakequant per-tensor
    op with scale ``1 / (2^k - 1)``, zero point 0 and range ``[0, 2^k - 1]``):

    * weights: ``2 * quant_k(tanh(w) / (2 * max|tanh(w)|) + 1/2) - 1`` (the gradient flows through tanh and
      the max, the rounding is straight-through);
    * inputs/outputs: ``quant_k(clamp(x, 0, 1))``;
    * gradients (``gradient_bits`` set; off by default): the gradient ``dr`` reaching the output of each
      weight-quantized layer becomes ``2 m (quant_k(dr / (2 m) + 1/2 + N) - 1/2)`` with ``m = max|dr|`` per
      sample and ``N ~ U(-1/2, 1/2) / (2^k - 1)``, DoReFa's stochastic rounding noise.

    Weights need no clamping after a step: tanh maps any float weight into the quantized interval.

    Args:
        model: the model (modified in place by :meth:`compress`).
        config_list: NNI config dicts; keys ``quant_types`` (default ``['weight']``), ``quant_bits`` or its
            alias ``q_bits`` (1 to 16; ``q_bits`` is the weight width), ``op_types``, ``op_names``,
            ``exclude``, ``quant_start_step``.
        optimizer: optional; its ``step()`` advances the step counter.
        gradient_bits: width of the quantized gradients, or None (default) to leave gradients in float.
        generator: the random generator of the gradient noise (default: torch's global one).

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> model = DoReFaQuantizer(model, [{'q_bits': 8, 'op_types': 'default'}]).compress()
        >>> model(torch.ones(1, 4)).shape
        torch.Size([1, 4])
    """

    rules = AlgorithmRules(
        name="DoReFaQuantizer",
        keys=("q_bits",),
        quant_types=("weight", "input", "output"),
        min_bits=1,
        max_bits=16,
        default_bits=8,
        default_specs={t: QuantSpec(signed=False, symmetric=False) for t in ("weight", "input", "output")},
    )

    def __init__(self, model, config_list=None, optimizer=None, *, gradient_bits: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if gradient_bits is not None and (
            not isinstance(gradient_bits, int) or isinstance(gradient_bits, bool) or not 1 <= gradient_bits <= 16
        ):
            raise ValueError(f"DoReFaQuantizer: gradient_bits must be None or an int from 1 to 16, got "
                             f"{gradient_bits!r}")
        super().__init__(model, config_list, optimizer)
        self.gradient_bits = gradient_bits
        self.generator = generator

    def init_layer_state(self, layer: QuantizedLayer) -> None:
        for quant_type in layer.config.quant_types:
            layer.add_buffer(quant_type + "_scale", _unit_scale(layer.config.bits(quant_type)))
            layer.add_buffer(quant_type + "_zero_point", torch.zeros((), dtype=torch.int32))
        if self.gradient_bits is not None and "weight" in layer.config.quant_types:
            layer.add_buffer("gradient_scale", _unit_scale(self.gradient_bits))
            layer.add_buffer("gradient_zero_point", torch.zeros((), dtype=torch.int32))
            layer.add_hook_handle(layer.module.register_forward_hook(self._gradient_hook(layer)))

    def _quant_unit(self, layer: QuantizedLayer, prefix: str, bits: int, v: torch.Tensor) -> torch.Tensor:
        """quant_k on [0, 1] (values outside are clamped by the op)."""
        return fake_quant_per_tensor(
            v, layer.buffer(prefix + "_scale").float(), layer.buffer(prefix + "_zero_point"), 0, (1 << bits) - 1
        )

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        if not layer.active():
            return weight
        squashed = torch.tanh(weight)
        # an all-zero weight has max|tanh| = 0: the eps keeps it at the grid's middle instead of NaN
        peak = squashed.abs().max().clamp_min(torch.finfo(torch.float32).eps)
        unit = squashed / (2 * peak) + 0.5
        return 2 * self._quant_unit(layer, "weight", layer.config.bits("weight"), unit) - 1

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        if not layer.active():
            return x
        return self._quant_unit(layer, "input", layer.config.bits("input"), torch.clamp(x, 0, 1))

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        if not layer.active():
            return y
        return self._quant_unit(layer, "output", layer.config.bits("output"), torch.clamp(y, 0, 1))

    def quantize_gradient(self, layer: QuantizedLayer, grad: torch.Tensor) -> torch.Tensor:
        """DoReFa's stochastic k-bit quantization of a backpropagated gradient (per-sample max)."""
        bits = self.gradient_bits
        per_sample = grad.abs().reshape(grad.shape[0], -1).amax(dim=1) if grad.dim() > 1 else grad.abs().amax()
        peak = per_sample.clamp_min(torch.finfo(torch.float32).eps)
        peak = peak.reshape((-1,) + (1,) * (grad.dim() - 1)) if grad.dim() > 1 else peak
        noise = (torch.rand(grad.shape, generator=self.generator, device=grad.device, dtype=grad.dtype) - 0.5)
        unit = grad / (2 * peak) + 0.5 + noise / ((1 << bits) - 1)
        return 2 * peak * (self._quant_unit(layer, "gradient", bits, unit) - 0.5)

    def _gradient_hook(self, layer: QuantizedLayer):
        def hook(module, args, output):
            if layer.active() and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self.quantize_gradient(layer, grad))
        return hook

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> None:
        if quant_type == "weight":
            bits = layer.config.bits("weight")
            raise ValueError(
                f"layer {layer.name!r} weight: DoReFa's {bits}-bit weights 2 * quant_k(...) - 1 lie on the grid "
                f"(2k - {(1 << bits) - 1}) / {(1 << bits) - 1}, k = 0 .. {(1 << bits) - 1}, which has no zero level "
                f"(its zero point would be {(1 << bits) - 1} / 2), so they have no QuantizeLinear/DequantizeLinear "
                f"form; allowed: {onnx_qdq_quantizer_names()} models"
            )
        return super().onnx_qdq(layer, quant_type)

    def layer_calibration(self, layer: QuantizedLayer) -> dict:
        record = {"op_type": layer.config.op_type}
        for quant_type in layer.config.quant_types:
            bits = layer.config.bits(quant_type)
            # the values on the [0, 1] grid of quant_k; weights map them to 2 v - 1 (scale 2 / (2^k - 1))
            record.update({
                f"{quant_type}_bits": bits,
                f"{quant_type}_quant_min": 0,
                f"{quant_type}_quant_max": (1 << bits) - 1,
                f"{quant_type}_scale": layer.buffer(quant_type + "_scale").detach().cpu().clone(),
                f"{quant_type}_zero_point": layer.buffer(quant_type + "_zero_point").detach().cpu().clone(),
            })
            if quant_type != "weight":
                record[f"tracked_min_{quant_type}"] = 0.0
                record[f"tracked_max_{quant_type}"] = 1.0
        if self.gradient_bits is not None and "weight" in layer.config.quant_types:
            record["gradient_bits"] = self.gradient_bits
        return record
