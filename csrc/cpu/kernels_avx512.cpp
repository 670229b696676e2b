// The CPU kernels built for AVX-512 (F, BW, VL and DQ, with FMA and F16C), used when the CPU has them
// (cpu/dispatch.cpp checks at run time). They gain over AVX2 mostly on the mask bytes, which AVX-512 writes and
// reads through mask registers (docs/benchmarks.md has the numbers).
// The target pragma comes before every include so that the ATen headers see __AVX512F__ and at::vec selects
// its 512-bit specializations; CPU_CAPABILITY gives them their own namespace, as in ATen's own builds.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FAKEQUANT_TARGET_AVX512 1
#include "cpu/x86_feature_macros.h"  // after the pragma, before any other include
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FAKEQUANT_CPU_VARIANT avx512
#include "cpu/kernels.h"
#endif  // other compilers build the baseline kernels only
