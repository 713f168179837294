"""Equi-tuned convolutions and pooling: ``EquiConv`` (``nn.Conv2d``),
``EquiConvTranspose`` (``nn.ConvTranspose2d``), ``EquiMaxPool2d`` and
``EquiAvgPool2d``; ``convert.convert_convs`` puts them in a model.

    M_G(x) = (1/|G|) Σ_g Γ(g)⁻¹ M(Γ(g) x)

is G-equivariant whatever M's weights are. Every module runs the same
forward (``_EquiMixin``): plan the taps its terms read (``conv_plan``), then
"fast" (its plain op with the group-averaged filter), "combined" (one call
with the combined kernel) or "general" (the definition: the fused ops around
one |G|-batched call of its plain op).

A 1x1 kernel has W_c = W ⊗ s, so its combined path averages x over s first
(avg_pool2d), then runs the 1x1 convolution. A transposed convolution is the
adjoint of a convolution C, and (1/|G|) Σ Γ⁻¹ C* Γ = ((1/|G|) Σ Γ⁻¹ C Γ)*: one
transposed convolution with the combined kernel of C. Pooling: max pooling
averages the maxima over each element's window (one stride-1 max_pool2d and an
avg_pool2d when the windows fill a stride block, as c4/d4 at stride 2 do),
average pooling is the combined kernel as a depthwise convolution.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .conv_plan import (Pair, Plan, conv_plan, pad, path_of, pool_plan, split_padding, transposed_plan,
                        transposed_size)
from .groups import ImageGroup, get_image_group
from .ops import group_average, group_transform

__all__ = ["EquiConv", "EquiConvTranspose", "EquiMaxPool2d", "EquiAvgPool2d"]

logger = logging.getLogger(__name__)
_pair = nn.modules.utils._pair


def _static_int(size) -> int:
    """The size as a Python int. The plan is integer geometry of one input size,
    which torch.compile cannot trace with a symbolic size (dynamic=True, or a
    recompile after a size change); range() of a symbolic length makes it
    guard on the value instead, so each size compiles its own plan."""
    return len(range(size))


class _EquiMixin:
    """What the equi-tuned modules share: the group, ``last_path``, input
    checks and the forward (input check → plan → path → fast / combined /
    general). Each module supplies ``plan(H, W, *args)``, ``_plain(x, plan,
    *args)`` (its own op; with a plan, on the group-averaged weight) and
    ``_combined(x, plan, *args)``."""

    group: ImageGroup
    last_path: Optional[str]
    _kind = "module"
    _weighted = False  # a convolution (weight and bias) rather than pooling

    def _init_group(self, group) -> None:
        self.group = get_image_group(group, kind="image")
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

    def choose_path(self, height: int, width: int, *args) -> Tuple[str, Optional[Plan]]:
        """("fast" | "combined" | "general", plan) on an H x W input: "fast" where
        every element has the same taps, else "combined" unless its kernel costs
        more than the |G| convolutions of the definition."""
        plan = self.plan(height, width, *args)
        path = path_of(plan, self.group.order * math.prod(self.kernel_size) if self._weighted else math.inf)
        return path, (None if path == "general" else plan)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        self._check_input(x)
        if x.dim() == 3:  # [C, H, W] goes through as a batch of one
            return self._forward_batch(x.unsqueeze(0), *args).squeeze(0)
        return self._forward_batch(x, *args)

    def _forward_batch(self, x: torch.Tensor, *args) -> torch.Tensor:
        args = self._call_args(x, *args)
        path, plan = self.choose_path(*(_static_int(n) for n in x.shape[-2:]), *args)
        if not torch.compiler.is_compiling():
            self.last_path = path
            logger.debug("%s %s: %s path on input %s", type(self).__name__, self.group.name, path, tuple(x.shape))
        if path == "fast":
            return self._plain(x, plan, *args)
        if path == "combined":
            return self._combined(x, plan, *args)
        y = self._plain(group_transform(x, self.group), None, *args)
        if self.group.needs_square and y.shape[-1] != y.shape[-2]:
            raise ValueError(
                f"{type(self).__name__} with group {self.group.name!r}: the {self._kind} of a square input gave a "
                f"non-square output {tuple(y.shape[-2:])} (non-square kernel, stride or padding), which 90-degree "
                "rotations cannot average")
        return group_average(y, self.group)

    def _call_args(self, x: torch.Tensor, *args) -> tuple:
        """The call's own arguments as plan, _plain and _combined take them."""
        return args

    def _weight(self, plan: Optional[Plan], x: torch.Tensor) -> torch.Tensor:
        """The weight, or with a plan its combined kernel, in x's memory format."""
        return self.weight if plan is None else _like(plan.combine(self.weight), x)

    @classmethod
    def _from_module(cls, module: nn.Module, base: type, group, config):
        """cls(*config(module), group=group), holding module's Parameters (convolutions)."""
        source = f"{cls.__name__}.from_{'conv' if cls._weighted else 'pool'}"
        if not isinstance(module, base):
            raise TypeError(f"{source} expects an nn.{base.__name__}, got {type(module).__name__}")
        check_replaceable(module, f"{source}: {'the convolution' if cls._weighted else 'the pooling layer'}", base)
        if not cls._weighted:
            new = cls(*config(module), group=group)
        else:
            # Built on the meta device (nothing allocated), then given the module's Parameters;
            # a subclass is built on its device, since its __init__ may make buffers.
            new = cls(*config(module), device="meta" if cls in (EquiConv, EquiConvTranspose) else module.weight.device,
                      dtype=module.weight.dtype, group=group)
            new.weight = module.weight
            new.bias = module.bias
        new.train(module.training)
        return new


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's memory format (channels_last in, channels_last out)."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class EquiConv(_EquiMixin, nn.Conv2d):
    """``nn.Conv2d`` made G-equivariant by equi-tuning; same parameters,
    attributes and ``state_dict`` keys (``weight`` and ``bias`` hold the
    unconstrained, e.g. pretrained, weights), so checkpoints load either way.

    ``last_path`` says which path the latest (eager) call took: "fast" (one
    convolution with the group-averaged filter), "combined" (one convolution
    with the combined kernel, see ``conv_plan``) or "general" (the
    |G|-batched definition); the choice is also logged at DEBUG level.
    """

    _kind = "convolution"
    _weighted = True

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
            c.bias is not None, c.padding_mode))

    def plan(self, height: int, width: int) -> Optional[Plan]:
        """The combined kernel's plan on an H x W input (None: the terms do not
        share one stride grid, or the convolution has no output there)."""
        return conv_plan(self, (height, width))

    def _plain(self, x: torch.Tensor, plan: Optional[Plan]) -> torch.Tensor:
        return self._conv_forward(x, self._weight(plan, x), self.bias)

    def _combined(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        if self.kernel_size == (1, 1):
            xp = pad(x, plan.pads, "constant" if self.padding_mode == "zeros" else self.padding_mode)
            return F.conv2d(_stencil(xp, plan, self.stride), self.weight, self.bias, 1, 0, 1, self.groups)
        if self.padding_mode == "zeros":  # the symmetric part of the padding in the convolution itself
            xp, native = split_padding(x, plan.pads)
        else:
            xp, native = pad(x, plan.pads, self.padding_mode), (0, 0)
        return F.conv2d(xp, self._weight(plan, x), self.bias, self.stride, native, plan.dilation, self.groups)


def _stencil(xp: torch.Tensor, plan: Plan, stride) -> torch.Tensor:
    """For a 1x1 kernel W_c = W ⊗ s (s: the combined taps' weights), so the
    combined convolution is s applied to each channel, then W at stride 1:
    1x the plain MACs instead of K_h·K_w x (1x1 s2 64→128 on [16, 64, 56, 56],
    c4/d4: s is 2x2 uniform, an avg_pool2d)."""
    if plan.dilation == (1, 1) and plan.uniform:  # s = 1/(K_h·K_w) everywhere (its entries sum to 1)
        return F.avg_pool2d(xp, plan.kernel, stride)
    channels = xp.shape[-3]
    s = plan.matrix(xp).view(1, 1, *plan.kernel).expand(channels, 1, *plan.kernel)
    return F.conv2d(xp, s, None, stride, 0, plan.dilation, channels)


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
    _weighted = True

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
            c.bias is not None, c.dilation, c.padding_mode))

    def plan(self, height: int, width: int, output_padding: Pair) -> Optional[Plan]:
        """Plan of the adjoint convolution C (output space -> input space) for an H x W input."""
        return transposed_plan(self, (height, width), output_padding)

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"EquiConvTranspose: padding_mode must be 'zeros' (as in nn.ConvTranspose2d), got "
                             f"{self.padding_mode!r}")
        return super().forward(x, output_size)

    def _call_args(self, x: torch.Tensor, output_size: Optional[List[int]]) -> Tuple[Pair]:
        """output_size -> the output padding (nn.ConvTranspose2d's rule and checks)."""
        op = tuple(self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation))
        out_shape = transposed_size(self, x.shape[-2:], op)
        if self.group.needs_square and out_shape[0] != out_shape[1]:
            raise ValueError(f"EquiConvTranspose with group {self.group.name!r} rotates by 90 degrees and needs a "
                             f"square output; output_size={output_size} / output_padding={op} give "
                             f"{tuple(out_shape)}")
        return (op,)

    def _plain(self, x: torch.Tensor, plan: Optional[Plan], op: Pair) -> torch.Tensor:
        return F.conv_transpose2d(x, self._weight(plan, x), self.bias, self.stride, self.padding, op, self.groups,
                                  self.dilation)

    def _combined(self, x: torch.Tensor, plan: Plan, op: Pair) -> torch.Tensor:
        """C_c*(x): the transposed convolution reaches the padded output space
        (pads (lo, hi)); the crop back to the output uses conv_transpose2d's own
        padding/output_padding when they can express it, else a pad/crop."""
        weight = self._weight(plan, x)
        lo, hi = plan.pads[0::2], plan.pads[1::2]
        op = tuple(l - h for l, h in zip(lo, hi))
        if all(l >= 0 and 0 <= o < max(s, d) for l, o, s, d in zip(lo, op, self.stride, plan.dilation)):
            return F.conv_transpose2d(x, weight, self.bias, self.stride, lo, op, self.groups, plan.dilation)
        out = pad(F.conv_transpose2d(x, weight, None, self.stride, 0, 0, self.groups, plan.dilation),
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
            p.kernel_size, p.stride, p.padding, p.dilation, p.return_indices, p.ceil_mode))

    def plan(self, height: int, width: int) -> Optional[Plan]:
        return pool_plan(self, (height, width), _pair(self.dilation))

    def _plain(self, x: torch.Tensor, plan: Optional[Plan]) -> torch.Tensor:
        return nn.MaxPool2d.forward(self, x)

    def _combined(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(1/|G|) Σ_g max over element g's windows. Elements that share a window
        share its max_pool2d. When the distinct windows of one shape sit at every
        offset of a stride block (c4/d4 at stride 2), one stride-1 max_pool2d
        followed by an avg_pool2d over the block gives them all, about half the
        time of one strided max_pool2d per window; the dense pooling runs in
        channels_last, where CPU max pooling vectorizes over channels
        (measured: benchmarks/README.md, EquiConv)."""
        stride = _pair(self.stride)
        xp = pad(x, plan.pads, value=-math.inf)
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
                dense = xp[..., base[0]:, base[1]:].contiguous(memory_format=torch.channels_last)
                dense = F.max_pool2d(dense, kernel, 1, 0, dilation)
                terms = [(F.avg_pool2d(dense, stride, stride), len(block) * next(iter(counts.values())))]
            else:
                terms = [(F.max_pool2d(xp[..., o[0]:, o[1]:], kernel, stride, 0, dilation), n)
                         for o, n in counts.items()]
            for term, n in terms:
                term = term[..., :rows, :cols] * (n / self.group.order)
                out = term if out is None else out + term
        return _like(out, x)


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
            p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad, p.divisor_override))

    def plan(self, height: int, width: int) -> Optional[Plan]:
        return pool_plan(self, (height, width), (1, 1))

    def choose_path(self, height: int, width: int) -> Tuple[str, Optional[Plan]]:
        """As for the other modules, but "combined" (a constant-kernel
        convolution) only with the default counting."""
        path, plan = super().choose_path(height, width)
        kernel = _pair(self.kernel_size)
        linear = (self.count_include_pad and not self.ceil_mode
                  and self.divisor_override in (None, kernel[0] * kernel[1]))
        return ("general", None) if path == "combined" and not linear else (path, plan)

    def _plain(self, x: torch.Tensor, plan: Optional[Plan]) -> torch.Tensor:
        return nn.AvgPool2d.forward(self, x)

    def _combined(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        kernel, channels = _pair(self.kernel_size), x.shape[-3]
        box = torch.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=x.dtype, device=x.device)
        return F.conv2d(pad(x, plan.pads), _like(plan.combine(box), x), None, _pair(self.stride), 0, plan.dilation,
                        channels)


def check_replaceable(module: nn.Module, where: str, base: type = nn.Conv2d) -> None:
    """Raises a TypeError (starting with ``where``) unless an equi-tuned module
    can replace ``module`` without changing what it computes: a plain ``base``
    (nn.Conv2d, ...) with Parameters, no hooks and base's forward. A subclass
    or a parametrized conv (weight_norm, spectral_norm) has its own forward,
    hooks and a forward set on the instance (accelerate's hooks) would be
    silently lost, and a weight that is a plain tensor (functional
    meta-learning) is not the Parameter an EquiConv holds; skipping such a conv
    instead would leave the model silently not equivariant. Here, not in
    ``convert``, because ``from_conv`` / ``from_pool`` apply it too."""
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
