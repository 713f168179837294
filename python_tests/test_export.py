"""Deployment: torch.export and torch.onnx.export of every module, as is, with a dynamic batch.

While exporting, the public ops record their plain-PyTorch reference (ops.py, _resolve_backend),
so the graphs hold standard ops only; onnxruntime must reproduce PyTorch to 1e-4 at two batch
sizes. torch.compile keeps the fused custom ops.
"""
import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import equitune_ext as E

BATCHES = (1, 3)  # run sizes; the export traces batch 2
TOL = 1e-4
V = 64  # EquiLM's vocabulary


def _cnn(channels=3):
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def _scorer():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1))


def _converted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 1, 2),
                          nn.AvgPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return E.convert_convs(model, "d4")


def _equilm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return E.EquiLM(transformers.GPT2LMHeadModel(cfg), E.TokenGroup.from_cycles(V, [[5, 9], [11, 12]]), relaxed=[20])


def _images(size=8, channels=3):
    return lambda b: torch.randn(b, channels, size, size)


# name -> (module factory, input of batch b, the path an equi-tuned module must take: every path exports)
CASES = {
    "EquiTuned mean": (lambda: E.EquiTuned(_cnn(), "d4"), _images(), None),
    "EquiTuned weight_net": (lambda: E.EquiTuned(_cnn(), "d4", weight_net=_scorer()), _images(), None),
    "EquiTuned max": (lambda: E.EquiTuned(_cnn(), "c4", weight_net=_scorer(), mode="max"), _images(), None),
    "EquiTuned chunk_size": (lambda: E.EquiTuned(_cnn(), "d4", chunk_size=3), _images(), None),
    "EquiTuned equivariant": (lambda: E.EquiTuned(nn.Conv2d(3, 4, 3, padding=1), "d4", equivariant=True), _images(),
                              None),
    "convert_convs": (_converted, _images(16), None),
    "EquiConv fast": (lambda: E.EquiConv(3, 4, 3, padding=1, group="d4"), _images(), "fast"),
    "EquiConv combined": (lambda: E.EquiConv(3, 4, 3, stride=2, padding=1, group="d4"), _images(), "combined"),
    "EquiConv general": (lambda: E.EquiConv(3, 4, 3, stride=2, dilation=3, group="c4"), _images(), "general"),
    "EquiConvTranspose": (lambda: E.EquiConvTranspose(3, 4, 3, stride=2, padding=1, output_padding=1, group="d4"),
                          _images(), "combined"),
    "EquiMaxPool2d": (lambda: E.EquiMaxPool2d(3, 2, 1, group="d4"), _images(), "combined"),
    "EquiAvgPool2d": (lambda: E.EquiAvgPool2d(3, 2, 1, group="d4"), _images(), "combined"),
    "EquiAvgPool2d general": (lambda: E.EquiAvgPool2d(3, 2, 1, count_include_pad=False, group="d4"), _images(),
                              "general"),
    "EquiLM": (_equilm, lambda b: torch.randint(0, V, (b, 7)), None),
}


def _build(name):
    make, make_input, path = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    if path is not None:
        model(make_input(1))
        assert model.last_path == path
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = ({0: batch, 1: torch.export.Dim("seq", min=2, max=32)} if name == "EquiLM" else {0: batch},)
    return model, make_input, dynamic


def _leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _custom_ops(graph):
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and "equitune_ext" in str(n.target)]


@pytest.mark.parametrize("name", CASES)
def test_torch_export_round_trip(name):
    model, make_input, dynamic = _build(name)
    ep = torch.export.export(model, (make_input(2),), dynamic_shapes=dynamic)
    assert _custom_ops(ep.graph) == []
    with torch.no_grad():
        for b in BATCHES:
            x = make_input(b)
            for got, want in zip(_leaves(ep.module()(x)), _leaves(model(x)), strict=True):
                torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", CASES)
def test_onnx_export_runs_in_onnxruntime(name):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, make_input, dynamic = _build(name)
    program = torch.onnx.export(model, (make_input(2),), dynamo=True, dynamic_shapes=dynamic, verbose=False)
    proto = program.model_proto
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, "the graph must hold standard ONNX ops only"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for b in BATCHES:
            x = make_input(b)
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            want = _leaves(model(x))
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(torch.from_numpy(g), w, atol=TOL, rtol=TOL)


def test_explicit_backend_keeps_the_fused_ops_in_torch_export():
    model = E.EquiTuned(_cnn(), "d4").eval()
    x = torch.randn(2, 3, 8, 8)
    with E.use_backend("cpp"):
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    assert {"equitune_ext.group_transform.default", "equitune_ext.group_average.default"} <= set(_custom_ops(ep.graph))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))


def test_torch_compile_keeps_the_fused_ops():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = E.EquiTuned(nn.Conv2d(3, 4, 3, padding=1), "d4", equivariant=True).eval()
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=capture, fullgraph=True)(x)
        torch.testing.assert_close(out, model(x))
    ops = {op for gm in graphs for op in _custom_ops(gm.graph)}
    assert {"equitune_ext.group_transform.default", "equitune_ext.group_average.default"} <= ops
