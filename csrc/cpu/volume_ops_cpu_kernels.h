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
// Transposed gathers cost several times a row gather, so the planar kernels
// do one per axis permutation, not one per element: every element factors as
// a permutation and flips (index.h cube_flips_after_perm), and the elements
// that share a permutation (up to 8) share its transposed volume. The
// transform permutes the input volume once per permutation into a buffer
// and writes each element as flipped rows of it; the average sums each
// permutation's elements in their input orientation (flipped rows, straight
// across the sources) and permutes that sum into the accumulator once.
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

// The elements of batch row b by their axis permutation (code >> 3).
struct PermClasses {
  std::vector<int64_t> members[kNumCubePerms];

  void assign(const GroupOpPlan& plan, int64_t b) {
    for (auto& m : members) m.clear();
    for (int64_t g = 0; g < plan.group_size; ++g) members[plan.code_at(g, b) >> 3].push_back(g);
  }
  bool permutes() const {
    for (int perm = 1; perm < kNumCubePerms; ++perm)
      if (!members[perm].empty()) return true;
    return false;
  }
};

// The maps of the 8 flips on a contiguous D x H x W buffer (the permuted copies).
inline void buffer_flip_maps(int64_t D, int64_t H, int64_t W, VolumeMap* by_flip) {
  const int64_t extent[3] = {D, H, W}, stride[3] = {H * W, W, 1};
  for (int code = 0; code < 8; ++code) by_flip[code] = volume_map(code, extent, stride);
}

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
  // The (d, w) plane of each h: its rows (d) read input W, a slice apart in the
  // slab. Four rows (one 4x4 block's) at a time across all h: the whole range
  // at once would store to every slice at one offset in turn, lines 4 KiB
  // apart for 32^3 float32, which share an L1 set and evict each other (the
  // transposed copies of the two permutations concerned took 2-4x longer:
  // benchmarks/README.md, "Volume groups").
  for (int64_t i = d0; i < d1; i += 4)
    for (int64_t h = 0; h < H; ++h)
      gather_band(slab + (i - d0) * slice + h * W, slice, src, PlaneMap{m.offset + h * m.step[1], m.step[0], m.step[2]},
                  i, std::min(i + 4, d1), W, true, f);
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
    // out[(g*B + b), c] = op(Γ_g x[b, c]) = op(F_g P_g x[b, c]): per permutation P,
    // P x is gathered once (a contiguous copy; none for the identity), then
    // each of its elements is written as flipped rows F_g of it.
    const int64_t slice = H * W, volume = D * slice, slab = band_rows(D, slice, sizeof(T));
    const bool streaming = use_streaming(plan.out, slice * int64_t(sizeof(T)));
    VolumeMap buffer_maps[8];
    buffer_flip_maps(D, H, W, buffer_maps);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> band(streaming ? slab * slice : 0), permuted;  // band: staging for non-temporal stores
      PermClasses classes;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        const T* src = x_ptr + b * sN + c * sC;
        classes.assign(plan, b);
        for (int perm = 0; perm < kNumCubePerms; ++perm) {
          if (classes.members[perm].empty()) continue;
          const T* from = src;
          const VolumeMap* maps = by_code;  // flips of x itself
          if (perm != 0) {
            permuted.resize(volume);
            gather_slab(permuted.data(), src, by_code[8 * perm], w_reader(8 * perm), 0, D, H, W,
                        Assign<CopyOp<T>>{});
            from = permuted.data();
            maps = buffer_maps;
          }
          for (int64_t g : classes.members[perm]) {
            const int flips = cube_flips_after_perm(plan.code_at(g, b));
            const Assign<Op> assign{block_op(plan, op, g, b)};
            T* dst = out_ptr + ((g * B + b) * C + c) * volume;
            for (int64_t d0 = 0; d0 < D; d0 += slab) {
              const int64_t d1 = std::min(d0 + slab, D);
              gather_slab(streaming ? band.data() : dst + d0 * slice, from, maps[flips], 2, d0, d1, H, W, assign);
              if (streaming) stream_band(dst + d0 * slice, band.data(), (d1 - d0) * slice * sizeof(T));
            }
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

// dst[(d - d0)*H*W + h*W + w] = Σ_{g in members} w_g y_g[F_g(d, h, w)], F_g the
// flips of element g alone (code & 7): the elements of one axis permutation,
// summed in their input orientation, slices d0 <= d < d1. Unweighted sums of
// at most 4 forward and 4 reversed rows go straight across the sources
// (sum_row: each output stored once); others element by element.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void sum_flips(acc_t* dst, const GroupOpPlan& plan, const scalar_t* y_ptr, const VolumeMap* by_code,
               const std::vector<int64_t>& members, int64_t b, int64_t c, int64_t d0, int64_t d1) {
  const at::Tensor& y = plan.in_view;
  const int64_t B = plan.batch, H = y.size(3), W = y.size(4), sN = y.stride(0), sC = y.stride(1);
  const acc_t* w_ptr = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
  auto flips_of = [&](int64_t g) -> const VolumeMap& { return by_code[plan.code_at(g, b) & 7]; };
  auto source = [&](int64_t g) { return y_ptr + (g * B + b) * sN + c * sC; };
  std::vector<PlaneMap> rows_of(plan.group_size);  // row maps by element index, as row_sources reads them
  for (int64_t g : members) rows_of[g] = PlaneMap{flips_of(g).offset, flips_of(g).step[1], flips_of(g).step[2]};
  const RowSources rows = row_sources(members, rows_of, /*swapped=*/false, w_ptr != nullptr);
  if (!rows.usable) {
    for (size_t k = 0; k < members.size(); ++k) {
      const int64_t g = members[k];
      with_accumulate<scalar_t>(k == 0, w_ptr, g * B + b, [&](const auto& accumulate) {
        gather_slab(dst, source(g), flips_of(g), 2, d0, d1, H, W, accumulate);
      });
    }
    return;
  }
  for (int64_t d = d0; d < d1; ++d)
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* rows_in[8];
      for (size_t k = 0; k < rows.elements.size(); ++k) {
        const int64_t g = rows.elements[k];
        const VolumeMap& m = flips_of(g);
        rows_in[k] = source(g) + m.offset + d * m.step[0] + h * m.step[1];
      }
      sum_row(dst + ((d - d0) * H + h) * W, rows_in, rows.forward, rows.backward, W);
    }
}

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
    // out[b, c] = scale * Σ_P P (Σ_{g of P} w[g, b] F_g y[g*B + b, c]), F_g the
    // flips of element g alone. Without permutations (flip groups) slab by
    // slab straight to the output; with them the whole volume, each
    // permutation's sum gathered once into the accumulator.
    const int64_t slice = H * W, volume = D * slice;
    const bool streaming = use_streaming(plan.out, slice * int64_t(sizeof(scalar_t)));
    VolumeMap buffer_maps[kNumCubeCodes];  // the permutations' maps on a contiguous sum (codes 8 * perm)
    const int64_t extent[3] = {D, H, W}, buffer_stride[3] = {slice, W, 1};
    for (int perm = 1; perm < kNumCubePerms; ++perm) buffer_maps[8 * perm] = volume_map(8 * perm, extent, buffer_stride);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc, sum;
      std::vector<scalar_t> stage;
      PermClasses classes;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        classes.assign(plan, b);
        const bool permutes = classes.permutes();
        const int64_t slab = permutes ? D : band_rows(D, slice, sizeof(acc_t));
        acc.resize(slab * slice);
        sum.resize(permutes ? volume : 0);
        stage.resize(streaming ? slab * slice : 0);
        scalar_t* dst = out_ptr + p * volume;
        for (int64_t d0 = 0; d0 < D; d0 += slab) {
          const int64_t d1 = std::min(d0 + slab, D);
          bool empty = true;  // acc holds no sum yet
          if (!classes.members[0].empty()) {
            sum_flips(acc.data(), plan, y_ptr, by_code, classes.members[0], b, c, d0, d1);
            empty = false;
          }
          for (int perm = 1; perm < kNumCubePerms; ++perm) {
            if (classes.members[perm].empty()) continue;
            sum_flips(sum.data(), plan, y_ptr, by_code, classes.members[perm], b, c, 0, D);
            with_accumulate<acc_t>(empty, nullptr, 0, [&](const auto& accumulate) {
              gather_slab(acc.data(), sum.data(), buffer_maps[8 * perm], w_reader(8 * perm), 0, D, H, W, accumulate);
            });
            empty = false;
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
    dispatch_average(plan, [&](auto tag) { volume_average_kernel<decltype(tag)>(plan, scale); });
  } else {
    dispatch_transform(plan, scale, "volume_transform", [&](const auto& op) { volume_transform_kernel(plan, op); });
  }
}

}  // namespace EQUI_CPU_NS
}  // namespace equitune_ext
