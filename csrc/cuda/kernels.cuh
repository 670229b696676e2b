// The interface between the CUDA kernels (one .cu file per op family: fake_quant.cu, bn_fold.cu, learnable.cu,
// observe.cu, float_formats.cu) and their host side (csrc/ops/<family>.cpp): the launchers' declarations and
// argument structs.
//
// Only plain structs, raw pointers and the CUDA runtime API cross it: the .cu files include no ATen or
// torch header, which keeps them quick to compile (nvcc parses a .cu file's headers once for the host and
// once more per GPU architecture; with ATen included that was most of the build time). The argument checks,
// tensor allocation, layouts and the dispatcher registration live in the host files, compiled once by the
// host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "fakequant_math.h"
#include "float_formats.h"

namespace fakequant {
namespace cuda {

// Threads per block. Not tuned on a GPU (the development machine and CI have none): 256 threads keep
// 8 blocks resident per SM on sm_80/sm_90 for kernels of this register footprint. bench/ measures it.
constexpr int kThreads = 256;
// Grid-stride loops launch at most this many blocks per SM and loop over the rest, which amortizes the
// per-thread set-up (per-tensor parameters) over several vectors. Not tuned on a GPU (none here).
constexpr int kBlocksPerSm = 8;
// Bytes per vector load: 16 (float4; 8 halves), the widest single load an sm_80/sm_90 thread issues.
constexpr int kVectorBytes = 16;

enum class FloatType : int8_t { kFloat, kHalf, kBFloat16 };

// A small strided 1-D tensor (a per-channel parameter, or a one-element per-tensor one with stride 0)
// in any of the dtypes the ops accept for it, read or written one element at a time on the device.
// One kernel instantiation serves every dtype, which keeps the build small; these tensors hold one
// value per channel, so the dtype switch costs nothing measurable next to the elementwise pass.
struct Vector1d {
  enum class Type : int8_t { kFloat, kHalf, kBFloat16, kInt, kLong };
  void* data;
  int64_t stride;
  Type type;
};

// Elements between consecutive indices along an axis of a dense tensor, and the number of indices:
// the element at storage offset k has index (k / inner) % channels along that axis.
struct AxisLayout {
  int64_t inner;
  int64_t channels;
};

// One channel's parameters, prepared on the device. `fold` multiplies x before the fake quantization:
// gamma / sqrt(var + eps) for bn_fold_fake_quant_weight, exactly 1 otherwise (x * 1.0f == x for every
// float, NaN and infinities included). `divide`: bn_fold_fake_quant_weight's divide_by_fold, whose output
// is q(x * fold) / fold, with fold already bn_fold_training_factor's (never 0). The same for every
// channel of a call, so the branch on it never diverges within a warp.
struct ChannelParams {
  QuantParams quant;
  float fold;
  bool divide;
};

// One elementwise forward pass over the storage of a dense input: out[k], mask[k] from x[k].
struct ElementwiseArgs {
  const void* x;
  void* out;
  bool* mask;  // nullptr: no mask
  int64_t numel;
  FloatType type;
  int max_blocks;  // multiprocessors * kBlocksPerSm
  cudaStream_t stream;
};

// Each returns cudaGetLastError() right after its launch(es), which the caller checks with C10_CUDA_CHECK
// (what C10_CUDA_KERNEL_LAUNCH_CHECK does). numel == 0 launches nothing.
// relu: fake-quantize relu(x); the mask also requires x > 0.
cudaError_t launch_fake_quant_per_tensor(const ElementwiseArgs& args, const float* scale, Vector1d zero_point,
                                         float quant_min, float quant_max, bool relu);
// gamma and var are nullptr for a plain per-channel fake quantization (fold = 1, divide_by_fold false).
cudaError_t launch_channel_params(ChannelParams* params, int64_t channels, Vector1d scale, Vector1d zero_point,
                                  float quant_min, float quant_max, const Vector1d* gamma, const Vector1d* var,
                                  float eps, bool divide_by_fold, cudaStream_t stream);
cudaError_t launch_fake_quant_per_channel(const ElementwiseArgs& args, const ChannelParams* params,
                                          AxisLayout layout);
cudaError_t launch_binarize(const ElementwiseArgs& args);

cudaError_t launch_masked_grad(FloatType type, const void* grad, const bool* mask, void* out, int64_t numel,
                               int max_blocks, cudaStream_t stream);
// bn_fold_fake_quant_weight_backward: one block per channel (grid-stride over channels); the elements of
// channel c sit at storage offsets (o * channels + c) * inner + i, o < per_channel / inner, i < inner.
// grad, weight and grad_weight share that layout and `type`. The forward's arguments (scale, zero_point,
// quant range, eps, divide_by_fold) let the kernel recompute its mask and divided output per element.
struct BnFoldBackwardArgs {
  const void* grad;
  const void* weight;
  void* grad_weight;
  FloatType type;
  // The op's weight dtype, to which the forward rounded its divided output. Differs from `type` only when
  // grad's and weight's dtypes differ: then all three arrays are fp32 (type == kFloat).
  FloatType weight_type;
  AxisLayout layout;
  int64_t per_channel;
  Vector1d gamma, var;
  float eps;
  Vector1d scale, zero_point;
  float quant_min, quant_max;
  bool divide_by_fold;
  Vector1d grad_gamma, grad_var;
  cudaStream_t stream;
};
cudaError_t launch_bn_fold_backward(const BnFoldBackwardArgs& args);

// fake_quant_learnable_backward (LSQ): `splits` blocks per channel (grid-stride over the channels * splits
// tasks), each over `per_split` of the channel's elements at storage offsets (o * channels + c) * inner + i (as
// in BnFoldBackwardArgs), writing grad_x and one partial sum of the scale terms and of the zero-point terms of
// learnable_grad_terms to partial_scale / partial_zero_point[c * splits + s]; the host adds the partials.
// zero_point holds the integer zero point the forward quantized with (a learned one already rounded).
struct LearnableBackwardArgs {
  const void* grad;
  const void* x;
  void* grad_x;
  FloatType type;
  AxisLayout layout;
  int64_t per_channel;
  int64_t splits;
  int64_t per_split;
  Vector1d scale, zero_point;
  float quant_min, quant_max, grad_factor;
  float* partial_scale;
  float* partial_zero_point;
  cudaStream_t stream;
};
cudaError_t launch_learnable_backward(const LearnableBackwardArgs& args);

// observe_range over the storage of a dense x: per-channel min/max partials (layout.channels = 1 with
// layout.inner = numel for the whole tensor; `splits` blocks per channel), then `entries` outputs (one per
// channel, or one over all channels when a folded weight's range is per tensor) written to the tracked
// range rows, scale and zero point. `partial` holds 2 * layout.channels * splits floats of scratch.
// relu: the range of relu(x) (relu(x * fold) with a fold), from x's without forming it.
struct ObserveArgs {
  const void* x;
  FloatType type;
  int64_t numel;
  AxisLayout layout;
  int64_t splits;
  float* partial;
  const float* fold;  // nullptr, or layout.channels fp32 factors
  bool relu;
  Vector1d tracked_min, tracked_max, scale, zero_point;
  float averaging_constant;
  bool replace;  // averaging_constant == 1: the batch range replaces the tracked one
  int64_t quant_min, quant_max;
  bool symmetric;
  cudaStream_t stream;
};
cudaError_t launch_observe_range(const ObserveArgs& args, int64_t entries);

// fake_quant_fp8 / fake_quant_mx / fake_quant_nvfp4 over the storage of a dense x, in blocks of block_size
// consecutive elements (numel % block_size == 0; block_size == numel: one block). spec.per_tensor_scale (NVFP4)
// points to device memory.
struct FloatFormatArgs {
  const void* x;
  void* out;
  bool* mask;  // nullptr: no mask
  int64_t numel;
  int64_t block_size;
  FloatType type;
  FloatQuantSpec spec;
  const float* scales;  // spec.kind == kGiven: one fp32 scale per block, else nullptr
  uint32_t* amax;       // float_format_scratch(...) entries of scratch, or nullptr when that is 0
  int max_blocks;
  cudaStream_t stream;
};
// The uint32 scratch entries launch_fake_quant_float needs: one per block when the blocks are too large (or too
// few) for one thread block each and their amax is reduced by a kernel of its own, else 0.
int64_t float_format_scratch(int64_t numel, int64_t block_size, FloatScaleKind kind, FloatType type, int max_blocks);
cudaError_t launch_fake_quant_float(const FloatFormatArgs& args);

}  // namespace cuda
}  // namespace fakequant
