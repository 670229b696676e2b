"""Quantization parameters: integer ranges, granularities, format specs and scale/zero-point selection.

The rules are those of docs/numerics.md, Integer ranges and Choosing scale and zero point; the float formats'
(:class:`FloatSpec`) those of its Float formats and Quantizers and config_list.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fakequant.formats import ELEMENT_FORMATS, ElementFormat

__all__ = [
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerBlock",
    "FormatSpec",
    "QuantSpec",
    "FloatSpec",
    "FLOAT_QUANT_DTYPES",
    "quant_range",
    "choose_qparams",
]


@dataclass(frozen=True)
class Granularity(abc.ABC):
    """Which elements of a tensor share one scale and zero point: the base of :class:`PerTensor`,
    :class:`PerChannel` and :class:`PerGroup`.

    Callers read the attributes below instead of testing the class. A new granularity (per block of a 2-D weight,
    per token of an activation) is one more frozen-dataclass subclass that sets them and implements
    :meth:`scale_shape`; the quantizers that accept it then branch on what it declares.

    Attributes:
        axis: the channel axis of per-channel scales; None for the granularities without one.
        group_size: consecutive input channels per scale; None unless per group.
        config_name: the class's name in a config_list and in messages (``'per_tensor'``, ...).

    Example:
        >>> [(g.config_name, g.axis, g.group_size) for g in (PerTensor(), PerChannel(0), PerGroup(32))]
        [('per_tensor', None, None), ('per_channel', 0, None), ('per_group', None, 32)]
    """

    # Class-level defaults that a subclass's dataclass field of the same name overrides per instance.
    axis: ClassVar[int | None] = None
    group_size: ClassVar[int | None] = None
    config_name: ClassVar[str]

    def axis_for(self, ndim: int) -> int | None:
        """:attr:`axis` as a non-negative index into a tensor of ``ndim`` dimensions, or None without an axis.

        Example:
            >>> PerChannel(-1).axis_for(4), PerTensor().axis_for(4)
            (3, None)
        """
        return None if self.axis is None else self.axis % ndim

    @abc.abstractmethod
    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the scale and zero point of a tensor of shape ``shape`` (``()`` for one per tensor).

        Example:
            >>> PerTensor().scale_shape((8, 64)), PerChannel(0).scale_shape((8, 64)), PerGroup(32).scale_shape((8, 64))
            ((), (8,), (8, 2))
        """


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale and zero point for the whole tensor.

    Example:
        >>> PerTensor()
        PerTensor()
    """

    config_name: ClassVar[str] = "per_tensor"

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale and zero point per slice along ``axis``.

    Args:
        axis: the channel dimension (0 for conv and linear weights).

    Example:
        >>> PerChannel(axis=0)
        PerChannel(axis=0)
    """

    axis: int = 0
    config_name: ClassVar[str] = "per_channel"

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ValueError(f"PerChannel: axis must be an int, got {self.axis!r}")

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (shape[self.axis],)


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale and zero point per group of ``group_size`` consecutive input channels of each output channel:
    weights of Linear (``[out, in]``) and 1x1 Conv (``[out, in, 1, 1]``) layers, scales shaped
    ``[out, in / group_size]`` (the LLM practice of 32 to 256).

    Args:
        group_size: input channels per group; must divide the layer's input channels.

    Example:
        >>> PerGroup(32)
        PerGroup(group_size=32)
    """

    # field(): without it the dataclass would take the base's class-level None as this field's default.
    group_size: int = field()
    config_name: ClassVar[str] = "per_group"

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"PerGroup: group_size must be an int >= 1, got {self.group_size!r}")

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (shape[0], shape[1] // self.group_size)


@dataclass(frozen=True)
class PerBlock(Granularity):
    """One scale per block of ``block_size`` consecutive elements along dimension ``dim``: the float formats'
    blocks (MX, NVFP4 and block-scaled FP8, :class:`FloatSpec`), their scales computed in the kernel from each
    block. Activations are blocked along their last dimension; a weight along its input channels (dimension 1, 0
    for ConvTranspose), which the quantizers set when they resolve a config_list.

    Args:
        block_size: elements per block; must divide the size of ``dim``.
        dim: the dimension the blocks run along.

    Example:
        >>> PerBlock(32), PerBlock(16).scale_shape((8, 64))
        (PerBlock(block_size=32, dim=-1), (8, 4))
    """

    # field(): without it the dataclass would take a class-level default of the base.
    block_size: int = field()
    dim: int = -1
    config_name: ClassVar[str] = "per_block"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"PerBlock: block_size must be an int >= 1, got {self.block_size!r}")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise ValueError(f"PerBlock: dim must be an int, got {self.dim!r}")

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        dim = self.dim % len(shape)
        return (*shape[:dim], shape[dim] // self.block_size, *shape[dim + 1 :])


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


class FormatSpec(abc.ABC):
    """How one tensor is fake-quantized: the base of the number-format specs.

    :class:`QuantSpec` (integer levels with a scale and zero point) and :class:`FloatSpec` (FP8, MX and NVFP4
    elements with their scales) are the two. Subclasses are frozen dataclasses with (at least) the fields ``bits`` (the
    stored width) and ``granularity`` (a :class:`Granularity`), and describe themselves in calibration records
    through :meth:`calibration_record`. What only one format has (``quant_min``/``quant_max`` of the integer
    levels) stays on that format's class.

    Example:
        >>> spec = QuantSpec(bits=4, granularity=PerChannel(0))
        >>> isinstance(spec, FormatSpec), spec.bits, spec.granularity
        (True, 4, PerChannel(axis=0))
    """

    bits: int
    granularity: Granularity

    @abc.abstractmethod
    def calibration_record(self, prefix: str) -> dict:
        """The fields that describe the format in a calibration record, their keys starting with ``prefix``
        (the quant type: ``'weight'``, ``'input'``, ``'output'``)."""


@dataclass(frozen=True)
class QuantSpec(FormatSpec):
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
    granularity: Granularity = PerTensor()

    def __post_init__(self) -> None:
        # Validates bits and the flags; kept because the quantizers read both ends on every forward.
        object.__setattr__(self, "_levels", quant_range(self.bits, self.signed, self.narrow_range))
        if not isinstance(self.granularity, Granularity) or isinstance(self.granularity, PerBlock):
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

    def calibration_record(self, prefix: str) -> dict:
        """``<prefix>_bits``, ``_quant_min``, ``_quant_max``, ``_symmetric`` and, with a channel axis, ``_axis``.

        Example:
            >>> QuantSpec(bits=8, signed=False, symmetric=False).calibration_record("input")
            {'input_bits': 8, 'input_quant_min': 0, 'input_quant_max': 255, 'input_symmetric': False}
        """
        record = {
            f"{prefix}_bits": self.bits,
            f"{prefix}_quant_min": self.quant_min,
            f"{prefix}_quant_max": self.quant_max,
            f"{prefix}_symmetric": self.symmetric,
        }
        if self.granularity.axis is not None:
            record[f"{prefix}_axis"] = self.granularity.axis
        return record


# quant_dtype -> (kind, element format of fakequant.formats, width in bits). Kinds: "fp8" (one scale per tensor,
# channel or block), "mx" (an E8M0 power-of-two scale per block), "nvfp4" (E2M1 elements, an E4M3 scale per block and
# one fp32 scale per tensor).
FLOAT_QUANT_DTYPES: dict[str, tuple[str, str, int]] = {
    "fp8_e4m3": ("fp8", "e4m3", 8),
    "fp8_e5m2": ("fp8", "e5m2", 8),
    "mxfp8_e4m3": ("mx", "e4m3", 8),
    "mxfp8_e5m2": ("mx", "e5m2", 8),
    "mxfp6_e3m2": ("mx", "e3m2", 6),
    "mxfp6_e2m3": ("mx", "e2m3", 6),
    "mxfp4": ("mx", "e2m1", 4),
    "mxint8": ("mx", "int8", 8),
    "nvfp4": ("nvfp4", "e2m1", 4),
}
# The block sizes of the OCP MX spec and of NVFP4.
_DEFAULT_BLOCK_SIZES = {"mx": 32, "nvfp4": 16}


@dataclass(frozen=True)
class FloatSpec(FormatSpec):
    """How one tensor is fake-quantized to a float format: FP8, MX or NVFP4 (the sibling of :class:`QuantSpec`).

    The format fixes the width (:attr:`bits`) and the element grid; the spec adds where the scales apply:

    * FP8 (``'fp8_e4m3'``, ``'fp8_e5m2'``): ``PerTensor()`` (the default), ``PerChannel(axis)`` (weights) or
      ``PerBlock(n)``; a scale given to :meth:`fake_quant` (a tracked activation scale) or computed in the op from
      each tensor, channel or block's absolute maximum.
    * MX (``'mxfp8_e4m3'``, ``'mxfp8_e5m2'``, ``'mxfp6_e3m2'``, ``'mxfp6_e2m3'``, ``'mxfp4'``, ``'mxint8'``):
      ``PerBlock(n)``, 32 by default; the E8M0 scale of each block computed in the op.
    * NVFP4 (``'nvfp4'``): ``PerBlock(n)``, 16 by default; the E4M3 block scales computed in the op, the
      per-tensor scale given (a tracked activation scale) or computed from the tensor.

    Args:
        quant_dtype: one of :data:`FLOAT_QUANT_DTYPES`.
        granularity: as above; None for the format's default.

    Attributes:
        bits: the element width the format fixes (8, 6 or 4).

    Example:
        >>> spec = FloatSpec("mxfp4")
        >>> spec.bits, spec.kind, spec.granularity
        (4, 'mx', PerBlock(block_size=32, dim=-1))
        >>> FloatSpec("fp8_e4m3", PerChannel(0)).calibration_record("weight")
        {'weight_bits': 8, 'weight_quant_dtype': 'fp8_e4m3', 'weight_axis': 0}
    """

    quant_dtype: str = "fp8_e4m3"
    granularity: Granularity | None = None
    bits: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.quant_dtype, str) or self.quant_dtype not in FLOAT_QUANT_DTYPES:
            raise ValueError(
                f"FloatSpec: quant_dtype must be one of {list(FLOAT_QUANT_DTYPES)}, got {self.quant_dtype!r}"
            )
        kind, _, bits = FLOAT_QUANT_DTYPES[self.quant_dtype]
        object.__setattr__(self, "bits", bits)
        granularity = self.granularity
        if granularity is None:
            granularity = PerTensor() if kind == "fp8" else PerBlock(_DEFAULT_BLOCK_SIZES[kind])
        if kind == "fp8" and not isinstance(granularity, (PerTensor, PerChannel, PerBlock)):
            raise ValueError(f"FloatSpec: {self.quant_dtype!r} takes PerTensor(), PerChannel(axis) or PerBlock(n), got "
                             f"{granularity!r}")
        if kind != "fp8" and not isinstance(granularity, PerBlock):
            raise ValueError(f"FloatSpec: {self.quant_dtype!r} scales each block: its granularity is PerBlock(n), got "
                             f"{granularity!r}")
        object.__setattr__(self, "granularity", granularity)

    @property
    def kind(self) -> str:
        """``'fp8'``, ``'mx'`` or ``'nvfp4'``."""
        return FLOAT_QUANT_DTYPES[self.quant_dtype][0]

    @property
    def element(self) -> ElementFormat:
        """The element format (:data:`fakequant.formats.ELEMENT_FORMATS`)."""
        return ELEMENT_FORMATS[FLOAT_QUANT_DTYPES[self.quant_dtype][1]]

    @property
    def default_block_size(self) -> int | None:
        """The format's block size when a config gives none (None for FP8: one scale per tensor)."""
        return _DEFAULT_BLOCK_SIZES.get(self.kind)

    @property
    def has_tensor_scale(self) -> bool:
        """Whether one scale covers the whole tensor (FP8 per tensor; NVFP4's second level): what a quantizer
        tracks for an activation, as it tracks an integer range."""
        return self.kind == "nvfp4" or (self.kind == "fp8" and isinstance(self.granularity, PerTensor))

    def scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale (fp32, ``amax``'s shape) that an absolute maximum gives, as the ops compute it:
        FP8 ``amax / max`` (:func:`fakequant.reference.fp8_scale_from_amax`), NVFP4 ``amax / (6 * 448)``
        (:func:`fakequant.reference.nvfp4_per_tensor_scale`).

        Example:
            >>> FloatSpec("fp8_e4m3").scale_from_amax(torch.tensor(896.0))
            tensor(2.)
        """
        from fakequant import reference  # not at the top: reference imports this module

        amax = amax.float()
        if self.kind == "nvfp4":
            return reference.nvfp4_per_tensor_scale(amax).reshape(amax.shape)
        return reference.fp8_scale_from_amax(amax, self.element)

    def scale_from_range(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """:meth:`scale_from_amax` of ``max(-low, high)``: the scale of a tracked ``[min, max]`` range."""
        return self.scale_from_amax(torch.maximum(-low.float(), high.float()))

    def tensor_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scale the op computes from ``x`` when given none (a weight's, for its calibration record): FP8 per
        tensor (``()``) or per channel (``[C]``), NVFP4's per-tensor scale (``()``); None for MX and FP8 blocks,
        whose scales are per block."""
        x = x.detach()
        if self.kind == "nvfp4":
            return self.scale_from_amax(x.abs().amax())
        if isinstance(self.granularity, PerTensor):
            return self.scale_from_amax(x.abs().amax())
        if isinstance(self.granularity, PerChannel):
            axis = self.granularity.axis_for(x.dim())
            return self.scale_from_amax(x.abs().movedim(axis, 0).reshape(x.size(axis), -1).amax(1))
        return None

    def fake_quant(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, mask_saturated: bool = True
    ) -> torch.Tensor:
        """``x`` fake-quantized to the format by its public op (:func:`fakequant.fake_quant_fp8`,
        :func:`~fakequant.fake_quant_mx`, :func:`~fakequant.fake_quant_nvfp4`), blocks along the granularity's
        ``dim`` and per-channel scales along its ``axis``.

        Args:
            x: the tensor.
            scale: FP8: the scale (one element per tensor, or per channel), None to compute it in the op from
                ``x``; NVFP4: the per-tensor scale, None to compute it from ``x``; MX: must be None.
            mask_saturated: the straight-through gradient is 0 where the value saturated; False passes it.

        Example:
            >>> FloatSpec("mxfp4", PerBlock(4)).fake_quant(torch.tensor([[0.1, 1.0, 3.0, 5.9]]))
            tensor([[0., 1., 3., 6.]])
        """
        from fakequant.ops.float_formats import fake_quant_fp8, fake_quant_mx, fake_quant_nvfp4  # ops import this

        granularity, element = self.granularity, self.element
        if self.kind == "mx":
            if scale is not None:
                raise ValueError(f"FloatSpec.fake_quant: {self.quant_dtype!r} computes its block scales; got a scale")
            return fake_quant_mx(x, element.name, granularity.block_size, axis=granularity.dim,
                                 mask_saturated=mask_saturated)  # fmt: skip
        # the ops block the last dimension (per channel: whole rows); other dimensions are moved there as views
        source = target = 0
        if isinstance(granularity, PerChannel):
            source = granularity.axis_for(x.dim())
        elif isinstance(granularity, PerBlock):
            source, target = granularity.dim % x.dim(), x.dim() - 1
        moved = x.movedim(source, target) if source != target else x
        if self.kind == "fp8":
            if isinstance(granularity, PerBlock):
                block_size = granularity.block_size
            elif isinstance(granularity, PerChannel) and moved.numel():
                block_size = moved[0].numel()  # whole rows of the channel-first view
            else:
                block_size = 0
            out = fake_quant_fp8(moved, scale, element.name, block_size, mask_saturated)
        else:
            out = fake_quant_nvfp4(moved, scale, block_size=granularity.block_size, mask_saturated=mask_saturated)
        return out.movedim(target, source) if source != target else out

    def calibration_record(self, prefix: str) -> dict:
        """``<prefix>_bits``, ``_quant_dtype`` and, for blocks, ``_block_size``, per channel, ``_axis``."""
        record = {f"{prefix}_bits": self.bits, f"{prefix}_quant_dtype": self.quant_dtype}
        if isinstance(self.granularity, PerBlock):
            record[f"{prefix}_block_size"] = self.granularity.block_size
        if self.granularity.axis is not None:
            record[f"{prefix}_axis"] = self.granularity.axis
        return record
