// CPU kernels of group_transform and group_average, compiled once per
// instruction set: group_ops_cpu.cpp includes this file in namespace
// cpu_default (baseline x86-64 / any CPU), group_ops_cpu_avx2.cpp in namespace
// cpu_avx2 under `#pragma GCC target("avx2,fma")`, and the entry points pick
// one at run time. The loops are written for the compiler's vectorizer (plus
// SSE intrinsics for the 4x4 transposes and streaming stores), so the AVX2
// build gets 8-wide loops from the same source. The including file provides
// every header this one needs, before any target pragma.
//
// Two memory layouts, chosen by the output's layout (see group_ops.h):
//  * planar  (out contiguous, [N, C, H, W]): work item = one (b, c) plane; the
//    input may have any strides. Transform reads the input plane once and
//    writes its |G| images while it is hot in cache; average accumulates the
//    |G| source planes band by band in a small opmath buffer and writes each
//    output element once.
//  * pixel   (out channels_last, [N, H, W, C]): work item = one output row;
//    each pixel moves a run of C channels.

namespace equitune_ext {
namespace EQUI_CPU_NS {
namespace {

// Planar work is done in bands of whole output rows (<= 16 KiB, so a band and
// the source rows it reads stay in L1/L2). Large outputs are staged band by
// band in a small buffer and go out in one contiguous run of non-temporal
// stores: they skip the read-for-ownership of each written cache line, which
// on this memory-bound op is most of the difference to a plain copy. Other
// outputs are written in place: staging them would only add a copy
// (benchmarks/README.md, "Image ops on CPU", has the measurements of this
// block's choices).
constexpr int64_t kBandBytes = 16 * 1024;
// Outputs smaller than this stay in cache for the next op (regular stores).
constexpr int64_t kStreamingThresholdBytes = 8 * 1024 * 1024;

// Non-temporal stores only where each output plane is whole cache lines: a
// plane that ends mid-line leaves a half-filled line in the write-combining
// buffers, and the |G| interleaved destinations of the transform evict them
// half-filled (784-byte planes: 3x slower than regular stores).
bool use_streaming(const at::Tensor& out, int64_t plane_bytes) {
  return out.nbytes() >= kStreamingThresholdBytes && plane_bytes % 64 == 0;
}

int64_t band_rows(int64_t Ho, int64_t Wo, int64_t element_bytes) {
  const int64_t rows = kBandBytes / std::max<int64_t>(1, Wo * element_bytes);
  return std::max<int64_t>(4, std::min<int64_t>(Ho, rows / 4 * 4));
}

// Copies `bytes` from src to dst with non-temporal stores (a plain copy
// without SSE2). The caller issues sfence (finish_streaming) before its
// results are read.
void stream_band(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, size_t((16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15));
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
  }
  std::memcpy(d, s, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

void finish_streaming() {
#if defined(__SSE2__)
  _mm_sfence();  // non-temporal stores are weakly ordered
#endif
}

// How a gathered source value lands in the band: assigned through the op
// (transform) or added in opmath (average). `kVec4` marks the combinations
// with a 4-lane SSE path for 32-bit elements.
template <typename Op>
struct Assign {
  using T = typename Op::value_t;
  using D = T;
  Op op;
  void operator()(D& d, T v) const { d = op(v); }
  static constexpr bool kVec4 = sizeof(T) == 4 && (std::is_same_v<Op, CopyOp<T>> || std::is_same_v<Op, ScaleOp<float>>);
#if defined(__SSE2__)
  void vec4(D* d, __m128 v) const {
    if constexpr (std::is_same_v<Op, ScaleOp<float>>) v = _mm_mul_ps(v, _mm_set1_ps(op.scale));
    _mm_storeu_ps(reinterpret_cast<float*>(d), v);  // raw 32-bit lanes: bit-exact for any 4-byte dtype
  }
#endif
};

// kFirst: the first element of the sum overwrites the band (no zeroing pass).
// kWeighted: each element's values are multiplied by its λ-weight w[g, b].
template <typename scalar_t, bool kFirst, bool kWeighted>
struct Accumulate {
  using T = scalar_t;
  using D = at::opmath_type<scalar_t>;
  D weight = D(1);
  void operator()(D& d, T v) const {
    const D x = kWeighted ? static_cast<D>(v) * weight : static_cast<D>(v);
    if constexpr (kFirst) d = x;
    else d += x;
  }
  static constexpr bool kVec4 = std::is_same_v<scalar_t, float>;
#if defined(__SSE2__)
  void vec4(D* d, __m128 v) const {
    float* p = reinterpret_cast<float*>(d);
    if constexpr (kWeighted) v = _mm_mul_ps(v, _mm_set1_ps(static_cast<float>(weight)));
    _mm_storeu_ps(p, kFirst ? v : _mm_add_ps(_mm_loadu_ps(p), v));
  }
#endif
};

// Calls f(Accumulate<...>{w}) with the variant for element g of a sum.
template <typename scalar_t, typename F>
void with_accumulate(bool first, const at::opmath_type<scalar_t>* weights, int64_t k, F&& f) {
  if (weights) {
    if (first) f(Accumulate<scalar_t, true, true>{weights[k]});
    else f(Accumulate<scalar_t, false, true>{weights[k]});
  } else {
    if (first) f(Accumulate<scalar_t, true, false>{});
    else f(Accumulate<scalar_t, false, false>{});
  }
}

// dst[k] = scalar_t(acc[k] * scale) for k < n, in place; when streaming,
// float goes from the accumulator to memory with non-temporal stores, other
// dtypes through the staging buffer `stage`.
template <typename scalar_t, typename acc_t>
void store_scaled_band(scalar_t* dst, acc_t* acc, scalar_t* stage, int64_t n, acc_t scale, bool streaming) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (streaming) {
      int64_t k = 0;
      for (; k < n && (reinterpret_cast<uintptr_t>(dst + k) & 15); ++k) dst[k] = acc[k] * scale;
      const __m128 s = _mm_set1_ps(scale);
      for (; k + 4 <= n; k += 4) _mm_stream_ps(dst + k, _mm_mul_ps(_mm_loadu_ps(acc + k), s));
      for (; k < n; ++k) dst[k] = acc[k] * scale;
      return;
    }
  }
#endif
  if (!streaming) {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(acc[k] * scale);
    return;
  }
  for (int64_t k = 0; k < n; ++k) stage[k] = static_cast<scalar_t>(acc[k] * scale);
  stream_band(dst, stage, n * sizeof(scalar_t));
}

#if defined(__SSE2__)
// Rows i..i+3, cols j..j+3 of a transposing element's output, where column
// j+c of the output runs along input memory base + (j+c)*cs + i*rs, rs = ±1:
// four contiguous loads (reversed when rs = -1) and a 4x4 register transpose.
inline void load_transposed_4x4(const void* base_v, int64_t rs, int64_t cs, int64_t i, int64_t j, __m128 rows[4]) {
  const float* base = static_cast<const float*>(base_v);
  for (int c = 0; c < 4; ++c) {
    const float* p = base + (j + c) * cs + i * rs;
    rows[c] = rs == 1 ? _mm_loadu_ps(p) : _mm_shuffle_ps(_mm_loadu_ps(p - 3), _mm_loadu_ps(p - 3), _MM_SHUFFLE(0, 1, 2, 3));
  }
  _MM_TRANSPOSE4_PS(rows[0], rows[1], rows[2], rows[3]);
}
#endif

// band[(r - r0)*ld + (c - c0)] <- f(src[m.offset + r*m.row_step + c*m.col_step])
// for r in [r0, r1), c in [c0, c1): the vectorizable case, rows along rows.
template <typename Combine, typename T = typename Combine::T, typename D = typename Combine::D>
void gather_rows(D* __restrict band, int64_t ld, const T* __restrict src, const PlaneMap& m, int64_t r0, int64_t r1,
                 int64_t c0, int64_t c1, const Combine& f) {
  const int64_t n = c1 - c0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* s = src + m.offset + r * m.row_step + c0 * m.col_step;
    D* d = band + (r - r0) * ld;
    if (m.col_step == 1) {
      for (int64_t j = 0; j < n; ++j) f(d[j], s[j]);
    } else if (m.col_step == -1) {
      for (int64_t j = 0; j < n; ++j) f(d[j], s[-j]);
    } else {
      for (int64_t j = 0; j < n; ++j) f(d[j], s[j * m.col_step]);
    }
  }
}

// The map of the transposed output: out^T(j, i) reads what out(i, j) reads.
inline PlaneMap swap_axes(const PlaneMap& m) { return {m.offset, m.col_step, m.row_step}; }

// acc[r*ld_acc + c] (+)= t[c*ld_t + r] for r < rows, c < cols (assign when
// `overwrite`): folds a transposed accumulator into the output orientation.
template <typename D>
void add_transposed(D* __restrict acc, int64_t ld_acc, const D* __restrict t, int64_t ld_t, int64_t rows,
                    int64_t cols, bool overwrite) {
  int64_t r_vec = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<D, float>) {
    r_vec = rows / 4 * 4;
    const int64_t c_vec = cols / 4 * 4;
    for (int64_t r = 0; r < r_vec; r += 4) {
      for (int64_t c = 0; c < c_vec; c += 4) {
        __m128 v[4];
        for (int k = 0; k < 4; ++k) v[k] = _mm_loadu_ps(t + (c + k) * ld_t + r);  // column c+k of the block
        _MM_TRANSPOSE4_PS(v[0], v[1], v[2], v[3]);
        for (int k = 0; k < 4; ++k) {
          float* a = acc + (r + k) * ld_acc + c;
          _mm_storeu_ps(a, overwrite ? v[k] : _mm_add_ps(_mm_loadu_ps(a), v[k]));
        }
      }
      for (int64_t c = c_vec; c < cols; ++c)
        for (int64_t r2 = r; r2 < r + 4; ++r2)
          acc[r2 * ld_acc + c] = (overwrite ? D(0) : acc[r2 * ld_acc + c]) + t[c * ld_t + r2];
    }
  }
#endif
  for (int64_t r = r_vec; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) acc[r * ld_acc + c] = (overwrite ? D(0) : acc[r * ld_acc + c]) + t[c * ld_t + r];
}

// dst[r*ld_acc + c] = scale * (acc[r*ld_acc + c] + t[c*ld_t + r]) with streaming
// stores: add_transposed and store_scaled_band in one pass, for float bands
// whose rows are 16-byte aligned (returns false, doing nothing, otherwise).
inline bool store_transposed_sum(float* dst, const float* acc, int64_t ld_acc, const float* t, int64_t ld_t,
                                 int64_t rows, int64_t cols, bool acc_empty, float scale) {
#if defined(__SSE2__)
  if (rows % 4 || cols % 4 || ld_acc % 4 || (reinterpret_cast<uintptr_t>(dst) & 15)) return false;
  const __m128 s = _mm_set1_ps(scale);
  for (int64_t r = 0; r < rows; r += 4) {
    for (int64_t c = 0; c < cols; c += 4) {
      __m128 v[4];
      for (int k = 0; k < 4; ++k) v[k] = _mm_loadu_ps(t + (c + k) * ld_t + r);
      _MM_TRANSPOSE4_PS(v[0], v[1], v[2], v[3]);
      for (int k = 0; k < 4; ++k) {
        const int64_t o = (r + k) * ld_acc + c;
        _mm_stream_ps(dst + o, _mm_mul_ps(acc_empty ? v[k] : _mm_add_ps(_mm_loadu_ps(acc + o), v[k]), s));
      }
    }
  }
  return true;
#else
  return false;
#endif
}

// band[(i - i0)*ld + j] <- f(src[m.offset + i*m.row_step + j*m.col_step]) for
// rows i in [i0, i1) and all columns of one output plane of Γ(code)·src.
template <typename Combine, typename T = typename Combine::T, typename D = typename Combine::D>
void gather_band(D* __restrict band, int64_t ld, const T* __restrict src, const PlaneMap& m, int64_t i0, int64_t i1,
                 int64_t Wo, bool transposes, const Combine& f) {
  const T* base = src + m.offset;
  if (!transposes) {  // output rows run along input rows
    gather_rows(band, ld, src, m, i0, i1, 0, Wo, f);
    return;
  }
  // Output rows run along input columns. Loop over output columns outside
  // (= input rows, read front to back: the hardware prefetcher follows them)
  // and over output rows inside, scattering into the band, which is in L1.
  int64_t i_vec_end = i0;  // rows [i0, i_vec_end) are done by the 4x4 path
#if defined(__SSE2__)
  if constexpr (Combine::kVec4) {
    if (m.row_step == 1 || m.row_step == -1) {
      i_vec_end = i0 + (i1 - i0) / 4 * 4;
      const int64_t j_vec_end = Wo / 4 * 4;
      // With row_step = -1, step i downwards so that each input row is read in
      // ascending addresses (~10% faster on the benchmark shape).
      const bool down = m.row_step == -1;
      const int64_t nblocks = (i_vec_end - i0) / 4;
      // Likewise visit the input rows (output columns) in ascending order.
      const bool left = m.col_step < 0;
      for (int64_t jb = 0; jb < j_vec_end; jb += 4) {
        const int64_t j = left ? j_vec_end - 4 - jb : jb;
        for (int64_t blk = 0; blk < nblocks; ++blk) {
          const int64_t i = i0 + 4 * (down ? nblocks - 1 - blk : blk);
          __m128 rows[4];
          load_transposed_4x4(base, m.row_step, m.col_step, i, j, rows);
          for (int r = 0; r < 4; ++r) f.vec4(band + (i - i0 + r) * ld + j, rows[r]);
        }
      }
      for (int64_t j = j_vec_end; j < Wo; ++j)
        for (int64_t i = i0; i < i_vec_end; ++i) f(band[(i - i0) * ld + j], base[j * m.col_step + i * m.row_step]);
    }
  }
#endif
  if (i_vec_end == i1) return;
  for (int64_t j = 0; j < Wo; ++j) {  // scalar: walk the input contiguously (i inner)
    const T* s = base + j * m.col_step;
    for (int64_t i = i_vec_end; i < i1; ++i) f(band[(i - i0) * ld + j], s[i * m.row_step]);
  }
}

// The op of block (g, b) of a transform: `op`, times the λ-weight w[g, b] when weighted.
template <typename Op>
Op block_op(const GroupOpPlan& plan, const Op& op, int64_t g, int64_t b) {
  const at::Tensor& w = plan.weights;
  if (!w.defined()) return op;
  const int64_t k = g * plan.batch + b;
  return op.with_factor(w.scalar_type() == at::kDouble ? w.const_data_ptr<double>()[k]
                                                       : double(w.const_data_ptr<float>()[k]));
}

// d[k*C + c] = op(s[k*step + c*sC]) for k < n, c < C: n pixels of C channels (channels last).
template <typename Op, typename T = typename Op::value_t>
void move_pixels(T* __restrict d, const T* __restrict s, int64_t n, int64_t step, int64_t C, int64_t sC, const Op& op) {
  for (int64_t k = 0; k < n; ++k, d += C, s += step) {
    if (sC == 1) {
      for (int64_t c = 0; c < C; ++c) d[c] = op(s[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) d[c] = op(s[c * sC]);
    }
  }
}

// acc[c] += w * s[c*sC] for c < C: one source pixel of a channels-last average.
template <typename acc_t, typename scalar_t>
void add_pixel(acc_t* __restrict acc, const scalar_t* __restrict s, int64_t C, int64_t sC, acc_t w) {
  if (sC == 1) {
    for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(s[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(s[c * sC]);
  }
}

// The plane maps of the |G| blocks of batch row b: maps[g] for code plan.code_at(g, b)
// (every b alike for per-block codes, per b for per-row ones). `by_code` holds
// the map of each of the 8 codes. Returns whether `maps` changed.
inline bool maps_for_row(const GroupOpPlan& plan, const PlaneMap* by_code, int64_t b, std::vector<PlaneMap>& maps,
                         std::vector<int>& codes, int64_t& current_b) {
  if (current_b == b || (current_b >= 0 && plan.row_codes.empty())) return false;
  current_b = b;
  maps.resize(plan.group_size);
  codes.resize(plan.group_size);
  for (int64_t g = 0; g < plan.group_size; ++g) {
    codes[g] = plan.code_at(g, b);
    maps[g] = by_code[codes[g]];
  }
  return true;
}

template <typename Op, typename T = typename Op::value_t>
void transform_kernel(const GroupOpPlan& plan, const Op& op) {
  const at::Tensor& x = plan.in_view;
  const T* x_ptr = static_cast<const T*>(x.const_data_ptr());
  T* out_ptr = static_cast<T*>(plan.out_view.mutable_data_ptr());
  const int64_t B = plan.batch, C = x.size(1), H = x.size(2), W = x.size(3), G = plan.group_size;
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t Ho = plan.out_view.size(2), Wo = plan.out_view.size(3);
  PlaneMap by_code[kNumD4Codes];
  for (int code = 0; code < kNumD4Codes; ++code) by_code[code] = source_plane_map(code, H, W, sH, sW);
  auto op_for = [&](int64_t g, int64_t b) { return block_op(plan, op, g, b); };

  if (!plan.channels_last) {
    // out[(g*B + b), c] = op(Γ_g x[b, c]); the x plane is read for all g while hot.
    const int64_t plane = Ho * Wo, rows = band_rows(Ho, Wo, sizeof(T));
    const bool streaming = use_streaming(plan.out, plane * int64_t(sizeof(T)));
    at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)), [&](int64_t begin, int64_t end) {
      std::vector<T> band(streaming ? rows * Wo : 0);  // staging for non-temporal stores
      std::vector<PlaneMap> maps;
      std::vector<int> codes;
      int64_t current_b = -1;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        maps_for_row(plan, by_code, b, maps, codes, current_b);
        const T* src = x_ptr + b * sN + c * sC;
        for (int64_t g = 0; g < G; ++g) {
          const Assign<Op> assign{op_for(g, b)};
          T* dst = out_ptr + ((g * B + b) * C + c) * plane;
          for (int64_t i0 = 0; i0 < Ho; i0 += rows) {
            const int64_t i1 = std::min(i0 + rows, Ho);
            gather_band(streaming ? band.data() : dst + i0 * Wo, Wo, src, maps[g], i0, i1, Wo,
                        code_transposes(codes[g]), assign);
            if (streaming) stream_band(dst + i0 * Wo, band.data(), (i1 - i0) * Wo * sizeof(T));
          }
        }
      }
      finish_streaming();
    });
    return;
  }
  // channels_last: out[(g*B + b), i, j, :] = op(x[b, src_g(i, j), :]).
  const int64_t row = Wo * C;
  at::parallel_for(0, B * Ho, std::max<int64_t>(1, 16384 / std::max<int64_t>(row, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, i = r % Ho;
      for (int64_t g = 0; g < G; ++g) {
        const PlaneMap& m = by_code[plan.code_at(g, b)];
        const Op op_gb = op_for(g, b);
        const T* src = x_ptr + b * sN + m.offset + i * m.row_step;
        move_pixels(out_ptr + ((g * B + b) * Ho + i) * row, src, Wo, m.col_step, C, sC, op_gb);
      }
    }
  });
}

// d[j] = Σ_k s[k][±j] for j < n: the first NF sources read forwards, the next
// NR backwards. The sum stays in registers across the elements, so each
// output is stored once, instead of one read-modify-write of the band per
// element (about 20% of the d4 average's time).
template <int NF, int NR, typename T, typename D>
void sum_row_fixed(D* __restrict d, const T* const* s, int64_t n) {
  const T* f[NF > 0 ? NF : 1];
  const T* r[NR > 0 ? NR : 1];
  for (int k = 0; k < NF; ++k) f[k] = s[k];
  for (int k = 0; k < NR; ++k) r[k] = s[NF + k];
  for (int64_t j = 0; j < n; ++j) {
    D acc = D(0);
    for (int k = 0; k < NF; ++k) acc += static_cast<D>(f[k][j]);
    for (int k = 0; k < NR; ++k) acc += static_cast<D>(r[k][-j]);
    d[j] = acc;
  }
}

template <int NF, typename T, typename D>
bool sum_row_nr(D* d, const T* const* s, int nr, int64_t n) {
  switch (nr) {
    case 0: if constexpr (NF > 0) { sum_row_fixed<NF, 0>(d, s, n); return true; } return false;
    case 1: sum_row_fixed<NF, 1>(d, s, n); return true;
    case 2: sum_row_fixed<NF, 2>(d, s, n); return true;
    case 3: sum_row_fixed<NF, 3>(d, s, n); return true;
    case 4: sum_row_fixed<NF, 4>(d, s, n); return true;
    default: return false;
  }
}

// Returns false (doing nothing) for more than 4 sources of either direction.
template <typename T, typename D>
bool sum_row(D* d, const T* const* s, int nf, int nr, int64_t n) {
  switch (nf) {
    case 0: return sum_row_nr<0>(d, s, nr, n);
    case 1: return sum_row_nr<1>(d, s, nr, n);
    case 2: return sum_row_nr<2>(d, s, nr, n);
    case 3: return sum_row_nr<3>(d, s, nr, n);
    case 4: return sum_row_nr<4>(d, s, nr, n);
    default: return false;
  }
}

// The elements of one kind (rows along rows, or transposing) whose rows can be
// summed by sum_row: unit column steps; forward ones first.
struct RowSources {
  std::vector<int64_t> elements;  // forward, then backward
  int forward = 0, backward = 0;
  bool usable = false;
};

inline RowSources row_sources(const std::vector<int64_t>& elements, const std::vector<PlaneMap>& maps, bool swapped,
                              bool weighted) {
  RowSources rs;
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t g : elements) {
      const int64_t step = swapped ? maps[g].row_step : maps[g].col_step;
      if (step == (pass == 0 ? 1 : -1)) {
        rs.elements.push_back(g);
        (pass == 0 ? rs.forward : rs.backward) += 1;
      }
    }
  rs.usable = !weighted && !elements.empty() && rs.elements.size() == elements.size() && rs.forward <= 4 &&
              rs.backward <= 4;
  return rs;
}

template <typename scalar_t>
void average_kernel(const GroupOpPlan& plan, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& y = plan.in_view;
  const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = plan.out_view.mutable_data_ptr<scalar_t>();
  const int64_t B = plan.batch, C = y.size(1), H = y.size(2), W = y.size(3), G = plan.group_size;
  const int64_t sN = y.stride(0), sC = y.stride(1), sH = y.stride(2), sW = y.stride(3);
  const int64_t Ho = plan.out_view.size(2), Wo = plan.out_view.size(3);
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t* w_ptr = plan.weights.defined() ? plan.weights.const_data_ptr<acc_t>() : nullptr;
  PlaneMap by_code[kNumD4Codes];
  for (int code = 0; code < kNumD4Codes; ++code) by_code[code] = source_plane_map(code, H, W, sH, sW);

  if (!plan.channels_last) {
    // out[b, c] = scale * Σ_g Γ_g y[g*B + b, c], one band of output rows at a time.
    const int64_t plane = Ho * Wo, rows = band_rows(Ho, Wo, sizeof(acc_t));
    const bool streaming = use_streaming(plan.out, plane * int64_t(sizeof(scalar_t)));
    // Software prefetch: while output row i of plane p is summed, row i of each
    // of the |G| source planes of plane p + 1 is requested into L1. Each source
    // plane is read in its element's order (rows reversed, columns as rows), so
    // the hardware prefetcher, which follows ascending runs, falls behind at
    // every plane (benchmarks/README.md, "Image ops on CPU": 2.3x -> 1.0x a
    // plain mean for the c4 average of [32, 64, 56, 56]). Planes of a few lines
    // gain nothing the hardware does not already do, and lose (7x7 float32:
    // 2.7x -> 3.8x), hence the 256-byte minimum. Contiguous planes only (row i
    // at i * W).
    const int64_t row_bytes = W * int64_t(sizeof(scalar_t));
    const bool prefetch = sW == 1 && sH == W && H * row_bytes >= 256;
    at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane * G, 1)), [&](int64_t begin, int64_t end) {
      // Elements that transpose are summed in `acc_t` in their own (input)
      // orientation, where the reads are contiguous and vectorize like the
      // others, and folded into `acc` with one register transpose per band,
      // whatever their number (4 of d4's 8 elements).
      std::vector<acc_t> acc(rows * Wo), acc_t_(rows * Wo);
      // Element indices by kind, and how sum_row takes them: the same for
      // every b with per-block codes, regrouped whenever b changes with per-row
      // ones (b changes once per C planes).
      std::vector<PlaneMap> maps;
      std::vector<int> codes;
      std::vector<int64_t> plain, transposing;
      RowSources plain_rows, transposing_rows;
      int64_t current_b = -1;
      std::vector<scalar_t> stage(streaming ? rows * Wo : 0);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C, c = p % C;
        if (maps_for_row(plan, by_code, b, maps, codes, current_b)) {
          plain.clear();
          transposing.clear();
          for (int64_t g = 0; g < G; ++g) (code_transposes(codes[g]) ? transposing : plain).push_back(g);
          plain_rows = row_sources(plain, maps, /*swapped=*/false, w_ptr != nullptr);
          transposing_rows = row_sources(transposing, maps, /*swapped=*/true, w_ptr != nullptr);
        }
        scalar_t* dst = out_ptr + p * plane;
        // the next plane's source in block 0 (block g: + g * B * sN), if prefetching
        const scalar_t* ahead = prefetch && p + 1 < end ? y_ptr + ((p + 1) / C) * sN + ((p + 1) % C) * sC : nullptr;
        for (int64_t i0 = 0; i0 < Ho; i0 += rows) {
          const int64_t i1 = std::min(i0 + rows, Ho), n = (i1 - i0) * Wo;
          // Row by row across the elements (not element by element) so that the
          // |G| source planes stream in together, as in a plain reduction over
          // the group axis (the next plane's rows prefetched as they go: above).
          for (int64_t i = i0; i < i1; ++i) {
#if defined(__SSE2__)
            if (ahead && i < H) {
              for (int64_t g = 0; g < G; ++g) {
                const char* q = reinterpret_cast<const char*>(ahead + g * B * sN + i * W);
                const uintptr_t first = reinterpret_cast<uintptr_t>(q) & ~uintptr_t(63);
                for (uintptr_t o = first; o < reinterpret_cast<uintptr_t>(q + row_bytes); o += 64)
                  _mm_prefetch(reinterpret_cast<const char*>(o), _MM_HINT_T0);
              }
            }
#endif
            if (plain_rows.usable) {
              const scalar_t* rows_in[8];
              for (size_t k = 0; k < plain_rows.elements.size(); ++k) {
                const int64_t g = plain_rows.elements[k];
                rows_in[k] = y_ptr + (g * B + b) * sN + c * sC + maps[g].offset + i * maps[g].row_step;
              }
              sum_row(acc.data() + (i - i0) * Wo, rows_in, plain_rows.forward, plain_rows.backward, Wo);
              continue;
            }
            for (size_t k = 0; k < plain.size(); ++k) {
              const int64_t g = plain[k];
              with_accumulate<scalar_t>(k == 0, w_ptr, g * B + b, [&](const auto& accumulate) {
                gather_rows(acc.data() + (i - i0) * Wo, Wo, y_ptr + (g * B + b) * sN + c * sC, maps[g], i, i + 1, 0,
                            Wo, accumulate);
              });
            }
          }
          if (transposing_rows.usable) {  // acc_t_[j*(i1-i0) + (i - i0)]: rows j of out^T
            for (int64_t j = 0; j < Wo; ++j) {
              const scalar_t* rows_in[8];
              for (size_t k = 0; k < transposing_rows.elements.size(); ++k) {
                const int64_t g = transposing_rows.elements[k];
                rows_in[k] = y_ptr + (g * B + b) * sN + c * sC + maps[g].offset + j * maps[g].col_step +
                             i0 * maps[g].row_step;
              }
              sum_row(acc_t_.data() + j * (i1 - i0), rows_in, transposing_rows.forward, transposing_rows.backward,
                      i1 - i0);
            }
          } else {
            for (size_t k = 0; k < transposing.size(); ++k) {
              const int64_t g = transposing[k];
              with_accumulate<scalar_t>(k == 0, w_ptr, g * B + b, [&](const auto& accumulate) {
                gather_rows(acc_t_.data(), i1 - i0, y_ptr + (g * B + b) * sN + c * sC, swap_axes(maps[g]), 0, Wo, i0,
                            i1, accumulate);
              });
            }
          }
          const bool first = plain.empty(), first_t = transposing.empty();
          if (!first_t) {
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (streaming && store_transposed_sum(dst + i0 * Wo, acc.data(), Wo, acc_t_.data(), i1 - i0, i1 - i0, Wo,
                                                    first, scale))
                continue;
            }
            add_transposed(acc.data(), Wo, acc_t_.data(), i1 - i0, i1 - i0, Wo, /*overwrite=*/first);
          }
          store_scaled_band(dst + i0 * Wo, acc.data(), stage.data(), n, scale, streaming);
        }
      }
      finish_streaming();
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
          const PlaneMap& m = by_code[plan.code_at(g, b)];
          const scalar_t* s = y_ptr + (g * B + b) * sN + m.offset + i * m.row_step + j * m.col_step;
          add_pixel(acc.data(), s, C, sC, w_ptr ? w_ptr[g * B + b] : acc_t(1));
        }
        scalar_t* d = dst + j * C;
        for (int64_t c = 0; c < C; ++c) d[c] = static_cast<scalar_t>(acc[c] * scale);
      }
    }
  });
}

}  // namespace

void run_transform(const GroupOpPlan& plan, double scale) {
  dispatch_transform(plan, scale, "group_transform", [&](const auto& op) { transform_kernel(plan, op); });
}

void run_average(const GroupOpPlan& plan, double scale) {
  dispatch_average(plan, [&](auto tag) { average_kernel<decltype(tag)>(plan, scale); });
}

}  // namespace EQUI_CPU_NS
}  // namespace equitune_ext
