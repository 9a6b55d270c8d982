"""UperNet on a Pale backbone: segmentation-models-pytorch's ``UPerNet`` with the timm encoder
``tu-pale_*``, plus the auxiliary FCN head of mmseg's UperNet recipes, working at any input size.

smp builds a ``tu-`` encoder with ``timm.create_model(name, features_only=True)`` (for Pale: the
NCHW maps of ``forward_intermediates`` at strides 4/8/16/32) and refuses input sizes that are not
multiples of 32. :class:`PaleUperNet` pads the (normalised) image at the bottom and right to the next
multiple of 32, runs encoder, decoder and heads itself, and crops the logits back, so every input
size gives logits of its own size.

Decoder (smp's ``UPerNetDecoder``, as in UperNet / mmseg's ``UPerHead``): a LayerNorm on each stage
map, pyramid pooling (bins 1, 2, 3, 6) on stage 4, an FPN top-down path over stages 1-3, and a 3x3
fusion of all four levels at stride 4, all ``decoder_channels`` (512 in the paper's setting) wide;
a 1x1 classifier, upsampled x4. Auxiliary head (``aux=True``): mmseg's ``FCNHead`` on stage 3 (one
3x3 conv to 256 channels, BN, ReLU, dropout 0.1, 1x1 classifier), trained with weight 0.4 and not
used for inference.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import LoadReport
from ..errors import InputError
from .backbone import load_backbone_weights, with_ape_size

__all__ = ["PaleUperNet", "FCNHead", "pad_to_multiple", "APE_IMG_SIZE"]

#: smp encoders (and Pale's four stride-2 stages after the stride-4 stem) need multiples of this
SIZE_DIVISOR = 32
#: ADE20K's test scale (H, W) = 512x2048, the size of the paper's FLOPs (Table 4): APE tables' size
APE_IMG_SIZE = (512, 2048)


def pad_to_multiple(x: Tensor, divisor: int = SIZE_DIVISOR) -> Tensor:
    """Zero-pad ``(B, C, H, W)`` at the bottom and right so H and W are multiples of ``divisor``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class FCNHead(nn.Module):
    """mmseg's FCNHead with one conv: 3x3 conv (no bias) -> BN -> ReLU -> Dropout2d -> 1x1 classifier.

    Not torchvision's ``FCNHead``: that one fixes the width at ``in_channels // 4`` (64 on Pale-T's stage 3)
    and drops whole activations, where the UperNet recipe's auxiliary head is 256 wide with channel dropout.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, h, w)`` -> class logits ``(B, K, h, w)``."""
        return self.classifier(self.dropout(self.conv(x)))


class PaleUperNet(nn.Module):
    """UperNet (smp) on Pale, with an optional auxiliary FCN head on stage 3.

    Args:
        backbone: ``pale_tiny``, ``pale_small`` or ``pale_base``.
        num_classes: output classes (150 for ADE20K).
        decoder_channels: width of the pyramid pooling / FPN / fusion convs (512 in the paper's setting).
        aux: build the auxiliary FCN head (training only).
        **pale_kwargs: passed to the Pale constructor (``drop_path_rate``, ``embed_dims``, ...); with
            ``pos_embed='ape'`` and no ``img_size``, the tables are sized at :data:`APE_IMG_SIZE`.

    ``forward(x)`` takes a normalised ``(B, 3, H, W)`` batch of any size and returns logits
    ``(B, num_classes, H, W)``; ``forward(x, with_aux=True)`` returns ``(logits, aux_logits or None)``,
    both of the input's size.
    """

    def __init__(self, backbone: str = "pale_tiny", num_classes: int = 150, decoder_channels: int = 512,
                 aux: bool = True, **pale_kwargs: Any):
        super().__init__()
        import segmentation_models_pytorch as smp

        import pale  # noqa: F401  (registers the Pale models with timm, so smp finds tu-pale_*)

        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {num_classes}")
        if not backbone.startswith("pale_"):
            raise InputError(f"backbone must be one of pale_tiny, pale_small, pale_base; got {backbone!r}")
        self.num_classes = num_classes
        self.upernet = smp.UPerNet(encoder_name=f"tu-{backbone}", encoder_weights=None,
                                   decoder_channels=decoder_channels, classes=num_classes,
                                   **with_ape_size(pale_kwargs, APE_IMG_SIZE))
        # smp's channel list: [input, (empty stride-2 slot), stage 1, stage 2, stage 3, stage 4]
        stage3_channels = self.upernet.encoder.out_channels[4]
        self.aux_head = FCNHead(stage3_channels, num_classes) if aux else None

    @property
    def trunk(self) -> nn.Module:
        """The ``PaleTransformer`` inside smp's encoder and timm's feature wrapper."""
        return self.upernet.encoder.model.model

    def load_pretrained(self, path: Union[str, os.PathLike]) -> LoadReport:
        """Initialise the backbone from an ImageNet-trained Pale checkpoint."""
        return load_backbone_weights(self.trunk, path)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"upernet.encoder.model.model." + n for n in self.trunk.no_weight_decay()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got {x.dtype}")

    def forward(self, x: Tensor, with_aux: bool = False) -> Union[Tensor, Tuple[Tensor, Optional[Tensor]]]:
        self.check_input(x)
        h, w = x.shape[-2:]
        features = self.upernet.encoder(pad_to_multiple(x))
        logits = self.upernet.segmentation_head(self.upernet.decoder(features))[..., :h, :w]
        if not with_aux:
            return logits
        aux = None
        if self.aux_head is not None:
            aux = self.aux_head(features[4])
            size = tuple(s * 16 for s in aux.shape[-2:])
            aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)[..., :h, :w]
        return logits, aux


def build_upernet(spec: Dict[str, Any]) -> PaleUperNet:
    """A :class:`PaleUperNet` from its stored description (``backbone``, ``num_classes``,
    ``decoder_channels``, ``aux``, ``pale_kwargs``)."""
    return PaleUperNet(spec["backbone"], int(spec["num_classes"]), int(spec["decoder_channels"]),
                       bool(spec["aux"]), **dict(spec.get("pale_kwargs") or {}))
