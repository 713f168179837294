// Whether this compiler builds the AVX2 variant of the CPU kernels
// (x86-64 with GCC or Clang: target pragmas and __builtin_cpu_supports).
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define EQUITUNE_CPU_AVX2 1
#else
#define EQUITUNE_CPU_AVX2 0
#endif

#include <string>

namespace equitune_ext {
// "avx2" or "default": which build of the CPU kernels runs now.
const char* cpu_kernel_isa();
// "default" forces the baseline build (tests use it to cover both), "auto" picks the best.
void set_cpu_kernel_isa(const std::string& isa);
}  // namespace equitune_ext
