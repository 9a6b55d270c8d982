"""Checkpoints and weights exports: which weights to use, and the model they rebuild.

Checkpoint layout (a ``.pth`` written by :func:`save_checkpoint`): a dict with ``model`` (state dict),
``model_name`` and ``model_kwargs`` (to rebuild it with ``timm.create_model``), ``class_names``, and
whatever training state the caller adds (``optimizer``, ``epoch``, ...). A training checkpoint may
also hold ``model_ema`` (the EMA weights), ``val_metrics`` (``{"raw": {metric: value}, "ema": {...}}``)
and ``best_metric`` (the metric name, higher is better); :func:`select_weights` picks one set from
them. Weights-only exports are ``.safetensors`` files whose metadata holds ``model_name``,
``model_kwargs`` and ``class_names`` (and ``weights``: which set they are) as JSON.

Loading weights into a model reports every missing, unexpected and mis-shaped key at once
(:func:`load_weights`); files are read through :mod:`pale.files`, so nothing pickled runs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from . import files
from .errors import CheckpointError, InputError, settings_error
from .files import PathLike

__all__ = ["WEIGHT_CHOICES", "WeightsMismatchError", "LoadReport", "select_weights",
           "read_model_file", "describe_weights", "load_weights", "save_checkpoint", "create_model_from_file"]


class WeightsMismatchError(CheckpointError):
    """A state dict that does not fit the model; :attr:`report` lists the differences."""

    def __init__(self, message: str, report: "LoadReport"):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """Keys that did not load: absent from the file, unknown to the model, or of another shape."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = []
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} keys with another shape (file vs model):")
            lines += [f"  {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched[:limit]]
        if self.missing:
            lines.append(f"{len(self.missing)} keys missing from the file: " + ", ".join(self.missing[:limit]))
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} keys the model does not have: " + ", ".join(self.unexpected[:limit]))
        return "\n".join(lines)


#: ``--weights`` choices: the set that validated better, the EMA weights, the raw (trained) weights.
WEIGHT_CHOICES = ("best", "ema", "raw")


def select_weights(obj: Mapping[str, Any], weights: str = "best",
                   source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], str, str]:
    """One set of weights from a checkpoint dict: ``(state dict, 'raw' or 'ema', why)``.

    ``obj`` holds ``model`` (raw weights) and, from a training run with EMA, ``model_ema``,
    ``val_metrics`` (``{"raw": {...}, "ema": {...}}``) and ``best_metric`` (higher is better).

    * ``'raw'`` / ``'ema'``: that set; asking for EMA weights a file does not hold is an error.
    * ``'best'``: the set whose ``val_metrics[set][best_metric]`` is higher (a tie goes to raw); a
      checkpoint without ``val_metrics`` uses the last entry of its ``history`` when that entry
      validated these very weights. With one set only, that one. With both sets but no recorded validation of both, the raw weights:
      they are what the optimiser trained, while EMA weights of a short run can still sit near the
      initialisation; the reason then says the choice was not validated.
    """
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHT_CHOICES)}")
    raw, ema = obj.get("model"), obj.get("model_ema")
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source} has no model weights (expected a 'model' entry)")
    has_ema = isinstance(ema, Mapping)
    if weights == "ema":
        if not has_ema:
            raise CheckpointError(f"{source} holds no EMA weights (trained without EMA); use --weights raw or best")
        return dict(ema), "ema", "EMA weights, as asked"
    if weights == "raw":
        return dict(raw), "raw", "raw weights, as asked"
    if not has_ema:
        return dict(raw), "raw", "the only weights in the file"
    metric, scores = obj.get("best_metric"), obj.get("val_metrics")
    if not isinstance(scores, Mapping):
        metric, scores = _metrics_from_history(obj)
    values = {k: (scores.get(k) or {}).get(metric) if isinstance(scores.get(k), Mapping) else None
              for k in ("raw", "ema")}
    if metric and all(isinstance(v, (int, float)) for v in values.values()):
        if values["ema"] == values["raw"]:
            return dict(raw), "raw", f"validated as well as the EMA weights ({metric} {values['raw']:.4g}); a tie goes to raw"
        pick = "ema" if values["ema"] > values["raw"] else "raw"
        return dict(ema if pick == "ema" else raw), pick, \
            f"validated better: {metric} {values[pick]:.4g} ({pick}) vs {values['raw' if pick == 'ema' else 'ema']:.4g}"
    return dict(raw), "raw", ("raw weights chosen without validation: the file records no validation "
                              "metrics of both sets (pass --weights ema for the EMA weights)")


def _metrics_from_history(obj: Mapping[str, Any]) -> Tuple[Optional[str], Dict[str, Dict[str, float]]]:
    """``(metric, {"raw": {...}, "ema": {...}})`` from the per-epoch ``history`` that checkpoints
    without ``val_metrics`` keep (``val_<m>`` / ``ema_val_<m>`` keys), when its last entry is the
    validation of exactly these weights (saved at the end of that epoch)."""
    history, best = obj.get("history"), obj.get("best")
    if not (isinstance(history, list) and history and isinstance(history[-1], Mapping) and isinstance(best, Mapping)):
        return None, {}
    last = history[-1]
    if last.get("epoch") != obj.get("epoch") or obj.get("step", 0) != 0:
        return None, {}
    metric = str(best.get("metric", "")).removeprefix("ema_val_").removeprefix("val_")
    return metric, {"raw": {metric: last.get(f"val_{metric}")}, "ema": {metric: last.get(f"ema_val_{metric}")}}


def _single_set(state: Dict[str, torch.Tensor], info: Dict[str, Any], weights: str,
                source: str) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """A file with one set of weights (a state dict or an export); ``info['weights']`` may say which."""
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHT_CHOICES)}")
    held = info.get("weights") if info.get("weights") in ("raw", "ema") else "raw"
    if weights not in ("best", held):
        raise CheckpointError(f"{source} holds one set of weights ({held}), not {weights} ones; "
                              f"use --weights best or {held}")
    return state, held, "the only weights in the file"


def read_model_file(path: PathLike, weights: str = "best") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model state dict and the description (``model_name``, ``model_kwargs``, ``class_names``,
    ...) stored in a ``.safetensors`` export or a ``.pth`` checkpoint.

    ``weights`` picks the set of a checkpoint holding raw and EMA weights (:func:`select_weights`);
    the description then has ``weights`` (``'raw'`` or ``'ema'``) and ``weights_reason``.
    """
    if str(path).endswith(".safetensors"):
        state, info = files.load_safetensors(path)
        state, which, why = _single_set(state, info, weights, str(path))
        return state, dict(info, weights=which, weights_reason=why)
    obj = files.load_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict or a checkpoint dict")
    info = {k: v for k, v in obj.items() if k not in ("model", "model_ema", "state_dict", "optimizer",
                                                       "scheduler", "scaler", "rng")}
    if isinstance(obj.get("model"), dict):
        state, which, why = select_weights(obj, weights, str(path))
    elif isinstance(obj.get("state_dict"), dict):
        state, which, why = _single_set(obj["state_dict"], info, weights, str(path))
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, which, why = _single_set(obj, {}, weights, str(path))
        info = {}
    else:
        raise CheckpointError(f"{path} has no model weights (expected a 'model' or 'state_dict' entry)")
    return state, dict(info, weights=which, weights_reason=why)


def describe_weights(info: Mapping[str, Any]) -> str:
    """The line commands print about the weights they loaded, e.g. ``weights: ema (validated better: ...)``."""
    return f"weights: {info.get('weights', 'raw')} ({info.get('weights_reason', 'the only weights in the file')})"


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                 source: str = "state dict") -> LoadReport:
    """Copy ``state_dict`` into ``model``.

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`WeightsMismatchError` listing all of them, and nothing is loaded. With ``strict=False``
    every key that fits is loaded and the report says what was left out.
    """
    own = model.state_dict()
    from timm.models import clean_state_dict

    state_dict = clean_state_dict(dict(state_dict))
    report = LoadReport(
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        mismatched=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                    if k in own and tuple(v.shape) != tuple(own[k].shape)])
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"{source} does not fit {type(model).__name__}:\n{report.describe()}\n"
            f"(pass strict=False, or --non-strict to pale eval / pale predict, to load the keys that fit)", report)
    bad = {k for k, _, _ in report.mismatched}
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    model.load_state_dict(fitting, strict=False)
    return report


def save_checkpoint(path: PathLike, model: nn.Module, model_name: str, model_kwargs: Mapping[str, Any],
                    class_names: Optional[List[str]] = None, before_replace: Optional[Callable[[], None]] = None,
                    **extra: Any) -> None:
    """Write a ``.pth`` checkpoint (atomically; ``before_replace``: see :func:`atomic_path`) that
    :func:`create_model_from_file` can rebuild."""
    obj = dict(model=model.state_dict(), model_name=model_name, model_kwargs=dict(model_kwargs),
               class_names=list(class_names) if class_names is not None else None, **extra)
    files.save_torch(obj, path, before_replace)


def create_model_from_file(path: PathLike, strict: bool = True, weights: str = "best",
                           **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the Pale classifier a checkpoint or export describes and load its weights
    (``weights``: see :func:`read_model_file`).

    Returns the model (in eval mode) and the file's description (``class_names``, ``weights`` etc.).
    A checkpoint of another task (``pale seg train``, ``pale det train``) is refused by name.
    """
    import timm  # importing it registers the Pale models (pale/__init__.py)

    state_dict, info = read_model_file(path, weights)
    task = info.get("task")
    if task not in (None, "classification"):
        group, loader = (("seg", "pale.dense.seg_task.load_segmenter") if task == "segmentation" else
                         ("det", "pale.dense.det_task.load_detector"))
        raise CheckpointError(f"{path} is a {task} checkpoint ({info.get('model_name')}), which the classifier "
                              f"commands (eval, predict, export, visualize) do not take: use `pale {group} eval` or "
                              f"`pale {group} predict` with it (in Python: {loader})")
    name = info.get("model_name")
    if not name:
        raise CheckpointError(f"{path} does not say which model it holds (no 'model_name'); "
                              f"build the model yourself and use pale.checkpoint.load_weights")
    if not timm.is_model(name):
        raise CheckpointError(f"{path} holds a {name!r}, which is not a model timm knows")
    kwargs = dict(info.get("model_kwargs") or {}, **overrides)
    with settings_error(f"{path}: cannot build {name} from its stored settings"):
        model = timm.create_model(name, **kwargs)
    report = load_weights(model, state_dict, strict=strict, source=str(path))
    if not report.ok:
        warnings.warn(f"{path}: loaded the weights that fit; left out:\n{report.describe()}", stacklevel=2)
    return model.eval(), info
