// CPU kernels of the volume ops (volume_transform, volume_average and their
// _rows forms: [N, C, D, H, W], cube codes), compiled once per instruction set
// like group_ops_cpu_kernels.h, which the including file includes first: these
// kernels are built from its band helpers, and run() below is each build's
// one entry point for all the image and volume kernels.
//
// An element is a signed permutation of (d, h, w) (index.h volume_map). On a
// 2-D slice of the output it acts as a plane map, so the 2-D gathers do the
// work (contiguous, reversed, and 4x4-transposed rows). Which slices depends
// on the output axis that reads the input's W axis (its `reader`):
//  * w (2): d-slices, output rows along input rows;
//  * h (1): d-slices, output rows along input columns (transposed);
//  * d (0): h-slices, whose rows are output d-runs, also transposed.
// Either way the innermost output dim walks the input with a constant stride.
//
// Layouts, chosen by the output's layout (group_ops.h):
//  * planar (out contiguous, [N, C, D, H, W]): work item = one (b, c) volume,
//    written slab by slab (whole d-slices); the transform reads the input
//    volume for all |G| elements while it is in cache.
//  * pixel (out channels_last_3d, [N, D, H, W, C]): work item = one output
//    row (b, d, h); each pixel moves a run of C channels.

namespace equitune_ext {
namespace EQUI_CPU_NS {
namespace {

using VolumeMap = StridedMap<3>;

// by_code[code]: the map of each cube code on a [N, C, D, H, W] view.
inline void volume_maps(const at::Tensor& v, VolumeMap* by_code) {
  const int64_t extent[3] = {v.size(2), v.size(3), v.size(4)};
  const int64_t stride[3] = {v.stride(2), v.stride(3), v.stride(4)};
  for (int code = 0; code < kNumCubeCodes; ++code) by_code[code] = volume_map(code, extent, stride);
}

// The output axis that reads the input's W axis (see the header comment).
inline int w_reader(int code) { return cube_element(code).axis[2]; }

// slab[(d - d0)*H*W + h*W + w] <- f(src[m(d, h, w)]) for output d-slices
// d0 <= d < d1 of Γ(code) src (one (b, c) volume; src at its origin).
template <typename Combine, typename T = typename Combine::T, typename D = typename Combine::D>
void gather_slab(D* slab, const T* src, const VolumeMap& m, int reader, int64_t d0, int64_t d1, int64_t H, int64_t W,
                 const Combine& f) {
  const int64_t slice = H * W;
  if (reader != 0) {
    for (int64_t d = d0; d < d1; ++d)
      gather_band(slab + (d - d0) * slice, W, src, PlaneMap{m.offset + d * m.step[0], m.step[1], m.step[2]}, 0, H, W,
                  reader == 1, f);
    return;
  }
  // The (d, w) plane of each h: its rows (d) read input W, slice apart in the slab.
  for (int64_t h = 0; h < H; ++h)
    gather_band(slab + h * W, slice, src, PlaneMap{m.offset + h * m.step[1], m.step[0], m.step[2]}, d0, d1, W, true, f);
}

template <typename Op, typename T = typename Op::value_t>
void volume_transform_kernel(const GroupOpPlan& plan, const Op& op) {
  const at::Tensor& x = plan.in_view;
  const T* x_ptr = static_cast<const T*>(x.const_data_ptr());
  T* out_ptr = static_cast<T*>(plan.out_view.mutable_data_ptr());
  const int64_t B = plan.batch, C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4), G = plan.group_size;
  const int64_t sN = x.stride(0), sC = x.stride(1);
  VolumeMap by_code[kNumCubeCodes];
  volume_maps(x, by_code);

  if (!plan.channels_last) {
    // out[(g*B + b), c] = op(Γ_g x[b, c]); the x volume is read for all g while in cache.
    const int64_t slice = H * W, volume = D * slice, slab = band_rows(D, slice, sizeof(T));
    const bool streaming = use_streaming(plan.out, slice * int64_t(sizeof(T)));
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> band(streaming ? slab * slice : 0);  // staging for non-temporal stores
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        const T* src = x_ptr + b * sN + c * sC;
        for (int64_t g = 0; g < G; ++g) {
          const int code = plan.code_at(g, b);
          const Assign<Op> assign{block_op(plan, op, g, b)};
          T* dst = out_ptr + ((g * B + b) * C + c) * volume;
          for (int64_t d0 = 0; d0 < D; d0 += slab) {
            const int64_t d1 = std::min(d0 + slab, D);
            gather_slab(streaming ? band.data() : dst + d0 * slice, src, by_code[code], w_reader(code), d0, d1, H, W,
                        assign);
            if (streaming) stream_band(dst + d0 * slice, band.data(), (d1 - d0) * slice * sizeof(T));
          }
        }
      }
      finish_streaming();
    });
    return;
  }
  // channels_last_3d: out[(g*B + b), d, h, w, :] = op(x[b, src_g(d, h, w), :]).
  const int64_t rows = D * H, row = W * C;
  at::parallel_for(0, B * rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / rows, d = (r % rows) / H, h = r % H;
      for (int64_t g = 0; g < G; ++g) {
        const VolumeMap& m = by_code[plan.code_at(g, b)];
        const T* src = x_ptr + b * sN + m.offset + d * m.step[0] + h * m.step[1];
        move_pixels(out_ptr + ((g * B + b) * rows + r % rows) * row, src, W, m.step[2], C, sC, block_op(plan, op, g, b));
      }
    }
  });
}

// The rows of one output volume summed straight across the |G| sources
// (sum_row: each output stored once), when every element keeps output rows
// on input rows (forwards or reversed, at most 4 each way) and none is
// weighted: flip3d and its subgroups (`usable` false otherwise). maps[g]:
// element g's map of batch row b.
inline RowSources volume_row_sources(const GroupOpPlan& plan, const VolumeMap* by_code, int64_t b, bool weighted,
                                     std::vector<VolumeMap>& maps) {
  std::vector<int64_t> all(plan.group_size);
  std::vector<PlaneMap> rows(plan.group_size);
  maps.resize(plan.group_size);
  for (int64_t g = 0; g < plan.group_size; ++g) {
    maps[g] = by_code[plan.code_at(g, b)];
    all[g] = g;
    rows[g] = PlaneMap{maps[g].offset, maps[g].step[1], maps[g].step[2]};  // slice d: + d * step[0]
  }
  return row_sources(all, rows, /*swapped=*/false, weighted);
}

// The accumulator of the general average holds this many bytes of output
// d-slices (at least 4): the whole volume for cubes up to 64^3 float32, so
// that an element whose output d reads input W (reader 0) reads each input
// cache line once instead of once per slab.
constexpr int64_t kVolumeAccBytes = 1024 * 1024;

template <typename scalar_t>
void volume_average_kernel(const GroupOpPlan& plan, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& y = plan.in_view;
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = plan.out_view.mutable_data_ptr<scalar_t>();
  const int64_t B = plan.batch, C = y.size(1), D = y.size(2), H = y.size(3), W = y.size(4), G = plan.group_size;
  const int64_t sN = y.stride(0), sC = y.stride(1);
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t* w_ptr = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
  VolumeMap by_code[kNumCubeCodes];
  volume_maps(y, by_code);

  if (!plan.channels_last) {
    // out[b, c] = scale * Σ_g w[g, b] Γ_g y[g*B + b, c], slab by slab.
    const int64_t slice = H * W, volume = D * slice;
    const bool streaming = use_streaming(plan.out, slice * int64_t(sizeof(scalar_t)));
    const int64_t row_slab = band_rows(D, slice, sizeof(acc_t));
    const int64_t acc_slab = std::min(D, std::max<int64_t>(4, kVolumeAccBytes / std::max<int64_t>(1, slice * sizeof(acc_t))));
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc;
      std::vector<scalar_t> stage;
      std::vector<VolumeMap> maps;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        const RowSources rows = volume_row_sources(plan, by_code, b, w_ptr != nullptr, maps);
        const int64_t slab = rows.usable ? row_slab : acc_slab;
        acc.resize(slab * slice);
        stage.resize(streaming ? slab * slice : 0);
        scalar_t* dst = out_ptr + p * volume;
        for (int64_t d0 = 0; d0 < D; d0 += slab) {
          const int64_t d1 = std::min(d0 + slab, D);
          if (rows.usable) {
            for (int64_t d = d0; d < d1; ++d)
              for (int64_t h = 0; h < H; ++h) {
                const scalar_t* rows_in[8];
                for (size_t k = 0; k < rows.elements.size(); ++k) {
                  const int64_t g = rows.elements[k];
                  const VolumeMap& m = maps[g];
                  rows_in[k] = y_ptr + (g * B + b) * sN + c * sC + m.offset + d * m.step[0] + h * m.step[1];
                }
                sum_row(acc.data() + ((d - d0) * H + h) * W, rows_in, rows.forward, rows.backward, W);
              }
          } else {
            // Element by element into the accumulator, which stays in cache while
            // each source volume streams in once.
            for (int64_t g = 0; g < G; ++g) {
              const int reader = w_reader(plan.code_at(g, b));
              with_accumulate<scalar_t>(g == 0, w_ptr, g * B + b, [&](const auto& accumulate) {
                gather_slab(acc.data(), y_ptr + (g * B + b) * sN + c * sC, maps[g], reader, d0, d1, H, W, accumulate);
              });
            }
          }
          store_scaled_band(dst + d0 * slice, acc.data(), stage.data(), (d1 - d0) * slice, scale, streaming);
        }
      }
      finish_streaming();
    });
    return;
  }
  // channels_last_3d: out[b, d, h, w, :] = scale * Σ_g w[g, b] y[g*B + b, src_g(d, h, w), :].
  const int64_t rows = D * H, row = W * C;
  at::parallel_for(0, B * rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(row * G, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / rows, d = (r % rows) / H, h = r % H;
      for (int64_t w = 0; w < W; ++w) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t g = 0; g < G; ++g) {
          const VolumeMap& m = by_code[plan.code_at(g, b)];
          add_pixel(acc.data(), y_ptr + (g * B + b) * sN + m.offset + d * m.step[0] + h * m.step[1] + w * m.step[2], C,
                    sC, w_ptr ? w_ptr[g * B + b] : acc_t(1));
        }
        scalar_t* o = out_ptr + r * row + w * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c] * scale);
      }
    }
  });
}

}  // namespace

// This build's entry point for every planned image or volume op.
void run(const GroupOpPlan& plan, double scale, bool is_average) {
  if (plan.spatial_dims == 2) {
    is_average ? run_average(plan, scale) : run_transform(plan, scale);
  } else if (is_average) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.in_view.scalar_type(), "volume_average_cpu",
                                    [&] { volume_average_kernel<scalar_t>(plan, scale); });
  } else {
    dispatch_transform(plan, scale, [&](const auto& op) { volume_transform_kernel(plan, op); });
  }
}

}  // namespace EQUI_CPU_NS
}  // namespace equitune_ext
