// The kernels built for the compiler's baseline instruction set (the fallback on CPUs without AVX2). They are
// exact but slow: the generic Vectorized<float>::round calls nearbyint per element (x86-64's baseline has
// no vector rounding), measured 152 us against AVX2's 15 us per 2^16 fp32 elements of the per-tensor
// forward (1 thread, in cache).
// This file must sort before kernels_avx2.cpp and kernels_avx512.cpp: the linker keeps the first copy of each
// inline function that several translation units emit, and that copy must be the baseline one.
#define FAKEQUANT_CPU_VARIANT baseline
#include "cpu/kernels_impl.h"

namespace fakequant::cpu {

const KernelTable& baseline_kernels() {
  static const KernelTable table = baseline::make_table("baseline");
  return table;
}

}  // namespace fakequant::cpu
