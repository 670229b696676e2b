"""Shared test setup.

Without a GPU, the Triton kernels are tested under the Triton interpreter, on CPU tensors. Triton decides
at ``@triton.jit`` time whether a kernel is interpreted, so ``TRITON_INTERPRET=1`` must be in the
environment before anything imports triton (importing torch does not); a value already set wins.

Fixtures:
    backend: parametrized over :func:`fakequant._backend.available_backends` for CPU tensors (with the
        interpreter that includes ``"triton"``); each test runs with that backend chosen and the
        previous one restored afterwards.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        from fakequant import _backend

        metafunc.parametrize("backend", _backend.available_backends("cpu"), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest):
    import fakequant

    previous = fakequant.get_backend()
    fakequant.set_backend(request.param)
    try:
        yield request.param
    finally:
        fakequant.set_backend(previous)
