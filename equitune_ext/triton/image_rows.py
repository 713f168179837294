"""Triton kernels of the per-row image ops, group_transform_rows /
group_average_rows: the element of each row block read from a code table [k, B].

The element varies per row at run time, so the access directions are not
compile-time constants as in the planar and channels_last kernels: one flat
kernel over the output in memory order (planar or channels_last) evaluates the
element's affine map per output element, its coefficients loaded from an
[8, 6] table that _C.source_coords (csrc/index.h) fills, so every backend moves
pixels by one formula.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _C
from ..contract import as_planes, check_image_rows_op, new_output, wants_channels_last
from . import INTERPRETING
from .image_channels_last import FLAT_CONFIGS, channels_last_coords
from .launch import acc_dtype, as_kernel_dtype, autotune, launch, scale_factor, split_scale, transform_scaled, weights_arg

@triton.jit
def _rows_coords(idx, C, Ho, Wo, CHANNELS_LAST: tl.constexpr):
    """(n, i, j, c) of flat indices into the output in its memory order."""
    if CHANNELS_LAST:
        n, i, j, c = channels_last_coords(idx, C, Ho, Wo)
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


@autotune(FLAT_CONFIGS, key=["numel"])
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
    v = transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
    tl.store(out_ptr + idx, v, mask=valid)


@autotune(FLAT_CONFIGS, key=["numel"])
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
    out = new_output(t, B if is_average else B * K)
    if out.numel() == 0:
        return out
    t4, out4, w = as_kernel_dtype(as_planes(t)), as_kernel_dtype(as_planes(out)), weights_arg(weights, t)
    _, C, H, W = t4.shape
    Ho, Wo = out4.shape[-2:]
    numel = out.numel()
    args = (t4, out4, codes.contiguous(), _code_maps(H, W, t.device), w)
    tail = (B, C, *t4.stride(), Ho, Wo, numel, *split_scale(scale), 7 if H == W else 6)
    meta = dict(CHANNELS_LAST=wants_channels_last(t), HAS_WEIGHTS=weights is not None, ACC_DTYPE=acc_dtype(t),
                **({"BLOCK": 1024} if INTERPRETING else {}))
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
