"""Image equi-tuning on rotated digits.

Pretrains a model on upright digits (scikit-learn's 8x8 digits, shipped
inside scikit-learn), then fine-tunes it on upright training digits in
several ways and tests each on randomly rotated (c4) test digits:

  zero-shot      the pretrained model as is
  fine-tune      plain fine-tuning
  equi-tune      EquiTuned(model, "c4"): c4-invariant by construction
  λ-equi-tune    EquiTuned(model, "c4", weight_net=...): learned weights per rotation
  … 1 sampled    the same trained with train_samples=1 (one random rotation per
                 digit per step: 1/4 of the backbone rows), evaluated exactly
                 (with one sampled element the softmax is 1, so λ-equi-tune's
                 weight net gets no gradient and stays at its initialization)
  canonicalized  EquiTuned(model, "c4", weight_net=..., mode="canonical"): the
                 weight net picks one rotation per digit, the backbone sees only
                 that one; trained with the prior loss (weight PRIOR_WEIGHT)
  … prior-pretrained scorer  the same, its scorer first trained by the prior
                 alone on the pretraining digits without their labels, for the
                 pretraining epochs (the prior needs only upright images)
  convert_convs  E.convert_convs(model, "c4") (group-averaged filters), then
                 the same fine-tuning

Reports test accuracy (mean ± std over seeds), training images/s and the
backbone rows each image costs at inference (equi-tuning calls the backbone on
|G| = 4 copies of every image), as a markdown table and a PNG.

    python -m equitune_ext.examples.image [--seeds 3] [--model small_cnn|efficientnet_lite0] [--out DIR]

Several processes (DistributedDataParallel; gloo on CPU, NCCL on GPUs), each
training on its share of every batch; rank 0 prints and writes:

    torchrun --nproc_per_node=2 -m equitune_ext.examples.image
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import equitune_ext as E
from equitune_ext.examples.models import SmallCNN, efficientnet_lite0

GROUP = "c4"
PRIOR_WEIGHT = 1.0  # the canonicalized model's loss: cross-entropy + PRIOR_WEIGHT * prior_loss()
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_pre, n_ft = 900, 300  # pretraining / fine-tuning / test = 900 / 300 / 597
    return (x[:n_pre], y[:n_pre]), (x[n_pre : n_pre + n_ft], y[n_pre : n_pre + n_ft]), (x[n_pre + n_ft :], y[n_pre + n_ft :])


def rotate_randomly(x: torch.Tensor, seed: int) -> torch.Tensor:
    k = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.rot90(img, int(r), (-2, -1)) for img, r in zip(x, k)])


class Prep(nn.Module):
    """Input adapter: EfficientNet wants 3-channel, ImageNet-normalized, larger images."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        if self.kind == "efficientnet_lite0":
            x = F.interpolate(x, size=32, mode="nearest").repeat(1, 3, 1, 1)
            x = (x - IMAGENET_MEAN) / IMAGENET_STD
        return self.model(x)


def make_model(kind: str) -> nn.Module:
    if kind == "small_cnn":
        return Prep(SmallCNN(1, 10), kind)
    return Prep(efficientnet_lite0(num_classes=10), kind)


class WeightNet(nn.Module):
    """λ-equitune scorer: one score per transformed image (softmax over the group is taken by equi_average)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 1))

    def forward(self, x):
        return self.net(x)


def distributed() -> tuple:
    """(rank, world size): (0, 1) unless launched by torchrun with several processes."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train(model, data, epochs, lr, seed, desc, batch=64):
    """Adam on shuffled batches; returns (losses, training images/s). Under
    torchrun every process draws the same batches and trains on its share of
    each (DistributedDataParallel averages the gradients), so the global batch
    and the result are those of one process. A canonicalized model adds its
    prior loss (the losses returned are the cross-entropy alone)."""
    x, y = data
    rank, world = distributed()
    canonical = isinstance(model, E.EquiTuned) and model.mode == "canonical"
    prior = model.prior_loss if canonical else None
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, images, seconds = [], 0, 0.0
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False, disable=rank > 0):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch][rank::world]
            t0 = time.perf_counter()
            task = F.cross_entropy(model(x[idx]), y[idx])
            loss = task if prior is None else task + PRIOR_WEIGHT * prior()
            opt.zero_grad()
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - t0
            images += len(idx) * world
            losses.append(task.item())
    return losses, images / seconds


def pretrain_scorer(net, data, epochs, seed, batch=64):
    """Adam on the prior alone, for the scorer of a canonicalized ``net``: the
    images of ``data`` (upright; their labels unused) are what the identity
    element should score highest on. Every process trains the same scorer on
    the same batches."""
    x, _ = data
    params = list(net.weight_net.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            net(x[idx])
            opt.zero_grad()
            net.prior_loss().backward(inputs=params)
            opt.step()


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    x, y = data
    return (model(x).argmax(-1) == y).float().mean().item()


def run_seed(kind: str, seed: int, pre_epochs: int, ft_epochs: int):
    pre, ft, test = load_digits(seed)
    test_rot = (rotate_randomly(test[0], seed + 1000), test[1])
    torch.manual_seed(seed)
    pretrained = make_model(kind)
    train(pretrained, pre, pre_epochs, 2e-3, seed, f"seed {seed}: pretrain")
    state = {k: v.clone() for k, v in pretrained.state_dict().items()}

    def fresh():
        m = make_model(kind)
        m.load_state_dict(state)
        return m

    results, curves, speed = {"zero-shot": accuracy(pretrained, test_rot)}, {}, {}
    candidates = {
        "fine-tune": fresh(),
        "equi-tune": E.EquiTuned(fresh(), GROUP),
        "λ-equi-tune": E.EquiTuned(fresh(), GROUP, weight_net=WeightNet()),
        "equi-tune, 1 sampled element": E.EquiTuned(fresh(), GROUP, train_samples=1),
        "λ-equi-tune, 1 sampled element": E.EquiTuned(fresh(), GROUP, weight_net=WeightNet(), train_samples=1),
        "canonicalized": E.EquiTuned(fresh(), GROUP, weight_net=WeightNet(), mode="canonical"),
        "canonicalized, prior-pretrained scorer": E.EquiTuned(fresh(), GROUP, weight_net=WeightNet(), mode="canonical"),
        "convert_convs + fine-tune": E.convert_convs(fresh(), GROUP),
    }
    pretrain_scorer(candidates["canonicalized, prior-pretrained scorer"], pre, pre_epochs, seed)
    for name, model in candidates.items():
        torch.manual_seed(seed)
        curves[name], speed[name] = train(model, ft, ft_epochs, 1e-3, seed, f"seed {seed}: {name}")
        results[name] = accuracy(model, test_rot)
    results["upright test, fine-tune"] = accuracy(candidates["fine-tune"], test)
    return results, curves, speed


def inference_rows(name: str) -> int:
    """Backbone rows one test image costs: |G| for the averaged models (the
    sampled ones evaluate the exact average), 1 for the others."""
    return E.get_image_group(GROUP).order if "equi-tune" in name else 1


def plot(summary, curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
    names = [n for n in summary if not n.startswith("upright")]
    means = [100 * statistics.mean(summary[n]) for n in names]
    stds = [100 * (statistics.stdev(summary[n]) if len(summary[n]) > 1 else 0.0) for n in names]
    a1.bar(names, means, yerr=stds, capsize=4,
           color=["#999", "#d62728", "#2ca02c", "#1f77b4", "#98df8a", "#aec7e8", "#9467bd", "#c5b0d5", "#8c564b"])
    a1.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    a1.set_ylabel("accuracy on c4-rotated test digits (%)")
    a1.set_ylim(0, 100)
    for name, c in curves.items():
        a2.plot(c, label=name)
    a2.set_xlabel("fine-tuning step (seed 0)")
    a2.set_ylabel("training loss")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["small_cnn", "efficientnet_lite0"], default="small_cnn")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--out", default="examples_out")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.makedirs(args.out, exist_ok=True)

    summary, curves0, speeds = {}, None, {}
    for seed in range(args.seeds):
        results, curves, speed = run_seed(args.model, seed, args.pretrain_epochs, args.finetune_epochs)
        curves0 = curves0 or curves
        for k, v in results.items():
            summary.setdefault(k, []).append(v)
        for k, v in speed.items():
            speeds.setdefault(k, []).append(v)
    speed = {k: statistics.median(v) for k, v in speeds.items()}

    fmt = lambda v: f"{100 * statistics.mean(v):.1f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0.0):.1f}"
    lines = [
        f"## Image equi-tuning, {args.model}, group {GROUP}, {args.seeds} seeds",
        "",
        "Pretrained on 900 upright digits; fine-tuned on 300 upright digits; tested on 597 digits rotated by random "
        "multiples of 90°. Training images/s: fine-tuning, median over seeds, "
        f"{world} process(es) × {torch.get_num_threads()} CPU thread(s). Canonicalized: prior weight {PRIOR_WEIGHT:g}; "
        f"the prior-pretrained scorer first learns the prior alone on the 900 pretraining digits (labels unused), "
        f"{args.pretrain_epochs} epochs, as the backbone's pretraining.",
        "",
        "| model | test accuracy, rotated (%) | training images/s | backbone rows per image at inference |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {fmt(v)} | {speed[name]:.0f} | {inference_rows(name)} |" if name in speed
              else f"| {name} | {fmt(v)} | | {inference_rows(name)} |"
              for name, v in summary.items()]
    md = "\n".join(lines) + "\n"
    if rank == 0:
        print(md)
        with open(os.path.join(args.out, f"image_{args.model}.md"), "w") as f:
            f.write(md)
        png = os.path.join(args.out, f"image_{args.model}.png")
        plot(summary, curves0, png)
        print(f"wrote {png}")
    if world > 1:
        dist.destroy_process_group()
    return summary, speed


if __name__ == "__main__":
    main()
