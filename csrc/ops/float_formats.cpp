// The float_formats family's host side: fake_quant_fp8, fake_quant_mx and fake_quant_nvfp4. Argument checks
// worded as fakequant/checks.py words them, the format looked up by name (float_formats.h's table), the layout
// (blocks are consecutive elements in row-major order), the calls into the CPU kernel
// (cpu/float_formats_kernels.h) and the CUDA launcher (cuda/float_formats.cu), their CPU and CUDA registrations,
// and the autograd of the three ops.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "checks.h"
#include "cpu/float_formats_kernels.h"
#include "float_formats.h"
#include "ops/autograd.h"
#include "ops/common.h"

#ifdef FAKEQUANT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.cuh"
#endif

namespace fakequant::float_formats {
namespace {

using at::Tensor;
using OutAndMask = std::tuple<Tensor, Tensor>;

// ----------------------------------------------------------------------------------------------
// Argument checks (fakequant/checks.py: check_fp8_args, check_mx_args, check_nvfp4_args).
// ----------------------------------------------------------------------------------------------

// A str as Python's repr() writes it ('e4m3'), since the messages quote `{name!r}`.
std::string python_repr(std::string_view text) {
  const bool has_single = text.find('\'') != std::string_view::npos;
  const bool has_double = text.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string repr(1, quote);
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == quote || c == '\\') {
      repr += '\\';
      repr += c;
    } else if (c == '\n') {
      repr += "\\n";
    } else if (c == '\r') {
      repr += "\\r";
    } else if (c == '\t') {
      repr += "\\t";
    } else if (byte < 0x20 || byte == 0x7F) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\x%02x", byte);
      repr += escaped;
    } else {
      repr += c;
    }
  }
  return repr + quote;
}

constexpr std::initializer_list<int32_t> kFp8Codes = {0, 1};  // formats.FP8_FORMATS: e4m3, e5m2
constexpr std::initializer_list<int32_t> kMxCodes = {0, 1, 2, 3, 4, 5};  // formats.MX_ELEMENTS: all

// formats.element_format: the format named `name` among `allowed` (codes), else its ValueError.
const ElementFormat& element_format(std::string_view name, std::initializer_list<int32_t> allowed,
                                    const char* what) {
  const ElementFormat* found = nullptr;
  std::string names;
  for (const int32_t code : allowed) {
    const NamedElementFormat& entry = kElementFormats[code];
    if (name == entry.name) found = &entry.format;
    names += names.empty() ? "" : ", ";
    names += entry.name;
  }
  TORCH_CHECK_VALUE(found != nullptr, "fakequant: ", what, " ", python_repr(name),
                    " is not a supported format; allowed: ", names);
  return *found;
}

// checks.fp8_blocks: (blocks, block size), block_size 0 being the whole tensor.
std::pair<int64_t, int64_t> fp8_blocks(const Tensor& x, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= 0, "fakequant: block_size must be >= 0 (0: one scale for the whole tensor), got ",
                    block_size);
  const int64_t numel = x.numel();
  if (block_size == 0) return {1, numel};
  const int64_t last = x.dim() > 0 ? x.size(-1) : 1;
  const bool fits = (last > 0 && last % block_size == 0) ||
                    (last > 0 && block_size % last == 0 && numel % block_size == 0);
  TORCH_CHECK_VALUE(numel == 0 || fits, "fakequant: block_size ", block_size,
                    " must divide the last dimension of x (shape ", checks::python_shape(x.sizes()),
                    ") or be a multiple of it that divides x.numel(): a block is block_size consecutive elements of "
                    "one row, or whole rows");
  return {numel / block_size, block_size};
}

// checks._check_scale_values: the first value (row-major) that is not finite and at least the smallest allowed:
// 2^-126 for FP8's scales, 2^-120 for NVFP4's per-tensor scale (checks.NVFP4_SMALLEST_PER_TENSOR_SCALE).
void check_scale_values(const Tensor& scale, const char* name, bool per_tensor_nvfp4) {
  const float smallest = per_tensor_nvfp4 ? pow2_normal(-120) : kSmallestNormal;
  const char* rule = per_tensor_nvfp4 ? "2^-120 ((1 / per_tensor_scale) / block_scale overflows"
                                      : "2^-126 (the smallest normal float32; 1 / scale overflows";
  const Tensor values = scale.contiguous();
  const float* data = values.const_data_ptr<float>();
  for (int64_t i = 0, n = values.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(data[i]) && data[i] >= smallest, "fakequant: ", name, " must be finite and >= ",
                      rule, " below it), got ", checks::python_float(data[i]));
  }
}

// checks._check_float_scale; the values only when asked and on the CPU (a CUDA scale would cost a sync).
void check_float_scale(const Tensor& x, const Tensor& scale, const char* name, int64_t numel, bool check_values) {
  checks::check_same_device(scale, name, x, "x");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat, "fakequant: ", name, " has dtype ",
                    checks::python_dtype(scale.scalar_type()), "; allowed: float32");
  TORCH_CHECK_VALUE(scale.numel() == numel, "fakequant: ", name, " must have ", numel,
                    " elements (one per block), got shape ", checks::python_shape(scale.sizes()));
  if (check_values && scale.device().is_cpu()) {
    check_scale_values(scale, name, std::string_view(name) == "per_tensor_scale");
  }
}

// checks.check_last_dim_blocks.
void check_last_dim_blocks(const Tensor& x, int64_t block_size, const char* what) {
  TORCH_CHECK_VALUE(block_size > 0, "fakequant: ", what, " block_size must be > 0, got ", block_size);
  TORCH_CHECK_VALUE(x.dim() > 0 && x.size(-1) % block_size == 0, "fakequant: ", what,
                    " blocks run along the last dimension, whose size must be a multiple of block_size ", block_size,
                    "; x has shape ", checks::python_shape(x.sizes()));
}

// One call's kernel arguments: the spec and the block size (the whole tensor for FP8's block_size 0).
struct Call {
  FloatQuantSpec spec;
  int64_t block_size;
};

Call check_fp8(const Tensor& x, const std::optional<Tensor>& scale, std::string_view fmt, int64_t block_size,
               bool check_values) {
  checks::check_float_input(x, "x");
  const ElementFormat& element = element_format(fmt, kFp8Codes, "fmt");
  const auto [blocks, size] = fp8_blocks(x, block_size);
  if (scale.has_value()) check_float_scale(x, *scale, "scale", blocks, check_values);
  const FloatScaleKind kind = scale.has_value() ? FloatScaleKind::kGiven : FloatScaleKind::kFp8;
  return Call{FloatQuantSpec{kind, element, element, nullptr}, size};
}

Call check_mx(const Tensor& x, std::string_view elem, int64_t block_size, std::string_view scale_mode) {
  checks::check_float_input(x, "x");
  const ElementFormat& element = element_format(elem, kMxCodes, "elem");
  TORCH_CHECK_VALUE(scale_mode == "floor" || scale_mode == "rceil", "fakequant: scale_mode ", python_repr(scale_mode),
                    " is not supported; allowed: floor, rceil");
  check_last_dim_blocks(x, block_size, "MX");
  const FloatScaleKind kind = scale_mode == "rceil" ? FloatScaleKind::kMxRceil : FloatScaleKind::kMxFloor;
  return Call{FloatQuantSpec{kind, element, element, nullptr}, block_size};
}

// spec.per_tensor_scale is left for the wrapper to point at the value.
Call check_nvfp4(const Tensor& x, const std::optional<Tensor>& per_tensor_scale, int64_t block_size,
                 bool check_values) {
  checks::check_float_input(x, "x");
  check_last_dim_blocks(x, block_size, "NVFP4");
  if (per_tensor_scale.has_value()) {
    check_float_scale(x, *per_tensor_scale, "per_tensor_scale", 1, check_values);
  }
  return Call{FloatQuantSpec{FloatScaleKind::kNvfp4, kElementFormats[kE2m1Code].format,
                             kElementFormats[kE4m3Code].format, nullptr},
              block_size};
}

// ----------------------------------------------------------------------------------------------
// Layout. The kernels walk dense storage in blocks of block_size consecutive elements, which are the op's
// blocks when x is contiguous, when one block is the whole tensor, or (for scales that the kernel computes, so
// the order of the blocks does not matter) when each row is contiguous and holds whole blocks. Any other x is
// quantized from a contiguous copy and the outputs copied into empty_like(x)'s layout.
// ----------------------------------------------------------------------------------------------

bool storage_holds_blocks(const Tensor& xd, int64_t block_size, bool scales_in_row_major_order) {
  if (xd.is_contiguous() || block_size == xd.numel()) return true;
  if (scales_in_row_major_order) return false;
  const int64_t last = xd.size(-1);
  if (last == 1) return block_size == 1;
  return xd.stride(-1) == 1 && last % block_size == 0;
}

// run(xs, out, mask) quantizes the dense, non-empty xs into outputs laid out like xs.
template <typename Run>
OutAndMask run_in_block_layout(const Tensor& x, int64_t block_size, bool ordered, bool compute_mask, const Run& run) {
  const Tensor xd = dense(x);
  if (xd.numel() == 0) return cpu::allocate_outputs(xd, compute_mask);
  const Tensor xs = storage_holds_blocks(xd, block_size, ordered) ? xd : xd.contiguous();
  auto [out, mask] = cpu::allocate_outputs(xs, compute_mask);
  run(xs, out, mask);
  if (xs.is_same(xd)) return {out, mask};
  Tensor laid_out = at::empty_like(xd).copy_(out);
  if (compute_mask) mask = at::empty_like(xd, mask.options()).copy_(mask);
  return {laid_out, mask};
}

// ----------------------------------------------------------------------------------------------
// CPU.
// ----------------------------------------------------------------------------------------------

OutAndMask run_cpu(const Tensor& x, const Call& call, const Tensor* scales, bool compute_mask) {
  const Tensor given = scales != nullptr ? scales->contiguous() : Tensor();
  return run_in_block_layout(x, call.block_size, scales != nullptr, compute_mask,
                             [&](const Tensor& xs, Tensor& out, Tensor& mask) {
                               cpu::fake_quant_float_stub(xs.scalar_type(), xs.const_data_ptr(),
                                                          out.mutable_data_ptr(),
                                                          compute_mask ? mask.mutable_data_ptr<bool>() : nullptr,
                                                          xs.numel(), call.block_size, call.spec,
                                                          given.defined() ? given.const_data_ptr<float>() : nullptr);
                             });
}

OutAndMask fake_quant_fp8_cpu(const Tensor& x, const std::optional<Tensor>& scale, c10::string_view fmt,
                              int64_t block_size, bool compute_mask) {
  const Call call = check_fp8(x, scale, fmt, block_size, /*check_values=*/true);
  return run_cpu(x, call, scale.has_value() ? &*scale : nullptr, compute_mask);
}

OutAndMask fake_quant_mx_cpu(const Tensor& x, c10::string_view elem, int64_t block_size, c10::string_view scale_mode,
                             bool compute_mask) {
  return run_cpu(x, check_mx(x, elem, block_size, scale_mode), nullptr, compute_mask);
}

OutAndMask fake_quant_nvfp4_cpu(const Tensor& x, const std::optional<Tensor>& per_tensor_scale, int64_t block_size,
                                bool compute_mask) {
  Call call = check_nvfp4(x, per_tensor_scale, block_size, /*check_values=*/true);
  // A one-element tensor of any shape and strides holds its value at its data pointer.
  const float value = per_tensor_scale.has_value() ? *per_tensor_scale->const_data_ptr<float>() : 0.0f;
  if (per_tensor_scale.has_value()) call.spec.per_tensor_scale = &value;
  return run_cpu(x, call, nullptr, compute_mask);
}

// ----------------------------------------------------------------------------------------------
// CUDA: no value checks (a CUDA scale's values would cost a device-to-host sync per call).
// ----------------------------------------------------------------------------------------------

#ifdef FAKEQUANT_WITH_CUDA

OutAndMask run_cuda(const Tensor& x, const Call& call, const Tensor* scales, bool compute_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor given = scales != nullptr ? scales->contiguous() : Tensor();
  return run_in_block_layout(
      x, call.block_size, scales != nullptr, compute_mask, [&](const Tensor& xs, Tensor& out, Tensor& mask) {
        const cuda::FloatType type = cuda::float_type(xs);
        const int max_blocks = cuda::max_blocks();
        const int64_t scratch_count =
            cuda::float_format_scratch(xs.numel(), call.block_size, call.spec.kind, type, max_blocks);
        const Tensor scratch =
            scratch_count > 0 ? at::empty({scratch_count}, xs.options().dtype(at::kInt)) : Tensor();
        const cuda::FloatFormatArgs args{xs.const_data_ptr(),
                                         out.mutable_data_ptr(),
                                         compute_mask ? mask.mutable_data_ptr<bool>() : nullptr,
                                         xs.numel(),
                                         call.block_size,
                                         type,
                                         call.spec,
                                         given.defined() ? given.const_data_ptr<float>() : nullptr,
                                         scratch.defined() ? static_cast<uint32_t*>(scratch.mutable_data_ptr())
                                                           : nullptr,
                                         max_blocks,
                                         c10::cuda::getCurrentCUDAStream()};
        C10_CUDA_CHECK(cuda::launch_fake_quant_float(args));
      });
}

OutAndMask fake_quant_fp8_cuda(const Tensor& x, const std::optional<Tensor>& scale, c10::string_view fmt,
                               int64_t block_size, bool compute_mask) {
  const Call call = check_fp8(x, scale, fmt, block_size, /*check_values=*/false);
  return run_cuda(x, call, scale.has_value() ? &*scale : nullptr, compute_mask);
}

OutAndMask fake_quant_mx_cuda(const Tensor& x, c10::string_view elem, int64_t block_size, c10::string_view scale_mode,
                              bool compute_mask) {
  return run_cuda(x, check_mx(x, elem, block_size, scale_mode), nullptr, compute_mask);
}

OutAndMask fake_quant_nvfp4_cuda(const Tensor& x, const std::optional<Tensor>& per_tensor_scale, int64_t block_size,
                                 bool compute_mask) {
  Call call = check_nvfp4(x, per_tensor_scale, block_size, /*check_values=*/false);
  // Read on the device by the kernels, never with .item().
  if (per_tensor_scale.has_value()) call.spec.per_tensor_scale = per_tensor_scale->const_data_ptr<float>();
  return run_cuda(x, call, nullptr, compute_mask);
}

#endif  // FAKEQUANT_WITH_CUDA

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, CPU, m) {
  m.impl("fake_quant_fp8", &fake_quant_fp8_cpu);
  m.impl("fake_quant_mx", &fake_quant_mx_cpu);
  m.impl("fake_quant_nvfp4", &fake_quant_nvfp4_cpu);
}

#ifdef FAKEQUANT_WITH_CUDA
TORCH_LIBRARY_IMPL(fakequant, CUDA, m) {
  m.impl("fake_quant_fp8", &fake_quant_fp8_cuda);
  m.impl("fake_quant_mx", &fake_quant_mx_cuda);
  m.impl("fake_quant_nvfp4", &fake_quant_nvfp4_cuda);
}

#endif  // FAKEQUANT_WITH_CUDA

}  // namespace fakequant::float_formats

// ----------------------------------------------------------------------------------------------
// Autograd: the straight-through gradient of fakequant/ops/float_formats.py, masked_grad(grad, mask), or grad
// unmasked when the forward ran with compute_mask=False. Only x gets a gradient.
// ----------------------------------------------------------------------------------------------

namespace fakequant::autograd {
namespace {

using Fp8Signature = OutAndMask(const Tensor&, const std::optional<Tensor>&, c10::string_view, int64_t, bool);
using MxSignature = OutAndMask(const Tensor&, c10::string_view, int64_t, c10::string_view, bool);
using Nvfp4Signature = OutAndMask(const Tensor&, const std::optional<Tensor>&, int64_t, bool);
using MaskedGradSignature = Tensor(const Tensor&, const Tensor&);

const c10::TypedOperatorHandle<Fp8Signature>& fake_quant_fp8_op() {
  static const auto op = find_op<Fp8Signature>("fakequant::fake_quant_fp8");
  return op;
}

const c10::TypedOperatorHandle<MxSignature>& fake_quant_mx_op() {
  static const auto op = find_op<MxSignature>("fakequant::fake_quant_mx");
  return op;
}

const c10::TypedOperatorHandle<Nvfp4Signature>& fake_quant_nvfp4_op() {
  static const auto op = find_op<Nvfp4Signature>("fakequant::fake_quant_nvfp4");
  return op;
}

// The gradient of x for `inputs` forward arguments: grad where the mask is set, or grad itself without a mask.
variable_list straight_through(AutogradContext* ctx, const variable_list& grads, size_t inputs) {
  static const auto masked_grad = find_op<MaskedGradSignature>("fakequant::masked_grad");
  variable_list result(inputs);
  const Tensor& grad_out = grads[0];
  if (!grad_out.defined()) return result;
  result[0] = ctx->saved_data.at("compute_mask").toBool()
                  ? masked_grad.call(grad_out, saved_mask(ctx, ctx->get_saved_variables()))
                  : grad_out;
  return result;
}

void save_mask(AutogradContext* ctx, bool compute_mask, const Tensor& mask) {
  init_context(ctx, compute_mask);
  if (compute_mask) ctx->save_for_backward({mask});
}

bool records(const Tensor& x, const std::optional<Tensor>& scale) {
  return scale.has_value() ? records_graph({&x, &*scale}) : records_graph({&x});
}

struct FakeQuantFp8 : torch::autograd::Function<FakeQuantFp8> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& scale,
                               c10::string_view fmt, int64_t block_size, bool compute_mask) {
    auto [out, mask] = call_below_autograd(fake_quant_fp8_op(), x, scale, fmt, block_size, compute_mask);
    save_mask(ctx, compute_mask, mask);
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return straight_through(ctx, grads, 5); }
};

struct FakeQuantMx : torch::autograd::Function<FakeQuantMx> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, c10::string_view elem, int64_t block_size,
                               c10::string_view scale_mode, bool compute_mask) {
    auto [out, mask] = call_below_autograd(fake_quant_mx_op(), x, elem, block_size, scale_mode, compute_mask);
    save_mask(ctx, compute_mask, mask);
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return straight_through(ctx, grads, 5); }
};

struct FakeQuantNvfp4 : torch::autograd::Function<FakeQuantNvfp4> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& per_tensor_scale,
                               int64_t block_size, bool compute_mask) {
    auto [out, mask] = call_below_autograd(fake_quant_nvfp4_op(), x, per_tensor_scale, block_size, compute_mask);
    save_mask(ctx, compute_mask, mask);
    return {out, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return straight_through(ctx, grads, 4); }
};

OutAndMask fake_quant_fp8_autograd(const Tensor& x, const std::optional<Tensor>& scale, c10::string_view fmt,
                                   int64_t block_size, bool compute_mask) {
  if (!records(x, scale)) return call_below_autograd(fake_quant_fp8_op(), x, scale, fmt, block_size, compute_mask);
  return as_tuple(FakeQuantFp8::apply(x, scale, fmt, block_size, compute_mask));
}

OutAndMask fake_quant_mx_autograd(const Tensor& x, c10::string_view elem, int64_t block_size,
                                  c10::string_view scale_mode, bool compute_mask) {
  if (!records_graph({&x})) {
    return call_below_autograd(fake_quant_mx_op(), x, elem, block_size, scale_mode, compute_mask);
  }
  return as_tuple(FakeQuantMx::apply(x, elem, block_size, scale_mode, compute_mask));
}

OutAndMask fake_quant_nvfp4_autograd(const Tensor& x, const std::optional<Tensor>& per_tensor_scale,
                                     int64_t block_size, bool compute_mask) {
  if (!records(x, per_tensor_scale)) {
    return call_below_autograd(fake_quant_nvfp4_op(), x, per_tensor_scale, block_size, compute_mask);
  }
  return as_tuple(FakeQuantNvfp4::apply(x, per_tensor_scale, block_size, compute_mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(fakequant, Autograd, m) {
  m.impl("fake_quant_fp8", &fake_quant_fp8_autograd);
  m.impl("fake_quant_mx", &fake_quant_mx_autograd);
  m.impl("fake_quant_nvfp4", &fake_quant_nvfp4_autograd);
}

}  // namespace fakequant::autograd
