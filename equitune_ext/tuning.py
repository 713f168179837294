"""Measured choices behind backend="auto" on CUDA.

On CUDA "auto" takes the Triton kernels for calls whose input has at least
CUDA_TRITON_FROM_BYTES[op] bytes, and the CUDA C++ kernels below that and for
ops not listed: the Triton kernels move more bytes per second, the C++ ones
cost less host time per call, which is what small calls pay. Read off
benchmarks/results/image_ops_cuda_*.md and call_overhead_cuda.md
(benchmarks/gpu_check.sh on a GPU machine; the record of each run, with the
numbers, is benchmarks/README.md).

NVIDIA H200, 2026-11-28 (run 5), float32 [B, 64, 56, 56], c4 and d4:
  B=256 (transform input 205 MB; average input 822 MB for c4, 1.6 GB for d4):
      Triton faster than C++ in all eight cases, forward 1.5-2.0x,
      forward+backward 1.2-1.8x;
  B=32 (transform input 26 MB; average 103 / 206 MB): forward+backward C++
      2.0-3.8x faster (Triton host-bound: 0.47-0.68 ms per step, against
      0.14-0.26 ms); forward split (Triton faster for three of four, 2.4x
      slower for the c4 average), each Triton call spending 0.09-0.14 ms of
      host time (call_overhead_cuda.md).
"""
import torch

# op -> input bytes from which "auto" picks Triton on CUDA (between the sizes measured above)
CUDA_TRITON_FROM_BYTES = {
    "group_transform": 64 << 20,
    "group_average": 512 << 20,
}


def cuda_auto_backend(op: str, t: torch.Tensor) -> str:
    threshold = CUDA_TRITON_FROM_BYTES.get(op)
    return "triton" if threshold is not None and t.numel() * t.element_size() >= threshold else "cpp"
