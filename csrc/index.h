// Index maths of the image- and volume-group ops, shared by the CPU and the
// CUDA kernels, and the one home of the groups' geometry: the Python side reads
// it through equitune_ext._C (groups.py: inverses and composition; conv.py: the
// affine maps of the combined kernel; triton/: the maps the kernels specialize on).
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
// the 3-D groups subgroups of the cube's 48 symmetries (Oh), encoded as
//
//     code = 8 * perm + bits,   Γ(code) x = x.flip(dims of bits).permute(..., P(perm)) on (D, H, W)
//
// (bit 0 flips W, bit 1 H, bit 2 D; P(perm) is the perm-th permutation of
// (0, 1, 2) in lexicographic order, output axis s showing input axis P[s]; see
// cube_element). equitune_ext/groups.py owns which codes make up which group
// and in which order. The maps are affine with unit steps, which lets the
// kernels hoist all index work out of their inner loops: along an output row
// the input address moves by a constant stride.
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

// The map on memory of a signed permutation: output position o reads input
// element offset + Σ_s o[s] * step[s] of a tensor with sizes `extent` and
// strides `stride` (the input's, per axis).
template <int N>
struct StridedMap {
  int64_t offset;
  int64_t step[N];
};

template <int N>
EQUI_HOST_DEVICE StridedMap<N> strided_map(const SignedPerm<N>& p, const int64_t* extent, const int64_t* stride) {
  StridedMap<N> m{};
  for (int r = 0; r < N; ++r) {
    if (p.reversed[r]) m.offset += (extent[r] - 1) * stride[r];
    m.step[p.axis[r]] = p.reversed[r] ? -stride[r] : stride[r];
  }
  return m;
}

// ---- The cube's 48 symmetries (3-D groups) ----------------------------------

constexpr int kNumCubeCodes = 48;

// The codes of the groups acting on the last `spatial_dims` axes: D4 (2) or the cube's (3).
EQUI_HOST_DEVICE int num_codes(int spatial_dims) { return spatial_dims == 3 ? kNumCubeCodes : kNumD4Codes; }
EQUI_HOST_DEVICE bool code_is_valid(int64_t code, int spatial_dims = 2) {
  return code >= 0 && code < num_codes(spatial_dims);
}

// P(perm)[s], the input axis that output axis s shows: the permutations of
// (0, 1, 2) in lexicographic order, (0,1,2) (0,2,1) (1,0,2) (1,2,0) (2,0,1) (2,1,0).
EQUI_HOST_DEVICE int cube_perm_axis(int perm, int s) {
  const int first = perm >> 1, lo = first == 0 ? 1 : 0, hi = first == 2 ? 1 : 2;
  const bool swapped = (perm & 1) != 0;
  return s == 0 ? first : ((s == 1) != swapped ? lo : hi);
}

// Γ(code) x = x.flip(bits).permute(P): the flips act first, on input axes, so
// input axis r is reversed by bit 2 - r and read from the output axis s with P[s] = r.
EQUI_HOST_DEVICE SignedPerm<3> cube_element(int code) {
  SignedPerm<3> p{};
  for (int s = 0; s < 3; ++s) p.axis[cube_perm_axis(code >> 3, s)] = s;
  for (int r = 0; r < 3; ++r) p.reversed[r] = ((code >> (2 - r)) & 1) != 0;
  return p;
}

EQUI_HOST_DEVICE int cube_code(const SignedPerm<3>& p) {
  int shown[3] = {0, 0, 0};  // P: the input axis that output axis s shows
  for (int r = 0; r < 3; ++r) shown[p.axis[r]] = r;
  const int perm = 2 * shown[0] + (shown[1] > shown[2] ? 1 : 0);
  int bits = 0;
  for (int r = 0; r < 3; ++r) bits |= (p.reversed[r] ? 1 : 0) << (2 - r);
  return 8 * perm + bits;
}

// An element that permutes the axes maps D x H x W onto a permutation of it:
// it needs D == H == W. Codes below 8 are the pure flips.
EQUI_HOST_DEVICE bool cube_code_permutes(int code) { return code >= 8; }
EQUI_HOST_DEVICE int cube_code_inverse(int code) { return cube_code(inverse(cube_element(code))); }
EQUI_HOST_DEVICE int cube_code_compose(int a, int b) { return cube_code(compose(cube_element(a), cube_element(b))); }

// Every element factors as Γ(code) = Γ(8 * perm) Γ(code & 7) (the flips first,
// on input axes: the encoding) = Γ(cube_flips_after_perm(code)) Γ(8 * perm)
// (the permutation first, then flips of output axes, a code < 8). The CPU
// kernels permute a volume once for all the elements that share a
// permutation, and flip it for each.
constexpr int kNumCubePerms = kNumCubeCodes / 8;
EQUI_HOST_DEVICE int cube_flips_after_perm(int code) { return cube_code_compose(code, cube_code_inverse(code & ~7)); }

// The map on memory of Γ(code) for an input of sizes (D, H, W) and strides
// (sD, sH, sW): output (d, h, w) reads offset + d*step[0] + h*step[1] + w*step[2].
EQUI_HOST_DEVICE StridedMap<3> volume_map(int code, const int64_t* extent, const int64_t* stride) {
  return strided_map(cube_element(code), extent, stride);
}

// Input coordinates of output position (i, j) for an H x W input:
//     a = a0 + ai*i + aj*j,   b = b0 + bi*i + bj*j
// (the strided map of each coordinate alone: unit stride on its axis, 0 on the other).
struct CoordMap {
  int64_t a0, ai, aj;
  int64_t b0, bi, bj;
};

EQUI_HOST_DEVICE CoordMap source_coords(int code, int64_t H, int64_t W) {
  const SignedPerm<2> p = d4_element(code);
  const int64_t extent[2] = {H, W}, unit_a[2] = {1, 0}, unit_b[2] = {0, 1};
  const StridedMap<2> a = strided_map(p, extent, unit_a), b = strided_map(p, extent, unit_b);
  return {a.offset, a.step[0], a.step[1], b.offset, b.step[0], b.step[1]};
}

EQUI_HOST_DEVICE int64_t map_row(const CoordMap& m, int64_t i, int64_t j) { return m.a0 + m.ai * i + m.aj * j; }
EQUI_HOST_DEVICE int64_t map_col(const CoordMap& m, int64_t i, int64_t j) { return m.b0 + m.bi * i + m.bj * j; }

// The 2-D map on memory: output (i, j) reads input element
//     offset + i*row_step + j*col_step
// of a plane whose row and column strides are (stride_h, stride_w).
struct PlaneMap {
  int64_t offset, row_step, col_step;
};

EQUI_HOST_DEVICE PlaneMap source_plane_map(int code, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w) {
  const int64_t extent[2] = {H, W}, stride[2] = {stride_h, stride_w};
  const StridedMap<2> m = strided_map(d4_element(code), extent, stride);
  return {m.offset, m.step[0], m.step[1]};
}

// The code of a per-row op's table entry as the CUDA kernels read it (the
// table is not checked on the host there): any value gives a valid code, and
// a non-square plane gets one that keeps its shape, so a bad table can give
// wrong values but never an access out of bounds. Valid codes pass unchanged.
EQUI_HOST_DEVICE int row_code(int64_t code, bool square) {
  const int c = static_cast<int>(code & 7);
  return square ? c : c & ~1;
}

// The same for a volume op's table: a valid cube code, a pure flip (code < 8)
// unless the volume is a cube.
EQUI_HOST_DEVICE int volume_row_code(int64_t code, bool cube) {
  const int c = static_cast<int>(static_cast<uint64_t>(code) % kNumCubeCodes);
  return cube ? c : c & 7;
}

// Shape of Γ(code)x for an H x W input.
EQUI_HOST_DEVICE int64_t output_height(int code, int64_t H, int64_t W) { return code_transposes(code) ? W : H; }
EQUI_HOST_DEVICE int64_t output_width(int code, int64_t H, int64_t W) { return code_transposes(code) ? H : W; }

}  // namespace equitune_ext
