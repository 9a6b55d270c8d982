"""Recipe -> task -> trainer: what ``pale train`` (and the demo) call."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Type, Union

from ..errors import InputError
from .checkpoints import open_checkpoint
from .classification import ClassificationTask
from .recipe import ENGINE_DEFAULTS, RecipeError, apply_overrides, load_yaml, merge
from .task import Task
from .trainer import Trainer

__all__ = ["TASKS", "register_task", "task_defaults", "resolve_config", "make_trainer", "train"]

#: recipe ``task:`` value -> Task class
TASKS: Dict[str, Type[Task]] = {"classification": ClassificationTask}


def register_task(name: str, cls: Type[Task]) -> None:
    TASKS[name] = cls


def task_defaults(task: str) -> Dict[str, Any]:
    if task not in TASKS:
        raise RecipeError(f"unknown task {task!r} in recipe key 'task'; known: {', '.join(sorted(TASKS))}")
    return merge(ENGINE_DEFAULTS, {"task": task}) | {k: v for k, v in TASKS[task].defaults.items()}


def resolve_config(recipe: Union[str, os.PathLike, Dict[str, Any], None],
                   overrides: Optional[Iterable[str]] = None, task: Optional[str] = None) -> Dict[str, Any]:
    """The full, checked configuration: defaults of the recipe's task (its ``task`` key, else
    ``task``, else classification), the recipe, the overrides."""
    data = load_yaml(recipe) if isinstance(recipe, (str, os.PathLike)) else dict(recipe or {})
    task = data.get("task", task or ENGINE_DEFAULTS["task"])
    for text in overrides or ():
        if text.split("=", 1)[0].strip() == "task":
            task = text.split("=", 1)[1].strip()
    defaults = task_defaults(task)
    return apply_overrides(merge(defaults, data), overrides, defaults)


def make_trainer(recipe: Union[str, os.PathLike, Dict[str, Any], None], overrides: Optional[Iterable[str]] = None,
                 out_dir: Optional[os.PathLike] = None, resume: Optional[os.PathLike] = None,
                 dry_run: bool = False, task: Optional[str] = None) -> Trainer:
    """The :class:`Trainer` that :func:`train` runs (same arguments)."""
    checkpoint = None
    if resume is not None and str(resume) != "auto":
        command = TASKS[task].train_command if task in TASKS else "pale train"
        resume, checkpoint = open_checkpoint(resume, command)   # read once: the recipe here, the state in Trainer
        cfg = resolve_config(checkpoint["config"], overrides, task)
        out_dir = Path(out_dir) if out_dir is not None else resume.parent
    else:
        cfg = resolve_config(recipe, overrides, task)
        if out_dir is None:
            raise InputError("no output folder given (--output)")
    return Trainer(TASKS[cfg["task"]](cfg), cfg, Path(out_dir), resume=resume, dry_run=dry_run, checkpoint=checkpoint)


def train(recipe: Union[str, os.PathLike, Dict[str, Any], None], overrides: Optional[Iterable[str]] = None,
          out_dir: Optional[os.PathLike] = None, resume: Optional[os.PathLike] = None,
          dry_run: bool = False, task: Optional[str] = None) -> Dict[str, Any]:
    """Train from a recipe, or continue a run. Returns the run summary.

    ``resume`` is a checkpoint to continue (its stored recipe is used, then the overrides), a run folder
    (its newest checkpoint that loads), or ``"auto"`` (as the recipe key ``train.resume=auto``): continue the
    run in ``out_dir`` if it holds one of the same recipe, else start it -- the form for job scripts that
    are started again after a crash or a requeue. ``task`` is the task of a recipe without a ``task`` key.
    """
    return make_trainer(recipe, overrides, out_dir, resume, dry_run, task).fit()
