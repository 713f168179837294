"""CUDA graphs: the ops captured into a graph (by hand, by
torch.cuda.make_graphed_callables and by torch.compile(mode="reduce-overhead"))
and replayed on new data must give what eager calls give.

Graph replay is how small, host-bound calls are run at GPU speed (a [32, 64,
56, 56] average takes less GPU time than the host needs to launch it;
benchmarks/README.md), so every GPU fast path must be capturable:
no host sync, launches on the current (capturing) stream, outputs from the
graph's memory pool. Triton and C++ kernels both. CUDA only: every test name
ends in _cuda (benchmarks/gpu_check.sh selects them with -k cuda).
"""
import copy

import pytest
import torch

import equitune_ext as E
from equitune_ext import reference as R

from conftest import random_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

GPU_BACKENDS = [b for b in ("cpp", "triton") if torch.cuda.is_available() and b in E.available_backends("cuda")]


def warm_up_and_capture(fn, warmups: int = 3):
    """As torch.cuda.graph's documentation asks: a few calls on a side stream
    first (compiles, autotuning and lazy initialization must not happen inside
    the capture), then the capture. Returns (graph, what fn returned there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", ["transform", "average"])
@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_image_op_replays_on_new_data_cuda(backend, op, group, layout):
    order = E.get_image_group(group).order
    shape = (2 * (order if op == "average" else 1), 3, 9, 9)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    static = random_tensor(shape, torch.float32, "cuda").contiguous(memory_format=fmt)
    call = {"transform": lambda: E.group_transform(static, group, backend=backend),
            "average": lambda: E.group_average(static, group, backend=backend)}[op]
    ref = {"transform": lambda t: R.group_transform(t, group), "average": lambda t: R.group_average(t, group)}[op]
    graph, out = warm_up_and_capture(call)
    for seed in (1, 2):
        static.copy_(random_tensor(shape, torch.float32, "cuda", seed=seed))
        graph.replay()
        torch.testing.assert_close(out, ref(static), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_weighted_average_and_its_gradients_replay_cuda(backend):
    """λ-weighted average: forward and the gradients of input and weights
    (torch.autograd.grad captured with the forward) on new data."""
    g = E.get_image_group("d4")
    y = random_tensor((g.order * 2, 3, 8, 8), torch.float32, "cuda").requires_grad_()
    w = torch.softmax(random_tensor((g.order, 2), torch.float32, "cuda", seed=5), 0).requires_grad_()
    grad_out = random_tensor((2, 3, 8, 8), torch.float32, "cuda", seed=6)

    def step(impl):
        out = E.group_average(y, g, weights=w, backend=impl)
        return (out, *torch.autograd.grad(out, (y, w), grad_out))

    graph, captured = warm_up_and_capture(lambda: step(backend))
    for seed in (1, 2):
        with torch.no_grad():
            y.copy_(random_tensor(y.shape, torch.float32, "cuda", seed=10 + seed))
            w.copy_(torch.softmax(random_tensor(w.shape, torch.float32, "cuda", seed=20 + seed), 0))
            grad_out.copy_(random_tensor(grad_out.shape, torch.float32, "cuda", seed=30 + seed))
        graph.replay()
        for got, want in zip(captured, step("reference")):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_step_of_equituned_model_replays_cuda(backend):
    """A whole training step (forward, backward into the parameters) of an
    EquiTuned conv net through make_graphed_callables, against eager steps on
    the same data: equal outputs and parameter gradients."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 4, 3, padding=1)).cuda()
    model = E.EquiTuned(backbone, "c4", equivariant=True)
    eager = copy.deepcopy(model)  # make_graphed_callables replaces model.forward
    x = random_tensor((2, 3, 12, 12), torch.float32, "cuda").requires_grad_()
    with E.use_backend(backend):
        graphed = torch.cuda.make_graphed_callables(model, (x,))
    for seed in (1, 2):
        data = random_tensor(x.shape, torch.float32, "cuda", seed=seed)
        grad_out = random_tensor((2, 4, 12, 12), torch.float32, "cuda", seed=10 + seed)
        results = []
        for module in (graphed, eager):
            module.zero_grad(set_to_none=True)
            inp = data.clone().requires_grad_()
            with E.use_backend("reference"):  # the graphed call ignores it: its kernels are recorded
                out = module(inp)
            out.backward(grad_out)
            results.append((out.detach().clone(), inp.grad.clone(), [p.grad.clone() for p in module.parameters()]))
        (out_g, gx_g, gp_g), (out_r, gx_r, gp_r) = results
        torch.testing.assert_close(out_g, out_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx_g, gx_r, atol=1e-5, rtol=1e-5)
        for a, b in zip(gp_g, gp_r):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reduce_overhead_compile_cuda(backend):
    """torch.compile(mode="reduce-overhead") (CUDA graph trees) around both ops,
    called on new data: the result of every call matches the reference."""
    torch._dynamo.reset()

    def f(x):
        return E.group_average(torch.relu(E.group_transform(x, "d4", backend=backend)) * 2.0, "d4", backend=backend)

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # the first calls record, the later ones replay
        x = random_tensor((2, 3, 10, 10), torch.float32, "cuda", seed=seed)
        want = R.group_average(torch.relu(R.group_transform(x, "d4")) * 2.0, "d4")
        torch.testing.assert_close(compiled(x).clone(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + GPU_BACKENDS)
def test_token_ops_replay_on_new_ids_cuda(backend):
    """Token ids -> embedding -> scores -> vocabulary average, captured: the
    range check of the ids (a sync) is skipped while capturing, and replays on
    new ids match eager calls."""
    V = 40
    tg = E.TokenGroup.from_cycles(V, [[1, 2], [3, 4, 5]])
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(V, 16).cuda(), torch.nn.Linear(16, V).cuda()
    ids = torch.randint(0, V, (3, 7), device="cuda")

    def f(impl):
        return E.group_average(head(emb(E.group_transform(ids, tg, backend=impl))), tg, backend=impl)

    with torch.no_grad():
        graph, out = warm_up_and_capture(lambda: f(backend))
        for seed in (1, 2):
            ids.copy_(torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(seed)))
            graph.replay()
            torch.testing.assert_close(out, f("reference"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_captured_token_transform_passes_bad_ids_through_cuda(backend):
    """In a graph, where token_transform cannot check the ids on the host, an
    out-of-range id passes through unchanged (for the embedding to reject) and
    nothing is read out of bounds; outside a graph the eager check still raises."""
    V = 10
    tg = E.TokenGroup.from_cycles(V, [[1, 2]])
    ids = torch.tensor([[1, 3, 2]], device="cuda")
    graph, out = warm_up_and_capture(lambda: E.group_transform(ids, tg, backend=backend))
    ids.copy_(torch.tensor([[1, V + 3, -1]]))
    graph.replay()
    assert out.tolist() == [[1, V + 3, -1], [2, V + 3, -1]]  # block 0: the identity; block 1 swaps 1 and 2
    with pytest.raises(ValueError, match="out of range"):
        E.group_transform(ids, tg, backend=backend)
