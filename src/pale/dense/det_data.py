"""COCO-format instance data for Mask R-CNN (read with pycocotools).

Layout (COCO's): ``root/<split>/<file_name>`` and ``root/annotations/instances_<split>.json``. Category
ids may be any integers; the model sees them as 1..K in increasing id order (0 is background) and
results are mapped back for COCOeval. Crowd annotations are not training targets (COCOeval ignores
matches to them); training skips images without any other annotation, as mmdetection does.

Errors name the file: a missing or unreadable annotation file, a file without images, an annotation
whose category is not declared, a missing image, an image whose size differs from the one the
annotation file states.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError, MissingFileError
from ..images import BadImageError, exif_turn_note, load_image

__all__ = ["CocoInstances", "load_coco", "detection_collate"]


def load_coco(ann_file: Path):
    """A ``pycocotools.coco.COCO`` of ``ann_file``, with clear errors (and without its prints)."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise MissingFileError(f"COCO annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"annotation file {ann_file} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise InputError(f"annotation file {ann_file} is not COCO instances format (needs 'images', "
                         f"'annotations', 'categories')")
    data.setdefault("annotations", [])
    if not data["images"]:
        raise InputError(f"annotation file {ann_file} lists no images")
    if not data["categories"]:
        raise InputError(f"annotation file {ann_file} declares no categories")
    cat_ids = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann.get("category_id") not in cat_ids:
            raise InputError(f"annotation file {ann_file}: annotation {ann.get('id')} (image {ann.get('image_id')}) "
                             f"has category_id {ann.get('category_id')}, not among the declared categories "
                             f"{sorted(cat_ids)}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoInstances(Dataset):
    """``(image (3, H, W) float in [0, 1], target)`` with ``target``: ``boxes (N, 4)`` xyxy, ``labels
    (N,)`` in 1..K, ``masks (N, H, W)`` uint8, ``image_id``.

    Args:
        image_dir: folder of the images.
        ann_file: COCO instances JSON.
        train: drop images without non-crowd annotations, apply ``flip``.
        flip: probability of a horizontal flip (training).
    """

    def __init__(self, image_dir: Path, ann_file: Path, train: bool = False, flip: float = 0.5,
                 skip_bad: bool = False):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.image_dir.is_dir():
            raise MissingFileError(f"image folder not found: {self.image_dir}")
        self.coco = load_coco(self.ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
            if not ids:
                raise InputError(f"annotation file {self.ann_file} has no image with a (non-crowd) annotation to train on")
        self.ids = ids
        self.train, self.flip, self.skip_bad = train, flip, skip_bad

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def load(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(image_id)
        if not path.is_file():
            raise MissingFileError(f"image {path} (id {image_id} in {self.ann_file}) not found")
        img = load_image(str(path))
        if (img.height, img.width) != (info["height"], info["width"]):
            raise InputError(f"image {path} is {img.width}x{img.height}{exif_turn_note(path)} but {self.ann_file} "
                             f"says {info['width']}x{info['height']}")
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns[image_id]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(img.width), x + w), min(float(img.height), y + h)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_of[ann["category_id"]])
            masks.append(self.coco.annToMask(ann) if "segmentation" in ann else
                         np.zeros((img.height, img.width), dtype=np.uint8))
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        target = dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      labels=torch.tensor(labels, dtype=torch.int64),
                      masks=torch.from_numpy(np.stack(masks)) if masks else
                      torch.zeros((0, img.height, img.width), dtype=torch.uint8),
                      image_id=torch.tensor(image_id))
        return image, target

    def __getitem__(self, index: int) -> Optional[Tuple[Tensor, Dict[str, Tensor]]]:
        try:
            image, target = self.load(index)
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        if self.train and random.random() < self.flip:
            w = image.shape[-1]
            image = image.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            b = target["boxes"].clone()
            target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return image, target


def detection_collate(items: List[Any]) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    images, targets = zip(*items)
    return list(images), list(targets)
