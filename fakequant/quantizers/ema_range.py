"""Min/max weight ranges and EMA activation ranges: what QAT_Quantizer and NaiveQuantizer compute.

* The **min/max weight helpers** (:func:`add_minmax_weight_state`, :func:`observe_weight`,
  :func:`minmax_fake_quant_weight`) take the weight's range from the current float weight on every forward (per
  tensor, per channel, or per group through the per-channel view of the groups) and fake-quantize it from
  ``quant_start_step`` on.
* :class:`EmaRangeQuantizer` tracks each quantized input and output with an exponential moving average of the
  batch ranges in training mode (all-reduced under ``torch.distributed``), the rules of docs/numerics.md, Range
  observation. A float format with one scale per tensor (FP8 per tensor, NVFP4's second level) tracks its range the
  same way and takes its scale from it (:meth:`fakequant.FloatSpec.scale_from_range`); the other float formats
  compute their scales in the op and track nothing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fakequant.ops.fake_quant import fake_quant_per_channel, fake_quant_per_group, fake_quant_per_tensor
from fakequant.qdq import OnnxQDQ, onnx_qdq_range
from fakequant.qparams import FloatSpec, FormatSpec, choose_qparams
from fakequant.quantizers.base import QuantizedLayer, Quantizer
from fakequant.quantizers.config import check_activation_blocks

__all__ = [
    "EmaRangeQuantizer",
    "add_qparam_buffers",
    "add_minmax_weight_state",
    "observe_weight",
    "minmax_fake_quant_weight",
    "tracks_activation_range",
    "float_format_onnx_error",
]


def _ddp_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def tracks_activation_range(spec: FormatSpec) -> bool:
    """Whether an input or output of this format keeps a tracked range (and calibration has one to set): the
    integer formats and the float formats with one scale per tensor."""
    return not isinstance(spec, FloatSpec) or spec.has_tensor_scale


def float_format_onnx_error(layer: QuantizedLayer, quant_type: str) -> ValueError:
    """The ONNX export's refusal of a float-format tensor."""
    return ValueError(
        f"layer {layer.name!r} {quant_type}: quant_dtype {layer.config.specs[quant_type].quant_dtype!r} has no "
        "QuantizeLinear/DequantizeLinear form in this exporter, which writes int8/uint8 Q/DQ (FP8, MX and NVFP4 need "
        "ONNX's float8/float4 types and blocked scales); allowed: quant_dtype 'int' or 'uint'"
    )


def add_qparam_buffers(layer: QuantizedLayer, quant_type: str, shape: tuple[int, ...]) -> None:
    """Registers ``fakequant_<quant_type>_scale`` (fp32 ones) and ``_zero_point`` (int32 zeros) of ``shape``."""
    layer.add_buffer(quant_type + "_scale", torch.ones(shape, dtype=torch.float32))
    layer.add_buffer(quant_type + "_zero_point", torch.zeros(shape, dtype=torch.int32))


def add_minmax_weight_state(layer: QuantizedLayer) -> None:
    """Scale and zero point of a weight whose range is taken from the current weight on every forward, shaped by
    its granularity (``[out, in / group_size]`` per group), and the range op's scratch buffer.

    Example:
        >>> import fakequant
        >>> quantizer = fakequant.QAT_Quantizer(torch.nn.Linear(64, 8), [{'quant_types': ['weight'],
        ...                                     'op_types': ['Linear'], 'granularity': 32}])
        >>> _ = quantizer.compress()
        >>> quantizer.bound_model.fakequant_weight_scale.shape
        torch.Size([8, 2])
    """
    shape = layer.config.specs["weight"].granularity.scale_shape(layer.module.weight.shape)
    add_qparam_buffers(layer, "weight", shape)
    # The op's scratch for the range (per group: of the flat view of the groups): recomputed on every forward, so
    # not part of the state_dict.
    layer.add_buffer("weight_range", torch.zeros((2, math.prod(shape)) if shape else (2,)), persistent=False)


def observe_weight(layer: QuantizedLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets the weight's scale and zero point buffers from the range of ``weight`` (one fused op) and returns them."""
    spec = layer.config.specs["weight"]
    scale, zero_point = layer.buffer("weight_scale"), layer.buffer("weight_zero_point")
    group_size = spec.granularity.group_size
    if group_size is not None:  # the per-channel range of the [out * in / group_size, group_size] view
        torch.ops.fakequant.observe_range(
            weight.detach().reshape(-1, group_size), layer.buffer("weight_range"), scale.view(-1),
            zero_point.view(-1), 0, 1.0, spec.quant_min, spec.quant_max, spec.symmetric,
        )
        return scale, zero_point
    torch.ops.fakequant.observe_range(
        weight.detach(), layer.buffer("weight_range"), scale, zero_point, spec.granularity.axis, 1.0,
        spec.quant_min, spec.quant_max, spec.symmetric,
    )
    return scale, zero_point


def minmax_fake_quant_weight(layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
    """Weight ranges taken from the current weight on every forward (tracked from step 0), fake quantization from
    ``quant_start_step``."""
    spec = layer.config.specs["weight"]
    scale, zero_point = observe_weight(layer, weight)
    if not layer.active():
        return weight
    # .float(): model.half() casts float buffers too, and the ops take fp32 scales (no copy if fp32)
    scale = scale.float()
    group_size, axis = spec.granularity.group_size, spec.granularity.axis
    if group_size is not None:
        return fake_quant_per_group(weight, scale, zero_point, group_size, spec.quant_min, spec.quant_max)
    if axis is not None:
        return fake_quant_per_channel(weight, scale, zero_point, axis, spec.quant_min, spec.quant_max)
    return fake_quant_per_tensor(weight, scale, zero_point, spec.quant_min, spec.quant_max)


class EmaRangeQuantizer(Quantizer):
    """A quantizer whose activations are fake-quantized with EMA-tracked ranges (the base of QAT).

    Subclasses add the weights (e.g. with the min/max helpers of this module) and the remaining hooks; this class
    gives them the activation state (:meth:`_add_activation_state`), the observing fake quantization
    (:meth:`_fake_quant_activation`), its ONNX form and calibration record, and :meth:`load_calibration_config`.

    Args:
        sync_ranges: with ``torch.distributed`` initialised, all-reduce every observed activation range
            (min of mins, max of maxes) before the EMA update, so every rank holds the same ranges and
            scales. Turn it off only to compare.
    """

    #: EMA decay of the activation ranges (docs/numerics.md, Range observation)
    ema_decay = 0.99

    def __init__(self, model, config_list=None, optimizer=None, *, sync_ranges: bool = True) -> None:
        super().__init__(model, config_list, optimizer)
        self.sync_ranges = sync_ranges

    def _add_activation_state(self, layer: QuantizedLayer, quant_type: str) -> None:
        """Registers the per-tensor scale, zero point, tracked range and observed flag of an input or output; a float
        format's scale without zero point, or nothing where its scales are per block."""
        spec = layer.config.specs[quant_type]
        if not tracks_activation_range(spec):
            return
        if isinstance(spec, FloatSpec):
            layer.add_buffer(quant_type + "_scale", torch.ones((), dtype=torch.float32))
            # observe_range's integer scale and zero point, which the float scale does not use: scratch
            layer.add_buffer(quant_type + "_observe_scale", torch.ones(()), persistent=False)
            layer.add_buffer(quant_type + "_observe_zero_point", torch.zeros((), dtype=torch.int32), persistent=False)
        else:
            add_qparam_buffers(layer, quant_type, ())
        # [min, max]; meaningful once fakequant_<type>_observed is 1
        layer.add_buffer(quant_type + "_range", torch.zeros(2, dtype=torch.float32))
        layer.add_buffer(quant_type + "_observed", torch.zeros((), dtype=torch.int64))
        layer.observed[quant_type] = False

    def _observe(self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor, relu: bool = False) -> None:
        """Moves the tracked range towards this batch's min and max (of ``relu(x)`` with ``relu``; all-reduced
        under DDP), then sets the scale and zero point from it."""
        spec = layer.config.specs[quant_type]
        tracked = layer.buffer(quant_type + "_range")
        is_float = isinstance(spec, FloatSpec)
        prefix = quant_type + ("_observe" if is_float else "")
        scale, zero_point = layer.buffer(prefix + "_scale"), layer.buffer(prefix + "_zero_point")
        # a float format reads the tracked range only; any integer range serves the op's scratch qparams
        quant_min, quant_max, symmetric = (-128, 127, True) if is_float else (
            spec.quant_min, spec.quant_max, spec.symmetric)
        first = not layer.observed[quant_type]
        torch.ops.fakequant.observe_range(
            x, tracked, scale, zero_point, None, 1.0 if first else 1.0 - self.ema_decay,
            quant_min, quant_max, symmetric, None, relu,
        )
        if self.sync_ranges and _ddp_initialized():
            # The update tracked + c * (batch - tracked) is monotonic in the batch range (each rounded
            # operation is), and the ranks start from the same tracked range: reducing the updated ranges
            # (min of the minima, max of the maxima) gives exactly the update with the all-reduced batch range.
            extremes = torch.stack((-tracked[0].float(), tracked[1].float()))
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            tracked.copy_(torch.stack((-extremes[0], extremes[1])))
            new_scale, new_zero_point = choose_qparams(-extremes[0], extremes[1], quant_min, quant_max, symmetric)
            scale.copy_(new_scale)
            zero_point.copy_(new_zero_point)
        if is_float:
            layer.buffer(quant_type + "_scale").copy_(spec.scale_from_range(tracked[0], tracked[1]))
        if first:
            layer.buffer(quant_type + "_observed").fill_(1)
            layer.observed[quant_type] = True

    def load_calibration_config(self, calibration_config: dict[str, dict]) -> None:
        """Sets activation ranges, scales and zero points from calibration records, as NNI 2.x's method does.

        The records are those :meth:`calibration` returns and :meth:`export_model` saves (``tracked_min_<type>``
        and ``tracked_max_<type>`` for inputs and outputs). Weight ranges follow the weights on every forward and
        are not loaded; to resume training exactly, save and load ``model.state_dict()``, which holds all of it.

        Args:
            calibration_config: ``{layer_name: record}`` for layers of this quantizer, after :meth:`compress`.

        Raises:
            ValueError: called before :meth:`compress`, or a layer name this quantizer does not quantize.

        Example:
            >>> calibration = trained_quantizer.calibration()  # doctest: +SKIP
            >>> fresh_quantizer.compress()  # doctest: +SKIP
            >>> fresh_quantizer.load_calibration_config(calibration)  # doctest: +SKIP
        """
        if not self._compressed:
            raise ValueError(f"{type(self).__name__}.load_calibration_config: call compress() first")
        unknown = sorted(set(calibration_config) - set(self.layers))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.load_calibration_config: {unknown} are not quantized by this quantizer; "
                f"allowed: its layers {sorted(self.layers)}"
            )
        for name, record in calibration_config.items():
            layer = self.layers[name]
            for quant_type in layer.config.quant_types:
                low, high = record.get(f"tracked_min_{quant_type}"), record.get(f"tracked_max_{quant_type}")
                tracked = quant_type != "weight" and tracks_activation_range(layer.config.specs[quant_type])
                if tracked and low is not None and high is not None:
                    self.set_activation_range(layer, quant_type, torch.tensor(float(low)), torch.tensor(float(high)))

    def set_activation_range(
        self, layer: QuantizedLayer, quant_type: str, low: torch.Tensor, high: torch.Tensor
    ) -> None:
        """Makes ``[low, high]`` the tracked range of ``layer``'s input or output, with the scale and zero point
        that follow (docs/numerics.md, Choosing scale and zero point), as if it had been observed: what
        calibration and loaded records set."""
        spec = layer.config.specs[quant_type]
        tracked = layer.buffer(quant_type + "_range")
        tracked.copy_(torch.stack([low, high]).to(tracked))
        if isinstance(spec, FloatSpec):
            layer.buffer(quant_type + "_scale").copy_(spec.scale_from_range(tracked[0], tracked[1]))
        else:
            scale, zero_point = choose_qparams(tracked[0], tracked[1], spec.quant_min, spec.quant_max, spec.symmetric)
            layer.buffer(quant_type + "_scale").copy_(scale)
            layer.buffer(quant_type + "_zero_point").copy_(zero_point)
        layer.buffer(quant_type + "_observed").fill_(1)
        layer.observed[quant_type] = True

    def _fake_quant_activation(
        self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor, relu: bool = False
    ) -> torch.Tensor:
        """Ranges tracked in training mode from step 0; fake quantization from ``quant_start_step`` once a
        range has been observed (an eval pass before any training batch runs in float). With ``relu``, the
        activation is ``relu(x)``, observed and fake-quantized without forming it (the fused op's mask holds
        ReLU's gradient too; integer formats only)."""
        spec = layer.config.specs[quant_type]
        if isinstance(spec, FloatSpec):
            return self._fake_quant_float_activation(layer, quant_type, x)
        if layer.module.training:
            with torch.no_grad():
                self._observe(layer, quant_type, x, relu)
        if not (layer.active() and layer.observed[quant_type]):
            return torch.relu(x) if relu else x
        return fake_quant_per_tensor(
            x,
            # .float(): model.half() casts float buffers too, and the ops take fp32 scales (no copy if fp32)
            layer.buffer(quant_type + "_scale").float(), layer.buffer(quant_type + "_zero_point"),
            spec.quant_min, spec.quant_max, relu=relu,
        )

    def _fake_quant_float_activation(self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor) -> torch.Tensor:
        """A float format: a per-tensor scale (FP8 per tensor, NVFP4's second level) from the tracked range, as an
        integer one (observed in training, used once observed); the block scales computed by the op from ``x``,
        from ``quant_start_step`` on."""
        spec = layer.config.specs[quant_type]
        scale = None
        if spec.has_tensor_scale:
            if layer.module.training:
                with torch.no_grad():
                    self._observe(layer, quant_type, x)
            if not layer.observed[quant_type]:
                return x
            # .float(): model.half() casts float buffers too, and the ops take fp32 scales (no copy if fp32)
            scale = layer.buffer(quant_type + "_scale").float()
        if not layer.active():
            return x
        check_activation_blocks(layer.config, layer.name, quant_type, x)
        return spec.fake_quant(x, scale)

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        if quant_type == "weight":
            return super().onnx_qdq(layer, quant_type)
        spec = layer.config.specs[quant_type]
        if isinstance(spec, FloatSpec):
            raise float_format_onnx_error(layer, quant_type)
        quant_min, quant_max = onnx_qdq_range(layer.name, quant_type, spec.quant_min, spec.quant_max, constant=False)
        if not (layer.active() and layer.observed[quant_type]):
            return None  # _fake_quant_activation returns x unchanged in eval mode
        return OnnxQDQ(
            scale=layer.buffer(quant_type + "_scale").detach().float().clone(),
            zero_point=layer.buffer(quant_type + "_zero_point").detach().to(torch.int32).clone(),
            quant_min=quant_min,
            quant_max=quant_max,
        )

    def _activation_record(self, layer: QuantizedLayer, quant_type: str) -> dict:
        """The calibration record of an input or output: its format, tracked range, scale and zero point (a float
        format: its format, and the tracked range and scale where it has one per tensor)."""
        spec = layer.config.specs[quant_type]
        record = spec.calibration_record(quant_type)
        if not tracks_activation_range(spec):
            return record
        tracked = layer.buffer(quant_type + "_range").detach().cpu()
        observed = layer.observed[quant_type]
        record.update({
            f"tracked_min_{quant_type}": float(tracked[0]) if observed else None,
            f"tracked_max_{quant_type}": float(tracked[1]) if observed else None,
            f"{quant_type}_scale": layer.buffer(quant_type + "_scale").detach().cpu().clone(),
        })
        if not isinstance(spec, FloatSpec):
            record[f"{quant_type}_zero_point"] = layer.buffer(quant_type + "_zero_point").detach().cpu().clone()
        return record

