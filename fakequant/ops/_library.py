"""The ``fakequant`` op library and the registry of each op's kernels per backend.

An op module (``fakequant/ops/<family>.py``) defines each of its ops in one place, in this order:

1. ``define(name, schema)``: the schema in the ``fakequant`` namespace;
2. ``@reference_kernel(name)``: the pure-PyTorch kernel (:mod:`fakequant.reference`), registered as the op's
   ``"default"`` kernel (the fallback on any device) and as the ``"reference"`` backend's kernel; a composite op
   uses ``define(..., composite=True)`` and ``@composite_kernel(name)`` instead and gets no backend kernels;
3. ``@register_fake(name)``: shapes, dtypes and strides only (tracing, ``torch.compile``);
4. ``register_autograd(name, backward, setup_context)``: the Python autograd, registered by
   :func:`register_python_autograd` only where the compiled extension has no C++ autograd kernel;
5. the public function, with a docstring and an example.

Backend kernels register themselves where they are written: ``@register_kernel(name, "triton")`` in
:mod:`fakequant.triton`; the compiled extension ``fakequant._C`` registers its C++/CUDA kernels with
``TORCH_LIBRARY_IMPL`` in ``csrc/``. :mod:`fakequant._backend` reads :func:`kernels` to put a backend's kernels
behind the ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LIBRARY = "fakequant"

lib = torch.library.Library(LIBRARY, "DEF")


@dataclass
class OpEntry:
    """What the registry knows of one op."""

    name: str
    composite: bool
    kernels: dict[str, Callable]  # backend name -> kernel
    autograd: tuple[Callable, Callable] | None = None  # (backward, setup_context)


_OPS: dict[str, OpEntry] = {}


def qualname(name: str) -> str:
    return f"{LIBRARY}::{name}"


def define(name: str, schema: str, *, composite: bool = False) -> None:
    """Defines ``fakequant::<name>`` with ``schema`` (the part after the name).

    ``composite``: the op's kernel calls other ``fakequant::`` ops (so runs on whichever kernels serve those), and
    no backend overrides it.
    """
    if name in _OPS:
        raise RuntimeError(f"fakequant: op {name} is defined twice")
    lib.define(name + schema)
    _OPS[name] = OpEntry(name, composite, {})


def _entry(name: str) -> OpEntry:
    if name not in _OPS:
        raise RuntimeError(f"fakequant: op {name} is not defined; define() it before registering its kernels")
    return _OPS[name]


def register_kernel(name: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``kernel`` serves op ``name`` when ``backend`` is chosen (:func:`fakequant.set_backend`)."""

    def decorator(kernel: Callable) -> Callable:
        entry = _entry(name)
        if entry.composite:
            raise RuntimeError(f"fakequant: {name} is a composite op; backends do not override it")
        if backend in entry.kernels:
            raise RuntimeError(f"fakequant: op {name} has two {backend} kernels")
        entry.kernels[backend] = kernel
        return kernel

    return decorator


def reference_kernel(name: str) -> Callable[[Callable], Callable]:
    """Decorator: the op's pure-PyTorch kernel, its ``"default"`` kernel and the ``"reference"`` backend's."""

    def decorator(kernel: Callable) -> Callable:
        register_kernel(name, "reference")(kernel)
        torch.library.impl(qualname(name), "default", lib=lib)(kernel)
        return kernel

    return decorator


def composite_kernel(name: str, *, own_autograd: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: the kernel of a composite op. Without ``own_autograd`` it is a CompositeImplicitAutograd kernel
    (autograd and compile see the ops it calls); with it, the op's ``"default"`` kernel, differentiated by the
    autograd the op registers."""

    def decorator(kernel: Callable) -> Callable:
        if not _entry(name).composite:
            raise RuntimeError(f"fakequant: {name} was not defined as a composite op")
        key = "default" if own_autograd else "CompositeImplicitAutograd"
        torch.library.impl(qualname(name), key, lib=lib)(kernel)
        return kernel

    return decorator


def register_fake(name: str) -> Callable[[Callable], Callable]:
    """Decorator: the op's fake impl."""
    _entry(name)
    return torch.library.register_fake(qualname(name), lib=lib)


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """Records the op's Python autograd (registered by :func:`register_python_autograd`)."""
    _entry(name).autograd = (backward, setup_context)


def op_names() -> tuple[str, ...]:
    """Every op, in definition order."""
    return tuple(_OPS)


def kernel_op_names() -> tuple[str, ...]:
    """The ops with a kernel of their own on every backend."""
    return tuple(name for name, entry in _OPS.items() if not entry.composite)


def composite_op_names() -> tuple[str, ...]:
    """The ops whose kernel calls other ops (no backend kernels of their own)."""
    return tuple(name for name, entry in _OPS.items() if entry.composite)


def kernel(name: str, backend: str) -> Callable:
    """``backend``'s kernel of op ``name`` (a lookup, cheap enough for a per-call path)."""
    return _entry(name).kernels[backend]


def kernels(backend: str) -> dict[str, Callable]:
    """Op name -> ``backend``'s kernel, for every op that has one."""
    return {name: entry.kernels[backend] for name, entry in _OPS.items() if backend in entry.kernels}


def register_python_autograd() -> tuple[str, ...]:
    """Registers the Python autograd of each differentiable op that has no autograd kernel yet.

    Called after loading ``fakequant._C`` has been tried: ``_C``'s C++ autograd kernels, when loaded, do the
    same at a fraction of the per-call cost, and registering a second kernel on the Autograd key would
    override one with the other (with a warning). Calling it again registers nothing.

    Returns:
        The names of the ops it registered.
    """
    registered = []
    for name, entry in _OPS.items():
        if entry.autograd is None or torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), "Autograd"):
            continue
        backward, setup_context = entry.autograd
        torch.library.register_autograd(qualname(name), backward, setup_context=setup_context, lib=lib)
        registered.append(name)
    return tuple(registered)
