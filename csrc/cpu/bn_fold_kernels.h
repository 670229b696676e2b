// The bn_fold family's CPU kernel: the BN-fold backward (its forward is the fake_quant family's per-channel
// kernel with a fold factor). Stub declared for the host; code compiled once per instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/params.h"
#include "fakequant_math.h"

namespace fakequant::cpu {

// It recomputes the forward's mask (and output) from weight with `params` (runs mode, fold set, divide_by_fold as
// the forward ran; the forward's own per-element code), then grad_weight = (mask ? grad : 0) * fold[c] and
// sums[c] = sum over channel c of (mask ? grad : 0) * weight, in fp32; with divide_by_fold, grad_weight =
// (mask ? grad : 0) and sums[c] = sum of grad * ((mask ? weight : 0) - out). grad and grad_weight are in weight's
// dtype and layout; sums has params.channels entries.
using BnFoldBackwardFn = void (*)(c10::ScalarType dtype, const void* grad, const void* weight, void* grad_weight,
                                  int64_t n, const ChannelParams& params, float* sums);
FAKEQUANT_DECLARE_STUB(bn_fold_backward_stub, BnFoldBackwardFn);

}  // namespace fakequant::cpu

// The kernels, compiled only by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp (FAKEQUANT_CPU_VARIANT).
#ifdef FAKEQUANT_CPU_VARIANT
#include "cpu/kernels_common.h"

namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT {

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
FAKEQUANT_REGISTER_STUB(bn_fold_backward_stub, &bn_fold_backward);

}  // namespace fakequant::cpu::FAKEQUANT_CPU_VARIANT
#endif  // FAKEQUANT_CPU_VARIANT
