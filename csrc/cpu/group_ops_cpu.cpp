// CPU entry points of the image ops (group_transform, group_average and their
// _rows forms) and the volume ops (volume_*): argument checks and the run-time
// choice between the baseline and the AVX2 build of the kernels
// (group_ops_cpu_kernels.h, volume_ops_cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#include "../group_ops.h"
#include "cpu_isa.h"

#define EQUI_CPU_NS cpu_default
#include "group_ops_cpu_kernels.h"
#include "volume_ops_cpu_kernels.h"
#undef EQUI_CPU_NS

namespace equitune_ext {

#if EQUITUNE_CPU_AVX2
namespace cpu_avx2 {
void run(const GroupOpPlan& plan, double scale, bool is_average);
}  // namespace cpu_avx2
#endif

namespace {
bool cpu_has_avx2() {
#if EQUITUNE_CPU_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2;
#else
  return false;
#endif
}
// Tests force the baseline build with set_cpu_kernel_isa("default").
std::atomic<bool> force_default{false};

bool use_avx2() { return cpu_has_avx2() && !force_default.load(std::memory_order_relaxed); }
}  // namespace

const char* cpu_kernel_isa() { return use_avx2() ? "avx2" : "default"; }

void set_cpu_kernel_isa(const std::string& isa) {
  TORCH_CHECK(isa == "default" || isa == "auto", "set_cpu_kernel_isa: expected 'default' or 'auto', got '", isa, "'");
  force_default.store(isa == "default");
}

namespace {
// Runs a planned op on this CPU's build of the kernels.
at::Tensor run_planned(const GroupOpPlan& plan, double scale, bool is_average) {
  if (plan.out.numel() == 0) return plan.out;
#if EQUITUNE_CPU_AVX2
  if (use_avx2()) {
    cpu_avx2::run(plan, scale, is_average);
    return plan.out;
  }
#endif
  cpu_default::run(plan, scale, is_average);
  return plan.out;
}

void check_cpu(const at::Tensor& t, const char* entry) {
  TORCH_CHECK(t.device().is_cpu(), entry, ": expected a CPU tensor, got ", t.device());
}
}  // namespace

at::Tensor group_transform_cpu(const at::Tensor& x, at::IntArrayRef elements, double scale,
                               const std::optional<at::Tensor>& weights) {
  check_cpu(x, "group_transform_cpu");
  return run_planned(plan_group_op(x, elements, scale, weights, /*is_average=*/false, "group_transform"), scale, false);
}

at::Tensor group_average_cpu(const at::Tensor& y, at::IntArrayRef elements, double scale,
                             const std::optional<at::Tensor>& weights) {
  check_cpu(y, "group_average_cpu");
  return run_planned(plan_group_op(y, elements, scale, weights, /*is_average=*/true, "group_average"), scale, true);
}

// The per-row ops run the same kernels: the plan gives each (g, b) block its code.
at::Tensor group_transform_rows_cpu(const at::Tensor& x, const at::Tensor& codes, double scale,
                                    const std::optional<at::Tensor>& weights) {
  check_cpu(x, "group_transform_rows_cpu");
  return run_planned(plan_group_rows_op(x, codes, scale, weights, /*is_average=*/false, "group_transform_rows"), scale,
                     false);
}

at::Tensor group_average_rows_cpu(const at::Tensor& y, const at::Tensor& codes, double scale,
                                  const std::optional<at::Tensor>& weights) {
  check_cpu(y, "group_average_rows_cpu");
  return run_planned(plan_group_rows_op(y, codes, scale, weights, /*is_average=*/true, "group_average_rows"), scale,
                     true);
}

// The volume ops: the same plans with cube codes on [N, *, D, H, W].
at::Tensor volume_transform_cpu(const at::Tensor& x, at::IntArrayRef elements, double scale,
                                const std::optional<at::Tensor>& weights) {
  check_cpu(x, "volume_transform_cpu");
  return run_planned(plan_group_op(x, elements, scale, weights, false, "volume_transform", 3), scale, false);
}

at::Tensor volume_average_cpu(const at::Tensor& y, at::IntArrayRef elements, double scale,
                              const std::optional<at::Tensor>& weights) {
  check_cpu(y, "volume_average_cpu");
  return run_planned(plan_group_op(y, elements, scale, weights, true, "volume_average", 3), scale, true);
}

at::Tensor volume_transform_rows_cpu(const at::Tensor& x, const at::Tensor& codes, double scale,
                                     const std::optional<at::Tensor>& weights) {
  check_cpu(x, "volume_transform_rows_cpu");
  return run_planned(plan_group_rows_op(x, codes, scale, weights, false, "volume_transform_rows", 3), scale, false);
}

at::Tensor volume_average_rows_cpu(const at::Tensor& y, const at::Tensor& codes, double scale,
                                   const std::optional<at::Tensor>& weights) {
  check_cpu(y, "volume_average_rows_cpu");
  return run_planned(plan_group_rows_op(y, codes, scale, weights, true, "volume_average_rows", 3), scale, true);
}

TORCH_LIBRARY_IMPL(equitune_ext, CPU, m) {
  m.impl("group_transform", &group_transform_cpu);
  m.impl("group_average", &group_average_cpu);
  m.impl("group_transform_rows", &group_transform_rows_cpu);
  m.impl("group_average_rows", &group_average_rows_cpu);
  m.impl("volume_transform", &volume_transform_cpu);
  m.impl("volume_average", &volume_average_cpu);
  m.impl("volume_transform_rows", &volume_transform_rows_cpu);
  m.impl("volume_average_rows", &volume_average_rows_cpu);
}

}  // namespace equitune_ext
