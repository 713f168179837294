"""group_transform / group_average against the pure-PyTorch reference."""
import pytest
import torch

import equitune_ext as E
from equitune_ext import reference as R

from conftest import ALL_DTYPES, FLOAT_DTYPES, TOLERANCES, interpreter_sized, random_tensor

GROUPS = list(E.IMAGE_GROUPS)
SQUARE_SHAPES = [(2, 3, 5, 5), (1, 1, 1, 1), (0, 2, 4, 4), (3, 6, 6), (2, 2, 3, 4, 4), (1, 2, 33, 33), (1, 1, 70, 70)]
NON_SQUARE_SHAPES = [(2, 3, 4, 7), (1, 2, 65, 3)]


def shapes_for(group, device, backend):
    return interpreter_sized(SQUARE_SHAPES + ([] if E.get_image_group(group).needs_square else NON_SQUARE_SHAPES),
                             device, backend)


def layouts(x):
    """The same values in different memory layouts."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.cat([x, x], dim=-1)  # a non-contiguous slice with a row stride of 2W
    yield "sliced", big[..., : x.shape[-1]]
    if x.shape[0] > 0:
        yield "expanded", x[:1].expand(x.shape[0], *x.shape[1:])


def _ref_average(y, group, equivariant=True):
    return R.group_average(y.double(), group, equivariant=equivariant)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_transform_matches_reference(device_backend, group, dtype):
    device, backend = device_backend
    for shape in shapes_for(group, device, backend):
        x = random_tensor(shape, dtype, device)
        for layout, xl in layouts(x):
            out = E.group_transform(xl, group, backend=backend)
            assert out.dtype == dtype and out.device == xl.device
            assert torch.equal(out, R.group_transform(xl, group)), (shape, layout)


def _fixed_strategy_transform(output_tiles: bool):
    """The Triton transform with one strategy, at block 16 (masked edges):
    launch_planar's transform_config (the autotuner picks one per shape on a
    GPU; the interpreter runs input tiles at block 32)."""
    import triton

    from equitune_ext.triton.image import launch_image_op

    config = triton.Config({"BLOCK": 16, "OUTPUT_TILES": output_tiles}, num_warps=4)
    return lambda x, elements, scale=1.0, weights=None: launch_image_op(x, elements, scale, weights, False, config)


@pytest.mark.parametrize("output_tiles", [False, True], ids=["input_tiles", "output_tiles"])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool], ids=str)
def test_triton_transform_strategies_match_reference(device, group, dtype, output_tiles):
    """Both ways the planar Triton transform cuts its work, on every layout.
    Small shapes: the interpreter runs each program in Python."""
    if "triton" not in E.available_backends(device):
        pytest.skip("triton backend not available")
    if device == "cpu" and not output_tiles:
        pytest.skip("the interpreter runs input tiles in test_transform_matches_reference")
    transform = _fixed_strategy_transform(output_tiles)
    codes = list(E.get_image_group(group).codes)
    shapes = [(2, 3, 5, 5), (0, 2, 4, 4), (2, 2, 3, 4, 4), (1, 2, 17, 17)]
    if not E.get_image_group(group).needs_square:
        shapes += [(2, 3, 4, 7), (1, 2, 19, 3)]
    for shape in shapes:
        x = random_tensor(shape, dtype, device)
        for layout, xl in layouts(x):
            assert torch.equal(transform(xl, codes), R.group_transform(xl, group)), (shape, layout)


@pytest.mark.parametrize("output_tiles", [False, True], ids=["input_tiles", "output_tiles"])
@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
def test_triton_transform_strategies_scale_and_weights(device, group, output_tiles):
    """The weighted, scaled transform (the backward of the weighted average) under both strategies."""
    if "triton" not in E.available_backends(device):
        pytest.skip("triton backend not available")
    image_group = E.get_image_group(group)
    x = random_tensor((2, 3, 9, 9), torch.float64, device)
    weights = torch.rand(image_group.order, 2, dtype=torch.float64, device=device)
    expected = 0.3 * weights.reshape(-1, 1, 1, 1) * R.group_transform(x, group)
    got = _fixed_strategy_transform(output_tiles)(x, list(image_group.codes), 0.3, weights)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_average_matches_reference(device_backend, group, dtype):
    device, backend = device_backend
    order = E.get_image_group(group).order
    atol, rtol = TOLERANCES[dtype]
    for shape in shapes_for(group, device, backend):
        y = random_tensor((order * shape[0],) + shape[1:], dtype, device, seed=1)
        for layout, yl in layouts(y):
            out = E.group_average(yl, group, backend=backend)
            assert out.dtype == dtype and out.shape == (shape[0],) + shape[1:]
            torch.testing.assert_close(out.double(), _ref_average(yl, group), atol=atol, rtol=rtol, msg=f"{shape} {layout}")
            assert not out.isnan().any()


@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
@pytest.mark.parametrize("shape", [(4, 10), (8,), (4, 3, 5), (4, 2, 3, 5, 7)])
def test_invariant_average_is_plain_mean(device_backend, group, shape):
    device, backend = device_backend
    order = E.get_image_group(group).order
    y = random_tensor((order * shape[0],) + shape[1:], torch.float32, device)
    out = E.group_average(y, group, equivariant=False, backend=backend)
    torch.testing.assert_close(out, y.view(order, shape[0], *shape[1:]).mean(0))


@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
def test_complex_average_and_gradients(device_backend, group):
    """Complex inputs: the average (plain, weighted, invariant) and gradients
    through both ops (run on the real view: no complex average kernels), against
    the reference; gradcheck in complex128 on the op's own backward."""
    device, backend = device_backend
    if backend == "triton" and device == "cpu" and group != "d4":
        pytest.skip("interpreter time: d4 has every element")
    g = E.get_image_group(group)
    y = random_tensor((g.order * 2, 3, 5, 5), torch.complex64, device, seed=1).to(torch.complex128)
    w = random_tensor((g.order, 2), torch.float64, device, seed=2).softmax(0)
    for kwargs in ({}, {"weights": w}, {"equivariant": False}):
        torch.testing.assert_close(E.group_average(y, group, backend=backend, **kwargs),
                                   R.group_average(y, group, **kwargs), atol=1e-12, rtol=1e-12)
    x = y[:2].clone().requires_grad_()
    grad_out = random_tensor((g.order * 2, 3, 5, 5), torch.complex64, device, seed=3).to(torch.complex128)
    got = torch.autograd.grad(E.group_transform(x, group, backend=backend), x, grad_out)[0]
    torch.testing.assert_close(got, torch.autograd.grad(R.group_transform(x, group), x, grad_out)[0])
    for variant in (x.conj(), x[:0], x.contiguous(memory_format=torch.channels_last)):  # real view edge cases
        out = E.group_transform(variant, group, backend=backend)
        torch.testing.assert_close(out, R.group_transform(variant.detach().resolve_conj(), group))
        assert out.is_contiguous(memory_format=torch.channels_last) == (variant.stride(1) == 1 and variant.numel() > 0)
        torch.testing.assert_close(E.group_average(out, group, backend=backend), R.group_average(out.detach(), group))
    small = y[: g.order, :1, :3, :3].clone().requires_grad_()
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(lambda t: E.group_average(t, group, backend=backend), (small,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda t: E.group_transform(t, group, backend=backend), (small[:1],), fast_mode=fast)


@pytest.mark.parametrize("group", GROUPS)
def test_channels_last_in_gives_channels_last_out(device_backend, group):
    device, backend = device_backend
    x = random_tensor((2, 8, 6, 6), torch.float32, device).contiguous(memory_format=torch.channels_last)
    t = E.group_transform(x, group, backend=backend)
    a = E.group_average(t, group, backend=backend)
    for out in (t, a):
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_average_undoes_transform(device_backend, group, dtype):
    device, backend = device_backend
    x = random_tensor((3, 2, 9, 9), dtype, device)
    back = E.group_average(E.group_transform(x, group, backend=backend), group, backend=backend)
    torch.testing.assert_close(back, x)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_average_is_equivariant(device_backend, group):
    """(1/|G|) Σ_g Γ(g)⁻¹ y_g for y = M(transform(x)) is equivariant for any M."""
    device, backend = device_backend
    g = E.get_image_group(group)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(2, 3, 3, padding=1).to(device).double()
    x = random_tensor((2, 2, 8, 8), torch.float64, device)
    f = lambda inp: E.group_average(model(E.group_transform(inp, g, backend=backend)), g, backend=backend)
    fx = f(x)
    for k in range(g.order):
        torch.testing.assert_close(f(g.act(x, k)), g.act(fx, k))


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_repeated_calls_bitwise_identical(device_backend, group):
    device, backend = device_backend
    channels = 2 if (device, backend) == ("cpu", "triton") else 16  # the interpreter runs each program in Python
    y = random_tensor((8 * 4, channels, 20, 20), torch.float32, device)[: E.get_image_group(group).order * 4]
    a = E.group_average(y, group, backend=backend)
    b = E.group_average(y, group, backend=backend)
    assert torch.equal(a, b)
    assert torch.equal(E.group_transform(y, group, backend=backend), E.group_transform(y, group, backend=backend))


def test_raw_op_scale_and_codes():
    """The raw ops: scale multiplies, and the codes are applied as given."""
    x = random_tensor((2, 3, 5, 5), torch.float32)
    out = torch.ops.equitune_ext.group_transform(x, [1, 6], 0.5)
    torch.testing.assert_close(out, 0.5 * torch.cat([torch.rot90(x, 1, (-2, -1)), x.flip(-2)]))
    y = random_tensor((4, 3, 5, 5), torch.float32)
    out = torch.ops.equitune_ext.group_average(y, [3, 0], 2.0)
    torch.testing.assert_close(out, 2.0 * (torch.rot90(y[:2], 3, (-2, -1)) + y[2:]))


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_large_outputs_streaming_path(device_backend, group):
    """Outputs of 8 MiB and more leave the CPU kernels through non-temporal
    stores (a separate code path): check it against the reference too."""
    device, backend = device_backend
    if backend == "triton" and device == "cpu":
        pytest.skip("too large for the Triton interpreter")
    order = E.get_image_group(group).order
    x = random_tensor((2, 65, 128, 128), torch.float32, device)  # 8.5 MB per group block
    t = E.group_transform(x, group, backend=backend)
    assert torch.equal(t, R.group_transform(x, group))
    y = random_tensor((order * 2, 65, 128, 128), torch.float32, device, seed=2)
    torch.testing.assert_close(E.group_average(y, group, backend=backend), R.group_average(y, group), atol=1e-6, rtol=1e-6)
    w = torch.rand(order, 2, device=device)
    torch.testing.assert_close(
        E.group_average(y, group, weights=w, backend=backend), R.group_average(y, group, weights=w), atol=1e-5, rtol=1e-5
    )
    # bfloat16 goes out through the staging buffer (float32 straight from the accumulator)
    yb = random_tensor((order * 4, 65, 128, 128), torch.float32, device, seed=3).bfloat16()  # 8.5 MB output
    torch.testing.assert_close(E.group_average(yb, group, backend=backend),
                               R.group_average(yb.float(), group).bfloat16(), atol=1e-2, rtol=1e-2)
