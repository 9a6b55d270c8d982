"""Small real-photo datasets with exactly known labels, for tests and quick demos.

Background photos come from scikit-image's bundled samples (astronaut, coffee, chelsea, rocket, ...),
randomly cropped and resized; on each we paste a few simple objects, yellow discs (class 1) and
blue squares (class 2), with some texture noise, never overlapping. Everything that was pasted is
known exactly, so we write:

* :func:`make_ade_dataset` -- ADE20K layout: ``images/<split>/*.jpg`` and ``annotations/<split>/*.png``
  (0 = background, 1 = disc, 2 = square; or, with ``zero_is_ignore``, 0 = ignore and 1/2/3 =
  background/disc/square, to be read with ``reduce_zero_label``);
* :func:`make_coco_dataset` -- COCO format: ``<split>/*.jpg`` and ``annotations/instances_<split>.json``
  with boxes, areas and RLE masks per object (categories 1 = disc, 2 = square).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .. import files
from ..files import atomic_write_text

__all__ = ["PHOTOS", "CLASS_NAMES", "toy_samples", "make_ade_dataset", "make_coco_dataset"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
          "coins", "brick", "grass", "gravel", "moon")
CLASS_NAMES = ("background", "disc", "square")
_COLOURS = {1: (235, 205, 40), 2: (40, 90, 235)}


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _background(rng: np.random.Generator, photos: Sequence[np.ndarray], size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    src = photos[int(rng.integers(len(photos)))]
    h, w = size
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.5, 1.0)
    ch, cw = max(8, int(min(sh, sh * scale))), max(8, int(min(sw, sw * scale)))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = Image.fromarray(src[y:y + ch, x:x + cw])
    return np.asarray(crop.resize((w, h), Image.BILINEAR), dtype=np.uint8).copy()


def toy_samples(n: int, size_range: Tuple[int, int] = (96, 160), objects: Tuple[int, int] = (1, 3),
                obj_size: Tuple[int, int] = (14, 40), seed: int = 0) -> List[Dict[str, object]]:
    """``n`` samples: ``image (H, W, 3) uint8`` and ``instances``: a list of ``(class, mask (H, W) bool)``."""
    rng = np.random.default_rng(seed)
    photos = [_photo(p) for p in PHOTOS]
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        image = _background(rng, photos, (h, w)).astype(np.int16)
        taken = np.zeros((h, w), dtype=bool)
        instances = []
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            for _attempt in range(20):
                cls = int(rng.integers(1, 3))
                s = int(rng.integers(obj_size[0], min(obj_size[1], h - 2, w - 2) + 1))
                y0, x0 = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
                if cls == 1:
                    r = s / 2
                    mask = (yy - (y0 + r - 0.5)) ** 2 + (xx - (x0 + r - 0.5)) ** 2 <= r * r
                else:
                    mask = (yy >= y0) & (yy < y0 + s) & (xx >= x0) & (xx < x0 + s)
                if not (mask & taken).any() and mask.sum() > 0:
                    break
            else:
                continue
            taken |= mask
            noise = rng.integers(-25, 26, size=(int(mask.sum()), 3))
            image[mask] = np.clip(np.array(_COLOURS[cls]) + noise, 0, 255)
            instances.append((cls, mask))
        out.append(dict(image=image.astype(np.uint8), instances=instances))
    return out


def _save_image(path: Path, array: np.ndarray, fmt: str) -> None:
    from PIL import Image

    with files.atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def make_ade_dataset(root: Path, splits: Dict[str, int], seed: int = 0, zero_is_ignore: bool = False,
                     **kwargs: object) -> Path:
    """An ADE20K-layout folder with ``splits`` (name -> number of images); returns ``root``."""
    root = Path(root)
    for k, (split, n) in enumerate(splits.items()):
        for i, s in enumerate(toy_samples(n, seed=seed + 1000 * k, **kwargs)):
            label = np.zeros(s["image"].shape[:2], dtype=np.uint8)
            for cls, mask in s["instances"]:
                label[mask] = cls
            if zero_is_ignore:
                label = label + 1
                label[:2, :] = 0  # a strip of "ignore" pixels
            _save_image(root / "images" / split / f"{split}_{i:04d}.jpg", s["image"], "JPEG")
            _save_image(root / "annotations" / split / f"{split}_{i:04d}.png", label, "PNG")
    return root


def make_coco_dataset(root: Path, splits: Dict[str, int], seed: int = 0, **kwargs: object) -> Path:
    """A COCO-format folder: ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``."""
    from pycocotools import mask as mask_utils

    root = Path(root)
    categories = [dict(id=i, name=n, supercategory="shape") for i, n in enumerate(CLASS_NAMES) if i > 0]
    for k, (split, n) in enumerate(splits.items()):
        images, annotations = [], []
        for i, s in enumerate(toy_samples(n, seed=seed + 1000 * k, **kwargs)):
            h, w = s["image"].shape[:2]
            name = f"{split}_{i:04d}.jpg"
            _save_image(root / split / name, s["image"], "JPEG")
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
            for cls, mask in s["instances"]:
                ys, xs = np.nonzero(mask)
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cls, iscrowd=0,
                                        area=float(mask.sum()), segmentation=rle,
                                        bbox=[x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]))
        atomic_write_text(root / "annotations" / f"instances_{split}.json",
                              json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return root
