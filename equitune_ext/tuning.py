"""Measured choices behind backend="auto" on CUDA.

Each entry names the faster of the CUDA C++ kernels ("cpp") and the Triton
kernels ("triton") for one op, read off benchmarks/results/ (produced by
benchmarks/gpu_check.sh on a GPU machine; the record of each run is
benchmarks/results/gpu_notes.md).

Measured on an NVIDIA H200 (2026-11-28, image_ops_cuda_*.md), float32
[32|256, 64, 56, 56], forward, c4 and d4:
  group_transform: CUDA C++ 0.08-0.81 ms, Triton 0.20-3.09 ms (2.4-3.8x slower
                   in every case) -> "cpp".
  group_average:   split: Triton faster for c4 at B=256 (0.35 vs 0.45 ms) and
                   d4 at B=32 (0.121 vs 0.125 ms), CUDA C++ faster for c4 at
                   B=32 (0.073 vs 0.148 ms) and d4 at B=256 (0.81 vs 0.90 ms);
                   summed over the four cases C++ is ahead (1.46 vs 1.51 ms) and
                   its backward (the transform) is much faster -> "cpp".
The Triton kernels measured there have since changed shape (compiled for
sm_90 offline: every global access a 16-byte vector, the average's loads no
longer serialized, the transform's autotuner also tries output tiles;
predicted <= 1.3x their floors, benchmarks/results/gpu_notes.md). No GPU has
timed them yet: revisit both entries after the next gpu_check.sh run.
"""

# op -> backend; source: benchmarks/results/image_ops_cuda_*.md
CUDA_AUTO_BACKEND = {
    "group_transform": "cpp",
    "group_average": "cpp",
}


def cuda_auto_backend(op: str) -> str:
    return CUDA_AUTO_BACKEND.get(op, "cpp")
