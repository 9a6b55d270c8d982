"""What a problem supplies to the :class:`~pale.train.trainer.Trainer`: the :class:`Task` interface.

Example (a segmentation task on the engine)::

    from pale.train import Task, Trainer, resolve_recipe, ENGINE_DEFAULTS, merge

    class SegTask(Task):
        defaults = {"model": {"name": "pale_tiny"}, "data": {"root": None}}
        best_metric, best_mode, curve_metrics = "miou", "max", ("miou", "macc")

        def build_model(self): ...                     # an nn.Module
        def model_info(self): return dict(model_name=..., model_kwargs=..., class_names=...)
        def train_dataset(self): ...                   # map-style Dataset
        def val_dataset(self): ...                     # or None
        def collate_fn(self, train): ...               # optional; default_collate otherwise
        def training_loss(self, model, batch, rt):     # called under autocast
            images, masks = rt.to_device(batch[0]), batch[1].to(rt.device)
            return criterion(model(images), masks), len(images)
        def evaluate(self, model, batches, rt):        # model in eval mode, under no_grad/autocast
            ...                                        # reduce counts with rt.all_reduce_sum
            return {"miou": ..., "macc": ..., "loss": ...}

    cfg = resolve_recipe("my_seg.yaml", ["epochs=10"], merge(ENGINE_DEFAULTS, SegTask.defaults))
    summary = Trainer(SegTask(cfg), cfg, "runs/seg").fit()          # or resume="runs/seg/last.pth" / "auto"
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .recipe import ENGINE_RULES, RecipeRule, check_optimizer_name, check_rules
from .runtime import Runtime

__all__ = ["Task"]

Config = Dict[str, Any]


class Task:
    """What a problem supplies to the :class:`Trainer` (see the module docstring for an example)."""

    #: the task's recipe sections (merged with ENGINE_DEFAULTS; unknown keys are errors)
    defaults: Config = {}
    #: key of :meth:`evaluate`'s result that picks ``best.pth``, and whether higher is better
    best_metric: str = "top1"
    best_mode: str = "max"
    #: evaluation metrics drawn in ``curves.png`` (losses are always drawn)
    curve_metrics: Sequence[str] = ("top1",)
    #: the command that trains this task, for the messages that tell how to continue a run
    train_command: str = "pale train"
    #: extra keyword arguments for DistributedDataParallel (e.g. find_unused_parameters=True)
    ddp_kwargs: Mapping[str, Any] = {}
    #: ranges of the task's own settings (:func:`pale.train.recipe.check_rules`), checked with the engine's
    rules: Sequence[RecipeRule] = ()

    def __init__(self, cfg: Config):
        check_rules(cfg, (*ENGINE_RULES, *self.rules))
        check_optimizer_name(cfg["optim"]["opt"])
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        """The model, on the CPU (the Trainer moves it; ``self.runtime`` is already set)."""
        raise NotImplementedError

    def model_info(self) -> Dict[str, Any]:
        """``model_name``, ``model_kwargs``, ``class_names`` (+ any metadata) stored with the weights."""
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def val_dataset(self) -> Optional[Dataset]:
        return None

    def collate_fn(self, train: bool) -> Optional[Callable[[List[Any]], Any]]:
        return None

    def check_batch(self, per_process: int, rt: Runtime) -> None:
        """Refuse (:class:`RecipeError`) a training batch of ``per_process`` samples per forward that the
        model cannot train on; any size is fine by default."""

    def training_loss(self, model: nn.Module, batch: Any, rt: Runtime) -> Tuple[torch.Tensor, int]:
        """The loss of one batch (called under autocast) and the number of samples in it."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[Any], rt: Runtime) -> Dict[str, float]:
        """Metrics over all of ``batches`` (this rank's share), reduced over ranks."""
        raise NotImplementedError

