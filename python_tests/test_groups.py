"""Group definitions: element order (the public contract), axioms, tables."""
import pytest
import torch

import equitune_ext as E
from equitune_ext.groups import apply_element

from conftest import random_tensor

EXPECTED = {
    "trivial": [lambda x: x],
    "hflip": [lambda x: x, lambda x: x.flip(-1)],
    "vflip": [lambda x: x, lambda x: x.flip(-2)],
    "rot180": [lambda x: x, lambda x: torch.rot90(x, 2, (-2, -1))],
    "c4": [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in range(4)],
    "d4": [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    + [lambda x, k=k: torch.rot90(x.flip(-1), k, dims=(-2, -1)) for k in range(4)],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_element_order_is_the_contract(name):
    g = E.get_image_group(name)
    x = random_tensor((2, 3, 5, 5), torch.float32)
    assert g.order == len(g) == len(EXPECTED[name])
    for k, f in enumerate(EXPECTED[name]):
        assert torch.equal(g.act(x, k), f(x))
    out = E.group_transform(x, name)
    for k, f in enumerate(EXPECTED[name]):
        assert torch.equal(out[k * 2 : (k + 1) * 2], f(x))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_group_axioms(name):
    g = E.get_image_group(name)
    n = g.order
    x = random_tensor((1, 1, 4, 4), torch.float32)
    assert g.codes[0] == 0 and g.composition[0] == tuple(range(n))
    for a in range(n):
        assert g.composition[a][g.inverse[a]] == 0 and g.composition[g.inverse[a]][a] == 0
        assert sorted(g.composition[a]) == list(range(n))  # Latin square: each row a permutation
        for b in range(n):
            assert torch.equal(g.act(g.act(x, b), a), g.act(x, g.composition[a][b]))
            for c in range(n):  # associativity
                assert g.composition[g.composition[a][b]][c] == g.composition[a][g.composition[b][c]]


def test_custom_group_and_validation():
    g = E.ImageGroup("rot180-again", [0, 2])
    assert g == E.get_image_group("rot180")
    assert E.get_image_group(g) is g
    with pytest.raises(ValueError, match="not closed"):
        E.ImageGroup("bad", [0, 1])
    with pytest.raises(ValueError, match="identity"):
        E.ImageGroup("bad", [1, 0])
    with pytest.raises(ValueError, match="0..7"):
        E.ImageGroup("bad", [0, 9])
    with pytest.raises(ValueError, match="repeated"):
        E.ImageGroup("bad", [0, 2, 2])
    with pytest.raises(ValueError, match="unknown image group"):
        E.get_image_group("c8")
    with pytest.raises(TypeError):
        E.get_image_group(4)


def test_apply_element_covers_d4():
    x = torch.arange(9).view(3, 3)
    images = {tuple(apply_element(x, c).flatten().tolist()) for c in range(8)}
    assert len(images) == 8


@pytest.mark.parametrize("shape", [(3, 3), (4, 6), (1, 5)])
def test_header_geometry_is_the_action(shape):
    """csrc/index.h, read through _C, is the one home of the geometry: its map of
    every code moves pixels as apply_element does, and its inverse and
    composition tables agree with applying the elements."""
    from equitune_ext import _C
    from equitune_ext.groups import COMPOSE_CODES, INVERSE_CODES, TRANSPOSES, source_map

    H, W = shape
    x = torch.arange(H * W).view(H, W)
    for code in range(8):
        if H != W and code % 2:
            continue
        a0, ai, aj, b0, bi, bj = _C.source_coords(code, H, W)
        out = apply_element(x, code)
        assert source_map(code, out.shape) == (((ai, aj), (bi, bj)), (a0, b0))
        assert TRANSPOSES[code] == (code % 2 == 1)
        i = torch.arange(out.shape[0]).view(-1, 1)
        j = torch.arange(out.shape[1]).view(1, -1)
        assert torch.equal(out, x[a0 + ai * i + aj * j, b0 + bi * i + bj * j]), code
        axis, reversed_ = _C.signed_perm(code)
        assert (axis[0] != 0) == TRANSPOSES[code] and ai + aj == (-1 if reversed_[0] else 1)
        if H == W:
            assert torch.equal(apply_element(out, INVERSE_CODES[code]), x)
            for other in range(8):
                assert torch.equal(apply_element(apply_element(x, other), code), apply_element(x, COMPOSE_CODES[code][other]))
    with pytest.raises(RuntimeError, match="out of range"):
        _C.code_inverse(8)
