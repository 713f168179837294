"""The combined kernel: which input taps the equi-tuned convolutions and
pooling read, as integer geometry planned once per configuration and input size.

A convolution reads x̃[S·o + D·a − P] (x̃: x extended by its padding mode) for
output o and tap a. Conjugated by a rotation/flip Γ(g), which maps coordinates
by an affine signed permutation u ↦ A u + b (``groups.source_map``), the term
Γ(g)⁻¹ C(Γ(g) x) reads, at output i, x̃[S·i + t(g, a)] with
t(g, a) = A(S·b' + D·a − P) + b (b' from Γ(g)⁻¹ on the output's shape),
provided A S A⁻¹ = S (equal strides on the axes a rotation swaps). Every term
thus samples the same stride-S grid, each at its own offsets t(g, ·), so their
average is ONE strided convolution of the explicitly padded x with the
combined kernel

    W_c[t(g, a) − t_min] += W[a] / |G|,

(k_eff + s − 1 taps per axis for stride s: 3x3 s2 → 4x4). When every element
lands on the same taps this is the group-averaged filter (the "fast" path);
only when the combined kernel would cost more than |G| convolutions (dilated
and strided at once) is the definition computed as written ("general").
W_c = W·M is one small matmul with the 0/(1/|G|) matrix M, so the weight's
gradient follows by construction.

Every padding mode commutes with flips and rotations (zeros, reflect,
replicate, circular are separable and symmetric), so padding x explicitly, as
far as the terms read, and convolving with padding 0 is exact for all of them.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .groups import INVERSE_CODES, TRANSPOSES, source_map

Pair = Tuple[int, int]


def _mat(A, u) -> Pair:
    return (A[0][0] * u[0] + A[0][1] * u[1], A[1][0] * u[0] + A[1][1] * u[1])


def _axis_range(values: List[int]) -> Tuple[int, int, int]:
    """(min, taps, dilation) of the dilated 1-d grid spanned by ``values``."""
    lo = min(values)
    step = functools.reduce(math.gcd, (v - lo for v in values), 0) or 1
    return lo, (max(values) - lo) // step + 1, step


class Plan:
    """The combined kernel of one configuration on one input size.

    taps[g][a] = t(g, a) - t_min (x's frame); kernel/dilation: the combined
    kernel's taps and dilation per axis; pads: (h_lo, h_hi, w_lo, w_hi) to pad
    x with (negative: crop) before a convolution with padding 0; windows:
    per element, (origin, kernel, dilation) of its own taps, for max pooling."""

    def __init__(self, taps, order: int, out_size: Pair, in_size: Pair, stride: Pair):
        self.order = order
        self.out_size = out_size
        flat = [t for per in taps for t in per]
        axes = [_axis_range([t[ax] for t in flat]) for ax in (0, 1)]
        self.kernel = (axes[0][1], axes[1][1])
        self.dilation = (axes[0][2], axes[1][2])
        lo = (axes[0][0], axes[1][0])
        pads = []
        for ax in (0, 1):  # padded length needed: S(N_out - 1) + dil (K - 1) + 1
            need = stride[ax] * (out_size[ax] - 1) + self.dilation[ax] * (self.kernel[ax] - 1) + 1
            pads += [-lo[ax], need - in_size[ax] + lo[ax]]
        self.pads = tuple(pads)
        # index of each (g, a) in the flattened combined kernel
        self.index = tuple(((t[0] - lo[0]) // self.dilation[0]) * self.kernel[1] + (t[1] - lo[1]) // self.dilation[1]
                           for t in flat)
        self.taps_per_element = len(taps[0])
        self.windows = []
        for per in taps:
            ax = [_axis_range([t[a] for t in per]) for a in (0, 1)]
            self.windows.append(((ax[0][0] - lo[0], ax[1][0] - lo[1]), (ax[0][1], ax[1][1]), (ax[0][2], ax[1][2])))
        self.trivial = len(set(frozenset(per) for per in taps)) == 1
        # every combined tap receives the same number of (element, tap) pairs
        self.uniform = len(set(self.index)) == self.cost and len({self.index.count(i) for i in self.index}) == 1
        self._matrices: Dict[Tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    @property
    def cost(self) -> int:
        """Taps of the combined kernel (its MACs per output, per channel pair)."""
        return self.kernel[0] * self.kernel[1]

    def matrix(self, like: torch.Tensor, fold: int = 1) -> torch.Tensor:
        """M [taps, K_h·K_w] with W_c = W.flatten(2) @ M; entries are multiples of
        1/|G| (exact in every float dtype). fold > 1: kron(I_fold, M), which
        maps ``fold`` filters side by side at once."""
        key = (like.device, like.dtype, fold)
        m = self._matrices.get(key)
        if m is None:
            m = torch.zeros(self.taps_per_element, self.cost, dtype=torch.float64)
            rows = torch.arange(self.taps_per_element).repeat(self.order)
            m.index_put_((rows, torch.tensor(self.index)), torch.full((len(self.index),), 1.0 / self.order,
                                                                      dtype=torch.float64), accumulate=True)
            m = torch.kron(torch.eye(fold, dtype=torch.float64), m).to(device=like.device, dtype=like.dtype)
            if not torch.compiler.is_compiling():
                self._matrices[key] = m
        return m

    def combine(self, weight: torch.Tensor) -> torch.Tensor:
        """W [O, I, k_h, k_w] -> W_c [O, I, K_h, K_w] (differentiable). One pass
        over W, where transforming W |G| times would cost more than the
        convolution itself. The matmul has a tiny inner size, where MKL is far
        from the memory bound: for a square M (the fast path) two filters per
        row run faster (measured: benchmarks/README.md, EquiConv)."""
        fold = 2 if self.cost == self.taps_per_element and (weight.shape[0] * weight.shape[1]) % 2 == 0 else 1
        flat = weight.reshape(-1, self.taps_per_element * fold)
        return (flat @ self.matrix(weight, fold)).view(*weight.shape[:2], *self.kernel)


# Cached per configuration and input size (and the plan keeps its matrix per
# device and dtype): building them costs Python time comparable to a small
# layer's convolution (measured: benchmarks/README.md, EquiConv).
@functools.lru_cache(maxsize=1024)
def combined_plan(codes: Tuple[int, ...], in_size: Pair, out_sizes: Tuple[Pair, Pair], kernel: Pair, stride: Pair,
                  dilation: Pair, pad_lo: Pair) -> Optional[Plan]:
    """The combined kernel of (1/|G|) Σ_g Γ(g)⁻¹ C(Γ(g) x) for a convolution-like
    C (reads x̃[S o + D a − P], o < out) on an input of ``in_size``;
    out_sizes[p]: C's output size on an input of shape in_size (p = 0) or its
    transpose (p = 1). None when the terms do not share x's stride grid
    (unequal strides on axes a rotation swaps, or outputs whose shapes differ)."""
    taps = []
    for code in codes:
        inv = INVERSE_CODES[code]
        y_shape = out_sizes[TRANSPOSES[code]]
        if (y_shape[::-1] if TRANSPOSES[inv] else y_shape) != out_sizes[0]:
            return None
        A, b = source_map(code, in_size[::-1] if TRANSPOSES[code] else in_size)
        A_inv, b_inv = source_map(inv, y_shape)
        # Linear part in i: A S A_inv must be x's own stride.
        cols = [_mat(A, (stride[0] * A_inv[0][j], stride[1] * A_inv[1][j])) for j in range(2)]
        if cols != [(stride[0], 0), (0, stride[1])]:
            return None
        taps.append([
            tuple(v + w for v, w in zip(_mat(A, (stride[0] * b_inv[0] + dilation[0] * a0 - pad_lo[0],
                                                 stride[1] * b_inv[1] + dilation[1] * a1 - pad_lo[1])), b))
            for a0 in range(kernel[0]) for a1 in range(kernel[1])
        ])
    return Plan(taps, len(codes), out_sizes[0], in_size, stride)


def path_of(plan: Optional[Plan], max_cost: float = math.inf) -> str:
    """"fast" where every element has the same taps (the plain module with the
    group-averaged filter), "combined" (one call with the combined kernel), or
    "general" (the |G|-batched definition) where there is no plan or its
    combined kernel costs more than max_cost taps."""
    if plan is None or plan.cost > max_cost:
        return "general"
    return "fast" if plan.trivial else "combined"


# -- the plans of nn.Conv2d, nn.ConvTranspose2d and the pooling layers -------
def conv_padding(conv: nn.Conv2d, axis: int) -> Pair:
    """(low, high) padding of spatial axis 0 (H) or 1 (W), as F.conv2d applies it."""
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":  # PyTorch puts the odd pixel of padding at the end
        total = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
        return total // 2, total - total // 2
    return conv.padding[axis], conv.padding[axis]


def _both_shapes(size: Pair, out_of) -> Optional[Tuple[Pair, Pair]]:
    """(out_of(size), out_of(size transposed)), None where there is no output."""
    outs = out_of(size), out_of(size[::-1])
    return None if min(outs[0]) <= 0 else outs


def conv_plan(conv: nn.Conv2d, size: Pair) -> Optional[Plan]:
    pads = (conv_padding(conv, 0), conv_padding(conv, 1))
    outs = _both_shapes(size, lambda shape: tuple(
        (n + sum(pads[ax]) - conv.dilation[ax] * (conv.kernel_size[ax] - 1) - 1) // conv.stride[ax] + 1
        for ax, n in enumerate(shape)))
    return outs and combined_plan(conv.group.codes, size, outs, tuple(conv.kernel_size), tuple(conv.stride),
                                  tuple(conv.dilation), (pads[0][0], pads[1][0]))


def transposed_size(conv: nn.ConvTranspose2d, size: Pair, output_padding: Pair) -> Pair:
    """The output size of ``conv`` on an input of ``size``."""
    return tuple((n - 1) * conv.stride[ax] - 2 * conv.padding[ax] + conv.dilation[ax] * (conv.kernel_size[ax] - 1)
                 + output_padding[ax] + 1 for ax, n in enumerate(size))


def transposed_plan(conv: nn.ConvTranspose2d, size: Pair, output_padding: Pair) -> Optional[Plan]:
    """Plan of the adjoint convolution C (output space -> input space)."""
    out = transposed_size(conv, size, output_padding)
    if min(out) <= 0:
        return None
    return combined_plan(conv.group.codes, out, (size, size[::-1]), tuple(conv.kernel_size), tuple(conv.stride),
                         tuple(conv.dilation), tuple(conv.padding))


def pool_plan(pool: nn.Module, size: Pair, dilation: Pair) -> Optional[Plan]:
    pair = nn.modules.utils._pair
    kernel, stride, pad = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)

    def out_of(shape):  # as ATen's pooling_output_shape
        outs = []
        for ax, n in enumerate(shape):
            out = (n + 2 * pad[ax] - dilation[ax] * (kernel[ax] - 1) - 1
                   + (stride[ax] - 1 if pool.ceil_mode else 0)) // stride[ax] + 1
            outs.append(out - 1 if pool.ceil_mode and (out - 1) * stride[ax] >= n + pad[ax] else out)
        return tuple(outs)

    outs = _both_shapes(size, out_of)
    return outs and combined_plan(pool.group.codes, size, outs, kernel, stride, dilation, pad)


# -- explicit padding ---------------------------------------------------------
def pad(x: torch.Tensor, pads, mode: str = "constant", value: float = 0.0) -> torch.Tensor:
    """F.pad with (h_lo, h_hi, w_lo, w_hi); negative entries crop, in every mode.
    Pads first, then crops: circular padding wraps around the whole input."""
    h_lo, h_hi, w_lo, w_hi = pads
    pos = (max(0, w_lo), max(0, w_hi), max(0, h_lo), max(0, h_hi))
    if any(pos):
        x = F.pad(x, pos, mode=mode, value=value) if mode == "constant" else F.pad(x, pos, mode=mode)
    if min(pads) < 0:
        H, W = x.shape[-2:]
        x = x[..., max(0, -h_lo):H - max(0, -h_hi), max(0, -w_lo):W - max(0, -w_hi)]
    return x


def split_padding(x: torch.Tensor, pads) -> Tuple[torch.Tensor, Pair]:
    """(x padded/cropped by what is not symmetric, the symmetric zero padding
    left to the convolution): F.conv2d pads without the copy F.pad makes
    (measured: benchmarks/README.md, EquiConv)."""
    native = (max(0, min(pads[0], pads[1])), max(0, min(pads[2], pads[3])))
    rest = (pads[0] - native[0], pads[1] - native[0], pads[2] - native[1], pads[3] - native[1])
    return (pad(x, rest) if any(rest) else x), native
