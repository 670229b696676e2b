"""Builds fakequant and its compiled kernels, ``fakequant._C``, ahead of time.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build
(``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``); no GPU is needed to compile them.
``FAKEQUANT_BUILD_CUDA=0`` skips them, ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default 8.0;9.0).
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x030A0000"  # CPython 3.10: the extension has no Python-facing symbols of its own


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
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", f"-DPy_LIMITED_API={PY_LIMITED_API}"]
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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return [
        CUDAExtension(
            "fakequant._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
            extra_compile_args={
                "cxx": cxx_flags + ["-DFAKEQUANT_WITH_CUDA"],
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
