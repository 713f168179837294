"""SCAN compositional generalization with equi-tuned seq2seq models.

Pretrains a plain Seq2Seq (bidirectional encoder + attention decoder, hidden
64 as in the λ-equitune code) on the train split of a SCAN split, then
continues training it for the same budget in two ways:

  fine-tune    the plain model
  equi-tune    EquiSeq2Seq(model, in_group, out_group) over the split's symmetry
               (add_jump: jump<->run and I_JUMP<->I_RUN; around_right:
               left<->right and I_TURN_LEFT<->I_TURN_RIGHT)

and reports exact-match accuracy of greedy decoding on the split's test set
(mean ± std over seeds) as a markdown table and a PNG.

    python -m equitune_ext.examples.scan [--split add_jump|around_right] [--cell rnn|gru|lstm] [--seeds 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from tqdm import tqdm

from equitune_ext.datasets import scan
from equitune_ext.examples.seq2seq_model import CELLS, Seq2Seq, Vocab, pad_sequences, sequence_nll
from equitune_ext.seq2seq import EquiSeq2Seq

SPLITS = ("add_jump", "around_right")
QUICK_TEST_SIZE = 256  # --quick decodes only this many test commands


class Encoded(NamedTuple):
    """A SCAN subset as padded id tensors: src [N, S], src_lengths [N],
    tgt_in [N, T] (<sos> + actions), tgt_out [N, T] (actions + <eos>)."""

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor

    def __len__(self):
        return self.src.shape[0]

    def batch(self, idx: torch.Tensor) -> "Encoded":
        """Rows idx, trimmed to the longest source and target among them."""
        s = int(self.src_lengths[idx].max())
        t = int((self.tgt_out[idx] != Vocab.PAD).sum(1).max())
        return Encoded(self.src[idx, :s], self.src_lengths[idx], self.tgt_in[idx, :t], self.tgt_out[idx, :t])


def vocabularies() -> Tuple[Vocab, Vocab]:
    """Command and action vocabularies of the whole of SCAN (the same for every split)."""
    pairs = scan.load("all")
    return Vocab.from_sentences(c for c, _ in pairs), Vocab.from_sentences(a for _, a in pairs)


def encode(pairs: Sequence[Tuple[str, str]], in_vocab: Vocab, out_vocab: Vocab) -> Encoded:
    src, src_lengths = pad_sequences([in_vocab.encode(c) for c, _ in pairs])
    tgt_out, _ = pad_sequences([out_vocab.encode(a) for _, a in pairs])
    tgt_in = torch.cat([torch.full_like(tgt_out[:, :1], Vocab.SOS), tgt_out[:, :-1]], 1)
    tgt_in = tgt_in.masked_fill(tgt_in == Vocab.EOS, Vocab.PAD)  # <eos> is a target, never an input
    return Encoded(src, src_lengths, tgt_in, tgt_out)


def train(model, data: Encoded, epochs: int, lr: float, seed: int, desc: str, batch_size: int = 64,
          clip: float = 5.0, final_lr_fraction: float = 0.05) -> List[float]:
    """Teacher-forced training with Adam, gradient-norm clipping and a cosine
    decay of the learning rate to lr·final_lr_fraction (exact match needs every
    token right, and the last low-lr epochs are what get there); the loss of every step."""
    steps = epochs * -(-len(data) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * final_lr_fraction)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc=desc, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch_size):
            b = data.batch(perm[i : i + batch_size])
            loss = sequence_nll(model(b.src, b.src_lengths, b.tgt_in), b.tgt_out)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


@torch.no_grad()
def exact_match(model, data: Encoded, batch_size: int = 1024) -> float:
    """Share of commands whose greedy decoding is exactly the target action sequence."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        b = data.batch(torch.arange(i, min(i + batch_size, len(data))))
        out = model.greedy_decode(b.src, b.src_lengths, max_len=b.tgt_out.shape[1])
        out = torch.nn.functional.pad(out, (0, b.tgt_out.shape[1] - out.shape[1]), value=Vocab.PAD)
        correct += int((out == b.tgt_out).all(1).sum())
    return correct / len(data)


def run_seed(args, seed: int, data: Dict[str, Encoded], vocabs: Tuple[Vocab, Vocab]):
    in_vocab, out_vocab = vocabs
    in_group, out_group = scan.token_groups(args.split, in_vocab, out_vocab)
    new_model = lambda: Seq2Seq(len(in_vocab), len(out_vocab), cell=args.cell, hidden=args.hidden,
                                embedding=args.hidden, dropout=args.dropout, input_feeding=args.input_feeding)
    torch.manual_seed(seed)
    model = new_model()
    curves = {"pretrain": train(model, data["train"], args.pretrain_epochs, args.lr, seed,
                                f"seed {seed}: pretrain", args.batch_size)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {"pretrained": exact_match(model, data["test"])}

    def pretrained():
        m = new_model()
        m.load_state_dict(state)
        return m

    results["equi-tuned, zero-shot"] = exact_match(EquiSeq2Seq(pretrained(), in_group, out_group), data["test"])
    candidates = {"fine-tune": pretrained(), "equi-tune": EquiSeq2Seq(pretrained(), in_group, out_group)}
    for name, model in candidates.items():
        torch.manual_seed(seed + 1)
        curves[name] = train(model, data["train"], args.finetune_epochs, args.finetune_lr, seed + 1,
                             f"seed {seed}: {name}", args.batch_size)
        results[name] = exact_match(model, data["test"])
    return results, curves


def plot(summary, curves, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary)
    means = [100 * statistics.mean(summary[n]) for n in names]
    stds = [100 * (statistics.stdev(summary[n]) if len(summary[n]) > 1 else 0.0) for n in names]
    a1.bar(names, means, yerr=stds, capsize=4, color=["#999", "#bbb", "#d62728", "#2ca02c"][: len(names)])
    a1.set_ylabel("exact-match test accuracy (%)")
    a1.set_ylim(0, 100)
    a1.set_title(title)
    steps = len(curves["pretrain"])
    a2.plot(curves["pretrain"], label="pretrain", color="#999")
    for name, color in (("fine-tune", "#d62728"), ("equi-tune", "#2ca02c")):
        a2.plot(range(steps, steps + len(curves[name])), curves[name], label=name, color=color)
    a2.set_yscale("log")
    a2.set_xlabel("training step (seed 0)")
    a2.set_ylabel("training loss (NLL per token)")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=SPLITS, default="add_jump")
    p.add_argument("--cell", choices=list(CELLS), default="gru")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed ... first-seed + seeds - 1")
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining learning rate (Adam)")
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--no-input-feeding", dest="input_feeding", action="store_false",
                   help="decoder without input feeding (teacher forcing in one RNN call; generalizes worse on around_right)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: with hidden 64 more threads gain little, and on a busy machine they spin)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny settings for tests: 1 seed, 1+1 epochs on 512 training pairs, {QUICK_TEST_SIZE} test commands")
    p.add_argument("--out", default="examples_out")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.pretrain_epochs, args.finetune_epochs, args.hidden = 1, 1, 1, 16
    for name in ("seeds", "batch_size", "hidden", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("pretrain_epochs", "finetune_epochs", "first_seed"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    vocabs = vocabularies()
    train_pairs, test_pairs = scan.load(args.split, "train"), scan.load(args.split, "test")
    if args.quick:  # a fixed sample, the same for every run
        gen = torch.Generator().manual_seed(0)
        train_pairs = [train_pairs[i] for i in torch.randperm(len(train_pairs), generator=gen)[:512]]
        test_pairs = [test_pairs[i] for i in torch.randperm(len(test_pairs), generator=gen)[:QUICK_TEST_SIZE]]
    data = {"train": encode(train_pairs, *vocabs), "test": encode(test_pairs, *vocabs)}

    summary, curves0 = {}, None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        results, curves = run_seed(args, seed, data, vocabs)
        curves0 = curves0 or curves
        for k, v in results.items():
            summary.setdefault(k, []).append(v)
    wall = time.perf_counter() - start

    in_cycles, out_cycles = scan.SYMMETRIES[args.split]
    group = f"{'↔'.join(in_cycles[0])} with {'↔'.join(out_cycles[0])}"
    fmt = lambda v: f"{100 * statistics.mean(v):.1f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0.0):.1f}"
    lines = [
        f"## SCAN {args.split}, {args.cell.upper()}, hidden {args.hidden}"
        f"{'' if args.input_feeding else ', no input feeding'}, {args.seeds} seed(s)"
        f"{f' from {args.first_seed}' if args.first_seed else ''}",
        "",
        f"Pretrained {args.pretrain_epochs} epochs on {len(data['train'])} train pairs, then {args.finetune_epochs} "
        f"more epochs plain or equi-tuned (group {group}); exact-match accuracy of greedy decoding "
        f"on {len(data['test'])} test commands.",
        "",
        "| model | exact-match test accuracy (%) | per seed |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {fmt(v)} | {', '.join(f'{100 * x:.1f}' for x in v)} |" for name, v in summary.items()]
    lines += ["", f"Wall time {wall:.0f} s ({torch.get_num_threads()} CPU thread(s))."]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = os.path.join(args.out, f"scan_{args.split}_{args.cell}")
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(summary, curves0, f"SCAN {args.split}, {args.cell.upper()}", stem + ".png")
    print(f"wrote {stem}.png")
    return summary, wall


if __name__ == "__main__":
    main()
