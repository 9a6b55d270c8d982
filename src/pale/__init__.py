"""pale: the Pale Transformer (Wu et al., AAAI 2022) for PyTorch.

``import pale`` registers ``pale_tiny``, ``pale_small`` and ``pale_base`` with timm. Submodules load on
first use (``pale.checkpoint``, ``pale.predict``, ``pale.train``, ...), so ``import pale; pale.checkpoint``
works.

Registering means importing :mod:`pale.models`, which needs timm (seconds to import). So that
``pale --help`` (which imports this package first) answers at once, this package imports nothing
heavy itself: when timm is already imported, the models register now; otherwise they register the
moment timm is imported, whoever imports it (``import pale, timm`` works like ``import timm, pale``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Optional, Sequence

__version__ = "0.1.0"
__all__ = ["ATTN_MODES", "POS_EMBEDS", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention", "create_attention",
           "create_model_from_file", "__version__"]

_MODEL_NAMES = {"ATTN_MODES", "POS_EMBEDS", "PaleBlock", "PaleStage", "PaleTransformer", "PSAttention",
                "create_attention"}
_SUBMODULES = {"bench", "checkpoint", "cli", "commands", "complexity", "dense", "device", "errors", "export",
               "files", "images", "models", "predict", "progress", "train", "visualize"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(".models", __name__), name)
    if name == "create_model_from_file":
        return importlib.import_module(".checkpoint", __name__).create_model_from_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | _SUBMODULES | _MODEL_NAMES | {"create_model_from_file"})


class _RegisterWhenTimmLoads:
    """A meta path finder (not subclassing importlib.abc's, whose import costs ``pale --help`` 14 ms):
    finds ``timm`` as the other finders would, and imports :mod:`pale.models` (which registers the
    models) as soon as timm's own ``__init__`` has run. Used once, then removed."""

    def find_spec(self, name: str, path: Optional[Sequence[str]] = None, target: Any = None) -> Any:
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_timm(module)
            importlib.import_module(".models", __name__)
        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    importlib.import_module(".models", __name__)
else:
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
