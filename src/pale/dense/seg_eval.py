"""Segmentation inference (whole image or sliding window; single scale or multi-scale + flip) and
the mmseg metrics (mIoU, mAcc, aAcc) from a confusion matrix.

Metrics follow mmseg: per class, IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN); a class with
no ground-truth pixels has no Acc, and no IoU if it is also never predicted (NaN, left out of the
means); aAcc = correct pixels / labelled pixels. Pixels labelled 255 are ignored. All in percent.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .seg_data import IGNORE_INDEX, rescale_size

__all__ = ["confusion_matrix", "segmentation_metrics", "slide_logits", "segment"]


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` int64 counts, rows = ground truth, columns = prediction, ignoring label 255."""
    valid = label != IGNORE_INDEX
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def segmentation_metrics(conf: Tensor) -> Dict[str, object]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / Acc (NaN where undefined) of a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    gt, pred = conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = gt.sum()
    return dict(miou=100 * float(iou.nanmean()) if (union > 0).any() else float("nan"),
                macc=100 * float(acc.nanmean()) if (gt > 0).any() else float("nan"),
                aacc=100 * float(tp.sum() / total) if total > 0 else float("nan"),
                class_iou=[100 * float(v) for v in iou], class_acc=[100 * float(v) for v in acc])


def slide_logits(model: nn.Module, image: Tensor, num_classes: int, crop: Sequence[int], stride: Sequence[int]) -> Tensor:
    """mmseg's sliding-window inference: logits ``(B, K, H, W)`` averaged over overlapping
    ``crop`` windows placed every ``stride`` (the last window flush with the border)."""
    b, _, h, w = image.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    out = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, h - ch), min(c * sw, w - cw)
            out[:, :, y1:y1 + ch, x1:x1 + cw] += model(image[:, :, y1:y1 + ch, x1:x1 + cw]).float()
            count[:, :, y1:y1 + ch, x1:x1 + cw] += 1
    return out / count


@torch.no_grad()
def segment(model: nn.Module, image: Tensor, num_classes: int, test_scale: Optional[Sequence[int]] = (2048, 512),
            mode: str = "whole", crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341),
            scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` of a normalised batch ``(B, 3, H, W)`` at its own size.

    For each ratio in ``scales`` the image is rescaled (keeping its aspect ratio) to ``test_scale``
    times the ratio (``test_scale=None``: its own size times the ratio), run whole or by sliding
    window, optionally also flipped; softmax outputs are resized back and averaged.
    """
    if mode not in ("whole", "slide"):
        raise InputError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    size = tuple(image.shape[-2:])
    total = None
    n = 0
    for ratio in scales:
        target = rescale_size(size, [s * ratio for s in test_scale]) if test_scale else \
            (max(1, int(size[0] * ratio + 0.5)), max(1, int(size[1] * ratio + 0.5)))
        x = image if target == size else F.interpolate(image, size=target, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            logits = model(xi).float() if mode == "whole" else slide_logits(model, xi, num_classes, crop, stride)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total + probs
            n += 1
    return total / n
