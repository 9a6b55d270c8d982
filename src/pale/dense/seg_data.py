"""ADE20K-layout segmentation data and mmseg-style augmentation.

Layout: ``root/images/<split>/<name>.<jpg|png|...>`` and ``root/annotations/<split>/<name>.png``
(``<split>`` may be empty for a flat ``images/`` + ``annotations/`` pair; sub-folders are searched,
with the same relative path on both sides). Annotation PNGs hold one class id per pixel; 255 is
ignored, and so is 0 with ``reduce_zero_label`` (ADE20K: 0 = "other", not a class). The classes are
a list of ids (``label_ids``): given, ``0..K-1`` (``1..K`` with ``reduce_zero_label``) for a class count
``K``, or the ids the training annotations use (:func:`scan_label_ids`). Class ``i`` of the model is
id ``label_ids[i]``, so predictions are written back in the data set's own ids.

Training pipeline (mmseg's for ADE20K, Swin/CSWin/Pale): random rescale of the ``(2048, 512)`` scale
by a ratio in [0.5, 2.0] keeping the aspect ratio, random 512x512 crop (re-drawn up to 10 times while
one class covers more than 75% of it), horizontal flip, photometric distortion (brightness, contrast,
saturation, hue, each with probability 0.5), normalisation, padding to the crop size (labels padded
with 255). Evaluation images keep their size; :mod:`pale.dense.seg_eval` rescales them.

Errors name the file: an empty image folder, a missing annotation, an annotation whose size differs
from its image's, a label id that is not a class (other than the ignored ones).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from ..errors import InputError, MissingFileError
from ..images import exif_turn_note, find_images, load_image

__all__ = ["IGNORE_INDEX", "SegmentationFolder", "SegTrainTransform", "normalize", "scan_segmentation_folder",
           "contiguous_label_ids", "scan_label_ids", "label_lookup", "load_label", "rescale_size", "list_collate"]

IGNORE_INDEX = 255


def scan_segmentation_folder(root: Path, split: str = "") -> List[Tuple[str, str]]:
    """``(image path, annotation path)`` pairs of ``root/images/<split>`` and ``root/annotations/<split>``."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not root.exists():
        raise MissingFileError(f"segmentation data folder not found: {root}")
    if not img_dir.is_dir():
        raise MissingFileError(f"image folder not found: {img_dir} (expected {root}/images/{split or ''}"
                                f"{'/' if split else ''}<name>.jpg and {root}/annotations/...)")
    pairs = []
    for img in find_images(img_dir, "image folder", "image folder"):
        ann = (ann_dir / img.relative_to(img_dir)).with_suffix(".png")
        if not ann.is_file():
            raise MissingFileError(f"annotation {ann} for image {img} not found")
        pairs.append((str(img), str(ann)))
    return pairs


def contiguous_label_ids(num_classes: int, reduce_zero_label: bool) -> List[int]:
    """The annotation ids of ``num_classes`` classes numbered from 0 (or from 1 with ``reduce_zero_label``)."""
    start = 1 if reduce_zero_label else 0
    return list(range(start, start + int(num_classes)))


def _read_annotation(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as ann:
            if ann.mode not in ("L", "P", "I", "I;16"):
                raise InputError(f"annotation {path} has mode {ann.mode}; expected a single-channel PNG of class ids")
            return np.array(ann, dtype=np.int64)
    except OSError as err:
        raise InputError(f"cannot read annotation {path}: {err}") from None


def scan_label_ids(pairs: Sequence[Tuple[str, str]], reduce_zero_label: bool) -> List[int]:
    """The class ids the annotations of ``pairs`` use (sorted; without 255, and without 0 when
    ``reduce_zero_label``): what a data set's classes are when no class count is given."""
    seen: set = set()
    for _, ann in pairs:
        seen.update(int(v) for v in np.unique(_read_annotation(ann)))
    ids = sorted(seen - {IGNORE_INDEX} - ({0} if reduce_zero_label else set()))
    if not ids:
        raise InputError(f"the annotations ({len(pairs)} files, e.g. {pairs[0][1] if pairs else '-'}) "
                         f"hold no class ids besides ignore")
    return ids


def label_lookup(label_ids: Sequence[int], reduce_zero_label: bool) -> np.ndarray:
    """Annotation id -> class index (``IGNORE_INDEX`` for 255, and for 0 with ``reduce_zero_label``;
    -1 for an id that is not a class)."""
    ids = [int(i) for i in label_ids]
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise InputError(f"label ids must be distinct and >= 0, got {ids}")
    if IGNORE_INDEX in ids or (reduce_zero_label and 0 in ids):
        raise InputError(f"label ids {ids} include an ignored id (255{', 0' if reduce_zero_label else ''})")
    table = np.full(max(max(ids) + 1, IGNORE_INDEX + 1), -1, dtype=np.int64)
    table[IGNORE_INDEX] = IGNORE_INDEX
    if reduce_zero_label:
        table[0] = IGNORE_INDEX
    table[ids] = np.arange(len(ids))
    return table


def load_label(path: str, image_size: Tuple[int, int], image_path: str, lookup: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` int64 class-index map of annotation ``path`` (ids mapped through ``lookup`` of
    :func:`label_lookup`), checked against its image's size and the known ids."""
    label = _read_annotation(path)
    if label.shape != tuple(image_size):
        raise InputError(f"annotation {path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                         f"{image_path} is {image_size[1]}x{image_size[0]}{exif_turn_note(image_path)}")
    outside = (label < 0) | (label >= len(lookup))
    mapped = np.where(outside, -1, lookup[np.clip(label, 0, len(lookup) - 1)])
    if (mapped < 0).any():
        bad = ", ".join(str(int(v)) for v in np.unique(label[mapped < 0])[:10])
        known = np.flatnonzero((lookup >= 0) & (lookup != IGNORE_INDEX))
        raise InputError(f"annotation {path} has label id(s) {bad} that are not among the {len(known)} classes "
                         f"(ids {_ranges(known)}; ignored: {_ranges(np.flatnonzero(lookup == IGNORE_INDEX))})")
    return mapped


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0..2, 5'``."""
    out, values = [], [int(v) for v in values]
    start = prev = values[0] if values else None
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = v
    return ", ".join(out)


def normalize(image: Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tensor:
    """``(3, H, W)`` in [0, 1] -> normalised."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image - m) / s


def rescale_size(size: Tuple[int, int], scale: Sequence[int]) -> Tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest ``(h, w)`` with long side <= max(scale) and short side
    <= min(scale)."""
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize_pair(image: Tensor, label: Tensor, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def _photometric_distortion(image: Tensor) -> Tensor:
    """mmseg's PhotoMetricDistortion on a [0, 1] image: brightness +-32/255, contrast x[0.5, 1.5]
    (before or after the colour steps), saturation x[0.5, 1.5], hue +-18 OpenCV units (0.1 turn)."""
    import torchvision.transforms.v2.functional as TF

    def contrast(x: Tensor) -> Tensor:
        return x * random.uniform(0.5, 1.5) if random.random() < 0.5 else x

    if random.random() < 0.5:
        image = image + random.uniform(-32, 32) / 255
    image = image.clamp(0, 1)
    contrast_first = random.random() < 0.5
    if contrast_first:
        image = contrast(image).clamp(0, 1)
    if random.random() < 0.5:
        image = TF.adjust_saturation(image, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        image = TF.adjust_hue(image, random.uniform(-0.1, 0.1))
    if not contrast_first:
        image = contrast(image)
    return image.clamp(0, 1)


class SegTrainTransform:
    """Random rescale, cat-max-ratio crop, flip, photometric distortion, normalise, pad to the crop."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 crop_size: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75, flip: float = 0.5,
                 photometric: bool = True, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric
        self.mean, self.std = tuple(mean), tuple(std)

    def _crop_box(self, label: Tensor) -> Tuple[int, int, int, int]:
        h, w = label.shape
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        box = (0, 0, ch, cw)
        for _ in range(10):
            y, x = random.randint(0, h - ch), random.randint(0, w - cw)
            box = (y, x, ch, cw)
            if self.cat_max_ratio >= 1:
                break
            crop = label[y:y + ch, x:x + cw]
            _, counts = torch.unique(crop[crop != IGNORE_INDEX], return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: Tensor, label: Tensor) -> Tuple[Tensor, Tensor]:
        """``image (3, H, W)`` float in [0, 1], ``label (H, W)`` int64 -> crop-sized pair."""
        r = random.uniform(*self.ratio_range)
        image, label = _resize_pair(image, label, rescale_size(tuple(image.shape[-2:]),
                                                               [s * r for s in self.scale]))
        y, x, ch, cw = self._crop_box(label)
        image, label = image[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if random.random() < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = _photometric_distortion(image)
        image = normalize(image, self.mean, self.std)
        ph, pw = self.crop_size[0] - image.shape[1], self.crop_size[1] - image.shape[2]
        if ph > 0 or pw > 0:
            image = F.pad(image, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=IGNORE_INDEX)
        return image.contiguous(), label.contiguous()


class SegmentationFolder(Dataset):
    """Pairs of an ADE20K-layout folder.

    Training (``transform`` given): ``(image (3, h, w), label (h, w))`` at the crop size.
    Evaluation (``transform=None``): ``(normalised image (3, H, W), label (H, W), image path)`` at the
    file's own size.
    """

    def __init__(self, root: Path, split: str, num_classes: Optional[int], reduce_zero_label: bool = False,
                 transform: Optional[SegTrainTransform] = None, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, length: Optional[int] = None,
                 label_ids: Optional[Sequence[int]] = None):
        self.samples = scan_segmentation_folder(root, split)
        self.reduce_zero_label = bool(reduce_zero_label)
        if label_ids is None:
            if num_classes is None:
                raise InputError("give the class count or the label ids of the data")
            label_ids = contiguous_label_ids(num_classes, reduce_zero_label)
        self.label_ids = [int(i) for i in label_ids]
        if num_classes is not None and int(num_classes) != len(self.label_ids):
            raise InputError(f"{num_classes} classes but {len(self.label_ids)} label ids {self.label_ids}")
        self.num_classes = len(self.label_ids)
        self.lookup = label_lookup(self.label_ids, self.reduce_zero_label)
        self.transform, self.mean, self.std = transform, tuple(mean), tuple(std)
        self.length = length  # iteration-based training: index modulo the number of images

    def __len__(self) -> int:
        return self.length or len(self.samples)

    def load(self, index: int) -> Tuple[Tensor, Tensor, str]:
        """Image in [0, 1] ``(3, H, W)``, label ``(H, W)`` and the image path."""
        img_path, ann_path = self.samples[index % len(self.samples)]
        img = load_image(img_path)
        label = load_label(ann_path, (img.height, img.width), img_path, self.lookup)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return image, torch.from_numpy(label), img_path

    def __getitem__(self, index: int) -> Any:
        image, label, path = self.load(index)
        if self.transform is not None:
            return self.transform(image, label)
        return normalize(image, self.mean, self.std), label, path


def list_collate(items: List[Any]) -> Tuple[List[Any], ...]:
    """Evaluation batches of different-sized images: a tuple of lists."""
    return tuple(map(list, zip(*items)))
