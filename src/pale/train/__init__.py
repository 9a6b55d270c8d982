"""Training and evaluation: tasks (classification in :mod:`pale.train.classification`), recipes
(:mod:`pale.train.recipe`), the digits demo, and the training engine: one generic :class:`~pale.train.trainer.Trainer` that runs any
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
(:data:`pale.train.recipe.ENGINE_DEFAULTS`) so unknown keys are caught for both.
"""
from .build import resolved_lr
from .evaluate import evaluate_checkpoint
from .recipe import ENGINE_DEFAULTS, RecipeError, merge, resolve_recipe
from .run import TASKS, register_task, resolve_config, train
from .runtime import Runtime, setup_runtime
from .stopping import NonFiniteLossError, TrainingInterrupted
from .task import Task
from .trainer import Trainer

__all__ = ["ENGINE_DEFAULTS", "NonFiniteLossError", "RecipeError", "Runtime", "TASKS", "Task", "Trainer",
           "TrainingInterrupted", "evaluate_checkpoint", "merge", "register_task", "resolve_config", "resolve_recipe", "resolved_lr",
           "setup_runtime", "train"]
