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

from ..checkpoint import load_weights, read_model_file
from ..device import resolve_device
from ..errors import CheckpointError
from ..train import ENGINE_DEFAULTS, Task, merge, register_task, resolve_config, train
from ..train.recipe import RecipeError

__all__ = ["dense_defaults", "fill_variant_defaults", "load_dense_model", "resolve_dense_config", "run_training"]


def load_dense_model(path: Union[str, os.PathLike], task: str, command: str, build: Any,
                     device: str = "auto", weights: str = "best") -> Any:
    """``(model, info)`` of a checkpoint written by ``command`` for ``task``; ``weights`` as in
    :func:`pale.checkpoint.read_model_file`, ``device`` as in :func:`pale.device.resolve_device`.

    ``build(model_kwargs)`` makes the empty model; a checkpoint of another task is refused by name.
    """
    state, info = read_model_file(path, weights)
    if info.get("task") != task:
        raise CheckpointError(f"{path} is not a {task} checkpoint of `{command}` "
                                  f"(task: {info.get('task', 'classification')!r})")
    model = build(info["model_kwargs"])
    load_weights(model, state, source=str(path))
    return model.to(resolve_device(device)).eval(), info


def dense_defaults(engine_overrides: Mapping[str, Any], sections: Mapping[str, Any]) -> Dict[str, Any]:
    """The engine's defaults with this task's recipe values, and the task's own sections."""
    return {**merge(copy.deepcopy(ENGINE_DEFAULTS), engine_overrides), **copy.deepcopy(dict(sections))}


def fill_variant_defaults(cfg: Dict[str, Any], per_variant: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Set each ``section.key`` of ``per_variant[cfg['model']['name']]`` that is null in ``cfg``, in place.

    Dense recipes leave the values the paper gives per backbone (stochastic depth; COCO's weight
    decay) null by default, so that choosing ``--backbone pale_base`` also chooses Pale-B's values;
    a value set in a recipe or override is kept.
    """
    name = cfg["model"]["name"]
    keys = sorted({key for values in per_variant.values() for key in values})
    values = per_variant.get(name, {})
    for dotted in keys:
        section, key = dotted.split(".")
        if cfg[section][key] is None:
            if dotted not in values:
                raise RecipeError(f"{dotted} is not set and backbone {name!r} has no paper default for it "
                                  f"(known: {', '.join(sorted(per_variant))}); set it with --set {dotted}=VALUE")
            cfg[section][key] = values[dotted]
    return cfg


def resolve_dense_config(task_cls: Type[Task], recipe: Union[str, os.PathLike, Mapping[str, Any], None],
                         overrides: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    register_task(task_cls.defaults["task"], task_cls)
    cfg = resolve_config(recipe if recipe is not None else {}, overrides, task=task_cls.defaults["task"])
    return fill_variant_defaults(cfg, getattr(task_cls, "variant_defaults", {}))


def run_training(task_cls: Type[Task], recipe: Union[str, os.PathLike, Mapping[str, Any], None],
                 overrides: Optional[Iterable[str]], out_dir: Optional[os.PathLike],
                 resume: Optional[os.PathLike] = None, dry_run: bool = False) -> Dict[str, Any]:
    """:func:`pale.train.train` for ``task_cls`` (its recipe defaults when ``recipe`` is None)."""
    register_task(task_cls.defaults["task"], task_cls)
    return train(recipe if recipe is not None else {}, overrides, out_dir, resume=resume, dry_run=dry_run,
                 task=task_cls.defaults["task"])
