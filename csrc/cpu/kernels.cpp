// The kernels built for the compiler's baseline instruction set (the fallback on any CPU). This file
// must sort before kernels_avx2.cpp: the linker keeps the first copy of each inline function that both
// translation units emit, and that copy must be the baseline one.
#define FAKEQUANT_CPU_VARIANT baseline
#include "cpu/kernels_impl.h"

namespace fakequant::cpu {

const KernelTable& baseline_kernels() {
  static const KernelTable table = baseline::make_table("baseline");
  return table;
}

}  // namespace fakequant::cpu
