"""Measured choices behind backend="auto" on CUDA.

On CUDA "auto" takes the Triton kernels for calls whose input has at least
CUDA_TRITON_FROM_BYTES[op] bytes, and the CUDA C++ kernels below that and for
ops not listed: the Triton kernels move more bytes per second, the C++ ones
cost less host time per call, which is what small calls pay. The thresholds
lie between the sizes timed on an H200 (benchmarks/README.md, "Image ops on
GPU" and "Host time per call"; rerun with benchmarks/gpu_check.sh).
"""
import torch

# op -> input bytes from which "auto" picks Triton on CUDA
CUDA_TRITON_FROM_BYTES = {
    "group_transform": 64 << 20,
    "group_average": 512 << 20,
}


def cuda_auto_backend(op: str, t: torch.Tensor) -> str:
    threshold = CUDA_TRITON_FROM_BYTES.get(op)
    return "triton" if threshold is not None and t.numel() * t.element_size() >= threshold else "cpp"
