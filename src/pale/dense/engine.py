"""Running dense tasks on :class:`pale.train.Trainer` (the classification engine: DDP, AMP,
checkpoints, exact resume, EMA, metrics files), and loading their checkpoints.

Dense recipes count schedules in iterations (mmseg: 1500 warm-up iterations; mmdet: 500 warm-up
iterations and steps at epochs 8 and 11): they set the engine's ``sched.warmup_updates`` and
``sched.decay_milestones``.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Type, Union

from .. import io as pio
from ..train import ENGINE_DEFAULTS, Task, merge, register_task, resolve_config, train

__all__ = ["dense_defaults", "load_dense_model", "resolve_dense_config", "run_training"]


def load_dense_model(path: Union[str, os.PathLike], task: str, command: str, build: Any,
                     device: str = "auto", weights: str = "best") -> Any:
    """``(model, info)`` of a checkpoint written by ``command`` for ``task``; ``weights`` as in
    :func:`pale.io.read_model_file`, ``device`` as in :func:`pale.io.resolve_device`.

    ``build(model_kwargs)`` makes the empty model; a checkpoint of another task is refused by name.
    """
    state, info = pio.read_model_file(path, weights)
    if info.get("task") != task:
        raise pio.CheckpointError(f"{path} is not a {task} checkpoint of `{command}` "
                                  f"(task: {info.get('task', 'classification')!r})")
    model = build(info["model_kwargs"])
    pio.load_weights(model, state, source=str(path))
    return model.to(pio.resolve_device(device)).eval(), info


def dense_defaults(engine_overrides: Mapping[str, Any], sections: Mapping[str, Any]) -> Dict[str, Any]:
    """The engine's defaults with this task's recipe values, and the task's own sections."""
    return {**merge(copy.deepcopy(ENGINE_DEFAULTS), engine_overrides), **copy.deepcopy(dict(sections))}


def resolve_dense_config(task_cls: Type[Task], recipe: Union[str, os.PathLike, Mapping[str, Any], None],
                         overrides: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    register_task(task_cls.defaults["task"], task_cls)
    return resolve_config(recipe if recipe is not None else {}, overrides, task=task_cls.defaults["task"])


def run_training(task_cls: Type[Task], recipe: Union[str, os.PathLike, Mapping[str, Any], None],
                 overrides: Optional[Iterable[str]], out_dir: Optional[os.PathLike],
                 resume: Optional[os.PathLike] = None, dry_run: bool = False) -> Dict[str, Any]:
    """:func:`pale.train.train` for ``task_cls`` (its recipe defaults when ``recipe`` is None)."""
    register_task(task_cls.defaults["task"], task_cls)
    return train(recipe if recipe is not None else {}, overrides, out_dir, resume=resume, dry_run=dry_run,
                 task=task_cls.defaults["task"])
