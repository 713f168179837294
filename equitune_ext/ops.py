"""Python side of the custom ops: fake kernels, autograd, argument checks and
the backend choice behind the public ``group_transform`` / ``group_average``.

The C++ library declares (csrc/equitune_ext.cpp), G = len(elements):

    group_transform(x, elements, scale=1.0):  out[g*B + b] = scale * Γ(elements[g]) x[b]
    group_average(y, elements, scale):        out[b] = scale * Σ_g Γ(elements[g]) y[g*B + b]

with ``elements`` D4 codes (groups.py). The public average passes the group's
inverse codes, so the two ops are adjoint: the backward of each is the other
with the inverse codes, which also gives gradients of every order. The Triton
backend (equitune_ext/triton) registers the same pair of ops under
``*_triton`` names and the same autograd. The public functions call each pair
through func_op_pair, which under torch.func transforms and forward-mode AD
routes the calls through autograd.Functions that support them.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, List, Optional, Union

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _C  # noqa: F401  (loads the library: registers torch.ops.equitune_ext.*)
from . import reference
from .groups import IDENTITY, INVERSE_CODES, ImageGroup, get_image_group
from .token_groups import TokenGroup
from . import triton as _triton_backend  # imports triton itself only when a Triton op first runs

__all__ = ["group_transform", "group_average", "use_backend", "get_backend", "available_backends", "build_info"]

build_info = _C.build_info
# Read once: the backend choice below runs inside torch.compile'd regions, and
# dynamo cannot trace a call into the pybind module.
_HAS_CUDA_KERNELS = bool(_C.build_info()["cuda"])

BACKENDS = ("auto", "cpp", "triton", "reference")


# ---------------------------------------------------------------------------
# Fake kernels and autograd (shared by the C++ and the Triton op pair)
# ---------------------------------------------------------------------------

def _wants_channels_last(t: torch.Tensor) -> bool:
    # Mirrors wants_channels_last() in csrc/group_ops.h: channels_last in gives channels_last out.
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def output_shape(t: torch.Tensor, elements: List[int], n_out: int) -> List[int]:
    shape = [n_out, *t.shape[1:]]
    if t.dim() >= 3 and elements[0] & 1:  # an odd rotation swaps H and W
        shape[-2], shape[-1] = shape[-1], shape[-2]
    return shape


def new_output(t: torch.Tensor, elements: List[int], n_out: int) -> torch.Tensor:
    mf = torch.channels_last if _wants_channels_last(t) else torch.contiguous_format
    return torch.empty(output_shape(t, elements, n_out), dtype=t.dtype, device=t.device, memory_format=mf)


def as_planes(t: torch.Tensor) -> torch.Tensor:
    """[N, *mid, H, W] -> [N, prod(mid), H, W] (a view when strides allow);
    fewer than 3 dims (all-identity codes) -> [N, 1, 1, rest]. As in csrc/group_ops.h."""
    if t.dim() >= 4:
        return t if t.dim() == 4 else t.flatten(1, -3)
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.reshape(t.shape[0], 1, 1, t.shape[1] if t.dim() == 2 else 1)


def check_op_args(
    t: torch.Tensor, elements: List[int], scale: float, *, is_average: bool, op: str, weighted: bool = False
) -> None:
    """The raw ops' argument checks (plan_group_op in csrc/group_ops.h), for the Python-side backends."""
    if len(elements) == 0:
        raise RuntimeError(f"{op}: `elements` must name at least one group element")
    if any(not 0 <= e < 8 for e in elements):
        raise RuntimeError(f"{op}: group element codes must be in [0, 8), got {list(elements)}")
    if not math.isfinite(scale):
        raise RuntimeError(f"{op}: `scale` must be finite, got {scale}")
    all_identity = all(e == IDENTITY for e in elements)
    if not (t.dim() >= 3 or (all_identity and t.dim() >= 1)):
        raise RuntimeError(f"{op}: expected a tensor of shape [N, *, H, W] (at least 3 dims), got {t.dim()} dims")
    if (is_average or scale != 1.0 or weighted) and not t.is_floating_point():
        raise RuntimeError(f"{op}: expected a floating-point tensor (float64, float32, float16 or bfloat16), got {t.dtype}")
    if any(e & 1 for e in elements) and t.shape[-1] != t.shape[-2]:
        raise RuntimeError(f"{op}: 90-degree rotations need square inputs (H == W), got H={t.shape[-2]}, W={t.shape[-1]}")
    if is_average and t.shape[0] % len(elements):
        raise RuntimeError(
            f"{op}: the leading dim ({t.shape[0]}) must be a multiple of the group order ({len(elements)})"
        )


def check_weights_arg(weights: torch.Tensor, t: torch.Tensor, G: int, B: int, op: str) -> None:
    if weights.device != t.device:
        raise RuntimeError(f"{op}: `weights` is on {weights.device} but the input is on {t.device}")
    if not weights.is_floating_point():
        raise RuntimeError(f"{op}: `weights` must be floating-point, got {weights.dtype}")
    if tuple(weights.shape) != (G, B):
        raise RuntimeError(f"{op}: `weights` must have shape [|G|, B] = [{G}, {B}], got {tuple(weights.shape)}")


def _fake_transform(x, elements, scale=1.0, weights=None):
    torch._check(len(elements) > 0, lambda: "group_transform: empty elements")
    return new_output(x, elements, x.shape[0] * len(elements))


def _fake_average(y, elements, scale, weights=None):
    torch._check(len(elements) > 0, lambda: "group_average: empty elements")
    torch._check(y.shape[0] % len(elements) == 0, lambda: "group_average: leading dim not a multiple of |G|")
    return new_output(y, elements, y.shape[0] // len(elements))


def _inverse(elements) -> List[int]:
    return [INVERSE_CODES[c] for c in elements]


def _weight_grad(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor, G: int) -> torch.Tensor:
    # grad_w[g, b] = Σ over block (g, b)'s elements of a * b, in float32 at least.
    acc = torch.promote_types(a.dtype, torch.float32)
    prod = a.to(acc) * b.to(acc)
    return prod.reshape(G, prod.shape[0] // G, prod.shape[1:].numel()).sum(-1).to(weights.dtype)


def _inverse_tables(perms: torch.Tensor) -> torch.Tensor:
    ident = torch.arange(perms.shape[1], device=perms.device).expand_as(perms)
    return torch.empty_like(perms).scatter_(1, perms, ident)


def op_pair_autograd(transform_op, average_op, inverse=_inverse):
    """(setup_context, transform_backward, average_backward) of a (transform,
    average) pair of ops whose schemas are (input, group, scale, weights=None),
    the group argument being D4 codes (image ops) or permutation tables (token
    ops, inverse=_inverse_tables): each op's backward is the other with the
    inverse group argument (a linear map by a group element is adjoint to the
    map by its inverse); λ-weights get their gradient from the same pair of ops.
    One definition for the registered ops (register_op_pair) and the Triton
    backend's eager autograd.Functions."""
    def setup_context(ctx, inputs, output):
        ctx.n_inputs = len(inputs)
        ctx.group_arg = inputs[1] if isinstance(inputs[1], torch.Tensor) else list(inputs[1])
        ctx.scale = float(inputs[2]) if len(inputs) > 2 else 1.0
        weights = inputs[3] if len(inputs) > 3 else None
        ctx.weighted = weights is not None
        if ctx.weighted:
            ctx.save_for_backward(inputs[0], weights)

    def transform_backward(ctx, grad):
        # out[g*B + b] = s * w[g, b] * Γ_g x[b]
        weights = ctx.saved_tensors[1] if ctx.weighted else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = average_op(grad, inverse(ctx.group_arg), ctx.scale, weights)
        grad_w = None
        if ctx.weighted and ctx.needs_input_grad[3]:
            x = ctx.saved_tensors[0]
            grad_w = _weight_grad(grad, transform_op(x, ctx.group_arg, ctx.scale), weights, len(ctx.group_arg))
        return (grad_x, None, None, grad_w)[: ctx.n_inputs]

    def average_backward(ctx, grad):
        # out[b] = s * Σ_g w[g, b] * Γ_g y[g*B + b]
        weights = ctx.saved_tensors[1] if ctx.weighted else None
        inv = inverse(ctx.group_arg)
        grad_y = transform_op(grad, inv, ctx.scale, weights) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.weighted and ctx.needs_input_grad[3]:
            y = ctx.saved_tensors[0]
            grad_w = _weight_grad(transform_op(grad, inv, ctx.scale), y, weights, len(ctx.group_arg))
        return (grad_y, None, None, grad_w)[: ctx.n_inputs]

    return setup_context, transform_backward, average_backward


def register_op_pair(transform_op, average_op, inverse=_inverse) -> None:
    """Registers op_pair_autograd's autograd and _vmap_rule's vmap on the two ops."""
    setup_context, transform_backward, average_backward = op_pair_autograd(transform_op, average_op, inverse)
    torch.library.register_autograd(transform_op, transform_backward, setup_context=setup_context)
    torch.library.register_autograd(average_op, average_backward, setup_context=setup_context)
    for op in (transform_op, average_op):
        _register_vmap(op, _vmap_rule(op))


def _register_vmap(op, rule) -> None:
    def vmap(info, in_dims, t, group_arg, scale=1.0, weights=None):
        return rule(info, (*in_dims, None, None)[:4], t, group_arg, scale, weights)
    torch.library.register_vmap(op, vmap)


def _func_transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, vmap) or
    forward-mode AD (torch.autograd.forward_ad) is active outside torch.compile."""
    return not torch.compiler.is_compiling() and (
        torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0)


# Under vmap an op runs once for the whole batch, the samples' dim placed second
# in its input ([lead, N, ...], lead = B or |G|·B), so that the N samples become
# part of each of its rows. Where that input is not a view of the batched
# tensor the op copies it, which costs more than a call per sample once a
# sample's input exceeds (per device) about a call's host time x the copy's
# rate. CPU, measured on the 2-core development VM (vmap of the c4 average over
# 32 samples of [4, 16, s, s] float32): the copy wins up to 64 KiB per sample
# (0.67 vs 1.15 ms), the two tie from 256 to 500 KiB, the calls win at 1 MiB
# (2.7 vs 11.7 ms). CUDA, estimated from run 5 on the H200: 20-27 us per C++
# call, copies at 4.2 TB/s, so about 32 MiB.
_VMAP_COPY_UP_TO_BYTES = {"cpu": 256 << 10, "cuda": 32 << 20}


def _rows_are_a_view(rows: torch.Tensor) -> bool:
    try:
        rows.view(rows.shape[0], -1)
    except RuntimeError:
        return False
    return True


def _vmap_rule(op):
    """A vmap rule for an op of a pair, (info, in_dims, t, group_arg, scale,
    weights) -> (output, batch dim): one call on the batch (see above), or one
    call per sample when the input would have to be copied and is large, or
    when the weights differ per sample (the op applies one [|G|, B] table to
    every row)."""
    def vmap(info, in_dims, t, group_arg, scale, weights):
        t_dim, group_dim, _, w_dim = in_dims
        if isinstance(group_arg, torch.Tensor) and group_dim is not None:
            raise NotImplementedError("vmap over a token group's permutation tables is not supported")
        N = info.batch_size
        if w_dim is None:  # t is batched (else this rule would not run)
            rows = t.movedim(t_dim, 1)
            sample_bytes = t.numel() // max(N, 1) * t.element_size()
            if _rows_are_a_view(rows) or sample_bytes <= _VMAP_COPY_UP_TO_BYTES.get(t.device.type, float("inf")):
                return op(rows, group_arg, scale, weights), 1
        outs = [op(t if t_dim is None else t.select(t_dim, i), group_arg, scale,
                   weights if w_dim is None else weights.select(w_dim, i)) for i in range(N)]
        return torch.stack(outs), 0
    return vmap


def func_op_pair(transform_op, average_op, inverse=_inverse):
    """(transform, average): the two ops of a pair as the public functions call
    them. Plain calls go straight to the ops. Under torch.func transforms and
    forward-mode AD they go through torch.autograd.Functions with the same
    backward (op_pair_autograd), a jvp and a vmap rule (one op call per vmapped
    batch): the autograd that torch.library.register_autograd generates has no
    setup_context, so torch.func.grad/vjp/jacrev raise on it
    (pytorch/pytorch#170834), forward-mode AD through the ops would silently
    give zero tangents, and functorch's vmap fallback calls an op once per sample."""
    functions = []

    def transform(t, group_arg, scale=1.0, weights=None):
        if _func_transforms_active():
            return functions[0].apply(t, group_arg, scale, weights)
        return transform_op(t, group_arg, scale, weights)

    def average(t, group_arg, scale, weights=None):
        if _func_transforms_active():
            return functions[1].apply(t, group_arg, scale, weights)
        return average_op(t, group_arg, scale, weights)

    # The backward and jvp call the pair itself, so they compose with every
    # transform below them (hessian-vector products, jacfwd(jacrev(...)), ...).
    setup_context, transform_backward, average_backward = op_pair_autograd(transform, average, inverse)

    def func_setup_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        if ctx.weighted:
            ctx.save_for_forward(inputs[0], inputs[3])

    def jvp_of(op):
        def jvp(ctx, t_dot, _group_dot, _scale_dot, weights_dot):
            # Both ops are linear in the input and in the weights:
            # d op(t, w) = op(t_dot, w) + op(t, w_dot).
            t, weights = ctx.saved_tensors if ctx.weighted else (None, None)
            out_dot = None if t_dot is None else op(t_dot, ctx.group_arg, ctx.scale, weights)
            if weights_dot is not None:
                from_weights = op(t, ctx.group_arg, ctx.scale, weights_dot)
                out_dot = from_weights if out_dot is None else out_dot + from_weights
            return out_dot
        return jvp

    def forward_of(raw_op):
        def forward(t, group_arg, scale, weights):
            return raw_op(t, group_arg, scale, weights)
        return forward

    for is_average, op, raw_op, backward in ((False, transform, transform_op, transform_backward),
                                             (True, average, average_op, average_backward)):
        name = getattr(raw_op, "__name__", "average" if is_average else "transform")
        functions.append(type(f"{name}_func", (torch.autograd.Function,), {
            "forward": staticmethod(forward_of(raw_op)),
            "setup_context": staticmethod(func_setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp_of(op)),
            "vmap": staticmethod(_vmap_rule(op)),
        }))
    return transform, average


@torch.library.register_fake("equitune_ext::token_transform")
def _fake_token_transform(ids, perms):
    return ids.new_empty((ids.shape[0] * perms.shape[0], *ids.shape[1:]))


def register_token_transform_vmap(op) -> None:
    """vmap of a token_transform op (ids, perms): the transform rule of the
    pairs, one call for the whole batch."""
    _register_vmap(op, _vmap_rule(lambda ids, perms, scale, weights: op(ids, perms)))


register_token_transform_vmap(torch.ops.equitune_ext.token_transform.default)


@torch.library.register_fake("equitune_ext::vocab_transform")
def _fake_vocab_transform(x, perms, scale, weights=None):
    return x.new_empty((x.shape[0] * perms.shape[0], *x.shape[1:]))


@torch.library.register_fake("equitune_ext::vocab_average")
def _fake_vocab_average(y, perms, scale, weights=None):
    torch._check(y.shape[0] % perms.shape[0] == 0, lambda: "vocab_average: leading dim not a multiple of |G|")
    return y.new_empty((y.shape[0] // perms.shape[0], *y.shape[1:]))


register_op_pair(torch.ops.equitune_ext.vocab_transform.default, torch.ops.equitune_ext.vocab_average.default,
                 inverse=_inverse_tables)

torch.library.register_fake("equitune_ext::group_transform")(_fake_transform)
torch.library.register_fake("equitune_ext::group_average")(_fake_average)
register_op_pair(torch.ops.equitune_ext.group_transform.default, torch.ops.equitune_ext.group_average.default)

# What the public functions call, per backend (the Triton ones import triton on first use).
_CPP_IMAGE_OPS = func_op_pair(torch.ops.equitune_ext.group_transform.default, torch.ops.equitune_ext.group_average.default)
_CPP_VOCAB_OPS = func_op_pair(torch.ops.equitune_ext.vocab_transform.default, torch.ops.equitune_ext.vocab_average.default,
                              inverse=_inverse_tables)
_TRITON_IMAGE_OPS = func_op_pair(_triton_backend.group_transform_op, _triton_backend.group_average_op)
_TRITON_VOCAB_OPS = func_op_pair(_triton_backend.vocab_transform_op, _triton_backend.vocab_average_op,
                                 inverse=_inverse_tables)


# ---------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------

_state = threading.local()


def get_backend() -> str:
    """The backend the ops use when called without ``backend=`` (default "auto")."""
    return getattr(_state, "backend", "auto")


def _check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: the ops inside use ``name`` ("auto", "cpp", "triton", "reference")."""
    previous = get_backend()
    _state.backend = _check_backend_name(name)
    try:
        yield
    finally:
        _state.backend = previous


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """The concrete backends that can run on ``device``."""
    device = torch.device(device)
    found = ["reference"]
    if device.type == "cpu" or (device.type == "cuda" and _HAS_CUDA_KERNELS):
        found.append("cpp")
    if _triton_backend.is_available(device):
        found.append("triton")
    return found


def _resolve_backend(backend: Optional[str], t: torch.Tensor, op: str) -> str:
    name = _check_backend_name(backend if backend is not None else get_backend())
    device = t.device
    if name == "auto":
        if device.type == "cuda":
            from .tuning import cuda_auto_backend

            preferred = cuda_auto_backend(op, t)
            usable = available_backends(device)
            return preferred if preferred in usable else next(b for b in ("cpp", "triton") if b in usable)
        if device.type == "cpu":
            return "cpp"
        return "reference"
    if name == "cpp":
        if device.type == "cuda" and not _HAS_CUDA_KERNELS:
            raise RuntimeError(
                "backend 'cpp' on a CUDA tensor needs the CUDA kernels, but this build of equitune_ext has none "
                "(rebuild with a CUDA toolkit: CUDA_HOME=... pip install --no-build-isolation -e .)"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend 'cpp' has no kernels for device type {device.type!r}")
    if name == "triton":
        _triton_backend.require(device)
    return name


# ---------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------

def _check_tensor(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")


def _check_spatial(t: torch.Tensor, g: ImageGroup, op: str, what: str) -> None:
    if t.dim() < 3:
        raise ValueError(f"{op}: {what} must have shape [N, *, H, W] (at least 3 dims), got shape {tuple(t.shape)}")
    if g.needs_square and t.shape[-1] != t.shape[-2]:
        raise ValueError(
            f"{op}: group {g.name!r} rotates by 90 degrees and needs square inputs (H == W), "
            f"got H={t.shape[-2]}, W={t.shape[-1]}"
        )


def group_transform(x: torch.Tensor, group: Union[str, ImageGroup], *, backend: Optional[str] = None) -> torch.Tensor:
    """All transformed copies of ``x`` in one fused pass.

    x: [B, *, H, W], any dtype. Returns [|G|·B, *, H, W] whose block g (rows
    g·B … (g+1)·B−1) is Γ(g)x, in the group's element order. channels_last in
    gives channels_last out. Differentiable (its backward is ``group_average``),
    also under torch.func transforms and forward-mode AD.
    """
    _check_tensor(x, "x")
    if isinstance(group, TokenGroup):
        return _token_transform(x, group, backend)
    g = get_image_group(group)
    _check_spatial(x, g, "group_transform", "x")
    impl = _resolve_backend(backend, x, "group_transform")
    if impl == "reference":
        return reference.group_transform(x, g)
    transform, _ = _TRITON_IMAGE_OPS if impl == "triton" else _CPP_IMAGE_OPS
    if x.is_complex() and x.requires_grad and torch.is_grad_enabled():  # its backward needs the real average
        return _on_real_view(transform, x, list(g.codes), 1.0)
    return transform(x, list(g.codes), 1.0)


def _on_real_view(op, t: torch.Tensor, *args) -> torch.Tensor:
    """op on a complex tensor through its real view, the real and imaginary
    parts as a dim after the first ([N, 2, *, H, W]): the ops are linear with
    real coefficients, so they act on both parts alike, and autograd (complex
    included) runs through the real kernels. No complex average kernels exist;
    the transform's complex kernel is used where no gradient is needed."""
    out = op(torch.view_as_real(t.resolve_conj()).movedim(-1, 1), *args)
    out = torch.complex(out.select(1, 0), out.select(1, 1))
    return out.contiguous(memory_format=torch.channels_last) if _wants_channels_last(t) else out


def group_average(
    y: torch.Tensor,
    group: Union[str, ImageGroup],
    *,
    equivariant: bool = True,
    weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inverse-transform and average the group blocks in one fused pass.

    y: [|G|·B, *]. Returns [B, *] = (1/|G|) Σ_g Γ(g)⁻¹ y_g, Γ acting on the
    last two dims (``equivariant=True``: feature maps), or the plain mean of
    the group blocks (``equivariant=False``: invariant outputs such as logits,
    any trailing shape). Floating dtypes; half and bfloat16 accumulate in float32.

    weights: λ-equitune weights [|G|, B] (normalized by the caller): returns
    Σ_g w[g, b] · Γ(g)⁻¹ y_g instead, fused into the same kernels, with
    gradients for both y and weights (torch.func transforms and forward-mode
    AD included).
    """
    _check_tensor(y, "y")
    if isinstance(group, TokenGroup):
        return _token_average(y, group, equivariant, weights, backend)
    g = get_image_group(group)
    if equivariant:
        _check_spatial(y, g, "group_average", "y")
    elif y.dim() < 1:
        raise ValueError("group_average: y must have a leading group·batch dim, got a 0-dim tensor")
    if not (y.is_floating_point() or y.is_complex()):
        raise TypeError(f"group_average: y must be a floating-point or complex tensor, got {y.dtype}")
    if y.shape[0] % g.order:
        raise ValueError(
            f"group_average: the leading dim of y ({y.shape[0]}) must be a multiple of |G| = {g.order} (group {g.name!r})"
        )
    if weights is not None:
        _check_weights(weights, y, g)
    impl = _resolve_backend(backend, y, "group_average")
    if impl == "reference":
        return reference.group_average(y, g, equivariant=equivariant, weights=weights)
    codes = list(g.inverse_codes) if equivariant else [IDENTITY] * g.order
    scale = 1.0 if weights is not None else 1.0 / g.order
    _, average = _TRITON_IMAGE_OPS if impl == "triton" else _CPP_IMAGE_OPS
    if y.is_complex():
        return _on_real_view(average, y, codes, scale, weights)
    return average(y, codes, scale, weights)


def _check_weights(weights, y: torch.Tensor, g: Union[ImageGroup, TokenGroup]) -> None:
    _check_tensor(weights, "weights")
    batch = y.shape[0] // g.order
    if tuple(weights.shape) != (g.order, batch):
        raise ValueError(f"group_average: weights must have shape [|G|, B] = [{g.order}, {batch}], got {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"group_average: weights must be a floating-point tensor, got {weights.dtype}")
    if weights.device != y.device:
        raise ValueError(f"group_average: weights are on {weights.device} but y is on {y.device}")


# ---------------------------------------------------------------------------
# Token groups
# ---------------------------------------------------------------------------

def capturing_cuda_graph(t: torch.Tensor) -> bool:
    """Whether t is a CUDA tensor and the current stream is being captured into
    a CUDA graph: then nothing may sync (token_transform skips its range check;
    the kernels pass a bad id through unchanged, and the embedding after them
    rejects it)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _token_transform(ids: torch.Tensor, g: TokenGroup, backend: Optional[str]) -> torch.Tensor:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"group_transform: token ids must be an int64 or int32 tensor, got {ids.dtype}")
    if ids.dim() < 1:
        raise ValueError("group_transform: token ids must have shape [B, *], got a 0-dim tensor")
    impl = _resolve_backend(backend, ids, "token_transform")
    if impl == "reference":
        # A clear message for a bad id where the check can run; where it cannot
        # (in a CUDA graph, under torch.func), the reference's index_select rejects it.
        checkable = not (capturing_cuda_graph(ids) or torch._C._functorch.is_functorch_wrapped_tensor(ids))
        if ids.numel() and checkable and (ids.min() < 0 or ids.max() >= g.vocab_size):
            raise ValueError(f"group_transform: token ids must be in [0, {g.vocab_size})")
        return reference.token_group_transform(ids, g)
    if impl == "triton":
        return _triton_backend.token_transform_op(ids, g.tables(ids.device))
    return torch.ops.equitune_ext.token_transform(ids, g.tables(ids.device))


def _token_average(y, g: TokenGroup, equivariant: bool, weights, backend) -> torch.Tensor:
    if not y.is_floating_point():
        raise TypeError(f"group_average: logits must be a floating-point tensor, got {y.dtype}")
    if equivariant and y.dim() < 2:
        raise ValueError(f"group_average: logits must have shape [|G|·B, *, V], got shape {tuple(y.shape)}")
    if y.dim() < 1:
        raise ValueError("group_average: y must have shape [|G|·B, *], got a 0-dim tensor")
    if equivariant and y.shape[-1] != g.vocab_size:
        raise ValueError(f"group_average: the logits' last dim ({y.shape[-1]}) must equal the group's vocabulary size ({g.vocab_size})")
    if y.shape[0] % g.order:
        raise ValueError(f"group_average: the leading dim of y ({y.shape[0]}) must be a multiple of |G| = {g.order}")
    if weights is not None:
        _check_weights(weights, y, g)
    impl = _resolve_backend(backend, y, "vocab_average")
    if impl == "reference":
        return reference.token_group_average(y, g, equivariant=equivariant, weights=weights)
    scale = 1.0 if weights is not None else 1.0 / g.order
    if not equivariant:  # the plain (or weighted) mean over the group blocks: the image op with identity codes
        _, average = _TRITON_IMAGE_OPS if impl == "triton" else _CPP_IMAGE_OPS
        return average(y, [IDENTITY] * g.order, scale, weights)
    _, average = _TRITON_VOCAB_OPS if impl == "triton" else _CPP_VOCAB_OPS
    return average(y, g.tables(y.device), scale, weights)
