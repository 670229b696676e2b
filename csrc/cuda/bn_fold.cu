// CUDA kernel of the bn_fold family's backward, bn_fold_fake_quant_weight_backward: one block per output
// channel, the forward's mask recomputed, the folded weight's gradient and the per-channel sum that gives the
// gradients of gamma and var, in one pass. (The forward runs on fake_quant.cu's per-channel kernel.) Host side:
// ops/bn_fold.cpp.
#include <type_traits>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"
#include "fakequant_math.h"

namespace fakequant {
namespace cuda {
namespace {

// The forward's divided output as it stored it: rounded once from fp32 to the weight's dtype (the
// forward's static_cast<scalar_t>), then widened again. Only the fp32 instantiation can see another
// weight dtype (grad and weight of different dtypes are both widened to fp32, see ops/bn_fold.cpp).
template <typename scalar_t>
__device__ __forceinline__ float as_stored(float value, FloatType weight_type) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    return static_cast<float>(static_cast<scalar_t>(value));
  } else {
    switch (weight_type) {
      case FloatType::kHalf: return static_cast<float>(static_cast<c10::Half>(value));
      case FloatType::kBFloat16: return static_cast<float>(static_cast<c10::BFloat16>(value));
      case FloatType::kFloat: break;
    }
    return value;
  }
}

// bn_fold_fake_quant_weight_backward, as reference.bn_fold_fake_quant_weight_backward computes it. The op
// takes the forward's arguments instead of its mask and output: each element's mask (and, for
// divide_by_fold, output) is recomputed with the forward's channel_params and channel_value (device_utils.cuh),
// so it is bit for bit what the forward produced, and the pass reads grad and weight only.
//   in = the forward's mask, g = where(in, grad, 0) in fp32, std = sqrt(var + eps), factor = gamma / std
//   grad_weight = g * factor,  s[c] = sum over channel c of g * weight (fp32)
//   grad_gamma = s / std,      grad_var = -0.5 * s * gamma / (std * std * std)
// With divide_by_fold (out = q(w f) / f, f = factor with 1 where it is 0), the gradients of out:
//   grad_weight = g,  s[c] replaced by sum over channel c of grad * ((in ? w : 0) - out), divided by factor
// out is the forward's output as stored, i.e. rounded to the weight's dtype, as the reference uses it. The
// sum takes the unmasked grad: out depends on f outside the range too (there out = q_end / f). Where
// factor == 0 the forward quantized with f = 1 instead, an out that does not depend on gamma or var: 0.
// grad_weight is bit-exact with the reference; s is summed in another order than torch.sum's, so
// grad_gamma and grad_var agree to fp32 rounding, not bit for bit. The sum is deterministic: a fixed
// per-thread order and a fixed tree across the block, no atomics.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bn_fold_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ weight,
                            scalar_t* __restrict__ grad_weight, BnFoldBackwardArgs args) {
  __shared__ float shared[kThreads / 32];
  const AxisLayout layout = args.layout;
  // Uniform over the grid: the branches on it never diverge.
  const bool divided = args.divide_by_fold;
  for (int64_t c = blockIdx.x; c < layout.channels; c += gridDim.x) {
    const float gamma_c = load(args.gamma, c);
    const float var_c = load(args.var, c);
    const float std_c = sqrtf(var_c + args.eps);
    const float factor = bn_fold_factor(gamma_c, var_c, args.eps);
    const ChannelParams channel =
        channel_params(c, args.scale, args.zero_point, args.quant_min, args.quant_max, factor, divided);
    float partial = 0.0f;
    for (int64_t k = threadIdx.x; k < args.per_channel; k += blockDim.x) {
      const int64_t o = divide(k, layout.inner);
      const int64_t offset = (o * layout.channels + c) * layout.inner + (k - o * layout.inner);
      const float w = static_cast<float>(weight[offset]);
      const float grad_k = static_cast<float>(grad[offset]);
      bool in_range;
      const float value = channel_value(w, channel, in_range);
      if (divided) {
        const float out = as_stored<scalar_t>(value, args.weight_type);
        grad_weight[offset] = static_cast<scalar_t>(in_range ? grad_k : 0.0f);
        partial += grad_k * bn_fold_divided_slope(w, out, in_range);
      } else {
        const float g = in_range ? grad_k : 0.0f;
        grad_weight[offset] = static_cast<scalar_t>(g * factor);
        partial += g * w;
      }
    }
    const float s = block_sum(partial, shared);
    if (threadIdx.x == 0) {
      const float grad_factor = divided ? bn_fold_divided_grad_factor(s, factor) : s;
      store(args.grad_gamma, c, grad_factor / std_c);
      store(args.grad_var, c, -0.5f * grad_factor * gamma_c / (std_c * std_c * std_c));
    }
  }
}

}  // namespace

cudaError_t launch_bn_fold_backward(const BnFoldBackwardArgs& args) {
  if (args.layout.channels == 0) return cudaSuccess;
  // Up to 65535 blocks; more channels than that are looped over by the grid-stride loop.
  const auto blocks = static_cast<unsigned int>(args.layout.channels < 65535 ? args.layout.channels : 65535);
  dispatch_float_type(args.type, [&](auto tag) {
    using scalar_t = decltype(tag);
    bn_fold_backward_kernel<scalar_t><<<blocks, kThreads, 0, args.stream>>>(
        static_cast<const scalar_t*>(args.grad), static_cast<const scalar_t*>(args.weight),
        static_cast<scalar_t*>(args.grad_weight), args);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fakequant
