// The autograd of the differentiable fakequant:: ops, registered on the Autograd key: the formulas of
// fakequant/_ops.py, which registers them in Python only when this extension is not loaded. Here the
// autograd costs about 2 us per forward; torch.library.register_autograd's Python Function cost 13 us
// (64x64x3x3 fp32) to 45 us (32x16x32x32) per forward plus a Python backward, and a QAT step makes
// dozens of such calls.
//
// The forward redispatches below autograd, so whatever serves the inputs' backend key runs: the C++ or
// CUDA kernel, or the Python kernel that a backend choice (fakequant/_backend.py) stacked on that key.
// The backward calls masked_grad / bn_fold_fake_quant_weight_backward through the dispatcher, for the
// same reason. The schemas are defined in Python (fakequant/_ops.py) before this library is loaded, so
// the operator handles are looked up on first use, not at load time.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

namespace fakequant::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OutAndMask = std::tuple<Tensor, Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using FakeQuantPerTensorSignature = OutAndMask(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, bool,
                                               bool);
using FakeQuantPerChannelSignature = OutAndMask(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                                                int64_t, bool);
using BinarizeSignature = OutAndMask(const Tensor&, bool, bool);
using BnFoldSignature = OutAndMask(const Tensor&, const Tensor&, const Tensor&, double, const Tensor&,
                                   const Tensor&, int64_t, int64_t, bool, bool);
using LearnableSignature = Tensor(const Tensor&, const Tensor&, const Tensor&, std::optional<int64_t>, int64_t,
                                  int64_t, double);
using LearnableBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, std::optional<int64_t>,
                                                                      int64_t, int64_t, double);
using MaskedGradSignature = Tensor(const Tensor&, const Tensor&);
using BnFoldBackwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                   const Tensor&, double, const Tensor&,
                                                                   const Tensor&, int64_t, int64_t, bool);

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

const c10::TypedOperatorHandle<BnFoldSignature>& bn_fold_op() {
  static const auto op = find_op<BnFoldSignature>("fakequant::bn_fold_fake_quant_weight");
  return op;
}

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

Tensor masked_grad(const Tensor& grad, const Tensor& mask) {
  static const auto op = find_op<MaskedGradSignature>("fakequant::masked_grad");
  return op.call(grad, mask);
}

std::tuple<Tensor, Tensor, Tensor> bn_fold_backward(const Tensor& grad, const Tensor& weight, const Tensor& gamma,
                                                    const Tensor& var, double eps, const Tensor& scale,
                                                    const Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                                                    bool divide_by_fold) {
  static const auto op = find_op<BnFoldBackwardSignature>("fakequant::bn_fold_fake_quant_weight_backward");
  return op.call(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold);
}

// Calls `op` on the kernel below the Autograd key (this file's kernels would otherwise be called again).
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// The condition under which torch::autograd::Function::apply records a node: without it, calling the
// kernel directly gives the same outputs and skips allocating a node that would be thrown away.
bool records_graph(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->requires_grad()) return true;
  }
  return false;
}

// Every forward returns (out, mask). Undefined grads are not materialized: the bool mask never has a
// gradient, and zeros for it (or for an unused out) would be allocated on every backward. A backward
// that receives no grad for out returns no grads.
void init_context(AutogradContext* ctx, bool compute_mask) {
  ctx->set_materialize_grads(false);
  ctx->saved_data["compute_mask"] = compute_mask;
}

// The mask saved by the forward, which exists only when the forward was asked to write it.
Tensor saved_mask(AutogradContext* ctx, const variable_list& saved) {
  TORCH_CHECK(ctx->saved_data.at("compute_mask").toBool(),
              "fakequant: this op ran with compute_mask=False, so it has no mask to differentiate with; "
              "call it with compute_mask=True (the functional wrappers do so whenever a gradient is needed)");
  return saved[0];
}

OutAndMask as_tuple(const variable_list& outputs) {
  TORCH_INTERNAL_ASSERT(outputs.size() == 2);
  return {outputs[0], outputs[1]};
}

// ----------------------------------------------------------------------------------------------
// The autograd Functions. backward returns one entry per argument of forward after ctx (autograd checks
// the count); scales, zero points and the non-tensor arguments get undefined tensors: no gradient.
// ----------------------------------------------------------------------------------------------

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

// LSQ: the gradient also reaches the scale and a float (learned) zero point; the backward recomputes the mask
// from x, so the forward writes none.
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

// ----------------------------------------------------------------------------------------------
// The Autograd kernels.
// ----------------------------------------------------------------------------------------------

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
  m.impl("fake_quant_per_tensor", &fake_quant_per_tensor_autograd);
  m.impl("fake_quant_per_channel", &fake_quant_per_channel_autograd);
  m.impl("binarize", &binarize_autograd);
  m.impl("bn_fold_fake_quant_weight", &bn_fold_fake_quant_weight_autograd);
  m.impl("fake_quant_learnable", &fake_quant_learnable_autograd);
}

}  // namespace fakequant::autograd
