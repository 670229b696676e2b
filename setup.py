"""Builds fakequant and its compiled kernels, ``fakequant._C``, ahead of time.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build
(``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``); no GPU is needed to compile them.
``FAKEQUANT_BUILD_CUDA=0`` skips them, ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default 8.0;9.0+PTX).
"""

import glob
import os
import re
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x030A0000"  # CPython 3.10: the extension has no Python-facing symbols of its own
# SASS for sm_80 (A100; also runs on sm_86/sm_89) and sm_90 (H100), plus compute_90 PTX that the driver
# JIT-compiles on newer GPUs (Blackwell sm_100/sm_120), which torch's cu130 build supports: without it
# those GPUs would fail with "no kernel image is available". The PTX is the sm_90 compile's own
# intermediate, so it adds size, not build time (docs/benchmarks.md).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# The sources of fakequant._C, each in exactly one list (_check_sources fails the build otherwise).
# Host code, compiled once for the compiler's baseline: the module, the op families' host files (checks, layouts,
# CPU and CUDA wrappers, C++ autograd, registrations) and the CPU kernels' run-time dispatch.
HOST_SOURCES = [
    "csrc/module.cpp",
    "csrc/cpu/dispatch.cpp",
    "csrc/ops/bn_fold.cpp",
    "csrc/ops/fake_quant.cpp",
    "csrc/ops/float_formats.cpp",
    "csrc/ops/learnable.cpp",
    "csrc/ops/observe.cpp",
]
# The CPU kernels (csrc/cpu/kernels.h), one source per instruction set, in link order: baseline, then AVX2, then
# AVX-512. The linker keeps the first copy of each inline function that several translation units emit, and that
# copy must run on every CPU that may call it (an AVX2 copy would crash a CPU without AVX2). Each source names its
# instruction set with `#define FAKEQUANT_CPU_VARIANT <name>`, which _check_sources compares with these keys.
# setuptools (distutils' build_ext) compiles and links the sources in sorted order of their paths, so the names
# must sort in this order too; _check_sources checks both.
CPU_KERNEL_SOURCES = {
    "baseline": "csrc/cpu/kernels.cpp",
    "avx2": "csrc/cpu/kernels_avx2.cpp",
    "avx512": "csrc/cpu/kernels_avx512.cpp",
}
# The CUDA kernels, one .cu file per op family; they include no ATen header (see csrc/cuda/kernels.cuh).
CUDA_SOURCES = [
    "csrc/cuda/bn_fold.cu",
    "csrc/cuda/fake_quant.cu",
    "csrc/cuda/float_formats.cu",
    "csrc/cuda/learnable.cu",
    "csrc/cuda/observe.cu",
]


def _variant_of(path: str) -> str | None:
    with open(os.path.join(ROOT, path), encoding="utf-8") as source:
        match = re.search(r"^#define FAKEQUANT_CPU_VARIANT (\w+)", source.read(), re.MULTILINE)
    return match.group(1) if match else None


def _check_sources() -> None:
    """Fails the build when a source under csrc/ is in no list (or in two), a listed one is missing, or the CPU
    kernel sources are not one per instruction set, baseline first."""
    listed = HOST_SOURCES + list(CPU_KERNEL_SOURCES.values()) + CUDA_SOURCES
    errors = []
    duplicates = sorted({path for path in listed if listed.count(path) > 1})
    if duplicates:
        errors.append(f"listed more than once: {', '.join(duplicates)}")
    on_disk = {
        os.path.relpath(path, ROOT)
        for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu")
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    }
    missing = sorted(set(listed) - on_disk)
    if missing:
        errors.append(f"listed but not found: {', '.join(missing)}")
    for path in sorted(on_disk - set(listed)):
        if _variant_of(path):
            where = "CPU_KERNEL_SOURCES"
        else:
            where = "CUDA_SOURCES" if path.endswith(".cu") else "HOST_SOURCES"
        errors.append(f"{path} is not listed: add it to {where}")
    for path in HOST_SOURCES:
        if path in on_disk and _variant_of(path):
            errors.append(f"{path} defines FAKEQUANT_CPU_VARIANT: it belongs in CPU_KERNEL_SOURCES, not HOST_SOURCES")
    if list(CPU_KERNEL_SOURCES) != ["baseline", "avx2", "avx512"]:
        errors.append(f"CPU_KERNEL_SOURCES must be ordered baseline, avx2, avx512; got {', '.join(CPU_KERNEL_SOURCES)}")
    kernel_paths = list(CPU_KERNEL_SOURCES.values())
    if sorted(kernel_paths) != kernel_paths:
        errors.append(
            f"setuptools links the sources in sorted order, which would put {sorted(kernel_paths)[0]} first; "
            f"rename the CPU kernel sources so that they sort as listed: {', '.join(kernel_paths)}"
        )
    for variant, path in CPU_KERNEL_SOURCES.items():
        if path in on_disk and _variant_of(path) != variant:
            errors.append(f"CPU_KERNEL_SOURCES[{variant!r}] = {path} defines FAKEQUANT_CPU_VARIANT {_variant_of(path)}")
    if errors:
        raise SystemExit("setup.py: the source lists do not match csrc/:\n  " + "\n  ".join(errors))


def _cpu_sources() -> list[str]:
    """Host sources, then the CPU kernels in link order (baseline, avx2, avx512), after _check_sources."""
    _check_sources()
    return HOST_SOURCES + list(CPU_KERNEL_SOURCES.values())


def _nvidia_include_dirs() -> list[str]:
    # The machine's nvcc is a partial toolkit: headers such as cusparse.h that torch's CUDA headers
    # include come from the nvidia-* wheels that torch's CUDA build depends on.
    dirs = []
    for site_dir in sys.path:
        dirs += glob.glob(os.path.join(site_dir, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def build_cuda() -> bool:
    if os.environ.get("FAKEQUANT_BUILD_CUDA", "1") == "0":
        return False
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and has_nvcc and bool(CUDA_SOURCES)


def extensions():
    # -fopenmp: at::parallel_for is an inline template that runs serially unless the extension itself is
    # compiled with OpenMP (ATen defines INTRA_OP_PARALLEL only under _OPENMP); libgomp.so.1 then resolves
    # to the copy torch already loaded, so the kernels share torch's thread pool and set_num_threads.
    # -ffp-contract=off: a * b + c must round twice, as the reference's separate tensor ops do (GCC would
    # fuse it into an FMA wherever the target has one, e.g. the AVX2 kernels or any aarch64 build).
    # -Wno-unknown-pragmas: torch's at::vec headers use `#pragma unroll`, which GCC does not know (the warnings
    # all come from torch's headers, none from ours).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    cxx_flags.append(f"-DPy_LIMITED_API={PY_LIMITED_API}")
    link_flags = ["-fopenmp"]
    sources = _cpu_sources()
    if not build_cuda():
        return [
            CppExtension(
                "fakequant._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
                py_limited_api=True,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    return [
        CUDAExtension(
            "fakequant._C",
            # The .cu files hold only kernels and include no ATen header (nvcc parses a .cu file's headers
            # once per architecture plus twice for the host: with ATen that was most of the build time);
            # their host side, csrc/ops/*.cpp (under FAKEQUANT_WITH_CUDA), is compiled once by the host compiler.
            sources + CUDA_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
            extra_compile_args={
                "cxx": cxx_flags + ["-DFAKEQUANT_WITH_CUDA"],
                # Never --use_fast_math: it replaces the IEEE division and square root (1 / scale,
                # gamma / sqrt(var + eps)) with approximations and flushes denormals, which breaks the
                # bit-exact match with the reference.
                "nvcc": ["-O3", "-std=c++20", "-DFAKEQUANT_WITH_CUDA", f"-DPy_LIMITED_API={PY_LIMITED_API}"],
            },
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    ]


setup(
    name="fakequant",
    version="0.1.0",
    description="Fused fake-quantization kernels and NNI-style quantizers for quantization-aware training",
    packages=find_packages(include=["fakequant", "fakequant.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
