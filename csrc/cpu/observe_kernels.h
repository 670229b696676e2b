// The observe family's CPU kernel: the min/max behind observe_range. Stub declared for the host; code compiled
// once per instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/params.h"
#include "fakequant_math.h"

namespace fakequant::cpu {

// lo[c] / hi[c] = min / max (fp32, NaN-propagating) over the elements of channel c, where storage offset
// o belongs to channel (o / run) % channels (channels = 1, run = n: the whole tensor). n >= 1.
using MinmaxFn = void (*)(c10::ScalarType dtype, const void* x, int64_t n, int64_t run, int64_t channels, float* lo,
                          float* hi);
FAKEQUANT_DECLARE_STUB(minmax_stub, MinmaxFn);

}  // namespace fakequant::cpu

// The kernels, compiled only by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp (FAKEQUANT_CPU_VARIANT).
#ifdef FAKEQUANT_CPU_VARIANT
#include "cpu/kernels_common.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

// ----------------------------------------------------------------------------------------------
// Range observation: min and max per channel (or of the whole tensor), NaN-propagating.
// ----------------------------------------------------------------------------------------------

// min/max of two vectors, lane by lane, where NaN lanes may go either way (span_minmax detects NaN on the
// side), and the lanes where a or b is NaN.
#if defined(CPU_CAPABILITY_AVX2)
inline Vec plain_min(const Vec& a, const Vec& b) { return _mm256_min_ps(a, b); }
inline Vec plain_max(const Vec& a, const Vec& b) { return _mm256_max_ps(a, b); }
inline Vec unordered(const Vec& a, const Vec& b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
inline bool any_lane(const Vec& m) { return _mm256_movemask_ps(m) != 0; }
#elif defined(CPU_CAPABILITY_AVX512)
inline Vec plain_min(const Vec& a, const Vec& b) { return _mm512_min_ps(a, b); }
inline Vec plain_max(const Vec& a, const Vec& b) { return _mm512_max_ps(a, b); }
inline Vec unordered(const Vec& a, const Vec& b) {
  return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q)));
}
inline bool any_lane(const Vec& m) { return _mm512_movepi32_mask(_mm512_castps_si512(m)) != 0; }
#else
inline Vec plain_min(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }
inline Vec plain_max(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
inline Vec unordered(const Vec& a, const Vec& b) { return a.isnan() | b.isnan(); }
inline bool any_lane(const Vec& m) {
  alignas(64) uint32_t bits[kVec];
  m.store(bits);
  return std::any_of(bits, bits + kVec, [](uint32_t b) { return b != 0; });
}
#endif

template <typename T>
void span_minmax(const T* x, int64_t len, float& lo, float& hi) {
  int64_t i = 0;
  if (len >= kBlock) {
    // Plain min/max plus one unordered compare per two vectors: 2.5 vector operations per vector against the
    // 6 of NaN-propagating minimum/maximum; a span holding a NaN has a NaN range. Four independent
    // accumulator pairs keep the dependency chains off the critical path.
    const float inf = std::numeric_limits<float>::infinity();
    Vec vlo[4], vhi[4];
    Vec nan_lanes(0.0f);
    for (int k = 0; k < 4; ++k) {
      vlo[k] = Vec(inf);
      vhi[k] = Vec(-inf);
    }
    for (; i + kBlock <= len; i += kBlock) {
      Vec v[4];
      BlockIO<T>::load(x + i, v);
      for (int k = 0; k < 4; ++k) {
        vlo[k] = plain_min(vlo[k], v[k]);
        vhi[k] = plain_max(vhi[k], v[k]);
      }
      nan_lanes = nan_lanes | unordered(v[0], v[1]) | unordered(v[2], v[3]);
    }
    if (any_lane(nan_lanes)) {
      lo = hi = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    // No NaN lanes: plain min/max fold the accumulators into one vector, then kVec scalars (a span is one
    // output channel of a weight, often a few hundred elements, so this horizontal step is not negligible).
    alignas(64) float lanes_lo[kVec], lanes_hi[kVec];
    plain_min(plain_min(vlo[0], vlo[1]), plain_min(vlo[2], vlo[3])).store(lanes_lo);
    plain_max(plain_max(vhi[0], vhi[1]), plain_max(vhi[2], vhi[3])).store(lanes_hi);
    float span_lo = lanes_lo[0], span_hi = lanes_hi[0];
    for (int64_t j = 1; j < kVec; ++j) {
      span_lo = std::min(span_lo, lanes_lo[j]);
      span_hi = std::max(span_hi, lanes_hi[j]);
    }
    lo = nan_min(lo, span_lo);
    hi = nan_max(hi, span_hi);
  }
  for (; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    lo = nan_min(lo, v);
    hi = nan_max(hi, v);
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
  // min/max are exact, so the combination order does not matter.
  for (int64_t c = 0; c < channels; ++c) {
    lo[c] = inf;
    hi[c] = -inf;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      lo[c] = nan_min(lo[c], partial_lo[chunk * channels + c]);
      hi[c] = nan_max(hi[c], partial_hi[chunk * channels + c]);
    }
  }
}
FAKEQUANT_REGISTER_STUB(minmax_stub, &minmax);

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
#endif  // FAKEQUANT_CPU_VARIANT
