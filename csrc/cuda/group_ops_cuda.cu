// CUDA kernels of group_transform and group_average.
//
// Index maths come from ../index.h, the same functions the CPU kernels run
// (so the CPU tests exercise them). Two kernel shapes per op:
//  * planar (out contiguous, [N, C, H, W]): one block per (plane, 32x32 tile).
//    Transform loads an input tile into shared memory once and writes its |G|
//    images from there; average stages each source tile of the |G| inputs in
//    shared memory and accumulates in registers, writing each output once.
//    Both read and write global memory along rows (coalesced) whatever the
//    element does; the transposition happens in shared memory.
//  * element-wise (out channels_last, [N, H, W, C]): one thread per output
//    element in memory order; consecutive threads move consecutive channels,
//    which are contiguous in the input too.
// All offsets are 64-bit; loops are grid-stride so any size launches.
#include <ATen/Dispatch.h>
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE
// headers that a bare CUDA toolkit (as in CI) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../group_ops.h"

namespace equitune_ext {
namespace {

// 32x32 tiles, 32x8 threads (each thread 4 rows): one warp per tile row gives
// 128-byte coalesced float accesses; +1 column of padding keeps the column
// reads of transposing elements free of bank conflicts.
constexpr int kTile = 32;
constexpr int kBlockRows = 8;
constexpr int kThreadsElementwise = 256;
// Codes travel by value in the kernel parameters; larger lists are rejected
// with an error (the image groups have at most 8 elements).
constexpr int kMaxCodes = 64;

struct CodeList {
  int n;
  int8_t code[kMaxCodes];
};

CodeList make_code_list(const GroupOpPlan& plan, const char* op_name) {
  TORCH_CHECK(plan.group_size <= kMaxCodes, op_name, ": the CUDA kernels take at most ", kMaxCodes,
              " group elements, got ", plan.group_size);
  CodeList list{};
  list.n = static_cast<int>(plan.group_size);
  for (int g = 0; g < list.n; ++g) list.code[g] = static_cast<int8_t>(plan.codes[g]);
  return list;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

int64_t grid_size(int64_t work_items) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t cap = int64_t(sm_count) * 32;
  return std::max<int64_t>(1, std::min(work_items, cap));
}

// out[(g*B + b), c, i, j] = op(x[b, c, src_g(i, j)])
template <typename Op, typename T = typename Op::value_t, typename Wt = typename Op::weight_t>
__global__ void group_transform_planar_kernel(const T* __restrict__ x, T* __restrict__ out, const Wt* __restrict__ weights,
                                              CodeList codes, int64_t B,
                                              int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC, int64_t sH,
                                              int64_t sW, int64_t tiles_w, int64_t tiles_per_plane,
                                              int64_t num_items, Op op) {
  __shared__ T tile[kTile][kTile + 1];
  const int64_t Ho = output_height(codes.code[0], H, W), Wo = output_width(codes.code[0], H, W);
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t plane = item / tiles_per_plane, t = item % tiles_per_plane;
    const int64_t r0 = (t / tiles_w) * kTile, c0 = (t % tiles_w) * kTile;
    const int64_t b = plane / C, c = plane % C;
    const T* src = x + b * sN + c * sC;
    for (int r = threadIdx.y; r < kTile; r += kBlockRows) {
      const int64_t a = r0 + r, col = c0 + threadIdx.x;
      if (a < H && col < W) tile[r][threadIdx.x] = src[a * sH + col * sW];
    }
    __syncthreads();
    for (int g = 0; g < codes.n; ++g) {
      const int code = codes.code[g];
      // The tile's image under Γ(code) is a 32x32 square of the output; its
      // corner comes from the inverse map (output coords of an input position).
      const CoordMap to_out = source_coords(code_inverse(code), Ho, Wo);
      const int64_t i0 = min64(map_row(to_out, r0, c0), map_row(to_out, r0 + kTile - 1, c0 + kTile - 1));
      const int64_t j0 = min64(map_col(to_out, r0, c0), map_col(to_out, r0 + kTile - 1, c0 + kTile - 1));
      const CoordMap to_in = source_coords(code, H, W);
      T* dst = out + ((g * B + b) * C + c) * Ho * Wo;
      const Op op_g = weights ? op.with_factor(weights[g * B + b]) : op;
      for (int r = threadIdx.y; r < kTile; r += kBlockRows) {
        const int64_t i = i0 + r, j = j0 + threadIdx.x;
        if (i < 0 || i >= Ho || j < 0 || j >= Wo) continue;
        const int64_t a = map_row(to_in, i, j) - r0, col = map_col(to_in, i, j) - c0;
        dst[i * Wo + j] = op_g(tile[a][col]);
      }
    }
    __syncthreads();
  }
}

// out[b, c, i, j] = scale * Σ_g y[(g*B + b), c, src_g(i, j)]
template <typename scalar_t>
__global__ void group_average_planar_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                            const at::opmath_type<scalar_t>* __restrict__ weights, CodeList codes,
                                            int64_t B, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC,
                                            int64_t sH, int64_t sW, int64_t tiles_w, int64_t tiles_per_plane,
                                            int64_t num_items, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ scalar_t tile[kTile][kTile + 1];
  const int64_t Ho = output_height(codes.code[0], H, W), Wo = output_width(codes.code[0], H, W);
  constexpr int kRowsPerThread = kTile / kBlockRows;
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t plane = item / tiles_per_plane, t = item % tiles_per_plane;
    const int64_t i0 = (t / tiles_w) * kTile, j0 = (t % tiles_w) * kTile;
    const int64_t b = plane / C, c = plane % C;
    acc_t acc[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) acc[k] = acc_t(0);
    for (int g = 0; g < codes.n; ++g) {
      const CoordMap to_in = source_coords(codes.code[g], H, W);
      // Source square of this output tile in y_g: its top-left corner.
      const int64_t a0 = min64(map_row(to_in, i0, j0), map_row(to_in, i0 + kTile - 1, j0 + kTile - 1));
      const int64_t b0 = min64(map_col(to_in, i0, j0), map_col(to_in, i0 + kTile - 1, j0 + kTile - 1));
      const scalar_t* src = y + (g * B + b) * sN + c * sC;
      __syncthreads();  // the previous element's reads of `tile` are done
      for (int r = threadIdx.y; r < kTile; r += kBlockRows) {
        const int64_t a = a0 + r, col = b0 + threadIdx.x;
        if (a >= 0 && a < H && col >= 0 && col < W) tile[r][threadIdx.x] = src[a * sH + col * sW];
      }
      __syncthreads();
      const acc_t w = weights ? weights[g * B + b] : acc_t(1);
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int64_t i = i0 + threadIdx.y + k * kBlockRows, j = j0 + threadIdx.x;
        if (i < Ho && j < Wo) acc[k] += w * static_cast<acc_t>(tile[map_row(to_in, i, j) - a0][map_col(to_in, i, j) - b0]);
      }
    }
    scalar_t* dst = out + plane * Ho * Wo;
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t i = i0 + threadIdx.y + k * kBlockRows, j = j0 + threadIdx.x;
      if (i < Ho && j < Wo) dst[i * Wo + j] = static_cast<scalar_t>(acc[k] * scale);
    }
  }
}

// channels_last: out[(g*B + b), i, j, c] = op(x[b, c, src_g(i, j)]), out in [N, Ho, Wo, C] memory order.
template <typename Op, typename T = typename Op::value_t, typename Wt = typename Op::weight_t>
__global__ void group_transform_channels_last_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                     const Wt* __restrict__ weights, CodeList codes,
                                                     int64_t B, int64_t C, int64_t H, int64_t W, int64_t sN,
                                                     int64_t sC, int64_t sH, int64_t sW, int64_t numel, Op op) {
  const int64_t Ho = output_height(codes.code[0], H, W), Wo = output_width(codes.code[0], H, W);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C;
    int64_t t = idx / C;
    const int64_t j = t % Wo;
    t /= Wo;
    const int64_t i = t % Ho;
    const int64_t n = t / Ho, g = n / B, b = n % B;
    const PlaneMap m = source_plane_map(codes.code[g], H, W, sH, sW);
    const Op op_g = weights ? op.with_factor(weights[g * B + b]) : op;
    out[idx] = op_g(x[b * sN + c * sC + m.offset + i * m.row_step + j * m.col_step]);
  }
}

// channels_last: out[b, i, j, c] = scale * Σ_g y[(g*B + b), c, src_g(i, j)].
template <typename scalar_t>
__global__ void group_average_channels_last_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                                   const at::opmath_type<scalar_t>* __restrict__ weights, CodeList codes, int64_t B, int64_t C, int64_t H, int64_t W,
                                                   int64_t sN, int64_t sC, int64_t sH, int64_t sW, int64_t numel,
                                                   at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Ho = output_height(codes.code[0], H, W), Wo = output_width(codes.code[0], H, W);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C;
    int64_t t = idx / C;
    const int64_t j = t % Wo;
    t /= Wo;
    const int64_t i = t % Ho, b = t / Ho;
    acc_t acc = 0;
    for (int g = 0; g < codes.n; ++g) {
      const PlaneMap m = source_plane_map(codes.code[g], H, W, sH, sW);
      const acc_t w = weights ? weights[g * B + b] : acc_t(1);
      acc += w * static_cast<acc_t>(y[(g * B + b) * sN + c * sC + m.offset + i * m.row_step + j * m.col_step]);
    }
    out[idx] = static_cast<scalar_t>(acc * scale);
  }
}

struct Geometry {
  int64_t B, C, H, W, sN, sC, sH, sW, Ho, Wo;
};

Geometry geometry(const GroupOpPlan& plan) {
  const at::Tensor& t = plan.in4;
  return {plan.batch,  t.size(1),   t.size(2),   t.size(3),           t.stride(0),
          t.stride(1), t.stride(2), t.stride(3), plan.out4.size(2), plan.out4.size(3)};
}

template <typename Op, typename T = typename Op::value_t>
void launch_transform(const GroupOpPlan& plan, const CodeList& codes, const Op& op) {
  const Geometry q = geometry(plan);
  const T* x = static_cast<const T*>(plan.in4.const_data_ptr());
  T* out = static_cast<T*>(plan.out4.mutable_data_ptr());
  using Wt = typename Op::weight_t;
  const Wt* w = plan.weights.defined() ? plan.weights.const_data_ptr<Wt>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (plan.channels_last) {
    const int64_t numel = plan.out4.numel();
    const int64_t blocks = grid_size((numel + kThreadsElementwise - 1) / kThreadsElementwise);
    group_transform_channels_last_kernel<Op><<<blocks, kThreadsElementwise, 0, stream>>>(
        x, out, w, codes, q.B, q.C, q.H, q.W, q.sN, q.sC, q.sH, q.sW, numel, op);
  } else {
    const int64_t tiles_w = (q.W + kTile - 1) / kTile, tiles_per_plane = tiles_w * ((q.H + kTile - 1) / kTile);
    const int64_t items = q.B * q.C * tiles_per_plane;
    group_transform_planar_kernel<Op><<<grid_size(items), dim3(kTile, kBlockRows), 0, stream>>>(
        x, out, w, codes, q.B, q.C, q.H, q.W, q.sN, q.sC, q.sH, q.sW, tiles_w, tiles_per_plane, items, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_average(const GroupOpPlan& plan, const CodeList& codes, double scale) {
  const Geometry q = geometry(plan);
  const scalar_t* y = plan.in4.const_data_ptr<scalar_t>();
  scalar_t* out = plan.out4.mutable_data_ptr<scalar_t>();
  const auto s = static_cast<at::opmath_type<scalar_t>>(scale);
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* w = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (plan.channels_last) {
    const int64_t numel = plan.out4.numel();
    const int64_t blocks = grid_size((numel + kThreadsElementwise - 1) / kThreadsElementwise);
    group_average_channels_last_kernel<scalar_t><<<blocks, kThreadsElementwise, 0, stream>>>(
        y, out, w, codes, q.B, q.C, q.H, q.W, q.sN, q.sC, q.sH, q.sW, numel, s);
  } else {
    const int64_t tiles_w = (q.Wo + kTile - 1) / kTile, tiles_per_plane = tiles_w * ((q.Ho + kTile - 1) / kTile);
    const int64_t items = q.B * q.C * tiles_per_plane;
    group_average_planar_kernel<scalar_t><<<grid_size(items), dim3(kTile, kBlockRows), 0, stream>>>(
        y, out, w, codes, q.B, q.C, q.H, q.W, q.sN, q.sC, q.sH, q.sW, tiles_w, tiles_per_plane, items, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor group_transform_cuda(const at::Tensor& x, at::IntArrayRef elements, double scale,
                                const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(x.is_cuda(), "group_transform_cuda: expected a CUDA tensor, got ", x.device());
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  GroupOpPlan plan = plan_group_op(x, elements, scale, weights, /*is_average=*/false, "group_transform");
  if (plan.out.numel() == 0) return plan.out;
  const CodeList codes = make_code_list(plan, "group_transform");
  if (scale == 1.0 && !plan.weights.defined()) {
    dispatch_by_element_size(x, "group_transform",
                             [&](auto tag) { launch_transform(plan, codes, CopyOp<decltype(tag)>{}); });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_transform_cuda", [&] {
      launch_transform(plan, codes, ScaleOp<scalar_t>{static_cast<at::opmath_type<scalar_t>>(scale)});
    });
  }
  return plan.out;
}

at::Tensor group_average_cuda(const at::Tensor& y, at::IntArrayRef elements, double scale,
                              const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(y.is_cuda(), "group_average_cuda: expected a CUDA tensor, got ", y.device());
  const c10::cuda::OptionalCUDAGuard device_guard(y.device());
  GroupOpPlan plan = plan_group_op(y, elements, scale, weights, /*is_average=*/true, "group_average");
  if (plan.out.numel() == 0) return plan.out;
  const CodeList codes = make_code_list(plan, "group_average");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "group_average_cuda",
                                  [&] { launch_average<scalar_t>(plan, codes, scale); });
  return plan.out;
}

TORCH_LIBRARY_IMPL(equitune_ext, CUDA, m) {
  m.impl("group_transform", &group_transform_cuda);
  m.impl("group_average", &group_average_cuda);
}

}  // namespace equitune_ext
