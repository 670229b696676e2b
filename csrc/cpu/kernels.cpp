// The CPU kernels built for the compiler's baseline instruction set: the fallback on CPUs without AVX2. Exact but
// slow, since the generic Vectorized<float>::round calls nearbyint per element (x86-64's baseline has no vector
// rounding); docs/benchmarks.md has the numbers.
// Linked before kernels_avx2.cpp and kernels_avx512.cpp (setup.py lists it first, and checks that its name also
// sorts first, since setuptools links the sources in sorted order): the linker keeps the first copy of each inline
// function that several translation units emit, and that copy must be the baseline one.
#define FAKEQUANT_CPU_VARIANT baseline
#include "cpu/kernels.h"
