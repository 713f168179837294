"""Autograd (first and second order), opcheck and torch.compile of the ops."""
import pytest
import torch

import equitune_ext as E

from conftest import random_tensor

GROUPS = list(E.IMAGE_GROUPS)


def gradchecks(f, inputs, backend):
    """gradcheck and gradgradcheck; under the Triton interpreter (CPU) each
    kernel call is slow, so use fast mode (random projections) there."""
    fast = backend == "triton" and inputs[0].device.type == "cpu"
    assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast)


@pytest.mark.interpreter_groups("hflip")  # the adjoint wiring; the maps are tested forward
@pytest.mark.parametrize("group", GROUPS)
def test_gradcheck_transform(device_backend, group):
    device, backend = device_backend
    x = random_tensor((2, 2, 4, 4), torch.float64, device).requires_grad_()
    gradchecks(lambda t: E.group_transform(t, group, backend=backend), (x,), backend)


@pytest.mark.interpreter_groups("hflip")
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("equivariant", [True, False])
def test_gradcheck_average(device_backend, group, equivariant):
    device, backend = device_backend
    order = E.get_image_group(group).order
    y = random_tensor((2 * order, 2, 3, 3), torch.float64, device).requires_grad_()
    gradchecks(lambda t: E.group_average(t, group, equivariant=equivariant, backend=backend), (y,), backend)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_backward_of_expanded_gradient(device_backend, group):
    """out.sum() sends a stride-0 gradient into the backward kernels."""
    device, backend = device_backend
    x = random_tensor((2, 3, 5, 5), torch.float32, device).requires_grad_()
    E.group_transform(x, group, backend=backend).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, float(E.get_image_group(group).order)))
    y = random_tensor((8 * 2, 3, 5, 5), torch.float32, device)[: 2 * E.get_image_group(group).order].requires_grad_()
    E.group_average(y, group, backend=backend).sum().backward()
    torch.testing.assert_close(y.grad, torch.full_like(y, 1.0 / E.get_image_group(group).order))


def _opcheck_cases(device):
    x = random_tensor((2, 3, 5, 5), torch.float32, device)
    cl = random_tensor((2, 4, 6, 6), torch.float32, device).contiguous(memory_format=torch.channels_last)
    return [
        (torch.ops.equitune_ext.group_transform.default, (x.requires_grad_(), [0, 1, 2, 3], 1.0)),
        (torch.ops.equitune_ext.group_transform.default, (cl.requires_grad_(), [0, 4], 0.5)),
        (torch.ops.equitune_ext.group_transform.default, (random_tensor((2, 5, 5), torch.uint8, device), [0, 6], 1.0)),
        (torch.ops.equitune_ext.group_average.default, (random_tensor((8, 3, 5, 5), torch.float32, device).requires_grad_(), [0, 3, 2, 1], 0.25)),
        (torch.ops.equitune_ext.group_average.default, (random_tensor((8, 10), torch.float32, device).requires_grad_(), [0, 0, 0, 0], 0.25)),
        (torch.ops.equitune_ext.group_average.default, (cl.detach().repeat(4, 1, 1, 1).requires_grad_(), [0, 1, 2, 3, 4, 5, 6, 7], 0.125)),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


class Sandwich(torch.nn.Module):
    """transform -> conv -> equivariant average -> pool -> invariant head."""

    def __init__(self, group, backend):
        super().__init__()
        self.group, self.backend = group, backend
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(E.group_transform(x, self.group, backend=self.backend))
        h = E.group_average(h, self.group, backend=self.backend)
        logits = self.head(h.mean((-2, -1)))
        return logits, h


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_compile_fullgraph(device, group):
    torch.manual_seed(0)
    model = Sandwich(group, "cpp").to(device)
    x = random_tensor((2, 3, 8, 8), torch.float32, device).requires_grad_()
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    g_eager = torch.autograd.grad(eager[0].sum(), x)[0]
    g_comp = torch.autograd.grad(compiled[0].sum(), x)[0]
    torch.testing.assert_close(g_eager, g_comp)


def test_compile_inductor(device):
    """The real compiler (inductor), once: custom ops stay opaque, no graph break."""
    torch.manual_seed(0)
    model = Sandwich("c4", "cpp").to(device)
    x = random_tensor((2, 3, 8, 8), torch.float32, device)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out[0], model(x)[0], atol=1e-5, rtol=1e-5)
