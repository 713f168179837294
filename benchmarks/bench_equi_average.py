"""One equi-tuning training step (forward + backward) of a ResNet-18-sized CNN:
equi_average with the fused ops vs the same model called once on a pre-built
|G|·B batch (the floor: the ops' overhead is the difference), the reference
path (rot90/cat → model → inverse/stack/mean) and a loop of |G| model calls
(test-time-augmentation style, as ttach does).

    python -m benchmarks.bench_equi_average [--device cpu|cuda] [--batch 8] [--size 64]

--chunks: the memory-bounded training step instead (chunk_size None / 1 / |G|/2
against the plain model on B rows, d4 by default, [8, 3, 96, 96]): step time
(interleaved) and peak extra memory of one training step, each in a fresh
process (CPU: VmHWM growth over the RSS after the model and inputs are built;
CUDA: max_memory_allocated growth).

    python -m benchmarks.bench_equi_average --chunks [--group d4] [--batch 8] [--size 96]

--sampled: sampled equi-tuning. One SGD training step (zero_grad,
forward, loss, backward, optimizer step) of EquiTuned(train_samples=k), k = 1
and 2, against the full step (all |G| elements), c4 and d4, [8, 3, 64, 64]
by default; and the per-row ops with elements covering the whole group against
the per-block ops on [32, 64, 56, 56] (transform; average; forward+backward).

    python -m benchmarks.bench_equi_average --sampled [--batch 8] [--size 64]

--canonical: canonicalized equi-tuning (mode="canonical": one backbone call on
B rows) and equizero's inference (mode="max"), d4, [8, 3, 64, 64], a small
scorer (two strided 3x3 convs, pooled, linear) on the |G|·B transforms: eval
forward (no_grad) against the plain model's and the full average's; one SGD
training step (cross-entropy + prior, backward, step) against the plain
model's and the full average's. Every row in one interleaved run.

    python -m benchmarks.bench_equi_average --canonical [--group d4] [--batch 8] [--size 64]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import equitune_ext as E

from .common import bench, machine, machine_line, markdown_table, write_results


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


def resnet18(num_classes=10):
    """ResNet-18's layout (2-2-2-2 basic blocks, 64..512 channels)."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def run(device: str, group: str, batch: int, size: int):
    torch.manual_seed(0)
    model = resnet18().to(device)
    g = E.get_image_group(group)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    prebuilt = E.group_transform(x, g)
    y_rep = y.repeat(g.order)

    def step(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()

    fns = {
        "model on pre-built |G|·B batch": lambda: step(F.cross_entropy(model(prebuilt), y_rep)),
        "equi_average (fused ops)": lambda: step(F.cross_entropy(E.equi_average(model, x, g), y)),
        "reference path (rot90/cat/stack/mean)": lambda: _with_reference(lambda: step(F.cross_entropy(E.equi_average(model, x, g), y))),
        f"loop of |G| = {g.order} model calls": lambda: step(
            F.cross_entropy(torch.stack([model(g.act(x, k)) for k in range(g.order)]).mean(0), y)
        ),
    }
    times = bench(fns, device)
    floor = times["model on pre-built |G|·B batch"]
    return [
        {"device": device, "group": group, "batch": batch, "size": size, "provider": name,
         "ms/step": round(t * 1e3, 2), "x pre-built": round(t / floor, 3), "images/s": round(batch / t, 1)}
        for name, t in times.items()
    ]


def _with_reference(fn):
    with E.use_backend("reference"):
        return fn()


CHUNK_PROVIDERS = ("plain model (B rows)", "chunk_size None", "chunk_size 1", "chunk_size |G|/2")


def chunk_step(provider: str, device: str, group: str, batch: int, size: int):
    """(one training step of provider as a function, nothing else allocated by it beforehand)."""
    torch.manual_seed(0)
    model = resnet18().to(device)
    g = E.get_image_group(group)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    chunk = {"chunk_size None": None, "chunk_size 1": 1, "chunk_size |G|/2": g.order // 2}.get(provider)
    forward = model if provider.startswith("plain") else E.EquiTuned(model, g, chunk_size=chunk)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
    return step


def peak_extra_mib(provider: str, device: str, group: str, batch: int, size: int) -> float:
    """Peak memory one training step adds, measured in this (fresh) process."""
    step = chunk_step(provider, device, group, batch, size)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    base = status("VmRSS:")
    step()
    return status("VmHWM:") - base


def run_chunks(device: str, group: str, batch: int, size: int):
    memory = {}
    for provider in CHUNK_PROVIDERS:  # each in a fresh process: peak memory is per process
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_equi_average", "--peak-memory-of", provider,
                              "--device", device, "--group", group, "--batch", str(batch), "--size", str(size)],
                             capture_output=True, text=True, check=True)
        memory[provider] = json.loads(out.stdout.strip().splitlines()[-1])
    times = bench({p: chunk_step(p, device, group, batch, size) for p in CHUNK_PROVIDERS}, device)
    plain, unchunked = memory[CHUNK_PROVIDERS[0]], times["chunk_size None"]
    return [{"device": device, "group": group, "batch": batch, "size": size, "provider": p,
             "ms/step": round(times[p] * 1e3, 1), "x unchunked time": round(times[p] / unchunked, 2),
             "peak extra MiB": round(memory[p], 1), "x plain model memory": round(memory[p] / plain, 2)}
            for p in CHUNK_PROVIDERS]


def run_sampled(device: str, batch: int, size: int, groups=("c4", "d4")):
    """Rows of the --sampled step table: every provider's SGD step, interleaved."""
    rows = []
    for group in groups:
        g = E.get_image_group(group)
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        # The floor of the ratio: the plain model's SGD step on B rows over its step on |G|·B rows
        # (the backbone's own scaling with batch size; the ops add ~nothing on either side).
        prebuilt, y_rep = E.group_transform(x, g), y.repeat(g.order)
        fns = {}
        for k in (None, 1, 2, "plain B", "plain |G|·B"):
            model = resnet18().to(device)
            net = E.EquiTuned(model, g, train_samples=k).train() if not isinstance(k, str) else model
            inputs, targets = (prebuilt, y_rep) if k == "plain |G|·B" else (x, y)
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

            def step(net=net, opt=opt, inputs=inputs, targets=targets):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(inputs), targets).backward()
                opt.step()
            name = {None: f"full ({g.order} elements)", "plain B": "plain model, B rows",
                    "plain |G|·B": "plain model, |G|·B rows"}.get(k, f"train_samples={k}")
            fns[name] = step
        times = bench(fns, device)
        full = times[f"full ({g.order} elements)"]
        rows += [{"device": device, "group": group, "batch": batch, "size": size, "provider": name,
                  "ms/step": round(t * 1e3, 1), "x full step": round(t / full, 3), "images/s": round(batch / t, 1)}
                 for name, t in times.items()]
        floor = times["plain model, B rows"] / times["plain model, |G|·B rows"]
        rows.append({"device": device, "group": group, "batch": batch, "size": size,
                     "provider": "floor: plain B rows / plain |G|·B rows", "ms/step": "", "x full step": round(floor, 3),
                     "images/s": ""})
    return rows


def run_rows_ops(device: str, shape=(32, 64, 56, 56)):
    """Per-row ops, elements = the whole group, vs the per-block ops (same result)."""
    rows = []
    for group in ("c4", "d4"):
        g = E.get_image_group(group)
        torch.manual_seed(0)
        x = torch.randn(*shape, device=device)
        yb = torch.randn(g.order * shape[0], *shape[1:], device=device)
        idx = torch.arange(g.order, device=device)[:, None].expand(g.order, shape[0])
        xg = x.clone().requires_grad_()
        fns = {
            "transform per-block": lambda: E.group_transform(x, g),
            "transform per-row": lambda: E.group_transform(x, g, elements=idx),
            "average per-block": lambda: E.group_average(yb, g),
            "average per-row": lambda: E.group_average(yb, g, elements=idx),
            "fwd+bwd per-block": lambda: torch.autograd.grad(E.group_average(E.group_transform(xg, g) * 2, g).sum(), xg),
            "fwd+bwd per-row": lambda: torch.autograd.grad(
                E.group_average(E.group_transform(xg, g, elements=idx) * 2, g, elements=idx).sum(), xg),
        }
        times = bench(fns, device)
        for op in ("transform", "average", "fwd+bwd"):
            block, per_row = times[f"{op} per-block"], times[f"{op} per-row"]
            rows.append({"device": device, "group": group, "shape": "x".join(map(str, shape)), "op": op,
                         "per-block ms": round(block * 1e3, 2), "per-row ms": round(per_row * 1e3, 2),
                         "per-row / per-block": round(per_row / block, 3)})
    return rows


def small_scorer(channels: int = 3) -> nn.Module:
    """The canonicalizer of the --canonical rows: two strided 3x3 convs, pooled, linear."""
    return nn.Sequential(nn.Conv2d(channels, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1))


def run_canonical(device: str, group: str, batch: int, size: int):
    """Rows of the --canonical table: eval forwards and SGD training steps, all interleaved in one run."""
    g = E.get_image_group(group)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns, kinds = {}, {}
    for kind in ("eval forward", "training step"):
        for provider in ("plain model", "canonical", "max", "full average"):
            if provider == "max" and kind == "training step":
                continue  # equizero's training keeps its definition: all |G|·B rows
            torch.manual_seed(0)
            model = resnet18().to(device)
            net = model if provider == "plain model" else E.EquiTuned(
                model, g, weight_net=small_scorer().to(device) if provider in ("canonical", "max") else None,
                mode={"canonical": "canonical", "max": "max"}.get(provider, "mean"))
            name = f"{kind}: {provider}"
            kinds[name] = (kind, provider)
            if kind == "eval forward":
                net.eval()

                def forward(net=net):
                    with torch.no_grad():
                        return net(x)
                fns[name] = forward
            else:
                net.train()
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
                prior = provider == "canonical"

                def step(net=net, opt=opt, prior=prior):
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(net(x), y)
                    if prior:
                        loss = loss + net.prior_loss()
                    loss.backward()
                    opt.step()
                fns[name] = step
    times = bench(fns, device)
    rows = []
    for name, t in times.items():
        kind, provider = kinds[name]
        plain = times[f"{kind}: plain model"]
        rows.append({"device": device, "group": group, "batch": batch, "size": size, "what": kind, "provider": provider,
                     "ms": round(t * 1e3, 2), "x plain model": round(t / plain, 3),
                     "x full average": round(t / times[f"{kind}: full average"], 3)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="default 64 (96 with --chunks)")
    p.add_argument("--chunks", action="store_true", help="chunk_size rows: step time and peak memory")
    p.add_argument("--group", default="d4", help="with --chunks and --canonical")
    p.add_argument("--sampled", action="store_true", help="sampled equi-tuning rows (train_samples=k) and per-row ops")
    p.add_argument("--canonical", action="store_true", help="canonical / equizero single-call rows (eval forward, step)")
    p.add_argument("--peak-memory-of", choices=CHUNK_PROVIDERS, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.peak_memory_of:
        print(json.dumps(peak_extra_mib(args.peak_memory_of, args.device, args.group, args.batch, args.size)))
        return
    meta = machine()
    if args.chunks:
        size = args.size or 96
        rows = run_chunks(args.device, args.group, args.batch, size)
        md = (f"# Memory-bounded equi-tuning: one training step (forward, loss, backward), ResNet-18 layout, "
              f"{args.group}, {size}x{size}, batch {args.batch}, {args.device}\n\n{machine_line(meta)}\n\n"
              "Peak extra memory of the step, each provider in a fresh process (CPU: VmHWM growth over the RSS after "
              "building the model and inputs; parameter gradients included). Time: interleaved medians.\n\n"
              + markdown_table(rows, list(rows[0])))
        print(md)
        write_results(f"equi_average_chunks_{args.device}", rows, meta, md)
        return
    args.size = args.size or 64
    if args.canonical:
        rows = run_canonical(args.device, args.group, args.batch, args.size)
        md = (f"# Canonicalized equi-tuning, {args.device}\n\n{machine_line(meta)}\n\n"
              f"ResNet-18 layout, [{args.batch}, 3, {args.size}, {args.size}], {args.group}, float32. Eval forward: "
              "no_grad, eval mode. Training step: SGD (zero_grad, forward, cross-entropy (+ prior_loss() for canonical), "
              "backward, step), train mode. canonical / max: EquiTuned(mode=...) with a scorer of two strided 3x3 convs, "
              "pooled, linear, run on the |G|·B transforms; the backbone on the B selected rows. full average: "
              "EquiTuned(mode='mean'), |G|·B rows. Interleaved medians, one run.\n\n"
              + markdown_table(rows, list(rows[0]))
              + "\nRerun: `bash benchmarks/run.sh python --only equi_average_canonical`.\n")
        print(md)
        write_results(f"equi_average_canonical_{args.device}", rows, meta, md)
        return
    if args.sampled:
        steps = run_sampled(args.device, args.batch, args.size)
        print(markdown_table(steps, list(steps[0])), flush=True)
        ops = run_rows_ops(args.device)
        md = (f"# Sampled equi-tuning, {args.device}\n\n{machine_line(meta)}\n\n"
              f"## One SGD training step (zero_grad, forward, loss, backward, step) of EquiTuned, ResNet-18 layout, "
              f"[{args.batch}, 3, {args.size}, {args.size}]: train_samples=k (k sampled elements per example) vs "
              "the full group; the plain model's steps on B and |G|·B rows give the ratio's floor (the "
              "backbone's own scaling with batch size). Interleaved medians.\n\n" + markdown_table(steps, list(steps[0]))
              + "\n\n## Per-row ops (elements = the whole group) vs per-block ops, float32. Interleaved medians.\n\n"
              + markdown_table(ops, list(ops[0]))
              + "\n\nRerun: `python -m benchmarks.bench_equi_average --sampled` (tcmalloc preloaded on CPU).\n")
        print(md)
        write_results(f"equi_average_sampled_{args.device}", steps + ops, meta, md)
        return

    rows = []
    for group in ("c4", "d4"):
        rows += run(args.device, group, args.batch, args.size)
        print(markdown_table(rows[-4:], list(rows[0])), flush=True)
    md = (f"# equi_average training step, ResNet-18 layout, {args.size}x{args.size}, batch {args.batch}, {args.device}\n\n"
          f"{machine_line(meta)}\n\n" + markdown_table(rows, list(rows[0])))
    print(md)
    write_results(f"equi_average_{args.device}", rows, meta, md)


if __name__ == "__main__":
    main()
