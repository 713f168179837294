// Index maths of the image-group ops, shared by the CPU and the CUDA kernels,
// and the one home of the groups' geometry: the Python side reads it through
// equitune_ext._C (groups.py: inverses and composition; conv.py: the affine
// maps of the combined kernel; triton/: the maps the kernels specialize on).
//
// Every element is a signed permutation of the tensor's last N axes: output
// position o reads input position u with
//
//     u[r] = reversed[r] ? extent[r] - 1 - o[axis[r]] : o[axis[r]]
//
// (extent: the input's sizes). The 2-D groups are subgroups of D4, encoded as
//
//     code = 4 * flip + k,   Γ(code) x = torch.rot90(flip ? x.flip(-1) : x, k, dims=(-2, -1))
//
// (equitune_ext/groups.py owns which codes make up which group and in which
// order; d4_element turns a code into its signed permutation). The maps are
// affine with unit steps, which lets the kernels hoist all index work out of
// their inner loops: along an output row the input address moves by a
// constant stride.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EQUI_HOST_DEVICE __host__ __device__ inline
#else
#define EQUI_HOST_DEVICE inline
#endif

namespace equitune_ext {

// Input axis r of Γ x is read from output axis axis[r], reversed if reversed[r].
template <int N>
struct SignedPerm {
  int axis[N];
  bool reversed[N];
};

template <int N>
EQUI_HOST_DEVICE bool operator==(const SignedPerm<N>& p, const SignedPerm<N>& q) {
  for (int r = 0; r < N; ++r)
    if (p.axis[r] != q.axis[r] || p.reversed[r] != q.reversed[r]) return false;
  return true;
}

// Γ(p)Γ(q) (q acts first): (Γ(p)Γ(q)x)[o] = x[S_q(S_p(o))], so input axis s reads
// axis q.axis[s] of Γ(p)'s input, which reads output axis p.axis[q.axis[s]].
template <int N>
EQUI_HOST_DEVICE SignedPerm<N> compose(const SignedPerm<N>& p, const SignedPerm<N>& q) {
  SignedPerm<N> c{};
  for (int s = 0; s < N; ++s) {
    c.axis[s] = p.axis[q.axis[s]];
    c.reversed[s] = q.reversed[s] != p.reversed[q.axis[s]];
  }
  return c;
}

template <int N>
EQUI_HOST_DEVICE SignedPerm<N> inverse(const SignedPerm<N>& p) {
  SignedPerm<N> inv{};
  for (int r = 0; r < N; ++r) {
    inv.axis[p.axis[r]] = r;
    inv.reversed[p.axis[r]] = p.reversed[r];
  }
  return inv;
}

constexpr int kNumD4Codes = 8;

EQUI_HOST_DEVICE bool code_is_valid(int64_t code) { return code >= 0 && code < kNumD4Codes; }

// rot90 by k reads (row, col) = (i, j), (j, W-1-i), (H-1-i, W-1-j), (H-1-j, i)
// for k = 0..3; a flip (acting first) also reverses the column.
EQUI_HOST_DEVICE SignedPerm<2> d4_element(int code) {
  const int k = code & 3;
  const bool transposes = (k & 1) != 0;
  SignedPerm<2> p{};
  p.axis[0] = transposes ? 1 : 0;
  p.axis[1] = transposes ? 0 : 1;
  p.reversed[0] = k >= 2;
  p.reversed[1] = (((k ^ (k >> 1)) & 1) != 0) != (code >= 4);
  return p;
}

EQUI_HOST_DEVICE int d4_code(const SignedPerm<2>& p) {
  for (int code = 0; code < kNumD4Codes; ++code)
    if (d4_element(code) == p) return code;
  return -1;  // unreachable: the signed permutations of two axes are D4
}

// Odd rotations swap the two spatial axes: output is W x H, and along an
// output row the input address moves along an input column.
EQUI_HOST_DEVICE bool code_transposes(int code) { return d4_element(code).axis[0] != 0; }
EQUI_HOST_DEVICE int code_inverse(int code) { return d4_code(inverse(d4_element(code))); }
EQUI_HOST_DEVICE int code_compose(int a, int b) { return d4_code(compose(d4_element(a), d4_element(b))); }

// Input coordinates of output position (i, j) for an H x W input:
//     a = a0 + ai*i + aj*j,   b = b0 + bi*i + bj*j
struct CoordMap {
  int64_t a0, ai, aj;
  int64_t b0, bi, bj;
};

EQUI_HOST_DEVICE CoordMap source_coords(int code, int64_t H, int64_t W) {
  const SignedPerm<2> p = d4_element(code);
  const int64_t step_a = p.reversed[0] ? -1 : 1, step_b = p.reversed[1] ? -1 : 1;
  return {p.reversed[0] ? H - 1 : 0, p.axis[0] == 0 ? step_a : 0, p.axis[0] == 1 ? step_a : 0,
          p.reversed[1] ? W - 1 : 0, p.axis[1] == 0 ? step_b : 0, p.axis[1] == 1 ? step_b : 0};
}

EQUI_HOST_DEVICE int64_t map_row(const CoordMap& m, int64_t i, int64_t j) { return m.a0 + m.ai * i + m.aj * j; }
EQUI_HOST_DEVICE int64_t map_col(const CoordMap& m, int64_t i, int64_t j) { return m.b0 + m.bi * i + m.bj * j; }

// The same map on memory: output (i, j) reads input element
//     offset + i*row_step + j*col_step
// of a plane whose row and column strides are (stride_h, stride_w).
struct PlaneMap {
  int64_t offset, row_step, col_step;
};

EQUI_HOST_DEVICE PlaneMap source_plane_map(int code, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w) {
  const CoordMap m = source_coords(code, H, W);
  return {m.a0 * stride_h + m.b0 * stride_w, m.ai * stride_h + m.bi * stride_w,
          m.aj * stride_h + m.bj * stride_w};
}

// The code of a per-row op's table entry as the CUDA kernels read it (the
// table is not checked on the host there): any value gives a valid code, and
// a non-square plane gets one that keeps its shape, so a bad table can give
// wrong values but never an access out of bounds. Valid codes pass unchanged.
EQUI_HOST_DEVICE int row_code(int64_t code, bool square) {
  const int c = static_cast<int>(code & 7);
  return square ? c : c & ~1;
}

// Shape of Γ(code)x for an H x W input.
EQUI_HOST_DEVICE int64_t output_height(int code, int64_t H, int64_t W) { return code_transposes(code) ? W : H; }
EQUI_HOST_DEVICE int64_t output_width(int code, int64_t H, int64_t W) { return code_transposes(code) ? H : W; }

}  // namespace equitune_ext
