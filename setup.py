"""Builds fakequant and its compiled kernels, ``fakequant._C``, ahead of time.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build
(``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``); no GPU is needed to compile them.
``FAKEQUANT_BUILD_CUDA=0`` skips them, ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default 8.0;9.0+PTX).
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x030A0000"  # CPython 3.10: the extension has no Python-facing symbols of its own
# SASS for sm_80 (A100; also runs on sm_86/sm_89) and sm_90 (H100), plus compute_90 PTX that the driver
# JIT-compiles on newer GPUs (Blackwell sm_100/sm_120), which torch's cu130 build supports: without it
# those GPUs would fail with "no kernel image is available". The PTX is the sm_90 compile's own
# intermediate, so it adds size, not build time: a clean CUDA build took 93 CPU seconds with it and 91
# without (measured when the .cu files still included ATen).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


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
    return torch.version.cuda is not None and has_nvcc and bool(_sources("csrc/cuda/*.cu"))


def extensions():
    # -fopenmp: at::parallel_for is an inline template that runs serially unless the extension itself is
    # compiled with OpenMP (ATen defines INTRA_OP_PARALLEL only under _OPENMP); libgomp.so.1 then resolves
    # to the copy torch already loaded, so the kernels share torch's thread pool and set_num_threads.
    # -ffp-contract=off: a * b + c must round twice, as the reference's separate tensor ops do (GCC would
    # fuse it into an FMA wherever the target has one, e.g. the AVX2 kernels or any aarch64 build).
    # -Wno-unknown-pragmas: torch's at::vec headers use `#pragma unroll`, which GCC does not know (69 warnings
    # from torch's headers in a clean build, none from ours).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    cxx_flags.append(f"-DPy_LIMITED_API={PY_LIMITED_API}")
    link_flags = ["-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
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
            # their host side, csrc/cuda/*.cpp, is compiled once by the host compiler.
            sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
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
