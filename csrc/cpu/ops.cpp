// The CPU kernels of the fakequant:: ops: argument checks (the same checks and wording as
// fakequant/reference.py, raised as ValueError through TORCH_CHECK_VALUE), layouts, fp32 parameters, and
// the choice of kernel variant (AVX2 or baseline) at run time.
//
// Layouts: a dense non-overlapping tensor (contiguous, channels_last, any permutation) is processed
// linearly over its storage and its outputs come from at::empty_like, which keeps its strides (as the
// fake impls do). Any other tensor is first copied once into at::empty_like(x) (dense, strides inferred
// from x) and then takes the same path.
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernel_table.h"
#include "cuda/checks.cuh"
#include "fakequant_math.h"

namespace fakequant::cpu {
namespace {

// ----------------------------------------------------------------------------------------------
// Argument checks: cuda/checks.cuh (shared with the CUDA ops, worded as the reference's), plus the value
// checks that only a CPU kernel can afford.
// ----------------------------------------------------------------------------------------------

// Element i (in logical order) of a CPU tensor that has one element or is 1-D, read in place.
template <typename T>
T scalar_at(const at::Tensor& t, int64_t i) {
  const T* data = t.const_data_ptr<T>();
  return t.numel() == 1 ? data[0] : data[i * t.stride(0)];
}

int64_t zero_point_at(const at::Tensor& zero_point, int64_t i) {
  return zero_point.scalar_type() == at::kInt ? scalar_at<int32_t>(zero_point, i) : scalar_at<int64_t>(zero_point, i);
}

// The values of scale and zero point (after checks::check_qparams): free to check here, since these are CPU
// tensors. Read in place (no copies: this runs on every call, and a contiguous()/to() pair cost ~7 us of the
// ~10 us that a 16-element call took).
// Above this many parameters (per-group weights: one per group) the checks first run as one branch-free pass over
// contiguous values, which the compiler vectorizes, instead of the element-by-element reads below (0.2 ms of a 2 ms
// call for 131072 groups; ATen reductions in its place still cost ~0.1 ms in ~10 small ops).
constexpr int64_t kLoopCheckLimit = 1024;

template <typename T>
bool all_within(const at::Tensor& t, T low, T high) {
  const at::Tensor c = t.contiguous();
  const T* p = c.const_data_ptr<T>();
  bool ok = true;
  for (int64_t i = 0, n = c.numel(); i < n; ++i) ok &= (p[i] >= low) & (p[i] <= high);  // NaN fails both
  return ok;
}

void check_qparam_values(const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                         int64_t quant_max) {
  if (scale.numel() > kLoopCheckLimit || zero_point.numel() > kLoopCheckLimit) {
    const bool scales_ok = all_within<float>(scale, std::numeric_limits<float>::denorm_min(),
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
    TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0f, "fakequant: scale must be finite and > 0, got ",
                      checks::python_float(s));
  }
  // A float (learned) zero point is clamped into the range by the learnable ops, not checked against it.
  const int64_t zp_count = zero_point.is_floating_point() ? 0 : zero_point.numel();
  for (int64_t i = 0; i < zp_count; ++i) {
    const int64_t z = zero_point_at(zero_point, i);
    TORCH_CHECK_VALUE(quant_min <= z && z <= quant_max, "fakequant: zero_point ", z,
                      " is outside [quant_min, quant_max] = [", quant_min, ", ", quant_max, "]");
  }
}

// ----------------------------------------------------------------------------------------------
// Kernel variant, layouts, parameters.
// ----------------------------------------------------------------------------------------------

// FAKEQUANT_CPU_CAPABILITY: "" (the best the CPU supports), "avx512", "avx2" or "baseline".
const KernelTable& kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
    const char* env = std::getenv("FAKEQUANT_CPU_CAPABILITY");
    const std::string wanted = env != nullptr ? env : "";
    TORCH_CHECK_VALUE(wanted.empty() || wanted == "avx512" || wanted == "avx2" || wanted == "baseline",
                      "fakequant: FAKEQUANT_CPU_CAPABILITY is '", wanted,
                      "'; allowed: avx512, avx2, baseline (or unset)");
#if defined(__x86_64__) && defined(__GNUC__)
    // Every AVX2 CPU also has F16C, which GCC's __builtin_cpu_supports cannot query.
    const bool cpu_has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool cpu_has_avx512 = cpu_has_avx2 && __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512dq");
#else
    const bool cpu_has_avx2 = false;
    const bool cpu_has_avx512 = false;
#endif
    // Each variant is compiled for its instruction set: call it only on a CPU that has it.
    const KernelTable* avx512 = cpu_has_avx512 ? avx512_kernels() : nullptr;
    const KernelTable* avx2 = cpu_has_avx2 ? avx2_kernels() : nullptr;
    if ((wanted.empty() || wanted == "avx512") && avx512 != nullptr) return *avx512;
    TORCH_CHECK_VALUE(wanted != "avx512", "fakequant: FAKEQUANT_CPU_CAPABILITY=avx512 but ",
                      cpu_has_avx512 ? "this build has no AVX-512 kernels" : "this CPU lacks AVX-512 F/BW/VL/DQ");
    if (wanted != "baseline" && avx2 != nullptr) return *avx2;
    TORCH_CHECK_VALUE(wanted != "avx2", "fakequant: FAKEQUANT_CPU_CAPABILITY=avx2 but ",
                      cpu_has_avx2 ? "this build has no AVX2 kernels" : "this CPU lacks AVX2/FMA");
    return baseline_kernels();
  }();
  return table;
}

// x itself when it is dense and non-overlapping, else a dense copy laid out as at::empty_like(x).
at::Tensor dense(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  return at::empty_like(x).copy_(x);
}

// `t` with exactly `like`'s strides (copied when they differ); `like` is dense.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(like, t.options()).copy_(t);
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& xd, bool compute_mask) {
  at::Tensor out = at::empty_like(xd);
  at::Tensor mask = compute_mask ? at::empty_like(xd, xd.options().dtype(at::kBool))
                                 : at::empty({0}, xd.options().dtype(at::kBool));
  return {out, mask};
}

std::vector<float> to_float_vector(const at::Tensor& t) {
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
      // vectorized ATen ops (IEEE division, as make_quant_params's) instead of an element loop, which cost
      // ~12 ns per channel (1.6 ms of a 2.3 ms call for 131072 groups of 32).
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

// ----------------------------------------------------------------------------------------------
// Ops.
// ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> fake_quant_per_tensor_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                             const at::Tensor& zero_point, int64_t quant_min,
                                                             int64_t quant_max, bool compute_mask, bool relu) {
  checks::check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, std::nullopt);
  check_qparam_values(scale, zero_point, quant_min, quant_max);
  const at::Tensor xd = dense(x);
  auto [out, mask] = allocate_outputs(xd, compute_mask);
  if (xd.numel() > 0) {
    const QuantParams p = make_quant_params(scalar_at<float>(scale, 0), static_cast<float>(zero_point_at(zero_point, 0)),
                                            static_cast<float>(quant_min), static_cast<float>(quant_max));
    kernels().fake_quant_per_tensor(xd.scalar_type(), xd.const_data_ptr(), out.mutable_data_ptr(),
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
    kernels().fake_quant_per_channel(xd.scalar_type(), xd.const_data_ptr(), out.mutable_data_ptr(),
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
    kernels().binarize(xd.scalar_type(), xd.const_data_ptr(), out.mutable_data_ptr(),
                       with_mask ? mask.mutable_data_ptr<bool>() : nullptr, xd.numel());
  }
  return {out, mask};
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
    kernels().fake_quant_per_channel(wd.scalar_type(), wd.const_data_ptr(), out.mutable_data_ptr(),
                                     compute_mask ? mask.mutable_data_ptr<bool>() : nullptr, wd.numel(),
                                     arrays.params);
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
    kernels().masked_grad(grad.scalar_type(), grad.const_data_ptr(), mask.const_data_ptr<bool>(),
                          out.mutable_data_ptr(), grad.numel());
  } else {
    masked_grad_strided(out, grad, mask);
  }
  return out;
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
      kernels().bn_fold_backward(wd.scalar_type(), gd.const_data_ptr(), wd.const_data_ptr(),
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

// Zero points arrive as fp32 integral values; NaN (a NaN range) becomes INT32_MIN as the reference's
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
  kernels().minmax(xd.scalar_type(), xd.const_data_ptr(), xd.numel(), run, channels, lo.data(), hi.data());
  if (fold.has_value()) {
    const std::vector<float> f = to_float_vector(*fold);
    for (int64_t c = 0; c < channels; ++c) {
      const float a = lo[c] * f[c], b = hi[c] * f[c];
      const bool negative = f[c] < 0.0f;
      lo[c] = negative ? b : a;
      hi[c] = negative ? a : b;
    }
    if (!axis.has_value()) {
      for (int64_t c = 1; c < channels; ++c) {
        lo[0] = nan_min(lo[0], lo[c]);
        hi[0] = nan_max(hi[0], hi[c]);
      }
      lo.resize(1);
      hi.resize(1);
    }
  }
  if (relu) {
    // ReLU is monotonic: the range of relu(x) is that of x through ReLU.
    for (size_t i = 0; i < lo.size(); ++i) {
      lo[i] = relu_value(lo[i]);
      hi[i] = relu_value(hi[i]);
    }
  }
  const size_t count = lo.size();
  // tracked_range is [min..., max...]: row 0 the minima, row 1 the maxima.
  std::vector<float> tracked(2 * count);
  if (averaging_constant == 1.0) {
    std::copy(lo.begin(), lo.end(), tracked.begin());
    std::copy(hi.begin(), hi.end(), tracked.begin() + count);
  } else {
    const std::vector<float> old = to_float_vector(tracked_range);
    const float c = static_cast<float>(averaging_constant);
    for (size_t i = 0; i < count; ++i) {
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
    kernels().learnable_backward(xd.scalar_type(), gd.const_data_ptr(), xd.const_data_ptr(),
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
  m.impl("fake_quant_per_tensor", &fake_quant_per_tensor_cpu);
  m.impl("fake_quant_per_channel", &fake_quant_per_channel_cpu);
  m.impl("binarize", &binarize_cpu);
  m.impl("bn_fold_fake_quant_weight", &bn_fold_fake_quant_weight_cpu);
  m.impl("masked_grad", &masked_grad_cpu);
  m.impl("bn_fold_fake_quant_weight_backward", &bn_fold_fake_quant_weight_backward_cpu);
  m.impl("observe_range", &observe_range_cpu);
  m.impl("fake_quant_learnable_backward", &fake_quant_learnable_backward_cpu);
}

}  // namespace fakequant::cpu
