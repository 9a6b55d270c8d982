"""ADE20K-layout segmentation data and mmseg-style augmentation.

Layout: ``root/images/<split>/<name>.<jpg|png|...>`` and ``root/annotations/<split>/<name>.png``
(``<split>`` may be empty for a flat ``images/`` + ``annotations/`` pair). Annotation PNGs hold one
class index per pixel; 255 is ignored. With ``reduce_zero_label`` (ADE20K: 0 = "other", not a class)
0 becomes 255 and every other label drops by one, as in mmseg.

Training pipeline (mmseg's for ADE20K, Swin/CSWin/Pale): random rescale of the ``(2048, 512)`` scale
by a ratio in [0.5, 2.0] keeping the aspect ratio, random 512x512 crop (re-drawn up to 10 times while
one class covers more than 75% of it), horizontal flip, photometric distortion (brightness, contrast,
saturation, hue, each with probability 0.5), normalisation, padding to the crop size (labels padded
with 255). Evaluation images keep their size; :mod:`pale.dense.seg_eval` rescales them.

Errors name the file: an empty image folder, a missing annotation, an annotation whose size differs
from its image's, a label outside ``[0, num_classes)`` (other than 255).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..train.data import IMG_EXTENSIONS, load_image

__all__ = ["IGNORE_INDEX", "SegmentationFolder", "SegTrainTransform", "normalize", "scan_segmentation_folder",
           "load_label", "rescale_size", "list_collate"]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scan_segmentation_folder(root: Path, split: str = "") -> List[Tuple[str, str]]:
    """``(image path, annotation path)`` pairs of ``root/images/<split>`` and ``root/annotations/<split>``."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    if not root.exists():
        raise FileNotFoundError(f"segmentation data folder not found: {root}")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir} (expected {root}/images/{split or ''}"
                                f"{'/' if split else ''}<name>.jpg and {root}/annotations/...)")
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise ValueError(f"image folder {img_dir} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
    pairs = []
    for img in images:
        ann = ann_dir / f"{img.stem}.png"
        if not ann.is_file():
            raise FileNotFoundError(f"annotation {ann} for image {img} not found")
        pairs.append((str(img), str(ann)))
    return pairs


def load_label(path: str, image_size: Tuple[int, int], image_path: str, num_classes: int,
               reduce_zero_label: bool) -> np.ndarray:
    """The ``(H, W)`` int64 label map of ``path``, checked against its image and the class range."""
    from PIL import Image

    try:
        with Image.open(path) as ann:
            if ann.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"annotation {path} has mode {ann.mode}; expected a single-channel PNG of class indices")
            label = np.array(ann, dtype=np.int64)
    except OSError as err:
        raise ValueError(f"cannot read annotation {path}: {err}") from None
    if label.shape != tuple(image_size):
        raise ValueError(f"annotation {path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                         f"{image_path} is {image_size[1]}x{image_size[0]}")
    if reduce_zero_label:
        label = np.where(label == 0, IGNORE_INDEX, label - 1)
        label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
    bad = np.unique(label[(label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))])
    if bad.size:
        shown = ", ".join(str(int(v) + (1 if reduce_zero_label else 0)) for v in bad[:10])
        raise ValueError(f"annotation {path} has label value(s) {shown} outside the {num_classes} classes "
                         f"(allowed: {'1' if reduce_zero_label else '0'}..{num_classes - (0 if reduce_zero_label else 1)}"
                         f"{', 0 = ignore' if reduce_zero_label else ''}, 255 = ignore)")
    return label


def normalize(image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
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
                 photometric: bool = True, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
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

    def __init__(self, root: Path, split: str, num_classes: int, reduce_zero_label: bool = False,
                 transform: Optional[SegTrainTransform] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, length: Optional[int] = None):
        self.samples = scan_segmentation_folder(root, split)
        self.num_classes, self.reduce_zero_label = int(num_classes), bool(reduce_zero_label)
        self.transform, self.mean, self.std = transform, tuple(mean), tuple(std)
        self.length = length  # iteration-based training: index modulo the number of images

    def __len__(self) -> int:
        return self.length or len(self.samples)

    def load(self, index: int) -> Tuple[Tensor, Tensor, str]:
        """Image in [0, 1] ``(3, H, W)``, label ``(H, W)`` and the image path."""
        img_path, ann_path = self.samples[index % len(self.samples)]
        img = load_image(img_path)
        label = load_label(ann_path, (img.height, img.width), img_path, self.num_classes, self.reduce_zero_label)
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
