"""Timing, machine description and result writing shared by the benchmarks."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> Dict[str, str]:
    """Names the machine a result came from (CPU model, cores, GPU, allocator)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    return info


def bench_cpu_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 15, min_time: float = 0.05,
                          clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds
    (each round times every provider once) so that drift in clock or memory
    state hits all providers alike. clock=time.process_time: CPU seconds of this
    process (all its threads), which other jobs on a shared VM do not inflate."""
    for fn in fns.values():  # warm-up (and compile)
        fn()
        fn()
    iters = {}
    for name, fn in fns.items():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time:
            fn()
            n += 1
        iters[name] = max(1, n)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(iters[name]):
                fn()
            samples[name].append((clock() - t0) / iters[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def bench_cuda(fns: Dict[str, Callable[[], object]], rounds: int = 5, rep_ms: int = 40) -> Dict[str, float]:
    """Median seconds per call on CUDA: triton.testing.do_bench medians in
    interleaved rounds (each round times every provider once; the median over
    rounds), after one warm-up call of each, so that the GPU's clock ramp and
    drift hit all providers alike. Timed one after another, the first provider
    of a process paid for them (H200 run 3: the first step timed ran 14% slower
    than in run 2; benchmarks/README.md)."""
    from triton.testing import do_bench

    for fn in fns.values():  # compiles, autotuning, cuDNN/cuBLAS handles
        fn()
    torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            samples[name].append(do_bench(fn, warmup=25 if r == 0 else 5, rep=rep_ms, return_mode="median"))
    return {name: statistics.median(s) * 1e-3 for name, s in samples.items()}


def graph_replay(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured into a CUDA graph (after warm-up calls on a side stream, so
    compiles and autotuning happen outside the capture); the returned function
    replays it and returns the captured call's (static) output. Timing the
    replay gives the GPU time of fn's kernels without the host time of
    launching them: small calls are host-bound otherwise."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def bench(fns: Dict[str, Callable[[], object]], device: str) -> Dict[str, float]:
    return bench_cuda(fns) if device == "cuda" else bench_cpu_interleaved(fns)


def write_results(name: str, rows: List[Dict], meta: Dict, markdown: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({"machine": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown)


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out) + "\n"


def machine_line(meta: Dict) -> str:
    return (
        f"Machine: {meta['cpu']}, {meta['cores']} cores ({meta['torch_threads']} torch threads), "
        f"GPU: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, allocator: {meta['allocator']}"
    )


def plot_bars(rows: List[Dict], case_keys: List[str], metric: str, title: str, path: str) -> None:
    """Grouped bars: one group per case (the case_keys columns), one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(" ".join(str(r[k]) for k in case_keys) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.5))
    for n, prov in enumerate(providers):
        vals = []
        for case in cases:
            match = [r[metric] for r in rows if r["provider"] == prov and " ".join(str(r[k]) for k in case_keys) == case]
            vals.append(match[0] if match else 0)
        ax.bar([i + n * width for i in range(len(cases))], vals, width, label=prov)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
