// CUDA kernels of the volume ops (volume_transform, volume_average and their
// _rows forms: [N, C, D, H, W], cube codes).
//
// Flat kernels on the maps of ../index.h: one thread per output element, in
// the output's memory order (contiguous [N, C, D, H, W] or channels_last_3d
// [N, D, H, W, C]), so writes are coalesced; reads follow each element's map
// (coalesced for flips, strided for elements that permute the axes). The
// host computes the 48 codes' maps on the input once per call and passes
// them by value, so a thread's index work is its coordinates and one dot
// product. Offsets are 64-bit; loops are grid-stride so any size launches.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../group_ops.h"
#include "launch.cuh"

namespace equitune_ext {
namespace {

constexpr int kThreads = 256;

// The map of every cube code on the input view [N, C, D, H, W] (1.5 KiB of kernel parameters).
struct VolumeMaps {
  StridedMap<3> by_code[kNumCubeCodes];
};

// Shapes and strides a thread needs; `cube`: D == H == W, which per-row codes
// need for any code that permutes (volume_row_code keeps others in bounds).
struct VolumeShape {
  int64_t B, C, D, H, W, sN, sC;
  bool channels_last, cube;
};

// Coordinates (n, c, d, h, w) of output element idx in the output's memory order.
struct Coords {
  int64_t n, c, d, h, w;
};

__device__ __forceinline__ Coords coords_of(int64_t idx, const VolumeShape& s) {
  Coords k;
  if (s.channels_last) {
    k.c = idx % s.C, idx /= s.C;
    k.w = idx % s.W, idx /= s.W;
    k.h = idx % s.H, idx /= s.H;
    k.d = idx % s.D, k.n = idx / s.D;
  } else {
    k.w = idx % s.W, idx /= s.W;
    k.h = idx % s.H, idx /= s.H;
    k.d = idx % s.D, idx /= s.D;
    k.c = idx % s.C, k.n = idx / s.C;
  }
  return k;
}

// The input offset, within block row (g*B + b)'s volume origin, of output (c, d, h, w) under element g.
__device__ __forceinline__ int64_t source_offset(const VolumeMaps& maps, const CodeList& codes,
                                                 const int64_t* __restrict__ row_codes, int64_t g, int64_t b,
                                                 const VolumeShape& s, const Coords& k) {
  const int code = row_codes ? volume_row_code(row_codes[g * s.B + b], s.cube) : codes.code[g];
  const StridedMap<3>& m = maps.by_code[code];
  return k.c * s.sC + m.offset + k.d * m.step[0] + k.h * m.step[1] + k.w * m.step[2];
}

// out[(g*B + b), c, d, h, w] = op(w[g, b] * x[b, c, src_g(d, h, w)])
template <typename Op, typename T = typename Op::value_t, typename Wt = typename Op::weight_t>
__global__ void volume_transform_kernel(const T* __restrict__ x, T* __restrict__ out, const Wt* __restrict__ weights,
                                        CodeList codes, const int64_t* __restrict__ row_codes, VolumeMaps maps,
                                        VolumeShape s, int64_t numel, Op op) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const Coords k = coords_of(idx, s);
    const int64_t g = k.n / s.B, b = k.n % s.B;
    const Op op_g = weights ? op.with_factor(weights[g * s.B + b]) : op;
    out[idx] = op_g(x[b * s.sN + source_offset(maps, codes, row_codes, g, b, s, k)]);
  }
}

// out[b, c, d, h, w] = scale * Σ_g w[g, b] y[(g*B + b), c, src_g(d, h, w)]
template <typename scalar_t>
__global__ void volume_average_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                      const at::opmath_type<scalar_t>* __restrict__ weights, CodeList codes,
                                      const int64_t* __restrict__ row_codes, int64_t group_size, VolumeMaps maps,
                                      VolumeShape s, int64_t numel, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const Coords k = coords_of(idx, s);
    const int64_t b = k.n;
    acc_t acc = 0;
    for (int64_t g = 0; g < group_size; ++g) {
      const acc_t w = weights ? weights[g * s.B + b] : acc_t(1);
      acc += w * static_cast<acc_t>(y[(g * s.B + b) * s.sN + source_offset(maps, codes, row_codes, g, b, s, k)]);
    }
    out[idx] = static_cast<scalar_t>(acc * scale);
  }
}

at::Tensor run_planned(const GroupOpPlan& plan, double scale, bool is_average, const char* op_name) {
  if (plan.out.numel() == 0) return plan.out;
  const at::Tensor& v = plan.in_view;
  const int64_t extent[3] = {v.size(2), v.size(3), v.size(4)}, stride[3] = {v.stride(2), v.stride(3), v.stride(4)};
  VolumeMaps maps;
  for (int code = 0; code < kNumCubeCodes; ++code) maps.by_code[code] = volume_map(code, extent, stride);
  const VolumeShape s{plan.batch,  v.size(1), v.size(2), v.size(3), v.size(4), v.stride(0),
                      v.stride(1), plan.channels_last, extent[0] == extent[1] && extent[1] == extent[2]};
  // Per-block codes come by value; per-row ones from the table (plan.codes is all 0 then).
  const CodeList codes = make_code_list(plan, op_name);
  const int64_t* rc = plan.row_code_table.defined() ? plan.row_code_table.const_data_ptr<int64_t>() : nullptr;
  const int64_t numel = plan.out.numel();
  const int64_t blocks = grid_size((numel + kThreads - 1) / kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (is_average) {
    dispatch_average(plan, [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* w = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
      volume_average_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          v.const_data_ptr<scalar_t>(), plan.out.mutable_data_ptr<scalar_t>(), w, codes, rc, plan.group_size, maps, s,
          numel, static_cast<acc_t>(scale));
    });
  } else {
    dispatch_transform(plan, scale, op_name, [&](const auto& op) {
      using Op = std::decay_t<decltype(op)>;
      using T = typename Op::value_t;
      using Wt = typename Op::weight_t;
      const Wt* w = plan.weights.defined() ? plan.weights.const_data_ptr<Wt>() : nullptr;
      volume_transform_kernel<Op><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(v.const_data_ptr()), static_cast<T*>(plan.out.mutable_data_ptr()), w, codes, rc, maps,
          s, numel, op);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan.out;
}

void check_cuda(const at::Tensor& t, const char* entry) {
  TORCH_CHECK(t.is_cuda(), entry, ": expected a CUDA tensor, got ", t.device());
}

}  // namespace

at::Tensor volume_transform_cuda(const at::Tensor& x, at::IntArrayRef elements, double scale,
                                 const std::optional<at::Tensor>& weights) {
  check_cuda(x, "volume_transform_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  return run_planned(plan_group_op(x, elements, scale, weights, false, "volume_transform", 3), scale, false,
                     "volume_transform");
}

at::Tensor volume_average_cuda(const at::Tensor& y, at::IntArrayRef elements, double scale,
                               const std::optional<at::Tensor>& weights) {
  check_cuda(y, "volume_average_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(y.device());
  return run_planned(plan_group_op(y, elements, scale, weights, true, "volume_average", 3), scale, true,
                     "volume_average");
}

at::Tensor volume_transform_rows_cuda(const at::Tensor& x, const at::Tensor& codes, double scale,
                                      const std::optional<at::Tensor>& weights) {
  check_cuda(x, "volume_transform_rows_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  return run_planned(plan_group_rows_op(x, codes, scale, weights, false, "volume_transform_rows", 3), scale, false,
                     "volume_transform_rows");
}

at::Tensor volume_average_rows_cuda(const at::Tensor& y, const at::Tensor& codes, double scale,
                                    const std::optional<at::Tensor>& weights) {
  check_cuda(y, "volume_average_rows_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(y.device());
  return run_planned(plan_group_rows_op(y, codes, scale, weights, true, "volume_average_rows", 3), scale, true,
                     "volume_average_rows");
}

TORCH_LIBRARY_IMPL(equitune_ext, CUDA, m) {
  m.impl("volume_transform", &volume_transform_cuda);
  m.impl("volume_average", &volume_average_cuda);
  m.impl("volume_transform_rows", &volume_transform_rows_cuda);
  m.impl("volume_average_rows", &volume_average_rows_cuda);
}

}  // namespace equitune_ext
