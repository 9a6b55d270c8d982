"""What averaging predictions buys the demo: test-time augmentation and ensembles of demo runs.

Not part of the package; reproduces the table "Averaging predictions" of docs/training.md. Every run
folder is a finished ``pale demo`` output (``last.pth``); the images are preprocessed as ``pale eval``
does, and each set of weights is chosen as ``pale eval --weights`` chooses it.

    python tools/demo_averaging.py --split val runs/demo-s0 runs/demo-s1 ...         # TTA, paired
    python tools/demo_averaging.py --split val --ensembles runs/demo-s0 runs/demo-s1 ...

TTA variants average the softmax over copies of each image moved by torchvision's ``affine`` before
normalisation (the uncovered canvas is black, the digits' background).
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torchvision.transforms.functional as TF

from pale.io import create_model_from_file
from pale.predict import resolve_preprocessing
from pale.train.classification import build_eval_transform
from pale.train.data import ImageFolderDataset

# name -> list of (scale, dx, dy, degrees) copies whose softmax is averaged
TTA: Dict[str, List[Tuple[float, int, int, float]]] = {
    "none": [(1.0, 0, 0, 0.0)],
    "scales 1, 1.1": [(1.0, 0, 0, 0.0), (1.1, 0, 0, 0.0)],
    "scales 0.95, 1, 1.05, 1.1": [(s, 0, 0, 0.0) for s in (0.95, 1.0, 1.05, 1.1)],
    "shifts of 2 px (and none)": [(1.0, 0, 0, 0.0), (1.0, 2, 0, 0.0), (1.0, -2, 0, 0.0), (1.0, 0, 2, 0.0),
                                  (1.0, 0, -2, 0.0)],
    "rotations of 5 degrees (and none)": [(1.0, 0, 0, 0.0), (1.0, 0, 0, 5.0), (1.0, 0, 0, -5.0)],
}


def softmax_of(run: Path, split: str, weights: str, variants: Dict[str, List[Tuple[float, int, int, float]]]
               ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Per variant, the mean softmax over its copies of every image of ``run/data/split`` (``(N, classes)``);
    and the labels."""
    model, info = create_model_from_file(run / "last.pth", weights=weights)
    model.eval()
    dc = resolve_preprocessing(info, model)
    unnormalised = dict(dc, mean=(0.0,) * len(dc["mean"]), std=(1.0,) * len(dc["std"]))
    data = ImageFolderDataset(run / "data" / split, build_eval_transform(unnormalised),
                              class_names=info["class_names"], what=f"{split} folder")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    out = {}
    with torch.no_grad():
        for name, copies in variants.items():
            probs = torch.zeros(len(data), len(info["class_names"]))
            for scale, dx, dy, degrees in copies:
                moved = TF.affine(images, angle=degrees, translate=[dx, dy], scale=scale, shear=[0.0], fill=0.0)
                probs += model(TF.normalize(moved, dc["mean"], dc["std"])).softmax(-1)
            out[name] = probs / len(copies)
    return out, labels


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(-1) == labels).double().mean().item() * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `pale demo` output folders")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--weights", default="best", choices=["best", "ema", "raw"])
    parser.add_argument("--ensembles", action="store_true",
                        help="top-1 of every ensemble of k runs (mean softmax), k = 1..len(runs), no TTA")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ensembles:
        members = {}
        for run in args.runs:
            probs, labels = softmax_of(run, args.split, args.weights, {"none": TTA["none"]})
            members[run] = probs["none"]
        print(f"| runs averaged | mean {args.split} top-1 | min | max | ensembles |\n|---|---|---|---|---|")
        for k in range(1, len(args.runs) + 1):
            scores = [top1(sum(members[r] for r in combo), labels)
                      for combo in itertools.combinations(args.runs, k)]
            print(f"| {k} | {statistics.mean(scores):.2f} | {min(scores):.1f} | {max(scores):.1f} | {len(scores)} |")
        return
    scores = {name: [] for name in TTA}
    for run in args.runs:
        probs, labels = softmax_of(run, args.split, args.weights, TTA)
        for name in TTA:
            scores[name].append(top1(probs[name], labels))
        print(run, " ".join(f"{s[-1]:.1f}" for s in scores.values()), flush=True)
    print(f"| TTA | mean {args.split} top-1 | paired difference to none | its standard error |\n|---|---|---|---|")
    for name, values in scores.items():
        diffs = [v - n for v, n in zip(values, scores["none"])]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        print(f"| {name} | {statistics.mean(values):.2f} | {statistics.mean(diffs):+.2f} | {se:.2f} |")


if __name__ == "__main__":
    main()
