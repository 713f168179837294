"""Volume groups ("flip3d", "o", "oh") on [N, C, D, H, W]: element order, the
header's geometry, the fused ops against flip/permute compositions, autograd,
opcheck, torch.compile, torch.func, and equi-tuning of a Conv3d net."""
import itertools

import pytest
import torch

import equitune_ext as E
from equitune_ext import _C
from equitune_ext import reference as R
from equitune_ext.groups import VOLUME_TABLES, apply_volume_element

from conftest import ALL_DTYPES, FLOAT_DTYPES, TOLERANCES, interpreted, random_tensor

GROUPS = list(E.VOLUME_GROUPS)
PERMS = list(itertools.permutations(range(3)))  # lexicographic: (0,1,2), (0,2,1), (1,0,2), (1,2,0), (2,0,1), (2,1,0)


def flip_then_permute(x, flips, perm):
    """The element written out: flip the dims named by the bits (1: W, 2: H, 4: D), then permute (D, H, W)."""
    dims = [d for bit, d in ((1, -1), (2, -2), (4, -3)) if flips & bit]
    y = x.flip(dims) if dims else x
    lead = x.dim() - 3
    return y.permute(*range(lead), *(lead + p for p in perm))


def matrix(flips, perm):
    """Γ as a 3x3 matrix acting on (d, h, w) coordinates (for its determinant)."""
    signs = [-1.0 if flips & bit else 1.0 for bit in (4, 2, 1)]  # D, H, W
    m = torch.zeros(3, 3)
    for s, r in enumerate(perm):  # output axis s shows input axis r
        m[s, r] = signs[r]
    return m


OH = [(flips, perm) for perm in PERMS for flips in range(8)]  # code order: 8 * perm index + flip bits
EXPECTED = {
    "flip3d": [(flips, (0, 1, 2)) for flips in range(8)],
    "oh": OH,
    "o": [e for e in OH if torch.det(matrix(*e)) > 0],
}


@pytest.fixture(params=["auto", "default"], ids=["avx2-or-best", "baseline"])
def isa(request):
    """Both builds of the CPU kernels (the AVX2 one where the CPU has it, and the baseline)."""
    _C.set_cpu_kernel_isa(request.param)
    yield request.param
    _C.set_cpu_kernel_isa("auto")


def shapes(group):
    cubes = [(2, 3, 5, 5, 5), (1, 2, 4, 4, 4), (3, 1, 1, 1, 1)]
    return cubes + ([] if E.get_image_group(group).needs_square else [(2, 3, 4, 6, 5), (1, 2, 7, 3, 9)])


# ---- geometry and element order -------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
def test_element_order_is_the_contract(name, isa):
    """Every element of every group, in the documented order, brute force:
    the group's action, the fused transform (both CPU builds) and the reference."""
    g = E.get_image_group(name)
    assert isinstance(g, E.VolumeGroup) and g.kind == "volume"
    assert g.order == len(EXPECTED[name]) == {"flip3d": 8, "o": 24, "oh": 48}[name]
    x = random_tensor((2, 3, 4, 4, 4), torch.float32)
    out = E.group_transform(x, name)
    assert out.shape == (2 * g.order, 3, 4, 4, 4)
    for k, (flips, perm) in enumerate(EXPECTED[name]):
        want = flip_then_permute(x, flips, perm)
        assert torch.equal(g.act(x, k), want), k
        assert torch.equal(out[2 * k: 2 * k + 2], want), k
    assert torch.equal(R.group_transform(x, name), out)


def test_o_is_the_rotations_of_oh():
    o, oh = E.get_image_group("o"), E.get_image_group("oh")
    assert set(o.codes) < set(oh.codes) and o.codes == tuple(sorted(o.codes))
    assert all(torch.det(matrix(c & 7, PERMS[c >> 3])) > 0 for c in o.codes)
    assert E.get_image_group("flip3d").codes == tuple(range(8)) and oh.codes == tuple(range(48))


@pytest.mark.parametrize("shape", [(3, 3, 3), (2, 4, 3)])
def test_header_geometry_is_the_action(shape):
    """csrc/index.h's cube elements, read through _C, move voxels as
    apply_volume_element does; its inverse and composition agree with applying the elements."""
    x = torch.arange(torch.Size(shape).numel()).view(shape)
    cube = len(set(shape)) == 1
    for code in range(48):
        if not cube and code >= 8:
            continue
        axis, reversed_ = _C.signed_perm(code, 3)
        out = apply_volume_element(x, code)
        assert VOLUME_TABLES.permutes[code] == (code >= 8)
        # u[r] = reversed[r] ? extent[r] - 1 - o[axis[r]] : o[axis[r]]
        o = torch.meshgrid(*[torch.arange(n) for n in out.shape], indexing="ij")
        u = [shape[r] - 1 - o[axis[r]] if reversed_[r] else o[axis[r]] for r in range(3)]
        assert torch.equal(out, x[u[0], u[1], u[2]]), code
        if cube:
            assert torch.equal(apply_volume_element(out, _C.code_inverse(code, 3)), x)
            for other in range(48):
                composed = apply_volume_element(apply_volume_element(x, other), code)
                assert torch.equal(composed, apply_volume_element(x, _C.code_compose(code, other, 3)))
    with pytest.raises(RuntimeError, match="out of range"):
        _C.code_inverse(48, 3)
    with pytest.raises(RuntimeError, match="spatial_dims"):
        _C.signed_perm(0, 4)


@pytest.mark.parametrize("name", GROUPS)
def test_group_axioms(name):
    g = E.get_image_group(name)
    n = g.order
    x = random_tensor((1, 1, 3, 3, 3), torch.float32)
    assert g.codes[0] == 0 and g.composition[0] == tuple(range(n))
    for a in range(n):
        assert g.composition[a][g.inverse[a]] == 0 and g.composition[g.inverse[a]][a] == 0
        assert sorted(g.composition[a]) == list(range(n))
        for b in range(n):
            assert torch.equal(g.act(g.act(x, b), a), g.act(x, g.composition[a][b]))


def test_custom_volume_group_and_validation():
    g = E.VolumeGroup("flip-d", [0, 4])
    assert g.order == 2 and not g.needs_square and g == E.VolumeGroup("again", (0, 4))
    assert g != E.ImageGroup("hflip", [0, 4])  # same codes, other code space
    with pytest.raises(ValueError, match="not closed"):
        E.VolumeGroup("bad", [0, 24])  # a 3-cycle of the axes without its square
    with pytest.raises(ValueError, match="0..47"):
        E.VolumeGroup("bad", [0, 48])
    with pytest.raises(ValueError, match="identity"):
        E.VolumeGroup("bad", [1, 0])
    with pytest.raises(ValueError, match="unknown image group"):
        E.get_image_group("o2")
    with pytest.raises(ValueError, match="'oh' is a volume group; this needs an image group"):
        E.EquiConv(1, 1, 3, group="oh")  # the 2-D modules act on the last two dims only
    with pytest.raises(ValueError, match="is a volume group"):
        E.convert_convs(torch.nn.Conv2d(1, 1, 3), "flip3d")


# ---- the fused ops ----------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_transform_matches_reference(name, dtype, isa):
    for shape in shapes(name):
        x = random_tensor(shape, dtype)
        assert torch.equal(E.group_transform(x, name), R.group_transform(x, name)), shape


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_average_matches_reference(name, dtype, isa):
    order = E.get_image_group(name).order
    atol, rtol = TOLERANCES[dtype]
    for shape in shapes(name):
        y = random_tensor((order * shape[0], *shape[1:]), torch.float64)
        got = E.group_average(y.to(dtype), name, equivariant=True)
        torch.testing.assert_close(got.double(), R.group_average(y.to(dtype).double(), name), atol=atol, rtol=rtol)
        plain = E.group_average(y.to(dtype), name, equivariant=False)
        torch.testing.assert_close(plain.double(), R.group_average(y.to(dtype).double(), name, equivariant=False),
                                   atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", GROUPS)
def test_average_undoes_transform_and_is_equivariant(name, isa):
    g = E.get_image_group(name)
    x = random_tensor((2, 3, 5, 5, 5), torch.float64)
    torch.testing.assert_close(E.group_average(E.group_transform(x, name), name), x)
    y = random_tensor((g.order * 2, 3, 5, 5, 5), torch.float64)
    avg = E.group_average(y, name)
    for k in range(g.order):  # blocks y_h -> y_{h·k} (the blocks of Γ(k)x) move the average by Γ(k)
        moved = torch.cat([y.chunk(g.order)[g.composition[h][k]] for h in range(g.order)])
        torch.testing.assert_close(E.group_average(moved, name), g.act(avg, k))


@pytest.mark.parametrize("name", GROUPS)
def test_weights_and_per_row_elements(name, isa):
    g = E.get_image_group(name)
    x = random_tensor((3, 2, 4, 4, 4), torch.float64)
    y = random_tensor((g.order * 3, 2, 4, 4, 4), torch.float64, seed=1)
    w = torch.rand(g.order, 3, dtype=torch.float64)
    torch.testing.assert_close(E.group_average(y, name, weights=w), R.group_average(y, name, weights=w))
    idx = E.sample_elements(3, g.order, min(5, g.order), generator=torch.Generator().manual_seed(0))
    assert torch.equal(E.group_transform(x, name, elements=idx), R.group_transform_rows(x, name, idx))
    rows = y[: idx.shape[0] * 3]
    wr = torch.rand(idx.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(E.group_average(rows, name, elements=idx), R.group_average_rows(rows, name, idx))
    torch.testing.assert_close(E.group_average(rows, name, elements=idx, weights=wr),
                               R.group_average_rows(rows, name, idx, weights=wr))


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_channels_last_3d_in_gives_channels_last_3d_out(name, dtype, isa):
    g = E.get_image_group(name)
    x = random_tensor((2, 5, 4, 4, 4), dtype).contiguous(memory_format=torch.channels_last_3d)
    out = E.group_transform(x, name)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()
    assert torch.equal(out, R.group_transform(x, name))
    if dtype.is_floating_point:
        y = random_tensor((g.order * 2, 5, 4, 4, 4), dtype).contiguous(memory_format=torch.channels_last_3d)
        w = torch.rand(g.order, 2)
        for weights in (None, w):
            avg = E.group_average(y, name, weights=weights)
            assert avg.is_contiguous(memory_format=torch.channels_last_3d)
            atol, rtol = TOLERANCES[dtype]  # x10: float32 sums of up to 48 weighted terms
            torch.testing.assert_close(avg.double(), R.group_average(y.double(), name, weights=weights),
                                       atol=10 * atol, rtol=10 * rtol)


@pytest.mark.parametrize("name", ["flip3d", "oh"])
def test_strided_inputs_and_extra_dims(name, isa):
    """Inputs read in place with any strides, and [N, *, D, H, W] with several leading dims."""
    g = E.get_image_group(name)
    base = random_tensor((2, 3, 6, 6, 6), torch.float32)
    for x in (base[:, :, 1:5, 1:5, 1:5], base.permute(0, 1, 4, 2, 3), base[..., ::2, ::2, ::2],
              random_tensor((2, 2, 3, 4, 4, 4), torch.float32)):
        assert torch.equal(E.group_transform(x, name), R.group_transform(x, name))
        y = torch.cat([x] * g.order)
        torch.testing.assert_close(E.group_average(y, name), R.group_average(y, name))


@pytest.mark.parametrize("name", ["flip3d", "oh"])
def test_large_outputs_streaming_path(name):
    """Outputs of 8 MiB and more leave the CPU kernels through non-temporal stores."""
    g = E.get_image_group(name)
    side = 32
    x = random_tensor((1, 2, side, side, side), torch.float32)
    assert torch.equal(E.group_transform(x, name), R.group_transform(x, name))
    B = 64 // g.order * 4  # an output of at least 8 MiB
    y = random_tensor((g.order * B, 2, side, side, side), torch.float32, seed=2)
    torch.testing.assert_close(E.group_average(y, name), R.group_average(y, name), atol=1e-6, rtol=1e-6)
    yb = y.bfloat16()
    torch.testing.assert_close(E.group_average(yb, name), R.group_average(yb.float(), name).bfloat16(),
                               atol=1e-2, rtol=1e-2)


def test_complex_volumes():
    x = random_tensor((2, 2, 3, 3, 3), torch.complex64)
    assert torch.equal(E.group_transform(x, "oh"), R.group_transform(x, "oh"))
    y = random_tensor((16, 2, 3, 3, 3), torch.complex64).contiguous(memory_format=torch.channels_last_3d)
    out = E.group_average(y, "flip3d")
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, R.group_average(y, "flip3d"))
    z = random_tensor((1, 1, 2, 2, 2), torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: E.group_transform(t, "o"), (z,))


def test_raw_ops_scale_and_codes():
    x = random_tensor((2, 3, 4, 4, 4), torch.float32)
    out = torch.ops.equitune_ext.volume_transform(x, [9, 6], 0.5)
    torch.testing.assert_close(out, 0.5 * torch.cat([apply_volume_element(x, 9), x.flip(-2, -3)]))
    y = random_tensor((4, 3, 4, 4, 4), torch.float32)
    out = torch.ops.equitune_ext.volume_average(y, [47, 0], 2.0)
    torch.testing.assert_close(out, 2.0 * (apply_volume_element(y[:2], 47) + y[2:]))


def test_raw_rows_ops_with_repeated_codes(isa):
    """A row table may repeat an element (more than the 8 of one permutation): the kernels' general path."""
    for code in (1, 9, 45):
        codes = torch.full((9, 2), code, dtype=torch.int64)
        codes[4, 1] = 0
        x = random_tensor((2, 3, 4, 4, 4), torch.float32)
        out = torch.ops.equitune_ext.volume_transform_rows(x, codes, 1.0)
        want = torch.cat([torch.stack([apply_volume_element(x[b], int(codes[j, b])) for b in range(2)]) for j in range(9)])
        assert torch.equal(out, want)
        y = random_tensor((18, 3, 4, 4, 4), torch.float64)
        avg = torch.ops.equitune_ext.volume_average_rows(y, codes, 0.5)
        blocks = y.view(9, 2, 3, 4, 4, 4)
        want = 0.5 * torch.stack([sum(apply_volume_element(blocks[j, b], int(codes[j, b])) for j in range(9))
                                  for b in range(2)])
        torch.testing.assert_close(avg, want)


def test_reference_backend():
    x = random_tensor((2, 1, 3, 3, 3), torch.float32)
    assert torch.equal(E.group_transform(x, "o", backend="reference"), E.group_transform(x, "o"))
    y = random_tensor((16, 1, 3, 4, 5), torch.float32)
    torch.testing.assert_close(E.group_average(y, "flip3d", backend="reference"), E.group_average(y, "flip3d"))


# ---- bad input ----------------------------------------------------------------------


def test_bad_input():
    with pytest.raises(ValueError, match=r"x must be a cube \(D == H == W\).*D=4, H=4, W=5"):
        E.group_transform(torch.randn(1, 2, 4, 4, 5), "o")
    with pytest.raises(ValueError, match=r"y must be a cube"):
        E.group_average(torch.randn(48, 2, 3, 4, 4), "oh")
    for group in GROUPS:  # a 4-dim tensor is an image batch, not a volume
        with pytest.raises(ValueError, match=r"x must have shape \[N, C, D, H, W\]"):
            E.group_transform(torch.randn(2, 3, 4, 4), group)
        with pytest.raises(ValueError, match=r"y must have shape \[N, C, D, H, W\]"):
            E.group_average(torch.randn(48, 3, 4, 4), group)
    with pytest.raises(ValueError, match=r"leading dim of y \(10\) must be a multiple of \|G\| = 8"):
        E.group_average(torch.randn(10, 1, 2, 2, 2), "flip3d")
    with pytest.raises(ValueError, match="weights must have shape"):
        E.group_average(torch.randn(16, 1, 2, 2, 2), "flip3d", weights=torch.rand(4, 2))
    with pytest.raises(ValueError, match="element indices in"):
        E.group_transform(torch.randn(2, 1, 2, 2, 2), "flip3d", elements=torch.tensor([[0, 8]]))
    with pytest.raises(TypeError, match="floating-point"):
        E.group_average(torch.zeros(8, 1, 2, 2, 2, dtype=torch.int32), "flip3d")
    # the raw ops check on their own
    with pytest.raises(RuntimeError, match=r"out of range \[0, 48\)"):
        torch.ops.equitune_ext.volume_transform(torch.randn(1, 1, 2, 2, 2), [0, 48])
    with pytest.raises(RuntimeError, match=r"cubic inputs \(D == H == W\)"):
        torch.ops.equitune_ext.volume_transform(torch.randn(1, 1, 2, 2, 3), [0, 8])
    with pytest.raises(RuntimeError, match="at least 5 dims"):
        torch.ops.equitune_ext.volume_average(torch.randn(2, 2, 2, 2), [0, 1], 0.5)
    with pytest.raises(RuntimeError, match="multiple of the group order"):
        torch.ops.equitune_ext.volume_average(torch.randn(3, 1, 2, 2, 2), [0, 1], 0.5)
    with pytest.raises(RuntimeError, match=r"`codes` holds 50"):
        torch.ops.equitune_ext.volume_transform_rows(torch.randn(1, 1, 2, 2, 2), torch.tensor([[50]]))


# ---- autograd, opcheck, compile, torch.func -------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
def test_gradcheck(name):
    """First and second order, weights included; random projections (fast mode)
    for the 24- and 48-element groups, whose full Jacobians take minutes."""
    g = E.get_image_group(name)
    fast = g.order > 8
    x = random_tensor((1, 2, 2, 2, 2), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: E.group_transform(t, name), (x,), fast_mode=fast)
    y = random_tensor((g.order, 1, 2, 2, 2), torch.float64).requires_grad_()
    w = torch.rand(g.order, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, v: E.group_average(t, name, weights=v), (y, w), fast_mode=fast)
    assert torch.autograd.gradgradcheck(lambda t: E.group_average(t, name), (y,), fast_mode=fast)
    idx = torch.tensor([[1], [g.order - 1]])
    assert torch.autograd.gradcheck(lambda t: E.group_transform(t, name, elements=idx), (x,))


def test_opcheck():
    ops = torch.ops.equitune_ext
    x = random_tensor((2, 3, 3, 3, 3), torch.float32)
    cl = random_tensor((2, 4, 3, 3, 3), torch.float32).contiguous(memory_format=torch.channels_last_3d)
    codes = torch.tensor([[1, 20], [47, 0]])
    cases = [
        (ops.volume_transform.default, (x.requires_grad_(), [0, 3, 17, 40], 1.0)),
        (ops.volume_transform.default, (cl.requires_grad_(), [0, 7], 0.5, torch.rand(2, 2))),
        (ops.volume_transform.default, (random_tensor((2, 1, 3, 3, 3), torch.uint8), [0, 9], 1.0)),
        (ops.volume_average.default, (random_tensor((8, 3, 3, 3, 3), torch.float32).requires_grad_(),
                                      [0, 1, 2, 3], 0.25)),
        (ops.volume_average.default, (cl.detach().repeat(4, 1, 1, 1, 1).requires_grad_(), [0, 9, 30, 47], 0.25)),
        (ops.volume_transform_rows.default, (random_tensor((2, 3, 3, 3, 3), torch.float32).requires_grad_(), codes,
                                             1.0)),
        (ops.volume_average_rows.default, (random_tensor((4, 3, 3, 3, 3), torch.float32).requires_grad_(), codes,
                                           0.5, torch.rand(2, 2))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class SegNet(torch.nn.Module):
    """A small 3-D segmentation net: Conv3d, ReLU, Conv3d (same-size output)."""

    def __init__(self, channels=1, hidden=4, classes=2):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv3d(channels, hidden, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv3d(hidden, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("name", ["flip3d", "oh"])
def test_compile_fullgraph(name):
    torch.manual_seed(0)
    net = SegNet()

    def model(x):
        return E.equi_average(net, x, name, equivariant=True)

    x = random_tensor((1, 1, 4, 4, 4), torch.float32).requires_grad_()
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(eager, compiled)
    torch.testing.assert_close(torch.autograd.grad(eager.sum(), x)[0], torch.autograd.grad(compiled.sum(), x)[0])
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x.detach())  # inductor
    torch.testing.assert_close(out, eager.detach(), atol=1e-5, rtol=1e-5)


def test_func_transforms():
    x = random_tensor((3, 2, 1, 3, 3, 3), torch.float64)  # vmap over dim 0: samples of [2, 1, 3, 3, 3]
    out = torch.func.vmap(lambda t: E.group_transform(t, "o"))(x)
    assert torch.equal(out, torch.stack([R.group_transform(t, "o") for t in x]))
    y = random_tensor((8, 1, 3, 3, 3), torch.float64)
    grad = torch.func.grad(lambda t: E.group_average(t, "flip3d").square().sum())(y)
    want = torch.autograd.grad(R.group_average(y.requires_grad_(), "flip3d").square().sum(), y)[0]
    torch.testing.assert_close(grad, want)
    t = random_tensor((1, 1, 3, 3, 3), torch.float64)
    _, tangent = torch.func.jvp(lambda v: E.group_transform(v, "oh"), (t,), (torch.ones_like(t),))
    assert torch.equal(tangent, torch.ones(48, 1, 3, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["flip3d", "oh"])
def test_torch_export_with_dynamic_batch(name):
    """torch.export records the reference (flip/permute) while exporting, as for image groups."""
    torch.manual_seed(0)
    net = SegNet()

    class Tuned(torch.nn.Module):
        def forward(self, x):
            return E.equi_average(net, x, name, equivariant=True)

    model = Tuned()
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(model, (random_tensor((2, 1, 4, 4, 4), torch.float32),), dynamic_shapes=({0: batch},))
    for b in (1, 3):
        x = random_tensor((b, 1, 4, 4, 4), torch.float32, seed=b)
        torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=1e-5)


# ---- equi-tuning ---------------------------------------------------------------------


@pytest.mark.parametrize("name", GROUPS)
def test_equi_average_of_conv3d_net_is_equivariant(name):
    torch.manual_seed(0)
    net = SegNet().double()
    x = random_tensor((2, 1, 4, 4, 4) if name == "oh" else (2, 1, 5, 5, 5), torch.float64)

    def tuned(v, **kw):
        return E.equi_average(net, v, name, equivariant=True, **kw)

    assert E.check_equivariance(net, x, name, equivariant=True) > 1e-3  # the net alone is not
    assert E.check_equivariance(tuned, x, name, equivariant=True) < 1e-10
    full = tuned(x)
    torch.testing.assert_close(tuned(x, chunk_size=1), full)
    torch.testing.assert_close(tuned(x, chunk_size=5), full)

    def head(v):  # an invariant head over the feature maps
        return net(v).mean((-3, -2, -1))

    assert E.check_equivariance(lambda v: E.equi_average(head, v, name), x, name) < 1e-10


def test_equituned_modes_samples_and_weight_net():
    torch.manual_seed(0)
    net = SegNet().double()
    scorer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1)).double()
    x = random_tensor((2, 1, 3, 3, 3), torch.float64)
    scorer(x)  # materialize the lazy layer
    for mode in ("mean", "max"):
        model = E.EquiTuned(net, "o", equivariant=True, weight_net=scorer, mode=mode, chunk_size=7)
        assert E.check_equivariance(model, x, "o", equivariant=True) < 1e-10
        model(x.requires_grad_()).sum().backward()
    sampled = E.EquiTuned(net, "oh", equivariant=True, train_samples=3).train()
    out = sampled(x)
    assert out.shape == (2, 2, 3, 3, 3)
    sampled.eval()
    torch.testing.assert_close(sampled(x), E.equi_average(net, x, "oh", equivariant=True))
    gen = torch.Generator().manual_seed(1)
    every = E.equi_average(net, x, "flip3d", equivariant=True, samples=8, generator=gen)
    torch.testing.assert_close(every, E.equi_average(net, x, "flip3d", equivariant=True))


# ---- every device and backend: C++ on the CPU (both ISA builds), Triton under TRITON_INTERPRET=1,
# and the CUDA C++ and Triton kernels where a GPU is there ------------------------------------------

TRITON_CPU = pytest.mark.skipif("triton" not in E.available_backends("cpu"),
                                reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1 (triton >= 3.3)")


@pytest.mark.parametrize("group", GROUPS)
def test_volume_ops_match_reference_on_every_backend(device_backend, group):
    device, backend = device_backend
    g = E.get_image_group(group)
    for shape in [(1, 2, 3, 3, 3)] + ([] if g.needs_square else [(2, 1, 2, 3, 4)]):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.uint8, torch.bool, torch.complex64):
            x = random_tensor(shape, dtype, device)
            assert torch.equal(E.group_transform(x, group, backend=backend), R.group_transform(x, group)), (shape, dtype)
        y = random_tensor((g.order * shape[0], *shape[1:]), torch.float64, device)
        w = torch.rand(g.order, shape[0], dtype=torch.float64, device=device)
        for equivariant in (True, False):
            for weights in (None, w):
                torch.testing.assert_close(E.group_average(y, group, equivariant=equivariant, weights=weights,
                                                           backend=backend),
                                           R.group_average(y, group, equivariant=equivariant, weights=weights))
    x = random_tensor((2, 3, 3, 3, 3), torch.float32, device).contiguous(memory_format=torch.channels_last_3d)
    out = E.group_transform(x, group, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(out, R.group_transform(x, group))
    y = torch.cat([x] * g.order)
    avg = E.group_average(y, group, backend=backend)
    assert avg.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(avg, R.group_average(y, group))


@pytest.mark.parametrize("group", ["flip3d", "oh"])
def test_volume_per_row_elements_and_gradients_on_every_backend(device_backend, group):
    device, backend = device_backend
    g = E.get_image_group(group)
    x = random_tensor((3, 1, 2, 2, 2), torch.float64, device).requires_grad_()
    idx = E.sample_elements(3, g.order, 2, generator=torch.Generator().manual_seed(0)).to(device)
    assert torch.equal(E.group_transform(x, group, elements=idx, backend=backend), R.group_transform_rows(x, group, idx))
    y = random_tensor((6, 1, 2, 2, 2), torch.float64, device).requires_grad_()
    wr = torch.rand(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    torch.testing.assert_close(E.group_average(y, group, elements=idx, weights=wr, backend=backend),
                               R.group_average_rows(y, group, idx, weights=wr))
    fast = interpreted(device, backend)
    assert torch.autograd.gradcheck(lambda t: E.group_transform(t, group, backend=backend), (x[:1],), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda t, v: E.group_average(t, group, elements=idx, weights=v, backend=backend),
                                    (y, wr), fast_mode=fast)


@TRITON_CPU
def test_triton_volume_raw_ops_check_their_arguments():
    ops = torch.ops.equitune_ext
    with pytest.raises(ValueError, match=r"at least one cube code in \[0, 48\)"):
        ops.volume_transform_triton(torch.randn(1, 1, 2, 2, 2), [0, 48])
    with pytest.raises(ValueError, match="must be a cube"):
        ops.volume_transform_triton(torch.randn(1, 1, 2, 2, 3), [0, 8])
    with pytest.raises(ValueError, match=r"\[N, C, D, H, W\]"):
        ops.volume_average_rows_triton(torch.randn(2, 2, 2, 2), torch.zeros(1, 2, dtype=torch.int64), 1.0)
    # a code table holding any value reads in bounds (volume_row_code), as the CUDA kernels do
    out = ops.volume_transform_rows_triton(torch.randn(1, 1, 2, 2, 3), torch.tensor([[-5], [1000]]), 1.0)
    assert out.shape == (2, 1, 2, 2, 3) and torch.isfinite(out).all()
