// Included right after a `#pragma GCC target(...)` that enables AVX2 (and, with FAKEQUANT_TARGET_AVX512
// defined, AVX-512 F/BW/VL/DQ). The pragma enables the instructions but does not define the feature macros
// that the ATen and Sleef headers test, so this defines them (for the including translation unit only).
// No include guard: kernels_avx2.cpp and kernels_avx512.cpp include it once each.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifdef FAKEQUANT_TARGET_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif

// Warnings about code that is not ours, which a function-level target (rather than -mavx2/-mavx512f on the
// command line) brings out of GCC 12 in every variant file:
// - -Wmaybe-uninitialized: GCC's own avx512fintrin.h initializes undefined vectors as `__m512i __Y = __Y;`,
//   which the warning flags wherever such an intrinsic is inlined into our loops (a false positive);
// - -Wpsabi: a note that torch's at::vec lambdas return vectors by value, whose ABI differs without -mavx;
//   they are inline in this file and never called from code built for another target.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
