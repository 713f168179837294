"""Canonicalized equi-tuning (mode="canonical") and equizero's single-call inference (mode="max")."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equitune_ext as E
from equitune_ext import canonical

from conftest import random_tensor


def backbone(seed=0, out=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, out))


def feature_map(seed=0):
    """An equivariant-output backbone: a feature map [B, 4, H, W]."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1))


def scorer(seed=1, size=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * (size // 2) ** 2, 1))


class Counted(nn.Module):
    """The backbone, recording the rows of each call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.model(x)


def brute_force(model, weight_net, x, group, equivariant):
    """Per example: every transform scored alone, the first maximum, the backbone on it alone."""
    g = E.get_image_group(group)
    outs = []
    for xb in x.split(1):
        scores = torch.cat([weight_net(g.act(xb, k)).reshape(1) for k in range(g.order)])
        best = int(torch.nonzero(scores == scores.max())[0])
        y = model(g.act(xb, best))
        outs.append(g.act(y, g.inverse[best]) if equivariant else y)
    return torch.cat(outs)


def test_selection_is_the_first_maximum_in_element_order():
    scores = torch.tensor([[0.0, 3.0, 1.0], [2.0, 3.0, 1.0], [2.0, 1.0, 1.0], [1.0, 3.0, 1.0]])
    assert canonical.first_max(scores).tolist() == [1, 0, 0]
    # A constant scorer ties every element: the identity (element 0) is selected, the output is model(x).
    model, x = backbone(), random_tensor((3, 3, 8, 8), torch.float32)
    out = E.equi_average(model, x, "d4", weight_net=lambda t: torch.zeros(t.shape[0]), mode="canonical")
    assert torch.equal(out, model(x))


@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
@pytest.mark.parametrize("equivariant", [False, True])
def test_output_is_the_brute_force_selection(group, equivariant):
    model = (feature_map() if equivariant else backbone()).double()
    weight_net = scorer().double()
    x = random_tensor((5, 3, 8, 8), torch.float64)
    out = E.equi_average(model, x, group, weight_net=weight_net, mode="canonical", equivariant=equivariant)
    torch.testing.assert_close(out, brute_force(model, weight_net, x, group, equivariant), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", ["c4", "d4"])
@pytest.mark.parametrize("equivariant", [False, True])
def test_exactly_invariant_or_equivariant_in_eval(group, equivariant):
    """float32, random inputs (no element fixes them, no tied scores)."""
    net = E.EquiTuned(feature_map() if equivariant else backbone(), group, weight_net=scorer(), mode="canonical",
                      equivariant=equivariant).eval()
    x = random_tensor((6, 3, 8, 8), torch.float32)
    assert E.check_equivariance(net, x, group, equivariant=equivariant) <= 1e-5
    assert E.check_equivariance(net.model, x, group, equivariant=equivariant) > 1e-3  # the backbone alone is not


@pytest.mark.parametrize("equivariant", [False, True])
def test_volume_group_exact_in_eval(equivariant):
    """The cube's rotations: one backbone call on B rows, exactly invariant / equivariant."""
    torch.manual_seed(0)
    if equivariant:
        model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 3, 3, padding=1))
    else:
        model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 5))
    weight_net = nn.Sequential(nn.Conv3d(2, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 ** 3, 1))
    counted = Counted(model)
    net = E.EquiTuned(counted, "o", weight_net=weight_net, mode="canonical", equivariant=equivariant).eval()
    x = random_tensor((3, 2, 6, 6, 6), torch.float32)
    with torch.no_grad():
        net(x)
    assert counted.rows == [3]
    assert E.check_equivariance(net, x, "o", equivariant=equivariant) <= 1e-5


@pytest.mark.parametrize("equivariant", [False, True])
def test_inputs_fixed_by_an_element_give_consistent_outputs(equivariant):
    """x = x + rot180(x) ties the scores of g and g·rot180: the first maximum
    selects the same input for every rotation of x, and equivariant outputs
    are averaged over the tied elements, so both stay exact."""
    g = E.get_image_group("c4")
    x = random_tensor((4, 3, 8, 8), torch.float32)
    x = x + g.act(x, 2)
    weight_net = scorer()
    scores = weight_net(E.group_transform(x, g)).reshape(4, 4)
    assert torch.equal(scores[0], scores[2]) and torch.equal(scores[1], scores[3])
    net = E.EquiTuned(feature_map() if equivariant else backbone(), g, weight_net=weight_net, mode="canonical",
                      equivariant=equivariant).eval()
    deviation = E.check_equivariance(net, x, g, equivariant=equivariant)
    assert deviation == 0.0 if not equivariant else deviation <= 1e-6
    # a fully c4-symmetric input: every score ties, and the output is the group average of the backbone's
    x = x + g.act(x, 1)  # (x + r²x) + (rx + r³x): every rotation sums the same two halves, so exactly symmetric
    assert all(torch.equal(g.act(x, k), x) for k in range(4))
    assert E.check_equivariance(net, x, g, equivariant=equivariant) <= 1e-6


@pytest.mark.parametrize("train", [True, False])
def test_one_backbone_call_on_b_rows(train):
    counted = Counted(backbone())
    net = E.EquiTuned(counted, "d4", weight_net=scorer(), mode="canonical").train(train)
    x = random_tensor((3, 3, 8, 8), torch.float32)
    with torch.set_grad_enabled(train):
        out = net(x)
    if train:
        (out.sum() + net.prior_loss()).backward()
    assert counted.rows == [3] and out.shape == (3, 5)


def test_scorer_gets_the_straight_through_gradient_in_training():
    """The training value is the hard selection, bit for bit; the scorer's
    gradient is that of the soft input mixture Σ_g p_g Γ(g) x at the selected
    input: dL/dp_g = <∇_input L, Γ(g) x>, through the softmax to the scorer."""
    torch.manual_seed(0)
    model, weight_net, g = backbone().double(), scorer().double(), E.get_image_group("c4")
    x = random_tensor((4, 3, 8, 8), torch.float64)
    target = torch.randint(0, 5, (4,))
    out = E.equi_average(model, x, g, weight_net=weight_net, mode="canonical")
    with torch.no_grad():
        assert torch.equal(out, E.equi_average(model, x, g, weight_net=weight_net, mode="canonical"))
    params = list(weight_net.parameters())
    got = torch.autograd.grad(F.cross_entropy(out, target), params)
    assert all(t.abs().sum() > 0 for t in got)

    xs = E.group_transform(x, g)
    scores = weight_net(xs).reshape(4, 4)
    best = scores.argmax(0)
    selected = xs.reshape(4, 4, 3, 8, 8)[best, torch.arange(4)].requires_grad_()
    (input_grad,) = torch.autograd.grad(F.cross_entropy(model(selected), target), selected)
    dl_dp = (xs.reshape(4, 4, -1) * input_grad.reshape(1, 4, -1)).sum(-1)
    expected = torch.autograd.grad(scores.softmax(0), params, dl_dp)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_prior_loss_value_and_gradient():
    weight_net, g = scorer().double(), E.get_image_group("d4")
    x = random_tensor((5, 3, 8, 8), torch.float64)
    out, prior = E.equi_average(backbone().double(), x, g, weight_net=weight_net, mode="canonical", return_prior_loss=True)
    scores = weight_net(E.group_transform(x, g)).reshape(8, 5)
    expected = -scores.log_softmax(0)[0].mean()  # cross-entropy towards element 0, the identity
    torch.testing.assert_close(prior, expected, rtol=1e-12, atol=1e-12)
    params = list(weight_net.parameters())
    for a, b in zip(torch.autograd.grad(prior, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    net = E.EquiTuned(backbone().double(), g, weight_net=weight_net, mode="canonical")
    with pytest.raises(RuntimeError, match="call the model first"):
        net.prior_loss()
    net(x)
    torch.testing.assert_close(net.prior_loss(), expected, rtol=1e-12, atol=1e-12)
    # Training steps on the prior alone make the scorer prefer the identity of upright data.
    opt = torch.optim.SGD(weight_net.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        net(x)
        net.prior_loss().backward()
        opt.step()
    assert net.prior_loss() < 0.5 * expected.item()
    copy.deepcopy(net)  # the kept prior's graph does not travel with the module


@pytest.mark.parametrize("mode, equivariant", [("canonical", False), ("canonical", True), ("max", False)])
def test_compiles_fullgraph_in_eval(mode, equivariant):
    net = E.EquiTuned(feature_map() if equivariant else backbone(), "d4", weight_net=scorer(), mode=mode,
                      equivariant=equivariant).eval()
    x = random_tensor((3, 3, 8, 8), torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = net(x)
        expected_prior = net.prior_loss() if mode == "canonical" else None
        torch.testing.assert_close(compiled(x), expected)
    if mode == "canonical":  # the compiled forward keeps its prior on the module too
        torch.testing.assert_close(net.prior_loss(), expected_prior)


@pytest.mark.parametrize("equivariant", [False, True])
def test_max_mode_inference_is_one_call_with_the_all_rows_value(equivariant):
    counted = Counted(feature_map() if equivariant else backbone())
    net = E.EquiTuned(counted, "d4", weight_net=scorer(), mode="max", equivariant=equivariant).eval()
    x = random_tensor((4, 3, 8, 8), torch.float32)
    all_rows = net(x)  # a gradient is recorded: equizero's definition, all |G|·B rows
    with torch.no_grad():
        single = net(x)
    torch.testing.assert_close(single, all_rows.detach(), rtol=1e-6, atol=1e-6)
    assert counted.rows == [32, 4]
    assert E.check_equivariance(net, x, "d4", equivariant=equivariant) <= 1e-5
    net.train()  # a backbone in train mode keeps the all-rows path (its batch statistics would see B rows)
    counted.rows.clear()
    with torch.no_grad():
        net(x)
    assert counted.rows == [32]


def test_bad_combinations_raise_clearly():
    model, x = backbone(), random_tensor((2, 3, 8, 8), torch.float32)
    with pytest.raises(ValueError, match="canonical.*needs a weight_net"):
        E.equi_average(model, x, "c4", mode="canonical")
    with pytest.raises(ValueError, match="chunk_size.*does not apply"):
        E.equi_average(model, x, "c4", weight_net=scorer(), mode="canonical", chunk_size=1)
    with pytest.raises(ValueError, match="samples"):
        E.equi_average(model, x, "c4", weight_net=scorer(), mode="canonical", samples=2)
    with pytest.raises(ValueError, match="samples"):
        E.EquiTuned(model, "c4", weight_net=scorer(), mode="canonical", train_samples=1)
    with pytest.raises(ValueError, match="return_prior_loss=True needs mode='canonical'"):
        E.equi_average(model, x, "c4", weight_net=scorer(), mode="max", return_prior_loss=True)
    with pytest.raises(ValueError, match="prior_loss\\(\\) regularizes"):
        E.EquiTuned(model, "c4", weight_net=scorer(), mode="max").prior_loss()
    tg = E.TokenGroup.from_cycles(10, [[1, 2]])
    with pytest.raises(NotImplementedError, match="canonical.*needs an image or volume group"):
        E.EquiTuned(nn.Embedding(10, 4), tg, weight_net=nn.Linear(4, 1), mode="canonical")
    with pytest.raises(ValueError, match="leading dim 1, expected B"):
        E.equi_average(lambda t: model(t)[:1], x, "c4", weight_net=scorer(), mode="canonical")
    with pytest.raises(ValueError, match="weight_net must return scores"):
        E.equi_average(model, x, "c4", weight_net=lambda t: torch.zeros(t.shape[0], 2), mode="canonical")
