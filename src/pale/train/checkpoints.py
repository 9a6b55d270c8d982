"""Training checkpoints: what one holds, writing it from a :class:`~pale.train.trainer.Trainer` and
restoring it into one, and finding the checkpoint a run continues from (:mod:`pale.train.run_folder`
writes the files).

Contents (:func:`pale.checkpoint.save_checkpoint`): ``model``, ``model_ema``, ``model_name``, ``model_kwargs``,
``class_names`` (and any other entries of ``task.model_info()``), ``optimizer``, ``scheduler``, ``scaler``,
``epoch`` (completed epochs), ``step`` (updates done in the current epoch, non-zero only for an interrupted
epoch), ``num_updates``, ``epoch_state`` (running sums of the interrupted epoch), ``rng`` (every rank's
:func:`pale.train.runtime.rng_state`), ``model_buffers`` and ``ema_buffers`` (every rank's BatchNorm
statistics of the model and of its EMA, under torchrun), ``history``, ``best`` (epoch, value, metric and ``weights``: "raw" or "ema"), ``skipped_images``,
``config`` (the resolved recipe), ``runtime`` (run-time choices that change the numbers but are not in the
recipe, :func:`runtime_record`), ``best_metric`` (the task's metric name) and, once validated,
``val_metrics`` = ``{"raw": {metric: value}, "ema": {...}}`` of the latest validation (no ``"ema"`` without
EMA). The ``.safetensors`` exports hold whichever of ``model`` and ``model_ema`` validated better (metadata
``weights``). The ``last*.pth`` kept are ``last.pth`` (newest), ``last-1.pth``, ... Checkpoints of older
versions may hold ``attention_kernels`` (measured kernel choices): it is ignored.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn
from timm.utils import random_seed, unwrap_model

from ..checkpoint import load_weights
from ..errors import CheckpointError, InputError, MissingFileError
from ..files import load_torch
from .recipe import is_number
from .runtime import Runtime, log_main, rng_state, set_rng_state

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["RESTART_KEYS", "checkpoint_files", "load_training_checkpoint", "load_latest_checkpoint", "open_checkpoint",
           "find_resume", "EpochSums", "config_differences", "val_metrics", "better_weights", "runtime_record", "save_checkpoint",
           "restore_checkpoint", "restore_rank_buffers"]

#: recipe keys that may change between the starts of one run (where the data is staged, how many loader
#: processes, logging, checkpoint cadence); any other difference makes ``resume="auto"`` refuse the folder
RESTART_KEYS = frozenset({"data.root", "train.device", "train.workers", "train.progress", "train.tensorboard",
                          "train.eval_batch_size", "train.resume", "train.checkpoint_every_updates",
                          "train.keep_checkpoints"})


# ---- finding and reading checkpoints -----------------------------------------------------------

def checkpoint_files(folder: os.PathLike) -> List[Path]:
    """The run's kept training checkpoints, newest first: ``last.pth``, ``last-1.pth``, ``last-2.pth``, ..."""
    folder = Path(folder)
    older = sorted((int(m.group(1)), p) for p in folder.glob("last-*.pth")
                   if (m := re.fullmatch(r"last-(\d+)\.pth", p.name)))
    return [p for p in [folder / "last.pth"] if p.is_file()] + [p for _, p in older]


def load_training_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """A checkpoint that ``pale train`` wrote, refused by name if it is a file of weights only."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "epoch" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of `pale train` (no optimizer/epoch "
                                  f"state); to start from its weights use model.pretrained instead")
    return ckpt


def load_latest_checkpoint(folder: os.PathLike) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, checkpoint)`` of the newest kept checkpoint of ``folder`` that loads, or None if it has none.

    A checkpoint that does not load (truncated by a crash of the file system, deleted meanwhile) is
    skipped for the previous one, saying so; if none loads, :class:`pale.errors.CheckpointError` lists why.
    """
    files = checkpoint_files(folder)
    errors = []
    for path in files:
        try:
            ckpt = load_training_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as err:
            errors.append(str(err))
            log_main(f"warning: cannot resume from {path}: {err}")
            continue
        if errors:
            log_main(f"warning: falling back to the previous checkpoint {path} (at epoch {int(ckpt['epoch']) + 1}, "
                     f"update {ckpt.get('step', 0)}); the updates after it are done again")
        return path, ckpt
    if files:
        raise CheckpointError(f"none of the checkpoints in {folder} loads ({'; '.join(errors)}); refusing to "
                                  f"start the run over: move the folder away to start afresh")
    return None


def open_checkpoint(resume: os.PathLike, command: str = "pale train") -> Tuple[Path, Dict[str, Any]]:
    """``(path, checkpoint)`` to continue: ``resume`` itself, or a run folder's newest checkpoint that loads."""
    resume = Path(resume)
    if resume.is_dir():
        found = load_latest_checkpoint(resume)
        if found is None:
            raise MissingFileError(f"no checkpoint to resume in {resume} (no last.pth)")
        resume, ckpt = found
    else:
        ckpt = load_training_checkpoint(resume)
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{resume} is not a `{command}` checkpoint (no stored recipe)")
    return resume, ckpt


def config_differences(run: Mapping[str, Any], now: Mapping[str, Any], ignore: Iterable[str] = RESTART_KEYS,
                       prefix: str = "") -> List[str]:
    """``"key: run value vs this value"`` for each recipe key set differently in both; keys only one side has
    (added or removed by another version of pale) and ``ignore``d keys do not count."""
    out: List[str] = []
    for key in run:
        dotted = prefix + str(key)
        if key not in now or dotted in ignore:
            continue
        a, b = run[key], now[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, ignore, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} (run) vs {b!r} (now)")
    return out


# ---- which weights validated better --------------------------------------------------------------

def val_metrics(history: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Dict[str, float]]]:
    """``{"raw": {...}, "ema": {...}}`` of the most recent validation in ``history`` (no ``ema`` without
    EMA), or None before the first validation."""
    for record in reversed(history):
        raw = {k[4:]: float(v) for k, v in record.items() if k.startswith("val_") and is_number(v)}
        if raw:
            out = {"raw": raw}
            ema = {k[8:]: float(v) for k, v in record.items() if k.startswith("ema_val_") and is_number(v)}
            if ema:
                out["ema"] = ema
            return out
    return None


def better_weights(history: Sequence[Mapping[str, Any]], metric: str, mode: str) -> str:
    """``"ema"`` or ``"raw"``: the weights whose latest validation scored better on ``metric`` (``mode``
    "max": higher is better). The raw weights on a tie, without validation of both, and without EMA:
    the rule of :func:`pale.checkpoint.select_weights`, so that an export and ``--weights best`` on its
    checkpoint agree."""
    latest = val_metrics(history)
    if not latest or "ema" not in latest:
        return "raw"
    raw, ema = latest["raw"].get(metric), latest["ema"].get(metric)
    if raw is None or ema is None:
        return "raw"
    return "ema" if (ema > raw if mode == "max" else ema < raw) else "raw"




@dataclass
class EpochSums:
    """Running sums of one training epoch (checkpointed as ``epoch_state`` so a resumed epoch reports the
    whole epoch). Not timm's ``AverageMeter``: that keeps ``val * n`` products and no state to save and restore."""

    loss_sum: float = 0.0
    loss_count: int = 0
    images: int = 0
    time: float = 0.0
    tick: float = 0.0  # wall clock of the previous update

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "EpochSums":
        return cls(state.get("loss_sum", 0.0), state.get("loss_count", 0), state.get("images", 0),
                   state.get("time", 0.0))

    def state(self) -> Dict[str, Any]:
        return dict(loss_sum=self.loss_sum, loss_count=self.loss_count, images=self.images, time=self.time)

    def add(self, loss_sum: float, count: int) -> None:
        self.loss_sum += loss_sum
        self.loss_count += count
        self.images += count
        now = time.time()
        self.time += now - self.tick
        self.tick = now

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)


# ---- a trainer's state in and out ------------------------------------------------------------------

def find_resume(out_dir: Path, cfg: Mapping[str, Any], resume: Any, checkpoint: Optional[Dict[str, Any]],
                dry_run: bool, command: str) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, checkpoint)`` that a run in ``out_dir`` continues, or None to start it.

    ``resume``: a checkpoint or run folder (``checkpoint``: its content, if read already), or ``"auto"``
    (also ``train.resume``): the folder's newest checkpoint that loads if the folder holds a run of the same
    recipe (else refused, saying what differs). Without either, a folder that holds a run is refused."""
    if str(resume) == "auto" or (resume is None and cfg["train"]["resume"] == "auto"):
        found = load_latest_checkpoint(out_dir)
        if found is not None:
            path, ckpt = found
            diffs = config_differences(ckpt.get("config") or {}, cfg)
            if diffs:
                shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
                raise InputError(f"{out_dir} holds another run ({path.name}: model {ckpt.get('model_name')}), whose "
                                 f"recipe differs: {shown}. Choose another output folder, or continue that run with "
                                 f"its own recipe: {command} --resume {path}")
        return found
    if resume is not None:
        return (Path(resume), checkpoint) if checkpoint is not None else open_checkpoint(resume, command)
    if not dry_run and checkpoint_files(out_dir):
        raise InputError(f"output folder {out_dir} already holds a run ({checkpoint_files(out_dir)[0].name}): pass "
                         f"--resume to continue it (--resume auto in a job script that must also start it), or "
                         f"choose another output folder")
    return None


def runtime_record(rt: Runtime) -> Dict[str, Any]:
    """How a run computes beyond its recipe, stored as ``runtime``; a resume with different values
    continues, but not bit-exactly."""
    return dict(device=rt.device.type, channels_last=rt.channels_last,
                amp=str(rt.amp_dtype).removeprefix("torch.") if rt.amp_dtype is not None else "none")


def save_checkpoint(trainer: "Trainer", name: str, epoch: int, step: int,
                    epoch_state: Optional[Mapping[str, Any]] = None, rotate: bool = False) -> Path:
    """``trainer``'s checkpoint after ``epoch`` complete epochs and ``step`` updates of the next, as
    ``name`` in its run folder (every rank calls this; rank 0 writes)."""
    t, rt = trainer, trainer.rt
    rngs = rt.all_gather_object(rng_state())
    skipped = t.total_skipped()
    model_buffers = ema_buffers = None
    if rt.distributed:
        # the BatchNorm statistics of the model and its EMA follow each rank's own batches (DDP does not
        # broadcast buffers) until the epoch's end averages them
        model_buffers = rt.all_gather_object(_float_buffers(unwrap_model(t.model)))
        if t.ema is not None:
            ema_buffers = rt.all_gather_object(_float_buffers(t.ema.module))
    if not t.folder.active:
        return t.folder.path / name
    val = val_metrics(t.history)
    return t.folder.save_checkpoint(
        name, unwrap_model(t.model), t.task.model_info(), rotate=rotate,
        model_ema=t.ema.module.state_dict() if t.ema is not None else None, ema_buffers=ema_buffers,
        model_buffers=model_buffers,
        optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict() if t.scheduler is not None else None,
        scaler=t.scaler.state_dict() if t.scaler is not None else None,
        epoch=epoch, step=step, num_updates=t.num_updates, epoch_state=dict(epoch_state or {}), rng=rngs,
        history=t.history, best=t.best, skipped_images=skipped, config=t.cfg, runtime=runtime_record(rt),
        best_metric=t.task.best_metric, **({"val_metrics": val} if val is not None else {}))


def _float_buffers(model: nn.Module) -> Dict[str, Any]:
    return {k: v.detach().cpu() for k, v in model.named_buffers() if v.is_floating_point()}


def _copy_buffers(model: nn.Module, saved: Mapping[str, Any]) -> None:
    buffers = dict(model.named_buffers())
    for k, v in saved.items():
        buffers[k].copy_(v)


def restore_rank_buffers(trainer: "Trainer", ckpt: Mapping[str, Any]) -> None:
    """This rank's own BatchNorm statistics of the model from ``ckpt``, once the model is wrapped in
    DDP (whose wrapping copies rank 0's to every rank); nothing on one process, or when the checkpoint
    was written by another number of processes (then the continuation is not exact anyway)."""
    rt, saved = trainer.rt, ckpt.get("model_buffers")
    if rt.distributed and saved and len(saved) == rt.world_size:
        _copy_buffers(unwrap_model(trainer.model), saved[rt.rank])


def restore_checkpoint(trainer: "Trainer", path: Path, ckpt: Mapping[str, Any]) -> None:
    """Continue ``trainer`` (built, not yet wrapped in DDP) from ``ckpt``, read from ``path``: weights,
    optimizer, schedule, counters, history, and this rank's random states."""
    t, rt, cfg = trainer, trainer.rt, trainer.cfg
    load_weights(t.model, ckpt["model"], source=str(path))
    if t.ema is not None:
        if ckpt.get("model_ema") is None:
            raise CheckpointError(f"{path} has no EMA weights but ema.enabled is true")
        load_weights(t.ema.module, ckpt["model_ema"], source=f"{path} (EMA)")
    t.optimizer.load_state_dict(ckpt["optimizer"])
    old_cfg = ckpt.get("config") or {}
    same_schedule = (old_cfg.get("epochs"), old_cfg.get("sched")) == (cfg["epochs"], cfg["sched"])
    if t.scheduler is not None and ckpt.get("scheduler") and same_schedule:
        t.scheduler.load_state_dict(ckpt["scheduler"])
    if t.scaler is not None and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    t.start_epoch, t.start_step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
    t.last_saved = (t.start_epoch, t.start_step)
    t.num_updates = int(ckpt.get("num_updates", 0))
    t.epoch_state = dict(ckpt.get("epoch_state") or {})
    if t.scheduler is not None:  # the lr of the next update (on the new schedule if epochs changed)
        t.scheduler.step_update(num_updates=t.num_updates)
    t.history = [h for h in ckpt.get("history", []) if h["epoch"] <= t.start_epoch]
    t.best = dict(ckpt.get("best") or {})
    t.skipped_images = int(ckpt.get("skipped_images", 0)) if rt.is_main else 0  # a total over ranks
    rngs = ckpt.get("rng") or []
    if len(rngs) == rt.world_size:
        set_rng_state(rngs[rt.rank])
        if t.ema is not None and ckpt.get("ema_buffers"):
            _copy_buffers(t.ema.module, ckpt["ema_buffers"][rt.rank])
    else:
        t.log(f"note: {path} was written by {len(rngs)} processes, this run has {rt.world_size}; random streams "
              f"restart from the seed, so the continuation is not bit-exact")
        random_seed(int(cfg["seed"]) + 1000 * t.start_epoch, rt.rank)
    old_runtime, runtime = ckpt.get("runtime") or {}, runtime_record(rt)
    changed = [f"{k} {old_runtime[k]} -> {v}" for k, v in runtime.items() if k in old_runtime and old_runtime[k] != v]
    if changed:
        t.log(f"note: {path} was written with other run-time settings ({', '.join(changed)}); the continuation "
              f"is not bit-exact")
