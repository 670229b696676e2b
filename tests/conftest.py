"""Shared test setup.

Without a GPU, the Triton kernels are tested under the Triton interpreter, on CPU tensors. Triton decides
at ``@triton.jit`` time whether a kernel is interpreted, so ``TRITON_INTERPRET=1`` must be in the
environment before anything imports triton (importing torch does not); a value already set wins.

Fixtures:
    device_backend: parametrized over every (device, backend) pair: ``"cpu"`` with each backend of
        :func:`fakequant.available_backends` for CPU tensors (the C++ kernels, the reference and, under the
        interpreter, Triton), and ``"cuda"`` with each backend for CUDA tensors; ids like ``cpu-auto`` and
        ``cuda-triton``. Without a GPU the CUDA pairs are collected and skipped with the reason "no GPU".
        ``FAKEQUANT_TEST_DEVICE=cuda`` (or ``cpu``) keeps one device's pairs only. Each test runs with the
        pair's backend chosen and the previous one restored afterwards; it yields ``(device, backend)``.
    device: the device of ``device_backend``'s pair (tests create their tensors on it).
    backend: parametrized over the backends for CPU tensors only, for tests of whole modules and quantizers
        (tests/test_quantizers.py).

Example (a test of an op on every pair)::

    def test_binarize_signs(device):
        out, _ = torch.ops.fakequant.binarize(torch.tensor([-2.0, 3.0], device=device))
        assert out.tolist() == [-1.0, 1.0]
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ("cpu", "cuda")
NO_GPU = "no GPU"


def _cpu_backends() -> list[str]:
    from fakequant import _backend  # after TRITON_INTERPRET is settled: it may import triton

    return _backend.available_backends("cpu")


def selected_devices() -> tuple[str, ...]:
    """The devices whose pairs are collected: both, or the one FAKEQUANT_TEST_DEVICE names."""
    chosen = os.environ.get("FAKEQUANT_TEST_DEVICE", "")
    if not chosen:
        return DEVICES
    if chosen not in DEVICES:
        raise ValueError(f"FAKEQUANT_TEST_DEVICE is {chosen!r}; allowed: {', '.join(DEVICES)} (or unset for both)")
    return (chosen,)



def device_backends(device: str) -> list[str]:
    """The backends that run tensors of ``device``; for CUDA without a GPU, those that would run them with one."""
    from fakequant import _backend

    if device == "cuda" and not torch.cuda.is_available():
        return [name for name in _backend.BACKENDS if _backend.backend_unavailable_reason(name) is None]
    return _backend.available_backends(device)


def device_backend_params(exclude: tuple[tuple[str, str], ...] = ()) -> list:
    """``pytest.param((device, backend))`` for every pair (less ``exclude``), the CUDA ones skipped without a GPU."""
    params = []
    for device in selected_devices():
        marks = [pytest.mark.skip(reason=NO_GPU)] if device == "cuda" and not torch.cuda.is_available() else []
        for name in device_backends(device):
            if (device, name) not in exclude:
                params.append(pytest.param((device, name), id=f"{device}-{name}", marks=marks))
    return params


@pytest.fixture(params=device_backend_params())
def device_backend(request: pytest.FixtureRequest):
    import fakequant

    device, name = request.param
    previous = fakequant.get_backend()
    fakequant.set_backend(name)
    try:
        yield device, name
    finally:
        fakequant.set_backend(previous)


@pytest.fixture
def device(device_backend: tuple[str, str]) -> str:
    return device_backend[0]


@pytest.fixture(params=_cpu_backends())
def backend(request: pytest.FixtureRequest):
    import fakequant

    previous = fakequant.get_backend()
    fakequant.set_backend(request.param)
    try:
        yield request.param
    finally:
        fakequant.set_backend(previous)
