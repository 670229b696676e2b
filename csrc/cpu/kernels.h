// Every family's CPU kernels, compiled once per instruction set: kernels.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp define FAKEQUANT_CPU_VARIANT and include this list. A new family adds its header here.
#pragma once

#ifndef FAKEQUANT_CPU_VARIANT
#error "kernels.h is for kernels.cpp, kernels_avx2.cpp and kernels_avx512.cpp; host code includes a family header"
#endif

#include "cpu/bn_fold_kernels.h"
#include "cpu/fake_quant_kernels.h"
#include "cpu/float_formats_kernels.h"
#include "cpu/learnable_kernels.h"
#include "cpu/observe_kernels.h"
