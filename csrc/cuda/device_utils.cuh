// Device-side helpers of the CUDA kernels: vector types, mask words, 64-bit index arithmetic and the
// typed loads of small parameter vectors. Included by .cu files only (no ATen: see kernels.cuh).
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cuda/kernels.cuh"

namespace fakequant {
namespace cuda {

// N elements loaded or stored as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

// The mask of N consecutive elements (N = 1, 4 or 8 bools) as one 1-, 4- or 8-byte access; the caller
// guarantees the alignment. Built from shifts because the compiler splits a store of a bool[8] struct
// into two 4-byte vector stores.
template <int N>
struct MaskWord {
  static_assert(N == 1 || N == 4 || N == 8, "mask words hold 1, 4 or 8 flags");
  using type = std::conditional_t<N == 8, uint64_t, std::conditional_t<N == 4, uint32_t, uint8_t>>;

  __device__ __forceinline__ static void store(bool* mask, int64_t index, const bool (&flags)[N]) {
    type word = 0;
#pragma unroll
    for (int j = 0; j < N; ++j) word |= static_cast<type>(flags[j]) << (8 * j);
    reinterpret_cast<type*>(mask)[index] = word;
  }

  __device__ __forceinline__ static void load(const bool* mask, int64_t index, bool (&flags)[N]) {
    const type word = reinterpret_cast<const type*>(mask)[index];
#pragma unroll
    for (int j = 0; j < N; ++j) flags[j] = ((word >> (8 * j)) & 0xff) != 0;
  }
};

// Blocks for a grid-stride loop over `work_items` items of one thread each.
inline unsigned int grid_size(int64_t work_items, int max_blocks) {
  int64_t blocks = (work_items + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > max_blocks) blocks = max_blocks;
  return static_cast<unsigned int>(blocks);
}

inline bool is_aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// a / b for non-negative a, b > 0, in 32 bits when both fit (a 64-bit division is several times slower).
__device__ __forceinline__ int64_t divide(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

__device__ __forceinline__ int64_t channel_of(int64_t offset, AxisLayout layout) {
  const int64_t outer = divide(offset, layout.inner);
  return outer - divide(outer, layout.channels) * layout.channels;
}

__device__ __forceinline__ float load(const Vector1d& v, int64_t i) {
  const int64_t k = i * v.stride;
  switch (v.type) {
    case Vector1d::Type::kFloat: return static_cast<const float*>(v.data)[k];
    case Vector1d::Type::kHalf: return static_cast<float>(static_cast<const c10::Half*>(v.data)[k]);
    case Vector1d::Type::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(v.data)[k]);
    // Zero points lie within [-2^24, 2^24] (the quant range), where the conversion is exact.
    case Vector1d::Type::kInt: return static_cast<float>(static_cast<const int32_t*>(v.data)[k]);
    case Vector1d::Type::kLong: return static_cast<float>(static_cast<const int64_t*>(v.data)[k]);
  }
  return 0.0f;
}

// Rounds to nearest even, as Tensor.to(dtype) does. Integer outputs do not occur (the host asserts it).
__device__ __forceinline__ void store(const Vector1d& v, int64_t i, float value) {
  const int64_t k = i * v.stride;
  switch (v.type) {
    case Vector1d::Type::kFloat: static_cast<float*>(v.data)[k] = value; break;
    case Vector1d::Type::kHalf: static_cast<c10::Half*>(v.data)[k] = c10::Half(value); break;
    case Vector1d::Type::kBFloat16: static_cast<c10::BFloat16*>(v.data)[k] = c10::BFloat16(value); break;
    default: break;
  }
}

// Channel c's parameters of a per-channel fake quantization with fold factor `fold` (1 unless BN-folded): the
// forward's channel_params_kernel builds every channel's, the BN-fold backward, which recomputes the forward,
// the one of the channel it reduces.
__device__ __forceinline__ ChannelParams channel_params(int64_t c, const Vector1d& scale, const Vector1d& zero_point,
                                                        float quant_min, float quant_max, float fold, bool divide) {
  ChannelParams p;
  p.quant = make_quant_params(load(scale, c), load(zero_point, c), quant_min, quant_max);
  // q(x f) / f has no value where f == 0 (gamma == 0): such a channel is quantized unfolded (f = 1).
  p.fold = divide ? bn_fold_training_factor(fold) : fold;
  p.divide = divide;
  return p;
}

// One element of a per-channel fake quantization (plain, BN-folded, or BN-folded and divided back).
__device__ __forceinline__ float channel_value(float x, const ChannelParams& p, bool& in_range) {
  return p.divide ? bn_fold_divided_value(x, p.fold, p.quant, in_range)
                  : fake_quant_value(x * p.fold, p.quant, in_range);
}

// The sum of `value` over the block's threads (blockDim.x a multiple of 32, at most 1024; `shared` holds
// blockDim.x / 32 floats), returned to thread 0. Deterministic: a fixed shuffle tree within each warp, then
// across the warps; no atomics.
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

// Calls f(T{}) with T the C++ type of `type`.
template <typename F>
void dispatch_float_type(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat: f(float{}); break;
    case FloatType::kHalf: f(c10::Half{}); break;
    case FloatType::kBFloat16: f(c10::BFloat16{}); break;
  }
}

}  // namespace cuda
}  // namespace fakequant
