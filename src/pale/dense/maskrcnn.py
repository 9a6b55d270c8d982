"""Mask R-CNN (torchvision) on Pale: :class:`~pale.dense.backbone.PaleFPNBackbone` (Pale, per-stage
LayerNorm, 256-channel FPN with a max-pooled 5th level) under torchvision's RPN (3 aspect ratios,
anchor sizes 32-512 over the five levels), box head (two 1024-wide FC layers on 7x7 RoIAlign) and
mask head (four 3x3 convs, a deconvolution, 28x28 masks on 14x14 RoIAlign) -- the heads of the
mmdetection Mask R-CNN used by Swin / CSWin / Pale.

Input: a list of ``(3, H, W)`` images in [0, 1] of any sizes; torchvision's transform normalises them
(ImageNet mean / std), resizes the short side to ``min_size`` (a random choice of ``min_size`` when
training: multi-scale training) with the long side at most ``max_size``, and pads the batch to a
multiple of 32. Boxes and masks come back in each input image's own coordinates and size.

Under an autocast (mixed-precision training, ``pale det eval --amp``) only the backbone and FPN run in
its dtype; the RPN and RoI heads run in float32, because torchvision computes boxes in its heads'
dtype: bf16's steps of 4-8 px at 512-2048 px would round proposals, the regression targets and the
returned boxes.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoint import LoadReport
from ..errors import InputError
from .backbone import PaleFPNBackbone, with_ape_size

__all__ = ["build_mask_rcnn", "load_backbone", "APE_IMG_SIZE"]

#: COCO's (H, W) = 800x1280, the size of the paper's FLOPs (Table 3): APE tables' size
APE_IMG_SIZE = (800, 1280)


def check_targets(targets: Optional[List[Dict[str, Tensor]]]) -> None:
    """torchvision's checks of training targets, as one-line errors: boxes ``(N, 4)`` with area."""
    if targets is None:
        raise InputError("a Mask R-CNN in training mode needs targets")
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
            got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise InputError(f"target {i}: boxes must be a tensor of shape (N, 4), got {got}")
        flat = (boxes[:, 2:] <= boxes[:, :2]).any(1)
        if flat.any():
            raise InputError(f"target {i}: box {boxes[flat][0].tolist()} (x1, y1, x2, y2) has no area")


def _mask_rcnn_class():
    from torchvision.models.detection import MaskRCNN

    class PaleMaskRCNN(MaskRCNN):
        """torchvision's MaskRCNN that resizes to a random one of ``train_min_size`` when training
        (multi-scale training) and to ``test_min_size`` in evaluation."""

        def __init__(self, backbone: nn.Module, num_classes: int, train_min_size: Sequence[int],
                     test_min_size: int, max_size: int, roi_samples: int = 512):
            super().__init__(backbone, num_classes=num_classes, min_size=tuple(train_min_size), max_size=max_size,
                             box_batch_size_per_image=roi_samples)
            self.train_min_size = tuple(int(s) for s in train_min_size)
            self.test_min_size = int(test_min_size)
            self.train(self.training)

        def train(self, mode: bool = True) -> "PaleMaskRCNN":
            super().train(mode)
            self.transform.min_size = self.train_min_size if mode else (self.test_min_size,)
            return self

        def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
            """Losses (training) or one dict of detections per image (evaluation), as torchvision's
            ``GeneralizedRCNN.forward``, with only the backbone and FPN under the caller's autocast."""
            if self.training:
                check_targets(targets)
            device = images[0].device.type
            sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            with torch.autocast(device, enabled=False):
                batch, targets = self.transform(images, targets)
            features = OrderedDict((k, v.float()) for k, v in self.backbone(batch.tensors).items())
            with torch.autocast(device, enabled=False):
                proposals, rpn_losses = self.rpn(batch, features, targets)
                detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
                if self.training:
                    return {**roi_losses, **rpn_losses}
                return self.transform.postprocess(detections, batch.image_sizes, sizes)

    return PaleMaskRCNN


def build_mask_rcnn(spec: Dict[str, Any]) -> nn.Module:
    """torchvision ``MaskRCNN`` on Pale from a description: ``backbone``, ``num_classes`` (object
    classes, without background), ``min_size`` (int or list: training sizes), ``max_size``,
    ``test_min_size``, ``fpn_channels``, ``roi_samples`` (RoIs sampled per image for the box head in
    training, 512 as in mmdetection), ``pale_kwargs`` (with ``pos_embed='ape'`` and no ``img_size``,
    the tables are sized at :data:`APE_IMG_SIZE`)."""
    num_classes = int(spec["num_classes"])
    if num_classes < 1:
        raise InputError(f"num_classes must be >= 1, got {num_classes}")
    backbone = PaleFPNBackbone(spec["backbone"], int(spec.get("fpn_channels", 256)),
                               **with_ape_size(spec.get("pale_kwargs") or {}, APE_IMG_SIZE))
    min_size = spec.get("min_size", 800)
    train_sizes = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    return _mask_rcnn_class()(backbone, num_classes + 1, train_sizes, int(spec.get("test_min_size") or max(train_sizes)),
                              int(spec.get("max_size", 1333)), int(spec.get("roi_samples", 512)))


def load_backbone(model: nn.Module, path: Union[str, os.PathLike]) -> LoadReport:
    """Initialise a Mask R-CNN's Pale from an ImageNet-trained checkpoint."""
    return model.backbone.load_pretrained(path)
