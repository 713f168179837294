"""The contract of the custom ops, shared by every backend: what they compute,
the argument rules and their messages, output shapes, fake kernels, the adjoint
autograd and the vmap rule. Schemas: csrc/equitune_ext.cpp; kernels: csrc/
(C++ CPU and CUDA) and equitune_ext/triton/ (the same ops as ``*_triton``).

    group_transform(x, elements, scale=1.0, w=None):  out[g*B + b] = scale * w[g, b] * Γ(elements[g]) x[b]
    group_average(y, elements, scale, w=None):        out[b] = scale * Σ_g w[g, b] * Γ(elements[g]) y[g*B + b]
    vocab_transform(x, perms, scale, w=None):         out[k*B + b, …, v] = scale * w[k, b] * x[b, …, perms[k][v]]
    vocab_average(y, perms, scale, w=None):           out[b, …, v] = scale * Σ_k w[k, b] * y[k*B + b, …, perms[k][v]]
    token_transform(ids, perms):                      out[k*N + i] = perms[k][ids[i]]
    group_transform_rows(x, codes, scale=1.0, w=None): out[j*B + b] = scale * w[j, b] * Γ(codes[j, b]) x[b]
    group_average_rows(y, codes, scale, w=None):       out[b] = scale * Σ_j w[j, b] * Γ(codes[j, b]) y[j*B + b]
    volume_transform, volume_average, volume_*_rows:   the four above with cube codes on [N, *, D, H, W]

``elements`` are D4 codes (cube codes for the volume ops; groups.py),
``perms`` permutation tables [|G|, V], ``codes`` an int64 [k, B] table of
codes (one element per row: sampled equi-tuning).
Each (transform, average) pair is adjoint: the backward of one is the other
with the inverse group argument, which gives gradients of every order.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _C  # noqa: F401  (loads the library: defines torch.ops.equitune_ext.*)
from .groups import IDENTITY, IMAGE_TABLES, TRANSPOSES, VOLUME_TABLES, CodeTables
from .token_groups import inverse_tables

# ---------------------------------------------------------------------------
# Argument rules: one function per rule, one message each. The public API
# (ops.py) and the Triton ops check through these; the C++ ops check the same
# rules in csrc/op_checks.h, csrc/group_ops.h and csrc/token_ops.h.
# ---------------------------------------------------------------------------


def check_tensor(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")


def check_planes(t: torch.Tensor, needs_square: bool, op: str, what: str, why_square: str = "90-degree rotations") -> None:
    """[N, *, H, W] with H == W when some element rotates by 90 degrees."""
    if t.dim() < 3:
        raise ValueError(f"{op}: {what} must have shape [N, *, H, W] (at least 3 dims), got shape {tuple(t.shape)}")
    if needs_square and t.shape[-1] != t.shape[-2]:
        raise ValueError(f"{op}: {what} must be square (H == W) for {why_square}, got H={t.shape[-2]}, W={t.shape[-1]}")


def check_volumes(t: torch.Tensor, needs_cube: bool, op: str, what: str) -> None:
    """[N, C, D, H, W], D == H == W when some element permutes the axes (4 dims
    are rejected: most likely an image batch, whose channels would move)."""
    if t.dim() < 5:
        raise ValueError(f"{op}: {what} must have shape [N, C, D, H, W] (at least 5 dims) for a volume group, "
                         f"got shape {tuple(t.shape)}")
    D, H, W = t.shape[-3:]
    if needs_cube and not D == H == W:
        raise ValueError(f"{op}: {what} must be a cube (D == H == W) for a group that permutes the axes, "
                         f"got D={D}, H={H}, W={W}")


def check_floating(t: torch.Tensor, op: str, what: str, complex_ok: bool = False) -> None:
    if not (t.is_floating_point() or (complex_ok and t.is_complex())):
        raise TypeError(f"{op}: {what} must be a floating-point tensor, got {t.dtype}")


def check_group_multiple(t: torch.Tensor, order: int, op: str, what: str) -> None:
    if t.dim() < 1 or t.shape[0] % order:
        lead = t.shape[0] if t.dim() else "none (0-dim)"
        raise ValueError(f"{op}: the leading dim of {what} ({lead}) must be a multiple of |G| = {order}")


def check_weights(weights, t: torch.Tensor, order: int, batch: int, op: str, rows: str = "|G|") -> None:
    """λ-weights: a floating [rows, B] tensor on the input's device (rows: |G|,
    or k with per-row elements)."""
    check_tensor(weights, f"{op}: weights")
    if tuple(weights.shape) != (order, batch):
        raise ValueError(f"{op}: weights must have shape [{rows}, B] = [{order}, {batch}], got {tuple(weights.shape)}")
    check_floating(weights, op, "weights")
    if weights.device != t.device:
        raise ValueError(f"{op}: weights are on {weights.device} but the input is on {t.device}")


def check_vocab_logits(y: torch.Tensor, vocab_size: int, op: str) -> None:
    check_floating(y, op, "logits")
    if y.dim() < 2:
        raise ValueError(f"{op}: logits must have shape [|G|·B, *, V], got shape {tuple(y.shape)}")
    if y.shape[-1] != vocab_size:
        raise ValueError(f"{op}: the logits' last dim ({y.shape[-1]}) must equal the group's vocabulary size ({vocab_size})")


def check_perms(perms, t: torch.Tensor, op: str) -> None:
    if not isinstance(perms, torch.Tensor) or perms.dim() != 2 or perms.dtype != torch.int64 or perms.device != t.device:
        raise ValueError(f"{op}: perms must be an int64 [|G|, V] tensor on {t.device}")


def check_token_ids(ids: torch.Tensor, op: str) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: token ids must be an int64 or int32 tensor, got {ids.dtype}")
    if ids.dim() < 1:
        raise ValueError(f"{op}: token ids must have shape [B, *], got a 0-dim tensor")


def _check_scaled_op(t: torch.Tensor, order: int, scale: float, weights, is_average: bool, op: str) -> int:
    """The rules on scale, dtype, row blocks and weights that every raw image op shares; returns B."""
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    if is_average or scale != 1.0 or weights is not None:
        check_floating(t, op, "the input")
    if is_average:
        check_group_multiple(t, order, op, "the input")
    batch = t.shape[0] // order if is_average else t.shape[0]
    if weights is not None:
        check_weights(weights, t, order, batch, op)
    return batch


def check_image_op(t: torch.Tensor, elements: List[int], scale: float, weights, is_average: bool, op: str,
                   spatial_dims: int = 2) -> None:
    """Every rule of a raw image op, or with spatial_dims=3 a volume op (the
    Triton ops; plan_group_op in csrc/group_ops.h for C++)."""
    tables = VOLUME_TABLES if spatial_dims == 3 else IMAGE_TABLES
    if len(elements) == 0 or any(not 0 <= e < tables.num_codes for e in elements):
        raise ValueError(f"{op}: elements must be at least one {'cube' if spatial_dims == 3 else 'D4'} code in "
                         f"[0, {tables.num_codes}), got {list(elements)}")
    if spatial_dims == 3:
        check_volumes(t, any(tables.permutes[e] for e in elements), op, "the input")
    elif t.dim() >= 3 or not (all(e == IDENTITY for e in elements) and t.dim() >= 1):  # identity codes take any rows
        check_planes(t, any(TRANSPOSES[e] for e in elements), op, "the input")
    _check_scaled_op(t, len(elements), scale, weights, is_average, op)


def check_element_index_dtype(idx, op: str) -> None:
    check_tensor(idx, f"{op}: elements")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{op}: elements must be an integer tensor of group element indices, got {idx.dtype}")


def check_element_index_shape(idx: torch.Tensor, batch: int, op: str, t: torch.Tensor) -> None:
    """[k, B], on the input's device or the CPU (element_codes moves them)."""
    if idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] != batch:
        raise ValueError(f"{op}: elements must have shape [k, B] = [k, {batch}] with k >= 1, got {tuple(idx.shape)}")
    if idx.device != t.device and idx.device.type != "cpu":
        raise ValueError(f"{op}: elements are on {idx.device} but the input is on {t.device} (pass them on the "
                         "input's device or the CPU)")


def check_element_index_range(idx: torch.Tensor, order: int, op: str) -> None:
    """Values in [0, |G|); reads them (a sync on CUDA), so it is skipped where
    nothing may sync or read values (CUDA graph capture, torch.func, compiled
    regions): there element_codes maps a bad index to code num_codes (8, or 48),
    which the C++ CPU kernels reject (the CUDA ones read a valid code: index.h row_code)."""
    if idx.numel() == 0 or capturing_cuda_graph(idx) or torch.compiler.is_compiling() or \
            torch._C._functorch.is_functorch_wrapped_tensor(idx):
        return
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= order:
        raise ValueError(f"{op}: elements must be group element indices in [0, |G|) = [0, {order}), "
                         f"got values in [{low}, {high}]")


def element_codes(idx: torch.Tensor, codes, device, num_codes: int = IMAGE_TABLES.num_codes) -> torch.Tensor:
    """The int64 [k, B] table of codes ``codes[idx]`` (an index outside
    [0, len(codes)) gives num_codes, out of range for the kernels)."""
    table = torch.tensor(list(codes) + [num_codes], dtype=torch.int64, device=device)
    idx = idx.to(device=device, dtype=torch.int64)
    ok = (idx >= 0) & (idx < len(codes))
    return table[torch.where(ok, idx, len(codes))]


def check_image_rows_op(t: torch.Tensor, codes: torch.Tensor, scale: float, weights, is_average: bool, op: str,
                        spatial_dims: int = 2) -> None:
    """The rules of a raw per-row image op that need no code values (the Triton
    ops; plan_group_rows_op in csrc/group_ops.h for C++, which on the CPU also
    checks the values). The code values are not read here (a sync on CUDA; no
    values under fake tensors): the public API checks the element indices, and
    the kernels read each code as index.h row_code (volumes: volume_row_code)
    does, which keeps any value in bounds."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64 or codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"{op}: codes must be an int64 [k, B] tensor with k >= 1")
    if codes.device != t.device:
        raise ValueError(f"{op}: codes are on {codes.device} but the input is on {t.device}")
    if spatial_dims == 3:
        check_volumes(t, False, op, "the input")
    else:
        check_planes(t, False, op, "the input")
    batch = _check_scaled_op(t, codes.shape[0], scale, weights, is_average, op)
    if codes.shape[1] != batch:
        raise ValueError(f"{op}: codes must have shape [k, B] = [{codes.shape[0]}, {batch}], got {tuple(codes.shape)}")


def check_vocab_op(t: torch.Tensor, perms: torch.Tensor, weights, is_average: bool, op: str) -> None:
    """Every rule of a raw vocabulary op (the Triton ops; csrc/token_ops.h for C++)."""
    check_perms(perms, t, op)
    check_vocab_logits(t, perms.shape[1], op)
    order = perms.shape[0]
    if is_average:
        check_group_multiple(t, order, op, "the logits")
    if weights is not None:
        check_weights(weights, t, order, t.shape[0] // order if is_average else t.shape[0], op)


# ---------------------------------------------------------------------------
# Output shapes and layouts (csrc/group_ops.h computes the same)
# ---------------------------------------------------------------------------

def channels_last_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def wants_channels_last(t: torch.Tensor, spatial_dims: int = 2) -> bool:
    """channels_last in gives channels_last out (volumes: channels_last_3d)."""
    return (t.dim() == spatial_dims + 2 and not t.is_contiguous()
            and t.is_contiguous(memory_format=channels_last_format(spatial_dims)))


def new_output(t: torch.Tensor, n_out: int, spatial_dims: int = 2) -> torch.Tensor:
    """[n_out, *t.shape[1:]]: every element keeps the input's shape (one that
    permutes axes needs equal extents)."""
    mf = channels_last_format(spatial_dims) if wants_channels_last(t, spatial_dims) else torch.contiguous_format
    return torch.empty((n_out, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=mf)


def as_planes(t: torch.Tensor, spatial_dims: int = 2) -> torch.Tensor:
    """[N, *mid, H, W] -> [N, prod(mid), H, W] (a view when strides allow);
    fewer than 3 dims (all-identity codes) -> [N, 1, 1, rest]. Volumes
    (spatial_dims=3, at least 5 dims): [N, *mid, D, H, W] -> [N, prod(mid), D, H, W]."""
    if spatial_dims == 3:
        return t if t.dim() == 5 else t.flatten(1, -4)
    if t.dim() >= 4:
        return t if t.dim() == 4 else t.flatten(1, -3)
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], 1, 1, t.shape[1] if t.dim() == 2 else 1)


def capturing_cuda_graph(t: torch.Tensor) -> bool:
    """Whether t is a CUDA tensor and the current stream is being captured into
    a CUDA graph: then nothing may sync (token_transform skips its range check;
    the kernels pass a bad id through unchanged, and the embedding after them
    rejects it)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------
# Adjoint autograd, jvp and vmap of a (transform, average) pair
# ---------------------------------------------------------------------------

def inverse_codes(elements, tables: CodeTables = IMAGE_TABLES) -> List[int]:
    return [tables.inverse[c] for c in elements]


def inverse_code_table(codes: torch.Tensor, tables: CodeTables = IMAGE_TABLES) -> torch.Tensor:
    """Element-wise inverse of a code table (the out-of-range code num_codes of
    element_codes stays num_codes)."""
    return torch.tensor(tables.inverse + (tables.num_codes,), dtype=torch.int64, device=codes.device)[codes]


def _func_transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, vmap) or
    forward-mode AD is active outside torch.compile."""
    return not torch.compiler.is_compiling() and (
        torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0)


def _weight_grad(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, order: int) -> torch.Tensor:
    # grad_w[g, b] = Σ over block (g, b)'s elements of a * b, in float32 at least.
    acc = torch.promote_types(a.dtype, torch.float32)
    prod = a.to(acc) * b.to(acc)
    return prod.reshape(order, prod.shape[0] // order, prod.shape[1:].numel()).sum(-1).to(weights.dtype)


def _save(ctx, pair: "OpPair", is_average: bool, first: int, inputs) -> None:
    """What the backward needs; ``first``: the index of the input tensor among the inputs."""
    args = tuple(inputs[first:])
    t, group_arg = args[:2]
    scale = args[2] if len(args) > 2 else 1.0
    weights = args[3] if len(args) > 3 else None
    ctx.pair, ctx.is_average, ctx.first, ctx.n_inputs = pair, is_average, first, len(inputs) - first
    ctx.group_arg = group_arg if isinstance(group_arg, torch.Tensor) else list(group_arg)
    ctx.scale = float(scale)
    ctx.weighted = weights is not None
    if ctx.weighted:
        ctx.save_for_backward(t, weights)


def _backward(ctx, grad: torch.Tensor):
    """(grad of the input, grad of the weights) of either op of ctx.pair:
    transform out[g*B + b] = s w[g, b] Γ_g x[b]:        grad_x = average(grad, Γ⁻¹, s, w)
    average   out[b] = s Σ_g w[g, b] Γ_g y[g*B + b]:    grad_y = transform(grad, Γ⁻¹, s, w)
    The pair's dispatching methods are called, so the backward is itself
    differentiable (double backward, torch.func compositions)."""
    pair, first = ctx.pair, ctx.first
    t, weights = ctx.saved_tensors if ctx.weighted else (None, None)
    inv = pair.inverse(ctx.group_arg)
    order = len(ctx.group_arg)
    adjoint = pair.transform if ctx.is_average else pair.average
    grad_t = adjoint(grad, inv, ctx.scale, weights) if ctx.needs_input_grad[first] else None
    grad_w = None
    if ctx.weighted and ctx.needs_input_grad[first + 3]:
        if ctx.is_average:
            grad_w = _weight_grad(pair.transform(grad, inv, ctx.scale), t, weights, order)
        else:
            grad_w = _weight_grad(grad, pair.transform(t, ctx.group_arg, ctx.scale), weights, order)
    return grad_t, grad_w


# Under vmap an op runs once for the whole batch, the samples' dim placed second
# in its input ([lead, N, ...], lead = B or |G|·B), so that the N samples become
# part of each of its rows. Where that input is not a view of the batched
# tensor the op copies it, which costs more than a call per sample once a
# sample's input exceeds (per device) about a call's host time x the copy's
# rate. CPU: measured (benchmarks/README.md, "vmap"); CUDA: estimated from an
# H200's host time per call and copy rate.
_VMAP_COPY_UP_TO_BYTES = {"cpu": 256 << 10, "cuda": 32 << 20}


def _vmap(op, info, in_dims, t, group_arg, scale=1.0, weights=None):
    """vmap of op (t, group_arg, scale, weights) -> (output, batch dim): one call
    on the batch (see above), or one call per sample when the input would have
    to be copied and is large, or when the weights or the group argument differ
    per sample (the op applies one [|G|, B] table to every row; per-row codes
    differ per sample under vmap(randomness="different"))."""
    t_dim, group_dim, _, w_dim = (*in_dims, None, None)[:4]
    group_dim = group_dim if isinstance(group_arg, torch.Tensor) else None  # int[] codes are never batched
    n = info.batch_size
    if w_dim is None and group_dim is None:  # t is batched (else this rule would not run)
        rows = t.movedim(t_dim, 1)
        sample_bytes = t.numel() // max(n, 1) * t.element_size()
        if _is_row_view(rows) or sample_bytes <= _VMAP_COPY_UP_TO_BYTES.get(t.device.type, float("inf")):
            return op(rows, group_arg, scale, weights), 1
    outs = [op(t if t_dim is None else t.select(t_dim, i), group_arg if group_dim is None else group_arg.select(group_dim, i),
               scale, weights if w_dim is None else weights.select(w_dim, i)) for i in range(n)]
    return torch.stack(outs), 0


def _is_row_view(rows: torch.Tensor) -> bool:
    try:
        rows.view(rows.shape[0], -1)
    except RuntimeError:
        return False
    return True


class _PairOp(torch.autograd.Function):
    """One op of a pair under torch.func transforms and forward-mode AD (the
    autograd that register_autograd generates has no setup_context there, so
    torch.func.grad/vjp raise on it, pytorch/pytorch#170834, and forward-mode
    AD would give zero tangents). Same backward as the registered autograd."""

    @staticmethod
    def forward(pair, is_average, t, group_arg, scale, weights):
        return pair.ops[is_average](t, group_arg, scale, weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[0], inputs[1], 2, inputs)
        if ctx.weighted:
            ctx.save_for_forward(inputs[2], inputs[5])

    @staticmethod
    def backward(ctx, grad):
        grad_t, grad_w = _backward(ctx, grad)
        return None, None, grad_t, None, None, grad_w

    @staticmethod
    def jvp(ctx, _pair_dot, _is_average_dot, t_dot, _group_dot, _scale_dot, weights_dot):
        # Both ops are linear in the input and in the weights: d op(t, w) = op(t_dot, w) + op(t, w_dot).
        op = ctx.pair.average if ctx.is_average else ctx.pair.transform
        t, weights = ctx.saved_tensors if ctx.weighted else (None, None)
        out_dot = None if t_dot is None else op(t_dot, ctx.group_arg, ctx.scale, weights)
        if weights_dot is not None:
            from_weights = op(t, ctx.group_arg, ctx.scale, weights_dot)
            out_dot = from_weights if out_dot is None else out_dot + from_weights
        return out_dot

    @staticmethod
    def vmap(info, in_dims, pair, is_average, t, group_arg, scale, weights):
        op = pair.average if is_average else pair.transform
        return _vmap(op, info, in_dims[2:], t, group_arg, scale, weights)


class OpPair:
    """A (transform, average) pair of registered ops on one kind of group
    argument (D4 codes: inverse=inverse_codes; permutation tables:
    inverse=inverse_tables). Registers the adjoint autograd and the vmap rule
    on both ops; ``transform`` and ``average`` call them, through _PairOp while
    torch.func transforms or forward-mode AD are active."""

    def __init__(self, transform_op, average_op, inverse):
        self.ops = (transform_op, average_op)
        self.inverse = inverse
        for is_average, op in enumerate(self.ops):
            torch.library.register_autograd(op, self._registered_backward, setup_context=self._setup_context(bool(is_average)))
            torch.library.register_vmap(op, lambda info, in_dims, *args, op=op: _vmap(op, info, in_dims, *args))

    def _setup_context(self, is_average: bool):
        def setup_context(ctx, inputs, output):
            _save(ctx, self, is_average, 0, inputs)
        return setup_context

    @staticmethod
    def _registered_backward(ctx, grad):
        grad_t, grad_w = _backward(ctx, grad)
        return (grad_t, None, None, grad_w)[: ctx.n_inputs]

    def transform(self, t, group_arg, scale=1.0, weights=None):
        if _func_transforms_active():
            return _PairOp.apply(self, False, t, group_arg, scale, weights)
        return self.ops[0](t, group_arg, scale, weights)

    def average(self, t, group_arg, scale, weights=None):
        if _func_transforms_active():
            return _PairOp.apply(self, True, t, group_arg, scale, weights)
        return self.ops[1](t, group_arg, scale, weights)


def register_token_transform(op) -> None:
    """vmap of a token_transform op (ids, perms): one call for the whole batch."""
    torch.library.register_vmap(op, lambda info, in_dims, ids, perms: _vmap(
        lambda t, p, scale, weights: op(t, p), info, in_dims, ids, perms))


# ---------------------------------------------------------------------------
# The C++ ops: fake kernels, autograd, vmap
# ---------------------------------------------------------------------------

def _register_fakes(prefix: str, spatial_dims: int) -> None:
    """Fake kernels of ``{prefix}_transform``, ``{prefix}_average`` and their _rows forms."""
    def fake(name: str, is_average: bool, rows: bool):
        def fake_op(t, group_arg, scale=1.0, weights=None):
            if rows:
                torch._check(group_arg.dim() == 2, lambda: f"{name}: codes must be [k, B]")
            k = group_arg.shape[0] if rows else len(group_arg)
            torch._check(k > 0, lambda: f"{name}: empty elements")
            if is_average:
                torch._check(t.shape[0] % k == 0, lambda: f"{name}: leading dim not a multiple of the row blocks")
            return new_output(t, t.shape[0] // k if is_average else t.shape[0] * k, spatial_dims)
        return fake_op

    for op, is_average in (("transform", False), ("average", True)):
        for rows in (False, True):
            name = f"{prefix}_{op}" + ("_rows" if rows else "")
            torch.library.register_fake(f"equitune_ext::{name}")(fake(name, is_average, rows))


_register_fakes("group", 2)
_register_fakes("volume", 3)


@torch.library.register_fake("equitune_ext::token_transform")
def _fake_token_transform(ids, perms):
    return ids.new_empty((ids.shape[0] * perms.shape[0], *ids.shape[1:]))


@torch.library.register_fake("equitune_ext::vocab_transform")
def _fake_vocab_transform(x, perms, scale, weights=None):
    return x.new_empty((x.shape[0] * perms.shape[0], *x.shape[1:]))


@torch.library.register_fake("equitune_ext::vocab_average")
def _fake_vocab_average(y, perms, scale, weights=None):
    torch._check(y.shape[0] % perms.shape[0] == 0, lambda: "vocab_average: leading dim not a multiple of |G|")
    return y.new_empty((y.shape[0] // perms.shape[0], *y.shape[1:]))


class BackendOps(NamedTuple):
    """A backend's ops: the image pair, the vocabulary pair, token_transform,
    the per-row image pair, and the volume pairs (per block, per row) where
    the backend has volume kernels (None otherwise)."""
    image: OpPair
    vocab: OpPair
    token_transform: Callable
    image_rows: OpPair
    volume: Optional[OpPair] = None
    volume_rows: Optional[OpPair] = None


def backend_ops(namespace, suffix: str = "") -> BackendOps:
    """Registers the contract's autograd and vmap on the ops ``group_transform{suffix}``, … of a namespace."""
    def op(name):
        return getattr(namespace, name + suffix).default

    register_token_transform(op("token_transform"))
    volume = volume_rows = None
    if hasattr(namespace, "volume_transform" + suffix):
        volume = OpPair(op("volume_transform"), op("volume_average"), partial(inverse_codes, tables=VOLUME_TABLES))
        volume_rows = OpPair(op("volume_transform_rows"), op("volume_average_rows"),
                             partial(inverse_code_table, tables=VOLUME_TABLES))
    return BackendOps(OpPair(op("group_transform"), op("group_average"), inverse_codes),
                      OpPair(op("vocab_transform"), op("vocab_average"), inverse_tables), op("token_transform"),
                      OpPair(op("group_transform_rows"), op("group_average_rows"), inverse_code_table),
                      volume, volume_rows)


CPP_OPS = backend_ops(torch.ops.equitune_ext)
