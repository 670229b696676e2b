"""Triton kernels for every ``fakequant::`` op.

Each op is laid out the same way: a ``_<op>_kernel`` (``@triton.jit``), a host wrapper that checks the
arguments (the reference's checks, so the errors read the same), prepares dense inputs and launches
the kernel, and a ``torch.library.triton_op`` registration as ``fakequant::_triton_<op>``. The public
``fakequant::<op>`` ops reach these through the backend choice in :mod:`fakequant._backend`; calling
the ``_triton_`` ops directly is what ``torch.compile`` traces into (``wrap_triton``).

Layout: the element-wise kernels walk memory, not indices. A non-overlapping and dense input (contiguous,
channels_last or any permutation of dimensions) and ``torch.empty_like`` outputs share one layout, so
memory offset ``o`` holds the same element in every one of them, and the channel of that element is
``(o // stride[axis]) % size[axis]``. Any other input (a slice with gaps, an expanded tensor) is first
copied into a dense ``torch.empty_like`` tensor, which has the layout of the outputs. ``observe_range``'s
reduction reads a dense ``x`` the same way (channel ``c``'s elements at ``((k // stride) * size + c) * stride +
k % stride``) and writes its state tensors through their own strides and dtypes.

Numerics (SPEC §1): fp32 compute for every input dtype; the reciprocal ``1 / scale`` is an IEEE
division (``div_rn``), as the reference's; rounding is half to even by :func:`_round_half_even`, the one
function used on every path, the Triton interpreter's included; the mask is taken on the unclamped ``q``.
The forward expressions have no ``a * b + c`` shape, so contracting into an FMA cannot change them;
``observe_range``'s moving average has one and is written with PTX's explicitly rounded ``sub.rn``/``mul.rn``/
``add.rn`` on the GPU. What the interpreter cannot show about the GPU build (the rounding kept as two FADDs,
``div.rn``, no ``min``/``max`` in the clamp, no FMA, 64-bit offsets) tests/test_triton.py checks in PTX and
SASS built for sm_80.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels also run on CPU tensors.

Example (on a GPU; on CPU tensors under ``TRITON_INTERPRET=1`` the same without ``device="cuda"``):
    >>> import torch, fakequant
    >>> fakequant.set_backend("triton")  # doctest: +SKIP
    >>> x = torch.tensor([0.04, 0.06, 1.0], device="cuda")  # doctest: +SKIP
    >>> torch.ops.fakequant._triton_fake_quant_per_tensor(
    ...     x, torch.tensor(0.1, device="cuda"), torch.tensor(0, device="cuda"), -8, 7)  # doctest: +SKIP
    (tensor([0.0000, 0.1000, 0.7000], device='cuda:0'), tensor([True, True, False], device='cuda:0'))
"""

from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from fakequant import reference

__all__ = [
    "INTERPRETED",
    "OPS",
    "binarize",
    "bn_fold_fake_quant_weight",
    "bn_fold_fake_quant_weight_backward",
    "fake_quant_per_channel",
    "fake_quant_per_tensor",
    "masked_grad",
    "observe_range",
    "fake_quant_learnable_backward",
]

# True when triton decorated the kernels for its interpreter (TRITON_INTERPRET=1 at import): then the
# kernels run on CPU tensors, with numpy float32 arithmetic. (triton.knobs exists from Triton 3.4 on.)
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

# Elements per program and warps per program of the element-wise kernels: 1024 elements over 4 warps is
# 8 elements per thread (two 16-byte fp32 vectors). Not tuned on a GPU: none was available when this was
# written (bench/ measures it where one is); under the interpreter a larger block would only be faster.
BLOCK_SIZE = 1024
NUM_WARPS = 4
# Elements per loop step of the per-channel reduction in the BN-fold backward (one program per channel);
# not tuned on a GPU either.
REDUCE_BLOCK_SIZE = 1024

# 2^23: from there on every fp32 value is an integer.
_TWO_POW_23 = tl.constexpr(8388608.0)


# ---------------------------------------------------------------------------------------------
# Shared per-element math.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    """Rounds fp32 ``v`` to the nearest integer, ties to even, exactly as ``rintf``/``torch.round``.

    ``libdevice.rint`` does not run under the Triton interpreter (3.8), so both the GPU and the interpreter
    use this: for ``|v| < 2^23``, ``|v| + 2^23`` lies in ``[2^23, 2^24)`` where the fp32 spacing is 1, so the
    addition itself rounds ``|v|`` half to even and subtracting ``2^23`` again is exact. Larger values, inf
    and NaN are integers (or NaN) already and pass through. The sign is copied back bit for bit, so ``-0.3``
    gives ``-0.0`` as ``rintf`` does. Neither LLVM nor ptxas reassociates fp32 additions without fast-math
    flags, which Triton does not set (the sm_80 SASS holds ``FADD |v|, 8388608`` then ``FADD -8388608``).
    """
    magnitude = tl.abs(v)
    rounded = (magnitude + _TWO_POW_23) - _TWO_POW_23
    rounded = tl.where(magnitude < _TWO_POW_23, rounded, magnitude)
    sign_bit = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (rounded.to(tl.uint32, bitcast=True) | sign_bit).to(tl.float32, bitcast=True)


@triton.jit
def _as_float32(v):
    """``v`` widened to fp32 exactly.

    bfloat16 is widened with integer operations because the Triton interpreter (3.8) mis-converts bf16
    subnormals on bf16 -> fp32 casts (measured: 1e-39 became 4.4e-39, 1e-40 became 0); on a GPU both forms
    are the same exact conversion.
    """
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _to_dtype(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` (the output's), to nearest even as ``Tensor.to`` does.

    bfloat16 is rounded here with integer operations because the Triton interpreter (3.8) truncates on
    fp32 -> bf16 casts, which would make the interpreter test a rounding the GPU does not run. NaN becomes
    the canonical bf16 NaN, as in c10's conversion; overflow rounds to inf as IEEE rounding does.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bf16_bits = tl.where(v != v, 0x7FC0, rounded).to(tl.uint16)
        return bf16_bits.to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _fake_quant_values(v, inv_scale, scale, zero_point, quant_min, quant_max):
    """``(out, inside)`` of fp32 ``v``: ``q = rint(v * inv_scale) + zero_point``, mask on the unclamped q.

    The clamp is written with comparisons so that NaN falls through both and stays NaN (``tl.minimum`` and
    ``tl.maximum`` may return the other operand for NaN on a GPU); ``inf`` lands on the range ends.
    """
    q = _round_half_even(v * inv_scale) + zero_point
    inside = (q >= quant_min) & (q <= quant_max)
    clamped = tl.where(q < quant_min, quant_min, tl.where(q > quant_max, quant_max, q))
    return (clamped - zero_point) * scale, inside


# ---------------------------------------------------------------------------------------------
# Host helpers.
# ---------------------------------------------------------------------------------------------


def _is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """True when the elements of ``t`` fill ``[data_ptr, data_ptr + numel)`` exactly once."""
    expected_stride = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when equal memory offsets hold equal indices in ``a`` and ``b`` (size-1 strides do not count)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape, strict=True) if size != 1
    )


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when dense, else a dense copy in the layout ``torch.empty_like(t)`` gives the outputs."""
    if _is_non_overlapping_and_dense(t):
        return t
    return torch.empty_like(t).copy_(t)


def _dense_like(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``t`` when it shares ``layout``'s memory layout, else a copy of ``t`` in that layout."""
    if _same_layout(t, layout):
        return t
    return torch.empty_like(layout, dtype=t.dtype).copy_(t)


def _has_values(t: torch.Tensor) -> bool:
    """False for the fake tensors this wrapper sees as the triton_op's fake impl (no values to check)."""
    return not is_fake(t)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu"):
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            "fakequant: the Triton kernels run on CPU tensors only under the Triton interpreter; set "
            "TRITON_INTERPRET=1 before triton is imported, or choose another backend for CPU tensors"
        )
    raise RuntimeError(f"fakequant: the Triton kernels run on CUDA tensors, got a tensor on {t.device}")


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _mask_output(x: torch.Tensor, compute_mask: bool) -> torch.Tensor:
    if compute_mask:
        return torch.empty_like(x, dtype=torch.bool)
    return torch.empty(0, dtype=torch.bool, device=x.device)


def _elementwise_grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, BLOCK_SIZE),)


def _channel_geometry(t: torch.Tensor, axis: int) -> tuple[int, int]:
    """``(stride, size)`` of ``axis`` in dense ``t``: memory offset ``o`` lies in channel ``(o // stride) % size``."""
    size = t.size(axis)
    return (t.stride(axis) if size > 1 else 1), size


# ---------------------------------------------------------------------------------------------
# fake_quant_per_tensor
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_per_tensor_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    zero_point_ptr,
    n_elements,
    quant_min,
    quant_max,
    WRITE_MASK: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    scale = tl.load(scale_ptr)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr).to(tl.float32)
    x = _as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    if RELU:
        # relu(x) with NaN kept (x != x); the sign of a zero does not matter, both quantize to +0
        positive = x > 0.0
        x = tl.where(positive | (x != x), x, 0.0)
    out, inside = _fake_quant_values(
        x, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32)
    )
    if RELU:
        inside = inside & positive
    tl.store(out_ptr + offsets, _to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


def fake_quant_per_tensor(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_per_tensor``: ``(out, mask)`` in ``x``'s layout."""
    reference.check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, check_values=_has_values(scale))
    _check_device(x)
    x_dense = _dense(x)
    out = torch.empty_like(x)
    mask = _mask_output(x, compute_mask)
    assert _same_layout(out, x_dense), "empty_like must give the layout of the dense input"
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    with _device_guard(x):
        wrap_triton(_fake_quant_per_tensor_kernel)[_elementwise_grid(n_elements)](
            x_dense,
            out,
            mask if compute_mask else out,
            scale,
            zero_point,
            n_elements,
            quant_min,
            quant_max,
            WRITE_MASK=compute_mask,
            RELU=relu,
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
        )
    return out, mask


# ---------------------------------------------------------------------------------------------
# fake_quant_per_channel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_per_channel_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    zero_point_ptr,
    n_elements,
    channel_stride,
    channels,
    quant_min,
    quant_max,
    WRITE_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    channel = (offsets // channel_stride) % channels
    scale = tl.load(scale_ptr + channel, mask=in_bounds, other=1.0)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel, mask=in_bounds, other=0).to(tl.float32)
    x = _as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    out, inside = _fake_quant_values(
        x, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32)
    )
    tl.store(out_ptr + offsets, _to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


def fake_quant_per_channel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_per_channel``: ``(out, mask)`` in ``x``'s layout."""
    axis = reference.check_fake_quant_args(
        x, scale, zero_point, quant_min, quant_max, axis, check_values=_has_values(scale)
    )
    _check_device(x)
    x_dense = _dense(x)
    out = torch.empty_like(x)
    mask = _mask_output(x, compute_mask)
    assert _same_layout(out, x_dense), "empty_like must give the layout of the dense input"
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    channel_stride, channels = _channel_geometry(x_dense, axis)
    with _device_guard(x):
        wrap_triton(_fake_quant_per_channel_kernel)[_elementwise_grid(n_elements)](
            x_dense,
            out,
            mask if compute_mask else out,
            scale.contiguous(),
            zero_point.contiguous(),
            n_elements,
            channel_stride,
            channels,
            quant_min,
            quant_max,
            WRITE_MASK=compute_mask,
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
        )
    return out, mask


# ---------------------------------------------------------------------------------------------
# binarize
# ---------------------------------------------------------------------------------------------


@triton.jit
def _binarize_kernel(x_ptr, out_ptr, mask_ptr, n_elements, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    x = _as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    out = tl.where(x >= 0.0, 1.0, -1.0)
    out = tl.where(x != x, x, out)  # NaN stays NaN
    tl.store(out_ptr + offsets, _to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, tl.abs(x) <= 1.0, mask=in_bounds)


def binarize(x: torch.Tensor, clipped_ste: bool = True, compute_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::binarize``: ``(out, mask)`` in ``x``'s layout; a mask only for the clipped STE."""
    reference.check_binarize_args(x)
    _check_device(x)
    write_mask = clipped_ste and compute_mask
    x_dense = _dense(x)
    out = torch.empty_like(x)
    mask = _mask_output(x, write_mask)
    assert _same_layout(out, x_dense), "empty_like must give the layout of the dense input"
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    with _device_guard(x):
        wrap_triton(_binarize_kernel)[_elementwise_grid(n_elements)](
            x_dense,
            out,
            mask if write_mask else out,
            n_elements,
            WRITE_MASK=write_mask,
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
        )
    return out, mask


# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight
# ---------------------------------------------------------------------------------------------


def _bn_statistics(gamma: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(std, factor)`` in fp32, by the reference's own torch expressions.

    These are O(channels) and computed with torch, not in the kernel, on purpose: torch's fp32 ``sqrt`` on
    CPU is not always correctly rounded (it differed from ``sqrt_rn`` by one ulp on 403 of 65536 random
    values), so an in-kernel ``sqrt_rn`` would not reproduce the reference bit for bit.
    """
    std = torch.sqrt(var.float() + eps)
    return std, (gamma.float() / std).contiguous()


@triton.jit
def _bn_fold_values(weight, factor, inv_scale, scale, zero_point, quant_min, quant_max, DIVIDE_BY_FOLD: tl.constexpr):
    """The forward's ``(out, inside)`` of fp32 ``weight``: ``out`` in fp32, not yet rounded to the output's dtype.

    ``factor`` is the plain fold factor ``gamma / std``. ``q(w * f)``, or with ``DIVIDE_BY_FOLD`` ``q(w * f) / f``
    with ``f`` taken as 1 where it is 0 (reference.bn_fold_training_factor; NaN stays NaN), so the division is
    never by 0; divided in fp32 (IEEE, ``div_rn``). The one definition of the forward's values: the forward
    kernel stores them, the backward kernel recomputes them, bit for bit the same.
    """
    if DIVIDE_BY_FOLD:
        factor = tl.where(factor == 0.0, 1.0, factor)
    out, inside = _fake_quant_values(weight * factor, inv_scale, scale, zero_point, quant_min, quant_max)
    if DIVIDE_BY_FOLD:
        out = tl.math.div_rn(out, factor)
    return out, inside


@triton.jit
def _bn_fold_fake_quant_weight_kernel(
    weight_ptr,
    out_ptr,
    mask_ptr,
    factor_ptr,
    scale_ptr,
    zero_point_ptr,
    n_elements,
    channel_stride,
    channels,
    quant_min,
    quant_max,
    WRITE_MASK: tl.constexpr,
    DIVIDE_BY_FOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # factor_ptr holds the plain fold factor; _bn_fold_values takes it as 1 where it is 0 for DIVIDE_BY_FOLD.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    channel = (offsets // channel_stride) % channels
    factor = tl.load(factor_ptr + channel, mask=in_bounds, other=1.0)
    scale = tl.load(scale_ptr + channel, mask=in_bounds, other=1.0)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel, mask=in_bounds, other=0).to(tl.float32)
    weight = _as_float32(tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0))
    out, inside = _bn_fold_values(
        weight, factor, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32),
        DIVIDE_BY_FOLD,
    )
    tl.store(out_ptr + offsets, _to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


def bn_fold_fake_quant_weight(
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
    divide_by_fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::bn_fold_fake_quant_weight``: fold BN into ``weight`` and fake-quantize along axis 0.

    ``divide_by_fold=True`` returns ``q(w * f) / f`` with ``f`` taken as 1 where it is 0; ``scale``,
    ``zero_point`` and the mask are those of ``q(w * f)`` either way.
    """
    reference.check_bn_fold_args(
        weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=_has_values(scale)
    )
    _check_device(weight)
    weight_dense = _dense(weight)
    out = torch.empty_like(weight)
    mask = _mask_output(weight, compute_mask)
    assert _same_layout(out, weight_dense), "empty_like must give the layout of the dense input"
    n_elements = weight.numel()
    if n_elements == 0:
        return out, mask
    _, factor = _bn_statistics(gamma, var, eps)
    channel_stride, channels = _channel_geometry(weight_dense, 0)
    with _device_guard(weight):
        wrap_triton(_bn_fold_fake_quant_weight_kernel)[_elementwise_grid(n_elements)](
            weight_dense,
            out,
            mask if compute_mask else out,
            factor,
            scale.contiguous(),
            zero_point.contiguous(),
            n_elements,
            channel_stride,
            channels,
            quant_min,
            quant_max,
            WRITE_MASK=compute_mask,
            DIVIDE_BY_FOLD=divide_by_fold,
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
        )
    return out, mask


# ---------------------------------------------------------------------------------------------
# masked_grad
# ---------------------------------------------------------------------------------------------


def _check_mask(grad: torch.Tensor, mask: torch.Tensor) -> None:
    # The wording of reference.masked_grad's check.
    if mask.shape != grad.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"fakequant: mask must be a bool tensor of the gradient's shape {tuple(grad.shape)}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )


@triton.jit
def _masked_grad_kernel(grad_ptr, mask_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
    keep = tl.load(mask_ptr + offsets, mask=in_bounds, other=0).to(tl.int1)
    tl.store(out_ptr + offsets, tl.where(keep, grad, tl.zeros_like(grad)), mask=in_bounds)


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Triton ``fakequant::masked_grad``: ``grad`` where ``mask``, exactly 0 elsewhere, in ``grad``'s layout."""
    _check_mask(grad, mask)
    _check_device(grad)
    grad_dense = _dense(grad)
    out = torch.empty_like(grad)
    assert _same_layout(out, grad_dense), "empty_like must give the layout of the dense input"
    n_elements = grad.numel()
    if n_elements == 0:
        return out
    mask_dense = _dense_like(mask, grad_dense)
    with _device_guard(grad):
        wrap_triton(_masked_grad_kernel)[_elementwise_grid(n_elements)](
            grad_dense, mask_dense, out, n_elements, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS
        )
    return out


# ---------------------------------------------------------------------------------------------
# bn_fold_fake_quant_weight_backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bn_fold_fake_quant_weight_backward_kernel(
    grad_ptr,
    weight_ptr,
    factor_ptr,
    std_ptr,
    gamma_ptr,
    scale_ptr,
    zero_point_ptr,
    grad_weight_ptr,
    grad_gamma_ptr,
    grad_var_ptr,
    channel_size,
    quant_min,
    quant_max,
    DIVIDE_BY_FOLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per output channel, whose channel_size elements are contiguous in memory: the per-channel
    # sum is then a deterministic loop, no atomics. The forward's mask (and, with DIVIDE_BY_FOLD, its output
    # rounded to the weight's dtype) is recomputed from the weight by _bn_fold_values, as the forward kernel
    # computes it; nothing of the forward is read back.
    # Without DIVIDE_BY_FOLD (out = q(w f)): grad_weight = g * f and grad_f = sum(g * w), g the masked grad.
    # With it (out = q(w f) / f): grad_weight = g, and grad_f = sum(grad * ((mask ? w : 0) - out)) / f, 0 where
    # f (factor_ptr's plain factor) is 0. The sum takes the unmasked grad: a clamped element's out = c / f
    # still depends on f.
    channel = tl.program_id(0).to(tl.int64)
    base = channel * channel_size
    factor = tl.load(factor_ptr + channel)
    scale = tl.load(scale_ptr + channel)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, channel_size, BLOCK):
        offsets = base + start + tl.arange(0, BLOCK)
        in_bounds = (start + tl.arange(0, BLOCK)) < channel_size
        raw_grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
        weight = _as_float32(tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0))
        out, keep = _bn_fold_values(
            weight, factor, inv_scale, scale, zero_point, quant_min.to(tl.float32), quant_max.to(tl.float32),
            DIVIDE_BY_FOLD,
        )
        grad = _as_float32(tl.where(keep, raw_grad, tl.zeros_like(raw_grad)))
        if DIVIDE_BY_FOLD:
            tl.store(grad_weight_ptr + offsets, _to_dtype(grad, grad_weight_ptr.dtype.element_ty), mask=in_bounds)
            # The forward's output as stored: rounded to the weight's dtype, then widened back.
            out = _as_float32(_to_dtype(out, weight_ptr.dtype.element_ty))
            # Lanes past the channel's end are left out: their out = q(0 * f) / f is NaN for an inf or NaN f.
            acc += tl.where(in_bounds, _as_float32(raw_grad) * (tl.where(keep, weight, 0.0) - out), 0.0)
        else:
            tl.store(
                grad_weight_ptr + offsets, _to_dtype(grad * factor, grad_weight_ptr.dtype.element_ty), mask=in_bounds
            )
            acc += grad * weight
    total = tl.sum(acc, axis=0)
    if DIVIDE_BY_FOLD:
        # Divided by 1 where f == 0, whose result the where discards (no division by zero is evaluated).
        total = tl.where(factor == 0.0, 0.0, tl.math.div_rn(total, tl.where(factor == 0.0, 1.0, factor)))
    std = tl.load(std_ptr + channel)
    gamma = tl.load(gamma_ptr + channel)
    grad_gamma = tl.math.div_rn(total, std)
    grad_var = tl.math.div_rn(-0.5 * total * gamma, std * std * std)
    tl.store(grad_gamma_ptr + channel, _to_dtype(grad_gamma, grad_gamma_ptr.dtype.element_ty))
    tl.store(grad_var_ptr + channel, _to_dtype(grad_var, grad_var_ptr.dtype.element_ty))


def _channel_major(t: torch.Tensor) -> bool:
    """True when ``t`` is dense with axis 0 outermost, so that each output channel is one contiguous run."""
    return _is_non_overlapping_and_dense(t) and (t.size(0) <= 1 or t.stride(0) * t.size(0) == t.numel())


def bn_fold_fake_quant_weight_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    divide_by_fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::bn_fold_fake_quant_weight_backward``: ``(grad_weight, grad_gamma, grad_var)``.

    Takes :func:`bn_fold_fake_quant_weight`'s arguments and recomputes its mask (and, for
    ``divide_by_fold=True``, its output) element by element, bit for bit the forward kernel's, instead of
    reading them: the gradients of ``q(w * f)``, or of ``q(w * f) / f`` (reference.bn_fold_fake_quant_weight_backward).
    """
    reference.check_bn_fold_backward_args(
        grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=_has_values(scale)
    )
    _check_device(weight)
    grad_weight = torch.empty_like(weight)
    grad_gamma = torch.empty_like(gamma)
    grad_var = torch.empty_like(var)
    std, factor = _bn_statistics(gamma, var, eps)
    if weight.numel() == 0:
        # No element contributes: the per-channel sums are 0 (and the signs of the zeros the reference's).
        total = torch.zeros_like(std)
        if divide_by_fold:
            total = torch.where(factor == 0, torch.zeros((), device=factor.device), total / factor)
        grad_gamma.copy_(total / std)
        grad_var.copy_(-0.5 * total * gamma.float() / (std * std * std))
        return grad_weight, grad_gamma, grad_var
    # grad_weight is written in weight's layout when each channel is contiguous in it (contiguous or
    # channels_last weights); any other layout goes through a contiguous copy.
    weight_major = weight if _channel_major(weight) else weight.contiguous()
    result = grad_weight if weight_major is weight else torch.empty_like(weight_major)
    with _device_guard(weight):
        wrap_triton(_bn_fold_fake_quant_weight_backward_kernel)[(weight.size(0),)](
            _dense_like(grad, weight_major),
            weight_major,
            factor,
            std.contiguous(),
            gamma.float().contiguous(),
            scale.contiguous(),
            zero_point.contiguous(),
            result,
            grad_gamma,
            grad_var,
            weight.numel() // weight.size(0),
            quant_min,
            quant_max,
            DIVIDE_BY_FOLD=divide_by_fold,
            BLOCK=REDUCE_BLOCK_SIZE,
            num_warps=NUM_WARPS,
        )
    if result is not grad_weight:
        grad_weight.copy_(result)
    return grad_weight, grad_gamma, grad_var


# ---------------------------------------------------------------------------------------------
# observe_range
# ---------------------------------------------------------------------------------------------

# Elements per loop step of the min/max partial kernel (a [BLOCK_C, BLOCK_K] tile of channels by elements)
# and entries per step of the finalize kernel. Not tuned on a GPU (none here); 1024 as the element-wise
# kernels, and under the interpreter larger tiles only mean fewer numpy calls.
OBSERVE_BLOCK_SIZE = 1024
# At most about this many partial-reduction programs (enough to fill a GPU with a few programs per SM, few
# enough that the finalize kernel combines at most this many partials per entry), each over at least
# OBSERVE_MIN_STEPS loop steps of OBSERVE_BLOCK_SIZE elements (32 per thread with 4 warps, which the CUDA
# kernel's 16 per thread of 256 threads also aims at). Not tuned on a GPU (none here). Under the
# interpreter the minimum of 4 instead of 1 took a per-tensor range of 140000 fp32 values from 640-700 ms
# to 330 ms (137 programs of 1 step against 35 of 4 steps).
OBSERVE_PROGRAMS = 1024
OBSERVE_MIN_STEPS = 4

# The moving average is rounded after each operation, as the reference's separate tensor ops. Compiled for
# a GPU, `t + (b - t) * c` would be contracted into an FMA (Triton enables fp fusion by default), so the
# compiled kernels spell out PTX's explicitly rounded sub.rn/mul.rn/add.rn, which are never contracted: the
# CUDA kernel's __fsub_rn/__fmul_rn/__fadd_rn. (libdevice's versions of those flush denormals to zero under
# Triton's default enable_reflect_ftz, and launch options such as enable_fp_fusion=False may not survive
# torch.compile.) The interpreter runs no PTX and rounds every numpy float32 operation anyway.
_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def _nan_min(a, b):
    """``a`` if it is NaN or smaller, else ``b``: NaN in either operand wins (fakequant_math.h's nan_min)."""
    return tl.where((a != a) | (a < b), a, b)


@triton.jit
def _nan_max(a, b):
    return tl.where((a != a) | (a > b), a, b)


@triton.jit
def _nan_min_max_rows(lo, hi):
    """Per-row ``(min(lo), max(hi))`` of 2-D ``lo``/``hi``; a NaN anywhere in a row gives NaN.

    ``tl.min``/``tl.max`` do not promise to propagate NaN (on a GPU they may return the other operand), so
    NaN is counted separately and the reduction sees +-inf in its place. (lo and hi are flagged apart:
    after a fold, ``0 * inf`` can make one end of a channel NaN and not the other.)
    """
    lo_nan = tl.max((lo != lo).to(tl.int32), axis=1) > 0
    hi_nan = tl.max((hi != hi).to(tl.int32), axis=1) > 0
    row_lo = tl.min(tl.where(lo != lo, float("inf"), lo), axis=1)
    row_hi = tl.max(tl.where(hi != hi, float("-inf"), hi), axis=1)
    return tl.where(lo_nan, float("nan"), row_lo), tl.where(hi_nan, float("nan"), row_hi)


@triton.jit
def _observe_range_partial_kernel(
    x_ptr,
    partial_ptr,
    per_channel,
    run,
    channels,
    splits,
    split_size,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program p reduces elements [split * split_size, (split + 1) * split_size) of each of BLOCK_C channels
    # (p = channel_tile * splits + split). Element k of channel c lies at memory offset
    # ((k // run) * channels + c) * run + k % run of the dense x: run is the channel axis's stride, and
    # offset o belongs to channel (o // run) % channels, as in the other kernels and the C++ minmax.
    pid = tl.program_id(0).to(tl.int64)
    channel_tile = pid // splits
    split = pid - channel_tile * splits
    c = channel_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < channels
    k_begin = split * split_size
    k_end = tl.minimum(k_begin + split_size, per_channel)
    lo = tl.full([BLOCK_C, BLOCK_K], float("inf"), tl.float32)
    hi = tl.full([BLOCK_C, BLOCK_K], float("-inf"), tl.float32)
    for start in range(k_begin, k_end, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        outer = k // run
        offsets = (outer[None, :] * channels + c[:, None]) * run + (k - outer * run)[None, :]
        in_bounds = c_in[:, None] & (k < k_end)[None, :]
        v = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        # _nan_min/_nan_max written out: a jit helper call costs about 1 ms under the interpreter.
        is_nan = v != v
        lo = tl.where(in_bounds & (is_nan | (v < lo)), v, lo)
        hi = tl.where(in_bounds & (is_nan | (v > hi)), v, hi)
    row_lo, row_hi = _nan_min_max_rows(lo, hi)
    # Channel c's partials are contiguous: minima at c * splits + split, maxima channels * splits further.
    out = c * splits + split
    tl.store(partial_ptr + out, row_lo, mask=c_in)
    tl.store(partial_ptr + channels * splits + out, row_hi, mask=c_in)


@triton.jit
def _channel_ranges(
    partial_ptr,
    fold_ptr,
    c,
    c_in,
    channels,
    splits,
    HAS_FOLD: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """The batch ``(min, max)`` of the BLOCK_E channels ``c``: their partials combined, then the BN fold applied."""
    lo = tl.full([BLOCK_E, BLOCK_S], float("inf"), tl.float32)
    hi = tl.full([BLOCK_E, BLOCK_S], float("-inf"), tl.float32)
    for start in range(0, splits, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        in_bounds = c_in[:, None] & (s < splits)[None, :]
        index = c[:, None] * splits + s[None, :]
        a = tl.load(partial_ptr + index, mask=in_bounds, other=float("inf"))
        b = tl.load(partial_ptr + channels * splits + index, mask=in_bounds, other=float("-inf"))
        lo = tl.where((a != a) | (a < lo), a, lo)  # _nan_min, written out as in the partial kernel
        hi = tl.where((b != b) | (b > hi), b, hi)
    lo, hi = _nan_min_max_rows(lo, hi)
    if HAS_FOLD:
        # Rounding is monotonic: min(w) * f is min(w * f) for f >= 0; a negative f swaps the ends.
        f = tl.load(fold_ptr + c, mask=c_in, other=1.0)
        a = lo * f
        b = hi * f
        negative = f < 0.0
        lo = tl.where(negative, b, a)
        hi = tl.where(negative, a, b)
    return lo, hi


@triton.jit
def _mul_rn(a, b):
    """``a * b`` rounded to fp32 on its own (PTX's mul.rn, never contracted into an FMA)."""
    if _INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip


@triton.jit
def _sub_rn(a, b):
    if _INTERPRETED:
        return a - b
    else:
        return tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip


@triton.jit
def _add_rn(a, b):
    if _INTERPRETED:
        return a + b
    else:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip


@triton.jit
def _moving_average(tracked, observed, averaging_constant):
    """``tracked + (observed - tracked) * c``, each operation rounded to fp32 (no FMA)."""
    return _add_rn(tracked, _mul_rn(_sub_rn(observed, tracked), averaging_constant))


@triton.jit
def _observe_range_finalize_kernel(
    partial_ptr,
    fold_ptr,
    tracked_ptr,
    scale_ptr,
    zero_point_ptr,
    entries,
    channels,
    splits,
    tracked_row_stride,
    tracked_entry_stride,
    scale_stride,
    zero_point_stride,
    averaging_constant,
    divisor,
    quant_min,
    quant_max,
    symmetric_zero_point,
    REPLACE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    HAS_FOLD: tl.constexpr,
    REDUCE_CHANNELS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # One lane per output entry (a channel, or the whole tensor). REDUCE_CHANNELS (the per-tensor range of a
    # folded weight): one program folds every channel's range, then reduces them to entry 0. RELU: the range
    # of relu(x) (or relu(x * fold)), ReLU applied to each end of the batch range before the moving average.
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_in = e < entries
    if REDUCE_CHANNELS:
        acc_lo = tl.full([BLOCK_E], float("inf"), tl.float32)
        acc_hi = tl.full([BLOCK_E], float("-inf"), tl.float32)
        for start in range(0, channels, BLOCK_E):
            c = start + tl.arange(0, BLOCK_E).to(tl.int64)
            c_in = c < channels
            channel_lo, channel_hi = _channel_ranges(
                partial_ptr, fold_ptr, c, c_in, channels, splits, HAS_FOLD, BLOCK_E, BLOCK_S
            )
            acc_lo = tl.where(c_in, _nan_min(channel_lo, acc_lo), acc_lo)
            acc_hi = tl.where(c_in, _nan_max(channel_hi, acc_hi), acc_hi)
        tensor_lo, tensor_hi = _nan_min_max_rows(acc_lo[None, :], acc_hi[None, :])
        lo = tl.broadcast_to(tensor_lo, [BLOCK_E])
        hi = tl.broadcast_to(tensor_hi, [BLOCK_E])
    else:
        lo, hi = _channel_ranges(partial_ptr, fold_ptr, e, e_in, channels, splits, HAS_FOLD, BLOCK_E, BLOCK_S)
    if RELU:
        # ReLU is monotonic, so relu(min) and relu(max) are the ends of relu(x)'s range. As torch.relu (the
        # reference's): negatives and -inf become +0, NaN stays NaN and -0.0 stays -0.0 (a comparison, not
        # tl.maximum, which may drop NaN on a GPU).
        lo = tl.where(lo < 0.0, 0.0, lo)
        hi = tl.where(hi < 0.0, 0.0, hi)

    min_ptr = tracked_ptr + e * tracked_entry_stride
    max_ptr = min_ptr + tracked_row_stride
    if not REPLACE:
        lo = _moving_average(tl.load(min_ptr, mask=e_in, other=0.0).to(tl.float32), lo, averaging_constant)
        hi = _moving_average(tl.load(max_ptr, mask=e_in, other=0.0).to(tl.float32), hi, averaging_constant)
    tl.store(min_ptr, _to_dtype(lo, tracked_ptr.dtype.element_ty), mask=e_in)
    tl.store(max_ptr, _to_dtype(hi, tracked_ptr.dtype.element_ty), mask=e_in)

    # choose_qparams (SPEC §2) on the fp32 range, operation by operation, NaN propagating.
    min_neg = tl.where((lo != lo) | (lo < 0.0), lo, 0.0)
    max_pos = tl.where((hi != hi) | (hi > 0.0), hi, 0.0)
    if SYMMETRIC:
        span = _nan_max(-min_neg, max_pos)
    else:
        span = max_pos - min_neg
    scale = tl.math.div_rn(span, divisor)
    scale = tl.where((scale != scale) | (scale >= 1.1920928955078125e-07), scale, 1.1920928955078125e-07)
    if SYMMETRIC:
        zero_point = tl.full([BLOCK_E], 0.0, tl.float32) + symmetric_zero_point
    else:
        zero_point = quant_min - _round_half_even(tl.math.div_rn(min_neg, scale))
        zero_point = tl.where(
            zero_point < quant_min, quant_min, tl.where(zero_point > quant_max, quant_max, zero_point)
        )
    tl.store(scale_ptr + e * scale_stride, _to_dtype(scale, scale_ptr.dtype.element_ty), mask=e_in)
    # A NaN zero point (from a NaN range) is INT32_MIN, as the reference's float -> int32 conversion gives.
    is_nan = zero_point != zero_point
    integer = tl.where(is_nan, 0.0, zero_point).to(tl.int32)
    integer = tl.where(is_nan, -2147483648, integer)
    tl.store(zero_point_ptr + e * zero_point_stride, integer.to(zero_point_ptr.dtype.element_ty), mask=e_in)


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, as a Python float (exact in any fp32 kernel argument).

    Plain Python, not a torch tensor: the triton_op's fake impl runs this wrapper on fake tensors.
    """
    return struct.unpack("f", struct.pack("f", value))[0]


def _observe_tiles(channels: int, per_channel: int, run: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_K)`` of the partial kernel: along memory's contiguous direction first."""
    if run == 1 and channels > 1:  # channels adjacent in memory (the last axis, or channels_last's C)
        block_c = min(triton.next_power_of_2(channels), OBSERVE_BLOCK_SIZE)
        return block_c, min(OBSERVE_BLOCK_SIZE // block_c, triton.next_power_of_2(per_channel))
    block_k = min(triton.next_power_of_2(per_channel), OBSERVE_BLOCK_SIZE)
    return min(triton.next_power_of_2(channels), OBSERVE_BLOCK_SIZE // block_k), block_k


def observe_range(
    x: torch.Tensor,
    tracked_range: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    averaging_constant: float,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    fold: torch.Tensor | None = None,
    relu: bool = False,
) -> None:
    """Triton ``fakequant::observe_range``: updates ``tracked_range``, ``scale`` and ``zero_point`` in place.

    Two launches: per-channel min/max partials of the dense ``x`` read in memory order, then one lane per
    entry that combines them, applies ``fold`` (and, with ``relu``, ReLU to both ends of the range), the
    moving average and ``choose_qparams``, and stores in the state tensors' own dtypes and strides.
    """
    axis = reference.check_observe_range_args(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, fold
    )
    _check_device(x)
    x_dense = _dense(x)
    n_elements = x.numel()
    # The batch range per channel of channel_axis (with fold: per output channel, reduced after folding
    # when the range is per tensor).
    channel_axis = 0 if fold is not None else axis
    run, channels = (1, 1) if channel_axis is None else _channel_geometry(x_dense, channel_axis)
    per_channel = n_elements // channels
    block_c, block_k = _observe_tiles(channels, per_channel, run)
    channel_tiles = triton.cdiv(channels, block_c)
    steps = triton.cdiv(per_channel, block_k)
    steps_per_split = max(OBSERVE_MIN_STEPS, triton.cdiv(steps, max(1, OBSERVE_PROGRAMS // channel_tiles)))
    splits = triton.cdiv(steps, steps_per_split)  # every split holds elements
    partial = torch.empty(2 * channels * splits, dtype=torch.float32, device=x.device)

    entries = 1 if axis is None else channels
    reduce_channels = entries != channels
    block_s = min(triton.next_power_of_2(splits), OBSERVE_BLOCK_SIZE)
    block_e = OBSERVE_BLOCK_SIZE // block_s if reduce_channels else min(
        triton.next_power_of_2(entries), OBSERVE_BLOCK_SIZE // block_s
    )
    divisor = (quant_max - quant_min) / 2 if symmetric else float(quant_max - quant_min)
    with _device_guard(x):
        wrap_triton(_observe_range_partial_kernel)[(channel_tiles * splits,)](
            x_dense,
            partial,
            per_channel,
            run,
            channels,
            splits,
            steps_per_split * block_k,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            num_warps=NUM_WARPS,
        )
        wrap_triton(_observe_range_finalize_kernel)[(1 if reduce_channels else triton.cdiv(entries, block_e),)](
            partial,
            partial if fold is None else fold.contiguous(),
            tracked_range,
            scale,
            zero_point,
            entries,
            channels,
            splits,
            tracked_range.stride(0),
            tracked_range.stride(1) if tracked_range.dim() == 2 else 0,
            scale.stride(0) if axis is not None else 0,
            zero_point.stride(0) if axis is not None else 0,
            _fp32(averaging_constant),
            _fp32(divisor),
            float(quant_min),
            float(quant_max),
            float(0 if quant_min < 0 else (quant_min + quant_max + 1) // 2),
            REPLACE=averaging_constant == 1.0,
            SYMMETRIC=symmetric,
            HAS_FOLD=fold is not None,
            REDUCE_CHANNELS=reduce_channels,
            RELU=relu,
            BLOCK_E=block_e,
            BLOCK_S=block_s,
            num_warps=NUM_WARPS,
        )


# ---------------------------------------------------------------------------------------------
# fake_quant_learnable_backward (LSQ)
# ---------------------------------------------------------------------------------------------

# Elements per program of the learnable backward: LEARNABLE_STEPS loop steps of BLOCK_SIZE. Each program writes
# one partial sum per output (the host adds the partials of a channel in float64, in a fixed order). Not tuned on
# a GPU (none here): 16 steps of 1024 keep the partial buffers at 1/16384 of the tensor.
LEARNABLE_STEPS = 16


@triton.jit
def _fake_quant_learnable_backward_kernel(
    grad_ptr,
    x_ptr,
    grad_x_ptr,
    scale_ptr,
    zero_point_ptr,
    partial_scale_ptr,
    partial_zero_point_ptr,
    run,
    channels,
    chunks,
    quant_min,
    quant_max,
    grad_factor,
    BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    # Storage holds rows of `run` elements, row r in channel r % channels; program p takes chunk p % chunks of
    # row p // chunks. The per-element terms are fakequant_math.h's learnable_grad_terms, in its order.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // chunks
    channel = row % channels
    scale = tl.load(scale_ptr + channel)
    inv_scale = tl.math.div_rn(1.0, scale)
    zero_point = tl.load(zero_point_ptr + channel)
    qmin = quant_min.to(tl.float32)
    qmax = quant_max.to(tl.float32)
    start = (pid % chunks) * (BLOCK * STEPS)
    scale_acc = tl.zeros([BLOCK], dtype=tl.float32)
    zero_point_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        index = start + step * BLOCK + tl.arange(0, BLOCK)
        in_row = index < run
        offsets = row * run + index
        raw_grad = tl.load(grad_ptr + offsets, mask=in_row, other=0.0)
        grad = _as_float32(raw_grad)
        x = _as_float32(tl.load(x_ptr + offsets, mask=in_row, other=0.0))
        q = _round_half_even(x * inv_scale) + zero_point
        inside = (q >= qmin) & (q <= qmax)
        below = q < qmin
        above = q > qmax
        x_fq = _mul_rn(q - zero_point, scale)  # rounded on its own: x_fq - x would be contracted into an FMA
        in_term = (((x_fq - x) * inv_scale) * grad) * grad_factor
        out_term = (grad * tl.where(below, qmin - zero_point, qmax - zero_point)) * grad_factor
        term = tl.where(inside, in_term, tl.where(below | above, out_term, 0.0))
        scale_acc += tl.where(in_row, term, 0.0)
        zero_point_acc += tl.where(in_row & (below | above), ((-grad) * scale) * grad_factor, 0.0)
        tl.store(grad_x_ptr + offsets, tl.where(inside, raw_grad, tl.zeros_like(raw_grad)), mask=in_row)
    tl.store(partial_scale_ptr + pid, tl.sum(scale_acc, axis=0))
    tl.store(partial_zero_point_ptr + pid, tl.sum(zero_point_acc, axis=0))


def fake_quant_learnable_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_learnable_backward``: ``(grad_x, grad_scale, grad_zero_point)``
    (reference.fake_quant_learnable_backward), one pass over ``grad`` and ``x``."""
    axis = reference.check_learnable_backward_args(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=_has_values(scale)
    )
    _check_device(x)
    xd = _dense(x)
    grad_x = torch.empty_like(xd)
    channels = 1 if axis is None else x.size(axis)
    grad_scale = torch.zeros(channels, dtype=torch.float32, device=x.device)
    grad_zero_point = torch.zeros(channels, dtype=torch.float32, device=x.device)
    if xd.numel() > 0:
        run, channels = (xd.numel(), 1) if axis is None else _channel_geometry(xd, axis)
        rows = xd.numel() // run
        # Short rows (a channel axis that is innermost in memory) get a block and step count to their length.
        block = max(16, min(BLOCK_SIZE, triton.next_power_of_2(run)))
        steps = min(LEARNABLE_STEPS, triton.cdiv(run, block))
        chunks = triton.cdiv(run, block * steps)
        partial_scale = torch.empty(rows * chunks, dtype=torch.float32, device=x.device)
        partial_zero_point = torch.empty_like(partial_scale)
        zero_point_f = reference.learnable_zero_point(zero_point, quant_min, quant_max).to(torch.float32)
        with _device_guard(x):
            wrap_triton(_fake_quant_learnable_backward_kernel)[(rows * chunks,)](
                _dense_like(grad, xd), xd, grad_x, scale.reshape(-1).contiguous(),
                zero_point_f.reshape(-1).contiguous(), partial_scale, partial_zero_point, run, channels, chunks,
                quant_min, quant_max, grad_factor, BLOCK=block, STEPS=steps, num_warps=NUM_WARPS,
            )  # fmt: skip
        # Row r is channel r % channels: sum over the rows of each channel and their chunks, in a fixed order.
        grad_scale = partial_scale.double().view(-1, channels, chunks).sum(dim=(0, 2)).float()
        grad_zero_point = partial_zero_point.double().view(-1, channels, chunks).sum(dim=(0, 2)).float()
    return grad_x, grad_scale.reshape(scale.shape), grad_zero_point.reshape(zero_point.shape)


# ---------------------------------------------------------------------------------------------
# Registration: fakequant::_triton_<op>, traceable by torch.compile.
# ---------------------------------------------------------------------------------------------

_HOST_WRAPPERS = {
    "fake_quant_per_tensor": fake_quant_per_tensor,
    "fake_quant_per_channel": fake_quant_per_channel,
    "binarize": binarize,
    "bn_fold_fake_quant_weight": bn_fold_fake_quant_weight,
    "masked_grad": masked_grad,
    "bn_fold_fake_quant_weight_backward": bn_fold_fake_quant_weight_backward,
    "observe_range": observe_range,
    "fake_quant_learnable_backward": fake_quant_learnable_backward,
}

# Public op name -> the registered fakequant::_triton_<op> (an OpOverloadPacket), the kernels that the
# "triton" backend puts behind the public ops.
OPS = {}
# observe_range writes its state in place; every other op returns new tensors.
_MUTATED = {"observe_range": ("tracked_range", "scale", "zero_point")}
for _name, _wrapper in _HOST_WRAPPERS.items():
    triton_op(f"fakequant::_triton_{_name}", _wrapper, mutates_args=_MUTATED.get(_name, ()))
    OPS[_name] = getattr(torch.ops.fakequant, f"_triton_{_name}")
