// CUDA kernel of the learnable family: fake_quant_learnable_backward, the learned step size (LSQ) backward.
// (The forward runs on fake_quant.cu's kernels.) Host side: ops/learnable.cpp.
#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"
#include "fakequant_math.h"

namespace fakequant {
namespace cuda {
namespace {

// fake_quant_learnable_backward: grad_x and the partial sums of LSQ's terms, each element's level recomputed
// from x with the forward's parameters (fakequant_math.h's learnable_grad_terms, which the CPU kernels' scalar
// tails call too). The partial sums are deterministic: a fixed per-thread order and block_sum's fixed tree.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    learnable_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ grad_x, LearnableBackwardArgs args) {
  __shared__ float shared[kThreads / 32];
  const AxisLayout layout = args.layout;
  const int64_t tasks = layout.channels * args.splits;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = divide(task, args.splits);
    const int64_t begin = (task - c * args.splits) * args.per_split;
    const int64_t end = begin + args.per_split < args.per_channel ? begin + args.per_split : args.per_channel;
    const QuantParams p = make_quant_params(load(args.scale, c), load(args.zero_point, c), args.quant_min,
                                            args.quant_max);
    float scale_partial = 0.0f;
    float zero_point_partial = 0.0f;
    for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
      const int64_t o = divide(k, layout.inner);
      const int64_t offset = (o * layout.channels + c) * layout.inner + (k - o * layout.inner);
      float scale_term, zero_point_term;
      grad_x[offset] = static_cast<scalar_t>(learnable_grad_terms(
          static_cast<float>(x[offset]), static_cast<float>(grad[offset]), p, args.grad_factor, scale_term,
          zero_point_term));
      scale_partial += scale_term;
      zero_point_partial += zero_point_term;
    }
    const float scale_sum = block_sum(scale_partial, shared);
    const float zero_point_sum = block_sum(zero_point_partial, shared);
    if (threadIdx.x == 0) {
      args.partial_scale[task] = scale_sum;
      args.partial_zero_point[task] = zero_point_sum;
    }
  }
}

}  // namespace

cudaError_t launch_learnable_backward(const LearnableBackwardArgs& args) {
  const int64_t tasks = args.layout.channels * args.splits;
  if (tasks == 0 || args.per_channel == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned int>(tasks < 65535 ? tasks : 65535);
  dispatch_float_type(args.type, [&](auto tag) {
    using scalar_t = decltype(tag);
    learnable_backward_kernel<scalar_t><<<blocks, kThreads, 0, args.stream>>>(
        static_cast<const scalar_t*>(args.grad), static_cast<const scalar_t*>(args.x),
        static_cast<scalar_t*>(args.grad_x), args);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fakequant
