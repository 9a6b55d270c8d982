"""pale: the Pale Transformer (Wu et al., AAAI 2022) for PyTorch.

``import pale`` registers ``pale_tiny``, ``pale_small`` and ``pale_base`` with timm. Submodules load on
first use (``pale.io``, ``pale.predict``, ``pale.train``, ...), so ``import pale; pale.io`` works.

The ``pale`` command (console script or ``python -m pale``) is the one exception: it imports this
package before it has parsed its arguments, so it registers the models itself after parsing, and
``pale --help`` or a mistyped option answers without loading torch.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["ATTN_MODES", "POS_EMBEDS", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention", "create_attention",
           "register_models", "__version__"]

_MODEL_NAMES = {"ATTN_MODES", "POS_EMBEDS", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention",
                "create_attention"}
_SUBMODULES = {"bench", "cli", "commands", "complexity", "dense", "errors", "export", "io", "models",
               "predict", "progress", "train", "visualize"}


def register_models() -> None:
    """Register the Pale models with timm (idempotent: importing :mod:`pale.models` does it)."""
    importlib.import_module(".models", __name__)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(".models", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | _SUBMODULES | _MODEL_NAMES)


def _imported_by_the_command() -> bool:
    # python -m pale: sys.argv[0] is "-m" while the package is being located; the console script's
    # argv[0] is the script itself (a module named pale.py would shadow this package, so no clash).
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or Path(argv0).name in ("pale", "pale.exe", "pale-script.py")


if not _imported_by_the_command():
    register_models()
