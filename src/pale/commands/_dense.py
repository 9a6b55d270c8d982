"""What ``pale seg`` and ``pale det`` share: training options, resume handling, metric output."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type

from ._options import (add_amp, add_checkpoint, add_device, add_json_output, add_resume, add_weights, nonnegative_int,
                       positive_int, print_best, resolve_resume)


def add_train_options(p: argparse.ArgumentParser, default_output: str) -> None:
    p.add_argument("--data", help="dataset folder (data.root)")
    p.add_argument("--recipe", help="YAML file of recipe overrides (default: the paper's recipe)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a recipe key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--output", "-o", help=f"run folder (default: {default_output}; with --resume: the checkpoint's folder)")
    p.add_argument("--pretrained", help="ImageNet Pale checkpoint (.pth of `pale train` or .safetensors) for the backbone")
    p.add_argument("--backbone", choices=("pale_tiny", "pale_small", "pale_base"), help="Pale variant (model.name)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="total batch size over all processes and accumulation steps")
    p.add_argument("--device", help="auto, cpu, cuda (default: the recipe's, auto)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--workers", type=nonnegative_int)
    p.add_argument("--seed", type=int)
    add_resume(p)
    p.add_argument("--dry-run", action="store_true", help="two updates and two evaluation batches, nothing written")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def add_eval_options(p: argparse.ArgumentParser, written_by: str) -> None:
    """Options of ``seg eval`` and ``det eval`` (the same as ``pale eval``'s)."""
    add_checkpoint(p, f".pth or .safetensors written by `{written_by}`")
    add_weights(p)
    p.add_argument("--workers", type=nonnegative_int, default=0, help="data loader processes (default 0)")
    add_amp(p)
    add_device(p)
    add_json_output(p, "JSON result (default: eval-<split>.json next to the checkpoint)")


def add_predict_options(p: argparse.ArgumentParser, written_by: str) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders (searched recursively)")
    add_checkpoint(p, f".pth or .safetensors written by `{written_by}`")
    add_weights(p)
    add_device(p)
    p.add_argument("--output", "-o", default="predictions", metavar="FOLDER", help="output folder (default predictions)")


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
    from ..dense.engine import resolve_dense_config, run_training
    from ..train.recipe import dump_recipe

    overrides = train_overrides(args, extra)
    if args.print_config:
        print(dump_recipe(resolve_dense_config(task_cls, args.recipe, overrides)), end="")
        return 0
    resume, out = resolve_resume(args.resume, args.output, default_output)
    summary = run_training(task_cls, args.recipe, overrides, out, resume=resume, dry_run=args.dry_run)
    print_best(summary)
    return 0


def report_metrics(args: argparse.Namespace, metrics: Dict[str, Any], default_name: str, info: Dict[str, Any],
                   amp_dtype: Any) -> None:
    """The numbers on one line (or JSON with ``--json``), and the JSON file ``-o`` (default
    ``default_name`` next to the checkpoint), with the checkpoint, the weights set and the precision."""
    from ..files import atomic_write_json

    metrics = dict(metrics, checkpoint=str(args.checkpoint), weights=info["weights"],
                   amp=str(amp_dtype or "none").replace("torch.", ""))

    out = Path(args.output) if args.output else Path(args.checkpoint).with_name(default_name)
    atomic_write_json(out, metrics)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    print(f"wrote {out}")


def predict_images(args: argparse.Namespace, load: Callable[..., Tuple[Any, Dict[str, Any]]]) -> Iterator[Tuple[
        Path, Any, Any, Dict[str, Any], Path, str]]:
    """For ``pale seg/det predict``: the model from ``-c`` (with ``load(checkpoint, device, weights)``) on
    ``--device``, then, per input image, ``(file, RGB uint8 array, model, info, output folder, output stem)``."""
    import numpy as np

    from ..device import resolve_device
    from ..files import output_folder
    from ..images import find_images, load_image, output_stems

    files = find_images(args.inputs)
    device = resolve_device(args.device)
    model, info = load(args.checkpoint, device, args.weights)
    loaded(info, device)
    out_dir = output_folder(args.output)
    stems = output_stems(files)  # a/x.png and b/x.png must not write the same outputs
    for f in files:
        yield f, np.asarray(load_image(f), dtype=np.uint8), model, info, out_dir, stems[f]


def loaded(info: Dict[str, Any], device: Any, amp: str = "") -> None:
    """The stderr line saying which weights (and precision) a command runs with."""
    from ..checkpoint import describe_weights

    print(f"{describe_weights(info)}; device: {device}{'; precision: ' + amp if amp else ''}", file=sys.stderr)
