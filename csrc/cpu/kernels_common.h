// What every family's CPU kernels share, compiled once per instruction set: the including kernels.cpp,
// kernels_avx2.cpp or kernels_avx512.cpp defines FAKEQUANT_CPU_VARIANT (the namespace) and, for AVX2 and AVX-512,
// CPU_CAPABILITY and CPU_CAPABILITY_<ISA> before any include, so that at::vec::Vectorized<float> is that ISA's
// specialization there and the generic (compiler-vectorized) one in the baseline build.
//
// Every kernel walks dense storage in blocks of 4 vectors (32 floats with AVX2, 64 with AVX-512) and finishes
// each range with a scalar tail that calls the fakequant_math.h functions, so the tail is the arithmetic the CUDA
// kernels run and the vector body must agree with it bit for bit (tests/backends/test_cpu_kernels.py checks the
// tails against the bodies at every length 0..135, two AVX-512 blocks and a tail of 7).
#pragma once

#ifndef FAKEQUANT_CPU_VARIANT
#error "define FAKEQUANT_CPU_VARIANT before including the CPU kernels"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/params.h"
#include "fakequant_math.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

// The instruction set these kernels are compiled for, under which FAKEQUANT_REGISTER_STUB registers them.
constexpr Capability kCapability = Capability::FAKEQUANT_CPU_VARIANT;

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// One loop iteration handles 4 vectors: 32 floats with AVX2 (exactly the 32 mask bytes that one 256-bit
// store writes), 64 with AVX-512.
constexpr int64_t kBlock = 4 * kVec;
// Elements per parallel_for task: ATen's own elementwise grain (at::internal::GRAIN_SIZE = 32768), not
// re-tuned (docs/benchmarks.md, Numbers once quoted in code comments).
constexpr int64_t kGrain = int64_t{1} << 15;
// The backward and range kernels reduce per-channel results over fixed chunks (independent of the thread count,
// so the result is deterministic) of this many elements; at most kMaxSumChunks partial rows are kept. Chosen,
// not measured: a chunk is enough work to amortize a task, and 64 rows of partial sums stay small even for 4096
// output channels (1 MiB).
constexpr int64_t kSumChunk = int64_t{1} << 16;
constexpr int64_t kMaxSumChunks = 64;

// ----------------------------------------------------------------------------------------------
// Loading and storing one block of kBlock elements as 4 fp32 vectors.
// ----------------------------------------------------------------------------------------------

template <typename T>
struct BlockIO {
  // fp16/bf16: one Vectorized<T> holds 2 fp32 vectors' worth of elements; convert in registers.
  static_assert(at::vec::Vectorized<T>::size() == 2 * kVec, "reduced-float vectors hold two fp32 vectors");
  static inline void load(const T* p, Vec v[4]) {
    for (int j = 0; j < 2; ++j) {
      auto halves = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p + j * 2 * kVec));
      v[2 * j] = std::get<0>(halves);
      v[2 * j + 1] = std::get<1>(halves);
    }
  }
  static inline void store(T* p, const Vec v[4]) {
    for (int j = 0; j < 2; ++j) {
      at::vec::convert_from_float<T>(v[2 * j], v[2 * j + 1]).store(p + j * 2 * kVec);
    }
  }
};

template <>
struct BlockIO<float> {
  static inline void load(const float* p, Vec v[4]) {
    for (int k = 0; k < 4; ++k) v[k] = Vec::loadu(p + k * kVec);
  }
  static inline void store(float* p, const Vec v[4]) {
    for (int k = 0; k < 4; ++k) v[k].store(p + k * kVec);
  }
};

// One vector of kVec elements, for runs shorter than a block (per-group weights: groups of 32 input channels are
// half an AVX-512 block), converted like BlockIO.
template <typename T>
struct VectorIO {
  static inline Vec load(const T* p) {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, kVec)));
  }
  static inline void store(T* p, const Vec& v) { at::vec::convert_from_float<T>(v, Vec(0.0f)).store(p, kVec); }
};

template <>
struct VectorIO<float> {
  static inline Vec load(const float* p) { return Vec::loadu(p); }
  static inline void store(float* p, const Vec& v) { v.store(p); }
};

// Writes kVec bools (0/1 bytes) from one comparison mask.
inline void store_mask_vector(bool* p, const Vec& m) {
  alignas(64) uint32_t bits[kVec];
  m.store(bits);
  for (int64_t j = 0; j < kVec; ++j) p[j] = bits[j] != 0;
}

// Writes kBlock bools (0/1 bytes) from 4 comparison masks (all-ones / all-zeros lanes).
inline void store_mask(bool* p, const Vec m[4]) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(m[0]), one);
  const __m256i b = _mm256_and_si256(_mm256_castps_si256(m[1]), one);
  const __m256i c = _mm256_and_si256(_mm256_castps_si256(m[2]), one);
  const __m256i d = _mm256_and_si256(_mm256_castps_si256(m[3]), one);
  // The packs work per 128-bit lane: the bytes come out as dwords [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 ...];
  // the permutation puts the 8 dwords back in element order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), ordered);
#elif defined(CPU_CAPABILITY_AVX512)
  const __m128i one = _mm_set1_epi8(1);
  for (int k = 0; k < 4; ++k) {
    const __mmask16 lanes = _mm512_movepi32_mask(_mm512_castps_si512(m[k]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + k * kVec), _mm_maskz_mov_epi8(lanes, one));
  }
#else
  alignas(64) uint32_t bits[kBlock];
  for (int k = 0; k < 4; ++k) m[k].store(bits + k * kVec);
  for (int64_t j = 0; j < kBlock; ++j) p[j] = bits[j] != 0;
#endif
}

template <typename F>
inline void dispatch_float_type(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      f(static_cast<float*>(nullptr));
      break;
    case c10::ScalarType::Half:
      f(static_cast<c10::Half*>(nullptr));
      break;
    case c10::ScalarType::BFloat16:
      f(static_cast<c10::BFloat16*>(nullptr));
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "fakequant: CPU kernel called with unsupported dtype ", dtype);
  }
}

// ----------------------------------------------------------------------------------------------
// Fake quantization.
// ----------------------------------------------------------------------------------------------

// q = round(v * inv) + zp; mask = qmin <= q <= qmax; out = (clamp(q) - zp) * scale. at::vec::clamp is
// min(max_v, max(min_v, q)) in both builds, which keeps a NaN q (the AVX2 max/min return their second
// operand when either is NaN; the generic std::max/std::min return their first). (A shifted form,
// clamp(round(v * inv), qmin - zp, qmax - zp) * scale, saves two operations per vector but measured no
// faster, so the direct form is kept.)
struct VecQuant {
  Vec scale, inv, zp, qmin, qmax;
  template <bool kMask>
  inline Vec apply(Vec v, Vec& mask) const {
    const Vec q = (v * inv).round() + zp;
    if constexpr (kMask) mask = (q >= qmin) & (q <= qmax);
    return (at::vec::clamp(q, qmin, qmax) - zp) * scale;
  }
  // The same for v >= 0 or NaN (a ReLU output): the zero point is at least quant_min (checked by the ops), so
  // q >= quant_min and only the top of the range can clip or clear the mask. Five vector operations fewer
  // than apply() with its ReLU, which made the fused ReLU + fake quant forward with mask compute-bound in
  // cache.
  template <bool kMask>
  inline Vec apply_nonnegative(Vec v, Vec& mask) const {
    const Vec q = (v * inv).round() + zp;
    if constexpr (kMask) mask = q <= qmax;
    return (at::vec::clamp_max(q, qmax) - zp) * scale;
  }
  // BN folding's value q(v * fold), with kDivide q(v * fold) / fold: the forward kernels store it, the BN-fold
  // backward recomputes it, from this one definition.
  template <bool kMask, bool kDivide>
  inline Vec apply_folded(Vec v, const Vec& fold, Vec& mask) const {
    const Vec out = apply<kMask>(v * fold, mask);
    if constexpr (kDivide) return out / fold;
    return out;
  }
};

// Calls f(offset, len, channel) for each maximal stretch of [begin, end) that lies in one channel, where
// storage offset o belongs to channel (o / run) % channels.
template <typename F>
inline void for_each_channel_run(int64_t begin, int64_t end, int64_t run, int64_t channels, const F& f) {
  int64_t c = (begin / run) % channels;
  int64_t r = begin % run;
  for (int64_t o = begin; o < end; r = 0) {
    const int64_t len = std::min(run - r, end - o);
    f(o, len, c);
    o += len;
    if (++c == channels) c = 0;
  }
}

// for_each_channel_run over `chunks` fixed chunks of [0, n), in parallel, as f(chunk, offset, len, channel).
// The chunks do not depend on the thread count, so per-chunk partial results combine deterministically.
template <typename F>
inline void for_each_chunk_channel_run(int64_t n, int64_t chunks, int64_t run, int64_t channels, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = n / chunks * chunk + std::min(chunk, n % chunks);
      const int64_t end = begin + n / chunks + (chunk < n % chunks ? 1 : 0);
      for_each_channel_run(begin, end, run, channels,
                           [&](int64_t o, int64_t len, int64_t c) { f(chunk, o, len, c); });
    }
  });
}

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
