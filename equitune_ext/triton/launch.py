"""What every Triton kernel family here shares: launching through wrap_triton,
the scale and λ-weight arguments, the kernels' dtypes and the autotuner switch."""
from __future__ import annotations

import contextlib
import math
import os
import struct

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import INTERPRETING

# EQUITUNE_TRITON_AUTOTUNE=0 keeps only each autotuner's first config (read at
# import): the kernels still launch through the autotuner, but nothing is timed
# and each kernel variant compiles once. For test runs on a GPU, where timing
# four transform configs for every shape, dtype and group costs minutes of
# compiling (benchmarks/gpu_check.sh sets it for its tests, not its timings).
_AUTOTUNE = os.environ.get("EQUITUNE_TRITON_AUTOTUNE", "1") != "0"


def autotune(configs, key):
    """triton.autotune over configs, tuned per value of the arguments named in
    key. Under the interpreter nothing can be timed: the kernel as it is, and
    its launcher passes one fixed config."""
    if INTERPRETING:
        return lambda fn: fn
    return triton.autotune(configs=configs if _AUTOTUNE else configs[:1], key=key)


def launch(kernel, grid, *args, **meta) -> None:
    """kernel[grid](*args, **meta) on the device of the first argument (Triton
    launches on the current one), through wrap_triton so that torch.compile
    and export see the kernel."""
    t = args[0]
    other_device = t.is_cuda and not is_fake(t) and t.device.index != torch.cuda.current_device()
    with torch.cuda.device(t.device) if other_device else contextlib.nullcontext():
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


def acc_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def as_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """Triton has no complex or 1-bit-addressed bool loads: move those as raw bits."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype == torch.complex64:
        return t.view(torch.int64)
    if t.dtype == torch.complex128:
        raise TypeError("group_transform: the triton backend does not support complex128; use backend='cpp'")
    return t


def weights_arg(weights, t: torch.Tensor) -> torch.Tensor:
    """The kernels' weights argument: contiguous [G, B] in t's accumulation
    dtype, or an empty tensor (never read) for unweighted calls."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.empty(0, dtype=dtype, device=t.device) if weights is None else weights.to(dtype).contiguous()


def split_scale(scale: float):
    """(hi, lo) fp32 parts of a float scale; see scale_factor."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    lo = struct.unpack("f", struct.pack("f", scale - hi))[0]
    # A zero lo takes hi's sign: -0.0 + 0.0 is +0.0, so scale -0.0 would lose its sign.
    return hi, (math.copysign(0.0, hi) if lo == 0.0 else lo)


@triton.jit
def scale_factor(scale_hi, scale_lo, ACC_DTYPE: tl.constexpr):
    """The op's scale in the accumulation dtype. Triton passes Python floats as
    fp32, so the launcher splits scale into hi = fp32(scale) and lo = fp32(scale - hi):
    their sum carries ~48 bits, enough for float64 (e.g. 1/3 for |G| = 3)."""
    return tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)


@triton.jit
def transform_scaled(v, w_ptr, g, B, b, scale_hi, scale_lo,
                     APPLY_SCALE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Values v of output block (g, b) of a transform times scale (1.0 unless
    APPLY_SCALE) and the λ-weight of the block (none unless HAS_WEIGHTS), in v's dtype."""
    if APPLY_SCALE or HAS_WEIGHTS:
        factor = scale_factor(scale_hi, scale_lo, ACC_DTYPE)
        if HAS_WEIGHTS:
            factor = factor * tl.load(w_ptr + g * B + b).to(ACC_DTYPE)
        v = (v.to(ACC_DTYPE) * factor).to(v.dtype)
    return v
