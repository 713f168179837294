"""Triton kernels of group_transform / group_average and their launchers.

Same op semantics as the C++ kernels (see equitune_ext/ops.py):

    transform: out[g*B + b] = scale * Γ(elements[g]) x[b]
    average:   out[b]       = scale * Σ_g Γ(elements[g]) y[g*B + b]

The per-element index maps are not re-derived here: the launchers ask the C++
header (csrc/index.h, through equitune_ext._C.source_coords) for each
element's affine coordinate map and pass the coefficients in a small int64
tensor, so all backends move pixels by one formula.

Planar kernels (contiguous output) work on square tiles. An element that
transposes (odd rotation) is handled with ``tl.trans`` on a tile loaded or
stored in the orientation where memory is contiguous, so both the load and
the store stay coalesced. channels_last outputs use a flat kernel whose
innermost index is the channel, contiguous on both sides.
"""
from __future__ import annotations

import os
from typing import List

import torch
import triton
import triton.language as tl

from .. import _C
from ..ops import as_planes, check_op_args, check_weights_arg, new_output

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile configs: 32x32 / 4 warps suits 56x56 planes (few masked lanes);
# 64x64 / 8 warps suits large planes. Keyed on the plane size. Under the
# interpreter (CI on CPU) autotuning cannot time anything: one fixed config.
_TILE_CONFIGS = [
    triton.Config({"BLOCK": 32}, num_warps=4),
    triton.Config({"BLOCK": 64}, num_warps=8),
]
_FLAT_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8)]


def _autotune(configs, key):
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


@triton.jit
def _load_map(m):
    """One element's 6 affine coefficients (see _maps): r0, r_i, r_j, c0, c_i, c_j."""
    return tl.load(m), tl.load(m + 1), tl.load(m + 2), tl.load(m + 3), tl.load(m + 4), tl.load(m + 5)


@_autotune(_TILE_CONFIGS, key=["H", "W"])
@triton.jit
def _group_transform_kernel(
    x_ptr, out_ptr, dst_maps_ptr, w_ptr, G, B, C, H, W, sN, sC, sH, sW, Ho, Wo, scale,
    APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: input plane (b, c), one BLOCK x BLOCK input tile, all G
    # outputs. out[(g*B + b)*C + c, i, j] with (i, j) = dst_g(a, b).
    plane = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles_w = tl.cdiv(W, BLOCK)
    b = plane // C
    c = plane % C
    a = ((tile // tiles_w) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]  # input rows
    col = ((tile % tiles_w) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[None, :]  # input cols
    mask = (a < H) & (col < W)
    x = tl.load(x_ptr + b * sN + c * sC + a * sH + col * sW, mask=mask)
    at = tl.trans(a + 0 * col)  # [col, a] grids for the transposed tile
    ct = tl.trans(col + 0 * a)
    maskt = tl.trans(mask)
    for g in range(G):
        v = x
        if APPLY_SCALE or HAS_WEIGHTS:  # scale (1.0 unless APPLY_SCALE) times the λ-weight of block (g, b)
            factor = scale
            if HAS_WEIGHTS:
                factor = scale * tl.load(w_ptr + g * B + b).to(ACC_DTYPE)
            v = (x.to(ACC_DTYPE) * factor).to(x.dtype)
        vt = tl.trans(v)
        # Output coords of input (a, b): i = i0 + ia*a + ib*b, j = j0 + ja*a + jb*b.
        i0, ia, ib, j0, ja, jb = _load_map(dst_maps_ptr + g * 6)
        base = out_ptr + ((g * B + b) * C + c) * Ho * Wo
        if ia == 0:  # transposes: input cols run along output rows; store the transposed tile
            tl.store(base + (i0 + ib * ct) * Wo + (j0 + ja * at), vt, mask=maskt)
        else:
            tl.store(base + (i0 + ia * a) * Wo + (j0 + jb * col), v, mask=mask)


@_autotune(_TILE_CONFIGS, key=["Ho", "Wo"])
@triton.jit
def _group_average_kernel(
    y_ptr, out_ptr, src_maps_ptr, w_ptr, G, B, C, H, W, sN, sC, sH, sW, Ho, Wo, scale,
    HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: output plane (b, c), one BLOCK x BLOCK output tile.
    # out[b, c, i, j] = scale * Σ_g y[g*B + b, c, a_g(i, j), b_g(i, j)].
    plane = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles_w = tl.cdiv(Wo, BLOCK)
    b = plane // C
    c = plane % C
    i = ((tile // tiles_w) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]
    j = ((tile % tiles_w) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[None, :]
    mask = (i < Ho) & (j < Wo)
    it = tl.trans(i + 0 * j)  # [j, i] grids: the tile in source orientation
    jt = tl.trans(j + 0 * i)
    maskt = tl.trans(mask)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC_DTYPE)
    for g in range(G):
        a0, ai, aj, b0, bi, bj = _load_map(src_maps_ptr + g * 6)
        base = y_ptr + (g * B + b) * sN + c * sC
        w = 1.0
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + g * B + b).to(ACC_DTYPE)
        if ai == 0:  # transposes: load along source rows, then transpose into output orientation
            vt = tl.load(base + (a0 + aj * jt) * sH + (b0 + bi * it) * sW, mask=maskt, other=0.0)
            acc += w * tl.trans(vt).to(ACC_DTYPE)
        else:
            v = tl.load(base + (a0 + ai * i) * sH + (b0 + bj * j) * sW, mask=mask, other=0.0)
            acc += w * v.to(ACC_DTYPE)
    acc = acc * scale  # scale arrives as fp32: exact for 1/|G| with |G| a power of two
    tl.store(out_ptr + plane * Ho * Wo + i * Wo + j, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channels_last_coords(idx, C, Ho, Wo):
    """(n, i, j, c) of flat indices into an [N, Ho, Wo, C]-ordered tensor."""
    c = idx % C
    t = idx // C
    j = t % Wo
    t = t // Wo
    return t // Ho, t % Ho, j, c


@triton.jit
def _source_coords(m, i, j, valid):
    """Input (row, col) of output (i, j) from an element's 6 map coefficients at m."""
    a = tl.load(m, mask=valid) + tl.load(m + 1, mask=valid) * i + tl.load(m + 2, mask=valid) * j
    col = tl.load(m + 3, mask=valid) + tl.load(m + 4, mask=valid) * i + tl.load(m + 5, mask=valid) * j
    return a, col


@_autotune(_FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_transform_channels_last_kernel(
    x_ptr, out_ptr, src_maps_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale,
    APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out in [N, Ho, Wo, C] memory order: out[n, i, j, c] = x[b, c, src_g(i, j)], n = g*B + b.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    n, i, j, c = _channels_last_coords(idx, C, Ho, Wo)
    g = n // B
    b = n % B
    a, col = _source_coords(src_maps_ptr + g * 6, i, j, valid)
    v = tl.load(x_ptr + b * sN + c * sC + a * sH + col * sW, mask=valid)
    if APPLY_SCALE or HAS_WEIGHTS:
        factor = scale
        if HAS_WEIGHTS:
            factor = scale * tl.load(w_ptr + g * B + b, mask=valid, other=0.0).to(ACC_DTYPE)
        v = (v.to(ACC_DTYPE) * factor).to(v.dtype)
    tl.store(out_ptr + idx, v, mask=valid)


@_autotune(_FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_average_channels_last_kernel(
    y_ptr, out_ptr, src_maps_ptr, w_ptr, G, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale,
    HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out in [B, Ho, Wo, C] memory order: out[b, i, j, c] = scale * Σ_g y[g*B + b, c, src_g(i, j)].
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    b, i, j, c = _channels_last_coords(idx, C, Ho, Wo)
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for g in range(G):
        a, col = _source_coords(src_maps_ptr + g * 6 + 0 * idx, i, j, valid)  # (a block of one element's map)
        v = tl.load(y_ptr + (g * B + b) * sN + c * sC + a * sH + col * sW, mask=valid, other=0.0)
        if HAS_WEIGHTS:
            acc += tl.load(w_ptr + g * B + b, mask=valid, other=0.0).to(ACC_DTYPE) * v.to(ACC_DTYPE)
        else:
            acc += v.to(ACC_DTYPE)
    acc = acc * scale  # scale arrives as fp32: exact for 1/|G| with |G| a power of two
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def _acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _maps(codes: List[int], H: int, W: int, device) -> torch.Tensor:
    return torch.tensor([_C.source_coords(c, H, W) for c in codes], dtype=torch.int64, device=device)


def _as_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """Triton has no complex or 1-bit-addressed bool loads: move those as raw bits."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype == torch.complex64:
        return t.view(torch.int64)
    if t.dtype == torch.complex128:
        raise TypeError("group_transform: the triton backend does not support complex128; use backend='cpp'")
    return t


def _weights_arg(weights, t: torch.Tensor, G: int, B: int, op: str):
    """(pointer argument, HAS_WEIGHTS) for the kernels: weights as contiguous
    [G, B] in the accumulation dtype, as the C++ kernels take them."""
    if weights is None:
        return torch.empty(0, dtype=torch.float32, device=t.device), False  # never read
    check_weights_arg(weights, t, G, B, op)
    return weights.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous(), True


def group_transform_triton(x: torch.Tensor, elements: List[int], scale: float = 1.0, weights=None) -> torch.Tensor:
    check_op_args(x, elements, scale, is_average=False, op="group_transform", weighted=weights is not None)
    out = new_output(x, elements, x.shape[0] * len(elements))
    if out.numel() == 0:
        return out
    x4 = _as_kernel_dtype(as_planes(x))
    out4 = _as_kernel_dtype(as_planes(out))
    B, C, H, W = x4.shape
    w, has_w = _weights_arg(weights, x, len(elements), B, "group_transform")
    Ho, Wo = out4.shape[-2:]
    sN, sC, sH, sW = x4.stride()
    if out4.dim() == 4 and out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        numel = out4.numel()
        maps = _maps(elements, H, W, x.device)
        grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)
        kernel = torch.library.wrap_triton(_group_transform_channels_last_kernel)
        kwargs = {} if not INTERPRET else {"BLOCK": 1024}
        kernel[grid](x4, out4, maps, w, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale,
                     APPLY_SCALE=scale != 1.0, HAS_WEIGHTS=has_w, ACC_DTYPE=_acc_dtype(x), **kwargs)
        return out
    # Destination maps: the output coords of an input position are the source
    # coords of the inverse element on the Ho x Wo output.
    maps = _maps([_C.code_inverse(c) for c in elements], Ho, Wo, x.device)
    grid = lambda meta: (B * C, triton.cdiv(H, meta["BLOCK"]) * triton.cdiv(W, meta["BLOCK"]))
    kwargs = {} if not INTERPRET else {"BLOCK": 32}
    torch.library.wrap_triton(_group_transform_kernel)[grid](
        x4, out4, maps, w, len(elements), B, C, H, W, sN, sC, sH, sW, Ho, Wo, scale,
        APPLY_SCALE=scale != 1.0, HAS_WEIGHTS=has_w, ACC_DTYPE=_acc_dtype(x), **kwargs)
    return out


def group_average_triton(y: torch.Tensor, elements: List[int], scale: float, weights=None) -> torch.Tensor:
    check_op_args(y, elements, scale, is_average=True, op="group_average", weighted=weights is not None)
    G = len(elements)
    out = new_output(y, elements, y.shape[0] // G)
    if out.numel() == 0:
        return out
    y4, out4 = as_planes(y), as_planes(out)
    _, C, H, W = y4.shape
    B = out4.shape[0]
    Ho, Wo = out4.shape[-2:]
    sN, sC, sH, sW = y4.stride()
    maps = _maps(elements, H, W, y.device)
    w, has_w = _weights_arg(weights, y, G, B, "group_average")
    if out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        numel = out4.numel()
        grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)
        kwargs = {} if not INTERPRET else {"BLOCK": 1024}
        torch.library.wrap_triton(_group_average_channels_last_kernel)[grid](
            y4, out4, maps, w, G, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale,
            HAS_WEIGHTS=has_w, ACC_DTYPE=_acc_dtype(y), **kwargs)
        return out
    grid = lambda meta: (B * C, triton.cdiv(Ho, meta["BLOCK"]) * triton.cdiv(Wo, meta["BLOCK"]))
    kwargs = {} if not INTERPRET else {"BLOCK": 32}
    torch.library.wrap_triton(_group_average_kernel)[grid](
        y4, out4, maps, w, G, B, C, H, W, sN, sC, sH, sW, Ho, Wo, scale,
        HAS_WEIGHTS=has_w, ACC_DTYPE=_acc_dtype(y), **kwargs)
    return out
