"""group_transform / group_average: fused kernels vs the reference, torch.compile
of the reference, and the memory-traffic floor.

Floors: transform = a fresh [|G|·B, …] output filled by |G| plain copies of x;
average = a plain mean over the group axis. Both move exactly the bytes the
fused ops must move (read everything once, write everything once).

    python -m benchmarks.bench_image_ops [--device cpu|cuda] [--shape 32 64 56 56]
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import torch

import equitune_ext as E
from equitune_ext import reference as R

import os

from .common import RESULTS, bench, graph_replay, machine, machine_line, markdown_table, plot_bars, write_results


# Also timed as CUDA graph replays on a GPU: a [32, 64, 56, 56] call
# takes less GPU time than the host spends launching it, so the plain rows of
# small shapes time the host; the graph rows time the kernels, as users who
# capture their step (torch.cuda.graph, torch.compile(mode="reduce-overhead")) get them.
GRAPHED_PROVIDERS = ("fused_cpp", "fused_triton", "floor")


def autotuned_choices():
    """{kernel: {tuning key: chosen config}} of every autotuned kernel that has
    run in this process (the autotuner's cache; keys are (plane sides, |G|, and
    the argument dtypes)): how a benchmark says which config won."""
    from equitune_ext.triton import image_channels_last as CL, image_planar as P

    kernels = {"group_transform": P._group_transform_autotuned, "group_average": P._group_average_kernel,
               "group_transform_channels_last": CL._group_transform_channels_last_kernel,
               "group_average_channels_last": CL._group_average_channels_last_kernel}
    return {name: {key: str(config) for key, config in getattr(kernel, "cache", {}).items()}
            for name, kernel in kernels.items() if getattr(kernel, "cache", None)}


def floor_transform(x: torch.Tensor, order: int) -> torch.Tensor:
    out = torch.empty((order * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    for k, block in enumerate(out.chunk(order)):
        block.copy_(x)
    return out


def floor_average(y: torch.Tensor, order: int) -> torch.Tensor:
    return y.view(order, -1, *y.shape[1:]).mean(0)


def providers(op: str, group: str, device: str, direction: str) -> Dict[str, object]:
    """name -> function of the op's input."""
    order = E.get_image_group(group).order
    if op == "transform":
        ref = lambda t: R.group_transform(t, group)
        fns = {"reference": ref, "fused_cpp": lambda t: E.group_transform(t, group, backend="cpp")}
        floor = lambda t: floor_transform(t, order)
    else:
        ref = lambda t: R.group_average(t, group)
        fns = {"reference": ref, "fused_cpp": lambda t: E.group_average(t, group, backend="cpp")}
        floor = lambda t: floor_average(t, order)
    fns["compile(reference)"] = torch.compile(ref, fullgraph=True)
    if "triton" in E.available_backends(device) and device == "cuda":
        fns["fused_triton"] = (
            (lambda t: E.group_transform(t, group, backend="triton"))
            if op == "transform"
            else (lambda t: E.group_average(t, group, backend="triton"))
        )
        # Each of the two strategies the autotuner chooses from, at block 32 (launch_planar's
        # transform_config; no autograd): they differ in the forward only.
        if op == "transform" and direction == "forward":
            import triton

            from equitune_ext.triton.image import launch_image_op

            codes = list(E.get_image_group(group).codes)
            for name, output_tiles in (("triton input tiles", False), ("triton output tiles", True)):
                config = triton.Config({"BLOCK": 32, "OUTPUT_TILES": output_tiles}, num_warps=4)
                fns[name] = lambda t, config=config: launch_image_op(t, codes, 1.0, None, False, config)
    fns["floor"] = floor
    return fns


def errors_vs_reference(calls: Dict[str, Callable[[], object]]) -> Dict[str, str]:
    """||out - ref|| / ||ref|| of every provider's result (the output, or the
    input gradient) at the timed shape and data, so a fast wrong kernel shows in
    its own row; the floor computes another function and is not compared."""
    def result(name):
        out = calls[name]()
        return out[0] if isinstance(out, tuple) else out

    ref = result("reference").double()
    errors = {}
    for name in calls:
        if name.startswith("floor"):
            errors[name] = "-"
        else:
            out = result(name)
            err = (out.double() - ref).norm() / ref.norm()
            errors[name] = f"{err.item():.1e}" if out.shape == ref.shape and torch.isfinite(err) else "WRONG SHAPE OR NaN"
    return errors


def run(device: str, shape: List[int], groups=("c4", "d4")) -> List[Dict]:
    rows = []
    B = shape[0]
    for group in groups:
        order = E.get_image_group(group).order
        for op in ("transform", "average"):
            n_in = B if op == "transform" else order * B
            x = torch.randn((n_in, *shape[1:]), device=device)
            out_rows = order * B if op == "transform" else B
            grad = torch.randn((out_rows, *shape[1:]), device=device)
            elem = x.numel() // n_in
            bytes_moved = (n_in + out_rows) * elem * x.element_size()
            for direction in ("forward", "forward+backward"):
                fns = providers(op, group, device, direction)
                if direction == "forward":
                    calls = {name: (lambda f=f: f(x)) for name, f in fns.items()}
                    moved = bytes_moved
                else:
                    xg = x.clone().requires_grad_()
                    floor_back = (lambda g: floor_average(g, order)) if op == "transform" else (lambda g: floor_transform(g, order))

                    def step(f, name):
                        if name == "floor":  # the two passes a training step needs, with no autograd bookkeeping
                            return lambda: (f(x), floor_back(grad))
                        # autograd.grad, not .backward: no accumulation into a .grad buffer
                        return lambda: torch.autograd.grad(f(xg), xg, grad)

                    calls = {name: step(f, name) for name, f in fns.items()}
                    moved = 2 * bytes_moved
                if device == "cuda":  # the kernels' GPU time alone, without the host time of launching them
                    for name in [n for n in GRAPHED_PROVIDERS if n in calls]:
                        try:
                            calls[f"{name} (graph)"] = graph_replay(calls[name])
                        except RuntimeError as e:  # keep the other rows; test_cuda_graphs.py says why
                            print(f"[bench_image_ops] {group} {op} {direction} {name}: CUDA graph capture failed: {e}",
                                  flush=True)
                errors = errors_vs_reference(calls)
                times = bench(calls, device)
                for name, t in times.items():
                    floor = times.get("floor (graph)") if name.endswith("(graph)") else None
                    rows.append(
                        {
                            "device": device,
                            "group": group,
                            "op": op,
                            "direction": direction,
                            "provider": name,
                            "ms": round(t * 1e3, 3),
                            "GB/s": round(moved / t / 1e9, 1),
                            "x floor": round(t / (floor or times["floor"]), 2),
                            "speedup vs reference": round(times["reference"] / t, 2),
                            "speedup vs compile(reference)": round(times["compile(reference)"] / t, 2),
                            "rel err": errors[name],
                        }
                    )
                print(markdown_table(rows[-len(times):], list(rows[-1])), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    p.add_argument("--out", default=None, help="result name under benchmarks/results (default image_ops_<device>)")
    args = p.parse_args(argv)
    meta = machine()
    rows = run(args.device, args.shape)
    title = f"# group_transform / group_average, float32 {args.shape}, {args.device}\n\n{machine_line(meta)}\n\n"
    md = title + markdown_table(rows, list(rows[0]))
    if "triton" in E.available_backends(args.device) and args.device == "cuda":

        md += "\nTriton autotuner's choices (tuning key -> config):\n\n" + "".join(
            f"- {name} {key}: {config}\n" for name, choices in autotuned_choices().items() for key, config in choices.items())
    print(md)
    name = args.out or f"image_ops_{args.device}"
    write_results(name, rows, meta, md)
    plot_bars(rows, ["group", "op", "direction"], "GB/s", f"float32 {args.shape}, {args.device}: {meta['cpu']} / {meta['gpu']}",
              os.path.join(RESULTS, f"{name}.png"))
    return rows


if __name__ == "__main__":
    main()
