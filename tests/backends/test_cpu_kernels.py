"""Tests specific to the C++ CPU kernels (csrc/cpu): vector bodies vs scalar tails, every layout branch of
the per-channel kernels, the mask-free path, mixed layouts in the backward kernels, every build variant
(AVX-512, AVX2, baseline), and 64-bit indexing.

The ops on every (device, backend) pair (argument errors, opcheck, torch.compile, autograd) are in tests/ops.
Here every call goes through ``torch.ops.fakequant`` on CPU tensors with the "auto" backend, which is the C++
kernel once ``fakequant._C`` is loaded (checked by ``cpu_op``), and is compared with the reference kernels
``fakequant.ops.kernels("reference")`` (the pure-PyTorch composition, laid out like the fake impls).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fakequant
from fakequant import ops
from fakequant.qparams import quant_range

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_op(name: str):
    """The op, after checking that the CPU dispatch key runs the compiled kernel."""
    assert fakequant.extension_loaded(), f"fakequant._C is not loaded: {fakequant.extension_error()}"
    assert fakequant.get_backend() == "auto"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fakequant::{name}", "CPU")
    return getattr(torch.ops.fakequant, name)


def reference_op(name: str):
    return ops.kernels("reference")[name]


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, strides and bits (NaN where NaN)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if actual.numel() > 1:
        assert actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_same_as_reference(name: str, *args) -> tuple:
    got = cpu_op(name)(*args)
    want = reference_op(name)(*args)
    if isinstance(want, torch.Tensor):
        got, want = (got,), (want,)
    for g, w in zip(got, want, strict=True):
        assert_identical(g, w)
    return got


def qparams(scale: float, zero_point: int, dtype=torch.int32):
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=dtype)


def special_values(n: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Random values over a wide range, exact ties (k + 0.5) * scale, NaN, +-inf, +-0 scattered."""
    x = torch.randn(n, generator=generator) * 200 * scale
    if n == 0:
        return x
    ties = (torch.randint(-300, 300, (n,), generator=generator).float() + 0.5) * scale
    pick = torch.rand(n, generator=generator)
    x = torch.where(pick < 0.3, ties, x)
    for value, p in ((float("nan"), 0.03), (float("inf"), 0.02), (float("-inf"), 0.02), (0.0, 0.02), (-0.0, 0.02)):
        x = torch.where(torch.rand(n, generator=generator) < p, torch.tensor(value), x)
    return x


# ---------------------------------------------------------------------------------------------
# The extension and the variant choice
# ---------------------------------------------------------------------------------------------


def test_compiled_kernels_serve_every_op():
    for name in ops.kernel_op_names():
        cpu_op(name)


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd (Linux) to list the extension's libraries")
def test_extension_is_built_with_openmp():
    # at::parallel_for is an inline template: compiled without -fopenmp it silently runs on one thread.
    import fakequant._C

    libraries = subprocess.run(["ldd", fakequant._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in libraries


VARIANT_SCRIPT = textwrap.dedent(
    """
    import torch, fakequant
    from fakequant import ops
    reference_kernels = ops.kernels("reference")
    g = torch.Generator().manual_seed(0)
    def same(a, b):
        assert a.dtype == b.dtype and a.shape == b.shape and (a.numel() < 2 or a.stride() == b.stride())
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    def check(name, *args):
        got, want = getattr(torch.ops.fakequant, name)(*args), reference_kernels[name](*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            same(a, b)
    s, z = torch.tensor(0.1), torch.tensor(3, dtype=torch.int32)
    for n in (0, 1, 31, 32, 33, 63, 64, 65, 70, 135, 1000):
        x = torch.randn(n, generator=g) * 20
        x[::7] = (torch.arange(len(x[::7])) - 5.5) * 0.1
        if n > 3:
            x[1], x[2], x[3] = float("nan"), float("inf"), -float("inf")
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            xd = x.to(dt)
            for cm in (True, False):
                check("fake_quant_per_tensor", xd, s, z, -128, 127, cm)
                check("binarize", xd, True, cm)
            check("masked_grad", xd, xd > 0)
            if n:
                for relu in (False, True):
                    state = [(torch.zeros(2), torch.ones(()), torch.zeros((), dtype=torch.int32)) for _ in "ab"]
                    torch.ops.fakequant.observe_range(xd, *state[0], None, 1.0, -128, 127, False, None, relu)
                    reference_kernels["observe_range"](xd, *state[1], None, 1.0, -128, 127, False, None, relu)
                    for a, b in zip(*state):
                        same(a, b)
    x = torch.randn(4, 6, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    for axis in range(4):
        c = x.size(axis)
        sc = torch.rand(c, generator=g) + 0.05
        zc = torch.randint(-3, 4, (c,), generator=g, dtype=torch.int32)
        check("fake_quant_per_channel", x, sc, zc, axis, -8, 7)
    w = torch.randn(40, 3, 3, 3, generator=g)
    gamma, var = torch.rand(40, generator=g) + 0.5, torch.rand(40, generator=g) + 0.1
    sc, zc = torch.rand(40, generator=g) + 0.01, torch.zeros(40, dtype=torch.int32)
    check("bn_fold_fake_quant_weight", w, gamma, var, 1e-5, sc, zc, -8, 7)
    grad = torch.randn_like(w)
    gamma_with_zero = torch.cat([torch.zeros(1), gamma[1:]])
    for divide_by_fold, gm in ((False, gamma), (True, gamma), (True, gamma_with_zero)):
        check("bn_fold_fake_quant_weight", w, gm, var, 1e-5, sc, zc, -8, 7, True, divide_by_fold)
        args = (grad, w, gm, var, 1e-5, sc, zc, -8, 7, divide_by_fold)
        got = torch.ops.fakequant.bn_fold_fake_quant_weight_backward(*args)
        want = reference_kernels["bn_fold_fake_quant_weight_backward"](*args)
        same(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    print("variant ok")
    """
)


def run_python(script: str, **env) -> subprocess.CompletedProcess:
    root = ROOT
    full_env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full_env, timeout=300)


def cpu_supports(*features: str) -> bool:
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    return all(feature in flags for feature in features)


@pytest.mark.parametrize("capability", ["baseline", "avx2", "avx512"])
def test_every_kernel_variant_matches_reference(capability):
    """Each build variant, chosen with FAKEQUANT_CPU_CAPABILITY, is exact; the rest of this file runs the
    default one (the best the CPU has)."""
    needs = {"baseline": (), "avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}
    if not cpu_supports(*needs[capability]):
        pytest.skip(f"this CPU lacks {', '.join(needs[capability])}")
    result = run_python(VARIANT_SCRIPT, FAKEQUANT_CPU_CAPABILITY=capability)
    assert result.returncode == 0, result.stderr
    assert "variant ok" in result.stdout


def test_avx2_variant_passes_this_file_on_an_avx512_cpu():
    """Where the default is the AVX-512 build, the AVX2 build (the default of most other x86 CPUs) still runs
    every test of this file, in a child pytest."""
    if not cpu_supports("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"):
        pytest.skip("the default build here is not AVX-512: this file already runs the AVX2 or baseline build")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__),
               "-k", "not variant and not capability"]
    root = ROOT
    env = dict(os.environ, FAKEQUANT_CPU_CAPABILITY="avx2",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_unknown_cpu_capability_is_an_error():
    # Proves the variable is read (so the variant tests above really run the variant they name).
    script = "import torch, fakequant; torch.ops.fakequant.binarize(torch.ones(3))"
    result = run_python(script, FAKEQUANT_CPU_CAPABILITY="sse9")
    assert result.returncode != 0
    assert "FAKEQUANT_CPU_CAPABILITY is 'sse9'; allowed: avx512, avx2, baseline" in result.stderr


# ---------------------------------------------------------------------------------------------
# Per-tensor: vector bodies vs scalar tails, bit-exact vs the reference and vs torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_per_tensor_every_length_up_to_135(dtype):
    g = torch.Generator().manual_seed(1)
    scale, zp = qparams(0.05, 3)
    for n in list(range(136)) + [255, 1001]:
        x = special_values(n, 0.05, g).to(dtype)
        for compute_mask in (True, False):
            out, mask = assert_same_as_reference("fake_quant_per_tensor", x, scale, zp, -128, 127, compute_mask)
            if not compute_mask:
                assert mask.shape == (0,) and mask.dtype == torch.bool
            # relu=True's vector body assumes zero_point >= quant_min: at the bottom, inside and at the top
            for relu_zp, quant_min, quant_max in ((0, 0, 255), (3, -128, 127), (7, -8, 7)):
                relu_zero_point = torch.tensor(relu_zp, dtype=torch.int32)
                assert_same_as_reference(
                    "fake_quant_per_tensor", x, scale, relu_zero_point, quant_min, quant_max, compute_mask, True
                )


def observe_same_as_reference(x: torch.Tensor, axis: int | None, relu: bool = False) -> None:
    """observe_range on fresh state, compiled against the reference: the same range, scale and zero point."""
    channels = 1 if axis is None else x.size(axis)
    results = []
    for op in (cpu_op("observe_range"), reference_op("observe_range")):
        shape = (2,) if axis is None else (2, channels)
        state = (torch.zeros(shape), torch.ones(shape[1:]), torch.zeros(shape[1:], dtype=torch.int32))
        op(x, *state, axis, 1.0, -128, 127, False, None, relu)
        results.append(state)
    for got, want in zip(*results, strict=True):
        assert_identical(got, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_observe_range_every_length_and_nan_position(dtype):
    # The vector body masks out non-finite lanes: a NaN or +-inf anywhere (body or tail, any accumulator) must be
    # left out of the range, as must a run of them (no finite element: the state stays).
    g = torch.Generator().manual_seed(11)
    for n in list(range(1, 136)) + [1001]:
        x = (torch.randn(n, generator=g) * 5).to(dtype)
        observe_same_as_reference(x, None)
        observe_same_as_reference(x, None, relu=True)
        for position in sorted({0, min(n - 1, 1), n // 2, n - 1, min(n - 1, 33), min(n - 1, 63)}):
            for value in (float("nan"), float("inf"), -float("inf")):
                y = x.clone()
                y[position] = value
                observe_same_as_reference(y, None)
        for value in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[n // 3 :] = value  # the body and the tail: all non-finite beyond n // 3 (all of it for n < 3)
            observe_same_as_reference(y, None)
            observe_same_as_reference(y, None, relu=True)
    for channels, run in ((3, 70), (5, 33), (2, 1001)):
        x = (torch.randn(channels, run, generator=g) * 5).to(dtype)
        x[1, run // 3] = float("nan")
        observe_same_as_reference(x, 0)
        observe_same_as_reference(x.t(), 1)  # the same storage, channels last in memory


def test_per_tensor_offset_views_start_mid_vector():
    # Storage offsets 1..7: the loads and the 32-byte mask store are unaligned.
    g = torch.Generator().manual_seed(2)
    base = special_values(300, 0.1, g)
    scale, zp = qparams(0.1, -2)
    for start in range(8):
        assert_same_as_reference("fake_quant_per_tensor", base[start : start + 200], scale, zp, -128, 127)


@pytest.mark.parametrize("bits", range(1, 17))
def test_per_tensor_bit_widths_match_torch(bits):
    g = torch.Generator().manual_seed(100 + bits)
    ranges = [quant_range(bits, True), quant_range(bits, False)]
    if bits >= 2:
        ranges.append(quant_range(bits, True, True))
    for quant_min, quant_max in ranges:
        for scale_value in (0.013, 0.5, 3.0):
            zero_point = int(torch.randint(quant_min, quant_max + 1, (), generator=g))
            scale, zp = qparams(scale_value, zero_point)
            levels = torch.randint(quant_min - 3, quant_max + 4, (1000,), generator=g).float() - zero_point
            ties = (levels + 0.5) * scale_value
            wide = torch.randn(1000, generator=g) * (quant_max - quant_min + 1) * scale_value
            x = torch.cat([ties, wide, levels * scale_value])
            out, mask = assert_same_as_reference("fake_quant_per_tensor", x, scale, zp, quant_min, quant_max)
            expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, quant_min, quant_max)
            assert_identical(out, expected)
            q = torch.round(x * (1.0 / scale)) + zero_point
            assert torch.equal(mask, (q >= quant_min) & (q <= quant_max))


def test_per_tensor_non_finite():
    scale, zp = qparams(0.25, 1)
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 0.125, -0.125] * 10)
    out, mask = cpu_op("fake_quant_per_tensor")(x, scale, zp, -8, 7)
    assert torch.isnan(out[0::7]).all()
    assert (out[1::7] == (7 - 1) * 0.25).all() and (out[3::7] == 6 * 0.25).all()
    assert (out[2::7] == (-8 - 1) * 0.25).all() and (out[4::7] == -9 * 0.25).all()
    assert not mask[0::7].any() and not mask[1::7].any() and not mask[2::7].any()
    # 0.125 / 0.25 = 0.5 -> 0 (even), -0.5 -> -0: both in range
    assert (out[5::7] == 0).all() and (out[6::7] == 0).all() and mask[5::7].all()
    assert_same_as_reference("fake_quant_per_tensor", x, scale, zp, -8, 7)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_per_tensor_layouts(dtype):
    g = torch.Generator().manual_seed(3)
    scale, zp = qparams(0.07, 0, torch.int64)
    x4 = special_values(2 * 5 * 6 * 7, 0.07, g).reshape(2, 5, 6, 7).to(dtype)
    layouts = [
        x4,
        x4.contiguous(memory_format=torch.channels_last),
        x4.permute(3, 1, 0, 2),  # dense, any permutation
        x4[:, ::2],  # not dense: copied once
        x4.transpose(0, 3)[1:],  # not dense
        x4.expand(3, 2, 5, 6, 7),  # overlapping (zero stride)
        x4[:, :0],  # empty
    ]
    for x in layouts:
        out, mask = assert_same_as_reference("fake_quant_per_tensor", x, scale, zp, -100, 100)
        assert out.stride() == torch.empty_like(x).stride()
        assert mask.stride() == torch.empty_like(x).stride()


# ---------------------------------------------------------------------------------------------
# Per-channel: every layout branch (runs of one channel, channel patterns, a single channel)
# ---------------------------------------------------------------------------------------------


def channel_qparams(channels: int, generator: torch.Generator, quant_min=-128, quant_max=127):
    scale = torch.rand(channels, generator=generator) * 0.2 + 0.01
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator, dtype=torch.int32)
    return scale, zero_point


def per_channel_cases():
    """(description, tensor, axis), covering long runs (stride >= 32), patterns (stride < 32), patterns
    too long to cache (runs of stride < 32 served element-wise), channels innermost, and size-1 axes."""
    g = torch.Generator().manual_seed(4)
    x4 = special_values(3 * 8 * 9 * 10, 0.05, g).reshape(3, 8, 9, 10)
    nchw = special_values(2 * 16 * 12 * 12, 0.05, g).reshape(2, 16, 12, 12)
    return [
        ("axis0 contiguous (run 720)", x4, 0),
        ("axis1 contiguous (run 90)", x4, 1),
        ("axis2 contiguous (run 10: pattern)", x4, 2),
        ("axis3 contiguous (channels innermost)", x4, 3),
        ("axis -1", x4, -1),
        ("nchw axis1 (run 144)", nchw, 1),
        ("channels_last axis1 (innermost)", nchw.contiguous(memory_format=torch.channels_last), 1),
        ("channels_last axis2", nchw.contiguous(memory_format=torch.channels_last), 2),
        ("channels_last axis0", nchw.contiguous(memory_format=torch.channels_last), 0),
        ("permuted axis1", x4.permute(2, 0, 3, 1), 1),
        ("non-dense axis1", x4[:, ::2, :, 1:], 1),
        ("conv weight axis0", special_values(64 * 3 * 3 * 3, 0.05, g).reshape(64, 3, 3, 3), 0),
        ("linear weight axis0 (run 5)", special_values(37 * 5, 0.05, g).reshape(37, 5), 0),
        ("1-D", special_values(70, 0.05, g), 0),
        ("single channel", x4[:, :1], 1),
        ("size-1 axis with odd stride", x4[:, 2:3].transpose(1, 3), 3),
        ("pattern too long to cache (run 2, 9000 channels)", special_values(9000 * 2, 0.05, g).reshape(9000, 2), 0),
        ("channels innermost, 20000 channels", special_values(3 * 20000, 0.05, g).reshape(3, 20000), 1),
        ("empty", x4[:0], 1),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_per_channel_layout_branches(dtype):
    g = torch.Generator().manual_seed(5)
    for description, x, axis in per_channel_cases():
        x = x.to(dtype)
        scale, zero_point = channel_qparams(x.size(axis), g)
        for compute_mask in (True, False):
            try:
                assert_same_as_reference("fake_quant_per_channel", x, scale, zero_point, axis, -128, 127, compute_mask)
            except AssertionError as error:
                raise AssertionError(f"{description}, compute_mask={compute_mask}: {error}") from error


def test_per_channel_matches_torch_on_finite_inputs():
    g = torch.Generator().manual_seed(6)
    for description, x, axis in per_channel_cases():
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
        for quant_min, quant_max in (quant_range(8), quant_range(4, False), quant_range(8, True, True)):
            scale, zero_point = channel_qparams(x.size(axis), g, quant_min, quant_max)
            out, _ = cpu_op("fake_quant_per_channel")(x, scale, zero_point, axis, quant_min, quant_max)
            expected = torch.fake_quantize_per_channel_affine(
                x, scale, zero_point, axis % x.dim(), quant_min, quant_max
            )
            assert torch.equal(out, expected), description


def test_per_channel_ties_per_channel():
    # Element i of channel c sits exactly on a tie of channel c's own scale.
    g = torch.Generator().manual_seed(7)
    channels = 13
    scale, zero_point = channel_qparams(channels, g, -8, 7)
    k = torch.randint(-12, 12, (channels, 70), generator=g).float() + 0.5
    for x, axis in ((k * scale[:, None], 0), ((k * scale[:, None]).t().contiguous(), 1)):
        out, _ = assert_same_as_reference("fake_quant_per_channel", x, scale, zero_point, axis, -8, 7)
        assert torch.equal(out, torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, -8, 7))


# ---------------------------------------------------------------------------------------------
# Binarize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_binarize_every_length_and_layout(dtype):
    g = torch.Generator().manual_seed(8)
    for n in list(range(136)) + [1001]:
        x = special_values(n, 0.01, g).to(dtype)
        for clipped_ste in (True, False):
            for compute_mask in (True, False):
                out, mask = assert_same_as_reference("binarize", x, clipped_ste, compute_mask)
                if not (clipped_ste and compute_mask):
                    assert mask.shape == (0,)
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, float("nan"), float("inf"), -1e-3] * 5, dtype=dtype)
    out, mask = cpu_op("binarize")(x)
    assert out[:2].eq(1).all() and out[7] == -1 and torch.isnan(out[5])
    assert mask[:4].all() and not mask[5] and not mask[6]
    x4 = special_values(4 * 6 * 5 * 3, 0.01, g).reshape(4, 6, 5, 3).to(dtype)
    for x in (x4.contiguous(memory_format=torch.channels_last), x4[:, 1::2], x4.permute(1, 3, 0, 2)):
        assert_same_as_reference("binarize", x, True, True)


# ---------------------------------------------------------------------------------------------
# masked_grad: equal layouts (the fused path) and mismatched ones (the strided path)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (torch.float64,))
def test_masked_grad_layouts(dtype):
    g = torch.Generator().manual_seed(9)
    shape = (3, 8, 5, 7)
    grad = special_values(3 * 8 * 5 * 7, 1.0, g).reshape(shape).to(dtype)
    mask = torch.rand(shape, generator=g) < 0.5
    cases = [
        (grad, mask),
        (grad.contiguous(memory_format=torch.channels_last), mask.contiguous(memory_format=torch.channels_last)),
        (grad, mask.contiguous(memory_format=torch.channels_last)),  # mask follows x, grad contiguous
        (grad.contiguous(memory_format=torch.channels_last), mask),
        (grad.transpose(1, 2), mask.transpose(1, 2).contiguous()),
        (grad[:, ::2].transpose(0, 1).contiguous().transpose(0, 1), mask[:, ::2]),  # non-dense mask
        (grad.expand(2, *shape), mask.expand(2, *shape)),
    ]
    for n in range(136):
        cases.append((grad.flatten()[:n], mask.flatten()[:n]))
    for grad_case, mask_case in cases:
        out = assert_same_as_reference("masked_grad", grad_case, mask_case)[0]
        assert out.stride() == torch.empty_like(grad_case).stride()
        # False positions hold +0.0 whatever the gradient was (NaN, inf, -0.0).
        zeros = out[~mask_case]
        assert torch.equal(zeros, torch.zeros_like(zeros)) and not torch.signbit(zeros).any()


# ---------------------------------------------------------------------------------------------
# BN folding: forward (per-channel with a fold factor) and backward (grad_weight and channel sums)
# ---------------------------------------------------------------------------------------------


def bn_inputs(out_channels: int, generator: torch.Generator, dtype=torch.float32):
    gamma = (torch.rand(out_channels, generator=generator) + 0.5).to(dtype)
    var = (torch.rand(out_channels, generator=generator) + 0.01).to(dtype)
    scale = torch.rand(out_channels, generator=generator) * 0.05 + 0.005
    zero_point = torch.randint(-4, 5, (out_channels,), generator=generator, dtype=torch.int32)
    return gamma, var, scale, zero_point


def weight_cases(generator: torch.Generator):
    w = special_values(24 * 5 * 3 * 3, 0.05, generator).reshape(24, 5, 3, 3)
    return [
        w,
        w.contiguous(memory_format=torch.channels_last),
        w[:, 1:4],  # not dense
        w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2),  # output channels innermost (run 1)
        special_values(50 * 7, 0.05, generator).reshape(50, 7),  # linear weight, run 7
        special_values(10 * 64, 0.05, generator).reshape(10, 64),  # run 64
        special_values(6 * 150, 0.05, generator).reshape(6, 150),  # run 150: vector blocks and a scalar tail
        special_values(33, 0.05, generator),  # 1-D
        w[:0],
    ]


def with_zero_gamma(gamma: torch.Tensor) -> torch.Tensor:
    """gamma with its first and last channels 0 (the fold factor divide_by_fold takes as 1)."""
    gamma = gamma.clone()
    if gamma.numel() > 0:
        gamma[0] = 0
        gamma[-1] = 0
    return gamma


@pytest.mark.parametrize("divide_by_fold", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bn_fold_forward(dtype, divide_by_fold):
    g = torch.Generator().manual_seed(10)
    for w in weight_cases(g):
        gamma, var, scale, zero_point = bn_inputs(w.size(0), g, dtype if dtype != torch.float32 else torch.float32)
        for gamma_case in (gamma, with_zero_gamma(gamma)):
            for compute_mask in (True, False):
                for eps in (1e-5, 0.1, 0.0):
                    assert_same_as_reference(
                        "bn_fold_fake_quant_weight", w.to(dtype), gamma_case, var, eps, scale, zero_point, -8, 7,
                        compute_mask, divide_by_fold,
                    )


@pytest.mark.parametrize("divide_by_fold", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bn_fold_backward(dtype, divide_by_fold):
    g = torch.Generator().manual_seed(11)
    for w in weight_cases(g):
        w = torch.nan_to_num(w, nan=0.3, posinf=2.0, neginf=-2.0).to(dtype)
        gamma, var, scale, zero_point = bn_inputs(w.size(0), g)
        if divide_by_fold:
            gamma = with_zero_gamma(gamma)
        grad = torch.randn(w.shape, generator=g).to(dtype)
        for grad_case in (
            grad,
            grad.contiguous(),  # grad contiguous while the weight is channels_last
            grad.float(),  # mixed dtypes: the fallback composition
        ):
            args = (grad_case, w, gamma, var, 1e-5, scale, zero_point, -8, 7, divide_by_fold)
            got = cpu_op("bn_fold_fake_quant_weight_backward")(*args)
            want = reference_op("bn_fold_fake_quant_weight_backward")(*args)
            assert_identical(got[0], want[0])
            tolerance = 1e-5 if dtype == torch.float32 else 1e-3
            for a, b in zip(got[1:], want[1:], strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


def test_bn_fold_backward_large_channel_sums():
    # Sums over more than one reduction chunk (2^16 elements) and over a run split between chunks.
    g = torch.Generator().manual_seed(12)
    w = torch.randn(6, 50000, generator=g)
    gamma, var, _, _ = bn_inputs(6, g)
    factor = fakequant.reference.bn_fold_factor(gamma, var, 1e-3)
    scale = (w * factor[:, None]).abs().amax(1) / 7 * 0.7  # ~10% of each channel clipped
    zero_point = torch.zeros(6, dtype=torch.int32)
    _, mask = cpu_op("bn_fold_fake_quant_weight")(w, gamma, var, 1e-3, scale, zero_point, -8, 7)
    assert 0.5 < mask.float().mean() < 1
    grad = torch.randn(w.shape, generator=g)
    args = (grad, w, gamma, var, 1e-3, scale, zero_point, -8, 7)
    got = cpu_op("bn_fold_fake_quant_weight_backward")(*args)
    want = reference_op("bn_fold_fake_quant_weight_backward")(*args)
    assert_identical(got[0], want[0])
    exact = (torch.where(mask, grad, 0).double() * w.double()).sum(1)
    torch.testing.assert_close(got[1].double(), exact / torch.sqrt(var.double() + 1e-3), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-3)


def test_bn_fold_divided_backward_large_channel_sums():
    # divide_by_fold's sums, of grad * (mask * w - out), over several reduction chunks, against float64.
    g = torch.Generator().manual_seed(13)
    w = torch.randn(6, 50000, generator=g)
    gamma, var, _, _ = bn_inputs(6, g)
    gamma[2] = 0
    factor = fakequant.reference.bn_fold_training_factor(gamma, var, 1e-3)
    scale = (w * factor[:, None]).abs().amax(1) / 7
    zero_point = torch.zeros(6, dtype=torch.int32)
    out, mask = cpu_op("bn_fold_fake_quant_weight")(w, gamma, var, 1e-3, scale * 0.7, zero_point, -8, 7, True, True)
    grad = torch.randn(w.shape, generator=g)
    got = cpu_op("bn_fold_fake_quant_weight_backward")(grad, w, gamma, var, 1e-3, scale * 0.7, zero_point, -8, 7, True)
    assert_identical(got[0], torch.where(mask, grad, 0))
    sums = (grad.double() * (torch.where(mask, w, 0).double() - out.double())).sum(1)
    std = torch.sqrt(var.double() + 1e-3)
    grad_factor = torch.where(gamma == 0, 0, sums / factor.double())
    torch.testing.assert_close(got[1].double(), grad_factor / std, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[2].double(), -0.5 * grad_factor * gamma.double() / std**3, rtol=1e-4, atol=1e-4)
    assert got[1][2] == 0 and got[2][2] == 0


# ---------------------------------------------------------------------------------------------
# 64-bit indexing
# ---------------------------------------------------------------------------------------------


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists("/proc/meminfo") or available_memory_bytes() < 14 * 2**30,
    reason="needs ~11 GB of free memory (measured peak RSS 11.1 GB); checks 64-bit indexing",
)
def test_more_than_2_31_elements():
    """bf16 with 2^31 + 2^12 elements: 4.3 GB in, 4.3 GB out and a 2.1 GB mask (~11 GB at peak).

    Measured here: 18.6 s for the test (26 s with pytest start-up) under load ~3.7 on 2 cores, peak RSS 11.2 GB.
    """
    n = (1 << 31) + (1 << 12)
    x = torch.zeros(n, dtype=torch.bfloat16)
    positions = torch.tensor([0, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, (1 << 31) + 77, n - 33, n - 1])
    values = torch.tensor([1.0, -2.5, 0.75, 12.25, float("nan"), -0.375, 3.0], dtype=torch.bfloat16)
    x[positions] = values
    scale, zp = qparams(0.25, 1)
    out, mask = cpu_op("fake_quant_per_tensor")(x, scale, zp, -8, 7)
    expected, expected_mask = reference_op("fake_quant_per_tensor")(values, scale, zp, -8, 7)
    assert_identical(out[positions], expected)
    assert torch.equal(mask[positions], expected_mask)
    # Zeros elsewhere: 0 quantizes to 0 (level 1 - zero point 1), in range.
    for i in ((1 << 31) + 5, n - 2, n - 40):
        assert out[i] == 0 and mask[i]
