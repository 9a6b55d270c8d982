"""The training loop: :class:`Trainer` runs a :class:`~pale.train.task.Task` for a recipe.

Per epoch: micro-batches under autocast, their backward (DDP syncs on the last of an update), then
once per update one wait for the host (the update's loss sums, its finite-loss check and the stop
flag, summed over ranks in one ``all_reduce``), the optimizer update (:meth:`Trainer.before_optimizer_step` and
:meth:`Trainer.after_optimizer_step` around it), then validation of the model and its EMA, the
checkpoints of :mod:`pale.train.checkpoints`, and SIGTERM / SIGUSR1 / Ctrl-C handling that saves
first. Validation runs in fp32 unless ``train.val_amp``; ``val_precision`` in the history says which.
With ``train.compile`` the training forward and backward run through ``torch.compile``; validation
runs the module eagerly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils import random_seed, unwrap_model
from torch.utils.data import DataLoader

from ..files import output_folder
from ..models.attention_kernels import use_kernel
from ..progress import log, progress
from .build import build_ema, build_loaders, build_model, build_optimizer, build_scheduler, wrap_distributed
from .checkpoints import (EpochSums, better_weights, find_resume, restore_checkpoint, restore_rank_buffers,
                          runtime_record, save_checkpoint)
from .data import AugmentationError, BadImageError, clean_worker_error, shut_down_workers
from .recipe import RecipeError
from .run_folder import RunFolder
from .runtime import PRECISION_NAMES, check_attention_kernel, quiet_worker_warning, setup_runtime, sync_norm_stats
from .stopping import NonFiniteLossError, StopSignals
from .task import Config, Task

__all__ = ["Trainer"]


class Trainer:
    """Runs ``task`` with recipe ``cfg``, writing into ``out_dir`` (rank 0 only). Builds everything at
    construction (device, model, loaders, optimizer, scheduler, EMA, the state of a resumed run);
    :meth:`fit` trains.

    Args:
        task: the problem (model, data, loss, evaluation).
        cfg: the resolved recipe (engine sections + the task's).
        out_dir: run folder; must not hold another run unless resuming.
        resume: a checkpoint of this run (or its run folder: the newest checkpoint that loads) to continue
            exactly; or ``"auto"`` (also recipe key ``train.resume``): continue the run in ``out_dir`` from its
            newest checkpoint that loads, start it when there is none, refuse a folder whose run has another
            recipe (keys in :data:`~pale.train.checkpoints.RESTART_KEYS` aside).
        dry_run: one epoch of two updates and two evaluation batches, to check a setup; writes nothing.
        checkpoint: the content of ``resume`` when the caller has read it already (not read again).
    """

    def __init__(self, task: Task, cfg: Config, out_dir: Any, resume: Any = None, dry_run: bool = False,
                 checkpoint: Optional[Dict[str, Any]] = None):
        self.task, self.cfg, self.dry_run = task, cfg, dry_run
        tcfg = cfg["train"]
        if tcfg["resume"] not in (None, "auto"):
            raise RecipeError(f"train.resume must be null or auto, got {tcfg['resume']!r} (a checkpoint to "
                              f"continue is given with --resume PATH)")
        self.out_dir = output_folder(out_dir, "run folder")
        found = find_resume(self.out_dir, cfg, resume, checkpoint, dry_run, task.train_command)
        self.resume_path: Optional[Path] = found[0] if found else None

        self.rt = rt = setup_runtime(tcfg["device"], tcfg["amp"], bool(tcfg["channels_last"]), bool(tcfg["tf32"]))
        self.attention_kernel = check_attention_kernel(str(tcfg["attention_kernel"]), rt.device)
        self.folder = RunFolder(self.out_dir, tcfg["keep_checkpoints"], rt.is_main and not dry_run,
                                task.train_command)
        seed = int(cfg["seed"])
        random_seed(seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(task, cfg, rt)
        random_seed(seed, rt.rank)  # different drop-path / Mixup draws on each rank
        loaders = build_loaders(task, cfg, rt, seed, self.log)
        self.train_loader: DataLoader = loaders.train
        self.train_sampler = loaders.sampler
        self.val_loader: Optional[DataLoader] = loaders.val
        self.batch_per_device, self.accum = loaders.batch_per_device, loaders.accum
        self.updates_per_epoch = loaders.updates_per_epoch
        # timm's cooldown: the schedule spans `epochs`, then `sched.cooldown_epochs` more train at min_lr
        self.epochs = int(cfg["epochs"]) + int(cfg["sched"]["cooldown_epochs"])
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
        self.ema = build_ema(model, cfg, self.epochs * self.updates_per_epoch)
        self.model: nn.Module = model

        # where the run stands: a fresh start, or what the checkpoint restores
        self.start_epoch, self.start_step, self.num_updates = 0, 0, 0
        self.epoch_state: Dict[str, Any] = {}       # running sums of the epoch a checkpoint interrupted
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {}
        self.skipped_images = 0                      # on this rank, since the start (rank 0: plus the run's before)
        self.nonfinite_skipped = 0
        self.last_saved: Optional[Tuple[int, int]] = None  # (epoch, step) of the newest last.pth
        self.tb: Any = None                          # TensorBoard's SummaryWriter, opened by fit()
        self.stop = StopSignals(rt)
        if found:
            restore_checkpoint(self, *found)
        if rt.distributed:
            self.model = wrap_distributed(self.model, rt, bool(tcfg["sync_bn"]), task.ddp_kwargs)
            if found:
                restore_rank_buffers(self, found[1])
        if tcfg["compile"]:
            # the DDP-wrapped model, as PyTorch recommends (its DDPOptimizer cuts the graph at the gradient
            # buckets, so that their all-reduce overlaps the backward); checkpoints, the EMA and validation
            # use the module inside (``unwrap_model``): saved weights carry no ``_orig_mod.`` prefix
            self.model = torch.compile(self.model)

    # -- hooks --

    def before_optimizer_step(self) -> None:
        """Called at each optimizer update, before it: the update's gradients are complete in the
        parameters' ``.grad`` (summed over the accumulated micro-batches and averaged over ranks; under
        fp16 still multiplied by the GradScaler's scale) and not yet clipped. An override may read or
        change them and the weights (e.g. sharpness-aware minimisation puts back the weights it
        perturbed). Runs on every rank. Does nothing here."""

    def after_optimizer_step(self) -> None:
        """Called at each optimizer update, after it: the optimizer has stepped, the gradients are
        cleared, :attr:`num_updates` counts this update, and the scheduler and the EMA have advanced.
        Runs on every rank. Does nothing here."""

    # -- checkpoints (every rank calls these; rank 0 writes) --

    def _save_last(self, epoch: int, step: int, epoch_state: Optional[Mapping[str, Any]] = None) -> Path:
        """The rotating ``last.pth``: older copies move down only once the new file is complete."""
        path = save_checkpoint(self, "last.pth", epoch, step, epoch_state, rotate=True)
        self.last_saved = (epoch, step)
        return path

    def _better_weights(self) -> str:
        return better_weights(self.history, self.task.best_metric, self.task.best_mode)

    def _export_weights(self, name: str) -> None:
        """The better of the model and its EMA by the latest validation, as safetensors."""
        if self.folder.active:
            which = self._better_weights()
            model = self.ema.module if which == "ema" and self.ema is not None else unwrap_model(self.model)
            self.folder.export_weights(name, model, self.task.model_info(), which)

    # -- logging, signals, batches --

    def log(self, text: str) -> None:
        """A message on stderr from rank 0."""
        if self.rt.is_main:
            log(text)

    def _batches(self, loader: DataLoader) -> Iterator[Any]:
        """Batches of ``loader`` without the skipped-image bookkeeping (counted here)."""
        with quiet_worker_warning():
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

    def total_skipped(self) -> int:
        """Images skipped as unreadable, summed over ranks (every rank calls this)."""
        t = torch.tensor([float(self.skipped_images)], device=self.rt.device)
        return int(self.rt.all_reduce_sum(t).item())

    # -- the loop --

    def fit(self) -> Dict[str, Any]:
        """Train to the last epoch (from the resume point), validating and checkpointing each epoch.

        Returns the summary also written to ``summary.json``.
        """
        rt, tcfg = self.rt, self.cfg["train"]
        epochs = 1 if self.dry_run else self.epochs
        self.folder.write_config(self.cfg)
        if self.resume_path:
            self.folder.write_history(self.history)
            self.log(f"resuming {self.resume_path} at epoch {self.start_epoch + 1}, update {self.start_step}"
                      if self.start_epoch < epochs else f"{self.resume_path} has finished all {epochs} epochs: "
                      f"nothing left to train")
        if tcfg["tensorboard"]:
            self.tb = self.folder.tensorboard()
        self.log(f"{rt.world_size} process(es) on {rt.device.type}, amp={runtime_record(rt)['amp']}, batch "
                  f"{self.cfg['batch_size']} = {self.batch_per_device} x {rt.world_size} x {self.accum}, lr "
                  f"{self.optimizer.defaults['lr']:.3g}, {self.updates_per_epoch} updates/epoch"
                  + (f", EMA decay {self.ema.decay:.6g}" if self.ema is not None else ""))
        started = time.time()
        kernel = self.attention_kernel
        with self.stop.handled(), (use_kernel(kernel) if kernel != "auto" else contextlib.nullcontext()):
            try:
                for epoch in range(self.start_epoch, epochs):
                    record = self._train_epoch(epoch, epochs)
                    sync_norm_stats([unwrap_model(self.model)] + ([self.ema.module] if self.ema else []), self.rt,
                                    self.cfg["train"]["dist_bn"])
                    last = epoch + 1 == epochs
                    if self.val_loader is not None and (last or (epoch + 1) % int(tcfg["eval_every"]) == 0):
                        record.update(self._validate())
                    self.history.append(record)
                    self._end_epoch(epoch, record)
                    if self.stop.requested():
                        self._interrupted(epoch + 1, 0)
            finally:
                shut_down_workers(self.train_loader)
                shut_down_workers(self.val_loader)
        total_skipped = self.total_skipped()
        summary = dict(epochs=epochs, best=self.best, last=self.history[-1] if self.history else {},
                       skipped_images=total_skipped, skipped_nonfinite_batches=self.nonfinite_skipped,
                       train_time_s=round(time.time() - started, 1))
        if total_skipped:
            self.log(f"skipped {total_skipped} unreadable image(s) (data.skip_bad_images)")
        self._export_weights("last.safetensors")
        self.folder.write_summary(summary)
        self.folder.draw_curves(self.history, self.task.curve_metrics)
        if self.tb is not None:
            self.tb.close()
        return summary

    def _train_epoch(self, epoch: int, epochs: int) -> Dict[str, Any]:
        rt, tcfg = self.rt, self.cfg["train"]
        model, opt = self.model, self.optimizer
        model.train()
        start_step = self.start_step if epoch == self.start_epoch else 0
        sums = EpochSums.from_state(self.epoch_state if start_step else {})
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.set_start(start_step * self.accum * self.batch_per_device)
        total_updates = 2 if self.dry_run else self.updates_per_epoch
        bar = progress(total=total_updates, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}",
                       unit="updates", enabled=rt.is_main and bool(tcfg["progress"]))
        step, micro = start_step, 0
        # this update's sums, kept on the device so that a micro-batch costs no wait for the host:
        # loss x images, images, non-finite losses, and (set at the update) whether a stop signal came
        window = torch.zeros(4, dtype=torch.float64, device=rt.device)
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
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss = loss.detach().double()
            window[0] += loss * n
            window[1] += n
            window[2] += (~torch.isfinite(loss)).double()
            micro += 1
            if not sync:
                continue
            # the update's one wait for the host: its sums and flags, summed over ranks in one all_reduce
            window[3].fill_(self.stop.flag)
            loss_sum, count, nonfinite, stop = self.rt.all_reduce_sum(window).tolist()
            window.zero_()
            micro = 0
            if nonfinite:
                opt.zero_grad(set_to_none=True)
                self._nonfinite(loss_sum, epoch, step)
            else:
                self._optimizer_step()
                step += 1
                self._after_update(sums, loss_sum, int(count), bar)
                if every and self.num_updates % every == 0 and step < total_updates:  # the epoch's end saves anyway
                    self._save_last(epoch, step, sums.state())
            if stop:
                bar.close()
                self._interrupted(epoch, step, sums.state())
        bar.close()
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1)
        return dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"], train_loss=sums.mean_loss(),
                    train_images_per_s=round(sums.images / max(sums.time, 1e-9), 2))

    def _nonfinite(self, loss: float, epoch: int, step: int) -> None:
        """An update whose loss was not finite on some rank (in some micro-batch): stop
        (``train.on_nonfinite=stop``, naming the last good checkpoint), or skip it (its gradients are
        dropped, the update is not counted) and count its batch as skipped.

        Checked once per update, after the backward passes, so that a micro-batch does not wait for the
        host: the optimizer never steps on the non-finite gradients, and every rank decides alike."""
        if self.cfg["train"]["on_nonfinite"] == "stop":
            keep = "no checkpoint was written yet"
            if self.last_saved is not None:
                keep = (f"the last good checkpoint is {self.out_dir / 'last.pth'} (at epoch "
                        f"{self.last_saved[0] + 1}, update {self.last_saved[1]})")
            raise NonFiniteLossError(
                f"loss is {loss} at epoch {epoch + 1}, update {step + 1} (lr "
                f"{self.optimizer.param_groups[0]['lr']:.3g}); training stopped and {keep}. Lower the learning "
                f"rate, set train.clip_grad, or pass --set train.on_nonfinite=skip to skip such batches")
        self.nonfinite_skipped += 1
        self.log(f"skipping a batch with a non-finite loss at epoch {epoch + 1}, update {step + 1}")

    def _optimizer_step(self) -> None:
        """One update from the accumulated gradients: :meth:`before_optimizer_step`, clip, step (through
        the GradScaler under fp16), advance the per-update schedule and the EMA, :meth:`after_optimizer_step`.

        Not timm's ``NativeScaler``, which runs backward and step in one call: here the backward of each
        micro-batch comes first, and the step only on the last, once the update's losses are known finite
        on every rank."""
        from timm.utils import dispatch_clip_grad

        tcfg, opt = self.cfg["train"], self.optimizer
        self.before_optimizer_step()
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
        self.after_optimizer_step()

    def _after_update(self, sums: EpochSums, loss_sum: float, count: int, bar: Any) -> None:
        """Add the update's loss x images and images (summed over ranks) to the epoch's sums; report it to
        the progress bar and TensorBoard."""
        sums.add(loss_sum, count)
        lr = self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{sums.mean_loss():.4f}", lr=f"{lr:.2e}",
                        img_s=f"{sums.images / max(sums.time, 1e-9):.1f}")
        bar.update(1)  # after the postfix, so a progress line shows this update's loss and lr
        if self.tb is not None and self.num_updates % 50 == 0:
            self.tb.add_scalar("train/loss", loss_sum / max(count, 1), self.num_updates)
            self.tb.add_scalar("train/lr", lr, self.num_updates)

    def _validate(self) -> Dict[str, Any]:
        """Metrics of the model (``val_*``) and of its EMA (``ema_val_*``), in fp32 unless
        ``train.val_amp`` (then under the training autocast); ``val_precision`` says which."""
        val_rt = self.rt if self.cfg["train"]["val_amp"] else dataclasses.replace(self.rt, amp_dtype=None)
        out: Dict[str, Any] = {"val_precision": PRECISION_NAMES[val_rt.amp_dtype]}
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

    def _end_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        weights = self._better_weights()
        key = ("ema_val_" if weights == "ema" else "val_") + self.task.best_metric
        value = record.get(key)
        improved = value is not None and (
            not self.best or (value > self.best["value"] if self.task.best_mode == "max" else value < self.best["value"]))
        if improved:
            self.best = dict(metric=key, value=value, epoch=epoch + 1, weights=weights)
        self.log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        self._save_last(epoch + 1, 0)
        if improved:
            save_checkpoint(self, "best.pth", epoch + 1, 0)
            self._export_weights("best.safetensors")
        self.folder.write_history(self.history)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(f"epoch/{k}", v, epoch + 1)

    def _interrupted(self, epoch: int, step: int, epoch_state: Optional[Mapping[str, Any]] = None) -> None:
        exit_ = self.stop.interrupted()
        path = self.out_dir / "last.pth"
        if self.last_saved != (epoch, step):  # not saved at this very update already
            path = self._save_last(epoch, step, epoch_state)
        self.folder.draw_curves(self.history, self.task.curve_metrics)
        name = signal.Signals(exit_.code - 128).name
        requeue = " (exit status 138: requeue the job)" if name == "SIGUSR1" else ""
        self.log(f"stopped by {name}{requeue} at epoch {epoch + 1 if step else epoch}, update {step}; checkpoint "
                 f"saved to {path}; continue with: {self.task.train_command} --resume {path} (or the same command "
                 f"with --resume auto)")
        raise exit_
