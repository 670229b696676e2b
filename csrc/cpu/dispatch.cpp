// The run-time choice of the CPU kernels' instruction set (dispatch.h), compiled for the baseline.
#include "cpu/dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fakequant::cpu {

Capability selected_capability() {
  static const Capability chosen = []() {
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
    // Each variant is compiled for its instruction set: run it only on a CPU that has it.
    const bool avx512 = cpu_has_avx512 && capability_built[static_cast<int>(Capability::avx512)];
    const bool avx2 = cpu_has_avx2 && capability_built[static_cast<int>(Capability::avx2)];
    if ((wanted.empty() || wanted == "avx512") && avx512) return Capability::avx512;
    TORCH_CHECK_VALUE(wanted != "avx512", "fakequant: FAKEQUANT_CPU_CAPABILITY=avx512 but ",
                      cpu_has_avx512 ? "this build has no AVX-512 kernels" : "this CPU lacks AVX-512 F/BW/VL/DQ");
    if (wanted != "baseline" && avx2) return Capability::avx2;
    TORCH_CHECK_VALUE(wanted != "avx2", "fakequant: FAKEQUANT_CPU_CAPABILITY=avx2 but ",
                      cpu_has_avx2 ? "this build has no AVX2 kernels" : "this CPU lacks AVX2/FMA");
    TORCH_INTERNAL_ASSERT(capability_built[static_cast<int>(Capability::baseline)],
                          "fakequant: the baseline CPU kernels are missing from this build");
    return Capability::baseline;
  }();
  return chosen;
}

}  // namespace fakequant::cpu
