"""Safe file handling for everything ``pale`` reads and writes.

* Every write is atomic: data goes to a temporary file in the target's directory, is flushed to
  disk, then renamed over the target, so an existing file is never left half-overwritten.
* Loading never executes pickled code: ``torch.load(..., weights_only=True)`` or safetensors.
* Loading weights into a model reports every missing, unexpected and mis-shaped key at once.

* Images load through one function, :func:`load_image`, and folders are searched through one,
  :func:`find_images`, with one list of extensions (torchvision's :data:`IMAGE_EXTENSIONS`).

Checkpoint layout (a ``.pth`` written by :func:`save_checkpoint`): a dict with ``model`` (state dict),
``model_name`` and ``model_kwargs`` (to rebuild it with ``timm.create_model``), ``class_names``, and
whatever training state the caller adds (``optimizer``, ``epoch``, ...). A training checkpoint may
also hold ``model_ema`` (the EMA weights), ``val_metrics`` (``{"raw": {metric: value}, "ema": {...}}``)
and ``best_metric`` (the metric name, higher is better); :func:`select_weights` picks one set from
them. Weights-only exports are ``.safetensors`` files whose metadata holds ``model_name``,
``model_kwargs`` and ``class_names`` (and ``weights``: which set they are) as JSON.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from torchvision.datasets.folder import IMG_EXTENSIONS as IMAGE_EXTENSIONS

from .errors import InputError, MissingFileError, settings_error

PathLike = Union[str, os.PathLike]
# IMAGE_EXTENSIONS: what find_images looks for in folders (torchvision's ImageFolder list; no .gif,
# whose files may hold many frames). A file named explicitly loads whatever its extension.

__all__ = [
    "IMAGE_EXTENSIONS", "WEIGHT_CHOICES", "BadImageError", "to_8bit", "load_image", "exif_turn_note", "find_images",
    "resolve_device", "select_weights", "CheckpointError", "WeightsMismatchError", "LoadReport", "output_folder", "output_stems",
    "atomic_path", "atomic_write_bytes", "atomic_write_text",
    "atomic_write_json", "atomic_savefig", "atomic_save_image", "save_torch", "load_torch", "save_safetensors",
    "load_safetensors", "load_state_dict_file", "load_weights", "save_checkpoint", "read_model_file",
    "describe_weights",
    "create_model_from_file",
]


class CheckpointError(InputError):
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


# ---- images and devices --------------------------------------------------------------------------

class BadImageError(InputError):
    """An image file that cannot be decoded."""


def to_8bit(img: Any) -> Any:
    """A 16-bit, 32-bit integer or float single-channel PIL image as 8-bit ``'L'``, scaled by its range;
    any other image as it is.

    Pillow's ``convert`` clips such images to 0-255 instead of scaling them: a 16-bit PNG (0-65535)
    comes out nearly white, a float image in [0, 1] black. Here 16-bit data keeps its high byte
    (as Pillow does for 16-bit RGB), ``'I'`` images with values above 255 are read as 16-bit, and
    float images in [0, 1] are scaled by 255 (others clipped to 0-255).
    """
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    import numpy as np
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if img.mode != "I" or values.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def load_image(path: PathLike, mode: str = "RGB") -> Any:
    """Open and fully decode an image as a PIL image in ``mode`` (``'RGB'``, ``'L'``, ...), upright:
    turned as its EXIF orientation says (a phone photo is stored sideways with a tag saying so; viewers
    and labelling tools show it turned, and OpenCV, which MMSegmentation and MMDetection read images with,
    turns it too). 16-bit and float images are scaled to 8 bits by their range (:func:`to_8bit`), not
    clipped.

    A missing file is a :class:`~pale.errors.MissingFileError`; anything PIL cannot decode is a
    :class:`BadImageError`; both name ``path``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not Path(path).is_file():
        raise MissingFileError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # a malformed EXIF block must not make a decodable image unreadable
                pass
            return to_8bit(img).convert(mode)
    except UnidentifiedImageError:
        raise BadImageError(f"not an image (or an unsupported format): {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from None


def exif_turn_note(path: PathLike) -> str:
    """For size-mismatch errors: ``' (turned upright by its EXIF orientation tag; ...)'`` if the image at
    ``path`` carries a tag that turns it by 90 or 270 degrees, else ``''``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            orientation = img.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return ""
    if orientation not in (5, 6, 7, 8):
        return ""
    return (" (turned upright by its EXIF orientation tag, as viewers show it: annotations must be made on the "
            "upright image; or remove the tag, e.g. PIL.ImageOps.exif_transpose and save)")


def output_stems(files: List[Path]) -> Dict[Path, str]:
    """A distinct name for each input's outputs: its path relative to the inputs' common folder, without
    the suffix (``a/x.png`` and ``b/x.png`` -> ``a/x``, ``b/x``); where two files in one folder share a
    stem, the suffix is kept (``x_jpg``, ``x_png``). A single folder of distinct names gives the plain
    stems."""
    if not files:
        return {}
    resolved = {f: Path(f).resolve() for f in files}
    common = Path(os.path.commonpath([str(r.parent) for r in resolved.values()]))
    relative = {f: r.relative_to(common) for f, r in resolved.items()}
    plain = {f: r.with_suffix("").as_posix() for f, r in relative.items()}
    counts = collections.Counter(plain.values())
    return {f: (stem if counts[stem] == 1 else f"{stem}_{relative[f].suffix.lstrip('.').lower()}")
            for f, stem in plain.items()}


def find_images(inputs: Any, what: str = "image or folder", folder: str = "folder") -> List[Path]:
    """The image files named: files as given, folders searched recursively for
    :data:`IMAGE_EXTENSIONS` (sorted; hidden files and folders, named ``.*``, left out). A path that does
    not exist (``what``), or a folder without images (``folder``), is an error naming it."""
    found: List[Path] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        p = Path(item)
        if not p.exists():
            raise MissingFileError(f"{what} not found: {p}")
        if p.is_dir():
            # hidden files and folders are skipped: macOS's "._x.jpg" resource forks, .ipynb_checkpoints copies
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise InputError(f"{folder} {p} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
            found += files
        else:
            found.append(p)
    if not found:
        raise InputError("no images given")
    return found


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``'auto'``: CUDA when available, else the CPU; otherwise the device named, checked."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here (use --device auto or cpu)")
    return dev


# ---- atomic writes -------------------------------------------------------------------------------

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


def _ordinary_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


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


# ---- torch / safetensors files -------------------------------------------------------------------

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


#: ``--weights`` choices: the set that validated better, the EMA weights, the raw (trained) weights.
WEIGHT_CHOICES = ("best", "ema", "raw")


def select_weights(obj: Mapping[str, Any], weights: str = "best",
                   source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], str, str]:
    """One set of weights from a checkpoint dict: ``(state dict, 'raw' or 'ema', why)``.

    ``obj`` holds ``model`` (raw weights) and, from a training run with EMA, ``model_ema``,
    ``val_metrics`` (``{"raw": {...}, "ema": {...}}``) and ``best_metric`` (higher is better).

    * ``'raw'`` / ``'ema'``: that set; asking for EMA weights a file does not hold is an error.
    * ``'best'``: the set whose ``val_metrics[set][best_metric]`` is higher (a tie goes to raw); a
      checkpoint without ``val_metrics`` uses the last entry of its ``history`` when that entry
      validated these very weights. With one set only, that one. With both sets but no recorded validation of both, the raw weights:
      they are what the optimiser trained, while EMA weights of a short run can still sit near the
      initialisation; the reason then says the choice was not validated.
    """
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHT_CHOICES)}")
    raw, ema = obj.get("model"), obj.get("model_ema")
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source} has no model weights (expected a 'model' entry)")
    has_ema = isinstance(ema, Mapping)
    if weights == "ema":
        if not has_ema:
            raise CheckpointError(f"{source} holds no EMA weights (trained without EMA); use --weights raw or best")
        return dict(ema), "ema", "EMA weights, as asked"
    if weights == "raw":
        return dict(raw), "raw", "raw weights, as asked"
    if not has_ema:
        return dict(raw), "raw", "the only weights in the file"
    metric, scores = obj.get("best_metric"), obj.get("val_metrics")
    if not isinstance(scores, Mapping):
        metric, scores = _metrics_from_history(obj)
    values = {k: (scores.get(k) or {}).get(metric) if isinstance(scores.get(k), Mapping) else None
              for k in ("raw", "ema")}
    if metric and all(isinstance(v, (int, float)) for v in values.values()):
        if values["ema"] == values["raw"]:
            return dict(raw), "raw", f"validated as well as the EMA weights ({metric} {values['raw']:.4g}); a tie goes to raw"
        pick = "ema" if values["ema"] > values["raw"] else "raw"
        return dict(ema if pick == "ema" else raw), pick, \
            f"validated better: {metric} {values[pick]:.4g} ({pick}) vs {values['raw' if pick == 'ema' else 'ema']:.4g}"
    return dict(raw), "raw", ("raw weights chosen without validation: the file records no validation "
                              "metrics of both sets (pass --weights ema for the EMA weights)")


def _metrics_from_history(obj: Mapping[str, Any]) -> Tuple[Optional[str], Dict[str, Dict[str, float]]]:
    """``(metric, {"raw": {...}, "ema": {...}})`` from the per-epoch ``history`` that checkpoints
    without ``val_metrics`` keep (``val_<m>`` / ``ema_val_<m>`` keys), when its last entry is the
    validation of exactly these weights (saved at the end of that epoch)."""
    history, best = obj.get("history"), obj.get("best")
    if not (isinstance(history, list) and history and isinstance(history[-1], Mapping) and isinstance(best, Mapping)):
        return None, {}
    last = history[-1]
    if last.get("epoch") != obj.get("epoch") or obj.get("step", 0) != 0:
        return None, {}
    metric = str(best.get("metric", "")).removeprefix("ema_val_").removeprefix("val_")
    return metric, {"raw": {metric: last.get(f"val_{metric}")}, "ema": {metric: last.get(f"ema_val_{metric}")}}


def _single_set(state: Dict[str, torch.Tensor], info: Dict[str, Any], weights: str,
                source: str) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """A file with one set of weights (a state dict or an export); ``info['weights']`` may say which."""
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"unknown weights {weights!r}; expected one of {', '.join(WEIGHT_CHOICES)}")
    held = info.get("weights") if info.get("weights") in ("raw", "ema") else "raw"
    if weights not in ("best", held):
        raise CheckpointError(f"{source} holds one set of weights ({held}), not {weights} ones; "
                              f"use --weights best or {held}")
    return state, held, "the only weights in the file"


def read_model_file(path: PathLike, weights: str = "best") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The model state dict and the description (``model_name``, ``model_kwargs``, ``class_names``,
    ...) stored in a ``.safetensors`` export or a ``.pth`` checkpoint.

    ``weights`` picks the set of a checkpoint holding raw and EMA weights (:func:`select_weights`);
    the description then has ``weights`` (``'raw'`` or ``'ema'``) and ``weights_reason``.
    """
    if str(path).endswith(".safetensors"):
        state, info = load_safetensors(path)
        state, which, why = _single_set(state, info, weights, str(path))
        return state, dict(info, weights=which, weights_reason=why)
    obj = load_torch(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict or a checkpoint dict")
    info = {k: v for k, v in obj.items() if k not in ("model", "model_ema", "state_dict", "optimizer",
                                                       "scheduler", "scaler", "rng")}
    if isinstance(obj.get("model"), dict):
        state, which, why = select_weights(obj, weights, str(path))
    elif isinstance(obj.get("state_dict"), dict):
        state, which, why = _single_set(obj["state_dict"], info, weights, str(path))
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, which, why = _single_set(obj, {}, weights, str(path))
        info = {}
    else:
        raise CheckpointError(f"{path} has no model weights (expected a 'model' or 'state_dict' entry)")
    return state, dict(info, weights=which, weights_reason=why)


def describe_weights(info: Mapping[str, Any]) -> str:
    """The line commands print about the weights they loaded, e.g. ``weights: ema (validated better: ...)``."""
    return f"weights: {info.get('weights', 'raw')} ({info.get('weights_reason', 'the only weights in the file')})"


def load_state_dict_file(path: PathLike, weights: str = "best") -> Dict[str, torch.Tensor]:
    return read_model_file(path, weights)[0]


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                 source: str = "state dict") -> LoadReport:
    """Copy ``state_dict`` into ``model``.

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`WeightsMismatchError` listing all of them, and nothing is loaded. With ``strict=False``
    every key that fits is loaded and the report says what was left out.
    """
    own = model.state_dict()
    from timm.models import clean_state_dict

    state_dict = clean_state_dict(dict(state_dict))
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
                    class_names: Optional[List[str]] = None, before_replace: Optional[Callable[[], None]] = None,
                    **extra: Any) -> None:
    """Write a ``.pth`` checkpoint (atomically; ``before_replace``: see :func:`atomic_path`) that
    :func:`create_model_from_file` can rebuild."""
    obj = dict(model=model.state_dict(), model_name=model_name, model_kwargs=dict(model_kwargs),
               class_names=list(class_names) if class_names is not None else None, **extra)
    save_torch(obj, path, before_replace)


def create_model_from_file(path: PathLike, strict: bool = True, weights: str = "best",
                           **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the Pale classifier a checkpoint or export describes and load its weights
    (``weights``: see :func:`read_model_file`).

    Returns the model (in eval mode) and the file's description (``class_names``, ``weights`` etc.).
    A checkpoint of another task (``pale seg train``, ``pale det train``) is refused by name.
    """
    import timm

    from . import register_models

    register_models()
    state_dict, info = read_model_file(path, weights)
    task = info.get("task")
    if task not in (None, "classification"):
        group, loader = (("seg", "pale.dense.seg_task.load_segmenter") if task == "segmentation" else
                         ("det", "pale.dense.det_task.load_detector"))
        raise CheckpointError(f"{path} is a {task} checkpoint ({info.get('model_name')}), which the classifier "
                              f"commands (eval, predict, export, visualize) do not take: use `pale {group} eval` or "
                              f"`pale {group} predict` with it (in Python: {loader})")
    name = info.get("model_name")
    if not name:
        raise CheckpointError(f"{path} does not say which model it holds (no 'model_name'); "
                              f"build the model yourself and use pale.io.load_weights")
    if not timm.is_model(name):
        raise CheckpointError(f"{path} holds a {name!r}, which is not a model timm knows")
    kwargs = dict(info.get("model_kwargs") or {}, **overrides)
    with settings_error(f"{path}: cannot build {name} from its stored settings"):
        model = timm.create_model(name, **kwargs)
    report = load_weights(model, state_dict, strict=strict, source=str(path))
    if not report.ok:
        warnings.warn(f"{path}: loaded the weights that fit; left out:\n{report.describe()}", stacklevel=2)
    return model.eval(), info
