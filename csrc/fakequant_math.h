// Per-element math shared by the CPU (scalar path) and CUDA kernels, so that the CPU tests exercise
// exactly the arithmetic the GPU runs. Every function computes in fp32 (docs/numerics.md, Per-tensor fake
// quantization):
//   q   = round_half_even(x * inv_scale) + zero_point   (inv_scale = 1.0f / scale, computed once)
//   in  = quant_min <= q <= quant_max                    (the mask, on the unclamped q; NaN -> false)
//   out = (clamp(q, quant_min, quant_max) - zero_point) * scale   (NaN stays NaN, +-inf -> range ends)
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

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

// relu(x) as torch.relu computes it on the CPU: NaN stays NaN (comparisons with NaN are false) and -0 stays -0,
// so that a range observed through ReLU is the reference's bit for bit (fake quantization maps both zeros to +0).
C10_HOST_DEVICE inline float relu_value(float x) { return x < 0.0f ? 0.0f : x; }

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

// The fold factor of divide_by_fold=True: 1 where f is 0 (gamma == 0), where q(w f) / f is undefined.
C10_HOST_DEVICE inline float bn_fold_training_factor(float fold) { return fold == 0.0f ? 1.0f : fold; }

// divide_by_fold=True: q(w f) / f, rounded once (from fp32) to the weight's dtype by the caller. `fold` is
// already bn_fold_training_factor's.
C10_HOST_DEVICE inline float bn_fold_divided_value(float w, float fold, const QuantParams& p, bool& in_range) {
  return fake_quant_value(w * fold, p, in_range) / fold;
}

// The per-element term of d out / d f for divide_by_fold=True, whose per-channel sum (times grad) over f
// is grad_f: (mask ? w : 0) - out.
C10_HOST_DEVICE inline float bn_fold_divided_slope(float w, float out, bool in_range) {
  return (in_range ? w : 0.0f) - out;
}

// grad_f of divide_by_fold from a channel's sum of grad * bn_fold_divided_slope and its unadjusted fold factor:
// the sum over f, and 0 where f is 0 (that channel was quantized with f = 1, an output that f does not move).
C10_HOST_DEVICE inline float bn_fold_divided_grad_factor(float slope_sum, float fold) {
  return fold == 0.0f ? 0.0f : slope_sum / fold;
}

// ----------------------------------------------------------------------------------------------
// Learned step size (LSQ): the backward of fake_quant_learnable, element by element. Each product is rounded
// to fp32 in the order torch._fake_quantize_learnable_* use.
// ----------------------------------------------------------------------------------------------

// a * b, a - b, a + b, each rounded to fp32 on its own: explicitly on the GPU, where nvcc would otherwise contract a
// multiply and an addition into an FMA (setup.py compiles the host side with -ffp-contract=off).
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// grad_x and the terms whose sums are the scale's and the zero point's gradients (reference.
// fake_quant_learnable_backward): in range, grad, ((x_fq - x) * inv_scale) * grad * grad_factor and 0; below
// (above) the range, 0, (grad * (quant_min - zero_point)) * grad_factor (quant_max) and ((-grad) * scale) *
// grad_factor; a NaN level (x NaN), 0 everywhere.
C10_HOST_DEVICE inline float learnable_grad_terms(float x, float grad, const QuantParams& p, float grad_factor,
                                                  float& scale_term, float& zero_point_term) {
  const float q = quantize_level(x, p);
  if (q >= p.quant_min && q <= p.quant_max) {
    const float x_fq = dequantize_level(q, p);
    scale_term = mul_rn(mul_rn(mul_rn(sub_rn(x_fq, x), p.inv_scale), grad), grad_factor);
    zero_point_term = 0.0f;
    return grad;
  }
  if (q < p.quant_min || q > p.quant_max) {
    const float bound = q < p.quant_min ? p.quant_min : p.quant_max;
    scale_term = mul_rn(mul_rn(grad, bound - p.zero_point), grad_factor);
    zero_point_term = mul_rn(mul_rn(-grad, p.scale), grad_factor);
    return 0.0f;
  }
  scale_term = 0.0f;
  zero_point_term = 0.0f;
  return 0.0f;
}

// ----------------------------------------------------------------------------------------------
// Range observation and quantization parameters (the observe_range op). The batch range is that of the
// finite elements ((+inf, -inf) when there is none: no range, which leaves the tracked range as it was), so
// one non-finite batch does not end a training run; a NaN end (a non-finite fold factor) counts as no range too.
// A NaN tracked range (not one this op wrote) propagates through choose_qparams, as in torch's clamps.
// ----------------------------------------------------------------------------------------------

// min/max that return NaN when either operand is NaN; a tie (+-0) keeps a, the earlier operand, as torch's
// scalar min/max reductions do.
C10_HOST_DEVICE inline float nan_min(float a, float b) { return (a != a || b >= a) ? a : b; }
C10_HOST_DEVICE inline float nan_max(float a, float b) { return (a != a || b <= a) ? a : b; }

// min/max of an accumulated range end `acc` and a value `v`, neither NaN; a tie (+-0) keeps acc, as torch's
// scalar min/max reductions keep the earlier element.
C10_HOST_DEVICE inline float finite_min(float acc, float v) { return v < acc ? v : acc; }
C10_HOST_DEVICE inline float finite_max(float acc, float v) { return v > acc ? v : acc; }

// The moving average tracked + c * (observed - tracked), rounded after each operation like the
// reference's separate tensor ops (setup.py compiles with -ffp-contract=off, so no FMA on the host).
C10_HOST_DEVICE inline float moving_average(float tracked, float observed, float averaging_constant) {
  return add_rn(tracked, mul_rn(sub_rn(observed, tracked), averaging_constant));
}

// Scale and zero point from a range, as fakequant.qparams.choose_qparams (docs/numerics.md, Choosing scale and
// zero point), operation by operation: zero forced into the range, scale at least FLT_EPSILON. The divisors are
// the reference's Python floats rounded to fp32; the zero point is the fp32 value the reference converts to an
// integer.
C10_HOST_DEVICE inline void choose_qparams(float min_val, float max_val, int64_t quant_min, int64_t quant_max,
                                           bool symmetric, float& scale, float& zero_point) {
  const float min_neg = min_val != min_val ? min_val : (min_val < 0.0f ? min_val : 0.0f);
  const float max_pos = max_val != max_val ? max_val : (max_val > 0.0f ? max_val : 0.0f);
  const float eps = 1.1920928955078125e-07f;  // torch.finfo(torch.float32).eps
  const float qmin = static_cast<float>(quant_min);
  const float qmax = static_cast<float>(quant_max);
  if (symmetric) {
    scale = nan_max(-min_neg, max_pos) / static_cast<float>(static_cast<double>(quant_max - quant_min) / 2.0);
  } else {
    scale = (max_pos - min_neg) / static_cast<float>(quant_max - quant_min);
  }
  scale = scale != scale ? scale : (scale < eps ? eps : scale);
  if (symmetric) {
    zero_point = quant_min < 0 ? 0.0f : static_cast<float>((quant_min + quant_max + 1) / 2);
  } else {
    const float zp = qmin - round_half_even(min_neg / scale);
    zero_point = zp != zp ? zp : (zp < qmin ? qmin : (zp > qmax ? qmax : zp));
  }
}

}  // namespace fakequant
