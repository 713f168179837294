"""Image and volume groups: subgroups of D4 acting on the last two dims of a
tensor, and subgroups of the cube's 48 symmetries (Oh) acting on the last three.

An image element is a D4 code ``4 * flip + k`` meaning

    Γ(code) x = torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))

a volume element a cube code ``8 * perm + bits`` meaning

    Γ(code) x = x.flip(flipped dims).permute(..., *CUBE_PERMS[perm])   (on the last three dims)

with bit 0 flipping W (dim -1), bit 1 H (-2), bit 2 D (-3), flips first, and
CUBE_PERMS the permutations of (0, 1, 2) in lexicographic order (output axis s
shows input axis CUBE_PERMS[perm][s]). Codes 0..7 are the pure flips.

This module is the one place that says which codes make up which group and in
which order. How a code moves pixels, its inverse and compositions are the
geometry of csrc/index.h, read through ``_C`` (``apply_element`` and
``apply_volume_element`` are the same action in plain PyTorch, the definitions
the tests check the header against).
"""
from __future__ import annotations

import itertools
import operator
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from . import _C
from .token_groups import TokenGroup

__all__ = ["ImageGroup", "VolumeGroup", "IMAGE_GROUPS", "VOLUME_GROUPS", "INVERSE_CODES", "get_image_group",
           "resolve_group", "apply_element", "apply_volume_element", "source_map", "IDENTITY", "CodeTables",
           "IMAGE_TABLES", "VOLUME_TABLES"]

IDENTITY = 0


def apply_element(x: torch.Tensor, code: int) -> torch.Tensor:
    """Γ(code) x with plain PyTorch for a D4 code (the definition of the action)."""
    if code & 4:
        x = x.flip(-1)
    return torch.rot90(x, code & 3, dims=(-2, -1)) if code & 3 else x


CUBE_PERMS = tuple(itertools.permutations(range(3)))  # lexicographic, identity first


def apply_volume_element(x: torch.Tensor, code: int) -> torch.Tensor:
    """Γ(code) x with plain PyTorch for a cube code (the definition of the action)."""
    flipped = [dim for bit, dim in ((1, -1), (2, -2), (4, -3)) if code & bit]
    if flipped:
        x = x.flip(flipped)
    if code >> 3:
        lead = x.dim() - 3
        x = x.permute(*range(lead), *(lead + axis for axis in CUBE_PERMS[code >> 3]))
    return x


class CodeTables(NamedTuple):
    """The geometry of one code space (D4: 2 spatial dims, the cube: 3), read
    from csrc/index.h."""
    spatial_dims: int
    inverse: Tuple[int, ...]  # inverse[c]: the code of Γ(c)⁻¹
    compose: Tuple[Tuple[int, ...], ...]  # compose[a][b]: the code of Γ(a)Γ(b) (b acts first)
    # signed_perms[c] = (axis, reversed): input axis r of Γ(c) reads output axis axis[r], reversed if reversed[r]
    signed_perms: tuple
    permutes: Tuple[bool, ...]  # Γ(c) permutes the axes, so all spatial extents must agree
    apply: Callable[[torch.Tensor, int], torch.Tensor]  # the action in plain PyTorch

    @property
    def num_codes(self) -> int:
        return len(self.inverse)


def _code_tables(spatial_dims: int, num_codes: int, apply) -> CodeTables:
    codes = range(num_codes)
    perms = tuple(_C.signed_perm(c, spatial_dims) for c in codes)
    return CodeTables(
        spatial_dims,
        tuple(_C.code_inverse(c, spatial_dims) for c in codes),
        tuple(tuple(_C.code_compose(a, b, spatial_dims) for b in codes) for a in codes),
        perms,
        tuple(list(axis) != sorted(axis) for axis, _ in perms),
        apply,
    )


IMAGE_TABLES = _code_tables(2, 8, apply_element)
VOLUME_TABLES = _code_tables(3, 48, apply_volume_element)
# The D4 tables by their names (conv.py, contract.py and the Triton kernels read them).
INVERSE_CODES, COMPOSE_CODES, SIGNED_PERMS = IMAGE_TABLES.inverse, IMAGE_TABLES.compose, IMAGE_TABLES.signed_perms
TRANSPOSES = IMAGE_TABLES.permutes  # Γ(c) swaps the two axes (an odd rotation): an H x W input gives W x H


def _determinant(code: int) -> int:
    """det of Γ(code) as a matrix: the sign of its axis permutation times its reversals' signs."""
    axis, reversed_ = VOLUME_TABLES.signed_perms[code]
    inversions = sum(axis[i] > axis[j] for i in range(3) for j in range(i + 1, 3))
    return (-1) ** (inversions + sum(reversed_))


# Element order is part of the public contract: block g of group_transform is Γ(g)x.
IMAGE_GROUPS = {
    "trivial": (0,),
    "hflip": (0, 4),  # identity, x.flip(-1)
    "vflip": (0, 6),  # identity, x.flip(-2) = rot90(x.flip(-1), 2)
    "rot180": (0, 2),  # identity, rot90(x, 2)
    "c4": (0, 1, 2, 3),  # rot90(x, k), k = 0..3
    "d4": (0, 1, 2, 3, 4, 5, 6, 7),  # then rot90(x.flip(-1), k), k = 0..3
}
VOLUME_GROUPS = {
    # element i flips W if i & 1, H if i & 2, D if i & 4 (nnU-Net's test-time mirroring)
    "flip3d": tuple(range(8)),
    # the 24 rotations of the cube (det +1), in code order
    "o": tuple(c for c in range(48) if _determinant(c) == 1),
    # all 48 symmetries in code order: for each axis permutation in CUBE_PERMS' order, its 8 flips as in flip3d
    "oh": tuple(range(48)),
}


def source_map(code: int, shape: Sequence[int]) -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[int, ...]]:
    """(A, b) with Γ(code)x [u] = x[A u + b] for a result of shape ``shape``:
    index.h's source_coords, in plain Python so that it can run while
    torch.compile traces a caller (a pybind call cannot be traced)."""
    axis, reversed_ = SIGNED_PERMS[code]
    n = len(axis)
    A = tuple(tuple((-1 if reversed_[r] else 1) if axis[r] == s else 0 for s in range(n)) for r in range(n))
    b = tuple(shape[axis[r]] - 1 if reversed_[r] else 0 for r in range(n))
    return A, b


class _SignedPermGroup:
    """A finite group of signed permutations of a tensor's last dims (rotations
    and flips): ImageGroup (D4 codes, the last two dims) and VolumeGroup (cube
    codes, the last three).

    Attributes:
        name: the group's name.
        codes: codes of the elements, in the group's element order.
        order: |G|.
        inverse: ``inverse[g]`` is the index of g⁻¹.
        composition: ``composition[g][h]`` is the index of g·h (Γ(g)Γ(h), h acting first).
        inverse_codes: codes of the inverses, in element order.
        needs_square: some element permutes the axes (a 90-degree rotation), so
            all spatial extents must agree (H == W; volumes D == H == W).
    """

    kind: str  # which ops act on it: "image" or "volume" (TokenGroup.kind = "token")
    tables: CodeTables
    _code_form: str  # how codes are formed, for messages

    def __init__(self, name: str, codes: Sequence[int]):
        cls, n = type(self).__name__, self.tables.num_codes
        try:
            codes = tuple(operator.index(c) for c in codes)
        except TypeError:
            raise TypeError(f"{cls} {name!r}: element codes must be integers ({self._code_form}), got {codes!r}") from None
        if not codes or codes[0] != IDENTITY:
            raise ValueError(f"{cls} {name!r}: the first element must be the identity (code 0), got {codes}")
        if any(not 0 <= c < n for c in codes):
            raise ValueError(f"{cls} {name!r}: element codes must be in 0..{n - 1} ({self._code_form}), got {codes}")
        if len(set(codes)) != len(codes):
            raise ValueError(f"{cls} {name!r}: repeated element in {codes}")
        index = {c: i for i, c in enumerate(codes)}
        try:
            self.composition: Tuple[Tuple[int, ...], ...] = tuple(
                tuple(index[self.tables.compose[a][b]] for b in codes) for a in codes
            )
        except KeyError:
            raise ValueError(f"{cls} {name!r}: codes {codes} are not closed under composition") from None
        self.name = name
        self.codes = codes
        self.order = len(codes)
        self.inverse_codes = tuple(self.tables.inverse[c] for c in codes)
        self.inverse = tuple(index[c] for c in self.inverse_codes)
        self.needs_square = any(self.tables.permutes[c] for c in codes)

    def __len__(self) -> int:
        return self.order

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, codes={self.codes})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self.codes == other.codes

    def __hash__(self) -> int:
        return hash((self.kind, self.codes))

    def apply(self, x: torch.Tensor, code: int) -> torch.Tensor:
        """Γ(code) x for a code of this group's code space, in plain PyTorch."""
        return self.tables.apply(x, code)

    def act(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Γ(g) x for element index g, in plain PyTorch."""
        return self.tables.apply(x, self.codes[g])


class ImageGroup(_SignedPermGroup):
    """A finite group of rotations/flips of the last two dims (a subgroup of D4)."""

    kind = "image"
    tables = IMAGE_TABLES
    _code_form = "4*flip + k"


class VolumeGroup(_SignedPermGroup):
    """A finite group of rotations/flips of the last three dims [D, H, W] (a
    subgroup of the cube's symmetries Oh)."""

    kind = "volume"
    tables = VOLUME_TABLES
    _code_form = "8*perm + flip bits"


_NAMED = {**{name: ImageGroup(name, codes) for name, codes in IMAGE_GROUPS.items()},
          **{name: VolumeGroup(name, codes) for name, codes in VOLUME_GROUPS.items()}}


def get_image_group(group: Union[str, ImageGroup, VolumeGroup], kind: Optional[str] = None) -> Union[ImageGroup, VolumeGroup]:
    """The ImageGroup or VolumeGroup for a name, or such a group (returned as
    is); ``kind="image"`` for callers that act on the last two dims only."""
    if isinstance(group, _SignedPermGroup):
        g = group
    elif isinstance(group, str):
        try:
            g = _NAMED[group]
        except KeyError:
            raise ValueError(f"unknown image group {group!r}; expected one of {sorted(_NAMED)}") from None
    else:
        raise TypeError(f"group must be a group name, an ImageGroup or a VolumeGroup, got {type(group).__name__}")
    if kind is not None and g.kind != kind:
        raise ValueError(f"group {g.name!r} is a {g.kind} group; this needs an {kind} group (one of {sorted(IMAGE_GROUPS)}"
                         " or an ImageGroup)")
    return g


def resolve_group(group: Union[str, ImageGroup, VolumeGroup, TokenGroup]) -> Union[ImageGroup, VolumeGroup, TokenGroup]:
    """The group object behind a user's ``group`` argument: a name, an
    ImageGroup or a VolumeGroup (see get_image_group), or a TokenGroup. The
    public functions resolve it once; everything below them takes the resolved
    group, whose ``kind`` ("image", "volume" or "token"), ``order`` and
    ``name`` they read."""
    return group if isinstance(group, TokenGroup) else get_image_group(group)
