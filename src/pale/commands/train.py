"""``pale train``: train from a YAML recipe on an image folder, on one device or many (torchrun)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from ._options import add_resume, nonnegative_int, positive_int, print_best, resolve_resume


def overrides_from_args(args: argparse.Namespace) -> List[str]:
    """The shortcut options as recipe overrides, before the explicit ``--set`` ones."""
    out = []
    for opt, key in (("data", "data.root"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                     ("device", "train.device"), ("amp", "train.amp"), ("workers", "train.workers"),
                     ("seed", "seed")):
        value = getattr(args, opt, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "skip_bad_images", False):
        out.append("data.skip_bad_images=true")
    if getattr(args, "skip_nonfinite", False):
        out.append("train.on_nonfinite=skip")
    if getattr(args, "compile", False):
        out.append("train.compile=true")
    return out + list(args.set or [])


def run(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.recipe import dump_recipe, shipped_recipes
    from ..train.run import resolve_config

    if args.list_recipes:
        print("\n".join(shipped_recipes()))
        return 0
    overrides = overrides_from_args(args)
    if args.print_config:
        print(dump_recipe(resolve_config(args.recipe, overrides)), end="")
        return 0
    resume, out = resolve_resume(args.resume, args.output,
                                 str(Path("runs") / Path(args.recipe).name.removesuffix(".yaml")))
    summary = train(args.recipe, overrides, out, resume=resume, dry_run=args.dry_run)
    print_best(summary)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a classifier from a recipe (pale_tiny/small/base_imagenet, demo_digits, or a YAML file)",
        description="Train from a YAML recipe plus overrides. Several processes: "
                    "torchrun --nproc_per_node=N -m pale train ...")
    p.add_argument("--recipe", default="pale_tiny_imagenet", help="shipped recipe name or YAML path "
                   "(default: pale_tiny_imagenet; --list-recipes shows the shipped ones)")
    p.add_argument("--data", help="data folder with train/<class>/* and val/<class>/* (data.root)")
    p.add_argument("--output", "-o", help="run folder (default: runs/<recipe>; with --resume: the checkpoint's folder)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set optim.lr_base=5e-4 --set model.kwargs.pale_size=[7,7] "
                        "(repeatable)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="total batch size over all processes and accumulation steps")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--workers", type=nonnegative_int, help="data loader processes per training process")
    p.add_argument("--seed", type=int)
    add_resume(p)
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted) instead of failing")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip batches whose loss is NaN/inf instead of stopping")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (train.compile)")
    p.add_argument("--dry-run", action="store_true", help="two updates and two evaluation batches, nothing written")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    p.set_defaults(func=run)
