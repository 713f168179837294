"""torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, vmap and their
compositions) and forward-mode AD through the public ops, on every backend,
against the plain-PyTorch reference backend (which torch.func differentiates
and batches by itself)."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import equitune_ext as E

from conftest import random_tensor

V = 7


def token_group():
    return E.TokenGroup.from_cycles(V, [[1, 4, 2], [0, 5, 6]])  # |G| = 3


def image_fns(backend, group, equivariant=True):
    return (lambda t: E.group_transform(t, group, backend=backend),
            lambda t, w=None: E.group_average(t, group, equivariant=equivariant, weights=w, backend=backend))


def assert_same(got, want):
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.interpreter_groups("hflip")  # the transforms' wiring; the maps are tested forward
@pytest.mark.parametrize("group", ["hflip", "c4", "d4"])
def test_func_transforms_image_ops(device_backend, group):
    """Every transform of both ops, and compositions (per-sample gradients,
    hessian-vector products), give the reference's results. The registered
    ops' generated autograd cannot run under torch.func (pytorch#170834) and
    gave zero tangents under jvp: these went through before without a check."""
    device, backend = device_backend
    order = E.get_image_group(group).order
    x, x_dot = (random_tensor((2, 2, 3, 3), torch.float64, device, seed=s) for s in (1, 2))
    y, y_dot = (random_tensor((2 * order, 2, 3, 3), torch.float64, device, seed=s) for s in (3, 4))
    xs = random_tensor((3, 2, 2, 3, 3), torch.float64, device, seed=5)
    transform, average = image_fns(backend, group)
    transform_ref, average_ref = image_fns("reference", group)

    def loss(t, transform, average):
        return (average(transform(t) ** 2) ** 2).sum()

    for (f, f_ref, primal, tangent) in ((transform, transform_ref, x, x_dot), (average, average_ref, y, y_dot)):
        out, out_dot = jvp(f, (primal,), (tangent,))
        out_ref, out_dot_ref = jvp(f_ref, (primal,), (tangent,))
        assert_same(out, out_ref)
        assert_same(out_dot, out_dot_ref)
        cotangent = torch.ones_like(out_ref).cumsum(0)
        assert_same(vjp(f, primal)[1](cotangent)[0], vjp(f_ref, primal)[1](cotangent)[0])
    small = y[:, :1, :2, :2].contiguous()
    assert_same(jacrev(average)(small), jacrev(average_ref)(small))
    assert_same(jacfwd(average)(small), jacfwd(average_ref)(small))
    assert_same(grad(loss)(x, transform, average), grad(loss)(x, transform_ref, average_ref))
    hvp = jvp(lambda t: grad(loss)(t, transform, average), (x,), (x_dot,))[1]
    assert_same(hvp, jvp(lambda t: grad(loss)(t, transform_ref, average_ref), (x,), (x_dot,))[1])
    per_sample = vmap(grad(loss), in_dims=(0, None, None))(xs, transform, average)
    assert_same(per_sample, vmap(grad(loss), in_dims=(0, None, None))(xs, transform_ref, average_ref))


@pytest.mark.parametrize("equivariant", [True, False])
@pytest.mark.parametrize("copy_up_to", ["default", 0], ids=["copy-small-samples", "never-copy"])
def test_vmap_rule(device_backend, equivariant, copy_up_to, monkeypatch):
    """vmap through the ops' vmap rule (not functorch's per-sample fallback,
    which warns), for any batched dim and with weights batched or not: one
    call on the batch, or one per sample where the batch would be copied and
    copies are ruled out (copy_up_to=0, as for large samples)."""
    from equitune_ext import contract

    if copy_up_to == 0:
        monkeypatch.setitem(contract._VMAP_COPY_UP_TO_BYTES, device_backend[0], 0)
    device, backend = device_backend
    y = random_tensor((3, 8, 2, 4, 4), torch.float64, device, seed=6)  # 3 samples of [4·2, 2, 4, 4]
    w = random_tensor((3, 4, 2), torch.float64, device, seed=7).softmax(1)
    x = random_tensor((2, 4, 4, 3), torch.float64, device, seed=8)  # batched along dim 3
    transform, average = image_fns(backend, "c4", equivariant)
    transform_ref, average_ref = image_fns("reference", "c4", equivariant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's "performance drop" warning
        assert_same(vmap(average)(y), torch.stack([average_ref(t) for t in y]))
        assert_same(vmap(average)(y, w), torch.stack([average_ref(t, u) for t, u in zip(y, w)]))
        assert_same(vmap(average, in_dims=(0, None))(y, w[0]), torch.stack([average_ref(t, w[0]) for t in y]))
        assert_same(vmap(average, in_dims=(None, 0))(y[0], w), torch.stack([average_ref(y[0], u) for u in w]))
        assert_same(vmap(transform, in_dims=3)(x), torch.stack([transform_ref(x[..., i]) for i in range(3)]))
        raw = vmap(lambda t: torch.ops.equitune_ext.group_transform(t, [0, 1, 2, 3], 1.0))(x.movedim(3, 0))
        assert_same(raw, torch.stack([transform_ref(x[..., i]) for i in range(3)]))


def test_vmap_benchmark_forces_the_rules_threshold():
    """benchmarks/bench_vmap.py times each way of the rule by setting the threshold the rule reads
    (the threshold lives in contract.py)."""
    from benchmarks.bench_vmap import copy_up_to
    from equitune_ext import contract

    before = dict(contract._VMAP_COPY_UP_TO_BYTES)
    with copy_up_to("cpu", 123):
        assert contract._VMAP_COPY_UP_TO_BYTES["cpu"] == 123
    assert contract._VMAP_COPY_UP_TO_BYTES == before


@pytest.mark.interpreter_groups("hflip")
@pytest.mark.parametrize("group", ["hflip", "d4"])
def test_gradcheck_forward_mode_and_batched(device_backend, group):
    """torch.autograd.gradcheck's forward-mode and batched (vmap) checks of
    both ops, the weighted average's weights included."""
    device, backend = device_backend
    order = E.get_image_group(group).order
    x = random_tensor((1, 2, 3, 3), torch.float64, device).requires_grad_()
    y = random_tensor((order, 1, 3, 3), torch.float64, device, seed=1).requires_grad_()
    w = random_tensor((order, 1), torch.float64, device, seed=2).softmax(0).requires_grad_()
    transform, average = image_fns(backend, group)
    fast = backend == "triton" and device == "cpu"  # the interpreter is slow
    checks = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True, fast_mode=fast)
    assert torch.autograd.gradcheck(transform, (x,), **checks)
    assert torch.autograd.gradcheck(average, (y, w), **checks)


def test_forward_ad_dual_tensors(device_backend):
    """torch.autograd.forward_ad outside torch.func, with and without grad mode."""
    device, backend = device_backend
    x, x_dot = (random_tensor((2, 3, 4, 4), torch.float64, device, seed=s) for s in (1, 2))
    w, w_dot = (random_tensor((4, 2), torch.float64, device, seed=s) for s in (3, 4))
    for grad_mode in (True, False):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            out = E.group_transform(fwAD.make_dual(x, x_dot), "c4", backend=backend)
            assert_same(fwAD.unpack_dual(out).tangent, E.group_transform(x_dot, "c4", backend="reference"))
            y = fwAD.make_dual(E.group_transform(x, "c4"), E.group_transform(x_dot, "c4"))
            out = E.group_average(y, "c4", weights=fwAD.make_dual(w, w_dot), backend=backend)
            ys = (E.group_transform(x, "c4"), E.group_transform(x_dot, "c4"))
            want = (E.group_average(ys[1], "c4", weights=w, backend="reference")
                    + E.group_average(ys[0], "c4", weights=w_dot, backend="reference"))
            assert_same(fwAD.unpack_dual(out).tangent, want)


def test_func_transforms_token_ops(device_backend):
    device, backend = device_backend
    g = token_group()
    y, y_dot = (random_tensor((6, 2, V), torch.float64, device, seed=s) for s in (1, 2))
    w = random_tensor((3, 2), torch.float64, device, seed=3).softmax(0)
    ids = torch.randint(0, V, (4, 2, 5), device=device)

    def average(t, w=None, backend=backend):
        return E.group_average(t, g, weights=w, backend=backend)

    assert_same(jvp(average, (y, w), (y_dot, w))[1], jvp(lambda *a: average(*a, backend="reference"), (y, w), (y_dot, w))[1])
    loss = lambda t, w, backend=backend: (average(t, w, backend) ** 2).sum()
    assert_same(grad(loss, argnums=(0, 1))(y, w), grad(loss, argnums=(0, 1))(y, w, "reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = y.reshape(2, 3, 2, V)  # 2 samples of [3·1, 2, V]
        assert_same(vmap(average)(ys), torch.stack([average(t, backend="reference") for t in ys]))
        transformed = vmap(lambda i: E.group_transform(i, g, backend=backend))(ids)
    assert torch.equal(transformed, torch.stack([E.group_transform(i, g, backend="reference") for i in ids]))
    with pytest.raises(ValueError, match="out of range"):
        vmap(lambda i: E.group_transform(i, g, backend=backend))(ids + V)
    checks = dict(check_forward_ad=True, check_batched_grad=True, fast_mode=backend == "triton" and device == "cpu")
    # The reference too (its eager range check cannot run under vmap: index_select rejects bad ids there)
    assert torch.equal(vmap(lambda i: E.group_transform(i, g, backend="reference"))(ids), transformed)
    for bad in (ids + V, ids - V):
        with pytest.raises((RuntimeError, IndexError), match="out of (range|bounds)"):
            vmap(lambda i: E.group_transform(i, g, backend="reference"))(bad)
    assert torch.autograd.gradcheck(average, (y[:3, :1].clone().requires_grad_(), w[:, :1].clone().requires_grad_()), **checks)


def test_func_transforms_through_module():
    """Per-sample gradients of an equi-tuned model with torch.func.functional_call."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 4)).double()
    model = E.EquiTuned(net, "c4")
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 1, 2, 4, 4, dtype=torch.float64)

    def sample_loss(p, xi):
        return torch.func.functional_call(model, p, (xi,)).logsumexp(-1).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        model.zero_grad()
        model(x[i]).logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-12, rtol=1e-10)


def test_autograd_functional_vectorized(device_backend):
    """torch.autograd.functional's vectorized jacobian / hessian (vmap over the
    backward, and over forward-mode AD) and the plain ones."""
    device, backend = device_backend
    y = random_tensor((4, 1, 2, 2), torch.float64, device)
    x = random_tensor((1, 1, 2, 2), torch.float64, device, seed=1)
    transform, average = image_fns(backend, "c4")
    transform_ref, average_ref = image_fns("reference", "c4")
    jacobian, hessian = torch.autograd.functional.jacobian, torch.autograd.functional.hessian
    want_j = jacobian(average_ref, y)
    want_h = hessian(lambda t: (average_ref(transform_ref(t)) ** 3).sum(), x)
    for kw in ({}, {"vectorize": True}, {"vectorize": True, "strategy": "forward-mode"}):
        assert_same(jacobian(average, y, **kw), want_j)
    for kw in ({}, {"vectorize": True}, {"vectorize": True, "outer_jacobian_strategy": "forward-mode"}):
        assert_same(hessian(lambda t: (average(transform(t)) ** 3).sum(), x, **kw), want_h)
