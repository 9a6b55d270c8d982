"""PNG overlays of predictions on the input image (written atomically through :mod:`pale.files`)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .. import files
from ..errors import InputError

__all__ = ["palette", "segmentation_overlay", "detection_overlay", "add_legend", "save_png"]


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, distinct for neighbouring indices (the PASCAL VOC bit pattern)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def segmentation_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
                         ignore: Optional[Sequence[int]] = None) -> np.ndarray:
    """``image (H, W, 3) uint8`` with each pixel blended towards its class colour (``labels (H, W)``);
    classes in ``ignore`` stay unblended."""
    if image.shape[:2] != labels.shape:
        raise InputError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    colours = palette(int(labels.max()) + 1)[labels]
    weight = np.full(labels.shape, alpha, dtype=np.float32)
    for k in ignore or ():
        weight[labels == k] = 0.0
    out = image.astype(np.float32) * (1 - weight[..., None]) + colours.astype(np.float32) * weight[..., None]
    return out.round().clip(0, 255).astype(np.uint8)


def detection_overlay(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                      masks: Optional[np.ndarray], class_names: Sequence[str], alpha: float = 0.5) -> np.ndarray:
    """Instance masks ``(N, H, W)`` bool blended in per-class colours, boxes and ``name score`` drawn."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    colours = palette(max(len(class_names), int(labels.max(initial=0)) + 1))
    if masks is not None:
        for m, lab in zip(masks, labels):
            out[m] = out[m] * (1 - alpha) + colours[int(lab)].astype(np.float32) * alpha
    pil = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for (x1, y1, x2, y2), lab, score in zip(boxes, labels, scores):
        colour = tuple(int(c) for c in colours[int(lab)])
        draw.rectangle([float(x1), float(y1), float(x2), float(y2)], outline=colour, width=2)
        name = class_names[int(lab)] if int(lab) < len(class_names) else str(int(lab))
        draw.text((float(x1) + 2, float(y1) + 1), f"{name} {score:.2f}", fill=colour)
    return np.asarray(pil)


def add_legend(image: np.ndarray, entries: Sequence[Tuple[Sequence[int], str]], row: int = 16,
               margin: int = 6) -> np.ndarray:
    """``image (H, W, 3) uint8`` with a white strip below it listing ``(colour, label)`` entries: a
    colour swatch and its label, left to right, wrapping to new rows at the image's width."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], margin, 0
    for colour, label in entries:
        step = row + 4 + int(measure.textlength(label)) + 2 * margin
        if x > margin and x + step > w:
            x, y = margin, y + row + 4
        placed.append((x, y, tuple(int(c) for c in colour), label))
        x += step
    strip_h = (y + row + 4 + margin) if entries else 0
    pil = Image.new("RGB", (w, h + strip_h), (255, 255, 255))
    pil.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(pil)
    for x, y, colour, label in placed:
        top = h + margin + y
        draw.rectangle([x, top, x + row - 1, top + row - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + row + 4, top + 2), label, fill=(0, 0, 0))
    return np.asarray(pil)


def save_png(array: np.ndarray, path: Union[str, os.PathLike]) -> None:
    from PIL import Image

    with files.atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
