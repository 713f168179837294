"""Planar Triton kernels of group_transform / group_average (contiguous output)
and their launcher.

Each kernel specializes on the group: it gets every element's map as one
compile-time integer (pack_maps) and so knows every access direction. It works
on square tiles and touches memory only along rows, in 16-byte vectors where
alignment allows: an element that transposes (odd rotation) is handled with
``tl.trans`` on a tile read or written in the orientation memory has, one that
reverses columns with ``tl.flip`` on a tile read or written as the mirror image
(ascending addresses; see _tile_offsets). The average gathers each output tile
from its |G| sources and sums the tiles of each kind before flipping and
transposing once; the transform has two strategies, input tiles (read once,
scatter |G| images) and output tiles (gather one image, as the average does),
and its autotuner times both (launch_planar's transform_config fixes one).
benchmarks/triton_compiled.py shows what the NVIDIA compiler makes of them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _C
from ..groups import INVERSE_CODES
from . import INTERPRETING
from .launch import autotune, launch, scale_factor, split_scale, transform_scaled

# Tile configs: 32x32 / 4 warps suits 56x56 planes (few masked lanes), 64x64 /
# 8 warps large ones. Tuned per plane size and |G|: keying on B and C too changed
# no choice on an H200 (benchmarks/README.md, Image ops on GPU). The transform
# also tries both ways of cutting its work (see _group_transform_kernel).
_TILE_CONFIGS = [
    triton.Config({"BLOCK": 32}, num_warps=4),
    triton.Config({"BLOCK": 64}, num_warps=8),
]
_TRANSFORM_CONFIGS = [
    triton.Config({**config.kwargs, "OUTPUT_TILES": output_tiles}, num_warps=config.num_warps)
    for config in _TILE_CONFIGS for output_tiles in (False, True)
]


@triton.jit
def _aligned(H, W, Ho, Wo, sN, sC, sH, ROW_ALIGN: tl.constexpr):
    """The planar kernels' plane sides and row strides, which the launcher passes
    divided by ROW_ALIGN (see _row_align): multiplying back tells Triton they are
    multiples of it, so row starts are vector-aligned, masks are constant over a
    vector, and loads and stores vectorize (tl.multiple_of does not reach scalar
    arguments)."""
    return (H * ROW_ALIGN, W * ROW_ALIGN, Ho * ROW_ALIGN, Wo * ROW_ALIGN,
            sN * ROW_ALIGN, sC * ROW_ALIGN, sH * ROW_ALIGN)


# Bit 0 of every 3-bit element of a packed map (see pack_maps), for compile-time
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
_INTERPRETED: tl.constexpr = tl.constexpr(INTERPRETING)


@triton.jit
def _mirror_columns(v, BLOCK: tl.constexpr):
    """v with its columns in reverse order, v[:, ::-1]. Compiled: tl.flip, warp
    shuffles here (a tile row lies within one warp; tl.gather goes through shared
    memory with barriers). The interpreter runs tl.flip's five xor-reductions
    element by element, far slower than tl.gather's one numpy take, so there the
    same values come from tl.gather; GPU tests cover tl.flip."""
    if _INTERPRETED:
        reverse = tl.broadcast_to((BLOCK - 1 - tl.arange(0, BLOCK))[None, :], (BLOCK, BLOCK))
        return tl.gather(v, reverse, 1)
    else:
        return tl.flip(v, 1)


@triton.jit
def _source_tile(base, i0, j0, Ho, Wo, sH, sW, MAPS: tl.constexpr, g: tl.constexpr,
                 WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    """Element g's source pixels for the BLOCK x BLOCK output tile at (i0, j0), read
    from its source plane at base along memory. MAPS holds the source maps (see
    pack_maps): the source (a, col) of output (i, j) is (i, j), or (j, i) for a
    transposing element, each coordinate possibly reversed.

    Where the map reverses the source column, the tile is the mirror image
    (tl.flip, dim 1) of the output's (see _tile_offsets), and for a transposing
    element its transpose, so every read is contiguous and all tiles share one
    register layout; the caller flips and transposes back once per sum of tiles.
    (Read in output order, a reversed column would be a descending run of
    addresses: scalar loads, in a column-major layout (Triton 3.6) that each
    addition converts through shared memory.)"""
    # Decoded here as compile-time values: a @triton.jit helper returns run-time
    # values, and run-time branches here keep this function from being inlined
    # into the transform's per-element branches (an scf.if region takes one
    # block), which makes every load scalar (benchmarks/README.md, Triton
    # kernels compiled for sm_90).
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
    MAPS holds the destination maps (see pack_maps; decoded here for the reason
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
                v = transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
                dst = out_ptr + ((g * B + b) * C + c) * Ho * Wo
                tl.store(dst + i[:, None] * Wo + j[None, :], v, mask=mask)
    else:
        b = pid // C
        c = pid % C
        a0, col0 = _tile_origin(tile, W, BLOCK)
        a, col, mask = _tile_coords(a0, col0, H, W, WIDE_INDEX, BLOCK)
        x = tl.load(x_ptr + b * sN + c * sC + a[:, None] * sH + col[None, :] * sW, mask=mask)
        for g in tl.static_range(G):
            v = transform_scaled(x, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
            dst = out_ptr + ((g * B + b) * C + c) * Ho * Wo
            _scatter_tile(dst, v, a0, col0, H, W, Wo, DEST_MAPS, g, WIDE_INDEX, BLOCK)


_group_transform_autotuned = autotune(_TRANSFORM_CONFIGS, key=["H", "W", "G"])(_group_transform_kernel)


@autotune(_TILE_CONFIGS, key=["Ho", "Wo", "G"])
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
    # memory, between barriers) would make each element's loads wait for the
    # previous element's data (benchmarks/README.md, Triton kernels compiled for
    # sm_90; test_backends.py keeps the one barrier after the last load).
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


def _map_bits(code: int) -> int:
    (first_axis, _), (first_reversed, second_reversed) = _C.signed_perm(code)
    return int(first_axis != 0) | first_reversed << 1 | second_reversed << 2


_MAP_BITS = tuple(_map_bits(code) for code in range(8))


def pack_maps(codes: List[int], inverse: bool) -> int:
    """Each element's signed permutation (csrc/index.h, through _C.signed_perm)
    packed into one compile-time integer, so the planar and channels_last kernels
    specialize on the group and know every access direction: element g is 3 bits
    at bit 3g, TRANSPOSES, FIRST_REVERSED (the input row is read reversed),
    SECOND_REVERSED (the input column is), which _source_tile, _scatter_tile and
    image_channels_last._source_pixel decode into the map (p, q) -> (p, q) or
    (q, p), each coordinate possibly reversed.

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


def launch_planar(t4: torch.Tensor, out4: torch.Tensor, w: torch.Tensor, B: int, elements: List[int], scale: float,
                  is_average: bool, meta: dict, transform_config: Optional[triton.Config] = None) -> None:
    """The planar kernel of the transform or the average on [N, C, H, W] views;
    meta: the arguments every image kernel takes (see image.py).
    transform_config (BLOCK, OUTPUT_TILES, num_warps) replaces the autotuner's
    choice: how the tests run both strategies and the benchmark times each."""
    _, C, H, W = t4.shape
    Ho, Wo = out4.shape[-2:]
    # Plane sides and row strides passed divided by the rows' vector width (see _aligned).
    ra = _row_align(t4, H, W)
    sN, sC, sH, sW = t4.stride()
    args = (t4, out4, w, B, C, H // ra, W // ra, sN // ra, sC // ra, sH // ra, sW, Ho // ra, Wo // ra, *split_scale(scale))
    maps = pack_maps(elements, inverse=False)
    meta = dict(meta, ROW_ALIGN=ra, WIDE_INDEX=_wide_index(t4, (Ho, Wo)))
    tiles = lambda m: triton.cdiv(Ho, m["BLOCK"]) * triton.cdiv(Wo, m["BLOCK"])  # {Ho, Wo} = {H, W}
    if is_average:
        launch(_group_average_kernel, lambda m: _tiles_grid(B * C, tiles(m)), *args, MAPS=maps, **meta,
               **({"BLOCK": 32} if INTERPRETING else {}))
        return
    # The interpreter cannot time configs: input tiles at block 32 there (the
    # tests pass the other strategy as transform_config).
    config = transform_config or (triton.Config({"BLOCK": 32, "OUTPUT_TILES": False}) if INTERPRETING else None)
    if config is not None:
        meta.update(config.kwargs, **({} if INTERPRETING else {"num_warps": config.num_warps}))
    launch(_group_transform_autotuned if config is None else _group_transform_kernel,
           lambda m: _tiles_grid(B * C * (len(elements) if m["OUTPUT_TILES"] else 1), tiles(m)), *args,
           DEST_MAPS=pack_maps(elements, inverse=True), SRC_MAPS=maps, **meta)
