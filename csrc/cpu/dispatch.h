// The CPU kernels' run-time choice of instruction set: ATen's DispatchStub, written small. A family's kernel
// header declares one stub per kernel (FAKEQUANT_DECLARE_STUB, a function pointer per instruction set); the
// kernels, compiled once per instruction set by kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp,
// register themselves in it (FAKEQUANT_REGISTER_STUB); the ops call the stub like the kernel, and it runs the
// variant chosen once by selected_capability(). Adding a kernel needs no table kept by hand.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

namespace fakequant::cpu {

// The instruction sets the kernels are compiled for, spelled as FAKEQUANT_CPU_VARIANT names them.
enum class Capability : int { baseline = 0, avx2 = 1, avx512 = 2 };
constexpr int kCapabilities = 3;

// The instruction set the kernels run with, chosen on first use (dispatch.cpp): FAKEQUANT_CPU_CAPABILITY ("",
// "avx512", "avx2" or "baseline"), else the best that both the CPU and this build have.
Capability selected_capability();

// Whether this build holds each instruction set's kernels: set when they register (a compiler other than
// GCC on x86-64 builds the baseline kernels only).
inline constinit bool capability_built[kCapabilities] = {};

// One kernel, a function pointer per instruction set. Constant-initialized, so the registrations (dynamic
// initializers of other translation units) may run in any order.
template <typename Fn>
struct Stub {
  Fn kernels[kCapabilities] = {};

  template <typename... Args>
  decltype(auto) operator()(Args&&... args) const {
    const Fn kernel = kernels[static_cast<int>(selected_capability())];
    TORCH_INTERNAL_ASSERT(kernel != nullptr, "fakequant: a CPU kernel is missing from its instruction set's build");
    return kernel(std::forward<Args>(args)...);
  }
};

struct StubRegistration {
  template <typename Fn>
  StubRegistration(Stub<Fn>& stub, Capability capability, Fn kernel) {
    stub.kernels[static_cast<int>(capability)] = kernel;
    capability_built[static_cast<int>(capability)] = true;
  }
};

}  // namespace fakequant::cpu

// In a family's kernel header, outside FAKEQUANT_CPU_VARIANT: `FAKEQUANT_DECLARE_STUB(minmax_stub, MinmaxFn);`.
#define FAKEQUANT_DECLARE_STUB(stub, fn_type) inline constinit ::fakequant::cpu::Stub<fn_type> stub {}

// In the variant namespace, after the kernel: `FAKEQUANT_REGISTER_STUB(minmax_stub, &minmax);`.
#define FAKEQUANT_REGISTER_STUB(stub, kernel)                                                               \
  static const ::fakequant::cpu::StubRegistration stub##_registration(::fakequant::cpu::stub, kCapability, \
                                                                      kernel)
