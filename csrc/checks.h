// Host-side argument checks of the fakequant:: ops, worded exactly as fakequant/reference.py words them
// so that every backend raises the same ValueError (TORCH_CHECK_VALUE) for the same mistake.
//
// Plain C++ on ATen (no CUDA): the CPU and the CUDA wrappers of csrc/ops/ share it. Only the checks that need
// no tensor VALUES live here: the value checks of reference.py (scale finite and >= 2^-126, zero point inside the
// quant range) would cost a device-to-host sync on every call for a CUDA scale, so docs/numerics.md (Argument
// checks) leaves them to the quantizers that compute those values, and the CUDA kernels never make them. A CPU
// kernel that wants them reads the values itself (csrc/ops/common.h, check_qparam_values).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fakequant {
namespace checks {

// Every integer level must be exact in fp32, whose 24-bit significand holds integers up to 2^24.
constexpr int64_t kQuantLimit = int64_t{1} << 24;

// The dtype as Python prints it (`torch.float32`), since the messages quote `{t.dtype}`.
inline std::string python_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// The shape as Python prints `tuple(t.shape)`: "()", "(3,)", "(2, 3)".
inline std::string python_shape(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(sizes[i]);
  }
  if (sizes.size() == 1) text += ",";
  return text + ")";
}

// The shortest text that reads back as `value`, laid out as Python's repr(float) lays it out
// ("1e-05", "0.001", "-1.0", "1e+16", "nan", "inf"), since the eps message quotes `{eps}`.
inline std::string python_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  const std::string sign = std::signbit(value) ? "-" : "";
  const double magnitude = std::fabs(value);
  char buffer[64];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buffer, sizeof(buffer), "%.*e", digits - 1, magnitude);
    if (std::strtod(buffer, nullptr) == magnitude) break;
  }
  // buffer is "d.ddde+XX" (or "de+XX"): split the significant digits from the decimal exponent.
  const std::string text(buffer);
  const size_t e_pos = text.find('e');
  std::string digits;
  for (size_t i = 0; i < e_pos; ++i) {
    if (text[i] != '.') digits += text[i];
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int exponent = std::atoi(text.c_str() + e_pos + 1);
  if (magnitude == 0.0) return sign + "0.0";
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) return sign + "0." + std::string(-exponent - 1, '0') + digits;
    const size_t int_digits = static_cast<size_t>(exponent) + 1;
    if (digits.size() <= int_digits) return sign + digits + std::string(int_digits - digits.size(), '0') + ".0";
    return sign + digits.substr(0, int_digits) + "." + digits.substr(int_digits);
  }
  char exponent_text[16];
  std::snprintf(exponent_text, sizeof(exponent_text), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
  const std::string mantissa = digits.size() == 1 ? digits : digits.substr(0, 1) + "." + digits.substr(1);
  return sign + mantissa + exponent_text;
}

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), "fakequant: ", name, " has dtype ", python_dtype(t.scalar_type()),
                    "; allowed: float32, float16, bfloat16");
}

inline void check_quant_range(int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK_VALUE(quant_min <= quant_max, "fakequant: quant_min (", quant_min, ") must be <= quant_max (",
                    quant_max, ")");
  TORCH_CHECK_VALUE(quant_min >= -kQuantLimit && quant_max <= kQuantLimit, "fakequant: quant range [", quant_min,
                    ", ", quant_max, "] must lie within [-2^24, 2^24] so that every level is exact in fp32");
}

inline int64_t normalize_axis(int64_t axis, int64_t ndim) {
  TORCH_CHECK_VALUE(-ndim <= axis && axis < ndim, "fakequant: axis ", axis, " is out of range for a tensor with ",
                    ndim, " dimensions (allowed: ", -ndim, " to ", ndim - 1, ")");
  return axis < 0 ? axis + ndim : axis;
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x, const char* x_name,
                              const char* suffix = "; they must be on the same device") {
  TORCH_CHECK_VALUE(t.device() == x.device(), "fakequant: ", name, " is on ", t.device().str(), " but ", x_name,
                    " is on ", x.device().str(), suffix);
}

// int32/int64; `learned`: also float32 (a learned zero point, rounded and clamped by the learnable ops).
inline void check_zero_point_dtype(const at::Tensor& zero_point, bool learned = false) {
  const at::ScalarType type = zero_point.scalar_type();
  TORCH_CHECK_VALUE(type == at::kInt || type == at::kLong || (learned && type == at::kFloat),
                    "fakequant: zero_point has dtype ", python_dtype(type), "; allowed: ",
                    learned ? "int32, int64, float32" : "int32, int64");
}

// scale and zero_point shapes. `channels` < 0 means per-tensor (one element each).
inline void check_qparam_shapes(const at::Tensor& scale, const at::Tensor& zero_point, int64_t channels) {
  const std::pair<const char*, const at::Tensor*> params[] = {{"scale", &scale}, {"zero_point", &zero_point}};
  for (const auto& [name, t] : params) {
    if (channels < 0) {
      TORCH_CHECK_VALUE(t->numel() == 1, "fakequant: per-tensor ", name,
                        " must have exactly one element, got shape ", python_shape(t->sizes()));
    } else {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->numel() == channels, "fakequant: per-channel ", name,
                        " must be 1-D with ", channels, " elements (the size of the quantized axis), got shape ",
                        python_shape(t->sizes()));
    }
  }
}

// scale and zero_point: device, dtype and shape. `channels` < 0 means per-tensor (one element each).
inline void check_qparams(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                          int64_t channels, bool learned_zero_point = false) {
  check_same_device(scale, "scale", x, "x");
  check_same_device(zero_point, "zero_point", x, "x");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat, "fakequant: scale has dtype ",
                    python_dtype(scale.scalar_type()), "; allowed: float32");
  check_zero_point_dtype(zero_point, learned_zero_point);
  check_qparam_shapes(scale, zero_point, channels);
}

// reference.check_fake_quant_args; returns the normalized axis (-1 for per-tensor). `learned_zero_point` also
// accepts a float32 zero point (the learnable ops').
inline int64_t check_fake_quant_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                     int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis,
                                     bool learned_zero_point = false) {
  check_float_input(x, "x");
  check_quant_range(quant_min, quant_max);
  int64_t channels = -1;
  int64_t normalized = -1;
  if (axis.has_value()) {
    normalized = normalize_axis(*axis, x.dim());
    channels = x.size(normalized);
  }
  check_qparams(x, scale, zero_point, channels, learned_zero_point);
  return normalized;
}

// reference.check_learnable_args without the value checks (the CPU kernel adds them); returns the normalized
// axis (-1 for per-tensor). A float32 zero point is a learned one, rounded and clamped by the op.
inline int64_t check_learnable_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                    std::optional<int64_t> axis, int64_t quant_min, int64_t quant_max,
                                    double grad_factor) {
  const int64_t normalized = check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis,
                                                   /*learned_zero_point=*/true);
  TORCH_CHECK_VALUE(std::isfinite(grad_factor), "fakequant: grad_factor must be finite, got ",
                    python_float(grad_factor));
  return normalized;
}

// The rest of reference.check_learnable_backward_args: grad matches x.
inline void check_learnable_grad(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
                    "fakequant: grad must match x (shape ", python_shape(x.sizes()), ", dtype ",
                    python_dtype(x.scalar_type()), ", device ", x.device().str(), "); got shape ",
                    python_shape(grad.sizes()), ", dtype ", python_dtype(grad.scalar_type()), ", device ",
                    grad.device().str());
}

// The integer zero point the learnable op quantizes with: a float32 one rounded half to even and clamped.
inline at::Tensor learnable_zero_point(const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  if (zero_point.scalar_type() != at::kFloat) return zero_point;
  return zero_point.round().clamp(quant_min, quant_max).to(at::kInt);
}

// gamma / var of a BatchNorm: same device as weight, a float dtype, 1-D with weight.size(0) elements.
inline void check_bn_param(const at::Tensor& t, const char* name, const at::Tensor& weight) {
  check_same_device(t, name, weight, "weight");
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), "fakequant: ", name, " has dtype ",
                    python_dtype(t.scalar_type()), "; allowed: float32, float16, bfloat16");
  const int64_t channels = weight.size(0);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == channels, "fakequant: ", name, " must be 1-D with ", channels,
                    " elements (weight.size(0)), got shape ", python_shape(t.sizes()));
}

inline void check_weight(const at::Tensor& weight) {
  check_float_input(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() >= 1,
                    "fakequant: weight must have at least one dimension (output channels first)");
}

// reference.check_bn_fold_args.
inline void check_bn_fold_args(const at::Tensor& weight, const at::Tensor& gamma, const at::Tensor& var, double eps,
                               const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                               int64_t quant_max) {
  check_weight(weight);
  check_bn_param(gamma, "gamma", weight);
  check_bn_param(var, "var", weight);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "fakequant: eps must be finite and >= 0, got ",
                    python_float(eps));
  check_quant_range(quant_min, quant_max);
  check_qparams(weight, scale, zero_point, weight.size(0));
}

// reference.masked_grad's check, then the device (reference.py leaves that to torch.where).
inline void check_mask(const at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(mask.sizes() == grad.sizes() && mask.scalar_type() == at::kBool,
                    "fakequant: mask must be a bool tensor of the gradient's shape ", python_shape(grad.sizes()),
                    ", got ", python_dtype(mask.scalar_type()), " of shape ", python_shape(mask.sizes()));
  check_same_device(mask, "mask", grad, "grad");
}

// reference.check_bn_fold_backward_args: the forward's arguments (the backward recomputes the forward), then
// grad against weight.
inline void check_bn_fold_backward_args(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& gamma,
                                        const at::Tensor& var, double eps, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max);
  check_float_input(grad, "grad");
  check_same_device(grad, "grad", weight, "weight");
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), "fakequant: grad must have the weight's shape ",
                    python_shape(weight.sizes()), ", got shape ", python_shape(grad.sizes()));
}

// observe_range: everything but values (fold, the tracked range and the qparams are written or read by
// the kernel). Normalizes `axis` in place.
inline void check_observe_range_args(const at::Tensor& x, const at::Tensor& tracked_range, const at::Tensor& scale,
                              const at::Tensor& zero_point, std::optional<int64_t>& axis, double averaging_constant,
                              int64_t quant_min, int64_t quant_max, const std::optional<at::Tensor>& fold) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(x.numel() > 0, "fakequant: cannot observe the range of an empty tensor (x has shape ",
                    python_shape(x.sizes()), ")");
  check_quant_range(quant_min, quant_max);
  TORCH_CHECK_VALUE(quant_min != quant_max, "fakequant: choosing a scale needs quant_min < quant_max, got ",
                    quant_min, " == ", quant_max);
  TORCH_CHECK_VALUE(std::isfinite(averaging_constant) && averaging_constant > 0.0 && averaging_constant <= 1.0,
                    "fakequant: averaging_constant must be in (0, 1] (1 replaces the tracked range), got ",
                    python_float(averaging_constant));
  if (axis.has_value()) axis = normalize_axis(*axis, x.dim());
  const int64_t channels = axis.has_value() ? x.size(*axis) : 1;
  std::vector<std::pair<const char*, const at::Tensor*>> state = {
      {"tracked_range", &tracked_range}, {"scale", &scale}, {"zero_point", &zero_point}};
  if (fold.has_value()) state.emplace_back("fold", &*fold);
  for (const auto& [name, t] : state) check_same_device(*t, name, x, "x");
  check_float_input(tracked_range, "tracked_range");
  check_float_input(scale, "scale");
  check_zero_point_dtype(zero_point);
  const std::vector<int64_t> range_shape =
      axis.has_value() ? std::vector<int64_t>{2, channels} : std::vector<int64_t>{2};
  TORCH_CHECK_VALUE(tracked_range.sizes() == c10::IntArrayRef(range_shape), "fakequant: tracked_range must have shape ",
                    python_shape(range_shape), " ([min, max]", axis.has_value() ? " per channel" : "", "), got ",
                    python_shape(tracked_range.sizes()));
  check_qparam_shapes(scale, zero_point, axis.has_value() ? channels : -1);
  if (fold.has_value()) {
    TORCH_CHECK_VALUE(!axis.has_value() || *axis == 0,
                      "fakequant: a fold factor applies along axis 0; allowed axis: None or 0, got ", *axis);
    TORCH_CHECK_VALUE(fold->scalar_type() == at::kFloat && fold->dim() == 1 && fold->numel() == x.size(0),
                      "fakequant: fold must be a 1-D float32 tensor with ", x.size(0),
                      " elements (x.size(0)), got ", python_dtype(fold->scalar_type()), " of shape ",
                      python_shape(fold->sizes()));
  }
}

}  // namespace checks
}  // namespace fakequant
