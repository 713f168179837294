"""The public ops ``group_transform`` / ``group_average`` and the backend choice.

A call resolves its group and checks its arguments once (rules in
contract.py), picks a backend ("cpp": the C++ CPU/CUDA kernels, "triton",
"reference": plain PyTorch) and calls that backend's op, whose autograd is
the pair's adjoint (contract.OpPair):

    group_transform(x, "c4") -> contract.CPP_OPS.image.transform(x, codes) -> torch.ops.equitune_ext.group_transform
    group_transform(x, "c4", elements=idx) -> contract.CPP_OPS.image_rows.transform(x, code table)
        -> torch.ops.equitune_ext.group_transform_rows
    group_transform(x, "oh") -> contract.CPP_OPS.volume.transform(x, codes) -> torch.ops.equitune_ext.volume_transform
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional, Union

import torch

from . import _C, contract, reference
from . import triton as _triton_backend  # imports triton itself only when a Triton op first runs
from .contract import check_floating, check_group_multiple, check_planes, check_tensor, check_volumes, check_weights
from .groups import IDENTITY, ImageGroup, VolumeGroup, resolve_group
from .token_groups import TokenGroup

__all__ = ["group_transform", "group_average", "use_backend", "get_backend", "available_backends", "build_info"]

build_info = _C.build_info
# Read once: the backend choice below runs inside torch.compile'd regions, and
# dynamo cannot trace a call into the pybind module.
_HAS_CUDA_KERNELS = bool(_C.build_info()["cuda"])

BACKENDS = ("auto", "cpp", "triton", "reference")
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
    if name == "auto" and torch.compiler.is_exporting():
        # While torch.export traces (torch.onnx.export traces with it), "auto" is the plain-PyTorch
        # reference, so that the exported graph holds standard ops only: it runs in onnxruntime,
        # ExecuTorch or libtorch without this package, and each op exports through the code the tests
        # hold the kernels to. The alternatives work from the custom ops' raw arguments: ONNX
        # translations (custom_translation_table) must be passed to every export call, and
        # decompositions in torch._decomp's global table (private; the ONNX exporter reads it) would be
        # a second implementation of each of the seven ops. torch.compile does not set the flag, so
        # compiled models keep the fused kernels; an explicit backend ("cpp", use_backend) keeps the
        # custom ops in a torch.export graph.
        return "reference"
    if name == "auto":
        if device.type == "cuda":
            from .tuning import cuda_auto_backend

            usable = available_backends(device)
            preferred = cuda_auto_backend(op, t)
            return preferred if preferred in usable else next(b for b in ("cpp", "triton") if b in usable)
        return "cpp" if device.type == "cpu" else "reference"
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


def _backend_ops(impl: str) -> contract.BackendOps:
    return _triton_backend.ops() if impl == "triton" else contract.CPP_OPS


def _on_real_view(op, t: torch.Tensor, spatial_dims: int, *args) -> torch.Tensor:
    """op on a complex tensor through its real view, the real and imaginary
    parts as a dim after the first ([N, 2, *, H, W]): the ops are linear with
    real coefficients, so they act on both parts alike, and autograd (complex
    included) runs through the real kernels. No complex average kernels exist;
    the transform's complex kernel is used where no gradient is needed.
    spatial_dims: the op's (its layout rule, contract.wants_channels_last)."""
    out = op(torch.view_as_real(t.resolve_conj()).movedim(-1, 1), *args)
    out = torch.complex(out.select(1, 0), out.select(1, 1))
    if contract.wants_channels_last(t, spatial_dims):
        return out.contiguous(memory_format=contract.channels_last_format(spatial_dims))
    return out


def _check_spatial(t: torch.Tensor, g: Union[ImageGroup, VolumeGroup], op: str, what: str) -> None:
    """The shape an image group ([N, *, H, W]) or a volume group ([N, C, D, H, W]) acts on."""
    if g.kind == "volume":
        check_volumes(t, g.needs_square, op, what)
    else:
        check_planes(t, g.needs_square, op, what, f"group {g.name!r}, which rotates by 90 degrees")


def _pair(ops: contract.BackendOps, g: Union[ImageGroup, VolumeGroup], rows: bool, impl: str) -> contract.OpPair:
    """The backend's (transform, average) pair acting on g: image or volume, per block or per row."""
    if g.kind != "volume":
        return ops.image_rows if rows else ops.image
    pair = ops.volume_rows if rows else ops.volume
    if pair is None:
        raise NotImplementedError(f"backend {impl!r} has no kernels for volume groups; use backend='cpp' or 'reference'")
    return pair


def group_transform(x: torch.Tensor, group: Union[str, ImageGroup, VolumeGroup, TokenGroup], *,
                    elements: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """All transformed copies of ``x`` in one fused pass.

    x: [B, *, H, W], any dtype (image groups), [B, C, D, H, W] (volume
    groups: "flip3d", "o", "oh"), or integer token ids [B, *] (a TokenGroup).
    Returns [|G|·B, …] whose block g (rows g·B … (g+1)·B−1) is Γ(g)x, in the
    group's element order. channels_last in gives channels_last out
    (volumes: channels_last_3d). Differentiable (its backward is
    ``group_average``), also under torch.func transforms and forward-mode AD.

    elements: per-example elements (sampled equi-tuning), an integer tensor
    [k, B] of element indices in [0, |G|) (the group's element order): returns
    [k·B, …] whose row j·B + b is Γ(elements[j, b]) x[b]. Image and volume groups.
    """
    op = "group_transform"
    check_tensor(x, "x")
    g = resolve_group(group)
    if g.kind == "token" and elements is None:
        return _token_transform(x, g, backend)
    if elements is not None:
        _check_elements(g, elements, op)
    _check_spatial(x, g, op, "x")
    if elements is not None:
        contract.check_element_index_shape(elements, x.shape[0], op, x)
        contract.check_element_index_range(elements, g.order, op)
    impl = _resolve_backend(backend, x, "volume_transform" if g.kind == "volume" else op)
    if impl == "reference":
        return reference.group_transform(x, g) if elements is None else reference.group_transform_rows(x, g, elements)
    transform = _pair(_backend_ops(impl), g, elements is not None, impl).transform
    if elements is None:
        arg = list(g.codes)
    else:
        arg = contract.element_codes(elements, g.codes, x.device, g.tables.num_codes)
    # The real view where the backward needs the real average, and for complex128 on Triton (no 128-bit loads)
    if x.is_complex() and ((x.requires_grad and torch.is_grad_enabled())
                           or (impl == "triton" and x.dtype == torch.complex128)):
        return _on_real_view(transform, x, g.tables.spatial_dims, arg, 1.0)
    return transform(x, arg, 1.0)


def group_average(
    y: torch.Tensor,
    group: Union[str, ImageGroup, VolumeGroup, TokenGroup],
    *,
    equivariant: bool = True,
    elements: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inverse-transform and average the group blocks in one fused pass.

    y: [|G|·B, *]. Returns [B, *] = (1/|G|) Σ_g Γ(g)⁻¹ y_g, Γ acting on the
    last two dims (``equivariant=True``: feature maps; a volume group: the
    last three of [|G|·B, C, D, H, W]; for a TokenGroup on the last dim,
    scores over the vocabulary), or the plain mean of the group
    blocks (``equivariant=False``: invariant outputs such as logits, any
    trailing shape). Floating dtypes; half and bfloat16 accumulate in float32.

    weights: λ-equitune weights [|G|, B] (normalized by the caller): returns
    Σ_g w[g, b] · Γ(g)⁻¹ y_g instead, fused into the same kernels, with
    gradients for both y and weights (torch.func transforms and forward-mode
    AD included).

    elements: per-example elements [k, B] (as in ``group_transform``): y is
    [k·B, *] and the result (1/k) Σ_j Γ(elements[j, b])⁻¹ y[j·B + b] (weights
    [k, B]: Σ_j w[j, b] · …). Image and volume groups.
    """
    op = "group_average"
    check_tensor(y, "y")
    g = resolve_group(group)
    k = g.order if elements is None else _check_elements(g, elements, op)  # row blocks per example
    if equivariant and g.kind == "token":
        contract.check_vocab_logits(y, g.vocab_size, op)
    elif equivariant:
        _check_spatial(y, g, op, "y")
    check_floating(y, op, "y", complex_ok=g.kind != "token")
    check_group_multiple(y, k, op, "y" if elements is None else "y (k = elements.shape[0] rows per example)")
    if elements is not None:
        contract.check_element_index_shape(elements, y.shape[0] // k, op, y)
        contract.check_element_index_range(elements, g.order, op)
    if weights is not None:
        check_weights(weights, y, k, y.shape[0] // k, op, "|G|" if elements is None else "k")
    impl = _resolve_backend(backend, y, {"token": "vocab_average", "volume": "volume_average"}.get(g.kind, op))
    if impl == "reference":
        if elements is not None:
            return reference.group_average_rows(y, g, elements, equivariant=equivariant, weights=weights)
        average = reference.token_group_average if g.kind == "token" else reference.group_average
        return average(y, g, equivariant=equivariant, weights=weights)
    ops = _backend_ops(impl)
    scale = 1.0 if weights is not None else 1.0 / k
    if equivariant and g.kind == "token":
        return ops.vocab.average(y, g.tables(y.device), scale, weights)
    if not equivariant:  # the plain (or weighted) mean over the k row blocks: the image op with identity codes
        average, arg, spatial_dims = ops.image.average, [IDENTITY] * k, 2
    else:
        average, spatial_dims = _pair(ops, g, elements is not None, impl).average, g.tables.spatial_dims
        arg = list(g.inverse_codes) if elements is None else \
            contract.element_codes(elements, g.inverse_codes, y.device, g.tables.num_codes)
    if y.is_complex():
        return _on_real_view(average, y, spatial_dims, arg, scale, weights)
    return average(y, arg, scale, weights)


def _token_transform(ids: torch.Tensor, g: TokenGroup, backend: Optional[str]) -> torch.Tensor:
    contract.check_token_ids(ids, "group_transform")
    impl = _resolve_backend(backend, ids, "token_transform")
    if impl == "reference":
        # A clear message for a bad id where the check can run; where it cannot
        # (in a CUDA graph, under torch.func, in an exported graph), the reference's index_select rejects it.
        checkable = not (contract.capturing_cuda_graph(ids) or torch._C._functorch.is_functorch_wrapped_tensor(ids)
                         or torch.compiler.is_exporting())
        if ids.numel() and checkable and (ids.min() < 0 or ids.max() >= g.vocab_size):
            raise ValueError(f"group_transform: token ids must be in [0, {g.vocab_size})")
        return reference.token_group_transform(ids, g)
    return _backend_ops(impl).token_transform(ids, g.tables(ids.device))


def _check_elements(g, elements: torch.Tensor, op: str) -> int:
    """Checks per-row element indices [k, B]: an image group, an integer dtype; returns k (1 if malformed:
    the shape check that follows names the problem)."""
    if g.kind == "token":
        raise NotImplementedError(f"{op}: elements= (per-row group elements) needs an image group or a volume group, "
                                  "got a token group")
    contract.check_element_index_dtype(elements, op)
    return elements.shape[0] if elements.dim() == 2 and elements.shape[0] > 0 else 1
