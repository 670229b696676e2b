// The fake_quant family's host side: fake_quant_per_tensor, fake_quant_per_channel, binarize and masked_grad.
// Argument checks (checks.h), layouts and fp32 parameters (ops/common.h), the calls into the CPU kernels
// (cpu/fake_quant_kernels.h) and the CUDA launchers (cuda/fake_quant.cu), and their CPU and CUDA registrations;
// then the autograd of fake_quant_per_tensor, fake_quant_per_channel and binarize (helpers in ops/autograd.h).
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "checks.h"
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

std::tuple<at::Tensor, at::Tensor> fake_quant_per_tensor_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                             const at::Tensor& zero_point, int64_t quant_min,
                                                             int64_t quant_max, bool compute_mask, bool relu) {
  checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, std::nullopt);
  check_qparam_values(scale, zero_point, quant_min, quant_max);
  const at::Tensor xd = dense(x);
  auto [out, mask] = allocate_outputs(xd, compute_mask);
  if (xd.numel() > 0) {
    const QuantParams p = make_quant_params(scalar_at<float>(scale, 0),
                                            static_cast<float>(zero_point_at(zero_point, 0)),
                                            static_cast<float>(quant_min), static_cast<float>(quant_max));
    fake_quant_per_tensor_stub(xd.scalar_type(), xd.const_data_ptr(), out.mutable_data_ptr(),
                               compute_mask ? mask.mutable_data_ptr<bool>() : nullptr, xd.numel(), p, relu);
  }
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_per_channel_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                              const at::Tensor& zero_point, int64_t axis,
                                                              int64_t quant_min, int64_t quant_max,
                                                              bool compute_mask) {
  axis = checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis);
  check_qparam_values(scale, zero_point, quant_min, quant_max);
  const at::Tensor xd = dense(x);
  auto [out, mask] = allocate_outputs(xd, compute_mask);
  if (xd.numel() > 0) {
    const ChannelArrays arrays(xd, axis, scale, zero_point, nullptr, quant_min, quant_max);
    fake_quant_per_channel_stub(xd.scalar_type(), xd.const_data_ptr(), out.mutable_data_ptr(),
                                compute_mask ? mask.mutable_data_ptr<bool>() : nullptr, xd.numel(),
                                arrays.params);
  }
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor> binarize_cpu(const at::Tensor& x, bool clipped_ste, bool compute_mask) {
  checks::check_float_input(x, "x");
  const bool with_mask = clipped_ste && compute_mask;
  const at::Tensor xd = dense(x);
  auto [out, mask] = allocate_outputs(xd, with_mask);
  if (xd.numel() > 0) {
    binarize_stub(xd.scalar_type(), xd.const_data_ptr(), out.mutable_data_ptr(),
                  with_mask ? mask.mutable_data_ptr<bool>() : nullptr, xd.numel());
  }
  return {out, mask};
}

// out = mask ? grad : 0 for any layouts, element by element through TensorIterator.
void masked_grad_strided(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& mask) {
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(grad)
                  .add_const_input(mask)
                  .check_all_same_dtype(false)
                  .build();
  const size_t width = grad.element_size();
  iter.for_each([width](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
    for (int64_t j = 0; j < size1; ++j) {
      char* o = data[0] + j * strides[3];
      const char* g = data[1] + j * strides[4];
      const char* m = data[2] + j * strides[5];
      for (int64_t i = 0; i < size0; ++i) {
        char* oi = o + i * strides[0];
        if (*reinterpret_cast<const bool*>(m + i * strides[2])) {
          std::memcpy(oi, g + i * strides[1], width);
        } else {
          std::memset(oi, 0, width);  // +0 in every dtype
        }
      }
    }
  });
}

at::Tensor masked_grad_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  checks::check_mask(grad, mask);
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  const size_t width = grad.element_size();
  const bool same_dense_layout = grad.is_non_overlapping_and_dense() && mask.is_non_overlapping_and_dense() &&
                                 grad.strides() == mask.strides();
  if (same_dense_layout && (width == 2 || width == 4)) {
    masked_grad_stub(grad.scalar_type(), grad.const_data_ptr(), mask.const_data_ptr<bool>(),
                     out.mutable_data_ptr(), grad.numel());
  } else {
    masked_grad_strided(out, grad, mask);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CPU, m) {
  m.impl("fake_quant_per_tensor", &fake_quant_per_tensor_cpu);
  m.impl("fake_quant_per_channel", &fake_quant_per_channel_cpu);
  m.impl("binarize", &binarize_cpu);
  m.impl("masked_grad", &masked_grad_cpu);
}

}  // namespace fakequant::cpu

#ifdef FAKEQUANT_WITH_CUDA
namespace fakequant::cuda {
namespace {

// The CUDA wrappers make no value checks (scale > 0, zero point in range): on CUDA tensors they would cost a
// device-to-host sync per call (docs/numerics.md, Argument checks).

std::tuple<Tensor, Tensor> fake_quant_per_tensor_cuda(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                                      int64_t quant_min, int64_t quant_max, bool compute_mask,
                                                      bool relu) {
  checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, std::nullopt);
  const c10::cuda::CUDAGuard guard(x.device());
  const Forward f = make_forward(x, compute_mask);
  C10_CUDA_CHECK(launch_fake_quant_per_tensor(elementwise_args(f), scale.const_data_ptr<float>(),
                                              vector1d(zero_point), static_cast<float>(quant_min),
                                              static_cast<float>(quant_max), relu));
  return {f.out, f.mask};
}

std::tuple<Tensor, Tensor> fake_quant_per_channel_cuda(const Tensor& x, const Tensor& scale,
                                                       const Tensor& zero_point, int64_t axis, int64_t quant_min,
                                                       int64_t quant_max, bool compute_mask) {
  const int64_t dim = checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_per_channel(x, scale, zero_point, dim, quant_min, quant_max, compute_mask, nullptr, nullptr, 0.0,
                         false);
}

std::tuple<Tensor, Tensor> binarize_cuda(const Tensor& x, bool clipped_ste, bool compute_mask) {
  checks::check_float_input(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  // The identity STE needs no mask, so none is computed (as in the reference and the fake impl).
  const Forward f = make_forward(x, clipped_ste && compute_mask);
  C10_CUDA_CHECK(launch_binarize(elementwise_args(f)));
  return {f.out, f.mask};
}

Tensor masked_grad_cuda(const Tensor& grad, const Tensor& mask) {
  checks::check_mask(grad, mask);
  checks::check_float_input(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const Tensor dense_grad = dense(grad);
  const Tensor dense_mask = with_layout_of(mask, dense_grad);
  Tensor out = at::empty_like(grad);
  TORCH_INTERNAL_ASSERT(out.strides() == dense_grad.strides());
  C10_CUDA_CHECK(launch_masked_grad(float_type(grad), dense_grad.const_data_ptr(), dense_mask.const_data_ptr<bool>(),
                                    out.data_ptr(), grad.numel(), max_blocks(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("fake_quant_per_tensor", &fake_quant_per_tensor_cuda);
  m.impl("fake_quant_per_channel", &fake_quant_per_channel_cuda);
  m.impl("binarize", &binarize_cuda);
  m.impl("masked_grad", &masked_grad_cuda);
}

}  // namespace fakequant::cuda
#endif  // FAKEQUANT_WITH_CUDA

// ----------------------------------------------------------------------------------------------
// Autograd: the straight-through gradients (docs/numerics.md, Straight-through gradients) of the Python autograd
// in fakequant/ops/fake_quant.py and fakequant/ops/binary.py; the backward is masked_grad.
// ----------------------------------------------------------------------------------------------

namespace fakequant::autograd {
namespace {

using FakeQuantPerTensorSignature = OutAndMask(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, bool,
                                               bool);
using FakeQuantPerChannelSignature = OutAndMask(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                                int64_t, bool);
using BinarizeSignature = OutAndMask(const Tensor&, bool, bool);
using MaskedGradSignature = Tensor(const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<FakeQuantPerTensorSignature>& fake_quant_per_tensor_op() {
  static const auto op = find_op<FakeQuantPerTensorSignature>("fakequant::fake_quant_per_tensor");
  return op;
}

const c10::TypedOperatorHandle<FakeQuantPerChannelSignature>& fake_quant_per_channel_op() {
  static const auto op = find_op<FakeQuantPerChannelSignature>("fakequant::fake_quant_per_channel");
  return op;
}

const c10::TypedOperatorHandle<BinarizeSignature>& binarize_op() {
  static const auto op = find_op<BinarizeSignature>("fakequant::binarize");
  return op;
}

Tensor masked_grad(const Tensor& grad, const Tensor& mask) {
  static const auto op = find_op<MaskedGradSignature>("fakequant::masked_grad");
  return op.call(grad, mask);
}

struct FakeQuantPerTensor : torch::autograd::Function<FakeQuantPerTensor> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                               int64_t quant_min, int64_t quant_max, bool compute_mask, bool relu) {
    auto [out, mask] = call_below_autograd(fake_quant_per_tensor_op(), x, scale, zero_point, quant_min, quant_max,
                                           compute_mask, relu);
    init_context(ctx, compute_mask);
    ctx->save_for_backward({mask});
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(7);
    return {masked_grad(grad_out, saved_mask(ctx, ctx->get_saved_variables())), {}, {}, {}, {}, {}, {}};
  }
};

struct FakeQuantPerChannel : torch::autograd::Function<FakeQuantPerChannel> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                               int64_t axis, int64_t quant_min, int64_t quant_max, bool compute_mask) {
    auto [out, mask] = call_below_autograd(fake_quant_per_channel_op(), x, scale, zero_point, axis, quant_min,
                                           quant_max, compute_mask);
    init_context(ctx, compute_mask);
    ctx->save_for_backward({mask});
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(7);
    return {masked_grad(grad_out, saved_mask(ctx, ctx->get_saved_variables())), {}, {}, {}, {}, {}, {}};
  }
};

struct Binarize : torch::autograd::Function<Binarize> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, bool clipped_ste, bool compute_mask) {
    auto [out, mask] = call_below_autograd(binarize_op(), x, clipped_ste, compute_mask);
    init_context(ctx, compute_mask);
    ctx->saved_data["clipped_ste"] = clipped_ste;
    ctx->save_for_backward({mask});
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_out = grads[0];
    // The identity STE (BNN's weights) passes the gradient through and needs no mask.
    if (!grad_out.defined() || !ctx->saved_data.at("clipped_ste").toBool()) return {grad_out, {}, {}};
    return {masked_grad(grad_out, saved_mask(ctx, ctx->get_saved_variables())), {}, {}};
  }
};

OutAndMask fake_quant_per_tensor_autograd(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                          int64_t quant_min, int64_t quant_max, bool compute_mask, bool relu) {
  if (!records_graph({&x, &scale, &zero_point})) {
    return call_below_autograd(fake_quant_per_tensor_op(), x, scale, zero_point, quant_min, quant_max,
                               compute_mask, relu);
  }
  return as_tuple(FakeQuantPerTensor::apply(x, scale, zero_point, quant_min, quant_max, compute_mask, relu));
}

OutAndMask fake_quant_per_channel_autograd(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                           int64_t axis, int64_t quant_min, int64_t quant_max, bool compute_mask) {
  if (!records_graph({&x, &scale, &zero_point})) {
    return call_below_autograd(fake_quant_per_channel_op(), x, scale, zero_point, axis, quant_min, quant_max,
                               compute_mask);
  }
  return as_tuple(FakeQuantPerChannel::apply(x, scale, zero_point, axis, quant_min, quant_max, compute_mask));
}

OutAndMask binarize_autograd(const Tensor& x, bool clipped_ste, bool compute_mask) {
  if (!records_graph({&x})) return call_below_autograd(binarize_op(), x, clipped_ste, compute_mask);
  return as_tuple(Binarize::apply(x, clipped_ste, compute_mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, Autograd, m) {
  m.impl("fake_quant_per_tensor", &fake_quant_per_tensor_autograd);
  m.impl("fake_quant_per_channel", &fake_quant_per_channel_autograd);
  m.impl("binarize", &binarize_autograd);
}

}  // namespace fakequant::autograd
