"""The parts a :class:`~pale.train.trainer.Trainer` is made of, from the recipe: the task's model on the
device, the data loaders, timm's optimizer (``create_optimizer_v2``), scheduler (``create_scheduler_v2``)
and weight EMA (``ModelEmaV3``)."""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..errors import InputError, UserError
from .data import EpochSampler, SeededDataset, ShardSampler, SkipCollate, ignore_stop_signals, loader_workers, usable_cores
from .recipe import RecipeError, ema_decay, schedule_warnings
from .runtime import Runtime, quiet_worker_warning
from .task import Task

__all__ = ["resolved_lr", "build_optimizer", "build_scheduler", "build_ema", "build_model", "wrap_distributed", "Loaders",
           "build_loaders"]


def resolved_lr(cfg: Mapping[str, Any]) -> float:
    """``optim.lr`` if set, else ``lr_base`` scaled linearly by ``batch_size / lr_base_size``."""
    optim = cfg["optim"]
    if optim.get("lr") is not None:
        return float(optim["lr"])
    return float(optim["lr_base"]) * cfg["batch_size"] / optim["lr_base_size"]


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """timm's optimizer for the recipe at :func:`resolved_lr` (``optimizer.defaults["lr"]``): no weight
    decay on 1-D parameters (norms, biases) nor on the names in ``model.no_weight_decay()``."""
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
    """timm's scheduler (warm-up then ``sched.sched``), stepped per update unless ``sched.step_on_epochs``;
    None for ``sched.sched=none``.

    The warm-up lasts ``sched.warmup_epochs``, or ``sched.warmup_updates`` optimizer updates when
    set (dense recipes count it in iterations); ``multistep`` decays at ``sched.decay_milestones``.
    The schedule spans ``epochs``; the trainer adds ``sched.cooldown_epochs`` at ``min_lr`` (timm's
    cooldown). timm's schedulers are functions of the update count, so a resumed run gets the same rates.
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


def build_ema(model: nn.Module, cfg: Mapping[str, Any], total_updates: int) -> Optional[Any]:
    """timm's ``ModelEmaV3`` of ``model`` (None without ``ema.enabled``), its decay capped for a run of
    ``total_updates`` updates (:func:`pale.train.recipe.ema_decay`)."""
    from timm.utils import ModelEmaV3

    ecfg = cfg["ema"]
    if not ecfg["enabled"]:
        return None
    return ModelEmaV3(model, decay=ema_decay(ecfg, total_updates), use_warmup=bool(ecfg["warmup"]))


def build_model(task: Task, cfg: Mapping[str, Any], rt: Runtime) -> nn.Module:
    """The task's model on the device, with gradient checkpointing and channels-last as the recipe asks."""
    task.runtime = rt
    try:
        model = task.build_model()
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # a constructor refusing its arguments, e.g. 3 pale sizes for 4 stages
        raise RecipeError(f"the recipe's model settings (model.name, model.kwargs) do not build a model: "
                          f"{err}") from None
    if cfg["train"]["grad_checkpointing"]:
        if not hasattr(model, "set_grad_checkpointing"):
            raise InputError(f"{type(model).__name__} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def wrap_distributed(model: nn.Module, rt: Runtime, sync_bn: bool, ddp_kwargs: Mapping[str, Any]) -> nn.Module:
    """``model`` in DistributedDataParallel, its BatchNorms synchronised across ranks when ``sync_bn``.

    Buffers are not broadcast from rank 0 at every forward (DDP's default, one more collective per
    micro-batch): each rank's BatchNorm statistics follow its own batches, and ``train.dist_bn`` makes
    them equal at each epoch's end, before validation and checkpoints
    (:func:`pale.train.runtime.sync_norm_stats`); the model's other buffers are constants."""
    if sync_bn:
        if rt.device.type != "cuda":
            raise RecipeError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); "
                              "set train.sync_bn=false on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Depthwise convolution weights are (C, 1, k, k); oneDNN hands back their gradient with another stride
    # along the size-1 dim, the same memory layout, which DDP compares literally and warns about once per
    # process ("may impair performance"); it copies each gradient into its bucket whatever the strides.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = nn.parallel.DistributedDataParallel
    # newer PyTorch renames the flag (and then still broadcasts rank 0's buffers once, at the wrapping:
    # a resume puts each rank's own back afterwards, pale.train.checkpoints.restore_rank_buffers)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"
    return ddp(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
               **{no_sync: False, **ddp_kwargs})


@dataclass
class Loaders:
    """The training loader (its order survives a resume) and the sharded validation loader (or None)."""

    train: DataLoader
    sampler: EpochSampler
    val: Optional[DataLoader]
    batch_per_device: int   # samples per forward
    accum: int              # micro-batches per optimizer update
    updates_per_epoch: int


def build_loaders(task: Task, cfg: Mapping[str, Any], rt: Runtime, seed: int, warn: Callable[[str], None]) -> Loaders:
    """``batch_size`` = per device x processes x ``train.accum_steps``; ``warn`` gets the recipe's
    :func:`~pale.train.recipe.schedule_warnings` for this data and machine."""
    tcfg = cfg["train"]
    accum, total = int(tcfg["accum_steps"]), int(cfg["batch_size"])
    if total % (rt.world_size * accum):
        raise RecipeError(f"batch_size {total} is not divisible by {rt.world_size} processes x "
                          f"{accum} accumulation steps")
    per_device = total // (rt.world_size * accum)
    task.check_batch(per_device, rt)
    train_ds = task.train_dataset()
    sampler = EpochSampler(train_ds, rt.world_size, rt.rank, seed)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = loader_workers(tcfg["workers"], per_node)
    with quiet_worker_warning():
        train_loader = DataLoader(
            SeededDataset(train_ds, seed), batch_size=per_device, sampler=sampler,
            num_workers=workers, collate_fn=SkipCollate(task.collate_fn(True)), drop_last=True,
            pin_memory=rt.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
            # workers live across epochs (starting them cost ~2 s per epoch in the demo); the sampler
            # stays in this process and SeededDataset seeds every image from its (epoch, index) key, so
            # their age changes no draw
            persistent_workers=workers > 0)
    updates_per_epoch = (sampler.num_samples // per_device) // accum
    if updates_per_epoch == 0:
        raise InputError(f"the training set ({len(train_ds)} samples, {sampler.num_samples} per "
                         f"process) is smaller than one batch ({per_device} per process x "
                         f"{accum} accumulation steps); lower batch_size")
    for text in schedule_warnings(cfg, updates_per_epoch, len(train_ds), workers * per_node, usable_cores()):
        warn(f"warning: {text}")
    val_ds = task.val_dataset()
    val_loader = None
    if val_ds is not None:
        with quiet_worker_warning():
            val_loader = DataLoader(
                val_ds, batch_size=int(tcfg["eval_batch_size"] or 2 * per_device),
                sampler=ShardSampler(len(val_ds), rt.world_size, rt.rank),
                num_workers=workers, collate_fn=SkipCollate(task.collate_fn(False)),
                pin_memory=rt.device.type == "cuda", persistent_workers=workers > 0,
                worker_init_fn=ignore_stop_signals,
                # its own generator: without one, every new iterator draws its workers' seed from the
                # global RNG (drop path's), and a resumed run, whose first validation starts new
                # workers, would continue another random stream than the run it continues
                generator=torch.Generator().manual_seed(seed))
    return Loaders(train_loader, sampler, val_loader, per_device, accum, updates_per_epoch)
