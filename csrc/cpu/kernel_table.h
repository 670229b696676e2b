// The raw-pointer kernels behind the CPU ops, compiled once per instruction set (kernels.cpp: the
// compiler's baseline; kernels_avx2.cpp: AVX2/FMA/F16C; kernels_avx512.cpp: AVX-512 F/BW/VL/DQ) and chosen at
// run time by ops.cpp. The kernels see dense storage only: ops.cpp checks arguments, lays tensors out and
// prepares fp32 parameters.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "fakequant_math.h"

namespace fakequant::cpu {

// Per-channel parameters of a dense tensor walked linearly over storage.
//   period == 0 ("runs"): storage offset o belongs to channel (o / run) % channels; the arrays hold
//     `channels` entries and every run of `run` consecutive elements shares one entry.
//   period > 0 ("pattern"): the arrays hold `period` entries (the channel pattern of storage, repeated),
//     and offset o uses entry o % period. Used when runs are shorter than a vector block.
struct ChannelParams {
  const float* scale = nullptr;
  const float* inv_scale = nullptr;
  const float* zero_point = nullptr;
  const float* fold = nullptr;  // BN fold factor per entry, or nullptr (plain per-channel fake quant)
  bool divide_by_fold = false;  // with fold: q(x * fold) / fold (fold already bn_fold_training_factor's)
  int64_t run = 1;
  int64_t channels = 1;
  int64_t period = 0;
  float quant_min = 0.0f;
  float quant_max = 0.0f;
};

struct KernelTable {
  const char* name;
  // mask == nullptr skips the mask entirely (compute_mask=false).
  // relu: fake-quantize relu(x); the mask also requires x > 0.
  void (*fake_quant_per_tensor)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                                const QuantParams& params, bool relu);
  void (*fake_quant_per_channel)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n,
                                 const ChannelParams& params);
  void (*binarize)(c10::ScalarType dtype, const void* x, void* out, bool* mask, int64_t n);
  // out = mask ? grad : 0, for 2- and 4-byte element types.
  void (*masked_grad)(c10::ScalarType dtype, const void* grad, const bool* mask, void* out, int64_t n);
  // The BN-fold backward. It recomputes the forward's mask (and output) from weight with `params` (runs mode,
  // fold set, divide_by_fold as the forward ran; the forward's own per-element code), then grad_weight =
  // (mask ? grad : 0) * fold[c] and sums[c] = sum over channel c of (mask ? grad : 0) * weight, in fp32; with
  // divide_by_fold, grad_weight = (mask ? grad : 0) and sums[c] = sum of grad * ((mask ? weight : 0) - out).
  // grad and grad_weight are in weight's dtype and layout; sums has params.channels entries.
  void (*bn_fold_backward)(c10::ScalarType dtype, const void* grad, const void* weight, void* grad_weight, int64_t n,
                           const ChannelParams& params, float* sums);
  // The learnable (LSQ) fake quantization's backward: recomputes each element's level from x with `params`
  // (runs mode), grad_x = (in range ? grad : 0), and per channel the fp32 sums of learnable_grad_terms'
  // scale and zero-point terms over fixed chunks (deterministic). grad and grad_x are in x's dtype and layout;
  // scale_sums and zero_point_sums have params.channels entries.
  void (*learnable_backward)(c10::ScalarType dtype, const void* grad, const void* x, void* grad_x, int64_t n,
                             const ChannelParams& params, float grad_factor, double* scale_sums,
                             double* zero_point_sums);
  // lo[c] / hi[c] = min / max (fp32, NaN-propagating) over the elements of channel c, where storage offset
  // o belongs to channel (o / run) % channels (channels = 1, run = n: the whole tensor). n >= 1.
  void (*minmax)(c10::ScalarType dtype, const void* x, int64_t n, int64_t run, int64_t channels, float* lo,
                 float* hi);
};

const KernelTable& baseline_kernels();
// nullptr when this build has no AVX2 variant (not GCC/clang on x86-64).
const KernelTable* avx2_kernels();
// nullptr when this build has no AVX-512 variant.
const KernelTable* avx512_kernels();

}  // namespace fakequant::cpu
