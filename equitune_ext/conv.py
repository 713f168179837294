"""EquiConv: an equi-tuned ``nn.Conv2d``.

    EquiConv(x) = (1/|G|) Σ_g Γ(g)⁻¹ C(Γ(g) x)

is G-equivariant whatever C's weights are. When the convolution commutes
with the group's spatial action, the average is a single convolution with the
group-averaged filter W̄ = (1/|G|) Σ_g Γ(g) W (the fast path); otherwise it is
computed as defined, with the fused ops around one batched convolution.

When does it commute? A flip of an axis maps the input index a to N-1-a. A
convolution along that axis (size N, padding p_lo/p_hi, kernel k, dilation d,
stride s) samples windows starting at o·s - p_lo, o = 0..N_out-1. Flipping the
input and the kernel gives the same outputs in reverse order exactly when the
set of windows is symmetric: p_lo == p_hi and (N + p_lo + p_hi - d(k-1) - 1) is
divisible by s (then the last window ends exactly where the padded input ends).
Every padding mode pads both sides alike (zeros, reflect, replicate, circular
all commute with a flip). A 90° rotation also swaps the axes, so it needs the
same k, d, s and padding on both axes (and a square input, which the group
needs anyway). ``groups`` only mixes channels and plays no part.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .groups import ImageGroup, get_image_group
from .ops import group_average, group_transform

__all__ = ["EquiConv", "convert_convs", "flip_commutes"]

logger = logging.getLogger(__name__)


def flip_commutes(size: int, pad_lo: int, pad_hi: int, kernel: int, dilation: int, stride: int) -> bool:
    """Whether a 1-d convolution along an axis commutes with flipping that axis."""
    return pad_lo == pad_hi and (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) % stride == 0


class EquiConv(nn.Conv2d):
    """``nn.Conv2d`` made G-equivariant by equi-tuning; same parameters,
    attributes and ``state_dict`` keys (``weight`` and ``bias`` hold the
    unconstrained, e.g. pretrained, weights), so checkpoints load either way.

    ``last_path`` says which path the latest (eager) call took: "fast" (one
    convolution with the group-averaged filter) or "general"; the choice is
    also logged at DEBUG level.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[str, int, Tuple[int, int]] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        group: Union[str, ImageGroup] = "c4",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.group = get_image_group(group)
        self.last_path: Optional[str] = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group: Union[str, ImageGroup] = "c4") -> "EquiConv":
        """An EquiConv with ``conv``'s configuration that holds ``conv``'s own
        ``weight`` and ``bias`` Parameters, not copies (as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does): an optimizer made
        before the conversion still trains the model, weights tied between
        modules stay tied, a frozen convolution stays frozen, and no memory is
        allocated. ``copy.deepcopy(conv)`` first for weights of its own."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"EquiConv.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        _check_replaceable(conv, "EquiConv.from_conv: the convolution")
        # Built on the meta device (nothing allocated), then given conv's Parameters;
        # a subclass is built on conv's device, since its __init__ may make buffers.
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode,
                  device="meta" if cls is EquiConv else conv.weight.device, dtype=conv.weight.dtype, group=group)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group.name!r}"

    # -- which path ---------------------------------------------------------
    def _axis_padding(self, axis: int, size: int) -> Tuple[int, int]:
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

    def averaged_weight(self) -> torch.Tensor:
        """W̄ = (1/|G|) Σ_g Γ(g) W over the filters' spatial dims (fused ops)."""
        return group_transform(self.weight.unsqueeze(0), self.group).mean(0)

    # -- forward ------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in (3, 4):
            raise ValueError(f"EquiConv expects [N, C, H, W] or [C, H, W] input, got shape {tuple(x.shape)}")
        if self.group.needs_square and x.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"EquiConv with group {self.group.name!r} rotates by 90 degrees and needs square inputs, "
                f"got H={x.shape[-2]}, W={x.shape[-1]}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        fast = self.fast_path_applies(x.shape[-2], x.shape[-1])
        if not torch.compiler.is_compiling():
            self.last_path = "fast" if fast else "general"
            logger.debug("EquiConv %s: %s path on input %s", self.group.name, self.last_path, tuple(x.shape))
        if fast:
            out = self._conv_forward(x, self.averaged_weight(), self.bias)
        else:
            y = self._conv_forward(group_transform(x, self.group), self.weight, self.bias)
            if self.group.needs_square and y.shape[-1] != y.shape[-2]:
                raise ValueError(
                    f"EquiConv with group {self.group.name!r}: the convolution of a square input gave a non-square "
                    f"output {tuple(y.shape[-2:])} (non-square kernel, stride or padding), which 90-degree rotations "
                    "cannot average"
                )
            out = group_average(y, self.group)
        return out.squeeze(0) if unbatched else out


def convert_convs(model: nn.Module, group: Union[str, ImageGroup] = "c4") -> nn.Module:
    """Replaces every ``nn.Conv2d`` of ``model`` (in place, recursively) by an
    ``EquiConv`` holding the same Parameters (see ``EquiConv.from_conv``:
    optimizers made before keep working); returns the model. A convolution
    used in several places becomes one EquiConv used in the same places. A
    convolution an EquiConv cannot stand in for (see ``_check_replaceable``)
    raises a TypeError naming it, before anything is replaced. EquiConvs
    already there are left as they are."""
    if isinstance(model, nn.Conv2d) and not isinstance(model, EquiConv):
        _check_replaceable(model, "convert_convs: model")
        return EquiConv.from_conv(model, group)
    places = []
    _find_convs(model, "model", places, set())
    converted = {}  # id(conv) -> its EquiConv; places keeps every conv alive, so ids stay unique
    for parent, name, conv in places:
        if id(conv) not in converted:
            converted[id(conv)] = EquiConv.from_conv(conv, group)
        setattr(parent, name, converted[id(conv)])
    return model


def _find_convs(module: nn.Module, path: str, places: list, walked: set) -> None:
    """Appends (parent, name, conv) for every nn.Conv2d below module, checking
    each (so a model is converted whole or not at all)."""
    # _modules, not named_children(), which yields a module once per parent:
    # a conv held twice by one parent must be replaced in both places.
    for name, child in module._modules.items():
        if child is None:
            continue
        child_path = f"{path}.{name}"
        if isinstance(child, nn.Conv2d) and not isinstance(child, EquiConv):
            _check_replaceable(child, f"convert_convs: {child_path}")
            places.append((module, name, child))
        elif id(child) not in walked:  # a submodule held in several places is walked once
            walked.add(id(child))
            _find_convs(child, child_path, places, walked)


def _check_replaceable(conv: nn.Module, where: str) -> None:
    """Raises a TypeError (starting with ``where``) unless an EquiConv can
    replace conv without changing what it computes: a plain nn.Conv2d with
    Parameters, no hooks and nn.Conv2d's forward. A subclass or a parametrized
    conv (weight_norm, spectral_norm) has its own forward, hooks and a forward
    set on the instance (accelerate's hooks) would be silently lost, and a
    weight that is a plain tensor (functional meta-learning) is not the
    Parameter an EquiConv holds; skipping such a conv instead would leave the
    model silently not equivariant."""
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"{where} is a {type(conv).__name__} (a subclass of nn.Conv2d, or one with a parametrization such "
                        "as weight_norm): its forward is not nn.Conv2d's, which EquiConv would replace; convert a plain "
                        "nn.Conv2d, e.g. after torch.nn.utils.parametrize.remove_parametrizations")
    if "forward" in vars(conv):
        raise TypeError(f"{where} has a forward of its own set on the instance (as accelerate's hooks do), which its "
                        "EquiConv would not have; remove it first")
    for name in ("weight", "bias"):
        value = getattr(conv, name)
        if value is not None and not isinstance(value, nn.Parameter):
            raise TypeError(f"{where}: its {name} is a {type(value).__name__}, not an nn.Parameter, so an EquiConv "
                            "cannot hold it")
    kinds = {"forward": ("_forward_pre_hooks", "_forward_hooks"),
             "backward": ("_backward_pre_hooks", "_backward_hooks"),
             "state_dict": ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                            "_load_state_dict_post_hooks")}
    found = [kind for kind, attrs in kinds.items() if any(getattr(conv, a, None) for a in attrs)]
    if found:
        raise TypeError(f"{where} has {' and '.join(found)} hooks, which its EquiConv would not have; remove them first "
                        "(the old torch.nn.utils.weight_norm and spectral_norm are hooks: remove_weight_norm, "
                        "remove_spectral_norm)")
