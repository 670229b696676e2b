"""QAT_Quantizer: quantization-aware training after Jacob et al. (CVPR 2018), on the fakequant ops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fakequant.bn_fold import ConvBnQAT, find_conv_bn_pairs, fold_conv_bn, unfold_conv_bn
from fakequant.qdq import OnnxQDQ, onnx_qdq_range
from fakequant.qparams import FLOAT_QUANT_DTYPES, FloatSpec, PerTensor, QuantSpec
from fakequant.quantizers.base import QuantizedLayer
from fakequant.quantizers.config import AlgorithmRules, LayerConfig
from fakequant.quantizers.ema_range import (
    EmaRangeQuantizer,
    add_minmax_weight_state,
    float_format_onnx_error,
    minmax_fake_quant_weight,
    observe_weight,
)

__all__ = ["QAT_Quantizer", "QATQuantizer"]


class _FoldedConvBnLayer(QuantizedLayer):
    """A Conv+BN pair replaced by a :class:`ConvBnQAT`: the module quantizes its folded weight itself, so
    only the input/output hooks are attached here."""

    def attach(self) -> None:
        if "input" in self.config.quant_types:
            self._handles.append(self.module.register_forward_pre_hook(self._input_hook))
        if "output" in self.config.quant_types:
            self._handles.append(self.module.register_forward_hook(self._output_hook))


def _check_pairs_option(bn_folding: object) -> bool | list[tuple[str, str]]:
    if isinstance(bn_folding, bool):
        return bn_folding
    if isinstance(bn_folding, Sequence) and not isinstance(bn_folding, str):
        pairs = []
        for pair in bn_folding:
            if (not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2
                    or not all(isinstance(name, str) for name in pair)):
                break
            pairs.append((pair[0], pair[1]))
        else:
            return pairs
    raise ValueError(
        f"QAT_Quantizer: bn_folding={bn_folding!r}; allowed: True (find Conv+BN pairs), False (no folding) "
        "or a list of (conv_name, bn_name) pairs"
    )


def _with_default_start_step(config_list: list[dict] | None, quant_start_step: object) -> list[dict] | None:
    """NNI 3.0's ``QATQuantizer(..., quant_start_step=n)``: ``n`` for every entry that does not set its own."""
    if not isinstance(quant_start_step, int) or isinstance(quant_start_step, bool) or quant_start_step < 0:
        raise ValueError(f"QAT_Quantizer: quant_start_step={quant_start_step!r}; allowed: None or an int >= 0")
    if config_list is None:
        return None
    return [
        entry if not isinstance(entry, dict) or entry.get("exclude") or "quant_start_step" in entry
        else {**entry, "quant_start_step": quant_start_step}
        for entry in config_list
    ]


class QAT_Quantizer(EmaRangeQuantizer):  # noqa: N801  (NNI's name)
    """Quantization-aware training: fake-quantized weights and activations, trained in float.

    * Weights: the range of the current float weight on every forward (per tensor, or per output channel
      with ``quant_scheme='per_channel_*'``), default signed int, symmetric, per tensor.
    * Inputs/outputs: ranges tracked by an exponential moving average (decay 0.99, the first observation
      initialises it) in training mode, all-reduced across ranks under ``torch.distributed``; default
      unsigned int, affine, per tensor.
    * ``quant_start_step``: ranges are tracked from step 0, fake quantization starts once that many steps
      were taken (steps advance with the optimizer passed in, or :meth:`step`).
    * BatchNorm folding (on by default): every Conv1d/2d/3d configured for ``'weight'`` whose output feeds
      only a BatchNorm (found by :func:`fakequant.bn_fold.find_conv_bn_pairs`) is replaced by a
      :class:`fakequant.bn_fold.ConvBnQAT` and the BN by ``nn.Identity``: training uses the BN-folded weight,
      fake-quantized by one fused op, while BN keeps the float model's statistics; from ``freeze_bn_step`` on
      the statistics freeze and training computes exactly the folded inference conv. Input/output
      quantization configured on the conv applies to the fused module (its output is the BN's output). A
      pair whose BN has its own config entry is not folded. :meth:`export_model` writes the folded float
      weight and bias under the conv's name (no BN entries) and the folded weight's scale and zero point;
      :meth:`unwrap` puts the original conv and BN back.
    * Float formats (``quant_dtype`` ``'fp8_e4m3'``, ``'fp8_e5m2'``, ``'mxfp8_e4m3'``, ``'mxfp8_e5m2'``,
      ``'mxfp6_e3m2'``, ``'mxfp6_e2m3'``, ``'mxfp4'``, ``'mxint8'``, ``'nvfp4'``; :class:`fakequant.FloatSpec`):
      weights on every forward with the scales the op computes from the current weight (FP8 per tensor, per
      output channel or per block; MX and NVFP4 per block of the input channels, NVFP4's per-tensor scale from the
      weight); activations with FP8's per-tensor scale and NVFP4's per-tensor scale taken from the EMA-tracked
      range (``amax / 448``, ``amax / 57344``, ``amax / (6 * 448)``), block scales computed by the op; blocks along
      the last dimension, ``block_size`` elements (MX 32, NVFP4 16 by default). Convs with a float weight are not
      BN-folded; no ONNX export.

    Args:
        model: the model (modified in place by :meth:`compress`).
        config_list: NNI config dicts; keys ``quant_types``, ``quant_bits`` (2 to 16), ``op_types``,
            ``op_names``, ``exclude``, ``quant_start_step``, ``quant_scheme``, ``quant_dtype``, ``granularity``,
            ``block_size``.
        optimizer: optional; its ``step()`` advances the step counter.
        dummy_input: example model inputs (NNI's argument), used to find Conv+BN pairs by a forward pass when
            ``torch.fx`` cannot trace the model.
        sync_ranges: all-reduce activation ranges across ranks (on by default).
        bn_folding: True (find the pairs), False (no folding) or an explicit list of
            ``(conv_name, bn_name)`` pairs.
        freeze_bn_step: BN statistics freeze once this many steps were taken (None: never).
        quant_start_step: NNI 3.0's ``QATQuantizer`` argument: the ``quant_start_step`` of every entry that
            does not give its own (None: each entry's, default 0).

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
        keys=("quant_scheme", "quant_dtype", "granularity", "block_size"),
        quant_types=("weight", "input", "output"),
        min_bits=2,
        max_bits=16,
        default_bits=8,
        default_specs={
            "weight": QuantSpec(signed=True, symmetric=True, granularity=PerTensor()),
            "input": QuantSpec(signed=False, symmetric=False),
            "output": QuantSpec(signed=False, symmetric=False),
        },
        float_dtypes=tuple(FLOAT_QUANT_DTYPES),
    )
    exports_onnx_qdq = True

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        dummy_input: Any = None,
        *,
        sync_ranges: bool = True,
        bn_folding: bool | Sequence[tuple[str, str]] = True,
        freeze_bn_step: int | None = None,
        quant_start_step: int | None = None,
    ) -> None:
        if quant_start_step is not None:
            config_list = _with_default_start_step(config_list, quant_start_step)
        super().__init__(model, config_list, optimizer, sync_ranges=sync_ranges)
        self.bn_folding = _check_pairs_option(bn_folding)
        if freeze_bn_step is not None and (
            not isinstance(freeze_bn_step, int) or isinstance(freeze_bn_step, bool) or freeze_bn_step < 0
        ):
            raise ValueError(f"QAT_Quantizer: freeze_bn_step={freeze_bn_step!r}; allowed: None or an int >= 0")
        self.freeze_bn_step = freeze_bn_step
        self.dummy_input = dummy_input
        self.folded_pairs: dict[str, str] = {}  # conv name -> BN name, filled by compress()
        if isinstance(self.bn_folding, list):
            self._check_explicit_pairs(self.bn_folding)

    # -- BatchNorm folding ------------------------------------------------------------------------
    def _foldable_conv(self, name: str) -> bool:
        # Per-group weights are not folded: the BN factor is per output channel, the groups split input channels.
        # Nor float formats: ConvBnQAT fake-quantizes the folded weight to integers.
        config = self.layer_configs.get(name)
        return (config is not None and "weight" in config.quant_types
                and isinstance(config.specs["weight"], QuantSpec)
                and config.specs["weight"].granularity.group_size is None)  # fmt: skip

    def _check_explicit_pairs(self, pairs: list[tuple[str, str]]) -> None:
        modules = dict(self.bound_model.named_modules())
        for conv_name, bn_name in pairs:
            for name in (conv_name, bn_name):
                if name not in modules or not name:
                    raise ValueError(f"QAT_Quantizer: bn_folding pair {(conv_name, bn_name)!r}: {name!r} is not a "
                                     "submodule of the model; allowed: qualified module names")
            config = self.layer_configs.get(conv_name)
            if config is not None and isinstance(config.specs.get("weight"), FloatSpec):
                raise ValueError(
                    f"QAT_Quantizer: bn_folding pair {(conv_name, bn_name)!r}: {conv_name!r} has a float weight format "
                    f"({config.specs['weight'].quant_dtype!r}), and BN folding fake-quantizes the folded weight to "
                    "integers; allowed: convs with an integer weight format"
                )
            if not self._foldable_conv(conv_name):
                raise ValueError(
                    f"QAT_Quantizer: bn_folding pair {(conv_name, bn_name)!r}: {conv_name!r} is not configured for "
                    "'weight' quantization in config_list; allowed: convs whose weight is quantized"
                )
            if bn_name in self.layer_configs:
                raise ValueError(
                    f"QAT_Quantizer: bn_folding pair {(conv_name, bn_name)!r}: the BN {bn_name!r} has its own "
                    "config_list entry, and a folded BN no longer exists as a module; allowed: BNs left unconfigured"
                )
            # ConvBnQAT checks the module types and widths with its own error messages.
            ConvBnQAT.check_pair(modules[conv_name], modules[bn_name])

    def _conv_bn_pairs(self) -> list[tuple[str, str]]:
        if self.bn_folding is False:
            return []
        if isinstance(self.bn_folding, list):
            return list(self.bn_folding)
        model = self.bound_model
        if not any(self._foldable_conv(name) for name in self.layer_configs) or not any(
            isinstance(module, _BatchNorm) for module in model.modules()
        ):
            return []  # nothing to fold: no tracing needed
        try:
            pairs = find_conv_bn_pairs(model, self.dummy_input)
        except ValueError as error:
            raise ValueError(
                f"{error}. With QAT_Quantizer, pass dummy_input=..., bn_folding=[(conv_name, bn_name), ...], "
                "or bn_folding=False"
            ) from error
        return [(conv, bn) for conv, bn in pairs if self._foldable_conv(conv) and bn not in self.layer_configs]

    def _wrap_modules(self) -> None:
        pairs = self._conv_bn_pairs()
        fused = fold_conv_bn(
            self.bound_model,
            pairs,
            weight_spec={conv: self.layer_configs[conv].specs["weight"] for conv, _ in pairs},
            quant_start_step={conv: self.layer_configs[conv].quant_start_step for conv, _ in pairs},
            freeze_bn_step=self.freeze_bn_step,
        )
        for module in fused.values():
            module.update_step(self._step)
        self.folded_pairs = dict(pairs)
        super()._wrap_modules()  # named_modules() now gives the ConvBnQAT under each folded conv's name

    def _wrap_module(self, name: str, module: nn.Module, config: LayerConfig) -> QuantizedLayer:
        if not isinstance(module, ConvBnQAT):
            return super()._wrap_module(name, module, config)
        layer = _FoldedConvBnLayer(self, name, module, config)
        self.init_layer_state(layer)
        layer.attach()
        return layer

    def update_layer_on_step(self, layer: QuantizedLayer, step: int) -> None:
        if isinstance(layer.module, ConvBnQAT):
            layer.module.update_step(step)

    def unwrap(self) -> nn.Module:
        """Removes the quantization and puts every folded conv and BN back: a plain float model."""
        model = super().unwrap()
        unfold_conv_bn(model)
        self.folded_pairs = {}
        return model

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The float state_dict for export; a folded pair appears as one conv with the folded float weight
        and bias (``<conv>.weight``, ``<conv>.bias``) and no BN entries."""
        state = super().float_state_dict()
        for conv_name in self.folded_pairs:
            module = self.bound_model.get_submodule(conv_name)
            prefix = conv_name + "."
            state = {key: value for key, value in state.items() if not key.startswith(prefix)}
            weight, bias = module.folded_weight_and_bias()
            state[prefix + "weight"] = weight.detach().clone()
            state[prefix + "bias"] = bias.detach().clone()
        return state

    # -- the algorithm ----------------------------------------------------------------------------
    def init_layer_state(self, layer: QuantizedLayer) -> None:
        for quant_type in layer.config.quant_types:
            if quant_type == "weight" and isinstance(layer.module, ConvBnQAT):
                continue  # ConvBnQAT keeps the folded weight's scale and zero point itself
            if quant_type == "weight" and isinstance(layer.config.specs["weight"], FloatSpec):
                continue  # the op computes a float format's weight scales from the weight on every forward
            if quant_type == "weight":
                add_minmax_weight_state(layer)
            else:
                self._add_activation_state(layer, quant_type)

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        spec = layer.config.specs["weight"]
        if isinstance(spec, FloatSpec):
            return spec.fake_quant(weight) if layer.active() else weight
        return minmax_fake_quant_weight(layer, weight)

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant_activation(layer, "input", x)

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        return self._fake_quant_activation(layer, "output", y)

    def quantize_relu_input(self, layer: QuantizedLayer, relu_input: torch.Tensor) -> torch.Tensor | None:
        if isinstance(layer.config.specs["output"], FloatSpec):
            return None  # the fused ReLU is an integer op: the ReLU runs, then its output is quantized
        return self._fake_quant_activation(layer, "output", relu_input, relu=True)

    def layer_calibration(self, layer: QuantizedLayer) -> dict:
        record = {"op_type": layer.config.op_type}
        for quant_type in layer.config.quant_types:
            if quant_type == "weight":
                record.update(self._weight_record(layer))
            else:
                record.update(self._activation_record(layer, quant_type))
        return record

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        if quant_type != "weight":
            return super().onnx_qdq(layer, quant_type)
        module = layer.module
        spec = module.weight_spec if isinstance(module, ConvBnQAT) else layer.config.specs["weight"]
        if isinstance(spec, FloatSpec):
            raise float_format_onnx_error(layer, quant_type)
        quant_min, quant_max = onnx_qdq_range(layer.name, "weight", spec.quant_min, spec.quant_max, constant=True)
        if isinstance(module, ConvBnQAT):
            if not module._fake_quant_on:
                return None  # the float Conv+BN
            # the eval forward's own computation (it also refreshes the scale and zero point buffers)
            weight, bias = module.inference_weight_and_bias()
            scale, zero_point, axis = module.weight_scale, module.weight_zero_point, 0
            if not module.per_channel:
                scale, zero_point, axis = scale[0], zero_point[0], None
        else:
            if spec.granularity.group_size is not None:
                raise ValueError(
                    f"layer {layer.name!r} weight: per-group scales ({spec.granularity}) have no ONNX "
                    "QuantizeLinear/DequantizeLinear form in this exporter (that needs opset 21's block_size); "
                    "allowed: PerTensor() or PerChannel(0) weights"
                )
            if not layer.active():
                return None  # minmax_fake_quant_weight returns the float weight
            weight, bias = module.weight, None  # the parametrization: the eval forward's fake-quantized weight
            scale, zero_point = layer.buffer("weight_scale"), layer.buffer("weight_zero_point")
            axis = spec.granularity.axis_for(weight.dim())
        return OnnxQDQ(
            scale=scale.detach().float().clone(),
            zero_point=zero_point.detach().to(torch.int32).clone(),
            quant_min=quant_min,
            quant_max=quant_max,
            axis=axis,
            tensor=weight.detach().clone(),
            bias=None if bias is None else bias.detach().clone(),
        )

    def _weight_record(self, layer: QuantizedLayer) -> dict:
        if isinstance(layer.module, ConvBnQAT):
            calibration = layer.module.calibration()
            record = layer.config.specs["weight"].calibration_record("weight")
            record.update({
                "bn_folded": self.folded_pairs[layer.name],
                "weight_scale": calibration["scale"].cpu(),
                "weight_zero_point": calibration["zero_point"].cpu(),
            })
            return record
        spec = layer.config.specs["weight"]
        if isinstance(spec, FloatSpec):
            record = spec.calibration_record("weight")
            scale = spec.tensor_scale(layer.module.parametrizations.weight.original)
            if scale is not None:  # FP8 per tensor or channel, NVFP4's per-tensor scale; else per block, in the op
                record["weight_scale"] = scale.cpu()
            return record
        # Recomputed from the current float weight: the exported weights are those after the last step.
        observe_weight(layer, layer.module.parametrizations.weight.original)
        record = layer.config.specs["weight"].calibration_record("weight")
        record.update({
            "weight_scale": layer.buffer("weight_scale").detach().cpu().clone(),
            "weight_zero_point": layer.buffer("weight_zero_point").detach().cpu().clone(),
        })
        return record


QATQuantizer = QAT_Quantizer
