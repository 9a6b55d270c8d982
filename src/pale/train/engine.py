"""The training engine: one generic :class:`~pale.train.trainer.Trainer` that runs any
:class:`~pale.train.task.Task`, in parts:

* :mod:`pale.train.runtime` -- the device, mixed precision (bf16 autocast where native, fp16 with a
  GradScaler on older GPUs), DistributedDataParallel under ``torchrun`` (NCCL on GPUs, gloo on CPUs),
  and the random states of an exact resume;
* :mod:`pale.train.task` -- what a problem supplies: the model, the datasets, the loss of one batch,
  the evaluation, and which metric is "best";
* :mod:`pale.train.build` -- the model on the device, the loaders (samplers whose order survives a
  resume), timm's optimizer, scheduler (stepped per update) and weight EMA;
* :mod:`pale.train.checkpoints` -- what a checkpoint holds, saving and restoring a trainer's state, and
  the checkpoint a run continues from;
* :mod:`pale.train.run_folder` -- the run folder's files, each written atomically: checkpoints and their
  rotation, the exported weights, ``metrics.jsonl``, ``curves.png``, ``summary.json``;
* :mod:`pale.train.stopping` -- non-finite losses and the signals that save and stop a run;
* :mod:`pale.train.trainer` -- the loop: gradient accumulation and clipping, non-finite losses,
  validation of the model and its EMA, SIGTERM / SIGUSR1 / Ctrl-C checkpoints, progress and TensorBoard.

A task's recipe sections (``Task.defaults``) are merged with the engine's
(:data:`pale.train.recipe.ENGINE_DEFAULTS`) so unknown keys are caught for both. This module gathers
the engine's names in one place.
"""
from .build import build_ema, build_loaders, build_model, build_optimizer, build_scheduler, resolved_lr
from .checkpoints import (RESTART_KEYS, checkpoint_files, config_differences, load_latest_checkpoint,
                          load_training_checkpoint, open_checkpoint)
from .run_folder import RunFolder, RunFolderError, plot_curves
from .runtime import Runtime, rng_state, set_rng_state, setup_runtime
from .task import Task
from .stopping import NonFiniteLossError, TrainingInterrupted
from .trainer import Trainer

__all__ = ["Task", "Runtime", "Trainer", "NonFiniteLossError", "TrainingInterrupted", "RunFolder", "RunFolderError",
           "setup_runtime", "checkpoint_files", "load_latest_checkpoint", "load_training_checkpoint",
           "open_checkpoint", "config_differences", "RESTART_KEYS", "resolved_lr", "build_optimizer",
           "build_scheduler", "build_ema", "build_model", "build_loaders", "rng_state", "set_rng_state",
           "plot_curves"]
