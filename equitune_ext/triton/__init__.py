"""Triton backend of the image-group ops.

Registers ``equitune_ext::group_transform_triton`` and
``equitune_ext::group_average_triton`` with ``torch.library.triton_op`` (so
torch.compile traces into the kernels) and the same autograd as the C++ pair:
each op's backward is the other with the inverse codes.

Triton runs on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how CI tests
these kernels.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import List, Optional

import torch

__all__ = ["is_available", "require", "group_transform_op", "group_average_op", "token_transform_op",
           "vocab_transform_op", "vocab_average_op"]


# Read once, at import: the backend choice runs inside torch.compile'd regions,
# where dynamo cannot trace importlib; and triton reads TRITON_INTERPRET when it
# is imported, so a later change of the variable would not take effect anyway.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _installed_triton_version() -> tuple:
    """(major, minor) of the installed triton module, read without importing
    it (from the distribution that provides it: triton, pytorch-triton-rocm,
    ...); () if unknown."""
    try:
        from importlib.metadata import packages_distributions, version

        distribution = packages_distributions().get("triton", ["triton"])[0]
        return tuple(int(part) for part in version(distribution).split(".")[:2])
    except Exception:  # no metadata, or not a plain version
        return ()


# The kernels under the interpreter need Triton >= 3.3: 3.2 (torch 2.6's) has no
# tl.gather, and its interpreter aborts the process on tl.flip of integer tiles.
_INTERPRETER_TOO_OLD = _INTERPRETING and _TRITON_IMPORTABLE and () < _installed_triton_version() < (3, 3)


def _importable() -> bool:
    return _TRITON_IMPORTABLE


def _interpreting() -> bool:
    return _INTERPRETING


def is_available(device) -> bool:
    device = torch.device(device)
    if not _importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting() and not _INTERPRETER_TOO_OLD


def require(device) -> None:
    device = torch.device(device)
    if not _importable():
        raise RuntimeError("backend 'triton' needs the triton package, which is not installed (pip install triton)")
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "backend 'triton' runs on CUDA tensors; on CPU tensors only under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton). Use backend='cpp' on the CPU."
        )
    if device.type == "cpu" and _INTERPRETER_TOO_OLD:
        raise RuntimeError(
            f"backend 'triton' on CPU tensors needs the interpreter of triton >= 3.3; this is triton "
            f"{'.'.join(map(str, _installed_triton_version()))}, whose interpreter lacks tl.gather and aborts on these "
            "kernels. Use backend='cpp' on the CPU, or a newer triton."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend 'triton' has no kernels for device type {device.type!r}")


_ops = None


def _register():
    """The triton ops (transform, average, token transform, vocabulary transform,
    vocabulary average), defined on first use: importing triton and defining
    them takes about a second, which users of the other backends should not pay
    at import."""
    if _ops is not None:
        return _ops
    _define_ops()
    ops = torch.ops.equitune_ext
    return (ops.group_transform_triton.default, ops.group_average_triton.default, ops.token_transform_triton.default,
            ops.vocab_transform_triton.default, ops.vocab_average_triton.default)


@torch.compiler.assume_constant_result
def _define_ops() -> bool:
    """Defines and registers the triton ops. torch.compile runs this function
    as it is (assume_constant_result) instead of tracing into it, so that a
    process whose first Triton call is inside a compiled region works too
    (dynamo cannot trace the triton_op decorator)."""
    global _ops
    if _ops is not None:
        return True
    from ..ops import _inverse_tables, register_op_pair, register_token_transform_vmap
    from . import kernels

    @torch.library.triton_op("equitune_ext::group_transform_triton", mutates_args=())
    def group_transform_triton(
        x: torch.Tensor, elements: List[int], scale: float = 1.0, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return kernels.group_transform_triton(x, elements, scale, weights)

    @torch.library.triton_op("equitune_ext::group_average_triton", mutates_args=())
    def group_average_triton(
        y: torch.Tensor, elements: List[int], scale: float, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return kernels.group_average_triton(y, elements, scale, weights)

    from . import token_kernels

    @torch.library.triton_op("equitune_ext::token_transform_triton", mutates_args=())
    def token_transform_triton(ids: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
        return token_kernels.token_transform_triton(ids, perms)

    @torch.library.triton_op("equitune_ext::vocab_transform_triton", mutates_args=())
    def vocab_transform_triton(
        x: torch.Tensor, perms: torch.Tensor, scale: float, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return token_kernels.vocab_transform_triton(x, perms, scale, weights)

    @torch.library.triton_op("equitune_ext::vocab_average_triton", mutates_args=())
    def vocab_average_triton(
        y: torch.Tensor, perms: torch.Tensor, scale: float, weights: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return token_kernels.vocab_average_triton(y, perms, scale, weights)

    transform = torch.ops.equitune_ext.group_transform_triton.default
    average = torch.ops.equitune_ext.group_average_triton.default
    register_op_pair(transform, average)
    vocab_t = torch.ops.equitune_ext.vocab_transform_triton.default
    vocab_a = torch.ops.equitune_ext.vocab_average_triton.default
    register_op_pair(vocab_t, vocab_a, inverse=_inverse_tables)
    register_token_transform_vmap(torch.ops.equitune_ext.token_transform_triton.default)
    _ops = (transform, average, torch.ops.equitune_ext.token_transform_triton.default, vocab_t, vocab_a)
    return True


def _launch_directly(*tensors) -> bool:
    """Whether an eager call runs the launchers through a torch.autograd.Function
    (_eager_ops) instead of the registered triton ops. The custom-op layers
    (dispatcher into Python, aliasing check, dynamo guard), paid again from
    autograd's thread in the backward, cost more host time than the kernels at
    small sizes (benchmarks/bench_call_overhead.py). torch.compile and export,
    fake tensors and other subclasses, dispatch modes and functorch transforms
    keep the registered ops, which they need to see, and so do the batched
    tensors of torch._vmap_internals (gradcheck's batched checks), which have
    no storage."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(t is None or (type(t) in (torch.Tensor, torch.nn.Parameter)
                              and not torch._C._functorch.is_legacy_batchedtensor(t)) for t in tensors)
    )


_eager = None


def _eager_ops():
    """((image transform, image average, vocab transform, vocab average) as
    torch.autograd.Functions over the launchers, with ops.op_pair_autograd's
    autograd (the registered ops' own), (the four launchers)). The backward
    calls the dispatching functions below, so a double backward records its
    graph as usual."""
    global _eager
    if _eager is not None:
        return _eager
    from ..ops import _inverse, _inverse_tables, op_pair_autograd
    from . import kernels, token_kernels

    # eager=True: _launch_directly has just said so (the dispatching functions below)
    launchers = tuple(functools.partial(launcher, eager=True) for launcher in (
        kernels.group_transform_triton, kernels.group_average_triton,
        token_kernels.vocab_transform_triton, token_kernels.vocab_average_triton))

    def function(name, launch, setup_context, backward):
        def forward(ctx, t, group_arg, scale, weights):
            # ctx-style forward: a separate setup_context makes every call bind
            # its arguments through inspect.signature (about 25 us of host time).
            out = launch(t, group_arg, scale, weights)
            setup_context(ctx, (t, group_arg, scale, weights), out)
            return out

        return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    image_setup, image_transform_bwd, image_average_bwd = op_pair_autograd(group_transform_op, group_average_op, _inverse)
    vocab_setup, vocab_transform_bwd, vocab_average_bwd = op_pair_autograd(
        vocab_transform_op, vocab_average_op, _inverse_tables)
    functions = (
        function("GroupTransformTriton", launchers[0], image_setup, image_transform_bwd),
        function("GroupAverageTriton", launchers[1], image_setup, image_average_bwd),
        function("VocabTransformTriton", launchers[2], vocab_setup, vocab_transform_bwd),
        function("VocabAverageTriton", launchers[3], vocab_setup, vocab_average_bwd),
    )
    _eager = (functions, launchers)
    return _eager


def _run_eager(i: int, t: torch.Tensor, group_arg, scale: float, weights) -> torch.Tensor:
    """Eager op i (of _eager_ops) on plain tensors: through its autograd.Function
    when autograd records the call, else the launcher alone (inference, and the
    backward of a first-order gradient, which runs without grad mode): the
    Function's apply costs a few us of host time per call."""
    functions, launchers = _eager_ops()
    if torch.is_grad_enabled() and (t.requires_grad or (weights is not None and weights.requires_grad)):
        return functions[i].apply(t, group_arg, scale, weights)
    return launchers[i](t, group_arg, scale, weights)


def group_transform_op(x: torch.Tensor, elements: List[int], scale: float = 1.0, weights=None) -> torch.Tensor:
    if _launch_directly(x, weights):
        return _run_eager(0, x, elements, scale, weights)
    return _register()[0](x, elements, scale, weights)


def group_average_op(y: torch.Tensor, elements: List[int], scale: float, weights=None) -> torch.Tensor:
    if _launch_directly(y, weights):
        return _run_eager(1, y, elements, scale, weights)
    return _register()[1](y, elements, scale, weights)


def token_transform_op(ids: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    return _register()[2](ids, perms)


def vocab_transform_op(x: torch.Tensor, perms: torch.Tensor, scale: float = 1.0, weights=None) -> torch.Tensor:
    if _launch_directly(x, perms, weights):
        return _run_eager(2, x, perms, scale, weights)
    return _register()[3](x, perms, scale, weights)


def vocab_average_op(y: torch.Tensor, perms: torch.Tensor, scale: float, weights=None) -> torch.Tensor:
    if _launch_directly(y, perms, weights):
        return _run_eager(3, y, perms, scale, weights)
    return _register()[4](y, perms, scale, weights)
