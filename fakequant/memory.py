"""Keeping freed CPU memory in the process, so that training steps do not page-fault it back in.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks with ``mmap`` and hands
them back to the kernel when they are freed (and trims the top of its heap once enough there is free), so a
training loop that allocates the same activations, gradients and fake-quantized weights on every step touches
fresh pages on every step: a page fault per 4 KiB, which the kernel zero-fills, thousands per step on a
ResNet-50 (the QAT step allocates each folded weight, its mask and its gradient besides; the measurements are in
docs/benchmarks.md, Numbers once quoted in code comments). :func:`retain_freed_memory` leaves none after the first
steps. GPU training is not affected (PyTorch caches CUDA memory itself). Preloading jemalloc or tcmalloc
(``LD_PRELOAD``) is the other common remedy.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it accepts (2 GiB of free heap top before trimming)
_LARGEST_TRIM_THRESHOLD = 2**31 - 1


def retain_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory in the process for reuse instead of returning it.

    Two ``mallopt`` settings for the rest of the process: no ``mmap`` for large blocks (they come from the heap,
    where freed blocks are reused), and no trimming of the heap's free top. The process's memory then stays near its
    peak (a training loop reaches that peak on every step anyway; a few percent above glibc's defaults on the
    ResNet-50 example) and the steps after the first take no page
    faults. It cannot be undone. A process-wide setting, so call it once at the start of a CPU training script,
    before comparing step times: it speeds up FP32 training too. Not called by the quantizers.

    Returns:
        True if glibc accepted both settings; False (and nothing changed) on other C libraries and platforms.

    Example:
        >>> import fakequant
        >>> fakequant.retain_freed_memory()  # doctest: +SKIP
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into the process, the C library's among them
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl, for example, has no tunable malloc)
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD) == 1
