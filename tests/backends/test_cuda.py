"""What is specific to the CUDA kernels (csrc/cuda/*.cu): the build, their registration, their argument checks, and
what only a GPU shows (no device-to-host sync, the device guard, 64-bit indexing, agreement with Triton).

Without a GPU (this machine, CI) three groups run: the built ``fakequant._C`` holds machine code for
sm_80 and sm_90 (``cuobjdump --list-elf``), every op has its CUDA kernel registered, and the CUDA
kernels' argument checks raise the reference's errors word for word (called through the dispatcher's
CUDA key with CPU tensors, which the checks reject before any device is touched). Everything that
runs a kernel needs a GPU and is skipped here with the reason "no GPU". The ops themselves, on every
(device, backend) pair and so on the CUDA kernels too, are tested in tests/ops.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fakequant
from fakequant import ops, reference
from fakequant.ops.fake_quant import fake_quant_per_tensor_reference
from fakequant.ops.observe import observe_range_reference
from tests.ops._helpers import special_values

# Every op with a kernel of its own (the composite fake_quant_learnable runs the per-tensor/per-channel kernels).
OPS = ops.kernel_op_names()
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where the dispatcher says the active CUDA kernels are registered: each op family's csrc/ops/<family>.cpp.
CUDA_REGISTRATION_FILE = r"csrc/ops/\w+\.cpp"
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
    with open(os.path.join(ROOT, "setup.py")) as f:
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
    cu_files = glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu"))
    assert len(re.findall(r"\.cubin", elf.stdout)) == len(cu_files) * len(sass)


# ---------------------------------------------------------------------------------------------
# (b) Every op has its CUDA kernel, registered from csrc/ops.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPS)
def test_cuda_kernel_registered(name, auto_backend):
    require_cuda_build()
    assert fakequant.extension_loaded(), fakequant.extension_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fakequant::{name}", "CUDA")
    dump = torch._C._dispatch_dump(f"fakequant::{name}")
    # The active CUDA kernel (not a Python override) is registered from C++.
    assert re.search(rf"^CUDA: registered at \S*{CUDA_REGISTRATION_FILE}:\d+", dump, re.MULTILINE), dump


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
    sync per call; docs/numerics.md, Argument checks): with CPU tensors the call gets past every check to the CUDA
    device guard."""
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
# (c) CUDA-only: no host sync, the device guard, 64-bit indexing.
# ---------------------------------------------------------------------------------------------


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.device == expected.device
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    # assert_close treats -0.0 == +0.0: compare the bits too (fp32 ties can round to -0.0).
    if actual.is_floating_point() and actual.numel():
        bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[actual.dtype]
        finite = ~torch.isnan(expected)
        assert torch.equal(actual[finite].view(bits), expected[finite].view(bits))


def _qparams(channels=None, zp_dtype=torch.int32, quant_min=-128, quant_max=127, device="cuda"):
    generator = torch.Generator().manual_seed(1)
    if channels is None:
        return torch.tensor(0.0371, device=device), torch.tensor(3, dtype=zp_dtype, device=device)
    scale = (torch.rand(channels, generator=generator) * 0.1 + 0.01).to(device)
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator).to(zp_dtype).to(device)
    return scale, zero_point


def _sample_inputs(dtype=torch.float32):
    x = special_values((4, 3, 5, 7), 0.05, dtype, "cuda").nan_to_num(0.0, 1.0, -1.0)
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
    if op is torch.ops.fakequant.observe_range or op is observe_range_reference:
        state = [t.clone() for t in inputs[1:4]]
        op(inputs[0], *state, *inputs[4:])
        return tuple(state)
    result = op(*inputs)
    return result if isinstance(result, tuple) else (result,)


def _to_cuda(a):
    return a.cuda() if isinstance(a, torch.Tensor) else a


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
    expected = fake_quant_per_tensor_reference(x, scale, zero_point, -128, 127)
    assert_bitwise_equal(out, expected[0])


@needs_gpu
@pytest.mark.slow
def test_more_than_2_31_elements(auto_backend):
    numel = (1 << 31) + 37
    needed = numel * (2 + 2 + 1) + (1 << 30)  # fp16 input and output, bool mask, slack
    if torch.cuda.mem_get_info()[0] < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(numel, dtype=torch.float16, device="cuda")
    x[-4096:] = special_values((4096,), 0.05, torch.float16, "cuda")
    x[:-4096].fill_(0.3)
    scale, zero_point = torch.tensor(0.05, device="cuda"), torch.tensor(0, device="cuda")
    out, mask = torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127)
    expected = fake_quant_per_tensor_reference(x[-4096:], scale, zero_point, -128, 127)
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
