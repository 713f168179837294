"""Putting the equi-tuned convolutions and pooling into a model
(``convert_convs``) and finding where a model loses equivariance on an
example (``equivariance_report``)."""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple, Union

import torch
from torch import nn

from .conv import EquiAvgPool2d, EquiConv, EquiConvTranspose, EquiMaxPool2d, check_replaceable
from .groups import ImageGroup, get_image_group
from .nn import EquiTuned, deviation

__all__ = ["convert_convs", "equivariance_report"]

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
    ``conv.check_replaceable``) raises a TypeError naming it, before anything is
    replaced. Converted modules already there are left as they are.

    Warns (UserWarning, naming them) about the modules it leaves that are not
    equivariant in general: pooling layers it cannot replace (subclasses,
    hooks, return_indices), adaptive pooling to a size other than 1x1, and
    other spatial modules (Unfold, PixelShuffle, ...). Functional calls in a
    forward (F.max_pool2d, slicing, ...) cannot be seen here:
    ``equivariance_report(model, x, group)`` runs the model on an example and
    names the modules where equivariance is lost."""
    group = get_image_group(group, kind="image")
    if isinstance(model, _CONVS) and not isinstance(model, _EQUI):
        check_replaceable(model, "convert_convs: model", _conv_base(model))
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
            check_replaceable(child, f"convert_convs: {child_path}", _conv_base(child))
            places.append((module, name, child))
        elif type(child) in (nn.MaxPool2d, nn.AvgPool2d) and _pool_replaceable(child):
            places.append((module, name, child))
        elif id(child) not in walked:  # a submodule held in several places is walked once
            walked.add(id(child))
            if not _left_alone(child, child_path, left):
                _find_convertible(child, child_path, places, left, walked)


def _pool_replaceable(pool: nn.Module) -> bool:
    try:
        check_replaceable(pool, "", type(pool))
    except TypeError:
        return False
    return not getattr(pool, "return_indices", False)


def equivariance_report(model: nn.Module, x: torch.Tensor, group: Union[str, ImageGroup], *,
                        tol: float = 1e-5) -> List[Tuple[str, float]]:
    """Where a model loses G-equivariance, found on an example input: runs
    ``model`` on x and on every Γ(g)x (no_grad, forward hooks on every module)
    and returns [(module name, error)] for the innermost modules whose tensor
    inputs are equivariant or invariant to ``tol`` but whose output is not: a functional
    call in its forward (F.max_pool2d on an even input, a crop), or a module
    convert_convs does not convert. Empty for an equivariant model. A tensor
    counts as equivariant if it is within tol of Γ(g) of the unmoved one, or
    of the unmoved one itself (invariant features, logits); errors are relative
    to the unmoved tensor's largest magnitude. An ``EquiTuned`` wrapper is
    judged as a whole: its backbone sees the |G| transformed copies and is not
    meant to be equivariant itself. Keeps every module's outputs of |G| + 1
    forward passes in memory."""
    group = get_image_group(group)
    names: Dict[int, str] = {}  # named as convert_convs names them: model, model.0, model.0.conv1, ...
    for name, module in model.named_modules():
        names.setdefault(id(module), f"model.{name}" if name else "model")
    runs: List[list] = []

    def hook(module, args, out):
        tensors = [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]
        outs = [o.detach().clone() for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        runs[-1].append((id(module), tensors, outs))

    inside_wrappers = {id(sub) for m in model.modules() if isinstance(m, EquiTuned) for sub in m.modules() if sub is not m}
    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) not in inside_wrappers]
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
    """Largest ``deviation`` of the moved tensors from Γ(k) of the unmoved ones or from the unmoved ones themselves."""
    worst = 0.0
    for a, b in zip(moved, base):
        if not a.is_floating_point() or a.numel() == 0:
            continue
        best = math.inf
        if a.dim() >= 2 and (not group.needs_square or b.shape[-1] == b.shape[-2]):
            moved_b = group.act(b, k)
            if moved_b.shape == a.shape:
                best = deviation(a, moved_b, relative=True)
        if a.shape == b.shape:
            best = min(best, deviation(a, b, relative=True))
        worst = max(worst, best)
    return worst
