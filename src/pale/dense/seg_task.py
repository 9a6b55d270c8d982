"""Semantic segmentation with UperNet + Pale as a :class:`pale.train.Task`.

Defaults are the paper's ADE20K recipe (appendix, "Semantic Segmentation on ADE20K"): 160k
iterations (320 "epochs" of 500) of batch 16, AdamW with weight decay 0.01 (none on norms and
biases), lr 6e-5 decayed by a polynomial schedule after a 1500-iteration warm-up, stochastic depth
0.3 / 0.3 / 0.5 for Pale-T / S / B, an auxiliary loss on stage 3 with weight 0.4, mmseg's default
augmentation (random rescale with ratio 0.5-2.0, 512x512 crop, flip, photometric distortion), and
single-scale inference, multi-scale with factors 0.75-1.75 in steps of 0.25 as an option. Not in
the paper, from mmseg's Swin/CSWin configs: poly power 1 down to 0, the (2048, 512) rescale base and
test scale, cat_max_ratio 0.75, evaluation every 16k iterations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import InputError
from ..train import Runtime, Task
from ..train.recipe import RecipeError, choice_rule, list_rule, number_rule
from ..images import BadImageError
from .engine import dense_defaults, fill_variant_defaults, load_dense_model
from .seg_data import (IGNORE_INDEX, SegmentationFolder, SegTrainTransform,
                       contiguous_label_ids, list_collate, scan_label_ids, scan_segmentation_folder)
from .seg_eval import confusion_matrix, segment, segmentation_metrics
from .upernet import PaleUperNet, build_upernet

__all__ = ["SEG_DEFAULTS", "SEG_VARIANT_DEFAULTS", "SegmentationTask", "seg_loss"]

#: the appendix's per-backbone values, used where the recipe leaves them null
SEG_VARIANT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "pale_tiny": {"model.drop_path_rate": 0.3},
    "pale_small": {"model.drop_path_rate": 0.3},
    "pale_base": {"model.drop_path_rate": 0.5},
}

SEG_DEFAULTS: Dict[str, Any] = dense_defaults(
    {"task": "segmentation", "epochs": 320, "batch_size": 16,
     "optim": {"opt": "adamw", "lr": 6.0e-5, "weight_decay": 0.01},
     "sched": {"sched": "poly", "warmup_epochs": 0, "warmup_updates": 1500, "warmup_lr": 6.0e-11, "min_lr": 0.0,
               "decay_rate": 1.0},
     "ema": {"enabled": False},
     "train": {"eval_every": 32, "eval_batch_size": 1, "workers": 4}},
    {"model": {
        "name": "pale_tiny",       # backbone: pale_tiny | pale_small | pale_base
        "kwargs": {},              # passed to the Pale constructor (embed_dims, depths, pale_size, ...)
        "drop_path_rate": None,    # null: the paper's value for the backbone (SEG_VARIANT_DEFAULTS)
        "pretrained": None,        # ImageNet Pale checkpoint (.pth of `pale train` or .safetensors) for the backbone
        "decoder_channels": 512,
        "aux_weight": 0.4,         # auxiliary FCN head on stage 3; 0: no auxiliary head
    },
     "data": {
        "root": None,              # images/<split>/*.jpg + annotations/<split>/*.png
        "train_split": "training",
        "val_split": "validation",  # null: no validation
        "num_classes": None,        # null: the classes are the ids the training annotations use
        "label_ids": None,          # annotation id of each class (null: from num_classes, or from the data)
        "class_names": None,
        "reduce_zero_label": True,  # ADE20K: 0 = ignore, labels 1..150 -> 0..149
        "iters_per_epoch": 500,     # iteration-based schedule: one "epoch" = this many updates; null: one pass
        "scale": [2048, 512],       # training rescale base (long, short side), times a random ratio
        "ratio_range": [0.5, 2.0],
        "crop_size": [512, 512],
        "cat_max_ratio": 0.75,
        "flip": 0.5,
        "photometric": True,
        "skip_bad_images": False,
    },
     "test": {
        "mode": "whole",            # whole | slide
        "scale": [2048, 512],       # images are rescaled to this (keeping the aspect ratio); null: own size
        "crop_size": [512, 512],    # slide mode window
        "stride": [341, 341],
        "scales": [1.0],            # multi-scale: [0.75, 1.0, 1.25, 1.5, 1.75]
        "flip": False,
    }})


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``(B, K, H, W)`` logits against ``(B, H, W)`` labels, averaged over the pixels that
    are not ``IGNORE_INDEX``; 0 (with zero gradients) when every pixel is. PyTorch's mean divides by the
    count of labelled pixels and gives NaN for none, which a crop of pure background under
    ``reduce_zero_label`` is (mmseg's loss gives 0 there)."""
    labelled = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / labelled


def syncs_batch_norm(rt: Runtime) -> bool:
    """Whether training on ``rt`` uses SyncBatchNorm (several CUDA processes, as mmseg), which computes the
    batch statistics over all processes' images."""
    return rt.distributed and rt.device.type == "cuda"


def seg_loss(outputs: Tuple[torch.Tensor, Optional[torch.Tensor]], labels: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Cross-entropy of the main logits plus ``aux_weight`` times that of the auxiliary logits."""
    logits, aux = outputs
    loss = pixel_cross_entropy(logits, labels)
    if aux is not None and aux_weight > 0:
        loss = loss + aux_weight * pixel_cross_entropy(aux, labels)
    return loss


def inference_settings(cfg: Dict[str, Any]) -> Dict[str, Any]:
    t = cfg["test"]
    return dict(mode=t["mode"], test_scale=t["scale"], crop=tuple(t["crop_size"]), stride=tuple(t["stride"]),
                scales=tuple(t["scales"]), flip=bool(t["flip"]))


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, batches: Iterable[Any], rt: Runtime, num_classes: int,
                       settings: Dict[str, Any]) -> Dict[str, Any]:
    """mIoU / mAcc / aAcc (percent) over ``batches`` of ``(images, labels, paths)`` lists, summed over ranks."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, labels, _ in batches:
        for image, label in zip(images, labels):
            probs = segment(model, rt.to_device(image[None]), num_classes, **settings)
            conf += confusion_matrix(probs[0].argmax(0), label.to(probs.device), num_classes)
    conf = rt.all_reduce_sum(conf.to(rt.device)).cpu()
    out = segmentation_metrics(conf)
    out["pixels"] = int(conf.sum())
    return out


#: ranges of the settings above (:func:`pale.train.recipe.check_rules`)
SEG_RULES = (
    number_rule("model.drop_path_rate", 0, 1, hi_open=True, nullable=True),
    number_rule("model.decoder_channels", 1, integer=True),
    number_rule("model.aux_weight", 0),
    number_rule("data.num_classes", 1, integer=True, nullable=True),
    number_rule("data.iters_per_epoch", 1, integer=True, nullable=True),
    list_rule("data.scale", 1, length=2, integer=True),
    list_rule("data.ratio_range", 0, length=2, lo_open=True, order="non-decreasing"),
    list_rule("data.crop_size", 1, length=2, integer=True),
    number_rule("data.cat_max_ratio", 0, 1, lo_open=True),
    number_rule("data.flip", 0, 1),
    choice_rule("test.mode", ("whole", "slide")),
    list_rule("test.scale", 1, length=2, integer=True, nullable=True),
    list_rule("test.crop_size", 1, length=2, integer=True),
    list_rule("test.stride", 1, length=2, integer=True),
    list_rule("test.scales", 0, lo_open=True),
)


class SegmentationTask(Task):
    """UperNet + Pale on an ADE20K-layout folder."""

    defaults = SEG_DEFAULTS
    train_command = "pale seg train"
    variant_defaults = SEG_VARIANT_DEFAULTS
    rules = SEG_RULES
    best_metric, best_mode = "miou", "max"
    curve_metrics = ("miou", "macc", "aacc")

    def __init__(self, cfg: Dict[str, Any]):
        super().__init__(fill_variant_defaults(cfg, self.variant_defaults))
        d = cfg["data"]
        if not d["root"]:
            raise InputError("data.root is not set: pass --data FOLDER (with images/<split>/ and annotations/<split>/)")
        self.root = Path(d["root"])
        reduce = bool(d["reduce_zero_label"])
        if d["label_ids"] is not None:
            self.label_ids = [int(i) for i in d["label_ids"]]
        elif d["num_classes"] is not None:
            self.label_ids = contiguous_label_ids(int(d["num_classes"]), reduce)
        else:  # neither given: the classes are the ids the training annotations use
            self.label_ids = scan_label_ids(scan_segmentation_folder(self.root, d["train_split"] or ""), reduce)
        self.num_classes = len(self.label_ids)
        if d["num_classes"] is not None and int(d["num_classes"]) != self.num_classes:
            raise InputError(f"data.num_classes is {d['num_classes']} but data.label_ids has {self.num_classes} ids")
        names = d["class_names"]
        if names is not None and len(names) != self.num_classes:
            raise InputError(f"data.class_names has {len(names)} names for {self.num_classes} classes")
        self.class_names = list(names) if names else [str(i) for i in self.label_ids]
        # fail early (before the model is built) on a missing folder, empty list or missing annotation
        self.train_set = self._folder(d["train_split"], train=True)
        self.val_set = self._folder(d["val_split"], train=False) if d["val_split"] is not None else None

    def spec(self) -> Dict[str, Any]:
        m = self.cfg["model"]
        return dict(backbone=m["name"], num_classes=self.num_classes, decoder_channels=int(m["decoder_channels"]),
                    aux=float(m["aux_weight"]) > 0,
                    pale_kwargs=dict(m["kwargs"], drop_path_rate=float(m["drop_path_rate"])))

    def build_model(self) -> nn.Module:
        model = build_upernet(self.spec())
        if self.cfg["model"]["pretrained"]:
            model.load_pretrained(self.cfg["model"]["pretrained"])
        rt = getattr(self, "runtime", None)
        if rt is not None and syncs_batch_norm(rt):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all GPUs, as mmseg
        return model

    def model_info(self) -> Dict[str, Any]:
        spec = self.spec()
        spec["pale_kwargs"].pop("drop_path_rate")  # training-only
        return dict(task="segmentation", model_name=f"upernet_{spec['backbone']}", model_kwargs=spec,
                    class_names=self.class_names,
                    data_config=dict(mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD),
                                     reduce_zero_label=bool(self.cfg["data"]["reduce_zero_label"]),
                                     label_ids=list(self.label_ids),
                                     test=dict(self.cfg["test"])))

    # -- data --

    def _folder(self, split: str, train: bool) -> SegmentationFolder:
        d = self.cfg["data"]
        transform = length = None
        if train:
            transform = SegTrainTransform(d["scale"], d["ratio_range"], d["crop_size"], float(d["cat_max_ratio"]),
                                          float(d["flip"]), bool(d["photometric"]))
            if d["iters_per_epoch"]:
                length = int(d["iters_per_epoch"]) * int(self.cfg["batch_size"])
        return _SkippingFolder(self.root, split or "", self.num_classes, bool(d["reduce_zero_label"]), transform,
                               length=length, label_ids=self.label_ids, skip_bad=bool(d["skip_bad_images"]))

    def train_dataset(self) -> SegmentationFolder:
        return self.train_set

    def val_dataset(self) -> Optional[SegmentationFolder]:
        return self.val_set

    def collate_fn(self, train: bool):
        return None if train else list_collate

    # -- loss and evaluation --

    def check_batch(self, per_process: int, rt: Runtime) -> None:
        # UperNet's pyramid pooling normalises 1x1 maps with BatchNorm: one image per forward gives it
        # one value per channel, which BatchNorm refuses in training
        if per_process * (rt.world_size if syncs_batch_norm(rt) else 1) >= 2:
            return
        accum = int(self.cfg["train"]["accum_steps"])
        raise RecipeError(
            f"batch_size {self.cfg['batch_size']} gives {per_process} image per forward in each of "
            f"{rt.world_size} process(es) ({accum} accumulation step(s)); UperNet's pyramid pooling uses "
            f"BatchNorm on 1x1 maps, which needs at least 2 images per forward: set --batch-size "
            f"{2 * rt.world_size * accum} or more")

    def training_loss(self, model: nn.Module, batch: Any, rt: Runtime) -> Tuple[torch.Tensor, int]:
        images, labels = batch
        images, labels = rt.to_device(images), labels.to(rt.device)
        outputs = model(images, with_aux=True)
        return seg_loss(outputs, labels, float(self.cfg["model"]["aux_weight"])), len(images)

    def evaluate(self, model: nn.Module, batches: Iterable[Any], rt: Runtime) -> Dict[str, float]:
        out = evaluate_segmenter(model, batches, rt, self.num_classes, inference_settings(self.cfg))
        return {k: out[k] for k in ("miou", "macc", "aacc")}


class _SkippingFolder(SegmentationFolder):
    """Returns ``None`` for an unreadable image when ``skip_bad`` (the engine drops and counts it)."""

    def __init__(self, *args: Any, skip_bad: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skip_bad = skip_bad

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except BadImageError:
            if self.skip_bad:
                return None
            raise


def load_segmenter(path: str, device: str = "auto", weights: str = "best") -> Tuple[PaleUperNet, Dict[str, Any]]:
    """A trained segmenter and its description, from a ``.pth`` or ``.safetensors`` (``weights``:
    :func:`pale.checkpoint.read_model_file`). The description's ``label_ids`` (class index -> annotation id)
    are filled in for checkpoints that predate them (ids from 0, or from 1 with ``reduce_zero_label``)."""
    model, info = load_dense_model(path, "segmentation", SegmentationTask.train_command, build_upernet, device, weights)
    dc = dict(info.get("data_config") or {})
    if dc.get("label_ids") is None:
        dc["label_ids"] = contiguous_label_ids(int(info["model_kwargs"]["num_classes"]),
                                               bool(dc.get("reduce_zero_label", False)))
    return model, dict(info, data_config=dc)
