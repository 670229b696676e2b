// CUDA kernels of the forward ops that return (out, mask): fake_quant_per_tensor, fake_quant_per_channel,
// bn_fold_fake_quant_weight and binarize. One elementwise kernel template serves all of them: it walks
// the storage of a dense input linearly (a grid-stride loop, 64-bit offsets, 16-byte vector loads when
// the pointers allow), and an "op" functor supplies the per-element math from fakequant_math.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
// Per-element ops. Each has prepare() (run once per thread, before the loop) and
// apply<N>(x[N], offset of x[0] in storage, out[N], in_range[N]).
// ---------------------------------------------------------------------------------------------

// scale and zero_point are read on the device by every thread (one cached line), never with .item().
struct PerTensorOp {
  const float* scale;
  Vector1d zero_point;
  float quant_min;
  float quant_max;
  QuantParams params;

  __device__ __forceinline__ void prepare() {
    params = make_quant_params(*scale, zero_point.load(0), quant_min, quant_max);
  }

  template <int N>
  __device__ __forceinline__ void apply(const float (&x)[N], int64_t, float (&out)[N], bool (&in)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = fake_quant_value(x[j], params, in[j]);
  }
};

// One channel's parameters, prepared on the device by channel_params_kernel. `fold` multiplies x before
// the fake quantization: gamma / sqrt(var + eps) for bn_fold_fake_quant_weight, exactly 1 otherwise
// (x * 1.0f == x for every float, NaN and infinities included).
struct ChannelParams {
  QuantParams quant;
  float fold;
};

struct PerChannelOp {
  const ChannelParams* params;
  AxisLayout layout;
  // True when every aligned vector lies within one channel (inner % kVec == 0, or a single channel):
  // then the channel is computed once per vector instead of once per element.
  bool channel_per_vector;

  __device__ __forceinline__ void prepare() {}

  template <int N>
  __device__ __forceinline__ void apply(const float (&x)[N], int64_t offset, float (&out)[N], bool (&in)[N]) const {
    if (N == 1 || channel_per_vector) {
      const ChannelParams p = params[channel_of(offset, layout)];
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = fake_quant_value(x[j] * p.fold, p.quant, in[j]);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const ChannelParams p = params[channel_of(offset + j, layout)];
        out[j] = fake_quant_value(x[j] * p.fold, p.quant, in[j]);
      }
    }
  }
};

struct BinarizeOp {
  __device__ __forceinline__ void prepare() {}

  template <int N>
  __device__ __forceinline__ void apply(const float (&x)[N], int64_t, float (&out)[N], bool (&in)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      out[j] = binarize_value(x[j]);
      in[j] = binarize_in_range(x[j]);
    }
  }
};

// The tiny per-channel prep: reads scale, zero point (and gamma, var) on the device, in any of their
// allowed dtypes and strides, so that the elementwise pass reads one fp32 record per channel.
__global__ void __launch_bounds__(kThreads)
    channel_params_kernel(ChannelParams* __restrict__ params, int64_t channels, Vector1d scale, Vector1d zero_point,
                          float quant_min, float quant_max, bool fold_bn, Vector1d gamma, Vector1d var, float eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  params[c].quant = make_quant_params(scale.load(c), zero_point.load(c), quant_min, quant_max);
  params[c].fold = fold_bn ? bn_fold_factor(gamma.load(c), var.load(c), eps) : 1.0f;
}

// ---------------------------------------------------------------------------------------------
// The elementwise kernel.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kVec, typename Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, bool* __restrict__ mask,
                       int64_t numel, Op op) {
  op.prepare();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = numel / kVec;
  for (int64_t v = first; v < vectors; v += step) {
    const Pack<scalar_t, kVec> loaded = reinterpret_cast<const Pack<scalar_t, kVec>*>(x)[v];
    float values[kVec];
    float results[kVec];
    bool in_range[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) values[j] = static_cast<float>(loaded.values[j]);
    op.template apply<kVec>(values, v * kVec, results, in_range);
    Pack<scalar_t, kVec> stored;
#pragma unroll
    for (int j = 0; j < kVec; ++j) stored.values[j] = static_cast<scalar_t>(results[j]);
    reinterpret_cast<Pack<scalar_t, kVec>*>(out)[v] = stored;
    if (mask != nullptr) {
      Pack<bool, kVec> flags;
#pragma unroll
      for (int j = 0; j < kVec; ++j) flags.values[j] = in_range[j];
      reinterpret_cast<Pack<bool, kVec>*>(mask)[v] = flags;
    }
  }
  // The tail that does not fill a vector (empty when kVec == 1).
  for (int64_t i = vectors * kVec + first; i < numel; i += step) {
    float value[1] = {static_cast<float>(x[i])};
    float result[1];
    bool in_range[1];
    op.template apply<1>(value, i, result, in_range);
    out[i] = static_cast<scalar_t>(result[0]);
    if (mask != nullptr) mask[i] = in_range[0];
  }
}

template <typename scalar_t, typename Op>
void launch_elementwise(const Tensor& x, const Tensor& out, const Tensor& mask, const Op& op) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const auto* x_data = static_cast<const scalar_t*>(x.const_data_ptr());
  auto* out_data = static_cast<scalar_t*>(out.data_ptr());
  bool* mask_data = mask.numel() > 0 ? mask.data_ptr<bool>() : nullptr;
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const bool vectorizable = is_aligned(x_data, kVectorBytes) && is_aligned(out_data, kVectorBytes) &&
                            (mask_data == nullptr || is_aligned(mask_data, kVec));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorizable) {
    elementwise_kernel<scalar_t, kVec, Op>
        <<<grid_size((numel + kVec - 1) / kVec), kThreads, 0, stream>>>(x_data, out_data, mask_data, numel, op);
  } else {
    elementwise_kernel<scalar_t, 1, Op>
        <<<grid_size(numel), kThreads, 0, stream>>>(x_data, out_data, mask_data, numel, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The outputs of a forward op, laid out like at::empty_like(x) (as the fake impls are), and the dense
// input whose storage order they share.
struct Forward {
  Tensor input;
  Tensor out;
  Tensor mask;
};

Forward make_forward(const Tensor& x, bool compute_mask) {
  Forward f{dense_input(x), at::empty_like(x),
            compute_mask ? at::empty_like(x, x.options().dtype(at::kBool)) : at::empty({0}, x.options().dtype(at::kBool))};
  TORCH_INTERNAL_ASSERT(f.out.strides() == f.input.strides());
  TORCH_INTERNAL_ASSERT(!compute_mask || f.mask.strides() == f.input.strides());
  return f;
}

template <typename Op>
std::tuple<Tensor, Tensor> run_forward(const Forward& f, const Op& op) {
  dispatch_float_type(f.input.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_elementwise<scalar_t>(f.input, f.out, f.mask, op);
  });
  return {f.out, f.mask};
}

// ---------------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> fake_quant_per_tensor_cuda(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                                      int64_t quant_min, int64_t quant_max, bool compute_mask) {
  checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, std::nullopt);
  const c10::cuda::CUDAGuard guard(x.device());
  const Forward f = make_forward(x, compute_mask);
  PerTensorOp op{scale.const_data_ptr<float>(), vector1d(zero_point), static_cast<float>(quant_min),
                 static_cast<float>(quant_max), QuantParams{}};
  return run_forward(f, op);
}

// Per-channel fake quantization of `x` along `axis`, optionally of x * gamma / sqrt(var + eps) (BN folding).
std::tuple<Tensor, Tensor> run_per_channel(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                           int64_t axis, int64_t quant_min, int64_t quant_max, bool compute_mask,
                                           const Tensor* gamma, const Tensor* var, double eps) {
  const Forward f = make_forward(x, compute_mask);
  if (x.numel() == 0) return {f.out, f.mask};
  const int64_t channels = x.size(axis);
  Tensor params = at::empty({channels * static_cast<int64_t>(sizeof(ChannelParams))}, x.options().dtype(at::kByte));
  auto* params_data = reinterpret_cast<ChannelParams*>(params.data_ptr());
  const bool fold_bn = gamma != nullptr;
  const Vector1d no_vector{nullptr, 0, Vector1d::Type::kFloat};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  channel_params_kernel<<<static_cast<unsigned int>((channels + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      params_data, channels, vector1d(scale), vector1d(zero_point), static_cast<float>(quant_min),
      static_cast<float>(quant_max), fold_bn, fold_bn ? vector1d(*gamma) : no_vector,
      fold_bn ? vector1d(*var) : no_vector, static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const AxisLayout layout = axis_layout(f.input, axis);
  const int64_t vector_elements = kVectorBytes / static_cast<int64_t>(f.input.element_size());
  PerChannelOp op{params_data, layout, layout.channels == 1 || layout.inner % vector_elements == 0};
  return run_forward(f, op);
}

std::tuple<Tensor, Tensor> fake_quant_per_channel_cuda(const Tensor& x, const Tensor& scale,
                                                       const Tensor& zero_point, int64_t axis, int64_t quant_min,
                                                       int64_t quant_max, bool compute_mask) {
  const int64_t dim = checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_per_channel(x, scale, zero_point, dim, quant_min, quant_max, compute_mask, nullptr, nullptr, 0.0);
}

std::tuple<Tensor, Tensor> bn_fold_fake_quant_weight_cuda(const Tensor& weight, const Tensor& gamma,
                                                          const Tensor& var, double eps, const Tensor& scale,
                                                          const Tensor& zero_point, int64_t quant_min,
                                                          int64_t quant_max, bool compute_mask) {
  checks::check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  const c10::cuda::CUDAGuard guard(weight.device());
  return run_per_channel(weight, scale, zero_point, 0, quant_min, quant_max, compute_mask, &gamma, &var, eps);
}

std::tuple<Tensor, Tensor> binarize_cuda(const Tensor& x, bool clipped_ste, bool compute_mask) {
  checks::check_float_input(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  // The identity STE needs no mask, so none is computed (as in the reference and the fake impl).
  return run_forward(make_forward(x, clipped_ste && compute_mask), BinarizeOp{});
}

}  // namespace
}  // namespace cuda
}  // namespace fakequant

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("fake_quant_per_tensor", &fakequant::cuda::fake_quant_per_tensor_cuda);
  m.impl("fake_quant_per_channel", &fakequant::cuda::fake_quant_per_channel_cuda);
  m.impl("bn_fold_fake_quant_weight", &fakequant::cuda::bn_fold_fake_quant_weight_cuda);
  m.impl("binarize", &fakequant::cuda::binarize_cuda);
}
