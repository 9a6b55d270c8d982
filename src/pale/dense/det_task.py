"""Detection and instance segmentation with Mask R-CNN + Pale as a :class:`pale.train.Task`.

Defaults are the paper's COCO recipe (appendix, "Object Detection & Instance Segmentation on
COCO"): the 1x schedule, 12 epochs of batch 16, single-scale input (short side 800, long side at
most 1333), AdamW with lr 1e-4 decayed x0.1 at epochs 8 and 11, weight decay 0.001 for Pale-T and
Pale-S and 0.05 for Pale-B, stochastic depth 0.2 / 0.3 / 0.5. Multi-scale training stays an option:
``--set data.min_size=[480,512,544,576,608,640,672,704,736,768,800]``. Not in the paper, from
mmdetection's 1x configs that CSWin (which the paper follows) uses: 500 linear warm-up iterations
from 1e-3 of the lr, horizontal flip 0.5. Box and mask AP come from pycocotools' COCOeval.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import InputError, MissingFileError
from ..train import Runtime, Task
from ..train.recipe import list_rule, number_rule
from .det_data import CocoInstances, detection_collate
from .engine import dense_defaults, fill_variant_defaults, load_dense_model
from .maskrcnn import build_mask_rcnn

__all__ = ["DET_DEFAULTS", "DET_VARIANT_DEFAULTS", "DetectionTask", "coco_results", "coco_metrics", "load_detector"]

#: the appendix's per-backbone values, used where the recipe leaves them null
DET_VARIANT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "pale_tiny": {"model.drop_path_rate": 0.2, "optim.weight_decay": 0.001},
    "pale_small": {"model.drop_path_rate": 0.3, "optim.weight_decay": 0.001},
    "pale_base": {"model.drop_path_rate": 0.5, "optim.weight_decay": 0.05},
}

DET_DEFAULTS: Dict[str, Any] = dense_defaults(
    {"task": "detection", "epochs": 12, "batch_size": 16,
     "optim": {"opt": "adamw", "lr": 1.0e-4, "weight_decay": None},  # null: DET_VARIANT_DEFAULTS
     "sched": {"sched": "multistep", "warmup_epochs": 0, "warmup_updates": 500, "warmup_lr": 1.0e-7, "min_lr": 0.0,
               "decay_rate": 0.1, "decay_milestones": [8, 11]},
     "ema": {"enabled": False},
     "train": {"eval_every": 1, "eval_batch_size": 2, "workers": 4}},
    {"model": {
        "name": "pale_tiny",
        "kwargs": {},
        "drop_path_rate": None,     # null: the paper's value for the backbone (DET_VARIANT_DEFAULTS)
        "pretrained": None,         # ImageNet Pale checkpoint for the backbone
        "fpn_channels": 256,
        "roi_samples": 512,         # RoIs per image sampled for the box head in training
    },
     "data": {
        "root": None,               # COCO layout: <split>/*.jpg, annotations/instances_<split>.json
        "train_split": "train2017",
        "val_split": "val2017",     # null: no validation
        "min_size": [800],          # training short sides, one drawn per batch: several = multi-scale
        "max_size": 1333,
        "test_min_size": 800,
        "flip": 0.5,
        "skip_bad_images": False,
    }})

#: ranges of the settings above (:func:`pale.train.recipe.check_rules`)
DET_RULES = (
    number_rule("model.drop_path_rate", 0, 1, hi_open=True, nullable=True),
    number_rule("model.fpn_channels", 1, integer=True),
    number_rule("model.roi_samples", 1, integer=True),
    list_rule("data.min_size", 1, integer=True),
    number_rule("data.max_size", 1, integer=True),
    number_rule("data.test_min_size", 1, integer=True),
    number_rule("data.flip", 0, 1),
)


def coco_results(outputs: List[Dict[str, torch.Tensor]], image_ids: List[int], cat_ids: List[int]) -> List[Dict[str, Any]]:
    """torchvision detections -> COCO result dicts (``bbox`` xywh, ``segmentation`` RLE of masks > 0.5)."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu().numpy()
        scores = out["scores"].float().cpu().numpy()
        labels = out["labels"].cpu().numpy()
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in out else None
        for i in range(len(boxes)):
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            r = dict(image_id=int(image_id), category_id=int(cat_ids[int(labels[i]) - 1]),
                     bbox=[x1, y1, x2 - x1, y2 - y1], score=float(scores[i]))
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            results.append(r)
    return results


def coco_metrics(coco_gt: Any, results: List[Dict[str, Any]], image_ids: Optional[List[int]] = None,
                 iou_types: Tuple[str, ...] = ("bbox", "segm")) -> Dict[str, float]:
    """COCOeval AP, AP50, AP75 (percent) per IoU type; 0 when there are no detections."""
    from pycocotools.cocoeval import COCOeval

    out: Dict[str, float] = {}
    for iou_type in iou_types:
        names = [f"{iou_type}_ap", f"{iou_type}_ap50", f"{iou_type}_ap75"]
        usable = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not usable:
            out.update({n: 0.0 for n in names})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco_gt.loadRes(usable)
            ev = COCOeval(coco_gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # stats of -1 mean "no ground truth of that kind": report 0
        out.update({n: max(0.0, 100.0 * float(v)) for n, v in zip(names, ev.stats[:3])})
    return out


@contextlib.contextmanager
def object_group(rt: Runtime) -> Iterator[Optional[dist.ProcessGroup]]:
    """The group to send pickled objects over inside the block: the default one (None) unless its
    backend is NCCL, which would move them through GPU memory on every rank; then a gloo group over
    all ranks, made on entry (every rank enters) and destroyed on exit. Not kept for later calls: a
    group still referenced after ``dist.destroy_process_group()`` aborts the process at exit."""
    if not rt.distributed or dist.get_backend() != "nccl":
        yield None
        return
    group = dist.new_group(backend="gloo")
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def gather_to_main(obj: Any, rt: Runtime, group: Optional[dist.ProcessGroup]) -> Optional[List[Any]]:
    """Every rank's ``obj`` in rank order on rank 0, None on the other ranks; ``[obj]`` on one process."""
    if not rt.distributed:
        return [obj]
    out: Optional[List[Any]] = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


def broadcast_from_main(obj: Any, rt: Runtime, group: Optional[dist.ProcessGroup]) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


@torch.no_grad()
def evaluate_detector(model: nn.Module, batches: Iterable[Any], rt: Runtime, coco_gt: Any,
                      cat_ids: List[int]) -> Dict[str, float]:
    """Box and mask AP over ``batches``: each rank's detections gathered on rank 0, which runs COCOeval;
    every rank returns its metrics (the engine keeps the best checkpoint's score on every rank)."""
    results: List[Dict[str, Any]] = []
    seen: List[int] = []
    for images, targets in batches:
        ids = [int(t["image_id"]) for t in targets]
        outputs = model([rt.to_device(im) for im in images])
        results += coco_results(outputs, ids, cat_ids)
        seen += ids
    with object_group(rt) as group:
        parts = gather_to_main((results, seen), rt, group)
        metrics = None
        if parts is not None:
            metrics = coco_metrics(coco_gt, [r for part, _ in parts for r in part],
                                   [i for _, ids in parts for i in ids])
        return broadcast_from_main(metrics, rt, group)


class DetectionTask(Task):
    """Mask R-CNN + Pale on COCO-format data."""

    defaults = DET_DEFAULTS
    train_command = "pale det train"
    variant_defaults = DET_VARIANT_DEFAULTS
    rules = DET_RULES
    best_metric, best_mode, curve_metrics = "bbox_ap", "max", ("bbox_ap", "segm_ap")

    def __init__(self, cfg: Dict[str, Any]):
        super().__init__(fill_variant_defaults(cfg, self.variant_defaults))
        d = cfg["data"]
        if not d["root"]:
            raise InputError("data.root is not set: pass --data FOLDER (COCO layout: <split>/ images and "
                             "annotations/instances_<split>.json)")
        self.root = Path(d["root"])
        if not self.root.exists():
            raise MissingFileError(f"detection data folder not found: {self.root}")
        self.train_set = self._coco(d["train_split"], train=True)
        self.val_set = self._coco(d["val_split"], train=False) if d["val_split"] is not None else None
        self.class_names = self.train_set.class_names
        self.cat_ids = self.train_set.cat_ids
        if self.val_set is not None and self.val_set.cat_ids != self.cat_ids:
            raise InputError(f"{self.val_set.ann_file} declares categories {self.val_set.cat_ids}, but "
                             f"{self.train_set.ann_file} declares {self.cat_ids}")

    def _coco(self, split: str, train: bool) -> CocoInstances:
        d = self.cfg["data"]
        return CocoInstances(self.root / split, self.root / "annotations" / f"instances_{split}.json", train=train,
                             flip=float(d["flip"]), skip_bad=bool(d["skip_bad_images"]))

    def spec(self) -> Dict[str, Any]:
        m, d = self.cfg["model"], self.cfg["data"]
        return dict(backbone=m["name"], num_classes=len(self.cat_ids), fpn_channels=int(m["fpn_channels"]),
                    roi_samples=int(m["roi_samples"]),
                    min_size=list(d["min_size"]) if isinstance(d["min_size"], (list, tuple)) else int(d["min_size"]),
                    max_size=int(d["max_size"]), test_min_size=int(d["test_min_size"]),
                    pale_kwargs=dict(m["kwargs"], drop_path_rate=float(m["drop_path_rate"])))

    def build_model(self) -> nn.Module:
        model = build_mask_rcnn(self.spec())
        if self.cfg["model"]["pretrained"]:
            model.backbone.load_pretrained(self.cfg["model"]["pretrained"])
        return model

    def model_info(self) -> Dict[str, Any]:
        spec = self.spec()
        spec["pale_kwargs"].pop("drop_path_rate")
        return dict(task="detection", model_name=f"maskrcnn_{spec['backbone']}", model_kwargs=spec,
                    class_names=list(self.class_names), category_ids=list(self.cat_ids))

    def train_dataset(self) -> CocoInstances:
        return self.train_set

    def val_dataset(self) -> Optional[CocoInstances]:
        return self.val_set

    def collate_fn(self, train: bool):
        return detection_collate

    def training_loss(self, model: nn.Module, batch: Any, rt: Runtime) -> Tuple[torch.Tensor, int]:
        images, targets = batch
        images = [rt.to_device(im) for im in images]
        targets = [{k: v.to(rt.device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    def evaluate(self, model: nn.Module, batches: Iterable[Any], rt: Runtime) -> Dict[str, float]:
        return evaluate_detector(model, batches, rt, self.val_set.coco, self.cat_ids)


def load_detector(path: str, device: str = "auto", weights: str = "best") -> Tuple[nn.Module, Dict[str, Any]]:
    """A trained Mask R-CNN and its description (``weights``: :func:`pale.checkpoint.read_model_file`)."""
    return load_dense_model(path, "detection", DetectionTask.train_command, build_mask_rcnn, device, weights)
