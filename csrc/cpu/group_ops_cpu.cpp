// CPU kernels of group_transform and group_average.
//
// Two memory layouts, chosen by the output's layout (see group_ops.h):
//  * planar  (out contiguous, [N, C, H, W]): work item = one (b, c) plane; the
//    input may have any strides. Transform reads the input plane once and
//    writes its |G| images while it is hot in cache; average accumulates the
//    |G| source planes tile by tile in a small float buffer and writes each
//    output element once.
//  * pixel   (out channels_last, [N, H, W, C]): work item = one output row;
//    each pixel moves a run of C channels.
// Elements that transpose (odd rotations) read the source along columns: the
// planar loops then go tile by tile so that the rows they touch stay in L1.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../group_ops.h"

namespace equitune_ext {
namespace {

// 64 x 64 tiles: a float accumulator tile (16 KiB) plus the 64 source rows a
// transposing element touches stay within a 48 KiB L1. 32 and 128 measured
// no better on the benchmark shapes (56x56 planes fit one tile anyway).
constexpr int64_t kTile = 64;

// dst[i*Wo + j] = op(src[m.offset + i*m.row_step + j*m.col_step]) for one plane.
template <typename Op, typename T = typename Op::value_t>
void transform_plane(T* __restrict dst, const T* __restrict src, const PlaneMap& m, int64_t Ho, int64_t Wo,
                     bool transposes, const Op& op) {
  if (!transposes) {  // rows map to rows: stream row by row
    for (int64_t i = 0; i < Ho; ++i) {
      const T* s = src + m.offset + i * m.row_step;
      T* d = dst + i * Wo;
      if (m.col_step == 1) {
        for (int64_t j = 0; j < Wo; ++j) d[j] = op(s[j]);
      } else if (m.col_step == -1) {
        for (int64_t j = 0; j < Wo; ++j) d[j] = op(s[-j]);
      } else {
        for (int64_t j = 0; j < Wo; ++j) d[j] = op(s[j * m.col_step]);
      }
    }
    return;
  }
  // Output rows run along input columns. Inside a tile, walk the input
  // contiguously (i inner: row_step is the input's column stride) and scatter
  // into the tile's output rows, which all stay in L1.
  for (int64_t i0 = 0; i0 < Ho; i0 += kTile) {
    const int64_t i1 = std::min(i0 + kTile, Ho);
    for (int64_t j0 = 0; j0 < Wo; j0 += kTile) {
      const int64_t j1 = std::min(j0 + kTile, Wo);
      for (int64_t j = j0; j < j1; ++j) {
        const T* s = src + m.offset + j * m.col_step;
        T* d = dst + j;
        if (m.row_step == 1) {
          for (int64_t i = i0; i < i1; ++i) d[i * Wo] = op(s[i]);
        } else if (m.row_step == -1) {
          for (int64_t i = i0; i < i1; ++i) d[i * Wo] = op(s[-i]);
        } else {
          for (int64_t i = i0; i < i1; ++i) d[i * Wo] = op(s[i * m.row_step]);
        }
      }
    }
  }
}

template <typename Op, typename T = typename Op::value_t>
void transform_kernel(const GroupOpPlan& plan, const Op& op) {
  const at::Tensor& x = plan.in4;
  const T* x_ptr = static_cast<const T*>(x.const_data_ptr());
  T* out_ptr = static_cast<T*>(plan.out4.mutable_data_ptr());
  const int64_t B = plan.batch, C = x.size(1), H = x.size(2), W = x.size(3), G = plan.group_size;
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t Ho = plan.out4.size(2), Wo = plan.out4.size(3);
  std::vector<PlaneMap> maps;
  for (int code : plan.codes) maps.push_back(source_plane_map(code, H, W, sH, sW));

  if (!plan.channels_last) {
    // out[(g*B + b), c] = op(Γ_g x[b, c]); the x plane is read for all g while hot.
    const int64_t plane = Ho * Wo;
    at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        const T* src = x_ptr + b * sN + c * sC;
        for (int64_t g = 0; g < G; ++g) {
          T* dst = out_ptr + ((g * B + b) * C + c) * plane;
          transform_plane(dst, src, maps[g], Ho, Wo, code_transposes(plan.codes[g]), op);
        }
      }
    });
    return;
  }
  // channels_last: out[(g*B + b), i, j, :] = op(x[b, src_g(i, j), :]).
  const int64_t row = Wo * C;
  at::parallel_for(0, B * Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      for (int64_t g = 0; g < G; ++g) {
        const PlaneMap& m = maps[g];
        const T* src = x_ptr + b * sN + m.offset + i * m.row_step;
        T* dst = out_ptr + ((g * B + b) * Ho + i) * row;
        for (int64_t j = 0; j < Wo; ++j) {
          const T* s = src + j * m.col_step;
          T* d = dst + j * C;
          if (sC == 1) {
            for (int64_t c = 0; c < C; ++c) d[c] = op(s[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) d[c] = op(s[c * sC]);
          }
        }
      }
    }
  });
}

// acc[ii*kTile + jj] += src[m.offset + i*m.row_step + j*m.col_step] over one tile.
template <typename scalar_t, typename acc_t>
void accumulate_tile(acc_t* __restrict acc, const scalar_t* __restrict src, const PlaneMap& m, int64_t i0, int64_t i1,
                     int64_t j0, int64_t j1, bool transposes) {
  if (!transposes) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* s = src + m.offset + i * m.row_step;
      acc_t* a = acc + (i - i0) * kTile - j0;
      if (m.col_step == 1) {
        for (int64_t j = j0; j < j1; ++j) a[j] += static_cast<acc_t>(s[j]);
      } else if (m.col_step == -1) {
        for (int64_t j = j0; j < j1; ++j) a[j] += static_cast<acc_t>(s[-j]);
      } else {
        for (int64_t j = j0; j < j1; ++j) a[j] += static_cast<acc_t>(s[j * m.col_step]);
      }
    }
    return;
  }
  // Transposing element: read the source contiguously (i inner), scatter into
  // the accumulator tile, which is in L1.
  for (int64_t j = j0; j < j1; ++j) {
    const scalar_t* s = src + m.offset + j * m.col_step;
    acc_t* a = acc + (j - j0) - i0 * kTile;
    if (m.row_step == 1) {
      for (int64_t i = i0; i < i1; ++i) a[i * kTile] += static_cast<acc_t>(s[i]);
    } else if (m.row_step == -1) {
      for (int64_t i = i0; i < i1; ++i) a[i * kTile] += static_cast<acc_t>(s[-i]);
    } else {
      for (int64_t i = i0; i < i1; ++i) a[i * kTile] += static_cast<acc_t>(s[i * m.row_step]);
    }
  }
}

template <typename scalar_t>
void average_kernel(const GroupOpPlan& plan, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& y = plan.in4;
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = plan.out4.mutable_data_ptr<scalar_t>();
  const int64_t B = plan.batch, C = y.size(1), H = y.size(2), W = y.size(3), G = plan.group_size;
  const int64_t sN = y.stride(0), sC = y.stride(1), sH = y.stride(2), sW = y.stride(3);
  const int64_t Ho = plan.out4.size(2), Wo = plan.out4.size(3);
  const acc_t scale = static_cast<acc_t>(scale_d);
  std::vector<PlaneMap> maps;
  for (int code : plan.codes) maps.push_back(source_plane_map(code, H, W, sH, sW));

  if (!plan.channels_last) {
    // out[b, c] = scale * Σ_g Γ_g y[g*B + b, c], one output tile at a time.
    const int64_t plane = Ho * Wo;
    at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane * G, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kTile * kTile);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        scalar_t* dst = out_ptr + p * plane;
        for (int64_t i0 = 0; i0 < Ho; i0 += kTile) {
          const int64_t i1 = std::min(i0 + kTile, Ho);
          for (int64_t j0 = 0; j0 < Wo; j0 += kTile) {
            const int64_t j1 = std::min(j0 + kTile, Wo);
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t g = 0; g < G; ++g) {
              const scalar_t* src = y_ptr + (g * B + b) * sN + c * sC;
              accumulate_tile(acc.data(), src, maps[g], i0, i1, j0, j1, code_transposes(plan.codes[g]));
            }
            for (int64_t i = i0; i < i1; ++i) {
              const acc_t* a = acc.data() + (i - i0) * kTile - j0;
              scalar_t* d = dst + i * Wo;
              for (int64_t j = j0; j < j1; ++j) d[j] = static_cast<scalar_t>(a[j] * scale);
            }
          }
        }
      }
    });
    return;
  }
  // channels_last: out[b, i, j, :] = scale * Σ_g y[g*B + b, src_g(i, j), :].
  const int64_t row = Wo * C;
  at::parallel_for(0, B * Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(row * G, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      scalar_t* dst = out_ptr + r * row;
      for (int64_t j = 0; j < Wo; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t g = 0; g < G; ++g) {
          const PlaneMap& m = maps[g];
          const scalar_t* s = y_ptr + (g * B + b) * sN + m.offset + i * m.row_step + j * m.col_step;
          if (sC == 1) {
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(s[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(s[c * sC]);
          }
        }
        scalar_t* d = dst + j * C;
        for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(acc[c] * scale);
      }
    }
  });
}

}  // namespace

at::Tensor group_transform_cpu(const at::Tensor& x, at::IntArrayRef elements, double scale) {
  TORCH_CHECK(x.device().is_cpu(), "group_transform_cpu: expected a CPU tensor, got ", x.device());
  GroupOpPlan plan = plan_group_op(x, elements, scale, /*is_average=*/false, "group_transform");
  if (plan.out.numel() == 0) return plan.out;
  if (scale == 1.0) {
    dispatch_by_element_size(x, "group_transform", [&](auto tag) { transform_kernel(plan, CopyOp<decltype(tag)>{}); });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_transform_cpu", [&] {
      transform_kernel(plan, ScaleOp<scalar_t>{static_cast<at::opmath_type<scalar_t>>(scale)});
    });
  }
  return plan.out;
}

at::Tensor group_average_cpu(const at::Tensor& y, at::IntArrayRef elements, double scale) {
  TORCH_CHECK(y.device().is_cpu(), "group_average_cpu: expected a CPU tensor, got ", y.device());
  GroupOpPlan plan = plan_group_op(y, elements, scale, /*is_average=*/true, "group_average");
  if (plan.out.numel() == 0) return plan.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "group_average_cpu",
                                  [&] { average_kernel<scalar_t>(plan, scale); });
  return plan.out;
}

TORCH_LIBRARY_IMPL(equitune_ext, CPU, m) {
  m.impl("group_transform", &group_transform_cpu);
  m.impl("group_average", &group_average_cpu);
}

}  // namespace equitune_ext
