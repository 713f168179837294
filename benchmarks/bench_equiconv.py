"""EquiConv forward + backward vs the definition computed naively
(rot90/cat → conv → inverse/stack/mean, the public code's way) and vs a plain
nn.Conv2d, float32 [32, 64, 56, 56], 3x3, 64→64.

    python -m benchmarks.bench_equiconv [--device cpu|cuda] [--shape 32 64 56 56]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import equitune_ext as E
from equitune_ext import reference as R

from .common import bench_cpu_interleaved, bench_cuda, machine, machine_line, markdown_table, write_results


def naive(conv: nn.Conv2d, x: torch.Tensor, group: str) -> torch.Tensor:
    return R.group_average(conv(R.group_transform(x, group)), group)


def run(device: str, shape, stride: int):
    torch.manual_seed(0)
    B, C, H, W = shape
    conv = nn.Conv2d(C, C, 3, stride, 1).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    fns = {"nn.Conv2d": (conv, conv.weight)}  # name -> (function, its weight)
    for group in ("c4", "d4"):
        eq = E.EquiConv.from_conv(conv, group)
        eq(x[:1])
        fns[f"EquiConv {group} ({eq.last_path} path)"] = (eq, eq.weight)
        fns[f"naive definition {group}"] = (lambda t, group=group: naive(conv, t, group), conv.weight)

    def step(f, weight):
        def call():
            out = f(x)
            torch.autograd.grad(out, [x, weight], torch.ones_like(out))
        return call

    calls = {name: step(f, w) for name, (f, w) in fns.items()}
    times = bench_cuda(calls) if device == "cuda" else bench_cpu_interleaved(calls, rounds=5, min_time=0.0)
    base = times["nn.Conv2d"]
    rows = []
    for name, t in times.items():
        group = "c4" if "c4" in name else "d4" if "d4" in name else ""
        naive_t = times.get(f"naive definition {group}")
        rows.append({"device": device, "stride": stride, "provider": name, "ms": round(t * 1e3, 1),
                     "x nn.Conv2d": round(t / base, 2),
                     "speedup vs naive": round(naive_t / t, 2) if naive_t and "EquiConv" in name else ""})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    args = p.parse_args(argv)
    meta = machine()
    rows = []
    for stride in (1, 2):  # stride 1, padding 1: fast path; stride 2 on an even input: general path
        rows += run(args.device, args.shape, stride)
        print(markdown_table(rows[-5:], list(rows[0])), flush=True)
    md = (f"# EquiConv forward + backward, float32 {args.shape}, 3x3, padding 1, {args.device}\n\n{machine_line(meta)}\n\n"
          + markdown_table(rows, list(rows[0])))
    print(md)
    write_results(f"equiconv_{args.device}", rows, meta, md)


if __name__ == "__main__":
    main()
