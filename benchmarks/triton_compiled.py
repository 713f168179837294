"""What the NVIDIA compiler makes of the image-group Triton kernels, without a GPU.

Compiles every autotuner config of group_transform / group_average (planar
and channels_last kernels) for one GPU architecture (default sm_90, the H200
of benchmarks/README.md) on a float32 plane and counts, per
kernel: registers per thread (they bound how many programs an SM holds, hence
the loads in flight), global loads and stores (all, and 16-byte vectors) and
barriers. No timing: a check of the kernels' shape
that any machine can run, read beside the GPU timings.

    python -m benchmarks.triton_compiled [--plane 56 56] [--capability 90]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from equitune_ext.groups import get_image_group
from equitune_ext.triton import image_channels_last as CL, image_planar as P
from equitune_ext.triton.launch import acc_dtype

from .common import machine, markdown_table, write_results

# ``triton.compile`` with a ``GPUTarget`` needs no GPU, only Triton's bundled
# ptxas (not under the interpreter, where @triton.jit functions are Python).
# The test that keeps the planar kernels' intended shape (16-byte accesses
# only, every load of the average before its one barrier) uses these too.

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def compile_planar(op: str, group: str, plane=(56, 56), dtype=torch.float32, block: int = 32, num_warps: int = 4,
                   output_tiles: bool = False, capability: int = 90):
    """The compiled planar kernel of `op` ("transform" or "average") for a
    contiguous [*, *, H, W] tensor of `dtype`, as the launcher would call it (no
    scale, no λ-weights, 32-bit in-plane offsets) with one fixed tile config."""
    codes, H, W, Ho, Wo, x = _check(op, group, plane, dtype)
    constexprs = dict(sW=1, G=len(codes), ROW_ALIGN=P._row_align(x, H, W), WIDE_INDEX=False, HAS_WEIGHTS=False,
                      ACC_DTYPE=acc_dtype(x), BLOCK=block)
    if op == "transform":
        fn = P._group_transform_kernel
        constexprs.update(DEST_MAPS=P.pack_maps(codes, inverse=True),
                          SRC_MAPS=P.pack_maps(codes, inverse=False),
                          APPLY_SCALE=False, OUTPUT_TILES=bool(output_tiles))
    else:
        fn = P._group_average_kernel.fn  # the autotuner's kernel
        constexprs.update(MAPS=P.pack_maps(codes, inverse=False))
    return _compile(fn, constexprs, dtype, num_warps, capability)


def compile_channels_last(op: str, group: str, plane=(56, 56), dtype=torch.float32, block: int = 1024,
                          num_warps: int = 4, capability: int = 90):
    """The compiled channels_last kernel of `op` (flat over the output in
    [N, H, W, C] order), as the launcher would call it with one fixed config."""
    codes, H, W, Ho, Wo, x = _check(op, group, plane, dtype)
    constexprs = dict(G=len(codes), MAPS=P.pack_maps(codes, inverse=False), HAS_WEIGHTS=False,
                      ACC_DTYPE=acc_dtype(x), BLOCK=block)
    if op == "transform":
        fn = CL._group_transform_channels_last_kernel.fn
        constexprs.update(APPLY_SCALE=False)
    else:
        fn = CL._group_average_channels_last_kernel.fn
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


def run(plane, capability: int, groups=("c4", "d4")):
    rows = []

    def add(group, op, strategy, config, compiled):
        rows.append({"group": group, "op": op, "strategy": strategy, "block": config.kwargs["BLOCK"],
                     "warps": config.num_warps, "registers": registers(compiled), **ptx_counts(compiled.asm["ptx"])})

    for group in groups:
        for op, configs in (("transform", P._TRANSFORM_CONFIGS), ("average", P._TILE_CONFIGS)):
            for config in configs:
                output_tiles = config.kwargs.get("OUTPUT_TILES", False)
                strategy = "" if op == "average" else ("output tiles" if output_tiles else "input tiles")
                add(group, op, strategy, config, compile_planar(
                    op, group, plane, block=config.kwargs["BLOCK"], num_warps=config.num_warps,
                    output_tiles=output_tiles, capability=capability))
            for config in CL.FLAT_CONFIGS:  # channels_last: flat over [N, H, W, C]
                add(group, op, "channels_last", config, compile_channels_last(
                    op, group, plane, block=config.kwargs["BLOCK"], num_warps=config.num_warps, capability=capability))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plane", type=int, nargs=2, default=[56, 56])
    p.add_argument("--capability", type=int, default=90, help="compute capability x 10 (90: sm_90, H100/H200)")
    args = p.parse_args(argv)
    meta = machine()
    rows = run(tuple(args.plane), args.capability)
    md = (f"# Image-group Triton kernels compiled for sm_{args.capability}, float32 {args.plane[0]}x{args.plane[1]} planes\n\n"
          f"Compiled on: {meta['cpu']} (no GPU needed), triton {meta['triton']}. `python -m benchmarks.triton_compiled`.\n"
          "Counts are per program (one tile; channels_last: one block of the flat output) in the PTX, over\n"
          "every branch of the kernel (the output-tile transform has one branch per element and runs one);\n"
          "registers per thread from cuobjdump.\n\n"
          + markdown_table(rows, list(rows[0])))
    print(md)
    write_results(f"triton_compiled_sm{args.capability}", rows, meta, md)
    return rows


if __name__ == "__main__":
    main()
