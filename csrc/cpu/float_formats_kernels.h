// The float_formats family's CPU kernel: FP8, MX and NVFP4 fake quantization (csrc/float_formats.h has the math).
// Its stub is declared here for the host (csrc/ops/float_formats.cpp); its code, below, is compiled once per
// instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "float_formats.h"

namespace fakequant::cpu {

// x, out: the dense storage of n elements (n >= 1) of `dtype`, in blocks of block_size consecutive elements
// (n % block_size == 0; block_size == n: one block). mask == nullptr skips the mask (compute_mask=false).
// scales: with spec.kind == kGiven one fp32 scale per block, else nullptr (each block's from its amax).
using FakeQuantFloatFn = void (*)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                                  int64_t block_size, const FloatQuantSpec& spec, const float* scales);
FAKEQUANT_DECLARE_STUB(fake_quant_float_stub, FakeQuantFloatFn);

}  // namespace fakequant::cpu

// The kernels, compiled only by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp (FAKEQUANT_CPU_VARIANT).
#ifdef FAKEQUANT_CPU_VARIANT
#include <atomic>

#include "cpu/kernels_common.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

// Elements converted to fp32 at a time for fp16/bf16 inputs (16 KiB of stack, twice).
constexpr int64_t kFloatTile = 4096;
// Blocks up to this size are quantized right after their amax, while they are in cache (256 KiB of fp32, an L2);
// larger ones (and the whole-tensor FP8 scale) take two parallel passes: every block's amax, then the values.
constexpr int64_t kMaxFusedBlock = int64_t{1} << 16;

// The elements of one block as plain loops over fp32, which the compiler vectorizes (no fast-math, so the
// vector and scalar iterations round alike).
template <bool kMask, bool kDivide>
void apply_float(const float* x, float* out, bool* mask, int64_t len, BlockScale p, ElementFormat f) {
  for (int64_t i = 0; i < len; ++i) {
    bool in_range;
    out[i] = float_format_value<kDivide>(x[i], p, f, in_range);
    if constexpr (kMask) mask[i] = in_range;
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// float_format_value on a vector, the same operations in the same order (so bit for bit the scalar's): the
// powers of two 2^(mbits - e) and 2^(e - mbits) come from the exponent bits of the clamped value, e raised to emin
// with an integer max, as round_to_element builds them.
constexpr bool kVectorFormats = true;

struct VecFormat {
  Vec neg_max, max;
  int32_t min_exponent_bits;  // (emin + 127) << 23
  int32_t up_bits;            // (mbits + 254) << 23: minus the exponent bits, those of 2^(mbits - e)
  int32_t mbits_bits;         // mbits << 23: subtracted from the exponent bits, those of 2^(e - mbits)

  explicit VecFormat(const ElementFormat& f)
      : neg_max(-f.max),
        max(f.max),
        min_exponent_bits(static_cast<int32_t>(static_cast<uint32_t>(f.emin + 127) << 23)),
        up_bits(static_cast<int32_t>(static_cast<uint32_t>(f.mbits + 254) << 23)),
        mbits_bits(static_cast<int32_t>(static_cast<uint32_t>(f.mbits) << 23)) {}

  template <bool kMask, bool kDivide>
  inline Vec apply(const Vec& x, const Vec& a, const Vec& b, Vec& mask) const {
    const Vec v = kDivide ? x / a : x * a;
    if constexpr (kMask) mask = (v >= neg_max) & (v <= max);
    // clamp_keep_nan: the comparisons are false for NaN, which stays.
    const Vec c = Vec::blendv(Vec::blendv(v, neg_max, v < neg_max), max, v > max);
    Vec up, down;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i e = _mm512_max_epi32(
        _mm512_and_si512(_mm512_castps_si512(c), _mm512_set1_epi32(0x7F800000)), _mm512_set1_epi32(min_exponent_bits));
    up = _mm512_castsi512_ps(_mm512_sub_epi32(_mm512_set1_epi32(up_bits), e));
    down = _mm512_castsi512_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(mbits_bits)));
#else
    const __m256i e = _mm256_max_epi32(
        _mm256_and_si256(_mm256_castps_si256(c), _mm256_set1_epi32(0x7F800000)), _mm256_set1_epi32(min_exponent_bits));
    up = _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_set1_epi32(up_bits), e));
    down = _mm256_castsi256_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(mbits_bits)));
#endif
    return ((c * up).round() * down) * b;
  }
};
#else
// The baseline build keeps the compiler-vectorized loops of apply_float.
constexpr bool kVectorFormats = false;
#endif

// fp16/bf16 <-> fp32 through a buffer of kFloatTile floats (a multiple of the reduced-float vector length).
template <typename T>
void load_floats(const T* src, float* dst, int64_t len) {
  using RVec = at::vec::Vectorized<T>;
  constexpr int64_t kStep = RVec::size();
  for (int64_t j = 0; j < len; j += kStep) {
    const RVec v = len - j >= kStep ? RVec::loadu(src + j) : RVec::loadu(src + j, len - j);
    auto [lo, hi] = at::vec::convert_to_float<T>(v);
    lo.store(dst + j);
    hi.store(dst + j + kVec);
  }
}

template <typename T>
void store_floats(const float* src, T* dst, int64_t len) {
  using RVec = at::vec::Vectorized<T>;
  constexpr int64_t kStep = RVec::size();
  for (int64_t j = 0; j < len; j += kStep) {
    const RVec v = at::vec::convert_from_float<T>(Vec::loadu(src + j), Vec::loadu(src + j + kVec));
    v.store(dst + j, static_cast<int>(std::min(kStep, len - j)));
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The last len < kVec elements of a run: fp32 through apply_float, fp16/bf16 converted with the vectors' own
// conversions (so that a NaN comes out with the same bits as in the vector body).
template <typename T, bool kMask, bool kDivide>
void apply_tail(const T* x, T* out, bool* mask, int64_t len, BlockScale p, const ElementFormat& f) {
  if constexpr (std::is_same_v<T, float>) {
    apply_float<kMask, kDivide>(x, out, mask, len, p, f);
  } else {
    alignas(64) float in[2 * kVec];
    alignas(64) float result[2 * kVec];
    load_floats(x, in, len);
    apply_float<kMask, kDivide>(in, result, mask, len, p, f);
    store_floats(result, out, len);
  }
}

// A run of len elements that share a BlockScale, converted to and from fp32 in registers.
template <typename T, bool kMask, bool kDivide>
void apply_uniform(const T* x, T* out, bool* mask, int64_t len, BlockScale p, const VecFormat& vf,
                   const ElementFormat& f) {
  const Vec a(p.a), b(p.b);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec v[4], m[4];
    BlockIO<T>::load(x + i, v);
    for (int k = 0; k < 4; ++k) v[k] = vf.apply<kMask, kDivide>(v[k], a, b, m[k]);
    BlockIO<T>::store(out + i, v);
    if constexpr (kMask) store_mask(mask + i, m);
  }
  for (; i + kVec <= len; i += kVec) {
    Vec m;
    VectorIO<T>::store(out + i, vf.apply<kMask, kDivide>(VectorIO<T>::load(x + i), a, b, m));
    if constexpr (kMask) store_mask_vector(mask + i, m);
  }
  if (i < len) apply_tail<T, kMask, kDivide>(x + i, out + i, kMask ? mask + i : nullptr, len - i, p, f);
}

// count blocks of size elements (a multiple of kVec), block g scaled by a[g], b[g]. kLen > 0 (the size, fixed at
// compile time) takes 4 vectors at a time across blocks; otherwise block by block.
template <int64_t kLen, typename T, bool kMask, bool kDivide>
void apply_blocks(const T* x, T* out, bool* mask, int64_t count, int64_t size, const float* a, const float* b,
                  const VecFormat& vf, const ElementFormat& f) {
  if constexpr (kLen > 0 && kLen % kVec == 0) {
    const int64_t len = count * kLen;
    int64_t i = 0;
    for (; i + kBlock <= len; i += kBlock) {
      Vec v[4], m[4];
      BlockIO<T>::load(x + i, v);
      for (int k = 0; k < 4; ++k) {
        const int64_t g = (i + k * kVec) / kLen;
        v[k] = vf.apply<kMask, kDivide>(v[k], Vec(a[g]), Vec(b[g]), m[k]);
      }
      BlockIO<T>::store(out + i, v);
      if constexpr (kMask) store_mask(mask + i, m);
    }
    for (; i < len; i += kVec) {
      const int64_t g = i / kLen;
      Vec m;
      VectorIO<T>::store(out + i, vf.apply<kMask, kDivide>(VectorIO<T>::load(x + i), Vec(a[g]), Vec(b[g]), m));
      if constexpr (kMask) store_mask_vector(mask + i, m);
    }
  } else {
    for (int64_t g = 0; g < count; ++g) {
      const int64_t o = g * size;
      apply_uniform<T, kMask, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, size, BlockScale{a[g], b[g]},
                                       vf, f);
    }
  }
}
#endif

// One stretch of elements that share a BlockScale.
template <typename T, bool kMask, bool kDivide>
void apply_segment(const T* x, T* out, bool* mask, int64_t len, BlockScale p, const ElementFormat& f) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  apply_uniform<T, kMask, kDivide>(x, out, mask, len, p, VecFormat(f), f);
#else
  if constexpr (std::is_same_v<T, float>) {
    apply_float<kMask, kDivide>(x, out, mask, len, p, f);
  } else {
    static_assert(kFloatTile % at::vec::Vectorized<T>::size() == 0);
    alignas(64) float in[kFloatTile];
    alignas(64) float result[kFloatTile];
    for (int64_t i = 0; i < len; i += kFloatTile) {
      const int64_t count = std::min(kFloatTile, len - i);
      load_floats(x + i, in, count);
      apply_float<kMask, kDivide>(in, result, kMask ? mask + i : nullptr, count, p, f);
      store_floats(result, out + i, count);
    }
  }
#endif
}

// The magnitude bits (magnitude_bits) of the amax of x[0, len): an unsigned max over the elements' own bits with
// the sign cleared, which orders them as their magnitudes (NaN above inf) in every float dtype.
template <typename T>
uint32_t amax_bits(const T* x, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    uint32_t m = 0;
    for (int64_t i = 0; i < len; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, sizeof(bits));
      bits &= 0x7FFFFFFFu;
      m = bits > m ? bits : m;
    }
    return m;
  } else {
    uint16_t m = 0;
    for (int64_t i = 0; i < len; ++i) {
      const uint16_t bits = x[i].x & 0x7FFFu;
      m = bits > m ? bits : m;
    }
    return magnitude_bits(static_cast<float>(T(m, T::from_bits())));
  }
}

inline void atomic_max(std::atomic<uint32_t>& target, uint32_t value) {
  uint32_t current = target.load(std::memory_order_relaxed);
  while (value > current && !target.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
  }
}

// Calls f(block, offset, len) for each stretch of [begin, end) that lies in one block.
template <typename F>
inline void for_each_block_run(int64_t begin, int64_t end, int64_t block_size, const F& f) {
  for (int64_t o = begin; o < end;) {
    const int64_t block = o / block_size;
    const int64_t len = std::min((block + 1) * block_size, end) - o;
    f(block, o, len);
    o += len;
  }
}

// Blocks whose scales are computed together, in loops over the blocks that the compiler vectorizes (one block
// scale takes a few divisions: computed one block at a time they cost more than a 16-element block's values).
constexpr int64_t kScaleBatch = 64;

template <FloatScaleKind kKind>
void batch_scales(const uint32_t* amax, float* a, float* b, int64_t count, const FloatQuantSpec& spec) {
  const ElementFormat f = spec.element;
  const ElementFormat scale_format = spec.scale_element;
  const float p = spec.per_tensor_scale != nullptr ? *spec.per_tensor_scale : 1.0f;
  for (int64_t g = 0; g < count; ++g) {
    const float m = bits_float(amax[g]);
    BlockScale s;
    if constexpr (kKind == FloatScaleKind::kMxFloor) {
      s = mx_floor_scale(m, f);
    } else if constexpr (kKind == FloatScaleKind::kMxRceil) {
      s = mx_rceil_scale(m, f);
    } else if constexpr (kKind == FloatScaleKind::kNvfp4) {
      s = nvfp4_scale(m, p, f, scale_format);
    } else {
      const float scale = fp8_scale_from_amax(m, f);
      s = BlockScale{scale, scale};
    }
    a[g] = s.a;
    b[g] = s.b;
  }
}

// Blocks of at least this many elements get their scale one at a time, right after their amax (a few divisions
// are then a small part of a block's work), and their values while the block is in cache.
constexpr int64_t kLargeBlock = 1024;

// Each block of [0, len) (len a multiple of the block size): its amax, then its values while it is in cache; or,
// with scales given (one per block of this range), its values. kLen > 0 fixes the block size at compile time
// (MX's 32, NVFP4's 16), so that each block is a few whole vectors instead of a loop too short for the vectorized
// body. T is fp32, or fp16/bf16 with a block size that is a multiple of kVec in the vectorized builds.
template <int64_t kLen, typename T, bool kMask, bool kDivide>
void fused_blocks(const T* x, T* out, bool* mask, int64_t len, int64_t block_size, const FloatQuantSpec& spec,
                  const float* scales) {
  const int64_t size = kLen > 0 ? kLen : block_size;
  uint32_t amax[kScaleBatch];
  alignas(64) float a[kScaleBatch];
  alignas(64) float b[kScaleBatch];
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const VecFormat vf(spec.element);
#endif
  for (int64_t start = 0; start < len; start += kScaleBatch * size) {
    const int64_t count = std::min(kScaleBatch, (len - start) / size);
    if (spec.kind != FloatScaleKind::kGiven) {
      for (int64_t g = 0; g < count; ++g) amax[g] = amax_bits(x + start + g * size, size);
    }
    switch (spec.kind) {
      case FloatScaleKind::kGiven:
        for (int64_t g = 0; g < count; ++g) a[g] = b[g] = scales[start / size + g];
        break;
      case FloatScaleKind::kMxFloor: batch_scales<FloatScaleKind::kMxFloor>(amax, a, b, count, spec); break;
      case FloatScaleKind::kMxRceil: batch_scales<FloatScaleKind::kMxRceil>(amax, a, b, count, spec); break;
      case FloatScaleKind::kNvfp4: batch_scales<FloatScaleKind::kNvfp4>(amax, a, b, count, spec); break;
      default: batch_scales<FloatScaleKind::kFp8>(amax, a, b, count, spec); break;
    }
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if (size % kVec == 0) {
      apply_blocks<kLen, T, kMask, kDivide>(x + start, out + start, kMask ? mask + start : nullptr, count, size, a,
                                            b, vf, spec.element);
      continue;
    }
#endif
    for (int64_t g = 0; g < count; ++g) {
      const int64_t o = start + g * size;
      apply_segment<T, kMask, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, size, BlockScale{a[g], b[g]},
                                       spec.element);
    }
  }
}

// Blocks [first, last) of the tensor; scales: nullptr, or one per block of the tensor.
template <int64_t kLen, typename T, bool kMask, bool kDivide>
void fused_range(const T* x, T* out, bool* mask, int64_t first, int64_t last, int64_t block_size,
                 const FloatQuantSpec& spec, const float* scales) {
  // The vectorized builds convert fp16/bf16 in registers when a block is whole vectors; the baseline build and
  // other block sizes convert whole blocks a tile at a time.
  const bool direct = std::is_same_v<T, float> || (kVectorFormats && block_size % kVec == 0);
  if (block_size > kFloatTile || (kVectorFormats && direct && block_size >= kLargeBlock)) {
    // Each block's amax from the elements' own bits, then its values.
    for (int64_t b = first; b < last; ++b) {
      const int64_t o = b * block_size;
      const BlockScale p = scales != nullptr
                               ? BlockScale{scales[b], scales[b]}
                               : block_scale_from_amax(bits_float(amax_bits(x + o, block_size)), spec);
      apply_segment<T, kMask, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, block_size, p, spec.element);
    }
  } else if (direct) {
    const int64_t o = first * block_size;
    fused_blocks<kLen, T, kMask, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, (last - first) * block_size,
                                          block_size, spec, scales != nullptr ? scales + first : nullptr);
  } else if constexpr (!std::is_same_v<T, float>) {
    // Whole blocks converted a tile at a time.
    alignas(64) float in[kFloatTile];
    alignas(64) float result[kFloatTile];
    const int64_t tile_blocks = kFloatTile / block_size;
    for (int64_t b = first; b < last; b += tile_blocks) {
      const int64_t o = b * block_size;
      const int64_t count = std::min(tile_blocks, last - b) * block_size;
      load_floats(x + o, in, count);
      fused_blocks<kLen, float, kMask, kDivide>(in, result, kMask ? mask + o : nullptr, count, block_size, spec,
                                                scales != nullptr ? scales + b : nullptr);
      store_floats(result, out + o, count);
    }
  }
}

template <typename T, bool kMask, bool kDivide>
void fake_quant_float_typed(const T* x, T* out, bool* mask, int64_t n, int64_t block_size,
                            const FloatQuantSpec& spec, const float* scales) {
  const ElementFormat& f = spec.element;
  const int64_t blocks = n / block_size;
  // Given scales take this path only for blocks small enough to leave many blocks per tensor (a tensor of a
  // few large blocks is split into elementwise tasks below instead).
  const bool given = spec.kind == FloatScaleKind::kGiven;
  if (block_size <= (given ? kGrain : kMaxFusedBlock)) {
    // One read: each block's amax (unless its scale is given), then its values while it is still in cache.
    const int64_t grain = std::max<int64_t>(1, kGrain / block_size);
    at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
      if (block_size == 16) {
        fused_range<16, T, kMask, kDivide>(x, out, mask, first, last, block_size, spec, scales);
      } else if (block_size == 32) {
        fused_range<32, T, kMask, kDivide>(x, out, mask, first, last, block_size, spec, scales);
      } else {
        fused_range<0, T, kMask, kDivide>(x, out, mask, first, last, block_size, spec, scales);
      }
    });
    return;
  }
  std::vector<BlockScale> params(static_cast<size_t>(blocks));
  if (given) {
    for (int64_t b = 0; b < blocks; ++b) params[b] = BlockScale{scales[b], scales[b]};
  } else {
    // Large blocks (the whole tensor for a per-tensor FP8 scale): every block's amax in parallel over fixed
    // stretches (a max is exact, so the order in which the stretches combine does not matter), then the values.
    std::vector<std::atomic<uint32_t>> amax(static_cast<size_t>(blocks));
    for (auto& a : amax) a.store(0, std::memory_order_relaxed);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for_each_block_run(begin, end, block_size, [&](int64_t b, int64_t o, int64_t len) {
        atomic_max(amax[b], amax_bits(x + o, len));
      });
    });
    for (int64_t b = 0; b < blocks; ++b) {
      params[b] = block_scale_from_amax(bits_float(amax[b].load(std::memory_order_relaxed)), spec);
    }
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for_each_block_run(begin, end, block_size, [&](int64_t b, int64_t o, int64_t len) {
      apply_segment<T, kMask, kDivide>(x + o, out + o, kMask ? mask + o : nullptr, len, params[b], f);
    });
  });
}

void fake_quant_float(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n, int64_t block_size,
                      const FloatQuantSpec& spec, const float* scales) {
  TORCH_INTERNAL_ASSERT(n >= 1 && block_size >= 1 && n % block_size == 0);
  TORCH_INTERNAL_ASSERT((spec.kind == FloatScaleKind::kGiven) == (scales != nullptr));
  dispatch_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    if (divides(spec.kind)) {
      if (mask != nullptr) {
        fake_quant_float_typed<T, true, true>(xp, op, mask, n, block_size, spec, scales);
      } else {
        fake_quant_float_typed<T, false, true>(xp, op, nullptr, n, block_size, spec, scales);
      }
    } else if (mask != nullptr) {
      fake_quant_float_typed<T, true, false>(xp, op, mask, n, block_size, spec, scales);
    } else {
      fake_quant_float_typed<T, false, false>(xp, op, nullptr, n, block_size, spec, scales);
    }
  });
}
FAKEQUANT_REGISTER_STUB(fake_quant_float_stub, &fake_quant_float);

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
#endif  // FAKEQUANT_CPU_VARIANT
