"""Launch plans of the Triton image ops (equitune_ext/triton/kernels.py).

Eager calls reuse one plan per distinct argument metadata, and on a GPU launch
the compiled kernel a plan keeps directly. These tests check that a plan is
reused only where every call it serves gets the right answer (new data, other
strides, offsets, alignments, configs, weights), that a direct launch gets the
arguments the compiled kernel was compiled for, and on CUDA that direct
launches agree with the reference.
"""
import os
import subprocess
import sys

import pytest
import torch

import equitune_ext as E
from equitune_ext import reference as R

from conftest import TOLERANCES, needs_triton_kernels, random_tensor

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif("triton" not in E.available_backends(DEVICE),
                                  reason="triton backend not available (CPU needs TRITON_INTERPRET=1)")


def kernels():
    from equitune_ext.triton import kernels as K

    return K


def plan_of(op, t, group, weights=None):
    """The plan an eager call of op on t uses (made by the call if new)."""
    K = kernels()
    g = E.get_image_group(group)
    if op == "transform":
        return K._eager_plan(K._transform_plan, t, list(g.codes), 1.0, weights)
    scale = 1.0 if weights is not None else 1.0 / g.order
    return K._eager_plan(K._average_plan, t, list(g.inverse_codes), scale, weights)


def call(op, t, group, weights=None):
    if op == "transform":
        return E.group_transform(t, group, backend="triton"), R.group_transform(t, group)
    return (E.group_average(t, group, weights=weights, backend="triton"),
            R.group_average(t, group, weights=weights))


def check(op, t, group, weights=None):
    got, want = call(op, t, group, weights)
    assert got.shape == want.shape
    atol, rtol = TOLERANCES.get(t.dtype, (0, 0))
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def variants(shape, dtype, device):
    """Inputs with the same shape and dtype but different layouts: contiguous,
    a storage offset of one element (unaligned rows and pointer), a strided view
    (every other column of a wider tensor) and channels_last."""
    base = random_tensor(shape, dtype, device, seed=1)
    padded = random_tensor((shape[0] * shape[1] * shape[2] * shape[3] + 1,), dtype, device, seed=2)
    offset = padded[1:].view(shape)
    wide = random_tensor((*shape[:-1], 2 * shape[-1]), dtype, device, seed=3)[..., ::2]
    return {"contiguous": base, "offset": offset, "strided": wide,
            "channels_last": base.to(memory_format=torch.channels_last)}


@needs_triton
@pytest.mark.parametrize("op", ["transform", "average"])
@pytest.mark.parametrize("group", ["c4", "d4"])
def test_plan_is_reused_for_new_data_and_only_for_equal_metadata(op, group):
    order = E.get_image_group(group).order
    shape = (2 * (order if op == "average" else 1), 3, 6, 6)
    plans = {}
    for name, t in variants(shape, torch.float32, DEVICE).items():
        for seed in range(2):  # the second call reuses the plan with other data
            if seed:
                t.copy_(random_tensor(shape, torch.float32, DEVICE, seed=10 + seed))
            check(op, t, group)
        plans[name] = plan_of(op, t, group)
    # one plan per layout: the four layouts differ in strides or offset
    assert len({id(p) for p in plans.values()}) == 4
    assert plan_of(op, variants(shape, torch.float32, DEVICE)["contiguous"], group) is plans["contiguous"]
    assert plans["channels_last"].out_format == torch.channels_last
    assert all(p.launches["jit"] + p.launches["direct"] == 2 for p in plans.values())


@needs_triton
def test_plan_key_separates_configs_weights_and_scales():
    K = kernels()
    x = random_tensor((2, 3, 6, 6), torch.float64, DEVICE)
    plain = plan_of("transform", x, "d4")
    with K.transform_config(output_tiles=True):
        forced = plan_of("transform", x, "d4")
        check("transform", x, "d4")
    assert forced is not plain and forced.kwargs["OUTPUT_TILES"] is True

    y = random_tensor((16, 3, 6, 6), torch.float64, DEVICE)
    w = torch.softmax(random_tensor((8, 2), torch.float64, DEVICE, seed=5), 0)
    check("average", y, "d4")
    check("average", y, "d4", weights=w)
    unweighted, weighted = plan_of("average", y, "d4"), plan_of("average", y, "d4", weights=w)
    assert unweighted is not weighted and weighted.kwargs["HAS_WEIGHTS"] and not unweighted.kwargs["HAS_WEIGHTS"]
    # the same metadata with other weights' values reuses the weighted plan
    check("average", y, "d4", weights=torch.softmax(random_tensor((8, 2), torch.float64, DEVICE, seed=6), 0))
    assert plan_of("average", y, "d4", weights=w) is weighted
    # another scale (a plain mean of the blocks) is another plan
    K.group_average_triton(y, [0] * 8, 0.5)
    assert K._eager_plan(K._average_plan, y, [0] * 8, 0.5, None) is not unweighted
    # 0.0 and -0.0 compare equal, but are other scales
    K.group_transform_triton(x, [0, 2], 0.0)
    K.group_transform_triton(x, [0, 2], -0.0)
    assert K._eager_plan(K._transform_plan, x, [0, 2], 0.0, None) is not K._eager_plan(K._transform_plan, x, [0, 2], -0.0, None)


@needs_triton
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_vocab_plans_are_reused_for_new_data(weighted):
    K = kernels()
    from equitune_ext.triton import token_kernels as TK

    g = E.TokenGroup.from_cycles(12, [[1, 2], [3, 4]])
    perms = g.tables(DEVICE)
    for seed in range(2):
        y = random_tensor((2 * g.order, 3, 12), torch.float64, DEVICE, seed=seed)
        w = torch.softmax(random_tensor((g.order, 2), torch.float64, DEVICE, seed=9 + seed), 0) if weighted else None
        torch.testing.assert_close(E.group_average(y, g, weights=w, backend="triton"),
                                   R.token_group_average(y, g, weights=w), rtol=1e-12, atol=1e-12)
        ids = torch.randint(0, 12, (2, 7), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        assert torch.equal(E.group_transform(ids, g, backend="triton"), R.token_group_transform(ids, g))
    key = (TK._vocab_plan, y.shape, y.dtype, y.device, perms.shape, perms.dtype, perms.device,
           K.scale_key(1.0 if weighted else 1.0 / g.order), K.weights_key(w), True)
    plan = K._plans[key]
    assert plan.launches["jit"] + plan.launches["direct"] == 2


@needs_triton
def test_bad_input_never_gets_a_plan():
    """Checks run when a plan is made; a call that fails them leaves no plan,
    so the next identical call fails the same way."""
    K = kernels()
    y = random_tensor((6, 3, 4, 4), torch.float32, DEVICE)  # 6 rows: not a multiple of |C4| = 4
    before = len(K._plans)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="multiple of the group order"):
            K.group_average_triton(y, [0, 3, 2, 1], 0.25)
        with pytest.raises(RuntimeError, match="square inputs"):
            K.group_transform_triton(random_tensor((1, 3, 4, 5), torch.float32, DEVICE), [0, 1], 1.0)
    assert len(K._plans) == before


@needs_triton
def test_plan_cache_is_bounded(monkeypatch):
    K = kernels()
    monkeypatch.setattr(K, "_PLANS_MAX", 3)
    for side in range(2, 8):
        check("transform", random_tensor((1, 1, side, side), torch.float32, DEVICE), "rot180")
        assert len(K._plans) <= 3


@needs_triton_kernels
@pytest.mark.skipif(INTERPRETING, reason="the interpreter has no compiled kernels or autotuners")
@pytest.mark.parametrize("op,layout", [("transform", "planar"), ("transform", "forced"), ("average", "planar"),
                                       ("average", "channels_last"), ("vocab_average", "plain"),
                                       ("vocab_transform", "weighted"), ("token_transform", "plain")])
def test_direct_launch_arguments_match_the_kernel_signature(op, layout, monkeypatch):
    """What a plan keeps for direct launches (LaunchPlan._keep), built here from
    a stand-in compiled kernel (no GPU): the grid of the config that ran and
    every argument after the leading tensors, in the kernel's signature order,
    constexprs included, as Triton's JIT passes them to a compiled kernel."""
    K = kernels()
    from equitune_ext.triton import token_kernels as TK

    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    codes = list(E.get_image_group("c4").codes)
    perms = E.TokenGroup.from_cycles(16, [[1, 2]]).tables("cpu")
    n_tensors = 3
    if op in ("transform", "average"):
        x = torch.empty((8 if op == "average" else 2, 3, 8, 8), dtype=torch.float32, memory_format=memory_format)
        make = K._transform_plan if op == "transform" else K._average_plan
        if layout == "forced":
            with K.transform_config(output_tiles=True, block=16, num_warps=2):
                plan = make(x, codes, 1.0, None)
        else:
            plan = make(x, codes, 0.25 if op == "average" else 1.0, None)
    elif op == "token_transform":  # the launcher plans inside: take its plan from the cache
        ids = torch.randint(0, 16, (3, 5))
        monkeypatch.setattr(TK, "launch_plan", lambda plan, eager, *tensors: None)  # no GPU here
        TK.token_transform_triton(ids, perms)
        plan = K._plans[(TK.token_transform_triton, ids.shape, ids.dtype, ids.device, perms.shape, perms.device)]
    else:
        n_tensors = 4
        weights = torch.rand(2, 3) if layout == "weighted" else None
        x = torch.empty((6 if op == "vocab_average" else 3, 4, 16))
        plan = TK._vocab_plan(x, perms, 0.5, weights, is_average=op == "vocab_average")
    kernel = plan.kernel
    config_kwargs = {}
    if isinstance(kernel, __import__("triton").runtime.Autotuner):
        config = kernel.configs[-1]
        monkeypatch.setattr(kernel, "best_config", config, raising=False)
        config_kwargs = config.kwargs
        jit_fn = kernel.fn
    else:
        jit_fn = kernel

    class Compiled:
        packed_metadata = None

        def __getitem__(self, grid):
            raise AssertionError("not launched here")

    compiled = Compiled()
    aligned = (True,) * n_tensors
    plan._keep(aligned, compiled)
    kept, grid, tail = plan.compiled[aligned]
    assert kept is compiled
    names = jit_fn.arg_names
    assert len(names) == n_tensors + len(tail) and all(n.endswith("_ptr") for n in names[:n_tensors])
    passed = dict(zip(names[n_tensors:], tail))
    constexprs = {p.name for p in jit_fn.params if p.is_constexpr}
    meta = {**plan.kwargs, **config_kwargs}
    assert {n: passed[n] for n in constexprs} == {n: meta[n] for n in constexprs}
    assert [passed[n] for n in names[n_tensors:] if n not in constexprs] == list(plan.args)
    expected_grid = tuple(plan.grid(meta) if callable(plan.grid) else plan.grid)
    assert grid == expected_grid + (1,) * (3 - len(expected_grid))
    # What is not a compiled kernel (a future of an asynchronous compile, say) is not kept
    plan._keep((False,) * n_tensors, object())
    assert (False,) * n_tensors not in plan.compiled


@needs_triton_kernels
@pytest.mark.skipif(INTERPRETING, reason="reads the switch at import, outside the interpreter")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_direct_launch_switch(setting):
    code = "from equitune_ext.triton import kernels as K; print(K._DIRECT_LAUNCH)"
    env = {**os.environ, "EQUITUNE_TRITON_DIRECT_LAUNCH": setting, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("True" if setting == "1" else "False")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches happen on CUDA only")
@pytest.mark.parametrize("op", ["transform", "average"])
@pytest.mark.parametrize("group", ["c4", "d4", "hflip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_direct_launches_agree_with_the_reference_cuda(op, group, dtype):
    """Each layout called three times with new data: the first call goes through
    Triton's JIT (and autotuner), the later ones launch the compiled kernel
    directly; all must match the reference, the unaligned (offset) input too,
    whose pointer Triton specializes differently."""
    order = E.get_image_group(group).order
    shape = (2 * (order if op == "average" else 1), 5, 9, 9)
    for name, t in variants(shape, dtype, "cuda").items():
        for seed in range(3):
            if seed:
                t.copy_(random_tensor(shape, dtype, "cuda", seed=20 + seed))
            check(op, t, group)
        plan = plan_of(op, t, group)
        assert plan.launches["direct"] >= 2, (name, plan.launches)
        aligned = (t.data_ptr() % 16 == 0, True, True)
        assert aligned in plan.compiled, (name, list(plan.compiled))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches happen on CUDA only")
def test_direct_launches_follow_the_current_stream_and_device_cuda():
    x = random_tensor((4, 3, 16, 16), torch.float32, "cuda")
    E.group_transform(x, "d4", backend="triton")  # compiles; the next calls launch directly
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # x is written on the default stream
    with torch.cuda.stream(stream):
        out = E.group_transform(x, "d4", backend="triton")
        avg = E.group_average(out, "d4", backend="triton")
    stream.synchronize()
    torch.testing.assert_close(out, R.group_transform(x, "d4"), atol=0, rtol=0)
    torch.testing.assert_close(avg, x, atol=1e-6, rtol=1e-6)
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        for _ in range(2):
            torch.testing.assert_close(E.group_transform(x1, "d4", backend="triton"), R.group_transform(x1, "d4"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches happen on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_op_direct_launches_agree_with_the_reference_cuda(dtype):
    """The vocabulary average (plain and λ-weighted), its backward (the
    vocabulary transform) and the id transform, three calls each: the later
    ones launch directly and must match the reference."""
    K = kernels()
    g = E.TokenGroup.from_cycles(50, [[1, 2], [3, 4]])
    before = {id(p): p.launches["direct"] for p in K._plans.values()}
    for seed in range(3):
        y = random_tensor((2 * g.order, 3, 50), dtype, "cuda", seed=seed).requires_grad_()
        w = torch.softmax(random_tensor((g.order, 2), dtype, "cuda", seed=7 + seed), 0)
        grad_out = random_tensor((2, 3, 50), dtype, "cuda", seed=30 + seed)
        for weights in (None, w):
            got = E.group_average(y, g, weights=weights, backend="triton")
            want = R.token_group_average(y, g, weights=weights)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(torch.autograd.grad(got, y, grad_out)[0], torch.autograd.grad(want, y, grad_out)[0])
        ids = torch.randint(0, 50, (2, 9), device="cuda")
        assert torch.equal(E.group_transform(ids, g, backend="triton"), R.token_group_transform(ids, g))
    direct = sum(p.launches["direct"] - before.get(id(p), 0) for p in K._plans.values())
    assert direct >= 10  # averages, their backward transforms and the id transform, twice each


@needs_triton
@pytest.mark.parametrize("case", ["average", "transform input tiles", "transform output tiles", "average mirrored"])
def test_tiles_beyond_one_grid_axis(case, monkeypatch):
    """A plane with more tiles than one grid axis takes (CUDA: 65535, from
    8192 x 8192 planes on) numbers them along grid axes 1 and 2; the ids past
    the last tile do nothing. Checked here with the limit lowered to 2: a
    70 x 70 plane has 3 x 3 tiles of 32, so 5 rounds of 2 ids, one past the end."""
    K = kernels()
    monkeypatch.setattr(K, "_GRID_AXIS_LIMIT", 2)
    assert K._tiles_grid(6, 9) == (6, 2, 5)
    group = "d4" if case == "average mirrored" else "c4"
    order = E.get_image_group(group).order
    if case.startswith("average"):
        check("average", random_tensor((order * 1, 2, 70, 70), torch.float32, DEVICE, seed=4), group)
    else:
        with K.transform_config(output_tiles=case.endswith("output tiles")):
            check("transform", random_tensor((1, 2, 70, 70), torch.float32, DEVICE, seed=5), group)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grid limit is CUDA's")
@pytest.mark.parametrize("op", ["transform", "average"])
def test_plane_of_8192_squared_cuda(op):
    """The real case: an 8192 x 8192 plane has 65536 tiles of 32 x 32, one more
    than a grid axis takes."""
    order = E.get_image_group("c4").order
    t = random_tensor((order if op == "average" else 1, 1, 8192, 8192), torch.float32, "cuda", seed=6)
    with kernels().transform_config(output_tiles=False, block=32):
        check(op, t, "c4")
