// The observe family's CPU kernel: the min/max behind observe_range. Stub declared for the host; code compiled
// once per instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/dispatch.h"
#include "cpu/params.h"
#include "fakequant_math.h"

namespace fakequant::cpu {

// lo[c] / hi[c] = min / max (fp32) over the finite elements of channel c, where storage offset o belongs to
// channel (o / run) % channels (channels = 1, run = n: the whole tensor); (+inf, -inf) for a channel with no
// finite element. n >= 1.
using MinmaxFn = void (*)(c10::ScalarType dtype, const void* x, int64_t n, int64_t run, int64_t channels, float* lo,
                          float* hi);
FAKEQUANT_DECLARE_STUB(minmax_stub, MinmaxFn);

}  // namespace fakequant::cpu

// The kernels, compiled only by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp (FAKEQUANT_CPU_VARIANT).
#ifdef FAKEQUANT_CPU_VARIANT
#include "cpu/kernels_common.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

// ----------------------------------------------------------------------------------------------
// Range observation: min and max of the finite elements per channel (or of the whole tensor).
// ----------------------------------------------------------------------------------------------

// Non-finite lanes (NaN, +-inf) are left out by replacing them with +inf for the minimum and -inf for the
// maximum: finite_lanes is |v| < inf (false for NaN), fold_min / fold_max take v into the accumulator where
// the mask is set. A tie (+-0) takes the newer value within a lane, as torch's vectorized min/max reductions
// do (the scalar tail keeps the earlier one, as torch's scalar loop does).
#if defined(CPU_CAPABILITY_AVX2)
using LaneMask = __m256;
inline LaneMask finite_lanes(const Vec& v) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
  return _mm256_cmp_ps(magnitude, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
}
inline Vec fold_min(const Vec& acc, const Vec& v, LaneMask m) {
  return _mm256_min_ps(acc, _mm256_blendv_ps(_mm256_set1_ps(std::numeric_limits<float>::infinity()), v, m));
}
inline Vec fold_max(const Vec& acc, const Vec& v, LaneMask m) {
  return _mm256_max_ps(acc, _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), v, m));
}
inline Vec plain_min(const Vec& a, const Vec& b) { return _mm256_min_ps(a, b); }
inline Vec plain_max(const Vec& a, const Vec& b) { return _mm256_max_ps(a, b); }
#elif defined(CPU_CAPABILITY_AVX512)
using LaneMask = __mmask16;
inline LaneMask finite_lanes(const Vec& v) {
  const __m512 magnitude = _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
  return _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ);
}
// Masked min/max: lanes outside the mask keep the accumulator, one instruction per vector.
inline Vec fold_min(const Vec& acc, const Vec& v, LaneMask m) { return _mm512_mask_min_ps(acc, m, acc, v); }
inline Vec fold_max(const Vec& acc, const Vec& v, LaneMask m) { return _mm512_mask_max_ps(acc, m, acc, v); }
inline Vec plain_min(const Vec& a, const Vec& b) { return _mm512_min_ps(a, b); }
inline Vec plain_max(const Vec& a, const Vec& b) { return _mm512_max_ps(a, b); }
#else
using LaneMask = Vec;
inline LaneMask finite_lanes(const Vec& v) { return v.abs() < Vec(std::numeric_limits<float>::infinity()); }
inline Vec fold_min(const Vec& acc, const Vec& v, LaneMask m) {
  return at::vec::minimum(acc, Vec::blendv(Vec(std::numeric_limits<float>::infinity()), v, m));
}
inline Vec fold_max(const Vec& acc, const Vec& v, LaneMask m) {
  return at::vec::maximum(acc, Vec::blendv(Vec(-std::numeric_limits<float>::infinity()), v, m));
}
inline Vec plain_min(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
inline Vec plain_max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
#endif

// lo / hi become the min / max of themselves and the finite elements of x[0, len); untouched when none is finite.
template <typename T>
void span_minmax(const T* x, int64_t len, float& lo, float& hi) {
  const float inf = std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (len >= kBlock) {
    // Four independent accumulator pairs keep the dependency chains off the critical path; no accumulator is
    // ever NaN, so plain min/max combine them.
    Vec vlo[4], vhi[4];
    for (int k = 0; k < 4; ++k) {
      vlo[k] = Vec(inf);
      vhi[k] = Vec(-inf);
    }
    for (; i + kBlock <= len; i += kBlock) {
      Vec v[4];
      BlockIO<T>::load(x + i, v);
      for (int k = 0; k < 4; ++k) {
        const LaneMask m = finite_lanes(v[k]);
        vlo[k] = fold_min(vlo[k], v[k], m);
        vhi[k] = fold_max(vhi[k], v[k], m);
      }
    }
    // The accumulators fold into one vector, then kVec scalars (a span is one output channel of a weight, often
    // a few hundred elements, so this horizontal step is not negligible).
    alignas(64) float lanes_lo[kVec], lanes_hi[kVec];
    plain_min(plain_min(vlo[0], vlo[1]), plain_min(vlo[2], vlo[3])).store(lanes_lo);
    plain_max(plain_max(vhi[0], vhi[1]), plain_max(vhi[2], vhi[3])).store(lanes_hi);
    float span_lo = lanes_lo[0], span_hi = lanes_hi[0];
    for (int64_t j = 1; j < kVec; ++j) {
      span_lo = std::min(span_lo, lanes_lo[j]);
      span_hi = std::max(span_hi, lanes_hi[j]);
    }
    lo = finite_min(lo, span_lo);
    hi = finite_max(hi, span_hi);
  }
  for (; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::fabs(v) < inf) {
      lo = finite_min(lo, v);
      hi = finite_max(hi, v);
    }
  }
}

void minmax(c10::ScalarType dtype, const void* x, int64_t n, int64_t run, int64_t channels, float* lo, float* hi) {
  TORCH_INTERNAL_ASSERT(n >= 1 && run >= 1 && channels >= 1);
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t chunks = std::min(kMaxSumChunks, (n + kSumChunk - 1) / kSumChunk);
  std::vector<float> partial_lo(static_cast<size_t>(chunks * channels), inf);
  std::vector<float> partial_hi(static_cast<size_t>(chunks * channels), -inf);
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = static_cast<const T*>(x);
    for_each_chunk_channel_run(n, chunks, run, channels, [&](int64_t chunk, int64_t o, int64_t len, int64_t c) {
      span_minmax<T>(xp + o, len, partial_lo[chunk * channels + c], partial_hi[chunk * channels + c]);
    });
  });
  // min/max are exact, so the combination order does not matter (but for which of +-0 a tie keeps).
  for (int64_t c = 0; c < channels; ++c) {
    lo[c] = inf;
    hi[c] = -inf;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      lo[c] = finite_min(lo[c], partial_lo[chunk * channels + c]);
      hi[c] = finite_max(hi[c], partial_hi[chunk * channels + c]);
    }
  }
}
FAKEQUANT_REGISTER_STUB(minmax_stub, &minmax);

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
#endif  // FAKEQUANT_CPU_VARIANT
