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
//  * whole plane (planar, the plane fits in shared memory; the usual feature
//    maps, e.g. 56x56): one block per plane. The block stages the plane in
//    shared memory once (rows padded to W+1 words, so the column walks of odd
//    rotations hit different banks), then runs over the output plane(s) in
//    memory order, VEC consecutive elements per thread (16-byte vector loads
//    and stores when rows allow). Index maths are 32-bit inside a plane, with
//    the per-element affine map hoisted out of the loop; the tiled kernels
//    below evaluate it per element in 64 bits and leave the memory system idle
//    between (18-30% of copy bandwidth on an H200: benchmarks/README.md).
//  * element-wise (out channels_last, [N, H, W, C]): one thread per output
//    element in memory order; consecutive threads move consecutive channels,
//    which are contiguous in the input too.
// Offsets of planes are 64-bit; loops are grid-stride so any size launches.
#include <ATen/Dispatch.h>
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE
// headers that a bare CUDA toolkit (as in CI) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../group_ops.h"
#include "launch.cuh"

namespace equitune_ext {
namespace {

// 32x32 tiles, 32x8 threads (each thread 4 rows): one warp per tile row gives
// 128-byte coalesced float accesses; +1 column of padding keeps the column
// reads of transposing elements free of bank conflicts.
constexpr int kTile = 32;
constexpr int kBlockRows = 8;
constexpr int kThreadsElementwise = 256;

// The code of block (g, b): the per-block list, or with per-row ops (row_codes
// non-null) the [G, B] table's entry, read through row_code (index.h) so that
// any value keeps accesses in bounds.
__device__ __forceinline__ int block_code(const CodeList& codes, const int64_t* __restrict__ row_codes, int64_t g,
                                          int64_t b, int64_t B, bool square) {
  return row_codes ? row_code(row_codes[g * B + b], square) : codes.code[g];
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- whole-plane kernels ---------------------------------------------------

// Planes whose padded copy takes at most this many elements and bytes use the
// whole-plane kernels (the average keeps kPlaneMaxElems / kPlaneThreads output
// elements per thread in registers).
constexpr int kPlaneMaxElems = 4096;
constexpr int64_t kPlaneMaxBytes = 48 * 1024;  // the default dynamic shared-memory limit
constexpr int kPlaneThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Where thread `tid`'s first VEC-vector of a plane with rows of `width`
// elements lies, and how far one block-wide step of `step` elements moves it.
struct PlaneWalk {
  int row, col, d_row, d_col;
  __device__ PlaneWalk(int first, int step, int width)
      : row(first / width), col(first - (first / width) * width), d_row(step / width), d_col(step - (step / width) * width) {}
  __device__ void advance(int width) {
    row += d_row;
    col += d_col;
    if (col >= width) {
      col -= width;
      ++row;
    }
  }
};

// Copies plane `src` (any strides; rows of W elements) into shared memory rows
// of pitch W+1. VEC > 1 only when rows are contiguous and vector-aligned.
template <int VEC, typename T>
__device__ __forceinline__ void stage_plane(T* tile, const T* __restrict__ src, int H, int W, int64_t sH, int64_t sW) {
  const int pitch = W + 1, elems = H * W, step = int(blockDim.x) * VEC;
  PlaneWalk at(int(threadIdx.x) * VEC, step, W);
  for (int o = int(threadIdx.x) * VEC; o < elems; o += step, at.advance(W)) {
    T* dst = tile + at.row * pitch + at.col;
    if (VEC > 1) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(src + at.row * sH + at.col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dst[k] = v.v[k];
    } else {
      dst[0] = src[at.row * sH + at.col * sW];
    }
  }
}

// out[(g*B + b), c] = op(Γ(code_g) x[b, c]) for every g, one block per input plane.
template <int VEC, typename Op, typename T = typename Op::value_t, typename Wt = typename Op::weight_t>
__global__ void group_transform_plane_kernel(const T* __restrict__ x, T* __restrict__ out, const Wt* __restrict__ weights,
                                             CodeList codes, const int64_t* __restrict__ row_codes, int64_t B, int64_t C, int H, int W, int64_t sN,
                                             int64_t sC, int64_t sH, int64_t sW, int64_t num_planes, Op op) {
  extern __shared__ __align__(16) unsigned char plane_smem[];
  T* tile = reinterpret_cast<T*>(plane_smem);
  const int Wo = int(output_width(codes.code[0], H, W)), elems = H * W, step = int(blockDim.x) * VEC;
  for (int64_t plane = blockIdx.x; plane < num_planes; plane += gridDim.x) {
    const int64_t b = plane / C, c = plane % C;
    stage_plane<VEC>(tile, x + b * sN + c * sC, H, W, sH, sW);
    __syncthreads();
    for (int g = 0; g < codes.n; ++g) {
      // output (i, j) reads tile[off + i*rs + j*cs]
      const PlaneMap m = source_plane_map(block_code(codes, row_codes, g, b, B, H == W), H, W, W + 1, 1);
      const int off = int(m.offset), rs = int(m.row_step), cs = int(m.col_step);
      T* dst = out + ((g * B + b) * C + c) * int64_t(elems);
      const Op op_g = weights ? op.with_factor(weights[g * B + b]) : op;
      PlaneWalk at(int(threadIdx.x) * VEC, step, Wo);
      for (int o = int(threadIdx.x) * VEC; o < elems; o += step, at.advance(Wo)) {
        const int s = off + at.row * rs + at.col * cs;
        Vec<T, VEC> v;
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.v[k] = op_g(tile[s + k * cs]);
        *reinterpret_cast<Vec<T, VEC>*>(dst + o) = v;
      }
    }
    __syncthreads();  // the next plane overwrites `tile`
  }
}

// out[b, c] = scale * Σ_g w[g, b] Γ(code_g) y[(g*B + b), c], one block per output plane;
// each thread keeps its output elements' sums in registers across the |G| planes.
template <int VEC, typename scalar_t>
__global__ void group_average_plane_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                           const at::opmath_type<scalar_t>* __restrict__ weights, CodeList codes, const int64_t* __restrict__ row_codes,
                                           int64_t B, int64_t C, int H, int W, int64_t sN, int64_t sC, int64_t sH,
                                           int64_t sW, int64_t num_planes, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kIters = kPlaneMaxElems / (kPlaneThreads * VEC);
  extern __shared__ __align__(16) unsigned char plane_smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(plane_smem);
  const int Wo = int(output_width(codes.code[0], H, W)), elems = H * W, step = int(blockDim.x) * VEC;
  for (int64_t plane = blockIdx.x; plane < num_planes; plane += gridDim.x) {
    const int64_t b = plane / C, c = plane % C;
    acc_t acc[kIters][VEC];
#pragma unroll
    for (int it = 0; it < kIters; ++it)
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[it][k] = acc_t(0);
    for (int g = 0; g < codes.n; ++g) {
      stage_plane<VEC>(tile, y + (g * B + b) * sN + c * sC, H, W, sH, sW);
      __syncthreads();
      const PlaneMap m = source_plane_map(block_code(codes, row_codes, g, b, B, H == W), H, W, W + 1, 1);
      const int off = int(m.offset), rs = int(m.row_step), cs = int(m.col_step);
      const acc_t w = weights ? weights[g * B + b] : acc_t(1);
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int o = int(threadIdx.x) * VEC + it * step;
        if (o < elems) {
          const int i = o / Wo, j = o - i * Wo;
          const int s = off + i * rs + j * cs;
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[it][k] += w * static_cast<acc_t>(tile[s + k * cs]);
        }
      }
      __syncthreads();  // the next element overwrites `tile`
    }
    scalar_t* dst = out + plane * int64_t(elems);
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int o = int(threadIdx.x) * VEC + it * step;
      if (o < elems) {
        Vec<scalar_t, VEC> v;
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.v[k] = static_cast<scalar_t>(acc[it][k] * scale);
        *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + o) = v;
      }
    }
  }
}

// ---- tiled kernels (planes too large for the whole-plane kernels) -------------

// out[(g*B + b), c, i, j] = op(x[b, c, src_g(i, j)])
template <typename Op, typename T = typename Op::value_t, typename Wt = typename Op::weight_t>
__global__ void group_transform_planar_kernel(const T* __restrict__ x, T* __restrict__ out, const Wt* __restrict__ weights,
                                              CodeList codes, const int64_t* __restrict__ row_codes, int64_t B,
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
      const int code = block_code(codes, row_codes, g, b, B, H == W);
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
                                            const at::opmath_type<scalar_t>* __restrict__ weights, CodeList codes, const int64_t* __restrict__ row_codes,
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
      const CoordMap to_in = source_coords(block_code(codes, row_codes, g, b, B, H == W), H, W);
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
                                                     const Wt* __restrict__ weights, CodeList codes, const int64_t* __restrict__ row_codes,
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
    const PlaneMap m = source_plane_map(block_code(codes, row_codes, g, b, B, H == W), H, W, sH, sW);
    const Op op_g = weights ? op.with_factor(weights[g * B + b]) : op;
    out[idx] = op_g(x[b * sN + c * sC + m.offset + i * m.row_step + j * m.col_step]);
  }
}

// channels_last: out[b, i, j, c] = scale * Σ_g y[(g*B + b), c, src_g(i, j)].
template <typename scalar_t>
__global__ void group_average_channels_last_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ out,
                                                   const at::opmath_type<scalar_t>* __restrict__ weights, CodeList codes, const int64_t* __restrict__ row_codes, int64_t B, int64_t C, int64_t H, int64_t W,
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
      const PlaneMap m = source_plane_map(block_code(codes, row_codes, g, b, B, H == W), H, W, sH, sW);
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
  const at::Tensor& t = plan.in_view;
  return {plan.batch,  t.size(1),   t.size(2),   t.size(3),           t.stride(0),
          t.stride(1), t.stride(2), t.stride(3), plan.out_view.size(2), plan.out_view.size(3)};
}

// Whether the whole-plane kernels take this call, with what vector width,
// block size and shared memory.
struct PlaneLaunch {
  bool fits = false;
  int vec = 1, threads = kPlaneThreads;
  size_t smem_bytes = 0;
};

PlaneLaunch plane_launch(const GroupOpPlan& plan, size_t elem_size) {
  const Geometry q = geometry(plan);
  PlaneLaunch pl;
  const int64_t padded = q.H * (q.W + 1);
  pl.smem_bytes = size_t(padded) * elem_size;
  pl.fits = q.H * q.W <= kPlaneMaxElems && int64_t(pl.smem_bytes) <= kPlaneMaxBytes;
  if (!pl.fits) return pl;
  // Vectors: rows contiguous, every row of input and output starting on a
  // vector (plane sides and row/plane strides multiples of VEC, aligned bases).
  const auto in_addr = reinterpret_cast<uintptr_t>(plan.in_view.const_data_ptr());
  const auto out_addr = reinterpret_cast<uintptr_t>(plan.out_view.const_data_ptr());
  for (int v : {4, 2}) {
    const size_t bytes = v * elem_size;
    if (bytes > 16) continue;
    if (q.sW == 1 && q.H % v == 0 && q.W % v == 0 && q.sH % v == 0 && q.sC % v == 0 && q.sN % v == 0 &&
        in_addr % bytes == 0 && out_addr % bytes == 0) {
      pl.vec = v;
      break;
    }
  }
  // Small planes: fewer threads, one vector each.
  const int64_t vectors = (q.H * q.W + pl.vec - 1) / pl.vec;
  pl.threads = int(std::min<int64_t>(kPlaneThreads, (vectors + 31) / 32 * 32));
  TORCH_INTERNAL_ASSERT(pl.threads == kPlaneThreads || int64_t(pl.threads) * pl.vec >= q.H * q.W);
  return pl;
}

template <int V>
using VecWidth = std::integral_constant<int, V>;

template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 4: f(VecWidth<4>{}); break;
    case 2: f(VecWidth<2>{}); break;
    default: f(VecWidth<1>{}); break;
  }
}

// The kernels of one op, so that one launcher serves both: the transform's
// take an Op (copy or scale) and tile its input, the average's take the scale
// and tile its output.
template <typename Op>
struct TransformKernels {
  using value_t = typename Op::value_t;
  using weight_t = typename Op::weight_t;
  using extra_t = Op;
  static constexpr bool kTilesOutput = false;
  static constexpr auto channels_last = &group_transform_channels_last_kernel<Op>;
  template <int V>
  static constexpr auto plane() { return &group_transform_plane_kernel<V, Op>; }
  static constexpr auto planar = &group_transform_planar_kernel<Op>;
};

template <typename scalar_t>
struct AverageKernels {
  using value_t = scalar_t;
  using weight_t = at::opmath_type<scalar_t>;
  using extra_t = at::opmath_type<scalar_t>;
  static constexpr bool kTilesOutput = true;
  static constexpr auto channels_last = &group_average_channels_last_kernel<scalar_t>;
  template <int V>
  static constexpr auto plane() { return &group_average_plane_kernel<V, scalar_t>; }
  static constexpr auto planar = &group_average_planar_kernel<scalar_t>;
};

template <typename Kernels>
void launch_op(const GroupOpPlan& plan, const CodeList& codes, typename Kernels::extra_t extra) {
  using T = typename Kernels::value_t;
  using Wt = typename Kernels::weight_t;
  const Geometry q = geometry(plan);
  const T* in = static_cast<const T*>(plan.in_view.const_data_ptr());
  T* out = static_cast<T*>(plan.out_view.mutable_data_ptr());
  const Wt* w = plan.weights.defined() ? plan.weights.const_data_ptr<Wt>() : nullptr;
  const int64_t* rc = plan.row_code_table.defined() ? plan.row_code_table.const_data_ptr<int64_t>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (plan.channels_last) {
    const int64_t numel = plan.out_view.numel();
    const int64_t blocks = grid_size((numel + kThreadsElementwise - 1) / kThreadsElementwise);
    Kernels::channels_last<<<blocks, kThreadsElementwise, 0, stream>>>(
        in, out, w, codes, rc, q.B, q.C, q.H, q.W, q.sN, q.sC, q.sH, q.sW, numel, extra);
  } else if (const PlaneLaunch pl = plane_launch(plan, sizeof(T)); pl.fits) {
    const int64_t planes = q.B * q.C;
    dispatch_vec(pl.vec, [&](auto vec) {
      const auto kernel = Kernels::template plane<decltype(vec)::value>();
      kernel<<<grid_size(planes), pl.threads, pl.smem_bytes, stream>>>(
          in, out, w, codes, rc, q.B, q.C, int(q.H), int(q.W), q.sN, q.sC, q.sH, q.sW, planes, extra);
    });
  } else {
    const int64_t tiled_h = Kernels::kTilesOutput ? q.Ho : q.H, tiled_w = Kernels::kTilesOutput ? q.Wo : q.W;
    const int64_t tiles_w = (tiled_w + kTile - 1) / kTile, tiles_per_plane = tiles_w * ((tiled_h + kTile - 1) / kTile);
    const int64_t items = q.B * q.C * tiles_per_plane;
    Kernels::planar<<<grid_size(items), dim3(kTile, kBlockRows), 0, stream>>>(
        in, out, w, codes, rc, q.B, q.C, q.H, q.W, q.sN, q.sC, q.sH, q.sW, tiles_w, tiles_per_plane, items, extra);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace {
// Launches a planned op (per-block or per-row codes) on the input's device.
at::Tensor run_planned(const GroupOpPlan& plan, double scale, bool is_average, const char* op_name) {
  if (plan.out.numel() == 0) return plan.out;
  const CodeList codes = make_code_list(plan, op_name);
  if (is_average) {
    dispatch_average(plan, [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_op<AverageKernels<scalar_t>>(plan, codes, static_cast<at::opmath_type<scalar_t>>(scale));
    });
  } else {
    dispatch_transform(plan, scale, op_name,
                       [&](const auto& op) { launch_op<TransformKernels<std::decay_t<decltype(op)>>>(plan, codes, op); });
  }
  return plan.out;
}

void check_cuda(const at::Tensor& t, const char* entry) {
  TORCH_CHECK(t.is_cuda(), entry, ": expected a CUDA tensor, got ", t.device());
}
}  // namespace

at::Tensor group_transform_cuda(const at::Tensor& x, at::IntArrayRef elements, double scale,
                                const std::optional<at::Tensor>& weights) {
  check_cuda(x, "group_transform_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  return run_planned(plan_group_op(x, elements, scale, weights, /*is_average=*/false, "group_transform"), scale, false,
                     "group_transform");
}

at::Tensor group_average_cuda(const at::Tensor& y, at::IntArrayRef elements, double scale,
                              const std::optional<at::Tensor>& weights) {
  check_cuda(y, "group_average_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(y.device());
  return run_planned(plan_group_op(y, elements, scale, weights, /*is_average=*/true, "group_average"), scale, true,
                     "group_average");
}

// The per-row ops: the same kernels, each block's code read from the table.
at::Tensor group_transform_rows_cuda(const at::Tensor& x, const at::Tensor& codes, double scale,
                                     const std::optional<at::Tensor>& weights) {
  check_cuda(x, "group_transform_rows_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(x.device());
  return run_planned(plan_group_rows_op(x, codes, scale, weights, /*is_average=*/false, "group_transform_rows"), scale,
                     false, "group_transform_rows");
}

at::Tensor group_average_rows_cuda(const at::Tensor& y, const at::Tensor& codes, double scale,
                                   const std::optional<at::Tensor>& weights) {
  check_cuda(y, "group_average_rows_cuda");
  const c10::cuda::OptionalCUDAGuard device_guard(y.device());
  return run_planned(plan_group_rows_op(y, codes, scale, weights, /*is_average=*/true, "group_average_rows"), scale,
                     true, "group_average_rows");
}

TORCH_LIBRARY_IMPL(equitune_ext, CUDA, m) {
  m.impl("group_transform", &group_transform_cuda);
  m.impl("group_average", &group_average_cuda);
  m.impl("group_transform_rows", &group_transform_rows_cuda);
  m.impl("group_average_rows", &group_average_rows_cuda);
}

}  // namespace equitune_ext
