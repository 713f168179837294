// Index maths of the image-group ops, shared by the CPU and the CUDA kernels.
//
// Every image group of equitune_ext is a subgroup of D4 acting on the last two
// dims of a tensor. An element is encoded as
//
//     code = 4 * flip + k,   Γ(code) x = torch.rot90(flip ? x.flip(-1) : x, k, dims=(-2, -1))
//
// (the Python side, equitune_ext/groups.py, owns which codes make up which
// group and in which order; this header only knows how one code moves pixels).
//
// Both ops are built from one primitive: "output position (i, j) of Γ(code)x
// reads input position (a, b)", an affine map with unit steps. Keeping it
// affine lets the kernels hoist all index work out of their inner loops:
// along an output row the input address moves by a constant stride.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define EQUI_HOST_DEVICE __host__ __device__ inline
#else
#define EQUI_HOST_DEVICE inline
#endif

namespace equitune_ext {

constexpr int kNumD4Codes = 8;

EQUI_HOST_DEVICE bool code_is_valid(int64_t code) { return code >= 0 && code < kNumD4Codes; }
EQUI_HOST_DEVICE int code_rotation(int code) { return code & 3; }
EQUI_HOST_DEVICE bool code_flips(int code) { return code >= 4; }
// Odd rotations swap the two spatial axes: output is W x H, and along an
// output row the input address moves along an input column.
EQUI_HOST_DEVICE bool code_transposes(int code) { return (code & 1) != 0; }
// Rotations invert to the opposite rotation; every flipped element of D4 is a
// reflection and so its own inverse.
EQUI_HOST_DEVICE int code_inverse(int code) { return code_flips(code) ? code : (4 - code) & 3; }

// Input coordinates of output position (i, j) for an H x W input:
//     a = a0 + ai*i + aj*j,   b = b0 + bi*i + bj*j
struct CoordMap {
  int64_t a0, ai, aj;
  int64_t b0, bi, bj;
};

EQUI_HOST_DEVICE CoordMap source_coords(int code, int64_t H, int64_t W) {
  CoordMap m{};
  switch (code_rotation(code)) {
    case 0:  // out[i, j] = x[i, j]
      m = {0, 1, 0, 0, 0, 1};
      break;
    case 1:  // out[i, j] = x[j, W-1-i]
      m = {0, 0, 1, W - 1, -1, 0};
      break;
    case 2:  // out[i, j] = x[H-1-i, W-1-j]
      m = {H - 1, -1, 0, W - 1, 0, -1};
      break;
    default:  // out[i, j] = x[H-1-j, i]
      m = {H - 1, 0, -1, 0, 1, 0};
      break;
  }
  if (code_flips(code)) {  // the flip acts first: x.flip(-1)[a, b] = x[a, W-1-b]
    m.b0 = W - 1 - m.b0;
    m.bi = -m.bi;
    m.bj = -m.bj;
  }
  return m;
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
