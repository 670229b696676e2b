// Host side of the CUDA kernels: argument checks (worded as reference.py words them), output allocation
// laid out as the fake impls lay it out (at::empty_like), dense layouts, launches on the current stream
// under a device guard, and the TORCH_LIBRARY_IMPL(fakequant, CUDA) registration. The kernels are in
// fake_quant.cu and grad.cu, behind kernels.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include "checks.cuh"
#include "kernels.cuh"

namespace fakequant {
namespace cuda {
namespace {

using at::Tensor;

int max_blocks() {
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

FloatType float_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat;
    case at::kHalf: return FloatType::kHalf;
    case at::kBFloat16: return FloatType::kBFloat16;
    default: TORCH_INTERNAL_ASSERT(false, "fakequant: unexpected dtype ", t.scalar_type());
  }
}

Vector1d vector1d(const Tensor& t) {
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

// `x` itself when it is dense and non-overlapping (processed linearly over its storage), else one copy
// into at::empty_like(x), whose layout is the one every output of the op gets.
Tensor dense_input(const Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : at::empty_like(x).copy_(x);
}

// `t` laid out as the dense `like`, so that both are read with the same storage offsets: `t` itself
// when its strides already match, else one copy.
Tensor with_layout_of(const Tensor& t, const Tensor& like) {
  TORCH_INTERNAL_ASSERT(t.sizes() == like.sizes());
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

// The index along `axis` of the element at storage offset k of the dense `t` is (k / inner) % channels.
// A size-1 axis is one channel with inner = 1, since its stride may be anything (even 0).
AxisLayout axis_layout(const Tensor& t, int64_t axis) {
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

Forward make_forward(const Tensor& x, bool compute_mask) {
  const auto bool_options = x.options().dtype(at::kBool);
  Forward f{dense_input(x), at::empty_like(x),
            compute_mask ? at::empty_like(x, bool_options) : at::empty({0}, bool_options)};
  TORCH_INTERNAL_ASSERT(f.out.strides() == f.input.strides());
  TORCH_INTERNAL_ASSERT(!compute_mask || f.mask.strides() == f.input.strides());
  return f;
}

ElementwiseArgs elementwise_args(const Forward& f) {
  return ElementwiseArgs{f.input.const_data_ptr(),
                         f.out.data_ptr(),
                         f.mask.numel() > 0 ? f.mask.data_ptr<bool>() : nullptr,
                         f.input.numel(),
                         float_type(f.input),
                         max_blocks(),
                         c10::cuda::getCurrentCUDAStream()};
}

// ---------------------------------------------------------------------------------------------
// The ops. The value checks of reference.py (scale > 0, zero point in range) are not made: on CUDA
// tensors they would cost a device-to-host sync per call (SPEC §1).
// ---------------------------------------------------------------------------------------------

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

// Per-channel fake quantization of `x` along `axis`, optionally of x * gamma / sqrt(var + eps) (BN folding),
// optionally divided by that factor again (divide_by_fold, BN folding only).
std::tuple<Tensor, Tensor> run_per_channel(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
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

std::tuple<Tensor, Tensor> fake_quant_per_channel_cuda(const Tensor& x, const Tensor& scale,
                                                       const Tensor& zero_point, int64_t axis, int64_t quant_min,
                                                       int64_t quant_max, bool compute_mask) {
  const int64_t dim = checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_per_channel(x, scale, zero_point, dim, quant_min, quant_max, compute_mask, nullptr, nullptr, 0.0,
                         false);
}

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
  const Tensor dense_grad = dense_input(grad);
  const Tensor dense_mask = with_layout_of(mask, dense_grad);
  Tensor out = at::empty_like(grad);
  TORCH_INTERNAL_ASSERT(out.strides() == dense_grad.strides());
  C10_CUDA_CHECK(launch_masked_grad(float_type(grad), dense_grad.const_data_ptr(), dense_mask.const_data_ptr<bool>(),
                                    out.data_ptr(), grad.numel(), max_blocks(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> bn_fold_fake_quant_weight_backward_cuda(
    const Tensor& grad, const Tensor& weight, const Tensor& gamma, const Tensor& var, double eps, const Tensor& scale,
    const Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool divide_by_fold) {
  checks::check_bn_fold_backward_args(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  const c10::cuda::CUDAGuard guard(weight.device());

  Tensor grad_weight = at::empty_like(weight);
  Tensor grad_gamma = at::empty_like(gamma);
  Tensor grad_var = at::empty_like(var);
  Tensor dense_weight = dense_input(weight);
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
  const Tensor dense_x = dense_input(x);
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
  const Tensor input = dense_input(x);
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
}  // namespace cuda
}  // namespace fakequant

TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("fake_quant_per_tensor", &fakequant::cuda::fake_quant_per_tensor_cuda);
  m.impl("fake_quant_per_channel", &fakequant::cuda::fake_quant_per_channel_cuda);
  m.impl("bn_fold_fake_quant_weight", &fakequant::cuda::bn_fold_fake_quant_weight_cuda);
  m.impl("binarize", &fakequant::cuda::binarize_cuda);
  m.impl("masked_grad", &fakequant::cuda::masked_grad_cuda);
  m.impl("bn_fold_fake_quant_weight_backward", &fakequant::cuda::bn_fold_fake_quant_weight_backward_cuda);
  m.impl("observe_range", &fakequant::cuda::observe_range_cuda);
  m.impl("fake_quant_learnable_backward", &fakequant::cuda::fake_quant_learnable_backward_cuda);
}
