"""Image classification on an ImageFolder tree (ImageNet layout: ``root/train/<class>/*``,
``root/val/<class>/*``), as a :class:`pale.train.task.Task`.

Augmentation, Mixup/CutMix and losses are timm's: ``transforms_imagenet_train`` (RandomResizedCrop,
flips, AutoAugment or RandAugment, colour jitter, random erasing), ``create_transform`` for evaluation
(resize + centre crop at ``crop_pct``; ``crop_mode: squash`` resizes both sides, as the paper's
appendix evaluates: 256x256, then the centre 224x224), ``Mixup`` with label smoothing and
``SoftTargetCrossEntropy``. Accuracies are percentages, as in timm.

Two departures from timm's ``create_transform`` for training: colour jitter is applied together with
an auto-augment policy (timm switches it off then; the paper's appendix uses both), and posterize
accepts 0 bits on every Pillow (:func:`make_pillow_safe`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.utils import accuracy

from ..checkpoint import WeightsMismatchError, load_weights, read_model_file
from ..errors import InputError, MissingFileError
from .data import ImageFolderDataset
from .recipe import RecipeError, choice_rule, list_rule, number_rule
from .runtime import Runtime
from .task import Task

__all__ = ["ClassificationTask", "evaluate_classifier", "build_eval_transform", "build_train_transform",
           "make_pillow_safe", "check_model_kwargs", "data_config", "CLASSIFICATION_DEFAULTS", "CLASSIFICATION_RULES"]

CLASSIFICATION_DEFAULTS: Dict[str, Any] = {
    "model": {
        "name": "pale_tiny",
        "kwargs": {},            # passed to timm.create_model (e.g. embed_dims, depths, pale_size)
        "drop_path_rate": 0.1,
        "drop_rate": 0.0,
        "pretrained": None,      # a .pth/.safetensors to start from (the head is dropped if its shape differs)
    },
    "data": {
        "root": None,            # folder with <train_split>/<class>/* and <val_split>/<class>/*
        "train_split": "train",
        "val_split": "val",      # null: no validation
        "img_size": 224,
        "crop_pct": 0.875,       # evaluation: resize to img_size / crop_pct, centre crop img_size
        "crop_mode": "squash",   # squash: resize both sides to img_size / crop_pct; center: the short side
        "interpolation": "bicubic",
        "mean": None,            # null: the model's (ImageNet) statistics
        "std": None,
        "skip_bad_images": False,  # true: skip unreadable images and count them; false: fail naming the file
    },
    "aug": {
        "scale": [0.08, 1.0],
        "ratio": [0.75, 1.3333333333],
        "hflip": 0.5,
        "vflip": 0.0,
        "color_jitter": 0.4,     # brightness, contrast, saturation; 0: off (applied with auto_augment too)
        "auto_augment": "original",  # timm policy string: original (AutoAugment), rand-..., null: none
        "fill": None,            # 0-255 or [r, g, b]: what rotate/shear/translate uncover; null: the mean (timm's)
        "train_interpolation": "bicubic",
        "reprob": 0.25,
        "remode": "pixel",
        "recount": 1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "cutmix_minmax": None,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "smoothing": 0.1,
    },
}


def _is_image_size(value: Any) -> bool:
    """An int, or an ``[h, w]`` pair of ints, each at least 3 (the Pale stem's smallest input)."""
    sides = value if isinstance(value, (list, tuple)) and len(value) == 2 else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 3 for v in sides)


#: ranges of the settings above (:func:`pale.train.recipe.check_rules`)
CLASSIFICATION_RULES = (
    number_rule("model.drop_path_rate", 0, 1, hi_open=True),
    number_rule("model.drop_rate", 0, 1, hi_open=True),
    ("data.img_size", _is_image_size, "an integer >= 3 or a list [height, width] of them (pixels)"),
    number_rule("data.crop_pct", 0, 1, lo_open=True),
    choice_rule("data.crop_mode", ("squash", "center", "border")),
    list_rule("data.mean", nullable=True),
    list_rule("data.std", 0, lo_open=True, nullable=True),
    list_rule("aug.scale", 0, 1, length=2, lo_open=True, order="non-decreasing"),
    list_rule("aug.ratio", 0, length=2, lo_open=True, order="non-decreasing"),
    number_rule("aug.hflip", 0, 1),
    number_rule("aug.vflip", 0, 1),
    number_rule("aug.color_jitter", 0, nullable=True),
    number_rule("aug.reprob", 0, 1),
    choice_rule("aug.remode", ("pixel", "rand", "const")),
    number_rule("aug.recount", 1, integer=True),
    number_rule("aug.mixup", 0),
    number_rule("aug.cutmix", 0),
    list_rule("aug.cutmix_minmax", 0, 1, length=2, order="non-decreasing", nullable=True),
    number_rule("aug.mixup_prob", 0, 1),
    number_rule("aug.mixup_switch_prob", 0, 1),
    choice_rule("aug.mixup_mode", ("batch", "pair", "elem")),
    number_rule("aug.smoothing", 0, 1, hi_open=True),
)


# set by the task from other recipe keys, never through model.kwargs
_TASK_KWARGS = {"num_classes": "the classes are the training folder's sub-folders",
                "drop_path_rate": "set model.drop_path_rate", "drop_rate": "set model.drop_rate"}


def check_model_kwargs(name: str, kwargs: Dict[str, Any]) -> None:
    """Refuse a ``model.kwargs`` key that the constructor of model ``name`` does not take, naming the
    ones it does. The constructor is the class the timm entrypoint is annotated to return (Pale:
    :class:`~pale.models.PaleTransformer`); a model without that annotation, or whose constructor takes
    ``**kwargs``, is left to ``timm.create_model``."""
    import inspect
    import typing

    import timm

    import pale  # noqa: F401  (registers the Pale models)

    for key in kwargs:
        if key in _TASK_KWARGS:
            raise RecipeError(f"model.kwargs.{key} is set by the task: {_TASK_KWARGS[key]}")
    if not timm.is_model(name):
        raise RecipeError(f"model.name: unknown model {name!r}")
    entrypoint = timm.models.model_entrypoint(name)
    try:
        cls = typing.get_type_hints(entrypoint).get("return")
    except Exception:  # unresolvable annotations: nothing to check against
        return
    if not inspect.isclass(cls):
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(n for n in params if n != "self" and n not in _TASK_KWARGS)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        import difflib
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"model.kwargs.{unknown[0]}: {cls.__name__} (model {name}) has no parameter "
                          f"{unknown[0]!r}{hint}; it takes: {', '.join(accepted)}")


def data_config(cfg: Dict[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Input size, crop, interpolation and normalisation used for evaluation (stored with the weights)."""
    d = cfg["data"]
    pre = getattr(model, "pretrained_cfg", None) or {}
    size = d["img_size"]
    h, w = to_2tuple(size)
    return dict(input_size=[3, int(h), int(w)], crop_pct=float(d["crop_pct"]), interpolation=d["interpolation"],
                mean=list(d["mean"] or pre.get("mean", IMAGENET_DEFAULT_MEAN)),
                std=list(d["std"] or pre.get("std", IMAGENET_DEFAULT_STD)), crop_mode=d["crop_mode"])


def _posterize_any_bits(img, bits_to_keep: int, **kwargs: Any):
    """timm's posterize, except that keeping 0 bits gives a black image, as Pillow < 13 and TensorFlow's
    posterize do, where Pillow 13 raises ``bits must be between or equal to 1 and 8``."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _augment_ops(obj: Any) -> Iterable[Any]:
    """timm ``AugmentOp``s inside a transform (Compose, RandAugment, AutoAugment, AugMix)."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(obj, AugmentOp):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _augment_ops(item)
    else:
        for attr in ("transforms", "ops", "policy"):
            if isinstance(getattr(obj, attr, None), (list, tuple)):
                yield from _augment_ops(getattr(obj, attr))


def make_pillow_safe(transform: Any) -> Any:
    """``transform`` with every timm posterize op replaced by one that accepts 0 bits (returned for
    chaining; changed in place).

    timm's ``Posterize`` level maps magnitudes below 2.5 to 0 bits (AutoAugment ``v0`` asks for it in one
    sub-policy every time), ``PosterizeIncreasing`` (RandAugment ``-inc1``, ``v0r``, ``originalr``) maps
    magnitude 10 to 0 bits, which ``mstd`` noise reaches; Pillow 13 refuses 0 bits. No other timm op asks
    Pillow for an argument it refuses (``tests/test_augment.py`` runs every op at every magnitude).
    """
    from timm.data.auto_augment import posterize

    for op in _augment_ops(transform):
        if op.aug_fn is posterize:
            op.aug_fn = _posterize_any_bits
    return transform


def build_train_transform(cfg: Dict[str, Any], dc: Dict[str, Any]):
    """The training transform of a recipe's ``aug`` section, at ``dc``'s size and normalisation."""
    from timm.data.transforms_factory import transforms_imagenet_train

    a = cfg["aug"]
    jitter = float(a["color_jitter"] or 0.0)
    try:
        transform = transforms_imagenet_train(
            tuple(dc["input_size"][-2:]), scale=tuple(a["scale"]), ratio=tuple(a["ratio"]), hflip=float(a["hflip"]),
            vflip=float(a["vflip"]), color_jitter=jitter if jitter > 0 else None, force_color_jitter=True,
            auto_augment=a["auto_augment"] or None, interpolation=a["train_interpolation"], mean=tuple(dc["mean"]),
            std=tuple(dc["std"]), re_prob=float(a["reprob"]), re_mode=a["remode"], re_count=int(a["recount"]))
    except (AssertionError, KeyError) as err:  # timm asserts on policy strings it does not know
        raise RecipeError(f"aug.auto_augment {a['auto_augment']!r} is not a timm policy (e.g. original, v0, "
                          f"rand-m9-mstd0.5, augmix-m5-w4-d2){': ' + str(err) if str(err) else ''}") from None
    return fill_uncovered(make_pillow_safe(transform), a["fill"])


def fill_uncovered(transform: Any, fill: Any) -> Any:
    """``transform`` with ``fill`` (an intensity 0-255 or ``[r, g, b]``) as the colour that every timm
    geometric op (rotate, shear, translate) paints where it uncovers the canvas (returned for chaining;
    changed in place). ``None`` keeps timm's choice, the normalisation mean: grey on photos, but a
    visible frame around digits or scans on black or white. The transform's output is RGB."""
    if fill is None:
        return transform
    values = list(fill) if isinstance(fill, (list, tuple)) else [fill] * 3
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                   for v in values):
        raise RecipeError(f"aug.fill must be an intensity 0-255 or a list of three, [r, g, b], got {fill!r}")
    for op in _augment_ops(transform):
        if "fillcolor" in op.kwargs:
            op.kwargs["fillcolor"] = tuple(values)
    return transform


def build_eval_transform(dc: Dict[str, Any]):
    from timm.data import create_transform

    return create_transform(tuple(dc["input_size"]), is_training=False, interpolation=dc["interpolation"],
                            mean=tuple(dc["mean"]), std=tuple(dc["std"]), crop_pct=dc["crop_pct"],
                            crop_mode=dc.get("crop_mode", "center"))


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                        rt: Runtime) -> Dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (%) over ``batches``, summed over ranks."""
    totals = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss sum, top1, top5, count
    for images, targets in batches:
        images, targets = rt.to_device(images), targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        n = len(targets)
        top1, top5 = (round(float(acc) * n / 100) for acc in accuracy(logits, targets, topk=(1, 5)))
        totals += torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(), top1, top5, n],
                               dtype=torch.float64, device=rt.device)
    rt.all_reduce_sum(totals)
    n = max(float(totals[3]), 1.0)
    return dict(loss=float(totals[0]) / n, top1=100.0 * float(totals[1]) / n, top5=100.0 * float(totals[2]) / n,
                n=int(totals[3]))


class ClassificationTask(Task):
    """A timm classifier (``model.name``, Pale by default) on an image folder."""

    defaults = CLASSIFICATION_DEFAULTS
    rules = CLASSIFICATION_RULES
    best_metric = "top1"
    best_mode = "max"
    curve_metrics = ("top1", "top5")

    def __init__(self, cfg: Dict[str, Any]):
        super().__init__(cfg)
        check_model_kwargs(cfg["model"]["name"], cfg["model"]["kwargs"])
        d = cfg["data"]
        if not d["root"]:
            raise InputError("data.root is not set: pass --data FOLDER (a folder with "
                             f"{d['train_split']}/<class>/<image> and {d['val_split']}/<class>/<image>)")
        self.root = Path(d["root"])
        if not self.root.exists():
            raise MissingFileError(f"data folder not found: {self.root}")
        from .data import scan_image_folder
        self.train_dir = self.root / d["train_split"]
        _, self.class_names = scan_image_folder(self.train_dir, what="training folder")
        if len(self.class_names) < 2:  # one class: the loss is 0 from the start and nothing is learned
            raise InputError(f"training folder {self.train_dir} has one class ({self.class_names[0]}): a "
                             f"classifier needs at least two class sub-folders")
        val_dir = self.root / d["val_split"] if d["val_split"] else None
        if val_dir is not None and not val_dir.is_dir():
            raise MissingFileError(f"validation folder not found: {val_dir} (name the split with "
                                   f"--set data.val_split=NAME, or train without validation: data.val_split=null)")
        self.num_classes = len(self.class_names)
        self.mixup_fn = None
        self._model: Optional[nn.Module] = None

    # -- model --

    def model_kwargs(self) -> Dict[str, Any]:
        m = self.cfg["model"]
        return dict(m["kwargs"], num_classes=self.num_classes, drop_path_rate=float(m["drop_path_rate"]),
                    drop_rate=float(m["drop_rate"]))

    def build_model(self) -> nn.Module:
        import timm

        import pale  # noqa: F401  (registers the Pale models)

        m = self.cfg["model"]
        try:
            model = timm.create_model(m["name"], **self.model_kwargs())
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise InputError(f"model.name: unknown model {m['name']!r}") from None
            raise
        except TypeError as err:
            raise InputError(f"model.kwargs do not fit {m['name']}: {err}") from None
        if m["pretrained"]:
            state, _ = read_model_file(m["pretrained"])
            own = model.state_dict()
            state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape and k.startswith("head."))}
            report = load_weights(model, state, strict=False, source=str(m["pretrained"]))
            if report.mismatched or report.unexpected:
                raise WeightsMismatchError(f"{m['pretrained']} does not fit {m['name']}:\n{report.describe()}", report)
        self._model = model
        self.data_config = data_config(self.cfg, model)
        return model

    def model_info(self) -> Dict[str, Any]:
        return dict(model_name=self.cfg["model"]["name"], model_kwargs=self.model_kwargs(),
                    class_names=list(self.class_names), data_config=self.data_config)

    # -- data --

    def train_dataset(self) -> ImageFolderDataset:
        from timm.data import Mixup

        a = self.cfg["aug"]
        transform = build_train_transform(self.cfg, self.data_config)
        if a["mixup"] > 0 or a["cutmix"] > 0 or a["cutmix_minmax"] is not None:
            self.mixup_fn = Mixup(mixup_alpha=float(a["mixup"]), cutmix_alpha=float(a["cutmix"]),
                                  cutmix_minmax=a["cutmix_minmax"], prob=float(a["mixup_prob"]),
                                  switch_prob=float(a["mixup_switch_prob"]), mode=a["mixup_mode"],
                                  label_smoothing=float(a["smoothing"]), num_classes=self.num_classes)
        return ImageFolderDataset(self.train_dir, transform, class_names=self.class_names,
                                  skip_bad=bool(self.cfg["data"]["skip_bad_images"]), what="training folder")

    def val_dataset(self) -> Optional[ImageFolderDataset]:
        split = self.cfg["data"]["val_split"]
        if not split:
            return None
        return ImageFolderDataset(self.root / split, build_eval_transform(self.data_config),
                                  class_names=self.class_names, skip_bad=bool(self.cfg["data"]["skip_bad_images"]),
                                  what="validation folder")

    # -- loss and evaluation --

    def training_loss(self, model: nn.Module, batch: Any, rt: Runtime) -> Tuple[torch.Tensor, int]:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        images, targets = batch
        images, targets = rt.to_device(images), targets.to(rt.device, non_blocking=True)
        smoothing = float(self.cfg["aug"]["smoothing"])
        if self.mixup_fn is not None:
            if len(images) % 2:  # Mixup pairs samples; a batch shortened by skipped images may be odd
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup_fn(images, targets)
            loss = SoftTargetCrossEntropy()(model(images), targets)
        elif smoothing > 0:
            loss = LabelSmoothingCrossEntropy(smoothing)(model(images), targets)
        else:
            loss = F.cross_entropy(model(images), targets)
        return loss, len(images)

    def evaluate(self, model: nn.Module, batches: Iterable[Any], rt: Runtime) -> Dict[str, float]:
        return evaluate_classifier(model, batches, rt)
