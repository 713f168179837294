"""A/B of two checkouts of equitune_ext on the same machine, in one period:
the fused C++ ops' time on a feature-map batch and the host time of a tiny
call, each tree in its own process, the trees alternating (ABAB…) so that a
change in the machine's speed hits both alike. For refactors that must leave
kernel timings and host time unchanged.

    python -m benchmarks.bench_ab OLD_TREE NEW_TREE [--rounds 3]

Each tree must hold a built extension (equitune_ext/_C*.so); PYTHONPATH
points at it. Prints a markdown table of medians over the rounds (ms).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [  # (name, group, shape, op)
    ("c4 transform [32,64,56,56]", "c4", (32, 64, 56, 56), "transform"),
    ("d4 transform [32,64,56,56]", "d4", (32, 64, 56, 56), "transform"),
    ("c4 average [32,64,56,56]", "c4", (32, 64, 56, 56), "average"),
    ("d4 average [32,64,56,56]", "d4", (32, 64, 56, 56), "average"),
    ("host: c4 transform [2,3,16,16]", "c4", (2, 3, 16, 16), "transform"),
    ("host: c4 transform fwd+bwd [2,3,16,16]", "c4", (2, 3, 16, 16), "train"),
]

_CHILD = r"""
import json, sys, torch, torch.utils.benchmark as tb
import equitune_ext as E
torch.set_num_threads(2)
out = {}
for name, group, shape, op in json.loads(sys.argv[1]):
    x = torch.randn(shape)
    order = E.get_image_group(group).order
    if op == "transform":
        fn = lambda: E.group_transform(x, group)
    elif op == "average":
        y = torch.randn(order * shape[0], *shape[1:])
        fn = lambda: E.group_average(y, group)
    else:
        xg = x.clone().requires_grad_()
        fn = lambda: E.group_transform(xg, group).sum().backward()
    out[name] = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3
print(json.dumps(out))
"""


def run_tree(tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    runs = {args.old: [], args.new: []}
    for _ in range(args.rounds):
        for tree in (args.old, args.new):
            runs[tree].append(run_tree(tree))
    print("| case | old ms | new ms | new / old |\n|---|---|---|---|")
    for name, *_ in CASES:
        old = statistics.median(r[name] for r in runs[args.old])
        new = statistics.median(r[name] for r in runs[args.new])
        print(f"| {name} | {old:.4g} | {new:.4g} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
