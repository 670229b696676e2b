// The fake_quant family's CPU kernels: per-tensor and per-channel fake quantization (the per-channel kernel also
// serves BN folding's forward, with ChannelParams::fold), binarization and the masked gradient. Each kernel's stub
// is declared here for the host (csrc/ops/); its code, below, is compiled once per instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/params.h"
#include "fakequant_math.h"

namespace fakequant::cpu {

// mask == nullptr skips the mask entirely (compute_mask=false).
// relu: fake-quantize relu(x); the mask also requires x > 0.
using FakeQuantPerTensorFn = void (*)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                                      const QuantParams& params, bool relu);
FAKEQUANT_DECLARE_STUB(fake_quant_per_tensor_stub, FakeQuantPerTensorFn);

using FakeQuantPerChannelFn = void (*)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                                       const ChannelParams& params);
FAKEQUANT_DECLARE_STUB(fake_quant_per_channel_stub, FakeQuantPerChannelFn);

using BinarizeFn = void (*)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n);
FAKEQUANT_DECLARE_STUB(binarize_stub, BinarizeFn);

// out = mask ? grad : 0, for 2- and 4-byte element types.
using MaskedGradFn = void (*)(c10::ScalarType dtype, const void* grad, const bool* mask, void* out, int64_t n);
FAKEQUANT_DECLARE_STUB(masked_grad_stub, MaskedGradFn);

}  // namespace fakequant::cpu

// The kernels, compiled only by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp (FAKEQUANT_CPU_VARIANT).
#ifdef FAKEQUANT_CPU_VARIANT
#include "cpu/kernels_common.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

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
  // and would go element by element.
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
FAKEQUANT_REGISTER_STUB(fake_quant_per_tensor_stub, &fake_quant_per_tensor);
FAKEQUANT_REGISTER_STUB(fake_quant_per_channel_stub, &fake_quant_per_channel);

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
FAKEQUANT_REGISTER_STUB(binarize_stub, &binarize);

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
FAKEQUANT_REGISTER_STUB(masked_grad_stub, &masked_grad);

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
#endif  // FAKEQUANT_CPU_VARIANT
