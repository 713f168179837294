"""Triton backend: the ops of contract.py as ``equitune_ext::*_triton``,
defined with ``torch.library.triton_op`` (so torch.compile traces into the
kernels) in image.py (group_transform, group_average; kernels in image_planar.py
and image_channels_last.py), image_rows.py (the per-row ops), volume.py (the
volume ops) and token.py (token_transform, vocab_transform, vocab_average), with the contract's
autograd and vmap; launch.py holds what their launchers share.

Triton runs on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how CI tests
these kernels.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["is_available", "require", "ops"]


# Read once, at import: the backend choice runs inside torch.compile'd regions,
# where dynamo cannot trace importlib; and triton reads TRITON_INTERPRET when it
# is imported, so a later change of the variable would not take effect anyway.
# The kernel modules read INTERPRETING from here too (this module never imports
# triton itself: ops() does, through them, when a Triton op first runs).
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
_INTERPRETER_TOO_OLD = INTERPRETING and _TRITON_IMPORTABLE and () < _installed_triton_version() < (3, 3)


def is_available(device) -> bool:
    device = torch.device(device)
    if not _TRITON_IMPORTABLE:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETING and not _INTERPRETER_TOO_OLD


def require(device) -> None:
    """Raises a RuntimeError saying why backend='triton' cannot run on device."""
    device = torch.device(device)
    if not _TRITON_IMPORTABLE:
        raise RuntimeError("backend 'triton' needs the triton package, which is not installed (pip install triton)")
    if device.type == "cpu" and not INTERPRETING:
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


def ops():
    """The Triton backend's ops (contract.BackendOps), defined on first use:
    importing triton and defining them takes about a second, which users of
    the other backends should not pay at import."""
    _define_ops()
    return _ops


@torch.compiler.assume_constant_result
def _define_ops() -> bool:
    """Imports the kernels (each module defines its triton_ops) and registers
    the contract's autograd and vmap on them. torch.compile runs this function
    as it is (assume_constant_result) instead of tracing into it, so that a
    process whose first Triton call is inside a compiled region works too
    (dynamo cannot trace the triton_op decorator)."""
    global _ops
    if _ops is None:
        from ..contract import backend_ops
        from . import image, image_rows, token, volume  # noqa: F401  (define the ops)

        _ops = backend_ops(torch.ops.equitune_ext, "_triton")
    return True
