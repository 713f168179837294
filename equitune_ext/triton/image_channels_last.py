"""channels_last Triton kernels of group_transform / group_average and their
launcher: one flat kernel over the output in [N, Ho, Wo, C] memory order, whose
innermost index is the channel, contiguous on both sides. The group's maps are
compile-time constants, packed as for the planar kernels (image_planar.pack_maps).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import INTERPRETING
from .image_planar import pack_maps
from .launch import autotune, launch, scale_factor, split_scale

# Flat kernels (these and the per-row ones): 4 elements per thread; at 8 the
# unrolled d4 average needs far more registers on sm_90 (benchmarks/README.md,
# Triton kernels compiled for sm_90).
FLAT_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=8), triton.Config({"BLOCK": 512}, num_warps=4)]


@triton.jit
def channels_last_coords(idx, C, Ho, Wo):
    """(n, i, j, c) of flat indices into an [N, Ho, Wo, C]-ordered tensor."""
    c = idx % C
    t = idx // C
    j = t % Wo
    t = t // Wo
    return t // Ho, t % Ho, j, c


@triton.jit
def _source_pixel(i, j, Ho, Wo, MAPS: tl.constexpr, g: tl.constexpr):
    """Source (row, col) of output pixels (i, j) under element g's source map
    (MAPS; decoded here for the reason in image_planar._source_tile)."""
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


@autotune(FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_transform_channels_last_kernel(
    x_ptr, out_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale_hi, scale_lo,
    G: tl.constexpr, MAPS: tl.constexpr, APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out in [N, Ho, Wo, C] memory order: out[n, i, j, c] = x[b, c, src_g(i, j)], n = g*B + b.
    # The element varies along the block (at image boundaries), so each pixel's
    # source is selected among the G compile-time maps: integer selects instead
    # of loading a map's 6 coefficients per pixel, as the per-row kernels must.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    n, i, j, c = channels_last_coords(idx, C, Ho, Wo)
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


@autotune(FLAT_CONFIGS, key=["numel"])
@triton.jit
def _group_average_channels_last_kernel(
    y_ptr, out_ptr, w_ptr, B, C, H, W, sN, sC, sH, sW, Ho, Wo, numel, scale_hi, scale_lo,
    G: tl.constexpr, MAPS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out in [B, Ho, Wo, C] memory order: out[b, i, j, c] = scale * Σ_g y[g*B + b, c, src_g(i, j)].
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    b, i, j, c = channels_last_coords(idx, C, Ho, Wo)
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


def launch_channels_last(t4: torch.Tensor, out4: torch.Tensor, w: torch.Tensor, B: int, elements: List[int],
                         scale: float, is_average: bool, meta: dict) -> None:
    """Launches the channels_last kernel of the transform or the average on
    [N, C, H, W] views; meta: the arguments every image kernel takes (see image.py)."""
    _, C, H, W = t4.shape
    numel = out4.numel()
    kernel = _group_average_channels_last_kernel if is_average else _group_transform_channels_last_kernel
    launch(kernel, lambda m: (triton.cdiv(numel, m["BLOCK"]),), t4, out4, w, B, C, H, W, *t4.stride(),
           *out4.shape[-2:], numel, *split_scale(scale), MAPS=pack_maps(elements, inverse=False), **meta,
           **({"BLOCK": 1024} if INTERPRETING else {}))
