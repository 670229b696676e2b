// The observe family's host side: observe_range (cpu/observe_kernels.h, cuda/observe.cu): argument checks, the
// batch range, the tracked range's update and the chosen scale and zero point, and the CPU and CUDA registrations.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/observe_kernels.h"
#include "fakequant_math.h"
#include "ops/common.h"

#ifdef FAKEQUANT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.cuh"
#endif

namespace fakequant::cpu {
namespace {

// Writes `values` (fp32, contiguous, target.numel() entries) into `target` of any float or int dtype and
// layout; the common case (contiguous fp32 / int32 buffers) is a plain loop, no tensor ops.
void store_floats(const at::Tensor& target, const std::vector<float>& values) {
  if (target.is_contiguous() && target.scalar_type() == at::kFloat) {
    std::memcpy(target.mutable_data_ptr<float>(), values.data(), sizeof(float) * values.size());
    return;
  }
  const at::Tensor source = at::from_blob(const_cast<float*>(values.data()), target.sizes(), at::kFloat);
  target.copy_(source);
}

// Zero points arrive as fp32 integral values; NaN (a NaN tracked range) becomes INT32_MIN as the reference's
// float-to-int32 conversion gives on x86, and is rejected by the next fake quantization's checks.
void store_zero_points(const at::Tensor& target, const std::vector<float>& values) {
  std::vector<int32_t> ints(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    ints[i] = values[i] != values[i] ? std::numeric_limits<int32_t>::min() : static_cast<int32_t>(values[i]);
  }
  if (target.is_contiguous() && target.scalar_type() == at::kInt) {
    std::memcpy(target.mutable_data_ptr<int32_t>(), ints.data(), sizeof(int32_t) * ints.size());
    return;
  }
  target.copy_(at::from_blob(ints.data(), target.sizes(), at::kInt));
}

void observe_range_cpu(const at::Tensor& x, const at::Tensor& tracked_range, const at::Tensor& scale,
                       const at::Tensor& zero_point, std::optional<int64_t> axis, double averaging_constant,
                       int64_t quant_min, int64_t quant_max, bool symmetric, const std::optional<at::Tensor>& fold,
                       bool relu) {
  checks::check_observe_range_args(x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max,
                           fold);
  const at::Tensor xd = dense(x);
  // The batch range per channel of `channel_axis` (fold: per output channel, reduced below if per tensor).
  const std::optional<int64_t> channel_axis = fold.has_value() ? std::optional<int64_t>(0) : axis;
  const int64_t channels = channel_axis.has_value() ? xd.size(*channel_axis) : 1;
  const int64_t run = channels == 1 ? xd.numel() : xd.stride(*channel_axis);
  std::vector<float> lo(channels), hi(channels);
  minmax_stub(xd.scalar_type(), xd.const_data_ptr(), xd.numel(), run, channels, lo.data(), hi.data());
  // A channel (or tensor) without a finite element has no range, lo > hi: (+inf, -inf).
  const auto has_range = [](float low, float high) { return low <= high; };
  if (fold.has_value()) {
    const std::vector<float> f = to_float_vector(*fold);
    for (int64_t c = 0; c < channels; ++c) {
      // No range stays (+inf, -inf), whatever the factor (inf * 0 would be NaN).
      if (!has_range(lo[c], hi[c])) continue;
      const float a = lo[c] * f[c], b = hi[c] * f[c];
      const bool negative = f[c] < 0.0f;
      lo[c] = negative ? b : a;
      hi[c] = negative ? a : b;
    }
    if (!axis.has_value()) {
      // Channels without a range drop out: their +inf / -inf never win.
      for (int64_t c = 1; c < channels; ++c) {
        lo[0] = nan_min(lo[0], lo[c]);
        hi[0] = nan_max(hi[0], hi[c]);
      }
      lo.resize(1);
      hi.resize(1);
    }
  }
  if (relu) {
    // ReLU is monotonic: the range of relu(x) is that of x through ReLU (no range stays no range).
    for (size_t i = 0; i < lo.size(); ++i) {
      if (!has_range(lo[i], hi[i])) continue;
      lo[i] = relu_value(lo[i]);
      hi[i] = relu_value(hi[i]);
    }
  }
  const size_t count = lo.size();
  // tracked_range is [min..., max...]: row 0 the minima, row 1 the maxima.
  const std::vector<float> old = to_float_vector(tracked_range);
  std::vector<float> tracked(2 * count);
  const float c = static_cast<float>(averaging_constant);
  for (size_t i = 0; i < count; ++i) {
    if (!has_range(lo[i], hi[i])) {
      // No finite element (or a NaN end from a NaN fold factor): the tracked range, and so the scale, stay.
      tracked[i] = old[i];
      tracked[count + i] = old[count + i];
    } else if (averaging_constant == 1.0) {
      tracked[i] = lo[i];
      tracked[count + i] = hi[i];
    } else {
      tracked[i] = moving_average(old[i], lo[i], c);
      tracked[count + i] = moving_average(old[count + i], hi[i], c);
    }
  }
  std::vector<float> scales(count), zero_points(count);
  for (size_t i = 0; i < count; ++i) {
    choose_qparams(tracked[i], tracked[count + i], quant_min, quant_max, symmetric, scales[i], zero_points[i]);
  }
  store_floats(tracked_range, tracked);
  store_floats(scale, scales);
  store_zero_points(zero_point, zero_points);
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CPU, m) {
  m.impl("observe_range", &observe_range_cpu);
}

}  // namespace fakequant::cpu

#ifdef FAKEQUANT_WITH_CUDA
namespace fakequant::cuda {
namespace {

// The CUDA wrappers make no value checks (scale > 0, zero point in range): on CUDA tensors they would cost a
// device-to-host sync per call (docs/numerics.md, Argument checks).

// Row `row` of the tracked range, (2,) or (2, C), as a strided vector.
Vector1d range_row(const Tensor& tracked_range, int64_t row) {
  return vector1d(tracked_range.dim() == 1 ? tracked_range[row] : tracked_range.select(0, row));
}

void observe_range_cuda(const Tensor& x, const Tensor& tracked_range, const Tensor& scale, const Tensor& zero_point,
                        std::optional<int64_t> axis, double averaging_constant, int64_t quant_min,
                        int64_t quant_max, bool symmetric, const std::optional<Tensor>& fold, bool relu) {
  checks::check_observe_range_args(x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min,
                                   quant_max, fold);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor input = dense(x);
  const std::optional<int64_t> channel_axis = fold.has_value() ? std::optional<int64_t>(0) : axis;
  AxisLayout layout = channel_axis.has_value() ? axis_layout(input, *channel_axis) : AxisLayout{1, 1};
  if (layout.channels == 1) layout = AxisLayout{input.numel(), 1};
  // The whole tensor in one channel: enough blocks to fill the GPU, each over >= 16 elements per thread.
  const int64_t splits =
      layout.channels == 1 ? std::clamp<int64_t>(input.numel() / (kThreads * 16), 1, max_blocks()) : 1;
  const Tensor partial = at::empty({2 * layout.channels * splits}, input.options().dtype(at::kFloat));
  const Tensor fold_values = fold.has_value() ? fold->contiguous() : Tensor();
  const int64_t entries = axis.has_value() ? layout.channels : 1;
  const ObserveArgs args{input.const_data_ptr(),
                         float_type(input),
                         input.numel(),
                         layout,
                         splits,
                         partial.data_ptr<float>(),
                         fold.has_value() ? fold_values.const_data_ptr<float>() : nullptr,
                         relu,
                         range_row(tracked_range, 0),
                         range_row(tracked_range, 1),
                         vector1d(scale),
                         vector1d(zero_point),
                         static_cast<float>(averaging_constant),
                         averaging_constant == 1.0,
                         quant_min,
                         quant_max,
                         symmetric,
                         c10::cuda::getCurrentCUDAStream()};
  C10_CUDA_CHECK(launch_observe_range(args, entries));
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("observe_range", &observe_range_cuda);
}

}  // namespace fakequant::cuda
#endif  // FAKEQUANT_WITH_CUDA
