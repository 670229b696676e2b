// Host helpers shared by the op families of csrc/ops/: dense layouts, and the preparation of kernel arguments
// on the CPU (fp32 parameters, value checks) and on CUDA (launch arguments). The CPU kernels see dense storage
// only, as do the CUDA kernels.
//
// Layouts: a dense non-overlapping tensor (contiguous, channels_last, any permutation) is processed linearly over
// its storage and its outputs come from at::empty_like, which keeps its strides (as the fake impls do). Any other
// tensor is first copied once into at::empty_like(x) (dense, strides inferred from x) and then takes the same path.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/params.h"
#include "fakequant_math.h"

#ifdef FAKEQUANT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>

#include "cuda/kernels.cuh"
#endif

namespace fakequant {

// x itself when it is dense and non-overlapping, else a dense copy laid out as at::empty_like(x).
inline at::Tensor dense(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  return at::empty_like(x).copy_(x);
}

// `t` laid out as the dense `like`, so that both are read with the same storage offsets: `t` itself when its
// strides already match, else one copy.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  TORCH_INTERNAL_ASSERT(t.sizes() == like.sizes());
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

// ----------------------------------------------------------------------------------------------
// CPU: value checks that only a CPU kernel can afford, outputs, fp32 parameters.
// ----------------------------------------------------------------------------------------------

namespace cpu {

template <typename T>
T scalar_at(const at::Tensor& t, int64_t i) {
  const T* data = t.const_data_ptr<T>();
  return t.numel() == 1 ? data[0] : data[i * t.stride(0)];
}

inline int64_t zero_point_at(const at::Tensor& zero_point, int64_t i) {
  return zero_point.scalar_type() == at::kInt ? scalar_at<int32_t>(zero_point, i) : scalar_at<int64_t>(zero_point, i);
}

// The values of scale and zero point (after checks::check_qparams): free to check here, since these are CPU
// tensors. Read in place (no copies: this runs on every call, where a contiguous()/to() pair would cost most of a
// small call's time).
// Above this many parameters (per-group weights: one per group) the checks first run as one branch-free pass over
// contiguous values, which the compiler vectorizes, instead of the element-by-element reads below (a measurable
// part of a per-group call, as were ATen reductions in their place; docs/benchmarks.md has the numbers).
constexpr int64_t kLoopCheckLimit = 1024;

template <typename T>
bool all_within(const at::Tensor& t, T low, T high) {
  const at::Tensor c = t.contiguous();
  const T* p = c.const_data_ptr<T>();
  bool ok = true;
  for (int64_t i = 0, n = c.numel(); i < n; ++i) ok &= (p[i] >= low) & (p[i] <= high);  // NaN fails both
  return ok;
}

inline void check_qparam_values(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                         int64_t quant_max) {
  if (scale.numel() > kLoopCheckLimit || zero_point.numel() > kLoopCheckLimit) {
    const bool scales_ok = all_within<float>(scale, std::numeric_limits<float>::min(),
                                             std::numeric_limits<float>::max());
    const bool zero_points_ok = zero_point.is_floating_point() ||
                                (zero_point.scalar_type() == at::kInt
                                     ? all_within<int32_t>(zero_point, static_cast<int32_t>(quant_min),
                                                           static_cast<int32_t>(quant_max))
                                     : all_within<int64_t>(zero_point, quant_min, quant_max));
    if (scales_ok && zero_points_ok) return;  // else the loop below finds the first bad value for the message
  }
  const int64_t scale_count = scale.numel();
  for (int64_t i = 0; i < scale_count; ++i) {
    const float s = scalar_at<float>(scale, i);
    // A subnormal scale is positive but its fp32 reciprocal is inf, which would turn 0 into NaN.
    TORCH_CHECK_VALUE(std::isfinite(s) && s >= std::numeric_limits<float>::min(),
                      "fakequant: scale must be finite and >= 2^-126 (the smallest normal float32; 1 / scale overflows below it), got ", checks::python_float(s));
  }
  // A float (learned) zero point is clamped into the range by the learnable ops, not checked against it.
  const int64_t zp_count = zero_point.is_floating_point() ? 0 : zero_point.numel();
  for (int64_t i = 0; i < zp_count; ++i) {
    const int64_t z = zero_point_at(zero_point, i);
    TORCH_CHECK_VALUE(quant_min <= z && z <= quant_max, "fakequant: zero_point ", z,
                      " is outside [quant_min, quant_max] = [", quant_min, ", ", quant_max, "]");
  }
}

inline std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& xd, bool compute_mask) {
  at::Tensor out = at::empty_like(xd);
  at::Tensor mask = compute_mask ? at::empty_like(xd, xd.options().dtype(at::kBool))
                                 : at::empty({0}, xd.options().dtype(at::kBool));
  return {out, mask};
}

inline std::vector<float> to_float_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.const_data_ptr<float>(), c.const_data_ptr<float>() + c.numel());
}

// A run shorter than this (one vector block) is served from a pattern array instead (see ChannelParams).
constexpr int64_t kMinBroadcastRun = 32;
// Pattern arrays hold at least this many entries, so that each stretch spans several vector blocks
// (a design choice, not measured)...
constexpr int64_t kMinPeriod = 256;
// ...and at most this many: the 3-4 arrays of 2^14 fp32 (192-256 KiB) stay in L2 next to the data being
// streamed (not measured either; a longer pattern falls back to runs, element by element when runs are short).
constexpr int64_t kMaxPeriod = int64_t{1} << 14;

// Per-channel fp32 parameters of a dense tensor along `axis`, prepared once per call; in runs mode only when
// !allow_pattern (the BN-fold backward, whose per-channel sums need runs).
struct ChannelArrays {
  std::vector<float> scale, inv_scale, zero_point, fold;
  ChannelParams params;

  ChannelArrays(const at::Tensor& xd, int64_t axis, const at::Tensor& scale_t, const at::Tensor& zp_t,
                const std::vector<float>* fold_per_channel, int64_t quant_min, int64_t quant_max,
                bool allow_pattern = true) {
    const int64_t channels = xd.size(axis);
    // A size-1 axis may carry any stride: one channel covers the whole storage.
    const int64_t run = channels == 1 ? std::max<int64_t>(xd.numel(), 1) : xd.stride(axis);
    TORCH_INTERNAL_ASSERT(run >= 1);
    int64_t entries = channels;
    int64_t period = 0;
    if (allow_pattern && run < kMinBroadcastRun && run * channels <= kMaxPeriod) {
      const int64_t base = run * channels;
      period = base * ((kMinPeriod + base - 1) / base);
      entries = period;
    }
    if (period == 0 && fold_per_channel == nullptr && channels > kLoopCheckLimit) {
      // One entry per channel, many channels (per-group weights): the fp32 conversions and the reciprocal as
      // vectorized ATen ops (IEEE division, as make_quant_params's) instead of an element loop, which cost most
      // of a per-group call.
      scale = to_float_vector(scale_t);
      zero_point = to_float_vector(zp_t);
      inv_scale = to_float_vector(at::reciprocal(scale_t.to(at::kFloat)));
      set_params(run, channels, period, quant_min, quant_max, nullptr);
      return;
    }
    const std::vector<float> s = to_float_vector(scale_t);
    const std::vector<float> z = to_float_vector(zp_t);
    scale.resize(entries);
    inv_scale.resize(entries);
    zero_point.resize(entries);
    if (fold_per_channel != nullptr) fold.resize(entries);
    for (int64_t j = 0; j < entries; ++j) {
      const int64_t c = period > 0 ? (j / run) % channels : j;
      const QuantParams p = make_quant_params(s[c], z[c], static_cast<float>(quant_min),
                                              static_cast<float>(quant_max));
      scale[j] = p.scale;
      inv_scale[j] = p.inv_scale;
      zero_point[j] = p.zero_point;
      if (fold_per_channel != nullptr) fold[j] = (*fold_per_channel)[c];
    }
    set_params(run, channels, period, quant_min, quant_max, fold_per_channel);
  }

 private:
  void set_params(int64_t run, int64_t channels, int64_t period, int64_t quant_min, int64_t quant_max,
                  const std::vector<float>* fold_per_channel) {
    params.scale = scale.data();
    params.inv_scale = inv_scale.data();
    params.zero_point = zero_point.data();
    params.fold = fold_per_channel != nullptr ? fold.data() : nullptr;
    params.run = run;
    params.channels = channels;
    params.period = period;
    params.quant_min = static_cast<float>(quant_min);
    params.quant_max = static_cast<float>(quant_max);
  }
};

}  // namespace cpu

// ----------------------------------------------------------------------------------------------
// CUDA: launch arguments.
// ----------------------------------------------------------------------------------------------

#ifdef FAKEQUANT_WITH_CUDA
namespace cuda {

using at::Tensor;

inline int max_blocks() {
  const int device = c10::cuda::current_device();
  // Looked up once per device: the count never changes.
  static std::array<std::atomic<int>, 64> counts{};
  int count = device < 64 ? counts[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) counts[device].store(count, std::memory_order_relaxed);
  }
  return count * kBlocksPerSm;
}

inline FloatType float_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat;
    case at::kHalf: return FloatType::kHalf;
    case at::kBFloat16: return FloatType::kBFloat16;
    default: TORCH_INTERNAL_ASSERT(false, "fakequant: unexpected dtype ", t.scalar_type());
  }
}

inline Vector1d vector1d(const Tensor& t) {
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

// The index along `axis` of the element at storage offset k of the dense `t` is (k / inner) % channels.
// A size-1 axis is one channel with inner = 1, since its stride may be anything (even 0).
inline AxisLayout axis_layout(const Tensor& t, int64_t axis) {
  const int64_t size = t.size(axis);
  if (size <= 1) return AxisLayout{1, 1};
  if (t.numel() == 0) return AxisLayout{1, size};  // no element to place; the strides may be degenerate
  TORCH_INTERNAL_ASSERT(t.stride(axis) >= 1);
  return AxisLayout{t.stride(axis), size};
}

// The outputs of a forward op, laid out like at::empty_like(x) (as the fake impls are), and the dense
// input whose storage order they share.
struct Forward {
  Tensor input;
  Tensor out;
  Tensor mask;
};

inline Forward make_forward(const Tensor& x, bool compute_mask) {
  const auto bool_options = x.options().dtype(at::kBool);
  Forward f{dense(x), at::empty_like(x),
            compute_mask ? at::empty_like(x, bool_options) : at::empty({0}, bool_options)};
  TORCH_INTERNAL_ASSERT(f.out.strides() == f.input.strides());
  TORCH_INTERNAL_ASSERT(!compute_mask || f.mask.strides() == f.input.strides());
  return f;
}

inline ElementwiseArgs elementwise_args(const Forward& f) {
  return ElementwiseArgs{f.input.const_data_ptr(),
                         f.out.data_ptr(),
                         f.mask.numel() > 0 ? f.mask.data_ptr<bool>() : nullptr,
                         f.input.numel(),
                         float_type(f.input),
                         max_blocks(),
                         c10::cuda::getCurrentCUDAStream()};
}

// Per-channel fake quantization of `x` along `axis`, optionally of x * gamma / sqrt(var + eps) (BN folding),
// optionally divided by that factor again (divide_by_fold, BN folding only).
inline std::tuple<Tensor, Tensor> run_per_channel(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                           int64_t axis, int64_t quant_min, int64_t quant_max, bool compute_mask,
                                           const Tensor* gamma, const Tensor* var, double eps, bool divide_by_fold) {
  TORCH_INTERNAL_ASSERT(!divide_by_fold || gamma != nullptr);
  const Forward f = make_forward(x, compute_mask);
  if (x.numel() == 0) return {f.out, f.mask};
  const int64_t channels = x.size(axis);
  const Tensor params =
      at::empty({channels * static_cast<int64_t>(sizeof(ChannelParams))}, x.options().dtype(at::kByte));
  auto* params_data = reinterpret_cast<ChannelParams*>(params.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::optional<Vector1d> gamma_vector, var_vector;
  if (gamma != nullptr) {
    gamma_vector = vector1d(*gamma);
    var_vector = vector1d(*var);
  }
  C10_CUDA_CHECK(launch_channel_params(params_data, channels, vector1d(scale), vector1d(zero_point),
                                       static_cast<float>(quant_min), static_cast<float>(quant_max),
                                       gamma_vector ? &*gamma_vector : nullptr, var_vector ? &*var_vector : nullptr,
                                       static_cast<float>(eps), divide_by_fold, stream));
  C10_CUDA_CHECK(launch_fake_quant_per_channel(elementwise_args(f), params_data, axis_layout(f.input, axis)));
  return {f.out, f.mask};
}

}  // namespace cuda
#endif  // FAKEQUANT_WITH_CUDA

}  // namespace fakequant
