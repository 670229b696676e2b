// The learnable family's host side: fake_quant_learnable_backward, the backward of the learned step size (LSQ)
// fake quantization (cpu/learnable_kernels.h, cuda/learnable.cu): argument checks, layouts, parameters, launches
// and the CPU and CUDA registrations; then fake_quant_learnable's autograd (helpers in ops/autograd.h), whose
// forward is the fake_quant family's per-tensor / per-channel op.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/learnable_kernels.h"
#include "fakequant_math.h"
#include "ops/autograd.h"
#include "ops/common.h"

#ifdef FAKEQUANT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.cuh"
#endif

namespace fakequant::cpu {
namespace {

// ----------------------------------------------------------------------------------------------
// Learned step size (LSQ): the backward of fake_quant_learnable (whose forward is the per-tensor / per-channel
// op). grad_x and the fp64-combined per-channel sums of fixed fp32 chunks, recomputed from x.
// ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_learnable_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    std::optional<int64_t> axis, int64_t quant_min, int64_t quant_max, double grad_factor) {
  const int64_t dim = checks::check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor);
  check_qparam_values(scale, zero_point, quant_min, quant_max);
  const at::Tensor zp = checks::learnable_zero_point(zero_point, quant_min, quant_max);
  checks::check_learnable_grad(grad, x);
  const at::Tensor xd = dense(x);
  const at::Tensor gd = with_layout_of(grad, xd);
  // Per tensor: a size-1 leading axis (a view), whose one channel covers the whole storage.
  const int64_t channels = dim < 0 ? 1 : x.size(dim);
  ChannelArrays arrays(dim < 0 ? xd.unsqueeze(0) : xd, dim < 0 ? 0 : dim, scale.reshape({-1}), zp.reshape({-1}),
                       nullptr, quant_min, quant_max, /*allow_pattern=*/false);
  at::Tensor grad_x = at::empty_like(xd);
  std::vector<double> scale_sums(channels, 0.0), zp_sums(channels, 0.0);
  if (xd.numel() > 0) {  // else every sum is 0 (a size-0 axis has no channel to sum over)
    learnable_backward_stub(xd.scalar_type(), gd.const_data_ptr(), xd.const_data_ptr(),
                            grad_x.mutable_data_ptr(), xd.numel(), arrays.params,
                            static_cast<float>(grad_factor), scale_sums.data(), zp_sums.data());
  }
  at::Tensor grad_scale = at::empty({channels}, at::kFloat);
  at::Tensor grad_zero_point = at::empty({channels}, at::kFloat);
  for (int64_t c = 0; c < channels; ++c) {
    grad_scale.mutable_data_ptr<float>()[c] = static_cast<float>(scale_sums[c]);
    grad_zero_point.mutable_data_ptr<float>()[c] = static_cast<float>(zp_sums[c]);
  }
  return {grad_x, grad_scale.view(scale.sizes()), grad_zero_point.view(zero_point.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CPU, m) {
  m.impl("fake_quant_learnable_backward", &fake_quant_learnable_backward_cpu);
}

}  // namespace fakequant::cpu

#ifdef FAKEQUANT_WITH_CUDA
namespace fakequant::cuda {
namespace {

// The CUDA wrappers make no value checks (scale > 0, zero point in range): on CUDA tensors they would cost a
// device-to-host sync per call (docs/numerics.md, Argument checks).

// Elements per block-task of the learnable backward's reduction: a channel of n elements is split into
// ceil(n / kLearnableSplit) blocks, each writing one partial sum. Not tuned on a GPU (none here): 64 elements
// per thread of 256, and one partial per 64 KiB of fp32 input.
constexpr int64_t kLearnableSplit = int64_t{1} << 14;

std::tuple<Tensor, Tensor, Tensor> fake_quant_learnable_backward_cuda(const Tensor& grad, const Tensor& x,
                                                                      const Tensor& scale, const Tensor& zero_point,
                                                                      std::optional<int64_t> axis, int64_t quant_min,
                                                                      int64_t quant_max, double grad_factor) {
  const int64_t dim = checks::check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor);
  checks::check_learnable_grad(grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor zp = checks::learnable_zero_point(zero_point, quant_min, quant_max);
  const Tensor dense_x = dense(x);
  const Tensor dense_grad = with_layout_of(grad, dense_x);
  Tensor grad_x = at::empty_like(dense_x);
  const int64_t channels = dim < 0 ? 1 : x.size(dim);
  const auto float_options = x.options().dtype(at::kFloat);
  if (x.numel() == 0) {
    return {grad_x, at::zeros(scale.sizes(), float_options), at::zeros(zero_point.sizes(), float_options)};
  }
  const int64_t per_channel = x.numel() / channels;
  AxisLayout layout = dim < 0 ? AxisLayout{1, 1} : axis_layout(dense_x, dim);
  // One channel: its reduction runs over all the storage, offsets k = 0 .. per_channel - 1.
  if (layout.channels == 1) layout = AxisLayout{per_channel, 1};
  const int64_t splits = std::max<int64_t>(1, (per_channel + kLearnableSplit - 1) / kLearnableSplit);
  const int64_t per_split = (per_channel + splits - 1) / splits;
  Tensor partial = at::empty({2, channels * splits}, float_options);
  const LearnableBackwardArgs args{dense_grad.const_data_ptr(),
                                   dense_x.const_data_ptr(),
                                   grad_x.data_ptr(),
                                   float_type(dense_x),
                                   layout,
                                   per_channel,
                                   splits,
                                   per_split,
                                   vector1d(scale.reshape({-1})),
                                   vector1d(zp.reshape({-1})),
                                   static_cast<float>(quant_min),
                                   static_cast<float>(quant_max),
                                   static_cast<float>(grad_factor),
                                   partial.data_ptr<float>(),
                                   partial.data_ptr<float>() + channels * splits,
                                   c10::cuda::getCurrentCUDAStream()};
  C10_CUDA_CHECK(launch_learnable_backward(args));
  // Each channel's partials, added in float64 in a fixed order (at::sum on a fixed shape is deterministic).
  const Tensor sums = partial.to(at::kDouble).view({2, channels, splits}).sum(2).to(at::kFloat);
  return {grad_x, sums[0].clone().view(scale.sizes()), sums[1].clone().view(zero_point.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("fake_quant_learnable_backward", &fake_quant_learnable_backward_cuda);
}

}  // namespace fakequant::cuda
#endif  // FAKEQUANT_WITH_CUDA

// ----------------------------------------------------------------------------------------------
// Autograd: the gradients to x, the scale and a float (learned) zero point of docs/numerics.md, Learned step size
// (LSQ), as the Python autograd in fakequant/ops/learnable.py computes them; the backward is
// fake_quant_learnable_backward, which recomputes the mask from x, so the forward writes none.
// ----------------------------------------------------------------------------------------------

namespace fakequant::autograd {
namespace {

using LearnableSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, std::optional<int64_t>, int64_t,
                                  int64_t, double);
using LearnableBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, std::optional<int64_t>,
                                                                      int64_t, int64_t, double);

const c10::TypedOperatorHandle<LearnableSignature>& learnable_op() {
  static const auto op = find_op<LearnableSignature>("fakequant::fake_quant_learnable");
  return op;
}

std::tuple<Tensor, Tensor, Tensor> learnable_backward(const Tensor& grad, const Tensor& x, const Tensor& scale,
                                                      const Tensor& zero_point, std::optional<int64_t> axis,
                                                      int64_t quant_min, int64_t quant_max, double grad_factor) {
  static const auto op = find_op<LearnableBackwardSignature>("fakequant::fake_quant_learnable_backward");
  return op.call(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor);
}

struct FakeQuantLearnable : torch::autograd::Function<FakeQuantLearnable> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                               std::optional<int64_t> axis, int64_t quant_min, int64_t quant_max,
                               double grad_factor) {
    Tensor out = call_below_autograd(learnable_op(), x, scale, zero_point, axis, quant_min, quant_max, grad_factor);
    ctx->set_materialize_grads(false);
    ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    ctx->saved_data["grad_factor"] = grad_factor;
    ctx->saved_data["zero_point_learned"] = zero_point.is_floating_point();
    // Copies of the parameters: an optimizer step may update them in place before this backward runs.
    ctx->save_for_backward({x, scale.detach().clone(), zero_point.detach().clone()});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(7);
    const variable_list saved = ctx->get_saved_variables();
    const c10::IValue& axis = ctx->saved_data.at("axis");
    auto [grad_x, grad_scale, grad_zero_point] = learnable_backward(
        grad_out, saved[0], saved[1], saved[2], axis.isNone() ? std::nullopt : std::optional<int64_t>(axis.toInt()),
        ctx->saved_data.at("quant_min").toInt(), ctx->saved_data.at("quant_max").toInt(),
        ctx->saved_data.at("grad_factor").toDouble());
    const bool learned = ctx->saved_data.at("zero_point_learned").toBool();
    return {grad_x, grad_scale, learned ? grad_zero_point : Tensor(), {}, {}, {}, {}};
  }
};

Tensor fake_quant_learnable_autograd(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                     std::optional<int64_t> axis, int64_t quant_min, int64_t quant_max,
                                     double grad_factor) {
  if (!records_graph({&x, &scale, &zero_point})) {
    return call_below_autograd(learnable_op(), x, scale, zero_point, axis, quant_min, quant_max, grad_factor);
  }
  return FakeQuantLearnable::apply(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, Autograd, m) {
  m.impl("fake_quant_learnable", &fake_quant_learnable_autograd);
}

}  // namespace fakequant::autograd
