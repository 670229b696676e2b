"""What the Triton kernels share: per-element math, host helpers, and the registration of a host function.

Layout: the element-wise kernels walk memory, not indices. A non-overlapping and dense input (contiguous,
channels_last or any permutation of dimensions) and ``torch.empty_like`` outputs share one layout, so
memory offset ``o`` holds the same element in every one of them, and the channel of that element is
``(o // stride[axis]) % size[axis]``. Any other input (a slice with gaps, an expanded tensor) is first
copied into a dense ``torch.empty_like`` tensor, which has the layout of the outputs.

Numerics (docs/numerics.md, Conventions): fp32 compute for every input dtype; the reciprocal ``1 / scale`` is an
IEEE division (``div_rn``), as the reference's; rounding is half to even by :func:`round_half_even`, the one
function used on every path, the Triton interpreter's included; the mask is taken on the unclamped ``q``.
The forward expressions have no ``a * b + c`` shape, so contracting into an FMA cannot change them; the
moving average and the LSQ terms have one and are written with PTX's explicitly rounded ``sub.rn``/``mul.rn``/
``add.rn`` on the GPU. What the interpreter cannot show about the GPU build (the rounding kept as two FADDs,
``div.rn``, no ``min``/``max`` in the clamp, no FMA, 64-bit offsets) tests/backends/test_triton.py checks in PTX and
SASS built for sm_80.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from fakequant.ops import register_kernel

# True when triton decorated the kernels for its interpreter (TRITON_INTERPRET=1 at import): then the
# kernels run on CPU tensors, with numpy float32 arithmetic. (triton.knobs exists from Triton 3.4 on.)
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

# Elements per program and warps per program of the element-wise kernels: 1024 elements over 4 warps is
# 8 elements per thread (two 16-byte fp32 vectors). Not tuned on a GPU yet (bench/ measures it where one is);
# under the interpreter a larger block would only be faster.
BLOCK_SIZE = 1024
NUM_WARPS = 4


def triton_kernel(name: str) -> Callable[[Callable], Callable]:
    """Decorator: registers a host function as ``fakequant::_triton_<name>`` (a ``torch.library.triton_op``, which
    ``torch.compile`` traces into) and as the ``"triton"`` backend's kernel of ``fakequant::<name>``.

    The arguments it writes in place are read from the public op's schema (``Tensor(a!)``), so the two cannot
    disagree.
    """

    def decorator(host: Callable) -> Callable:
        schema = getattr(torch.ops.fakequant, name).default._schema
        mutated = tuple(arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write)
        triton_op(f"fakequant::_triton_{name}", host, mutates_args=mutated)
        register_kernel(name, "triton")(getattr(torch.ops.fakequant, f"_triton_{name}"))
        return host

    return decorator


# 2^23: from there on every fp32 value is an integer.
TWO_POW_23 = tl.constexpr(8388608.0)


# ---------------------------------------------------------------------------------------------
# Shared per-element math.
# ---------------------------------------------------------------------------------------------


@triton.jit
def round_half_even(v):
    """Rounds fp32 ``v`` to the nearest integer, ties to even, exactly as ``rintf``/``torch.round``.

    ``libdevice.rint`` does not run under the Triton interpreter (3.8), so both the GPU and the interpreter
    use this: for ``|v| < 2^23``, ``|v| + 2^23`` lies in ``[2^23, 2^24)`` where the fp32 spacing is 1, so the
    addition itself rounds ``|v|`` half to even and subtracting ``2^23`` again is exact. Larger values, inf
    and NaN are integers (or NaN) already and pass through. The sign is copied back bit for bit, so ``-0.3``
    gives ``-0.0`` as ``rintf`` does. Neither LLVM nor ptxas reassociates fp32 additions without fast-math
    flags, which Triton does not set (the sm_80 SASS holds ``FADD |v|, 8388608`` then ``FADD -8388608``).
    """
    magnitude = tl.abs(v)
    rounded = (magnitude + TWO_POW_23) - TWO_POW_23
    rounded = tl.where(magnitude < TWO_POW_23, rounded, magnitude)
    sign_bit = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (rounded.to(tl.uint32, bitcast=True) | sign_bit).to(tl.float32, bitcast=True)


@triton.jit
def as_float32(v):
    """``v`` widened to fp32 exactly.

    bfloat16 is widened with integer operations because the Triton interpreter (3.8) mis-converts bf16
    subnormals on bf16 -> fp32 casts (1e-40 became 0); on a GPU both forms
    are the same exact conversion.
    """
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
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
def fake_quant_values(v, inv_scale, scale, zero_point, quant_min, quant_max):
    """``(out, inside)`` of fp32 ``v``: ``q = rint(v * inv_scale) + zero_point``, mask on the unclamped q.

    The clamp is written with comparisons so that NaN falls through both and stays NaN (``tl.minimum`` and
    ``tl.maximum`` may return the other operand for NaN on a GPU); ``inf`` lands on the range ends.
    """
    q = round_half_even(v * inv_scale) + zero_point
    inside = (q >= quant_min) & (q <= quant_max)
    clamped = tl.where(q < quant_min, quant_min, tl.where(q > quant_max, quant_max, q))
    return (clamped - zero_point) * scale, inside


# The moving average is rounded after each operation, as the reference's separate tensor ops. Compiled for
# a GPU, `t + (b - t) * c` would be contracted into an FMA (Triton enables fp fusion by default), so the
# compiled kernels spell out PTX's explicitly rounded sub.rn/mul.rn/add.rn, which are never contracted: the
# CUDA kernel's __fsub_rn/__fmul_rn/__fadd_rn. (libdevice's versions of those flush denormals to zero under
# Triton's default enable_reflect_ftz, and launch options such as enable_fp_fusion=False may not survive
# torch.compile.) The interpreter runs no PTX and rounds every numpy float32 operation anyway.
INTERPRETED_CONSTEXPR = tl.constexpr(INTERPRETED)


@triton.jit
def mul_rn(a, b):
    """``a * b`` rounded to fp32 on its own (PTX's mul.rn, never contracted into an FMA)."""
    if INTERPRETED_CONSTEXPR:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip


@triton.jit
def sub_rn(a, b):
    if INTERPRETED_CONSTEXPR:
        return a - b
    else:
        return tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip


@triton.jit
def add_rn(a, b):
    if INTERPRETED_CONSTEXPR:
        return a + b
    else:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Host helpers.
# ---------------------------------------------------------------------------------------------


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """True when the elements of ``t`` fill ``[data_ptr, data_ptr + numel)`` exactly once."""
    expected_stride = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when equal memory offsets hold equal indices in ``a`` and ``b`` (size-1 strides do not count)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, size in zip(a.stride(), b.stride(), a.shape, strict=True) if size != 1
    )


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when dense, else a dense copy in the layout ``torch.empty_like(t)`` gives the outputs."""
    if is_non_overlapping_and_dense(t):
        return t
    return torch.empty_like(t).copy_(t)


def dense_like(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``t`` when it shares ``layout``'s memory layout, else a copy of ``t`` in that layout."""
    if same_layout(t, layout):
        return t
    return torch.empty_like(layout, dtype=t.dtype).copy_(t)


def has_values(t: torch.Tensor) -> bool:
    """False for the fake tensors this wrapper sees as the triton_op's fake impl (no values to check)."""
    return not is_fake(t)


def check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu"):
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            "fakequant: the Triton kernels run on CPU tensors only under the Triton interpreter; set "
            "TRITON_INTERPRET=1 before triton is imported, or choose another backend for CPU tensors"
        )
    raise RuntimeError(f"fakequant: the Triton kernels run on CUDA tensors, got a tensor on {t.device}")


def device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def mask_output(x: torch.Tensor, compute_mask: bool) -> torch.Tensor:
    if compute_mask:
        return torch.empty_like(x, dtype=torch.bool)
    return torch.empty(0, dtype=torch.bool, device=x.device)


def elementwise_grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, BLOCK_SIZE),)


def channel_geometry(t: torch.Tensor, axis: int) -> tuple[int, int]:
    """``(stride, size)`` of ``axis`` in dense ``t``: memory offset ``o`` lies in channel ``(o // stride) % size``."""
    size = t.size(axis)
    return (t.stride(axis) if size > 1 else 1), size


def elementwise_outputs(x: torch.Tensor, compute_mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_dense, out, mask)`` of an element-wise op: ``x`` checked for a device the kernels run on, dense, and
    outputs in its layout (the same memory offsets hold the same elements in all three)."""
    check_device(x)
    x_dense = dense(x)
    out = torch.empty_like(x)
    mask = mask_output(x, compute_mask)
    assert same_layout(out, x_dense), "empty_like must give the layout of the dense input"
    return x_dense, out, mask


def launch(kernel, grid: tuple[int, ...], device_of: torch.Tensor, *args, **meta) -> None:
    """Launches ``kernel`` over ``grid`` on ``device_of``'s device, through ``wrap_triton`` so that ``torch.compile``
    traces it, with :data:`NUM_WARPS` warps unless ``meta`` says otherwise."""
    meta.setdefault("num_warps", NUM_WARPS)
    with device_guard(device_of):
        wrap_triton(kernel)[grid](*args, **meta)
