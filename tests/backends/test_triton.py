"""What is specific to the Triton backend: its rounding helpers, the kernels its host functions launch, the backend
choice, and the GPU build checked without a GPU.

Without a GPU (here and in CI) every kernel runs under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by conftest.py), which executes the kernels' arithmetic with numpy float32;
with a GPU the same tests run the compiled kernels on CUDA tensors. What the interpreter cannot show (that
the GPU build keeps the rounding and the IEEE division) is checked by compiling the kernels for sm_80
without a GPU and reading their PTX and SASS (test_gpu_build_keeps_exact_arithmetic). The ops themselves, on
every (device, backend) pair and so on Triton too, are tested in tests/ops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fakequant
from fakequant import _backend, reference
from fakequant.formats import ELEMENT_FORMATS, MX_SCALE_MODES
from tests import autograd_reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

triton_kernels = _backend.load_triton_kernels()
assert triton_kernels is not None, f"triton is installed but the Triton kernels do not import: {_backend._triton_error}"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fakequant.triton import _common as triton_common  # noqa: E402
from fakequant.triton import fake_quant as triton_fake_quant  # noqa: E402
from fakequant.triton._common import round_half_even, to_dtype  # noqa: E402
from tests.ops._helpers import (  # noqa: E402
    FLOATS,
    NONFINITE,
    assert_bits_equal,
    assert_layout_of,
    assert_statistic_close,
    bn_case,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not triton_kernels.INTERPRETED:
    pytest.skip(
        "no GPU and TRITON_INTERPRET is not 1 (it was set to something else before triton was imported)",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[2]
# numpy warns about the overflow to inf and the NaN arithmetic that the NaN/inf cases are about.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
needs_cuda = pytest.mark.skipif(not CUDA, reason="no GPU")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def qparams(scale, zero_point, device=DEVICE):
    return (
        torch.as_tensor(scale, dtype=torch.float32, device=device),
        torch.as_tensor(zero_point, dtype=torch.int32, device=device),
    )


def observe_state(x, axis):
    """Fresh ``(tracked_range, scale, zero_point)`` for ``x`` on ``x``'s device."""
    channels = None if axis is None else x.size(axis)
    tracked = torch.zeros((2,) if channels is None else (2, channels), device=x.device)
    scale = torch.ones(() if channels is None else (channels,), device=x.device)
    zero_point = torch.zeros(() if channels is None else (channels,), dtype=torch.int32, device=x.device)
    return tracked, scale, zero_point


# ---------------------------------------------------------------------------------------------
# The rounding
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_test_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    tl.store(out_ptr + offsets, round_half_even(tl.load(x_ptr + offsets, mask=in_bounds)), mask=in_bounds)


def test_round_half_even_matches_torch_round():
    """The kernels' rounding against torch.round on 2^20 values (numpy float32 under the interpreter)."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 18
    any_bits = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    magnitudes = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-20, 30, (n,), generator=gen).float())
    halves = torch.randint(-(2**23), 2**23, (n,), generator=gen).float() + 0.5  # exact ties up to 2^23
    near_2_23 = torch.randint(-(2**25), 2**25, (n,), generator=gen).float() * 0.5 + 2.0**23 * torch.sign(
        torch.randn(n, generator=gen)
    )
    special = torch.tensor(
        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 2.0**23 - 0.5, 2.0**23 - 1.5, -(2.0**23) + 0.5]
        + [2.0**23, 2.0**23 + 1, 2.0**24 + 2, 1e-45, -1e-45, 1.17e-38]
        + NONFINITE
    )
    x = torch.cat([any_bits.view(torch.float32), magnitudes, halves, near_2_23, special]).to(DEVICE)
    assert x.numel() >= 1 << 20
    out = torch.empty_like(x)
    block = 1 << 14  # big blocks: the interpreter's cost is per program
    _round_test_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    assert_bits_equal(out, torch.round(x))


@triton.jit
def _to_dtype_test_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=in_bounds)
    tl.store(out_ptr + offsets, to_dtype(x, out_ptr.dtype.element_ty), mask=in_bounds)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_output_rounding_matches_tensor_to(dtype):
    """fp32 -> fp16/bf16 as the kernels store it, against Tensor.to, on 2^18 values."""
    gen = torch.Generator().manual_seed(11)
    n = 1 << 17
    any_bits = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    magnitudes = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    x = torch.cat([any_bits.view(torch.float32), magnitudes, torch.tensor(NONFINITE + [65520.0, 3.3961e38])])
    x = x.to(DEVICE)
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    block = 1 << 14
    _to_dtype_test_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    assert_bits_equal(out, x.to(dtype))


# ---------------------------------------------------------------------------------------------
# The public ops with the "triton" backend
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def triton_backend(monkeypatch):
    """Chooses the "triton" backend and records which kernels the host wrappers launch."""
    launched = []
    real_wrap_triton = triton_common.wrap_triton

    def recording_wrap_triton(kernel):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return real_wrap_triton(kernel)

    monkeypatch.setattr(triton_common, "wrap_triton", recording_wrap_triton)
    previous = fakequant.get_backend()
    fakequant.set_backend("triton")
    yield launched
    fakequant.set_backend(previous)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_public_ops_run_triton_forward_and_backward(triton_backend, dtype):
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 3, 4, 5, generator=gen) * 2).to(dtype=dtype, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    scale, zero_point = qparams(0.125, 1)
    channel_scale, channel_zp = qparams([0.1, 0.2, 0.05], [0, 1, -1])

    calls = {
        "per_tensor": (
            fakequant.fake_quant_per_tensor,
            autograd_reference.fake_quant_per_tensor,
            (scale, zero_point, -8, 7),
        ),
        "per_channel": (
            fakequant.fake_quant_per_channel,
            autograd_reference.fake_quant_per_channel,
            (channel_scale, channel_zp, 1, -8, 7),
        ),
        "binarize_clipped": (fakequant.binarize, autograd_reference.binarize, (True,)),
        "binarize_identity": (fakequant.binarize, autograd_reference.binarize, (False,)),
    }
    for name, (public, oracle, args) in calls.items():
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = public(xa, *args)
        ref = oracle(xb, *args)
        assert_bits_equal(out, ref.detach())
        out.backward(grad)
        ref.backward(grad)
        assert_bits_equal(xa.grad, xb.grad)
        assert_layout_of(out, x), name

    weight, gamma, var, eps, scale, zero_point = bn_case((6, 3, 3, 3), gen, dtype, device=DEVICE)
    weight = weight.contiguous(memory_format=torch.channels_last)
    leaves_a = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    leaves_b = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    out = fakequant.bn_fold_fake_quant_weight(*leaves_a[:2], leaves_a[2], eps, scale, zero_point, -16, 15)
    ref = autograd_reference.bn_fold_fake_quant_weight(*leaves_b[:2], leaves_b[2], eps, scale, zero_point, -16, 15)
    assert_bits_equal(out, ref.detach())
    grad_w = torch.randn(weight.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    out.backward(grad_w)
    ref.backward(grad_w)
    assert_bits_equal(leaves_a[0].grad, leaves_b[0].grad)
    assert_statistic_close(leaves_a[1].grad, leaves_b[1].grad)
    assert_statistic_close(leaves_a[2].grad, leaves_b[2].grad)

    # divide_by_fold=True: the op's backward recomputes its mask and output from the saved arguments. The
    # reference's autograd differentiates through both appearances of f, so its weight gradient is (grad / f) * f,
    # which is not always grad bit for bit: close, and the op's own is exactly the masked grad. Its gamma and var
    # gradients use q(w f) / f unrounded, the op's the output rounded to the weight's dtype, and w - out is
    # quantization noise, so in fp16/bf16 they differ by far more than summation order (about 3e-3 and 1e-1
    # of the largest): there the op's own backward, reference.bn_fold_fake_quant_weight_backward, is the oracle.
    gamma = gamma.clone()
    gamma[1] = 0.0
    leaves_a = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    leaves_b = [t.clone().requires_grad_() for t in (weight, gamma, var)]
    out = fakequant.bn_fold_fake_quant_weight(*leaves_a, eps, scale, zero_point, -16, 15, divide_by_fold=True)
    ref = autograd_reference.bn_fold_fake_quant_weight(*leaves_b, eps, scale, zero_point, -16, 15, divide_by_fold=True)
    assert_bits_equal(out, ref.detach())
    assert_layout_of(out, weight)
    out.backward(grad_w)
    ref.backward(grad_w)
    _, mask = reference.bn_fold_fake_quant_weight_forward(
        weight, gamma, var, eps, scale, zero_point, -16, 15, True, True
    )
    assert_bits_equal(leaves_a[0].grad, reference.masked_grad(grad_w, mask))
    torch.testing.assert_close(leaves_a[0].grad, leaves_b[0].grad)
    want = reference.bn_fold_fake_quant_weight_backward(
        grad_w, weight, gamma, var, eps, scale, zero_point, -16, 15, True
    )
    assert_statistic_close(leaves_a[1].grad, want[1])
    assert_statistic_close(leaves_a[2].grad, want[2])
    if dtype == torch.float32:
        assert_statistic_close(leaves_a[1].grad, leaves_b[1].grad)
        assert_statistic_close(leaves_a[2].grad, leaves_b[2].grad)
    assert leaves_a[1].grad[1] == 0 and leaves_a[2].grad[1] == 0

    assert set(triton_backend) == {
        "_fake_quant_per_tensor_kernel",
        "_fake_quant_per_channel_kernel",
        "_binarize_kernel",
        "_masked_grad_kernel",
        "_bn_fold_fake_quant_weight_kernel",
        "_bn_fold_fake_quant_weight_backward_kernel",
    }


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_float_format_ops_run_triton_forward_and_backward(triton_backend, dtype):
    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(2, 3, 4, 32, generator=gen) * 4).to(dtype=dtype, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=gen).to(dtype=dtype, device=DEVICE)
    block_scale = (torch.rand(x.numel() // 32, generator=gen) * 0.01 + 0.001).to(DEVICE)
    tensor_scale = torch.tensor([0.005], device=DEVICE)
    calls = {
        "fp8_tensor_amax": (fakequant.fake_quant_fp8, autograd_reference.fake_quant_fp8, (None, "e4m3")),
        "fp8_tensor": (fakequant.fake_quant_fp8, autograd_reference.fake_quant_fp8, (tensor_scale, "e5m2")),
        "fp8_block_amax": (fakequant.fake_quant_fp8, autograd_reference.fake_quant_fp8, (None, "e4m3", 32)),
        "fp8_per_block": (fakequant.fake_quant_fp8, autograd_reference.fake_quant_fp8, (block_scale, "e4m3", 32)),
        "mx_floor": (fakequant.fake_quant_mx, autograd_reference.fake_quant_mx, ("e2m1", 32, "floor")),
        "mx_rceil_unmasked": (fakequant.fake_quant_mx, autograd_reference.fake_quant_mx,
                              ("e4m3", 32, "rceil", -1, False)),  # fmt: skip
        "nvfp4": (fakequant.fake_quant_nvfp4, autograd_reference.fake_quant_nvfp4, ()),
        "nvfp4_one_level": (fakequant.fake_quant_nvfp4, autograd_reference.fake_quant_nvfp4, (None, False)),
    }
    for public, oracle, args in calls.values():
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = public(xa, *args)
        ref = oracle(xb, *args)
        assert_bits_equal(out, ref.detach())
        assert_layout_of(out, x)
        out.backward(grad)
        ref.backward(grad)
        assert_bits_equal(xa.grad, xb.grad)

    assert set(triton_backend) == {
        "_fp8_amax_kernel",
        "_fake_quant_fp8_kernel",
        "_fake_quant_mx_kernel",
        "_fake_quant_nvfp4_kernel",
        "_masked_grad_kernel",
    }


def test_observe_range_runs_triton(triton_backend):
    x = torch.randn(3, 70, device=DEVICE)
    state = observe_state(x, None)
    torch.ops.fakequant.observe_range(x, *state, None, 1.0, -128, 127, True)
    assert state[0].tolist() == [x.min().item(), x.max().item()]
    torch.ops.fakequant.observe_range(x, *state, None, 1.0, -128, 127, True, relu=True)
    assert state[0].tolist() == [0.0, x.max().item()]
    assert triton_backend == ["_observe_range_partial_kernel", "_observe_range_finalize_kernel"] * 2


def test_torch_ops_run_triton(triton_backend):
    x = torch.randn(3, 70, device=DEVICE)
    scale, zero_point = qparams(0.1, 0)
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -8, 7, False)
    assert mask.numel() == 0
    assert_bits_equal(out, reference.fake_quant_per_tensor_forward(x, scale, zero_point, -8, 7)[0])
    keep = x > 0
    assert_bits_equal(torch.ops.fakequant.masked_grad(x, keep), reference.masked_grad(x, keep))
    assert triton_backend == ["_fake_quant_per_tensor_kernel", "_masked_grad_kernel"]


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def auto_backend():
    previous = fakequant.get_backend()
    fakequant.set_backend("auto")
    yield
    fakequant.set_backend(previous)


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; valid backends: auto, cuda, triton, reference"):
        fakequant.set_backend("cudnn")


def test_cuda_backend_without_cuda_kernels_says_why(monkeypatch, auto_backend):
    # As this machine's build when _C was built without CUDA; forced either way so that CI with a CUDA
    # build checks the message too.
    monkeypatch.setattr(_backend, "_extension_has_cuda", False)
    if _backend.extension_loaded():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: .*built without CUDA kernels"):
            fakequant.set_backend("cuda")
    monkeypatch.setattr(_backend, "_extension", None)
    monkeypatch.setattr(_backend, "_extension_error", "libc10.so: cannot open shared object file")
    with pytest.raises(
        RuntimeError, match=r"'cuda' is not available: .*fakequant._C is not loaded \(libc10.so: cannot open"
    ):
        fakequant.set_backend("cuda")
    assert fakequant.get_backend() == "auto"
    assert "cuda" not in _backend.available_backends("cpu")


def test_unimportable_triton_says_why(monkeypatch, auto_backend):
    monkeypatch.setattr(_backend, "_triton", None)
    monkeypatch.setattr(_backend, "_triton_error", "ImportError: no module named 'triton'")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available: triton cannot be imported \(ImportError"
    ):
        fakequant.set_backend("triton")
    assert "triton" not in _backend.available_backends("cpu")


def _dispatch_tables() -> dict[str, str]:
    return {name: torch._C._dispatch_dump(f"fakequant::{name}") for name in fakequant.ops.kernel_op_names()}


def test_auto_after_triton_restores_the_previous_kernels(auto_backend):
    before = _dispatch_tables()
    fakequant.set_backend("triton")
    during = _dispatch_tables()
    assert all(during[name] != before[name] for name in before)
    fakequant.set_backend("reference")
    fakequant.set_backend("auto")
    assert _dispatch_tables() == before
    if _backend.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fakequant::fake_quant_per_tensor", "CPU"
    ):
        # The C++ CPU kernel is registered from C++, not from a Python file.
        assert "CPU: registered at" in before["fake_quant_per_tensor"]
        cpu_line = next(line for line in before["fake_quant_per_tensor"].splitlines() if line.startswith("CPU:"))
        assert ".py" not in cpu_line


def test_auto_serves_cuda_tensors_with_triton_when_c_has_no_cuda_kernels(monkeypatch, auto_backend):
    """The kernel "auto" puts on the CUDA key (run here on CPU tensors, which it does not mind)."""
    cuda_line = next(
        line for line in torch._C._dispatch_dump("fakequant::binarize").splitlines() if line.startswith("CUDA:")
    )
    if _backend.extension_has_cuda():
        assert "_backend.py" not in cuda_line  # _C's own CUDA kernel
        return
    assert "_backend.py" in cuda_line
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0], device=DEVICE)
    launched = []
    real_wrap_triton = triton_common.wrap_triton
    monkeypatch.setattr(triton_common, "wrap_triton", lambda k: launched.append(k) or real_wrap_triton(k))
    out, mask = _backend._auto_cuda_kernel("binarize")(x, True, True)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0] and mask.tolist() == [False, True, True, False]
    assert len(launched) == 1
    # Without triton: the reference, with a warning that says why.
    monkeypatch.setattr(_backend, "_triton", None)
    monkeypatch.setattr(_backend, "_triton_error", "ImportError: no triton here")
    with pytest.warns(RuntimeWarning, match=r"triton cannot be imported \(ImportError: no triton here\)"):
        out, mask = _backend._auto_cuda_kernel("binarize")(x, True, True)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0] and len(launched) == 1


def test_available_backends():
    cpu = _backend.available_backends("cpu")
    assert cpu[0] == "auto" and "reference" in cpu
    assert ("triton" in cpu) == triton_kernels.INTERPRETED
    assert ("cuda" in cpu) == _backend.extension_has_cuda()
    if not CUDA:
        assert _backend.available_backends("cuda") == []
    else:
        assert "triton" in _backend.available_backends("cuda")


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch, triton_backend):
    monkeypatch.setattr(triton_common, "INTERPRETED", False)  # what the host functions check
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)  # what available_backends reads
    message = "CPU tensors only under the Triton interpreter; set TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=message):
        triton_fake_quant.binarize_triton(torch.ones(3))
    with pytest.raises(RuntimeError, match=message):
        fakequant.binarize(torch.ones(3))
    assert "triton" not in _backend.available_backends("cpu")


def test_environment_variable_selects_the_backend():
    script = textwrap.dedent(
        """
        import torch, fakequant
        out, _ = torch.ops.fakequant.binarize(torch.tensor([-2.0, 0.0]), True, False)
        print(fakequant.get_backend(), out.tolist())
        """
    )
    env = {**os.environ, "FAKEQUANT_BACKEND": "triton", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "triton [-1.0, 1.0]"
    env["FAKEQUANT_BACKEND"] = "fast"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown backend 'fast'; valid backends: auto, cuda, triton, reference" in result.stderr


# ---------------------------------------------------------------------------------------------
# The GPU build, checked without a GPU: compile for sm_80 and read the PTX and SASS.
# ---------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from fakequant.formats import ELEMENT_FORMATS, MX_SCALE_MODES
from fakequant.triton import _common as triton_common, bn_fold as triton_bn_fold, fake_quant as triton_fake_quant
from fakequant.triton import float_formats as triton_float_formats, learnable as triton_learnable
from fakequant.triton import observe as triton_observe

COMMON = {"out_ptr": "*fp32", "mask_ptr": "*i1", "scale_ptr": "*fp32", "zero_point_ptr": "*i32",
          "n_elements": "i32", "quant_min": "i32", "quant_max": "i32", "WRITE_MASK": "constexpr", "BLOCK": "constexpr",
          "RELU": "constexpr", "DIVIDE_BY_FOLD": "constexpr"}
KERNELS = {
    "per_tensor": (triton_fake_quant._fake_quant_per_tensor_kernel, {"x_ptr": "*fp32", **COMMON}, {"RELU": False}),
    "per_tensor_relu": (triton_fake_quant._fake_quant_per_tensor_kernel, {"x_ptr": "*fp32", **COMMON}, {"RELU": True}),
    "per_channel": (triton_fake_quant._fake_quant_per_channel_kernel,
                    {"x_ptr": "*fp32", **COMMON, "channel_stride": "i64", "channels": "i64"}, {}),
    "bn_fold": (triton_bn_fold._bn_fold_fake_quant_weight_kernel,
                {"weight_ptr": "*fp32", "factor_ptr": "*fp32", **COMMON, "channel_stride": "i64", "channels": "i64"},
                {"DIVIDE_BY_FOLD": False}),
    # q(w f) / f: the division by f must be div.rn too (Triton's `/` on fp32 is div.full, not IEEE).
    "bn_fold_divided": (triton_bn_fold._bn_fold_fake_quant_weight_kernel,
                        {"weight_ptr": "*fp32", "factor_ptr": "*fp32", **COMMON, "channel_stride": "i64",
                         "channels": "i64"},
                        {"DIVIDE_BY_FOLD": True}),
}
# The backward recomputes the forward's mask (and divided output) with the same rounding and divisions.
BACKWARD_TYPES = {**COMMON, **{p: "*fp32" for p in ("grad_ptr", "weight_ptr", "factor_ptr", "std_ptr", "gamma_ptr",
                                                    "grad_weight_ptr", "grad_gamma_ptr", "grad_var_ptr")},
                  "channel_size": "i32"}
for mode, divide in (("bn_fold_backward", False), ("bn_fold_backward_divided", True)):
    KERNELS[mode] = (triton_bn_fold._bn_fold_fake_quant_weight_backward_kernel, BACKWARD_TYPES,
                     {"DIVIDE_BY_FOLD": divide})
# The learnable (LSQ) backward: x_fq = (q - zp) * scale as mul.rn, so that x_fq - x is not contracted into an FMA.
LEARNABLE_TYPES = {**{p: "*fp32" for p in ("grad_ptr", "x_ptr", "grad_x_ptr", "scale_ptr", "zero_point_ptr",
                                           "partial_scale_ptr", "partial_zero_point_ptr")},
                   "run": "i64", "channels": "i64", "chunks": "i64", "quant_min": "i32", "quant_max": "i32",
                   "grad_factor": "fp32", "BLOCK": "constexpr", "STEPS": "constexpr"}
KERNELS["learnable_backward"] = (triton_learnable._fake_quant_learnable_backward_kernel, LEARNABLE_TYPES, {"STEPS": 2})
nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
def disassemble(compiled):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"]); f.flush()
        return subprocess.run([nvdisasm, f.name], capture_output=True, text=True, check=True).stdout
report = {}
for name, (kernel, types, extra_constexprs) in KERNELS.items():
    signature = {p: types[p] for p in kernel.arg_names}
    constexprs = {"WRITE_MASK": True, "BLOCK": 1024, **extra_constexprs}
    constexprs = {p: v for p, v in constexprs.items() if p in kernel.arg_names}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32))
    ptx, sass = compiled.asm["ptx"], disassemble(compiled)
    report[name] = {
        "ptx_add_2_23": len(re.findall(r"add\\.f32\\s+%r\\d+, %r\\d+, 0f4B000000", ptx)),
        "ptx_sub_2_23": len(re.findall(r"add\\.f32\\s+%r\\d+, %r\\d+, 0fCB000000", ptx)),
        "ptx_div_rn": ptx.count("div.rn.f32"),
        "ptx_mul_rn": len(re.findall(r"mul\\.rn\\.f32", ptx)),
        "learnable": "grad_factor" in kernel.arg_names,
        "divide_by_fold": extra_constexprs.get("DIVIDE_BY_FOLD", False),
        "per_channel_sum": "channel_size" in kernel.arg_names,
        "ptx_approx": len(re.findall(r"(div|rcp|sqrt)\\.(approx|full)", ptx)),
        "ptx_min_max": len(re.findall(r"(min|max)(\\.\\w+)*\\.f32", ptx)),
        "ptx_fma": len(re.findall(r"fma\\.\\w+\\.f32", ptx)),
        "ptx_offsets_64": len(re.findall(r"setp\\.lt\\.s64", ptx)),
        "sass_add_abs_2_23": len(re.findall(r"FADD R\\d+, \\|R\\d+\\|(\\.reuse)?, 8388608", sass)),
        "sass_sub_2_23": len(re.findall(r"FADD R\\d+, R\\d+(\\.reuse)?, -8388608", sass)),
    }

# observe_range's finalize kernel in several modes: the moving average as sub.rn/mul.rn/add.rn (no FMA, no
# flush to zero), the divisions IEEE. Its partial kernel: 64-bit channel offsets with 32-bit sizes.
OBSERVE_TYPES = {"partial_ptr": "*fp32", "fold_ptr": "*fp32", "tracked_ptr": "*fp32", "scale_ptr": "*fp32",
                 "zero_point_ptr": "*i32", "entries": "i32", "channels": "i32", "splits": "i32",
                 "tracked_row_stride": "i32", "tracked_entry_stride": "i32", "scale_stride": "i32",
                 "zero_point_stride": "i32", "averaging_constant": "fp32", "divisor": "fp32",
                 "quant_min": "fp32", "quant_max": "fp32", "symmetric_zero_point": "fp32", "x_ptr": "*fp32",
                 "per_channel": "i32", "run": "i32", "split_size": "i32"}
OBSERVE_MODES = {  # (REPLACE, SYMMETRIC, HAS_FOLD, REDUCE_CHANNELS, RELU)
    "average_affine_fold_per_tensor": (False, False, True, True, False),
    "average_symmetric_fold": (False, True, True, False, False),
    "replace_affine": (True, False, False, False, False),
    "average_affine": (False, False, False, False, False),
    "average_affine_relu": (False, False, False, False, True),
    "average_affine_fold_per_tensor_relu": (False, False, True, True, True),
}
def observe_constexprs(kernel, modes=(False, False, False, False, False)):
    values = dict(zip(("REPLACE", "SYMMETRIC", "HAS_FOLD", "REDUCE_CHANNELS", "RELU"), modes),
                  BLOCK_E=256, BLOCK_S=4, BLOCK_C=4, BLOCK_K=256)
    return {p: v for p, v in values.items() if p in kernel.arg_names}
def observe_source(kernel, types, modes=(False, False, False, False, False)):
    signature = {p: types.get(p, "constexpr") for p in kernel.arg_names}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=observe_constexprs(kernel, modes))
observe = {}
for mode, flags in OBSERVE_MODES.items():
    ptx = triton.compile(observe_source(triton_observe._observe_range_finalize_kernel, OBSERVE_TYPES, flags),
                         target=GPUTarget("cuda", 80, 32)).asm["ptx"]
    observe[mode] = {
        "replace": flags[0],
        "ptx_sub_rn": len(re.findall(r"sub\\.rn\\.f32", ptx)),
        "ptx_mul_rn": len(re.findall(r"mul\\.rn\\.f32", ptx)),
        "ptx_add_rn": len(re.findall(r"add\\.rn\\.f32", ptx)),
        "ptx_div_rn": ptx.count("div.rn.f32"),
        "ptx_approx": len(re.findall(r"(div|rcp|sqrt)\\.(approx|full)", ptx)),
        "ptx_fma": len(re.findall(r"fma\\.\\w+\\.f32", ptx)),
        "ptx_ftz": ptx.count(".ftz"),
    }
ptx = triton.compile(observe_source(triton_observe._observe_range_partial_kernel, OBSERVE_TYPES),
                     target=GPUTarget("cuda", 80, 32)).asm["ptx"]
observe["partial"] = {"ptx_offsets_64": len(re.findall(r"setp\\.lt\\.s64", ptx))}
report["observe_range"] = observe

# The float-format kernels, every constexpr branch (FP8's four scale sources, MX's two scale rules, NVFP4 with and
# without the per-tensor scale) and FP8's amax kernel, in the tiles the host launches them with. They hold
# subnormals (inputs, 2^-127 scales, products below 2^-126), so no .ftz anywhere; every division is div.rn.
def float_types(dtype):
    return {"x_ptr": "*" + dtype, "out_ptr": "*" + dtype, "mask_ptr": "*i1", "scale_ptr": "*fp32", "p_ptr": "*fp32",
            "partial_ptr": "*i32", "n_elements": "i32", "n_blocks": "i32", "block_size": "i32", "n_partials": "i32",
            "tiles_per_program": "i32"}
FP8_SCALE_MODES = {"block_amax": triton_float_formats._BLOCK_AMAX, "per_block": triton_float_formats._PER_BLOCK,
                   "tensor": triton_float_formats._TENSOR, "tensor_amax": triton_float_formats._TENSOR_AMAX}
# {name: (kernel, types beyond float_types, constexprs, divides)}: divides where the spec divides.
def float_variants():
    variants = {}
    for fmt, modes in (("e4m3", tuple(FP8_SCALE_MODES)), ("e5m2", ("block_amax",))):
        e = ELEMENT_FORMATS[fmt]
        for mode in modes:
            # As the host: one scale for the whole tensor walks flat tiles, blocks (of 128 here) get _tile's tile.
            whole = mode in ("tensor", "tensor_amax")
            rows, cols = (1, triton_common.BLOCK_SIZE) if whole else triton_float_formats._tile(128)
            constexprs = dict(MAX=e.max, SCALE_MAX=2.0 ** (126 - e.emax), EMIN=e.emin, EMAX=e.emax, MBITS=e.mbits,
                              SCALE_MODE=FP8_SCALE_MODES[mode].value, PARTIALS=64, WRITE_MASK=True, ROWS=rows,
                              COLS=cols)
            # tensor_amax reads the amax partials' fp32 bits as int32 through scale_ptr.
            types = {"scale_ptr": "*i32"} if mode == "tensor_amax" else {}
            variants[f"fp8_{fmt}_{mode}"] = (triton_float_formats._fake_quant_fp8_kernel, types, constexprs, True)
    variants["fp8_amax"] = (triton_float_formats._fp8_amax_kernel, {}, {"BLOCK": triton_float_formats.AMAX_BLOCK},
                            False)
    rows, cols = triton_float_formats._tile(32)
    for elem in ("e4m3", "int8", "e2m1"):  # an FP8, the integer and an FP4 element: their constants differ
        e = ELEMENT_FORMATS[elem]
        for scale_mode in MX_SCALE_MODES:
            constexprs = dict(MAX=e.max, EMIN=e.emin, EMAX=e.emax, MBITS=e.mbits, RCEIL=scale_mode == "rceil",
                              WRITE_MASK=True, ROWS=rows, COLS=cols)
            # floor's scale is a power of two built from the amax's bits: no division.
            variants[f"mx_{elem}_{scale_mode}"] = (triton_float_formats._fake_quant_mx_kernel, {}, constexprs,
                                                   scale_mode == "rceil")
    rows, cols = triton_float_formats._tile(16)
    for has_p in (False, True):
        constexprs = dict(HAS_P=has_p, WRITE_MASK=True, ROWS=rows, COLS=cols)
        name = "nvfp4_per_tensor_scale" if has_p else "nvfp4"
        variants[name] = (triton_float_formats._fake_quant_nvfp4_kernel, {}, constexprs, True)
    return variants
def float_source(kernel, types, constexprs):
    signature = {p: types.get(p, "constexpr") for p in kernel.arg_names}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
# What would change a float kernel's results: flush to zero, divisions other than div.rn, FMAs, min/max.
def exactness(ptx):
    return {
        "ptx_ftz": ptx.count(".ftz"),
        "ptx_div_rn": ptx.count("div.rn.f32"),
        "ptx_div_f32": len(re.findall(r"(div|rcp|sqrt)(\\.\\w+)*\\.f32", ptx)),
        "ptx_fma": len(re.findall(r"fma\\.\\w+\\.f32", ptx)),
        "ptx_min_max": len(re.findall(r"(min|max)(\\.\\w+)*\\.f32", ptx)),
    }
floats = {}
for name, (kernel, types, constexprs, divides) in float_variants().items():
    compiled = triton.compile(float_source(kernel, {**float_types("fp32"), **types}, constexprs),
                              target=GPUTarget("cuda", 80, 32))
    ptx, sass = compiled.asm["ptx"], disassemble(compiled)
    floats[name] = {
        **exactness(ptx),
        "divides": divides,
        "rounds": kernel is not triton_float_formats._fp8_amax_kernel,
        "ptx_add_2_23": len(re.findall(r"add\\.f32\\s+%r\\d+, %r\\d+, 0f4B000000", ptx)),
        "ptx_sub_2_23": len(re.findall(r"add\\.f32\\s+%r\\d+, %r\\d+, 0fCB000000", ptx)),
        "ptx_offsets_64": len(re.findall(r"setp\\.lt\\.s64", ptx)),
        "sass_add_abs_2_23": len(re.findall(r"FADD R\\d+, \\|R\\d+\\|(\\.reuse)?, 8388608", sass)),
        "sass_sub_2_23": len(re.findall(r"FADD R\\d+, R\\d+(\\.reuse)?, -8388608", sass)),
    }
report["float_formats"] = floats

# Every kernel, in every dtype, must also build (the interpreter accepts code the compiler rejects).
def build_all():
    built = []
    for dtype in ("fp32", "fp16", "bf16"):
        float_args = {"x_ptr": dtype, "out_ptr": dtype, "weight_ptr": dtype, "grad_ptr": dtype,
                      "grad_weight_ptr": dtype, "grad_gamma_ptr": dtype, "grad_var_ptr": dtype}
        types = {**COMMON, "channel_stride": "i64", "channels": "i64", "factor_ptr": "*fp32", "std_ptr": "*fp32",
                 "gamma_ptr": "*fp32", "channel_size": "i64", **{k: "*" + v for k, v in float_args.items()}}
        for kernel in (triton_fake_quant._fake_quant_per_tensor_kernel,
                       triton_fake_quant._fake_quant_per_channel_kernel, triton_fake_quant._binarize_kernel,
                       triton_bn_fold._bn_fold_fake_quant_weight_kernel, triton_fake_quant._masked_grad_kernel,
                       triton_bn_fold._bn_fold_fake_quant_weight_backward_kernel):
            signature = {p: types[p] for p in kernel.arg_names}
            # The BN-fold kernels in both modes (divide_by_fold or not).
            for divide in (False, True) if "DIVIDE_BY_FOLD" in kernel.arg_names else (False,):
                constexprs = {
                    p: v
                    for p, v in (("WRITE_MASK", True), ("BLOCK", 1024), ("RELU", False), ("DIVIDE_BY_FOLD", divide))
                    if p in kernel.arg_names
                }
                source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                triton.compile(source, target=GPUTarget("cuda", 90, 32))
                built.append(f"{kernel.fn.__name__}:{dtype}" + (":divided" if divide else ""))
        # observe_range: x, the range and the scale in this dtype (model.half()), an int64 zero point.
        types = {**OBSERVE_TYPES, "x_ptr": "*" + dtype, "tracked_ptr": "*" + dtype, "scale_ptr": "*" + dtype,
                 "zero_point_ptr": "*i64"}
        for kernel in (triton_observe._observe_range_partial_kernel, triton_observe._observe_range_finalize_kernel):
            triton.compile(observe_source(kernel, types), target=GPUTarget("cuda", 90, 32))
            built.append(f"{kernel.fn.__name__}:{dtype}")
        types = {**LEARNABLE_TYPES, **{p: "*" + dtype for p in ("grad_ptr", "x_ptr", "grad_x_ptr")}}
        kernel = triton_learnable._fake_quant_learnable_backward_kernel
        source = triton.compiler.ASTSource(fn=kernel, signature={p: types[p] for p in kernel.arg_names},
                                           constexprs={"BLOCK": 1024, "STEPS": 16})
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        built.append(f"{kernel.fn.__name__}:{dtype}")
        # The float-format kernels in every variant, their fp16/bf16 loads and stores checked as sm_80's fp32.
        for name, (kernel, types, constexprs, _) in float_variants().items():
            source = float_source(kernel, {**float_types(dtype), **types}, constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            float_exactness[f"{name}:{dtype}"] = exactness(compiled.asm["ptx"])
            built.append(f"{name}:{dtype}")
    return built


float_exactness = {}
report["built_for_sm_90"] = build_all()
report["float_formats_sm_90"] = float_exactness
print(json.dumps(report))
"""


def test_gpu_build_keeps_exact_arithmetic():
    """Compiled for sm_80: the 2^23 rounding survives as two FADDs, 1/scale is div.rn, the clamp keeps NaN.

    The interpreter runs the kernels' Python with numpy; this checks that the GPU compiler neither folds
    ``(|v| + 2^23) - 2^23`` nor fuses it into an FMA, divides with IEEE rounding and clamps with
    comparisons (no min/max.f32, which would map NaN to a range end); and that the float-format kernels, which
    the reference computes with fp32 subnormals, keep them (no .ftz, as numpy under the interpreter).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), FAKEQUANT_DISABLE_EXTENSION="1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    # 6 element-wise/backward kernels, the two BN-fold ones in both modes, observe_range's two and the learnable
    # backward; the 14 float-format variants (FP8's kernel in its 4 scale modes and E5M2, its amax kernel, MX with
    # 3 elements in 2 scale modes, NVFP4 with and without P); 3 dtypes.
    assert len(report.pop("built_for_sm_90")) == (11 + 14) * 3
    floats = report.pop("float_formats")
    assert len(floats) == 14
    for name, counts in floats.items():
        # Subnormals kept (no flush to zero), IEEE divisions only, no contraction, clamps that keep NaN.
        assert counts["ptx_ftz"] == 0 and counts["ptx_fma"] == 0 and counts["ptx_min_max"] == 0, (name, counts)
        assert counts["ptx_div_f32"] == counts["ptx_div_rn"], (name, counts)
        assert (counts["ptx_div_rn"] > 0) == counts["divides"], (name, counts)
        # 64-bit offsets: i32 sizes, so a 64-bit compare means the offsets themselves are.
        assert counts["ptx_offsets_64"] > 0, (name, counts)
        if counts["rounds"]:
            assert counts["ptx_add_2_23"] > 0 and counts["ptx_add_2_23"] == counts["ptx_sub_2_23"], (name, counts)
            assert counts["sass_add_abs_2_23"] == counts["ptx_add_2_23"], (name, counts)
            assert counts["sass_sub_2_23"] == counts["ptx_sub_2_23"], (name, counts)
    floats_sm_90 = report.pop("float_formats_sm_90")
    assert len(floats_sm_90) == 14 * 3
    for name, counts in floats_sm_90.items():
        assert counts["ptx_ftz"] == 0 and counts["ptx_fma"] == 0 and counts["ptx_min_max"] == 0, (name, counts)
        assert counts["ptx_div_f32"] == counts["ptx_div_rn"], (name, counts)
    observe = report.pop("observe_range")
    assert observe.pop("partial")["ptx_offsets_64"] > 0, observe
    for mode, counts in observe.items():
        # The moving average exactly as the CUDA kernel's __fsub_rn/__fmul_rn/__fadd_rn, for min and max.
        for op in ("ptx_sub_rn", "ptx_mul_rn", "ptx_add_rn"):
            assert (counts[op] == 0) if counts["replace"] else (counts[op] >= 2), (mode, counts)
        assert counts["ptx_fma"] == 0 and counts["ptx_ftz"] == 0 and counts["ptx_approx"] == 0, (mode, counts)
        # IEEE divisions: the scale and the affine zero point.
        assert counts["ptx_div_rn"] > 0, (mode, counts)
    for name, counts in report.items():
        assert counts["ptx_add_2_23"] > 0 and counts["ptx_add_2_23"] == counts["ptx_sub_2_23"], (name, counts)
        assert counts["sass_add_abs_2_23"] == counts["ptx_add_2_23"], (name, counts)
        assert counts["sass_sub_2_23"] == counts["ptx_sub_2_23"], (name, counts)
        assert counts["ptx_div_rn"] > 0 and counts["ptx_approx"] == 0, (name, counts)
        if counts["learnable"]:  # x_fq explicitly rounded before x_fq - x
            assert counts["ptx_mul_rn"] > 0, (name, counts)
        if counts["divide_by_fold"]:  # 1 / scale and out / f
            assert counts["ptx_div_rn"] >= 2, (name, counts)
        assert counts["ptx_min_max"] == 0, (name, counts)
        if counts["per_channel_sum"]:
            # The backward. Its folded sum acc += g * w may contract into FMAs (8 in sm_80's PTX, one per element
            # of a thread): a sum, compared with a tolerance; the recomputed mask has no a * b + c shape, and the
            # FADD counts above show its rounding intact. The divided sum's terms go through a select first, so
            # there any FMA would be in the recomputed output. Its bounds compare channel-relative 32-bit
            # indices: no 64-bit compare to look for.
            assert not counts["divide_by_fold"] or counts["ptx_fma"] == 0, (name, counts)
        else:
            assert counts["ptx_fma"] == 0, (name, counts)
            # n_elements is i32 here, so a 64-bit compare shows the offsets themselves are 64-bit (pid cast first).
            assert counts["ptx_offsets_64"] > 0, (name, counts)


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------


@needs_cuda
def test_compile_fullgraph_traces_the_triton_ops():
    x = torch.randn(4, 3, 17, 9, device="cuda")
    scale, zero_point = qparams(0.05, 2, "cuda")
    channel_scale, channel_zp = qparams([0.1, 0.05, 0.2], [0, 1, -1], "cuda")

    def fn(x):
        out, mask = torch.ops.fakequant._triton_fake_quant_per_tensor(x, scale, zero_point, -128, 127, True)
        out2, _ = torch.ops.fakequant._triton_fake_quant_per_channel(out, channel_scale, channel_zp, 1, -8, 7, False)
        return torch.ops.fakequant._triton_masked_grad(out2, mask)

    compiled = torch.compile(fn, fullgraph=True)
    assert_bits_equal(compiled(x), fn(x))

    # The float-format ops: FP8's two launches (amax partials, then the tensor) and its blocks, MX and NVFP4.
    xf = torch.randn(4, 3, 64, device="cuda")
    block_scale = torch.rand(xf.numel() // 32, device="cuda") * 0.01 + 0.001
    per_tensor_scale = torch.tensor([0.002], device="cuda")

    def floats(x):
        out, mask = torch.ops.fakequant._triton_fake_quant_fp8(x, None, "e4m3", 0, True)
        out, _ = torch.ops.fakequant._triton_fake_quant_fp8(out, block_scale, "e5m2", 32, False)
        out, _ = torch.ops.fakequant._triton_fake_quant_mx(out, "e2m1", 32, "rceil", False)
        out, _ = torch.ops.fakequant._triton_fake_quant_nvfp4(out, per_tensor_scale, 16, False)
        return torch.ops.fakequant._triton_masked_grad(out, mask)

    assert_bits_equal(torch.compile(floats, fullgraph=True)(xf), floats(xf))

    def public(x):
        return fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127) * 2

    def public_floats(x):
        return fakequant.fake_quant_fp8(x, None, "e4m3", 32) * fakequant.fake_quant_mx(x, "e4m3", 32, "floor")

    fakequant.set_backend("triton")
    try:
        assert_bits_equal(torch.compile(public, fullgraph=True)(x), public(x))
        assert_bits_equal(torch.compile(public_floats, fullgraph=True)(xf), public_floats(xf))
    finally:
        fakequant.set_backend("auto")


@needs_cuda
def test_opcheck_triton_ops_on_cuda():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 3, 5, 5, generator=gen).cuda()
    scale, zero_point = qparams(0.05, 2, "cuda")
    channel_scale, channel_zp = qparams([0.1, 0.05, 0.2, 0.3], [0, 1, -1, 0], "cuda")
    gamma, var = torch.rand(4, generator=gen).cuda() + 0.5, torch.rand(4, generator=gen).cuda()
    mask = x > 0
    cases = {
        "fake_quant_per_tensor": (x, scale, zero_point, -128, 127, True),
        "fake_quant_per_channel": (x, channel_scale, channel_zp, 0, -8, 7, True),
        "binarize": (x, True, True),
        "bn_fold_fake_quant_weight": (x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7, True),
        "masked_grad": (x, mask),
        "bn_fold_fake_quant_weight_backward": (x, x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7),
        "observe_range": (x, torch.randn(2, 4, device="cuda"), channel_scale.clone(), channel_zp.clone(), 0, 0.01,
                          -8, 7, False, gamma.clone()),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.fakequant, f"_triton_{name}").default, args)
    torch.library.opcheck(torch.ops.fakequant._triton_observe_range.default, (*cases["observe_range"], True))
    # divide_by_fold=True and its backward.
    torch.library.opcheck(
        torch.ops.fakequant._triton_bn_fold_fake_quant_weight.default,
        (x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7, True, True),
    )
    torch.library.opcheck(
        torch.ops.fakequant._triton_bn_fold_fake_quant_weight_backward.default,
        (x, x, gamma, var, 1e-5, channel_scale, channel_zp, -8, 7, True),
    )
    # The float-format ops in each of their kernels' modes.
    xf = torch.randn(4, 3, 32, generator=gen).cuda()
    block_scale = torch.rand(xf.numel() // 16, generator=gen).cuda() * 0.01 + 0.001
    tensor_scale = torch.tensor([0.005], device="cuda")
    float_cases = [
        ("fake_quant_fp8", (xf, None, "e4m3", 0, True)),
        ("fake_quant_fp8", (xf, tensor_scale, "e5m2", 0, False)),
        ("fake_quant_fp8", (xf, None, "e5m2", 16, True)),
        ("fake_quant_fp8", (xf, block_scale, "e4m3", 16, True)),
        ("fake_quant_mx", (xf, "e4m3", 32, "floor", True)),
        ("fake_quant_mx", (xf, "e2m1", 16, "rceil", False)),
        ("fake_quant_nvfp4", (xf, None, 16, True)),
        ("fake_quant_nvfp4", (xf, tensor_scale, 16, False)),
    ]
    for name, args in float_cases:
        torch.library.opcheck(getattr(torch.ops.fakequant, f"_triton_{name}").default, args)


@needs_cuda
@pytest.mark.skipif(not _backend.extension_has_cuda(), reason="fakequant._C was built without CUDA kernels")
def test_triton_matches_the_cuda_kernels_on_cuda():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(8, 16, 13, 11, generator=gen) * 3
    x.view(-1)[: len(NONFINITE)] = torch.tensor(NONFINITE)
    x = x.cuda().contiguous(memory_format=torch.channels_last)
    scale, zero_point = qparams(0.05, 3, "cuda")
    channel_scale = (torch.rand(16, generator=gen) * 0.1 + 0.01).cuda()
    channel_zp = torch.randint(-4, 4, (16,), generator=gen, dtype=torch.int32).cuda()
    weight, gamma, var, eps, w_scale, w_zp = bn_case((6, 3, 3, 3), gen, device=DEVICE)
    keep = x > 0
    # The float-format ops: blocks of 32 along a last dimension that channels_last makes strided, each row with
    # its own exponent (subnormal to overflowing), NaN/inf/zeros; one block wider than the kernels' tiles.
    xf = torch.randn(4, 8, 5, 32, generator=gen) * torch.exp2(torch.randint(-150, 130, (4, 8, 5, 1), generator=gen))
    xf.view(-1)[: len(NONFINITE)] = torch.tensor(NONFINITE)
    xf = xf.cuda().contiguous(memory_format=torch.channels_last)
    wide = (torch.randn(3, 8192, generator=gen) * 100).cuda()
    block_scale = (torch.rand(xf.numel() // 32, generator=gen) * 0.01 + 0.001).cuda()
    tensor_scale = torch.tensor([0.005], device="cuda")
    for dtype in FLOATS:
        xd, wd, xfd, wided = x.to(dtype), weight.to(dtype), xf.to(dtype), wide.to(dtype)
        calls = [
            ("fake_quant_per_tensor", (xd, scale, zero_point, -128, 127, True)),
            ("fake_quant_per_channel", (xd, channel_scale, channel_zp, 1, -8, 7, True)),
            ("binarize", (xd, True, True)),
            ("bn_fold_fake_quant_weight", (wd, gamma, var, eps, w_scale, w_zp, -128, 127, True)),
            ("masked_grad", (xd, keep)),
            ("fake_quant_fp8", (xfd, None, "e4m3", 0, True)),
            ("fake_quant_fp8", (xfd, tensor_scale, "e5m2", 0, True)),
            ("fake_quant_fp8", (xfd, None, "e5m2", 32, True)),
            ("fake_quant_fp8", (xfd, block_scale, "e4m3", 32, False)),
            ("fake_quant_fp8", (xfd, None, "e4m3", xf.numel(), True)),  # one block of whole rows, chunked
            *[("fake_quant_mx", (xfd, elem, 32, mode, True)) for elem in ELEMENT_FORMATS for mode in MX_SCALE_MODES],
            ("fake_quant_mx", (wided, "e4m3", 8192, "floor", True)),
            ("fake_quant_nvfp4", (xfd, None, 16, True)),
            ("fake_quant_nvfp4", (xfd, tensor_scale, 16, False)),
            ("fake_quant_nvfp4", (wided, tensor_scale, 8192, True)),
        ]
        for name, args in calls:
            results = {}
            for backend in ("cuda", "triton"):
                fakequant.set_backend(backend)
                try:
                    out = getattr(torch.ops.fakequant, name)(*args)
                finally:
                    fakequant.set_backend("auto")
                results[backend] = out if isinstance(out, tuple) else (out,)
            for a, b in zip(results["cuda"], results["triton"], strict=True):
                assert_bits_equal(a, b)
