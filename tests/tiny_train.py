"""A tiny image folder and recipe for tests that need a whole (seconds-long) `pale train` run."""
from pathlib import Path

import numpy as np

from pale.train.data import write_image_folder

CLASSES = ["a", "b"]


def write_tiny_folder(root: Path, size: int = 24) -> Path:
    """8 training and 4 validation images of random noise, two classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        labels = np.arange(n) % len(CLASSES)
        images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        write_image_folder(root / split, images, labels, CLASSES)
    return root


def tiny_recipe(root: Path, size: int = 24) -> dict:
    """One epoch of two updates (batch 4) of a 4-block model with a fast EMA (decay 0.5)."""
    return {
        "epochs": 1, "batch_size": 4, "seed": 0,
        "model": {"name": "pale_tiny", "kwargs": {"embed_dims": [8, 16, 16, 16], "depths": [1, 1, 1, 1],
                                                  "num_heads": [2, 2, 2, 2]}},
        "data": {"img_size": size, "root": str(root)},
        "optim": {"lr": 1e-2}, "sched": {"warmup_epochs": 0},
        "ema": {"enabled": True, "decay": 0.5, "warmup": False},
        "train": {"workers": 0, "amp": "none", "progress": False},
    }
