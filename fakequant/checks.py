"""Argument checks of the ``fakequant::`` ops, shared by every backend.

The reference, the Triton host functions and the fake impls call these; the C++ and CUDA kernels make the same
checks in ``csrc/checks.h`` with ``TORCH_CHECK_VALUE``, so every backend raises ``ValueError`` with the same
wording for the same mistake (docs/numerics.md, Argument checks). The value checks of scales and zero points run
only where they are free, on CPU tensors with values (not on CUDA tensors, where they would cost a
device-to-host sync per call, nor on the fake tensors of tracing).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FLOAT_DTYPES",
    "INT_DTYPES",
    "NVFP4_SMALLEST_PER_TENSOR_SCALE",
    "QUANT_LIMIT",
    "SMALLEST_NORMAL",
    "check_binarize_args",
    "check_bn_fold_args",
    "check_bn_fold_backward_args",
    "check_fake_quant_args",
    "check_fp8_args",
    "check_mx_args",
    "check_nvfp4_args",
    "fp8_blocks",
    "check_float_tensor",
    "check_learnable_args",
    "check_learnable_backward_args",
    "check_mask",
    "check_observe_range_args",
    "check_per_group_args",
    "check_qparam_values",
    "normalize_axis",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)
# Every integer level must be exact in fp32, whose 24-bit significand holds integers up to 2^24.
QUANT_LIMIT = 1 << 24
# The smallest scale the ops accept: the smallest normal fp32, 2^-126 (a subnormal one has an infinite reciprocal).
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def check_float_tensor(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"fakequant: {name} has dtype {x.dtype}; allowed: float32, float16, bfloat16")


def _check_range(quant_min: int, quant_max: int) -> None:
    if quant_min > quant_max:
        raise ValueError(
            f"fakequant: quant_min ({quant_min}) must be <= quant_max ({quant_max})"
        )
    if quant_min < -QUANT_LIMIT or quant_max > QUANT_LIMIT:
        raise ValueError(
            f"fakequant: quant range [{quant_min}, {quant_max}] must lie within "
            f"[-2^24, 2^24] so that every level is exact in fp32"
        )


def normalize_axis(axis: int, ndim: int) -> int:
    """Returns ``axis`` in ``[0, ndim)`` or raises ``ValueError``."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"fakequant: axis {axis} is out of range for a tensor with {ndim} dimensions "
            f"(allowed: {-ndim} to {ndim - 1})"
        )
    return axis % ndim


def _check_zero_point_dtype(zero_point: torch.Tensor, learned: bool = False) -> None:
    """int32/int64; ``learned``: also float32 (a learned zero point, rounded and clamped by the learnable ops)."""
    if zero_point.dtype in INT_DTYPES or (learned and zero_point.dtype == torch.float32):
        return
    allowed = "int32, int64, float32" if learned else "int32, int64"
    raise ValueError(f"fakequant: zero_point has dtype {zero_point.dtype}; allowed: {allowed}")


def _check_qparam_shapes(scale: torch.Tensor, zero_point: torch.Tensor, channels: int | None) -> None:
    """One element each per tensor (``channels`` None), else 1-D with ``channels`` elements."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if channels is None and t.numel() != 1:
            raise ValueError(
                f"fakequant: per-tensor {name} must have exactly one element, got shape {tuple(t.shape)}"
            )
        if channels is not None and (t.dim() != 1 or t.numel() != channels):
            raise ValueError(
                f"fakequant: per-channel {name} must be 1-D with {channels} elements "
                f"(the size of the quantized axis), got shape {tuple(t.shape)}"
            )


def _check_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    channels: int | None,
    check_values: bool,
    learned_zero_point: bool = False,
) -> None:
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t.device != x.device:
            raise ValueError(
                f"fakequant: {name} is on {t.device} but x is on {x.device}; they must be on the same device"
            )
    if scale.dtype != torch.float32:
        raise ValueError(f"fakequant: scale has dtype {scale.dtype}; allowed: float32")
    _check_zero_point_dtype(zero_point, learned_zero_point)
    _check_qparam_shapes(scale, zero_point, channels)
    if check_values:
        check_qparam_values(scale, zero_point, quant_min, quant_max)


def check_qparam_values(scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int) -> None:
    # Value checks are free on CPU tensors; on a GPU they would cost a device-to-host sync on every
    # call, so there the quantizers (which compute the values) guarantee them instead. Fake tensors
    # (tracing, compile) have no values to check. A float (learned) zero point is clamped into the range by the
    # learnable ops, not checked against it.
    # A subnormal scale is positive but its fp32 reciprocal is inf, which would turn 0 into NaN.
    _check_scale_values(scale, "scale")
    if zero_point.device.type == "cpu" and zero_point.numel() > 0 and not zero_point.is_floating_point():
        bad = (zero_point < quant_min) | (zero_point > quant_max)
        if bool(bad.any()):
            value = zero_point[bad].flatten()[0].item()
            raise ValueError(
                f"fakequant: zero_point {value} is outside [quant_min, quant_max] = [{quant_min}, {quant_max}]"
            )


def check_fake_quant_args(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    check_values: bool = True,
    learned_zero_point: bool = False,
) -> int | None:
    """Validates fake-quant arguments; returns the normalized axis (None for per-tensor). ``learned_zero_point``
    also accepts a float32 zero point (the learnable ops')."""
    check_float_tensor(x)
    _check_range(quant_min, quant_max)
    channels = None
    if axis is not None:
        axis = normalize_axis(axis, x.dim())
        channels = x.size(axis)
    _check_qparams(x, scale, zero_point, quant_min, quant_max, channels, check_values, learned_zero_point)
    return axis


def check_binarize_args(x: torch.Tensor) -> None:
    check_float_tensor(x)


def check_bn_fold_args(
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    check_values: bool = True,
) -> None:
    check_float_tensor(weight, "weight")
    if weight.dim() < 1:
        raise ValueError("fakequant: weight must have at least one dimension (output channels first)")
    channels = weight.size(0)
    for name, t in (("gamma", gamma), ("var", var)):
        if t.device != weight.device:
            raise ValueError(
                f"fakequant: {name} is on {t.device} but weight is on {weight.device}; "
                "they must be on the same device"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"fakequant: {name} has dtype {t.dtype}; allowed: float32, float16, bfloat16")
        if t.dim() != 1 or t.numel() != channels:
            raise ValueError(
                f"fakequant: {name} must be 1-D with {channels} elements (weight.size(0)), "
                f"got shape {tuple(t.shape)}"
            )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"fakequant: eps must be finite and >= 0, got {eps}")
    _check_range(quant_min, quant_max)
    _check_qparams(weight, scale, zero_point, quant_min, quant_max, channels, check_values)


def check_bn_fold_backward_args(
    grad: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    check_values: bool = True,
) -> None:
    """:func:`check_bn_fold_args` (the backward recomputes the forward) and ``grad`` against ``weight``; the values
    of the qparams last, as the kernels check them."""
    check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=False)
    check_float_tensor(grad, "grad")
    if grad.device != weight.device:
        raise ValueError(
            f"fakequant: grad is on {grad.device} but weight is on {weight.device}; they must be on the same device"
        )
    if grad.shape != weight.shape:
        raise ValueError(
            f"fakequant: grad must have the weight's shape {tuple(weight.shape)}, got shape {tuple(grad.shape)}"
        )
    if check_values:
        check_qparam_values(scale, zero_point, quant_min, quant_max)


def check_per_group_args(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int) -> int:
    """Checks the per-group layout; returns the number of groups per output channel."""
    check_float_tensor(x)
    if x.dim() < 2 or math.prod(x.shape[2:]) != 1:
        raise ValueError(
            f"fakequant: per-group fake quantization takes a Linear [out, in] or 1x1 Conv [out, in, 1, 1] weight, "
            f"got shape {tuple(x.shape)}"
        )
    if not isinstance(group_size, int) or group_size < 1 or x.size(1) % group_size != 0:
        raise ValueError(
            f"fakequant: group_size {group_size} does not divide the {x.size(1)} input channels of the weight; "
            "allowed: a divisor of the input channels (e.g. 32, 64, 128)"
        )
    groups = x.size(1) // group_size
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != (x.size(0), groups):
            raise ValueError(
                f"fakequant: per-group {name} must have shape {(x.size(0), groups)} (out, in / group_size), got "
                f"{tuple(t.shape)}"
            )
    return groups


def check_learnable_args(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
    check_values: bool = True,
) -> int | None:
    """Validates the learnable ops' arguments; returns the normalized axis (None per tensor).

    ``zero_point`` may be float32 (a learned zero point): it is rounded half to even and clamped to
    ``[quant_min, quant_max]``, as ``torch._fake_quantize_learnable_*`` do; an integer one must lie in the range.
    """
    axis = check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis, check_values=False,
                                 learned_zero_point=True)
    if not math.isfinite(grad_factor):
        raise ValueError(f"fakequant: grad_factor must be finite, got {grad_factor}")
    if check_values:
        check_qparam_values(scale, zero_point, quant_min, quant_max)
    return axis


def check_learnable_backward_args(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor,
                                  check_values: bool = True) -> int | None:  # fmt: skip
    axis = check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values)
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(
            f"fakequant: grad must match x (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}); got shape "
            f"{tuple(grad.shape)}, dtype {grad.dtype}, device {grad.device}"
        )
    return axis


def check_observe_range_args(
    x: torch.Tensor,
    tracked_range: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    averaging_constant: float,
    quant_min: int,
    quant_max: int,
    fold: torch.Tensor | None = None,
) -> int | None:
    """Checks the arguments of :func:`observe_range`; returns the normalized axis (None: per tensor)."""
    check_float_tensor(x)
    if x.numel() == 0:
        raise ValueError(f"fakequant: cannot observe the range of an empty tensor (x has shape {tuple(x.shape)})")
    _check_range(quant_min, quant_max)
    if quant_min == quant_max:
        raise ValueError(f"fakequant: choosing a scale needs quant_min < quant_max, got {quant_min} == {quant_max}")
    if not (math.isfinite(averaging_constant) and 0.0 < averaging_constant <= 1.0):
        raise ValueError(
            f"fakequant: averaging_constant must be in (0, 1] (1 replaces the tracked range), got {averaging_constant}"
        )
    if axis is not None:
        axis = normalize_axis(axis, x.dim())
    channels = 1 if axis is None else x.size(axis)
    state = [("tracked_range", tracked_range), ("scale", scale), ("zero_point", zero_point)]
    if fold is not None:
        state.append(("fold", fold))
    for name, t in state:
        if t.device != x.device:
            raise ValueError(
                f"fakequant: {name} is on {t.device} but x is on {x.device}; they must be on the same device"
            )
    check_float_tensor(tracked_range, "tracked_range")
    check_float_tensor(scale, "scale")
    _check_zero_point_dtype(zero_point)
    range_shape = (2,) if axis is None else (2, channels)
    if tuple(tracked_range.shape) != range_shape:
        raise ValueError(
            f"fakequant: tracked_range must have shape {range_shape} ([min, max]"
            f"{'' if axis is None else ' per channel'}), got {tuple(tracked_range.shape)}"
        )
    _check_qparam_shapes(scale, zero_point, None if axis is None else channels)
    if fold is not None:
        if axis not in (None, 0):
            raise ValueError(f"fakequant: a fold factor applies along axis 0; allowed axis: None or 0, got {axis}")
        if fold.dtype != torch.float32 or fold.dim() != 1 or fold.numel() != x.size(0):
            raise ValueError(
                f"fakequant: fold must be a 1-D float32 tensor with {x.size(0)} elements (x.size(0)), got "
                f"{fold.dtype} of shape {tuple(fold.shape)}"
            )
    return axis


def check_mask(grad: torch.Tensor, mask: torch.Tensor) -> None:
    """The straight-through backward's mask: bool, in the gradient's shape."""
    if mask.shape != grad.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"fakequant: mask must be a bool tensor of the gradient's shape {tuple(grad.shape)}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Float formats (fakequant/ops/float_formats.py)
# ---------------------------------------------------------------------------------------------


# NVFP4's elements are multiplied by (1 / per_tensor_scale) / block_scale, block_scale >= 2^-6: finite only when
# per_tensor_scale >= 2^-121; its floor is 2^-120.
NVFP4_SMALLEST_PER_TENSOR_SCALE = 2.0**-120


def _check_scale_values(scale: torch.Tensor, name: str) -> None:
    if scale.device.type == "cpu" and scale.numel() > 0:
        if name == "per_tensor_scale":
            smallest, rule = NVFP4_SMALLEST_PER_TENSOR_SCALE, "2^-120 ((1 / per_tensor_scale) / block_scale overflows"
        else:
            smallest, rule = SMALLEST_NORMAL, "2^-126 (the smallest normal float32; 1 / scale overflows"
        bad = ~(torch.isfinite(scale) & (scale >= smallest))
        if bool(bad.any()):
            value = scale[bad].flatten()[0].item()
            raise ValueError(f"fakequant: {name} must be finite and >= {rule} below it), got {value}")


def _check_float_scale(x: torch.Tensor, scale: torch.Tensor, name: str, numel: int, check_values: bool) -> None:
    if scale.device != x.device:
        raise ValueError(
            f"fakequant: {name} is on {scale.device} but x is on {x.device}; they must be on the same device"
        )
    if scale.dtype != torch.float32:
        raise ValueError(f"fakequant: {name} has dtype {scale.dtype}; allowed: float32")
    if scale.numel() != numel:
        raise ValueError(
            f"fakequant: {name} must have {numel} elements (one per block), got shape {tuple(scale.shape)}"
        )
    if check_values:
        _check_scale_values(scale, name)


def fp8_blocks(x: torch.Tensor, block_size: int) -> tuple[int, int]:
    """``(blocks, block_size)`` of ``x`` for a float op's ``block_size`` (0: the whole tensor is one block)."""
    if block_size < 0:
        raise ValueError(f"fakequant: block_size must be >= 0 (0: one scale for the whole tensor), got {block_size}")
    numel = x.numel()
    if block_size == 0:
        return 1, numel
    last = x.size(-1) if x.dim() > 0 else 1
    fits = (last > 0 and last % block_size == 0) or (last > 0 and block_size % last == 0 and numel % block_size == 0)
    if numel > 0 and not fits:
        raise ValueError(
            f"fakequant: block_size {block_size} must divide the last dimension of x (shape {tuple(x.shape)}) or be "
            "a multiple of it that divides x.numel(): a block is block_size consecutive elements of one row, or "
            "whole rows"
        )
    return numel // block_size, block_size


def check_fp8_args(x: torch.Tensor, scale: torch.Tensor | None, fmt: str, block_size: int,
                   check_values: bool = True) -> tuple[int, int]:
    """Validates ``fake_quant_fp8``'s arguments; returns ``(blocks, block_size)``."""
    from fakequant.formats import FP8_FORMATS, element_format

    check_float_tensor(x)
    element_format(fmt, FP8_FORMATS)
    blocks, size = fp8_blocks(x, block_size)
    if scale is not None:
        _check_float_scale(x, scale, "scale", blocks, check_values)
    return blocks, size


def check_last_dim_blocks(x: torch.Tensor, block_size: int, what: str) -> None:
    if block_size <= 0:
        raise ValueError(f"fakequant: {what} block_size must be > 0, got {block_size}")
    if x.dim() == 0 or x.size(-1) % block_size != 0:
        raise ValueError(
            f"fakequant: {what} blocks run along the last dimension, whose size must be a multiple of block_size "
            f"{block_size}; x has shape {tuple(x.shape)}"
        )


def check_mx_args(x: torch.Tensor, elem: str, block_size: int, scale_mode: str) -> None:
    from fakequant.formats import MX_ELEMENTS, MX_SCALE_MODES, element_format

    check_float_tensor(x)
    element_format(elem, MX_ELEMENTS, "elem")
    if scale_mode not in MX_SCALE_MODES:
        raise ValueError(f"fakequant: scale_mode {scale_mode!r} is not supported; allowed: {', '.join(MX_SCALE_MODES)}")
    check_last_dim_blocks(x, block_size, "MX")


def check_nvfp4_args(x: torch.Tensor, per_tensor_scale: torch.Tensor | None, block_size: int,
                     check_values: bool = True) -> None:
    check_float_tensor(x)
    check_last_dim_blocks(x, block_size, "NVFP4")
    if per_tensor_scale is not None:
        _check_float_scale(x, per_tensor_scale, "per_tensor_scale", 1, check_values)
