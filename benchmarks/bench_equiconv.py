"""EquiConv forward + backward against a plain nn.Conv2d and the definition
computed naively (rot90/cat → conv → inverse/stack/mean, the public code's
way), float32, on the configurations a ResNet has: 3x3 stride 1 (fast path),
3x3 / 7x7 / 1x1 stride 2 on even inputs (combined kernel); then a whole
ResNet-18 layout (defined here, no torchvision) converted by convert_convs for
c4 and d4 against the plain model, and its invariance error.

    python -m benchmarks.bench_equiconv [--device cpu|cuda] [--rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

import equitune_ext as E
from equitune_ext import reference as R

from .bench_equi_average import resnet18  # the ResNet-18 layout: 7x7 s2 stem, 3x3 s2 max pooling, 2-2-2-2 blocks
from .common import bench_cpu_interleaved, bench_cuda, machine, machine_line, markdown_table, write_results


def naive(conv: nn.Conv2d, x: torch.Tensor, group: str) -> torch.Tensor:
    return R.group_average(conv(R.group_transform(x, group)), group)


# (name, shape, Conv2d args (in, out, kernel, stride, padding), with the naive definition?)
CONV_CASES = [
    ("3x3 s1 p1 64→64", [32, 64, 56, 56], (64, 64, 3, 1, 1), True),
    ("3x3 s2 p1 64→128", [16, 64, 56, 56], (64, 128, 3, 2, 1), True),
    ("7x7 s2 p3 3→64 (stem)", [4, 3, 224, 224], (3, 64, 7, 2, 3), False),
    ("1x1 s2 64→128 (shortcut)", [16, 64, 56, 56], (64, 128, 1, 2, 0), False),
]


def _timed(calls, device: str, rounds: int):
    return bench_cuda(calls, rounds=rounds) if device == "cuda" else bench_cpu_interleaved(calls, rounds=rounds,
                                                                                            min_time=0.0)


def _rows(case: str, shape, times, device: str):
    base = next(iter(times.values()))
    rows = []
    for name, t in times.items():
        group = "c4" if "c4" in name else "d4" if "d4" in name else ""
        naive_t = times.get(f"naive definition {group}")
        rows.append({"device": device, "case": case, "shape": "x".join(map(str, shape)), "provider": name,
                     "ms": round(t * 1e3, 1), "x plain": round(t / base, 2),
                     "speedup vs naive": round(naive_t / t, 2) if naive_t and "Equi" in name else ""})
    return rows


def run_conv(device: str, case: str, shape, args, with_naive: bool, rounds: int):
    torch.manual_seed(0)
    conv = nn.Conv2d(*args).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    fns = {"nn.Conv2d": (conv, conv.weight)}  # name -> (function, its weight)
    for group in ("c4", "d4"):
        eq = E.EquiConv.from_conv(conv, group)
        eq(x[:1])
        fns[f"EquiConv {group} ({eq.last_path} path)"] = (eq, eq.weight)
        if with_naive:
            fns[f"naive definition {group}"] = (lambda t, group=group: naive(conv, t, group), conv.weight)

    def step(f, weight):
        def call():
            out = f(x)
            torch.autograd.grad(out, [x, weight], torch.ones_like(out))
        return call

    return _rows(case, shape, _timed({name: step(f, w) for name, (f, w) in fns.items()}, device, rounds), device)


def run_resnet(device: str, shape, rounds: int):
    """Training step (forward + backward to every parameter, BN in train mode)."""
    torch.manual_seed(0)
    plain = resnet18().to(device).train()
    models = {"ResNet-18 plain": plain}
    for group in ("c4", "d4"):
        models[f"ResNet-18 convert_convs {group}"] = E.convert_convs(copy.deepcopy(plain), group)
    x = torch.randn(shape, device=device)

    def step(model):
        params = [p for p in model.parameters()]

        def call():
            torch.autograd.grad(model(x).sum(), params)
        return call

    return _rows("ResNet-18 layout", shape, _timed({n: step(m) for n, m in models.items()}, device, rounds), device)


def invariance(device: str, sizes=(224, 64)):
    """check_equivariance (invariance of the logits) of the converted ResNet-18 layout, float32, eval mode."""
    rows = []
    for group in ("c4", "d4"):
        torch.manual_seed(0)
        plain = resnet18().to(device).eval()
        model = E.convert_convs(copy.deepcopy(plain), group)
        for size in sizes:
            x = torch.randn(2, 3, size, size, device=device)
            with torch.no_grad():
                rows.append({"device": device, "group": group, "input": f"2x3x{size}x{size}",
                             "plain model": f"{E.check_equivariance(plain, x, group):.1e}",
                             "converted": f"{E.check_equivariance(model, x, group):.1e}"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--resnet-rounds", type=int, default=11)
    p.add_argument("--quick", action="store_true",
                   help="only the stride-2 3x3 and 1x1 cases and the ResNet; no invariance, nothing written")
    p.add_argument("--resnet-only", action="store_true", help="only the ResNet; nothing written")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = machine()
    load = os.getloadavg()[0]
    rows = []
    for case, shape, conv_args, with_naive in CONV_CASES:
        if args.resnet_only or args.quick and "3x3 s2" not in case and "1x1" not in case:
            continue
        rows += run_conv(args.device, case, shape, conv_args, with_naive, args.rounds)
        print(markdown_table(rows[-5:], list(rows[0])), flush=True)
    rows += run_resnet(args.device, [4, 3, 224, 224], args.resnet_rounds)
    print(markdown_table(rows[-3:], list(rows[-1])), flush=True)
    partial = args.quick or args.resnet_only
    checks = [] if partial else invariance(args.device)
    md = (f"# EquiConv forward + backward, float32, {args.device}\n\n{machine_line(meta)}\n\n"
          f"Load average when the run began: {load:.1f}"
          + (" (a shared machine: one torch thread, `--threads 1`, keeps the interleaved ratios stable where "
             "two threads contend with other processes)" if args.threads == 1 else "") + "\n\n"
          "Median of interleaved rounds (benchmarks/common.py); `x plain`: time over the first provider of the case "
          "(nn.Conv2d, or the plain ResNet-18). ResNet-18 layout: a training step (forward, backward to every "
          "parameter, BatchNorm in train mode), every Conv2d and the max pooling converted by convert_convs.\n\n"
          + markdown_table(rows, list(rows[0])))
    if checks:
        md += ("\n## Invariance of the ResNet-18 layout's logits (check_equivariance, float32, eval mode)\n\n"
               + markdown_table(checks, list(checks[0])))
    md += ("\nRerun: `LD_PRELOAD=$(ldconfig -p | awk '/libtcmalloc_minimal\\.so\\.4 /{print $NF; exit}') "
           "python -m benchmarks.bench_equiconv --threads 1`\n")
    print(md)
    if not partial:
        write_results(f"equiconv_{args.device}", rows + [dict(r, case="invariance") for r in checks], meta, md)


if __name__ == "__main__":
    main()
