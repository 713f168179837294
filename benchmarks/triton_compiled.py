"""What the NVIDIA compiler makes of the image-group Triton kernels, without a GPU.

Compiles every autotuner config of group_transform / group_average (planar
and channels_last kernels) for one GPU architecture (default sm_90, the H200
of benchmarks/results/gpu_notes.md) on a float32 plane and counts, per
kernel: registers per thread (they bound how many programs an SM holds, hence
the loads in flight), global loads and stores (all, and 16-byte vectors) and
barriers. No timing: a check of the kernels' shape
that any machine can run, read beside the GPU timings.

    python -m benchmarks.triton_compiled [--plane 56 56] [--capability 90]
"""
from __future__ import annotations

import argparse

from equitune_ext.triton import kernels as K
from equitune_ext.triton.offline import compile_channels_last, compile_planar, ptx_counts, registers

from .common import machine, markdown_table, write_results


def run(plane, capability: int, groups=("c4", "d4")):
    rows = []

    def add(group, op, strategy, config, compiled):
        rows.append({"group": group, "op": op, "strategy": strategy, "block": config.kwargs["BLOCK"],
                     "warps": config.num_warps, "registers": registers(compiled), **ptx_counts(compiled.asm["ptx"])})

    for group in groups:
        for op, configs in (("transform", K._TRANSFORM_CONFIGS), ("average", K._TILE_CONFIGS)):
            for config in configs:
                output_tiles = config.kwargs.get("OUTPUT_TILES", False)
                strategy = "" if op == "average" else ("output tiles" if output_tiles else "input tiles")
                add(group, op, strategy, config, compile_planar(
                    op, group, plane, block=config.kwargs["BLOCK"], num_warps=config.num_warps,
                    output_tiles=output_tiles, capability=capability))
            for config in K._FLAT_CONFIGS:  # channels_last: flat over [N, H, W, C]
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
