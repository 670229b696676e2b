"""The autograd of the differentiable ``fakequant::`` ops.

With ``fakequant._C`` loaded the Autograd kernels are C++ (:data:`AUTOGRAD_REGISTRATION_FILE`); without it they
are the Python formulas of ``fakequant/ops``. Both compute the same thing: the gradients here are compared bit for
bit with the formula (the backward ops called by hand), with the reference's autograd, and, across processes,
between the C++ and the Python registrations on the same (reference) kernels. The gradient checks run on every
(device, backend) pair (the ``device`` fixture, tests/conftest.py); each op's own backward tests are in tests/ops.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import fakequant
from fakequant import _backend, ops
from fakequant.ops import _library
from tests import autograd_reference

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
EPS = 1e-5
DIFFERENTIABLE_OPS = tuple(name for name, entry in _library._OPS.items() if entry.autograd is not None)
# Where the C++ Autograd kernels are registered (the dispatcher names the file in its registration line): each op
# family's csrc/ops/<family>.cpp.
AUTOGRAD_REGISTRATION_FILE = r"csrc/ops/\w+\.cpp"
MISSING_MASK_MESSAGE = (
    "fakequant: this op ran with compute_mask=False, so it has no mask to differentiate with; "
    "call it with compute_mask=True (the functional wrappers do so whenever a gradient is needed)"
)

needs_extension = pytest.mark.skipif(
    not _backend.extension_loaded(), reason=f"fakequant._C is not loaded ({_backend.extension_error()})"
)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Cases: each op (binarize with either STE) with its differentiable inputs
# ---------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "sliced")


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-contiguous, not dense either
        return torch.cat([x, x], dim=3)[..., ::2]
    return x.contiguous()


class Case(NamedTuple):
    name: str
    call: Callable  # the op; takes the inputs, plus compute_mask= if given
    reference: Callable  # the reference's differentiable composition; takes the inputs
    inputs: list[torch.Tensor]
    # The formula of fakequant/ops with the backward op called by hand: (grad, mask, *inputs) -> grads.
    formula: Callable


def make_cases(dtype: torch.dtype, layout: str, device: str = "cpu") -> list[Case]:
    """Each op with inputs that clip some elements and pass others, on ``device``; every input a fresh leaf."""
    g = torch.Generator().manual_seed(21)
    x = _laid_out((torch.randn(6, 4, 3, 5, generator=g) * 4).to(dtype), layout)
    weight = _laid_out(torch.randn(6, 4, 3, 5, generator=g).to(dtype), layout)
    gamma = torch.randn(6, generator=g)  # negative factors included
    gamma_with_zero = torch.cat([gamma[:5], torch.zeros(1)])  # divide_by_fold takes f = 1 there
    var = torch.rand(6, generator=g) + 0.5
    scale_t, zp_t = torch.tensor(0.05), torch.tensor(1, dtype=torch.int32)
    scale_c = torch.rand(4, generator=g) * 0.2 + 0.01
    zp_c = torch.randint(-8, 8, (4,), generator=g, dtype=torch.int32)
    scale_w = torch.rand(6, generator=g) * 0.2 + 0.01
    zp_w = torch.randint(-8, 8, (6,), generator=g, dtype=torch.int32)
    x, weight, gamma, gamma_with_zero, var, scale_t, zp_t, scale_c, zp_c, scale_w, zp_w = (
        t.to(device) for t in (x, weight, gamma, gamma_with_zero, var, scale_t, zp_t, scale_c, zp_c, scale_w, zp_w)
    )
    ops = torch.ops.fakequant

    def masked(grad, mask, *inputs):
        return [ops.masked_grad(grad, mask)]

    def bn_fold_formula(divide_by_fold):
        def formula(grad, mask, w, ga, v):
            return ops.bn_fold_fake_quant_weight_backward(grad, w, ga, v, EPS, scale_w, zp_w, -8, 7, divide_by_fold)
        return formula

    cases = [
        Case("fake_quant_per_tensor",
             lambda a, **kw: ops.fake_quant_per_tensor(a, scale_t, zp_t, -16, 15, **kw),
             lambda a: autograd_reference.fake_quant_per_tensor(a, scale_t, zp_t, -16, 15), [x], masked),
        Case("fake_quant_per_channel",
             lambda a, **kw: ops.fake_quant_per_channel(a, scale_c, zp_c, 1, -8, 7, **kw),
             lambda a: autograd_reference.fake_quant_per_channel(a, scale_c, zp_c, 1, -8, 7), [x], masked),
        Case("binarize", lambda a, **kw: ops.binarize(a, True, **kw), lambda a: autograd_reference.binarize(a, True),
             [x], masked),
        Case("binarize_identity_ste", lambda a, **kw: ops.binarize(a, False, **kw),
             lambda a: autograd_reference.binarize(a, False), [x], lambda grad, mask, a: [grad]),
        Case("bn_fold_fake_quant_weight",
             lambda w, ga, v, **kw: ops.bn_fold_fake_quant_weight(w, ga, v, EPS, scale_w, zp_w, -8, 7, **kw),
             lambda w, ga, v: autograd_reference.bn_fold_fake_quant_weight(w, ga, v, EPS, scale_w, zp_w, -8, 7),
             [weight, gamma, var], bn_fold_formula(False)),
        Case("bn_fold_divided",
             lambda w, ga, v, **kw: ops.bn_fold_fake_quant_weight(
                 w, ga, v, EPS, scale_w, zp_w, -8, 7, divide_by_fold=True, **kw),
             lambda w, ga, v: autograd_reference.bn_fold_fake_quant_weight(w, ga, v, EPS, scale_w, zp_w, -8, 7, True),
             [weight, gamma_with_zero, var], bn_fold_formula(True)),
    ]
    return [case._replace(inputs=[t.detach().clone().requires_grad_() for t in case.inputs]) for case in cases]


def _incoming_grad(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)


def autograd_results(dtype: torch.dtype, layout: str, device: str = "cpu") -> dict[str, list[torch.Tensor]]:
    """For each case: out, then the gradient of every input, from torch.autograd.grad through the op."""
    results = {}
    for case in make_cases(dtype, layout, device):
        out, _ = case.call(*case.inputs)
        results[case.name] = [out.detach(), *torch.autograd.grad(out, case.inputs, _incoming_grad(out))]
    return results


# ---------------------------------------------------------------------------------------------
# Which autograd is in use
# ---------------------------------------------------------------------------------------------


@needs_extension
def test_cpp_autograd_is_in_use_when_the_extension_is_loaded():
    for name in DIFFERENTIABLE_OPS:
        autograd_line = next(
            line for line in torch._C._dispatch_dump(f"fakequant::{name}").splitlines()
            if line.startswith("Autograd[alias]:")
        )
        assert re.search(rf"registered at \S*{AUTOGRAD_REGISTRATION_FILE}:\d+ ", autograd_line), autograd_line
    for case in make_cases(torch.float32, "contiguous"):
        grad_fn_name = case.call(*case.inputs)[0].grad_fn.name()
        assert grad_fn_name.startswith("torch::autograd::CppNode<"), (case.name, grad_fn_name)
    assert ops.register_python_autograd() == ()  # nothing left to register


# ---------------------------------------------------------------------------------------------
# Gradients: the formula, the reference, layouts and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grads_are_the_formula_and_match_the_reference(device, dtype, layout):
    results = autograd_results(dtype, layout, device)
    for case in make_cases(dtype, layout, device):
        out, *grads = results[case.name]
        with torch.no_grad():
            expected_out, mask = case.call(*case.inputs)
        grad = _incoming_grad(out)
        assert_identical(out, expected_out)
        expected = case.formula(grad, mask, *case.inputs)
        for actual, want in zip(grads, expected, strict=True):
            assert_identical(actual, want)
        # The reference's autograd (the oracle of every backward); BN fold's per-channel sums are not
        # computed in the reference's order by the fused kernels, so those two agree to rounding only.
        ref_grads = torch.autograd.grad(case.reference(*case.inputs), case.inputs, grad)
        if case.name != "bn_fold_divided":
            assert_identical(grads[0], ref_grads[0])
            for actual, want in zip(grads[1:], ref_grads[1:], strict=True):
                torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-6)
            continue
        # q(w f) / f: autograd's weight gradient is (grad / f) * f, rounded twice. Its gamma/var gradients
        # subtract two sums that nearly cancel (grad * mask * w / f and grad * out / f), the fused kernel sums
        # the small differences; and with a half weight the kernel's out is the rounded half output, autograd's
        # the fp32 one (measured: 2e-2 of the largest gamma gradient in fp16, 1e-5 in fp32).
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=0)
        for actual, want in zip(grads[1:], ref_grads[1:], strict=True):
            bound = (5e-5 if dtype == torch.float32 else 5e-2) * want.abs().max().item()
            assert (actual - want).abs().max().item() <= bound, (dtype, layout)
            assert actual[5] == 0  # the channel whose factor was taken as 1


def test_backward_after_compute_mask_false_raises_where_a_mask_is_needed(device):
    with_mask = autograd_results(torch.float32, "contiguous", device)
    for case in make_cases(torch.float32, "contiguous", device):
        out, mask = case.call(*case.inputs, compute_mask=False)
        assert mask.numel() == 0
        # These need no mask: the identity STE, and the BN fold, whose backward recomputes it.
        if case.name in ("binarize_identity_ste", "bn_fold_fake_quant_weight", "bn_fold_divided"):
            grads = torch.autograd.grad(out, case.inputs, _incoming_grad(out))
            for actual, want in zip(grads, with_mask[case.name][1:], strict=True):
                assert_identical(actual, want)
            continue
        with pytest.raises(RuntimeError) as error:
            out.sum().backward()
        assert str(error.value) == MISSING_MASK_MESSAGE, case.name


class _NoGradToFirst(torch.autograd.Function):
    """first + second, whose backward gives ``first`` no gradient (None)."""

    @staticmethod
    def forward(ctx, first, second):
        return first + second

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def test_undefined_incoming_grad_gives_no_grads(device):
    for case in make_cases(torch.float32, "contiguous", device):
        out, _ = case.call(*case.inputs)
        other = torch.zeros_like(out, requires_grad=True)
        _NoGradToFirst.apply(out, other).sum().backward()
        # Zeros materialized for out's missing gradient would have reached the inputs as zero gradients.
        assert all(t.grad is None for t in case.inputs), case.name
        assert other.grad is not None


def test_no_grad_and_non_differentiable_qparams(device):
    x = torch.randn(5, device=device, requires_grad=True)
    scale = torch.tensor(0.1, device=device, requires_grad=True)
    zero_point = torch.tensor(0, dtype=torch.int32, device=device)
    with torch.no_grad():
        out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -8, 7)
    assert not out.requires_grad and out.grad_fn is None and not mask.requires_grad
    # A scale that requires grad makes the output require grad (as any input would), but gets no gradient.
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x.detach(), scale, zero_point, -8, 7)
    assert out.requires_grad and not mask.requires_grad
    out.sum().backward()
    assert scale.grad is None


# ---------------------------------------------------------------------------------------------
# The Python fallback: registered only without _C, never on top of the C++ kernels
# ---------------------------------------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS_DIR]), **env}
    for name in ("FAKEQUANT_BACKEND", "FAKEQUANT_DISABLE_EXTENSION"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", textwrap.dedent(code)],
        env=environment, capture_output=True, text=True, timeout=300,
    )


# The dispatcher reports an overridden kernel once per process (TORCH_WARN_ONCE), and torch's own
# registrations may have used that once up: set_warn_always makes it report every time.
IMPORT_WATCHING_OVERRIDES = """
import torch
torch.set_warn_always(True)
import fakequant
from fakequant import ops
"""


@pytest.mark.parametrize("disable_extension", ["0", "1"])
def test_import_overrides_no_kernel(disable_extension):
    result = run_python(IMPORT_WATCHING_OVERRIDES + """
import test_autograd
test_autograd.autograd_results(torch.float32, "contiguous")
print(fakequant.extension_loaded(), ops.register_python_autograd())
""", FAKEQUANT_DISABLE_EXTENSION=disable_extension)
    assert result.returncode == 0, result.stderr
    assert "Overriding a previously registered kernel" not in result.stderr, result.stderr
    loaded, registered_again = result.stdout.split()
    assert registered_again == "()"
    if disable_extension == "1":
        assert loaded == "False"
    elif _backend.extension_loaded():
        assert loaded == "True"


def test_override_would_be_seen():
    """The check above can fail: registering the Python autograd a second time is reported."""
    result = run_python(IMPORT_WATCHING_OVERRIDES + """
backward, setup_context = ops._library._OPS["binarize"].autograd
torch.library.register_autograd("fakequant::binarize", backward, setup_context=setup_context,
                                lib=torch.library.Library("fakequant", "IMPL"))
""")
    assert result.returncode == 0, result.stderr
    assert "Overriding a previously registered kernel" in result.stderr


@needs_extension
def test_python_fallback_gives_the_cpp_autograd_grads(tmp_path, reference_kernels):
    """The same kernels (the reference) under both registrations: every output and gradient bit for bit."""
    path = tmp_path / "python_autograd.pt"
    result = run_python(IMPORT_WATCHING_OVERRIDES + f"""
import test_autograd
assert not fakequant.extension_loaded()
assert ops.register_python_autograd() == ()  # registered at import; nothing left
results, grad_fn_names = {{}}, {{}}
for dtype in (torch.float32, torch.float16):
    for layout in test_autograd.LAYOUTS:
        results[str(dtype), layout] = test_autograd.autograd_results(dtype, layout)
for case in test_autograd.make_cases(torch.float32, "contiguous"):
    grad_fn_names[case.name] = case.call(*case.inputs)[0].grad_fn.name()
torch.save((results, grad_fn_names), {str(path)!r})
""", FAKEQUANT_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "Overriding a previously registered kernel" not in result.stderr, result.stderr
    python_results, grad_fn_names = torch.load(path)
    assert not any("CppNode" in name for name in grad_fn_names.values()), grad_fn_names
    for dtype in (torch.float32, torch.float16):
        for layout in LAYOUTS:
            cpp_results = autograd_results(dtype, layout)
            for name, tensors in python_results[str(dtype), layout].items():
                for actual, expected in zip(cpp_results[name], tensors, strict=True):
                    assert_identical(actual, expected)


@pytest.fixture
def reference_kernels():
    previous = fakequant.get_backend()
    fakequant.set_backend("reference")
    try:
        yield
    finally:
        fakequant.set_backend(previous)
