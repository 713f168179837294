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
Backends: cpp, triton (the torch.library.triton_op pair) and "python Function
floor" (a torch.autograd.Function whose forward and backward only allocate
their outputs: the least a Python-launched op can cost, and what autograd's
device thread adds to any Python backward).
--profile BACKEND prints the cProfile of that backend's forward+backward (one thread)
by own time: where the host time goes.
"""
from __future__ import annotations

import argparse
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


def run(device: str, shape: List[int], group: str = "c4") -> List[Dict]:
    x = torch.randn(shape, device=device)
    backends = [b for b in ("cpp", "triton") if b in E.available_backends(device)]
    backends.append("python Function floor")
    rows = []
    for backend in backends:
        for name, fn in cases(backend, group, x).items():
            rows.append({"device": device, "group": group, "backend": backend, "call": name,
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=4, default=[2, 3, 16, 16])
    p.add_argument("--profile", default=None, help="backend whose transform forward+backward to profile")
    args = p.parse_args(argv)
    if args.profile:
        print(profile(args.profile, args.device, args.shape))
        return []
    meta = machine()
    rows = run(args.device, args.shape)
    md = (f"# Host time per op call, float32 {args.shape}, {args.device}\n\n{machine_line(meta)}\n\n"
          + markdown_table(rows, list(rows[0])))
    print(md)
    write_results(f"call_overhead_{args.device}", rows, meta, md)
    return rows


if __name__ == "__main__":
    main()
