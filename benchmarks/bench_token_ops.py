"""Token groups: the fused vocabulary average vs the reference (index/stack/mean)
on float32 [2·8, 128, 50257] (time and peak extra memory), and EquiLM greedy
generation with a KV cache vs the public code's no-cache recompute loop.

    python -m benchmarks.bench_token_ops [--skip-memory]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import equitune_ext as E
from equitune_ext import reference as R

from .common import bench_cpu_interleaved, machine, machine_line, markdown_table, write_results

V = 50257
SHAPE = (2 * 8, 128, V)


def group():
    # man↔woman-like swaps of a few ids; |G| = 2
    return E.TokenGroup.from_cycles(V, [[1110, 2415], [339, 673], [3139, 3415]])


def _high_water_rss() -> int:
    """This process's peak resident memory (VmHWM, bytes). Not ru_maxrss: Linux
    carries that across fork/exec from the parent, hiding a child's growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_child(provider: str) -> None:
    """Run in a fresh process: prints the peak RSS growth (bytes) of one call."""
    g = group()
    y = torch.randn(SHAPE)
    fn = (lambda: E.group_average(y, g)) if provider == "fused" else (lambda: R.token_group_average(y, g))
    before = _high_water_rss()
    out = fn()
    after = _high_water_rss()
    print(json.dumps({"peak_growth": after - before, "out_bytes": out.nbytes}))


def peak_extra_memory(provider: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_token_ops", "--peak-child", provider],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def naive_generate(model, ids, g, n):
    """The public code's loop: every new token runs |G| model calls on the whole prefix."""
    for _ in range(n):
        logits = torch.stack([model(input_ids=g.act(ids, k)).logits[:, -1, g.perms[k]] for k in range(len(g))]).mean(0)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peak-child", choices=["fused", "reference"])
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 4], help="prompt batch sizes of the generation bench")
    args = p.parse_args(argv)
    if args.peak_child:
        return _peak_child(args.peak_child)
    meta = machine()
    rows = []
    g = group()
    y = torch.randn(SHAPE)
    times = bench_cpu_interleaved({"fused": lambda: E.group_average(y, g), "reference": lambda: R.token_group_average(y, g)},
                                  rounds=5, min_time=0.0)
    out_bytes = y.nbytes // 2
    for name, t in times.items():
        row = {"bench": "vocab average [16,128,50257] f32", "provider": name, "ms": round(t * 1e3, 1),
               "speedup vs reference": round(times["reference"] / t, 2)}
        if not args.skip_memory:
            mem = peak_extra_memory(name)
            row["peak extra memory / output"] = round(mem["peak_growth"] / out_bytes, 2)
        rows.append(row)
    print(markdown_table(rows, list(rows[0])), flush=True)

    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=256)  # GPT-2 small's shape (124M), random weights
    model = transformers.GPT2LMHeadModel(cfg).eval()
    eq = E.EquiLM(model, g)
    for batch in args.gen_batch:
        # Batch 1 is the latency case: each cached step streams all weights for
        # |G| rows, so the CPU's memory bandwidth bounds the gain. Batches of
        # prompts (the fairness example samples 40-80 at once) share that stream,
        # while the recompute loop's work grows with every row.
        prompt = torch.randint(0, V, (batch, 32))
        prompt[:, 5] = 1110  # a moved token in every row: no exact ties
        with torch.no_grad():
            t0 = time.perf_counter()
            cached = eq.generate(prompt, max_new_tokens=args.new_tokens)
            t_cached = time.perf_counter() - t0
            t0 = time.perf_counter()
            naive = naive_generate(model, prompt, g, args.new_tokens)
            t_naive = time.perf_counter() - t0
        same = bool(torch.equal(cached, naive))
        for name, t in (("EquiLM.generate (KV cache)", t_cached), ("no-cache recompute loop", t_naive)):
            rows.append({"bench": f"greedy, batch {batch}, 32-token prompt, {args.new_tokens} new tokens, GPT-2 small (12x768)",
                         "provider": name, "ms": round(t * 1e3, 1), "speedup vs reference": round(t_naive / t, 2),
                         "tokens/s": round(batch * args.new_tokens / t, 1), "same outputs": same})
        print(markdown_table(rows[-2:], list(rows[-1])), flush=True)
    columns = ["bench", "provider", "ms", "speedup vs reference", "peak extra memory / output", "tokens/s", "same outputs"]
    md = f"# Token groups, CPU\n\n{machine_line(meta)}\n\n" + markdown_table(rows, columns)
    print(md)
    write_results("token_ops_cpu", rows, meta, md)


if __name__ == "__main__":
    main()
