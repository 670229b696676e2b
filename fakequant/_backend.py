"""Loading the compiled extension and choosing which kernels serve the ``fakequant::`` ops.

The compiled extension ``fakequant._C`` registers C++ (and, in a CUDA build, CUDA) kernels on the
CPU/CUDA dispatch keys when it is imported. A backend other than ``"auto"`` stacks one more
``torch.library.Library`` of Python kernels on those keys; choosing ``"auto"`` again removes it, and
the dispatcher falls back to what was registered before.

Set ``FAKEQUANT_DISABLE_EXTENSION=1`` to skip loading ``_C`` (for example to rule out a bad build);
``FAKEQUANT_BACKEND`` picks the backend at import time, as :func:`set_backend` does later.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from fakequant import _ops

BACKENDS = ("auto", "reference")

_extension = None
_extension_error: str | None = None
_extension_attempted = False
_override_lib: torch.library.Library | None = None
_backend = "auto"


def load_extension() -> None:
    """Imports ``fakequant._C`` once; on failure warns once and keeps the reference kernels."""
    global _extension, _extension_error, _extension_attempted
    if _extension_attempted:
        return
    _extension_attempted = True
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


def extension_loaded() -> bool:
    """True when the compiled kernels (``fakequant._C``) are registered."""
    return _extension is not None


def extension_error() -> str | None:
    """Why ``fakequant._C`` is not loaded, or None when it is."""
    return _extension_error


def _register_override(kernels: dict, dispatch_keys: tuple[str, ...]) -> None:
    global _override_lib
    lib = torch.library.Library(_ops.LIBRARY, "IMPL")
    with warnings.catch_warnings():
        # The dispatcher warns that a kernel is overridden: that is exactly what a backend choice does.
        warnings.simplefilter("ignore")
        for name, kernel in kernels.items():
            for key in dispatch_keys:
                lib.impl(name, kernel, key)
    _override_lib = lib


def set_backend(name: str) -> None:
    """Chooses the kernels behind every ``fakequant::`` op.

    Args:
        name: ``"auto"`` (the compiled kernels where built, else the reference) or ``"reference"``
            (the pure-PyTorch kernels on every device).

    Example:
        >>> import fakequant
        >>> fakequant.set_backend("reference")
        >>> fakequant.set_backend("auto")
    """
    global _override_lib, _backend
    if name not in BACKENDS:
        raise ValueError(f"fakequant: unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    if _override_lib is not None:
        _override_lib._destroy()
        _override_lib = None
    if name == "reference":
        _register_override(_ops.DEFAULT_KERNELS, ("CPU", "CUDA"))
    _backend = name


def get_backend() -> str:
    """The backend chosen by :func:`set_backend` or ``FAKEQUANT_BACKEND``."""
    return _backend


def available_backends(device: str = "cpu") -> list[str]:
    """The backends that can run ops on tensors of ``device`` (``"cpu"`` or ``"cuda"``) here."""
    del device  # only the reference and auto exist so far, and both serve every device
    return list(BACKENDS)


def init() -> None:
    load_extension()
    set_backend(os.environ.get("FAKEQUANT_BACKEND", "auto") or "auto")
