"""Volume groups on CPU: the fused volume ops against the plain loop and the
memory floor, and mirrored inference of a small 3-D segmentation net.

Ops (float32, forward): transform against the copy floor (a fresh [|G|·B, …]
output filled from x in one broadcast copy_: exactly the output's bytes
written, in one parallel region like the fused op, so that it is not the
floor that pays for threads descheduled on a loaded machine)
and the loop (|G| flip/permute + cat, reference.group_transform); average
against a plain mean over the group dim (reads every byte once) and the loop
(|G| inverse flip/permute + stack + mean, reference.group_average).

Mirrored inference: ``equi_average(net, x, "flip3d", equivariant=True)``
against nnU-Net's test-time mirroring loop (call the net on each flip
combination, flip back, add, divide), same output to 1e-5; time (interleaved
medians) and peak memory (peak RSS growth of one call, each case in a fresh
process).

    python -m benchmarks.bench_volume [--only ops|segmentation] [--device cpu|cuda] [--threads N] [--out NAME]
    bash benchmarks/run.sh python --only volume      (the same with tcmalloc preloaded)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

import torch

import equitune_ext as E
from equitune_ext import reference as R

from equitune_ext.examples.volume import SegNet, nnunet_mirroring

from .bench_image_ops import floor_average
from .common import bench, machine, machine_line, markdown_table, write_results

OP_CASES = (("flip3d", (2, 16, 64, 64, 64)), ("oh", (2, 8, 32, 32, 32)))
TARGETS = {"transform": ("copy floor", 1.3), "average": ("plain mean", 1.5)}


def floor_transform(x: torch.Tensor, order: int) -> torch.Tensor:
    out = torch.empty((order * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    out.view(order, *x.shape).copy_(x.expand(order, *x.shape))
    return out


def run_ops(device: str = "cpu") -> List[Dict]:
    """On CUDA the fused rows are the C++ kernels ("auto" there) and Triton's."""
    rows = []
    for group, shape in OP_CASES:
        order = E.get_image_group(group).order
        for op in ("transform", "average"):
            torch.manual_seed(0)
            x = torch.randn(shape if op == "transform" else (order * shape[0], *shape[1:]), device=device)
            if op == "transform":
                fns = {"fused": lambda: E.group_transform(x, group), "loop (flip/permute + cat)": lambda: R.group_transform(x, group),
                       "copy floor": lambda: floor_transform(x, order)}
            else:
                fns = {"fused": lambda: E.group_average(x, group), "loop (flip/permute + stack + mean)": lambda: R.group_average(x, group),
                       "plain mean": lambda: floor_average(x, order)}
            if device == "cuda":
                fused = E.group_transform if op == "transform" else E.group_average
                fns["fused triton"] = lambda: fused(x, group, backend="triton")
            for name in [n for n in fns if n.startswith("fused")]:
                torch.testing.assert_close(fns[name](), fns[next(n for n in fns if n.startswith("loop"))](), atol=1e-6, rtol=1e-6)
            times = bench(fns, device)
            floor_name, target = TARGETS[op]
            loop = next(name for name in fns if name.startswith("loop"))
            out_rows = order * shape[0] if op == "transform" else shape[0]
            moved = (x.numel() + out_rows * x[0].numel()) * x.element_size()
            for name, t in times.items():
                rows.append({"group": group, "op": op, "shape": "x".join(map(str, x.shape)), "provider": name,
                             "ms": round(t * 1e3, 2), "GB/s": round(moved / t / 1e9, 1),
                             "x floor": round(t / times[floor_name], 2), "loop / this": round(times[loop] / t, 2),
                             "target": f"<= {target}x floor, >= 2x loop" if name.startswith("fused") else ""})
            print(markdown_table(rows[-len(times):], list(rows[-1])), flush=True)
    return rows


SEG_PROVIDERS = {
    "nnU-Net loop": lambda net, x: nnunet_mirroring(net, x),
    "equi_average": lambda net, x: E.equi_average(net, x, "flip3d", equivariant=True),
    "equi_average chunk_size=2": lambda net, x: E.equi_average(net, x, "flip3d", equivariant=True, chunk_size=2),
    "equi_average chunk_size=1": lambda net, x: E.equi_average(net, x, "flip3d", equivariant=True, chunk_size=1),
}
SEG_SHAPE = (1, 1, 64, 64, 64)


def seg_case():
    torch.manual_seed(0)
    return SegNet(hidden=8, classes=2).eval(), torch.randn(SEG_SHAPE)


def peak_extra_mib(provider: str) -> float:
    """Peak RSS growth of one call of provider, in this (fresh) process."""
    net, x = seg_case()

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    with torch.inference_mode():
        base = status("VmRSS:")
        SEG_PROVIDERS[provider](net, x)
        return status("VmHWM:") - base


def run_segmentation() -> List[Dict]:
    memory = {}
    for provider in SEG_PROVIDERS:  # each in a fresh process: peak RSS is per process
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_volume", "--peak-memory-of", provider,
                              "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
        memory[provider] = json.loads(out.stdout.strip().splitlines()[-1])
    net, x = seg_case()
    with torch.inference_mode():
        want = nnunet_mirroring(net, x)
        errors = {p: (f(net, x) - want).abs().max().item() for p, f in SEG_PROVIDERS.items()}
        times = bench({p: (lambda f=f: f(net, x)) for p, f in SEG_PROVIDERS.items()}, "cpu")
    loop = "nnU-Net loop"
    return [{"provider": p, "ms": round(times[p] * 1e3, 1), "x loop time": round(times[p] / times[loop], 2),
             "peak extra MiB": round(memory[p], 1), "x loop memory": round(memory[p] / memory[loop], 2),
             "max abs diff vs loop": f"{errors[p]:.1e}"} for p in SEG_PROVIDERS]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("ops", "segmentation"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the ops only (C++ and Triton kernels)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="result name under benchmarks/results (default volume_<device>)")
    p.add_argument("--peak-memory-of", choices=list(SEG_PROVIDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        print(json.dumps(peak_extra_mib(args.peak_memory_of)))
        return None
    args.out = args.out or f"volume_{args.device}"
    meta = machine()
    # The load of the machine when the run started: on a shared VM other processes take cores, which
    # hits the providers that synchronize threads most (see benchmarks/README.md, "Volume groups").
    meta["load_average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    md = f"# Volume groups on {args.device.upper()}\n\n{machine_line(meta)}; load average {meta['load_average']}\n\n"
    rows = {}
    if args.only in (None, "ops"):
        rows["ops"] = run_ops(args.device)
        md += "## Fused volume ops, float32, forward\n\n" + markdown_table(rows["ops"], list(rows["ops"][0])) + "\n"
    if args.only in (None, "segmentation") and args.device == "cpu":  # the net's time, not the kernels'
        rows["segmentation"] = run_segmentation()
        md += (f"## Mirrored inference (flip3d) of the volume example's SegNet (hidden 8, 2 classes) on "
               f"{list(SEG_SHAPE)}, float32, inference mode\n\n"
               + markdown_table(rows["segmentation"], list(rows["segmentation"][0])))
    print(md)
    write_results(args.out, [dict(r, table=name) for name, table in rows.items() for r in table], meta, md)
    return rows


if __name__ == "__main__":
    main()
