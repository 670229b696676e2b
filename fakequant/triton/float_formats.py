"""Triton kernels of the float-format fake-quantization ops: FP8, MX and NVFP4; the Triton side of
``fakequant/ops/float_formats.py``, computing :mod:`fakequant.reference`'s float-format functions bit for bit.

Layout: a block is ``block_size`` consecutive elements in row-major order (for MX and NVFP4 a run along the last
dimension), so the blocked kernels read a contiguous ``x`` and write contiguous outputs; the host copies them into
``x``'s layout when ``torch.empty_like(x)`` is not contiguous. One program holds a ``[ROWS, COLS]`` tile of
``ROWS`` blocks: it reduces each block's amax in registers, derives the block's scale and writes the block, one
read and one write. Blocks wider than :data:`MAX_TILE_COLS` are walked in chunks (the first one kept in registers,
the others read twice). FP8 with one scale for the whole tensor walks memory in any dense layout; without a scale
a first launch writes per-program amax partials that every program of the second reduces again.

Numerics: the amax is the integer maximum of the fp32 bits with the sign cleared (for non-negative floats the
integer order is the float order, and a NaN's bits exceed inf's, so a NaN anywhere makes the amax NaN as torch's
``amax`` does; ``tl.max`` on floats may drop NaN on a GPU). Element rounding is the reference's
``round(v / spacing) * spacing``: the spacing ``2^(max(e, emin) - mbits)`` and its reciprocal are built from bits,
so both products are exact, and :func:`round_half_even` rounds. Every division, ``x / s`` of FP8 per element
included, is ``div_rn`` (IEEE) as the reference's. Clamps are
comparisons, so NaN passes through. The reference relies on fp32 subnormals in several places (subnormal inputs,
the MX factor 2^-127 and dequantization scale 2^-127, products below 2^-126, amax / max below 2^-126 in the
rceil code): the kernels use plain ``*``, ``div_rn`` and comparisons, which Triton emits as ``mul.f32``,
``div.rn.f32`` and ``setp.f32`` without ``.ftz`` (subnormals kept, as numpy keeps them under the interpreter), and
build the subnormal constants from bits. No expression has an ``a * b + c`` shape whose contraction into an FMA
could change a result (the only product feeding an addition, ``v * 2^k`` in the rounding, is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fakequant import checks
from fakequant.formats import ELEMENT_FORMATS
from fakequant.triton._common import (
    BLOCK_SIZE,
    as_float32,
    check_device,
    elementwise_outputs,
    has_values,
    launch,
    mask_output,
    round_half_even,
    to_dtype,
    triton_kernel,
)

# Blocks up to this many elements (rounded up to a power of two) are held in one tile; wider ones are walked in
# chunks of CHUNK_COLS. Not tuned on a GPU yet: 4096 fp32 values are 32 per thread of 4 warps.
MAX_TILE_COLS = 4096
CHUNK_COLS = 2048
# The amax partials of FP8's whole-tensor scale: at most MAX_PARTIALS programs, each over whole tiles of
# AMAX_BLOCK elements, so that every program of the second launch reduces at most MAX_PARTIALS values.
AMAX_BLOCK = 4096
MAX_PARTIALS = 1024

# Where fake_quant_fp8's kernel takes the scale from (its SCALE_MODE).
_BLOCK_AMAX = tl.constexpr(0)  # each block's amax
_PER_BLOCK = tl.constexpr(1)  # scale_ptr[block]
_TENSOR = tl.constexpr(2)  # scale_ptr[0] for the whole tensor
_TENSOR_AMAX = tl.constexpr(3)  # the amax partials at scale_ptr, for the whole tensor

_SMALLEST_NORMAL = tl.constexpr(2.0**-126)
# NVFP4's block scales are E4M3, its elements E2M1.
_E4M3 = ELEMENT_FORMATS["e4m3"]
_E2M1 = ELEMENT_FORMATS["e2m1"]
_E4M3_MAX = tl.constexpr(_E4M3.max)
_E4M3_EMIN = tl.constexpr(_E4M3.emin)
_E4M3_EMAX = tl.constexpr(_E4M3.emax)
_E4M3_MBITS = tl.constexpr(_E4M3.mbits)
_E2M1_MAX = tl.constexpr(_E2M1.max)
_E2M1_EMIN = tl.constexpr(_E2M1.emin)
_E2M1_EMAX = tl.constexpr(_E2M1.emax)
_E2M1_MBITS = tl.constexpr(_E2M1.mbits)
_E4M3_MIN_SCALE = tl.constexpr(2.0**_E4M3.emin)


# ---------------------------------------------------------------------------------------------
# Shared per-element math and tile helpers.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pow2(e):
    """``2^e`` for integer ``e`` in [-126, 127], exactly, from its fp32 bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _subnormal_2_pow_minus_127(like):
    """2^-127 (subnormal) in ``like``'s shape, from its bits as the other powers of two."""
    return tl.full(like.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _clamp(v, lo, hi):
    """``v`` clamped to ``[lo, hi]`` with comparisons: NaN passes through, as torch.clamp's."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _round_to_element(v, EMIN: tl.constexpr, EMAX: tl.constexpr, MBITS: tl.constexpr):
    """reference.round_to_element: fp32 ``v`` (within the format's range, or NaN) to the nearest element, ties to
    even, the sign of a zero kept. The exponent is read from the bits (a zero or subnormal reads -127, below
    EMIN); the EMAX bound only keeps NaN's exponent 128 from building a power of two out of range."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    shift = tl.minimum(tl.maximum(e, EMIN), EMAX) - MBITS
    return round_half_even(v * _pow2(-shift)) * _pow2(shift)


@triton.jit
def _load_tile(x_ptr, rows, start, block_size, n_elements, COLS: tl.constexpr):
    """Elements ``[start, start + COLS)`` of each block of ``rows`` (int64) in fp32, their offsets and in-bounds
    mask."""
    cols = start + tl.arange(0, COLS)
    offsets = rows[:, None] * block_size + cols[None, :]
    in_bounds = (cols < block_size)[None, :] & (offsets < n_elements)
    x = as_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0.0))
    return x, offsets, in_bounds


@triton.jit
def _abs_bits(x):
    """``|x|``'s fp32 bits as int32: ordered as the magnitudes, NaN above inf."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _block_amax(x_ptr, first, rows, block_size, n_elements, COLS: tl.constexpr):
    """Each block's ``max(|x|)`` (NaN if it holds one): ``first`` is its first chunk, already loaded; the others
    (blocks wider than COLS) are read here."""
    bits = tl.max(_abs_bits(first), axis=1)
    for start in range(COLS, block_size, COLS):
        x, _, _ = _load_tile(x_ptr, rows, start, block_size, n_elements, COLS)
        bits = tl.maximum(bits, tl.max(_abs_bits(x), axis=1))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK: tl.constexpr):
    tl.store(out_ptr + offsets, to_dtype(out, out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, inside, mask=in_bounds)


# ---------------------------------------------------------------------------------------------
# Host helpers.
# ---------------------------------------------------------------------------------------------


def _tile(block_size: int) -> tuple[int, int]:
    """``(ROWS, COLS)`` of the blocked kernels' tile for blocks of ``block_size``."""
    cols = triton.next_power_of_2(block_size)
    if cols > MAX_TILE_COLS:
        return 1, CHUNK_COLS
    return max(1, BLOCK_SIZE // cols), cols


def _row_major_outputs(x: torch.Tensor, compute_mask: bool):
    """``(x_c, out, mask, out_c, mask_c)``: ``x`` checked for a device the kernels run on and contiguous, the
    outputs in ``x``'s layout, and the contiguous buffers the kernel writes (the outputs themselves when
    ``torch.empty_like(x)`` is contiguous, else copied into them by :func:`_finish`)."""
    check_device(x)
    x_c = x.contiguous()
    out = torch.empty_like(x)
    mask = mask_output(x, compute_mask)
    if out.is_contiguous():
        return x_c, out, mask, out, mask
    return x_c, out, mask, torch.empty_like(x_c), mask_output(x_c, compute_mask)


def _finish(out, mask, out_c, mask_c):
    if out_c is not out:
        out.copy_(out_c)
        mask.copy_(mask_c)
    return out, mask


# ---------------------------------------------------------------------------------------------
# fake_quant_fp8
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fp8_scale(amax, MAX: tl.constexpr, SCALE_MAX: tl.constexpr):
    """reference.fp8_scale_from_amax: ``amax / max`` clamped to ``[2^-126, 2^(126 - emax)]``, NaN kept."""
    return _clamp(tl.math.div_rn(amax, tl.full(amax.shape, MAX, tl.float32)), _SMALLEST_NORMAL, SCALE_MAX)


@triton.jit
def _fp8_values(x, s, MAX: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, MBITS: tl.constexpr):
    """``(out, inside)``: ``round(clamp(x / s)) * s`` and ``|x / s| <= max``."""
    v = tl.math.div_rn(x, s)
    out = _round_to_element(_clamp(v, -MAX, MAX), EMIN, EMAX, MBITS) * s
    return out, tl.abs(v) <= MAX


@triton.jit
def _fp8_amax_kernel(x_ptr, partial_ptr, n_elements, tiles_per_program, BLOCK: tl.constexpr):
    # Program p reduces tiles [p * tiles_per_program, (p + 1) * tiles_per_program) to one partial (fp32 bits).
    pid = tl.program_id(0).to(tl.int64)
    bits = tl.zeros([BLOCK], tl.int32)
    for t in range(0, tiles_per_program):
        offsets = (pid * tiles_per_program + t) * BLOCK + tl.arange(0, BLOCK)
        x = as_float32(tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0))
        bits = tl.maximum(bits, _abs_bits(x))
    tl.store(partial_ptr + pid, tl.max(bits, axis=0))


@triton.jit
def _fake_quant_fp8_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    n_elements,
    n_blocks,
    block_size,
    n_partials,
    MAX: tl.constexpr,
    SCALE_MAX: tl.constexpr,
    EMIN: tl.constexpr,
    EMAX: tl.constexpr,
    MBITS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    PARTIALS: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    # Program p takes blocks [p * ROWS, (p + 1) * ROWS). With one scale for the whole tensor (_TENSOR,
    # _TENSOR_AMAX) the host passes block_size = COLS: the "blocks" are then just the tiles of a memory walk.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    x, offsets, in_bounds = _load_tile(x_ptr, rows, 0, block_size, n_elements, COLS)
    if SCALE_MODE == _BLOCK_AMAX:
        s = _fp8_scale(_block_amax(x_ptr, x, rows, block_size, n_elements, COLS), MAX, SCALE_MAX)[:, None]
    elif SCALE_MODE == _PER_BLOCK:
        s = tl.load(scale_ptr + rows, mask=rows < n_blocks, other=1.0)[:, None]
    elif SCALE_MODE == _TENSOR:
        s = tl.load(scale_ptr)
    else:
        p = tl.arange(0, PARTIALS)
        bits = tl.max(tl.load(scale_ptr + p, mask=p < n_partials, other=0), axis=0)
        s = _fp8_scale(bits.to(tl.float32, bitcast=True), MAX, SCALE_MAX)
    s = tl.broadcast_to(s, [ROWS, COLS])
    out, inside = _fp8_values(x, s, MAX, EMIN, EMAX, MBITS)
    _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK)
    for start in range(COLS, block_size, COLS):  # blocks wider than COLS only
        x, offsets, in_bounds = _load_tile(x_ptr, rows, start, block_size, n_elements, COLS)
        out, inside = _fp8_values(x, s, MAX, EMIN, EMAX, MBITS)
        _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK)


@triton_kernel("fake_quant_fp8")
def fake_quant_fp8_triton(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: str,
    block_size: int = 0,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_fp8``: ``(out, mask)`` in ``x``'s layout."""
    n_blocks, size = checks.check_fp8_args(x, scale, fmt, block_size, check_values=scale is None or has_values(scale))
    element = ELEMENT_FORMATS[fmt]
    formats = dict(MAX=element.max, SCALE_MAX=2.0 ** (126 - element.emax), EMIN=element.emin, EMAX=element.emax,
                   MBITS=element.mbits)  # fmt: skip
    n_elements = x.numel()
    if block_size == 0:
        # One scale: the order of the elements does not matter, so the kernels walk x's memory in its layout.
        x_c, out, mask = elementwise_outputs(x, compute_mask)
        out_c, mask_c = out, mask
    else:
        x_c, out, mask, out_c, mask_c = _row_major_outputs(x, compute_mask)
    if n_elements == 0:
        return out, mask
    n_partials = 1
    if block_size == 0:
        rows, cols = 1, BLOCK_SIZE
        size, n_blocks = cols, triton.cdiv(n_elements, cols)
        if scale is None:
            tiles = triton.cdiv(n_elements, AMAX_BLOCK)
            tiles_per_program = triton.cdiv(tiles, MAX_PARTIALS)
            n_partials = triton.cdiv(tiles, tiles_per_program)
            partials = torch.empty(n_partials, dtype=torch.int32, device=x.device)
            launch(_fp8_amax_kernel, (n_partials,), x, x_c, partials, n_elements, tiles_per_program, BLOCK=AMAX_BLOCK)
            scale_arg, mode = partials, _TENSOR_AMAX
        else:
            scale_arg, mode = scale, _TENSOR
    else:
        rows, cols = _tile(size)
        scale_arg, mode = (x_c, _BLOCK_AMAX) if scale is None else (scale.contiguous(), _PER_BLOCK)
    launch(
        _fake_quant_fp8_kernel, (triton.cdiv(n_blocks, rows),), x,
        x_c,
        out_c,
        mask_c if compute_mask else out_c,
        scale_arg,
        n_elements,
        n_blocks,
        size,
        n_partials,
        **formats,
        SCALE_MODE=mode.value,
        PARTIALS=triton.next_power_of_2(n_partials),
        WRITE_MASK=compute_mask,
        ROWS=rows,
        COLS=cols,
    )
    return _finish(out, mask, out_c, mask_c)


# ---------------------------------------------------------------------------------------------
# fake_quant_mx
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mx_scales(amax, MAX: tl.constexpr, EMAX: tl.constexpr, RCEIL: tl.constexpr):
    """reference.mx_scales from the blocks' fp32 ``amax``, and the dequantization scale: ``(factor, dequant)``."""
    bits = amax.to(tl.int32, bitcast=True)
    if RCEIL:
        descale = tl.math.div_rn(amax, tl.full(amax.shape, MAX, tl.float32))
        dbits = descale.to(tl.int32, bitcast=True)
        dexp = ((dbits >> 23) & 0xFF) - 127
        mantissa = dbits & 0x7FFFFF
        # ceil(log2(descale)) exactly; a subnormal descale gives -126 above 2^-127, at most -127 otherwise.
        ceil_log2 = tl.where(
            dexp > -127, dexp + (mantissa != 0).to(tl.int32), tl.where(mantissa > 0x400000, -126, -127)
        )
        code = tl.minimum(tl.maximum(ceil_log2, -127), 127) + 127
        code = tl.where(descale == 0.0, 0, code)
        code = tl.where((dexp == 128) & (mantissa == 0), 254, code)  # inf
        code = tl.where(descale != descale, 255, code)
        factor = tl.where(code == 0, 1.0, _pow2(tl.maximum(127 - code, -126)))
        factor = tl.where(code == 254, _subnormal_2_pow_minus_127(factor), factor)
        factor = tl.where(code == 255, float("nan"), factor)
    else:
        exponent = ((bits >> 23) & 0xFF) - 127
        code = tl.minimum(tl.maximum(exponent - EMAX, -127), 128) + 127
        code = tl.where(amax != amax, 255, code)
        # 1 / max(2^(code - 127), 2^-126): 2^126 for codes 0 and 1, 2^-127 for 254, 0 for 255 (1 / inf).
        factor = _pow2(tl.minimum(tl.maximum(127 - code, -126), 126))
        factor = tl.where(code == 254, _subnormal_2_pow_minus_127(factor), factor)
        factor = tl.where(code == 255, 0.0, factor)
    # 2^(code - 127), NaN for code 255: code 0 gives the subnormal 2^-127.
    dequant = _pow2(tl.minimum(tl.maximum(code - 127, -126), 127))
    dequant = tl.where(code == 0, _subnormal_2_pow_minus_127(dequant), dequant)
    dequant = tl.where(code == 255, float("nan"), dequant)
    return factor, dequant


@triton.jit
def _scaled_values(x, factor, dequant, MAX: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                   MBITS: tl.constexpr):  # fmt: skip
    """``(out, inside)``: ``v = x * factor``, ``round(clamp(v)) * dequant`` and ``|v| <= max`` (MX and NVFP4)."""
    v = x * factor
    out = _round_to_element(_clamp(v, -MAX, MAX), EMIN, EMAX, MBITS) * dequant
    return out, tl.abs(v) <= MAX


@triton.jit
def _fake_quant_mx_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    n_elements,
    block_size,
    MAX: tl.constexpr,
    EMIN: tl.constexpr,
    EMAX: tl.constexpr,
    MBITS: tl.constexpr,
    RCEIL: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    # Program p takes blocks [p * ROWS, (p + 1) * ROWS) of the contiguous x.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    x, offsets, in_bounds = _load_tile(x_ptr, rows, 0, block_size, n_elements, COLS)
    factor, dequant = _mx_scales(_block_amax(x_ptr, x, rows, block_size, n_elements, COLS), MAX, EMAX, RCEIL)
    factor = tl.broadcast_to(factor[:, None], [ROWS, COLS])
    dequant = tl.broadcast_to(dequant[:, None], [ROWS, COLS])
    out, inside = _scaled_values(x, factor, dequant, MAX, EMIN, EMAX, MBITS)
    _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK)
    for start in range(COLS, block_size, COLS):  # blocks wider than COLS only
        x, offsets, in_bounds = _load_tile(x_ptr, rows, start, block_size, n_elements, COLS)
        out, inside = _scaled_values(x, factor, dequant, MAX, EMIN, EMAX, MBITS)
        _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK)


@triton_kernel("fake_quant_mx")
def fake_quant_mx_triton(
    x: torch.Tensor,
    elem: str,
    block_size: int = 32,
    scale_mode: str = "floor",
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_mx``: ``(out, mask)`` in ``x``'s layout."""
    checks.check_mx_args(x, elem, block_size, scale_mode)
    element = ELEMENT_FORMATS[elem]
    x_c, out, mask, out_c, mask_c = _row_major_outputs(x, compute_mask)
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    rows, cols = _tile(block_size)
    launch(
        _fake_quant_mx_kernel, (triton.cdiv(n_elements // block_size, rows),), x,
        x_c,
        out_c,
        mask_c if compute_mask else out_c,
        n_elements,
        block_size,
        MAX=element.max,
        EMIN=element.emin,
        EMAX=element.emax,
        MBITS=element.mbits,
        RCEIL=scale_mode == "rceil",
        WRITE_MASK=compute_mask,
        ROWS=rows,
        COLS=cols,
    )
    return _finish(out, mask, out_c, mask_c)


# ---------------------------------------------------------------------------------------------
# fake_quant_nvfp4
# ---------------------------------------------------------------------------------------------


@triton.jit
def _nvfp4_scales(amax, p_ptr, HAS_P: tl.constexpr):
    """``(factor, dequant)`` of reference.fake_quant_nvfp4_forward from the blocks' fp32 ``amax``: with the
    per-tensor scale P, ``(1 / P) / s`` and ``P * s``, else ``1 / s`` and ``s``; ``s`` the E4M3 block scale."""
    block_scale = tl.math.div_rn(amax, tl.full(amax.shape, _E2M1_MAX, tl.float32))
    one = tl.full(amax.shape, 1.0, tl.float32)
    if HAS_P:
        p = tl.load(p_ptr)
        s = _clamp(tl.math.div_rn(block_scale, tl.broadcast_to(p, amax.shape)), _E4M3_MIN_SCALE, _E4M3_MAX)
        s = _round_to_element(s, _E4M3_EMIN, _E4M3_EMAX, _E4M3_MBITS)
        factor = tl.math.div_rn(tl.math.div_rn(one, tl.broadcast_to(p, amax.shape)), s)
        dequant = p * s
    else:
        s = _round_to_element(_clamp(block_scale, _E4M3_MIN_SCALE, _E4M3_MAX), _E4M3_EMIN, _E4M3_EMAX, _E4M3_MBITS)
        factor = tl.math.div_rn(one, s)
        dequant = s
    return factor, dequant


@triton.jit
def _fake_quant_nvfp4_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    p_ptr,
    n_elements,
    block_size,
    HAS_P: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    # Program p takes blocks [p * ROWS, (p + 1) * ROWS) of the contiguous x.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    x, offsets, in_bounds = _load_tile(x_ptr, rows, 0, block_size, n_elements, COLS)
    factor, dequant = _nvfp4_scales(_block_amax(x_ptr, x, rows, block_size, n_elements, COLS), p_ptr, HAS_P)
    factor = tl.broadcast_to(factor[:, None], [ROWS, COLS])
    dequant = tl.broadcast_to(dequant[:, None], [ROWS, COLS])
    out, inside = _scaled_values(x, factor, dequant, _E2M1_MAX, _E2M1_EMIN, _E2M1_EMAX, _E2M1_MBITS)
    _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK)
    for start in range(COLS, block_size, COLS):  # blocks wider than COLS only
        x, offsets, in_bounds = _load_tile(x_ptr, rows, start, block_size, n_elements, COLS)
        out, inside = _scaled_values(x, factor, dequant, _E2M1_MAX, _E2M1_EMIN, _E2M1_EMAX, _E2M1_MBITS)
        _store(out_ptr, mask_ptr, offsets, in_bounds, out, inside, WRITE_MASK)


@triton_kernel("fake_quant_nvfp4")
def fake_quant_nvfp4_triton(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | None,
    block_size: int = 16,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fakequant::fake_quant_nvfp4``: ``(out, mask)`` in ``x``'s layout."""
    checks.check_nvfp4_args(
        x, per_tensor_scale, block_size, check_values=per_tensor_scale is None or has_values(per_tensor_scale)
    )
    x_c, out, mask, out_c, mask_c = _row_major_outputs(x, compute_mask)
    n_elements = x.numel()
    if n_elements == 0:
        return out, mask
    rows, cols = _tile(block_size)
    launch(
        _fake_quant_nvfp4_kernel, (triton.cdiv(n_elements // block_size, rows),), x,
        x_c,
        out_c,
        mask_c if compute_mask else out_c,
        x_c if per_tensor_scale is None else per_tensor_scale,
        n_elements,
        block_size,
        HAS_P=per_tensor_scale is not None,
        WRITE_MASK=compute_mask,
        ROWS=rows,
        COLS=cols,
    )
    return _finish(out, mask, out_c, mask_c)
