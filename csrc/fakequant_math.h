// Per-element math shared by the CPU (scalar path) and CUDA kernels, so that the CPU tests exercise
// exactly the arithmetic the GPU runs. Every function computes in fp32 (SPEC §1):
//   q   = round_half_even(x * inv_scale) + zero_point   (inv_scale = 1.0f / scale, computed once)
//   in  = quant_min <= q <= quant_max                    (the mask, on the unclamped q; NaN -> false)
//   out = (clamp(q, quant_min, quant_max) - zero_point) * scale   (NaN stays NaN, +-inf -> range ends)
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace fakequant {

// Round half to even under the default rounding mode; never roundf or floor(x + 0.5f).
C10_HOST_DEVICE inline float round_half_even(float v) {
#ifdef __CUDA_ARCH__
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

// The per-tensor or per-channel parameters of one fake quantization, already in fp32.
struct QuantParams {
  float scale;
  float inv_scale;
  float zero_point;
  float quant_min;
  float quant_max;
};

C10_HOST_DEVICE inline QuantParams make_quant_params(float scale, float zero_point, float quant_min,
                                                     float quant_max) {
  return QuantParams{scale, 1.0f / scale, zero_point, quant_min, quant_max};
}

// The rounded, shifted, unclamped level q.
C10_HOST_DEVICE inline float quantize_level(float x, const QuantParams& p) {
  return round_half_even(x * p.inv_scale) + p.zero_point;
}

C10_HOST_DEVICE inline bool level_in_range(float q, const QuantParams& p) {
  return q >= p.quant_min && q <= p.quant_max;
}

// Comparisons with NaN are false, so a NaN level passes through both branches unchanged.
C10_HOST_DEVICE inline float dequantize_level(float q, const QuantParams& p) {
  const float clamped = q < p.quant_min ? p.quant_min : (q > p.quant_max ? p.quant_max : q);
  return (clamped - p.zero_point) * p.scale;
}

C10_HOST_DEVICE inline float fake_quant_value(float x, const QuantParams& p, bool& in_range) {
  const float q = quantize_level(x, p);
  in_range = level_in_range(q, p);
  return dequantize_level(q, p);
}

// +1 for x >= 0 (zero included), -1 below, NaN stays NaN.
C10_HOST_DEVICE inline float binarize_value(float x) {
  return x != x ? x : (x >= 0.0f ? 1.0f : -1.0f);
}

// The clipped straight-through estimator's mask; NaN -> false.
C10_HOST_DEVICE inline bool binarize_in_range(float x) {
  return x >= -1.0f && x <= 1.0f;
}

// BatchNorm's per-channel scale gamma / sqrt(var + eps), folded into the conv weight.
C10_HOST_DEVICE inline float bn_fold_factor(float gamma, float var, float eps) {
  return gamma / sqrtf(var + eps);
}

}  // namespace fakequant
