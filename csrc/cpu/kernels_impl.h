// The vectorized CPU kernels, written once and compiled once per instruction set: the including .cpp
// defines FAKEQUANT_CPU_VARIANT (the namespace) and, for AVX2 and AVX-512, CPU_CAPABILITY and
// CPU_CAPABILITY_<ISA> before any include, so that at::vec::Vectorized<float> is that ISA's specialization
// there and the generic (compiler-vectorized) one in the baseline build.
//
// Every kernel walks dense storage in blocks of 4 vectors (32 floats with AVX2, 64 with AVX-512) and finishes
// each range with a scalar tail that calls the fakequant_math.h functions, so the tail is the arithmetic the CUDA
// kernels run and the vector body must agree with it bit for bit (tests/test_cpu_kernels.py checks the
// tails against the bodies at every length 0..135, two AVX-512 blocks and a tail of 7).
#pragma once

#ifndef FAKEQUANT_CPU_VARIANT
#error "define FAKEQUANT_CPU_VARIANT before including kernels_impl.h"
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

#include "cpu/kernel_table.h"
#include "fakequant_math.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// One loop iteration handles 4 vectors: 32 floats with AVX2 (exactly the 32 mask bytes that one 256-bit
// store writes), 64 with AVX-512.
constexpr int64_t kBlock = 4 * kVec;
// Elements per parallel_for task: ATen's own elementwise grain (at::internal::GRAIN_SIZE = 32768). Not
// re-tuned here: the shared 2-core machine was too loaded for 2-thread timings to separate grain sizes.
constexpr int64_t kGrain = int64_t{1} << 15;
// bn_fold backward reduces per-channel sums over fixed chunks (independent of the thread count, so the
// result is deterministic) of this many elements; at most kMaxSumChunks partial-sum rows are kept. Chosen,
// not measured: a chunk of 2^16 fp32 is ~0.1 ms of work (enough to amortize a task), and 64 rows of
// partial sums stay small even for 4096 output channels (1 MiB).
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
// faster: 7.9 vs 8.2 us per 2^16 fp32 elements in cache, within noise; the direct form is kept.)
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
  // cache: measured 52.7 against 37.0 us without the mask and 21.4 us for torch.relu on 32x16x32x32 fp32,
  // 2 threads.
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

// A run of elements sharing one set of parameters (the whole tensor for per-tensor). kRelu: fake-quantize
// relu(x), and the mask also requires x > 0 (ReLU's gradient). kDivide (with kFold): q(x * fold) / fold, BN
// folding's divide_by_fold.
template <typename T, bool kMask, bool kFold, bool kRelu = false, bool kDivide = false>
void fake_quant_run(const T* x, T* out, bool* mask, int64_t len, const QuantParams& p, float fold) {
  static_assert(kFold || !kDivide, "kDivide divides by the fold factor");
  static_assert(!(kFold && kRelu), "BN folding quantizes weights, ReLU activations");
  const VecQuant vq{Vec(p.scale), Vec(p.inv_scale), Vec(p.zero_point), Vec(p.quant_min), Vec(p.quant_max)};
  const Vec fold_v(fold);
  const Vec zero(0.0f);
  auto apply = [&](Vec& v, Vec& m) {
    if constexpr (kRelu) {
      // clamp_min keeps NaN and -0, as relu_value does.
      if constexpr (kMask) m = v > zero;
      Vec in_range;
      v = vq.apply_nonnegative<kMask>(at::vec::clamp_min(v, zero), in_range);
      if constexpr (kMask) m = m & in_range;
    } else if constexpr (kFold) {
      v = vq.apply_folded<kMask, kDivide>(v, fold_v, m);
    } else {
      v = vq.apply<kMask>(v, m);
    }
  };
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec v[4], m[4];
    BlockIO<T>::load(x + i, v);
    for (int k = 0; k < 4; ++k) apply(v[k], m[k]);
    BlockIO<T>::store(out + i, v);
    if constexpr (kMask) store_mask(mask + i, m);
  }
  // Single vectors before the scalar tail: a per-group run of 32 elements is shorter than one AVX-512 block,
  // and went element by element (measured 2026-12-06, 1024x4096 fp32, groups of 32, 2 threads: 2.2 ms against
  // a 0.60 ms copy).
  for (; i + kVec <= len; i += kVec) {
    Vec v = VectorIO<T>::load(x + i), m;
    apply(v, m);
    VectorIO<T>::store(out + i, v);
    if constexpr (kMask) store_mask_vector(mask + i, m);
  }
  for (; i < len; ++i) {
    float xf = static_cast<float>(x[i]);
    bool in_range;
    if constexpr (kDivide) {
      out[i] = static_cast<T>(bn_fold_divided_value(xf, fold, p, in_range));
      if constexpr (kMask) mask[i] = in_range;
      continue;
    }
    if constexpr (kFold) xf = xf * fold;
    const bool positive = !kRelu || xf > 0.0f;
    if constexpr (kRelu) xf = relu_value(xf);
    out[i] = static_cast<T>(fake_quant_value(xf, p, in_range));
    if constexpr (kMask) mask[i] = in_range && positive;
  }
}

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

// A stretch of a per-channel pattern: element i uses parameter entry pos + i.
template <typename T, bool kMask, bool kFold, bool kDivide>
void fake_quant_pattern(const T* x, T* out, bool* mask, int64_t len, const ChannelParams& cp, int64_t pos) {
  const Vec qmin(cp.quant_min), qmax(cp.quant_max);
  const float* scale = cp.scale + pos;
  const float* inv = cp.inv_scale + pos;
  const float* zp = cp.zero_point + pos;
  const float* fold = kFold ? cp.fold + pos : nullptr;
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec v[4], m[4];
    BlockIO<T>::load(x + i, v);
    for (int k = 0; k < 4; ++k) {
      const int64_t j = i + k * kVec;
      const VecQuant vq{Vec::loadu(scale + j), Vec::loadu(inv + j), Vec::loadu(zp + j), qmin, qmax};
      if constexpr (kFold) {
        v[k] = vq.apply_folded<kMask, kDivide>(v[k], Vec::loadu(fold + j), m[k]);
      } else {
        v[k] = vq.apply<kMask>(v[k], m[k]);
      }
    }
    BlockIO<T>::store(out + i, v);
    if constexpr (kMask) store_mask(mask + i, m);
  }
  for (; i < len; ++i) {
    float xf = static_cast<float>(x[i]);
    const QuantParams p{scale[i], inv[i], zp[i], cp.quant_min, cp.quant_max};
    bool in_range;
    if constexpr (kDivide) {
      out[i] = static_cast<T>(bn_fold_divided_value(xf, fold[i], p, in_range));
    } else {
      if constexpr (kFold) xf = xf * fold[i];
      out[i] = static_cast<T>(fake_quant_value(xf, p, in_range));
    }
    if constexpr (kMask) mask[i] = in_range;
  }
}

template <typename T, bool kMask, bool kFold, bool kDivide>
void fake_quant_channel_range(const T* x, T* out, bool* mask, int64_t begin, int64_t end,
                              const ChannelParams& cp) {
  if (cp.period > 0) {
    int64_t o = begin;
    int64_t pos = begin % cp.period;
    while (o < end) {
      const int64_t len = std::min(cp.period - pos, end - o);
      fake_quant_pattern<T, kMask, kFold, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, len, cp, pos);
      o += len;
      pos = 0;
    }
  } else {
    for_each_channel_run(begin, end, cp.run, cp.channels, [&](int64_t o, int64_t len, int64_t c) {
      const QuantParams p{cp.scale[c], cp.inv_scale[c], cp.zero_point[c], cp.quant_min, cp.quant_max};
      const float fold = kFold ? cp.fold[c] : 1.0f;
      fake_quant_run<T, kMask, kFold, false, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, len, p, fold);
    });
  }
}

void fake_quant_per_tensor(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                           const QuantParams& params, bool relu) {
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      bool* m = mask != nullptr ? mask + begin : nullptr;
      if (relu) {
        if (m != nullptr) {
          fake_quant_run<T, true, false, true>(xp + begin, op + begin, m, end - begin, params, 1.0f);
        } else {
          fake_quant_run<T, false, false, true>(xp + begin, op + begin, nullptr, end - begin, params, 1.0f);
        }
      } else if (m != nullptr) {
        fake_quant_run<T, true, false>(xp + begin, op + begin, m, end - begin, params, 1.0f);
      } else {
        fake_quant_run<T, false, false>(xp + begin, op + begin, nullptr, end - begin, params, 1.0f);
      }
    });
  });
}

void fake_quant_per_channel(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                            const ChannelParams& cp) {
  TORCH_INTERNAL_ASSERT(cp.run >= 1 && cp.channels >= 1 && cp.period >= 0);
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (mask != nullptr) {
        if (cp.fold == nullptr) {
          fake_quant_channel_range<T, true, false, false>(xp, op, mask, begin, end, cp);
        } else if (cp.divide_by_fold) {
          fake_quant_channel_range<T, true, true, true>(xp, op, mask, begin, end, cp);
        } else {
          fake_quant_channel_range<T, true, true, false>(xp, op, mask, begin, end, cp);
        }
      } else {
        if (cp.fold == nullptr) {
          fake_quant_channel_range<T, false, false, false>(xp, op, nullptr, begin, end, cp);
        } else if (cp.divide_by_fold) {
          fake_quant_channel_range<T, false, true, true>(xp, op, nullptr, begin, end, cp);
        } else {
          fake_quant_channel_range<T, false, true, false>(xp, op, nullptr, begin, end, cp);
        }
      }
    });
  });
}

// ----------------------------------------------------------------------------------------------
// Binarize.
// ----------------------------------------------------------------------------------------------

template <typename T, bool kMask>
void binarize_range(const T* x, T* out, bool* mask, int64_t len) {
  const Vec plus_one(1.0f), minus_one(-1.0f), zero(0.0f);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec v[4], m[4];
    BlockIO<T>::load(x + i, v);
    for (int k = 0; k < 4; ++k) {
      if constexpr (kMask) m[k] = (v[k] >= minus_one) & (v[k] <= plus_one);
      const Vec sign = Vec::blendv(minus_one, plus_one, v[k] >= zero);
      v[k] = Vec::blendv(sign, v[k], v[k] != v[k]);  // NaN stays NaN
    }
    BlockIO<T>::store(out + i, v);
    if constexpr (kMask) store_mask(mask + i, m);
  }
  for (; i < len; ++i) {
    const float xf = static_cast<float>(x[i]);
    out[i] = static_cast<T>(binarize_value(xf));
    if constexpr (kMask) mask[i] = binarize_in_range(xf);
  }
}

void binarize(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n) {
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (mask != nullptr) {
        binarize_range<T, true>(xp + begin, op + begin, mask + begin, end - begin);
      } else {
        binarize_range<T, false>(xp + begin, op + begin, nullptr, end - begin);
      }
    });
  });
}

// ----------------------------------------------------------------------------------------------
// Masked gradient: a bitwise AND of the gradient's bits with the widened mask (false -> +0.0).
// ----------------------------------------------------------------------------------------------

template <typename U>
void masked_bits_range(const U* g, const bool* m, U* out, int64_t len) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i zero = _mm256_setzero_si256();
  for (; i + 32 <= len; i += 32) {
    if constexpr (sizeof(U) == 4) {
      for (int k = 0; k < 4; ++k) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + i + 8 * k));
        const __m256i lanes = _mm256_sub_epi32(zero, _mm256_cvtepu8_epi32(bytes));
        const __m256i gv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i + 8 * k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 8 * k), _mm256_and_si256(gv, lanes));
      }
    } else {
      for (int k = 0; k < 2; ++k) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i + 16 * k));
        const __m256i lanes = _mm256_sub_epi16(zero, _mm256_cvtepu8_epi16(bytes));
        const __m256i gv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i + 16 * k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 16 * k), _mm256_and_si256(gv, lanes));
      }
    }
  }
#elif defined(CPU_CAPABILITY_AVX512)
  // A zero-masked load: the mask bytes select the gradient's elements directly.
  for (; i + 64 <= len; i += 64) {
    if constexpr (sizeof(U) == 4) {
      for (int k = 0; k < 4; ++k) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i + 16 * k));
        const __m512i gv = _mm512_maskz_loadu_epi32(_mm_test_epi8_mask(bytes, bytes), g + i + 16 * k);
        _mm512_storeu_si512(out + i + 16 * k, gv);
      }
    } else {
      for (int k = 0; k < 2; ++k) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + i + 32 * k));
        const __m512i gv = _mm512_maskz_loadu_epi16(_mm256_test_epi8_mask(bytes, bytes), g + i + 32 * k);
        _mm512_storeu_si512(out + i + 32 * k, gv);
      }
    }
  }
#endif
  // The baseline build relies on the compiler vectorizing this select.
  for (; i < len; ++i) out[i] = m[i] ? g[i] : U{0};
}

void masked_grad(c10::ScalarType dtype, const void* grad, const bool* mask, void* out, int64_t n) {
  const size_t width = c10::elementSize(dtype);
  TORCH_INTERNAL_ASSERT(width == 2 || width == 4, "fakequant: masked_grad kernel for 2/4-byte types only");
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (width == 4) {
      masked_bits_range(static_cast<const uint32_t*>(grad) + begin, mask + begin,
                        static_cast<uint32_t*>(out) + begin, end - begin);
    } else {
      masked_bits_range(static_cast<const uint16_t*>(grad) + begin, mask + begin,
                        static_cast<uint16_t*>(out) + begin, end - begin);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// BN-fold backward: grad_weight and the per-channel sums behind grad_gamma / grad_var, from the forward's
// mask (and divided output) recomputed block by block.
// ----------------------------------------------------------------------------------------------

// One run of a single channel; returns its sum. Each element's mask, and for kDivided its output, are recomputed
// in registers with the forward's own operations (VecQuant::apply_folded, and the scalar tail's functions), so
// they are the forward's bit for bit. kDivided: grad_weight is the masked grad and the sum is that of
// grad * bn_fold_divided_slope(w, out, mask), with out rounded to T as the forward stored it; else grad_weight =
// masked grad * fold and the sum that of masked grad * w.
template <typename T, bool kDivided>
float bn_fold_backward_run(const T* g, const T* w, T* gw, int64_t len, const QuantParams& p, float fold) {
  const VecQuant vq{Vec(p.scale), Vec(p.inv_scale), Vec(p.zero_point), Vec(p.quant_min), Vec(p.quant_max)};
  const Vec fold_v(fold);
  Vec acc[4] = {Vec(0.0f), Vec(0.0f), Vec(0.0f), Vec(0.0f)};
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec gv[4], wv[4], ov[4], mv[4];
    BlockIO<T>::load(g + i, gv);
    BlockIO<T>::load(w + i, wv);
    for (int k = 0; k < 4; ++k) ov[k] = vq.apply_folded<true, kDivided>(wv[k], fold_v, mv[k]);
    if constexpr (kDivided && !std::is_same_v<T, float>) {
      alignas(64) T stored[kBlock];
      BlockIO<T>::store(stored, ov);
      BlockIO<T>::load(stored, ov);
    }
    for (int k = 0; k < 4; ++k) {
      if constexpr (kDivided) {
        acc[k] = acc[k] + gv[k] * ((wv[k] & mv[k]) - ov[k]);
        gv[k] = gv[k] & mv[k];
      } else {
        gv[k] = gv[k] & mv[k];
        acc[k] = acc[k] + gv[k] * wv[k];
        gv[k] = gv[k] * fold_v;
      }
    }
    BlockIO<T>::store(gw + i, gv);
  }
  float sum = 0.0f;
  if (i > 0) {
    alignas(64) float lanes[kVec];
    ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(lanes);
    for (int64_t j = 0; j < kVec; ++j) sum += lanes[j];
  }
  for (; i < len; ++i) {
    const float wf = static_cast<float>(w[i]);
    bool in_range;
    if constexpr (kDivided) {
      const float out = static_cast<float>(static_cast<T>(bn_fold_divided_value(wf, fold, p, in_range)));
      sum += static_cast<float>(g[i]) * bn_fold_divided_slope(wf, out, in_range);
      gw[i] = in_range ? g[i] : T(0.0f);
      continue;
    }
    fake_quant_value(wf * fold, p, in_range);
    const float gf = in_range ? static_cast<float>(g[i]) : 0.0f;
    gw[i] = static_cast<T>(gf * fold);
    sum += gf * wf;
  }
  return sum;
}

void bn_fold_backward(c10::ScalarType dtype, const void* grad, const void* weight, void* grad_weight, int64_t n,
                      const ChannelParams& cp, float* sums) {
  TORCH_INTERNAL_ASSERT(cp.period == 0 && cp.run >= 1 && cp.channels >= 1 && cp.fold != nullptr);
  const int64_t channels = cp.channels;
  std::fill(sums, sums + channels, 0.0f);
  if (n == 0) return;
  const int64_t chunks = std::min(kMaxSumChunks, (n + kSumChunk - 1) / kSumChunk);
  std::vector<float> partial(static_cast<size_t>(chunks * channels), 0.0f);
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* gp = static_cast<const T*>(grad);
    const T* wp = static_cast<const T*>(weight);
    T* gwp = static_cast<T*>(grad_weight);
    for_each_chunk_channel_run(n, chunks, cp.run, channels, [&](int64_t chunk, int64_t o, int64_t len, int64_t c) {
      const QuantParams p{cp.scale[c], cp.inv_scale[c], cp.zero_point[c], cp.quant_min, cp.quant_max};
      partial[chunk * channels + c] +=
          cp.divide_by_fold ? bn_fold_backward_run<T, true>(gp + o, wp + o, gwp + o, len, p, cp.fold[c])
                            : bn_fold_backward_run<T, false>(gp + o, wp + o, gwp + o, len, p, cp.fold[c]);
    });
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < channels; ++c) sums[c] += partial[chunk * channels + c];
  }
}

// ----------------------------------------------------------------------------------------------
// Learned step size (LSQ): the learnable op's backward.
// ----------------------------------------------------------------------------------------------

// One run of a single channel: writes grad_x and adds the run's scale and zero-point terms to the sums. The
// vector body selects, per lane, the term of learnable_grad_terms (the scalar tail's, and the CUDA kernel's)
// with the same operations in the same order.
template <typename T>
void learnable_backward_run(const T* g, const T* x, T* gx, int64_t len, const QuantParams& p, float grad_factor,
                            float& scale_sum, float& zero_point_sum) {
  const VecQuant vq{Vec(p.scale), Vec(p.inv_scale), Vec(p.zero_point), Vec(p.quant_min), Vec(p.quant_max)};
  const Vec factor(grad_factor), zero(0.0f), below_slope(p.quant_min - p.zero_point),
      above_slope(p.quant_max - p.zero_point), minus_scale(-p.scale);
  Vec scale_acc[4] = {zero, zero, zero, zero};
  Vec zp_acc[4] = {zero, zero, zero, zero};
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec gv[4], xv[4];
    BlockIO<T>::load(g + i, gv);
    BlockIO<T>::load(x + i, xv);
    for (int k = 0; k < 4; ++k) {
      const Vec q = (xv[k] * vq.inv).round() + vq.zp;
      const Vec inside = (q >= vq.qmin) & (q <= vq.qmax);
      const Vec below = q < vq.qmin;
      const Vec above = q > vq.qmax;
      const Vec x_fq = (at::vec::clamp(q, vq.qmin, vq.qmax) - vq.zp) * vq.scale;
      const Vec in_term = (((x_fq - xv[k]) * vq.inv) * gv[k]) * factor;
      const Vec below_term = (gv[k] * below_slope) * factor;
      const Vec above_term = (gv[k] * above_slope) * factor;
      Vec term = Vec::blendv(zero, above_term, above);
      term = Vec::blendv(term, below_term, below);
      term = Vec::blendv(term, in_term, inside);
      scale_acc[k] = scale_acc[k] + term;
      // (-grad) * scale is grad * (-scale) exactly: negation is exact and the product's sign follows.
      zp_acc[k] = zp_acc[k] + Vec::blendv(zero, (gv[k] * minus_scale) * factor, below | above);
      gv[k] = gv[k] & inside;
    }
    BlockIO<T>::store(gx + i, gv);
  }
  if (i > 0) {
    alignas(64) float lanes[kVec];
    ((scale_acc[0] + scale_acc[1]) + (scale_acc[2] + scale_acc[3])).store(lanes);
    for (int64_t j = 0; j < kVec; ++j) scale_sum += lanes[j];
    ((zp_acc[0] + zp_acc[1]) + (zp_acc[2] + zp_acc[3])).store(lanes);
    for (int64_t j = 0; j < kVec; ++j) zero_point_sum += lanes[j];
  }
  for (; i < len; ++i) {
    float scale_term, zero_point_term;
    gx[i] = static_cast<T>(learnable_grad_terms(static_cast<float>(x[i]), static_cast<float>(g[i]), p, grad_factor,
                                                scale_term, zero_point_term));
    scale_sum += scale_term;
    zero_point_sum += zero_point_term;
  }
}

void learnable_backward(c10::ScalarType dtype, const void* grad, const void* x, void* grad_x, int64_t n,
                        const ChannelParams& cp, float grad_factor, double* scale_sums, double* zero_point_sums) {
  TORCH_INTERNAL_ASSERT(cp.period == 0 && cp.run >= 1 && cp.channels >= 1 && cp.fold == nullptr);
  const int64_t channels = cp.channels;
  std::fill(scale_sums, scale_sums + channels, 0.0);
  std::fill(zero_point_sums, zero_point_sums + channels, 0.0);
  if (n == 0) return;
  const int64_t chunks = std::min(kMaxSumChunks, (n + kSumChunk - 1) / kSumChunk);
  std::vector<double> partial_scale(static_cast<size_t>(chunks * channels), 0.0);
  std::vector<double> partial_zp(static_cast<size_t>(chunks * channels), 0.0);
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* gp = static_cast<const T*>(grad);
    const T* xp = static_cast<const T*>(x);
    T* gxp = static_cast<T*>(grad_x);
    for_each_chunk_channel_run(n, chunks, cp.run, channels, [&](int64_t chunk, int64_t o, int64_t len, int64_t c) {
      const QuantParams p{cp.scale[c], cp.inv_scale[c], cp.zero_point[c], cp.quant_min, cp.quant_max};
      float scale_sum = 0.0f, zero_point_sum = 0.0f;
      learnable_backward_run<T>(gp + o, xp + o, gxp + o, len, p, grad_factor, scale_sum, zero_point_sum);
      partial_scale[chunk * channels + c] += scale_sum;
      partial_zp[chunk * channels + c] += zero_point_sum;
    });
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < channels; ++c) {
      scale_sums[c] += partial_scale[chunk * channels + c];
      zero_point_sums[c] += partial_zp[chunk * channels + c];
    }
  }
}

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
    // accumulator pairs keep the dependency chains off the critical path. Measured 34.1 -> 14.4 us on
    // 32x16x32x32 fp32, 2 threads (torch.sum: 13.3 us).
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

inline KernelTable make_table(const char* name) {
  return KernelTable{name,           &fake_quant_per_tensor, &fake_quant_per_channel, &binarize,
                     &masked_grad, &bn_fold_backward, &learnable_backward, &minmax};
}

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
