// The CPU kernels built for AVX2 (with FMA and F16C, which the fp16 conversions use), used when the CPU has
// them (cpu/dispatch.cpp checks at run time). The target pragma comes before every include so that the ATen
// headers see __AVX2__ and at::vec selects its 256-bit specializations; CPU_CAPABILITY gives them their
// own namespace, as in ATen's own per-capability builds.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
#include "cpu/x86_feature_macros.h"  // after the pragma, before any other include
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FAKEQUANT_CPU_VARIANT avx2
#include "cpu/kernels.h"
#endif  // other compilers build the baseline kernels only
