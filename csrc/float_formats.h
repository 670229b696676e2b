// Per-element and per-block math of the float_formats ops (fake_quant_fp8, fake_quant_mx, fake_quant_nvfp4),
// shared by the CPU kernels (cpu/float_formats_kernels.h) and the CUDA kernels (cuda/float_formats.cu), operation
// by operation as fakequant/reference.py computes them (docs/numerics.md, Float formats). Every block of
// elements gets a BlockScale {a, b} from its scale or its absolute maximum, then each element is
//   v   = x / a (FP8) or x * a (MX, NVFP4)
//   in  = |v| <= max                                      (the mask; NaN -> false)
//   out = round_to_element(clamp(v, -max, max)) * b      (in fp32, rounded once to x's dtype by the caller)
// Powers of two are built from their bits, never with pow/exp2/ldexp, whose results the math libraries do not
// all promise exact.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

#include "fakequant_math.h"

namespace fakequant {

// One element format of fakequant/formats.py's ELEMENT_FORMATS (an integer format has ebits = 0).
struct ElementFormat {
  int32_t ebits;
  int32_t mbits;
  float max;     // the largest finite magnitude
  int32_t emax;  // the exponent of the largest power of two it holds
  int32_t emin;  // the exponent of its smallest normal value (subnormals below, spaced 2^(emin - mbits))
};

struct NamedElementFormat {
  const char* name;
  int32_t code;  // formats.py's `code`, also the index in kElementFormats
  ElementFormat format;
};

// fakequant/formats.py's ELEMENT_FORMATS, one line per format: {name, code, {ebits, mbits, max, emax, emin}}
// (tests/ops/test_float_formats_table.py compares the two). Host code only: the ops look a format up by name
// once per call and hand the kernels an ElementFormat by value.
inline constexpr NamedElementFormat kElementFormats[] = {
    {"e4m3", 0, {4, 3, 448.0f, 8, -6}},
    {"e5m2", 1, {5, 2, 57344.0f, 15, -14}},
    {"e3m2", 2, {3, 2, 28.0f, 4, -2}},
    {"e2m3", 3, {2, 3, 7.5f, 2, 0}},
    {"e2m1", 4, {2, 1, 6.0f, 2, 0}},
    {"int8", 5, {0, 6, 1.984375f, 0, 0}},  // max 127 / 64
};
inline constexpr int32_t kE4m3Code = 0;
inline constexpr int32_t kE2m1Code = 4;

// ----------------------------------------------------------------------------------------------
// Bits and powers of two.
// ----------------------------------------------------------------------------------------------

C10_HOST_DEVICE inline uint32_t float_bits(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

C10_HOST_DEVICE inline float bits_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// 2^k for -126 <= k <= 127 (normal fp32), from its exponent field.
C10_HOST_DEVICE inline float pow2_normal(int32_t k) { return bits_float(static_cast<uint32_t>(k + 127) << 23); }

// The unbiased exponent field of v: floor(log2|v|) for a normal v, -127 for 0 and subnormals, 128 for inf/NaN.
C10_HOST_DEVICE inline int32_t exponent_field(float v) {
  return static_cast<int32_t>((float_bits(v) >> 23) & 0xFFu) - 127;
}

// The absolute value as bits: ordered like the magnitudes, NaN above inf, so an unsigned max of these reduces a
// block's amax exactly (NaN-propagating), in any order, with integer instructions that vectorize.
C10_HOST_DEVICE inline uint32_t magnitude_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

constexpr float kSmallestNormal = 1.17549435082228750797e-38f;  // 2^-126

// clamp(v, lo, hi) as torch.clamp computes it: NaN stays NaN.
C10_HOST_DEVICE inline float clamp_keep_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ----------------------------------------------------------------------------------------------
// Rounding to an element format (reference.round_to_element).
// ----------------------------------------------------------------------------------------------

// v (within [-max, max], or NaN) rounded to the nearest value of f, ties to even: the spacing at v is
// 2^(max(e, emin) - mbits), e = floor(log2|v|), and v * 2^(mbits - e') is exact, so rounding it to an integer
// and scaling back is the rounded value (the sign of a zero kept). A NaN v gives NaN (its exponent field, 128,
// keeps both shifts in range).
C10_HOST_DEVICE inline float round_to_element(float v, const ElementFormat& f) {
  int32_t e = exponent_field(v);
  e = e < f.emin ? f.emin : e;
  return round_half_even(v * pow2_normal(f.mbits - e)) * pow2_normal(e - f.mbits);
}

// ----------------------------------------------------------------------------------------------
// Block scales.
// ----------------------------------------------------------------------------------------------

// v = x / a (kDivide) or x * a; out = q * b.
struct BlockScale {
  float a;
  float b;
};

// reference.fp8_scale_from_amax: amax / max clamped to [2^-126, 2^(126 - emax)]; NaN stays NaN.
C10_HOST_DEVICE inline float fp8_scale_from_amax(float amax, const ElementFormat& f) {
  return clamp_keep_nan(amax / f.max, kSmallestNormal, pow2_normal(126 - f.emax));
}

// The block scales below select between bit patterns, never between computed floats, so that the compiler can
// vectorize the CPU kernel's loop over a batch of blocks (it does not speculate float operations, which may trap).

constexpr uint32_t kQuietNanBits = 0x7FC00000u;
constexpr uint32_t kTwoToMinus127Bits = 0x00400000u;  // subnormal

// The bits of 2^(code - 127) for an E8M0 code: subnormal 2^-127 for code 0, NaN for code 255 (the quiet bit
// added to the bits of 2^(code - 127)).
C10_HOST_DEVICE inline uint32_t e8m0_bits(int32_t code) {
  return (static_cast<uint32_t>(code) << 23) | (static_cast<uint32_t>(code == 0 || code == 255) << 22);
}

// reference.mx_scales "floor": code clamp(e(amax) - emax, -127, 128) + 127 (255 for NaN); the elements are
// multiplied by 1 / max(2^(code - 127), 2^-126) (code 255 reads as inf, so 0) and dequantized by 2^(code - 127).
C10_HOST_DEVICE inline BlockScale mx_floor_scale(float amax, const ElementFormat& f) {
  int32_t code = exponent_field(amax) - f.emax;
  code = code < -127 ? -127 : code;
  code = (code > 128 ? 128 : code) + 127;
  code = magnitude_bits(amax) > 0x7F800000u ? 255 : code;  // NaN
  // max(2^(code - 127), 2^-126): code 0 reads as 0, below the smallest normal.
  const float scale = bits_float(static_cast<uint32_t>(code < 1 ? 1 : code) << 23);
  return BlockScale{1.0f / scale, bits_float(e8m0_bits(code))};
}

// reference.mx_scales "rceil": code clamp(ceil(log2(amax / max)), -127, 127) + 127 with the exact ceiling, 0 for
// a zero amax, 254 for inf, 255 for NaN; factor 2^(127 - code), but 1 for code 0 and NaN for 255.
C10_HOST_DEVICE inline BlockScale mx_rceil_scale(float amax, const ElementFormat& f) {
  const uint32_t bits = magnitude_bits(amax / f.max);
  // ceil(log2(d)) is the exponent field of d's bits plus 2^23 - 1 (one more unless the mantissa is 0); for a
  // subnormal d it is -126 above 2^-127 and at most -127 (clamped to it), the field of its bits plus 2^22 - 1.
  // Zero and inf land on codes 0 and 254 by the same clamps; NaN is one above inf.
  const uint32_t round_up = bits < 0x800000u ? 0x3FFFFFu : 0x7FFFFFu;
  int32_t code = static_cast<int32_t>((bits + round_up) >> 23) - 127;
  code = code < -127 ? -127 : code;
  code = (code > 127 ? 127 : code) + 127 + static_cast<int32_t>(bits > 0x7F800000u);
  // 2^(127 - code) for codes 1..253; 1 for code 0, 2^-127 for 254 and NaN for 255, combined with masks (not
  // selects, which the compiler turns into branches here).
  const uint32_t is_zero = 0u - static_cast<uint32_t>(code == 0);
  const uint32_t is_inf = 0u - static_cast<uint32_t>(code == 254);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(code == 255);
  const uint32_t normal = static_cast<uint32_t>(254 - code) << 23;
  const uint32_t factor = (normal & ~(is_zero | is_inf | is_nan)) | (0x3F800000u & is_zero) |
                          (kTwoToMinus127Bits & is_inf) | (kQuietNanBits & is_nan);
  return BlockScale{bits_float(factor), bits_float(e8m0_bits(code))};
}

// reference.fake_quant_nvfp4_forward's block scale with per-tensor scale p: s = e4m3(clamp(amax / 6 / p, 2^-6,
// 448)), factor (1 / p) / s, dequant p * s. Without a per-tensor scale p is 1, which leaves each of these
// operations exact: b / 1 = b, (1 / 1) / s = 1 / s, 1 * s = s, as the reference's single-level formulas.
// e2m1 and e4m3 are the element and scale formats.
C10_HOST_DEVICE inline BlockScale nvfp4_scale(float amax, float p, const ElementFormat& e2m1,
                                              const ElementFormat& e4m3) {
  const float block_scale = amax / e2m1.max;
  const float s = round_to_element(clamp_keep_nan(block_scale / p, pow2_normal(-6), e4m3.max), e4m3);
  return BlockScale{(1.0f / p) / s, p * s};
}

// How a float op turns a block's amax into its BlockScale (kGiven: FP8 with the caller's scales).
enum class FloatScaleKind : int8_t { kGiven, kFp8, kMxFloor, kMxRceil, kNvfp4 };

// Everything a kernel needs besides the data: host-prepared, passed by value.
struct FloatQuantSpec {
  FloatScaleKind kind;
  ElementFormat element;
  ElementFormat scale_element;     // NVFP4: e4m3, the block scales' format
  const float* per_tensor_scale;  // NVFP4: one fp32 value in the kernel's memory, or nullptr (single-level)
};

// FP8 divides by its scale; MX and NVFP4 multiply by a factor.
C10_HOST_DEVICE inline bool divides(FloatScaleKind kind) {
  return kind == FloatScaleKind::kGiven || kind == FloatScaleKind::kFp8;
}

C10_HOST_DEVICE inline BlockScale block_scale_from_amax(float amax, const FloatQuantSpec& spec) {
  switch (spec.kind) {
    case FloatScaleKind::kMxFloor: return mx_floor_scale(amax, spec.element);
    case FloatScaleKind::kMxRceil: return mx_rceil_scale(amax, spec.element);
    case FloatScaleKind::kNvfp4: {
      const float p = spec.per_tensor_scale != nullptr ? *spec.per_tensor_scale : 1.0f;
      return nvfp4_scale(amax, p, spec.element, spec.scale_element);
    }
    default: {
      const float s = fp8_scale_from_amax(amax, spec.element);
      return BlockScale{s, s};
    }
  }
}

// ----------------------------------------------------------------------------------------------
// One element.
// ----------------------------------------------------------------------------------------------

template <bool kDivide>
C10_HOST_DEVICE inline float float_format_value(float x, const BlockScale& p, const ElementFormat& f,
                                                bool& in_range) {
  const float v = kDivide ? x / p.a : x * p.a;
  in_range = (v >= -f.max) & (v <= f.max);
  return round_to_element(clamp_keep_nan(v, -f.max, f.max), f) * p.b;
}

}  // namespace fakequant
