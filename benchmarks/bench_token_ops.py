"""Token groups: the fused vocabulary average vs the reference (index/stack/mean)
on float32 [2·8, 128, 50257] (time and peak extra memory); EquiLM against its
plain model (the fused head and shared rows; forward, forward + loss +
backward, peak extra memory; greedy generation with a GenerationConfig,
EquiLM.generate against the plain model's own transformers generate); and
EquiLM greedy generation with a KV cache vs the public code's no-cache
recompute loop.

    python -m benchmarks.bench_token_ops [--skip-memory] [--sections average lm recompute]
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
    if provider in LM_CALLS:
        fn, warm = lm_call(provider)
        warm()  # thread pools, allocator arenas: what any first call pays
    else:
        g = group()
        y = torch.randn(SHAPE)
        fn = (lambda: E.group_average(y, g)) if provider == "fused" else (lambda: R.token_group_average(y, g))
    before = _high_water_rss()
    out = fn()
    after = _high_water_rss()
    print(json.dumps({"peak_growth": after - before, "out_bytes": getattr(out, "nbytes", 0)}))


def peak_extra_memory(provider: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_token_ops", "--peak-child", provider],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- EquiLM against its plain model ------------------------------------------------------------------


def gpt2(layers: int, width: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=256, n_layer=layers, n_embd=width, n_head=width // 64)
    return transformers.GPT2LMHeadModel(cfg).eval()


class Opaque(torch.nn.Module):
    """The model with no readable head (no get_output_embeddings): EquiLM's full
    path, |G|·B rows of [T, V] logits averaged."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def prompts(batch: int, length: int, with_group_token: bool, seed: int = 0) -> torch.Tensor:
    g = group()
    fixed = (g.perms == torch.arange(V)).all(0).nonzero().flatten()
    ids = fixed[torch.randint(0, fixed.numel(), (batch, length), generator=torch.Generator().manual_seed(seed))]
    if with_group_token:
        ids[:, 5] = 1110  # a moved token in every row: |G| backbone rows each
    return ids


FWD = dict(layers=2, width=128, batch=4, length=256)  # the forward layout
GEN = dict(layers=2, width=128, length=32, new=64, batches=(1, 16))  # the generation layout
LM_WHO = {"plain": "plain model", "EquiLM": "EquiLM (fused head)", "EquiLM chunked": "EquiLM, return_logits=False (chunked loss)",
          "EquiLM full": "EquiLM full path"}
LM_CALLS = {f"{mode} {who}" for mode in ("forward", "train") for who in LM_WHO}


def lm_call(provider: str):
    """(the call, a small warm-up call) of one forward-layout provider:
    "forward|train" and a key of LM_WHO."""
    mode, who = provider.split(" ", 1)
    model = gpt2(FWD["layers"], FWD["width"])
    eq = None if who == "plain" else E.EquiLM(Opaque(model) if who == "EquiLM full" else model, group())

    def run(ids):
        if mode == "forward":
            with torch.no_grad():
                return (model(input_ids=ids) if eq is None else eq(ids)).logits
        model.zero_grad(set_to_none=True)
        loss = (model(input_ids=ids, labels=ids) if eq is None else
                eq(ids, labels=ids, return_logits=who != "EquiLM chunked")).loss
        loss.backward()
        return loss

    ids = prompts(FWD["batch"], FWD["length"], with_group_token=True)
    return (lambda: run(ids)), (lambda: run(ids[:1, :16]))


def bench_lm(rows, skip_memory: bool):
    name = (f"GPT-2 {FWD['layers']}x{FWD['width']}, V={V}, B={FWD['batch']}, T={FWD['length']}, |G|=2, "
            "a group token in every row")
    for mode, what in (("forward", "forward (no grad)"), ("train", "forward + loss + backward")):
        providers = {who: lm_call(f"{mode} {who}")[0] for who in LM_WHO if mode == "train" or who != "EquiLM chunked"}
        times = bench_cpu_interleaved(providers, rounds=7, min_time=0.0)
        mem = {} if skip_memory else {who: peak_extra_memory(f"{mode} {who}")["peak_growth"] for who in providers}
        for who, t in times.items():
            row = {"bench": f"{what}, {name}", "provider": LM_WHO[who],
                   "ms": round(t * 1e3, 1), "x plain model": round(t / times["plain"], 2)}
            if mem:
                row["peak extra MiB"] = round(mem[who] / 2**20, 1)
                row["peak extra memory x plain"] = round(mem[who] / mem["plain"], 2)
            rows.append(row)
        print(markdown_table(rows[-len(providers):], list(rows[-1])), flush=True)

    bench_lm_generate(rows)



def bench_lm_generate(rows):
    """Greedy decoding with one GenerationConfig: the plain model's own
    transformers generate against EquiLM.generate (transformers' loop on the
    group-averaged logits, group-batched KV cache)."""
    import transformers

    model = gpt2(GEN["layers"], GEN["width"])
    g = group()
    eq, eq_full = E.EquiLM(model, g), E.EquiLM(Opaque(model), g)
    eos = model.generation_config.eos_token_id  # named: Opaque has no generation_config of its own
    config = transformers.GenerationConfig(max_new_tokens=GEN["new"], do_sample=False, eos_token_id=eos, pad_token_id=eos)
    length, new = GEN["length"], GEN["new"]
    for batch in GEN["batches"]:
        for with_token in (True, False):
            ids = prompts(batch, length, with_group_token=with_token)
            with torch.no_grad():
                out = eq.generate(ids, generation_config=config)
                same = out.shape[1] == length + new and bool(torch.equal(out, eq_full.generate(ids, generation_config=config)))
            times = bench_cpu_interleaved({"plain": lambda: model.generate(ids, generation_config=config),
                                           "EquiLM": lambda: eq.generate(ids, generation_config=config)},
                                          rounds=15, min_time=0.0)
            prompt_kind = "a group token in every prompt" if with_token else "no group token in the prompts"
            for who, t in times.items():
                rows.append({"bench": f"greedy, GPT-2 {GEN['layers']}x{GEN['width']}, V={V}, |G|=2, batch {batch}, "
                                      f"{length}-token prompts, {new} new tokens, {prompt_kind}",
                             "provider": "plain model, transformers generate" if who == "plain" else "EquiLM.generate",
                             "ms": round(t * 1e3, 1), "x plain model": round(t / times["plain"], 2),
                             "tokens/s": round(batch * new / t, 1), "same outputs": same if who == "EquiLM" else ""})
            print(markdown_table(rows[-2:], list(rows[-1])), flush=True)


def naive_generate(model, ids, g, n):
    """The public code's loop: every new token runs |G| model calls on the whole prefix."""
    for _ in range(n):
        logits = torch.stack([model(input_ids=g.act(ids, k)).logits[:, -1, g.perms[k]] for k in range(len(g))]).mean(0)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peak-child", choices=["fused", "reference", *sorted(LM_CALLS)])
    p.add_argument("--sections", nargs="+", choices=["average", "lm", "recompute"], default=["average", "lm", "recompute"])
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 keeps the ratios steady where other processes load the cores)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 4], help="prompt batch sizes of the generation bench")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        return _peak_child(args.peak_child)
    meta = machine()
    rows, lm_rows = [], []
    g = group()
    if "average" in args.sections:
        y = torch.randn(SHAPE)
        times = bench_cpu_interleaved({"fused": lambda: E.group_average(y, g), "reference": lambda: R.token_group_average(y, g)},
                                      rounds=5, min_time=0.0)
        del y
        out_bytes = SHAPE[0] // 2 * SHAPE[1] * SHAPE[2] * 4
        for name, t in times.items():
            row = {"bench": "vocab average [16,128,50257] f32", "provider": name, "ms": round(t * 1e3, 1),
                   "speedup vs reference": round(times["reference"] / t, 2)}
            if not args.skip_memory:
                mem = peak_extra_memory(name)
                row["peak extra memory / output"] = round(mem["peak_growth"] / out_bytes, 2)
            rows.append(row)
        print(markdown_table(rows, list(rows[0])), flush=True)

    if "lm" in args.sections:
        bench_lm(lm_rows, args.skip_memory)

    if "recompute" in args.sections:
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
                cached = eq.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=model.generation_config.eos_token_id)
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
    lm_columns = ["bench", "provider", "ms", "x plain model", "peak extra MiB", "peak extra memory x plain", "tokens/s",
                  "same outputs"]
    md = (f"# Token groups, CPU\n\n{machine_line(meta)}\n\nRerun: `LD_PRELOAD=<libtcmalloc_minimal.so.4> python -m "
          f"benchmarks.bench_token_ops --sections {' '.join(args.sections)}"
          f"{f' --threads {args.threads}' if args.threads else ''}`. Times: medians of interleaved rounds "
          "(benchmarks/common.py); peak extra memory: VmHWM growth of one call in a fresh process, after a small "
          "warm-up call.\n\n")
    if rows:
        md += markdown_table(rows, columns) + "\n"
    if lm_rows:
        md += ("## EquiLM against its plain model\n\nFloat32, random weights. \"EquiLM full path\": the model behind "
               "a wrapper that hides its head, so EquiLM averages |G|·B rows of logits. Generation: greedy, "
               f"GenerationConfig(max_new_tokens={GEN['new']}), both through transformers' generate; \"same outputs\": "
               "EquiLM.generate's tokens equal the full path's, all new tokens generated.\n\n"
               + markdown_table(lm_rows, lm_columns))
    print(md)
    write_results("token_ops_cpu", rows + lm_rows, meta, md)


if __name__ == "__main__":
    main()
