"""Per-row group elements (``elements=``: the per-row ops group_transform_rows /
group_average_rows) against the reference, and sampled equi-tuning
(``equi_average(samples=k)``, ``EquiTuned(train_samples=k)``)."""
import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

import equitune_ext as E
from equitune_ext import contract, reference as R
from equitune_ext.nn import sample_elements

from conftest import ALL_DTYPES, FLOAT_DTYPES, TOLERANCES, interpreted, interpreter_sized, random_tensor

GROUPS = list(E.IMAGE_GROUPS)
SHAPES = [(3, 2, 5, 5), (0, 2, 4, 4), (2, 6, 6), (2, 2, 3, 4, 4), (2, 2, 33, 33), (1, 1, 70, 70)]
NON_SQUARE = [(2, 3, 4, 7)]


def indices(k, batch, order, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, order, (k, batch), generator=gen)


def layouts(x):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield "sliced", torch.cat([x, x], dim=-1)[..., : x.shape[-1]]


def shapes_for(group, device, backend):
    return interpreter_sized(SHAPES + ([] if E.get_image_group(group).needs_square else NON_SQUARE), device, backend)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_transform_rows_matches_reference(device_backend, group, dtype):
    device, backend = device_backend
    order = E.get_image_group(group).order
    for shape in shapes_for(group, device, backend):
        x = random_tensor(shape, dtype, device)
        for k in (1, 2, order):
            idx = indices(k, shape[0], order, seed=k).to(device)
            for layout, xl in layouts(x):
                out = E.group_transform(xl, group, elements=idx, backend=backend)
                assert out.shape == (k * shape[0], *shape[1:]) and out.dtype == dtype
                assert torch.equal(out, R.group_transform_rows(xl, group, idx)), (shape, k, layout)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("equivariant", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_average_rows_matches_reference(device_backend, group, dtype, equivariant, weighted):
    device, backend = device_backend
    if interpreted(device, backend) and equivariant != weighted:
        pytest.skip("interpreter time: each value of both flags runs in the cases where they agree")
    order = E.get_image_group(group).order
    atol, rtol = TOLERANCES[dtype]
    for shape in shapes_for(group, device, backend):
        batch = shape[0]
        for k in (1, 3 if order > 2 else 2, order):
            idx = indices(k, batch, order, seed=k).to(device)
            y = random_tensor((k * batch, *shape[1:]), dtype, device, seed=k)
            w = torch.rand(k, batch, dtype=torch.float64, device=device) if weighted else None
            want = R.group_average_rows(y.double(), group, idx, equivariant=equivariant, weights=w)
            for layout, yl in layouts(y):
                out = E.group_average(yl, group, equivariant=equivariant, elements=idx,
                                      weights=None if w is None else w.to(dtype if dtype != torch.bfloat16 else torch.float32),
                                      backend=backend)
                assert out.shape == (batch, *shape[1:]) and out.dtype == dtype
                torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol, msg=f"{shape} k={k} {layout}")


@pytest.mark.parametrize("group", GROUPS)
def test_whole_group_elements_equal_the_per_block_ops(device_backend, group):
    """elements = every element, in the group's order, for every example: the
    per-row ops give what the per-block ops give, weighted too; the C++ ones
    bit for bit (same kernels, same summation order; the Triton per-block
    average sums its tiles in another order)."""
    device, backend = device_backend
    order = E.get_image_group(group).order
    for shape in ((4, 3, 8, 8), (1, 2, 33, 33) if interpreted(device, backend) else (2, 5, 56, 56)):
        x = random_tensor(shape, torch.float32, device)
        idx = torch.arange(order, device=device)[:, None].expand(order, shape[0])
        for _, xl in layouts(x):
            assert torch.equal(E.group_transform(xl, group, elements=idx, backend=backend),
                               E.group_transform(xl, group, backend=backend))
        y = random_tensor((order * shape[0], *shape[1:]), torch.float32, device, seed=1)
        w = torch.rand(order, shape[0], device=device)
        for _, yl in layouts(y):
            for eq in (True, False):
                for weights in (None, w):
                    got = E.group_average(yl, group, equivariant=eq, elements=idx, weights=weights, backend=backend)
                    want = E.group_average(yl, group, equivariant=eq, weights=weights, backend=backend)
                    if backend == "cpp":
                        assert torch.equal(got, want)
                    else:
                        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_average_undoes_transform_per_row(device_backend, group):
    device, backend = device_backend
    order = E.get_image_group(group).order
    x = random_tensor((5, 3, 7, 7), torch.float64, device)
    idx = indices(3, 5, order).to(device)
    back = E.group_average(E.group_transform(x, group, elements=idx, backend=backend), group, elements=idx,
                           backend=backend)
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)


def test_raw_ops_take_code_tables_and_check_them(device):
    x = random_tensor((2, 3, 4, 4), torch.float32, device)
    codes = torch.tensor([[1, 6], [7, 0]], device=device)
    out = torch.ops.equitune_ext.group_transform_rows(x, codes, 2.0)
    want = torch.cat([torch.stack([2 * E.groups.apply_element(x[b], int(codes[j, b])) for b in range(2)]) for j in range(2)])
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.equitune_ext.group_transform_rows(x, torch.tensor([[0, 8]], device=device))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.equitune_ext.group_transform_rows(x, codes.int())
    with pytest.raises(RuntimeError, match=r"shape \[k, B\]"):
        torch.ops.equitune_ext.group_transform_rows(x, codes[:, :1])
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.equitune_ext.group_transform_rows(random_tensor((2, 3, 4, 5), torch.float32, device), codes)
    # non-square planes take codes that keep the shape
    flips = torch.tensor([[4, 6], [2, 0]], device=device)
    xr = random_tensor((2, 3, 4, 5), torch.float32, device)
    got = torch.ops.equitune_ext.group_average_rows(torch.ops.equitune_ext.group_transform_rows(xr, flips), flips, 0.5)
    torch.testing.assert_close(got, xr)  # every element of flips is its own inverse
    with pytest.raises(RuntimeError, match="multiple"):
        torch.ops.equitune_ext.group_average_rows(random_tensor((3, 3, 4, 4), torch.float32, device), codes, 0.5)


def test_public_api_checks_elements():
    x = torch.randn(3, 2, 4, 4)
    with pytest.raises(TypeError, match="elements must be an integer tensor"):
        E.group_transform(x, "c4", elements=torch.zeros(1, 3))
    with pytest.raises(TypeError, match="elements must be a torch.Tensor"):
        E.group_transform(x, "c4", elements=[[0, 1, 2]])
    with pytest.raises(ValueError, match=r"elements must have shape \[k, B\] = \[k, 3\]"):
        E.group_transform(x, "c4", elements=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"elements must have shape"):
        E.group_transform(x, "c4", elements=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"in \[0, \|G\|\) = \[0, 4\), got values in \[0, 4\]"):
        E.group_transform(x, "c4", elements=torch.tensor([[0, 4, 1]]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        E.group_average(torch.randn(6, 2, 4, 4), "c4", elements=torch.tensor([[0, -1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"elements must have shape \[k, B\] = \[k, 2\]"):
        E.group_average(torch.randn(6, 2, 4, 4), "c4", elements=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        E.group_average(torch.randn(7, 2, 4, 4), "c4", elements=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weights must have shape \[k, B\] = \[2, 3\]"):
        E.group_average(torch.randn(6, 2, 4, 4), "c4", elements=torch.zeros(2, 3, dtype=torch.long),
                        weights=torch.rand(4, 3))
    with pytest.raises(ValueError, match="square"):
        E.group_transform(torch.randn(3, 2, 4, 5), "c4", elements=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="image group"):
        tg = E.TokenGroup.from_cycles(5, [[1, 2]])
        E.group_transform(torch.zeros(3, 4, dtype=torch.long), tg, elements=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="elements are on meta but the input is on cpu"):
        E.group_transform(x, "c4", elements=torch.zeros(1, 3, dtype=torch.long, device="meta"))
    # int32 indices are fine
    idx = torch.tensor([[0, 3, 1]], dtype=torch.int32)
    assert torch.equal(E.group_transform(x, "c4", elements=idx), R.group_transform_rows(x, "c4", idx))


def test_inverse_code_table_matches_groups():
    codes = torch.arange(8)
    assert contract.inverse_code_table(codes).tolist() == list(E.groups.INVERSE_CODES)


def gradchecks(f, inputs, backend):
    fast = backend == "triton" and inputs[0].device.type == "cpu"
    assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast)


@pytest.mark.interpreter_groups("hflip")  # the adjoint wiring; the maps are tested forward
@pytest.mark.parametrize("group", ["hflip", "c4", "d4"])
def test_gradcheck_rows(device_backend, group):
    device, backend = device_backend
    order = E.get_image_group(group).order
    idx = indices(2, 2, order).to(device)
    x = random_tensor((2, 2, 4, 4), torch.float64, device).requires_grad_()
    gradchecks(lambda t: E.group_transform(t, group, elements=idx, backend=backend), (x,), backend)
    y = random_tensor((4, 2, 3, 3), torch.float64, device).requires_grad_()
    w = torch.rand(2, 2, dtype=torch.float64, device=device).requires_grad_()
    for eq in (True, False):
        gradchecks(lambda t, w: E.group_average(t, group, equivariant=eq, elements=idx, weights=w, backend=backend),
                   (y, w), backend)


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck_rows(device, suffix):
    if suffix and (device == "cpu" or "triton" not in E.available_backends(device)):
        pytest.skip("triton ops: opcheck on CUDA only (the interpreter cannot run under fake tensors)")
    if suffix:
        import equitune_ext.triton.image_rows  # noqa: F401  (defines the *_rows_triton ops)
    ops = torch.ops.equitune_ext
    transform, average = getattr(ops, "group_transform_rows" + suffix), getattr(ops, "group_average_rows" + suffix)
    x = random_tensor((2, 3, 5, 5), torch.float32, device)
    codes = torch.tensor([[0, 5], [3, 6]], device=device)
    w = torch.rand(2, 2, device=device)
    cl = random_tensor((4, 4, 6, 6), torch.float32, device).contiguous(memory_format=torch.channels_last)
    cases = [
        (transform.default, (x.requires_grad_(), codes, 1.0)),
        (transform.default, (x.detach().requires_grad_(), codes, 0.5, w.requires_grad_())),
        (transform.default, (random_tensor((2, 5, 5), torch.uint8, device), codes, 1.0)),
        (average.default, (cl.requires_grad_(), codes, 0.5)),
        (average.default, (cl.detach().requires_grad_(), codes, 1.0, w.detach().requires_grad_())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class SampledSandwich(torch.nn.Module):
    def __init__(self, group):
        super().__init__()
        self.group = group
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, idx):
        h = self.conv(E.group_transform(x, self.group, elements=idx))
        return E.group_average(h, self.group, elements=idx)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_compile_fullgraph_rows(device, group):
    torch.manual_seed(0)
    model = SampledSandwich(group).to(device)
    x = random_tensor((3, 3, 8, 8), torch.float32, device).requires_grad_()
    idx = indices(2, 3, E.get_image_group(group).order).to(device)
    eager = model(x, idx)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, idx)
    torch.testing.assert_close(eager, compiled)
    torch.testing.assert_close(torch.autograd.grad(eager.sum(), x)[0], torch.autograd.grad(compiled.sum(), x)[0])


def test_compile_inductor_sampled_equi_average():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    model = lambda t: conv(t).mean((-2, -1))  # noqa: E731
    x = torch.randn(4, 3, 8, 8)
    f = lambda x, gen_seed: E.equi_average(model, x, "d4", samples=2, generator=torch.Generator().manual_seed(gen_seed))  # noqa: E731
    want = f(x, 3)
    torch._dynamo.reset()
    idx = sample_elements(4, 8, 2, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda x, idx: E.group_average(model(E.group_transform(x, "d4", elements=idx)), "d4",
                                                            equivariant=False, elements=idx), fullgraph=True)
    torch.testing.assert_close(compiled(x, idx), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_func_transforms_rows(device_backend, group):
    device, backend = device_backend
    order = E.get_image_group(group).order
    idx = indices(2, 2, order).to(device)
    x, x_dot = (random_tensor((2, 2, 3, 3), torch.float64, device, seed=s) for s in (1, 2))
    xs = random_tensor((3, 2, 2, 3, 3), torch.float64, device, seed=5)

    def loss(t, b):
        h = E.group_transform(t, group, elements=idx, backend=b)
        return (E.group_average(h ** 2, group, elements=idx, backend=b) ** 2).sum()

    same = lambda a, b: torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)  # noqa: E731
    same(grad(loss)(x, backend), grad(loss)(x, "reference"))
    same(jvp(lambda t: loss(t, backend), (x,), (x_dot,))[1], jvp(lambda t: loss(t, "reference"), (x,), (x_dot,))[1])
    f = lambda t, b: E.group_transform(t, group, elements=idx, backend=b)  # noqa: E731
    out, pull = vjp(lambda t: f(t, backend), x)
    same(pull(torch.ones_like(out).cumsum(0))[0], vjp(lambda t: f(t, "reference"), x)[1](torch.ones_like(out).cumsum(0))[0])
    same(vmap(grad(loss), in_dims=(0, None))(xs, backend), torch.stack([grad(loss)(t, "reference") for t in xs]))


# ---------------------------------------------------------------------------
# Sampled equi-tuning
# ---------------------------------------------------------------------------

def test_sample_elements_distinct_uniform_and_reproducible():
    idx = sample_elements(4000, 8, 3, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (3, 4000) and idx.dtype == torch.int64
    assert all(len(set(col.tolist())) == 3 for col in idx.t()[:200])
    counts = torch.bincount(idx.flatten(), minlength=8).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.1
    again = sample_elements(4000, 8, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(x)
        return {"logits": self.head(h.mean((-2, -1))), "features": h}


def _manual(model, x, group, idx):
    out = model(R.group_transform_rows(x, group, idx))
    return {"logits": R.group_average_rows(out["logits"], group, idx, equivariant=False),
            "features": R.group_average_rows(out["features"], group, idx, equivariant=True)}


@pytest.mark.parametrize("group", ["c4", "d4"])
@pytest.mark.parametrize("k", [1, 2])
def test_sampled_equi_average_matches_the_definition(group, k):
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    out = E.equi_average(model, x, group, samples=k, generator=torch.Generator().manual_seed(1))
    idx = sample_elements(5, E.get_image_group(group).order, k, generator=torch.Generator().manual_seed(1))
    # pytree: invariant logits and equivariant features are averaged with the sampled elements
    ref = _manual(model, x, group, idx)
    torch.testing.assert_close(out["logits"], ref["logits"])
    feats = E.equi_average(lambda t: model(t)["features"], x, group, equivariant=True, samples=k,
                           generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(feats, ref["features"])
    # chunked: the same
    chunked = E.equi_average(model, x, group, samples=k, chunk_size=1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked["logits"], out["logits"])


def test_all_samples_is_the_exact_average():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    full = E.equi_average(model, x, "d4")
    sampled = E.equi_average(model, x, "d4", samples=8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sampled["logits"], full["logits"])


def test_sampled_weight_net_and_max_mode():
    torch.manual_seed(0)
    model = Tiny().double()
    scorer = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 36, 1)).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    idx = sample_elements(4, 4, 2, generator=gen())
    xs = R.group_transform_rows(x, "c4", idx)
    w = scorer(xs).reshape(2, 4).softmax(0)
    logits = model(xs)["logits"]
    out = E.equi_average(model, x, "c4", weight_net=scorer, samples=2, generator=gen())
    torch.testing.assert_close(out["logits"], R.group_average_rows(logits, "c4", idx, equivariant=False, weights=w))
    mx = E.equi_average(model, x, "c4", weight_net=scorer, mode="max", samples=2, generator=gen())
    best = w.argmax(0)
    torch.testing.assert_close(mx["logits"], logits.reshape(2, 4, -1)[best, torch.arange(4)])
    mx["logits"].sum().backward()
    assert scorer[1].weight.grad is not None and scorer[1].weight.grad.abs().sum() > 0


def test_samples_argument_checks():
    model = Tiny()
    x = torch.randn(2, 3, 6, 6)
    for bad, err in ((0, ValueError), (5, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="samples"):
            E.equi_average(model, x, "c4", samples=bad)
        with pytest.raises(err, match="samples"):
            E.EquiTuned(model, "c4", train_samples=bad)
    with pytest.raises(NotImplementedError, match="image group"):
        E.EquiTuned(model, E.TokenGroup.from_cycles(5, [[1, 2]]), train_samples=1)


def test_equituned_train_samples_trains_sampled_and_evaluates_exactly():
    torch.manual_seed(0)
    model = Tiny()
    net = E.EquiTuned(model, "d4", train_samples=1)
    assert "train_samples=1" in repr(net)
    x = torch.randn(3, 3, 8, 8)
    calls = []
    handle = model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    net.train()
    out = net(x)
    out["logits"].sum().backward()
    assert calls == [3] and model.conv.weight.grad is not None
    net.eval()
    with torch.no_grad():
        exact = net(x)
    assert calls == [3, 24]
    handle.remove()
    torch.testing.assert_close(exact["logits"], E.equi_average(model, x, "d4")["logits"])
    assert E.check_equivariance(lambda t: net(t)["logits"], x, "d4") < 1e-5


def test_compile_fullgraph_equituned_train_samples():
    """The sampled training step compiles without graph breaks (the draw is a
    torch.rand + argsort in the graph; the range check is skipped there)."""
    torch.manual_seed(0)
    net = E.EquiTuned(Tiny(), "d4", train_samples=2).train()
    x = torch.randn(3, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert out["logits"].shape == (3, 5)
    out["logits"].sum().backward()
    assert net.model.conv.weight.grad is not None
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)["logits"], E.equi_average(net.model, x, "d4")["logits"])


def test_compiled_sampled_training_takes_a_new_batch_size():
    """A smaller last batch recompiles (or runs dynamic) instead of failing in
    the element draw."""
    torch.manual_seed(0)
    net = E.EquiTuned(Tiny(), "d4", train_samples=2).train()
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    for batch in (4, 3, 2):
        assert compiled(torch.randn(batch, 3, 8, 8))["logits"].shape == (batch, 5)


def test_vmap_with_different_randomness_draws_per_sample():
    """vmap(randomness="different") over a sampled model: each vmapped sample
    draws its own elements (the per-row ops run once per sample)."""
    net = E.EquiTuned(Tiny(), "d4", train_samples=2).train()
    x = torch.randn(3, 2, 3, 8, 8)
    torch.manual_seed(0)
    out = torch.func.vmap(net, randomness="different")(x)["logits"]
    assert out.shape == (3, 2, 5)
    net.eval()
    exact = torch.func.vmap(net, randomness="different")(x)["logits"]
    torch.testing.assert_close(exact[1], net(x[1])["logits"])


def test_generator_inside_compile_raises_a_clear_error():
    model = Tiny()
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, g: E.equi_average(model, t, "d4", samples=2, generator=g), fullgraph=True,
                             backend="eager")
    with pytest.raises(Exception, match="cannot be used inside torch.compile"):
        compiled(torch.randn(2, 3, 8, 8), gen)


def test_compiled_bad_element_index_names_elements():
    """Compiled, the indices are not read on the host: a bad one reaches the
    kernel as code 8, whose message names `elements` and |G|'s range."""
    x = torch.randn(2, 3, 4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, idx: E.group_transform(t, "c4", elements=idx), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"`elements` passed to group_transform / group_average hold an index outside"):
        compiled(x, torch.tensor([[0, 4]]))
