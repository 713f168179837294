"""Measured choices behind backend="auto" on CUDA.

On CUDA "auto" takes the Triton kernels for forward-only calls (no gradient
will be asked of the input) whose input has at least CUDA_TRITON_FROM_BYTES[op]
bytes, and the CUDA C++ kernels otherwise (smaller calls, calls that will be
differentiated, ops not listed). Read off benchmarks/results/image_ops_cuda_*.md
(benchmarks/gpu_check.sh on a GPU machine; the record of each run, with the
numbers, is benchmarks/results/gpu_notes.md).

NVIDIA H200, 2026-11-28 (run 3), float32 [B, 64, 56, 56], c4 and d4:
  forward, B=256: Triton 1.5-1.9x faster than C++ for both ops and groups
      (transform input 205 MB; average input 822 MB for c4, 1.6 GB for d4);
  forward, B=32: C++ 1.0-1.5x faster (transform input 26 MB; average 103 /
      206 MB); Triton host-bound there (about 0.11 ms of host time per call);
  forward+backward, B=256: split (d4: Triton 1.5-1.6x faster; c4: C++ 1.07x /
      1.5x faster) and every Triton row at B=32 host-bound (0.9-1.2 ms).
The host-time fixes made since (eager calls skip the custom-op layers and
wrap_triton; benchmarks/bench_call_overhead.py) have not been timed on a GPU:
until they are, calls that need a gradient stay on C++.
"""
import torch

# op -> input bytes from which "auto" picks Triton on CUDA for forward-only calls
# (between the sizes measured above)
CUDA_TRITON_FROM_BYTES = {
    "group_transform": 64 << 20,
    "group_average": 512 << 20,
}


def cuda_auto_backend(op: str, t: torch.Tensor) -> str:
    threshold = CUDA_TRITON_FROM_BYTES.get(op)
    if threshold is None or (t.requires_grad and torch.is_grad_enabled()):
        return "cpp"
    return "triton" if t.numel() * t.element_size() >= threshold else "cpp"
