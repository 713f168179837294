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
