"""Writing the files a user keeps, and reading torch and safetensors files without running code.

* Every write is atomic (:func:`atomic_path`): data goes to a temporary file in the target's
  directory, is flushed to disk, then renamed over the target, so an existing file is never left
  half-overwritten.
* Loading never executes pickled code: ``torch.load(..., weights_only=True)`` or safetensors. A
  file that cannot be used is a :class:`CheckpointError` naming it.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

from .errors import CheckpointError, InputError, MissingFileError

PathLike = Union[str, os.PathLike]

__all__ = ["PathLike", "output_folder", "atomic_path", "atomic_folder", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "atomic_savefig", "atomic_save_image", "save_torch", "load_torch",
           "save_safetensors", "load_safetensors"]


def output_folder(path: PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder to write into, refused in one line when it, or a folder above it, is an
    existing file (before anything is written: otherwise the first write fails deep inside)."""
    folder = Path(path)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise InputError(f"{what} {folder}: {part} is a file, not a folder")
            break
    return folder


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def _ordinary_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: PathLike, before_replace: Optional[Callable[[], None]] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    The one way ``pale`` writes a file a user keeps. After the caller has written the temporary
    file: its permissions are set to an ordinary new file's (``0o666`` minus the umask, whatever the
    writer created it with), its data is flushed to disk (``fsync``) BEFORE the rename, so a crash
    leaves the old file or the whole new one, then the directory entry is flushed too. On an
    exception the temporary file is removed and ``path`` is left as it was. ``before_replace`` runs
    once the new file is complete and on disk, just before the rename (e.g. to rotate older copies,
    so that a failed write leaves them as they were).
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"cannot write {target}: it is a folder; name a file")
    output_folder(target.parent, f"cannot write {target}: its folder")
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
        if before_replace is not None:
            before_replace()
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a new empty folder next to ``path``; on success it takes ``path``'s place whole.

    Like :func:`atomic_path` for a folder of files (a model folder): once the caller has filled it,
    every file gets an ordinary new file's permissions and is flushed to disk, then the folder is
    renamed to ``path``. An existing ``path`` is first renamed aside and removed only once the new
    folder is in place, so a crash leaves the old folder whole (at ``path``, or beside it as
    ``.NAME.*.old``) or the new one; on an exception ``path`` is left as it was.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"cannot write the folder {target}: it is a file")
    output_folder(target.parent, f"cannot write {target}: its folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        yield tmp
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0o700 -> what mkdir gives
        for f in sorted(tmp.rglob("*")):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)  # a rename may replace an empty folder
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    """``fig.savefig`` through a temporary file (format taken from ``path``'s suffix, PNG without one)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(f"cannot write a figure to {path}: .{fmt} is not a format matplotlib writes; "
                         f"use one of {', '.join('.' + f for f in sorted(supported))}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)


def atomic_save_image(pixels: Any, path: PathLike) -> None:
    """An ``(H, W[, 3])`` uint8 array as an image file through a temporary file (format from ``path``'s
    suffix, PNG without one)."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()  # ".png" -> "PNG", ...
    if suffix and suffix not in formats:
        raise InputError(f"cannot write an image to {path}: Pillow knows no {suffix} format; "
                         f"use e.g. .png, .jpg or .webp")
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format=formats.get(suffix, "PNG"))


def save_torch(obj: Any, path: PathLike, before_replace: Optional[Callable[[], None]] = None) -> None:
    """``torch.save`` atomically (``before_replace``: see :func:`atomic_path`)."""
    with atomic_path(path, before_replace) as tmp:
        torch.save(obj, tmp)


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"{what} is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} is empty: {p}")
    return p


def load_torch(path: PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    p = _require_file(path, "checkpoint")
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files of torch < 1.6 and plain torch pickles start with a pickle opcode
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        if p.suffix.lower() == ".onnx":
            raise CheckpointError(f"{p} is an ONNX graph, which pale's commands do not load: give them the .pth "
                                  f"checkpoint or .safetensors export it came from, and run the graph with "
                                  f"onnxruntime (docs/deploy.md)")
        raise CheckpointError(f"{p} is not a PyTorch checkpoint: neither a zip archive nor a pickle (it starts "
                              f"with {head!r}); expected a .pth that pale train or torch.save wrote")
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
