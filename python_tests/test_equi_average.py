"""equi_average / EquiTuned / check_equivariance."""
import collections

import pytest
import torch
from torch import nn

import equitune_ext as E
from equitune_ext import reference as R

from conftest import random_tensor


def small_cnn(seed=0, out=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, out))


class FeatureNet(nn.Module):
    """Returns a dict: invariant logits and an equivariant feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        f = self.conv(x)
        return {"features": f, "logits": self.head(f.mean((-2, -1))), "aux": None}


def naive_equi(model, x, group, equivariant):
    """The paper's way: loop over the group, undo, mean."""
    g = E.get_image_group(group)
    outs = [model(g.act(x, k)) for k in range(g.order)]
    if equivariant:
        outs = [g.act(o, g.inverse[k]) for k, o in enumerate(outs)]
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
def test_invariant_matches_naive_and_is_invariant(group):
    model = small_cnn().double()
    x = random_tensor((4, 3, 8, 8), torch.float64)
    out = E.equi_average(model, x, group)
    torch.testing.assert_close(out, naive_equi(model, x, group, False))
    assert E.check_equivariance(lambda t: E.equi_average(model, t, group), x, group) < 1e-10
    assert E.check_equivariance(model, x, group) > 1e-3  # the backbone alone is not invariant


def test_dict_outputs_leaf_by_leaf_and_equivariant_features():
    model = FeatureNet().double()
    x = random_tensor((2, 3, 6, 6), torch.float64)
    inv = E.equi_average(model, x, "d4")
    torch.testing.assert_close(inv["logits"], naive_equi(lambda t: model(t)["logits"], x, "d4", False))
    assert inv["aux"] is None
    eq = E.equi_average(lambda t: model(t)["features"], x, "d4", equivariant=True)
    torch.testing.assert_close(eq, naive_equi(lambda t: model(t)["features"], x, "d4", True))
    assert E.check_equivariance(lambda t: E.equi_average(lambda u: model(u)["features"], t, "d4", equivariant=True), x, "d4", equivariant=True) < 1e-10


def test_tuple_and_namedtuple_outputs():
    Out = collections.namedtuple("Out", "a b")
    model = small_cnn().double()
    x = random_tensor((2, 3, 6, 6), torch.float64)
    out = E.equi_average(lambda t: Out(model(t), model(t) * 2), x, "c4")
    assert isinstance(out, Out)
    torch.testing.assert_close(out.b, 2 * out.a)
    out = E.equi_average(lambda t: [model(t), model(t)], x, "c4")
    assert isinstance(out, list) and len(out) == 2


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_chunk_size_gives_identical_results(chunk_size):
    model = small_cnn()
    x = random_tensor((3, 3, 8, 8), torch.float32)
    ref = E.equi_average(model, x, "d4")
    assert torch.equal(E.equi_average(model, x, "d4", chunk_size=chunk_size), ref)


@pytest.mark.parametrize("group", sorted(E.IMAGE_GROUPS))
@pytest.mark.parametrize("variant", ["mean", "equivariant", "pytree", "weight_net", "max"])
def test_chunked_training_gradients_equal_the_unchunked_call(group, variant):
    """In training each chunk is recomputed in backward (checkpointed); the
    gradients equal the unchunked call's, float64, for a model without
    batch-dependent layers, whatever the outputs and the weighting."""
    torch.manual_seed(0)
    net = {"pytree": FeatureNet, "equivariant": lambda: nn.Conv2d(3, 4, 3, padding=1)}.get(variant, small_cnn)().double()
    scorer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 36, 1)).double() if variant in ("weight_net", "max") else None
    x = random_tensor((2, 3, 6, 6), torch.float64).requires_grad_()
    params = [x, *net.parameters(), *(scorer.parameters() if scorer is not None else [])]

    def grads(chunk_size):
        out = E.equi_average(net, x, group, equivariant=variant == "equivariant", weight_net=scorer,
                             mode="max" if variant == "max" else "mean", chunk_size=chunk_size)
        leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(out) if leaf is not None]
        loss = sum((leaf * torch.linspace(-1, 1, leaf.numel(), dtype=leaf.dtype).view_as(leaf)).sum() for leaf in leaves)
        return torch.autograd.grad(loss, params)

    expected = grads(None)
    for chunk_size in (1, 3):
        for a, b in zip(grads(chunk_size), expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunks_are_recomputed_in_training_only():
    """Each chunk's forward runs again in backward (its activations were not
    kept); under no_grad nothing is recomputed."""
    calls = []
    net = small_cnn()
    counted = lambda t: calls.append(t.shape[0]) or net(t)
    x = random_tensor((2, 3, 6, 6), torch.float32)
    with torch.no_grad():
        E.equi_average(counted, x, "c4", chunk_size=1)
    assert calls == [2] * 4
    calls.clear()
    E.equi_average(counted, x, "c4", chunk_size=2).sum().backward()
    assert calls == [4] * 4  # two chunks of 2 elements, each forward, then each recomputed


def test_chunked_batchnorm_statistics_update_once_per_chunk():
    """With BatchNorm in train mode a chunk is normalized with its own
    statistics and updates the running ones once (as gradient accumulation
    does): the recomputation in backward leaves them alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).double()
    x = random_tensor((3, 3, 6, 6), torch.float64)
    net(x)  # materialize the lazy layer
    twin = __import__("copy").deepcopy(net)
    out = E.equi_average(net, x, "d4", chunk_size=3)
    out.sum().backward()
    xs = E.group_transform(x, "d4")  # the same chunks, by hand, without recomputation
    expected = E.group_average(torch.cat([twin(part) for part in xs.split(9)]), "d4", equivariant=False)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    bn, bn_twin = net[1], twin[1]
    assert int(bn.num_batches_tracked) == int(bn_twin.num_batches_tracked) == 1 + 3  # the priming call + 3 chunks
    torch.testing.assert_close(bn.running_mean, bn_twin.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, bn_twin.running_var, rtol=1e-12, atol=1e-12)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_chunked_second_and_double_backward():
    """Each recomputation enters the running-statistics context again: a second
    backward (retain_graph) and a double backward (a gradient penalty) work and
    equal the unchunked call's, and BatchNorm's statistics still update once per
    chunk of the forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 2)).double()
    x = random_tensor((2, 3, 6, 6), torch.float64).requires_grad_()

    def penalty_grads(chunk_size):
        y = E.equi_average(net, x, "c4", chunk_size=chunk_size)
        g, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [x, *net.parameters()])

    for a, b in zip(penalty_grads(1), penalty_grads(None)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bn_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)).double()
    y = E.equi_average(bn_net, x, "c4", chunk_size=1)
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)
    assert int(bn_net[1].num_batches_tracked) == 4
    g, = torch.autograd.grad(E.equi_average(bn_net, x, "c4", chunk_size=1).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert int(bn_net[1].num_batches_tracked) == 8


def test_weight_net_lambda_equitune_matches_reference_and_trains():
    model = small_cnn().double()
    scorer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1)).double()
    x = random_tensor((4, 3, 8, 8), torch.float64)
    out = E.equi_average(model, x, "c4", weight_net=scorer)
    xs = R.group_transform(x, "c4")
    w = scorer(xs).view(4, 4).softmax(0)
    ref = (model(xs).view(4, 4, -1) * w[..., None]).sum(0)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert scorer[1].weight.grad is not None and scorer[1].weight.grad.abs().sum() > 0


def test_equizero_selects_max_with_straight_through_gradient():
    model = small_cnn().double()
    scorer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1)).double()
    x = random_tensor((3, 3, 8, 8), torch.float64)
    out = E.equi_average(model, x, "c4", weight_net=scorer, mode="max")
    xs = R.group_transform(x, "c4")
    best = scorer(xs).view(4, 3).argmax(0)
    y = model(xs).view(4, 3, -1)
    torch.testing.assert_close(out, y[best, torch.arange(3)])
    out.sum().backward()
    assert scorer[1].weight.grad.abs().sum() > 0  # gradient flows through the soft average


def test_equituned_module_parameters_and_forward():
    backbone, scorer = small_cnn(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1))
    eq = E.EquiTuned(backbone, "c4", weight_net=scorer)
    names = {n for n, _ in eq.named_parameters()}
    assert {"model.0.weight", "weight_net.1.weight"} <= names
    x = random_tensor((2, 3, 8, 8), torch.float32)
    torch.testing.assert_close(eq(x), E.equi_average(backbone, x, "c4", weight_net=scorer))


def test_compile_fullgraph():
    eq = E.EquiTuned(small_cnn(), "d4")
    x = random_tensor((2, 3, 8, 8), torch.float32)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(eq, fullgraph=True, backend="aot_eager")(x), eq(x))


def test_autocast_bfloat16_cpu():
    eq = E.EquiTuned(small_cnn(), "c4")
    x = random_tensor((2, 3, 8, 8), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eq(x)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), eq(x), atol=5e-2, rtol=5e-2)


def test_channels_last_model_and_input():
    model = small_cnn().to(memory_format=torch.channels_last)
    x = random_tensor((2, 3, 8, 8), torch.float32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(E.equi_average(model, x, "d4"), E.equi_average(small_cnn(), x.contiguous(), "d4"))


def test_bad_input():
    model = small_cnn()
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="leading dim 1, expected"):
        E.equi_average(lambda t: model(t)[:1], x, "c4")
    with pytest.raises(TypeError, match="str leaf"):
        E.equi_average(lambda t: (model(t), "text"), x, "c4")

    class DynamicCache:  # what an HF causal LM returns with use_cache=True
        pass

    with pytest.raises(TypeError, match="DynamicCache leaf.*use_cache=False"):
        E.equi_average(lambda t: {"logits": model(t), "cache": DynamicCache()}, x, "c4")
    for bad in (-1, 0, float("inf"), float("nan"), 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            E.equi_average(model, x, "c4", chunk_size=bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        E.equi_average(model, x, "c4", mode="median")
    with pytest.raises(ValueError, match="needs a weight_net"):
        E.equi_average(model, x, "c4", mode="max")
    with pytest.raises(ValueError, match="weight_net must return scores"):
        E.equi_average(model, x, "c4", weight_net=lambda t: torch.zeros(t.shape[0], 2))
