"""The CUDA kernels (csrc/cuda/*.cu).

Without a GPU (this machine, CI) three groups run: the built ``fakequant._C`` holds machine code for
sm_80 and sm_90 (``cuobjdump --list-elf``), every op has its CUDA kernel registered, and the CUDA
kernels' argument checks raise the reference's errors word for word (called through the dispatcher's
CUDA key with CPU tensors, which the checks reject before any device is touched). Everything that
runs a kernel needs a GPU and is skipped here with the reason "no CUDA device".
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fakequant
from fakequant import _ops, reference

# Every op with a kernel of its own (the composite fake_quant_learnable runs the per-tensor/per-channel kernels).
OPS = _ops.KERNEL_OPS
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Must match setup.py's DEFAULT_CUDA_ARCH_LIST (the architectures a build holds unless
# TORCH_CUDA_ARCH_LIST says otherwise): SASS for sm_80 and sm_90, PTX for compute_90.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


# ---------------------------------------------------------------------------------------------
# Is this a CUDA build?
# ---------------------------------------------------------------------------------------------


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def cuda_build_expected() -> bool:
    """setup.py's own rule: a CUDA build of torch, an nvcc under CUDA_HOME, FAKEQUANT_BUILD_CUDA != 0."""
    if os.environ.get("FAKEQUANT_BUILD_CUDA", "1") == "0" or torch.version.cuda is None:
        return False
    home = _cuda_home()
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def extension_path() -> str:
    paths = glob.glob(os.path.join(os.path.dirname(fakequant.__file__), "_C*.so"))
    assert paths, "fakequant._C is not built; run `python setup.py build_ext --inplace`"
    return max(paths, key=os.path.getmtime)


def require_cuda_build() -> None:
    """Skips when this environment would build _C without CUDA; never when it would build it with CUDA.

    CI exports CUDA_HOME=/usr/local/cuda (run.sh), so there this never skips: a CUDA build that came out
    without its kernels fails the tests below instead of hiding behind a skip.
    """
    if not cuda_build_expected():
        pytest.skip(
            "fakequant._C is built without CUDA here (FAKEQUANT_BUILD_CUDA=0, a CPU-only torch, or no nvcc "
            f"under CUDA_HOME={_cuda_home()!r})"
        )


@pytest.fixture
def auto_backend():
    """The compiled kernels, whatever backend an earlier test chose."""
    previous = fakequant.get_backend()
    fakequant.set_backend("auto")
    yield
    fakequant.set_backend(previous)


# ---------------------------------------------------------------------------------------------
# (a) The library holds code for sm_80 and sm_90.
# ---------------------------------------------------------------------------------------------


def find_cuobjdump() -> str | None:
    candidates = []
    if _cuda_home():
        candidates.append(os.path.join(_cuda_home(), "bin", "cuobjdump"))
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(on_path)
    # The nvidia-cuda-cuobjdump wheel (requirements.txt): the machine's CUDA toolkit is partial.
    for site_dir in sys.path:
        candidates += glob.glob(os.path.join(site_dir, "nvidia", "*", "bin", "cuobjdump"))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def expected_architectures() -> tuple[set[str], set[str]]:
    """(SASS, PTX) architectures the build was asked for, e.g. ({"sm_80", "sm_90"}, {"compute_90"})."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
    sass, ptx = set(), set()
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        number = entry.removesuffix("+PTX").replace(".", "")
        sass.add(f"sm_{number}")
        if entry.endswith("+PTX"):
            ptx.add(f"compute_{number}")
    return sass, ptx


def test_default_arch_list_covers_sm80_and_sm90():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST is set, so the build holds what it names, not the default")
    sass, ptx = expected_architectures()
    assert sass == {"sm_80", "sm_90"} and ptx == {"compute_90"}
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")) as f:
        assert f'DEFAULT_CUDA_ARCH_LIST = "{DEFAULT_CUDA_ARCH_LIST}"' in f.read()


def test_library_holds_code_for_sm80_and_sm90():
    require_cuda_build()
    tool = find_cuobjdump()
    assert tool is not None, (
        "cuobjdump not found (looked in CUDA_HOME/bin, PATH and the nvidia-cuda-cuobjdump wheel); "
        "`pip install -r requirements.txt` installs it"
    )
    library = extension_path()
    elf = subprocess.run([tool, "--list-elf", library], capture_output=True, text=True, timeout=120)
    assert elf.returncode == 0, elf.stderr
    # Lines like "ELF file    1: _C.abi3.1.sm_80.cubin", one per .cu file and architecture.
    sass_found = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf.stdout))
    ptx = subprocess.run([tool, "--list-ptx", library], capture_output=True, text=True, timeout=120)
    ptx_found = set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx.stdout)) if ptx.returncode == 0 else set()
    ptx_found = {a.replace("sm_", "compute_") for a in ptx_found}
    sass, ptx_expected = expected_architectures()
    assert sass_found == sass, f"SASS in {library}: {sorted(sass_found)}; expected {sorted(sass)}\n{elf.stdout}"
    assert ptx_found == ptx_expected, f"PTX in {library}: {sorted(ptx_found)}; expected {sorted(ptx_expected)}"
    # Every .cu file contributes one cubin per architecture.
    cu_files = glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc/cuda/*.cu"))
    assert len(re.findall(r"\.cubin", elf.stdout)) == len(cu_files) * len(sass)


# ---------------------------------------------------------------------------------------------
# (b) Every op has its CUDA kernel, registered from csrc/cuda.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPS)
def test_cuda_kernel_registered(name, auto_backend):
    require_cuda_build()
    assert fakequant.extension_loaded(), fakequant.extension_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fakequant::{name}", "CUDA")
    dump = torch._C._dispatch_dump(f"fakequant::{name}")
    # The active CUDA kernel (not a Python override) is registered by csrc/cuda/ops.cpp.
    assert re.search(r"^CUDA: registered at \S*csrc/cuda/ops\.cpp:\d+", dump, re.MULTILINE), dump


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' argument checks: the reference's ValueError, word for word.
# ---------------------------------------------------------------------------------------------

CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _cuda_kernel_error(name: str, *args) -> str:
    """Calls the CUDA kernel of `name` directly (through its dispatch key) and returns its ValueError."""
    op = getattr(torch.ops.fakequant, name).default
    with pytest.raises(ValueError) as info:
        op.redispatch(CUDA_KEY, *args)
    return str(info.value)


def _reference_error(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def _f32(*shape):
    return torch.zeros(shape, dtype=torch.float32)


_SCALE, _ZP = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
PER_TENSOR_BAD = {
    "x float64": (torch.zeros(3, dtype=torch.float64), _SCALE, _ZP, -128, 127),
    "x int32": (torch.zeros(3, dtype=torch.int32), _SCALE, _ZP, -128, 127),
    "min > max": (_f32(3), _SCALE, _ZP, 5, 4),
    "range too wide": (_f32(3), _SCALE, _ZP, -(1 << 24) - 1, 0),
    "range too high": (_f32(3), _SCALE, _ZP, 0, (1 << 24) + 1),
    "scale on meta": (_f32(3), torch.tensor(0.1, device="meta"), _ZP, -128, 127),
    "zero_point on meta": (_f32(3), _SCALE, torch.tensor(0, device="meta"), -128, 127),
    "scale float64": (_f32(3), torch.tensor(0.1, dtype=torch.float64), _ZP, -128, 127),
    "zero_point float": (_f32(3), _SCALE, torch.tensor(0.0), -128, 127),
    "zero_point int8": (_f32(3), _SCALE, torch.tensor(0, dtype=torch.int8), -128, 127),
    "two scales": (_f32(3), torch.ones(2), _ZP, -128, 127),
    "no zero_point": (_f32(3), _SCALE, torch.zeros(0, dtype=torch.int64), -128, 127),
}


@pytest.mark.parametrize("case", PER_TENSOR_BAD)
def test_per_tensor_errors_match_reference(case, auto_backend):
    require_cuda_build()
    args = PER_TENSOR_BAD[case]
    assert _cuda_kernel_error("fake_quant_per_tensor", *args, True) == _reference_error(
        reference.fake_quant_per_tensor_forward, *args
    )


_SCALES, _ZPS = torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int64)
PER_CHANNEL_BAD = {
    "axis 2 of 2-D": (_f32(4, 3), _SCALES, _ZPS, 2, -128, 127),
    "axis -3 of 2-D": (_f32(4, 3), _SCALES, _ZPS, -3, -128, 127),
    "axis of 0-D": (_f32(), _SCALES, _ZPS, 0, -128, 127),
    "x float64": (torch.zeros(4, 3, dtype=torch.float64), _SCALES, _ZPS, 0, -128, 127),
    "min > max": (_f32(4, 3), _SCALES, _ZPS, 0, 1, -1),
    "scales too short": (_f32(4, 3), torch.full((3,), 0.1), _ZPS, 0, -128, 127),
    "scales 2-D": (_f32(4, 3), torch.full((4, 1), 0.1), _ZPS, 0, -128, 127),
    "zero points wrong axis": (_f32(4, 3), _SCALES, _ZPS, 1, -128, 127),
    "zero points too long (axis -1)": (_f32(3, 4), _SCALES, torch.zeros(5, dtype=torch.int32), -1, 0, 255),
    "scale on meta": (_f32(4, 3), _SCALES.to("meta"), _ZPS, 0, -128, 127),
    "scale float16": (_f32(4, 3), _SCALES.half(), _ZPS, 0, -128, 127),
}


@pytest.mark.parametrize("case", PER_CHANNEL_BAD)
def test_per_channel_errors_match_reference(case, auto_backend):
    require_cuda_build()
    args = PER_CHANNEL_BAD[case]
    assert _cuda_kernel_error("fake_quant_per_channel", *args, True) == _reference_error(
        reference.fake_quant_per_channel_forward, *args
    )


_W, _G, _V = _f32(4, 2, 3, 3), torch.ones(4), torch.ones(4)
BN_FOLD_BAD = {
    "weight int": (torch.zeros(4, 2, dtype=torch.int64), _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
    "weight 0-D": (_f32(), _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
    "gamma on meta": (_W, _G.to("meta"), _V, 1e-5, _SCALES, _ZPS, -128, 127),
    "gamma int": (_W, torch.ones(4, dtype=torch.int32), _V, 1e-5, _SCALES, _ZPS, -128, 127),
    "gamma too short": (_W, torch.ones(3), _V, 1e-5, _SCALES, _ZPS, -128, 127),
    "var 2-D": (_W, _G, torch.ones(4, 1), 1e-5, _SCALES, _ZPS, -128, 127),
    "var float64": (_W, _G, torch.ones(4, dtype=torch.float64), 1e-5, _SCALES, _ZPS, -128, 127),
    "min > max": (_W, _G, _V, 1e-5, _SCALES, _ZPS, 3, 2),
    "scale too long": (_W, _G, _V, 1e-5, torch.full((5,), 0.1), _ZPS, -128, 127),
    "zero point on meta": (_W, _G, _V, 1e-5, _SCALES, _ZPS.to("meta"), -128, 127),
}
# Python prints each of these eps in its own way ("nan", "-1e-05", "-1e+16", "-0.001", ...): the C++
# message must print it the same.
for _eps in (
    float("nan"),
    float("inf"),
    float("-inf"),
    -1.0,
    -1e-5,
    -1.5e-5,
    -0.001,
    -0.0001,
    -123.25,
    -1e16,
    -1.5e16,
    -1234567890123456.0,
    -9999999999999998.0,
    -1e22,
    -5e-324,
    -1.7976931348623157e308,
    -0.1,
    -1 / 3,
):
    BN_FOLD_BAD[f"eps {_eps!r}"] = (_W, _G, _V, _eps, _SCALES, _ZPS, -128, 127)


@pytest.mark.parametrize("case", BN_FOLD_BAD)
def test_bn_fold_errors_match_reference(case, auto_backend):
    require_cuda_build()
    args = BN_FOLD_BAD[case]
    assert _cuda_kernel_error("bn_fold_fake_quant_weight", *args, True) == _reference_error(
        reference.bn_fold_fake_quant_weight_forward, *args
    )


def test_binarize_error_matches_reference(auto_backend):
    require_cuda_build()
    x = torch.zeros(3, dtype=torch.int8)
    assert _cuda_kernel_error("binarize", x, True, True) == _reference_error(reference.binarize_forward, x)


MASK_BAD = {
    "mask float": (_f32(2, 3), _f32(2, 3)),
    "mask transposed shape": (_f32(2, 3), torch.ones(3, 2, dtype=torch.bool)),
    "mask empty": (_f32(2, 3), torch.ones(0, dtype=torch.bool)),
}


@pytest.mark.parametrize("case", MASK_BAD)
def test_masked_grad_errors_match_reference(case, auto_backend):
    require_cuda_build()
    grad, mask = MASK_BAD[case]
    expected = _reference_error(reference.masked_grad, grad, mask)
    assert _cuda_kernel_error("masked_grad", grad, mask) == expected


# The backward takes the forward's arguments (it recomputes the forward): the forward's bad cases with a
# valid grad first, then bad grads with valid forward arguments.
BN_FOLD_BACKWARD_BAD = {f"forward: {case}": (torch.zeros(args[0].shape), *args) for case, args in BN_FOLD_BAD.items()}
BN_FOLD_BACKWARD_BAD.update(
    {
        "grad int": (torch.zeros(_W.shape, dtype=torch.int32), _W, _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
        "grad float64": (torch.zeros(_W.shape, dtype=torch.float64), _W, _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
        "grad on meta": (_W.to("meta"), _W, _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
        "grad transposed": (_W.transpose(0, 1), _W, _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
        "grad flat": (_W.flatten(), _W, _G, _V, 1e-5, _SCALES, _ZPS, -128, 127),
    }
)


@pytest.mark.parametrize("case", BN_FOLD_BACKWARD_BAD)
@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_bn_fold_backward_errors_match_reference(case, divide_by_fold, auto_backend):
    require_cuda_build()
    args = (*BN_FOLD_BACKWARD_BAD[case], divide_by_fold)
    assert _cuda_kernel_error("bn_fold_fake_quant_weight_backward", *args) == _reference_error(
        reference.bn_fold_fake_quant_weight_backward, *args
    )


def test_backward_errors_of_their_own(auto_backend):
    """Checks the reference leaves to torch (device, dtype, shape) have messages that say what is allowed."""
    require_cuda_build()
    grad, mask = _f32(2, 3), torch.ones(2, 3, dtype=torch.bool)
    message = _cuda_kernel_error("masked_grad", grad, mask.to("meta"))
    assert message == "fakequant: mask is on meta but grad is on cpu; they must be on the same device"
    message = _cuda_kernel_error("masked_grad", grad.to(torch.int32), mask)
    assert message == "fakequant: grad has dtype torch.int32; allowed: float32, float16, bfloat16"
    gamma, scale, zero_point = torch.ones(2), torch.full((2,), 0.1), torch.zeros(2, dtype=torch.int32)
    qparams = (scale, zero_point, -128, 127)
    message = _cuda_kernel_error("bn_fold_fake_quant_weight_backward", _f32(3, 2), grad, gamma, gamma, 1e-5, *qparams)
    assert message == "fakequant: grad must have the weight's shape (2, 3), got shape (3, 2)"
    message = _cuda_kernel_error("bn_fold_fake_quant_weight_backward", grad, grad, gamma, gamma, -1.0, *qparams)
    assert message == "fakequant: eps must be finite and >= 0, got -1.0"


def test_no_value_checks_in_cuda_kernels(auto_backend):
    """A bad scale or zero point VALUE passes the CUDA kernels' checks (reading it would cost a device-to-host
    sync per call, SPEC §1): with CPU tensors the call gets past every check to the CUDA device guard."""
    require_cuda_build()
    x = _f32(4, 3)
    cases = {
        "fake_quant_per_tensor": (x, torch.tensor(-1.0), torch.tensor(500), -128, 127, True),
        "fake_quant_per_channel": (x, torch.full((4,), float("nan")), torch.full((4,), -500), 0, -128, 127, True),
        "bn_fold_fake_quant_weight": (x, torch.ones(4), torch.ones(4), 1e-5, torch.zeros(4), _ZPS, -128, 127, True),
    }
    for name, args in cases.items():
        with pytest.raises(ValueError):
            getattr(reference, f"{name}_forward")(*args[:-1])  # the reference checks the values on CPU
        with pytest.raises(RuntimeError, match="CUDAGuardImpl initialized with non-CUDA DeviceType"):
            getattr(torch.ops.fakequant, name).default.redispatch(CUDA_KEY, *args)
    # The backward recomputes the forward from the same qparams (here a zero point outside the range).
    args = (x, x, torch.ones(4), torch.ones(4), 1e-5, torch.full((4,), 0.1), torch.full((4,), -500), -128, 127, True)
    with pytest.raises(ValueError):
        reference.bn_fold_fake_quant_weight_backward(*args)
    with pytest.raises(RuntimeError, match="CUDAGuardImpl initialized with non-CUDA DeviceType"):
        torch.ops.fakequant.bn_fold_fake_quant_weight_backward.default.redispatch(CUDA_KEY, *args)


# ---------------------------------------------------------------------------------------------
# (c) CUDA-only: the kernels against the reference, Triton, opcheck, and no host sync.
# ---------------------------------------------------------------------------------------------


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.device == expected.device
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    # assert_close treats -0.0 == +0.0: compare the bits too (fp32 ties can round to -0.0).
    if actual.is_floating_point() and actual.numel():
        bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[actual.dtype]
        finite = ~torch.isnan(expected)
        assert torch.equal(actual[finite].view(bits), expected[finite].view(bits))


def special_values(shape, scale: float, dtype, device="cuda", seed=0) -> torch.Tensor:
    """Random values over and beyond the range, exact ties (k + 0.5) * scale, zeros, NaN and +-inf."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    values = torch.randn(numel, generator=generator) * 200 * scale
    ties = (torch.randint(-300, 300, (numel,), generator=generator).float() + 0.5) * scale
    values = torch.where(torch.rand(numel, generator=generator) < 0.3, ties, values)
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([0.0, -0.0, nan, inf, -inf, 0.5 * scale, -0.5 * scale, 1.0, -1.0])
    values[: min(numel, len(specials))] = specials[: min(numel, len(specials))]
    perm = torch.randperm(numel, generator=generator)
    return values[perm].reshape(shape).to(dtype).to(device)


def layouts(x: torch.Tensor):
    """x's values in x's shape, laid out as: contiguous, channels_last (4-D), dense with the first and last
    dimensions' strides swapped (processed linearly over storage), strided (not dense: one copy), and
    off the 16-byte vector alignment (the scalar path)."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() >= 2:
        yield "permuted dense", x.transpose(0, -1).contiguous().transpose(0, -1)
        yield "strided", torch.cat([x, x], dim=-1)[..., ::2]
    yield "offset by one element", torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)


SHAPES = [(0,), (1,), (7,), (1000003,), (3, 5, 7), (4, 3, 5, 7), (8, 16, 3, 3), (2, 0, 3)]


def _qparams(channels=None, zp_dtype=torch.int32, quant_min=-128, quant_max=127, device="cuda"):
    generator = torch.Generator().manual_seed(1)
    if channels is None:
        return torch.tensor(0.0371, device=device), torch.tensor(3, dtype=zp_dtype, device=device)
    scale = (torch.rand(channels, generator=generator) * 0.1 + 0.01).to(device)
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator).to(zp_dtype).to(device)
    return scale, zero_point


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_range", [(-128, 127), (0, 255), (-7, 7)])
def test_per_tensor_matches_reference(dtype, shape, quant_range, auto_backend):
    quant_min, quant_max = quant_range
    for zp_dtype in (torch.int32, torch.int64):
        scale, zero_point = _qparams(None, zp_dtype)
        zero_point.fill_((quant_min + quant_max) // 2)
        for name, x in layouts(special_values(shape, 0.0371, dtype)):
            for compute_mask in (True, False):
                out, mask = torch.ops.fakequant.fake_quant_per_tensor(
                    x, scale, zero_point, quant_min, quant_max, compute_mask
                )
                expected = _ops.fake_quant_per_tensor_default(x, scale, zero_point, quant_min, quant_max, compute_mask)
                assert out.stride() == torch.empty_like(x).stride(), name
                assert_bitwise_equal(out, expected[0])
                assert_bitwise_equal(mask, expected[1])


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2] + [(5,), (1000003,)])
def test_per_channel_matches_reference(dtype, shape, auto_backend):
    for axis in range(-len(shape), len(shape)):
        scale, zero_point = _qparams(shape[axis], torch.int64 if axis % 2 else torch.int32)
        for name, x in layouts(special_values(shape, 0.05, dtype)):
            out, mask = torch.ops.fakequant.fake_quant_per_channel(x, scale, zero_point, axis, -128, 127)
            expected = _ops.fake_quant_per_channel_default(x, scale, zero_point, axis, -128, 127)
            assert out.stride() == torch.empty_like(x).stride(), name
            assert_bitwise_equal(out, expected[0])
            assert_bitwise_equal(mask, expected[1])


@needs_gpu
def test_per_channel_strided_qparams(auto_backend):
    x = special_values((6, 10), 0.05, torch.float32)
    scale = torch.rand(12, device="cuda")[::2] * 0.1 + 0.01  # non-contiguous 1-D parameters
    zero_point = torch.randint(-5, 5, (12,), device="cuda")[::2]
    out, mask = torch.ops.fakequant.fake_quant_per_channel(x, scale, zero_point, 0, -128, 127)
    expected = _ops.fake_quant_per_channel_default(x, scale, zero_point, 0, -128, 127)
    assert_bitwise_equal(out, expected[0])
    assert_bitwise_equal(mask, expected[1])


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (1000003,), (3, 5, 7), (4, 3, 5, 7)])
def test_binarize_matches_reference(dtype, shape, auto_backend):
    for name, x in layouts(special_values(shape, 0.5, dtype)):
        for clipped_ste in (True, False):
            for compute_mask in (True, False):
                out, mask = torch.ops.fakequant.binarize(x, clipped_ste, compute_mask)
                expected = _ops.binarize_default(x, clipped_ste, compute_mask)
                assert out.stride() == torch.empty_like(x).stride(), name
                assert_bitwise_equal(out, expected[0])
                assert_bitwise_equal(mask, expected[1])


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bn_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (8,), (8, 16, 3, 3), (5, 3, 7), (1, 4, 3, 3), (16, 0, 3)])
@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_bn_fold_matches_reference(dtype, bn_dtype, shape, divide_by_fold, auto_backend):
    channels = shape[0]
    generator = torch.Generator().manual_seed(2)
    gamma = torch.rand(channels, generator=generator) + 0.5
    var = torch.rand(channels, generator=generator) * 2
    if divide_by_fold:
        # q(w f) / f divides by f: negative factors, and gamma == 0 (the last channel), where f is taken as 1.
        gamma[::2] *= -1
        if channels > 1:
            gamma[-1] = 0.0
    gamma, var = gamma.to(bn_dtype).cuda(), var.to(bn_dtype).cuda()
    scale, zero_point = _qparams(channels)
    for name, w in layouts(special_values(shape, 0.05, dtype)):
        args = (w, gamma, var, 1e-5, scale, zero_point, -128, 127, True, divide_by_fold)
        out, mask = torch.ops.fakequant.bn_fold_fake_quant_weight(*args)
        expected = _ops.bn_fold_fake_quant_weight_default(*args)
        assert out.stride() == torch.empty_like(w).stride(), name
        assert_bitwise_equal(out, expected[0])
        assert_bitwise_equal(mask, expected[1])


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_masked_grad_matches_reference(dtype, auto_backend):
    x = special_values((4, 3, 5, 7), 0.05, dtype)
    mask = torch.rand(x.shape, device="cuda") < 0.5
    for grad_name, grad in layouts(x):
        for mask_name, m in layouts(mask):
            out = torch.ops.fakequant.masked_grad(grad, m)
            assert out.stride() == torch.empty_like(grad).stride(), (grad_name, mask_name)
            assert_bitwise_equal(out, reference.masked_grad(grad, m))


def _grads(fn, inputs):
    out = fn(*inputs)
    grad_out = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], grad_out)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_matches_reference_autograd(dtype, auto_backend):
    torch.manual_seed(3)
    scale, zero_point = _qparams(None)
    for _name, x in layouts(special_values((4, 3, 5, 7), 0.0371, dtype).nan_to_num(0.0)):
        x = x.detach().requires_grad_()
        grad_out = torch.randn(x.shape, device="cuda").to(dtype)
        (got,) = torch.autograd.grad(fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127), x, grad_out)
        (want,) = torch.autograd.grad(reference.fake_quant_per_tensor(x, scale, zero_point, -128, 127), x, grad_out)
        assert_bitwise_equal(got, want)
        scales, zps = _qparams(x.shape[1])
        (got,) = torch.autograd.grad(fakequant.fake_quant_per_channel(x, scales, zps, 1, -128, 127), x, grad_out)
        (want,) = torch.autograd.grad(reference.fake_quant_per_channel(x, scales, zps, 1, -128, 127), x, grad_out)
        assert_bitwise_equal(got, want)
        for clipped_ste in (True, False):
            (got,) = torch.autograd.grad(fakequant.binarize(x, clipped_ste=clipped_ste), x, grad_out)
            (want,) = torch.autograd.grad(reference.binarize(x, clipped_ste), x, grad_out)
            assert_bitwise_equal(got, want)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (5, 7), (6,), (1, 4, 3, 3), (3, 0, 2)])
@pytest.mark.parametrize("divide_by_fold", [False, True])
def test_bn_fold_backward_matches_reference(dtype, shape, divide_by_fold, auto_backend):
    torch.manual_seed(4)
    channels = shape[0]
    scale, zero_point = _qparams(channels, quant_min=-8, quant_max=7)
    for _name, w in layouts(special_values(shape, 0.05, dtype).nan_to_num(0.0, 1.0, -1.0)):
        w = w.detach().requires_grad_()
        gamma = torch.rand(channels, device="cuda") + 0.5
        if divide_by_fold and channels > 1:
            gamma[-1] = 0.0  # f == 0: quantized with f = 1, no gradient to gamma or var
        gamma = gamma.requires_grad_()
        var = (torch.rand(channels, device="cuda") * 2).requires_grad_()
        grad_out = torch.randn(shape, device="cuda").to(dtype)
        args = (w, gamma, var, 1e-5, scale, zero_point, -8, 7)
        if divide_by_fold:
            out, _ = torch.ops.fakequant.bn_fold_fake_quant_weight(*args, True, True)
            got = torch.autograd.grad(out, (w, gamma, var), grad_out)
            # Against the reference's backward formula: autograd through the reference's q(w f) / f rounds
            # grad / f * f, and its grad_f is the difference of two large sums, so it matches neither bit for
            # bit nor to a tight tolerance.
            detached = (w.detach(), gamma.detach(), var.detach())
            ref_out, _ = reference.bn_fold_fake_quant_weight_forward(*detached, *args[3:], True, True)
            assert_bitwise_equal(out.detach(), ref_out)
            want = reference.bn_fold_fake_quant_weight_backward(grad_out, *detached, *args[3:], True)
            if channels > 1:
                assert got[1][-1].item() == 0.0 and got[2][-1].item() == 0.0
        else:
            got = torch.autograd.grad(
                torch.ops.fakequant.bn_fold_fake_quant_weight(*args)[0], (w, gamma, var), grad_out
            )
            want = torch.autograd.grad(reference.bn_fold_fake_quant_weight(*args), (w, gamma, var), grad_out)
        assert_bitwise_equal(got[0], want[0])
        # The per-channel sums run in another order than torch.sum's: equal to fp32 rounding.
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("divided", [False, True])
def test_bn_fold_backward_mixed_dtypes_and_layouts(divided, auto_backend):
    torch.manual_seed(6)
    weight = torch.randn(8, 4, 3, 3, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(8, 4, 3, 3, device="cuda")  # fp32 gradient of an fp16 weight, another layout
    gamma = torch.rand(8, device="cuda", dtype=torch.bfloat16) + 0.5
    if divided:
        gamma[-1] = 0.0  # f == 0: quantized with f = 1, no gradient to gamma or var
    var = torch.rand(16, device="cuda")[::2]
    # Strided per-channel qparams, int64 zero points, and a narrow range: the recomputed mask clips part of each
    # channel. With divided, the kernel runs in fp32 (mixed dtypes) yet must round the recomputed output to fp16,
    # as the forward stored it and the reference uses it.
    scale = (torch.rand(16, device="cuda") * 0.2 + 0.1)[::2]
    zero_point = torch.randint(-4, 4, (8,), device="cuda")
    args = (grad, weight, gamma, var, 1e-3, scale, zero_point, -8, 7, divided)
    got = torch.ops.fakequant.bn_fold_fake_quant_weight_backward(*args)
    want = reference.bn_fold_fake_quant_weight_backward(*args)
    assert got[0].stride() == torch.empty_like(weight).stride()
    assert_bitwise_equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)  # bf16 / fp32 outputs of a reordered sum


@needs_gpu
def test_matches_torch_fake_quantize_on_finite_fp32(auto_backend):
    x = torch.randn(1 << 20, device="cuda") * 5
    scale, zero_point = torch.tensor(0.0371, device="cuda"), torch.tensor(3, dtype=torch.int32, device="cuda")
    out, _ = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127))
    x2 = x.view(256, -1)
    scales, zps = torch.rand(256, device="cuda") * 0.1 + 0.01, torch.randint(-10, 10, (256,), device="cuda")
    out, _ = torch.ops.fakequant.fake_quant_per_channel(x2, scales, zps.int(), 0, -128, 127)
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(x2, scales, zps.int(), 0, -128, 127))


def _sample_inputs(dtype=torch.float32):
    x = special_values((4, 3, 5, 7), 0.05, dtype).nan_to_num(0.0, 1.0, -1.0)
    scale, zero_point = _qparams(None)
    scales, zps = _qparams(3)
    bn_scales, bn_zps = _qparams(4)
    gamma, var = torch.rand(4, device="cuda") + 0.5, torch.rand(4, device="cuda")
    mask = torch.rand(x.shape, device="cuda") < 0.5
    return {
        "fake_quant_per_tensor": (x, scale, zero_point, -128, 127, True),
        "fake_quant_per_channel": (x, scales, zps, 1, -128, 127, True),
        "binarize": (x, True, True),
        "bn_fold_fake_quant_weight": (x, gamma, var, 1e-5, bn_scales, bn_zps, -128, 127, True),
        "masked_grad": (x, mask),
        "bn_fold_fake_quant_weight_backward": (x, x, gamma, var, 1e-5, bn_scales, bn_zps, -128, 127, False),
        "observe_range": (x, torch.randn(2, 3, device="cuda"), scales.clone(), zps.clone(), 1, 0.01, -128, 127, True),
        "fake_quant_learnable_backward": (x * 0.5, x, scales, zps.float(), 1, -128, 127, 0.01),
    }


def _call(op, inputs):
    """The op's outputs; for observe_range, which returns nothing, the state it writes (on copies)."""
    if op is torch.ops.fakequant.observe_range or op is _ops.observe_range_default:
        state = [t.clone() for t in inputs[1:4]]
        op(inputs[0], *state, *inputs[4:])
        return tuple(state)
    result = op(*inputs)
    return result if isinstance(result, tuple) else (result,)


# (axis, averaging_constant, fold): per tensor, per channel, and a folded weight's range per channel and
# per tensor (combined over the channels).
OBSERVE_CASES = [(None, 1.0, False), (None, 0.01, False), (1, 1.0, False), (0, 0.01, True), (None, 1.0, True)]


def _observe_state(x, axis, generator, device="cuda"):
    per_channel = axis is not None
    tracked = torch.randn((2, x.size(axis)) if per_channel else (2,), generator=generator).to(device)
    scale = torch.ones(x.size(axis) if per_channel else (), device=device)
    zero_point = torch.zeros(x.size(axis) if per_channel else (), dtype=torch.int32, device=device)
    return tracked, scale, zero_point


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis, constant, fold", OBSERVE_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_observe_range_matches_reference(dtype, axis, constant, fold, relu, auto_backend):
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 7, 300, generator=generator) * 3).to(dtype).cuda()
    state = _observe_state(x, axis, generator)
    folds = torch.randn(5, generator=generator).cuda() if fold else None
    for quant_range in [(-128, 127, True), (0, 255, False)]:
        inputs = (x, *state, axis, constant, *quant_range, folds, relu)
        got = _call(torch.ops.fakequant.observe_range, inputs)
        want = _call(_ops.observe_range_default, inputs)
        for g, w in zip(got, want, strict=True):
            assert_bitwise_equal(g, w)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis, constant, fold", OBSERVE_CASES)
def test_observe_range_relu_all_negative_and_nan(dtype, axis, constant, fold, auto_backend):
    generator = torch.Generator().manual_seed(5)
    negative = -(torch.rand(5, 7, 300, generator=generator) * 3 + 0.5)
    with_nan = torch.randn(5, 7, 300, generator=generator) * 3
    with_nan[1, 2, 17] = float("nan")  # channel 1 along axis 0 (the fold's), channel 2 along axis 1
    # Positive factors keep x * fold negative; mixed signs make some of it positive, which a ReLU applied
    # before the fold instead of after it would miss.
    positive_folds = torch.rand(5, generator=generator) + 0.5
    mixed_folds = torch.randn(5, generator=generator)
    mixed_folds[1] = -mixed_folds[1].abs()
    cases = [(negative, positive_folds, True), (negative, mixed_folds, False), (with_nan, mixed_folds, False)]
    if not fold:
        cases = [(negative, None, True), (with_nan, None, False)]
    state = _observe_state(negative, axis, generator, device="cpu")
    for (x, folds, zero_range), quant_range in itertools.product(cases, [(-128, 127, True), (0, 255, False)]):
        # The reference runs on CPU: a NaN range's zero point is its float-to-int32 conversion, INT32_MIN on
        # x86, which the kernels reproduce (observe.cu's store_zero_point); the GPU's conversion gives 0.
        inputs = (x.to(dtype), *state, axis, constant, *quant_range, folds, True)
        want = _call(_ops.observe_range_default, inputs)
        got = _call(torch.ops.fakequant.observe_range, tuple(_to_cuda(a) for a in inputs))
        for g, w in zip(got, want, strict=True):
            assert_bitwise_equal(g.cpu(), w)
        if zero_range and constant == 1.0:
            assert torch.equal(got[0], torch.zeros_like(got[0]))  # relu(x)'s range: [0, 0]
        if x is with_nan:
            assert bool(got[0].isnan().any())


def _to_cuda(a):
    return a.cuda() if isinstance(a, torch.Tensor) else a


@needs_gpu
@pytest.mark.parametrize("name", OPS)
def test_opcheck_on_cuda(name, auto_backend):
    args = list(_sample_inputs()[name])
    if name in ("fake_quant_per_tensor", "fake_quant_per_channel", "binarize", "bn_fold_fake_quant_weight"):
        args[0] = args[0].clone().requires_grad_()
    torch.library.opcheck(getattr(torch.ops.fakequant, name), tuple(args))
    x = args[0].detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(getattr(torch.ops.fakequant, name), (x, *args[1:]))


@needs_gpu
def test_opcheck_bn_fold_divided_on_cuda(auto_backend):
    x, gamma, var, eps, scales, zps, quant_min, quant_max, _ = _sample_inputs()["bn_fold_fake_quant_weight"]
    gamma = gamma.clone()
    gamma[1] = 0.0
    args = (x.clone().requires_grad_(), gamma, var, eps, scales, zps, quant_min, quant_max, True, True)
    torch.library.opcheck(torch.ops.fakequant.bn_fold_fake_quant_weight, args)
    backward_args = (torch.randn_like(x), x, gamma, var, eps, scales, zps, quant_min, quant_max, True)
    torch.library.opcheck(torch.ops.fakequant.bn_fold_fake_quant_weight_backward, backward_args)


@needs_gpu
@pytest.mark.parametrize("name", OPS)
def test_no_device_to_host_sync(name, auto_backend):
    inputs = _sample_inputs()[name]
    op = getattr(torch.ops.fakequant, name)
    op(*inputs)  # first call outside the check: lazy CUDA initialization may sync once
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_guard_runs_on_the_inputs_device(auto_backend):
    x = special_values((1000,), 0.05, torch.float32, device="cuda:1")
    scale, zero_point = torch.tensor(0.05, device="cuda:1"), torch.tensor(0, device="cuda:1")
    with torch.cuda.device(0):
        out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127)
    assert out.device == x.device
    expected = _ops.fake_quant_per_tensor_default(x, scale, zero_point, -128, 127)
    assert_bitwise_equal(out, expected[0])


@needs_gpu
@pytest.mark.slow
def test_more_than_2_31_elements(auto_backend):
    numel = (1 << 31) + 37
    needed = numel * (2 + 2 + 1) + (1 << 30)  # fp16 input and output, bool mask, slack
    if torch.cuda.mem_get_info()[0] < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(numel, dtype=torch.float16, device="cuda")
    x[-4096:] = special_values((4096,), 0.05, torch.float16)
    x[:-4096].fill_(0.3)
    scale, zero_point = torch.tensor(0.05, device="cuda"), torch.tensor(0, device="cuda")
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127)
    expected = _ops.fake_quant_per_tensor_default(x[-4096:], scale, zero_point, -128, 127)
    assert_bitwise_equal(out[-4096:], expected[0])
    assert_bitwise_equal(mask[-4096:], expected[1])


# --------------------------- Learned step size (LSQ) ----------------------------------------

LEARNABLE_BAD = {
    "axis out of range": (_f32(4, 3), _f32(4, 3), _SCALE.reshape(1), _ZP.reshape(1), 5, -8, 7, 1.0),
    "zero_point float64": (_f32(4, 3), _f32(4, 3), _SCALE.reshape(1), torch.zeros(1, dtype=torch.float64), None, -8,
                           7, 1.0),
    "grad_factor inf": (_f32(4, 3), _f32(4, 3), _SCALE.reshape(1), _ZP.reshape(1), None, -8, 7, float("inf")),
    "three scales on axis 0": (_f32(4, 3), _f32(4, 3), torch.ones(3), torch.zeros(3, dtype=torch.int32), 0, -8, 7,
                               1.0),
    "grad shape": (_f32(3, 4), _f32(4, 3), _SCALE.reshape(1), _ZP.reshape(1), None, -8, 7, 1.0),
    "grad dtype": (torch.zeros(4, 3, dtype=torch.float16), _f32(4, 3), _SCALE.reshape(1), _ZP.reshape(1), None, -8, 7,
                   1.0),
}  # fmt: skip


@pytest.mark.parametrize("case", LEARNABLE_BAD)
def test_learnable_backward_errors_match_reference(case, auto_backend):
    require_cuda_build()
    args = LEARNABLE_BAD[case]
    assert _cuda_kernel_error("fake_quant_learnable_backward", *args) == _reference_error(
        reference.fake_quant_learnable_backward, *args
    )


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape, axis", [((1000003,), None), ((64, 3, 7, 5), 0), ((8, 16, 9, 9), 1),
                                         ((5, 7, 300), 2), ((0,), None), ((3, 0, 2), 1)])  # fmt: skip
@pytest.mark.parametrize("learned", [False, True])
def test_learnable_backward_matches_reference(dtype, shape, axis, learned, auto_backend):
    generator = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    channels = 1 if axis is None else shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.05 + 0.01
    zero_point = torch.randint(-10, 10, (channels,), generator=generator, dtype=torch.int32)
    zero_point = zero_point.float() + 0.3 if learned else zero_point
    grad = torch.randn(shape, generator=generator).to(dtype)
    args = (grad, x, scale, zero_point, axis, -128, 127, 0.01)
    want = reference.fake_quant_learnable_backward(*args)
    got = torch.ops.fakequant.fake_quant_learnable_backward(*(_to_cuda(a) for a in args))
    assert_bitwise_equal(got[0].cpu(), want[0])
    bound = 0.01 * float(grad.float().abs().sum()) * 255
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.shape == w.shape and g.dtype == torch.float32
        assert float((g.cpu() - w).abs().max()) <= 1e-6 * bound + 1e-12 if w.numel() else True
    again = torch.ops.fakequant.fake_quant_learnable_backward(*(_to_cuda(a) for a in args))
    for first, second in zip(got, again, strict=True):
        assert_bitwise_equal(first, second)  # deterministic sums


# --------------------------- CUDA vs Triton -------------------------------------------------


def _select(backend: str) -> None:
    try:
        fakequant.set_backend(backend)
    except ValueError as error:
        pytest.skip(f"fakequant has no {backend!r} backend here: {error}")


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_cuda_matches_triton(name, dtype, auto_backend):
    op = getattr(torch.ops.fakequant, name)
    inputs = _sample_inputs(dtype)[name]
    try:
        fakequant.set_backend("cuda")
    except ValueError:
        # Before the "cuda" backend name exists, "auto" is the compiled CUDA kernel on CUDA tensors.
        fakequant.set_backend("auto")
    got = _call(op, inputs)
    _select("triton")
    want = _call(op, inputs)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        per_channel_sums = (name == "bn_fold_fake_quant_weight_backward" and g.dim() == 1 and g.shape[0] == 4) or (
            name == "fake_quant_learnable_backward" and index > 0
        )
        if per_channel_sums:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # per-channel sums in another order
        else:
            assert_bitwise_equal(g, w)
