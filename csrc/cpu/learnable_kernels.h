// The learnable family's CPU kernel: the backward of the learnable (LSQ) fake quantization, whose forward is
// the fake_quant family's. Stub declared for the host; code compiled once per instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/params.h"
#include "fakequant_math.h"

namespace fakequant::cpu {

// Recomputes each element's level from x with `params` (runs mode), grad_x = (in range ? grad : 0), and per
// channel the fp32 sums of learnable_grad_terms' scale and zero-point terms over fixed chunks (deterministic).
// grad and grad_x are in x's dtype and layout; scale_sums and zero_point_sums have params.channels entries.
using LearnableBackwardFn = void (*)(c10::ScalarType dtype, const void* grad, const void* x, void* grad_x, int64_t n,
                                     const ChannelParams& params, float grad_factor, double* scale_sums,
                                     double* zero_point_sums);
FAKEQUANT_DECLARE_STUB(learnable_backward_stub, LearnableBackwardFn);

}  // namespace fakequant::cpu

// The kernels, compiled only by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp (FAKEQUANT_CPU_VARIANT).
#ifdef FAKEQUANT_CPU_VARIANT
#include "cpu/kernels_common.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

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
FAKEQUANT_REGISTER_STUB(learnable_backward_stub, &learnable_backward);

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
#endif  // FAKEQUANT_CPU_VARIANT
