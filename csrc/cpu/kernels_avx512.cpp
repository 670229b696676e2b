// The kernels built for AVX-512 (F, BW, VL and DQ, with FMA and F16C), used when the CPU has them (ops.cpp
// checks at run time). Measured on the AMD EPYC (Zen 5) VM against the AVX2 build, 32x16x32x32 fp32 in cache:
// the fused ReLU + fake quant with its mask 71.8 -> 54.7 us at 1 thread (39.2 -> 33.5 us at 2), masked_grad
// 49.9 -> 41.7 us at 1 thread; mostly the mask bytes, which AVX-512 writes and reads through mask registers.
// (An earlier Intel Xeon VM measured no gain: 16.0 against 15.2 us per 2^16 fp32 of the per-tensor forward.)
// The target pragma comes before every include so that the ATen headers see __AVX512F__ and at::vec selects
// its 512-bit specializations; CPU_CAPABILITY gives them their own namespace, as in ATen's own builds.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FAKEQUANT_TARGET_AVX512 1
#include "cpu/x86_feature_macros.h"  // after the pragma, before any other include
#define FAKEQUANT_CPU_HAVE_AVX512 1
#endif  // other compilers build the baseline kernels only

#ifdef FAKEQUANT_CPU_HAVE_AVX512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FAKEQUANT_CPU_VARIANT avx512
#include "cpu/kernels_impl.h"
#endif

#include "cpu/kernel_table.h"

namespace fakequant::cpu {

const KernelTable* avx512_kernels() {
#ifdef FAKEQUANT_CPU_HAVE_AVX512
  static const KernelTable table = avx512::make_table("avx512");
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace fakequant::cpu
