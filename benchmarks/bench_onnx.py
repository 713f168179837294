"""The deployed equi-tuned model: EquiTuned(ResNet-18 layout, d4), eval mode, exported as is with
torch.onnx.export (dynamic batch), run by onnxruntime on [8, 3, 64, 64], against onnxruntime
running the plain model's export on the pre-built |G|·B batch (the floor: what the exported group
average costs beyond the backbone). The same two in PyTorch eager, for scale. onnxruntime's CPU
execution provider with intra_op_num_threads = --threads (torch gets as many); interleaved medians.

    python -m benchmarks.bench_onnx [--batch 8] [--size 64] [--group d4] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import equitune_ext as E

from .bench_equi_average import resnet18
from .common import bench_cpu_interleaved, machine, machine_line, markdown_table, write_results


def _session(model, x: torch.Tensor, threads: int):
    """model exported with a dynamic batch, as an onnxruntime CPU session: a function of a numpy batch."""
    import onnxruntime as ort

    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Two sessions' thread pools share the cores in this process: a pool left spinning after its run
    # takes them from the next session's run (1.04-1.17x between runs of the same graphs, 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda a: session.run(None, {name: a})[0]


def run(group: str, batch: int, size: int, threads: int, rounds: int):
    torch.manual_seed(0)
    plain = resnet18().eval()
    equi = E.EquiTuned(plain, group).eval()
    x = torch.randn(batch, 3, size, size)
    prebuilt = E.group_transform(x, group)
    rows_of = f"pre-built {equi.group.order}·B batch"  # no "|" in a provider: it is a markdown table cell
    floor = f"onnxruntime: plain model on {rows_of}"
    ort_equi, ort_plain = _session(equi, x, threads), _session(plain, prebuilt, threads)
    x_np, prebuilt_np = x.numpy(), prebuilt.numpy()
    with torch.no_grad():
        deviation = float((torch.from_numpy(ort_equi(x_np)) - equi(x)).abs().max())
        # Each runtime interleaved with itself: torch's OpenMP threads spin on after a call as well.
        pairs = [{floor: lambda: ort_plain(prebuilt_np), "onnxruntime: exported EquiTuned on B": lambda: ort_equi(x_np)},
                 {f"torch eager: plain model on {rows_of}": lambda: plain(prebuilt),
                  "torch eager: EquiTuned on B (fused ops)": lambda: equi(x)}]
        times, cpu = {}, {}
        for fns in pairs:
            times.update(bench_cpu_interleaved(fns, rounds=rounds))
            cpu.update(bench_cpu_interleaved(fns, rounds=rounds, clock=time.process_time))
    rows = [{"group": group, "input": f"[{batch}, 3, {size}, {size}]", "provider": name,
             "ms/call": round(t * 1e3, 2), "x onnxruntime pre-built": round(t / times[floor], 3),
             "CPU ms/call": round(cpu[name] * 1e3, 2), "CPU x pre-built": round(cpu[name] / cpu[floor], 3),
             "images/s": round(batch / t, 1)} for name, t in times.items()]
    return rows, deviation


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", default="d4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    meta = machine()
    meta["onnxruntime"] = onnxruntime.__version__
    load = os.getloadavg()[0]
    rows, deviation = run(args.group, args.batch, args.size, args.threads, args.rounds)
    load = f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"  # other jobs on a shared VM
    md = (f"# Exported EquiTuned in onnxruntime: ResNet-18 layout, {args.group}, [{args.batch}, 3, {args.size}, "
          f"{args.size}], eval mode, CPU\n\n{machine_line(meta)}, onnxruntime {meta['onnxruntime']} (CPU execution "
          f"provider, intra_op_num_threads={args.threads}); load average (1 min) {load}\n\n"
          "`torch.onnx.export(EquiTuned(model, group), (x,), dynamo=True)` with a dynamic batch, against the plain "
          "model's export run on the pre-built |G|·B batch (the floor); PyTorch eager for scale. Interleaved "
          f"medians of {args.rounds} rounds, each runtime's pair on its own (onnxruntime: thread spinning off), of "
          "wall time (ms/call) and, in a second pass, of the process's CPU time over all its threads (CPU ms/call: "
          "what other jobs on a shared VM do not inflate; spin-waiting threads count). Ratios against the "
          "onnxruntime floor. Largest |onnxruntime - PyTorch| of the equi-tuned logits: "
          f"{deviation:.1e}.\n\n" + markdown_table(rows, list(rows[0]))
          + "\n\nRerun: `bash benchmarks/run.sh python --only onnx` (tcmalloc preloaded), or "
          "`python -m benchmarks.bench_onnx`.\n")
    print(md)
    write_results("onnx_cpu", rows, meta, md)


if __name__ == "__main__":
    main()
