"""Measured choices behind backend="auto" on CUDA.

On CUDA "auto" takes the Triton kernels for calls whose input has at least
CUDA_TRITON_FROM_BYTES[op] bytes and the CUDA C++ kernels below that (and for
ops not listed): the Triton kernels move more bytes per second, the C++ ones
cost less host time per call, which is what small calls pay. The thresholds
are read off benchmarks/results/image_ops_cuda_*.md and call_overhead_cuda.md
(benchmarks/gpu_check.sh on a GPU machine; the record of each run, with the
numbers, is benchmarks/results/gpu_notes.md).

NVIDIA H200, 2026-11-28 (run 3), float32 [B, 64, 56, 56], forward:
  B=256: Triton 1.5-1.9x faster than C++ for both ops and both groups
         (transform input 205 MB; average input 822 MB for c4, 1.6 GB for d4);
  B=32:  C++ 1.0-1.5x faster (transform input 26 MB; average 103 / 206 MB),
         Triton then host-bound (0.11 ms per call of Python before the launch
         fixes of run 5).
"""

# op -> input bytes from which "auto" picks Triton on CUDA (between the sizes measured above)
CUDA_TRITON_FROM_BYTES = {
    "group_transform": 64 << 20,
    "group_average": 512 << 20,
}


def cuda_auto_backend(op: str, input_bytes: int) -> str:
    threshold = CUDA_TRITON_FROM_BYTES.get(op)
    return "triton" if threshold is not None and input_bytes >= threshold else "cpp"
