"""Runs the benchmarks and writes their tables under benchmarks/results/.

    python -m benchmarks.run [--only image_ops]
"""
import argparse

import torch

from . import bench_equi_average, bench_equiconv, bench_image_ops, bench_onnx, bench_token_ops, bench_vmap, bench_volume

BENCHMARKS = {
    "image_ops": bench_image_ops.main,
    "equi_average": bench_equi_average.main,
    "equi_average_canonical": lambda argv: bench_equi_average.main(argv + ["--canonical"]),
    "equiconv": bench_equiconv.main,
    "token_ops": lambda argv: bench_token_ops.main([]),
    "vmap": bench_vmap.main,
    "onnx": lambda argv: bench_onnx.main([]),  # onnxruntime's CPU execution provider on any machine
    "volume": bench_volume.main,
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for name in args.only or BENCHMARKS:
        print(f"== {name} ({args.device})", flush=True)
        BENCHMARKS[name](["--device", args.device])


if __name__ == "__main__":
    main()
