"""Equi-tuned convolutions and pooling: ``EquiConv`` (``nn.Conv2d``),
``EquiConvTranspose`` (``nn.ConvTranspose2d``), ``EquiMaxPool2d`` and
``EquiAvgPool2d``, and ``convert_convs``, which puts them in a model.

    M_G(x) = (1/|G|) Σ_g Γ(g)⁻¹ M(Γ(g) x)

is G-equivariant whatever M's weights are.

One convolution for every configuration (the combined kernel). A convolution
reads x̃[S·o + D·a − P] (x̃: x extended by its padding mode) for output o and
tap a. Conjugated by a rotation/flip Γ(g), which maps coordinates by an affine
signed permutation u ↦ A u + b, the term Γ(g)⁻¹ C(Γ(g) x) reads, at output i,
x̃[S·i + t(g, a)] with t(g, a) = A(S·b' + D·a − P) + b (b' from Γ(g)⁻¹ on the
output's shape), provided A S A⁻¹ = S (equal strides on the axes a rotation
swaps). Every term thus samples the same stride-S grid, each at its own
offsets t(g, ·), so their average is ONE strided convolution of the explicitly
padded x with the combined kernel

    W_c[t(g, a) − t_min] += W[a] / |G|,

(k_eff + s − 1 taps per axis for stride s: 3x3 s2 → 4x4). When every element
lands on the same taps this is the group-averaged filter (the "fast" path);
only when the combined kernel would cost more than |G| convolutions (dilated
and strided at once) is the definition computed as written ("general": the
fused ops around one batched convolution). The tap table t is integer
geometry computed once per configuration and input size (``_plan``, cached);
W_c = W·M is one small matmul with the 0/(1/|G|) matrix M, so the weight's
gradient follows by construction.

Every padding mode commutes with flips and rotations (zeros, reflect,
replicate, circular are separable and symmetric), so padding x explicitly, as
far as the terms read, and convolving with padding 0 is exact for all of them
(zero padding: its symmetric part is left to F.conv2d). A 1x1 kernel has
W_c = W ⊗ s, so its combined path averages x over s first (avg_pool2d), then
runs the 1x1 convolution. A transposed convolution is the adjoint of a
convolution C, and (1/|G|) Σ Γ⁻¹ C* Γ = ((1/|G|) Σ Γ⁻¹ C Γ)*: one transposed
convolution with the combined kernel of C. Pooling: max pooling averages the
maxima over each element's window (one stride-1 max_pool2d and an avg_pool2d
when the windows fill a stride block, as c4/d4 at stride 2 do), average
pooling is the combined kernel as a depthwise convolution.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .groups import INVERSE_CODES, TRANSPOSES, ImageGroup, get_image_group, source_map
from .ops import group_average, group_transform

__all__ = ["EquiConv", "EquiConvTranspose", "EquiMaxPool2d", "EquiAvgPool2d", "convert_convs", "equivariance_report",
           "flip_commutes"]

logger = logging.getLogger(__name__)

Pair = Tuple[int, int]


def flip_commutes(size: int, pad_lo: int, pad_hi: int, kernel: int, dilation: int, stride: int) -> bool:
    """Whether a 1-d convolution along an axis commutes with flipping that axis."""
    return pad_lo == pad_hi and (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) % stride == 0


# -- geometry -----------------------------------------------------------------
def _mat(A, u) -> Pair:
    return (A[0][0] * u[0] + A[0][1] * u[1], A[1][0] * u[0] + A[1][1] * u[1])


def _axis_range(values: List[int]) -> Tuple[int, int, int]:
    """(min, taps, dilation) of the dilated 1-d grid spanned by ``values``."""
    lo = min(values)
    step = functools.reduce(math.gcd, (v - lo for v in values), 0) or 1
    return lo, (max(values) - lo) // step + 1, step


class _Plan:
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
        self._matrices: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

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
        """W [O, I, k_h, k_w] -> W_c [O, I, K_h, K_w] (differentiable). The
        matmul has a tiny inner size, where MKL is far from the memory bound:
        for a square M (the fast path) two filters per row run 1.9x faster
        (fwd + bwd, [512, 512, 3, 3], d4, 1 CPU thread: 6.6 vs 13.1 ms; no gain
        for the 9 -> 16 taps of a 3x3 stride-2 kernel, and 4 per row is slower)."""
        fold = 2 if self.cost == self.taps_per_element and (weight.shape[0] * weight.shape[1]) % 2 == 0 else 1
        flat = weight.reshape(-1, self.taps_per_element * fold)
        return (flat @ self.matrix(weight, fold)).view(*weight.shape[:2], *self.kernel)


# Cached per configuration and input size: building the 7x7 stride-2 d4 plan
# takes 0.5 ms of Python, a cached look-up 7 us (and the plan keeps its matrix
# per device and dtype: 2 us instead of ~0.1-10 ms to build it), against a
# ResNet-18 layer's 1-20 ms.
@functools.lru_cache(maxsize=1024)
def _plan(codes: Tuple[int, ...], in_size: Pair, out_sizes: Tuple[Pair, Pair], kernel: Pair, stride: Pair,
          dilation: Pair, pad_lo: Pair) -> Optional[_Plan]:
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
    return _Plan(taps, len(codes), out_sizes[0], in_size, stride)


def _pad(x: torch.Tensor, pads, mode: str = "constant", value: float = 0.0) -> torch.Tensor:
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


def _split_padding(x: torch.Tensor, pads) -> Tuple[torch.Tensor, Pair]:
    """(x padded/cropped by what is not symmetric, the symmetric zero padding
    left to the convolution): F.conv2d pads without the copy F.pad makes
    (3x3 s2 64→128 on [16, 64, 56, 56], fwd + bwd: 8% of the combined path)."""
    native = (max(0, min(pads[0], pads[1])), max(0, min(pads[2], pads[3])))
    rest = (pads[0] - native[0], pads[1] - native[0], pads[2] - native[1], pads[3] - native[1])
    return (_pad(x, rest) if any(rest) else x), native


def _conv_out(size: int, lo: int, hi: int, kernel: int, dilation: int, stride: int) -> int:
    return (size + lo + hi - dilation * (kernel - 1) - 1) // stride + 1


def _pool_out(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Output size of max/avg pooling, as ATen's pooling_output_shape computes it."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _both_shapes(size: Pair, out_of) -> Tuple[Pair, Pair]:
    """(out_of(size), out_of(size transposed)): out_of maps an input shape to an output shape."""
    return out_of(size), out_of(size[::-1])


class _EquiMixin:
    """What the equi-tuned modules share: the group, ``last_path``, input checks."""

    group: ImageGroup
    last_path: Optional[str]
    _kind = "module"

    def _init_group(self, group) -> None:
        self.group = get_image_group(group)
        self.last_path = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group.name!r}"

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} expects [N, C, H, W] or [C, H, W] input, got shape {tuple(x.shape)}")
        if self.group.needs_square and x.shape[-1] != x.shape[-2]:
            raise ValueError(f"{name} with group {self.group.name!r} rotates by 90 degrees and needs square inputs, "
                             f"got H={x.shape[-2]}, W={x.shape[-1]}")

    def _record(self, path: str, x: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.last_path = path
            logger.debug("%s %s: %s path on input %s", type(self).__name__, self.group.name, path, tuple(x.shape))

    def _general(self, y: torch.Tensor) -> torch.Tensor:
        """group_average of the outputs on the transformed inputs (the definition)."""
        if self.group.needs_square and y.shape[-1] != y.shape[-2]:
            raise ValueError(
                f"{type(self).__name__} with group {self.group.name!r}: the {self._kind} of a square input gave a "
                f"non-square output {tuple(y.shape[-2:])} (non-square kernel, stride or padding), which 90-degree "
                "rotations cannot average")
        return group_average(y, self.group)

    @classmethod
    def _from_module(cls, module: nn.Module, base: type, group, config, *, params: bool):
        """cls(*config(module), group=group) holding module's Parameters (params=True)."""
        if not isinstance(module, base):
            raise TypeError(f"{cls.__name__}.from_{'conv' if params else 'pool'} expects an nn.{base.__name__}, "
                            f"got {type(module).__name__}")
        what = "the convolution" if params else "the pooling layer"
        _check_replaceable(module, f"{cls.__name__}.from_{'conv' if params else 'pool'}: {what}", base)
        args = config(module)
        if not params:
            new = cls(*args, group=group)
        else:
            # Built on the meta device (nothing allocated), then given the module's Parameters;
            # a subclass is built on its device, since its __init__ may make buffers.
            new = cls(*args, device="meta" if cls in (EquiConv, EquiConvTranspose) else module.weight.device,
                      dtype=module.weight.dtype, group=group)
            new.weight = module.weight
            new.bias = module.bias
        new.train(module.training)
        return new


class EquiConv(_EquiMixin, nn.Conv2d):
    """``nn.Conv2d`` made G-equivariant by equi-tuning; same parameters,
    attributes and ``state_dict`` keys (``weight`` and ``bias`` hold the
    unconstrained, e.g. pretrained, weights), so checkpoints load either way.

    ``last_path`` says which path the latest (eager) call took: "fast" (one
    convolution with the group-averaged filter), "combined" (one convolution
    with the combined kernel, see the module docstring) or "general" (the
    |G|-batched definition); the choice is also logged at DEBUG level.
    """

    _kind = "convolution"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[str, int, Tuple[int, int]] = 0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, group: Union[str, ImageGroup] = "c4"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self._init_group(group)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group: Union[str, ImageGroup] = "c4") -> "EquiConv":
        """An EquiConv with ``conv``'s configuration that holds ``conv``'s own
        ``weight`` and ``bias`` Parameters, not copies (as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does): an optimizer made
        before the conversion still trains the model, weights tied between
        modules stay tied, a frozen convolution stays frozen, and no memory is
        allocated. ``copy.deepcopy(conv)`` first for weights of its own."""
        return cls._from_module(conv, nn.Conv2d, group, lambda c: (
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
            c.bias is not None, c.padding_mode), params=True)

    # -- which path ---------------------------------------------------------
    def _axis_padding(self, axis: int, size: int = 0) -> Tuple[int, int]:
        """(low, high) padding of spatial axis 0 (H) or 1 (W), as F.conv2d applies it."""
        if self.padding == "valid":
            return 0, 0
        if self.padding == "same":  # PyTorch puts the odd pixel of padding at the end
            total = self.dilation[axis] * (self.kernel_size[axis] - 1)
            return total // 2, total - total // 2
        return self.padding[axis], self.padding[axis]

    def _axis_commutes(self, axis: int, size: int) -> bool:
        lo, hi = self._axis_padding(axis, size)
        return flip_commutes(size, lo, hi, self.kernel_size[axis], self.dilation[axis], self.stride[axis])

    def fast_path_applies(self, height: int, width: int) -> bool:
        """Whether the convolution commutes with every element of the group on an H x W input."""
        codes = self.group.codes
        # rot180 (2) reverses both axes, vflip (6) the rows, hflip (4) the columns;
        # odd codes swap the axes, which involves both.
        needs_h = any(c in (2, 6) or c & 1 for c in codes)
        needs_w = any(c in (2, 4) or c & 1 for c in codes)
        if needs_h and not self._axis_commutes(0, height):
            return False
        if needs_w and not self._axis_commutes(1, width):
            return False
        if self.group.needs_square:  # rotations swap the axes: both must be configured alike
            same = (self.kernel_size[0] == self.kernel_size[1] and self.stride[0] == self.stride[1]
                    and self.dilation[0] == self.dilation[1]
                    and self._axis_padding(0, height) == self._axis_padding(1, width))
            if not same:
                return False
        return True

    def plan(self, height: int, width: int) -> Optional[_Plan]:
        """The combined kernel's plan on an H x W input (None: the terms do not
        share one stride grid, or the convolution has no output there)."""
        pads = (self._axis_padding(0), self._axis_padding(1))

        def out_of(shape):
            return tuple(_conv_out(n, *pads[ax], self.kernel_size[ax], self.dilation[ax], self.stride[ax])
                         for ax, n in enumerate(shape))

        outs = _both_shapes((height, width), out_of)
        if min(outs[0]) <= 0:
            return None
        return _plan(self.group.codes, (height, width), outs, tuple(self.kernel_size), tuple(self.stride),
                     tuple(self.dilation), (pads[0][0], pads[1][0]))

    def choose_path(self, height: int, width: int) -> Tuple[str, Optional[_Plan]]:
        """("fast" | "combined" | "general", plan) on an H x W input: "fast" where
        every element has the same taps (the convolution commutes with the
        group: ``fast_path_applies``), else "combined" unless its kernel costs
        more than the |G| convolutions of the definition."""
        plan = self.plan(height, width)
        path = _path(plan, self.group.order * self.kernel_size[0] * self.kernel_size[1])
        return path, (None if path == "general" else plan)

    def averaged_weight(self) -> torch.Tensor:
        """W̄ = (1/|G|) Σ_g Γ(g) W over the filters' spatial dims (fused ops).
        The fast path computes it as W·M instead: one pass over W, where the
        |G| copies here cost 7x the convolution itself on [4, 512, 7, 7]
        (fwd + bwd, 3x3 512→512, d4, CPU; benchmarks/bench_equiconv.py's ResNet)."""
        return group_transform(self.weight.unsqueeze(0), self.group).mean(0)

    # -- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return _unbatched(self._forward_batch, x)

    def _forward_batch(self, x: torch.Tensor) -> torch.Tensor:
        path, plan = self.choose_path(x.shape[-2], x.shape[-1])
        self._record(path, x)
        if path == "general":
            return self._general(self._conv_forward(group_transform(x, self.group), self.weight, self.bias))
        if path == "fast":  # the combined kernel is W̄ on W's own taps
            return self._conv_forward(x, _like_input(plan.combine(self.weight), x), self.bias)
        if self.kernel_size == (1, 1) or self.padding_mode != "zeros":
            xp = _pad(x, plan.pads, "constant" if self.padding_mode == "zeros" else self.padding_mode)
        if self.kernel_size == (1, 1):
            return F.conv2d(_stencil(xp, plan, self.stride), self.weight, self.bias, 1, 0, 1, self.groups)
        native = (0, 0)
        if self.padding_mode == "zeros":  # the symmetric part of the padding in the convolution itself
            xp, native = _split_padding(x, plan.pads)
        return F.conv2d(xp, _like_input(plan.combine(self.weight), x), self.bias, self.stride, native, plan.dilation,
                        self.groups)


def _stencil(xp: torch.Tensor, plan: _Plan, stride) -> torch.Tensor:
    """For a 1x1 kernel W_c = W ⊗ s (s: the combined taps' weights), so the
    combined convolution is s applied to each channel, then W at stride 1:
    1x the plain MACs instead of K_h·K_w x (1x1 s2 64→128 on [16, 64, 56, 56],
    c4/d4: s is 2x2 uniform, an avg_pool2d)."""
    if plan.dilation == (1, 1) and plan.uniform:  # s = 1/(K_h·K_w) everywhere (its entries sum to 1)
        return F.avg_pool2d(xp, plan.kernel, stride)
    channels = xp.shape[-3]
    s = plan.matrix(xp).view(1, 1, *plan.kernel).expand(channels, 1, *plan.kernel)
    return F.conv2d(xp, s, None, stride, 0, plan.dilation, channels)


def _like_input(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The combined weight in x's memory format (channels_last in, channels_last conv)."""
    return weight.contiguous(memory_format=_memory_format(x))


class EquiConvTranspose(_EquiMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` made G-equivariant by equi-tuning, as EquiConv:
    same parameters, attributes and ``state_dict``. A transposed convolution
    is the adjoint C* of a convolution C, and (1/|G|) Σ Γ(g)⁻¹ C* Γ(g) is the
    adjoint of C's equi-tuned version: one transposed convolution with C's
    combined kernel ("fast" when that is the group-averaged filter,
    "combined" otherwise), or the |G|-batched definition ("general") where
    the combined kernel would cost more. ``output_size`` works at call time as
    in ``nn.ConvTranspose2d`` (it picks the output padding); groups with 90°
    rotations need a square output."""

    _kind = "transposed convolution"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None, dtype=None,
                 *, group: Union[str, ImageGroup] = "c4"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device=device, dtype=dtype)
        self._init_group(group)

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose2d, group: Union[str, ImageGroup] = "c4") -> "EquiConvTranspose":
        """An EquiConvTranspose holding ``conv``'s own Parameters (see EquiConv.from_conv)."""
        return cls._from_module(conv, nn.ConvTranspose2d, group, lambda c: (
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.output_padding, c.groups,
            c.bias is not None, c.dilation, c.padding_mode), params=True)

    def plan(self, height: int, width: int, output_padding: Pair) -> Optional[_Plan]:
        """Plan of the adjoint convolution C (output space -> input space) for an H x W input."""
        out = self.output_shape(height, width, output_padding)
        return _plan(self.group.codes, out, ((height, width), (width, height)), tuple(self.kernel_size),
                     tuple(self.stride), tuple(self.dilation), tuple(self.padding))

    def output_shape(self, height: int, width: int, output_padding: Pair) -> Pair:
        return tuple((n - 1) * self.stride[ax] - 2 * self.padding[ax] + self.dilation[ax] * (self.kernel_size[ax] - 1)
                     + output_padding[ax] + 1 for ax, n in enumerate((height, width)))

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"EquiConvTranspose: padding_mode must be 'zeros' (as in nn.ConvTranspose2d), got "
                             f"{self.padding_mode!r}")
        self._check_input(x)
        return _unbatched(lambda t: self._forward_batch(t, output_size), x)

    def _forward_batch(self, x: torch.Tensor, output_size: Optional[List[int]]) -> torch.Tensor:
        op = tuple(self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation))
        H, W = x.shape[-2:]
        out_shape = self.output_shape(H, W, op)
        if self.group.needs_square and out_shape[0] != out_shape[1]:
            raise ValueError(f"EquiConvTranspose with group {self.group.name!r} rotates by 90 degrees and needs a "
                             f"square output; output_size={output_size} / output_padding={op} give "
                             f"{tuple(out_shape)}")
        plan = self.plan(H, W, op) if min(out_shape) > 0 else None
        path = _path(plan, self.group.order * self.kernel_size[0] * self.kernel_size[1])
        self._record(path, x)
        if path == "general":
            return self._general(F.conv_transpose2d(group_transform(x, self.group), self.weight, self.bias, self.stride,
                                                    self.padding, op, self.groups, self.dilation))
        if path == "fast":
            return F.conv_transpose2d(x, _like_input(plan.combine(self.weight), x), self.bias, self.stride,
                                      self.padding, op, self.groups, self.dilation)
        return self._combined(x, plan)

    def _combined(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """C_c*(x): the transposed convolution reaches the padded output space
        (pads (lo, hi)); the crop back to the output uses conv_transpose2d's own
        padding/output_padding when they can express it, else a pad/crop."""
        weight = _like_input(plan.combine(self.weight), x)
        lo, hi = plan.pads[0::2], plan.pads[1::2]
        op = tuple(l - h for l, h in zip(lo, hi))
        if all(l >= 0 and 0 <= o < max(s, d) for l, o, s, d in zip(lo, op, self.stride, plan.dilation)):
            return F.conv_transpose2d(x, weight, self.bias, self.stride, lo, op, self.groups, plan.dilation)
        out = _pad(F.conv_transpose2d(x, weight, None, self.stride, 0, 0, self.groups, plan.dilation),
                   tuple(-p for p in plan.pads))
        return out if self.bias is None else out + self.bias.view(-1, 1, 1)


class EquiMaxPool2d(_EquiMixin, nn.MaxPool2d):
    """``nn.MaxPool2d`` equi-tuned: (1/|G|) Σ_g Γ(g)⁻¹ P(Γ(g) x). Each term is a
    max over x's stride grid with its element's window offsets, so the average
    is one max_pool2d per distinct window (at most stride² of them), weighted
    by how many elements share it ("combined"); "fast" (the plain pooling)
    where every element has the same windows."""

    _kind = "max pooling"

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False, *, group: Union[str, ImageGroup] = "c4"):
        if return_indices:
            raise ValueError("EquiMaxPool2d: return_indices=True is not supported (an average of maxima has no index)")
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self._init_group(group)

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d, group: Union[str, ImageGroup] = "c4") -> "EquiMaxPool2d":
        """An EquiMaxPool2d with ``pool``'s configuration."""
        return cls._from_module(pool, nn.MaxPool2d, group, lambda p: (
            p.kernel_size, p.stride, p.padding, p.dilation, p.return_indices, p.ceil_mode), params=False)

    def plan(self, height: int, width: int) -> Optional[_Plan]:
        return _pool_plan(self, (height, width), nn.modules.utils._pair(self.dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        plan = self.plan(*x.shape[-2:])
        path = _path(plan)
        self._record(path, x)
        if path == "fast":
            return super().forward(x)
        if path == "general":
            return _unbatched(lambda t: self._general(super(EquiMaxPool2d, self).forward(group_transform(t, self.group))), x)
        return _max_terms(x, plan, nn.modules.utils._pair(self.stride), self.group.order)


def _max_terms(x: torch.Tensor, plan: _Plan, stride: Pair, order: int) -> torch.Tensor:
    """(1/|G|) Σ_g max over element g's windows. Elements that share a window
    share its max_pool2d. When the distinct windows of one shape sit at every
    offset of a stride block (c4/d4 at stride 2), one stride-1 max_pool2d
    followed by an avg_pool2d over the block gives them all: 3x3 s2 max
    pooling on [4, 64, 112, 112], d4, fwd + bwd, CPU: 8x the plain pooling with
    four strided max_pool2d calls on slices of the padded input, ~4x this way."""
    xp = _pad(x, plan.pads, value=-math.inf)
    shapes: Dict[tuple, Dict[Pair, int]] = {}  # (kernel, dilation) -> {origin: elements}
    for origin, kernel, dilation in plan.windows:
        counts = shapes.setdefault((kernel, dilation), {})
        counts[origin] = counts.get(origin, 0) + 1
    out = None
    rows, cols = plan.out_size
    for (kernel, dilation), counts in shapes.items():
        base = (min(o[0] for o in counts), min(o[1] for o in counts))
        block = {(base[0] + i, base[1] + j) for i in range(stride[0]) for j in range(stride[1])}
        if stride != (1, 1) and set(counts) == block and len(set(counts.values())) == 1:
            dense = F.max_pool2d(_channels_last(xp[..., base[0]:, base[1]:]), kernel, 1, 0, dilation)
            terms = [(F.avg_pool2d(dense, stride, stride), len(block) * next(iter(counts.values())))]
        else:
            terms = [(F.max_pool2d(xp[..., o[0]:, o[1]:], kernel, stride, 0, dilation), n) for o, n in counts.items()]
        for term, n in terms:
            term = term[..., :rows, :cols] * (n / order)
            out = term if out is None else out + term
    return out.contiguous(memory_format=_memory_format(x))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last where it is a batch: CPU max pooling vectorizes over
    channels there (dense 3x3 max_pool2d on [4, 64, 114, 114], fwd + bwd: 3.3x
    faster than in NCHW, the copies included)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class EquiAvgPool2d(_EquiMixin, nn.AvgPool2d):
    """``nn.AvgPool2d`` equi-tuned. Average pooling that counts the padding
    (the default, without ceil_mode or divisor_override) is a convolution with
    a constant kernel, so the equi-tuned version is one depthwise convolution
    with its combined kernel ("combined"); "fast" (the plain pooling) where
    every element has the same windows; otherwise the definition ("general")."""

    _kind = "average pooling"

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override=None, *, group: Union[str, ImageGroup] = "c4"):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self._init_group(group)

    @classmethod
    def from_pool(cls, pool: nn.AvgPool2d, group: Union[str, ImageGroup] = "c4") -> "EquiAvgPool2d":
        """An EquiAvgPool2d with ``pool``'s configuration."""
        return cls._from_module(pool, nn.AvgPool2d, group, lambda p: (
            p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad, p.divisor_override), params=False)

    def plan(self, height: int, width: int) -> Optional[_Plan]:
        return _pool_plan(self, (height, width), (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        plan = self.plan(*x.shape[-2:])
        kernel = nn.modules.utils._pair(self.kernel_size)
        linear = self.count_include_pad and not self.ceil_mode and self.divisor_override in (None, kernel[0] * kernel[1])
        path = _path(plan)
        if path == "combined" and not linear:  # a constant-kernel convolution only with the default counting
            path = "general"
        self._record(path, x)
        if path == "fast":
            return super().forward(x)
        if path == "general":
            return _unbatched(lambda t: self._general(super(EquiAvgPool2d, self).forward(group_transform(t, self.group))), x)
        channels = x.shape[-3]
        box = torch.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=x.dtype, device=x.device)
        weight = _like_input(plan.combine(box), x)
        return F.conv2d(_pad(x, plan.pads), weight, None, nn.modules.utils._pair(self.stride), 0, plan.dilation,
                        channels)


def _path(plan: Optional[_Plan], max_cost: float = math.inf) -> str:
    """"fast" where every element has the same taps (the plain module with the
    group-averaged filter), "combined" (one call with the combined kernel), or
    "general" (the |G|-batched definition) where there is no plan or its
    combined kernel costs more than max_cost taps."""
    if plan is None or plan.cost > max_cost:
        return "general"
    return "fast" if plan.trivial else "combined"


def _unbatched(fn, x: torch.Tensor) -> torch.Tensor:
    """fn on a batch; a [C, H, W] input goes through as a batch of one."""
    return fn(x.unsqueeze(0)).squeeze(0) if x.dim() == 3 else fn(x)


def _pool_plan(pool, size: Pair, dilation: Pair) -> Optional[_Plan]:
    pair = nn.modules.utils._pair
    kernel, stride, pad = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)

    def out_of(shape):
        return tuple(_pool_out(n, kernel[ax], stride[ax], pad[ax], dilation[ax], pool.ceil_mode)
                     for ax, n in enumerate(shape))

    outs = _both_shapes(size, out_of)
    if min(outs[0]) <= 0:
        return None
    return _plan(pool.group.codes, size, outs, kernel, stride, dilation, pad)


# Modules convert_convs replaces, by exact type (base -> its equi-tuned version and constructor).
_CONVERTERS = {
    nn.Conv2d: (EquiConv, EquiConv.from_conv),
    nn.ConvTranspose2d: (EquiConvTranspose, EquiConvTranspose.from_conv),
    nn.MaxPool2d: (EquiMaxPool2d, EquiMaxPool2d.from_pool),
    nn.AvgPool2d: (EquiAvgPool2d, EquiAvgPool2d.from_pool),
}
_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
_EQUI = tuple(equi for equi, _ in _CONVERTERS.values())
# Spatial modules that are not equivariant in general and that convert_convs cannot convert.
_NOT_EQUIVARIANT = (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Unfold,
                    nn.Fold, nn.PixelShuffle, nn.PixelUnshuffle, nn.MaxUnpool2d, nn.Conv1d, nn.Conv3d,
                    nn.ConvTranspose1d, nn.ConvTranspose3d, nn.LazyConv2d, nn.LazyConvTranspose2d)


def convert_convs(model: nn.Module, group: Union[str, ImageGroup] = "c4") -> nn.Module:
    """Replaces every ``nn.Conv2d`` and ``nn.ConvTranspose2d`` of ``model`` (in
    place, recursively) by an ``EquiConv`` / ``EquiConvTranspose`` holding the
    same Parameters (see ``EquiConv.from_conv``: optimizers made before keep
    working), and every ``nn.MaxPool2d`` / ``nn.AvgPool2d`` by its equi-tuned
    version (their windows break the symmetry on some input sizes, e.g.
    ResNet's 3x3 stride-2 max pooling on even inputs); returns the model. A
    module used in several places becomes one converted module used in the
    same places. A convolution the conversion cannot stand in for (see
    ``_check_replaceable``) raises a TypeError naming it, before anything is
    replaced. Converted modules already there are left as they are.

    Warns (UserWarning, naming them) about the modules it leaves that are not
    equivariant in general: pooling layers it cannot replace (subclasses,
    hooks, return_indices), adaptive pooling to a size other than 1x1, and
    other spatial modules (Unfold, PixelShuffle, ...). Functional calls in a
    forward (F.max_pool2d, slicing, ...) cannot be seen here:
    ``equivariance_report(model, x, group)`` runs the model on an example and
    names the modules where equivariance is lost."""
    group = get_image_group(group)
    if isinstance(model, _CONVS) and not isinstance(model, _EQUI):
        _check_replaceable(model, "convert_convs: model", _conv_base(model))
        return _CONVERTERS[type(model)][1](model, group)
    if type(model) in (nn.MaxPool2d, nn.AvgPool2d) and _pool_replaceable(model):
        return _CONVERTERS[type(model)][1](model, group)
    places: list = []
    left: list = []
    if not _left_alone(model, "model", left):
        _find_convertible(model, "model", places, left, set())
    converted = {}  # id(module) -> its replacement; places keeps every module alive, so ids stay unique
    for parent, name, module in places:
        if id(module) not in converted:
            converted[id(module)] = _CONVERTERS[type(module)][1](module, group)
        setattr(parent, name, converted[id(module)])
    if left:
        warnings.warn(f"convert_convs: these modules are not equivariant in general and were left as they are, so the "
                      f"model may not be {group.name}-equivariant: {'; '.join(left)} (equivariance_report(model, x, "
                      f"{group.name!r}) finds where equivariance is lost on an example x)", stacklevel=2)
    return model


def _conv_base(conv: nn.Module) -> type:
    return nn.ConvTranspose2d if isinstance(conv, nn.ConvTranspose2d) else nn.Conv2d


def _left_alone(module: nn.Module, path: str, left: list) -> bool:
    """Records (in ``left``) a module convert_convs leaves although it is not
    equivariant in general; True when the walk should not descend into it."""
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):  # one _find_convertible could not replace
        left.append(f"{path} ({type(module).__name__} that cannot be replaced: a subclass, hooks or return_indices)")
        return True
    if isinstance(module, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
        if nn.modules.utils._pair(module.output_size) != (1, 1):
            left.append(f"{path} ({type(module).__name__}, output_size={module.output_size})")
        return True
    if isinstance(module, _NOT_EQUIVARIANT):
        left.append(f"{path} ({type(module).__name__})")
        return True
    return False


def _find_convertible(module: nn.Module, path: str, places: list, left: list, walked: set) -> None:
    """Appends (parent, name, module) for every module below ``module`` that
    convert_convs replaces, checking each convolution (so a model is converted
    whole or not at all), and records in ``left`` what it leaves."""
    # _modules, not named_children(), which yields a module once per parent:
    # a module held twice by one parent must be replaced in both places.
    for name, child in module._modules.items():
        if child is None or isinstance(child, _EQUI):
            continue
        child_path = f"{path}.{name}"
        if isinstance(child, _CONVS):
            _check_replaceable(child, f"convert_convs: {child_path}", _conv_base(child))
            places.append((module, name, child))
        elif type(child) in (nn.MaxPool2d, nn.AvgPool2d) and _pool_replaceable(child):
            places.append((module, name, child))
        elif id(child) not in walked:  # a submodule held in several places is walked once
            walked.add(id(child))
            if not _left_alone(child, child_path, left):
                _find_convertible(child, child_path, places, left, walked)


def _pool_replaceable(pool: nn.Module) -> bool:
    try:
        _check_replaceable(pool, "", type(pool))
    except TypeError:
        return False
    return not getattr(pool, "return_indices", False)


def _check_replaceable(module: nn.Module, where: str, base: type = nn.Conv2d) -> None:
    """Raises a TypeError (starting with ``where``) unless an equi-tuned module
    can replace ``module`` without changing what it computes: a plain ``base``
    (nn.Conv2d, ...) with Parameters, no hooks and base's forward. A subclass
    or a parametrized conv (weight_norm, spectral_norm) has its own forward,
    hooks and a forward set on the instance (accelerate's hooks) would be
    silently lost, and a weight that is a plain tensor (functional
    meta-learning) is not the Parameter an EquiConv holds; skipping such a conv
    instead would leave the model silently not equivariant."""
    if type(module) is not base:
        raise TypeError(f"{where} is a {type(module).__name__} (a subclass of nn.{base.__name__}, or one with a "
                        f"parametrization such as weight_norm): its forward is not nn.{base.__name__}'s, which its "
                        f"equi-tuned version would replace; convert a plain nn.{base.__name__}, e.g. after "
                        "torch.nn.utils.parametrize.remove_parametrizations")
    if "forward" in vars(module):
        raise TypeError(f"{where} has a forward of its own set on the instance (as accelerate's hooks do), which its "
                        "equi-tuned version would not have; remove it first")
    for name in ("weight", "bias"):
        value = getattr(module, name, None)
        if value is not None and not isinstance(value, nn.Parameter):
            raise TypeError(f"{where}: its {name} is a {type(value).__name__}, not an nn.Parameter, so an "
                            f"{'EquiConv' if base is nn.Conv2d else 'EquiConvTranspose'} cannot hold it")
    kinds = {"forward": ("_forward_pre_hooks", "_forward_hooks"),
             "backward": ("_backward_pre_hooks", "_backward_hooks"),
             "state_dict": ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                            "_load_state_dict_post_hooks")}
    found = [kind for kind, attrs in kinds.items() if any(getattr(module, a, None) for a in attrs)]
    if found:
        raise TypeError(f"{where} has {' and '.join(found)} hooks, which its equi-tuned version would not have; "
                        "remove them first (the old torch.nn.utils.weight_norm and spectral_norm are hooks: "
                        "remove_weight_norm, remove_spectral_norm)")


def equivariance_report(model: nn.Module, x: torch.Tensor, group: Union[str, ImageGroup], *,
                        tol: float = 1e-5) -> List[Tuple[str, float]]:
    """Where a model loses G-equivariance, found on an example input: runs
    ``model`` on x and on every Γ(g)x (no_grad, forward hooks on every module)
    and returns [(module name, error)] for the innermost modules whose tensor
    inputs are equivariant or invariant to ``tol`` but whose output is not: a functional
    call in its forward (F.max_pool2d on an even input, a crop), or a module
    convert_convs does not convert. Empty for an equivariant model. A tensor
    counts as equivariant if it is within tol of Γ(g) of the unmoved one, or
    of the unmoved one itself (invariant features, logits). Keeps every
    module's outputs of |G| + 1 forward passes in memory."""
    group = get_image_group(group)
    names: Dict[int, str] = {}  # named as convert_convs names them: model, model.0, model.0.conv1, ...
    for name, module in model.named_modules():
        names.setdefault(id(module), f"model.{name}" if name else "model")
    runs: List[list] = []

    def hook(module, args, out):
        tensors = [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]
        outs = [o.detach().clone() for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        runs[-1].append((id(module), tensors, outs))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            for k in range(group.order + 1):  # the unmoved input, then Γ(g)x for every g
                runs.append([])
                model(x if k == 0 else group.act(x, k - 1))
    finally:
        for h in handles:
            h.remove()
    worst: Dict[str, float] = {}
    for k in range(group.order):
        moved, base = runs[k + 1], runs[0]
        if len(moved) != len(base):
            raise ValueError(f"equivariance_report: the model made {len(base)} module calls on x but {len(moved)} on "
                             f"x moved by group element {k}")
        for (mid, ins, outs), (_, ins0, outs0) in zip(moved, base):
            if _deviation(ins, ins0, group, k) <= tol:
                err = _deviation(outs, outs0, group, k)
                if err > tol:
                    worst[names[mid]] = max(err, worst.get(names[mid], 0.0))
    # The innermost modules only: a container whose child lost equivariance lost it too.
    order = {name: i for i, name in enumerate(names.values())}
    return sorted(((name, err) for name, err in worst.items()
                   if not any(other.startswith(name + ".") for other in worst)), key=lambda item: order[item[0]])


def _deviation(moved: List[torch.Tensor], base: List[torch.Tensor], group: ImageGroup, k: int) -> float:
    """Largest distance of the moved tensors from Γ(k) of the unmoved ones or from the unmoved ones themselves."""
    worst = 0.0
    for a, b in zip(moved, base):
        if not a.is_floating_point() or a.numel() == 0:
            continue
        best = math.inf
        if a.dim() >= 2 and (not group.needs_square or b.shape[-1] == b.shape[-2]):
            moved_b = group.act(b, k)
            if moved_b.shape == a.shape:
                best = (a.double() - moved_b.double()).abs().max().item()
        if a.shape == b.shape:
            best = min(best, (a.double() - b.double()).abs().max().item())
        worst = max(worst, best)
    return worst
