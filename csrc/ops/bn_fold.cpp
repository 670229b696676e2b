// The bn_fold family's host side: bn_fold_fake_quant_weight (the BN-folded weight's fake quantization, run by
// the fake_quant family's per-channel kernels with a fold factor) and its backward
// bn_fold_fake_quant_weight_backward (cpu/bn_fold_kernels.h, cuda/bn_fold.cu): argument checks, layouts,
// parameters, launches and the CPU and CUDA registrations; then the forward's autograd (helpers in
// ops/autograd.h).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/bn_fold_kernels.h"
#include "cpu/fake_quant_kernels.h"
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

// BatchNorm's sqrt(var + eps) per channel, computed with the ATen ops the reference uses: torch.sqrt on
// CPU is not always the correctly rounded sqrtf (1 ulp apart on some inputs), and the folded weight must
// match the reference bit for bit. (eps is added to an fp32 tensor, so it is rounded to fp32 first.)
at::Tensor bn_std(const at::Tensor& var, double eps) { return at::sqrt(var.to(at::kFloat) + eps); }

// gamma / std per channel. The division is IEEE fp32 in C++ as in ATen's div, so only the sqrt needs ATen: one
// tensor op instead of three on every forward and backward of every folded conv.
std::vector<float> bn_fold_factors(const std::vector<float>& gamma, const std::vector<float>& std_dev) {
  std::vector<float> fold(gamma.size());
  for (size_t c = 0; c < fold.size(); ++c) fold[c] = gamma[c] / std_dev[c];
  return fold;
}

std::vector<float> bn_fold_factors(const at::Tensor& gamma, const at::Tensor& var, double eps) {
  return bn_fold_factors(to_float_vector(gamma), to_float_vector(bn_std(var, eps)));
}

// The factors of divide_by_fold=True: 1 where the fold factor is 0.
std::vector<float> bn_fold_training_factors(std::vector<float> fold) {
  for (float& f : fold) f = bn_fold_training_factor(f);
  return fold;
}

std::vector<float> bn_fold_training_factors(const at::Tensor& gamma, const at::Tensor& var, double eps) {
  return bn_fold_training_factors(bn_fold_factors(gamma, var, eps));
}

std::tuple<at::Tensor, at::Tensor> bn_fold_fake_quant_weight_cpu(const at::Tensor& weight, const at::Tensor& gamma,
                                                                 const at::Tensor& var, double eps,
                                                                 const at::Tensor& scale,
                                                                 const at::Tensor& zero_point, int64_t quant_min,
                                                                 int64_t quant_max, bool compute_mask,
                                                                 bool divide_by_fold) {
  checks::check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  check_qparam_values(scale, zero_point, quant_min, quant_max);
  const at::Tensor wd = dense(weight);
  auto [out, mask] = allocate_outputs(wd, compute_mask);
  if (wd.numel() > 0) {
    const std::vector<float> fold =
        divide_by_fold ? bn_fold_training_factors(gamma, var, eps) : bn_fold_factors(gamma, var, eps);
    ChannelArrays arrays(wd, 0, scale, zero_point, &fold, quant_min, quant_max);
    arrays.params.divide_by_fold = divide_by_fold;
    fake_quant_per_channel_stub(wd.scalar_type(), wd.const_data_ptr(), out.mutable_data_ptr(),
                                compute_mask ? mask.mutable_data_ptr<bool>() : nullptr, wd.numel(),
                                arrays.params);
  }
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_fold_fake_quant_weight_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& gamma, const at::Tensor& var, double eps,
    const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
    bool divide_by_fold) {
  checks::check_bn_fold_backward_args(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  check_qparam_values(scale, zero_point, quant_min, quant_max);
  const int64_t channels = weight.size(0);
  const at::Tensor wd = dense(weight);
  // The fused kernel reads grad in weight's dtype; autograd always supplies that, anything else is
  // converted to fp32 exactly as the reference does (masked grad in fp32).
  const at::Tensor gd = with_layout_of(grad.scalar_type() == weight.scalar_type() ? grad : grad.to(at::kFloat), wd);
  const std::vector<float> gamma_f = to_float_vector(gamma);
  const std::vector<float> std_dev = to_float_vector(bn_std(var, eps));
  // The fold factors: they multiply the gradient of q(w f), and divide the sums of the divided output's.
  const std::vector<float> fold = bn_fold_factors(gamma_f, std_dev);
  at::Tensor grad_weight = at::empty_like(wd);
  std::vector<float> sums(channels, 0.0f);
  if (wd.numel() > 0) {
    if (gd.scalar_type() == wd.scalar_type()) {
      // The forward's factors, to recompute its output.
      const std::vector<float> forward_fold = divide_by_fold ? bn_fold_training_factors(fold) : fold;
      ChannelArrays arrays(wd, 0, scale, zero_point, &forward_fold, quant_min, quant_max, /*allow_pattern=*/false);
      arrays.params.divide_by_fold = divide_by_fold;
      bn_fold_backward_stub(wd.scalar_type(), gd.const_data_ptr(), wd.const_data_ptr(),
                            grad_weight.mutable_data_ptr(), wd.numel(), arrays.params, sums.data());
    } else {
      // Mixed dtypes: the reference composition in ATen ops, on the forward's output and mask.
      const auto [od, md] = bn_fold_fake_quant_weight_cpu(wd, gamma, var, eps, scale, zero_point, quant_min,
                                                          quant_max, /*compute_mask=*/true, divide_by_fold);
      const at::Tensor zero = at::zeros({}, gd.options().dtype(at::kFloat));
      const at::Tensor g = at::where(md, gd.to(at::kFloat), zero);
      std::vector<int64_t> view(weight.dim(), 1);
      view[0] = channels;
      const at::Tensor fold_t = at::from_blob(const_cast<float*>(fold.data()), {channels}, at::kFloat).view(view);
      grad_weight.copy_(divide_by_fold ? g : g * fold_t);
      const at::Tensor terms = divide_by_fold
                                   ? gd.to(at::kFloat) * (at::where(md, wd.to(at::kFloat), zero) - od.to(at::kFloat))
                                   : g * wd.to(at::kFloat);
      std::vector<int64_t> reduce_dims;
      for (int64_t d = 1; d < weight.dim(); ++d) reduce_dims.push_back(d);
      const at::Tensor s = reduce_dims.empty() ? terms : terms.sum(reduce_dims);
      std::memcpy(sums.data(), s.contiguous().const_data_ptr<float>(), sizeof(float) * channels);
    }
  }
  if (divide_by_fold) {
    for (int64_t c = 0; c < channels; ++c) sums[c] = bn_fold_divided_grad_factor(sums[c], fold[c]);
  }
  at::Tensor grad_gamma_f = at::empty({channels}, at::kFloat);
  at::Tensor grad_var_f = at::empty({channels}, at::kFloat);
  float* gg = grad_gamma_f.mutable_data_ptr<float>();
  float* gv = grad_var_f.mutable_data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    // The reference's order of operations: s / std and ((-0.5 * s) * gamma) / ((std * std) * std).
    gg[c] = sums[c] / std_dev[c];
    gv[c] = -0.5f * sums[c] * gamma_f[c] / (std_dev[c] * std_dev[c] * std_dev[c]);
  }
  return {grad_weight, grad_gamma_f.to(gamma.scalar_type()).view(gamma.sizes()),
          grad_var_f.to(var.scalar_type()).view(var.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CPU, m) {
  m.impl("bn_fold_fake_quant_weight", &bn_fold_fake_quant_weight_cpu);
  m.impl("bn_fold_fake_quant_weight_backward", &bn_fold_fake_quant_weight_backward_cpu);
}

}  // namespace fakequant::cpu

#ifdef FAKEQUANT_WITH_CUDA
namespace fakequant::cuda {
namespace {

// The CUDA wrappers make no value checks (scale > 0, zero point in range): on CUDA tensors they would cost a
// device-to-host sync per call (docs/numerics.md, Argument checks).

std::tuple<Tensor, Tensor> bn_fold_fake_quant_weight_cuda(const Tensor& weight, const Tensor& gamma,
                                                          const Tensor& var, double eps, const Tensor& scale,
                                                          const Tensor& zero_point, int64_t quant_min,
                                                          int64_t quant_max, bool compute_mask,
                                                          bool divide_by_fold) {
  checks::check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  const c10::cuda::CUDAGuard guard(weight.device());
  // var + eps in fp32, as the reference's var.float() + eps computes it.
  return run_per_channel(weight, scale, zero_point, 0, quant_min, quant_max, compute_mask, &gamma, &var, eps,
                         divide_by_fold);
}

std::tuple<Tensor, Tensor, Tensor> bn_fold_fake_quant_weight_backward_cuda(
    const Tensor& grad, const Tensor& weight, const Tensor& gamma, const Tensor& var, double eps, const Tensor& scale,
    const Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool divide_by_fold) {
  checks::check_bn_fold_backward_args(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  const c10::cuda::CUDAGuard guard(weight.device());

  Tensor grad_weight = at::empty_like(weight);
  Tensor grad_gamma = at::empty_like(gamma);
  Tensor grad_var = at::empty_like(var);
  Tensor dense_weight = dense(weight);
  Tensor dense_grad = with_layout_of(grad, dense_weight);
  Tensor result = grad_weight;
  if (grad.scalar_type() != weight.scalar_type()) {
    // Mixed dtypes (rare): both widen to fp32 exactly, and the fp32 grad_weight rounds to weight's
    // dtype once, as the reference's .to(weight.dtype) does. This keeps one kernel per dtype; the kernel
    // still rounds the recomputed divided output to weight's dtype (weight_type below).
    dense_weight = dense_weight.to(at::kFloat);
    dense_grad = dense_grad.to(at::kFloat);
    result = at::empty_like(dense_weight);
  }
  TORCH_INTERNAL_ASSERT(result.strides() == dense_weight.strides() && dense_grad.strides() == dense_weight.strides());
  TORCH_INTERNAL_ASSERT(dense_grad.scalar_type() == dense_weight.scalar_type() &&
                        result.scalar_type() == dense_weight.scalar_type());
  // The kernel rounds the divided output to weight_type only in its fp32 instantiation.
  TORCH_INTERNAL_ASSERT(dense_weight.scalar_type() == weight.scalar_type() || dense_weight.scalar_type() == at::kFloat);
  const int64_t channels = weight.size(0);
  if (channels == 0) return {grad_weight, grad_gamma, grad_var};
  const int64_t per_channel = weight.numel() / channels;
  AxisLayout layout = axis_layout(dense_weight, 0);
  // One channel: one block's reduction over all the storage, offsets k = 0 .. per_channel - 1.
  if (layout.channels == 1) layout = AxisLayout{std::max<int64_t>(per_channel, 1), 1};
  // eps and the quant range in fp32, as the forward (run_per_channel) passes them.
  const BnFoldBackwardArgs args{dense_grad.const_data_ptr(),
                                dense_weight.const_data_ptr(),
                                result.data_ptr(),
                                float_type(dense_weight),
                                float_type(weight),
                                layout,
                                per_channel,
                                vector1d(gamma),
                                vector1d(var),
                                static_cast<float>(eps),
                                vector1d(scale),
                                vector1d(zero_point),
                                static_cast<float>(quant_min),
                                static_cast<float>(quant_max),
                                divide_by_fold,
                                vector1d(grad_gamma),
                                vector1d(grad_var),
                                c10::cuda::getCurrentCUDAStream()};
  C10_CUDA_CHECK(launch_bn_fold_backward(args));
  if (!result.is_same(grad_weight)) grad_weight.copy_(result);
  return {grad_weight, grad_gamma, grad_var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("bn_fold_fake_quant_weight", &bn_fold_fake_quant_weight_cuda);
  m.impl("bn_fold_fake_quant_weight_backward", &bn_fold_fake_quant_weight_backward_cuda);
}

}  // namespace fakequant::cuda
#endif  // FAKEQUANT_WITH_CUDA

// ----------------------------------------------------------------------------------------------
// Autograd: the gradients to weight, gamma and var of docs/numerics.md, BN-folded weights, as the Python autograd
// in fakequant/ops/bn_fold.py computes them; the backward is bn_fold_fake_quant_weight_backward.
// ----------------------------------------------------------------------------------------------

namespace fakequant::autograd {
namespace {

using BnFoldSignature = OutAndMask(const Tensor&, const Tensor&, const Tensor&, double, const Tensor&,
                                   const Tensor&, int64_t, int64_t, bool, bool);
using BnFoldBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, double, const Tensor&,
                                                                   const Tensor&, int64_t, int64_t, bool);

const c10::TypedOperatorHandle<BnFoldSignature>& bn_fold_op() {
  static const auto op = find_op<BnFoldSignature>("fakequant::bn_fold_fake_quant_weight");
  return op;
}

std::tuple<Tensor, Tensor, Tensor> bn_fold_backward(const Tensor& grad, const Tensor& weight, const Tensor& gamma,
                                                    const Tensor& var, double eps, const Tensor& scale,
                                                    const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                                    bool divide_by_fold) {
  static const auto op = find_op<BnFoldBackwardSignature>("fakequant::bn_fold_fake_quant_weight_backward");
  return op.call(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold);
}

struct BnFoldFakeQuantWeight : torch::autograd::Function<BnFoldFakeQuantWeight> {
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, const Tensor& gamma, const Tensor& var,
                               double eps, const Tensor& scale, const Tensor& zero_point, int64_t quant_min,
                               int64_t quant_max, bool compute_mask, bool divide_by_fold) {
    auto [out, mask] = call_below_autograd(bn_fold_op(), weight, gamma, var, eps, scale, zero_point, quant_min,
                                           quant_max, compute_mask, divide_by_fold);
    ctx->set_materialize_grads(false);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    ctx->saved_data["divide_by_fold"] = divide_by_fold;
    // The backward recomputes the forward (no mask is needed, whatever compute_mask was), with copies of the
    // qparams: a quantizer updates its scale/zero-point buffers in place on the next forward, which may come
    // before this backward.
    ctx->save_for_backward({weight, gamma, var, scale.clone(), zero_point.clone()});
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(10);
    const variable_list saved = ctx->get_saved_variables();
    // Computed whether or not each input requires grad (var is usually a buffer): one fused kernel
    // produces all three, as in the Python formula.
    auto [grad_weight, grad_gamma, grad_var] =
        bn_fold_backward(grad_out, saved[0], saved[1], saved[2], ctx->saved_data.at("eps").toDouble(), saved[3],
                         saved[4], ctx->saved_data.at("quant_min").toInt(), ctx->saved_data.at("quant_max").toInt(),
                         ctx->saved_data.at("divide_by_fold").toBool());
    return {grad_weight, grad_gamma, grad_var, {}, {}, {}, {}, {}, {}, {}};
  }
};

OutAndMask bn_fold_fake_quant_weight_autograd(const Tensor& weight, const Tensor& gamma, const Tensor& var,
                                              double eps, const Tensor& scale, const Tensor& zero_point,
                                              int64_t quant_min, int64_t quant_max, bool compute_mask,
                                              bool divide_by_fold) {
  if (!records_graph({&weight, &gamma, &var, &scale, &zero_point})) {
    return call_below_autograd(bn_fold_op(), weight, gamma, var, eps, scale, zero_point, quant_min, quant_max,
                               compute_mask, divide_by_fold);
  }
  return as_tuple(BnFoldFakeQuantWeight::apply(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max,
                                               compute_mask, divide_by_fold));
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, Autograd, m) {
  m.impl("bn_fold_fake_quant_weight", &bn_fold_fake_quant_weight_autograd);
}

}  // namespace fakequant::autograd
