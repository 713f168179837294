"""Host time per op call: the fixed cost a backend adds to every call, which is
what small batches pay (the GPU finishes a tiny input long before the host has
issued the next call).

For each backend and a tiny input, the wall time per call of N calls followed by
one synchronize (median of rounds):
  forward             the op alone
  forward+backward    torch.autograd.grad through the op (backward on autograd's
                      device thread, as in training)
  forward+backward, 1 thread   the same with autograd multithreading disabled
                      (backward in the calling thread): if this is much cheaper,
                      the cost is in running the backend from autograd's thread.

    python -m benchmarks.bench_call_overhead [--device cuda] [--profile triton]
Backends: cpp, triton (eager calls launch the kernels directly), "triton
registered op" (the torch.library.triton_op pair, as torch.compile sees it),
"python Function floor" (a torch.autograd.Function whose forward and backward
only allocate their outputs: the least a Python-launched op can cost, and what
autograd's device thread adds to any Python backward) and
"triton kernel only" (the average's kernel launched from its launch plan: through
the autotuner, as a plain JIT kernel, and as the compiled kernel the plan keeps
for direct launches: Triton's own launch cost).
--profile BACKEND prints the cProfile of that backend's forward+backward (one thread)
by own time: where the host time goes.
--stub-triton-launch (CPU, no GPU): Triton's JIT launch becomes a no-op returning a stand-in
compiled kernel (so plans take their direct launch, also a no-op), and the
triton rows time the Python around it (the launchers, autograd, the op layers)
on a machine without a GPU; their outputs are left unwritten.
"""
from __future__ import annotations

import argparse
import os
import cProfile
import io
import pstats
import statistics
import time
from typing import Callable, Dict, List

import torch

import equitune_ext as E

from .common import machine, machine_line, markdown_table, write_results


def per_call_seconds(fn: Callable[[], object], device: str, calls: int = 200, rounds: int = 7) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(20):  # warm-up: compiles, autotuning, allocator
        fn()
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def cases(backend: str, group: str, x: torch.Tensor) -> Dict[str, Callable[[], object]]:
    order = E.get_image_group(group).order
    y = torch.randn((order * x.shape[0], *x.shape[1:]), device=x.device)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    grad_y, grad_x = torch.randn_like(y), torch.randn_like(x)
    if backend == "python Function floor":  # allocations only: what any Python autograd node costs
        order_ = order

        class Floor(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t, n_out):
                ctx.n_in = t.shape[0]
                return torch.empty((n_out, *t.shape[1:]), dtype=t.dtype, device=t.device)

            @staticmethod
            def backward(ctx, grad):
                return torch.empty((ctx.n_in, *grad.shape[1:]), dtype=grad.dtype, device=grad.device), None

        transform = lambda t: Floor.apply(t, order_ * t.shape[0])
        average = lambda t: Floor.apply(t, t.shape[0] // order_)
    elif backend == "triton registered op":  # the torch.library.triton_op pair that torch.compile traces
        from equitune_ext import triton as T

        codes = list(E.get_image_group(group).codes)
        transform_op, average_op = T._register()[:2]
        transform = lambda t: transform_op(t, codes, 1.0, None)
        average = lambda t: average_op(t, codes, 1.0 / order, None)
    else:
        transform = lambda t: E.group_transform(t, group, backend=backend)
        average = lambda t: E.group_average(t, group, backend=backend)

    def one_thread(fn):
        def call():
            with torch.autograd.set_multithreading_enabled(False):
                return fn()
        return call

    return {
        "transform forward": lambda: transform(x),
        "transform forward+backward": lambda: torch.autograd.grad(transform(xg), xg, grad_y),
        "transform forward+backward, 1 thread": one_thread(lambda: torch.autograd.grad(transform(xg), xg, grad_y)),
        "average forward": lambda: average(y),
        "average forward+backward": lambda: torch.autograd.grad(average(yg), yg, grad_x),
        "average forward+backward, 1 thread": one_thread(lambda: torch.autograd.grad(average(yg), yg, grad_x)),
    }


def kernel_launch_cases(group: str, y: torch.Tensor) -> Dict[str, Callable[[], object]]:
    """The group_average kernel launched from the plan its launcher made (same
    arguments as the op's calls): through the autotuner, as the plain JIT kernel
    with the autotuner's choice, and as the compiled kernel itself (the plan's
    direct launch). Against the "average forward" row, this splits a Triton
    call's host time into Triton's launch path and ours."""
    from equitune_ext.triton import kernels as K

    codes = list(E.get_image_group(group).inverse_codes)
    scale = 1.0 / len(codes)
    E.group_average(y, group, backend="triton")
    plan = K._eager_plan(K._average_plan, y, codes, scale, None)
    out = torch.empty(plan.out_shape, dtype=y.dtype, device=y.device)
    args = (y, out, plan.no_weights, *plan.args)
    cases = {"group_average kernel via the autotuner": lambda: plan.kernel[plan.grid](*args, **plan.kwargs)}
    config = getattr(plan.kernel, "best_config", None)
    if config is not None:  # absent under the interpreter (no autotuner there)
        plain = {**plan.kwargs, **config.all_kwargs()}
        cases["group_average kernel, plain JIT launch"] = lambda: plan.kernel.fn[plan.grid](*args, **plain)
    if plan.compiled:
        (compiled, grid, tail), = plan.compiled.values()
        cases["group_average kernel, compiled kernel launched directly"] = (
            lambda: compiled[grid](y, out, plan.no_weights, *tail, stream=K._current_stream(y)))
    return cases


def run(device: str, shape: List[int], group: str = "c4") -> List[Dict]:
    x = torch.randn(shape, device=device)
    backends = [b for b in ("cpp", "triton") if b in E.available_backends(device)]
    if "triton" in backends:  # eager calls skip it (equitune_ext/triton/__init__.py); this row says what that saves
        backends.append("triton registered op")
    backends.append("python Function floor")
    rows = []
    for backend in backends:
        for name, fn in cases(backend, group, x).items():
            rows.append({"device": device, "group": group, "backend": backend, "call": name,
                         "us per call": round(per_call_seconds(fn, device) * 1e6, 1)})
    if "triton" in backends:
        y = torch.randn((E.get_image_group(group).order * shape[0], *shape[1:]), device=device)
        for name, fn in kernel_launch_cases(group, y).items():
            rows.append({"device": device, "group": group, "backend": "triton kernel only", "call": name,
                         "us per call": round(per_call_seconds(fn, device) * 1e6, 1)})
    return rows


def profile(backend: str, device: str, shape: List[int], group: str = "c4", top: int = 30) -> str:
    fns = cases(backend, group, torch.randn(shape, device=device))
    fn = fns["transform forward+backward, 1 thread"]
    per_call_seconds(fn, device, calls=20, rounds=1)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def stub_triton_launch() -> None:
    os.environ["EQUITUNE_TRITON_AUTOTUNE"] = "0"  # one config: the autotuner times nothing
    from triton.runtime.jit import JITFunction

    import equitune_ext.triton as T

    from equitune_ext.triton import kernels as K

    class CompiledStub:  # what a JIT launch returns, launching nothing
        packed_metadata = None

        def __getitem__(self, grid):
            return lambda *args, stream=None: None

    compiled = CompiledStub()
    JITFunction.run = lambda self, *args, **kwargs: compiled
    T._INTERPRETING = True  # lets the triton backend take CPU tensors (outside the interpreter: never launched)
    K._DIRECT_LAUNCH, K._DIRECT_LAUNCH_DEVICES = True, ("cpu",)  # plans launch the stub's "compiled kernel"
    K._current_stream = lambda t: 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=4, default=[2, 3, 16, 16])
    p.add_argument("--profile", default=None, help="backend whose transform forward+backward to profile")
    p.add_argument("--stub-triton-launch", action="store_true", help="CPU only: time the Triton path's Python, launch skipped")
    args = p.parse_args(argv)
    if args.stub_triton_launch:
        if args.device != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--stub-triton-launch is for CPU tensors without TRITON_INTERPRET")
        stub_triton_launch()
    if args.profile:
        print(profile(args.profile, args.device, args.shape))
        return []
    meta = machine()
    rows = run(args.device, args.shape)
    stubbed = " (Triton's launch stubbed out: Python host time only)" if args.stub_triton_launch else ""
    md = (f"# Host time per op call, float32 {args.shape}, {args.device}{stubbed}\n\n{machine_line(meta)}\n\n"
          + markdown_table(rows, list(rows[0])))
    print(md)
    write_results(f"call_overhead_{args.device}" + ("_stubbed" if stubbed else ""), rows, meta, md)
    return rows


if __name__ == "__main__":
    main()
