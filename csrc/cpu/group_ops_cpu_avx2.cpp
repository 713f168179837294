// The AVX2+FMA build of the CPU kernels (see group_ops_cpu_kernels.h). Every
// header is included before the target pragma, so only this file's own
// functions (in namespace cpu_avx2) are compiled for AVX2; group_ops_cpu.cpp
// calls them only on CPUs that have it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#include "../group_ops.h"
#include "cpu_isa.h"

#if EQUITUNE_CPU_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define EQUI_CPU_NS cpu_avx2
#include "group_ops_cpu_kernels.h"
#include "volume_ops_cpu_kernels.h"
#undef EQUI_CPU_NS

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // EQUITUNE_CPU_AVX2
