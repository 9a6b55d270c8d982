"""Parameters and multiply-adds of the full dense models at the paper's sizes, next to the paper's.

Counting is :mod:`pale.complexity`'s: ``FlopCounterMode`` (2 FLOPs per multiply-add) with attention
on the math backend so its matmuls are counted; convolutions, linear layers and matmuls count, norms,
activations, pooling, interpolation and RoIAlign do not.

* UperNet (512x2048, 150 classes): one whole-image forward without the auxiliary head (which is not
  run at inference, and not by mmseg's FLOP counter); parameters include the auxiliary head, as the
  paper's (mmseg) parameter counts do.
* Mask R-CNN (800x1280, 80 classes): what mmdetection's ``get_flops`` runs (its ``forward_dummy``):
  backbone + FPN, the RPN head on every level, the box head on 1000 RoIs and the mask head on 100.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..errors import InputError

__all__ = ["PAPER", "DenseCost", "UperNetCostView", "MaskRCNNCostView", "dense_model_kinds", "paper_note",
           "dense_cost", "format_dense_cost"]

#: the paper's Tables 3 and 4: (params, multiply-adds)
PAPER: Dict[str, Tuple[float, float]] = {
    "upernet_pale_tiny": (52e6, 996e9), "upernet_pale_small": (80e6, 1135e9), "upernet_pale_base": (119e6, 1311e9),
    "maskrcnn_pale_tiny": (41e6, 306e9), "maskrcnn_pale_small": (68e6, 432e9), "maskrcnn_pale_base": (105e6, 595e9),
}


@dataclass
class DenseCost:
    """Parameters and multiply-adds of a dense model per part, at ``img_size``."""

    name: str
    img_size: Tuple[int, int]
    params_by_part: Dict[str, int] = field(default_factory=dict)
    macs_by_part: Dict[str, int] = field(default_factory=dict)
    paper: Optional[Tuple[float, float]] = None

    @property
    def params(self) -> int:
        return sum(self.params_by_part.values())

    @property
    def macs(self) -> int:
        return sum(self.macs_by_part.values())


class UperNetCostView(nn.Module):
    """A :class:`PaleUperNet` seen as its parts (``backbone``, ``decoder``, ``head``, ``aux_head``) for
    counting; ``forward`` is the inference path (no auxiliary head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model_forward = model.forward
        self.backbone, self.decoder = model.upernet.encoder, model.upernet.decoder
        self.head, self.aux_head = model.upernet.segmentation_head, model.aux_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .upernet import pad_to_multiple

        h, w = x.shape[-2:]
        return self.head(self.decoder(self.backbone(pad_to_multiple(x))))[..., :h, :w]


class _Neck(nn.Module):
    """Per-stage LayerNorm + FPN of :class:`~pale.dense.backbone.PaleFPNBackbone`."""

    def __init__(self, norms: nn.Module, fpn: nn.Module):
        super().__init__()
        self.norms, self.fpn = norms, fpn

    def forward(self, maps: Any) -> Dict[str, torch.Tensor]:
        return self.fpn({str(i): n(m) for i, (n, m) in enumerate(zip(self.norms, maps))})


class _RoIHead(nn.Module):
    """RoIAlign + head + predictor of one torchvision RoI branch."""

    def __init__(self, pool: nn.Module, head: nn.Module, predictor: nn.Module):
        super().__init__()
        self.pool, self.head, self.predictor = pool, head, predictor

    def forward(self, feats: Dict[str, torch.Tensor], boxes: torch.Tensor, size: Tuple[int, int]) -> Any:
        return self.predictor(self.head(self.pool(feats, [boxes], [size])))


class MaskRCNNCostView(nn.Module):
    """A torchvision Mask R-CNN seen as ``backbone`` (Pale), ``neck`` (norms + FPN), ``rpn_head``,
    ``box_head`` and ``mask_head``; ``forward`` is mmdetection's ``forward_dummy``: backbone, FPN,
    RPN head on every level, box head on ``box_rois`` fixed RoIs, mask head on the first ``mask_rois``."""

    def __init__(self, model: nn.Module, box_rois: int = 1000, mask_rois: int = 100):
        super().__init__()
        rh = model.roi_heads
        self.backbone = model.backbone.body
        self.neck = _Neck(model.backbone.norms, model.backbone.fpn)
        self.rpn_head = model.rpn.head
        self.box_head = _RoIHead(rh.box_roi_pool, rh.box_head, rh.box_predictor)
        self.mask_head = _RoIHead(rh.mask_roi_pool, rh.mask_head, rh.mask_predictor)
        self.box_rois, self.mask_rois = box_rois, mask_rois

    def _rois(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(self.box_rois, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(self.box_rois, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2]) + 8
        return torch.cat([xy, xy + wh], dim=1).to(device)

    def forward(self, x: torch.Tensor) -> Any:
        h, w = x.shape[-2:]
        feats = self.neck(self.backbone(x))
        self.rpn_head(list(feats.values()))
        boxes = self._rois(h, w, x.device)
        return self.box_head(feats, boxes, (h, w)), self.mask_head(feats, boxes[:self.mask_rois], (h, w))


Device = Optional[Union[str, torch.device]]


def _built_on(device: Device) -> contextlib.AbstractContextManager:
    """Build under ``torch.device(device)``: smp's decoders and torchvision's detection heads take no
    ``device=`` argument, and smp and torchvision create the backbone themselves."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def build_upernet_view(backbone: str, overrides: Dict[str, Any], device: Device = None,
                       num_classes: int = 150) -> nn.Module:
    """UperNet (512 channels, auxiliary head) on ``backbone`` with ADE20K's 150 classes, as parts,
    built on ``device`` (``'meta'``: shapes only)."""
    from .upernet import PaleUperNet

    with _built_on(device):
        return UperNetCostView(PaleUperNet(backbone, num_classes, 512, aux=True, **overrides))


def build_maskrcnn_view(backbone: str, overrides: Dict[str, Any], device: Device = None,
                        num_classes: int = 80) -> nn.Module:
    """Mask R-CNN on ``backbone`` with COCO's 80 classes, as parts running mmdetection's dummy forward,
    built on ``device``."""
    from .maskrcnn import build_mask_rcnn

    with _built_on(device):
        return MaskRCNNCostView(build_mask_rcnn(dict(backbone=backbone, num_classes=num_classes,
                                                     pale_kwargs=overrides)))


def dense_model_kinds(model_kind: type) -> Dict[str, Any]:
    """``pale info --kind`` entries for the full dense models (``model_kind``: info's ModelKind)."""
    return {
        "upernet": model_kind(build_upernet_view, (512, 2048),
                              "UperNet (512 channels, auxiliary FCN head counted in params only) with 150 classes"),
        "maskrcnn": model_kind(build_maskrcnn_view, (800, 1280),
                               "Mask R-CNN (FPN 256, 80 classes), mmdetection's dummy forward: 1000 box / 100 mask RoIs"),
    }


def paper_note(kind: str, backbone: str, params: int, macs: int) -> Optional[str]:
    """The paper's numbers for a full dense model and our ratio to them, as one line (or None)."""
    paper = PAPER.get(f"{kind}_{backbone}")
    if paper is None:
        return None
    return (f"paper ({kind} + {backbone}): {paper[0] / 1e6:.0f}M params, {paper[1] / 1e9:.0f}G MACs; "
            f"ours / paper: params {params / paper[0]:.3f}, MACs {macs / paper[1]:.3f} (see docs/dense.md)")


def dense_cost(name: str, img_size: Optional[Tuple[int, int]] = None, **pale_kwargs: Any) -> DenseCost:
    """Cost of ``upernet_pale_*`` (default 512x2048) or ``maskrcnn_pale_*`` (default 800x1280), counted
    as ``pale info --kind upernet|maskrcnn`` counts it."""
    from ..complexity import measure_cost

    kind, _, backbone = name.partition("_")
    kinds = dense_model_kinds(lambda build, size, help: (build, size))
    if kind not in kinds or not backbone.startswith("pale_"):
        raise InputError(f"unknown dense model {name!r}; expected upernet_pale_* or maskrcnn_pale_*")
    build, default_size = kinds[kind]
    view = build(backbone, pale_kwargs)
    cost = measure_cost(view, tuple(img_size or default_size))
    return DenseCost(name, tuple(img_size or default_size), dict(cost.params_by_part), dict(cost.macs_by_part),
                     PAPER.get(name))


def format_dense_cost(cost: DenseCost) -> str:
    def human(n: float) -> str:
        return f"{n / 1e9:.1f}G" if n >= 1e9 else f"{n / 1e6:.2f}M"

    h, w = cost.img_size
    lines = [f"{cost.name}  input 3x{h}x{w}", f"{'part':<12}{'params':>12}{'MACs':>12}"]
    for part, p in cost.params_by_part.items():
        lines.append(f"{part:<12}{human(p):>12}{human(cost.macs_by_part.get(part, 0)) if part in cost.macs_by_part else '-':>12}")
    lines.append(f"{'total':<12}{human(cost.params):>12}{human(cost.macs):>12}")
    if cost.paper:
        lines.append(f"{'paper':<12}{human(cost.paper[0]):>12}{human(cost.paper[1]):>12}")
        lines.append(f"{'ours/paper':<12}{cost.params / cost.paper[0]:>12.3f}{cost.macs / cost.paper[1]:>12.3f}")
    return "\n".join(lines)
