"""Loading the compiled extension and choosing which kernels serve the ``fakequant::`` ops.

The compiled extension ``fakequant._C`` registers C++ (and, in a CUDA build, CUDA) kernels on the
CPU/CUDA dispatch keys when it is imported, and C++ autograd kernels on the Autograd key; without it,
:func:`init` registers the Python autograd of :mod:`fakequant.ops` instead. A backend choice stacks at most one more
``torch.library.Library`` of Python kernels on those keys; choosing another backend destroys it first,
and the dispatcher falls back to what was registered before (``_C``'s kernels, else the reference
registered as the ``"default"`` kernel in :mod:`fakequant.ops`).

Backends:

* ``"auto"`` (the default): CPU tensors use ``_C``'s C++ kernels; CUDA tensors use ``_C``'s CUDA kernels
  when it was built with CUDA, else the Triton kernels when triton imports, else the reference.
* ``"cuda"``: ``_C``'s kernels on every device (C++ on CPU tensors, CUDA on CUDA tensors).
* ``"triton"``: the Triton kernels (:mod:`fakequant.triton`) on CUDA tensors, and on CPU tensors
  under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
* ``"reference"``: the pure-PyTorch kernels on every device.

Set ``FAKEQUANT_DISABLE_EXTENSION=1`` to skip loading ``_C`` (for example to rule out a bad build);
``FAKEQUANT_BACKEND`` picks the backend at import time, as :func:`set_backend` does later.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from fakequant import ops

BACKENDS = ("auto", "cuda", "triton", "reference")

_extension = None
_extension_error: str | None = None
_extension_has_cuda = False
_triton = None
_triton_error: str | None = None
_override_lib: torch.library.Library | None = None
_backend = "auto"


def load_extension() -> None:
    """Imports ``fakequant._C`` once; on failure warns once and keeps the reference kernels."""
    global _extension, _extension_error, _extension_has_cuda
    if _extension is not None or _extension_error is not None:
        return
    if os.environ.get("FAKEQUANT_DISABLE_EXTENSION", "") not in ("", "0"):
        _extension_error = "disabled by FAKEQUANT_DISABLE_EXTENSION"
        return
    try:
        _extension = importlib.import_module("fakequant._C")
    except (ImportError, OSError) as error:
        _extension_error = str(error)
        warnings.warn(
            f"fakequant: the compiled kernels (fakequant._C) could not be loaded ({error}); every op runs "
            "the pure-PyTorch reference instead. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    # Asked before any backend override exists, so only _C's own CUDA registrations can answer yes.
    _extension_has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{ops.LIBRARY}::fake_quant_per_tensor", "CUDA"
    )


def extension_loaded() -> bool:
    """True when the compiled kernels (``fakequant._C``) are registered."""
    return _extension is not None


def extension_error() -> str | None:
    """Why ``fakequant._C`` is not loaded, or None when it is."""
    return _extension_error


def extension_has_cuda() -> bool:
    """True when ``fakequant._C`` is loaded and holds CUDA kernels."""
    return _extension_has_cuda


def load_triton_kernels():
    """Imports :mod:`fakequant.triton` once (which registers its kernels); returns it, or None when triton cannot
    be used."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            _triton = importlib.import_module("fakequant.triton")
        except Exception as error:  # noqa: BLE001  (ImportError, or triton failing to set itself up)
            _triton_error = f"{type(error).__name__}: {error}"
    return _triton


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be chosen here, or None when it can.

    Example:
        >>> import fakequant._backend as backend
        >>> backend.backend_unavailable_reason("reference") is None
        True
    """
    _check_name(name)
    if name == "cuda":
        if _extension is None:
            return f"the compiled extension fakequant._C is not loaded ({_extension_error})"
        if not _extension_has_cuda:
            return (
                "fakequant._C was built without CUDA kernels (build with a CUDA build of torch and CUDA_HOME "
                "set, without FAKEQUANT_BUILD_CUDA=0)"
            )
    if name == "triton" and load_triton_kernels() is None:
        return f"triton cannot be imported ({_triton_error})"
    return None


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends whose kernels can run on tensors of ``device`` here, in :data:`BACKENDS` order.

    ``"triton"`` counts for CPU tensors only under the Triton interpreter; on a machine without a GPU
    no backend can run CUDA tensors.

    Example:
        >>> import fakequant._backend as backend
        >>> "reference" in backend.available_backends("cpu")
        True
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    names = []
    for name in BACKENDS:
        if backend_unavailable_reason(name) is not None:
            continue
        if name == "triton" and not (device.type == "cuda" or (device.type == "cpu" and _triton.INTERPRETED)):
            continue
        if name == "cuda" and device.type not in ("cpu", "cuda"):
            continue
        names.append(name)
    return names


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"fakequant: unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")


def _register_override(kernels_by_key: dict[str, dict]) -> None:
    global _override_lib
    lib = torch.library.Library(ops.LIBRARY, "IMPL")
    with warnings.catch_warnings():
        # The dispatcher warns that a kernel is overridden: that is exactly what a backend choice does.
        warnings.simplefilter("ignore")
        for key, kernels in kernels_by_key.items():
            for name, kernel in kernels.items():
                lib.impl(name, kernel, key)
    _override_lib = lib


def _auto_cuda_kernel(name: str):
    """The "auto" kernel for CUDA tensors when _C has no CUDA kernels: Triton, else the reference.

    Triton is imported on the first call, not when fakequant is, so that CPU-only users never pay for it.
    """

    def kernel(*args, **kwargs):
        if load_triton_kernels() is None:
            warnings.warn(
                f"fakequant: triton cannot be imported ({_triton_error}); CUDA tensors use the reference kernels",
                RuntimeWarning,
                stacklevel=2,
            )
            return ops.kernel(name, "reference")(*args, **kwargs)
        return ops.kernel(name, "triton")(*args, **kwargs)

    return kernel


def set_backend(name: str) -> None:
    """Chooses the kernels behind every ``fakequant::`` op.

    Args:
        name: ``"auto"`` (C++ kernels on CPU tensors; on CUDA tensors the CUDA kernels where built, else
            Triton, else the reference), ``"cuda"`` (the compiled extension's kernels on every device),
            ``"triton"`` (the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``) or
            ``"reference"`` (the pure-PyTorch kernels on every device).

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
        RuntimeError: the backend is not available here; the message says why.

    Example:
        >>> import fakequant
        >>> fakequant.set_backend("reference")
        >>> fakequant.set_backend("auto")
    """
    global _override_lib, _backend
    _check_name(name)
    reason = backend_unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fakequant: backend {name!r} is not available: {reason}")
    if _override_lib is not None:
        _override_lib._destroy()
        _override_lib = None
    if name in ("reference", "triton"):
        # On CPU tensors without the interpreter the Triton host functions raise an error that says so.
        _register_override({key: ops.kernels(name) for key in ("CPU", "CUDA")})
    elif name == "auto" and not _extension_has_cuda and importlib.util.find_spec("triton") is not None:
        _register_override({"CUDA": {op: _auto_cuda_kernel(op) for op in ops.kernel_op_names()}})
    _backend = name


def get_backend() -> str:
    """The backend chosen by :func:`set_backend` or ``FAKEQUANT_BACKEND``."""
    return _backend


def init() -> None:
    load_extension()
    ops.register_python_autograd()
    set_backend(os.environ.get("FAKEQUANT_BACKEND", "auto") or "auto")
