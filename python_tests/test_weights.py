"""λ-equitune weights fused into group_average (and the weighted transform behind its backward)."""
import pytest
import torch

import equitune_ext as E
from equitune_ext import reference as R

from conftest import FLOAT_DTYPES, TOLERANCES, random_tensor


def _weights(order, batch, device, dtype=torch.float32, seed=3):
    scores = random_tensor((order, batch), torch.float64, device, seed=seed)
    return scores.softmax(0).to(dtype)


@pytest.mark.parametrize("group", ["hflip", "c4", "d4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("equivariant", [True, False])
def test_weighted_average_matches_reference(device_backend, group, dtype, equivariant):
    device, backend = device_backend
    order = E.get_image_group(group).order
    atol, rtol = TOLERANCES[dtype]
    for shape in [(3, 2, 5, 5), (2, 4, 6, 6)]:
        y = random_tensor((order * shape[0],) + shape[1:], dtype, device)
        w = _weights(order, shape[0], device)
        for yl in (y, y.contiguous(memory_format=torch.channels_last)):
            out = E.group_average(yl, group, equivariant=equivariant, weights=w, backend=backend)
            ref = R.group_average(yl.double(), group, equivariant=equivariant, weights=w.double())
            torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("group", ["hflip", "c4", "d4"])
def test_uniform_weights_equal_mean(device_backend, group):
    device, backend = device_backend
    order = E.get_image_group(group).order
    y = random_tensor((order * 2, 3, 4, 4), torch.float64, device)
    w = torch.full((order, 2), 1.0 / order, dtype=torch.float64, device=device)
    torch.testing.assert_close(E.group_average(y, group, weights=w, backend=backend), E.group_average(y, group, backend=backend))


@pytest.mark.interpreter_groups("hflip")  # the adjoint wiring; the maps are tested forward
@pytest.mark.parametrize("group", ["hflip", "c4", "d4"])
@pytest.mark.parametrize("equivariant", [True, False])
def test_gradcheck_weighted_average(device_backend, group, equivariant):
    device, backend = device_backend
    order = E.get_image_group(group).order
    y = random_tensor((2 * order, 2, 3, 3), torch.float64, device).requires_grad_()
    w = _weights(order, 2, device, torch.float64).requires_grad_()
    f = lambda y_, w_: E.group_average(y_, group, equivariant=equivariant, weights=w_, backend=backend)
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(f, (y, w), fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, (y, w), fast_mode=fast)


def test_weighted_raw_transform_opcheck(device):
    x = random_tensor((2, 3, 4, 4), torch.float32, device).requires_grad_()
    w = _weights(4, 2, device).requires_grad_()
    torch.library.opcheck(torch.ops.equitune_ext.group_transform.default, (x, [0, 1, 2, 3], 1.0, w))
    y = random_tensor((8, 3, 4, 4), torch.float32, device).requires_grad_()
    torch.library.opcheck(torch.ops.equitune_ext.group_average.default, (y, [0, 3, 2, 1], 1.0, w))


def test_weights_bad_input():
    y = torch.zeros(8, 2, 3, 3)
    with pytest.raises(ValueError, match=r"weights must have shape \[\|G\|, B\] = \[4, 2\]"):
        E.group_average(y, "c4", weights=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        E.group_average(y, "c4", weights=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="weights are on meta"):
        E.group_average(y, "c4", weights=torch.zeros(4, 2, device="meta"))
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.equitune_ext.group_average(y, [0, 1, 2, 3], 1.0, torch.zeros(3, 2))


def test_float64_lambda_equitune_gradcheck():
    """float64 scores give float64 weights (only narrower dtypes are upcast for
    the softmax), so a float64 λ-equi-tuned model passes gradcheck."""
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2)).double()
    scorer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    model = E.EquiTuned(backbone, "c4", weight_net=scorer)
    assert torch.autograd.gradcheck(model, (x,))
    xs = R.group_transform(x, "c4")
    weights = scorer(xs).reshape(4, 2).softmax(0)
    expected = R.group_average(backbone(xs), "c4", equivariant=False, weights=weights)
    torch.testing.assert_close(model(x), expected, rtol=1e-13, atol=1e-13)
