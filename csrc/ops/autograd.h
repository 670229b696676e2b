// The helpers shared by the C++ autograd of the differentiable fakequant:: ops. Each op's
// torch::autograd::Function and Autograd kernel are in its family's csrc/ops/<family>.cpp, next to its CPU and
// CUDA kernels, registered on the Autograd key with one TORCH_LIBRARY_IMPL block per family file. They compute the
// formulas of the Python autograd of fakequant/ops/<family>.py, which is registered only when this extension is
// not loaded: in C++ the autograd costs a fraction of torch.library.register_autograd's Python Function per
// forward (docs/benchmarks.md), and a QAT step makes dozens of such calls.
//
// The forward redispatches below autograd (call_below_autograd), so whatever serves the inputs' backend key runs:
// the C++ or CUDA kernel, or the Python kernel that a backend choice (fakequant/_backend.py) stacked on that key.
// The backward calls its backward op (masked_grad, ...) through the dispatcher, for the same reason. The schemas
// are defined in Python (fakequant/ops/) before this library is loaded, so the operator handles are looked up on
// first use (find_op, held in function-local statics), not at load time.
//
// A Function's backward returns one entry per argument of its forward after ctx (autograd checks the count);
// scales and zero points (outside the learnable op) and the non-tensor arguments get undefined tensors: no gradient.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <initializer_list>
#include <tuple>
#include <utility>

namespace fakequant::autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OutAndMask = std::tuple<Tensor, Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Calls `op` on the kernel below the Autograd key (the Autograd kernels would otherwise be called again).
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// The condition under which torch::autograd::Function::apply records a node: without it, calling the
// kernel directly gives the same outputs and skips allocating a node that would be thrown away.
inline bool records_graph(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->requires_grad()) return true;
  }
  return false;
}

// For the forwards that return (out, mask). Undefined grads are not materialized: the bool mask never has a
// gradient, and zeros for it (or for an unused out) would be allocated on every backward. A backward
// that receives no grad for out returns no grads.
inline void init_context(AutogradContext* ctx, bool compute_mask) {
  ctx->set_materialize_grads(false);
  ctx->saved_data["compute_mask"] = compute_mask;
}

// The mask saved by the forward, which exists only when the forward was asked to write it.
inline Tensor saved_mask(AutogradContext* ctx, const variable_list& saved) {
  TORCH_CHECK(ctx->saved_data.at("compute_mask").toBool(),
              "fakequant: this op ran with compute_mask=False, so it has no mask to differentiate with; "
              "call it with compute_mask=True (the functional wrappers do so whenever a gradient is needed)");
  return saved[0];
}

inline OutAndMask as_tuple(const variable_list& outputs) {
  TORCH_INTERNAL_ASSERT(outputs.size() == 2);
  return {outputs[0], outputs[1]};
}

}  // namespace fakequant::autograd
