"""Running dense tasks on :class:`pale.train.Trainer` (the classification engine: DDP, AMP,
checkpoints, exact resume, EMA, metrics files).

Dense recipes count schedules in iterations (mmseg: 1500 warm-up iterations; mmdet: 500 warm-up
iterations and steps at epochs 8 and 11) while the engine's ``sched`` section counts whole epochs
and has no milestones. :class:`DenseTrainer` adds two ``sched`` keys and rebuilds timm's scheduler
with them after the engine's setup (timm schedulers are functions of the update count, so a resumed
run gets the same learning rates):

* ``sched.warmup_updates`` -- warm-up length in optimizer updates (overrides ``warmup_epochs``);
* ``sched.decay_milestones`` -- epochs at which ``multistep`` multiplies the lr by ``decay_rate``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Type, Union

from .. import io as pio
from ..train import ENGINE_DEFAULTS, Task, Trainer, merge, resolve_recipe

__all__ = ["DenseTrainer", "dense_defaults", "load_dense_model", "resolve_dense_config", "run_training"]


def load_dense_model(path: Union[str, os.PathLike], task: str, command: str, build: Any,
                     device: str = "cpu") -> Any:
    """``(model, info)`` of a checkpoint written by ``command`` for ``task`` (EMA weights when present).

    ``build(model_kwargs)`` makes the empty model; a checkpoint of another task is refused by name.
    """
    state, info = pio.read_model_file(path)
    if info.get("task") != task:
        raise pio.CheckpointError(f"{path} is not a {task} checkpoint of `{command}` "
                                  f"(task: {info.get('task', 'classification')!r})")
    model = build(info["model_kwargs"])
    pio.load_weights(model, state, source=str(path))
    return model.to(device).eval(), info


def dense_defaults(engine_overrides: Mapping[str, Any], sections: Mapping[str, Any]) -> Dict[str, Any]:
    """The engine's defaults with this task's recipe values, the two extra ``sched`` keys, and the
    task's own sections."""
    base = copy.deepcopy(ENGINE_DEFAULTS)
    base["sched"].update(warmup_updates=None, decay_milestones=[])
    return {**merge(base, engine_overrides), **copy.deepcopy(dict(sections))}


class DenseTrainer(Trainer):
    """:class:`pale.train.Trainer` with iteration-counted warm-up and multistep milestones."""

    def _build(self) -> None:
        super()._build()
        from timm.scheduler import create_scheduler_v2

        scfg = self.cfg["sched"]
        if scfg["sched"] in (None, "none"):
            return
        warmup = scfg["warmup_epochs"]
        if scfg.get("warmup_updates") is not None:
            warmup = float(scfg["warmup_updates"]) / self.updates_per_epoch
        self.scheduler = create_scheduler_v2(
            self.optimizer, sched=scfg["sched"], num_epochs=int(self.cfg["epochs"]), warmup_epochs=warmup,
            warmup_lr=float(scfg["warmup_lr"]), min_lr=float(scfg["min_lr"]), cooldown_epochs=scfg["cooldown_epochs"],
            decay_rate=float(scfg["decay_rate"]), decay_milestones=list(scfg.get("decay_milestones") or [90]),
            step_on_epochs=bool(scfg["step_on_epochs"]), updates_per_epoch=self.updates_per_epoch)[0]
        # the new scheduler reset the lr to its warm-up start: set the lr of the next update
        self.scheduler.step_update(num_updates=self.num_updates)


def resolve_dense_config(task_cls: Type[Task], recipe: Union[str, os.PathLike, Mapping[str, Any], None],
                         overrides: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    return resolve_recipe(recipe if recipe is not None else {}, overrides, task_cls.defaults)


def run_training(task_cls: Type[Task], recipe: Union[str, os.PathLike, Mapping[str, Any], None],
                 overrides: Optional[Iterable[str]], out_dir: Optional[os.PathLike],
                 resume: Optional[os.PathLike] = None, dry_run: bool = False) -> Dict[str, Any]:
    """Train ``task_cls`` from a recipe (or continue ``resume`` with its stored recipe + overrides)."""
    if resume is not None:
        ckpt = pio.load_torch(resume)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
            raise pio.CheckpointError(f"{resume} is not a training checkpoint (no stored recipe)")
        cfg = resolve_dense_config(task_cls, ckpt["config"], overrides)
        del ckpt
        out_dir = Path(out_dir) if out_dir is not None else Path(resume).parent
    else:
        cfg = resolve_dense_config(task_cls, recipe, overrides)
        if out_dir is None:
            raise ValueError("no output folder given (--output)")
    return DenseTrainer(task_cls(cfg), cfg, Path(out_dir), resume=resume, dry_run=dry_run).fit()
