"""torch.func.vmap through the ops: their vmap rule against one call per
sample (what functorch's fallback for an op without a rule does), and
per-sample gradients of an EquiTuned model.

For the c4 transform and average over N samples of a small and a large
float32 input, three providers:
  rule         the ops' vmap rule as shipped (equitune_ext/contract.py: one call on
               the batch, or one call per sample where the batch would have to
               be copied and a sample is larger than _VMAP_COPY_UP_TO_BYTES)
  always copy  one call on the batch, copying it where needed, at any size
  never copy   one call per sample wherever the batch would have to be copied
               (what functorch's fallback costs); the transform's batch of
               [1, C, S, S] samples needs no copy, so it is one call anyway

    python -m benchmarks.bench_vmap [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Dict, List

import torch

import equitune_ext as E
from equitune_ext import contract

from .common import bench, machine, machine_line, markdown_table, write_results


@contextlib.contextmanager
def copy_up_to(device: str, n_bytes: float):
    saved = contract._VMAP_COPY_UP_TO_BYTES.get(device)
    contract._VMAP_COPY_UP_TO_BYTES[device] = n_bytes
    try:
        yield
    finally:
        if saved is None:
            del contract._VMAP_COPY_UP_TO_BYTES[device]
        else:
            contract._VMAP_COPY_UP_TO_BYTES[device] = saved


def providers(device: str, fn) -> Dict[str, object]:
    def forced(n_bytes):
        def call():
            with copy_up_to(device, n_bytes):
                return fn()
        return call
    return {"rule": fn, "always copy": forced(float("inf")), "never copy": forced(0)}


def run(device: str, samples: int) -> List[Dict]:
    rows = []
    for label, (C, S) in {"small": (8, 8), "large": (64, 56)}.items():
        x = torch.randn(samples, 1, C, S, S, device=device)
        y = torch.randn(samples, 4, C, S, S, device=device)
        cases = {
            "transform": lambda: torch.func.vmap(lambda t: E.group_transform(t, "c4"))(x),
            "average": lambda: torch.func.vmap(lambda t: E.group_average(t, "c4"))(y),
        }
        for op, fn in cases.items():
            per_sample_kib = (x if op == "transform" else y)[0].numel() * 4 // 1024
            for provider, seconds in bench(providers(device, fn), device).items():
                rows.append({"device": device, "op": f"c4 {op}", "samples": f"{samples} x {per_sample_kib} KiB ({label})",
                             "provider": provider, "ms": round(seconds * 1e3, 3)})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 4)).to(device)
    model = E.EquiTuned(net, "c4")
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(samples, 1, 8, 8, 8, device=device)
    per_sample = torch.func.vmap(torch.func.grad(
        lambda p, xi: torch.func.functional_call(model, p, (xi,)).logsumexp(-1).sum()), in_dims=(None, 0))
    for provider, seconds in bench(providers(device, lambda: per_sample(params, x)), device).items():
        rows.append({"device": device, "op": "per-sample grads, EquiTuned conv net", "samples": f"{samples} x [1, 8, 8, 8]",
                     "provider": provider, "ms": round(seconds * 1e3, 3)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args(argv)
    meta = machine()
    rows = run(args.device, args.samples)
    md = f"# vmap through the ops, {args.device}\n\n{machine_line(meta)}\n\n" + markdown_table(rows, list(rows[0]))
    print(md)
    write_results(f"vmap_{args.device}", rows, meta, md)
    return rows


if __name__ == "__main__":
    main()
