"""Triton kernels of the volume ops (volume_transform, volume_average and their
_rows forms: [N, C, D, H, W], cube codes), with the C++ kernels' semantics
(see equitune_ext/contract.py).

One flat kernel per op over the output in memory order (contiguous or
channels_last_3d), as the per-row image kernels (image_rows.py) do: each
output element loads its block's code and evaluates that element's map, a
row of a [48, 4] table of (offset, d, h, w steps) on the input, in elements,
that _C.strided_map (csrc/index.h) fills, so every backend moves voxels by
one formula. Per-block codes are a [G] table read with batch stride 0, per-row
ones a [k, B] table; any code value is read as index.h volume_row_code does,
which keeps accesses in bounds. (Unlike the per-block image kernels, whose
maps are compile-time constants, the per-block volume ops copy their codes to
the device on each call, so they cannot be captured in a CUDA graph.)
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .. import _C
from ..contract import as_planes, check_image_op, check_image_rows_op, new_output, wants_channels_last
from ..groups import VOLUME_TABLES
from . import INTERPRETING
from .image_channels_last import FLAT_CONFIGS
from .launch import acc_dtype, as_kernel_dtype, autotune, launch, scale_factor, split_scale, transform_scaled, weights_arg


@triton.jit
def _coords(idx, C, D, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, d, h, w) of flat indices into the output in its memory order."""
    if CHANNELS_LAST:
        c = idx % C
        t = idx // C
        w = t % W
        t = t // W
        h = t % H
        t = t // H
        d = t % D
        n = t // D
    else:
        w = idx % W
        t = idx // W
        h = t % H
        t = t // H
        d = t % D
        t = t // D
        c = t % C
        n = t // C
    return n, c, d, h, w


@triton.jit
def _source(codes_ptr, code_sg, code_sb, maps_ptr, g, b, d, h, w, code_mask, valid):
    """Input offset of output (d, h, w) of block (g, b), from its volume's origin:
    the map of code codes[g * code_sg + b * code_sb] (code_sb 0: per-block codes),
    masked as volume_row_code masks it."""
    code = tl.load(codes_ptr + g * code_sg + b * code_sb, mask=valid, other=0)
    code = ((code % 48 + 48) % 48) & code_mask
    m = maps_ptr + code * 4
    return tl.load(m) + tl.load(m + 1) * d + tl.load(m + 2) * h + tl.load(m + 3) * w


@autotune(FLAT_CONFIGS, key=["numel"])
@triton.jit
def _volume_transform_kernel(
    x_ptr, out_ptr, codes_ptr, maps_ptr, w_ptr, code_sg, code_sb, B, C, D, H, W, sN, sC, numel, scale_hi, scale_lo,
    code_mask, CHANNELS_LAST: tl.constexpr, APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out[g*B + b, c, d, h, w] = scale * w[g, b] * x[b, c, src_g(d, h, w)]
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    n, c, d, h, w = _coords(idx, C, D, H, W, CHANNELS_LAST)
    g = tl.where(valid, n // B, 0)  # lanes past the end read block (0, b): in bounds, never stored
    b = n % B
    v = tl.load(x_ptr + b * sN + c * sC + _source(codes_ptr, code_sg, code_sb, maps_ptr, g, b, d, h, w, code_mask, valid),
                mask=valid)
    v = transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo, APPLY_SCALE, HAS_WEIGHTS, ACC_DTYPE)
    tl.store(out_ptr + idx, v, mask=valid)


@autotune(FLAT_CONFIGS, key=["numel"])
@triton.jit
def _volume_average_kernel(
    y_ptr, out_ptr, codes_ptr, maps_ptr, w_ptr, code_sg, code_sb, K, B, C, D, H, W, sN, sC, numel, scale_hi, scale_lo,
    code_mask, CHANNELS_LAST: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # out[b, c, d, h, w] = scale * Σ_g w[g, b] * y[g*B + b, c, src_g(d, h, w)]
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < numel
    b, c, d, h, w = _coords(idx, C, D, H, W, CHANNELS_LAST)
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for g in range(K):
        src = _source(codes_ptr, code_sg, code_sb, maps_ptr, g, b, d, h, w, code_mask, valid)
        v = tl.load(y_ptr + (g * B + b) * sN + c * sC + src, mask=valid, other=0.0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            v = v * tl.load(w_ptr + g * B + b, mask=valid, other=0.0).to(ACC_DTYPE)
        acc += v
    acc = acc * scale_factor(scale_hi, scale_lo, ACC_DTYPE)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=valid)


def _volume_maps(v: torch.Tensor) -> torch.Tensor:
    """[48, 4] int64: (offset, d step, h step, w step) of every cube code on the view v [N, C, D, H, W]."""
    extent, stride = list(v.shape[2:]), list(v.stride()[2:])
    return torch.tensor([_C.strided_map(code, extent, stride) for code in range(VOLUME_TABLES.num_codes)],
                        dtype=torch.int64, device=v.device)


def _launch_volume_op(t: torch.Tensor, codes: torch.Tensor, scale: float, weights, is_average: bool) -> torch.Tensor:
    """codes: [G] per-block codes, or a [k, B] per-row table (checked by the caller)."""
    K = codes.shape[0]
    B = t.shape[0] // K if is_average else t.shape[0]
    out = new_output(t, B if is_average else B * K, 3)
    if out.numel() == 0:
        return out
    v, w = as_kernel_dtype(as_planes(t, 3)), weights_arg(weights, t)
    _, C, D, H, W = v.shape
    numel = out.numel()
    cube = D == H == W
    code_strides = (B, 1) if codes.dim() == 2 else (1, 0)
    args = (v, as_kernel_dtype(as_planes(out, 3)), codes.contiguous(), _volume_maps(v), w, *code_strides)
    tail = (B, C, D, H, W, v.stride(0), v.stride(1), numel, *split_scale(scale), 63 if cube else 7)
    meta = dict(CHANNELS_LAST=wants_channels_last(t, 3), HAS_WEIGHTS=weights is not None, ACC_DTYPE=acc_dtype(t),
                **({"BLOCK": 1024} if INTERPRETING else {}))
    grid = lambda m: (triton.cdiv(numel, m["BLOCK"]),)
    if is_average:
        launch(_volume_average_kernel, grid, *args, K, *tail, **meta)
    else:
        launch(_volume_transform_kernel, grid, *args, *tail, APPLY_SCALE=scale != 1.0, **meta)
    return out


def _per_block(t: torch.Tensor, elements: List[int], scale: float, weights, is_average: bool) -> torch.Tensor:
    check_image_op(t, elements, scale, weights, is_average, "volume_average" if is_average else "volume_transform", 3)
    return _launch_volume_op(t, torch.tensor(elements, dtype=torch.int64, device=t.device), scale, weights, is_average)


def _per_row(t: torch.Tensor, codes: torch.Tensor, scale: float, weights, is_average: bool) -> torch.Tensor:
    op = "volume_average_rows" if is_average else "volume_transform_rows"
    check_image_rows_op(t, codes, scale, weights, is_average, op, 3)
    return _launch_volume_op(t, codes, scale, weights, is_average)


@torch.library.triton_op("equitune_ext::volume_transform_triton", mutates_args=())
def volume_transform_triton(x: torch.Tensor, elements: List[int], scale: float = 1.0,
                            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _per_block(x, elements, scale, weights, is_average=False)


@torch.library.triton_op("equitune_ext::volume_average_triton", mutates_args=())
def volume_average_triton(y: torch.Tensor, elements: List[int], scale: float,
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _per_block(y, elements, scale, weights, is_average=True)


@torch.library.triton_op("equitune_ext::volume_transform_rows_triton", mutates_args=())
def volume_transform_rows_triton(x: torch.Tensor, codes: torch.Tensor, scale: float = 1.0,
                                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _per_row(x, codes, scale, weights, is_average=False)


@torch.library.triton_op("equitune_ext::volume_average_rows_triton", mutates_args=())
def volume_average_rows_triton(y: torch.Tensor, codes: torch.Tensor, scale: float,
                               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _per_row(y, codes, scale, weights, is_average=True)
