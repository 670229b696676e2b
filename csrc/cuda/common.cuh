// Launch configuration, vector types, layout helpers and small typed loads shared by the CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

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

// N elements loaded or stored as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

inline int multiprocessor_count() {
  const int device = c10::cuda::current_device();
  // Looked up once per device: the attribute query is cheap but not free, and the count never changes.
  static int counts[64] = {0};
  if (device < 64 && counts[device] > 0) return counts[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) counts[device] = count;
  return count;
}

// Blocks for a grid-stride loop over `work_items` items of one thread each.
inline unsigned int grid_size(int64_t work_items) {
  const int64_t wanted = std::max<int64_t>(1, (work_items + kThreads - 1) / kThreads);
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * kBlocksPerSm;
  return static_cast<unsigned int>(std::min(wanted, cap));
}

inline bool is_aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// `x` itself when it is dense and non-overlapping (processed linearly over its storage), else one copy
// into at::empty_like(x), whose layout is the one every output of the op gets.
inline at::Tensor dense_input(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : at::empty_like(x).copy_(x);
}

// `t` laid out as the dense `like`, so that both are read with the same linear offsets: `t` itself
// when its strides already match, else one copy.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  TORCH_INTERNAL_ASSERT(t.sizes() == like.sizes());
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

// Elements between consecutive indices along `axis` in the dense `t`, and the number of those indices:
// the element at storage offset k has index (k / inner) % channels along `axis`. A size-1 axis is
// reported as one channel with inner = 1, since its stride may be anything (even 0).
struct AxisLayout {
  int64_t inner;
  int64_t channels;
};

inline AxisLayout axis_layout(const at::Tensor& t, int64_t axis) {
  const int64_t size = t.size(axis);
  if (size <= 1) return AxisLayout{1, 1};
  if (t.numel() == 0) return AxisLayout{1, size};  // no element to place; the strides may be degenerate
  TORCH_INTERNAL_ASSERT(t.stride(axis) >= 1);
  return AxisLayout{t.stride(axis), size};
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

// A small strided 1-D tensor of any of the dtypes the ops accept for their per-channel parameters,
// read (or written) one element at a time on the device. One kernel instantiation serves every dtype,
// which keeps the build small; these tensors hold one value per channel, so the switch costs nothing
// measurable next to the elementwise pass.
struct Vector1d {
  enum class Type : int8_t { kFloat, kHalf, kBFloat16, kInt, kLong };
  void* data;
  int64_t stride;
  Type type;

  __device__ __forceinline__ float load(int64_t i) const {
    const int64_t k = i * stride;
    switch (type) {
      case Type::kFloat: return static_cast<const float*>(data)[k];
      case Type::kHalf: return static_cast<float>(static_cast<const c10::Half*>(data)[k]);
      case Type::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(data)[k]);
      // Zero points lie within [-2^24, 2^24] (the quant range), where the conversion is exact.
      case Type::kInt: return static_cast<float>(static_cast<const int32_t*>(data)[k]);
      case Type::kLong: return static_cast<float>(static_cast<const int64_t*>(data)[k]);
    }
    return 0.0f;
  }

  // Rounds to nearest even, as Tensor.to(dtype) does.
  __device__ __forceinline__ void store(int64_t i, float value) const {
    const int64_t k = i * stride;
    switch (type) {
      case Type::kFloat: static_cast<float*>(data)[k] = value; break;
      case Type::kHalf: static_cast<c10::Half*>(data)[k] = c10::Half(value); break;
      case Type::kBFloat16: static_cast<c10::BFloat16*>(data)[k] = c10::BFloat16(value); break;
      default: break;  // integer outputs do not occur (asserted on the host)
    }
  }
};

inline Vector1d vector1d(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() <= 1 || t.numel() == 1);
  Vector1d::Type type;
  switch (t.scalar_type()) {
    case at::kFloat: type = Vector1d::Type::kFloat; break;
    case at::kHalf: type = Vector1d::Type::kHalf; break;
    case at::kBFloat16: type = Vector1d::Type::kBFloat16; break;
    case at::kInt: type = Vector1d::Type::kInt; break;
    case at::kLong: type = Vector1d::Type::kLong; break;
    default: TORCH_INTERNAL_ASSERT(false, "fakequant: unexpected dtype ", t.scalar_type());
  }
  // A one-element tensor of any shape (a per-tensor parameter) is read at its data pointer.
  return Vector1d{t.data_ptr(), t.dim() == 1 ? t.stride(0) : 0, type};
}

// Calls f(T{}) with T the C++ type of a float32/float16/bfloat16 tensor (the checks ran before).
template <typename F>
void dispatch_float_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "fakequant: unexpected dtype ", dtype);
  }
}

}  // namespace cuda
}  // namespace fakequant
