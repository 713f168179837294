"""The image ops group_transform / group_average on Triton, with the C++
kernels' semantics (see equitune_ext/contract.py):

    transform: out[g*B + b] = scale * Γ(elements[g]) x[b]
    average:   out[b]       = scale * Σ_g Γ(elements[g]) y[g*B + b]

A contiguous output takes the planar kernels (image_planar.py: square tiles,
16-byte accesses), a channels_last one the flat kernels (image_channels_last.py).
Neither re-derives the index maps: both get each element's signed permutation
from the C++ header (csrc/index.h, through _C.signed_perm), so all backends
move pixels by one formula. The per-row ops are in image_rows.py.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton

from ..contract import as_planes, check_image_op, new_output, wants_channels_last
from .image_channels_last import launch_channels_last
from .image_planar import launch_planar
from .launch import acc_dtype, as_kernel_dtype, weights_arg


def launch_image_op(t: torch.Tensor, elements: List[int], scale: float, weights, is_average: bool,
                    transform_config: Optional[triton.Config] = None) -> torch.Tensor:
    """Checks, allocates the output and launches the planar or the channels_last
    kernel of the transform or the average. transform_config: see launch_planar."""
    check_image_op(t, elements, scale, weights, is_average, "group_average" if is_average else "group_transform")
    G = len(elements)
    B = t.shape[0] // G if is_average else t.shape[0]
    out = new_output(t, B if is_average else B * G)
    if out.numel() == 0:
        return out
    args = (as_kernel_dtype(as_planes(t)), as_kernel_dtype(as_planes(out)), weights_arg(weights, t), B, elements, scale,
            is_average)
    # The arguments every image kernel takes.
    meta = dict(G=G, HAS_WEIGHTS=weights is not None, ACC_DTYPE=acc_dtype(t))
    if not is_average:
        meta["APPLY_SCALE"] = scale != 1.0
    if wants_channels_last(t):
        launch_channels_last(*args, meta)
    else:
        launch_planar(*args, meta, transform_config)
    return out


@torch.library.triton_op("equitune_ext::group_transform_triton", mutates_args=())
def group_transform_triton(x: torch.Tensor, elements: List[int], scale: float = 1.0,
                           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launch_image_op(x, elements, scale, weights, is_average=False)


@torch.library.triton_op("equitune_ext::group_average_triton", mutates_args=())
def group_average_triton(y: torch.Tensor, elements: List[int], scale: float,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launch_image_op(y, elements, scale, weights, is_average=True)
