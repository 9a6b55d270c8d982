"""Safe file handling for everything ``pale`` reads and writes.

* Every write is atomic: data goes to a temporary file in the target's directory, is flushed to
  disk, then renamed over the target, so an existing file is never left half-overwritten.
* Loading never executes pickled code: ``torch.load(..., weights_only=True)`` or safetensors.
* Loading weights into a model reports every missing, unexpected and mis-shaped key at once.

Checkpoint layout (a ``.pth`` written by :func:`save_checkpoint`): a dict with ``model`` (state dict),
``model_name`` and ``model_kwargs`` (to rebuild it with ``timm.create_model``), ``class_names``, and
whatever training state the caller adds (``optimizer``, ``epoch``, ...). Weights-only exports are
``.safetensors`` files whose metadata holds ``model_name``, ``model_kwargs`` and ``class_names`` as JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

__all__ = [
    "CheckpointError", "WeightsMismatchError", "LoadReport", "atomic_path", "atomic_write_bytes", "atomic_write_text",
    "atomic_write_json", "atomic_savefig", "save_torch", "load_torch", "save_safetensors",
    "load_safetensors", "load_state_dict_file", "load_weights", "save_checkpoint", "read_model_file",
    "create_model_from_file",
]


class CheckpointError(ValueError):
    """A weights or checkpoint file that cannot be used (missing, truncated, corrupt, unsafe)."""


class WeightsMismatchError(CheckpointError):
    """A state dict that does not fit the model; :attr:`report` lists the differences."""

    def __init__(self, message: str, report: "LoadReport"):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """Keys that did not load: absent from the file, unknown to the model, or of another shape."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        lines = []
        if self.mismatched:
            lines.append(f"{len(self.mismatched)} keys with another shape (file vs model):")
            lines += [f"  {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched[:limit]]
        if self.missing:
            lines.append(f"{len(self.missing)} keys missing from the file: " + ", ".join(self.missing[:limit]))
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} keys the model does not have: " + ", ".join(self.unexpected[:limit]))
        return "\n".join(lines)


# ---- atomic writes -------------------------------------------------------------------------------

def _ordinary_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    The one way ``pale`` writes a file a user keeps. After the caller has written the temporary
    file: its permissions are set to an ordinary new file's (``0o666`` minus the umask, whatever the
    writer created it with), its data is flushed to disk (``fsync``) BEFORE the rename, so a crash
    leaves the old file or the whole new one, then the directory entry is flushed too. On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # After the writer: some (safetensors) replace the file they are given by their own.
        os.chmod(tmp_path, _ordinary_mode())
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_savefig(fig: Any, path: PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` through a temporary file (format taken from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)


# ---- torch / safetensors files -------------------------------------------------------------------

def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"{what} is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} is empty: {p}")
    return p


def load_torch(path: PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    p = _require_file(path, "checkpoint")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {p}: it holds objects other than tensors and plain containers, which "
            f"could run code when unpickled ({str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {p}: truncated or corrupt ({err})") from None


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Mapping[str, Any]] = None) -> None:
    """Save tensors as safetensors; metadata values are stored as JSON strings."""
    import safetensors.torch

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    # Serialised in memory, not save_file: that writes its own temporary file and renames it over
    # ours, with owner-only permissions.
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta))


def load_safetensors(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors and JSON-decoded metadata of a safetensors file."""
    from safetensors import safe_open

    p = _require_file(path, "weights file")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers and data
        raise CheckpointError(f"cannot read safetensors file {p}: truncated or corrupt ({err})") from None
    meta = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def read_model_file(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model state dict and the description (``model_name``, ``model_kwargs``, ``class_names``,
    ...) stored in a ``.safetensors`` export or a ``.pth`` checkpoint; EMA weights when present."""
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)
    obj = load_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict or a checkpoint dict")
    info = {k: v for k, v in obj.items() if k not in ("model", "model_ema", "state_dict", "optimizer",
                                                       "scheduler", "scaler", "rng")}
    for key in ("model_ema", "model", "state_dict"):
        if isinstance(obj.get(key), dict):
            return obj[key], info
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise CheckpointError(f"{path} has no model weights (expected a 'model' or 'state_dict' entry)")


def load_state_dict_file(path: PathLike) -> Dict[str, torch.Tensor]:
    return read_model_file(path)[0]


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                 source: str = "state dict") -> LoadReport:
    """Copy ``state_dict`` into ``model``.

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`WeightsMismatchError` listing all of them, and nothing is loaded. With ``strict=False``
    every key that fits is loaded and the report says what was left out.
    """
    own = model.state_dict()
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    report = LoadReport(
        missing=[k for k in own if k not in state_dict],
        unexpected=[k for k in state_dict if k not in own],
        mismatched=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                    if k in own and tuple(v.shape) != tuple(own[k].shape)])
    if strict and not report.ok:
        raise WeightsMismatchError(
            f"{source} does not fit {type(model).__name__}:\n{report.describe()}\n"
            f"(pass strict=False, or --non-strict to pale eval / pale predict, to load the keys that fit)", report)
    bad = {k for k, _, _ in report.mismatched}
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    model.load_state_dict(fitting, strict=False)
    return report


def save_checkpoint(path: PathLike, model: nn.Module, model_name: str, model_kwargs: Mapping[str, Any],
                    class_names: Optional[List[str]] = None, **extra: Any) -> None:
    """Write a ``.pth`` checkpoint (atomically) that :func:`create_model_from_file` can rebuild."""
    obj = dict(model=model.state_dict(), model_name=model_name, model_kwargs=dict(model_kwargs),
               class_names=list(class_names) if class_names is not None else None, **extra)
    save_torch(obj, path)


def create_model_from_file(path: PathLike, strict: bool = True, **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint or export describes and load its weights.

    Returns the model (in eval mode) and the file's description (``class_names`` etc.).
    """
    import timm

    import pale  # noqa: F401  (registers the models)

    state_dict, info = read_model_file(path)
    name = info.get("model_name")
    if not name:
        raise CheckpointError(f"{path} does not say which model it holds (no 'model_name'); "
                              f"build the model yourself and use pale.io.load_weights")
    kwargs = dict(info.get("model_kwargs") or {}, **overrides)
    model = timm.create_model(name, **kwargs)
    report = load_weights(model, state_dict, strict=strict, source=str(path))
    if not report.ok:
        warnings.warn(f"{path}: loaded the weights that fit; left out:\n{report.describe()}", stacklevel=2)
    return model.eval(), info
