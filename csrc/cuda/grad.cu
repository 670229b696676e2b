// CUDA kernels of the backward ops: masked_grad (the straight-through estimator) and
// bn_fold_fake_quant_weight_backward (one block per output channel: the folded weight's gradient and the
// per-channel sum that gives the gradients of gamma and var, in one pass).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.cuh"
#include "common.cuh"
#include "fakequant_math.h"

namespace fakequant {
namespace cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// masked_grad: grad where mask, +0 elsewhere, in grad's dtype (no conversion to fp32 needed).
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    masked_grad_kernel(const scalar_t* __restrict__ grad, const bool* __restrict__ mask, scalar_t* __restrict__ out,
                       int64_t numel) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = numel / kVec;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  for (int64_t v = first; v < vectors; v += step) {
    const Pack<scalar_t, kVec> g = reinterpret_cast<const Pack<scalar_t, kVec>*>(grad)[v];
    const Pack<bool, kVec> m = reinterpret_cast<const Pack<bool, kVec>*>(mask)[v];
    Pack<scalar_t, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) result.values[j] = m.values[j] ? g.values[j] : zero;
    reinterpret_cast<Pack<scalar_t, kVec>*>(out)[v] = result;
  }
  for (int64_t i = vectors * kVec + first; i < numel; i += step) out[i] = mask[i] ? grad[i] : zero;
}

template <typename scalar_t>
void launch_masked_grad(const Tensor& grad, const Tensor& mask, const Tensor& out) {
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  const auto* grad_data = static_cast<const scalar_t*>(grad.const_data_ptr());
  const bool* mask_data = mask.const_data_ptr<bool>();
  auto* out_data = static_cast<scalar_t*>(out.data_ptr());
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (is_aligned(grad_data, kVectorBytes) && is_aligned(out_data, kVectorBytes) && is_aligned(mask_data, kVec)) {
    masked_grad_kernel<scalar_t, kVec>
        <<<grid_size((numel + kVec - 1) / kVec), kThreads, 0, stream>>>(grad_data, mask_data, out_data, numel);
  } else {
    masked_grad_kernel<scalar_t, 1><<<grid_size(numel), kThreads, 0, stream>>>(grad_data, mask_data, out_data, numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor masked_grad_cuda(const Tensor& grad, const Tensor& mask) {
  checks::check_mask(grad, mask);
  checks::check_float_input(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const Tensor dense_grad = dense_input(grad);
  const Tensor dense_mask = with_layout_of(mask, dense_grad);
  Tensor out = at::empty_like(grad);
  TORCH_INTERNAL_ASSERT(out.strides() == dense_grad.strides());
  dispatch_float_type(grad.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_masked_grad<scalar_t>(dense_grad, dense_mask, out);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// bn_fold_fake_quant_weight_backward, as reference.bn_fold_fake_quant_weight_backward computes it:
//   g = where(mask, grad, 0) in fp32, std = sqrt(var + eps), factor = gamma / std
//   grad_weight = g * factor,  s[c] = sum over channel c of g * weight (fp32)
//   grad_gamma = s / std,      grad_var = -0.5 * s * gamma / (std * std * std)
// grad_weight is bit-exact with the reference; s is summed in another order than torch.sum's, so
// grad_gamma and grad_var agree to fp32 rounding, not bit for bit.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float block_sum(float value, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? shared[lane] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();  // `shared` is reused by the block's next channel
  return value;
}

// Grid-stride over channels, one block per channel at a time. The elements of channel c in the dense
// layout are at offsets (o * channels + c) * inner + i for o < per_channel / inner, i < inner.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bn_fold_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ weight,
                            const bool* __restrict__ mask, scalar_t* __restrict__ grad_weight, AxisLayout layout,
                            int64_t per_channel, Vector1d gamma, Vector1d var, float eps, Vector1d grad_gamma,
                            Vector1d grad_var) {
  __shared__ float shared[kThreads / 32];
  for (int64_t c = blockIdx.x; c < layout.channels; c += gridDim.x) {
    const float gamma_c = gamma.load(c);
    const float std_c = sqrtf(var.load(c) + eps);
    const float factor = bn_fold_factor(gamma_c, var.load(c), eps);
    float partial = 0.0f;
    for (int64_t k = threadIdx.x; k < per_channel; k += blockDim.x) {
      const int64_t o = divide(k, layout.inner);
      const int64_t offset = (o * layout.channels + c) * layout.inner + (k - o * layout.inner);
      const float g = mask[offset] ? static_cast<float>(grad[offset]) : 0.0f;
      grad_weight[offset] = static_cast<scalar_t>(g * factor);
      partial += g * static_cast<float>(weight[offset]);
    }
    const float s = block_sum(partial, shared);
    if (threadIdx.x == 0) {
      grad_gamma.store(c, s / std_c);
      grad_var.store(c, -0.5f * s * gamma_c / (std_c * std_c * std_c));
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> bn_fold_fake_quant_weight_backward_cuda(const Tensor& grad, const Tensor& weight,
                                                                           const Tensor& mask, const Tensor& gamma,
                                                                           const Tensor& var, double eps) {
  checks::check_weight(weight);
  checks::check_same_device(grad, "grad", weight, "weight");
  checks::check_float_input(grad, "grad");
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), "fakequant: grad must have the weight's shape ",
                    checks::python_shape(weight.sizes()), ", got shape ", checks::python_shape(grad.sizes()));
  checks::check_mask(grad, mask);
  checks::check_bn_param(gamma, "gamma", weight);
  checks::check_bn_param(var, "var", weight);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "fakequant: eps must be finite and >= 0, got ",
                    checks::python_float(eps));
  const c10::cuda::CUDAGuard guard(weight.device());

  Tensor grad_weight = at::empty_like(weight);
  Tensor grad_gamma = at::empty_like(gamma);
  Tensor grad_var = at::empty_like(var);
  Tensor dense_weight = dense_input(weight);
  Tensor dense_grad = with_layout_of(grad, dense_weight);
  const Tensor dense_mask = with_layout_of(mask, dense_weight);
  Tensor result = grad_weight;
  if (grad.scalar_type() != weight.scalar_type()) {
    // Mixed dtypes (rare): both widen to fp32 exactly, and the fp32 grad_weight rounds to weight's
    // dtype once, as the reference's .to(weight.dtype) does. This keeps one kernel per dtype.
    dense_weight = dense_weight.to(at::kFloat);
    dense_grad = dense_grad.to(at::kFloat);
    result = at::empty_like(dense_weight);
  }
  TORCH_INTERNAL_ASSERT(result.strides() == dense_weight.strides() && dense_grad.strides() == dense_weight.strides());
  const int64_t channels = weight.size(0);
  if (channels == 0) return {grad_weight, grad_gamma, grad_var};
  const AxisLayout layout = axis_layout(dense_weight, 0);
  const int64_t per_channel = weight.numel() / channels;
  // A one-channel weight is one block's reduction over everything; the axis layout calls it inner = 1.
  const AxisLayout walk = layout.channels == 1 ? AxisLayout{std::max<int64_t>(per_channel, 1), 1} : layout;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Up to 65535 blocks; more channels than that are looped over by the grid-stride loop.
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>(channels, 65535));
  dispatch_float_type(dense_weight.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    bn_fold_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(dense_grad.const_data_ptr()),
        static_cast<const scalar_t*>(dense_weight.const_data_ptr()), dense_mask.const_data_ptr<bool>(),
        static_cast<scalar_t*>(result.data_ptr()), walk, per_channel, vector1d(gamma), vector1d(var),
        static_cast<float>(eps), vector1d(grad_gamma), vector1d(grad_var));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!result.is_same(grad_weight)) grad_weight.copy_(result);
  return {grad_weight, grad_gamma, grad_var};
}

}  // namespace
}  // namespace cuda
}  // namespace fakequant

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("masked_grad", &fakequant::cuda::masked_grad_cuda);
  m.impl("bn_fold_fake_quant_weight_backward", &fakequant::cuda::bn_fold_fake_quant_weight_backward_cuda);
}
