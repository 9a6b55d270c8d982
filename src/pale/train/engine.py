"""The training engine: one generic :class:`Trainer` that runs any :class:`Task`.

The Trainer owns everything that is the same for classification, segmentation and detection:
devices and DistributedDataParallel (``torchrun``; NCCL on GPUs, gloo on CPU), samplers whose order
survives a resume, mixed precision (bf16 autocast, or fp16 with a GradScaler on CUDA), gradient
accumulation and clipping, channels-last and gradient checkpointing, timm's optimizer
(``create_optimizer_v2``), scheduler (``create_scheduler_v2``, stepped per update) and EMA
(``ModelEmaV3``), atomic checkpoints (``last.pth`` every epoch, ``best.pth`` + ``best.safetensors`` for
the best validation metric; optionally every ``train.checkpoint_every_updates`` updates, the last
``train.keep_checkpoints`` kept as ``last.pth``, ``last-1.pth``, ...) with exact ``resume`` (``"auto"``: continue
the run in the folder if there is one, else start it), non-finite-loss handling, SIGTERM/SIGUSR1/Ctrl-C checkpoints,
skipped-bad-image counting, progress (:mod:`pale.progress`), ``metrics.jsonl``, ``curves.png``,
``summary.json`` and optional TensorBoard. Only rank 0 writes files.

A :class:`Task` supplies what is specific to a problem: the model, the datasets, the loss of one batch,
the evaluation, and which metric is "best". Its recipe sections (``defaults``) are merged with the
engine's (:data:`pale.train.recipe.ENGINE_DEFAULTS`) so unknown keys are caught for both.

Example (a segmentation task reusing the engine)::

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

Checkpoint contents (``pale.io.save_checkpoint``): ``model``, ``model_ema``, ``model_name``,
``model_kwargs``, ``class_names`` (and any other entries of ``task.model_info()``), ``optimizer``,
``scheduler``, ``scaler``, ``epoch`` (completed epochs), ``step`` (updates done in the current epoch, non-zero
only for an interrupted epoch), ``num_updates``, ``epoch_state`` (running sums of the interrupted epoch),
``rng`` (python, numpy, torch and CUDA states of every rank), ``attention_kernels`` (the measured
attention-kernel choices, :func:`pale.models.attention_kernels.kernel_choices`, restored on resume), ``ema_buffers`` (every rank's EMA BatchNorm
statistics, under torchrun), ``history``, ``best`` (epoch, value, metric
and ``weights``: "raw" or "ema"), ``skipped_images``, ``config`` (the resolved recipe), ``runtime`` (run-time
choices that change the numbers but are not in the recipe, see :meth:`Trainer.runtime_record`), ``best_metric``
(the task's metric name, higher is better) and, once validated, ``val_metrics`` =
``{"raw": {metric: value}, "ema": {...}}`` of the latest validation (no ``"ema"`` without EMA).
``best.safetensors`` and ``last.safetensors`` hold whichever of ``model`` and ``model_ema`` validated
better (metadata ``weights``).

The EMA decay is ``ema.decay`` capped so that its time constant ``1 / (1 - decay)`` is at most
``ema.max_window`` (0.1) of the run's updates (:func:`pale.train.recipe.ema_decay`); ``ema.warmup``
adds timm's warm-up. Validation runs in fp32 unless ``train.val_amp``; ``val_precision`` in the
history records which.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.utils import random_seed, unwrap_model
from torch.utils.data import DataLoader, Dataset

from .. import io as pio
from ..errors import InputError, UserError
from ..models.attention_kernels import (ALL_KERNELS, CANDIDATES, kernel_choices, load_kernel_choices, native_bf16,
                                         use_kernel)
from ..progress import log, progress
from .data import (AugmentationError, BadImageError, EpochSampler, SeededDataset, ShardSampler, SkipCollate,
                   clean_worker_error, ignore_stop_signals, loader_workers, shut_down_workers, usable_cores)
from .recipe import (ENGINE_RULES, RecipeError, RecipeRule, check_optimizer_name, check_rules, dump_recipe, ema_decay,
                     schedule_warnings)

__all__ = ["Task", "Runtime", "Trainer", "NonFiniteLossError", "TrainingInterrupted", "setup_runtime",
           "checkpoint_files", "load_latest_checkpoint", "config_differences", "RESTART_KEYS",
           "resolved_lr", "build_optimizer", "build_scheduler", "rng_state", "set_rng_state", "plot_curves"]

Config = Dict[str, Any]


class NonFiniteLossError(InputError):
    """The loss became NaN or infinite (and ``train.on_nonfinite`` is ``stop``)."""


class TrainingInterrupted(SystemExit):
    """Raised after SIGTERM / SIGUSR1 / SIGINT once the checkpoint is saved; exit code 128 + signal number.

    SIGUSR1 (what Slurm's ``--signal`` sends ahead of a time limit) gives 138: "saved, requeue me"; a job
    script requeues on it and the same command with ``--resume auto`` continues exactly.
    """


#: recipe keys that may change between the starts of one run (where the data is staged, how many loader
#: processes, logging, checkpoint cadence); any other difference makes ``resume="auto"`` refuse the folder
RESTART_KEYS = frozenset({"data.root", "train.device", "train.workers", "train.progress", "train.tensorboard",
                          "train.eval_batch_size", "train.resume", "train.checkpoint_every_updates",
                          "train.keep_checkpoints"})


# ---- runtime: devices, precision, distributed ------------------------------------------------------

@dataclass
class Runtime:
    """Where and how this process computes; handed to the task's loss and evaluation."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """An image batch on the device (channels-last when enabled)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place, returned); a no-op on one process."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def setup_runtime(device: str = "auto", amp: str = "auto", channels_last: bool = False) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pio.resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 or dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if amp == "auto":
        if dev.type == "cpu":
            # bf16 only pays on CPUs with native bf16 (AVX-512-BF16/AMX); elsewhere it is emulated
            # and far slower than fp32 (measured ~1 vs ~170 GFLOP/s on an AVX2-only EPYC).
            amp = "bf16" if native_bf16() else "none"
        else:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amp_dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in amp_dtypes:
        raise InputError(f"amp (train.amp, --amp) must be one of auto, {', '.join(amp_dtypes)}; got {amp!r}")
    if amp == "fp16" and dev.type != "cuda":
        raise InputError("amp fp16 (train.amp, --amp) needs a CUDA device; use bf16 (or none) on the CPU")
    if amp == "bf16" and dev.type == "cpu" and rank == 0 and not native_bf16():
        log("warning: this CPU has no native bf16 (AVX-512-BF16 or AMX): bf16 runs emulated, far slower than "
            "float32; amp none (or auto, which chooses it here) is faster")
    return Runtime(dev, amp_dtypes[amp], rank, world, local_rank, channels_last)


@contextlib.contextmanager
def _without_torch_worker_warning() -> Iterator[None]:
    """Silence PyTorch's warning that loader workers exceed the cores, which it repeats for every
    loader and iterator; a run says so once, in its own words (:func:`schedule_warnings`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


# ---- reproducibility -----------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as plain containers and tensors (weights_only-safe).

    timm seeds (``random_seed``) but has no state capture, which the exact mid-epoch resume needs per rank."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(),
                 numpy=dict(name=np_state[0], keys=torch.from_numpy(np_state[1].astype(np.int64)),
                            pos=int(np_state[2]), has_gauss=int(np_state[3]), gauss=float(np_state[4])),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolved_lr(cfg: Mapping[str, Any]) -> float:
    """``optim.lr`` if set, else ``lr_base`` scaled linearly by ``batch_size / lr_base_size``."""
    optim = cfg["optim"]
    if optim.get("lr") is not None:
        return float(optim["lr"])
    return float(optim["lr_base"]) * cfg["batch_size"] / optim["lr_base_size"]


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """timm's optimizer for the recipe: no weight decay on 1-D parameters (norms, biases) nor on the
    names in ``model.no_weight_decay()``."""
    from timm.optim import create_optimizer_v2

    ocfg = cfg["optim"]
    kwargs: Dict[str, Any] = dict(opt=ocfg["opt"], lr=resolved_lr(cfg), weight_decay=float(ocfg["weight_decay"]),
                                  momentum=float(ocfg["momentum"]), layer_decay=ocfg["layer_decay"])
    name = str(ocfg["opt"]).lower()
    if "adam" in name or "lamb" in name:
        kwargs.update(betas=tuple(ocfg["betas"]), eps=float(ocfg["eps"]))
    if name in ("adam", "adamw") and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                         for p in model.parameters()):
        # PyTorch's one-kernel Adam(W): the default loops over every tensor on the CPU, which costs 15%
        # of a small model's step (Pale-T has 614 parameter tensors); same update, other rounding.
        kwargs["fused"] = True
    return create_optimizer_v2(model, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], updates_per_epoch: int) -> Any:
    """timm's scheduler (warm-up then ``sched.sched``), stepped per update unless ``sched.step_on_epochs``.

    The warm-up lasts ``sched.warmup_epochs``, or ``sched.warmup_updates`` optimizer updates when
    set (dense recipes count it in iterations); ``multistep`` decays at ``sched.decay_milestones``.
    timm's schedulers are functions of the update count, so a resumed run gets the same rates.
    """
    from timm.scheduler import create_scheduler_v2

    scfg = cfg["sched"]
    warmup = scfg["warmup_epochs"]
    if scfg.get("warmup_updates") is not None:
        warmup = float(scfg["warmup_updates"]) / updates_per_epoch
    milestones = list(scfg.get("decay_milestones") or [])
    if scfg["sched"] == "multistep" and not milestones:
        raise InputError("sched.sched=multistep needs sched.decay_milestones (epochs), e.g. [8, 11]")
    return create_scheduler_v2(
        optimizer, sched=scfg["sched"], num_epochs=int(cfg["epochs"]), warmup_epochs=warmup,
        warmup_lr=float(scfg["warmup_lr"]), min_lr=float(scfg["min_lr"]), cooldown_epochs=scfg["cooldown_epochs"],
        decay_rate=float(scfg["decay_rate"]), step_on_epochs=bool(scfg["step_on_epochs"]),
        updates_per_epoch=updates_per_epoch, **({"decay_milestones": milestones} if milestones else {}))[0]


# ---- the task interface --------------------------------------------------------------------------

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


# ---- curves ----------------------------------------------------------------------------------------

def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """Losses (left) and the chosen metrics (right) against epoch, as a PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({k for h in history for k in h if k.endswith("loss")}):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o", label=key)
    for key in sorted({k for h in history for k in h if any(k == p + m for m in metrics for p in ("val_", "ema_val_"))}):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_metric.plot(*zip(*pts), marker="o", label=key)
    from matplotlib.ticker import MaxNLocator
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_metric.set_ylabel("accuracy (%)" if any(m.startswith("top") for m in metrics) else "")
    fig.tight_layout()
    pio.atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


# ---- checkpoints of a run folder --------------------------------------------------------------------

def _log_main(text: str) -> None:
    """A message on stderr from rank 0 only (:func:`pale.progress.log`, above a progress bar if one is shown)."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(text)


def checkpoint_files(folder: os.PathLike) -> List[Path]:
    """The run's kept training checkpoints, newest first: ``last.pth``, ``last-1.pth``, ``last-2.pth``, ..."""
    folder = Path(folder)
    older = sorted((int(m.group(1)), p) for p in folder.glob("last-*.pth")
                   if (m := re.fullmatch(r"last-(\d+)\.pth", p.name)))
    return [p for p in [folder / "last.pth"] if p.is_file()] + [p for _, p in older]


def _load_training_checkpoint(path: Path) -> Dict[str, Any]:
    ckpt = pio.load_torch(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "epoch" not in ckpt:
        raise pio.CheckpointError(f"{path} is not a training checkpoint of `pale train` (no optimizer/epoch "
                                  f"state); to start from its weights use model.pretrained instead")
    return ckpt


def load_latest_checkpoint(folder: os.PathLike) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """``(path, checkpoint)`` of the newest kept checkpoint of ``folder`` that loads, or None if it has none.

    A checkpoint that does not load (truncated by a crash of the file system, deleted meanwhile) is
    skipped for the previous one, saying so; if none loads, :class:`pale.io.CheckpointError` lists why.
    """
    files = checkpoint_files(folder)
    errors = []
    for path in files:
        try:
            ckpt = _load_training_checkpoint(path)
        except (pio.CheckpointError, FileNotFoundError) as err:
            errors.append(str(err))
            _log_main(f"warning: cannot resume from {path}: {err}")
            continue
        if errors:
            _log_main(f"warning: falling back to the previous checkpoint {path} (at epoch {int(ckpt['epoch']) + 1}, "
                      f"update {ckpt.get('step', 0)}); the updates after it are done again")
        return path, ckpt
    if files:
        raise pio.CheckpointError(f"none of the checkpoints in {folder} loads ({'; '.join(errors)}); refusing to "
                                  f"start the run over: move the folder away to start afresh")
    return None


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


# ---- the trainer -----------------------------------------------------------------------------------

_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _EpochSums:
    """Running sums of one training epoch (checkpointed as ``epoch_state`` so a resumed epoch reports the
    whole epoch). Not timm's ``AverageMeter``: that keeps ``val * n`` products and no state to save and restore."""

    loss_sum: float = 0.0
    loss_count: int = 0
    images: int = 0
    time: float = 0.0
    tick: float = 0.0  # wall clock of the previous update

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "_EpochSums":
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


class Trainer:
    """Runs ``task`` with recipe ``cfg``, writing into ``out_dir`` (rank 0 only).

    Args:
        task: the problem (model, data, loss, evaluation).
        cfg: the resolved recipe (engine sections + the task's).
        out_dir: run folder; must not hold another run unless resuming.
        resume: a ``last.pth`` (or any checkpoint) of this run to continue exactly; or ``"auto"`` (also
            recipe key ``train.resume``): continue the run in ``out_dir`` from its newest checkpoint that loads,
            start it when there is none, refuse a folder whose run has another recipe (keys in
            :data:`RESTART_KEYS` aside).
        dry_run: one epoch of two updates and two evaluation batches, to check a setup; writes nothing.
    """

    def __init__(self, task: Task, cfg: Config, out_dir: os.PathLike, resume: Optional[os.PathLike] = None,
                 dry_run: bool = False):
        self.task, self.cfg, self.dry_run = task, cfg, dry_run
        self.out_dir = pio.output_folder(out_dir, "run folder")
        tcfg = cfg["train"]
        auto = str(resume) == "auto" or (resume is None and tcfg["resume"] == "auto")
        self.resume_path = Path(resume) if resume and not auto else None
        self._resume_ckpt: Optional[Dict[str, Any]] = None
        if tcfg["attention_kernel"] not in ("auto", *ALL_KERNELS):
            raise RecipeError(f"train.attention_kernel must be auto or one of {', '.join(ALL_KERNELS)}, "
                              f"got {tcfg['attention_kernel']!r}")
        if tcfg["resume"] not in (None, "auto"):
            raise RecipeError(f"train.resume must be null or auto, got {tcfg['resume']!r} (a checkpoint to "
                              f"continue is given with --resume PATH)")
        if auto:
            found = load_latest_checkpoint(self.out_dir)
            if found is not None:
                self._check_same_run(*found)
                self.resume_path, self._resume_ckpt = found
        elif not self.resume_path and not dry_run and checkpoint_files(self.out_dir):
            raise InputError(f"output folder {self.out_dir} already holds a run ({checkpoint_files(self.out_dir)[0].name}"
                             f"): pass --resume to continue it (--resume auto in a job script that must also start "
                             f"it), or choose another output folder")
        self._last_saved: Optional[Tuple[int, int]] = None  # (epoch, step) of the newest last.pth
        self._stop_signal: Optional[int] = None
        self.skipped_images = 0
        self.nonfinite_skipped = 0

    # -- files (rank 0 only) --

    def _write(self, fn: Callable[[], None]) -> None:
        if self.rt.is_main and not self.dry_run:
            fn()

    def _check_same_run(self, path: Path, ckpt: Mapping[str, Any]) -> None:
        """Refuse to continue a run of another recipe or model in ``out_dir``, saying what differs."""
        diffs = config_differences(ckpt.get("config") or {}, self.cfg)
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise InputError(f"{self.out_dir} holds another run ({path.name}: model {ckpt.get('model_name')}), "
                             f"whose recipe differs: {shown}. Choose another output folder, or continue that run "
                             f"with its own recipe: {self.task.train_command} --resume {path}")

    def runtime_record(self) -> Dict[str, Any]:
        """How this run computes beyond its recipe, stored in checkpoints as ``runtime``; a resume with
        different values continues, but not bit-exactly. Run-time choices that change the numbers (the
        device type, the resolved ``amp``, kernel choices) belong here."""
        return dict(device=self.rt.device.type, channels_last=self.rt.channels_last,
                    amp=str(self.rt.amp_dtype).removeprefix("torch.") if self.rt.amp_dtype is not None else "none")

    def _rotate_last(self) -> None:
        """``last.pth`` -> ``last-1.pth`` -> ... before a new ``last.pth``, keeping ``train.keep_checkpoints`` files.

        Called once the new checkpoint is complete on disk under a temporary name (a failed write rotates
        nothing). Renames are atomic; a crash between them leaves the newest checkpoint under the next
        name, which :func:`load_latest_checkpoint` finds."""
        keep = int(self.cfg["train"]["keep_checkpoints"])
        names = [self.out_dir / "last.pth"] + [self.out_dir / f"last-{i}.pth" for i in range(1, keep)]
        for stale in set(checkpoint_files(self.out_dir)) - set(names):
            stale.unlink()
        for newer, older in reversed(list(zip(names, names[1:]))):
            if newer.exists():
                os.replace(newer, older)

    def _save_last(self, epoch: int, step: int, epoch_state: Optional[Mapping[str, Any]] = None) -> Path:
        """The rotating ``last.pth`` checkpoint (all ranks call this)."""
        path = self._save("last.pth", epoch, step, epoch_state, rotate=True)
        self._last_saved = (epoch, step)
        return path

    def _save(self, name: str, epoch: int, step: int, epoch_state: Optional[Mapping[str, Any]] = None,
              rotate: bool = False) -> Path:
        """Checkpoint after ``epoch`` complete epochs and ``step`` updates of the next (all ranks call this)."""
        rngs = self.rt.all_gather_object(rng_state())
        skipped = self._total_skipped()
        ema_buffers = None
        if self.ema is not None and self.rt.distributed:
            # the EMA's BatchNorm statistics follow each rank's own batches until the epoch's end averages them
            ema_buffers = self.rt.all_gather_object(
                {k: v.detach().cpu() for k, v in self.ema.module.named_buffers() if v.is_floating_point()})
        path = self.out_dir / name
        if self.rt.is_main and not self.dry_run:
            info = self.task.model_info()
            pio.save_checkpoint(
                path, unwrap_model(self.model), info.pop("model_name"), info.pop("model_kwargs"),
                info.pop("class_names", None), **info,
                # older copies move down only once the new file is complete: a failed write keeps them all
                before_replace=self._rotate_last if rotate else None,
                model_ema=self.ema.module.state_dict() if self.ema is not None else None, ema_buffers=ema_buffers,
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                epoch=epoch, step=step, num_updates=self.num_updates, epoch_state=dict(epoch_state or {}),
                rng=rngs, history=self.history, best=self.best, skipped_images=skipped,
                config=self.cfg, runtime=self.runtime_record(), attention_kernels=kernel_choices(),
                best_metric=self.task.best_metric,
                **({"val_metrics": val} if (val := self._val_metrics()) is not None else {}))
        return path

    def _export_weights(self, name: str) -> None:
        """The better of the model and its EMA by the latest validation (:meth:`_better_weights`), as
        safetensors with the model description and ``weights`` ("raw" or "ema") as metadata."""
        info = self.task.model_info()
        which = self._better_weights()
        model = self.ema.module if which == "ema" else unwrap_model(self.model)
        pio.save_safetensors(model.state_dict(), self.out_dir / name, metadata=dict(info, weights=which))

    def _write_history(self) -> None:
        text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history)
        pio.atomic_write_text(self.out_dir / "metrics.jsonl", text)

    # -- setup --

    def _build(self) -> None:
        cfg, tcfg = self.cfg, self.cfg["train"]
        self.rt = rt = setup_runtime(tcfg["device"], tcfg["amp"], bool(tcfg["channels_last"]))
        kernel = tcfg["attention_kernel"]
        if kernel != "auto" and kernel not in CANDIDATES.get(rt.device.type, ()):
            raise RecipeError(f"train.attention_kernel={kernel!r} is not available on {rt.device.type}; expected "
                              f"auto or one of {', '.join(CANDIDATES.get(rt.device.type, ()))}")
        if tcfg["sync_bn"] and rt.distributed and rt.device.type != "cuda":
            raise RecipeError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); "
                              "set train.sync_bn=false on the CPU")
        seed = int(cfg["seed"])
        random_seed(seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = self._build_model()
        random_seed(seed, rt.rank)  # different drop-path / Mixup draws on each rank
        self._build_loaders(seed)
        self._build_optimization(model)
        self.model = model
        self.num_updates = 0
        self.start_epoch, self.start_step = 0, 0
        self.epoch_state: Dict[str, Any] = {}
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {}
        if self.resume_path:
            self._load_resume(self.resume_path)
        if rt.distributed:
            if tcfg["sync_bn"]:
                self.model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            # Depthwise convolution weights are (C, 1, k, k); oneDNN hands back their gradient with another
            # stride along the size-1 dim, the same memory layout, which DDP compares literally and warns
            # about once per process ("may impair performance"); it copies each gradient into its bucket
            # whatever the strides.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, **self.task.ddp_kwargs)

    def _build_model(self) -> nn.Module:
        """The task's model on the device, with gradient checkpointing and channels-last as the recipe asks."""
        rt = self.task.runtime = self.rt
        try:
            model = self.task.build_model()
        except UserError:
            raise
        except (ValueError, TypeError) as err:  # a constructor refusing its arguments, e.g. 3 pale sizes for 4 stages
            raise RecipeError(f"the recipe's model settings (model.name, model.kwargs) do not build a model: "
                              f"{err}") from None
        if self.cfg["train"]["grad_checkpointing"]:
            if not hasattr(model, "set_grad_checkpointing"):
                raise InputError(f"{type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        model.to(rt.device)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _build_loaders(self, seed: int) -> None:
        """The training loader (resumable order; batch_size = per device x processes x accumulation steps)
        and the sharded validation loader."""
        cfg, tcfg, rt = self.cfg, self.cfg["train"], self.rt
        accum, total = int(tcfg["accum_steps"]), int(cfg["batch_size"])
        if total % (rt.world_size * accum):
            raise RecipeError(f"batch_size {total} is not divisible by {rt.world_size} processes x "
                              f"{accum} accumulation steps")
        self.accum = accum
        self.batch_per_device = total // (rt.world_size * accum)
        self.task.check_batch(self.batch_per_device, rt)
        train_ds = self.task.train_dataset()
        self.train_sampler = EpochSampler(train_ds, rt.world_size, rt.rank, seed)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = loader_workers(tcfg["workers"], per_node)
        with _without_torch_worker_warning():
            self.train_loader = DataLoader(
                SeededDataset(train_ds, seed), batch_size=self.batch_per_device, sampler=self.train_sampler,
                num_workers=workers, collate_fn=SkipCollate(self.task.collate_fn(True)), drop_last=True,
                pin_memory=rt.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                worker_init_fn=ignore_stop_signals,
                # workers live across epochs (starting them cost ~2 s per epoch in the demo); the
                # sampler stays in this process and SeededDataset seeds every image from its
                # (epoch, index) key, so their age changes no draw
                persistent_workers=workers > 0)
        self.updates_per_epoch = (self.train_sampler.num_samples // self.batch_per_device) // accum
        if self.updates_per_epoch == 0:
            raise InputError(f"the training set ({len(train_ds)} samples, {self.train_sampler.num_samples} per "
                             f"process) is smaller than one batch ({self.batch_per_device} per process x "
                             f"{accum} accumulation steps); lower batch_size")
        for text in schedule_warnings(cfg, self.updates_per_epoch, len(train_ds), workers * per_node, usable_cores()):
            self._log(f"warning: {text}")
        val_ds = self.task.val_dataset()
        self.val_loader = None
        if val_ds is not None:
            eval_bs = int(tcfg["eval_batch_size"] or 2 * self.batch_per_device)
            with _without_torch_worker_warning():
                self.val_loader = DataLoader(
                    val_ds, batch_size=eval_bs, sampler=ShardSampler(len(val_ds), rt.world_size, rt.rank),
                    num_workers=workers, collate_fn=SkipCollate(self.task.collate_fn(False)),
                    pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0,
                    worker_init_fn=ignore_stop_signals,
                    # its own generator: without one, every new iterator draws its workers' seed from
                    # the global RNG (drop path's), and a resumed run, whose first validation starts
                    # new workers, would continue another random stream than the run it continues
                    generator=torch.Generator().manual_seed(seed))

    def _build_optimization(self, model: nn.Module) -> None:
        """Optimizer, per-update scheduler, GradScaler (fp16 only) and EMA."""
        from timm.utils import ModelEmaV3

        cfg = self.cfg
        self.lr = resolved_lr(cfg)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.rt.amp_dtype == torch.float16 else None
        ecfg = cfg["ema"]
        # timm's cooldown: the schedule spans `epochs`, then `sched.cooldown_epochs` more train at min_lr
        self.total_epochs = int(cfg["epochs"]) + int(cfg["sched"]["cooldown_epochs"])
        self.ema_decay = ema_decay(ecfg, self.total_epochs * self.updates_per_epoch)
        self.ema = ModelEmaV3(model, decay=self.ema_decay, use_warmup=bool(ecfg["warmup"])) \
            if ecfg["enabled"] else None

    def _load_resume(self, path: Path) -> None:
        ckpt = self._resume_ckpt if self._resume_ckpt is not None else _load_training_checkpoint(path)
        self._resume_ckpt = None
        pio.load_weights(self.model, ckpt["model"], source=str(path))
        if self.ema is not None:
            if ckpt.get("model_ema") is None:
                raise pio.CheckpointError(f"{path} has no EMA weights but ema.enabled is true")
            pio.load_weights(self.ema.module, ckpt["model_ema"], source=f"{path} (EMA)")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("attention_kernels"):  # the kernels the run computed with, so that it continues exactly
            load_kernel_choices(ckpt["attention_kernels"])
        old_cfg = ckpt.get("config") or {}
        same_schedule = (old_cfg.get("epochs"), old_cfg.get("sched")) == (self.cfg["epochs"], self.cfg["sched"])
        if self.scheduler is not None and ckpt.get("scheduler") and same_schedule:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
        self._last_saved = (self.start_epoch, self.start_step)
        self.num_updates = int(ckpt.get("num_updates", 0))
        self.epoch_state = dict(ckpt.get("epoch_state") or {})
        if self.scheduler is not None:  # the lr of the next update (on the new schedule if epochs changed)
            self.scheduler.step_update(num_updates=self.num_updates)
        self.history = [h for h in ckpt.get("history", []) if h["epoch"] <= self.start_epoch]
        self.best = dict(ckpt.get("best") or {})
        self.skipped_images = int(ckpt.get("skipped_images", 0)) if self.rt.is_main else 0  # a total over ranks
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.rt.world_size:
            set_rng_state(rngs[self.rt.rank])
            if self.ema is not None and ckpt.get("ema_buffers"):
                buffers = dict(self.ema.module.named_buffers())
                for k, v in ckpt["ema_buffers"][self.rt.rank].items():
                    buffers[k].copy_(v)
        else:
            self._log(f"note: {path} was written by {len(rngs)} processes, this run has {self.rt.world_size}; "
                      f"random streams restart from the seed, so the continuation is not bit-exact")
            random_seed(int(self.cfg["seed"]) + 1000 * self.start_epoch, self.rt.rank)
        old_runtime, runtime = ckpt.get("runtime") or {}, self.runtime_record()
        changed = [f"{k} {old_runtime[k]} -> {v}" for k, v in runtime.items()
                   if k in old_runtime and old_runtime[k] != v]
        if changed:
            self._log(f"note: {path} was written with other run-time settings ({', '.join(changed)}); the "
                      f"continuation is not bit-exact")

    # -- logging --

    def _log(self, text: str) -> None:
        if self.rt.is_main:
            log(text)

    # -- signals --

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        if self.rt.distributed:  # every rank stops at the same update
            flag = flag.to(self.rt.device)
            self.rt.all_reduce_sum(flag)
        return bool(flag.item() > 0)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        old = {s: signal.signal(s, self._on_signal) for s in stops}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- batches --

    def _batches(self, loader: DataLoader) -> Iterator[Any]:
        """Batches of ``loader`` without the skipped-image bookkeeping (counted here)."""
        with _without_torch_worker_warning():
            it = iter(loader)
        while True:
            try:
                batch, skipped = next(it)
            except StopIteration:
                return
            except (BadImageError, AugmentationError) as err:
                raise type(err)(clean_worker_error(err)) from None
            self.skipped_images += skipped
            if batch is not None:
                yield batch

    # -- loop --

    def fit(self) -> Dict[str, Any]:
        """Train to ``epochs`` (from the resume point), validating and checkpointing each epoch.

        Returns the summary also written to ``summary.json``.
        """
        self._build()
        rt, tcfg = self.rt, self.cfg["train"]
        epochs = 1 if self.dry_run else self.total_epochs
        self._write(lambda: pio.atomic_write_text(self.out_dir / "config.yaml", dump_recipe(self.cfg)))
        if self.resume_path:
            self._write(self._write_history)
            self._log(f"resuming {self.resume_path} at epoch {self.start_epoch + 1}, update {self.start_step}"
                      if self.start_epoch < epochs else f"{self.resume_path} has finished all {epochs} epochs: "
                      f"nothing left to train")
        self.tb = None
        if tcfg["tensorboard"] and rt.is_main and not self.dry_run:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("train.tensorboard needs the tensorboard package "
                                 "(pip install 'pale-transformer[tensorboard]')") from None
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        self._log(f"{rt.world_size} process(es) on {rt.device.type}, amp={self.runtime_record()['amp']}, batch {self.cfg['batch_size']} "
                  f"= {self.batch_per_device} x {rt.world_size} x {self.accum}, lr {self.lr:.3g}, "
                  f"{self.updates_per_epoch} updates/epoch"
                  + (f", EMA decay {self.ema_decay:.6g}" if self.ema is not None else ""))
        started = time.time()
        kernel = tcfg["attention_kernel"]
        with self._signal_handlers(), (use_kernel(kernel) if kernel != "auto" else contextlib.nullcontext()):
            try:
                for epoch in range(self.start_epoch, epochs):
                    record = self._train_epoch(epoch)
                    self._sync_norm_stats()
                    last = epoch + 1 == epochs
                    if self.val_loader is not None and (last or (epoch + 1) % int(tcfg["eval_every"]) == 0):
                        record.update(self._validate())
                    self.history.append(record)
                    self._end_epoch(epoch, record)
                    if self._stop_requested():
                        self._interrupted(epoch + 1, 0)
            finally:
                shut_down_workers(self.train_loader)
                shut_down_workers(self.val_loader)
        total_skipped = self._total_skipped()
        summary = dict(epochs=epochs, best=self.best, last=self.history[-1] if self.history else {},
                       skipped_images=total_skipped, skipped_nonfinite_batches=self.nonfinite_skipped,
                       train_time_s=round(time.time() - started, 1))
        if total_skipped:
            self._log(f"skipped {total_skipped} unreadable image(s) (data.skip_bad_images)")

        def finish() -> None:
            self._export_weights("last.safetensors")
            pio.atomic_write_json(self.out_dir / "summary.json", summary)
            if self.history:
                plot_curves(self.history, self.out_dir / "curves.png", self.task.curve_metrics)
        self._write(finish)
        if self.tb is not None:
            self.tb.close()
        return summary

    def _total_skipped(self) -> int:
        t = torch.tensor([float(self.skipped_images)], device=self.rt.device)
        return int(self.rt.all_reduce_sum(t).item())

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        rt, tcfg = self.rt, self.cfg["train"]
        model, opt = self.model, self.optimizer
        model.train()
        start_step = self.start_step if epoch == self.start_epoch else 0
        sums = _EpochSums.from_state(self.epoch_state if start_step else {})
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(start_step * self.accum * self.batch_per_device)
        total_updates = 2 if self.dry_run else self.updates_per_epoch
        bar = progress(total=total_updates, initial=start_step, desc=f"epoch {epoch + 1}/{1 if self.dry_run else self.total_epochs}",
                       unit="updates", enabled=rt.is_main and bool(tcfg["progress"]))
        step, micro, window_loss, window_n = start_step, 0, 0.0, 0
        every = int(tcfg["checkpoint_every_updates"])
        sums.tick = time.time()
        opt.zero_grad(set_to_none=True)
        for batch in self._batches(self.train_loader):
            if step >= total_updates:
                break
            sync = (micro + 1) % self.accum == 0
            with model.no_sync() if (rt.distributed and not sync) else contextlib.nullcontext():
                with rt.autocast():
                    loss, n = self.task.training_loss(model, batch, rt)
                if not self._loss_is_finite(loss, epoch, step):
                    opt.zero_grad(set_to_none=True)
                    micro = 0
                    continue
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            window_loss += loss.item() * n
            window_n += n
            micro += 1
            if not sync:
                continue
            self._optimizer_step()
            step, micro = step + 1, 0
            self._after_update(sums, window_loss, window_n, bar)
            window_loss, window_n = 0.0, 0
            if every and self.num_updates % every == 0 and step < total_updates:  # the epoch's end saves anyway
                self._save_last(epoch, step, sums.state())
            if self._stop_requested():
                bar.close()
                self._interrupted(epoch, step, sums.state())
        bar.close()
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1)
        return dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"], train_loss=sums.mean_loss(),
                    train_images_per_s=round(sums.images / max(sums.time, 1e-9), 2))

    def _loss_is_finite(self, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """Whether the loss is finite on every rank; on a non-finite loss, stop (``train.on_nonfinite=stop``,
        naming the last good checkpoint) or count the batch as skipped."""
        finite = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.rt.device)
        if not bool(self.rt.all_reduce_sum(finite).item() > 0):
            return True
        if self.cfg["train"]["on_nonfinite"] == "stop":
            keep = "no checkpoint was written yet"
            if self._last_saved is not None:
                keep = (f"the last good checkpoint is {self.out_dir / 'last.pth'} (at epoch "
                        f"{self._last_saved[0] + 1}, update {self._last_saved[1]})")
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch + 1}, update {step + 1} (lr "
                f"{self.optimizer.param_groups[0]['lr']:.3g}); training stopped and {keep}. Lower the learning "
                f"rate, set train.clip_grad, or pass --set train.on_nonfinite=skip to skip such batches")
        self.nonfinite_skipped += 1
        self._log(f"skipping a batch with a non-finite loss at epoch {epoch + 1}, update {step + 1}")
        return False

    def _optimizer_step(self) -> None:
        """One update from the accumulated gradients: clip, step (through the GradScaler under fp16), then
        advance the per-update schedule and the EMA.

        Not timm's ``NativeScaler``, which runs backward and step in one call: here the backward of each
        micro-batch comes first, after the all-ranks finite-loss check, and the step only on the last."""
        from timm.utils import dispatch_clip_grad

        tcfg, opt = self.cfg["train"], self.optimizer
        if tcfg["clip_grad"] is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            dispatch_clip_grad(self.model.parameters(), float(tcfg["clip_grad"]), mode=tcfg["clip_mode"])
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(unwrap_model(self.model), step=self.num_updates)

    def _after_update(self, sums: "_EpochSums", window_loss: float, window_n: int, bar: Any) -> None:
        """Add the update's loss (summed over ranks) to the epoch's sums; report it to the progress bar
        and TensorBoard."""
        stats = self.rt.all_reduce_sum(
            torch.tensor([window_loss, float(window_n)], device=self.rt.device, dtype=torch.float64))
        sums.add(float(stats[0]), int(stats[1]))
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{sums.mean_loss():.4f}", lr=f"{lr:.2e}",
                        img_s=f"{sums.images / max(sums.time, 1e-9):.1f}")
        bar.update(1)  # after the postfix, so a progress line shows this update's loss and lr
        if self.tb is not None and self.num_updates % 50 == 0:
            self.tb.add_scalar("train/loss", float(stats[0] / max(stats[1], 1)), self.num_updates)
            self.tb.add_scalar("train/lr", lr, self.num_updates)

    def _sync_norm_stats(self) -> None:
        """BatchNorm running statistics are per process; average (or take rank 0's) so every rank
        validates and saves the same model."""
        mode = self.cfg["train"]["dist_bn"]
        if not self.rt.distributed or mode == "none":
            return
        from timm.utils import distribute_bn

        distribute_bn(unwrap_model(self.model), self.rt.world_size, reduce=mode == "reduce")
        if self.ema is not None:
            distribute_bn(self.ema.module, self.rt.world_size, reduce=mode == "reduce")

    def _validate(self) -> Dict[str, Any]:
        """Metrics of the model (``val_*``) and of its EMA (``ema_val_*``), in fp32 unless
        ``train.val_amp`` (then under the training autocast); ``val_precision`` says which."""
        val_rt = self.rt if self.cfg["train"]["val_amp"] else dataclasses.replace(self.rt, amp_dtype=None)
        out: Dict[str, Any] = {"val_precision": _PRECISION_NAMES[val_rt.amp_dtype]}
        models = [("val_", unwrap_model(self.model))]
        if self.ema is not None:
            models.append(("ema_val_", self.ema.module))
        for prefix, model in models:
            was_training = model.training
            model.eval()
            batches = self._batches(self.val_loader)
            if self.dry_run:
                batches = (b for i, b in zip(range(2), batches))
            with torch.no_grad(), val_rt.autocast():
                metrics = self.task.evaluate(model, batches, val_rt)
            model.train(was_training)
            out.update({prefix + k: v for k, v in metrics.items()})
        return out

    def _val_metrics(self) -> Optional[Dict[str, Dict[str, float]]]:
        """``{"raw": {...}, "ema": {...}}`` of the most recent validation in the history (no ``ema``
        without EMA), or None before the first validation."""
        for record in reversed(self.history):
            raw = {k[4:]: float(v) for k, v in record.items() if k.startswith("val_") and _is_number(v)}
            if raw:
                out = {"raw": raw}
                ema = {k[8:]: float(v) for k, v in record.items() if k.startswith("ema_val_") and _is_number(v)}
                if ema:
                    out["ema"] = ema
                return out
        return None

    def _better_weights(self) -> str:
        """``"ema"`` or ``"raw"``: the weights whose latest validation scored better on the task's metric.
        The raw weights on a tie, without validation of both, and without EMA: the rule of
        :func:`pale.io.select_weights`, so that an export and ``--weights best`` on its checkpoint agree."""
        latest = self._val_metrics()
        if self.ema is None or not latest or "ema" not in latest:
            return "raw"
        key = self.task.best_metric
        raw, ema = latest["raw"].get(key), latest["ema"].get(key)
        if raw is None or ema is None:
            return "raw"
        better = ema > raw if self.task.best_mode == "max" else ema < raw
        return "ema" if better else "raw"

    def _end_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        weights = self._better_weights()
        key = ("ema_val_" if weights == "ema" else "val_") + self.task.best_metric
        value = record.get(key)
        improved = value is not None and (
            not self.best or (value > self.best["value"] if self.task.best_mode == "max" else value < self.best["value"]))
        if improved:
            self.best = dict(metric=key, value=value, epoch=epoch + 1, weights=weights)
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        self._log(shown)
        self._save_last(epoch + 1, 0)
        if improved:
            self._save("best.pth", epoch + 1, 0)
            self._write(lambda: self._export_weights("best.safetensors"))

        def files() -> None:
            self._write_history()
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.tb.add_scalar(f"epoch/{k}", v, epoch + 1)
        self._write(files)

    def _interrupted(self, epoch: int, step: int, epoch_state: Optional[Mapping[str, Any]] = None) -> None:
        signum = self._stop_signal or signal.SIGTERM
        path = self.out_dir / "last.pth"
        if self._last_saved != (epoch, step):  # not saved at this very update already
            path = self._save_last(epoch, step, epoch_state)

        def files() -> None:
            if self.history:
                plot_curves(self.history, self.out_dir / "curves.png", self.task.curve_metrics)
        self._write(files)
        name = signal.Signals(signum).name
        requeue = " (exit status 138: requeue the job)" if signum == getattr(signal, "SIGUSR1", None) else ""
        self._log(f"stopped by {name}{requeue} at epoch {epoch + 1 if step else epoch}, update {step}; checkpoint "
                  f"saved to {path}; continue with: {self.task.train_command} --resume {path} (or the same command "
                  f"with --resume auto)")
        raise TrainingInterrupted(128 + int(signum))
