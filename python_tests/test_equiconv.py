"""EquiConv: equals its definition on every configuration (fast, combined and
general paths); fast path exactly where it commutes."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equitune_ext as E

from conftest import random_tensor


def definition(conv: nn.Conv2d, x: torch.Tensor, group) -> torch.Tensor:
    """(1/|G|) Σ_g Γ(g)⁻¹ C(Γ(g) x), naively."""
    g = E.get_image_group(group)
    outs = [g.act(conv(g.act(x, k)), g.inverse[k]) for k in range(g.order)]
    return torch.stack(outs).mean(0)


CONFIGS = [
    # (kernel, stride, padding, dilation, groups, bias, padding_mode, size)
    (3, 1, 1, 1, 1, True, "zeros", 8),
    (3, 1, 1, 1, 1, True, "zeros", 7),
    (3, 2, 1, 1, 1, True, "zeros", 9),  # (9 + 2 - 2 - 1) % 2 == 0: commutes
    (3, 2, 1, 1, 1, False, "zeros", 8),  # stride 2 on an even input: general path
    (4, 1, 1, 1, 1, True, "zeros", 8),  # even kernel, (8 + 2 - 3 - 1) % 1 == 0
    (4, 2, 2, 1, 2, True, "zeros", 8),
    (3, 1, "same", 1, 1, True, "zeros", 8),
    (4, 1, "same", 1, 1, True, "zeros", 8),  # asymmetric 'same' padding: general path
    (3, 1, "valid", 2, 1, True, "zeros", 9),
    (3, 1, 1, 1, 1, True, "reflect", 8),
    (3, 1, 2, 1, 1, True, "replicate", 8),
    (3, 1, 1, 1, 1, True, "circular", 8),
    (5, 3, 2, 1, 1, True, "zeros", 10),
    ((3, 3), (1, 1), (1, 1), (2, 2), 1, True, "zeros", 8),
    (7, 2, 3, 1, 1, False, "zeros", 16),  # ResNet stem on an even input: 8x8 combined kernel
    (1, 2, 0, 1, 1, False, "zeros", 8),  # ResNet shortcut: 2x2 combined kernel
    (3, 2, 1, 1, 1, True, "reflect", 8),  # every padding mode on the combined path
    (3, 2, 2, 1, 1, True, "replicate", 8),
    (3, 3, 1, 1, 1, True, "circular", 8),
    (4, 2, 1, 1, 1, True, "reflect", 7),
    (3, 2, 1, 2, 1, True, "zeros", 9),  # dilated and strided: general where |G| convolutions are cheaper
    (3, 2, (1, 1), 1, 2, True, "zeros", 8),
]


@pytest.mark.parametrize("group", ["hflip", "vflip", "rot180", "c4", "d4"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_definition_forward_and_grads(group, cfg):
    k, s, p, d, groups, bias, mode, size = cfg
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, k, s, p, d, groups, bias, mode).double()
    eq = E.EquiConv.from_conv(conv, group)
    x = random_tensor((2, 4, size, size), torch.float64).requires_grad_()
    out = eq(x)
    ref = definition(conv, x, group)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    g_eq = torch.autograd.grad(out, [x, eq.weight] + ([eq.bias] if bias else []), grad)
    g_ref = torch.autograd.grad(ref, [x, conv.weight] + ([conv.bias] if bias else []), grad)
    for a, b in zip(g_eq, g_ref):
        torch.testing.assert_close(a, b)
    assert E.check_equivariance(eq, x.detach(), group, equivariant=True) < 1e-10


@pytest.mark.parametrize("group", ["hflip", "vflip", "c4"])
def test_non_square_kernels_and_inputs(group):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 5), 1, (1, 2)).double()
    eq = E.EquiConv.from_conv(conv, group)
    if group == "c4":
        x = random_tensor((1, 3, 8, 8), torch.float64)
        torch.testing.assert_close(eq(x), definition(conv, x, group))
        assert eq.last_path == "combined"  # a 3x5 kernel and its transpose: one 5x5 combined kernel
    else:
        x = random_tensor((1, 3, 6, 9), torch.float64)
        torch.testing.assert_close(eq(x), definition(conv, x, group))
        assert eq.last_path == "fast"


def test_fast_path_is_taken_exactly_when_it_commutes():
    """Brute force over small configurations: the fast path runs iff the
    single convolution with the group-averaged filter (explicit rot90/flips of
    the weight) equals the definition."""
    torch.manual_seed(0)
    for group, k, s, p, size in itertools.product(["hflip", "c4", "d4"], [2, 3], [1, 2, 3], [0, 1, 2], [6, 7]):
        conv = nn.Conv2d(2, 2, k, s, p).double()
        eq = E.EquiConv.from_conv(conv, group)
        x = random_tensor((1, 2, size, size), torch.float64)
        if (size + 2 * p - k) // s + 1 <= 0:
            continue
        ref = definition(conv, x, group)
        g = E.get_image_group(group)
        averaged = torch.stack([g.act(conv.weight, j) for j in range(g.order)]).mean(0)
        single = conv._conv_forward(x, averaged, conv.bias)
        commutes = single.shape == ref.shape and torch.allclose(single, ref)
        torch.testing.assert_close(eq(x), ref)
        assert (eq.last_path == "fast") == commutes, (group, k, s, p, size)


MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("group", ["hflip", "vflip", "rot180", "c4", "d4"])
def test_brute_force_grid_float64(group):
    """Every path equals the definition to 1e-12 over kernels 1-4 (and non-square
    ones), strides 1-3, paddings 0-2 and 'same', dilations 1-2, every padding
    mode, even and odd inputs (forward; gradients on a subset below)."""
    torch.manual_seed(0)
    g = E.get_image_group(group)
    kernels = [1, 2, 3, 4] + ([] if g.needs_square else [(2, 3), (3, 1), (4, 3)])
    paths = set()
    for k, s, p, d, mode, size in itertools.product(kernels, [1, 2, 3], [0, 1, 2, "same"], [1, 2], MODES, [5, 6, 7, 8]):
        if p == "same" and s != 1 or mode != "zeros" and p in (0, "same") or mode != "zeros" and d == 2:
            continue
        conv = nn.Conv2d(2, 3, k, s, p, d, padding_mode=mode).double()
        x = random_tensor((1, 2, size, size + (0 if g.needs_square else 1)), torch.float64, seed=size)
        try:
            ref = definition(conv, x, group)
        except RuntimeError:  # no output (kernel larger than the padded input)
            continue
        eq = E.EquiConv.from_conv(conv, group)
        torch.testing.assert_close(eq(x), ref, atol=1e-12, rtol=1e-12, msg=lambda m: f"{(k, s, p, d, mode, size)}: {m}")
        paths.add(eq.last_path)
    assert {"fast", "combined"} <= paths


@pytest.mark.parametrize("group", ["hflip", "c4", "d4"])
@pytest.mark.parametrize("cfg", [(3, 2, 1, 1), (4, 1, "same", 1), (3, 3, 1, 1), (2, 2, 0, 2), ((3, 2), 2, (1, 0), 1)],
                         ids=str)
def test_float32_channels_last_and_gradients(group, cfg):
    """float32 (contiguous and channels_last) within float32 rounding of the
    float64 definition, input and weight gradients included."""
    k, s, p, d = cfg
    if group != "hflip" and isinstance(k, tuple):
        k, p = 3, 1
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, k, s, p, d, groups=2).double()
    x64 = random_tensor((2, 4, 10, 10), torch.float64).requires_grad_()
    ref = definition(conv, x64, group)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, [x64, conv.weight, conv.bias], grad)
    conv32 = nn.Conv2d(4, 6, k, s, p, d, groups=2)
    conv32.load_state_dict(conv.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        eq = E.EquiConv.from_conv(conv32, group).to(memory_format=fmt)
        x = x64.detach().float().contiguous(memory_format=fmt).requires_grad_()
        out = eq(x)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
        got = torch.autograd.grad(out, [x, eq.weight, eq.bias], grad.float())
        for a, b in zip(got, g_ref):
            torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=1e-5)


def test_gradcheck_combined_path():
    torch.manual_seed(0)
    eq = E.EquiConv(2, 2, 3, stride=2, padding=1, group="d4").double()
    x = random_tensor((1, 2, 6, 6), torch.float64).requires_grad_()
    eq(x)
    assert eq.last_path == "combined"
    params = (eq.weight.detach().requires_grad_(), eq.bias.detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w, b: _with_params(eq, x, w, b), (x, *params))


def _with_params(module, x, weight, bias):
    """module(x) with weight and bias given as arguments (for gradcheck)."""
    return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))


def _definition_of(eq, x):
    conv = nn.Conv2d(eq.in_channels, eq.out_channels, eq.kernel_size, eq.stride, eq.padding, eq.dilation, eq.groups,
                     eq.bias is not None, eq.padding_mode).to(x.dtype)
    conv.load_state_dict(eq.state_dict())
    return definition(conv, x, eq.group)


def test_combined_kernel_sizes():
    """The combined kernel has k_eff + s - 1 taps per axis where the offsets span the stride."""
    for k, s, p, size, expect in ((3, 2, 1, 56, (4, 4)), (7, 2, 3, 224, (8, 8)), (1, 2, 0, 56, (2, 2)),
                                  (3, 2, 1, 57, None)):
        eq = E.EquiConv(1, 1, k, s, p, group="d4")
        path, plan = eq.choose_path(size, size)
        assert (path == "fast") == (expect is None)
        if expect:
            assert path == "combined" and plan.kernel == expect
    eq = E.EquiConv(1, 1, 3, stride=2, padding=1, dilation=3, group="hflip")  # 8 combined taps > 2 x 3 per row
    assert eq.choose_path(8, 8)[0] == "general"
    x = random_tensor((1, 1, 8, 8), torch.float64)
    torch.testing.assert_close(eq.double()(x), _definition_of(eq, x))


def test_state_dict_and_attributes_match_conv2d():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    eq = E.EquiConv(3, 5, 3, padding=1, group="d4")
    assert set(eq.state_dict()) == set(conv.state_dict())
    eq.load_state_dict(conv.state_dict())
    conv.load_state_dict(eq.state_dict())
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(eq, attr) == getattr(conv, attr)
    half = E.EquiConv.from_conv(nn.Conv2d(3, 5, 3).to(torch.float64), "c4")
    assert half.weight.dtype == torch.float64


def test_convert_convs_makes_a_cnn_equivariant_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, padding=1)).double()
    x = random_tensor((2, 3, 9, 9), torch.float64)
    assert E.check_equivariance(model, x, "c4", equivariant=True) > 1e-3
    E.convert_convs(model, "c4")
    assert sum(isinstance(m, E.EquiConv) for m in model.modules()) == 3
    assert E.check_equivariance(model, x, "c4", equivariant=True) < 1e-10


def test_convert_convs_keeps_frozen_weights_and_shared_convs():
    """A frozen backbone stays frozen (requires_grad kept), and a convolution
    used twice becomes one EquiConv used twice (parameters still shared)."""
    shared = nn.Conv2d(3, 3, 3, padding=1)
    frozen = nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
    block = nn.Sequential(shared, nn.ReLU())
    model = nn.Sequential(block, frozen, block, shared)
    n_params = sum(p.numel() for p in model.parameters())
    E.convert_convs(model, "c4")
    assert isinstance(model[0][0], E.EquiConv) and model[0][0] is model[2][0] is model[3]
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[3].weight.requires_grad
    assert E.check_equivariance(model, random_tensor((1, 3, 6, 6), torch.float32), "c4", equivariant=True) < 1e-5
    twice = nn.Conv2d(3, 3, 3, padding=1)  # held twice by one parent, and in a ModuleList
    model = E.convert_convs(nn.Sequential(twice, nn.ReLU(), twice, nn.ModuleList([twice])), "c4")
    assert isinstance(model[0], E.EquiConv) and model[0] is model[2] is model[3][0]
    frozen_bias_only = nn.Conv2d(3, 3, 3)
    frozen_bias_only.bias.requires_grad_(False)
    eq = E.EquiConv.from_conv(frozen_bias_only, "c4")
    assert eq.weight.requires_grad and not eq.bias.requires_grad


def test_convert_convs_keeps_the_parameters_themselves():
    """The EquiConvs hold the original Parameter objects: an optimizer made
    before the conversion trains the converted model, and a weight tied
    between two distinct convolutions stays tied."""
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, bias=False)
    second.weight = first.weight  # tied weights, two modules
    model = nn.Sequential(first, nn.ReLU(), second).double()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    E.convert_convs(model, "c4")
    assert isinstance(model[0], E.EquiConv) and isinstance(model[2], E.EquiConv)
    assert list(model.parameters()) == params and model[0].weight is model[2].weight and model[2].bias is None
    before = model[0].weight.detach().clone()
    model(random_tensor((2, 3, 6, 6), torch.float64)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)  # the optimizer's Parameters are the model's
    assert E.check_equivariance(model, random_tensor((1, 3, 6, 6), torch.float64), "c4", equivariant=True) < 1e-10
    on_meta = E.EquiConv.from_conv(nn.Conv2d(2, 2, 3, device="meta"), "d4")  # nothing allocated or copied
    assert on_meta.weight.is_meta and on_meta.group.name == "d4"

    class Scaled(E.EquiConv):  # a subclass whose __init__ makes a buffer keeps it (built on conv's device)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scale", torch.full((), 2.0))

    scaled = Scaled.from_conv(first, "c4")
    assert scaled.weight is first.weight and not scaled.scale.is_meta and scaled.scale.item() == 2.0


def test_convert_convs_rejects_what_it_cannot_convert_faithfully():
    """Subclasses of nn.Conv2d and parametrized convolutions (weight_norm) have
    their own forward: a clear error naming the module, not a silent skip that
    leaves the model not equivariant."""
    from torch.nn.utils.parametrizations import weight_norm

    class SameConv(nn.Conv2d):
        pass

    for conv, kind in ((weight_norm(nn.Conv2d(3, 4, 3, padding=1)), "ParametrizedConv2d"), (SameConv(3, 4, 3), "SameConv")):
        model = nn.Sequential(nn.Sequential(nn.Identity(), conv))
        with pytest.raises(TypeError, match=rf"model\.0\.1 is a {kind} \(a subclass of nn.Conv2d, or one with a parametrization"):
            E.convert_convs(model, "c4")
        with pytest.raises(TypeError, match=rf"model is a {kind}"):
            E.convert_convs(conv, "c4")
    hooked = nn.Conv2d(3, 4, 3)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(TypeError, match=r"model\.1 has forward hooks"):
        E.convert_convs(nn.Sequential(nn.Identity(), hooked), "c4")
    with pytest.raises(TypeError, match=r"model has forward hooks"):
        E.convert_convs(hooked, "c4")
    with pytest.raises(TypeError, match=r"from_conv: the convolution has forward hooks"):
        E.EquiConv.from_conv(hooked, "c4")
    hooked = nn.Conv2d(3, 4, 3)
    hooked.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    hooked.register_load_state_dict_post_hook(lambda module, keys: None)
    model = nn.Sequential(nn.Conv2d(3, 3, 3), hooked)
    with pytest.raises(TypeError, match=r"model\.1 has backward and state_dict hooks"):
        E.convert_convs(model, "c4")
    assert type(model[0]) is nn.Conv2d  # checked before anything is replaced
    patched = nn.Conv2d(3, 4, 3)
    patched.forward = lambda x: nn.Conv2d.forward(patched, x) * 2  # as accelerate's hooks do
    with pytest.raises(TypeError, match=r"model\.0 has a forward of its own set on the instance"):
        E.convert_convs(nn.Sequential(patched), "c4")
    functional = nn.Conv2d(3, 4, 3)
    del functional.weight
    functional.weight = torch.zeros(4, 3, 3, 3)  # a plain tensor, as functional meta-learning code sets
    with pytest.raises(TypeError, match=r"from_conv: the convolution: its weight is a Tensor, not an nn.Parameter"):
        E.EquiConv.from_conv(functional, "c4")
    already = nn.Sequential(E.EquiConv(3, 3, 3, group="d4"))
    assert E.convert_convs(already, "c4")[0].group.name == "d4"  # EquiConvs are left as they are


def test_compile_autocast_channels_last():
    torch.manual_seed(0)
    for stride in (1, 2):  # fast path, general path
        eq = E.EquiConv(4, 4, 3, stride=stride, padding=1, group="c4")
        x = random_tensor((2, 4, 8, 8), torch.float32)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(eq, fullgraph=True, backend="aot_eager")(x), eq(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = eq(x)
        torch.testing.assert_close(out.float(), eq(x), atol=0.1, rtol=0.05)
        cl = eq.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, eq(x), atol=1e-5, rtol=1e-5)


def test_bad_input():
    eq = E.EquiConv(3, 3, 3, padding=1, group="c4")
    with pytest.raises(ValueError, match="square inputs"):
        eq(torch.zeros(1, 3, 6, 8))
    with pytest.raises(ValueError, match="unknown image group"):
        E.EquiConv(3, 3, 3, group="p4m")
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        E.EquiConv.from_conv(nn.Conv1d(3, 3, 3))
    with pytest.raises(ValueError, match="non-square output"):
        E.EquiConv(3, 3, (3, 1), group="c4")(torch.zeros(1, 3, 6, 6))


@pytest.mark.parametrize("group", ["hflip", "rot180", "c4", "d4"])
def test_one_by_one_strided_convs_average_the_input_first(group):
    """1x1 kernels on the combined path: s applied per channel (avg_pool2d when
    uniform, a depthwise convolution otherwise), then the 1x1 convolution."""
    torch.manual_seed(0)
    for s, p, mode, size in itertools.product([2, 3], [0, 1], ["zeros", "reflect"], [6, 7, 8]):
        conv = nn.Conv2d(4, 6, 1, s, p, groups=2, padding_mode=mode).double()
        x = random_tensor((2, 4, size, size), torch.float64).requires_grad_()
        eq = E.EquiConv.from_conv(conv, group)
        out, ref = eq(x), definition(conv, x, group)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        grad = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, [x, eq.weight, eq.bias], grad),
                        torch.autograd.grad(ref, [x, conv.weight, conv.bias], grad)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_follows_changing_input_sizes(dynamic):
    """Each input size has its own plan: compiled modules (and a converted
    model) give the eager result on sizes that change between calls, with
    automatic or explicit dynamic shapes."""
    modules = [E.EquiConv(3, 4, 3, stride=2, padding=1, group="c4"),
               E.EquiConvTranspose(3, 4, 3, stride=2, padding=1, group="c4"),
               E.EquiMaxPool2d(3, 2, 1, group="d4"), E.EquiAvgPool2d(3, 2, 1, group="c4"),
               E.convert_convs(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2)), "c4")]
    for module in modules:
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, dynamic=dynamic, backend="eager")
        for size in (8, 10, 13):
            x = random_tensor((2, 3, size, size), torch.float32)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)
