"""Mirrored inference of a 3-D segmentation net on a real brain volume.

The volume is the MNI152 T1 template with its grey- and white-matter
probability maps (ICBM 2009a, shipped inside nilearn's wheel; read with
nibabel), at 2 mm: a 3-class map (other / grey matter / white matter, the
argmax of the maps). A small Conv3d net is trained on random patches of the
LEFT hemisphere only and tested on the whole brain under test-time noise, in
the ways a medical-imaging user would run it:

  one pass            the net as is
  nnU-Net mirroring   nnU-Net's loop: the net on each of the 8 flip
                      combinations in turn, each prediction flipped back, averaged
  equi_average        equi_average(net, x, "flip3d", equivariant=True): the same
                      average, one backbone call on the 8 flips, fused ops
  … chunk_size=1      the same one flip at a time (the loop's peak memory)

Reports Dice per class (grey, white matter; mean over the test noise draws),
the right hemisphere's (never trained on) apart, inference time (median of
interleaved runs), the largest difference from the loop's output and how far
each is from flip-equivariant (check_equivariance on a central 40^3 crop), as
a markdown table.

    python -m equitune_ext.examples.volume [--steps 300] [--mm 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import equitune_ext as E

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CLASSES = ("other", "grey matter", "white matter")


def load_brain(mm: int = 2) -> tuple:
    """(T1 [1, 1, D, H, W] normalized inside the brain, labels [1, D, H, W] int64), mm-sized voxels
    (the template's 1 mm voxels averaged). Axis D runs left to right (the template's RAS x axis)."""
    try:
        import nibabel
        data = resources.files("nilearn") / "datasets" / "data"
    except ImportError as e:  # nilearn installed without its dependencies is enough: only its data files are read
        raise SystemExit(f"this example reads the MNI152 template shipped in nilearn with nibabel: {e}; "
                         "pip install nibabel && pip install --no-deps nilearn") from e

    def read(kind):
        with resources.as_file(data / TEMPLATE.format(kind)) as path:
            volume = torch.from_numpy(np.asarray(nibabel.load(path).get_fdata(dtype=np.float32)))
        volume = volume[: volume.shape[0] // mm * mm, : volume.shape[1] // mm * mm, : volume.shape[2] // mm * mm]
        return F.avg_pool3d(volume[None, None], mm)

    t1, grey, white = read("t1"), read("gm"), read("wm")
    labels = torch.cat([1 - grey - white, grey, white], 1).argmax(1)
    brain = (grey + white) > 0.1
    t1 = (t1 - t1[brain].mean()) / t1[brain].std()
    return t1, labels


class SegNet(nn.Module):
    """A small 3-D segmentation net: four Conv3d layers, same-size output."""

    def __init__(self, hidden: int = 12, classes: int = len(CLASSES)):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv3d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv3d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv3d(hidden, classes, 1))

    def forward(self, x):
        return self.body(x)


def nnunet_mirroring(net, x: torch.Tensor) -> torch.Tensor:
    """nnU-Net's test-time mirroring: the net on every combination of flipped
    spatial axes, each prediction flipped back and added, divided by their number."""
    axes = (2, 3, 4)
    prediction = net(x)
    combinations = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    for flipped in combinations:
        prediction += torch.flip(net(torch.flip(x, flipped)), flipped)
    return prediction / (len(combinations) + 1)


WAYS = {
    "one pass": lambda net, x: net(x),
    "nnU-Net mirroring": nnunet_mirroring,
    "equi_average": lambda net, x: E.equi_average(net, x, "flip3d", equivariant=True),
    "equi_average chunk_size=1": lambda net, x: E.equi_average(net, x, "flip3d", equivariant=True, chunk_size=1),
}
# (backbone calls, rows per call) of each way, for a batch of one volume
BACKBONE_CALLS = {"one pass": (1, 1), "nnU-Net mirroring": (8, 1), "equi_average": (1, 8), "equi_average chunk_size=1": (8, 1)}


def train(net, t1, labels, steps: int, patch: int, seed: int, noise: float) -> float:
    """Adam on random patches whose every voxel lies in the left hemisphere
    (D index < D / 2), with the test's noise; returns the seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    _, _, D, H, W = t1.shape
    starts = [D // 2 - patch, H - patch, W - patch]
    weights = 1.0 / torch.bincount(labels.flatten(), minlength=len(CLASSES)).float()  # classes equally weighted
    net.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        d, h, w = (int(torch.randint(0, s + 1, (), generator=gen)) for s in starts)
        crop = (slice(None), slice(None), slice(d, d + patch), slice(h, h + patch), slice(w, w + patch))
        x = t1[crop] + noise * torch.randn(t1[crop].shape, generator=gen)
        loss = F.cross_entropy(net(x), labels[crop[1:]], weight=weights / weights.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def dice(prediction: torch.Tensor, labels: torch.Tensor, cls: int) -> float:
    p, t = prediction == cls, labels == cls
    return (2 * (p & t).sum() / (p.sum() + t.sum()).clamp(min=1)).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (one patch each)")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--crop", type=int, default=40, help="side of the central crop that check_equivariance moves")
    p.add_argument("--mm", type=int, default=2, help="voxel size in mm (1 mm voxels averaged)")
    p.add_argument("--noise", type=float, default=0.5, help="Gaussian noise std on the normalized T1, train and test")
    p.add_argument("--draws", type=int, default=2, help="test noise draws (Dice is their mean)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per way (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples_out")
    args = p.parse_args(argv)
    for name in ("steps", "patch", "draws", "repeats", "mm", "crop"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")

    t1, labels = load_brain(args.mm)
    if args.patch > min(t1.shape[3:]) or 2 * args.patch > t1.shape[2]:
        p.error(f"--patch {args.patch} does not fit the left hemisphere of the {tuple(t1.shape[2:])} volume")
    torch.manual_seed(args.seed)
    net = SegNet()
    train_seconds = train(net, t1, labels, args.steps, args.patch, args.seed, args.noise)
    print(f"trained {args.steps} steps in {train_seconds:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    tests = [t1 + args.noise * torch.randn(t1.shape, generator=gen) for _ in range(args.draws)]
    right = slice(t1.shape[2] // 2, None)  # the hemisphere the net never saw

    # check_equivariance calls each way on 8 moved inputs: a central crop
    side = min(args.crop, *t1.shape[2:])
    crop = tests[0][(..., *(slice((n - side) // 2, (n - side) // 2 + side) for n in t1.shape[2:]))]
    rows = {}
    with torch.inference_mode():
        outputs = {way: [fn(net, x) for x in tests] for way, fn in WAYS.items()}
        loop_out = outputs["nnU-Net mirroring"]
        for way, fn in WAYS.items():
            outs = outputs[way]
            preds = [o.argmax(1) for o in outs]
            rows[way] = {
                "backbone calls x rows": "{} x {}".format(*BACKBONE_CALLS[way]),
                **{f"Dice {c}": statistics.mean(dice(pr, labels, k) for pr in preds) for k, c in enumerate(CLASSES) if k},
                "Dice right hemisphere": statistics.mean(
                    statistics.mean(dice(pr[:, right], labels[:, right], k) for k in (1, 2)) for pr in preds),
                "max abs diff vs loop": max((o - lo).abs().max().item() for o, lo in zip(outs, loop_out)),
                "flip3d deviation": E.check_equivariance(lambda x, fn=fn: fn(net, x), crop, "flip3d", equivariant=True),
            }
        timed = {way: [] for way in WAYS}
        for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits every way alike
            for way, fn in WAYS.items():
                t0 = time.perf_counter()
                fn(net, tests[0])
                timed[way].append(time.perf_counter() - t0)
    loop_seconds = statistics.median(timed["nnU-Net mirroring"])
    for way in WAYS:
        rows[way]["ms"] = 1e3 * statistics.median(timed[way])
        rows[way]["x loop time"] = statistics.median(timed[way]) / loop_seconds

    columns = list(next(iter(rows.values())))
    fmt = {"max abs diff vs loop": "{:.1e}", "flip3d deviation": "{:.1e}", "ms": "{:.0f}", "x loop time": "{:.2f}"}
    lines = ["| way | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for way, r in rows.items():
        cells = [fmt.get(c, "{:.3f}" if isinstance(r[c], float) else "{}").format(r[c]) for c in columns]
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    shape = "x".join(map(str, t1.shape[2:]))
    md = (f"# Mirrored inference on the MNI152 brain ({args.mm} mm, {shape} voxels)\n\n"
          f"SegNet ({sum(q.numel() for q in net.parameters())} parameters) trained {args.steps} steps on "
          f"{args.patch}^3 left-hemisphere patches ({train_seconds:.0f} s); test: whole brain + N(0, {args.noise}^2) "
          f"noise, {args.draws} draws; {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"time: median of {args.repeats}, interleaved.\n\n"
          + "\n".join(lines) + "\n")
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "volume_mni152.md"), "w") as f:
        f.write(md)
    return rows


if __name__ == "__main__":
    main()
