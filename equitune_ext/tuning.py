"""Measured choices behind backend="auto" on CUDA.

Each entry names the faster of the CUDA C++ kernels ("cpp") and the Triton
kernels ("triton") for one op, read off benchmarks/results/ (run
benchmarks/gpu_check.sh on a GPU machine and update this table from its
output). Until a GPU run has been recorded, the CUDA C++ kernels are preferred.
"""

# op -> backend; source: benchmarks/results/ (see the README's results section)
CUDA_AUTO_BACKEND = {
    "group_transform": "cpp",
    "group_average": "cpp",
}


def cuda_auto_backend(op: str) -> str:
    return CUDA_AUTO_BACKEND.get(op, "cpp")
