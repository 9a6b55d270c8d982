"""Recipe -> task -> trainer: what ``pale train`` (and the demo) call."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Type, Union

from ..errors import CheckpointError, InputError, MissingFileError
from ..files import load_torch
from .classification import ClassificationTask
from .engine import Task, Trainer, load_latest_checkpoint
from .recipe import ENGINE_DEFAULTS, RecipeError, apply_overrides, load_yaml, merge

__all__ = ["TASKS", "register_task", "task_defaults", "resolve_config", "train"]

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


def train(recipe: Union[str, os.PathLike, Dict[str, Any], None], overrides: Optional[Iterable[str]] = None,
          out_dir: Optional[os.PathLike] = None, resume: Optional[os.PathLike] = None,
          dry_run: bool = False, task: Optional[str] = None) -> Dict[str, Any]:
    """Train from a recipe, or continue a run. Returns the run summary.

    ``resume`` is a checkpoint to continue (its stored recipe is used, then the overrides), a run folder
    (its newest checkpoint that loads), or ``"auto"`` (as the recipe key ``train.resume=auto``): continue the
    run in ``out_dir`` if it holds one of the same recipe, else start it -- the form for job scripts that
    are started again after a crash or a requeue. ``task`` is the task of a recipe without a ``task`` key.
    """
    if resume is not None and str(resume) != "auto":
        resume = Path(resume)
        if resume.is_dir():
            found = load_latest_checkpoint(resume)
            if found is None:
                raise MissingFileError(f"no checkpoint to resume in {resume} (no last.pth)")
            resume, ckpt = found
        else:
            ckpt = load_torch(resume)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
            command = TASKS[task].train_command if task in TASKS else "pale train"
            raise CheckpointError(f"{resume} is not a `{command}` checkpoint (no stored recipe)")
        cfg = resolve_config(ckpt["config"], overrides, task)
        del ckpt
        out_dir = Path(out_dir) if out_dir is not None else resume.parent
    else:
        cfg = resolve_config(recipe, overrides, task)
        if out_dir is None:
            raise InputError("no output folder given (--output)")
    task = TASKS[cfg["task"]](cfg)
    return Trainer(task, cfg, Path(out_dir), resume=resume, dry_run=dry_run).fit()
