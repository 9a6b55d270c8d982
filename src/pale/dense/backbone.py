"""Pale as a dense-prediction backbone: ImageNet weights in, per-stage normed NCHW maps out.

* :func:`load_backbone_weights` -- copy a classifier checkpoint (``pale train`` ``.pth`` or a
  ``.safetensors`` export, read through :mod:`pale.checkpoint`) into the Pale trunk of a dense model; the
  classifier's ``head.*`` and final ``norm.*`` are not part of a backbone and are dropped, anything
  else that does not fit is an error listing the keys.
* :class:`PaleFPNBackbone` -- Pale (timm ``features_only``: NCHW maps at strides 4/8/16/32), a
  LayerNorm on each map (as Swin/CSWin's detection backbones add), then torchvision's
  :class:`~torchvision.ops.FeaturePyramidNetwork` with a max-pooled extra level: the
  ``OrderedDict`` of 256-channel maps ``'0'..'3', 'pool'`` and ``.out_channels`` that torchvision's
  Mask R-CNN expects.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Sequence, Union

import torch.nn as nn
from timm.layers import LayerNorm2d
from torch import Tensor

from ..checkpoint import LoadReport, load_weights, read_model_file
from ..errors import InputError

__all__ = ["create_pale_features", "with_ape_size", "load_backbone_weights", "PaleFPNBackbone"]

#: classifier parts a backbone does not have
CLASSIFIER_ONLY = ("head.", "norm.")


def with_ape_size(pale_kwargs: Mapping[str, Any], img_size: Sequence[int]) -> Dict[str, Any]:
    """``pale_kwargs`` with ``img_size`` set to the task's ``(H, W)`` when the backbone uses APE and
    none is given: the learned tables are sized at the task's resolution, which is how the paper's
    Table 9 counts its APE dense models (59M at 512x2048, 49M at 1280x800)."""
    kwargs = dict(pale_kwargs)
    if kwargs.get("pos_embed") == "ape":
        kwargs.setdefault("img_size", tuple(img_size))
    return kwargs


def create_pale_features(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, features_only=True)``: Pale's four stage outputs as NCHW maps."""
    import timm
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise InputError(f"unknown backbone {name!r} (expected pale_tiny, pale_small or pale_base)") from None
        raise


def load_backbone_weights(trunk: nn.Module, path: Union[str, os.PathLike]) -> LoadReport:
    """Load an ImageNet-trained Pale checkpoint into ``trunk`` (a ``PaleTransformer``, possibly pruned).

    EMA weights are used when the checkpoint has them. APE tables are resized to the trunk's. Keys of
    the classifier head and final norm are ignored; a missing, extra or mis-shaped backbone key raises
    :class:`pale.checkpoint.WeightsMismatchError` naming it.
    """
    from ..models.pale_transformer import checkpoint_filter_fn

    state, _ = read_model_file(path)
    own = trunk.state_dict()
    state = checkpoint_filter_fn(state, trunk)   # strips "module.", resizes APE tables to the trunk's
    state = {k: v for k, v in state.items() if not (k.startswith(CLASSIFIER_ONLY) and k not in own)}
    return load_weights(trunk, state, strict=True, source=f"backbone checkpoint {path}")


def pale_trunk(features: nn.Module) -> nn.Module:
    """The ``PaleTransformer`` inside timm's feature wrapper."""
    return getattr(features, "model", features)


class PaleFPNBackbone(nn.Module):
    """Pale + per-stage LayerNorm + FPN (256 channels, extra max-pooled level) for torchvision detectors.

    ``forward(images (B, 3, H, W))`` -> ``OrderedDict('0': (B, 256, H/4, W/4), ..., '3': H/32,
    'pool': H/64)``; H and W need not be multiples of 32 (torchvision's transform pads to 32 anyway).
    """

    def __init__(self, name: str = "pale_tiny", fpn_channels: int = 256, **pale_kwargs: Any):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = create_pale_features(name, **pale_kwargs)
        channels: Sequence[int] = self.body.feature_info.channels()
        # eps of torch.nn.LayerNorm (timm defaults to 1e-6), which trained checkpoints used
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-5) for c in channels)
        self.fpn = FeaturePyramidNetwork(list(channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def load_pretrained(self, path: Union[str, os.PathLike]) -> LoadReport:
        return load_backbone_weights(pale_trunk(self.body), path)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        maps = self.body(x)
        named = OrderedDict((str(i), norm(m)) for i, (norm, m) in enumerate(zip(self.norms, maps)))
        return self.fpn(named)
