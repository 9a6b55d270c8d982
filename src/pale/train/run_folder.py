"""The files of a run folder, each written atomically (:func:`pale.files.atomic_path`) by rank 0 only:
``config.yaml`` (the resolved recipe), the checkpoints (``last.pth`` rotating as ``last-1.pth``, ...,
``best.pth``), the exported weights (``best.safetensors``, ``last.safetensors``), ``metrics.jsonl`` (the
history), ``curves.png`` and ``summary.json``. A write that fails (a full disk, a folder that became
read-only) stops the run with a :class:`RunFolderError` naming the file and the cause; the files
written before it are whole, as the atomic writer leaves them."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch.nn as nn

from ..checkpoint import save_checkpoint
from ..files import atomic_savefig, atomic_write_json, atomic_write_text, save_safetensors
from ..errors import InputError, UserError
from .checkpoints import checkpoint_files
from .recipe import dump_recipe

__all__ = ["RunFolder", "RunFolderError", "plot_curves"]


class RunFolderError(UserError):
    """A file of the run folder could not be written; the run stopped, earlier files are whole."""


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """Losses (left) and the chosen metrics (right) against epoch, as a PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({k for h in history for k in h if k.endswith("loss")}):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o", label=key)
    for key in sorted({k for h in history for k in h if any(k == p + m for m in metrics for p in ("val_", "ema_val_"))}):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            ax_metric.plot(*zip(*pts), marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "validation")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_metric.set_ylabel("accuracy (%)" if any(m.startswith("top") for m in metrics) else "")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, dpi=100)
    finally:
        plt.close(fig)


def _write_failure(err: Exception) -> Optional[str]:
    """The cause of a failed write in words, or None for an error that is not one (a bug)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if isinstance(err, RuntimeError) and "PytorchStreamWriter" in str(err):  # torch.save's own writer
        return str(err).strip().splitlines()[-1]
    return None


class RunFolder:
    """The files of one run in ``path``, written only when ``active`` (rank 0, not a dry run).

    Args:
        path: the run folder.
        keep: how many rotating ``last*.pth`` checkpoints to keep (``train.keep_checkpoints``).
        active: whether this process writes.
        command: the command that continues the run, named when a write fails.
    """

    def __init__(self, path: Path, keep: int, active: bool, command: str = "pale train"):
        self.path, self.keep, self.active, self.command = Path(path), int(keep), active, command

    def write(self, name: str, fn: Callable[[Path], None]) -> Path:
        """``fn(path)`` writes ``path / name``; a failure to write becomes one :class:`RunFolderError`."""
        path = self.path / name
        if not self.active:
            return path
        try:
            fn(path)
        except (OSError, RuntimeError) as err:
            cause = _write_failure(err)
            if cause is None:
                raise
            kept = checkpoint_files(self.path)
            resume = (f"; the checkpoints saved before are whole: continue with {self.command} --resume {self.path}"
                      if kept else "")
            raise RunFolderError(f"cannot write {path}: {cause}; training stopped{resume}") from None
        return path

    def rotate(self) -> None:
        """``last.pth`` -> ``last-1.pth`` -> ... before a new ``last.pth``, keeping ``keep`` files.

        Called once the new checkpoint is complete on disk under a temporary name (a failed write rotates
        nothing). Renames are atomic; a crash between them leaves the newest checkpoint under the next
        name, which :func:`load_latest_checkpoint` finds."""
        names = [self.path / "last.pth"] + [self.path / f"last-{i}.pth" for i in range(1, self.keep)]
        for stale in set(checkpoint_files(self.path)) - set(names):
            stale.unlink()
        for newer, older in reversed(list(zip(names, names[1:]))):
            if newer.exists():
                os.replace(newer, older)

    def save_checkpoint(self, name: str, model: nn.Module, info: Mapping[str, Any], rotate: bool = False,
                        **entries: Any) -> Path:
        """A checkpoint of ``model`` described by ``info`` (``task.model_info()``) with ``entries``;
        ``rotate``: moves the older ``last*.pth`` down once the new one is complete."""
        info = dict(info)
        return self.write(name, lambda path: save_checkpoint(
            path, model, info.pop("model_name"), info.pop("model_kwargs"), info.pop("class_names", None),
            before_replace=self.rotate if rotate else None, **info, **entries))

    def export_weights(self, name: str, model: nn.Module, info: Mapping[str, Any], weights: str) -> Path:
        """``model``'s weights as safetensors with ``info`` and ``weights`` ("raw" or "ema") as metadata."""
        return self.write(name, lambda path: save_safetensors(model.state_dict(), path,
                                                                  metadata=dict(info, weights=weights)))

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        self.write("config.yaml", lambda path: atomic_write_text(path, dump_recipe(cfg)))

    def write_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
        self.write("metrics.jsonl", lambda path: atomic_write_text(path, text))

    def draw_curves(self, history: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> None:
        if history:
            self.write("curves.png", lambda path: plot_curves(history, path, metrics))

    def tensorboard(self) -> Any:
        """TensorBoard's ``SummaryWriter`` on ``tensorboard/`` (an event log appended to while the run
        goes, not written atomically), or None where this process does not write."""
        if not self.active:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError("train.tensorboard needs the tensorboard package "
                             "(pip install 'pale-transformer[tensorboard]')") from None
        return SummaryWriter(str(self.path / "tensorboard"))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.write("summary.json", lambda path: atomic_write_json(path, summary))
