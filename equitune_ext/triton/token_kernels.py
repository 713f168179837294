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

from ..ops import capturing_cuda_graph, check_weights_arg
from . import _launch_directly
from .kernels import (LaunchPlan, _acc_dtype, _scale_factor, cached_plan, launch_plan, scale_key, split_scale,
                      weights_key)

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
    acc = acc * _scale_factor(scale_hi, scale_lo, ACC_DTYPE)
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
    val = val * _scale_factor(scale_hi, scale_lo, ACC_DTYPE)
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


def _check_perms(perms: torch.Tensor, t: torch.Tensor, op: str):
    if perms.dim() != 2 or perms.dtype != torch.int64 or perms.device != t.device:
        raise RuntimeError(f"{op}: `perms` must be an int64 [|G|, V] tensor on {t.device}")


def _check_vocab(t: torch.Tensor, perms: torch.Tensor, op: str, is_average: bool):
    _check_perms(perms, t, op)
    if not t.is_floating_point() or t.dim() < 2:
        raise RuntimeError(f"{op}: expected floating-point logits of shape [N, *, V], got {t.dtype} {tuple(t.shape)}")
    if t.shape[-1] != perms.shape[1]:
        raise RuntimeError(f"{op}: the logits' last dim ({t.shape[-1]}) must equal the group's vocabulary size ({perms.shape[1]})")
    if is_average and t.shape[0] % perms.shape[0]:
        raise RuntimeError(f"{op}: the leading dim ({t.shape[0]}) must be a multiple of the group order ({perms.shape[0]})")


def _vocab_plan(t: torch.Tensor, perms: torch.Tensor, scale: float, weights, is_average: bool) -> LaunchPlan:
    op = "vocab_average" if is_average else "vocab_transform"
    _check_vocab(t, perms, op, is_average)
    G, V = perms.shape
    B = t.shape[0] // G if is_average else t.shape[0]
    if weights is not None:
        check_weights_arg(weights, t, G, B, op)
    out_shape = (B if is_average else G * B, *t.shape[1:])
    if math.prod(out_shape) == 0:
        return LaunchPlan(out_shape)
    M = math.prod(t.shape[1:]) // V
    kernel, group_order = (_vocab_average_kernel, dict(G=G)) if is_average else (_vocab_transform_kernel, {})
    return LaunchPlan(out_shape, torch.contiguous_format, kernel, (out_shape[0] * M, triton.cdiv(V, BLOCK_V)),
                      (B, M, V, *split_scale(scale)),
                      dict(group_order, HAS_WEIGHTS=weights is not None, ACC_DTYPE=_acc_dtype(t), BLOCK=BLOCK_V), t.device)


def _run_vocab(t, perms, scale, weights, eager, is_average: bool):
    """Plans (eager calls: once per metadata), allocates the output and launches."""
    if eager is None:
        eager = _launch_directly(t, perms, weights)
    if eager:
        key = (_vocab_plan, t.shape, t.dtype, t.device, perms.shape, perms.dtype, perms.device,
               scale_key(scale), weights_key(weights), is_average)
        plan = cached_plan(key, _vocab_plan, t, perms, scale, weights, is_average)
    else:
        plan = _vocab_plan(t, perms, scale, weights, is_average)
    out = torch.empty(plan.out_shape, dtype=t.dtype, device=t.device)
    if plan.kernel is None:
        return out
    launch_plan(plan, eager, t.contiguous(), out, perms.contiguous(), plan.weights_arg(weights, t))
    return out


def vocab_average_triton(y, perms, scale, weights=None, eager: Optional[bool] = None):
    return _run_vocab(y, perms, scale, weights, eager, is_average=True)


def vocab_transform_triton(x, perms, scale, weights=None, eager: Optional[bool] = None):
    return _run_vocab(x, perms, scale, weights, eager, is_average=False)


def token_transform_triton(ids, perms):
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() < 1:
        raise RuntimeError(f"token_transform: ids must be an int64 or int32 tensor [B, *], got {ids.dtype} {tuple(ids.shape)}")
    _check_perms(perms, ids, "token_transform")
    G, V = perms.shape
    out = torch.empty((G * ids.shape[0], *ids.shape[1:]), dtype=ids.dtype, device=ids.device)
    N = ids.numel()
    if N == 0:
        return out
    if not is_fake(ids) and not capturing_cuda_graph(ids):  # data-dependent: eager only
        # The kernel itself never reads out of bounds and passes a bad id through
        # unchanged, for the embedding after it to reject.
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise RuntimeError(f"token_transform: token id {lo if lo < 0 else hi} is out of range [0, {V})")
    eager = _launch_directly(ids, perms)
    make = lambda: LaunchPlan(out.shape, torch.contiguous_format, _token_transform_kernel, (triton.cdiv(N, 1024),),
                              (V, N), dict(G=G, BLOCK=1024))
    key = (token_transform_triton, ids.shape, ids.dtype, ids.device, perms.shape, perms.device)
    plan = cached_plan(key, make) if eager else make()
    launch_plan(plan, eager, ids.contiguous(), out, perms.contiguous())
    return out
