"""Triton kernels of ``observe_range`` (``fakequant/ops/observe.py``): a min/max partial reduction and a finalize
kernel that moves the tracked range and sets the scale and zero point.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fakequant import checks
from fakequant.triton._common import (
    add_rn,
    channel_geometry,
    check_device,
    dense,
    launch,
    mul_rn,
    round_half_even,
    sub_rn,
    to_dtype,
    triton_kernel,
)

# ---------------------------------------------------------------------------------------------
# observe_range
# ---------------------------------------------------------------------------------------------

# Elements per loop step of the min/max partial kernel (a [BLOCK_C, BLOCK_K] tile of channels by elements)
# and entries per step of the finalize kernel. Not tuned on a GPU yet; 1024 as the element-wise
# kernels, and under the interpreter larger tiles only mean fewer numpy calls.
OBSERVE_BLOCK_SIZE = 1024
# At most about this many partial-reduction programs (enough to fill a GPU with a few programs per SM, few
# enough that the finalize kernel combines at most this many partials per entry), each over at least
# OBSERVE_MIN_STEPS loop steps of OBSERVE_BLOCK_SIZE elements (32 per thread with 4 warps, which the CUDA
# kernel's 16 per thread of 256 threads also aims at). Not tuned on a GPU yet; under the interpreter the
# minimum of 4 steps halves a per-tensor range's time (fewer programs).
OBSERVE_PROGRAMS = 1024
OBSERVE_MIN_STEPS = 4



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

    Only folded channel ranges can hold NaN (a NaN or infinite fold factor), and torch's ``amin`` over them (the
    reference's) propagates it. ``tl.min``/``tl.max`` do not promise to (on a GPU they may return the other
    operand), so NaN is counted separately and the reduction sees +-inf in its place.
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
        # Only finite elements count (NaN fails both comparisons): a lane that sees none keeps (+inf, -inf).
        counted = in_bounds & (v > float("-inf")) & (v < float("inf"))
        lo = tl.where(counted & (v < lo), v, lo)
        hi = tl.where(counted & (v > hi), v, hi)
    # NaN-free, so the plain reductions are exact; a channel without a finite element gives (+inf, -inf).
    row_lo = tl.min(lo, axis=1)
    row_hi = tl.max(hi, axis=1)
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
        lo = tl.where(a < lo, a, lo)  # the partials hold no NaN
        hi = tl.where(b > hi, b, hi)
    lo = tl.min(lo, axis=1)
    hi = tl.max(hi, axis=1)
    if HAS_FOLD:
        # Rounding is monotonic: min(w) * f is min(w * f) for f >= 0; a negative f swaps the ends.
        f = tl.load(fold_ptr + c, mask=c_in, other=1.0)
        a = lo * f
        b = hi * f
        negative = f < 0.0
        # A channel without a finite element keeps (+inf, -inf) whatever its factor (inf * 0 would be NaN).
        found = lo <= hi
        lo = tl.where(found, tl.where(negative, b, a), lo)
        hi = tl.where(found, tl.where(negative, a, b), hi)
    return lo, hi



@triton.jit
def _moving_average(tracked, observed, averaging_constant):
    """``tracked + (observed - tracked) * c``, each operation rounded to fp32 (no FMA)."""
    return add_rn(tracked, mul_rn(sub_rn(observed, tracked), averaging_constant))


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
    # A batch range with min <= max came from finite elements; (+inf, -inf) (no finite element) or NaN (a
    # non-finite fold factor) is no range, and leaves the tracked range as it was.
    found = lo <= hi
    if RELU:
        # ReLU is monotonic, so relu(min) and relu(max) are the ends of relu(x)'s range. As torch.relu (the
        # reference's): negatives become +0 and -0.0 stays -0.0 (a comparison, not tl.maximum).
        lo = tl.where(found & (lo < 0.0), 0.0, lo)
        hi = tl.where(found & (hi < 0.0), 0.0, hi)

    min_ptr = tracked_ptr + e * tracked_entry_stride
    max_ptr = min_ptr + tracked_row_stride
    old_lo = tl.load(min_ptr, mask=e_in, other=0.0).to(tl.float32)
    old_hi = tl.load(max_ptr, mask=e_in, other=0.0).to(tl.float32)
    if not REPLACE:
        lo = _moving_average(old_lo, lo, averaging_constant)
        hi = _moving_average(old_hi, hi, averaging_constant)
    lo = tl.where(found, lo, old_lo)
    hi = tl.where(found, hi, old_hi)
    tl.store(min_ptr, to_dtype(lo, tracked_ptr.dtype.element_ty), mask=e_in & found)
    tl.store(max_ptr, to_dtype(hi, tracked_ptr.dtype.element_ty), mask=e_in & found)

    # choose_qparams (docs/numerics.md, Choosing scale and zero point) on the fp32 range, operation by operation,
    # NaN propagating (a NaN tracked range the batch left unchanged).
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
        zero_point = quant_min - round_half_even(tl.math.div_rn(min_neg, scale))
        zero_point = tl.where(
            zero_point < quant_min, quant_min, tl.where(zero_point > quant_max, quant_max, zero_point)
        )
    tl.store(scale_ptr + e * scale_stride, to_dtype(scale, scale_ptr.dtype.element_ty), mask=e_in)
    # A NaN zero point (from a NaN range) is INT32_MIN, as the reference's float -> int32 conversion gives.
    is_nan = zero_point != zero_point
    integer = tl.where(is_nan, 0.0, zero_point).to(tl.int32)
    integer = tl.where(is_nan, -2147483648, integer)
    tl.store(zero_point_ptr + e * zero_point_stride, integer.to(zero_point_ptr.dtype.element_ty), mask=e_in)


def fp32(value: float) -> float:
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


@triton_kernel("observe_range")
def observe_range_triton(
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

    Two launches: per-channel min/max partials of the finite elements of the dense ``x`` read in memory order,
    then one lane per entry that combines them, applies ``fold`` (and, with ``relu``, ReLU to both ends of the
    range), the moving average and ``choose_qparams``, and stores in the state tensors' own dtypes and strides;
    an entry without a finite element keeps its tracked range.
    """
    axis = checks.check_observe_range_args(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, fold
    )
    check_device(x)
    x_dense = dense(x)
    n_elements = x.numel()
    # The batch range per channel of channel_axis (with fold: per output channel, reduced after folding
    # when the range is per tensor).
    channel_axis = 0 if fold is not None else axis
    run, channels = (1, 1) if channel_axis is None else channel_geometry(x_dense, channel_axis)
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
    launch(
        _observe_range_partial_kernel, (channel_tiles * splits,), x,
        x_dense,
        partial,
        per_channel,
        run,
        channels,
        splits,
        steps_per_split * block_k,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
    )
    launch(
        _observe_range_finalize_kernel, (1 if reduce_channels else triton.cdiv(entries, block_e),), x,
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
        fp32(averaging_constant),
        fp32(divisor),
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
    )
