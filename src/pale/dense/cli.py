"""Shared pieces of ``pale seg`` and ``pale det``: training options and image listing."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Type

from ..train.data import IMG_EXTENSIONS


def add_train_options(p: argparse.ArgumentParser, default_output: str) -> None:
    p.add_argument("--data", help="dataset folder (data.root)")
    p.add_argument("--recipe", help="YAML file of recipe overrides (default: the paper's recipe)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a recipe key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--output", "-o", help=f"run folder (default: {default_output}; with --resume: the checkpoint's folder)")
    p.add_argument("--pretrained", help="ImageNet Pale checkpoint (.pth of `pale train` or .safetensors) for the backbone")
    p.add_argument("--backbone", help="pale_tiny, pale_small or pale_base (model.name)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="total batch size over all processes and accumulation steps")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run exactly (default: <output>/last.pth)")
    p.add_argument("--dry-run", action="store_true", help="two updates and two evaluation batches, nothing written")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def train_overrides(args: argparse.Namespace, extra: List[str]) -> List[str]:
    out = []
    for opt, key in (("data", "data.root"), ("pretrained", "model.pretrained"), ("backbone", "model.name"),
                     ("epochs", "epochs"), ("batch_size", "batch_size"), ("device", "train.device"),
                     ("amp", "train.amp"), ("workers", "train.workers"), ("seed", "seed")):
        value = getattr(args, opt, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out + extra + list(args.set or [])


def run_train(args: argparse.Namespace, task_cls: Type, extra: List[str], default_output: str) -> int:
    from ..train.recipe import dump_recipe
    from .engine import resolve_dense_config, run_training

    overrides = train_overrides(args, extra)
    if args.print_config:
        print(dump_recipe(resolve_dense_config(task_cls, args.recipe, overrides)), end="")
        return 0
    resume = args.resume
    if resume == "auto":
        resume = str(Path(args.output or default_output) / "last.pth")
    if resume is not None and not Path(resume).exists():
        raise FileNotFoundError(f"checkpoint to resume not found: {resume}")
    out = args.output if (args.output or resume) else default_output
    summary = run_training(task_cls, args.recipe, overrides, out, resume=resume, dry_run=args.dry_run)
    best = summary.get("best") or {}
    if best:
        print(f"best {best['metric']} {best['value']:.2f} at epoch {best['epoch']}")
    return 0


def list_images(inputs: List[str]) -> List[Path]:
    """Files given, and the images inside folders given; an error names what is missing or empty."""
    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise ValueError(f"folder {p} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
            files += found
        else:
            files.append(p)
    if not files:
        raise ValueError("no input images given")
    return files


def print_metrics(metrics: Dict[str, Any], json_out: str = None) -> None:
    from .. import io as pio

    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    if json_out:
        pio.atomic_write_json(json_out, metrics)
