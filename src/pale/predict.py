"""Classify images with a trained checkpoint: top-k class names and probabilities.

Preprocessing is the checkpoint's own when it stores one, else the model's pretrained config
(:func:`resolve_preprocessing` says in which order it looks), applied with timm's eval transform
(resize, centre crop, normalise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
import torch.nn as nn

from .checkpoint import create_model_from_file
from .device import resolve_device
from .files import PathLike
from .images import BadImageError, load_image
from .errors import InputError

__all__ = ["Classifier", "resolve_preprocessing", "load_classifier", "predict", "format_table"]

_PREPROC_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass
class Classifier:
    """A model in eval mode with its class names and preprocessing."""

    model: nn.Module
    class_names: List[str]
    data_config: Dict[str, Any]
    transform: Callable[[Any], torch.Tensor]
    source: str
    info: Dict[str, Any]

    @property
    def in_chans(self) -> int:
        return int(self.data_config["input_size"][0])


def _from_recipe(config: Any) -> Dict[str, Any]:
    """Preprocessing keys of a training recipe's ``data`` section (``img_size`` int or pair)."""
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        return {}
    out: Dict[str, Any] = {k: data[k] for k in ("interpolation", "mean", "std", "crop_pct", "crop_mode")
                           if data.get(k) is not None}
    size = data.get("img_size")
    if isinstance(size, int):
        out["input_size"] = (3, size, size)
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        out["input_size"] = (3, int(size[0]), int(size[1]))
    return out


def resolve_preprocessing(info: Mapping[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Eval preprocessing for ``model``: input size, interpolation, mean, std, crop.

    Looked up key by key, first found wins: the checkpoint's ``data_config`` (what ``pale train``
    resolved), the ``data`` section of its recipe (``config``), then the model's ``pretrained_cfg``
    through ``timm.data.resolve_model_data_config``. Entries of the wrong type are ignored. The channel
    count is always the model's ``in_chans``; mean and std of another length are an error.
    """
    from timm.data import resolve_model_data_config

    base = resolve_model_data_config(model)
    layers = [info.get("data_config") if isinstance(info.get("data_config"), Mapping) else {},
              _from_recipe(info.get("config"))]
    cfg: Dict[str, Any] = {}
    for key in _PREPROC_KEYS:
        for layer in layers:
            if layer.get(key) is not None:
                cfg[key] = layer[key]
                break
        else:
            if key in base:
                cfg[key] = base[key]
    in_chans = int(getattr(model, "in_chans", 3))
    size = cfg["input_size"]
    try:
        h, w = int(size[-2]), int(size[-1])
    except (TypeError, ValueError, IndexError):
        raise InputError(f"stored input_size {size!r} is not (C, H, W)") from None
    cfg["input_size"] = (in_chans, h, w)
    for key in ("mean", "std"):
        value = cfg[key]
        value = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(value) == 1:
            value = value * in_chans
        if len(value) != in_chans:
            raise InputError(f"stored {key} {value} has {len(value)} entries, the model takes {in_chans} channels")
        cfg[key] = value
    cfg["crop_pct"] = float(cfg.get("crop_pct") or 1.0)
    cfg.setdefault("crop_mode", "center")
    return cfg


def load_classifier(checkpoint: PathLike, device: str = "auto", strict: bool = True,
                    weights: str = "best") -> Classifier:
    """Rebuild the classifier a checkpoint (``.pth``) or export (``.safetensors``) describes
    (``weights``: :func:`pale.checkpoint.select_weights`; ``device``: :func:`pale.device.resolve_device`)."""
    from timm.data import create_transform

    model, info = create_model_from_file(checkpoint, strict=strict, weights=weights)
    names = info.get("class_names")
    if not names:
        raise InputError(f"{checkpoint} stores no class names: save it with "
                         f"pale.checkpoint.save_checkpoint(..., class_names=[...]) (pale train does)")
    num_classes = getattr(model, "num_classes", len(names))
    if len(names) != num_classes:
        raise InputError(f"{checkpoint} stores {len(names)} class names for a model with {num_classes} classes")
    cfg = resolve_preprocessing(info, model)
    transform = create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                                 mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                                 crop_mode=cfg["crop_mode"])
    return Classifier(model.to(resolve_device(device)).eval(), [str(n) for n in names], cfg, transform,
                      str(checkpoint), info)


@torch.no_grad()
def predict(classifier: Classifier, paths: Sequence[PathLike], topk: int = 5, batch_size: int = 16,
            show_progress: bool = True, skip_bad: bool = False) -> Dict[str, Any]:
    """Top-k predictions for every image.

    Returns:
        ``{"predictions": [{"path", "top": [{"class", "index", "prob"}, ...]}, ...],
        "skipped": [{"path", "error"}, ...]}`` in the order of ``paths``; probabilities are softmax
        outputs, sorted, largest first. Unreadable images raise unless ``skip_bad``.
    """
    from .progress import progress

    if topk < 1:
        raise InputError(f"topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    k = min(topk, len(classifier.class_names))
    device = next(classifier.model.parameters()).device
    predictions: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    bar = progress(total=len(paths), unit="images", desc="predict", enabled=show_progress and len(paths) > 1)
    try:
        for start in range(0, len(paths), batch_size):
            chunk, tensors = [], []
            for p in paths[start:start + batch_size]:
                try:
                    image = load_image(p, "L" if classifier.in_chans == 1 else "RGB")
                    tensors.append(classifier.transform(image))
                    chunk.append(p)
                except BadImageError as err:
                    if not skip_bad:
                        raise
                    skipped.append(dict(path=str(p), error=str(err)))
            if tensors:
                probs = classifier.model(torch.stack(tensors).to(device)).float().softmax(dim=-1)
                values, indices = probs.topk(k, dim=-1)
                for p, vs, ix in zip(chunk, values.tolist(), indices.tolist()):
                    predictions.append(dict(path=str(p), top=[
                        dict(**{"class": classifier.class_names[i]}, index=i, prob=v) for v, i in zip(vs, ix)]))
            bar.update(len(paths[start:start + batch_size]))
    finally:
        bar.close()
    return dict(checkpoint=classifier.source, weights=classifier.info.get("weights"),
                data_config=_jsonable(classifier.data_config), predictions=predictions, skipped=skipped)


def _jsonable(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def format_table(result: Mapping[str, Any]) -> str:
    """One block per image: rank, probability and class name."""
    lines = []
    for pred in result["predictions"]:
        lines.append(pred["path"])
        for rank, entry in enumerate(pred["top"], 1):
            lines.append(f"  {rank:>2}  {100 * entry['prob']:6.2f}%  {entry['class']}")
    for bad in result["skipped"]:
        lines.append(f"skipped {bad['path']}: {bad['error']}")
    if result["skipped"]:
        lines.append(f"{len(result['skipped'])} unreadable image(s) skipped")
    return "\n".join(lines)
