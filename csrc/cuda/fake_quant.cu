// CUDA kernels of the fake_quant family: the forward ops that return (out, mask), fake_quant_per_tensor,
// fake_quant_per_channel (which also runs bn_fold_fake_quant_weight) and binarize, and masked_grad (the
// straight-through estimator). One elementwise kernel template serves the forwards: it walks the storage of a
// dense input linearly (a grid-stride loop, 64-bit offsets, 16-byte vector loads when the pointers allow), and an
// "op" functor supplies the per-element math from fakequant_math.h.
// The host side (checks, allocation, layouts, registration) is ops/fake_quant.cpp.
#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"
#include "fakequant_math.h"

namespace fakequant {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Per-element ops. Each has prepare() (run once per thread, before the loop) and
// apply<N>(x[N], storage offset of x[0], out[N], in_range[N]).
// ---------------------------------------------------------------------------------------------

// scale and zero_point are read on the device by every thread (one cached line), never with .item().
// kRelu: fake-quantize relu(x), with ReLU's gradient (x > 0) in the mask.
template <bool kRelu>
struct PerTensorOp {
  const float* scale;
  Vector1d zero_point;
  float quant_min;
  float quant_max;
  QuantParams params;

  __device__ __forceinline__ void prepare() {
    params = make_quant_params(*scale, load(zero_point, 0), quant_min, quant_max);
  }

  template <int N>
  __device__ __forceinline__ void apply(const float (&x)[N], int64_t, float (&out)[N], bool (&in)[N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if constexpr (kRelu) {
        out[j] = fake_quant_value(relu_value(x[j]), params, in[j]);
        in[j] = in[j] && x[j] > 0.0f;
      } else {
        out[j] = fake_quant_value(x[j], params, in[j]);
      }
    }
  }
};

struct PerChannelOp {
  const ChannelParams* params;
  AxisLayout layout;
  // True when no aligned vector straddles two channels (inner % vector length == 0, or one channel):
  // then the channel is computed once per vector instead of once per element.
  bool channel_per_vector;

  __device__ __forceinline__ void prepare() {}

  template <int N>
  __device__ __forceinline__ void apply(const float (&x)[N], int64_t offset, float (&out)[N], bool (&in)[N]) const {
    if (N == 1 || channel_per_vector) {
      const ChannelParams p = params[channel_of(offset, layout)];
#pragma unroll
      for (int j = 0; j < N; ++j) out[j] = channel_value(x[j], p, in[j]);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const ChannelParams p = params[channel_of(offset + j, layout)];
        out[j] = channel_value(x[j], p, in[j]);
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

// ---------------------------------------------------------------------------------------------
// The kernels.
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
    if (mask != nullptr) MaskWord<kVec>::store(mask, v, in_range);
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

// The tiny per-channel prep: reads scale, zero point (and gamma, var) on the device, in any of their
// allowed dtypes and strides, so that the elementwise pass reads one fp32 record per channel.
__global__ void __launch_bounds__(kThreads)
    channel_params_kernel(ChannelParams* __restrict__ params, int64_t channels, Vector1d scale, Vector1d zero_point,
                          float quant_min, float quant_max, bool fold_bn, Vector1d gamma, Vector1d var, float eps,
                          bool divide) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const float fold = fold_bn ? bn_fold_factor(load(gamma, c), load(var, c), eps) : 1.0f;
  params[c] = channel_params(c, scale, zero_point, quant_min, quant_max, fold, divide);
}

template <typename scalar_t>
constexpr int vector_length() {
  return kVectorBytes / sizeof(scalar_t);
}

template <typename Op>
cudaError_t launch_elementwise(const ElementwiseArgs& args, Op op) {
  if (args.numel == 0) return cudaSuccess;
  dispatch_float_type(args.type, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int kVec = vector_length<scalar_t>();
    const auto* x = static_cast<const scalar_t*>(args.x);
    auto* out = static_cast<scalar_t*>(args.out);
    const bool vectorizable = is_aligned(x, kVectorBytes) && is_aligned(out, kVectorBytes) &&
                              (args.mask == nullptr || is_aligned(args.mask, kVec));
    if (vectorizable) {
      elementwise_kernel<scalar_t, kVec, Op>
          <<<grid_size((args.numel + kVec - 1) / kVec, args.max_blocks), kThreads, 0, args.stream>>>(
              x, out, args.mask, args.numel, op);
    } else {
      elementwise_kernel<scalar_t, 1, Op>
          <<<grid_size(args.numel, args.max_blocks), kThreads, 0, args.stream>>>(x, out, args.mask, args.numel, op);
    }
  });
  return cudaGetLastError();
}

int vector_length(FloatType type) {
  return type == FloatType::kFloat ? vector_length<float>() : vector_length<c10::Half>();
}

// masked_grad: grad where mask, +0 elsewhere, in grad's dtype (no conversion to fp32 needed).
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
    bool m[kVec];
    MaskWord<kVec>::load(mask, v, m);
    Pack<scalar_t, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) result.values[j] = m[j] ? g.values[j] : zero;
    reinterpret_cast<Pack<scalar_t, kVec>*>(out)[v] = result;
  }
  for (int64_t i = vectors * kVec + first; i < numel; i += step) out[i] = mask[i] ? grad[i] : zero;
}

}  // namespace

cudaError_t launch_fake_quant_per_tensor(const ElementwiseArgs& args, const float* scale, Vector1d zero_point,
                                         float quant_min, float quant_max, bool relu) {
  if (relu) return launch_elementwise(args, PerTensorOp<true>{scale, zero_point, quant_min, quant_max, QuantParams{}});
  return launch_elementwise(args, PerTensorOp<false>{scale, zero_point, quant_min, quant_max, QuantParams{}});
}

cudaError_t launch_channel_params(ChannelParams* params, int64_t channels, Vector1d scale, Vector1d zero_point,
                                  float quant_min, float quant_max, const Vector1d* gamma, const Vector1d* var,
                                  float eps, bool divide_by_fold, cudaStream_t stream) {
  if (channels == 0) return cudaSuccess;
  const bool fold_bn = gamma != nullptr;
  const Vector1d none{nullptr, 0, Vector1d::Type::kFloat};
  const auto blocks = static_cast<unsigned int>((channels + kThreads - 1) / kThreads);
  channel_params_kernel<<<blocks, kThreads, 0, stream>>>(params, channels, scale, zero_point, quant_min, quant_max,
                                                         fold_bn, fold_bn ? *gamma : none, fold_bn ? *var : none, eps,
                                                         fold_bn && divide_by_fold);
  return cudaGetLastError();
}

cudaError_t launch_fake_quant_per_channel(const ElementwiseArgs& args, const ChannelParams* params,
                                          AxisLayout layout) {
  const bool channel_per_vector = layout.channels == 1 || layout.inner % vector_length(args.type) == 0;
  return launch_elementwise(args, PerChannelOp{params, layout, channel_per_vector});
}

cudaError_t launch_binarize(const ElementwiseArgs& args) {
  return launch_elementwise(args, BinarizeOp{});
}

cudaError_t launch_masked_grad(FloatType type, const void* grad, const bool* mask, void* out, int64_t numel,
                               int max_blocks, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  dispatch_float_type(type, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int kVec = kVectorBytes / sizeof(scalar_t);
    const auto* g = static_cast<const scalar_t*>(grad);
    auto* o = static_cast<scalar_t*>(out);
    if (is_aligned(g, kVectorBytes) && is_aligned(o, kVectorBytes) && is_aligned(mask, kVec)) {
      masked_grad_kernel<scalar_t, kVec>
          <<<grid_size((numel + kVec - 1) / kVec, max_blocks), kThreads, 0, stream>>>(g, mask, o, numel);
    } else {
      masked_grad_kernel<scalar_t, 1><<<grid_size(numel, max_blocks), kThreads, 0, stream>>>(g, mask, o, numel);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fakequant
