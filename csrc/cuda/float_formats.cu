// CUDA kernels of the float_formats family: fake_quant_fp8, fake_quant_mx and fake_quant_nvfp4 (the math in
// float_formats.h, shared with the CPU kernels). Each block of block_size consecutive elements gets its scale from
// its absolute maximum (or, FP8 with scales given, from the caller), then every element is quantized. Three ways
// to get there, chosen by choose_path:
//   grouped: a power-of-two group of at most 32 lanes holds a block in registers (MX's 32, NVFP4's 16; one
//            16-byte vector per lane when aligned), reduces its amax with shuffles, writes: one read, one write;
//   block:   one thread block per block (grid-stride), the amax reduced across the block, then the values read
//            again from cache;
//   split:   few or large blocks (the whole tensor for a per-tensor FP8 scale): an amax kernel over many thread
//            blocks per block (atomicMax on the magnitude bits: exact in any order), then an elementwise kernel.
// The host side (checks, layouts, scratch, registration) is ops/float_formats.cpp.
#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"
#include "float_formats.h"

namespace fakequant {
namespace cuda {
namespace {

// Blocks up to this many elements take one thread block each (the second read hits L1/L2); larger ones split.
constexpr int64_t kMaxBlockPerThreadBlock = int64_t{1} << 14;

enum class Path { kGiven, kGrouped, kBlock, kSplit };

template <typename scalar_t>
constexpr int vector_length() {
  return kVectorBytes / sizeof(scalar_t);
}

int vector_length(FloatType type) {
  return type == FloatType::kFloat ? vector_length<float>() : vector_length<c10::Half>();
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Lanes per block of the grouped kernel with kPer elements per lane, or 0 when it cannot hold one.
int64_t group_lanes(int64_t block_size, int per_lane) {
  if (block_size % per_lane != 0) return 0;
  const int64_t lanes = block_size / per_lane;
  return is_power_of_two(lanes) && lanes <= 32 ? lanes : 0;
}

// Independent of the pointers' alignment, so that float_format_scratch and the launch agree.
Path choose_path(int64_t numel, int64_t block_size, FloatScaleKind kind, FloatType type, int max_blocks) {
  if (kind == FloatScaleKind::kGiven) return Path::kGiven;
  if (group_lanes(block_size, vector_length(type)) > 0 || group_lanes(block_size, 1) > 0) return Path::kGrouped;
  const int64_t blocks = numel / block_size;
  const int64_t multiprocessors = max_blocks / kBlocksPerSm;
  if (block_size <= kMaxBlockPerThreadBlock && blocks >= multiprocessors) return Path::kBlock;
  return Path::kSplit;
}

// ---------------------------------------------------------------------------------------------
// kPer consecutive elements as fp32, loaded and stored as one access (kPer * sizeof(scalar_t) bytes, aligned).
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int kPer>
__device__ __forceinline__ void load_values(const scalar_t* x, int64_t chunk, float (&v)[kPer]) {
  const Pack<scalar_t, kPer> loaded = reinterpret_cast<const Pack<scalar_t, kPer>*>(x)[chunk];
#pragma unroll
  for (int j = 0; j < kPer; ++j) v[j] = static_cast<float>(loaded.values[j]);
}

// Quantizes kPer values with one BlockScale and stores them (and their mask flags) at chunk `chunk`.
template <typename scalar_t, int kPer>
__device__ __forceinline__ void quantize_store(const float (&v)[kPer], const BlockScale& p, const FloatQuantSpec& spec,
                                               bool by_division, scalar_t* out, bool* mask, int64_t chunk) {
  Pack<scalar_t, kPer> stored;
  bool in_range[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const float r = by_division ? float_format_value<true>(v[j], p, spec.element, in_range[j])
                           : float_format_value<false>(v[j], p, spec.element, in_range[j]);
    stored.values[j] = static_cast<scalar_t>(r);
  }
  reinterpret_cast<Pack<scalar_t, kPer>*>(out)[chunk] = stored;
  if (mask != nullptr) MaskWord<kPer>::store(mask, chunk, in_range);
}

template <int kPer>
__device__ __forceinline__ uint32_t values_amax(const float (&v)[kPer]) {
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) m = max(m, magnitude_bits(v[j]));
  return m;
}

// The max of `value` over the thread block (blockDim.x a multiple of 32), returned to every thread. `shared`
// holds kThreads / 32 entries; the last barrier lets the caller reuse it.
__device__ __forceinline__ uint32_t block_max(uint32_t value, uint32_t* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = value;
  __syncthreads();
  value = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) value = max(value, shared[w]);
  __syncthreads();
  return value;
}

// ---------------------------------------------------------------------------------------------
// The kernels. A chunk is kPer consecutive elements; chunks never straddle two blocks.
// ---------------------------------------------------------------------------------------------

// `lanes` consecutive lanes (a power of two <= 32, so groups never straddle a warp) hold one block of
// lanes * kPer elements. Every lane of a warp takes the same trips through the loop, so the shuffles see
// all 32 lanes; lanes past the end hold amax 0 and store nothing.
template <typename scalar_t, int kPer>
__global__ void __launch_bounds__(kThreads)
    grouped_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, bool* __restrict__ mask,
                   int64_t chunks, int lanes, FloatQuantSpec spec) {
  const bool by_division = divides(spec.kind);
  const int lane = threadIdx.x % 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t - lane < chunks; t += step) {
    const bool valid = t < chunks;
    float v[kPer];
    uint32_t m = 0;
    if (valid) {
      load_values<scalar_t, kPer>(x, t, v);
      m = values_amax<kPer>(v);
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (valid) {
      quantize_store<scalar_t, kPer>(v, block_scale_from_amax(bits_float(m), spec), spec, by_division, out, mask, t);
    }
  }
}

// One thread block per block of chunks_per_block chunks (grid-stride over the blocks).
template <typename scalar_t, int kPer>
__global__ void __launch_bounds__(kThreads)
    block_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, bool* __restrict__ mask,
                 int64_t blocks, int64_t chunks_per_block, FloatQuantSpec spec) {
  __shared__ uint32_t shared[kThreads / 32];
  const bool by_division = divides(spec.kind);
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t first = b * chunks_per_block;
    uint32_t m = 0;
    for (int64_t c = threadIdx.x; c < chunks_per_block; c += blockDim.x) {
      float v[kPer];
      load_values<scalar_t, kPer>(x, first + c, v);
      m = max(m, values_amax<kPer>(v));
    }
    const BlockScale p = block_scale_from_amax(bits_float(block_max(m, shared)), spec);
    for (int64_t c = threadIdx.x; c < chunks_per_block; c += blockDim.x) {
      float v[kPer];
      load_values<scalar_t, kPer>(x, first + c, v);
      quantize_store<scalar_t, kPer>(v, p, spec, by_division, out, mask, first + c);
    }
  }
}

// The split path's amax: work item i reduces split i % splits of block i / splits (per_split chunks) and
// merges it into amax[block] (zeroed by the launcher).
template <typename scalar_t, int kPer>
__global__ void __launch_bounds__(kThreads)
    amax_kernel(const scalar_t* __restrict__ x, int64_t blocks, int64_t chunks_per_block, int64_t splits,
                int64_t per_split, uint32_t* __restrict__ amax) {
  __shared__ uint32_t shared[kThreads / 32];
  const int64_t items = blocks * splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = divide(item, splits);
    const int64_t begin = (item - b * splits) * per_split;
    const int64_t end = begin + per_split < chunks_per_block ? begin + per_split : chunks_per_block;
    uint32_t m = 0;
    for (int64_t c = begin + threadIdx.x; c < end; c += blockDim.x) {
      float v[kPer];
      load_values<scalar_t, kPer>(x, b * chunks_per_block + c, v);
      m = max(m, values_amax<kPer>(v));
    }
    m = block_max(m, shared);
    if (threadIdx.x == 0 && m != 0) atomicMax(amax + b, m);
  }
}

// Elementwise, each chunk's BlockScale from its block's given scale (kGiven) or reduced amax.
template <typename scalar_t, int kPer, bool kGiven>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, bool* __restrict__ mask, int64_t chunks,
                 int64_t chunks_per_block, FloatQuantSpec spec, const float* __restrict__ scales,
                 const uint32_t* __restrict__ amax) {
  const bool by_division = divides(spec.kind);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < chunks; t += step) {
    const int64_t b = divide(t, chunks_per_block);
    BlockScale p;
    if constexpr (kGiven) {
      p = BlockScale{scales[b], scales[b]};
    } else {
      p = block_scale_from_amax(bits_float(amax[b]), spec);
    }
    float v[kPer];
    load_values<scalar_t, kPer>(x, t, v);
    quantize_store<scalar_t, kPer>(v, p, spec, by_division, out, mask, t);
  }
}

template <typename scalar_t, int kPer>
void launch_typed(const FloatFormatArgs& args, Path path, int64_t lanes) {
  const auto* x = static_cast<const scalar_t*>(args.x);
  auto* out = static_cast<scalar_t*>(args.out);
  const int64_t chunks = args.numel / kPer;
  const int64_t chunks_per_block = args.block_size / kPer;
  const int64_t blocks = args.numel / args.block_size;
  switch (path) {
    case Path::kGiven:
      apply_kernel<scalar_t, kPer, true><<<grid_size(chunks, args.max_blocks), kThreads, 0, args.stream>>>(
          x, out, args.mask, chunks, chunks_per_block, args.spec, args.scales, nullptr);
      break;
    case Path::kGrouped:
      grouped_kernel<scalar_t, kPer><<<grid_size(chunks, args.max_blocks), kThreads, 0, args.stream>>>(
          x, out, args.mask, chunks, static_cast<int>(lanes), args.spec);
      break;
    case Path::kBlock: {
      // Small blocks get fewer threads (a multiple of the warp), so that fewer of them idle.
      const int64_t warps = (chunks_per_block + 31) / 32;
      const int threads = static_cast<int>(warps * 32 < kThreads ? warps * 32 : kThreads);
      const auto grid = static_cast<unsigned int>(blocks < args.max_blocks ? blocks : args.max_blocks);
      block_kernel<scalar_t, kPer><<<grid, threads, 0, args.stream>>>(x, out, args.mask, blocks, chunks_per_block,
                                                                       args.spec);
      break;
    }
    case Path::kSplit: {
      // About max_blocks work items in all, each at least one chunk per thread.
      int64_t splits = (args.max_blocks + blocks - 1) / blocks;
      const int64_t most = (chunks_per_block + kThreads - 1) / kThreads;
      splits = splits < most ? splits : most;
      splits = splits < 1 ? 1 : splits;
      const int64_t per_split = (chunks_per_block + splits - 1) / splits;
      const int64_t items = blocks * splits;
      if (cudaMemsetAsync(args.amax, 0, static_cast<size_t>(blocks) * sizeof(uint32_t), args.stream) != cudaSuccess) {
        return;
      }
      const auto grid = static_cast<unsigned int>(items < args.max_blocks ? items : args.max_blocks);
      amax_kernel<scalar_t, kPer><<<grid, kThreads, 0, args.stream>>>(x, blocks, chunks_per_block, splits, per_split,
                                                                      args.amax);
      apply_kernel<scalar_t, kPer, false><<<grid_size(chunks, args.max_blocks), kThreads, 0, args.stream>>>(
          x, out, args.mask, chunks, chunks_per_block, args.spec, nullptr, args.amax);
      break;
    }
  }
}

}  // namespace

int64_t float_format_scratch(int64_t numel, int64_t block_size, FloatScaleKind kind, FloatType type, int max_blocks) {
  if (numel == 0) return 0;
  return choose_path(numel, block_size, kind, type, max_blocks) == Path::kSplit ? numel / block_size : 0;
}

cudaError_t launch_fake_quant_float(const FloatFormatArgs& args) {
  if (args.numel == 0) return cudaSuccess;
  Path path = choose_path(args.numel, args.block_size, args.spec.kind, args.type, args.max_blocks);
  dispatch_float_type(args.type, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int kVec = vector_length<scalar_t>();
    const bool aligned = is_aligned(args.x, kVectorBytes) && is_aligned(args.out, kVectorBytes) &&
                         (args.mask == nullptr || is_aligned(args.mask, kVec));
    const bool vectors = aligned && args.block_size % kVec == 0;
    if (path == Path::kGrouped) {
      const int64_t lanes = vectors ? group_lanes(args.block_size, kVec) : 0;
      if (lanes > 0) {
        launch_typed<scalar_t, kVec>(args, path, lanes);
        return;
      }
      // Unaligned, or a block that only fits one element per lane; else one thread block per block.
      const int64_t scalar_lanes = group_lanes(args.block_size, 1);
      if (scalar_lanes > 0) {
        launch_typed<scalar_t, 1>(args, path, scalar_lanes);
        return;
      }
      path = Path::kBlock;
    }
    if (vectors) {
      launch_typed<scalar_t, kVec>(args, path, 0);
    } else {
      launch_typed<scalar_t, 1>(args, path, 0);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fakequant
