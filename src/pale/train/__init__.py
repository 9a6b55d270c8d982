"""Training and evaluation: a generic engine (:mod:`pale.train.engine` and its parts), tasks
(classification in :mod:`pale.train.classification`), recipes (:mod:`pale.train.recipe`) and the digits demo."""
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
