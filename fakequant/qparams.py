"""Quantization parameters: integer ranges, granularities and scale/zero-point selection (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PerTensor", "PerChannel", "PerGroup", "Granularity", "QuantSpec", "quant_range", "choose_qparams"]


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor.

    Example:
        >>> PerTensor()
        PerTensor()
    """


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per slice along ``axis``.

    Args:
        axis: the channel dimension (0 for conv and linear weights).

    Example:
        >>> PerChannel(axis=0)
        PerChannel(axis=0)
    """

    axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ValueError(f"PerChannel: axis must be an int, got {self.axis!r}")


@dataclass(frozen=True)
class PerGroup:
    """One scale and zero point per group of ``group_size`` consecutive input channels of each output channel:
    weights of Linear (``[out, in]``) and 1x1 Conv (``[out, in, 1, 1]``) layers, scales shaped
    ``[out, in / group_size]`` (the LLM practice of 32 to 256).

    Args:
        group_size: input channels per group; must divide the layer's input channels.

    Example:
        >>> PerGroup(32)
        PerGroup(group_size=32)
    """

    group_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"PerGroup: group_size must be an int >= 1, got {self.group_size!r}")


Granularity = PerTensor | PerChannel | PerGroup


def quant_range(bits: int, signed: bool = True, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range ``(quant_min, quant_max)`` of a ``bits``-wide integer.

    Args:
        bits: width in bits, 1 to 16 (2 to 16 with ``narrow_range``).
        signed: ``[-2^(b-1), 2^(b-1) - 1]`` if True, else ``[0, 2^b - 1]``.
        narrow_range: drop the most negative signed level (symmetric ``[-2^(b-1) + 1, 2^(b-1) - 1]``).

    Example:
        >>> quant_range(8)
        (-128, 127)
        >>> quant_range(8, signed=False)
        (0, 255)
        >>> quant_range(8, narrow_range=True)
        (-127, 127)
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"quant_range: bits must be an int from 1 to 16, got {bits!r}")
    if narrow_range and not signed:
        raise ValueError("quant_range: narrow_range applies to signed ranges only")
    if narrow_range and bits < 2:
        raise ValueError("quant_range: narrow_range needs at least 2 bits")
    if not signed:
        return 0, (1 << bits) - 1
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return (low + 1 if narrow_range else low), high


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a tracked range, as ``torch.ao.quantization`` observers compute them.

    Zero is forced into the range. Symmetric: ``scale = max(-min, max) / ((qmax - qmin) / 2)`` and the
    zero point is 0 for a signed range, ``(qmin + qmax + 1) // 2`` for an unsigned one. Affine:
    ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.
    The scale is at least ``finfo(float32).eps``, so an all-zero tensor gives a finite result.

    Args:
        min_val: tracked minimum, a scalar (per tensor) or a 1-D tensor (per channel).
        max_val: tracked maximum, the same shape as ``min_val``.
        quant_min: lowest integer level.
        quant_max: highest integer level.
        symmetric: symmetric or affine (asymmetric) quantization.

    Returns:
        ``(scale, zero_point)``: fp32 and int32 tensors of ``min_val``'s shape.

    Example:
        >>> scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), -128, 127, symmetric=False)
        >>> round(scale.item(), 6), zp.item()
        (0.015686, -64)
    """
    if quant_min >= quant_max:
        raise ValueError(f"choose_qparams: quant_min ({quant_min}) must be < quant_max ({quant_max})")
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"choose_qparams: min_val {tuple(min_val.shape)} and max_val {tuple(max_val.shape)} differ in shape"
        )
    min_neg = torch.clamp(min_val.float(), max=0.0)
    max_pos = torch.clamp(max_val.float(), min=0.0)
    eps = torch.finfo(torch.float32).eps
    # The divisors are tensors: torch divides a CUDA tensor by a Python float as x * (1 / d) (ATen's
    # div_true_kernel_cuda), which rounds differently from the IEEE division done on CPU and by the kernels.
    if symmetric:
        scale = torch.maximum(-min_neg, max_pos) / torch.full_like(max_pos, (quant_max - quant_min) / 2)
        scale = torch.clamp(scale, min=eps)
        zp_value = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
        zero_point = torch.full_like(scale, zp_value, dtype=torch.int32)
    else:
        scale = (max_pos - min_neg) / torch.full_like(max_pos, float(quant_max - quant_min))
        scale = torch.clamp(scale, min=eps)
        zero_point = quant_min - torch.round(min_neg / scale)
        zero_point = torch.clamp(zero_point, quant_min, quant_max).to(torch.int32)
    return scale, zero_point


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized: width, signedness, symmetry and granularity.

    Args:
        bits: integer width, 1 to 16.
        signed: signed ``[-2^(b-1), 2^(b-1) - 1]`` or unsigned ``[0, 2^b - 1]`` levels.
        symmetric: symmetric (zero point fixed) or affine (zero point from the range).
        narrow_range: drop the most negative signed level.
        granularity: :class:`PerTensor`, :class:`PerChannel` or :class:`PerGroup` (weights only).

    Example:
        >>> spec = QuantSpec(bits=8, granularity=PerChannel(0))
        >>> spec.quant_min, spec.quant_max
        (-128, 127)
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: PerTensor | PerChannel | PerGroup = PerTensor()

    def __post_init__(self) -> None:
        # Validates bits and the flags; kept because the quantizers read both ends on every forward.
        object.__setattr__(self, "_levels", quant_range(self.bits, self.signed, self.narrow_range))
        if not isinstance(self.granularity, (PerTensor, PerChannel, PerGroup)):
            raise ValueError(
                f"QuantSpec: granularity must be PerTensor(), PerChannel(axis) or PerGroup(group_size), got "
                f"{self.granularity!r}"
            )

    @property
    def quant_min(self) -> int:
        return self._levels[0]

    @property
    def quant_max(self) -> int:
        return self._levels[1]
