"""Data plumbing shared by every task: image folders with clear errors, bad-image skipping, and
samplers whose order (and per-sample augmentation) depends only on (seed, epoch, index), so a run
resumed in the middle of an epoch sees exactly the batches an uninterrupted run would.

* :func:`scan_image_folder` -- ``root/<class>/<image>`` with errors naming the missing folder, the empty
  class folder, or the root without classes.
* :class:`ImageFolderDataset` -- loads with PIL; an unreadable image raises :class:`BadImageError` with its
  path, or (``skip_bad=True``) yields ``None``, which :class:`SkipCollate` drops and counts. An error
  inside the transform raises :class:`AugmentationError` naming the transform step and the image.
* :class:`SeededDataset` + :class:`EpochSampler` -- the training sampler yields ``(epoch, index)``;
  the wrapper seeds ``random``, ``numpy`` and ``torch`` from ``(seed, epoch, index)`` before calling the
  task's dataset, so augmentations do not depend on worker count, worker order, or where a run resumed.
* :class:`ShardSampler` -- evaluation: each rank takes every ``world``-th sample, no padding, so metrics
  summed over ranks count every sample exactly once.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..errors import InputError, MissingFileError
from ..images import BadImageError, find_images, load_image

__all__ = ["BadImageError", "AugmentationError", "scan_image_folder", "ImageFolderDataset", "load_image",
           "SeededDataset", "EpochSampler", "ShardSampler", "SkipCollate", "clean_worker_error", "usable_cores",
           "loader_workers", "ignore_stop_signals", "shut_down_workers"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_workers(setting: Any, processes_per_node: int = 1) -> int:
    """Data loader processes per training process: ``setting`` when it is a number, else (``None``)
    this process's share of the cores minus the one it computes on, at most 8 (0: load in the main
    process)."""
    if setting is None:
        share = usable_cores() // max(1, processes_per_node)
        return max(0, min(8, share - 1))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise InputError(f"train.workers must be a number >= 0 or null (from the cores), got {setting!r}")
    return setting


class AugmentationError(InputError):
    """A transform failed on an image (the message names the step and the file)."""


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: the worker ignores SIGINT, SIGTERM and SIGUSR1.

    Ctrl-C in a terminal, ``timeout`` and Slurm signal every process of the job, the loader workers
    too. The training process catches these signals, finishes its update and saves ``last.pth``; a
    worker killed by the same signal made PyTorch's SIGCHLD handler raise inside that save, which was
    lost. The workers still exit when the training process shuts its loaders down, or dies.
    """
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def shut_down_workers(loader: Optional[DataLoader]) -> None:
    """End the worker processes that a loader with ``persistent_workers`` keeps between epochs (in its
    ``_iterator``). They ignore SIGTERM (:func:`ignore_stop_signals`): left alive until Python exits,
    they block multiprocessing's exit hook, which terminates daemonic children with SIGTERM and then
    waits for them, so a run that ended in an exception hung after printing its traceback."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()  # asks each worker to stop, and waits a few seconds for it
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():  # stuck in a read: SIGTERM would be ignored
            worker.kill()
            worker.join()
    loader._iterator = None


def failing_step(transform: Any, err: BaseException) -> str:
    """The step of ``transform`` (a Compose or a single transform) in whose code ``err`` was raised,
    with the timm augmentation op inside it when there is one, e.g. ``AutoAugment (Posterize)``."""
    steps = list(getattr(transform, "transforms", None) or [transform])
    step, op = None, None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if any(owner is s for s in steps):
            step = owner
        if type(owner).__name__ == "AugmentOp":
            op = owner
        tb = tb.tb_next
    name = type(step if step is not None else transform).__name__
    return f"{name} ({op.name})" if op is not None and hasattr(op, "name") else name


def clean_worker_error(err: BaseException) -> str:
    """The last line of an error re-raised from a DataLoader worker (which carries the worker's
    traceback), so users see the one line that names the file."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = lines[-1]
        prefix = f"{type(err).__name__}: "
        text = text[len(prefix):] if text.startswith(prefix) else text
    return text


def scan_image_folder(root: Path, class_names: Optional[Sequence[str]] = None,
                      what: str = "data folder") -> Tuple[List[Tuple[str, int]], List[str]]:
    """Samples ``(path, class index)`` of ``root/<class>/<image>`` and the sorted class names.

    With ``class_names`` given (e.g. the training classes), the folder's classes must be among them
    and indices follow that list.
    """
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"{what} not found: {root}")
    if not root.is_dir():
        raise InputError(f"{what} is not a folder: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{what} {root} has no class sub-folders (expected {root}/<class>/<image>)")
    names = [p.name for p in folders]
    if class_names is None:
        class_names = names
    else:
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise InputError(f"{what} {root} has classes the model does not know: {', '.join(unknown[:10])} "
                             f"(known: {', '.join(list(class_names)[:10])}{', ...' if len(class_names) > 10 else ''})")
    index = {n: i for i, n in enumerate(class_names)}
    samples: List[Tuple[str, int]] = []
    for folder in folders:
        samples += [(str(f), index[folder.name]) for f in find_images(folder, "class folder", "class folder")]
    return samples, list(class_names)


class ImageFolderDataset(Dataset):
    """``(transform(image), class index)`` for each image of :func:`scan_image_folder`."""

    def __init__(self, root: Path, transform: Optional[Callable] = None, class_names: Optional[Sequence[str]] = None,
                 skip_bad: bool = False, mode: str = "RGB", what: str = "data folder"):
        self.root = Path(root)
        self.samples, self.class_names = scan_image_folder(self.root, class_names, what)
        self.transform = transform
        self.skip_bad = skip_bad
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        path, target = self.samples[index]
        try:
            img = load_image(path, self.mode)
        except BadImageError:
            if self.skip_bad:
                return None
            raise
        if self.transform is None:
            return img, target
        try:
            return self.transform(img), target
        except Exception as err:
            raise AugmentationError(f"transform {failing_step(self.transform, err)} failed on image {path} "
                                    f"({img.width}x{img.height}): {type(err).__name__}: {err}") from err


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Wraps a dataset so item ``(epoch, i)`` is drawn with all RNGs seeded from ``(seed, epoch, i)``.

    The caller's RNG states are restored afterwards, so in the main process (``workers=0``) the
    training loop's own randomness (Mixup, drop path) is not disturbed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        s = _sample_seed(self.seed, epoch, index)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s)
            torch.random.default_generator.manual_seed(s)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled with ``seed + epoch``, padded, sharded by rank) that yields
    ``(epoch, index)`` for :class:`SeededDataset` and can start after the first ``start`` samples of
    this rank's share (to resume mid-epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every sample exactly once over all ranks, in order."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipCollate:
    """Collate that drops ``None`` items (skipped bad images); returns ``(batch or None, n_skipped)``."""

    def __init__(self, collate_fn: Optional[Callable[[List[Any]], Any]] = None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items: List[Any]) -> Tuple[Any, int]:
        kept = [it for it in items if it is not None]
        skipped = len(items) - len(kept)
        return (self.collate_fn(kept) if kept else None), skipped


def write_image_folder(root: Path, images: "np.ndarray", labels: Sequence[int], class_names: Sequence[str],
                       prefix: str = "img") -> Path:
    """Write uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` as PNGs into ``root/<class>/<prefix>_<i>.png``
    (each atomically)."""
    from PIL import Image

    from ..files import atomic_path

    root = Path(root)
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        with atomic_path(root / class_names[int(label)] / f"{prefix}_{i:05d}.png") as tmp:
            Image.fromarray(np.asarray(img, dtype=np.uint8)).save(tmp, format="PNG")
    return root
