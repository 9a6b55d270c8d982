"""Reading images as every command and the training data do, and finding them in folders.

* Images load through one function, :func:`load_image` (upright by their EXIF orientation, 16-bit
  and float images scaled to 8 bits), and folders are searched through one, :func:`find_images`,
  with one list of extensions (torchvision's :data:`IMAGE_EXTENSIONS`).
* :func:`output_stems` gives each input image a distinct name for what a command writes about it.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Dict, List

from torchvision.datasets.folder import IMG_EXTENSIONS as IMAGE_EXTENSIONS

from .errors import InputError, MissingFileError
from .files import PathLike

# IMAGE_EXTENSIONS: what find_images looks for in folders (torchvision's ImageFolder list; no .gif,
# whose files may hold many frames). A file named explicitly loads whatever its extension.

__all__ = ["IMAGE_EXTENSIONS", "BadImageError", "to_8bit", "load_image", "exif_turn_note", "find_images",
           "output_stems"]


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
