"""Triton kernels of group_transform / group_average and their launchers.

Same op semantics as the C++ kernels (see equitune_ext/contract.py):

    transform: out[g*B + b] = scale * Γ(elements[g]) x[b]
    average:   out[b]       = scale * Σ_g Γ(elements[g]) y[g*B + b]

The per-element index maps are not re-derived here: the launchers ask the C++
header (csrc/index.h, through equitune_ext._C.source_coords) for each
element's affine coordinate map, so all backends move pixels by one formula.
All kernels get the maps as one compile-time integer (_pack_maps: a kernel
specializes on the group and knows every access direction).

Planar kernels (contiguous output) work on square tiles and touch memory only
along rows, in 16-byte vectors where alignment allows: an element that
transposes (odd rotation) is handled with ``tl.trans`` on a tile read or
written in the orientation memory has, one that reverses columns with
``tl.flip`` on a tile read or written as the mirror image (ascending
addresses; see _tile_offsets). The average gathers each output tile from its
|G| sources and sums the tiles of each kind before flipping and transposing
once; the transform has two strategies, input tiles (read once, scatter |G|
images) and output tiles (gather one image, as the average does), and its
autotuner times both (transform_config fixes one, for tests and benchmarks).
benchmarks/triton_compiled.py shows what the NVIDIA compiler makes of them.
channels_last outputs use a flat kernel whose innermost index is the channel,
contiguous on both sides.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .. import _C
from ..groups import INVERSE_CODES
from ..contract import as_planes, check_image_op, check_image_rows_op, new_image_output, wants_channels_last

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile configs: 32x32 / 4 warps suits 56x56 planes (few masked lanes);
# 64x64 / 8 warps suits large planes. Keyed on the plane size. Under the
# interpreter (CI on CPU) autotuning cannot time anything: one fixed config.
_TILE_CONFIGS = [
    triton.Config({"BLOCK": 32}, num_warps=4),
    triton.Config({"BLOCK": 64}, num_warps=8),
]
# The transform also tries both ways of cutting its work (see _group_transform_kernel).
_TRANSFORM_CONFIGS = [
    triton.Config({**config.kwargs, "OUTPUT_TILES": output_tiles}, num_warps=config.num_warps)
    for config in _TILE_CONFIGS for output_tiles in (False, True)
]
# channels_last (flat) kernels: 4 elements per thread. With 8 per thread the
# unrolled d4 average needs 234 registers on sm_90 (128 at 4; table in
# benchmarks/results/triton_compiled_sm90.md).
_FLAT_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=8), triton.Config({"BLOCK": 512}, num_warps=4)]


# EQUITUNE_TRITON_AUTOTUNE=0 keeps only each autotuner's first config (read at
# import): the kernels still launch through the autotuner, but nothing is timed
# and each kernel variant compiles once. For test runs on a GPU, where timing
# four transform configs for every shape, dtype and group costs minutes of
# compiling (benchmarks/gpu_check.sh sets it for its tests, not its timings).
_AUTOTUNE = os.environ.get("EQUITUNE_TRITON_AUTOTUNE", "1") != "0"


def _autotune(configs, key):
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs if _AUTOTUNE else configs[:1], key=key)


@triton.jit
def scale_factor(scale_hi, scale_lo, ACC_DTYPE: tl.constexpr):
    """The op's scale in the accumulation dtype. Triton passes Python floats as
    fp32, so the launcher splits scale into hi = fp32(scale) and lo = fp32(scale - hi):
    their sum carries ~48 bits, enough for float64 (e.g. 1/3 for |G| = 3)."""
    return tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)


@triton.jit
def _aligned(H, W, Ho, Wo, sN, sC, sH, ROW_ALIGN: tl.constexpr):
    """The planar kernels' plane sides and row strides, which the launcher passes
    divided by ROW_ALIGN (see _row_align): multiplying back tells Triton they are
    multiples of it, so row starts are vector-aligned, masks are constant over a
    vector, and loads and stores vectorize (tl.multiple_of does not reach scalar
    arguments)."""
    return (H * ROW_ALIGN, W * ROW_ALIGN, Ho * ROW_ALIGN, Wo * ROW_ALIGN,
            sN * ROW_ALIGN, sC * ROW_ALIGN, sH * ROW_ALIGN)


# Bit 0 of every 3-bit element of a packed map (see _pack_maps), for compile-time
# questions about a whole group: `EACH_ELEMENT_BIT0 & MAPS` is nonzero if some
# element transposes, `EACH_ELEMENT_BIT0 & (MAPS >> 2)` if some element reverses
# columns (and `& MAPS & (MAPS >> 2)` if one does both).
EACH_ELEMENT_BIT0: tl.constexpr = tl.constexpr(int("001" * 21, 2))


@triton.jit
def _tile_offsets(r0, c0, n_rows, n_cols, row_stride, col_stride,
                  ROWS_REVERSED: tl.constexpr, COLS_MIRRORED: tl.constexpr,
                  WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets and mask of a BLOCK x BLOCK block of an n_rows x n_cols plane whose
    [r, k] is plane row r0 + r (ROWS_REVERSED: n_rows-1 - (r0 + r)) and column
    c0 + k (COLS_MIRRORED: n_cols - BLOCK - c0 + k, the mirror image of columns
    n_cols-1 - (c0 + k) along k, so that a reversed run of columns still moves
    along memory: contiguous, 16-byte vectorized, one register layout for all)."""
    k = tl.arange(0, BLOCK)
    rows = r0 + k
    a = (n_rows - 1 - r0) - k if ROWS_REVERSED else rows
    if COLS_MIRRORED:
        col = (n_cols - BLOCK - c0) + k
        col_ok = col >= 0
    else:
        col = c0 + k
        col_ok = col < n_cols
    if WIDE_INDEX:  # a plane whose offsets pass 2^31: 64-bit index maths inside it too
        a = a.to(tl.int64)
        col = col.to(tl.int64)
    return a[:, None] * row_stride + col[None, :] * col_stride, (rows < n_rows)[:, None] & col_ok[None, :]


# Whether the kernels run under the interpreter, as a compile-time value for them.
_INTERPRETING: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _mirror_columns(v, BLOCK: tl.constexpr):
    """v with its columns in reverse order, v[:, ::-1]. Compiled: tl.flip, warp
    shuffles here (a tile row lies within one warp; tl.gather went through shared
    memory with barriers). The interpreter runs tl.flip's five xor-reductions
    element by element (about 2 s for one small hflip transform), so there the
    same values come from tl.gather, one numpy take; GPU tests cover tl.flip."""
    if _INTERPRETING:
        reverse = tl.broadcast_to((BLOCK - 1 - tl.arange(0, BLOCK))[None, :], (BLOCK, BLOCK))
        return tl.gather(v, reverse, 1)
    else:
        return tl.flip(v, 1)


@triton.jit
def _source_tile(base, i0, j0, Ho, Wo, sH, sW, MAPS: tl.constexpr, g: tl.constexpr,
                 WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Element g's source pixels for the BLOCK x BLOCK output tile at (i0, j0), read
    from its source plane at base along memory. MAPS holds the source maps (see
    _pack_maps): the source (a, col) of output (i, j) is (i, j), or (j, i) for a
    transposing element, each coordinate possibly reversed.

    Where the map reverses the source column, the tile is the mirror image
    (tl.flip, dim 1) of the output's (see _tile_offsets), and for a transposing
    element its transpose, so every read is contiguous and all tiles share one
    register layout; the caller flips and transposes back once per sum of tiles.
    (Read in output order, a reversed column was a descending run of addresses:
    scalar loads, which Triton 3.6 gave a column-major layout that each addition
    then converted through shared memory.)"""
    # Decoded here as compile-time values: a @triton.jit helper returns run-time
    # values, and with run-time branches here this function was not inlined into
    # the transform's per-element branches (an scf.if region takes one block), so
    # it was compiled once for every element: in the sm_90 SASS of the c4 output-
    # tile transform every load was scalar, the identity's too, with 27 barriers.
    TRANSPOSES: tl.constexpr = (MAPS >> (3 * g)) & 1
    FIRST_REVERSED: tl.constexpr = (MAPS >> (3 * g + 1)) & 1
    SECOND_REVERSED: tl.constexpr = (MAPS >> (3 * g + 2)) & 1
    if TRANSPOSES:  # source rows follow output columns
        offsets, mask = _tile_offsets(j0, i0, Wo, Ho, sH, sW, FIRST_REVERSED, SECOND_REVERSED, WIDE_INDEX, BLOCK)
    else:
        offsets, mask = _tile_offsets(i0, j0, Ho, Wo, sH, sW, FIRST_REVERSED, SECOND_REVERSED, WIDE_INDEX, BLOCK)
    return tl.load(base + offsets, mask=mask, other=0)


@triton.jit
def _scatter_tile(dst, v, a0, col0, H, W, Wo, MAPS: tl.constexpr, g: tl.constexpr,
                  WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Store input tile v (the BLOCK x BLOCK tile at (a0, col0) of an H x W plane)
    as its part of element g's image, the output plane at dst (rows of Wo).
    MAPS holds the destination maps (see _pack_maps; decoded here for the reason
    in _source_tile). A transposing element stores the transposed tile, a
    column-reversing one the mirrored tile at ascending addresses (see
    _tile_offsets): every store runs along memory."""
    TRANSPOSES: tl.constexpr = (MAPS >> (3 * g)) & 1
    FIRST_REVERSED: tl.constexpr = (MAPS >> (3 * g + 1)) & 1
    SECOND_REVERSED: tl.constexpr = (MAPS >> (3 * g + 2)) & 1
    if TRANSPOSES:  # output rows follow input columns
        v = tl.trans(v)
        offsets, mask = _tile_offsets(col0, a0, W, H, Wo, 1, FIRST_REVERSED, SECOND_REVERSED, WIDE_INDEX, BLOCK)
    else:
        offsets, mask = _tile_offsets(a0, col0, H, W, Wo, 1, FIRST_REVERSED, SECOND_REVERSED, WIDE_INDEX, BLOCK)
    if SECOND_REVERSED:
        v = _mirror_columns(v, BLOCK)
    tl.store(dst + offsets, v, mask=mask)


# CUDA allows at most 65535 programs along grid axes 1 and 2: a plane's tiles are
# numbered along both (tile = axis-1 id + axis-2 id * axis-1 size), so planes of
# 8192 x 8192 and more (65536 tiles of 32 x 32) launch too. The ids past the last
# tile start below the plane and are masked out entirely.
_GRID_AXIS_LIMIT = 65535


def _tiles_grid(planes: int, tiles: int) -> Tuple[int, int, int]:
    """The planar kernels' launch grid: planes along axis 0, the tiles of each
    along axes 1 and 2 (as few extra ids as the limit allows)."""
    rounds = triton.cdiv(tiles, _GRID_AXIS_LIMIT)
    return planes, triton.cdiv(tiles, rounds), rounds


@triton.jit
def _tile_id():
    """This program's tile of its plane (see _tiles_grid)."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def _tile_origin(tile, Wo, BLOCK: tl.constexpr):
    """First row and column of square tile number `tile` of a plane with rows of
    Wo (row-major tile order)."""
    tiles_w = tl.cdiv(Wo, BLOCK)
    return (tile // tiles_w) * BLOCK, (tile % tiles_w) * BLOCK


@triton.jit
def _tile_coords(i0, j0, Ho, Wo, WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Rows i and cols j of the BLOCK x BLOCK tile at (i0, j0) of an Ho x Wo
    plane, and the tile's mask."""
    i = i0 + tl.arange(0, BLOCK)
    j = j0 + tl.arange(0, BLOCK)
    if WIDE_INDEX:  # a plane whose offsets pass 2^31: 64-bit index maths inside it too
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    return i, j, (i[:, None] < Ho) & (j[None, :] < Wo)


@triton.jit
def _transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo,
                      APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Tile v of output block (g, b) times scale (1.0 unless APPLY_SCALE) and the
    λ-weight of the block (none unless HAS_WEIGHTS), in v's dtype."""
    if APPLY_SCALE or HAS_WEIGHTS:
        factor = scale_factor(scale_hi, scale_lo, ACC_DTYPE)
        if HAS_WEIGHTS:
            factor = factor * tl.load(w_ptr + g * B + b).to(ACC_DTYPE)
        v = (v.to(ACC_DTYPE) * factor).to(v.dtype)
    return v


@triton.jit
def _group_transform_kernel(
    x_ptr, out_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, scale_hi, scale_lo,
    G: tl.constexpr, DEST_MAPS: tl.constexpr, SRC_MAPS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    WIDE_INDEX: tl.constexpr, APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    OUTPUT_TILES: tl.constexpr, BLOCK: tl.constexpr,
):
    # Two ways to cut the work, both timed by the autotuner (configs with
    # OUTPUT_TILES False and True; see _TRANSFORM_CONFIGS):
    #   input tiles   one program per input tile (b, c, tile) reads it once and
    #                 scatters all G images of it (G stores, transposing ones
    #                 through tl.trans);
    #   output tiles  one program per output tile (g, b, c, tile) gathers it like
    #                 the average does and stores it contiguously; g varies
    #                 fastest over programs, so the G programs that read one input
    #                 tile run together and re-read it from L2, not from memory.
    H, W, Ho, Wo, sN, sC, sH = _aligned(H, W, Ho, Wo, sN, sC, sH, ROW_ALIGN)
    pid = tl.program_id(0).to(tl.int64)
    tile = _tile_id()
    if OUTPUT_TILES:
        g_here = pid % G
        plane = pid // G
        b = plane // C
        c = plane % C
        i0, j0 = _tile_origin(tile, Wo, BLOCK)
        i, j, mask = _tile_coords(i0, j0, Ho, Wo, WIDE_INDEX, BLOCK)
        for g in tl.static_range(G):  # compile-time maps: one branch per element, one taken
            if g_here == g:
                v = _source_tile(x_ptr + b * sN + c * sC, i0, j0, Ho, Wo, sH, sW, SRC_MAPS, g, WIDE_INDEX, BLOCK)
                if (SRC_MAPS >> (3 * g + 2)) & 1:  # read as the mirror image (see _source_tile)
                    v = _mirror_columns(v, BLOCK)
                if (SRC_MAPS >> (3 * g)) & 1:  # element g transposes
                    v = tl.trans(v)
                v = _transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
                dst = out_ptr + ((g * B + b) * C + c) * Ho * Wo
                tl.store(dst + i[:, None] * Wo + j[None, :], v, mask=mask)
    else:
        b = pid // C
        c = pid % C
        a0, col0 = _tile_origin(tile, W, BLOCK)
        a, col, mask = _tile_coords(a0, col0, H, W, WIDE_INDEX, BLOCK)
        x = tl.load(x_ptr + b * sN + c * sC + a[:, None] * sH + col[None, :] * sW, mask=mask)
        for g in tl.static_range(G):
            v = _transform_scaled(x, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
            dst = out_ptr + ((g * B + b) * C + c) * Ho * Wo
            _scatter_tile(dst, v, a0, col0, H, W, Wo, DEST_MAPS, g, WIDE_INDEX, BLOCK)


# Tuning keys: plane sides and |G|. Keying on B and C too (H200 run 5) chose the
# same configs at B=32 and B=256 for both ops, so one round of timing per plane
# shape is enough.
_group_transform_autotuned = _autotune(_TRANSFORM_CONFIGS, key=["H", "W", "G"])(_group_transform_kernel)


@_autotune(_TILE_CONFIGS, key=["Ho", "Wo", "G"])
@triton.jit
def _group_average_kernel(
    y_ptr, out_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, scale_hi, scale_lo,
    G: tl.constexpr, MAPS: tl.constexpr, ROW_ALIGN: tl.constexpr, WIDE_INDEX: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: output plane (b, c), one BLOCK x BLOCK output tile.
    # out[b, c, i, j] = scale * Σ_g y[g*B + b, c, source_g(i, j)]   (source maps: MAPS).
    H, W, Ho, Wo, sN, sC, sH = _aligned(H, W, Ho, Wo, sN, sC, sH, ROW_ALIGN)
    plane = tl.program_id(0).to(tl.int64)
    b = plane // C
    c = plane % C
    i0, j0 = _tile_origin(_tile_id(), Wo, BLOCK)
    # Every element's tile is read along memory in one register layout (see
    # _source_tile) and summed with the others of its kind: plain, mirrored,
    # transposed, both. Each sum is flipped / transposed back once, after every
    # load: transposing each tile on its own (a layout change through shared
    # memory, between barriers) made each element's loads wait for the previous
    # element's data (sm_90 PTX, d4: 15 barriers with loads between them; now
    # one barrier, after the last load: test_backends.py keeps it so).
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    acc_m = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    acc_t = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    acc_tm = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    # Kinds in the order 5, 1, 4, 0 (bit 1: transposes, bit 4: mirrored), the plain
    # one last: the compiler changes the plain sum's layout right after its last
    # update, which must come after every load.
    for kind in tl.static_range(4):
        for g in tl.static_range(G):
            if ((MAPS >> (3 * g)) & 5) == (5, 1, 4, 0)[kind]:
                v = _source_tile(y_ptr + (g * B + b) * sN + c * sC, i0, j0, Ho, Wo, sH, sW, MAPS, g, WIDE_INDEX,
                                 BLOCK).to(ACC_DTYPE)
                if HAS_WEIGHTS:
                    v = v * tl.load(w_ptr + g * B + b).to(ACC_DTYPE)
                if kind == 0:
                    acc_tm += v
                elif kind == 1:
                    acc_t += v
                elif kind == 2:
                    acc_m += v
                else:
                    acc += v
    # Only the kinds that occur (compile-time tests on MAPS):
    if EACH_ELEMENT_BIT0 & MAPS & (MAPS >> 2):
        acc_t += _mirror_columns(acc_tm, BLOCK)
    if EACH_ELEMENT_BIT0 & MAPS:
        acc += tl.trans(acc_t)
    if EACH_ELEMENT_BIT0 & ~MAPS & (MAPS >> 2):
        acc += _mirror_columns(acc_m, BLOCK)
    acc = acc * scale_factor(scale_hi, scale_lo, ACC_DTYPE)
    i, j, mask = _tile_coords(i0, j0, Ho, Wo, WIDE_INDEX, BLOCK)
    tl.store(out_ptr + plane * Ho * Wo + i[:, None] * Wo + j[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channels_last_coords(idx, C, Ho, Wo):
    """(n, i, j, c) of flat indices into an [N, Ho, Wo, C]-ordered tensor."""
    c = idx % C
    t = idx // C
    j = t % Wo
    t = t // Wo
    return t // Ho, t % Ho, j, c


@triton.jit
def _source_pixel(i, j, Ho, Wo, MAPS: tl.constexpr, g: tl.constexpr):
    """Source (row, col) of output pixels (i, j) under element g's source map
    (MAPS, see _pack_maps; decoded here for the reason in _source_tile)."""
    TRANSPOSES: tl.constexpr = (MAPS >> (3 * g)) & 1
    FIRST_REVERSED: tl.constexpr = (MAPS >> (3 * g + 1)) & 1
    SECOND_REVERSED: tl.constexpr = (MAPS >> (3 * g + 2)) & 1
    if TRANSPOSES:
        first, second, n_first, n_second = j, i, Wo, Ho
    else:
        first, second, n_first, n_second = i, j, Ho, Wo
    a = (n_first - 1) - first if FIRST_REVERSED else first
    col = (n_second - 1) - second if SECOND_REVERSED else second
    return a, col


@_autotune(_FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_transform_channels_last_kernel(
    x_ptr, out_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale_hi, scale_lo,
    G: tl.constexpr, MAPS: tl.constexpr, APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out in [N, Ho, Wo, C] memory order: out[n, i, j, c] = x[b, c, src_g(i, j)], n = g*B + b.
    # The element varies along the block (at image boundaries), so each pixel's
    # source is selected among the G compile-time maps (cheap integer selects; the
    # maps used to be read from memory, 6 loads per pixel).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    n, i, j, c = _channels_last_coords(idx, C, Ho, Wo)
    g = n // B
    b = n % B
    a = i
    col = j
    for g_k in tl.static_range(G):
        a_k, col_k = _source_pixel(i, j, Ho, Wo, MAPS, g_k)
        a = tl.where(g == g_k, a_k, a)
        col = tl.where(g == g_k, col_k, col)
    v = tl.load(x_ptr + b * sN + c * sC + a * sH + col * sW, mask=valid)
    if APPLY_SCALE or HAS_WEIGHTS:
        factor = scale_factor(scale_hi, scale_lo, ACC_DTYPE)
        if HAS_WEIGHTS:
            factor = factor * tl.load(w_ptr + g * B + b, mask=valid, other=0.0).to(ACC_DTYPE)
        v = (v.to(ACC_DTYPE) * factor).to(v.dtype)
    tl.store(out_ptr + idx, v, mask=valid)


@_autotune(_FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_average_channels_last_kernel(
    y_ptr, out_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale_hi, scale_lo,
    G: tl.constexpr, MAPS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out in [B, Ho, Wo, C] memory order: out[b, i, j, c] = scale * Σ_g y[g*B + b, c, src_g(i, j)].
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    b, i, j, c = _channels_last_coords(idx, C, Ho, Wo)
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for g in tl.static_range(G):
        a, col = _source_pixel(i, j, Ho, Wo, MAPS, g)
        v = tl.load(y_ptr + (g * B + b) * sN + c * sC + a * sH + col * sW, mask=valid, other=0.0)
        if HAS_WEIGHTS:
            acc += tl.load(w_ptr + g * B + b, mask=valid, other=0.0).to(ACC_DTYPE) * v.to(ACC_DTYPE)
        else:
            acc += v.to(ACC_DTYPE)
    acc = acc * scale_factor(scale_hi, scale_lo, ACC_DTYPE)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _as_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """Triton has no complex or 1-bit-addressed bool loads: move those as raw bits."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype == torch.complex64:
        return t.view(torch.int64)
    if t.dtype == torch.complex128:
        raise TypeError("group_transform: the triton backend does not support complex128; use backend='cpp'")
    return t


def split_scale(scale: float):
    """(hi, lo) fp32 parts of a float scale; see scale_factor."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    lo = struct.unpack("f", struct.pack("f", scale - hi))[0]
    # A zero lo takes hi's sign: -0.0 + 0.0 is +0.0, so scale -0.0 would lose its sign.
    return hi, (math.copysign(0.0, hi) if lo == 0.0 else lo)


def _map_bits(code: int) -> int:
    (first_axis, _), (first_reversed, second_reversed) = _C.signed_perm(code)
    return int(first_axis != 0) | first_reversed << 1 | second_reversed << 2


_MAP_BITS = tuple(_map_bits(code) for code in range(8))


def _pack_maps(codes: List[int], inverse: bool) -> int:
    """Each element's signed permutation (csrc/index.h, through _C.signed_perm)
    packed into one compile-time integer, so the planar kernels specialize on the
    group and know every access direction: element g is 3 bits at bit 3g,
    TRANSPOSES, FIRST_REVERSED (the input row is read reversed), SECOND_REVERSED
    (the input column is), which _source_tile and _scatter_tile decode into the
    map (p, q) -> (p, q) or (q, p), each coordinate possibly reversed.

    inverse=False: the source maps of the average (output (i, j) -> input);
    inverse=True: the destination maps of the transform (input (a, col) ->
    output), i.e. the source maps of the inverse elements."""
    packed = 0
    for g, code in enumerate(codes):
        packed |= _MAP_BITS[INVERSE_CODES[code] if inverse else code] << (3 * g)
    return packed


def _row_align(t: torch.Tensor, *row_lengths: int) -> int:
    """Largest vector width (elements, <= 16 bytes) dividing t's offset and row
    strides and the plane sides (so every row of t and of the output starts on a
    vector and masks are constant over one): the kernels' alignment hints."""
    # Offsets, not data_ptr(): fake tensors (torch.compile tracing) have no data;
    # allocations start on 16-byte (or coarser) boundaries, which Triton assumes too.
    n = 16 // t.element_size()
    while n > 1:
        if all(s % n == 0 for s in (t.storage_offset(), *t.stride()[:-1], *row_lengths)):
            return n
        n //= 2
    return 1


def _wide_index(t: torch.Tensor, out_plane: Tuple[int, int]) -> bool:
    """Whether offsets inside one plane can pass 2^31 (then the planar kernels
    do their in-plane index maths in 64 bits; plane offsets always are).
    out_plane: the output's (Ho, Wo), a contiguous plane."""
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape[-2:], t.stride()[-2:]))
    return max(span, out_plane[0] * out_plane[1]) >= 2**31


# The interpreter cannot time configs: one fixed config there (the tests run the
# other strategy through transform_config).
_INTERPRETER_TRANSFORM_CONFIG = triton.Config({"BLOCK": 32, "OUTPUT_TILES": False})
_forced_transform_config = None  # (output_tiles, block, num_warps) inside transform_config


@contextlib.contextmanager
def transform_config(output_tiles: bool, block: int = 32, num_warps: int = 4):
    """Within the block, the planar group_transform runs with this one config
    instead of the autotuner's choice: how the tests check both strategies and
    the benchmark times each (eager calls only; not thread-safe)."""
    global _forced_transform_config
    if block not in (16, 32, 64, 128):
        raise ValueError(f"transform_config: block must be 16, 32, 64 or 128, got {block}")
    previous = _forced_transform_config
    _forced_transform_config = (bool(output_tiles), block, num_warps)
    try:
        yield
    finally:
        _forced_transform_config = previous


# ---------------------------------------------------------------------------
# Launchers and ops
# ---------------------------------------------------------------------------

def launch(kernel, grid, *args, **meta) -> None:
    """kernel[grid](*args, **meta) on the device of the first argument (Triton
    launches on the current one), through wrap_triton so that torch.compile
    and export see the kernel."""
    t = args[0]
    other_device = t.is_cuda and not is_fake(t) and t.device.index != torch.cuda.current_device()
    with torch.cuda.device(t.device) if other_device else contextlib.nullcontext():
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


def weights_arg(weights, t: torch.Tensor) -> torch.Tensor:
    """The kernels' weights argument: contiguous [G, B] in t's accumulation
    dtype, or an empty tensor (never read) for unweighted calls."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.empty(0, dtype=dtype, device=t.device) if weights is None else weights.to(dtype).contiguous()


def _launch_image_op(t: torch.Tensor, elements: List[int], scale: float, weights, is_average: bool) -> torch.Tensor:
    """Checks, allocates the output and launches the planar (contiguous
    output) or the channels_last kernel of the transform or the average."""
    check_image_op(t, elements, scale, weights, is_average, "group_average" if is_average else "group_transform")
    G = len(elements)
    B = t.shape[0] // G if is_average else t.shape[0]
    out = new_image_output(t, elements, B if is_average else B * G)
    if out.numel() == 0:
        return out
    t4, out4, w = _as_kernel_dtype(as_planes(t)), _as_kernel_dtype(as_planes(out)), weights_arg(weights, t)
    _, C, H, W = t4.shape
    Ho, Wo = out4.shape[-2:]
    maps = _pack_maps(elements, inverse=False)
    meta = dict(G=G, HAS_WEIGHTS=weights is not None, ACC_DTYPE=acc_dtype(t))
    if not is_average:
        meta["APPLY_SCALE"] = scale != 1.0
    if wants_channels_last(t):  # flat kernel over the output in [N, Ho, Wo, C] order
        numel = out.numel()
        kernel = _group_average_channels_last_kernel if is_average else _group_transform_channels_last_kernel
        launch(kernel, lambda m: (triton.cdiv(numel, m["BLOCK"]),), t4, out4, w, B, C, H, W, *t4.stride(), Ho, Wo,
               numel, *split_scale(scale), MAPS=maps, **meta, **({"BLOCK": 1024} if INTERPRET else {}))
        return out
    # Planar kernels: plane sides and row strides passed divided by the rows'
    # vector width (see _aligned).
    ra = _row_align(t4, H, W)
    sN, sC, sH, sW = t4.stride()
    args = (t4, out4, w, B, C, H // ra, W // ra, sN // ra, sC // ra, sH // ra, sW, Ho // ra, Wo // ra, *split_scale(scale))
    meta.update(ROW_ALIGN=ra, WIDE_INDEX=_wide_index(t4, (Ho, Wo)))
    tiles = lambda m: triton.cdiv(Ho, m["BLOCK"]) * triton.cdiv(Wo, m["BLOCK"])  # {Ho, Wo} = {H, W}
    if is_average:
        launch(_group_average_kernel, lambda m: _tiles_grid(B * C, tiles(m)), *args, MAPS=maps, **meta,
               **({"BLOCK": 32} if INTERPRET else {}))
        return out
    forced = _forced_transform_config
    if forced is not None:
        kernel = _group_transform_kernel
        meta.update(OUTPUT_TILES=forced[0], BLOCK=forced[1], **({} if INTERPRET else {"num_warps": forced[2]}))
    elif INTERPRET:
        kernel = _group_transform_kernel
        meta.update(_INTERPRETER_TRANSFORM_CONFIG.kwargs)
    else:
        kernel = _group_transform_autotuned
    launch(kernel, lambda m: _tiles_grid(B * C * (G if m["OUTPUT_TILES"] else 1), tiles(m)), *args,
           DEST_MAPS=_pack_maps(elements, inverse=True), SRC_MAPS=maps, **meta)
    return out


@torch.library.triton_op("equitune_ext::group_transform_triton", mutates_args=())
def group_transform_triton(x: torch.Tensor, elements: List[int], scale: float = 1.0,
                           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_image_op(x, elements, scale, weights, is_average=False)


@torch.library.triton_op("equitune_ext::group_average_triton", mutates_args=())
def group_average_triton(y: torch.Tensor, elements: List[int], scale: float,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_image_op(y, elements, scale, weights, is_average=True)


# ---------------------------------------------------------------------------
# Per-row ops: the element of each row read from a code table [k, B]
# ---------------------------------------------------------------------------
# The element varies per row at run time, so the access directions are not
# compile-time constants as above: one flat kernel over the output in memory
# order (planar or channels_last) evaluates the element's affine map per
# output element, its coefficients loaded from an [8, 6] table that
# _C.source_coords (csrc/index.h) fills, so the maps are still one formula.

@triton.jit
def _rows_coords(idx, C, Ho, Wo, CHANNELS_LAST: tl.constexpr):
    """(n, i, j, c) of flat indices into the output in its memory order."""
    if CHANNELS_LAST:
        n, i, j, c = _channels_last_coords(idx, C, Ho, Wo)
    else:
        j = idx % Wo
        t = idx // Wo
        i = t % Ho
        t = t // Ho
        c = t % C
        n = t // C
    return n, i, j, c


@triton.jit
def _row_source(codes_ptr, maps_ptr, g, B, b, i, j, code_mask, valid):
    """Offsets (a, col) of output (i, j) of row block g, batch row b: the map of
    code codes[g, b] (masked as index.h row_code does, so any value stays in bounds)."""
    code = tl.load(codes_ptr + g * B + b, mask=valid, other=0) & code_mask
    m = maps_ptr + code * 6
    a = tl.load(m) + tl.load(m + 1) * i + tl.load(m + 2) * j
    col = tl.load(m + 3) + tl.load(m + 4) * i + tl.load(m + 5) * j
    return a, col


@_autotune(_FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_transform_rows_kernel(
    x_ptr, out_ptr, codes_ptr, maps_ptr, w_ptr, B, C, sN, sC, sH, sW, Ho, Wo, numel, scale_hi, scale_lo, code_mask,
    CHANNELS_LAST: tl.constexpr, APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[g*B + b, c, i, j] = scale * w[g, b] * x[b, c, src_{codes[g, b]}(i, j)]
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    n, i, j, c = _rows_coords(idx, C, Ho, Wo, CHANNELS_LAST)
    g = n // B
    b = n % B
    g = tl.where(valid, g, 0)  # lanes past the end read block (0, b): in bounds, never stored
    a, col = _row_source(codes_ptr, maps_ptr, g, B, b, i, j, code_mask, valid)
    v = tl.load(x_ptr + b * sN + c * sC + a * sH + col * sW, mask=valid)
    v = _transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
    tl.store(out_ptr + idx, v, mask=valid)


@_autotune(_FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_average_rows_kernel(
    y_ptr, out_ptr, codes_ptr, maps_ptr, w_ptr, K, B, C, sN, sC, sH, sW, Ho, Wo, numel, scale_hi, scale_lo,
    code_mask, CHANNELS_LAST: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out[b, c, i, j] = scale * Σ_g w[g, b] * y[g*B + b, c, src_{codes[g, b]}(i, j)]
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    b, i, j, c = _rows_coords(idx, C, Ho, Wo, CHANNELS_LAST)
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for g in range(K):
        a, col = _row_source(codes_ptr, maps_ptr, g, B, b, i, j, code_mask, valid)
        v = tl.load(y_ptr + (g * B + b) * sN + c * sC + a * sH + col * sW, mask=valid, other=0.0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            v = v * tl.load(w_ptr + g * B + b, mask=valid, other=0.0).to(ACC_DTYPE)
        acc += v
    acc = acc * scale_factor(scale_hi, scale_lo, ACC_DTYPE)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=valid)


def _code_maps(H: int, W: int, device) -> torch.Tensor:
    """[8, 6] int64: the (a0, ai, aj, b0, bi, bj) map of each D4 code on an H x W plane."""
    return torch.tensor([_C.source_coords(code, int(H), int(W)) for code in range(8)], dtype=torch.int64,
                        device=device)


def _launch_image_rows_op(t: torch.Tensor, codes: torch.Tensor, scale: float, weights, is_average: bool) -> torch.Tensor:
    op = "group_average_rows" if is_average else "group_transform_rows"
    check_image_rows_op(t, codes, scale, weights, is_average, op)
    K = codes.shape[0]
    B = t.shape[0] // K if is_average else t.shape[0]
    out = new_image_output(t, [0], B if is_average else B * K)
    if out.numel() == 0:
        return out
    t4, out4, w = _as_kernel_dtype(as_planes(t)), _as_kernel_dtype(as_planes(out)), weights_arg(weights, t)
    _, C, H, W = t4.shape
    Ho, Wo = out4.shape[-2:]
    numel = out.numel()
    args = (t4, out4, codes.contiguous(), _code_maps(H, W, t.device), w)
    tail = (B, C, *t4.stride(), Ho, Wo, numel, *split_scale(scale), 7 if H == W else 6)
    meta = dict(CHANNELS_LAST=wants_channels_last(t), HAS_WEIGHTS=weights is not None, ACC_DTYPE=acc_dtype(t),
                **({"BLOCK": 1024} if INTERPRET else {}))
    grid = lambda m: (triton.cdiv(numel, m["BLOCK"]),)
    if is_average:
        launch(_group_average_rows_kernel, grid, *args, K, *tail, **meta)
    else:
        launch(_group_transform_rows_kernel, grid, *args, *tail, APPLY_SCALE=scale != 1.0, **meta)
    return out


@torch.library.triton_op("equitune_ext::group_transform_rows_triton", mutates_args=())
def group_transform_rows_triton(x: torch.Tensor, codes: torch.Tensor, scale: float = 1.0,
                                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_image_rows_op(x, codes, scale, weights, is_average=False)


@torch.library.triton_op("equitune_ext::group_average_rows_triton", mutates_args=())
def group_average_rows_triton(y: torch.Tensor, codes: torch.Tensor, scale: float,
                              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_image_rows_op(y, codes, scale, weights, is_average=True)
