"""Compile the image-group Triton kernels for a GPU that is not here.

``triton.compile`` with a ``GPUTarget`` needs no GPU, only Triton's bundled
ptxas: this is how a machine without one sees what the NVIDIA compiler makes of
a kernel (registers, barriers, 16-byte loads and stores). Used by
``benchmarks/triton_compiled.py`` (a table of those counts per config) and by
the test that keeps the planar kernels' intended shape (16-byte accesses only,
every load of the average before its one barrier).

Not under the Triton interpreter: there ``@triton.jit`` functions are Python
functions and cannot be compiled.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Optional

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..groups import get_image_group
from . import kernels as K

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def compile_planar(op: str, group: str, plane=(56, 56), dtype=torch.float32, block: int = 32, num_warps: int = 4,
                   output_tiles: bool = False, capability: int = 90):
    """The compiled planar kernel of `op` ("transform" or "average") for a
    contiguous [*, *, H, W] tensor of `dtype`, as the launcher would call it (no
    scale, no λ-weights, 32-bit in-plane offsets) with one fixed tile config."""
    codes, H, W, Ho, Wo, x = _check(op, group, plane, dtype)
    constexprs = dict(sW=1, G=len(codes), ROW_ALIGN=K._row_align(x, H, W), WIDE_INDEX=False, HAS_WEIGHTS=False,
                      ACC_DTYPE=K._acc_dtype(x), BLOCK=block)
    if op == "transform":
        fn = K._group_transform_kernel
        constexprs.update(DEST_MAPS=K._pack_maps(codes, H, W, Ho, Wo, inverse=True),
                          SRC_MAPS=K._pack_maps(codes, H, W, Ho, Wo, inverse=False),
                          APPLY_SCALE=False, OUTPUT_TILES=bool(output_tiles))
    else:
        fn = K._group_average_kernel.fn  # the autotuner's kernel
        constexprs.update(MAPS=K._pack_maps(codes, H, W, Ho, Wo, inverse=False))
    return _compile(fn, constexprs, dtype, num_warps, capability)


def compile_channels_last(op: str, group: str, plane=(56, 56), dtype=torch.float32, block: int = 1024,
                          num_warps: int = 4, capability: int = 90):
    """The compiled channels_last kernel of `op` (flat over the output in
    [N, H, W, C] order), as the launcher would call it with one fixed config."""
    codes, H, W, Ho, Wo, x = _check(op, group, plane, dtype)
    constexprs = dict(G=len(codes), MAPS=K._pack_maps(codes, H, W, Ho, Wo, inverse=False), HAS_WEIGHTS=False,
                      ACC_DTYPE=K._acc_dtype(x), BLOCK=block)
    if op == "transform":
        fn = K._group_transform_channels_last_kernel.fn
        constexprs.update(APPLY_SCALE=False)
    else:
        fn = K._group_average_channels_last_kernel.fn
    return _compile(fn, constexprs, dtype, num_warps, capability)


def _check(op: str, group: str, plane, dtype):
    """codes, H, W, Ho, Wo and a meta tensor of the input for one compile."""
    if op not in ("transform", "average"):
        raise ValueError(f"op must be 'transform' or 'average', got {op!r}")
    if dtype not in _TRITON_TYPES:
        raise ValueError(f"dtype must be one of {sorted(map(str, _TRITON_TYPES))}, got {dtype}")
    H, W = plane
    image_group = get_image_group(group)
    if image_group.needs_square and H != W:
        raise ValueError(f"group {group!r} rotates by 90 degrees and needs a square plane, got {H}x{W}")
    return list(image_group.codes), H, W, H, W, torch.empty((1, 1, H, W), dtype=dtype, device="meta")


def _compile(fn, constexprs, dtype, num_warps: int, capability: int):
    elem = _TRITON_TYPES[dtype]

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name == "w_ptr":  # λ-weights: in the accumulation dtype
            return "*fp64" if dtype == torch.float64 else "*fp32"
        if name.endswith("_ptr"):
            return "*" + elem
        return "fp32" if name.startswith("scale") else "i32"

    signature = {name: arg_type(name) for name in fn.arg_names}
    # Pointers 16-byte aligned, as Triton assumes of fresh allocations.
    attrs = {(n,): [["tt.divisibility", 16]] for n, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def ptx_counts(ptx: str) -> Dict[str, int]:
    """Global loads and stores (all, and 16-byte vectors) and barriers in PTX."""
    loads = re.findall(r"ld\.global[.\w]*", ptx)
    stores = re.findall(r"st\.global[.\w]*", ptx)
    return {
        "ld.global": len(loads), "ld.global.v4": sum(".v4" in s for s in loads),
        "st.global": len(stores), "st.global.v4": sum(".v4" in s for s in stores),
        "bar.sync": len(re.findall(r"\bbar\.sync\b", ptx)),
    }


def _cuobjdump() -> Optional[str]:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def registers(compiled) -> Optional[int]:
    """Registers per thread of a compiled kernel (cuobjdump -res-usage; None
    where no cuobjdump is found)."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+)", out)
    return int(match.group(1)) if match else None
