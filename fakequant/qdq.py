"""How a quantizer describes one fake-quantized tensor to the ONNX exporter: an :class:`OnnxQDQ`.

The quantizers build these (``Quantizer.onnx_qdq``) and :mod:`fakequant.onnx_export` turns them into
QuantizeLinear -> DequantizeLinear pairs. Kept apart from the exporter so that the quantizers depend on this
small description only, and the exporter on the quantizers not at all (it takes any object with the
attributes of :class:`fakequant.onnx_export.ExportableQuantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OnnxQDQ", "onnx_qdq_range", "INT8_RANGE", "UINT8_RANGE"]

#: the integer range of ONNX's int8 QuantizeLinear output
INT8_RANGE = (-128, 127)
#: the integer range of ONNX's uint8 QuantizeLinear output
UINT8_RANGE = (0, 255)

@dataclass
class OnnxQDQ:
    """One fake-quantized tensor as ONNX QuantizeLinear -> DequantizeLinear.

    Attributes:
        scale: fp32, 0-d (per tensor) or 1-D (per channel).
        zero_point: int32, the shape of ``scale``.
        quant_min: -128 (int8) or 0 (uint8): the ONNX integer type.
        quant_max: 127 or 255.
        axis: the channel axis of a per-channel weight; None per tensor.
        tensor: for a weight, the weight as the eval forward computes it (fake-quantized, on the grid).
        bias: for a BN-folded conv, the folded bias that goes with ``tensor``.

    Example:
        >>> qdq = OnnxQDQ(torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -128, 127)
        >>> qdq.apply(torch.tensor([0.04, 0.26]))
        tensor([0.0000, 0.3000])
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None = None
    tensor: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the torch op that the ONNX exporter maps to QuantizeLinear -> DequantizeLinear."""
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min,
                                                         self.quant_max)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.quant_min,
                                                      self.quant_max)

    def named_tensors(self, quant_type: str) -> dict[str, torch.Tensor]:
        """The constants by the attribute name they get on their module during the export."""
        named = {f"{quant_type}_scale": self.scale, f"{quant_type}_zero_point": self.zero_point}
        if self.tensor is not None:
            named[quant_type] = self.tensor
        if self.bias is not None:
            named["bias"] = self.bias
        return named


def onnx_qdq_range(layer_name: str, quant_type: str, quant_min: int, quant_max: int, *,
                   constant: bool) -> tuple[int, int]:
    """The ONNX 8-bit range that exports a tensor fake-quantized to ``[quant_min, quant_max]`` exactly.

    Args:
        layer_name: for the error message.
        quant_type: ``'weight'``, ``'input'`` or ``'output'``, for the error message.
        quant_min: the layer's lowest integer level.
        quant_max: the layer's highest integer level.
        constant: True for a weight exported already fake-quantized (a range inside int8/uint8 is exact),
            False for an activation (Q/DQ must do the clamping: only the full int8/uint8 ranges).

    Returns:
        ``(-128, 127)`` (int8) or ``(0, 255)`` (uint8).

    Raises:
        ValueError: the range has no exact Q/DQ form.

    Example:
        >>> onnx_qdq_range("fc", "weight", -127, 127, constant=True)
        (-128, 127)
        >>> onnx_qdq_range("fc", "weight", 0, 15, constant=True)
        (0, 255)
    """
    if (quant_min, quant_max) in (INT8_RANGE, UINT8_RANGE):
        return quant_min, quant_max
    if constant and UINT8_RANGE[0] <= quant_min and quant_max <= UINT8_RANGE[1]:
        return UINT8_RANGE
    if constant and INT8_RANGE[0] <= quant_min and quant_max <= INT8_RANGE[1]:
        return INT8_RANGE
    allowed = (
        "any range inside int8 [-128, 127] or uint8 [0, 255] (the weight is exported already fake-quantized)"
        if constant else
        "exactly int8 [-128, 127] or uint8 [0, 255] (QuantizeLinear saturates to the 8-bit type's range, it "
        "cannot clamp to a narrower one); quantize activations with 8 bits"
    )
    raise ValueError(
        f"layer {layer_name!r} {quant_type}: the range [{quant_min}, {quant_max}] has no ONNX "
        f"QuantizeLinear/DequantizeLinear form; allowed for {'weights' if constant else 'inputs/outputs'}: "
        f"{allowed}"
    )
