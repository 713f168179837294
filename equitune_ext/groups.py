"""Image groups: subgroups of D4 acting on the last two dims of a tensor.

An element is a D4 code ``4 * flip + k`` meaning

    Γ(code) x = torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))

This module is the one place that says which codes make up which group and in
which order. How a code moves pixels, its inverse and compositions are the
geometry of csrc/index.h, read through ``_C`` (``apply_element`` is the same
action in plain PyTorch, the definition the tests check the header against).
"""
from __future__ import annotations

import operator
from typing import Sequence, Tuple, Union

import torch

from . import _C
from .token_groups import TokenGroup

__all__ = ["ImageGroup", "IMAGE_GROUPS", "INVERSE_CODES", "get_image_group", "resolve_group", "apply_element", "source_map",
           "IDENTITY"]

IDENTITY = 0

# Element order is part of the public contract: block g of group_transform is Γ(g)x.
IMAGE_GROUPS = {
    "trivial": (0,),
    "hflip": (0, 4),  # identity, x.flip(-1)
    "vflip": (0, 6),  # identity, x.flip(-2) = rot90(x.flip(-1), 2)
    "rot180": (0, 2),  # identity, rot90(x, 2)
    "c4": (0, 1, 2, 3),  # rot90(x, k), k = 0..3
    "d4": (0, 1, 2, 3, 4, 5, 6, 7),  # then rot90(x.flip(-1), k), k = 0..3
}


def apply_element(x: torch.Tensor, code: int) -> torch.Tensor:
    """Γ(code) x with plain PyTorch (the definition of the action)."""
    if code & 4:
        x = x.flip(-1)
    return torch.rot90(x, code & 3, dims=(-2, -1)) if code & 3 else x


# INVERSE_CODES[c] is the code of Γ(c)⁻¹; COMPOSE_CODES[a][b] that of Γ(a)Γ(b) (b acts first).
INVERSE_CODES = tuple(_C.code_inverse(c) for c in range(8))
COMPOSE_CODES = tuple(tuple(_C.code_compose(a, b) for b in range(8)) for a in range(8))
# SIGNED_PERMS[c] = (axis, reversed): input axis r of Γ(c) reads output axis axis[r], reversed if reversed[r].
SIGNED_PERMS = tuple(_C.signed_perm(c) for c in range(8))
# TRANSPOSES[c]: Γ(c) swaps the two axes (an odd rotation), so an H x W input gives W x H.
TRANSPOSES = tuple(axis[0] != 0 for axis, _ in SIGNED_PERMS)


def source_map(code: int, shape: Sequence[int]) -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[int, ...]]:
    """(A, b) with Γ(code)x [u] = x[A u + b] for a result of shape ``shape``:
    index.h's source_coords, in plain Python so that it can run while
    torch.compile traces a caller (a pybind call cannot be traced)."""
    axis, reversed_ = SIGNED_PERMS[code]
    n = len(axis)
    A = tuple(tuple((-1 if reversed_[r] else 1) if axis[r] == s else 0 for s in range(n)) for r in range(n))
    b = tuple(shape[axis[r]] - 1 if reversed_[r] else 0 for r in range(n))
    return A, b


class ImageGroup:
    """A finite group of rotations/flips of the last two dims.

    Attributes:
        name: the group's name.
        codes: D4 codes of the elements, in the group's element order.
        order: |G|.
        inverse: ``inverse[g]`` is the index of g⁻¹.
        composition: ``composition[g][h]`` is the index of g·h (Γ(g)Γ(h), h acting first).
        inverse_codes: D4 codes of the inverses, in element order.
        needs_square: some element rotates by 90°, so inputs must have H == W.
    """

    kind = "image"  # as TokenGroup.kind = "token": which ops act on it

    def __init__(self, name: str, codes: Sequence[int]):
        try:
            codes = tuple(operator.index(c) for c in codes)
        except TypeError:
            raise TypeError(f"ImageGroup {name!r}: element codes must be integers (4*flip + k), got {codes!r}") from None
        if not codes or codes[0] != IDENTITY:
            raise ValueError(f"ImageGroup {name!r}: the first element must be the identity (code 0), got {codes}")
        if any(not 0 <= c < 8 for c in codes):
            raise ValueError(f"ImageGroup {name!r}: element codes must be in 0..7 (4*flip + k), got {codes}")
        if len(set(codes)) != len(codes):
            raise ValueError(f"ImageGroup {name!r}: repeated element in {codes}")
        index = {c: i for i, c in enumerate(codes)}
        try:
            self.composition: Tuple[Tuple[int, ...], ...] = tuple(
                tuple(index[COMPOSE_CODES[a][b]] for b in codes) for a in codes
            )
        except KeyError:
            raise ValueError(f"ImageGroup {name!r}: codes {codes} are not closed under composition") from None
        self.name = name
        self.codes = codes
        self.order = len(codes)
        self.inverse_codes = tuple(INVERSE_CODES[c] for c in codes)
        self.inverse = tuple(index[c] for c in self.inverse_codes)
        self.needs_square = any(TRANSPOSES[c] for c in codes)

    def __len__(self) -> int:
        return self.order

    def __repr__(self) -> str:
        return f"ImageGroup({self.name!r}, codes={self.codes})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageGroup) and self.codes == other.codes

    def __hash__(self) -> int:
        return hash(self.codes)

    def act(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Γ(g) x for element index g, in plain PyTorch."""
        return apply_element(x, self.codes[g])


_NAMED = {name: ImageGroup(name, codes) for name, codes in IMAGE_GROUPS.items()}


def get_image_group(group: Union[str, ImageGroup]) -> ImageGroup:
    """The ImageGroup for a name or an ImageGroup (returned as is)."""
    if isinstance(group, ImageGroup):
        return group
    if isinstance(group, str):
        try:
            return _NAMED[group]
        except KeyError:
            raise ValueError(f"unknown image group {group!r}; expected one of {sorted(_NAMED)}") from None
    raise TypeError(f"group must be a group name or an ImageGroup, got {type(group).__name__}")


def resolve_group(group: Union[str, ImageGroup, TokenGroup]) -> Union[ImageGroup, TokenGroup]:
    """The group object behind a user's ``group`` argument: a name or an
    ImageGroup (see get_image_group), or a TokenGroup. The public functions
    resolve it once; everything below them takes the resolved group, whose
    ``kind`` ("image" or "token"), ``order`` and ``name`` they read."""
    return group if isinstance(group, TokenGroup) else get_image_group(group)
