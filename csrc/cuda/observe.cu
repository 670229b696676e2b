// CUDA kernels of observe_range: per-channel min/max partials of the finite elements of a dense tensor, then
// one thread per output entry that combines them, applies the BN fold factor, the ReLU, the moving average and
// choose_qparams (fakequant_math.h, the functions the CPU op runs). Host side: ops/observe.cpp.
#include <cmath>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"
#include "fakequant_math.h"

namespace fakequant {
namespace cuda {
namespace {

// lo / hi are never NaN here (the partials skip non-finite elements), so plain comparisons combine them.
__device__ __forceinline__ void block_minmax(float& lo, float& hi, float* shared_lo, float* shared_hi) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    lo = finite_min(lo, __shfl_down_sync(0xffffffffu, lo, offset));
    hi = finite_max(hi, __shfl_down_sync(0xffffffffu, hi, offset));
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    shared_lo[warp] = lo;
    shared_hi[warp] = hi;
  }
  __syncthreads();
  lo = threadIdx.x < blockDim.x / 32 ? shared_lo[lane] : INFINITY;
  hi = threadIdx.x < blockDim.x / 32 ? shared_hi[lane] : -INFINITY;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      lo = finite_min(lo, __shfl_down_sync(0xffffffffu, lo, offset));
      hi = finite_max(hi, __shfl_down_sync(0xffffffffu, hi, offset));
    }
  }
  __syncthreads();  // the shared arrays are reused by the block's next work item
}

// Block b reduces split b % splits of channel b / splits over its finite elements; its min goes to partial[b],
// its max to partial[channels * splits + b] ((+inf, -inf) when it has none).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    minmax_partial_kernel(const scalar_t* __restrict__ x, AxisLayout layout, int64_t per_channel, int64_t splits,
                          float* __restrict__ partial) {
  __shared__ float shared_lo[kThreads / 32], shared_hi[kThreads / 32];
  const int64_t items = layout.channels * splits;
  const int64_t chunk = (per_channel + splits - 1) / splits;
  for (int64_t b = blockIdx.x; b < items; b += gridDim.x) {
    const int64_t c = b / splits;
    const int64_t begin = (b - c * splits) * chunk;
    const int64_t end = begin + chunk < per_channel ? begin + chunk : per_channel;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
      const int64_t o = divide(k, layout.inner);
      const float v = static_cast<float>(x[(o * layout.channels + c) * layout.inner + (k - o * layout.inner)]);
      if (fabsf(v) < INFINITY) {  // NaN and +-inf are left out of the range
        lo = finite_min(lo, v);
        hi = finite_max(hi, v);
      }
    }
    block_minmax(lo, hi, shared_lo, shared_hi);
    if (threadIdx.x == 0) {
      partial[b] = lo;
      partial[items + b] = hi;
    }
  }
}

__device__ __forceinline__ void store_zero_point(const Vector1d& v, int64_t i, float value) {
  // A NaN range gives a NaN zero point: INT32_MIN, as the reference's float-to-int32 conversion on x86.
  const int32_t z = value != value ? INT32_MIN : static_cast<int32_t>(value);
  if (v.type == Vector1d::Type::kInt) {
    static_cast<int32_t*>(v.data)[i * v.stride] = z;
  } else {
    static_cast<int64_t*>(v.data)[i * v.stride] = z;
  }
}

__global__ void __launch_bounds__(kThreads) observe_finalize_kernel(ObserveArgs args, int64_t entries) {
  const int64_t channels = args.layout.channels;
  const int64_t items = channels * args.splits;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < entries;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // One entry per channel, or (a per-tensor range of a folded weight) one entry over every channel.
    const int64_t first = entries == channels ? i : 0;
    const int64_t last = entries == channels ? i + 1 : channels;
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t c = first; c < last; ++c) {
      float channel_lo = INFINITY, channel_hi = -INFINITY;
      for (int64_t s = 0; s < args.splits; ++s) {
        channel_lo = finite_min(channel_lo, args.partial[c * args.splits + s]);
        channel_hi = finite_max(channel_hi, args.partial[items + c * args.splits + s]);
      }
      // A channel without a finite element keeps (+inf, -inf), whatever its fold factor (inf * 0 is NaN).
      if (args.fold != nullptr && channel_lo <= channel_hi) {
        // Rounding is monotonic: min(w) * f is min(w * f) for f >= 0; a negative f swaps the ends.
        const float f = args.fold[c];
        const float a = channel_lo * f, b = channel_hi * f;
        channel_lo = f < 0.0f ? b : a;
        channel_hi = f < 0.0f ? a : b;
      }
      lo = nan_min(lo, channel_lo);
      hi = nan_max(hi, channel_hi);
    }
    // lo > hi, or a NaN end (a NaN fold factor): no range, and the tracked range (so the scale) stays.
    const bool has_range = lo <= hi;
    if (args.relu && has_range) {
      // ReLU is monotonic, so relu(x)'s range is the relu of x's ends; after the fold, since the ReLU
      // takes x * fold. The batch range only: the moving average moves the tracked range towards it.
      lo = relu_value(lo);
      hi = relu_value(hi);
    }
    if (!has_range) {
      lo = load(args.tracked_min, i);
      hi = load(args.tracked_max, i);
    } else if (!args.replace) {
      lo = moving_average(load(args.tracked_min, i), lo, args.averaging_constant);
      hi = moving_average(load(args.tracked_max, i), hi, args.averaging_constant);
    }
    store(args.tracked_min, i, lo);
    store(args.tracked_max, i, hi);
    float scale, zero_point;
    choose_qparams(lo, hi, args.quant_min, args.quant_max, args.symmetric, scale, zero_point);
    store(args.scale, i, scale);
    store_zero_point(args.zero_point, i, zero_point);
  }
}

}  // namespace

cudaError_t launch_observe_range(const ObserveArgs& args, int64_t entries) {
  const int64_t items = args.layout.channels * args.splits;
  const auto blocks = static_cast<unsigned int>(items < 65535 ? items : 65535);
  const int64_t per_channel = args.numel / args.layout.channels;
  dispatch_float_type(args.type, [&](auto tag) {
    using scalar_t = decltype(tag);
    minmax_partial_kernel<scalar_t><<<blocks, kThreads, 0, args.stream>>>(
        static_cast<const scalar_t*>(args.x), args.layout, per_channel, args.splits, args.partial);
  });
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  observe_finalize_kernel<<<grid_size(entries, 65535), kThreads, 0, args.stream>>>(args, entries);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fakequant
