"""Triton kernels of the token-group ops (semantics in csrc/token_ops.h):

    token_transform(ids, perms):          out[k*N + i] = perms[k][ids[i]]
    vocab_transform(x, perms, scale, w):  out[k*B + b, m, v] = scale * w[k, b] * x[b, m, perms[k][v]]
    vocab_average(y, perms, scale, w):    out[b, m, v] = scale * Σ_k w[k, b] * y[k*B + b, m, perms[k][v]]

One program per (row, block of the vocabulary): stores are contiguous along
v, the gathered loads follow the tables (identity almost everywhere).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..contract import capturing_cuda_graph, check_perms, check_token_ids, check_vocab_op
from .launch import acc_dtype, launch, scale_factor, split_scale, weights_arg

BLOCK_V = 1024


# |G| is a compile-time constant, as in the image kernels: the loop over the
# group unrolls (tl.static_range; one compile per group order), and the
# interpreter of Triton < 3.8 cannot take range() of a runtime scalar under
# NumPy >= 2.5.
@triton.jit
def _vocab_average_kernel(y_ptr, out_ptr, perms_ptr, w_ptr, B, M, V, scale_hi, scale_lo,
                          G: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b*M + m
    v = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = v < V
    b = row // M
    m = row % M
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for k in tl.static_range(G):
        src = tl.load(perms_ptr + k * V + v, mask=valid, other=0)
        val = tl.load(y_ptr + ((k * B + b) * M + m) * V + src, mask=valid, other=0.0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            val = val * tl.load(w_ptr + k * B + b).to(ACC_DTYPE)
        acc += val
    acc = acc * scale_factor(scale_hi, scale_lo, ACC_DTYPE)
    tl.store(out_ptr + row * V + v, acc.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _vocab_transform_kernel(x_ptr, out_ptr, perms_ptr, w_ptr, B, M, V, scale_hi, scale_lo,
                            HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    orow = tl.program_id(0).to(tl.int64)  # (k*B + b)*M + m
    v = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = v < V
    m = orow % M
    n = orow // M
    k = n // B
    b = n % B
    src = tl.load(perms_ptr + k * V + v, mask=valid, other=0)
    val = tl.load(x_ptr + (b * M + m) * V + src, mask=valid, other=0.0).to(ACC_DTYPE)
    val = val * scale_factor(scale_hi, scale_lo, ACC_DTYPE)
    if HAS_WEIGHTS:
        val = val * tl.load(w_ptr + k * B + b).to(ACC_DTYPE)
    tl.store(out_ptr + orow * V + v, val.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _token_transform_kernel(ids_ptr, out_ptr, perms_ptr, V, N, G: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < N
    t = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int64)
    in_range = (t >= 0) & (t < V)  # else t passes through unchanged (see token_transform_triton)
    for k in tl.static_range(G):
        moved = tl.load(perms_ptr + k * V + t, mask=valid & in_range, other=0)
        tl.store(out_ptr + k * N + i, tl.where(in_range, moved, t).to(out_ptr.dtype.element_ty), mask=valid)


def _launch_vocab_op(t: torch.Tensor, perms: torch.Tensor, scale: float, weights, is_average: bool) -> torch.Tensor:
    check_vocab_op(t, perms, weights, is_average, "vocab_average" if is_average else "vocab_transform")
    G, V = perms.shape
    B = t.shape[0] // G if is_average else t.shape[0]
    out = t.new_empty((B if is_average else G * B, *t.shape[1:]))
    if out.numel() == 0:
        return out
    M = math.prod(t.shape[1:]) // V
    kernel, group_order = (_vocab_average_kernel, dict(G=G)) if is_average else (_vocab_transform_kernel, {})
    launch(kernel, (out.shape[0] * M, triton.cdiv(V, BLOCK_V)), t.contiguous(), out, perms.contiguous(),
           weights_arg(weights, t), B, M, V, *split_scale(scale),
           **group_order, HAS_WEIGHTS=weights is not None, ACC_DTYPE=acc_dtype(t), BLOCK=BLOCK_V)
    return out


@torch.library.triton_op("equitune_ext::vocab_transform_triton", mutates_args=())
def vocab_transform_triton(x: torch.Tensor, perms: torch.Tensor, scale: float,
                           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_vocab_op(x, perms, scale, weights, is_average=False)


@torch.library.triton_op("equitune_ext::vocab_average_triton", mutates_args=())
def vocab_average_triton(y: torch.Tensor, perms: torch.Tensor, scale: float,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch_vocab_op(y, perms, scale, weights, is_average=True)


@torch.library.triton_op("equitune_ext::token_transform_triton", mutates_args=())
def token_transform_triton(ids: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    check_token_ids(ids, "token_transform")
    check_perms(perms, ids, "token_transform")
    G, V = perms.shape
    out = ids.new_empty((G * ids.shape[0], *ids.shape[1:]))
    N = ids.numel()
    if N == 0:
        return out
    if not is_fake(ids) and not capturing_cuda_graph(ids):  # data-dependent: eager only
        # The kernel itself never reads out of bounds and passes a bad id through
        # unchanged, for the embedding after it to reject.
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token_transform: token id {lo if lo < 0 else hi} is out of range [0, {V})")
    launch(_token_transform_kernel, (triton.cdiv(N, 1024),), ids.contiguous(), out, perms.contiguous(), V, N,
           G=G, BLOCK=1024)
    return out
